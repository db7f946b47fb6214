"""The VQGAN step's discriminator update (training/vqgan.py, training/vq_loss.py): the generator loss backpropagates
through D into D's weights, so D's gradients must be cleared before D's own loss is backpropagated. The test spies on
the gradients D's optimiser steps with and compares them with the gradient of D's loss alone."""
from __future__ import annotations


import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from helpers import make_idx_dataset
from models.vqgan import VQGANConfig
from stages import train_vqgan
from training import vq_loss
from training import vqgan as vqgan_loop
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
from stages.prepare import run as prepare
from stages.train_vqgan import LossParams, TrainVQGANParams


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("vq_behaviour")
    src = make_idx_dataset(base / "idx", n_train=16, n_val=4, seed=2)
    prepare(PrepareConfig("tiny", DatasetSpec(source="idx", path=str(src), resolution=16),
                          PrepareParams(out_dir=str(base / "prepared"))))
    return base / "prepared"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_discriminator_steps_with_the_gradient_of_its_own_loss_only(prepared, tmp_path, monkeypatch, grad_accum):
    discs: list[torch.nn.Module] = []

    class SpyDisc(vqgan_loop.NLayerDiscriminator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            discs.append(self)

    expected: list[list[torch.Tensor]] = []  # per step: sum over micro-batches of grad(D loss / grad_accum)
    real_d_loss = vq_loss.hinge_d_loss

    def d_loss_spy(logits_real, logits_fake):
        loss = real_d_loss(logits_real, logits_fake)
        grads = torch.autograd.grad(loss / grad_accum, list(discs[0].parameters()), retain_graph=True)
        if len(expected) == len(stepped):  # first micro-batch of this step
            expected.append([g.clone() for g in grads])
        else:
            expected[-1] = [a + g for a, g in zip(expected[-1], grads)]
        return loss

    stepped: list[list[torch.Tensor]] = []  # the gradients D's optimiser stepped with

    def before_step(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if discs and params and params[0] is next(discs[0].parameters()):
            stepped.append([p.grad.clone() for p in params])

    monkeypatch.setattr(vqgan_loop, "NLayerDiscriminator", SpyDisc)
    monkeypatch.setattr(vq_loss, "hinge_d_loss", d_loss_spy)
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        cfg = TrainVQGANParams(
            dataset="tiny", prepared_dir=str(prepared), out_dir=str(tmp_path / "vqgan"),
            ckpt_dir=str(tmp_path / "ckpt"), metrics=str(tmp_path / "m.json"), plots=str(tmp_path / "log.tsv"),
            steps=2, batch_size=8, grad_accum=grad_accum, ckpt_every=2, log_every=1, kmeans_init=False,
            device="cpu", model=VQGANConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, n_codes=16,
                                            code_dim=4, dead_code_steps=0),
            loss=LossParams(lpips_weight=0.0, disc_start=0, disc_channels=8, disc_layers=1, disc_weight=1.0,
                            disc_loss="hinge"))
        train_vqgan.run(cfg)
    finally:
        handle.remove()
    assert len(discs) == 1 and len(stepped) == len(expected) == 2  # D stepped at both steps, with the GAN on
    for got, want in zip(stepped, expected):
        # the same float32 sums in another order: agreement to rounding, while the generator loss's
        # contribution is of the size of the gradients themselves
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-9)


class ConstLPIPS(torch.nn.Module):
    """An LPIPS stand-in whose value is known (0.25 per image), counting its calls."""
    variant = "standard"  # the shipped shift-tolerant variant refuses 16 px images

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        return torch.full((x.shape[0],), 0.25) + 0 * y.sum()

    def variant_info(self):
        return {"variant": self.variant}


def test_the_lpips_term_is_weighted_and_off_before_lpips_start():
    x, recon = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    q = torch.tensor(0.125)
    loss = LossParams(lpips_weight=2.0, lpips_start=3)
    on, parts_on = vq_loss.generator_loss(x, recon, q, loss, ConstLPIPS(), None, None, False, lpips_on=True)
    off, parts_off = vq_loss.generator_loss(x, recon, q, loss, ConstLPIPS(), None, None, False, lpips_on=False)
    assert float(on) == 0.5 + 2.0 * 0.25 + 0.125 and float(parts_on["lpips"]) == 0.25
    assert float(off) == 0.5 + 0.125 and float(parts_off["lpips"]) == 0.0


def test_the_loop_calls_lpips_from_lpips_start_on(prepared, tmp_path, monkeypatch):
    made: list[ConstLPIPS] = []

    def make(*args, **kwargs):
        made.append(ConstLPIPS())
        return made[-1]

    monkeypatch.setattr(vqgan_loop, "LPIPS", make)
    cfg = TrainVQGANParams(
        dataset="tiny", prepared_dir=str(prepared), out_dir=str(tmp_path / "vqgan"), ckpt_dir=str(tmp_path / "ckpt"),
        metrics=str(tmp_path / "m.json"), plots=str(tmp_path / "log.tsv"), steps=5, batch_size=4, grad_accum=2,
        ckpt_every=5, log_every=1, kmeans_init=False, device="cpu", val_images=4,
        model=VQGANConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, n_codes=16, code_dim=4,
                          dead_code_steps=0),
        loss=LossParams(lpips_weight=1.0, lpips_start=3, disc_weight=0.0))
    monkeypatch.setattr(vqgan_loop, "finish", lambda *a, **k: None)  # only the loop is under test
    train_vqgan.run(cfg)
    assert len(made) == 1 and made[0].calls == 2 * 2  # steps 3 and 4, two micro-batches each


def test_the_discriminator_follows_the_generators_schedule_scaled_to_its_own_rate(prepared, tmp_path, monkeypatch):
    """Warm-up and cosine decay apply to both optimisers: D's rate is the generator's times disc_lr / lr."""
    from training.common import cosine_lr
    rates: list[tuple[int, float]] = []
    real_set_lr = vqgan_loop.set_lr
    monkeypatch.setattr(vqgan_loop, "set_lr", lambda opt, lr: rates.append((id(opt), lr)) or real_set_lr(opt, lr))
    monkeypatch.setattr(vqgan_loop, "finish", lambda *a, **k: None)  # only the loop is under test
    cfg = TrainVQGANParams(
        dataset="tiny", prepared_dir=str(prepared), out_dir=str(tmp_path / "vqgan"), ckpt_dir=str(tmp_path / "ckpt"),
        metrics=str(tmp_path / "m.json"), plots=str(tmp_path / "log.tsv"), steps=5, batch_size=4, ckpt_every=5,
        log_every=1, kmeans_init=False, device="cpu", val_images=4,
        model=VQGANConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, n_codes=16, code_dim=4,
                          dead_code_steps=0),
        loss=LossParams(lpips_weight=0.0, disc_weight=0.5, disc_start=0))
    cfg.optim.lr, cfg.optim.disc_lr, cfg.optim.warmup_steps = 1e-3, 4e-4, 2
    train_vqgan.run(cfg)
    g_opt, d_opt = rates[0][0], rates[1][0]
    assert g_opt != d_opt and len(rates) == 2 * 5
    for step in range(5):
        lr = cosine_lr(step, 1e-3, 2, 5, cfg.optim.min_lr_ratio)
        assert rates[2 * step] == (g_opt, lr) and rates[2 * step + 1][0] == d_opt
        assert rates[2 * step + 1][1] == pytest.approx(lr * 0.4, rel=1e-12), step


class LinearD(torch.nn.Module):
    """A discriminator whose logits are a fixed weighted sum of the image, one logit per image."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.v = v

    def forward(self, img):
        return (img * self.v).flatten(1).sum(1)


def _gan_case():
    """recon = a * b with the decoder's last layer a: every gradient below has a closed form."""
    x = torch.tensor([[[[0.5, -1.0], [2.0, 0.25]]], [[[-0.5, 1.5], [0.0, 1.0]]]], dtype=torch.float64)
    b = torch.tensor([[[[1.0, 2.0], [-1.0, 0.5]]], [[[0.25, -2.0], [1.5, 1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[0.5, -0.25], [1.0, 2.0]]], dtype=torch.float64)
    a = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    return x, b, v, a


@pytest.mark.parametrize("rec_kind", ["l1", "l2"])
@pytest.mark.parametrize("disc_loss", ["hinge", "non_saturating"])
def test_generator_loss_adds_the_adaptively_weighted_gan_term(rec_kind, disc_loss):
    x, b, v, a = _gan_case()
    recon = a * b
    q = torch.tensor(0.125, dtype=torch.float64)
    loss = LossParams(rec=rec_kind, lpips_weight=0.0, disc_weight=0.5, disc_loss=disc_loss, adaptive_max=1e4)
    total, parts = vq_loss.generator_loss(x, recon, q, loss, None, LinearD(v), a, gan_on=True)

    # by hand: d rec / d a and d g / d a from the closed forms, then Taming's weight |d rec| / (|d g| + 1e-4)
    r = (a.detach() * b - x)
    rec = r.abs().mean() if rec_kind == "l1" else r.pow(2).mean()
    drec = (r.sign() * b).mean() if rec_kind == "l1" else (2 * r * b).mean()
    logits = (a.detach() * b * v).flatten(1).sum(1)
    dlogits = (b * v).flatten(1).sum(1)
    if disc_loss == "hinge":
        g, dg = -logits.mean(), -dlogits.mean()
    else:  # softplus(-l): derivative -sigmoid(-l)
        g, dg = torch.nn.functional.softplus(-logits).mean(), (-torch.sigmoid(-logits) * dlogits).mean()
    w = 0.5 * drec.abs() / (dg.abs() + 1e-4)
    assert float(parts["rec"].detach()) == pytest.approx(float(rec), rel=1e-12)
    assert float(parts["g"].detach()) == pytest.approx(float(g), rel=1e-12)
    assert float(parts["d_weight"].detach()) == pytest.approx(float(w), rel=1e-9)
    assert float(parts["q"].detach()) == 0.125 and float(parts["lpips"].detach()) == 0.0
    assert float(total.detach()) == pytest.approx(float(rec + 0.125 + w * g), rel=1e-9)
    assert not parts["d_weight"].requires_grad  # the weight is a constant of the step, as in Taming


class QuadraticLPIPS(torch.nn.Module):
    """A perceptual distance with a closed-form gradient: per image sum of c * (recon - x)^2."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c

    def forward(self, x, recon):
        return (self.c * (recon - x).pow(2)).flatten(1).sum(1)


def test_the_adaptive_weight_balances_the_gan_term_against_the_whole_reconstruction_loss():
    """Taming's lambda uses the gradient of the NLL, rec + lpips_weight * LPIPS, not of the pixel term alone."""
    x, b, v, a = _gan_case()
    c = torch.tensor([[[1.0, 3.0], [0.5, 2.0]]], dtype=torch.float64)
    loss = LossParams(rec="l1", lpips_weight=2.0, disc_weight=0.5, disc_loss="hinge", adaptive_max=1e4)
    _, parts = vq_loss.generator_loss(x, a * b, torch.tensor(0.0, dtype=torch.float64), loss, QuadraticLPIPS(c),
                                      LinearD(v), a, gan_on=True)
    r = a.detach() * b - x
    dnll = (r.sign() * b).mean() + 2.0 * (2 * c * r * b).flatten(1).sum(1).mean()
    dg = -(b * v).flatten(1).sum(1).mean()
    assert float(parts["d_weight"].detach()) == pytest.approx(float(0.5 * dnll.abs() / (dg.abs() + 1e-4)), rel=1e-9)


def test_generator_loss_clamps_the_adaptive_weight_at_adaptive_max():
    x, b, v, a = _gan_case()
    loss = LossParams(rec="l1", disc_weight=0.5, adaptive_max=0.01)
    total, parts = vq_loss.generator_loss(x, a * b, torch.tensor(0.0, dtype=torch.float64), loss, None,
                                          LinearD(v), a, gan_on=True)
    assert float(parts["d_weight"].detach()) == pytest.approx(0.5 * 0.01, rel=1e-12)
    assert float(total.detach()) == pytest.approx(float((parts["rec"] + 0.005 * parts["g"]).detach()), rel=1e-12)


def test_generator_loss_has_no_gan_term_before_disc_start_and_lpips_on_by_default():
    x, b, v, a = _gan_case()
    lp = ConstLPIPS()
    total, parts = vq_loss.generator_loss(x.float(), (a * b).float(), torch.tensor(0.0), LossParams(lpips_weight=2.0),
                                          lp, LinearD(v.float()), a, gan_on=False)
    assert set(parts) == {"rec", "lpips", "q"} and lp.calls == 1  # lpips_on defaults to True
    assert float(total.detach()) == pytest.approx(float(parts["rec"].detach()) + 2.0 * 0.25, rel=1e-6)
    # a zero LPIPS weight skips the network altogether: its part is 0, not its unweighted value
    lp0 = ConstLPIPS()
    _, parts0 = vq_loss.generator_loss(x.float(), (a * b).float(), torch.tensor(0.0), LossParams(lpips_weight=0.0),
                                       lp0, LinearD(v.float()), a, gan_on=False)
    assert lp0.calls == 0 and float(parts0["lpips"].detach()) == 0.0
