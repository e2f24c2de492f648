"""Outputs of the scripts: numbering that never overwrites (also under concurrent runs), atomic PNG writes, the
web-UI ``parameters`` text, grids, and the invisible watermark read back from a saved file."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.inference.errors import UsageError
from ldm.inference.metadata import ImageParameters, file_hash, format_parameters, parse_parameters
from ldm.inference.outputs import (OutputWriter, check_writable, make_grid, next_number, read_parameters,
                                   save_numbered, write_png)


def params(**kw) -> ImageParameters:
    base = dict(prompt="a red circle", negative_prompt="", steps=50, sampler="DDIM", cfg_scale=7.5, seed=42,
                width=256, height=192, model="sd-shapes", model_hash="0123456789")
    base.update(kw)
    return ImageParameters(**base)


def test_parameters_text_in_the_web_ui_format():
    text = format_parameters(params(negative_prompt="blurry, dark"))
    assert text == ("a red circle\nNegative prompt: blurry, dark\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, "
                    "Seed: 42, Size: 256x192, Model hash: 0123456789, Model: sd-shapes")


def test_parameters_without_negative_prompt_and_img2img_fields():
    text = format_parameters(params(cfg_scale=5.0, denoising_strength=0.75, eta=0.5, vae="vae-ft-mse"))
    assert "Negative prompt" not in text
    assert text.splitlines()[-1].endswith("CFG scale: 5, Seed: 42, Size: 256x192, Model hash: 0123456789, "
                                          "Model: sd-shapes, Denoising strength: 0.75, Eta DDIM: 0.5, "
                                          "VAE: vae-ft-mse")


def test_parameters_round_trip_with_quoting_and_multiline_prompts():
    p = params(prompt="line one\nline two: with colon", negative_prompt="ugly,\nbad", model='my, "odd": model')
    parsed = parse_parameters(format_parameters(p))
    assert parsed["Prompt"] == p.prompt and parsed["Negative prompt"] == p.negative_prompt
    assert parsed["Model"] == p.model and parsed["Seed"] == "42" and parsed["Size"] == "256x192"
    assert parsed["Steps"] == "50" and parsed["Sampler"] == "DDIM" and parsed["CFG scale"] == "7.5"
    assert parsed["Model hash"] == "0123456789"


def test_parse_parameters_of_a_prompt_only_text():
    assert parse_parameters("just a prompt: nothing else") == {"Prompt": "just a prompt: nothing else",
                                                               "Negative prompt": ""}


def test_file_hash_is_the_short_sha256(tmp_path: Path):
    f = tmp_path / "m.bin"
    f.write_bytes(os.urandom(3 << 20))
    assert file_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]


def test_next_number_follows_existing_files_with_gaps(tmp_path: Path):
    assert next_number(tmp_path / "missing") == 0
    for name in ("00000.png", "00007.png", "notes.txt", "x00099.png", ".00050.png.1.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert next_number(tmp_path) == 8
    (tmp_path / "grid-0003.png").write_bytes(b"")
    assert next_number(tmp_path, "grid-") == 4


def test_save_numbered_never_reuses_an_existing_name(tmp_path: Path):
    (tmp_path / "00002.png").write_bytes(b"old")
    image = Image.new("RGB", (4, 4))
    first = save_numbered(image, tmp_path, "", 5, start=1)
    second = save_numbered(image, tmp_path, "", 5, start=1)
    assert (first.name, second.name) == ("00001.png", "00003.png")
    assert (tmp_path / "00002.png").read_bytes() == b"old"
    assert save_numbered(image, tmp_path, "", 5).name == "00004.png"  # default: after the highest number


def test_write_png_is_atomic_and_carries_parameters(tmp_path: Path):
    path = tmp_path / "00000.png"
    write_png(Image.new("RGB", (4, 4), (10, 20, 30)), path, "prompt\nSteps: 1, Sampler: DDIM, Seed: 1")
    assert read_parameters(path) == "prompt\nSteps: 1, Sampler: DDIM, Seed: 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]  # no temporary file left behind
    with Image.open(path) as image:
        assert image.getpixel((0, 0)) == (10, 20, 30)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_png(Image.new("RGB", (4, 4)), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]


def test_failed_write_gives_the_reserved_name_back(tmp_path: Path):
    class Broken:
        size = (4, 4)

        def save(self, *args, **kwargs):
            raise OSError("disk full")

    writer = OutputWriter(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        writer.sample(Broken(), None)  # type: ignore[arg-type]
    assert list((tmp_path / "samples").iterdir()) == []


def _write_many(args: tuple[str, int, int]) -> list[str]:
    outdir, worker, count = args
    writer = OutputWriter(Path(outdir), save_grid=True, n_rows=2)
    names = []
    for i in range(count):
        image = Image.new("RGB", (8, 8), (worker * 40, i, 0))
        names.append(writer.sample(image, f"worker {worker} image {i}\nSteps: 1, Sampler: DDIM, Seed: {i}").name)
    names.append(writer.grid([image, image], "grid").name)
    return names


def test_concurrent_runs_into_one_folder_never_overwrite(tmp_path: Path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "00003.png").write_bytes(b"older run")
    workers, count = 4, 15
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        results = pool.map(_write_many, [(str(tmp_path), w, count) for w in range(workers)])
    samples = [n for names in results for n in names[:-1]]
    grids = [names[-1] for names in results]
    assert len(set(samples)) == workers * count and len(set(grids)) == workers
    assert "00003.png" not in samples and (tmp_path / "samples" / "00003.png").read_bytes() == b"older run"
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert len(files) == workers * count + 1 and not [f for f in files if not f.endswith(".png")]
    texts = set()
    for name in samples:
        texts.add(read_parameters(tmp_path / "samples" / name))
    assert len(texts) == workers * count  # every image is complete and carries its own text
    assert sorted(grids) == [f"grid-{i:04d}.png" for i in range(workers)]


def test_make_grid_layout_matches_torchvision():
    torch = pytest.importorskip("torch")
    from torchvision.utils import make_grid as tv_grid

    images = [Image.fromarray(np.full((6, 10, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    ours = np.asarray(make_grid(images, n_rows=2))
    stacked = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    theirs = tv_grid(stacked, nrow=2).permute(1, 2, 0).numpy()
    assert ours.shape == theirs.shape == (3 * 8 + 2, 2 * 12 + 2, 3)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("payload", ["StableDiffusionV1", "SDV2"])
def test_watermark_is_read_back_from_the_saved_file(tmp_path: Path, payload: str):
    from ldm.modules.watermark import read_watermark

    # dwtDct decoding is content dependent (README of the reference data); an even image decodes reliably.
    image = Image.new("RGB", (256, 256), (120, 130, 140))
    path = OutputWriter(tmp_path, watermark_text=payload).sample(image, "p\nSteps: 1, Sampler: DDIM, Seed: 1")
    with Image.open(path) as saved:
        assert read_watermark(saved, len(payload)) == payload.encode()
        assert saved.info["parameters"].startswith("p\n")
    unmarked = OutputWriter(tmp_path / "plain").sample(image, None)
    with Image.open(unmarked) as saved:
        assert read_watermark(saved, len(payload)) != payload.encode()


def test_too_small_images_are_saved_unmarked_with_one_notice(tmp_path: Path, caplog):
    writer = OutputWriter(tmp_path, watermark_text="StableDiffusionV1")
    small = Image.new("RGB", (32, 32), (1, 2, 3))
    with caplog.at_level(logging.WARNING):
        paths = [writer.sample(small, None) for _ in range(3)]
    notices = [r for r in caplog.records if "too small for the invisible watermark" in r.getMessage()]
    assert len(notices) == 1
    for path in paths:
        with Image.open(path) as saved:
            np.testing.assert_array_equal(np.asarray(saved), np.asarray(small))


def test_skip_flags_write_nothing(tmp_path: Path):
    writer = OutputWriter(tmp_path / "out", save_samples=False, save_grid=False)
    assert writer.sample(Image.new("RGB", (4, 4)), None) is None
    assert writer.grid([Image.new("RGB", (4, 4))], None) is None
    assert not (tmp_path / "out").exists()


def test_check_writable(tmp_path: Path):
    check_writable(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "sub")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="no permission"):
            check_writable(locked / "out")
