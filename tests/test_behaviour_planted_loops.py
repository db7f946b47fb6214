"""Behaviour of the stage-2 training loops and the sample stage that the rest of the suite let through. Each test was
written against a realistic one-line bug planted by hand (the fourth round: training/gan.py's train_gan, finish_gan,
TrainingInputs and FIDTracker; training/ar.py's train_ar, finish, val_loss, objective and param_groups;
stages/train_transformer.py's run and check; stages/sample.py's run after its set-up) that every existing test passed
with; each fails with its bug and passes without it. Mutation testing could not reach these functions (each mutant
re-trains a module fixture). Planted changes found to be equivalent (no input tells them apart) are not pinned here.

Each test pins one behaviour against an independent computation written here (the documented formula, a hand count,
a fake clock, a one-batch recomputation), on inputs where the wrong variant gives another answer; where that depends
on random draws, a guard asserts that the draws do tell the variants apart. The loops run in float32 on the CPU:
values the loop and the test compute by the same float operations are compared exactly or to 1e-12; recomputations
in another order or in float64 are compared to 1e-5 relative (float32 rounding of a few hundred terms is ~1e-6);
weights an update should leave unmoved are compared to 1e-9 absolute (a planted difference moves them by 1e-5 and
more). Tiny models, a few steps, the shared tiny world: the whole file runs in well under a minute of CPU.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import crash_after_first_checkpoint, transformer_cfg
from models.gan import build_generator, project_to_codes_space, snap_to_codes
from models.maskgit import MaskGIT, MaskGITConfig, random_mask
from pipeline import checkpoint as ckpt
from pipeline.fid import extract_features, frechet_distance_features
from pipeline.fid_reference import NetworkParams, load_reference
from pipeline.runlog import read_run_facts
from pipeline.tokens import TokenData
from pipeline.vqgan_io import load_vqgan, to_uint8
from stages import fid_ref, sample, train_transformer
from stages.fid_ref import FidRefParams
from test_gan_recipes import paper_cfg
from test_train_gan import TINY, TinyNet, gan_cfg, world  # noqa: F401 (world: the module fixture)
from training import ar as ar_loop
from training import gan as gan_training
from training.gan import GANParams, TrainingInputs

REL = 1e-5  # float32 values recomputed in another order or in float64


def last_state(out: Path) -> dict:
    return ckpt.read(out / "ckpt" / "last.pt")


def distance_to_codebook(grids: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """For latent grids (B, d, h, w): each vector's distance to its nearest codebook row."""
    flat = grids.detach().permute(0, 2, 3, 1).reshape(-1, grids.shape[1])
    return torch.cdist(flat.double(), codebook.double()).min(1).values


# ================================================================= training/gan.py

def test_gan_log_rows_average_their_window_and_the_metrics_are_the_last_logged_values(world, tmp_path, monkeypatch):
    """3 steps logged every 2: the row of step 2 holds the mean of steps 0 and 1, the run's end logs the partial
    window (step 2 alone) as row 3. D's accuracies count real logits > 0 and fake logits < 0 (counted here by hand);
    metrics.json takes each value from the last row that has it."""
    seen: dict[str, list] = {"d_loss": [], "g_loss": [], "logits": []}
    real_d, real_g, real_logits = gan_training.d_loss, gan_training.g_loss, gan_training.d_logits

    def d_loss(kind, a, b):
        out = real_d(kind, a, b)
        seen["d_loss"].append(float(out.detach()))
        return out

    def g_loss(kind, a):
        out = real_g(kind, a)
        seen["g_loss"].append(float(out.detach()))
        return out

    def d_logits(*a):
        out = real_logits(*a)
        seen["logits"].append(out.detach().flatten().tolist())
        return out

    monkeypatch.setattr(gan_training, "d_loss", d_loss)
    monkeypatch.setattr(gan_training, "g_loss", g_loss)
    monkeypatch.setattr(gan_training, "d_logits", d_logits)
    # no R1 and no mode-seeking term: the logged losses are exactly D's and G's losses
    train_transformer.run(gan_cfg(world, tmp_path, "lada", steps=3, log_every=2, gan={"ms_weight": 0.0,
                                                                                      "r1_gamma": 0.0}))
    history = last_state(tmp_path)["history"]
    assert [h["step"] for h in history] == [2, 3]
    real = [seen["logits"][3 * s] for s in range(3)]  # per step: D(real), D(fake) for D, D(fake) for G
    fake = [seen["logits"][3 * s + 1] for s in range(3)]
    acc_real = [sum(v > 0 for v in r) / len(r) for r in real]
    acc_fake = [sum(v < 0 for v in f) / len(f) for f in fake]
    for row, steps in zip(history, ([0, 1], [2])):
        for key, per_step in (("d_loss", seen["d_loss"]), ("g_loss", seen["g_loss"]), ("d_acc_real", acc_real),
                              ("d_acc_fake", acc_fake)):
            assert row[key] == pytest.approx(sum(per_step[s] for s in steps) / len(steps), rel=1e-12), (row, key)
    # guards: the rows differ, and the accuracies are not both one half (a flipped comparison would match)
    assert history[0]["d_loss"] != history[1]["d_loss"] and any(a != 0.5 for a in acc_fake)
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert {k: m[k] for k in ("g_loss", "d_loss", "r1", "d_acc_real", "d_acc_fake")} == {
        k: history[-1][k] for k in ("g_loss", "d_loss", "r1", "d_acc_real", "d_acc_fake")}
    assert m["d_acc_real"] != m["d_acc_fake"]  # (swapped accuracies would match)


def test_gan_mode_seeking_term_is_its_weight_over_the_ratio_through_both_generator_outputs(world, tmp_path,
                                                                                          monkeypatch):
    """With D's part of G's loss zeroed, the logged G loss is ms_weight / (ratio + 1e-5) alone (MSGAN: the generator
    pays for a small ratio), and the ratio is taken on two outputs that both carry G's gradient."""
    seen = []
    real_ratio = gan_training.mode_seeking_ratio

    def ratio(f1, f2, z1, z2):
        out = real_ratio(f1, f2, z1, z2)
        seen.append((f1.requires_grad, f2.requires_grad, float(out.detach())))
        return out

    monkeypatch.setattr(gan_training, "mode_seeking_ratio", ratio)
    monkeypatch.setattr(gan_training, "g_loss", lambda kind, logits: logits.sum() * 0.0)
    train_transformer.run(gan_cfg(world, tmp_path, "lada", steps=1, log_every=1, ckpt_every=1,
                                  gan={"ms_weight": 0.7}))
    (row,) = last_state(tmp_path)["history"]
    ((grad1, grad2, r),) = seen
    assert grad1 and grad2 and r > 0
    assert row["ms_ratio"] == pytest.approx(r, rel=1e-12)
    assert row["g_loss"] == pytest.approx(0.7 / (r + 1e-5), rel=REL)


def test_gan_step_time_of_a_resumed_run_counts_the_steps_before_the_interruption(world, tmp_path, monkeypatch):
    """A fake clock advancing 1 s per reading: every step takes 1 s, so step_time_s is 1.0 also for a run
    interrupted after step 3 of 6 and resumed (3 s restored from the checkpoint + 3 s, over 6 steps)."""
    clock = itertools.count()
    monkeypatch.setattr(gan_training, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    cfg = gan_cfg(world, tmp_path, "lada")
    crash_after_first_checkpoint(lambda: train_transformer.run(cfg), monkeypatch)
    train_transformer.run(cfg)
    assert read_run_facts(tmp_path / "metrics.json")["step_time_s"] == 1.0


class FakeFID:
    """Stands in for FIDTracker: records the weights it is asked to measure, returns 10 + the call count."""
    calls: list[dict[str, torch.Tensor]] = []

    def __init__(self, *args):
        self.protocol = {"n_gen": 1, "stand_in": True}

    def __call__(self, G, vqgan, l2_norm, device, bf16):
        FakeFID.calls.append({k: v.detach().clone() for k, v in G.state_dict().items()})
        return 10.0 + len(FakeFID.calls)


def test_gan_fid_points_measure_the_ema_weights_of_their_step_and_the_last_step(world, tmp_path, monkeypatch):
    """fid_every 3 over 4 steps: FID at step 3 and at the run's last step (4), each of the EMA generator as it is
    after that step (the checkpoint of the same step holds it), not of the raw generator or an older average."""
    FakeFID.calls = []
    monkeypatch.setattr(gan_training, "FIDTracker", FakeFID)
    train_transformer.run(gan_cfg(world, tmp_path, "lada", steps=4, ckpt_every=1, ckpt_keep=4, log_every=1,
                                  gan={"fid_every": 3}))
    assert len(FakeFID.calls) == 2
    for measured, step in zip(FakeFID.calls, (3, 4)):
        state = ckpt.read(tmp_path / "ckpt" / f"step-{step:08d}.pt")
        assert all(torch.equal(measured[k], state["ema"]["shadow"][k]) for k in measured), step
        assert any(not torch.equal(measured[k], state["G"][k]) for k in measured)  # (EMA != raw G here)
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert m["fid_curve"] == [{"step": 3, "value": 11.0}, {"step": 4, "value": 12.0}] and m["fid"]["value"] == 12.0


def test_fid_tracker_in_small_batches_equals_one_pass_over_all_samples(world, tmp_path, monkeypatch):
    """7 samples in batches of 3 (3, 3, 1): each batch gets its own slice of the fixed noise and of the cycling
    labels, so the FID equals one computed here from all 7 generated at once."""
    stub = lambda p: (TinyNet(), torch.device("cpu"))  # noqa: E731
    monkeypatch.setattr(fid_ref, "load_network", stub)
    monkeypatch.setattr(gan_training, "load_network", stub)
    ref = FidRefParams(dataset="a", prepared_dir=str(world["base"] / "prepared"), out_dir=str(tmp_path / "ref"),
                       n_ref=None)
    fid_ref.run(ref)
    g = GANParams(family="lada", model=TINY["lada"], fid_every=1, fid_images=7, fid_reference=str(ref.folder),
                  fid_network=NetworkParams(batch_size=3))
    reference = load_reference(str(ref.folder))
    tracker = gan_training.FIDTracker(g, 4, 16, 10, reference.meta["dataset_fingerprint"], 1)
    torch.manual_seed(0)
    G = build_generator(gan_training.family_config(g, code_dim=4, grid=4, n_classes=10)).eval()
    vqgan, _ = load_vqgan(world["vqgan"])
    got = tracker(G, vqgan, True, torch.device("cpu"), False)
    with torch.no_grad():
        tokens = snap_to_codes(G(tracker.z, torch.arange(7) % 10), vqgan.quantizer.codes(), True)
        images = to_uint8(vqgan.decode_indices(tokens))
    feats = extract_features(iter([images]), TinyNet(), 7, reference.meta["resize_mode"], torch.device("cpu"),
                             total=7, progress=False)
    want = frechet_distance_features(reference.features, feats, (reference.mu, reference.sigma))
    assert got == pytest.approx(want, rel=REL)


def test_gan_draws_each_purpose_from_its_own_stream(world, tmp_path, monkeypatch):
    """WGAN-GP (TransGAN's paper recipe), one step: D's real and fake inputs and G's fake are augmented from the
    step's AUGMENT stream, the interpolates from the INTERPOLATE stream (never the NOISE stream z came from)."""
    seeds = []
    real_aug = gan_training.diff_augment

    def spy(x, policy, gen):
        seeds.append(gen.initial_seed())
        return real_aug(x, policy, gen)

    monkeypatch.setattr(gan_training, "diff_augment", spy)
    train_transformer.run(paper_cfg(world, tmp_path, steps=1, ckpt_every=1, log_every=1, seed=3))
    aug, mix = (gan_training.step_generator(3, 0, stream).initial_seed()
                for stream in (gan_training.AUGMENT, gan_training.INTERPOLATE))
    assert seeds == [aug, aug, mix, aug]


def test_wgan_drift_is_the_square_of_the_mean_real_score(world, tmp_path, monkeypatch):
    """TransGAN's "eps" term (docs/gan_recipes.md): + 1e-3 (E[D(real)])^2 in the critic loss, not the mean of the
    squares. With the WGAN part zeroed the logged D loss is the drift alone."""
    reals = []
    real_logits = gan_training.d_logits

    def d_logits(*a):
        out = real_logits(*a)
        reals.append(out.detach().double())
        return out

    monkeypatch.setattr(gan_training, "d_logits", d_logits)
    monkeypatch.setattr(gan_training, "d_loss", lambda kind, a, b: (a.sum() + b.sum()) * 0.0)
    train_transformer.run(paper_cfg(world, tmp_path, steps=1, ckpt_every=1, log_every=1))
    (row,) = last_state(tmp_path)["history"]
    real = reals[0]  # D's first call of the step: the real grids
    assert row["d_loss"] == pytest.approx(1e-3 * float(real.mean()) ** 2, rel=REL)
    assert float(real.pow(2).mean()) > 1.01 * float(real.mean()) ** 2  # (the mean of squares is another number)


def test_gan_gradient_clipping_limits_both_players_updates(world, tmp_path):
    """grad_clip 1e-20 shrinks every gradient far below Adam's eps (1e-8), so one step moves neither G nor D (by
    under lr * 1e-12): their weights equal a run with learning rate 0. Without clipping both move."""
    def params(out: Path, **gan) -> dict[str, dict[str, torch.Tensor]]:
        train_transformer.run(gan_cfg(world, out, "lada", steps=1, ckpt_every=1, log_every=1,
                                      gan={"ms_weight": 0.0, **gan}))
        state = last_state(out)
        return {part: {k: v for k, v in state[part].items() if v.is_floating_point() and "running_" not in k}
                for part in ("G", "D")}

    frozen = params(tmp_path / "frozen", lr_g=0.0, lr_d=0.0)
    clipped = params(tmp_path / "clipped", model={**TINY["lada"], "grad_clip": 1e-20})
    free = params(tmp_path / "free")
    for part in ("G", "D"):
        assert all(torch.allclose(clipped[part][k], frozen[part][k], rtol=0, atol=1e-9) for k in frozen[part]), part
        assert max((free[part][k] - frozen[part][k]).abs().max() for k in frozen[part]) > 1e-5, part


def test_transgan_super_resolution_loss_is_taken_on_the_real_grids(world, tmp_path, monkeypatch):
    """The SR co-training target is the real latent grid (embedded tokens: exact codewords), not G's output."""
    seen = []
    real_sr = gan_training.sr_loss

    def spy(G, real):
        seen.append(real.detach().clone())
        return real_sr(G, real)

    monkeypatch.setattr(gan_training, "sr_loss", spy)
    train_transformer.run(gan_cfg(world, tmp_path, "transgan", steps=2, ckpt_every=2, log_every=1))
    vqgan, _ = load_vqgan(world["vqgan"])
    codes = vqgan.quantizer.codes().detach()
    assert len(seen) == 2 and all(distance_to_codebook(x, codes).max() == 0 for x in seen)


def test_an_image_d_with_snap_judges_the_decoded_nearest_codes(world):
    """d_space image with snap: D's fake input is the decoding of G's grid snapped to its nearest codes (what
    sampling would decode), not of the raw grid."""
    vqgan, vmeta = load_vqgan(world["vqgan"])
    vqgan.eval().requires_grad_(False)
    codebook = vqgan.quantizer.codes().detach()
    data = TokenData.load(world["tokens"], "train", False, vmeta["fingerprint"], "test")
    inputs = TrainingInputs(GANParams(d_space="image", snap=True), vqgan, codebook, True, world["prepared"],
                            data.meta)
    fake = project_to_codes_space(torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1)), True)
    with torch.no_grad():
        got = inputs.fake(fake)
        want = vqgan.decode_indices(snap_to_codes(fake, codebook, True))
        raw = vqgan.decode(fake)
    # straight-through: code + (fake - fake) rounds to the code within float32 ulps of the unit vectors
    assert torch.allclose(got, want, rtol=0, atol=1e-5) and (raw - want).abs().max() > 1e-3


# ================================================================= training/ar.py

@pytest.fixture(scope="module")
def ar_ema_run(world, tmp_path_factory) -> Path:
    """kind ar, EMA 0.9, 4 steps (warm-up 2), every step logged and checkpointed, val loss at steps 3 and 4 over
    2 batches of 8 of the 12 val records (batches of 8 and 4)."""
    out = tmp_path_factory.mktemp("ar_ema")
    train_transformer.run(transformer_cfg(world["base"], out, steps=4, ema=0.9, log_every=1, eval_every=3,
                                          ckpt_every=1, ckpt_keep=4))
    return out


def test_ar_optimiser_runs_each_step_at_the_cosine_rate_of_that_step(ar_ema_run):
    """Step s (0-based) of 4, warm-up 2, lr 3e-3, floor 0.1: lr (s + 1) / 2 in the warm-up, then
    lr (0.1 + 0.9 (1 + cos(pi (s - 2) / 2)) / 2); the optimiser's groups hold it (read from each step's checkpoint)
    and the log row of step s + 1 records it."""
    lr, warmup, total, floor = 3e-3, 2, 4, 0.1
    want = [lr * (s + 1) / warmup if s < warmup else
            lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
            for s in range(total)]
    history = last_state(ar_ema_run)["history"]
    for s in range(total):
        state = ckpt.read(ar_ema_run / "ckpt" / f"step-{s + 1:08d}.pt")
        assert all(g["lr"] == pytest.approx(want[s], rel=1e-12) for g in state["opt"]["param_groups"]), s
        assert history[s]["step"] == s + 1 and history[s]["lr"] == pytest.approx(want[s], rel=1e-12)


def test_ar_ema_averages_with_the_configured_decay(ar_ema_run):
    """shadow_s = shadow_{s-1} + (1 - 0.9) (w_s - shadow_{s-1}): the weight each step gave the new weights, read
    back from consecutive checkpoints by least squares over all parameters, is 0.1."""
    previous = ckpt.read(ar_ema_run / "ckpt" / "step-00000001.pt")["ema"]["shadow"]
    for step in (2, 3, 4):
        state = ckpt.read(ar_ema_run / "ckpt" / f"step-{step:08d}.pt")
        keys = [k for k in previous if previous[k].is_floating_point()]
        moved = torch.cat([(state["model"][k] - previous[k]).double().flatten() for k in keys])
        averaged = torch.cat([(state["ema"]["shadow"][k] - previous[k]).double().flatten() for k in keys])
        used = float(averaged @ moved / (moved @ moved))
        assert used == pytest.approx(0.1, abs=1e-4), step
        previous = state["ema"]["shadow"]


def test_ar_val_loss_is_the_token_mean_over_the_val_split_of_the_ema_weights(world, ar_ema_run):
    """The val loss of the last step (the run's end, not a multiple of eval_every) is the mean next-token
    cross-entropy over every token of the 12 val records, of the exported (EMA) weights, recomputed here in float64
    from the model's logits: the 8 + 4 records weigh by their count."""
    history = last_state(ar_ema_run)["history"]
    assert [h["step"] for h in history if h.get("val_loss") is not None] == [3, 4]
    model, meta = sample.load_stage2(ar_ema_run / "gpt", torch.device("cpu"))
    val = TokenData.load(world["tokens"], "val", False, meta["fingerprint"], "test")
    assert len(val.tokens) == 12
    with torch.no_grad():
        logits = model(val.tokens[:, :-1], val.labels)[0].double()
    want = float(-logits.log_softmax(-1).gather(-1, val.tokens[..., None]).mean())
    assert history[-1]["val_loss"] == pytest.approx(want, rel=REL)
    m = json.loads((ar_ema_run / "gpt" / "metrics.json").read_text())
    assert m["val_loss"] == history[-1]["val_loss"]


def test_ar_val_set_is_val_batches_global_batches_whatever_grad_accum(world, tmp_path):
    """val_batches 1 of batch_size 8 with grad_accum 2 (micro-batches of 4): the val loss is over the first 8 val
    records, recomputed here in float64 from the exported weights; it was over micro * val_batches = 4 records
    before, so raising grad_accum (a memory setting) changed the metric."""
    train_transformer.run(transformer_cfg(world["base"], tmp_path, steps=2, grad_accum=2, val_batches=1,
                                          eval_every=2, ckpt_every=2))
    model, meta = sample.load_stage2(tmp_path / "gpt", torch.device("cpu"))
    val = TokenData.load(world["tokens"], "val", False, meta["fingerprint"], "test")
    with torch.no_grad():
        logits = model(val.tokens[:8, :-1], val.labels[:8])[0].double()
    want = float(-logits.log_softmax(-1).gather(-1, val.tokens[:8, :, None]).mean())
    with torch.no_grad():
        logits4 = model(val.tokens[:4, :-1], val.labels[:4])[0].double()
    four = float(-logits4.log_softmax(-1).gather(-1, val.tokens[:4, :, None]).mean())
    assert abs(want - four) > 100 * REL * want  # the two record counts give different answers
    assert last_state(tmp_path)["history"][-1]["val_loss"] == pytest.approx(want, rel=REL)


def test_maskgit_val_loss_and_accuracy_weigh_each_batch_by_its_records(world):
    """val_loss over the 12 val records in batches of 8 (2 batches: 8 + 4): the loss and the masked-token accuracy
    are the batch values weighted by the batch's record count, each batch's masks the next draws of one generator
    seeded VAL_MASK_SEED; the model is back in training mode afterwards."""
    _, vmeta = load_vqgan(world["vqgan"])
    val = TokenData.load(world["tokens"], "val", False, vmeta["fingerprint"], "test")
    torch.manual_seed(0)
    model = MaskGIT(MaskGITConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16, n_classes=10))
    loss, acc = ar_loop.val_loss(model, val, 16, 8, torch.device("cpu"), True, False)
    assert model.training
    model.eval()
    masks, parts = torch.Generator().manual_seed(ar_loop.VAL_MASK_SEED), []
    with torch.no_grad():
        for start in (0, 8):
            x, y = val.tokens[start:start + 8], val.labels[start:start + 8]
            parts.append((len(x), *(float(v) for v in ar_loop.objective(model, model.mask_id, x, y, masks))))
    assert [n for n, _, _ in parts] == [8, 4] and parts[0][2] != parts[1][2]  # (unequal batches, unequal values)
    assert loss == pytest.approx(sum(n * v for n, v, _ in parts) / 12, rel=1e-12)
    assert acc == pytest.approx(sum(n * a for n, _, a in parts) / 12, rel=1e-12)


def test_ar_logged_train_loss_is_the_mean_over_micro_batches_and_steps(world, tmp_path, monkeypatch):
    """grad_accum 2, logged every 2 steps: a step's loss is the mean of its two micro-batch losses, a row's
    train_loss the mean of its steps' losses (micro-batch losses recorded as the loop computed them)."""
    seen = []
    real_objective = ar_loop.objective

    def spy(*a, **kw):
        loss, acc = real_objective(*a, **kw)
        if torch.is_grad_enabled():  # training, not val_loss
            seen.append(float(loss.detach()))
        return loss, acc

    monkeypatch.setattr(ar_loop, "objective", spy)
    train_transformer.run(transformer_cfg(world["base"], tmp_path, steps=4, grad_accum=2, log_every=2,
                                          eval_every=4, ckpt_every=4))
    assert len(seen) == 8
    step = [(seen[2 * s] + seen[2 * s + 1]) / 2 for s in range(4)]
    history = last_state(tmp_path)["history"]
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["train_loss"] == pytest.approx((step[0] + step[1]) / 2, rel=1e-12)
    assert history[1]["train_loss"] == pytest.approx((step[2] + step[3]) / 2, rel=1e-12)
    assert step[3] != step[2]  # (a row holding its last step only would differ)


def test_maskgit_objective_applies_label_smoothing_as_documented():
    """label_smoothing eps: per masked position (1 - eps) (-log p_target) + eps * mean_v (-log p_v), averaged over
    the masked positions; recomputed here in float64."""
    torch.manual_seed(0)
    model = MaskGIT(MaskGITConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16, n_classes=0)).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # peaked predictions: smoothing changes the loss by far more than rounding
    x = torch.randint(0, 16, (5, 16))
    loss, _ = ar_loop.objective(model, model.mask_id, x, None, torch.Generator().manual_seed(3), 0.3)
    mask = random_mask(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logp = model(x.masked_fill(mask, model.mask_id))[mask].double().log_softmax(-1)
    want = (0.7 * -logp.gather(-1, x[mask][:, None])[:, 0] + 0.3 * -logp.mean(-1)).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=REL)
    assert abs(float(want) - float(-logp.gather(-1, x[mask][:, None]).mean())) > 1e-3  # smoothing shows


def test_maskgit_training_uses_the_configured_label_smoothing_and_val_none(world, tmp_path, monkeypatch):
    seen = []
    real = ar_loop.masked_loss

    def spy(logits, x, mask, label_smoothing=0.0):
        seen.append((torch.is_grad_enabled(), label_smoothing))
        return real(logits, x, mask, label_smoothing)

    monkeypatch.setattr(ar_loop, "masked_loss", spy)
    train_transformer.run(transformer_cfg(world["base"], tmp_path, kind="maskgit", steps=1, ckpt_every=1,
                                          maskgit=train_transformer.MaskGITParams(label_smoothing=0.3)))
    assert seen and {s for training, s in seen if training} == {0.3} and {s for t, s in seen if not t} == {0.0}


def test_maskgit_masks_are_drawn_from_the_documented_seed(world, tmp_path, monkeypatch):
    """Seed 2, rank 0: the first training mask is the first draw of a generator seeded 2 * 1_000_003 (the seed
    recorded runs used; another formula changes every maskgit run and what a resume draws)."""
    seen = []
    real = ar_loop.random_mask

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(ar_loop, "random_mask", spy)
    train_transformer.run(transformer_cfg(world["base"], tmp_path, kind="maskgit", steps=1, ckpt_every=1, seed=2))
    assert torch.equal(seen[0], random_mask(8, 16, generator=torch.Generator().manual_seed(2 * 1_000_003)))


# ================================================================= stages/train_transformer.py

def test_check_refuses_a_batch_not_divisible_by_grad_accum_and_an_ema_for_kind_gan():
    """batch_size 8 in 3 micro-batches does not split (the loop would train on 2 + 2 + 2 + 2 records); for kind gan
    the AR `ema` is refused whatever its value, 0.0 included (gan.ema_decay is the GAN's)."""
    import yaml

    from helpers import ROOT
    from pipeline.errors import UserError
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def check(**section):
        return train_transformer.check({"datasets": params["datasets"],
                                        "train_transformer": {**params["train_transformer"], **section}}, "params.yaml")

    with pytest.raises(UserError, match=r"batch_size = 8 is not divisible by grad_accum = 3$"):
        check(batch_size=8, grad_accum=3)
    assert check(batch_size=8, grad_accum=4).grad_accum == 4
    with pytest.raises(UserError, match=r"train_transformer.ema = 0.0 applies to kinds 'ar' and 'maskgit'"):
        check(kind="gan", ema=0.0)
    assert check(kind="ar", ema=0.0).ema == 0.0


def test_run_refuses_a_folder_of_the_users_before_training(world, tmp_path):
    """The out_dir check comes before any work: a user's folder there stops the run before its first checkpoint
    (replace_dir would refuse only at the end, after the whole training)."""
    from pipeline.errors import UserError
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace it"):
        train_transformer.run(transformer_cfg(world["base"], tmp_path, steps=1, ckpt_every=1))
    assert not (tmp_path / "ckpt").exists() and (tmp_path / "gpt" / "notes.txt").read_text() == "mine"


# ================================================================= stages/sample.py

@pytest.fixture(scope="module")
def maskgit_model(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("maskgit_model")
    train_transformer.run(transformer_cfg(world["base"], out, kind="maskgit"))
    return out / "gpt"


def sample_params(world, model_dir: Path, out: Path, **kw) -> sample.SampleParams:
    return sample.SampleParams(model_dir=str(model_dir), vqgan_dir=str(world["vqgan"]), out_dir=str(out / "samples"),
                               metrics=str(out / "sample.json"), device="cpu", **kw)


def read_tokens(folder: Path) -> dict[int, np.ndarray]:
    from pipeline.shards import iter_tar_samples
    rows = {}
    for shard in json.loads((folder / "manifest.json").read_text())["shards"]:
        for key, files, _ in iter_tar_samples(folder / shard):
            rows[int(key[1:])] = np.frombuffer(files["tok"], "<u2")
    return rows


def test_maskgit_sample_batches_are_generate_with_every_sampler_setting(world, maskgit_model, tmp_path):
    settings = dict(temperature=0.8, top_k=9, top_p=0.9, cfg_scale=2.0, choice_temperature=1.5)
    sample.run(sample_params(world, maskgit_model, tmp_path, n=7, batch_size=4, maskgit_steps=3, seed=3, **settings))
    rows = read_tokens(tmp_path / "samples")
    model, _ = sample.load_stage2(maskgit_model, torch.device("cpu"))
    for b, start in enumerate((0, 4)):
        n = min(4, 7 - start)
        y = torch.arange(start, start + n) % 10
        with torch.no_grad():
            tokens = model.generate(n, y, steps=3, generator=torch.Generator().manual_seed(3 * 1_000_003 + b),
                                    **settings)
        assert all(np.array_equal(rows[start + i], tokens[i].numpy()) for i in range(n)), b


def test_sample_grid_rows_hold_grid_per_class_images(world, maskgit_model, tmp_path):
    """grid_per_class 1: one cell (16 px + 2 px border, drawn 2x) per class row, though classes 0-2 have 2 samples."""
    from PIL import Image
    sample.run(sample_params(world, maskgit_model, tmp_path, n=13, batch_size=5, grid_per_class=1, maskgit_steps=2))
    grid = np.asarray(Image.open(tmp_path / "samples" / "grid.png"))
    assert grid.shape == (2 * (2 + 10 * 18), 2 * (2 + 1 * 18))


def test_sample_rates_are_counted_by_the_clock(world, maskgit_model, tmp_path, monkeypatch):
    """A fake clock that reads 10 s then 14 s: 13 images of 4x4 tokens in 4 s are 3.25 images/s, 52 tokens/s."""
    readings = iter([10.0, 14.0])
    monkeypatch.setattr(sample, "time", SimpleNamespace(monotonic=lambda: next(readings)))
    sample.run(sample_params(world, maskgit_model, tmp_path, n=13, batch_size=5, maskgit_steps=2))
    facts = read_run_facts(tmp_path / "sample.json")
    assert (facts["seconds"], facts["images_per_s"], facts["tokens_per_s"]) == (4.0, 3.25, 52.0)


def test_gan_samples_snap_as_the_generators_config_says(world, tmp_path, monkeypatch):
    """A generator trained on a VQGAN without l2-normalised codes (config latent.l2_norm false) snaps by squared
    L2; codes of unequal norms (scaled here) make that another token than the cosine rule would give."""
    train_transformer.run(gan_cfg(world, tmp_path / "t", "lada", steps=1, ckpt_every=1, log_every=1,
                                  gan={"conditional": False}))
    folder = tmp_path / "t" / "model"
    config = json.loads((folder / "config.json").read_text())
    config["latent"]["l2_norm"] = False
    (folder / "config.json").write_text(json.dumps(config))
    scale = torch.linspace(0.2, 3.0, 16)[:, None]
    real_load = sample.load_vqgan

    def load(*a, **kw):
        vqgan, meta = real_load(*a, **kw)
        codes = vqgan.quantizer.codes().detach() * scale
        vqgan.quantizer.codes = lambda: codes
        return vqgan, meta

    monkeypatch.setattr(sample, "load_vqgan", load)
    sample.run(sample_params(world, folder, tmp_path, n=4, batch_size=4))
    rows = read_tokens(tmp_path / "samples")
    G, _ = sample.load_stage2(folder, torch.device("cpu"))
    codes = real_load(world["vqgan"])[0].quantizer.codes().detach() * scale
    with torch.no_grad():
        out = G(torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(0)), None)
    l2, cosine = snap_to_codes(out, codes, False).view(4, 16), snap_to_codes(out, codes, True).view(4, 16)
    assert not torch.equal(l2, cosine)
    assert all(np.array_equal(rows[i], l2[i].numpy()) for i in range(4))
