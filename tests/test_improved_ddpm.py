"""Improved-DDPM toolkit: cosine schedule for any length, variance types, hybrid / vlb losses, respacing, class
embedder; the original behaviour (state_dict keys, losses) unchanged by default."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.models.diffusion.objective import LOSS_TYPES
from ldm.models.diffusion.process import DiffusionSchedule
from ldm.samplers.schedules import model_sigmas, respaced_sigmas
from ldm.models.diffusion.variance import VarianceType, log_variance_bounds, model_log_variance, split_output
from ldm.modules.diffusionmodules.schedules import make_beta_schedule, space_timesteps
from ldm.modules.encoders.modules import ClassEmbedder


def unet(out_channels: int = 3, context_dim: int | None = None) -> dict:
    params = dict(image_size=8, in_channels=3, out_channels=out_channels, model_channels=32, attention_resolutions=[],
                  num_res_blocks=1, channel_mult=[1], num_head_channels=16, legacy=False)
    if context_dim is not None:
        params.update(attention_resolutions=[1], use_spatial_transformer=True, context_dim=context_dim,
                      use_linear_in_transformer=True)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def tiny_ddpm(**kw) -> DDPM:
    learned = kw.get("model_var_type", "fixed_small") in ("learned", "learned_range")
    args = dict(unet_config=unet(6 if learned else 3), timesteps=100, image_size=8, channels=3, use_ema=False)
    return DDPM(**{**args, **kw})


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("n", [1, 10, 100, 1000, 4000])
def test_cosine_alpha_bar_matches_its_formula_for_any_length(n):
    s = 0.008
    betas = make_beta_schedule("cosine", n, cosine_s=s)
    f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    raw = np.array([1 - f(t + 1) / f(t) for t in range(n)])
    assert betas.dtype == np.float64 and betas.shape == (n,)
    np.testing.assert_allclose(betas, np.minimum(raw, 0.999), rtol=1e-10, atol=1e-14)
    unclipped = raw < 0.999
    acp = np.cumprod(1 - betas)
    expected = np.array([f(t + 1) / f(0) for t in range(n)])
    np.testing.assert_allclose(acp[unclipped], expected[unclipped], rtol=1e-9)
    assert betas.max() <= 0.999


@pytest.mark.parametrize("spec,expected", [
    ("5", [0, 25, 50, 74, 99]), (4, [0, 33, 66, 99]), ("ddim10", list(range(0, 100, 10))),
    ("2,3", [0, 49, 50, 74, 99]), ([1], [0]), ("100", list(range(100)))])
def test_space_timesteps(spec, expected):
    assert space_timesteps(100, spec) == expected


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(100, "ddim11")
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "11")


def test_respaced_schedule_keeps_alpha_bar_and_maps_timesteps():
    full = DiffusionSchedule.from_betas(make_beta_schedule("cosine", 1000))
    use = space_timesteps(1000, "50")
    sub = full.respaced(use)
    assert sub.num_timesteps == 50 and sub.timesteps.tolist() == use
    torch.testing.assert_close(sub.alphas_cumprod, full.alphas_cumprod[use], rtol=1e-4, atol=1e-12)
    same = full.respaced(range(1000))
    torch.testing.assert_close(same.betas, full.betas, rtol=1e-5, atol=1e-9)


def test_ddim_grid_over_a_respaced_subset_ends_on_clean_data():
    acp = torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000)), dtype=torch.float32)
    use = space_timesteps(1000, "ddim20")
    sigmas = respaced_sigmas(acp, use)
    assert min(use) == 0 and len(sigmas) == 21 and sigmas[-1] == 0  # the last step lands on x_0 itself
    torch.testing.assert_close(sigmas[:-1], model_sigmas(acp)[sorted(use, reverse=True)])


# ---------------------------------------------------------------- variance types

def test_learned_range_reduces_to_the_fixed_variances_at_plus_minus_one():
    sched = DiffusionSchedule.from_betas(make_beta_schedule("cosine", 200))
    t = torch.tensor([0, 1, 50, 199])
    like = torch.zeros(4, 3, 2, 2)
    args = (t, like, sched.betas, sched.posterior_log_variance_clipped)
    small = model_log_variance(VarianceType.FIXED_SMALL, *args)
    large = model_log_variance(VarianceType.FIXED_LARGE, *args)
    lr = VarianceType.LEARNED_RANGE
    torch.testing.assert_close(model_log_variance(lr, *args, torch.ones_like(like)), large.expand_as(like))
    torch.testing.assert_close(model_log_variance(lr, *args, -torch.ones_like(like)), small.expand_as(like))
    mid = model_log_variance(lr, *args, torch.zeros_like(like))
    torch.testing.assert_close(mid, ((small + large) / 2).expand_as(like))
    torch.testing.assert_close(large.flatten(), sched.betas[t].log())
    torch.testing.assert_close(small.flatten()[1:], sched.posterior_variance[t[1:]].log())
    assert small.flatten()[0] == small.flatten()[1]  # beta tilde_0 = 0: Improved DDPM uses beta tilde_1
    assert (small <= large + 1e-7).all()


def test_learned_variance_is_the_output_and_outputs_are_split():
    out = torch.randn(2, 6, 4, 4)
    mean, var = split_output(out, VarianceType.LEARNED, 3)
    assert torch.equal(mean, out[:, :3]) and torch.equal(var, out[:, 3:])
    assert split_output(out, VarianceType.FIXED_SMALL, 3)[1] is None
    sched = DiffusionSchedule.from_betas([0.1] * 4)
    t = torch.tensor([1, 2])
    assert torch.equal(model_log_variance(VarianceType.LEARNED, t, mean, sched.betas,
                                          sched.posterior_log_variance_clipped, var), var)
    with pytest.raises(ValueError, match="out_channels to 6"):
        split_output(out[:, :3], VarianceType.LEARNED_RANGE, 3)
    bounds = log_variance_bounds(sched.betas, sched.posterior_log_variance_clipped)
    assert bounds[1].shape == (4,) and torch.isfinite(bounds[0]).all()


def test_unknown_variance_type_and_channel_check():
    with pytest.raises(ValueError, match="fixed_small, fixed_large, learned, learned_range"):
        VarianceType.parse("big")
    with pytest.raises(ValueError, match="out_channels to 6"):
        DDPM(unet_config=unet(3), model_var_type="learned_range", loss_type="hybrid", timesteps=10, use_ema=False)


# ---------------------------------------------------------------- losses

def test_defaults_keep_the_original_state_dict_and_loss():
    plain = tiny_ddpm()
    assert plain.model_var_type is VarianceType.FIXED_SMALL and plain.loss_type == "l2"
    improved = tiny_ddpm(model_var_type="learned_range", loss_type="hybrid", beta_schedule="cosine")
    assert set(plain.state_dict()) == set(improved.state_dict())
    x0, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([3, 70])
    plain.eval()
    with torch.no_grad():
        loss, logs = plain.p_losses(x0, None, t, noise)
        out = plain.apply_model(plain.q_sample(x0, t, noise), t)
    assert list(logs) == ["val/loss_simple", "val/loss_vlb", "val/loss"]
    torch.testing.assert_close(loss, ((out - noise) ** 2).mean())


@pytest.mark.parametrize("loss_type,var_type,match", [
    ("huber", "fixed_small", "unknown loss_type"), ("l2", "learned_range", "use loss_type hybrid"),
    ("hybrid", "fixed_small", "learned_range / learned")])
def test_invalid_objectives_are_refused(loss_type, var_type, match):
    with pytest.raises(ValueError, match=match):
        tiny_ddpm(loss_type=loss_type, model_var_type=var_type)
    assert LOSS_TYPES == ("l1", "l2", "hybrid", "vlb")


def _grads(model: DDPM, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=g)
    output = torch.randn(2, 6, 8, 8, generator=g, requires_grad=True)
    loss, logs = model.losses_from_output(output, x0, model.q_sample(x0, t, noise), t, noise)
    loss.backward()
    return output.grad[:, :3], output.grad[:, 3:], {k: v.item() for k, v in logs.items()} | {"loss": loss.item()}


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_hybrid_vlb_term_trains_only_the_variance_and_is_rescaled(var_type):
    model = tiny_ddpm(model_var_type=var_type, loss_type="hybrid", timesteps=200, l_simple_weight=0.0)
    mean_grad, var_grad, logs = _grads(model, torch.tensor([0, 120]))
    assert torch.equal(mean_grad, torch.zeros_like(mean_grad)) and var_grad.abs().sum() > 0
    assert logs["loss"] == pytest.approx(0.001 * 200 * logs["train/loss_vb"], rel=1e-5)
    full = tiny_ddpm(model_var_type=var_type, loss_type="hybrid", timesteps=200, lambda_vlb=0.01)
    mean_grad, _, logs = _grads(full, torch.tensor([0, 120]))
    assert mean_grad.abs().sum() > 0  # from L_simple
    assert logs["loss"] == pytest.approx(logs["train/loss_simple"] + 0.01 * 200 * logs["train/loss_vb"], rel=1e-5)


def test_vlb_loss_is_the_bound_and_trains_mean_and_variance():
    model = tiny_ddpm(model_var_type="learned_range", loss_type="vlb", timesteps=50)
    mean_grad, var_grad, logs = _grads(model, torch.tensor([0, 30]))
    assert mean_grad.abs().sum() > 0 and var_grad.abs().sum() > 0
    assert logs["loss"] == pytest.approx(50 * logs["train/loss_vb"], rel=1e-5)
    fixed = tiny_ddpm(loss_type="vlb", timesteps=50)
    x0, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([4, 40])
    loss, logs = fixed.p_losses(x0, None, t)
    assert torch.isfinite(loss) and "train/loss_vb" in logs


def test_samplers_see_only_the_mean_half():
    model = tiny_ddpm(model_var_type="learned_range", loss_type="hybrid").eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 6])
    with torch.no_grad():
        full = model.apply_model(x, t)
        assert full.shape == (2, 6, 8, 8)
        assert torch.equal(ModelDenoiser(model)(x, t, None), full[:, :3])
        assert torch.equal(ModelDenoiser(model, full_output=True)(x, t, None), full)


# ---------------------------------------------------------------- class conditioning

def test_class_embedder_layout_dropout_and_null_class():
    emb = ClassEmbedder(embed_dim=8, n_classes=5, key="class_label", ucg_rate=0.5)
    assert list(emb.state_dict()) == ["embedding.weight"] and emb.embedding.weight.shape == (5, 8)
    labels = torch.tensor([0, 1, 2, 3] * 64)
    emb.eval()
    out = emb({"class_label": labels})
    assert out.shape == (256, 1, 8)
    torch.testing.assert_close(out[:, 0], emb.embedding.weight[labels])
    emb.train()
    torch.manual_seed(0)
    dropped = emb({"class_label": labels})
    null = (dropped[:, 0] == emb.embedding.weight[4]).all(1)
    assert 0.3 < null.float().mean() < 0.7
    assert torch.equal(emb({"class_label": labels}, disable_dropout=True), out)
    uc = emb.get_unconditional_conditioning(3)
    assert uc["class_label"].tolist() == [4, 4, 4]
    with pytest.raises(KeyError, match="class_label"):
        emb({"label": labels})
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        emb({"class_label": torch.tensor([5])})


def test_pixel_ddpm_routes_the_class_embedding_as_context():
    cond = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"embed_dim": 16, "n_classes": 3, "key": "class_label", "ucg_rate": 0.0}}
    model = DDPM(unet_config=unet(6, context_dim=16), timesteps=20, image_size=8, channels=3, use_ema=False,
                 model_var_type="learned_range", loss_type="hybrid", conditioning_key="crossattn",
                 cond_stage_config=cond, cond_stage_key="class_label", cond_stage_trainable=True,
                 first_stage_key="image")
    assert {k.split(".")[0] for k in model.state_dict()} >= {"model", "cond_stage_model", "betas"}
    seen = []
    net = model.model.diffusion_model
    original = net.forward
    net.forward = lambda x, t, context=None, **kw: seen.append(context) or original(x, t, context=context, **kw)
    batch = {"image": torch.rand(2, 8, 8, 3) * 2 - 1, "class_label": torch.tensor([2, 0])}
    model.train()
    loss, _ = model.shared_step(batch)
    torch.testing.assert_close(seen[0], model.cond_stage_model.embedding.weight[[2, 0]][:, None])
    loss.backward()
    assert model.cond_stage_model.embedding.weight.grad is not None
    with pytest.raises(ValueError, match="conditioning_key"):
        DDPM(unet_config=unet(3), timesteps=10, use_ema=False, cond_stage_config=cond)
