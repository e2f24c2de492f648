"""A tiny LoRA trained on the shipped default model (models/ldm/sd-shapes) with configs/training/lora-sd1.yaml
teaches it a new colour word: "zorp" shapes are orange in the training pictures. Before, the model draws "a zorp
circle" in other colours; with the exported LoRA given to txt2img's --lora, the classifier reads orange."""
from __future__ import annotations

from collections import Counter

from test_train_helpers import QUIET, ROOT, one_thread, run_training  # noqa: F401

from ldm.data.synthetic_shapes import SHAPES, make_scene, render_scene
from ldm.default_model.classify import read_picture
from ldm.training.config import load_config
from tiny_model import load_script, pixels, samples

MODEL_DIR = ROOT / "models" / "ldm" / "sd-shapes"
SIZE = 256  # the model's own size (at 128 the polished model draws "zorp" red or yellow after 60 LoRA steps)


def _training_pictures(root, n: int = 8) -> None:
    """Orange shapes of every kind on blue, captioned with the new word instead of the colour."""
    root.mkdir(parents=True)
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        render_scene(make_scene(7, i, ("orange", shape, "blue")), SIZE).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a zorp {shape} on a blue background")


def _colours(txt2img, prompt: str, out, extra=()) -> Counter:
    """Colours the classifier reads in 8 pictures of ``prompt`` (10 DDIM steps, seeds 0..7)."""
    argv = ["--prompt", prompt, "--n_samples", "4", "--n_iter", "2", "--H", str(SIZE), "--W", str(SIZE),
            "--steps", "10", "--seed", "0", "--skip_grid", "--no_safety_check", "--outdir", str(out), *extra]
    assert txt2img.main(argv) == 0
    return Counter(read_picture(pixels(p)).colour for p in samples(out))


def test_tiny_lora_teaches_the_default_model_a_colour_word(tmp_path):
    _training_pictures(tmp_path / "data")
    cfg = load_config([MODEL_DIR / "config.yaml", ROOT / "configs" / "training" / "lora-sd1.yaml"], [
        f"model.params.ckpt_path={MODEL_DIR / 'model.safetensors'}",
        f"data.params.train.params.root={tmp_path / 'data'}",
        f"data.params.train.params.size={SIZE}", "data.params.num_workers=0", "data.params.batch_size=4",
        "trainer.max_steps=60", "trainer.precision=32", "trainer.checkpoint_every_n_steps=60",
        "trainer.image_log_every_n_steps=0", "model.base_learning_rate=2e-3", *QUIET])
    run_training(cfg, tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "last-lora.safetensors"
    txt2img = load_script("txt2img")
    prompt = "a zorp circle on a blue background"
    before = _colours(txt2img, prompt, tmp_path / "before")
    after = _colours(txt2img, prompt, tmp_path / "after", ["--lora", str(path)])
    print(f"'{prompt}': before {dict(before)}, with the LoRA {dict(after)}")
    assert before["orange"] <= 1 and after["orange"] >= 5, (before, after)
