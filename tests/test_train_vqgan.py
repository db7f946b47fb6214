"""train_vqgan: exact resume, NaN guard, and a tiny end-to-end run through dvc repro."""
import dataclasses
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_VQGAN_MODEL as TINY_MODEL
from helpers import crash_after_first_checkpoint, make_idx_dataset, make_project, resumed_step, tiny_vqgan_params
from models.vqgan import VQGANConfig
from pipeline import checkpoint as ckpt
from pipeline.errors import NonFiniteLoss, UserError, main_guard
from stages import train_vqgan
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
from stages.prepare import run as prepare_run
from stages.train_vqgan import LossParams, TrainVQGANParams


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("vq"))


def prepare_tiny(base):
    """The prepared 16x16 dataset `tiny` (24 train, 8 val images) that tiny_cfg trains on, under base/prepared."""
    src = make_idx_dataset(base / "idx", n_train=24, n_val=8)
    prepare_run(PrepareConfig("tiny", DatasetSpec(source="idx", path=str(src), resolution=16),
                              PrepareParams(out_dir=str(base / "prepared"))))
    return base / "prepared"


def tiny_cfg(prepared, out, **kw) -> TrainVQGANParams:
    cfg = TrainVQGANParams(
        dataset="tiny", prepared_dir=str(prepared), out_dir=str(out / "vqgan"), ckpt_dir=str(out / "ckpt"),
        metrics=str(out / "metrics.json"), plots=str(out / "log.tsv"), steps=6, batch_size=8, ckpt_every=3,
        log_every=2, kmeans_images=16, device="cpu",
        model=VQGANConfig(**{**TINY_MODEL, "ch_mult": (1, 2)}),
        loss=LossParams(lpips_weight=0.0, disc_start=2, disc_channels=8, disc_layers=1, disc_weight=0.5))
    return dataclasses.replace(cfg, **kw)


def weights(out):
    return load_file(str(out / "vqgan" / "model.safetensors"))


def test_interrupted_and_resumed_run_equals_uninterrupted(prepared, tmp_path, monkeypatch):
    train_vqgan.run(tiny_cfg(prepared, tmp_path / "a"))
    reference = weights(tmp_path / "a")

    crash_after_first_checkpoint(lambda: train_vqgan.run(tiny_cfg(prepared, tmp_path / "b")), monkeypatch)
    assert [p.name for p in ckpt.step_files(tmp_path / "b" / "ckpt")] == ["step-00000003.pt"]
    assert not (tmp_path / "b" / "vqgan").exists()  # no final output from a broken run
    assert resumed_step(lambda: train_vqgan.run(tiny_cfg(prepared, tmp_path / "b")), monkeypatch) == 3  # GAN on at 2
    resumed = weights(tmp_path / "b")
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    history = json.loads((tmp_path / "b" / "vqgan" / "metrics.json").read_text())
    assert history["steps"] == 6


def test_the_stage_log_names_what_this_machine_runs(prepared, tmp_path, caplog):
    """The doctor's one-line summary (torch build, CUDA, attention backend, faiss, threads) is in the stage's log."""
    from pipeline import doctor
    caplog.set_level("INFO")
    train_vqgan.run(tiny_cfg(prepared, tmp_path, steps=2, ckpt_every=2))
    assert doctor.summary(torch.device("cpu")) in caplog.messages


def test_checkpoint_for_other_settings_is_not_resumed(prepared, tmp_path, caplog):
    train_vqgan.run(tiny_cfg(prepared, tmp_path, steps=3))
    first = weights(tmp_path)
    train_vqgan.run(tiny_cfg(prepared, tmp_path, steps=3, seed=1))
    assert "made by a run with other params or input data" in caplog.text
    assert any(not torch.equal(first[k], v) for k, v in weights(tmp_path).items())


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    from models.vqgan import VQGAN
    real_forward = VQGAN.forward
    calls = {"n": 0}

    def poisoned(self, x):
        recon, aux = real_forward(self, x)
        calls["n"] += 1
        if self.training and calls["n"] == 5:  # the 5th training forward is step index 4
            recon = recon * float("nan")
        return recon, aux

    monkeypatch.setattr(VQGAN, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 4"):
        train_vqgan.run(tiny_cfg(prepared, tmp_path))
    assert [p.name for p in ckpt.step_files(tmp_path / "ckpt")] == ["step-00000003.pt"]
    state = ckpt.read(tmp_path / "ckpt" / "last.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_corrupt_last_checkpoint_falls_back_with_warning(prepared, tmp_path, caplog):
    train_vqgan.run(tiny_cfg(prepared, tmp_path, ckpt_keep=2))
    files = ckpt.step_files(tmp_path / "ckpt")
    assert [p.name for p in files] == ["step-00000006.pt", "step-00000003.pt"]
    (tmp_path / "ckpt" / "last.pt").unlink()
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    state = ckpt.load_latest(tmp_path / "ckpt")
    assert state["step"] == 3
    assert f"checkpoint {files[0]} is unreadable" in caplog.text


def test_outputs_metrics_and_plots(prepared, tmp_path):
    train_vqgan.run(tiny_cfg(prepared, tmp_path))
    m = json.loads((tmp_path / "vqgan" / "metrics.json").read_text())  # the full record, in the out folder
    # the metrics file holds flat columns for `dvc metrics show`
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "psnr": m["val_psnr"], "lpips": m.get("val_lpips"), "perplexity": m["perplexity"],
        "usage_pct": m["code_usage_pct"]}
    for key in ("val_l1", "val_psnr", "code_usage_pct", "perplexity", "dead_codes", "fingerprint"):
        assert key in m
    assert 0 <= m["code_usage_pct"] <= 100 and m["grid"] == [8, 8]
    cfgjson = json.loads((tmp_path / "vqgan" / "config.json").read_text())
    assert cfgjson["fingerprint"] == m["fingerprint"] and cfgjson["model"]["in_channels"] == 1
    lines = (tmp_path / "log.tsv").read_text().splitlines()
    assert lines[0].startswith("step\trec") and len(lines) == 1 + 3
    for png in ("recon_grid.png", "curves.png"):
        assert (tmp_path / "vqgan" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_repro_trains_then_is_a_no_op(tmp_path):
    params = tiny_vqgan_params(make_idx_dataset(tmp_path / "idx", n_train=24, n_val=8))
    project = make_project(tmp_path / "p", params, stages=("prepare", "train_vqgan"))
    run = lambda *a: subprocess.run(["dvc", *a], cwd=project, capture_output=True, text=True)  # noqa: E731
    out = run("repro")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Running stage 'train_vqgan'" in out.stdout
    assert (project / "data/vqgan/model.safetensors").exists()
    out = run("repro")
    assert "Running stage" not in out.stdout and out.returncode == 0
    shown = run("metrics", "show", "--json")
    assert '"psnr"' in shown.stdout


def test_dataset_too_small_for_batch_or_codebook_is_one_line_before_training(prepared, tmp_path):
    with pytest.raises(UserError, match=r"train_vqgan.batch_size = 500 is larger than the train split of tiny "
                                        r"\(images\) \(\d+\)") as err:
        train_vqgan.run(tiny_cfg(prepared, tmp_path, batch_size=500))
    assert "\n" not in str(err.value)
    # 2 images x 8x8 tokens = 128 encoder vectors for 512 codes: k-means cannot start
    cfg = tiny_cfg(prepared, tmp_path, kmeans_images=2)
    cfg.model.n_codes = 512
    with pytest.raises(UserError, match=r"kmeans_init needs at least model.n_codes = 512 encoder vectors; 2 images "
                                        r"give 128"):
        train_vqgan.run(cfg)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "vqgan").exists()


def test_params_errors_are_one_line(prepared):
    with pytest.raises(Exception, match=r"train_vqgan.model.ch_mult = \[1\] is not allowed"):
        train_vqgan.check({"train_vqgan": {"model": {"ch_mult": [1]}}}, "params.yaml")
    with pytest.raises(Exception, match=r"train_vqgan.batch_size = 10 is not divisible by grad_accum = 4"):
        train_vqgan.check({"train_vqgan": {"batch_size": 10, "grad_accum": 4}}, "params.yaml")


def test_a_model_larger_than_any_address_space_is_one_line_and_leaves_nothing(prepared, tmp_path, capsys):
    """A typo'd size (extra zeros) fails to allocate: `error: out of memory ...` and exit 2, not a traceback.
    2**40-wide codes need 2**49 bytes and more, beyond x86-64's 2**47-byte user space on any machine."""
    with pytest.raises(Exception, match=r"train_vqgan.model.n_codes = 2147483649 is out of range \(allowed: <= "
                                        r"2\*\*31, token indices are stored as int32\)"):
        train_vqgan.check({"train_vqgan": {"model": {"n_codes": 2**31 + 1}}}, "params.yaml")
    cfg = tiny_cfg(prepared, tmp_path)
    cfg.model.code_dim = 2**40
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: train_vqgan.run(cfg))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err, err
    assert err.startswith("error: out of memory: could not allocate ") and "TiB" in err and err.endswith(
        "(lower the model sizes, batch_size or the images held in memory in params.yaml)")
    assert not (tmp_path / "vqgan").exists()


def test_a_dataset_without_val_images_is_one_line_before_training(tmp_path):
    """The final metrics are means over the val split: with none the stage used to train every step, then divide
    by zero. Now it stops before the first step and leaves nothing."""
    src = make_idx_dataset(tmp_path / "idx", n_train=24, n_val=8)
    spec = DatasetSpec(source="idx", path=str(src), resolution=16, split="random", val_fraction=0.0)
    prepare_run(PrepareConfig("noval", spec, PrepareParams(out_dir=str(tmp_path / "prepared"))))
    cfg = dataclasses.replace(tiny_cfg(tmp_path / "prepared", tmp_path), dataset="noval")
    with pytest.raises(UserError) as err:
        train_vqgan.run(cfg)
    assert str(err.value) == (f"{tmp_path / 'prepared' / 'noval'}: split 'val' has no images; the VQGAN's final "
                              f"metrics need some: give dataset noval images for val (split: random: raise "
                              f"datasets.noval.val_fraction or add images; split: keep: add a val/ folder)")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "vqgan").exists()
