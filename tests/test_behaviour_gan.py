"""The terms of the transformer-GAN step and the GAN sampler, checked by what they act on rather than by losses
going down: R1 differentiates D at the real grids (spied), the EMA applies its warm-up decay step by step (read
back from checkpoints), and every sampling batch draws its own noise (spied)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import make_idx_dataset
from models.vqgan import VQGAN, VQGANConfig
from pipeline import checkpoint as ckpt
from pipeline.device import Dist
from training import gan as gan_training
from training.gan import GANParams, ema_decay_at
from training.common import EMA
from pipeline.vqgan_io import load_vqgan, save_vqgan
from stages import sample, train_transformer
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
from stages.prepare import run as prepare
from stages.tokenize import TokenizeConfig, TokenizeParams
from stages.tokenize import run as tokenize
from stages.train_transformer import TrainTransformerParams

LADA = dict(g_dims=[32, 16], d_base=8, z_dim=16, class_dim=8)  # a tiny LadaGAN for a 4x4x4 latent grid


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A prepared 16x16 grey dataset, a random-init VQGAN (16 l2-normalised codes of 4 dims) and its tokens."""
    base = tmp_path_factory.mktemp("gan_behaviour")
    src = make_idx_dataset(base / "idx", n_train=32, n_val=8, seed=7)
    prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(src), resolution=16, channels=1),
                          PrepareParams(out_dir=str(base / "prepared"))))
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(in_channels=1, ch=8, ch_mult=(1, 2, 2), z_channels=8, n_codes=16, code_dim=4,
                              dead_code_steps=0))
    save_vqgan(base / "vqgan", vqgan, {"resolution": 16, "dataset": "a"})
    tokenize(TokenizeConfig("a", base / "prepared" / "a", base / "vqgan", base / "tokens" / "a", None, None,
                            TokenizeParams(batch_size=16, num_workers=0, roundtrip_images=0)))
    return base


def gan_cfg(base: Path, out: Path, steps: int, **gan) -> TrainTransformerParams:
    return TrainTransformerParams(
        kind="gan", dataset="a", tokens_dir=str(base / "tokens"), prepared_dir=str(base / "prepared"),
        vqgan_dir=str(base / "vqgan"), out_dir=str(out / "model"), ckpt_dir=str(out / "ckpt"),
        metrics=str(out / "metrics.json"), plots=str(out / "log.tsv"), steps=steps, batch_size=8, ckpt_every=1,
        ckpt_keep=steps, log_every=1, device="cpu",
        gan=GANParams(family="lada", **{"model": dict(LADA), **gan}))


def distance_to_codebook(grids: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """For latent grids (B, d, h, w): each vector's distance to its nearest codebook row."""
    flat = grids.detach().permute(0, 2, 3, 1).reshape(-1, grids.shape[1])
    return torch.cdist(flat.double(), codebook.double()).min(1).values


def test_r1_differentiates_d_at_the_real_grids(world, tmp_path, monkeypatch):
    """Real grids are codebook rows (embedded tokens); the generator's grids are not. R1 must take D's gradient at
    the reals: every vector it differentiates against is exactly a code."""
    seen = []
    real_r1 = gan_training.r1_penalty

    def spy(logits, x, gamma):
        seen.append((x.detach().clone(), x.requires_grad))
        return real_r1(logits, x, gamma)

    monkeypatch.setattr(gan_training, "r1_penalty", spy)
    fakes = []
    real_project = gan_training.project_to_codes_space

    def record_fakes(x, l2_norm):
        out = real_project(x, l2_norm)
        fakes.append(out.detach().clone())
        return out

    monkeypatch.setattr(gan_training, "project_to_codes_space", record_fakes)
    # ms_weight 0: the mode-seeking term's extra generator calls would add fakes D never judged
    train_transformer.run(gan_cfg(world, tmp_path, steps=2, r1_gamma=0.5, ms_weight=0.0))
    vqgan, _ = load_vqgan(world / "vqgan")
    codes = vqgan.quantizer.codes().detach()
    assert len(seen) == 2  # one penalty per D step
    for x, requires_grad in seen:
        assert requires_grad and x.shape == (8, 4, 4, 4)
        assert distance_to_codebook(x, codes).max() == 0  # reals: embedded tokens, bit for bit
    # the fakes D saw in the same steps are not codes, so a penalty at the fakes could not pass the check above
    assert len(fakes) == 2 and all(distance_to_codebook(f, codes).min() > 1e-3 for f in fakes)


def test_ema_decay_warm_up_by_hand():
    # min(decay, (1 + s) / (10 + s)): 0.1 at the first step, rising, capped by the configured decay
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999
    assert ema_decay_at(0, 0.05) == 0.05 and ema_decay_at(1, 0.15) == 0.15
    steps = [ema_decay_at(s, 0.99) for s in range(2000)]
    assert all(a <= b for a, b in zip(steps, steps[1:])) and steps[-1] == 0.99


def test_ema_applies_the_warm_up_decay_at_every_step(world, tmp_path, monkeypatch):
    """shadow_s = shadow_{s-1} + (1 - d_s) (G_s - shadow_{s-1}) with d_s = min(0.15, (1 + s) / (10 + s)):
    0.1, then 0.15, 0.15 (the cap binds from the second step). The weight each step used is read back from the
    checkpoints by least squares over all generator parameters."""
    starts = []

    class SpyEMA(EMA):
        def __init__(self, model, decay):
            super().__init__(model, decay)
            starts.append(({name for name, _ in model.named_parameters()},
                           {k: v.clone() for k, v in self.shadow.items()}))

    monkeypatch.setattr(gan_training, "EMA", SpyEMA)
    # a large G learning rate so each step moves the weights by ~1e-2, far above float32 rounding of the average
    train_transformer.run(gan_cfg(world, tmp_path, steps=3, ema_decay=0.15, lr_g=1e-2))
    assert len(starts) == 1
    params, previous = sorted(starts[0][0]), starts[0][1]
    for step in (1, 2, 3):
        state = ckpt.read(tmp_path / "ckpt" / f"step-{step:08d}.pt")
        shadow, weights = state["ema"]["shadow"], state["G"]
        moved = torch.cat([(weights[k] - previous[k]).double().flatten() for k in params])
        averaged = torch.cat([(shadow[k] - previous[k]).double().flatten() for k in params])
        used = float(averaged @ moved / (moved @ moved))
        assert used == pytest.approx(1 - ema_decay_at(step - 1, 0.15), abs=1e-4), step
        assert torch.allclose(averaged, used * moved, atol=1e-6)
        previous = shadow


def test_the_ema_warm_up_counts_generator_updates_not_steps(world, tmp_path, monkeypatch):
    """n_critic 2 over 4 steps: G (and its EMA) update at steps 0 and 2, with the decays of the first and second G
    update, ema_decay_at(0) and ema_decay_at(1); counted by steps the second would be ema_decay_at(2)."""
    used = []

    class SpyEMA(EMA):
        def update(self):
            used.append(self.decay)
            super().update()

    monkeypatch.setattr(gan_training, "EMA", SpyEMA)
    train_transformer.run(gan_cfg(world, tmp_path, steps=4, ema_decay=0.999, model={**LADA, "n_critic": 2}))
    assert used == [pytest.approx(ema_decay_at(0, 0.999)), pytest.approx(ema_decay_at(1, 0.999))]


def test_every_sampling_batch_draws_its_own_noise(world, tmp_path, monkeypatch):
    """n > batch_size: 8 samples in batches of 3. Each batch's noise comes from its own seed, so no two noise
    vectors repeat across batches; the same seed reproduces them; another seed changes them."""
    train_transformer.run(gan_cfg(world, tmp_path / "train", steps=1, conditional=False))
    real_load = sample.load_stage2

    def run_and_record(seed: int) -> list[torch.Tensor]:
        noise: list[torch.Tensor] = []

        def load(folder, device):
            model, meta = real_load(folder, device)
            model.register_forward_pre_hook(lambda _m, args: noise.append(args[0].detach().clone()))
            return model, meta

        monkeypatch.setattr(sample, "load_stage2", load)
        sample.run(sample.SampleParams(model_dir=str(tmp_path / "train" / "model"), vqgan_dir=str(world / "vqgan"),
                                       out_dir=str(tmp_path / f"s{seed}"), metrics=str(tmp_path / f"m{seed}.json"),
                                       n=8, batch_size=3, seed=seed, device="cpu"))
        return noise

    first = run_and_record(0)
    assert [len(z) for z in first] == [3, 3, 2]
    rows = torch.cat(first)
    assert len({tuple(r.tolist()) for r in rows}) == 8  # no noise vector repeats, within or across batches
    assert all(torch.equal(a, b) for a, b in zip(first, run_and_record(0)))
    other = run_and_record(1)
    assert all(not torch.equal(a, b) for a, b in zip(first, other))


def test_gradients_are_averaged_over_ranks_in_place_of_every_trainable_parameter(monkeypatch):
    # the all-reduce mean stands in for the other rank of a world of 2: (g + (g + 2)) / 2 = g + 1
    monkeypatch.setattr(gan_training, "mean_over_ranks", lambda t: t + 1)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    m[1].bias.requires_grad_(False)  # frozen: not averaged, not given a gradient
    m(torch.ones(1, 3)).sum().backward()
    m[1].weight.grad = None  # a parameter this rank's loss did not reach counts as zero
    before = {name: None if p.grad is None else p.grad.clone() for name, p in m.named_parameters()}
    gan_training.average_gradients(m, Dist(rank=0, world=2))
    for name, p in m.named_parameters():
        if name == "1.bias":
            assert p.grad is None
        elif name == "1.weight":
            assert torch.equal(p.grad, torch.ones_like(p))
        else:
            assert torch.equal(p.grad, before[name] + 1), name
    m[0].weight.grad = torch.zeros_like(m[0].weight)
    gan_training.average_gradients(m, Dist())
    assert torch.equal(m[0].weight.grad, torch.zeros_like(m[0].weight))  # one process: untouched


def test_gradient_clipping_bounds_the_total_norm_and_skips_parameters_without_gradients():
    m = torch.nn.Linear(2, 2)
    m.weight.grad = torch.full((2, 2), 3.0)  # norm 6
    gan_training.clip_gradients(m, 0.5)  # bias.grad is None: left so
    assert m.weight.grad.norm().item() == pytest.approx(0.5, rel=1e-5) and m.bias.grad is None
    gan_training.clip_gradients(m, 0.0)  # 0 = off
    assert m.weight.grad.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_d_sees_grids_augmented_by_the_steps_own_generator():
    """The augmentation draws from the step's generator, never the global RNG: a resumed run sees the same D inputs."""
    grids = torch.randn(8, 4, 4, 4)
    seen = []

    def D(x, y):
        seen.append(x)
        return x.flatten(1).sum(1)

    torch.manual_seed(123)
    gan_training.d_logits(D, grids, None, "translation,cutout", torch.Generator().manual_seed(5))
    torch.manual_seed(999)
    gan_training.d_logits(D, grids, None, "translation,cutout", torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    gan_training.d_logits(D, grids, None, "translation,cutout", torch.Generator().manual_seed(6))
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    assert not torch.equal(seen[0], grids)


def test_an_image_discriminator_is_conditional_and_uses_minibatch_std_as_the_family_says():
    vqgan = VQGAN(VQGANConfig(in_channels=1, ch=8, ch_mult=(1, 2), z_channels=4, n_codes=8, code_dim=4))
    g = GANParams(family="lada", model=LADA, d_space="image", image_d_channels=8)
    gcfg = gan_training.family_config(g, code_dim=4, grid=8, n_classes=10)
    gcfg.mbstd_group = 4
    D = gan_training.build_d(g, gcfg, vqgan, 16)
    assert D.embed is not None and D.embed.num_embeddings == 10 and D.mbstd_group == 4
    assert D.head.in_features == D.embed.embedding_dim + 1  # the minibatch-std feature


def test_d_runs_on_the_math_backend_only_when_its_input_gradient_is_differentiated():
    """R1 or WGAN-GP take a double backward, which the fused kernels lack; without either, and whenever the user
    chose a backend, D keeps the config's."""
    g = GANParams(family="lada", model=LADA)
    cfg = gan_training.family_config(g, code_dim=4, grid=4, n_classes=0)
    for r1, loss, backend, want in ((0.0, "nonsat", None, None), (0.1, "nonsat", None, "math"),
                                    (0.0, "wgan-gp", None, "math"), (0.1, "hinge", "sdpa", "sdpa")):
        c = dataclasses.replace(cfg, r1_gamma=r1, loss=loss, backend=backend)
        assert gan_training.d_config(c).backend == want, (r1, loss, backend)


def test_step_generators_are_seeded_as_the_published_runs_were():
    """(seed, step, stream, rank) -> one torch seed, the formula every recorded GAN run used: changing it changes
    every trained weight and gFID in docs/results.md (and what a resumed run draws)."""
    for seed, step, stream, rank in ((0, 0, 0, 0), (3, 17, gan_training.MS_NOISE, 1), (7, 2, 4, 5)):
        want = ((seed * 1_000_003 + step) * 8 + stream) * 4096 + rank
        assert gan_training.step_generator(seed, step, stream, rank).initial_seed() == want
    assert gan_training.step_generator(3, 17, 2).initial_seed() == ((3 * 1_000_003 + 17) * 8 + 2) * 4096


def test_a_family_config_with_other_than_two_betas_is_refused_naming_them():
    g = GANParams(family="lada", model={**LADA, "betas": [0.5, 0.9, 0.99]})
    with pytest.raises(ValueError) as err:
        gan_training.family_config(g, code_dim=4, grid=4, n_classes=0)
    assert str(err.value) == "betas must be two numbers, got [0.5, 0.9, 0.99]"
