from setuptools import find_packages, setup

setup(
    name="ldm-sd",
    version="0.1.0",
    description="Latent text-to-image diffusion in the Stable Diffusion style: faithful, fast and safe",
    packages=find_packages(include=["ldm", "ldm.*"]),
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
    ],
    extras_require={
        "train": ["tensorboard"],  # optional event files (trainer.tensorboard); nothing else training needs
        "test": ["pytest>=7"],
    },
)
