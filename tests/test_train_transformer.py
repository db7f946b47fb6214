"""train_transformer (kind ar) and the sample stage on a tiny token store."""
import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import crash_after_first_checkpoint, transformer_cfg
from models.gpt import GPT, GPTConfig
from pipeline.sandbox import IDX_STEMS, read_idx, write_idx
from pipeline.tokens import TokenData, read_meta
from pipeline.errors import UserError
from pipeline.shards import iter_tar_samples
from pipeline.images import decode_png
from stages import sample as sample_stage
from stages import train_transformer as tt
from pipeline.runlog import read_run_facts
from training.ar import LOG_KEYS, finish, peak_bf16_tflops, unigram_bits


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world["base"]


def ar_cfg(base, out, **kw) -> tt.TrainTransformerParams:
    return transformer_cfg(base, out, **kw)


@pytest.mark.parametrize("kind", ["ar", "maskgit"])
@pytest.mark.parametrize("ema", [None, 0.5])
def test_interrupted_and_resumed_equals_uninterrupted(world, tmp_path, monkeypatch, caplog, ema, kind):
    tt.run(ar_cfg(world, tmp_path / "a", ema=ema, kind=kind))
    reference = load_file(str(tmp_path / "a" / "gpt" / "model.safetensors"))
    crash_after_first_checkpoint(lambda: tt.run(ar_cfg(world, tmp_path / "b", ema=ema, kind=kind)), monkeypatch)
    caplog.set_level(logging.INFO)
    tt.run(ar_cfg(world, tmp_path / "b", ema=ema, kind=kind))
    # it resumed: a run that retrained from step 0 would end with the same bytes (every draw is seeded)
    assert f"resuming from {tmp_path / 'b' / 'ckpt'} at step 3" in caplog.messages
    resumed = load_file(str(tmp_path / "b" / "gpt" / "model.safetensors"))
    # label dropout (ar: the global RNG) and maskgit's masks (its generator) came from the restored states
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    # the checkpoint at step 3 falls inside the log row of steps 3-4: its partial sum is restored, so the
    # resumed log is the uninterrupted one line for line (it held step 4's loss alone before the window was saved)
    log_a = (tmp_path / "a" / "log.tsv").read_text()
    assert [line.split("\t")[0] for line in log_a.splitlines()[1:]] == ["2", "3", "4", "6"]
    assert (tmp_path / "b" / "log.tsv").read_text() == log_a


@pytest.fixture(scope="module")
def inverted_tokens(tiny_world, tmp_path_factory) -> Path:
    """The tokens folder of `a` re-made from its images inverted: same VQGAN, same counts, other tokens."""
    from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
    from stages.prepare import run as prepare
    from stages.tokenize import TokenizeConfig, TokenizeParams
    from stages.tokenize import run as tokenize
    base, src = tmp_path_factory.mktemp("inverted"), tiny_world["base"] / "idx"
    (base / "idx").mkdir()
    for stem in IDX_STEMS:
        write_idx(base / "idx" / f"{stem}-images-idx3-ubyte.gz", 255 - read_idx(src / f"{stem}-images-idx3-ubyte.gz"))
        shutil.copy2(src / f"{stem}-labels-idx1-ubyte.gz", base / "idx")
    prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(base / "idx"), resolution=16, channels=1,
                                           class_names=[str(i) for i in range(10)]),
                          PrepareParams(out_dir=str(base / "prepared"), shard_size=25)))
    tokenize(TokenizeConfig("a", base / "prepared" / "a", tiny_world["vqgan"], base / "tokens" / "a",
                            base / "tok_metrics.json", None,
                            TokenizeParams(batch_size=16, shard_size=10, num_workers=0, roundtrip_images=8)))
    old, new = read_meta(tiny_world["tokens"]), read_meta(base / "tokens" / "a")
    assert (old["fingerprint"], old["count"]) == (new["fingerprint"], new["count"])  # what the identity used to be
    return base / "tokens"


@pytest.mark.parametrize("kind", ["ar", "maskgit", "gan"])
def test_the_plots_file_is_never_newer_than_the_run_log(tiny_world, tmp_path, monkeypatch, kind):
    """The out guard reads a plots file no newer than its stage's `.run.json` as that run's (a kill before DVC
    records the results leaves both unrecorded, and the next run must not refuse them). So at every rename of the
    run, a plots file in place has a run log beside it at least as new. A pause after the run log's rename makes a
    file written after it strictly newer (file times tick in milliseconds). Before: the plots file came after the
    run log, then (a first fix) before it with other writes between: each left a moment a kill made the next run
    refuse the file (scripts/kill_resume.py found both)."""
    from helpers import check_never_newer_than_run_log
    from pipeline.runlog import run_log_path
    from test_train_gan import gan_cfg
    cfg = gan_cfg(tiny_world, tmp_path, "lada") if kind == "gan" else ar_cfg(tiny_world["base"], tmp_path, kind=kind)
    run_log = run_log_path(cfg.metrics)
    renamed = check_never_newer_than_run_log(monkeypatch, Path(cfg.plots), run_log)
    tt.run(cfg)
    assert {cfg.plots, cfg.metrics, str(run_log), cfg.out_dir} <= set(renamed)


@pytest.mark.parametrize("kind", ["ar", "maskgit", "gan"])
def test_a_checkpoint_of_other_tokens_under_the_same_vqgan_and_count_is_not_resumed(tiny_world, inverted_tokens,
                                                                                      tmp_path, monkeypatch, caplog,
                                                                                      kind):
    """The tester's repro in small: interrupted on one token store, re-run on a store re-made from other images
    (same VQGAN, same count): the run starts fresh and ends as a run made on the new tokens alone."""
    from test_train_gan import gan_cfg

    def cfg(out: Path, tokens: Path) -> tt.TrainTransformerParams:
        if kind == "gan":
            return gan_cfg(tiny_world, out, tokens_dir=str(tokens))
        return ar_cfg(tiny_world["base"], out, kind=kind, tokens_dir=str(tokens))

    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_world["base"] / "tokens", tokens)
    crash_after_first_checkpoint(lambda: tt.run(cfg(tmp_path / "b", tokens)), monkeypatch)
    shutil.rmtree(tokens)
    shutil.copytree(inverted_tokens, tokens)
    caplog.set_level(logging.INFO)
    tt.run(cfg(tmp_path / "b", tokens))
    assert "resuming" not in caplog.text
    assert "made by a run with other params or input data" in caplog.text
    tt.run(cfg(tmp_path / "a", inverted_tokens))
    ref, got = (load_file(str(Path(cfg(tmp_path / run, tokens).out_dir) / "model.safetensors")) for run in "ab")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_metrics_and_outputs(world, tmp_path):
    tt.run(ar_cfg(world, tmp_path))
    m = json.loads((tmp_path / "gpt" / "metrics.json").read_text())  # the full record, in the out folder
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"bits_per_token": m["val_bits_per_token"]}
    run = read_run_facts(tmp_path / "metrics.json")  # host facts live beside the hashed metrics
    assert m["kind"] == "ar" and run["attention_backend"] == "sdpa" and "attention_backend" not in m
    assert m["val_bits_per_token"] > 0 and 0 < m["unigram_bits_per_token"] <= 4.0  # 16 codes: <= 4 bits
    assert run["mfu"] is None  # no peak figure for a CPU
    cfg = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert cfg["model"]["n_classes"] == 10 and cfg["model"]["vocab_size"] == 16
    # the record is the run's own log: its last row, its last and first evaluations, the store's unigram entropy
    rows = [dict(zip(LOG_KEYS, line.split("\t"))) for line in (tmp_path / "log.tsv").read_text().splitlines()[1:]]
    assert (tmp_path / "log.tsv").read_text().splitlines()[0].split("\t") == LOG_KEYS
    evals = [r for r in rows if r["val_loss"]]
    assert [r["step"] for r in rows] == ["2", "3", "4", "6"] and [r["step"] for r in evals] == ["3", "6"]
    assert f"{m['train_loss']:.6g}" == rows[-1]["train_loss"] and f"{m['val_loss']:.6g}" == evals[-1]["val_loss"]
    assert f"{m['val_bits_per_token_first_eval']:.6g}" == evals[0]["val_bits_per_token"]
    assert m["val_bits_per_token"] == pytest.approx(m["val_loss"] / math.log(2), rel=1e-12)
    store = TokenData.load(world / "tokens" / "a", "train", False, cfg["fingerprint"], "test")
    assert m["unigram_bits_per_token"] == pytest.approx(unigram_bits(store.tokens, 16), rel=1e-12)
    model = GPT(GPTConfig(**{**cfg["model"], "grid": tuple(cfg["model"]["grid"])}))
    assert m["params_m"] == round(model.num_params() / 1e6, 3) and m["steps"] == 6
    assert m["fingerprint"] == cfg["fingerprint"] == read_meta(world / "tokens" / "a")["fingerprint"]
    assert {k: cfg[k] for k in ("kind", "dataset", "steps", "class_names")} == {
        "kind": "ar", "dataset": "a", "steps": 6, "class_names": [str(i) for i in range(10)]}
    assert run["device"] == "cpu" and run["achieved_tflops"] == pytest.approx(
        model.flops_per_token() * run["tokens_per_s"] / 1e12, rel=1e-9)
    assert (tmp_path / "gpt" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "gpt" / ".tokenmill-stage").read_text().strip() == "train_transformer"


def test_mfu_uses_the_dense_bf16_peak_of_the_board_torch_names():
    """PCIe and NVL boards share the SXM part's name and have lower peaks: matched first, not as an H100 or H200."""
    names = {"NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
             "NVIDIA H200": 989.5, "NVIDIA H200 NVL": 835.5, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA GeForce RTX 4090": None, "cpu": None}
    assert {name: peak_bf16_tflops(name) for name in names} == names


@pytest.mark.parametrize("kind", ["ar", "maskgit"])
def test_finish_reports_throughput_only_where_it_was_timed(world, tmp_path, monkeypatch, caplog, kind):
    """On a GPU with a known peak the run facts give achieved TFLOP/s and MFU (GPT only: flops_per_token); a resume
    that found every step done timed nothing (tokens_per_s None) and reports no throughput, not 0 TFLOP/s. The last
    log line names what maskgit's val loss is per."""
    from models.maskgit import MaskGIT, MaskGITConfig
    Model, Config = (MaskGIT, MaskGITConfig) if kind == "maskgit" else (GPT, GPTConfig)
    gcfg = Config(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16)
    model = Model(gcfg)
    history = [{"step": 2, "train_loss": 2.5, "lr": 1e-3, "tokens_per_s": None, "val_loss": 2.0,
                "val_bits_per_token": 2.0 / math.log(2), "val_masked_accuracy": 0.25}]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    for timed, run_dir in ((5e6, "timed"), (None, "resumed")):
        cfg = ar_cfg(world, tmp_path / run_dir, kind=kind)
        with caplog.at_level(logging.INFO, logger="tokenmill.train_transformer"):
            finish(cfg, model, gcfg, history, {}, "f", 3.5, "sdpa", tokens_per_s=timed,
                   device=torch.device("cuda"), class_names=[])
        run = read_run_facts(Path(cfg.metrics))
        assert run["device"] == "NVIDIA H100 PCIe" and run["tokens_per_s"] == timed
        if timed and kind == "ar":
            assert run["achieved_tflops"] == pytest.approx(model.flops_per_token() * 5e6 / 1e12, rel=1e-12)
            assert run["mfu"] == pytest.approx(run["achieved_tflops"] / 756.5, rel=1e-12)
        else:
            assert run["achieved_tflops"] is None and run["mfu"] is None
    what = "bits per masked token" if kind == "maskgit" else "bits/token"
    assert caplog.messages[-1] == f"val {2.0 / math.log(2):.3f} {what} (unigram entropy 3.500); 0 tokens/s"
    assert caplog.messages[-2].endswith("; 5000000 tokens/s")


@pytest.mark.parametrize("kind", ["ar", "gan"])
def test_the_stage_log_names_what_this_machine_runs(tiny_world, tmp_path, caplog, kind):
    """The doctor's one-line summary (torch build, CUDA, attention backend, faiss, threads) is in the stage's log."""
    from pipeline import doctor
    from test_train_gan import gan_cfg
    caplog.set_level(logging.INFO)
    tt.run(gan_cfg(tiny_world, tmp_path, "lada") if kind == "gan" else ar_cfg(tiny_world["base"], tmp_path))
    assert doctor.summary(torch.device("cpu")) in caplog.messages


def test_unigram_entropy_by_hand():
    # codes 0, 0, 1, 3 of 4: probabilities 1/2, 1/4, 0, 1/4 -> 1.5 bits; unused codes add nothing
    assert unigram_bits(torch.tensor([[0, 0], [1, 3]]), 4) == pytest.approx(1.5, rel=1e-12)
    assert unigram_bits(torch.tensor([2, 2, 2]), 4) == 0.0


def test_batch_larger_than_the_store_is_one_line_before_training(world, tmp_path):
    with pytest.raises(UserError, match=r"train_transformer.batch_size = 5000 is larger than the train split"):
        tt.run(ar_cfg(world, tmp_path, batch_size=5000))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("kind", ["ar", "maskgit"])
def test_a_store_without_val_tokens_is_one_line_before_training(tiny_world, tmp_path, kind):
    """bits/token is the val loss: over no val tokens it was recorded as 0.0 (a perfect model, in `compare`)."""
    from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
    from stages.prepare import run as prepare
    from stages.tokenize import TokenizeConfig, TokenizeParams
    from stages.tokenize import run as tokenize
    prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(tiny_world["base"] / "idx"), resolution=16,
                                           channels=1, split="random", val_fraction=0.0),
                          PrepareParams(out_dir=str(tmp_path / "prepared"))))
    tokenize(TokenizeConfig("a", tmp_path / "prepared" / "a", tiny_world["vqgan"], tmp_path / "tokens" / "a",
                            tmp_path / "tok_metrics.json", None,
                            TokenizeParams(batch_size=16, shard_size=10, num_workers=0, roundtrip_images=8)))
    cfg = ar_cfg(tiny_world["base"], tmp_path / "run", kind=kind, tokens_dir=str(tmp_path / "tokens"),
                 prepared_dir=str(tmp_path / "prepared"))
    with pytest.raises(UserError) as err:
        tt.run(cfg)
    assert str(err.value) == (f"{tmp_path / 'tokens' / 'a'}: split 'val' holds no tokens; the val loss needs some: "
                              f"give dataset a images for val (split: random: raise datasets.a.val_fraction or add "
                              f"images; split: keep: add a val/ folder)")
    assert not (tmp_path / "run").exists()


def test_foreign_codebook_is_refused_by_training(world, tmp_path):
    store, vqgan = world / "tokens" / "a" / "tokens.lmdb", world / "other_vqgan" / "config.json"
    with pytest.raises(UserError, match=rf"^codebook mismatch: tokens in {re.escape(str(store))} have fingerprint "
                                        rf"\w+, the VQGAN in {re.escape(str(vqgan))} has \w+; re-tokenize"):
        tt.run(ar_cfg(world, tmp_path, vqgan_dir=str(world / "other_vqgan")))


def test_a_missing_vqgan_is_one_line_naming_its_config(world, tmp_path):
    config = tmp_path / "no_vqgan" / "config.json"
    with pytest.raises(UserError, match=rf"^{re.escape(str(config))}: not found \(train the VQGAN first\)$"):
        tt.run(ar_cfg(world, tmp_path, vqgan_dir=str(config.parent)))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("split,field", [("train", "tokens"), ("train", "labels"), ("val", "tokens"),
                                         ("val", "labels")])
def test_a_checkpoint_is_not_resumed_when_any_split_holds_other_tokens_or_labels(world, tmp_path, monkeypatch, caplog,
                                                                                 split, field):
    """The run identity hashes all four tensors as loaded: one label of one split changed is another run."""
    crash_after_first_checkpoint(lambda: tt.run(ar_cfg(world, tmp_path)), monkeypatch)
    real_load = TokenData.load.__func__

    def load_one_changed(cls, store, which, *args):
        data = real_load(cls, store, which, *args)
        if which == split:
            t = getattr(data, field).clone()
            t[0] = (t[0] + 1) % (10 if field == "labels" else 16)
            data = dataclasses.replace(data, **{field: t})
        return data

    monkeypatch.setattr(TokenData, "load", classmethod(load_one_changed))
    caplog.set_level(logging.INFO)
    tt.run(ar_cfg(world, tmp_path))
    assert "made by a run with other params or input data" in caplog.text and "resuming" not in caplog.text


def test_maskgit_masks_come_from_their_own_seeded_generator(world, tmp_path, monkeypatch):
    """Training masks (and label dropout) draw from a generator seeded seed * 1_000_003 + rank, the val masks from
    VAL_MASK_SEED, so neither shares the global RNG that dropout and the batch order use."""
    import training.ar as ar
    seeds = []

    def recording(batch, n_tokens, *, generator=None, device=None):
        seeds.append(None if generator is None else generator.initial_seed())
        return real(batch, n_tokens, generator=generator, device=device)

    real = ar.random_mask
    monkeypatch.setattr(ar, "random_mask", recording)
    tt.run(ar_cfg(world, tmp_path, kind="maskgit", seed=7))
    assert set(seeds) == {7 * 1_000_003, ar.VAL_MASK_SEED} and seeds[0] == 7 * 1_000_003


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    tt.run(ar_cfg(world, out))
    return out / "gpt"


def sample_cfg(world, model_dir, out, **kw):
    return sample_stage.SampleParams(model_dir=str(model_dir), vqgan_dir=str(world / "vqgan"),
                                     out_dir=str(out / "samples"), metrics=str(out / "sample.json"), n=13,
                                     batch_size=5, shard_size=6, cfg_scale=2.0, device="cpu", **kw)


def test_sample_writes_the_samples_contract(world, trained, tmp_path):
    sample_stage.run(sample_cfg(world, trained, tmp_path))
    out = tmp_path / "samples"
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 13 and m["grid"] == [4, 4] and m["token_dtype"] == "uint16" and m["conditional"]
    assert m["shards"] == ["samples-000000.tar", "samples-000001.tar", "samples-000002.tar"]
    seen, images = [], {}
    for shard in m["shards"]:
        for key, files, problems in iter_tar_samples(out / shard):
            assert not problems
            tok = np.frombuffer(files["tok"], "<u2")
            assert tok.shape == (16,) and tok.max() < 16
            images[key] = decode_png(files["png"])
            assert images[key].shape == (16, 16, 1)
            seen.append((key, int(files["cls"])))
    assert [k for k, _ in seen] == [f"s{i:07d}" for i in range(13)]
    assert [c for _, c in seen] == [i % 10 for i in range(13)]  # classes in equal shares
    # grid.png: one row per class (0..9), as many cells as the fullest row (classes 0-2 have 2), 18 px cells
    # (16 + 2 grey), drawn 2x; row 3's first cell is sample 3
    from PIL import Image
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * (2 + 10 * 18), 2 * (2 + 2 * 18))
    y = 2 * (2 + 3 * 18)
    assert np.array_equal(grid[y:y + 32:2, 4:36:2], images["s0000003"][:, :, 0])
    assert json.loads((tmp_path / "sample.json").read_text())["images"] == 13


def test_sampling_is_reproducible_and_seeded(world, trained, tmp_path):
    sample_stage.run(sample_cfg(world, trained, tmp_path / "a"))
    sample_stage.run(sample_cfg(world, trained, tmp_path / "b"))
    sample_stage.run(sample_cfg(world, trained, tmp_path / "c", seed=1))
    read = lambda d: (d / "samples" / "samples-000000.tar").read_bytes()  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b")
    assert read(tmp_path / "a") != read(tmp_path / "c")


def test_sampled_tokens_and_images_are_the_models_generate_with_the_documented_seeds(world, trained, tmp_path):
    """Batch b of `sample` is `generate` with a generator seeded seed * 1_000_003 + b, the batch's labels (classes
    cycling 0..K-1 over the whole run) and every sampler setting; its images are the VQGAN's decoding of those
    tokens. Pins what a regenerated batch must match, which a reproducibility check alone would not."""
    from pipeline.vqgan_io import load_vqgan, to_uint8
    settings = dict(temperature=0.8, top_k=9, top_p=0.9, seed=3)
    sample_stage.run(sample_cfg(world, trained, tmp_path, **settings))
    rows = {}
    for shard in json.loads((tmp_path / "samples" / "manifest.json").read_text())["shards"]:
        for key, files, _ in iter_tar_samples(tmp_path / "samples" / shard):
            rows[int(key[1:])] = (np.frombuffer(files["tok"], "<u2"), int(files["cls"]), decode_png(files["png"]))
    cpu = torch.device("cpu")
    model, _ = sample_stage.load_stage2(trained, cpu)
    vqgan, _ = load_vqgan(str(world / "vqgan"), cpu)
    for b, start in enumerate(range(0, 13, 5)):  # n=13, batch_size=5: batches of 5, 5, 3
        n = min(5, 13 - start)
        y = (torch.arange(start, start + n) % 10)
        g = torch.Generator().manual_seed(3 * 1_000_003 + b)
        with torch.no_grad():
            tokens = model.generate(n, y, temperature=0.8, top_k=9, top_p=0.9, cfg_scale=2.0, generator=g)
            images = to_uint8(vqgan.decode_indices(tokens.view(n, 4, 4)).float())
        for i in range(n):
            tok, cls, png = rows[start + i]
            assert cls == int(y[i]) and np.array_equal(tok, tokens[i].numpy())
            assert np.array_equal(png, images[i].permute(1, 2, 0).numpy())


def test_a_stage2_folder_without_its_files_or_of_an_unknown_kind_is_one_line(trained, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((trained / "config.json").read_text())
    with pytest.raises(UserError) as err:
        sample_stage.load_stage2(folder, torch.device("cpu"))
    assert str(err.value) == f"{folder / 'model.safetensors'}: not found (run train_transformer first)"
    shutil.copy(trained / "model.safetensors", folder)
    (folder / "config.json").write_text(json.dumps({**json.loads((trained / "config.json").read_text()),
                                                    "kind": "diffusion"}))
    with pytest.raises(UserError) as err:
        sample_stage.load_stage2(folder, torch.device("cpu"))
    assert str(err.value) == (f"{folder / 'config.json'}: kind 'diffusion' cannot be sampled (allowed: 'ar', "
                              f"'maskgit', 'gan')")


def test_sample_refuses_a_foreign_codebook(world, trained, tmp_path):
    cfg = dataclasses.replace(sample_cfg(world, trained, tmp_path), vqgan_dir=str(world / "other_vqgan"))
    with pytest.raises(UserError) as err:
        sample_stage.run(cfg)
    # both folders named, the model's as what holds the fingerprint of the tokens it was trained on
    assert re.match(rf"codebook mismatch: tokens in {re.escape(str(trained))} \(the tokens it was trained on\) have "
                    rf"fingerprint [0-9a-f]{{16}}, the VQGAN in {re.escape(str(world / 'other_vqgan'))} has",
                    str(err.value)), str(err.value)
    assert not (tmp_path / "samples").exists()


def test_sample_replaces_its_own_output_and_drops_a_killed_runs_leftovers(world, trained, tmp_path):
    """A second run into the same folder replaces the first (its marker says sample); shards a killed run left in
    the work folder (`.samples.partial`) are not carried into the new output."""
    cfg = sample_cfg(world, trained, tmp_path)
    sample_stage.run(cfg)
    first = sorted(p.name for p in (tmp_path / "samples").iterdir())
    leftover = tmp_path / ".samples.partial" / "samples-000009.tar"
    leftover.parent.mkdir()
    leftover.write_bytes(b"a killed run's shard")
    sample_stage.run(cfg)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == first
    assert not (tmp_path / ".samples.partial").exists()


def test_weight_decay_groups_are_every_matrix_but_the_class_prefix():
    from models.gpt import GPT, GPTConfig
    from models.maskgit import MaskGIT, MaskGITConfig
    from training.ar import param_groups
    for model in (GPT(GPTConfig(vocab_size=16, grid=(2, 2), n_layer=1, n_head=1, n_embd=8, n_classes=3, pos="learned")),
                  MaskGIT(MaskGITConfig(vocab_size=16, grid=(2, 2), n_layer=1, n_head=1, n_embd=8, n_classes=3))):
        names = {id(p): n for n, p in model.named_parameters()}
        decayed, free = ([names[id(p)] for p in g["params"]] for g in param_groups(model, 0.1))
        assert "wte.weight" in decayed and "head.weight" in decayed  # the token embedding is decayed, as in nanoGPT
        assert "prefix.weight" in free and all(n.endswith(("norm1.weight", "norm2.weight", "norm_f.weight"))
                                               or n == "prefix.weight" for n in free), free
        assert sorted(decayed + free) == sorted(names.values())
        if isinstance(model, GPT):
            assert "wpe.weight" in decayed


def test_gradient_accumulation_gives_the_full_batch_gradient(world, tmp_path, monkeypatch):
    """batch 8 as 2 micro-batches of 4: each micro-batch loss is divided by 2 before backward, so the summed
    gradient is the full batch's mean-loss gradient (Adam would hide a 2x scale; the clip threshold would not)."""
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        seen.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())
        return clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    ar = tt.ARParams(n_layer=1, n_head=2, n_embd=16, class_dropout=0.0)  # no label draws to differ by
    for accum in (1, 2):
        tt.run(ar_cfg(world, tmp_path / str(accum), steps=1, grad_accum=accum, ar=ar, ckpt_every=1, eval_every=1))
    assert len(seen) == 2 and seen[0].abs().max() > 0
    assert torch.allclose(seen[1], seen[0], rtol=1e-4, atol=1e-7)  # float32 sums in another order


def test_the_run_builds_the_model_optimiser_and_data_its_params_name(world, tmp_path, monkeypatch):
    """Every ar.* and optim.* setting reaches what it sets (config.json, AdamW's groups and betas), an
    unconditional model has no classes, the val split is never flipped, and with ema the EMA weights are exported."""
    from training import ar as ar_loop
    loads, opts = [], []
    real_load = ar_loop.TokenData.load

    def load(store, split, hflip, *a, **kw):
        loads.append((split, hflip))
        return real_load(store, split, hflip, *a, **kw)

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            opts.append(self)

    monkeypatch.setattr(ar_loop.TokenData, "load", staticmethod(load))
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    ar = tt.ARParams(n_layer=1, n_head=2, n_embd=16, dropout=0.1, conditional=False, class_dropout=0.3,
                     norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_head=True)
    optim = tt.OptimParams(lr=3e-3, warmup_steps=2, beta1=0.8, beta2=0.9, weight_decay=0.07)
    tt.run(ar_cfg(world, tmp_path, ar=ar, optim=optim, ema=0.5, ckpt_keep=6))
    assert loads == [("train", False), ("val", False)]
    model = json.loads((tmp_path / "gpt" / "config.json").read_text())["model"]
    assert {k: model[k] for k in ("n_layer", "n_head", "n_embd", "dropout", "n_classes", "class_dropout", "norm",
                                  "mlp", "pos", "bias", "tie_head")} == {
        "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.1, "n_classes": 0, "class_dropout": 0.3,
        "norm": "layernorm", "mlp": "gelu", "pos": "learned", "bias": True, "tie_head": True}
    (opt,) = opts
    assert [g["weight_decay"] for g in opt.param_groups] == [0.07, 0.0]
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    exported = load_file(str(tmp_path / "gpt" / "model.safetensors"))
    from pipeline import checkpoint as ckpt
    last = ckpt.read(tmp_path / "ckpt" / "step-00000006.pt")
    shadow = last["ema"]["shadow"]
    assert all(torch.equal(exported[k], shadow[k]) for k in exported)
    assert any(not torch.equal(exported[k], last["model"][k]) for k in exported)  # not the raw weights
    loaded, _ = sample_stage.load_stage2(tmp_path / "gpt", torch.device("cpu"))  # the tied head loads back tied
    assert loaded.head.weight is loaded.wte.weight and torch.equal(loaded.wte.weight, shadow["wte.weight"])
