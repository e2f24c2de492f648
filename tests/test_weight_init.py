"""Models built for a strict load skip random initialisation (ldm/weight_init.py) and still load exactly."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_weights, read_checkpoint
from ldm.inference import loading
from ldm.util import instantiate_from_config
from ldm.weight_init import RANDOM_FILLS, skipped_weight_init


def test_random_fills_do_nothing_inside_and_are_restored_after_an_error():
    originals = {name: getattr(torch.nn.init, name) for name in RANDOM_FILLS}
    with pytest.raises(RuntimeError, match="boom"):
        with skipped_weight_init():
            t = torch.full((4, 4), 7.0)
            layer = torch.nn.Linear(4, 4)
            torch.nn.init.kaiming_uniform_(t)
            torch.nn.init.normal_(t)
            assert torch.equal(t, torch.full((4, 4), 7.0))
            torch.nn.init.ones_(layer.bias)  # constant fills still work
            assert torch.equal(layer.bias, torch.ones(4))
            raise RuntimeError("boom")
    assert {name: getattr(torch.nn.init, name) for name in RANDOM_FILLS} == originals
    t = torch.zeros(64)
    torch.nn.init.normal_(t)
    assert t.std() > 0.5


def _states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and all buffers, non-persistent ones (attention masks, schedules) included."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_default_model_loads_the_same_with_and_without_random_init():
    source = loading.default_model_source()
    config = OmegaConf.load(source.config_path)
    fast = loading.load_model(source, config, use_ema=None, vae=None, device="cpu")
    sd, _ = read_checkpoint(loading.default_model_source().ckpt_path)
    slow = instantiate_from_config(config.model)
    load_weights(slow, sd)
    a, b = _states(fast), _states(slow.eval())
    assert a.keys() == b.keys() and len(a) > 100
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]
