"""LitEma: reference parity (lit_ema_0 / lit_ema_1), buffer layout, warm-up rule, store/restore."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ldm.modules.ema import LitEma


class SmallNet(nn.Module):
    """The module of the reference cases: two linears, a LayerNorm and a frozen parameter."""

    def __init__(self, a: int = 3, b: int = 5, c: int = 2) -> None:
        super().__init__()
        self.lin1 = nn.Linear(a, b)
        self.norm = nn.LayerNorm(b)
        self.lin2 = nn.Linear(b, c)
        self.frozen = nn.Parameter(torch.zeros(a), requires_grad=False)


def _set(module: nn.Module, values: dict[str, torch.Tensor], prefix: str) -> None:
    with torch.no_grad():
        for k, p in module.named_parameters():
            p.copy_(values[f"{prefix}.{k}"])


@pytest.mark.parametrize("name", ["lit_ema_0", "lit_ema_1"])
def test_reference_cases(reference_dir, name):
    spec = next(c for c in json.load(open(reference_dir / "cases.json")) if c["name"] == name)
    io, p = load_file(str(reference_dir / spec["io"])), spec["params"]
    tol = lambda k: spec.get("tolerances", {}).get(k, {"atol": spec["atol"], "rtol": spec["rtol"]})  # noqa: E731
    b, a = io["init.lin1.weight"].shape
    net = SmallNet(a, b, io["init.lin2.weight"].shape[0])
    _set(net, io, "init")
    ema = LitEma(net, decay=p["decay"], use_num_upates=p["use_num_upates"])
    for s in range(p["n_updates"]):
        _set(net, io, f"traj{s}")
        ema(net)
        bufs = dict(ema.named_buffers())
        for key in spec["outputs"]:
            if key.startswith(f"shadow{s}."):
                torch.testing.assert_close(bufs[key.split(".", 1)[1]], io[key], **tol(key))
    assert ema.num_updates.dtype == torch.int32 and int(ema.num_updates) == int(io["num_updates"])
    torch.testing.assert_close(ema.decay, io["decay"], **tol("decay"))
    fresh = SmallNet(a, b, io["init.lin2.weight"].shape[0])
    _set(fresh, io, "init")
    ema.copy_to(fresh)
    for k, v in fresh.named_parameters():
        torch.testing.assert_close(v, io[f"copy_to.{k}"], **tol(f"copy_to.{k}"))


def test_buffer_layout_skips_frozen_parameters():
    ema = LitEma(SmallNet())
    names = dict(ema.named_buffers())
    assert set(names) == {"decay", "num_updates", "lin1weight", "lin1bias", "normweight", "normbias",
                          "lin2weight", "lin2bias"}
    assert names["decay"].dtype == torch.float32 and names["num_updates"].dtype == torch.int32
    assert int(names["num_updates"]) == 0
    assert set(ema.state_dict()) == set(names)
    assert int(LitEma(SmallNet(), use_num_upates=False).num_updates) == -1
    assert int(LitEma(SmallNet(), use_num_updates=False).num_updates) == -1


def test_warmup_decay_rule():
    net = SmallNet()
    ema = LitEma(net, decay=0.9999)
    start = ema.lin1weight.clone()
    with torch.no_grad():
        net.lin1.weight.add_(1.0)
    ema(net)
    d = torch.tensor(2.0) / torch.tensor(11.0)  # first update: n = 1 -> (1 + 1) / (10 + 1)
    torch.testing.assert_close(ema.lin1weight, start - (1 - d) * (start - net.lin1.weight))
    assert int(ema.num_updates) == 1


def test_constant_decay_without_counting():
    net = SmallNet()
    ema = LitEma(net, decay=0.5, use_num_upates=False)
    start = ema.lin2bias.clone()
    with torch.no_grad():
        net.lin2.bias.add_(2.0)
    ema(net)
    torch.testing.assert_close(ema.lin2bias, start + 1.0)
    assert int(ema.num_updates) == -1


def test_store_copy_restore_roundtrip():
    net = SmallNet()
    ema = LitEma(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(3.0)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    ema.store(net.parameters())
    ema.copy_to(net)
    torch.testing.assert_close(net.lin1.weight, ema.lin1weight)
    assert torch.equal(net.frozen, trained["frozen"])  # frozen parameters are never touched
    ema.restore(net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, trained[k])


def test_reset_num_updates_and_bad_decay():
    net = SmallNet()
    ema = LitEma(net)
    ema(net)
    ema(net)
    assert int(ema.num_updates) == 2
    ema.reset_num_updates()
    assert int(ema.num_updates) == 0 and "num_updates" in ema.state_dict()
    with pytest.raises(ValueError, match="decay"):
        LitEma(net, decay=1.5)


def test_restore_without_store_raises():
    net = SmallNet()
    with pytest.raises(RuntimeError, match="store"):
        LitEma(net).restore(net.parameters())
