"""Two gloo processes on CPU train with DistributedDataParallel: different data per rank, identical weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_helpers import make_images, tiny_config

WORLD = 2


class RecordKeys:
    """Callback writing the sample keys each rank trained on, and its final weights."""

    def __init__(self, out: Path) -> None:
        self.out, self.keys = out, []

    def on_train_batch(self, trainer, batch) -> None:
        self.keys += list(batch["__key__"])

    def on_train_end(self, trainer) -> None:
        rank = trainer.ctx.rank
        (self.out / f"keys{rank}.json").write_text(json.dumps(self.keys))
        torch.save(trainer.model.state_dict(), self.out / f"weights{rank}.pt")


def _worker(rank: int, tmp: str, kind: str) -> None:
    torch.set_num_threads(1)
    from ldm.training.distributed import init_distributed, shutdown
    from ldm.training.trainer import RunOptions, Trainer

    tmp_path = Path(tmp)
    ctx = init_distributed(rank, WORLD, rank, device="cpu", init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        cfg = tiny_config(kind, tmp_path / "img", ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=2",
                                                   "trainer.val_every_n_steps=3", "trainer.limit_val_batches=1",
                                                   "trainer.image_log_every_n_steps=0", "data.params.batch_size=2",
                                                   "trainer.log_every_n_steps=1"])
        trainer = Trainer(cfg, RunOptions(logdir=tmp_path / "run", seed=1, scale_lr=True,
                                          callbacks=[RecordKeys(tmp_path)]), ctx)
        trainer.fit()
    finally:
        shutdown()


@pytest.mark.parametrize("kind", ["ldm", pytest.param("ae", marks=pytest.mark.slow)])
def test_two_gloo_ranks_see_different_data_and_keep_identical_weights(tmp_path, kind):
    make_images(tmp_path / "img", 32, size=(32, 32))
    mp.start_processes(_worker, args=(str(tmp_path), kind), nprocs=WORLD, join=True, start_method="spawn")
    keys = [json.loads((tmp_path / f"keys{r}.json").read_text()) for r in range(WORLD)]
    assert len(keys[0]) == len(keys[1]) == 6  # 3 steps x batch 2 on each rank
    assert not set(keys[0]) & set(keys[1])
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in range(WORLD))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["world_size"] == WORLD and len(ckpt["rank_states"]) == WORLD
    assert ckpt["rank_states"][0]["rng"]["torch"].ne(ckpt["rank_states"][1]["rng"]["torch"]).any()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step-00000002.ckpt" in names and "step-00000003.ckpt" in names and not any(".tmp-" in n for n in names)
    trained = "model.diffusion_model.out.2.weight" if kind == "ldm" else "decoder.conv_out.weight"
    assert not torch.equal(ckpt["state_dict"][trained], w0[trained] * 0)
