"""The YAML ``ckpt_path`` route (DDPM/LatentDiffusion, autoencoder, inpainting) loads through ldm/checkpoint.py:
safe reading, ``ignore_keys`` honoured, strict comparison with one readable error naming the key and the file."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, drop_ignored_keys, load_state_dict_file
from ldm.models.autoencoder import AutoencoderKL
from ldm.util import instantiate_from_config

from test_autoencoder import TINY as TINY_AE
from test_ddpm import tiny


def _save(sd: dict[str, torch.Tensor], path) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


class _Payload:
    """Unpickling this would create a folder: the proof that code from a checkpoint ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return tiny()


def test_pickle_payload_in_ckpt_path_is_refused_and_never_runs(tmp_path, source):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(source.state_dict()), "callbacks": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as err:
        tiny(ckpt_path=str(path))
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="refusing to load"):
        AutoencoderKL(**TINY_AE, ckpt_path=str(path))
    assert not marker.exists()


def test_unexpected_key_is_one_error_naming_key_and_file(tmp_path, source):
    path = _save(dict(source.state_dict()) | {"model.diffusion_model.stray.weight": torch.zeros(2)},
                 tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError) as err:
        tiny(ckpt_path=path)
    text = str(err.value)
    assert "model.diffusion_model.stray.weight" in text and path in text and "unexpected" in text
    assert "\n" not in text


def test_missing_key_is_one_error_naming_key_and_file(tmp_path, source):
    gone = "model.diffusion_model.out.2.weight"
    path = _save({k: v for k, v in source.state_dict().items() if k != gone}, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError) as err:
        tiny(ckpt_path=path)
    assert gone in str(err.value) and path in str(err.value) and "missing" in str(err.value)


def test_wrong_shape_is_refused_unless_ignored(tmp_path, source):
    key = "model.diffusion_model.out.2.weight"
    sd = dict(source.state_dict())
    sd[key] = torch.ones(sd[key].shape[0] + 1, *sd[key].shape[1:])
    path = _save(sd, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match="wrong shape") as err:
        tiny(ckpt_path=path)
    assert key in str(err.value)
    torch.manual_seed(1)
    loaded = tiny(ckpt_path=path, ignore_keys=["model.diffusion_model.out."])
    assert not torch.equal(loaded.state_dict()[key], sd[key][:-1])  # not loaded: keeps its own initial values
    other = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(loaded.state_dict()[other], sd[other])


def test_drop_ignored_keys_removes_only_the_named_prefixes():
    sd = {"first_stage_model.a": torch.zeros(1), "model.b": torch.zeros(1), "model_ema.c": torch.zeros(1)}
    assert drop_ignored_keys(sd, ["first_stage_model.", "model_ema"]) == ["first_stage_model.a", "model_ema.c"]
    assert list(sd) == ["model.b"]
    assert drop_ignored_keys(sd, []) == [] and list(sd) == ["model.b"]


def test_only_model_loads_unet_keys(tmp_path, source):
    """``only_model`` (DDPM's ``load_only_unet``) loads a ``diffusion_model.*`` file into the wrapper, strictly."""
    path = _save(dict(source.model.state_dict()), tmp_path / "unet.safetensors")
    torch.manual_seed(2)
    loaded = tiny()
    loaded.init_from_ckpt(path, only_model=True)
    for k, v in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="unexpected"):  # a full checkpoint does not fit the UNet alone
        loaded.init_from_ckpt(_save(dict(source.state_dict()), tmp_path / "full.safetensors"), only_model=True)


def test_ema_leniency_of_the_original(tmp_path, source):
    """A use_ema model may start from weights without EMA; a model without EMA takes a full checkpoint's raw set."""
    raw = dict(source.state_dict())
    with_ema = tiny(ckpt_path=_save(raw, tmp_path / "raw.safetensors"), use_ema=True)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(with_ema.state_dict()[key], raw[key])
    full = dict(with_ema.state_dict())
    full[key] = full[key] + 1.0  # raw weights differ from the EMA copy
    plain = tiny(ckpt_path=_save(full, tmp_path / "full.safetensors"))
    assert torch.equal(plain.state_dict()[key], full[key])
    assert not any(k.startswith("model_ema.") for k in plain.state_dict())


def test_learned_logvar_may_be_absent_or_unused(tmp_path, source):
    """``logvar`` (learn_logvar) is training-only: a checkpoint may lack it or carry it, as in the original."""
    learned = tiny(learn_logvar=True, logvar_init=0.5)
    assert "logvar" in learned.state_dict() and "logvar" not in source.state_dict()
    plain = _save(dict(source.state_dict()), tmp_path / "plain.safetensors")
    starts = tiny(ckpt_path=plain, learn_logvar=True, logvar_init=0.5)
    assert torch.equal(starts.logvar.detach(), torch.full_like(starts.logvar, 0.5))  # keeps its initial value
    with_logvar = dict(learned.state_dict()) | {"logvar": torch.full_like(learned.logvar, 2.0)}
    path = _save(with_logvar, tmp_path / "logvar.safetensors")
    assert torch.equal(tiny(ckpt_path=path, learn_logvar=True).logvar.detach(), with_logvar["logvar"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(tiny(ckpt_path=path).state_dict()[key], with_logvar[key])


def test_autoencoder_accepts_training_loss_keys_but_not_others(tmp_path):
    src = AutoencoderKL(**TINY_AE)
    sd = dict(src.state_dict())
    ok = _save(sd | {"loss.discriminator.main.0.weight": torch.zeros(2, 3)}, tmp_path / "with-loss.safetensors")
    ae = AutoencoderKL(**TINY_AE, ckpt_path=ok)
    assert torch.equal(ae.decoder.conv_out.weight, src.decoder.conv_out.weight)
    bad = _save(sd | {"decoder.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="decoder.extra.weight") as err:
        AutoencoderKL(**TINY_AE, ckpt_path=bad)
    assert bad in str(err.value)
    dropped = AutoencoderKL(**TINY_AE, ckpt_path=bad, ignore_keys=["decoder.extra"])
    assert torch.equal(dropped.encoder.conv_in.weight, src.encoder.conv_in.weight)


def test_inpainting_widening_is_still_strict_elsewhere(tmp_path):
    from tiny_model import write_tiny_model

    config_path, ckpt = write_tiny_model(tmp_path)
    cfg = OmegaConf.load(config_path)
    cfg.model.target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    cfg.model.params.conditioning_key = "hybrid"
    cfg.model.params.unet_config.params.in_channels = 9
    sd = dict(load_state_dict_file(str(ckpt)))
    cfg.model.params.ckpt_path = _save(sd | {"model.diffusion_model.stray": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="model.diffusion_model.stray"):
        instantiate_from_config(cfg.model)
    cfg.model.params.ignore_keys = ["model.diffusion_model.stray"]
    model = instantiate_from_config(cfg.model)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    widened = model.state_dict()[key]
    assert widened.shape[1] == 9 and torch.equal(widened[:, :4], sd[key]) and not widened[:, 4:].any()
