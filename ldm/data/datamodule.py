"""The ``data:`` section of a training config: datasets from ``target``/``params`` and their loaders."""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torch.utils.data import default_collate

from ldm.data.sampler import InfiniteShardSampler
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)
# The original configs name Lightning's data module of main.py; this class takes its place.
TARGET_ALIASES = {"main.DataModuleFromConfig": "ldm.data.datamodule.DataModuleFromConfig"}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dicts of samples; bookkeeping fields (``__skipped__``, ``__pos__``) are summed / kept once."""
    skipped = sum(int(s.pop("__skipped__", 0)) for s in samples)
    positions = [s.pop("__pos__", None) for s in samples]
    batch = default_collate(samples)
    batch["__skipped__"] = skipped
    batch["__count__"] = len(samples)
    if positions[-1] is not None:
        batch["__pos__"] = [int(x) for x in positions[-1]]
    return batch


class DataPosition:
    """Where this rank is in its training stream; stored in checkpoints, given back to the loader on resume."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        state = dict(state or {})
        self.samples = int(state.get("samples", 0))
        self.skipped = int(state.get("skipped", 0))
        self.tar = copy.deepcopy(dict(state.get("tar", {})))

    def update(self, batch: Mapping[str, Any]) -> None:
        """Account for a batch the trainer consumed."""
        self.samples += int(batch.get("__count__", 0))
        self.skipped += int(batch.get("__skipped__", 0))
        if "__pos__" in batch:
            virtual, position, n_workers = batch["__pos__"]
            self.tar = {"num_workers": n_workers, "next": (virtual + 1) % n_workers,
                        "pos": {**self.tar.get("pos", {}), str(virtual): position}}

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (ints, strings, dicts) for the checkpoint."""
        return {"samples": self.samples, "skipped": self.skipped, "tar": copy.deepcopy(self.tar)}


def strip_bookkeeping(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the loader's bookkeeping fields, as the model expects it."""
    return {k: v for k, v in batch.items() if k not in ("__skipped__", "__count__", "__pos__")}


class DataModuleFromConfig:
    """Datasets of the ``data.params`` section: ``train``, ``validation`` (or ``validation_fraction``), loaders.

    ``validation_fraction`` without a ``validation`` entry splits a folder dataset (one that accepts ``split``):
    the train part gets ``split: train``, a copy without augmentation ``split: validation``.
    """

    def __init__(self, batch_size: int, train: Mapping | None = None, validation: Mapping | None = None,
                 test: Mapping | None = None, num_workers: int | None = None, validation_fraction: float = 0.0,
                 val_batch_size: int | None = None, wrap: bool = False, shuffle_val_dataloader: bool = False,
                 **ignored: Any) -> None:
        if train is None:
            raise ValueError("data.params.train is missing: give a dataset target/params for training")
        if ignored:
            logger.info("data.params: ignoring %s", sorted(ignored))
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers if num_workers is not None else min(8, self.batch_size * 2))
        train, validation = self._split(train, validation, validation_fraction)
        self.train_config, self.validation_config = train, validation
        self.train: Dataset | None = None
        self.validation: Dataset | None = None

    @staticmethod
    def _split(train: Mapping, validation: Mapping | None, fraction: float) -> tuple[dict, dict | None]:
        train = copy.deepcopy(dict(train))
        if validation is not None or fraction <= 0:
            return train, copy.deepcopy(dict(validation)) if validation is not None else None
        params = dict(train.get("params") or {})
        train["params"] = {**params, "split": "train", "validation_fraction": fraction}
        val_params = {**params, "split": "validation", "validation_fraction": fraction, "random_crop": False,
                      "flip_p": 0.0}
        return train, {"target": train["target"], "params": val_params}

    def setup(self) -> None:
        """Instantiate the datasets (once)."""
        if self.train is None:
            self.train = instantiate_from_config(self.train_config)
        if self.validation is None and self.validation_config is not None:
            self.validation = instantiate_from_config(self.validation_config)

    def train_loader(self, rank: int, world_size: int, seed: int, position: DataPosition,
                     pin_memory: bool = False) -> DataLoader:
        """Endless loader of this rank's shard of the training data, starting at ``position``."""
        self.setup()
        ds = self.train
        sampler = None
        if isinstance(ds, IterableDataset):
            if not hasattr(ds, "configure"):
                raise TypeError(f"{type(ds).__name__} is an IterableDataset without configure(rank, world_size, seed, "
                                f"state): it cannot be sharded over ranks nor resumed")
            ds.configure(rank, world_size, seed, position.tar)
        else:
            sampler = InfiniteShardSampler(len(ds), rank, world_size, seed, shuffle=True, start=position.samples)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate, pin_memory=pin_memory, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(seed), drop_last=False)

    def val_loader(self, rank: int, world_size: int, seed: int) -> DataLoader | None:
        """One pass over this rank's share of the validation data (None without a validation set)."""
        self.setup()
        ds = self.validation
        if ds is None:
            return None
        if isinstance(ds, IterableDataset):
            if hasattr(ds, "configure"):
                ds.configure(rank, world_size, seed, None)
        else:
            ds = Subset(ds, list(range(rank, len(ds), world_size)))
        return DataLoader(ds, batch_size=self.val_batch_size, num_workers=min(self.num_workers, 2),
                          collate_fn=collate, shuffle=False, drop_last=False)
