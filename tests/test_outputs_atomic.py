"""Output files appear only complete and never land on someone else's file (issue 13, parts 2 and 3): private
temporary files under unpredictable names, created exclusively (a planted link is never followed), then linked to
the first free number; an interrupted or killed writer leaves no file under a final name."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from ldm.inference import outputs
from ldm.inference.outputs import OutputWriter, read_parameters, save_numbered, temp_name, write_png

FINAL = re.compile(r"(grid-)?\d+\.png")


def _image(value: int = 0) -> Image.Image:
    return Image.new("RGB", (16, 16), (value % 256, 20, 30))


def _finals(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if FINAL.fullmatch(p.name)) if folder.is_dir() else []


def _is_complete_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.load()  # decodes every chunk: a truncated file raises
    return True


def test_temp_names_are_hidden_unpredictable_and_not_numbered():
    names = {temp_name() for _ in range(1000)}
    assert len(names) == 1000
    for name in list(names)[:50]:
        assert re.fullmatch(r"\.[0-9a-f]{32}\.tmp", name), name  # 128 random bits, no pid, no number
        assert not FINAL.match(name)


def test_planted_links_at_temp_names_never_redirect_a_write(tmp_path: Path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    folder = tmp_path / "out"
    folder.mkdir()
    dangling = tmp_path / "created-through-link"
    planted = [f".{i:032x}.tmp" for i in range(5)]
    for i, name in enumerate(planted):
        (folder / name).symlink_to(victim if i % 2 == 0 else dangling)
    # The old predictable names too, for this process id.
    for old in (f".00000.png.{os.getpid()}.tmp", f".grid-0000.png.{os.getpid()}.tmp"):
        (folder / old).symlink_to(victim)
    names = iter([*planted, ".fresh0.tmp", ".fresh1.tmp"])
    monkeypatch.setattr(outputs, "temp_name", lambda: next(names))  # an attacker who guessed the first five names
    path = save_numbered(_image(), folder, "", 5, "p")
    assert path.name == "00000.png" and _is_complete_png(path) and read_parameters(path) == "p"
    assert victim.read_text() == "user data" and not dangling.exists()
    assert all((folder / name).is_symlink() for name in planted)  # untouched, and nothing else left behind
    assert sorted(p.name for p in folder.iterdir() if not p.is_symlink()) == ["00000.png"]


def test_a_planted_link_at_a_final_name_is_skipped(tmp_path: Path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"not to be touched")
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "00000.png").symlink_to(victim)
    (tmp_path / "grid-0000.png").symlink_to(tmp_path / "missing-target.png")
    path = save_numbered(_image(), samples, "", 5, start=0)  # a name planted after the folder was listed
    assert path.name == "00001.png" and _is_complete_png(path)
    writer = OutputWriter(tmp_path, n_rows=1)
    assert writer.grid([_image()], None).name == "grid-0001.png"
    assert victim.read_bytes() == b"not to be touched" and not (tmp_path / "missing-target.png").exists()
    with pytest.raises(FileExistsError):
        write_png(_image(), samples / "00000.png")
    assert victim.read_bytes() == b"not to be touched"


def _fail_midway(exc: BaseException):
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(self, buffer, *args, **kwargs)
        fp.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half a PNG, then the encoder fails
        raise exc

    return save


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_an_encoder_failing_midway_leaves_no_file(tmp_path: Path, monkeypatch, exc: BaseException):
    writer = OutputWriter(tmp_path, n_rows=2)
    assert writer.sample(_image(1), "first") is not None  # one complete image before the failure
    monkeypatch.setattr(Image.Image, "save", _fail_midway(exc))
    with pytest.raises(type(exc)):
        writer.sample(_image(2), "second")
    with pytest.raises(type(exc)):
        writer.grid([_image(1), _image(2)], "grid")
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["00000.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]  # no grid, no temporary file
    assert writer.written == [tmp_path / "samples" / "00000.png"]


def test_no_final_name_exists_while_the_png_is_encoded(tmp_path: Path, monkeypatch):
    seen: list[list[str]] = []
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        seen.append(sorted(p.name for p in _finals(tmp_path / "samples")))
        real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    writer = OutputWriter(tmp_path, save_grid=False)
    paths = [writer.sample(_image(i), f"image {i}") for i in range(3)]
    assert seen == [[], ["00000.png"], ["00000.png", "00001.png"]]  # a reader never sees the file being written
    assert [read_parameters(p) for p in paths] == ["image 0", "image 1", "image 2"]


_CHILD = r"""
import io, sys, time
from pathlib import Path
from PIL import Image
from ldm.inference.outputs import OutputWriter

real_save = Image.Image.save
count = 0

def save(self, fp, *args, **kwargs):
    global count
    count += 1
    buffer = io.BytesIO()
    real_save(self, buffer, *args, **kwargs)
    data = buffer.getvalue()
    if count < 3:
        fp.write(data)
        return
    fp.write(data[: len(data) // 2])
    fp.flush()
    print("midway", flush=True)
    time.sleep(60)

Image.Image.save = save
writer = OutputWriter(Path(sys.argv[1]), n_rows=2)
for i in range(3):
    writer.sample(Image.new("RGB", (64, 64), (i * 50, 0, 0)), f"image {i}")
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_writer_leaves_only_complete_files(tmp_path: Path, sig: int):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "midway"  # two images done, the third half encoded
        child.send_signal(sig)
        assert child.wait(timeout=60) == -sig
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    finals = _finals(out / "samples")
    assert [p.name for p in finals] == ["00000.png", "00001.png"]
    assert all(_is_complete_png(p) for p in finals)
    assert [read_parameters(p) for p in finals] == ["image 0", "image 1"]
    assert not list(out.glob("grid-*"))


def test_concurrent_writers_in_threads_never_collide(tmp_path: Path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "00001.png").write_bytes(b"an older file")
    workers, count = 6, 8
    barrier = threading.Barrier(workers)
    results: dict[int, list[Path]] = {}

    def work(w: int) -> None:
        writer = OutputWriter(tmp_path, n_rows=2)
        barrier.wait()
        results[w] = [writer.sample(_image(w * count + i), f"{w}/{i}") for i in range(count)]
        results[w].append(writer.grid([_image(w)], f"grid {w}"))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = [p for w in range(workers) for p in results[w][:-1]]
    assert len(set(paths)) == workers * count and tmp_path / "samples" / "00001.png" not in paths
    assert (tmp_path / "samples" / "00001.png").read_bytes() == b"an older file"
    assert {read_parameters(p) for p in paths} == {f"{w}/{i}" for w in range(workers) for i in range(count)}
    grids = sorted(results[w][-1].name for w in range(workers))
    assert grids == [f"grid-{i:04d}.png" for i in range(workers)]
    leftovers = [p.name for p in (tmp_path / "samples").iterdir() if p.name.startswith(".")]
    assert leftovers == []
