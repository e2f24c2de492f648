"""DDPM / LatentDiffusion: reference parity (loss eps and v, conditioning, apply_model, decode), checkpoint layout,
frozen stages, conditioning routing, EMA scope, training step helpers."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.training import conditioning_dropout, fit_tensor
from ldm.modules.diffusionmodules.schedules import DDPM_BUFFER_NAMES

from conftest import reference_oracle


# ---------------------------------------------------------------- reference cases (through the oracle's runner)

@pytest.mark.parametrize("name", ["ldm_v2_eps_loss", "ldm_v2_v_loss", "ldm_v2_eps_conditioning",
                                  "ldm_v2_eps_apply_model", "ldm_v2_eps_decode", "ldm_v1_apply_model"])
def test_reference_case(reference_dir, name):
    spec = next(c for c in json.load(open(reference_dir / "cases.json")) if c["name"] == name)
    status, detail = reference_oracle(str(reference_dir)).check_case(spec, reference_dir, verbose=True)
    assert status == "PASS", detail


# ---------------------------------------------------------------- a tiny latent diffusion model

UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                       num_res_blocks=1, channel_mult=[1], num_head_channels=16, use_spatial_transformer=True,
                       use_linear_in_transformer=True, context_dim=8, legacy=False)}
VAE = {"target": "ldm.models.autoencoder.AutoencoderKL",
       "params": dict(embed_dim=4, lossconfig={"target": "torch.nn.Identity"},
                      ddconfig=dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0))}
TOKENS = {"target": "torch.nn.Embedding", "params": {"num_embeddings": 10, "embedding_dim": 8}}


def tiny(**kw) -> LatentDiffusion:
    args = dict(unet_config=UNET, first_stage_config=VAE, cond_stage_config=TOKENS, conditioning_key="crossattn",
                first_stage_key="jpg", cond_stage_key="txt", image_size=8, channels=4, scale_factor=0.18215,
                use_ema=False, linear_start=0.00085, linear_end=0.012)
    return LatentDiffusion(**{**args, **kw})


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    return tiny()


class Recorder(nn.Module):
    """Network stand-in that records how it was called and returns the first 4 input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, x, t, context=None, y=None):
        self.calls.append({"x": x, "t": t, "context": context, "y": y})
        return x[:, :4]


def test_checkpoint_layout_and_buffers(model):
    sd = model.state_dict()
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model", *DDPM_BUFFER_NAMES}
    assert all(sd[name].dtype == torch.float32 and sd[name].shape == (1000,) for name in DDPM_BUFFER_NAMES)
    assert "lvlb_weights" in dict(model.named_buffers()) and "lvlb_weights" not in sd
    assert not isinstance(model.logvar, nn.Parameter) and isinstance(model.scale_factor, float)
    assert any(k.startswith("model.diffusion_model.input_blocks.0.0.") for k in sd)


def test_optional_state(model):
    m = tiny(use_ema=True, scale_by_std=True, learn_logvar=True, scale_factor=1.0)
    sd = m.state_dict()
    assert {"model_ema.decay", "model_ema.num_updates", "scale_factor", "logvar"} <= set(sd)
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    ema = [k for k in sd if k.startswith("model_ema.")]
    assert len(ema) == 2 + sum(1 for p in m.model.parameters() if p.requires_grad)


def test_frozen_stages_stay_in_eval(model):
    model.train()
    assert model.training and model.model.training
    assert not model.first_stage_model.training and not model.cond_stage_model.training
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    trainable = tiny(cond_stage_trainable=True)
    trainable.train()
    assert trainable.cond_stage_model.training and all(p.requires_grad for p in trainable.cond_stage_model.parameters())
    model.eval()


def test_unknown_constructor_argument_is_named():
    with pytest.raises(TypeError, match="not_an_option"):
        tiny(not_an_option=3)


@pytest.mark.parametrize("key", ["crossattn", "concat", "hybrid", "adm"])
def test_apply_model_routes_conditioning(key):
    m = tiny(conditioning_key=key)
    rec = m.model.diffusion_model = Recorder()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    c1, c2 = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    if key == "crossattn":
        m.apply_model(x, t, [c1, c2])
        assert torch.equal(rec.calls[-1]["context"], torch.cat([c1, c2], 1))
        m.apply_model(x, t, c1)
        assert torch.equal(rec.calls[-1]["context"], c1) and torch.equal(rec.calls[-1]["t"], t)
    elif key == "concat":
        extra = torch.randn(2, 5, 8, 8)
        m.apply_model(x, t, extra)
        assert torch.equal(rec.calls[-1]["x"], torch.cat([x, extra], 1)) and rec.calls[-1]["context"] is None
    elif key == "hybrid":
        extra = torch.randn(2, 1, 8, 8)
        m.apply_model(x, t, {"c_concat": [extra], "c_crossattn": [c1]})
        assert rec.calls[-1]["x"].shape[1] == 5 and torch.equal(rec.calls[-1]["context"], c1)
    else:
        y = torch.randn(2, 16)
        m.apply_model(x, t, y)
        assert torch.equal(rec.calls[-1]["y"], y)


def test_first_stage_scaling(model):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    post = model.encode_first_stage(x)
    torch.manual_seed(5)
    z = model.get_first_stage_encoding(post)
    torch.manual_seed(5)
    torch.testing.assert_close(z, 0.18215 * post.sample())
    torch.testing.assert_close(model.get_first_stage_encoding(post.mean), 0.18215 * post.mean)
    seeded = [model.get_first_stage_encoding(post, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*seeded)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_first_stage(z), model.first_stage_model.decode(z / 0.18215))


def test_conditioning_of_tokens(model):
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(model.get_learned_conditioning(tokens), model.cond_stage_model(tokens))


def test_forward_process_conversions(model):
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    x_t = model.q_sample(x0, t, noise)
    torch.testing.assert_close(model.predict_start_from_noise(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)
    v = model.get_v(x0, noise, t)
    torch.testing.assert_close(model.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.predict_eps_from_z_and_v(x_t, t, v), noise, atol=1e-5, rtol=1e-5)
    mean, var, _ = model.q_posterior(x0, x_t, t)
    assert mean.shape == x0.shape and var[0].item() == 0.0


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_p_losses_targets_and_prefixes(parameterization):
    m = tiny(parameterization=parameterization)
    x0, noise, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8), torch.tensor([10, 900])
    target = {"eps": noise, "x0": x0, "v": m.get_v(x0, noise, t)}[parameterization]
    m.eval()
    with torch.no_grad():
        loss, logs = m.p_losses(x0, c, t, noise=noise)
        out = m.apply_model(m.q_sample(x0, t, noise), t, c)
    assert list(logs) == ["val/loss_simple", "val/loss_vlb", "val/loss"]
    torch.testing.assert_close(logs["val/loss_simple"], ((out - target) ** 2).mean())
    torch.testing.assert_close(loss, logs["val/loss"])
    m.train()
    _, logs = m.p_losses(x0, c, t, noise=noise)
    assert list(logs) == ["train/loss_simple", "train/loss_vlb", "train/loss"]


def test_snr_gamma_weights_the_training_loss_not_the_logged_one():
    plain, weighted = tiny(parameterization="v"), tiny(parameterization="v", snr_gamma=5.0)
    weighted.load_state_dict(plain.state_dict())
    x0, noise, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8), torch.tensor([10, 900])
    per_sample = []
    with torch.no_grad():
        for i in range(2):
            _, logs = plain.p_losses(x0[i:i + 1], c[i:i + 1], t[i:i + 1], noise=noise[i:i + 1])
            per_sample.append(logs["train/loss_simple"])
        loss, logs = weighted.p_losses(x0, c, t, noise=noise)
    snr = weighted.alphas_cumprod[t] / (1 - weighted.alphas_cumprod[t])
    expected = (torch.stack(per_sample) * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["train/loss_simple"], torch.stack(per_sample).mean())
    assert "snr_weights" not in weighted.state_dict()  # checkpoints keep the original keys
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        tiny(snr_gamma=-1.0)


def test_shared_step_trains_only_the_unet(model):
    m = copy.deepcopy(model).train()
    batch = {"jpg": torch.rand(2, 16, 16, 3) * 2 - 1, "txt": torch.tensor([[1, 2], [3, 4]])}
    loss, logs = m.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and "train/loss" in logs
    assert any(p.grad is not None for p in m.model.parameters())
    assert all(p.grad is None for p in m.first_stage_model.parameters())
    assert all(p.grad is None for p in m.cond_stage_model.parameters())


def test_conditioning_dropout():
    batch = {"txt": ["a cat", "a dog", "a cow"], "jpg": torch.zeros(3)}
    prng = np.random.RandomState(0)
    dropped = conditioning_dropout(batch, {"txt": {"p": 1.0, "val": None}}, prng)
    assert dropped["txt"] == ["", "", ""] and batch["txt"] == ["a cat", "a dog", "a cow"]
    assert conditioning_dropout(batch, {"txt": {"p": 0.0, "val": ""}}, prng)["txt"] == batch["txt"]
    ids = conditioning_dropout({"txt": torch.tensor([5, 6])}, {"txt": {"p": 1.0, "val": 0}}, prng)
    assert ids["txt"].tolist() == [0, 0]


def test_ema_scope_swaps_and_restores():
    m = tiny(use_ema=True)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    trained = [p.clone() for p in m.model.parameters()]
    m.on_train_batch_end()  # one EMA update towards the new weights
    with m.ema_scope("test"):
        inside = [p.clone() for p in m.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(inside, trained))
    torch.testing.assert_close(inside[0], m.model_ema.diffusion_modeltime_embed0weight)
    assert all(torch.equal(a, b) for a, b in zip(m.model.parameters(), trained))


def test_init_from_ckpt_roundtrip(tmp_path, model):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = tiny(ckpt_path=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    partial = tiny(ckpt_path=str(path), ignore_keys=["model.diffusion_model"])
    name = "diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(partial.model.state_dict()[name], model.model.state_dict()[name])
    assert torch.equal(partial.first_stage_model.encoder.conv_in.weight, model.first_stage_model.encoder.conv_in.weight)


def test_make_it_fit_resizes_like_the_original():
    old = torch.arange(6.0).reshape(2, 3)
    new = fit_tensor(old, (4, 4))
    assert new.shape == (4, 4)
    # rows and columns are cycled; column j is divided by 1 + uses of input column j % 3 (col 0 used twice)
    torch.testing.assert_close(new[:, 0], torch.tensor([0.0, 3.0, 0.0, 3.0]) / 3)
    torch.testing.assert_close(new[:, 1], torch.tensor([1.0, 4.0, 1.0, 4.0]) / 2)
    torch.testing.assert_close(fit_tensor(torch.tensor([1.0, 2.0]), (3,)), torch.tensor([1.0, 2.0, 1.0]))
