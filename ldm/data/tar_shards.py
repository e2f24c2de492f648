"""WebDataset-format tar shards (``key.jpg`` + ``key.txt``/``key.json`` per sample), read with ``tarfile``.

The shards of each epoch are split over ranks and data-loader workers; a seeded shuffle buffer mixes samples.
Every sample carries its position (virtual worker, index in that worker's stream), which the trainer stores in
checkpoints so that a resumed run reads exactly the samples the interrupted one would have read next.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.common import IMAGE_EXTENSIONS, SKIPPABLE_ERRORS, SkipLog, caption_from_json, decode_image
from ldm.data.sampler import mix_seed
from ldm.data.transforms import ImageTransform

logger = logging.getLogger(__name__)
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Local shard paths from a list, a folder, a glob or brace ranges (``data-{000..099}.tar``)."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        m = _BRACES.search(item)
        if m:
            lo, hi = m.group(1), m.group(2)
            width = len(lo) if lo.startswith("0") else 0
            for i in range(int(lo), int(hi) + 1):
                out += expand_urls(item[:m.start()] + str(i).zfill(width) + item[m.end():])
        elif os.path.isdir(item):
            out += sorted(str(p) for p in Path(item).glob("*.tar"))
        elif any(c in item for c in "*?["):
            out += sorted(glob.glob(item))
        else:
            out.append(item)
    return out


def iter_tar_samples(path: str, skips: SkipLog) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for consecutive members sharing a key; a damaged shard ends early (counted)."""
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                dirname, base = os.path.split(info.name)
                stem, _, ext = base.partition(".")
                name = f"{dirname}/{stem}" if dirname else stem
                if name != key and members:
                    yield key, members
                    members = {}
                key = name
                members[ext.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        skips.skipped(f"{path}:{key}", e)
        members = {}
    if members:
        yield key, members


def shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``buffer_size`` items (no shuffling when it is <= 1)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class TarShardDataset(IterableDataset):
    """Samples from local webdataset tar shards as ``{image_key: [H,W,3] in [-1,1], caption_key: str}``.

    ``repeat: true`` (training) cycles forever, with the shard order reshuffled every epoch; ``false``
    (validation) reads each shard once in order. Unreadable samples are skipped and counted (``__skipped__``).
    """

    def __init__(self, urls: str | Sequence[str], size: Any = 256, image_key: str = "jpg", caption_key: str = "txt",
                 random_crop: bool = False, flip_p: float = 0.0, interpolation: str = "bicubic",
                 shuffle_buffer: int = 1000, repeat: bool = True, crop: bool = True, min_size: int = 0) -> None:
        self.shards = expand_urls(urls)
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if not self.shards or missing:
            raise FileNotFoundError(f"tar shards not found: {missing[:3] or urls}; give local .tar paths, a folder, "
                                    f"a glob or a brace range such as data-{{000..009}}.tar")
        self.image_key, self.caption_key = image_key, caption_key
        self.transform = ImageTransform(size=size, random_crop=random_crop, flip_p=flip_p,
                                        interpolation=interpolation, crop=crop, min_size=min_size)
        self.shuffle_buffer = shuffle_buffer if repeat else 0
        self.repeat = repeat
        self.rank, self.world_size, self.seed = 0, 1, 0
        self.state: dict[str, Any] = {}

    def configure(self, rank: int, world_size: int, seed: int, state: dict[str, Any] | None = None) -> None:
        """Set this process's rank, the run's seed and the resume position (from a checkpoint's data state)."""
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.state = dict(state or {})

    def _slot(self) -> tuple[int, int, int]:
        """(virtual worker, number of workers, position already consumed) of the calling worker."""
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        state = self.state
        if state and state.get("num_workers") != n_workers:
            logger.warning("the data position was saved with %s loader workers, now %d: restarting the stream "
                           "(resume is not sample-exact)", state.get("num_workers"), n_workers)
            state = {}
        virtual = (worker + int(state.get("next", 0))) % n_workers
        done = int(dict(state.get("pos", {})).get(str(virtual), -1))
        return virtual, n_workers, done

    def _raw(self, virtual: int, n_workers: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        slots, slot = self.world_size * n_workers, self.rank * n_workers + virtual
        epoch = 0
        while True:
            shards = list(self.shards)
            if self.repeat:
                random.Random(mix_seed(self.seed, epoch)).shuffle(shards)
            split_by_shard = len(shards) >= slots
            counter = 0
            for shard in (shards[slot::slots] if split_by_shard else shards):
                for key, members in iter_tar_samples(shard, self.skips):
                    if split_by_shard or counter % slots == slot:
                        yield key, members
                    counter += 1
            epoch += 1
            if not self.repeat:
                return

    def decode(self, key: str, members: dict[str, bytes], seed: int) -> dict[str, Any]:
        """Raw members -> transformed sample; raises a skippable error for unreadable data."""
        ext = next((e for e in members if "." + e in IMAGE_EXTENSIONS), None)
        if ext is None:
            raise KeyError(f"no image member (extensions {IMAGE_EXTENSIONS}) among {sorted(members)}")
        if "txt" in members:
            caption = members["txt"].decode("utf-8").strip()
        elif "json" in members:
            import json
            caption = caption_from_json(json.loads(members["json"]))
        else:
            caption = ""
        image = self.transform(decode_image(members[ext]), seed)
        return {self.image_key: image, self.caption_key: caption, "__key__": key}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skips = SkipLog(f"TarShardDataset(rank {self.rank})")
        virtual, n_workers, done = self._slot()
        rng = random.Random(mix_seed(self.seed, self.rank, virtual))
        for position, (key, members) in enumerate(shuffled(self._raw(virtual, n_workers), self.shuffle_buffer, rng)):
            if position <= done:
                continue
            try:
                sample = self.decode(key, members, mix_seed(self.seed, self.rank, virtual, position))
            except SKIPPABLE_ERRORS as e:
                self.skips.skipped(key, e)
                continue
            sample["__skipped__"] = self.skips.take()
            sample["__pos__"] = (virtual, position, n_workers)
            yield sample
