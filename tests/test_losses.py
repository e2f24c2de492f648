"""Autoencoder losses (PatchGAN, LPIPS from local files, adaptive GAN weight) and the LR schedules."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.modules.losses.contperceptual import hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS, VGG16Features
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


def test_discriminator_layout_matches_the_original():
    d = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    keys = [k for k in d.state_dict() if k.endswith("weight")]
    assert keys == ["main.0.weight", "main.2.weight", "main.3.weight", "main.5.weight", "main.6.weight",
                    "main.8.weight", "main.9.weight", "main.11.weight"]
    assert d.state_dict()["main.8.weight"].shape == (512, 256, 4, 4)
    assert "main.2.bias" not in d.state_dict()  # no conv bias before BatchNorm
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    act = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2, use_actnorm=True)
    out = act.train()(torch.randn(4, 3, 32, 32))
    assert int(act.main[3].initialized) == 1 and out.shape[1] == 1


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random-valued LPIPS weights as people have them: the heads (vgg.pth) and torchvision's VGG16 file."""
    tmp_path = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(1)
    feats = VGG16Features()
    vgg = {}
    for k, v in feats.state_dict().items():
        _, index, param = k.split(".")
        vgg[f"features.{index}.{param}"] = v.clone()
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    return tmp_path / "vgg.pth", tmp_path / "vgg16.pth", feats


def test_lpips_loads_local_files_and_measures_distance(lpips_files, tmp_path):
    heads, vgg, feats = lpips_files
    lp = LPIPS([heads, vgg])
    assert torch.equal(lp.net.slice3.get_submodule("10").weight, feats.slice3.get_submodule("10").weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lp(x, x), torch.zeros(2, 1, 1, 1))
    d = lp(x, torch.flip(x, dims=[0]))
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert not lp.train().training and not any(p.requires_grad for p in lp.parameters())
    merged = tmp_path / "lpips.safetensors"  # one merged file gives the same module
    save_file({k: v.contiguous() for k, v in lp.state_dict().items()}, str(merged))
    assert torch.allclose(LPIPS(merged)(x, x.flip(0)), d)
    with pytest.raises(ValueError, match="VGG16"):
        LPIPS(heads)


def test_without_lpips_weights_there_is_a_notice_and_no_perceptual_term(caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weights=str(tmp_path / "absent.pth"))
    assert loss.perceptual_loss is None and "LPIPS perceptual loss OFF" in caplog.text
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(loss.reconstruction_loss(x, x + 0.5), torch.full_like(x, 0.5))


def test_lpips_term_is_added_when_weights_exist(lpips_files):
    heads, vgg, _ = lpips_files
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.5, perceptual_weights=[str(heads), str(vgg)])
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    expected = (x - y).abs() + 0.5 * loss.perceptual_loss(x, y)
    assert torch.allclose(loss.reconstruction_loss(x, y), expected)


def _posterior(b: int) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(torch.randn(b, 8, 4, 4))


def test_generator_loss_formula_and_adaptive_weight():
    torch.manual_seed(0)
    loss = instantiate_from_config({"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                    "params": {"disc_start": 5, "kl_weight": 0.1, "disc_weight": 0.5,
                                               "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 8,
                                               "logvar_init": 0.3}})
    last = torch.randn(3, 3, 3, 3, requires_grad=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = torch.nn.functional.conv2d(x, last, padding=1)  # reconstruction depends on the "last layer"
    post = _posterior(2)
    total, log = loss(x, recon, post, 0, global_step=7, last_layer=last)
    rec = (x - recon).abs()
    nll = (rec / math.exp(0.3) + 0.3).sum() / 2
    kl = post.kl().sum() / 2
    g = -loss.discriminator(recon).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    d_weight = torch.clamp(gn / (gg + 1e-4), 0, 1e4) * 0.5
    assert torch.allclose(log["train/d_weight"], d_weight, rtol=1e-4)
    assert torch.allclose(total, nll + 0.1 * kl + d_weight * g, rtol=1e-4)
    before, log0 = loss(x, recon, post, 0, global_step=4, last_layer=last)
    assert float(log0["train/disc_factor"]) == 0.0 and torch.allclose(before, nll + 0.1 * kl, rtol=1e-5)


def test_discriminator_loss_and_start():
    loss = LPIPSWithDiscriminator(disc_start=3, perceptual_weight=0.0, disc_num_layers=1, disc_ndf=8)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    d_loss, log = loss(x, y, None, 1, global_step=3)
    expected = hinge_d_loss(loss.discriminator(x), loss.discriminator(y))
    assert torch.allclose(d_loss, expected) and "train/logits_real" in log
    assert float(loss(x, y, None, 1, global_step=2)[0].detach()) == 0.0
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (1.0 + 0.75))
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(
        0.5 * (float(torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())))
    with pytest.raises(ValueError, match="optimizer_idx"):
        loss(x, y, None, 2, global_step=0)


def test_lambda_linear_scheduler_as_in_sd_configs():
    sched = instantiate_from_config({"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                                     "params": {"warm_up_steps": [10], "cycle_lengths": [100], "f_start": [1e-6],
                                                "f_max": [1.0], "f_min": [0.5]}})
    assert isinstance(sched, LambdaLinearScheduler)
    assert sched(0) == pytest.approx(1e-6)
    assert sched(5) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert sched(10) == pytest.approx(0.5 + 0.5 * 90 / 100)
    assert sched.schedule(100) == pytest.approx(0.5)
    assert sched(150) == pytest.approx(0.5 + 0.5 * (100 - 150) / 100)  # past the last cycle: stays on it
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=sched)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        lr.step()
    assert lrs == pytest.approx([2 * sched(0), 2 * sched(1), 2 * sched(2)])


def test_cosine_schedulers():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55)
    assert s(500) == pytest.approx(0.1)
    s2 = LambdaWarmUpCosineScheduler2(warm_up_steps=[0, 5], f_min=[0.0, 0.0], f_max=[1.0, 2.0], f_start=[0.0, 0.0],
                                      cycle_lengths=[10, 10])
    assert s2(10) == pytest.approx(0.0) and s2(13) == pytest.approx(2.0 * 3 / 5)
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaWarmUpCosineScheduler2([1], [0.0], [1.0], [0.0], [10, 20])
