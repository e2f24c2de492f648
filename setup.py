from setuptools import find_packages, setup

setup(
    name="ldm-sd",
    version="0.1.0",
    description="Latent text-to-image diffusion in the Stable Diffusion style: faithful, fast and safe",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm.server": ["static/*"]},  # the server's page (HTML, JS, CSS), served at /
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy",
        "einops>=0.6",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "open_clip_torch>=2.20",
        "pillow>=9",
        "tqdm",
        "invisible-watermark>=0.2",
        "opencv-python-headless",
        "torchsde>=0.2.5",  # Brownian-tree noise of the SDE samplers (DPM++ SDE, 2M SDE, 3M SDE)
    ],
    extras_require={
        "train": ["tensorboard"],
        # scripts/serve.py: the web UI's HTTP API and the browser page
        "server": ["fastapi>=0.110", "uvicorn>=0.29"],  # optional event files (trainer.tensorboard); nothing else training needs
        # oracles: k-diffusion's samplers (installed with --no-deps by .ci/run: its own requirements pull in wandb
        # and more; sampling needs scipy and torchdiffeq), diffusers (UniPC), sd-parsers (PNG parameters)
        # transformers + peft: diffusers' text encoders and load_lora_weights (diffusers folders, LoRA oracles)
        # webuiapi: a published client of the web UI's API; selenium drives Debian's chromium (installed by .ci/run)
        "test": ["pytest>=7", "scipy", "torchdiffeq", "diffusers==0.42.1", "sd-parsers==0.6", "transformers==5.24.0",
                 "peft==0.21.2", "fastapi>=0.110", "uvicorn>=0.29", "httpx", "webuiapi==0.9.17", "selenium==4.51.0"],
    },
)
