"""train_transformer with kind 'gan' (training/gan.py) and the sample stage on GAN generators: each family
trains end to end on a tiny token store, exact resume, NaN guard, FID over training, params checks, snapping."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import ROOT, crash_after_first_checkpoint, resumed_step
from models.gan_common import FAMILIES
from pipeline import checkpoint as ckpt
from pipeline.fid import protocol_id
from pipeline.runlog import read_run_facts
from training import gan as gan_training
from pipeline.errors import UserError
from training.common import linear_decay_scale
from training.gan import GANParams
from models.gan import embed_tokens, snap_to_codes
from pipeline.images import decode_png
from pipeline.shards import iter_tar_samples
from pipeline.errors import NonFiniteLoss
from pipeline.vqgan_io import load_vqgan
from stages import fid_ref, sample, train_transformer
from stages.fid_ref import FidRefParams
from stages.train_transformer import TrainTransformerParams

# tiny family configs (the latent grid is 4x4x4: 16x16 images, VQGAN downsampling 4, 16 codes of 4 dimensions)
TINY = {
    "lada": dict(g_dims=[32, 16], d_base=8, z_dim=16, class_dim=8),
    "transgan": dict(g_dim=64, g_depths=[1, 1], grid_attention_min=4, grid_cell=2, d_dim=16, d_depth=1, z_dim=16,
                     class_dim=8, sr_weight=1.0),
    "stransgan": dict(g_dims=[32, 16], g_depth=2, window=2, d_dim=16, d_depth=2, z_dim=16, class_dim=8),
}


@pytest.fixture(scope="module")
def world(tiny_world) -> dict:
    """The shared tiny world: 16x16 grey dataset `a` (48 train + 12 val, 10 classes), a random-init VQGAN, its
    token store."""
    return tiny_world


def gan_cfg(world: dict, out, family: str = "lada", **kw) -> TrainTransformerParams:
    base = world["base"]
    gan = kw.pop("gan", {})
    cfg = TrainTransformerParams(
        kind="gan", dataset="a", tokens_dir=str(base / "tokens"), prepared_dir=str(base / "prepared"),
        vqgan_dir=str(base / "vqgan"), out_dir=str(out / "model"), ckpt_dir=str(out / "ckpt"),
        metrics=str(out / "metrics.json"), plots=str(out / "log.tsv"), steps=6, batch_size=8, ckpt_every=3,
        log_every=2, device="cpu",
        gan=GANParams(family=family, model=TINY[family] | gan.pop("model", {}), **gan))
    return dataclasses.replace(cfg, **kw)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- each family end to end

@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_writes_outputs(world, tmp_path, family):
    # D's learning rate raised and G's nearly frozen, so 24 steps show D learning rather than the noise of the
    # two-player game (D-loss drops over seeds 0-4: 0.19 .. 0.67 across the families)
    cfg = gan_cfg(world, tmp_path, family, steps=24, log_every=4, ckpt_every=24,
                  gan={"lr_d": 2e-3, "lr_g": 1e-5})
    train_transformer.run(cfg)
    rows = [dict(zip(*[line.split("\t") for line in (lines[0], row)]))
            for lines in [(tmp_path / "log.tsv").read_text().splitlines()] for row in lines[1:]]
    assert list(rows[0]) == ["step", "g_loss", "d_loss", "r1", "d_acc_real", "d_acc_fake", "ms_ratio", "fid"]
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24] and all(r["fid"] == "" for r in rows)
    d = [float(r["d_loss"]) for r in rows]
    assert all(math.isfinite(v) for v in d) and d[-1] < d[0] - 0.1, d
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert m["kind"] == "gan" and m["family"] == family and m["steps"] == 24
    assert m["g_params_m"] > 0 and m["d_params_m"] > 0 and "step_time_s" not in m  # timing: the run log
    assert read_run_facts(tmp_path / "metrics.json")["step_time_s"] > 0
    assert 0 <= m["d_acc_real"] <= 1 and 0 <= m["d_acc_fake"] <= 1 and m["fid"] is None
    assert m["recipe"]["lr_d"] == 2e-3 and (m["r1"] > 0) == (m["recipe"]["r1_gamma"] > 0)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    _, vmeta = load_vqgan(world["base"] / "vqgan")
    assert saved["kind"] == "gan" and saved["family"] == family and saved["fingerprint"] == vmeta["fingerprint"]
    assert saved["latent"] == {"code_dim": 4, "grid": 4, "l2_norm": True} and len(saved["class_names"]) == 10
    assert saved["model"]["n_classes"] == 10 and saved["model"]["lr_d"] == 2e-3
    assert (tmp_path / "model" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the exported weights are the EMA generator's, not the last iterate's
    state = ckpt.read(tmp_path / "ckpt" / "last.pt")
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert exported.keys() == state["G"].keys()
    assert all(torch.equal(exported[k], state["ema"]["shadow"][k]) for k in exported)
    assert any(not torch.equal(exported[k], state["G"][k]) for k in exported)


def run_interrupted_then_resumed(cfg: TrainTransformerParams, monkeypatch) -> None:
    """Train with a crash right after the first checkpoint (step 3), check what it left, then re-run to the end."""
    crash_after_first_checkpoint(lambda: train_transformer.run(cfg), monkeypatch)
    assert [p.name for p in ckpt.step_files(Path(cfg.ckpt_dir))] == ["step-00000003.pt"]
    assert not Path(cfg.out_dir).exists()
    assert resumed_step(lambda: train_transformer.run(cfg), monkeypatch) == 3


def assert_runs_equal(a_dir: Path, b_dir: Path) -> dict[str, torch.Tensor]:
    """Two runs' exported weights, last G and D and logs are bitwise equal; returns the first's exported weights."""
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (a_dir, b_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (ckpt.read(d / "ckpt" / "last.pt") for d in (a_dir, b_dir))
    for part in ("G", "D"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    assert sa["history"] == sb["history"]
    return a


@pytest.mark.parametrize("family", ["transgan", "lada"])
def test_interrupted_and_resumed_run_equals_uninterrupted(world, tmp_path, monkeypatch, family):
    # transgan: locality progress, super-resolution, cutout; lada: batch-norm D, R1
    train_transformer.run(gan_cfg(world, tmp_path / "a", family))
    run_interrupted_then_resumed(gan_cfg(world, tmp_path / "b", family), monkeypatch)
    a = assert_runs_equal(tmp_path / "a", tmp_path / "b")
    # and a run with another seed ends elsewhere (the comparison above can fail)
    train_transformer.run(gan_cfg(world, tmp_path / "c", family, seed=1))
    c = load_file(str(tmp_path / "c" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_r1_runs_through_softmax_attention_in_d(world, tmp_path, family):
    # R1 is a double backward through D; fused attention kernels have none, so D must take the math backend
    train_transformer.run(gan_cfg(world, tmp_path, family, steps=2, gan={"attention_kind": "full", "r1_gamma": 0.1}))
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert m["recipe"]["r1_gamma"] == 0.1 and m["r1"] > 0


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(world, tmp_path, monkeypatch):
    from models.gan_lada import LadaGenerator
    real_forward = LadaGenerator.forward
    calls = {"n": 0}

    def poisoned(self, z, y=None):
        out = real_forward(self, z, y)
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 5 else out  # one forward per step: step index 4

    monkeypatch.setattr(LadaGenerator, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 4"):
        train_transformer.run(gan_cfg(world, tmp_path, gan={"ms_weight": 0.0}))  # no extra G forwards per step
    assert [p.name for p in ckpt.step_files(tmp_path / "ckpt")] == ["step-00000003.pt"]
    state = ckpt.read(tmp_path / "ckpt" / "last.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["G"].values())
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------- sampling a GAN

@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train_transformer.run(gan_cfg(world, out, "stransgan", steps=4))
    return out / "model"


def read_samples(folder) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """(images (H, W, C) uint8, raw token grids, labels) of a sample folder, in key order."""
    images, tokens, labels = [], [], []
    for shard in json.loads((folder / "manifest.json").read_text())["shards"]:
        for _, files, problems in iter_tar_samples(folder / shard):
            assert not problems
            images.append(decode_png(files["png"]))
            tokens.append(np.frombuffer(files["tok"], "<u2"))
            labels.append(int(files["cls"]))
    return images, tokens, labels


def test_sample_stage_on_gan_gives_valid_tokens_and_images(world, trained, tmp_path):
    cfg = sample.SampleParams(model_dir=str(trained), vqgan_dir=str(world["base"] / "vqgan"),
                              out_dir=str(tmp_path / "s"), metrics=str(tmp_path / "m.json"), n=7, batch_size=4,
                              device="cpu", grid_per_class=2)
    sample.run(cfg)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["kind"] == "gan" and manifest["count"] == 7 and manifest["grid"] == [4, 4]
    assert manifest["n_codes"] == 16 and manifest["conditional"] is True
    assert manifest["sampler"]["snap"].startswith("nearest code by cosine")
    images, tokens, labels = read_samples(tmp_path / "s")
    assert len(images) == 7 and labels == [0, 1, 2, 3, 4, 5, 6]
    assert all(im.shape == (16, 16, 1) and im.dtype == np.uint8 for im in images)
    grids = torch.from_numpy(np.stack(tokens).astype(np.int64)).view(7, 4, 4)
    assert int(grids.min()) >= 0 and int(grids.max()) < 16
    # the tokens are the snapped generator outputs for the batch's seeded noise, decoded like AR samples
    G, meta = sample.load_stage2(trained, torch.device("cpu"))
    vqgan, _ = load_vqgan(world["base"] / "vqgan")
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(0))  # batch 0 of seed 0
    with torch.no_grad():
        expect = snap_to_codes(G(z, torch.arange(4)), vqgan.quantizer.codes(), True)
        decoded = ((vqgan.decode_indices(grids).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(grids[:4], expect)
    assert np.array_equal(np.stack(images), decoded.permute(0, 2, 3, 1).numpy())


def test_conditional_generator_output_depends_on_the_class(trained):
    G, meta = sample.load_stage2(trained, torch.device("cpu"))
    assert meta["model"]["n_classes"] == 10
    z = torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = G(z, torch.zeros(3, dtype=torch.long)), G(z, torch.ones(3, dtype=torch.long))
    assert a.shape == (3, 4, 4, 4) and (a - b).abs().max() > 1e-4


def test_unconditional_gan_samples_with_label_minus_one(world, tmp_path):
    train_transformer.run(gan_cfg(world, tmp_path, "lada", steps=2, gan={"conditional": False}))
    sample.run(sample.SampleParams(model_dir=str(tmp_path / "model"), vqgan_dir=str(world["base"] / "vqgan"),
                                   out_dir=str(tmp_path / "s"), metrics=str(tmp_path / "m.json"), n=3,
                                   batch_size=3, device="cpu"))
    _, _, labels = read_samples(tmp_path / "s")
    assert labels == [-1, -1, -1]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["class_names"] == []


def test_snap_to_codes_recovers_the_tokens_of_code_vectors():
    torch.manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(32, 6), dim=1)
    tokens = torch.randint(0, 32, (5, 16))
    latent = embed_tokens(tokens, codebook, 4, 4)
    assert latent.shape == (5, 6, 4, 4) and torch.equal(latent[2, :, 1, 3], codebook[tokens[2, 7]])
    # l2 mode compares directions: scaled code vectors snap back to their code
    assert torch.equal(snap_to_codes(3.0 * latent, codebook, True, chunk=7), tokens.view(5, 4, 4))
    # squared-L2 mode (codes of different norms): a slightly perturbed vector snaps back, a shrunk one lands on
    # short codes instead, which the l2 mode would not do
    codebook = torch.randn(32, 6) * torch.rand(32, 1)
    latent = embed_tokens(tokens, codebook, 4, 4)
    assert torch.equal(snap_to_codes(latent + 1e-3 * torch.randn_like(latent), codebook, False), tokens.view(5, 4, 4))
    assert not torch.equal(snap_to_codes(0.01 * latent, codebook, False), tokens.view(5, 4, 4))


# ---------------------------------------------------------------- FID over training (stand-in feature network)

class TinyNet(torch.nn.Module):
    """Stand-in feature network: 4x4 average pool of the first channel (16-d features)."""
    feature_network_hash = "stub"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x[:, :1], 4).flatten(1)


def test_fid_over_training_is_logged_with_its_protocol(world, tmp_path, monkeypatch):
    stub = lambda p: (TinyNet(), torch.device("cpu"))  # noqa: E731
    monkeypatch.setattr(fid_ref, "load_network", stub)
    ref = FidRefParams(dataset="a", prepared_dir=str(world["base"] / "prepared"), out_dir=str(tmp_path / "ref"),
                       n_ref=None)
    fid_ref.run(ref)
    monkeypatch.setattr(gan_training, "load_network", stub)
    cfg = gan_cfg(world, tmp_path, "lada", gan={"fid_every": 3, "fid_images": 10, "fid_reference": str(ref.folder)})
    train_transformer.run(cfg)
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert [p["step"] for p in m["fid_curve"]] == [3, 6] and all(p["value"] > 0 for p in m["fid_curve"])
    assert m["fid"]["value"] == m["fid_curve"][-1]["value"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "fid": m["fid"]["value"], "protocol": protocol_id(m["fid"]["protocol"])}
    protocol = m["fid"]["protocol"]
    assert protocol["n_gen"] == 10 and protocol["n_ref"] == 12 and protocol["feature_network_hash"] == "stub"
    assert protocol["ref_split"] == "val" and protocol["sampler"]["generator"] == "ema"
    assert protocol["dataset_fingerprint"] == json.loads((ref.folder / "meta.json").read_text())["dataset_fingerprint"]
    fid_column = [line.split("\t")[-1] for line in (tmp_path / "log.tsv").read_text().splitlines()[1:]]
    assert fid_column[0] == "" and float(fid_column[1]) == pytest.approx(m["fid_curve"][0]["value"], rel=1e-5)
    # a reference made from other data is refused with one line
    other = json.loads((ref.folder / "meta.json").read_text()) | {"dataset_fingerprint": "other"}
    (ref.folder / "meta.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="dataset fingerprint 'other'") as err:
        train_transformer.run(dataclasses.replace(cfg, ckpt_dir=str(tmp_path / "ckpt2")))
    one_line(err)


def test_fid_tracker_noise_labels_and_protocol_follow_the_seed(world, tmp_path, monkeypatch):
    """The points of the FID curve differ only by the weights: the noise is drawn once from the run's seed (stream
    FID_NOISE of step 0), labels cycle through the classes, and the protocol names the seeds, the sampler and the
    reference; a reference for other channels or from another feature network is refused."""
    stub = lambda p: (TinyNet(), torch.device("cpu"))  # noqa: E731
    monkeypatch.setattr(fid_ref, "load_network", stub)
    ref = FidRefParams(dataset="a", prepared_dir=str(world["base"] / "prepared"), out_dir=str(tmp_path / "ref"),
                       n_ref=None, seed=5)
    fid_ref.run(ref)
    meta = json.loads((ref.folder / "meta.json").read_text())
    g = GANParams(family="lada", model=TINY["lada"], fid_every=3, fid_images=7, fid_reference=str(ref.folder))
    # the network the run's params name (its weights file, device, batch size)
    monkeypatch.setattr(gan_training, "load_network", lambda p: stub(p) if p == g.fid_network else None)
    fp = meta["dataset_fingerprint"]
    tracker = gan_training.FIDTracker(g, 11, 16, 3, fp, 1)
    expected_z = torch.randn(7, 16, generator=gan_training.step_generator(11, 0, gan_training.FID_NOISE))
    assert torch.equal(tracker.z, expected_z) and tracker.y.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert gan_training.FIDTracker(g, 11, 16, 0, fp, 1).y is None
    p = tracker.protocol
    assert (p["seed"], p["ref_seed"], p["n_gen"]) == (11, 5, 7)
    assert p["sampler"] == {"generator": "ema", "snap": "nearest code", "z_seed": 11}
    with pytest.raises(UserError, match="this evaluation uses 3;"):
        gan_training.FIDTracker(g, 11, 16, 3, fp, 3)

    class OtherNet(TinyNet):
        feature_network_hash = "other"
    monkeypatch.setattr(gan_training, "load_network", lambda p: (OtherNet(), torch.device("cpu")))
    with pytest.raises(UserError, match="this evaluation uses 'other';"):
        gan_training.FIDTracker(g, 11, 16, 3, fp, 1)


def test_transgan_is_told_the_fraction_of_training_done_before_each_step(world, tmp_path, monkeypatch):
    """step / steps: 0 at the first step, never 1 (the locality mask's last widening is the run's last quarter
    here); one step is a valid run."""
    from models.gan_transgan import TransGANGenerator
    seen = []
    original = TransGANGenerator.set_progress
    monkeypatch.setattr(TransGANGenerator, "set_progress", lambda self, p: seen.append(p) or original(self, p))
    train_transformer.run(gan_cfg(world, tmp_path / "a", "transgan", steps=4, ckpt_every=2))
    assert seen == [0.0, 0.25, 0.5, 0.75]
    seen.clear()
    train_transformer.run(gan_cfg(world, tmp_path / "b", "transgan", steps=1, ckpt_every=1, log_every=1))
    assert seen == [0.0]


def test_mode_seeking_ratio_is_each_pairs_output_distance_over_its_noise_distance_averaged():
    """Pair 0: outputs differ by 1 on average, noise by 2 -> 0.5; pair 1: 3 over 1 -> 3; the mean is 1.75 (MSGAN's
    ratio of batch means would give 2 / 1.5 = 1.33: tokenmill averages per pair, docs/gan_recipes.md)."""
    fake1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    fake2 = torch.tensor([[[[2.0, 1.0], [4.0, 3.0]]], [[[3.0, -3.0], [3.0, -3.0]]]])
    z1 = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    z2 = torch.tensor([[3.0, -1.0, 3.0], [1.0, -1.0, 1.0]])
    assert gan_training.mode_seeking_ratio(fake1, fake2, z1, z2).item() == pytest.approx(1.75, rel=1e-6)


# ---------------------------------------------------------------- params

def test_params_yaml_gan_section_and_errors():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    section = params["train_transformer"]
    assert section["kind"] == "ar" and "gan" in section
    datasets = params["datasets"]
    cfg = train_transformer.check({"datasets": datasets, "train_transformer": {**section, "kind": "gan"}},
                                  "params.yaml")
    assert cfg.kind == "gan" and cfg.gan.family in FAMILIES

    def err(**gan) -> str:
        raw = {**section, "kind": "gan", "gan": {**section["gan"], **gan}}
        with pytest.raises(UserError) as exc:
            train_transformer.check({"datasets": datasets, "train_transformer": raw}, "params.yaml")
        return one_line(exc)

    assert "train_transformer.gan.family = 'biggan' is not allowed" in err(family="biggan")
    assert "unknown key 'train_transformer.gan.model.g_dimz'" in err(model={"g_dimz": [8]})
    # a key of the family used before `-S ...gan.family=transgan`: named as such, with the way to clear it
    assert err(family="transgan", model={"d_base": 8}) == (
        "params.yaml: train_transformer.gan.model.d_base is a setting of family lada, not of transgan (gan.family); "
        "clear the family's settings with -S 'train_transformer.gan.model={}' or set transgan's own")
    assert "is a setting of family lada and stransgan, not of transgan" in err(family="transgan", model={"g_dims": [8]})
    assert "train_transformer.gan.model.g_depth = 'two' has the wrong type" in err(model={"g_depth": "two"})
    assert "gan.model.grid cannot be set here (it comes from the token store)" in err(model={"grid": 8})
    assert "gan.model.lr_g cannot be set here (it comes from train_transformer.gan.lr_g)" in err(model={"lr_g": 1.0})
    assert "diffaug entries must be in" in err(diffaug="translation,colour")
    assert "n_heads to be a multiple of 4" in err(attention_kind="ylg", model={"n_heads": 2})
    with pytest.raises(UserError, match="applies to kinds 'ar' and 'maskgit'; for kind 'gan' set train_transformer"):
        train_transformer.check({"train_transformer": {**section, "kind": "gan", "ema": 0.99}}, "params.yaml")


def test_mode_seeking_ratio_by_hand_and_for_a_collapsed_generator():
    z1, z2 = torch.zeros(2, 4), torch.ones(2, 4)  # |z1 - z2| averages 1 per sample
    f1 = torch.zeros(2, 1, 2, 2)
    f2 = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # mean |f1 - f2|: 0.5 and 1.0
    assert gan_training.mode_seeking_ratio(f1, f2, z1, z2).item() == pytest.approx(0.75)
    # a generator that ignores z (one output per class): ratio 0, so ms_weight / ratio is the largest penalty
    assert gan_training.mode_seeking_ratio(f1, f1.clone(), z1, z2).item() == 0.0


def test_mode_seeking_term_is_logged_and_resumes_exactly(world, tmp_path, monkeypatch):
    def cfg(out):
        return gan_cfg(world, out, "lada", gan={"ms_weight": 1.0})

    train_transformer.run(cfg(tmp_path / "a"))
    m = json.loads((tmp_path / "a" / "model" / "metrics.json").read_text())
    assert m["recipe"]["ms_weight"] == 1.0 and m["ms_ratio"] > 0
    run_interrupted_then_resumed(cfg(tmp_path / "b"), monkeypatch)
    a, b = (load_file(str(tmp_path / x / "model" / "model.safetensors")) for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_decay_schedule_by_hand():
    # 10 steps decaying from the middle: 1 for steps 0-4, then 5/5, 4/5, ... 1/5 at the last step (9)
    assert [linear_decay_scale(s, 10, 0.5) for s in range(10)] == [1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2]
    assert [linear_decay_scale(s, 4, 0.0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert all(linear_decay_scale(s, 10, 1.0) == 1.0 for s in range(10))  # 1 = constant rates
    # a start between steps (7.5): step 7 still runs at the full rate, step 8 at (10 - 8) / 2.5
    assert linear_decay_scale(7, 10, 0.75) == 1.0 and linear_decay_scale(8, 10, 0.75) == pytest.approx(0.8)


def test_lr_decay_reaches_both_optimizers_and_resumes_exactly(world, tmp_path, monkeypatch):
    def cfg(out, decay_from=0.5):
        return gan_cfg(world, out, "lada", gan={"lr_g": 1e-3, "lr_d": 2e-3, "model": {"lr_decay_from": decay_from}})

    train_transformer.run(cfg(tmp_path / "a"))
    state = ckpt.read(tmp_path / "a" / "ckpt" / "last.pt")
    # the last step (5) of 6 decaying from step 3 runs at (6 - 5) / (6 - 3) of each rate
    assert state["opt_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 3)
    assert state["opt_d"]["param_groups"][0]["lr"] == pytest.approx(2e-3 / 3)
    m = json.loads((tmp_path / "a" / "model" / "metrics.json").read_text())
    assert m["recipe"]["lr_decay_from"] == 0.5
    run_interrupted_then_resumed(cfg(tmp_path / "b"), monkeypatch)  # the crash is at step 3, where the decay starts
    a = assert_runs_equal(tmp_path / "a", tmp_path / "b")
    train_transformer.run(cfg(tmp_path / "c", decay_from=1.0))  # constant rates end elsewhere
    c = load_file(str(tmp_path / "c" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_lr_decay_from_out_of_range_is_one_line_error(world, tmp_path):
    with pytest.raises(UserError) as exc:
        train_transformer.check({"train_transformer": {"kind": "gan", "gan": {"model": {"lr_decay_from": 1.5}}}},
                                "params.yaml")
    assert "lr_decay_from must be in [0, 1]" in one_line(exc) and "params.yaml" in str(exc.value)
