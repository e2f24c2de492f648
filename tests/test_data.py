"""Training data: image folders with captions, tar shards, transforms, the resumable sharded sampler."""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_helpers import make_images

from ldm.data.datamodule import DataModuleFromConfig, DataPosition, collate
from ldm.data.folder import ImageCaptionFolder
from ldm.data.sampler import InfiniteShardSampler
from ldm.data.tar_shards import TarShardDataset, expand_urls
from ldm.data.transforms import ImageTransform


def test_transform_shapes_range_and_determinism():
    img = Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8))
    t = ImageTransform(size=16, random_crop=True, flip_p=0.5)
    out = t(img, seed=3)
    assert out.shape == (16, 16, 3) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, t(img, seed=3))
    assert any(not torch.equal(out, t(img, seed=s)) for s in range(4, 10))
    assert ImageTransform(size=[8, 12], crop=False)(img).shape == (8, 12, 3)
    with pytest.raises(ValueError, match="min_size"):
        ImageTransform(size=16, min_size=40)(img)


def test_center_crop_keeps_the_middle():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # white middle band, 20 px wide
    out = ImageTransform(size=20, random_crop=False)(Image.fromarray(arr))
    assert torch.all(out == 1.0)


@pytest.mark.parametrize("captions", ["sidecar", "jsonl"])
def test_folder_reads_images_with_captions(tmp_path, captions):
    make_images(tmp_path, 5, captions=captions)
    ds = ImageCaptionFolder(str(tmp_path), size=16, image_key="jpg", caption_key="txt")
    assert len(ds) == 5
    item = ds[2]
    assert item["jpg"].shape == (16, 16, 3) and item["txt"] == "a photo of thing 2"
    assert item["__key__"] == "img002.png" and item["__skipped__"] == 0


def test_folder_validation_split_is_disjoint_and_complete(tmp_path):
    make_images(tmp_path, 40, size=(8, 8))
    train = ImageCaptionFolder(str(tmp_path), size=8, split="train", validation_fraction=0.25)
    val = ImageCaptionFolder(str(tmp_path), size=8, split="validation", validation_fraction=0.25)
    assert not set(train.files) & set(val.files)
    assert len(train) + len(val) == 40 and 3 <= len(val) <= 20


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    make_images(tmp_path, 3, corrupt=2)
    ds = ImageCaptionFolder(str(tmp_path), size=16)
    assert len(ds) == 5
    items = [ds[i] for i in range(len(ds))]  # the two bad files sort last: the next good one (wrapping) is used
    assert [it["__skipped__"] for it in items] == [0, 0, 0, 2, 1]
    assert all(it["__key__"].startswith("img") for it in items)
    assert "skipping unreadable sample" in caplog.text
    batch = collate([ds[3], ds[4]])
    assert batch["__skipped__"] == 3 and batch["__count__"] == 2 and batch["jpg"].shape == (2, 16, 16, 3)


def test_sampler_shards_ranks_and_resumes():
    n = 10
    per_rank = [list(itertools.islice(iter(InfiniteShardSampler(n, r, 2, seed=1)), 5)) for r in range(2)]
    idx = [i for part in per_rank for i, _ in part]
    assert sorted(idx) == list(range(n))  # one epoch split over the two ranks without overlap
    full = list(itertools.islice(iter(InfiniteShardSampler(n, 0, 2, seed=1)), 12))
    resumed = list(itertools.islice(iter(InfiniteShardSampler(n, 0, 2, seed=1, start=7)), 5))
    assert resumed == full[7:12]
    epoch0, epoch1 = full[:5], full[5:10]
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1] or [s for _, s in epoch0] != [s for _, s in epoch1]


def _write_shard(path: Path, start: int, n: int, bad: set[int] = frozenset(), json_caption: bool = False) -> None:
    rng = np.random.default_rng(start)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            data = b"garbage" if i in bad else buf.getvalue()
            caption = json.dumps({"caption": f"cap {i}"}).encode() if json_caption else f"cap {i}".encode()
            for name, payload in ((f"s{i:04d}.png", data), (f"s{i:04d}.{'json' if json_caption else 'txt'}",
                                                             caption)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    for k in range(4):
        _write_shard(tmp_path / f"shard-{k:02d}.tar", 10 * k, 6, bad={13}, json_caption=k == 3)
    return tmp_path


def test_shard_urls_expand(shards):
    assert expand_urls(str(shards / "shard-{00..03}.tar")) == [str(shards / f"shard-{k:02d}.tar") for k in range(4)]
    assert len(expand_urls(str(shards))) == 4 and len(expand_urls(str(shards / "*.tar"))) == 4
    with pytest.raises(FileNotFoundError, match="tar shards"):
        TarShardDataset(str(shards / "missing-{0..1}.tar"))


def test_tar_shards_read_once_in_order_skipping_bad_samples(shards):
    ds = TarShardDataset(str(shards), size=8, repeat=False)
    items = list(ds)
    keys = [it["__key__"] for it in items]
    assert len(keys) == 23 and "s0013" not in keys  # 24 samples, one unreadable
    assert sum(it["__skipped__"] for it in items) == 1
    assert items[0]["txt"] == "cap 0" and items[-1]["txt"] == "cap 35"  # json captions too
    assert items[0]["jpg"].shape == (8, 8, 3)


def test_tar_shards_split_over_ranks(shards):
    seen = []
    for rank in range(2):
        ds = TarShardDataset(str(shards), size=8, shuffle_buffer=4)
        ds.configure(rank, 2, seed=0)
        seen.append({it["__key__"] for it in itertools.islice(iter(ds), 7)})  # within the first epoch
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 7


@pytest.fixture
def file_system_sharing():
    """Loader workers hand tensors over through files: the test network guard blocks the Unix sockets."""
    import torch.multiprocessing as mp
    old = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    yield
    mp.set_sharing_strategy(old)


@pytest.mark.parametrize("workers", [0, 2])
def test_tar_stream_resumes_exactly(shards, workers, file_system_sharing):
    cfg = {"target": "ldm.data.tar_shards.TarShardDataset",
           "params": {"urls": str(shards / "shard-{00..03}.tar"), "size": 8, "shuffle_buffer": 5}}
    dm = DataModuleFromConfig(batch_size=3, train=cfg, num_workers=workers)

    def keys(position: DataPosition, n: int) -> list[list[str]]:
        it = iter(dm.train_loader(0, 1, seed=4, position=position))
        out = []
        for _ in range(n):
            batch = next(it)
            position.update(batch)
            out.append(list(batch["__key__"]))
        return out

    reference = keys(DataPosition(), 9)  # crosses an epoch (23 good samples) and the bad sample
    position = DataPosition()
    first = keys(position, 4)
    state = position.state_dict()
    assert first == reference[:4]
    assert keys(DataPosition(state), 5) == reference[4:9]


def test_datamodule_validation_fraction_and_alias(tmp_path):
    make_images(tmp_path, 12, size=(8, 8))
    train = {"target": "ldm.data.folder.ImageCaptionFolder", "params": {"root": str(tmp_path), "size": 8,
                                                                         "random_crop": True}}
    dm = DataModuleFromConfig(batch_size=2, train=train, validation_fraction=0.3, num_workers=0)
    dm.setup()
    assert len(dm.train) + len(dm.validation) == 12 and len(dm.validation) > 0
    assert dm.validation_config["params"]["random_crop"] is False
    val_keys = [k for r in range(2) for b in dm.val_loader(r, 2, 0) for k in b["__key__"]]
    assert sorted(val_keys) == sorted(dm.validation.files)  # ranks share the validation set without overlap
    position = DataPosition()
    batch = next(iter(dm.train_loader(0, 1, 0, position)))
    position.update(batch)
    assert position.samples == 2 and batch["jpg"].shape == (2, 8, 8, 3)
