"""Behaviour of the stage-1 loop (training/vqgan.py, stages/train_vqgan.py) and of the tokenize / prepare stages
(stages/tokenize.py, stages/prepare.py, pipeline/retokenize.py) that the rest of the suite let through. Each test was
written against a realistic one-line bug planted by hand in the fourth round of planting (the EMA export and its
resume, the logged loss means, gradient clipping, the resume identity, the streamed batches, the k-means sample, the
last checkpoint, the exported config, the params checks' boundaries; the token store's usage metrics, labels,
round-trip sample and resume identity, reserved keys; prepare's cap, fingerprint and forwarded options; the side
command's peek and options) that every existing test passed with; each fails with its bug and passes without it.
Planted changes found to be equivalent (no input tells them apart) are not pinned here.

Each test pins one behaviour on inputs where the wrong variant gives another answer, against an independent
computation written here (a naive loop over known stand-in values, a formula, a second run that must agree).
Logged values built from small integers are exact in float64 and compared with ==; weights of two runs that must
agree are compared bit for bit (the loop is deterministic on the CPU, as the resume test of test_train_vqgan.py
relies on); metrics computed in float64 from integer counts use rel 1e-12; a clipped float32 gradient norm may
exceed its bound by float32 rounding of the norm (~1e-7 relative), so it is held to rel 1e-5. CPU, tiny models,
1 to 4 steps.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from helpers import check_never_newer_than_run_log, crash_after_first_checkpoint, make_idx_dataset, write_idx
from models.vqgan import VQGAN, VQGANConfig
from pipeline import checkpoint as ckpt
from pipeline.errors import UserError
from pipeline.prepared import PreparedImages
from pipeline.tokens import FLAG_HFLIP, TokenLMDBDataset, decode_record, read_txn
from pipeline.vqgan_io import load_vqgan
from stages import train_vqgan
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams, read_idx
from stages.prepare import run as prepare
from stages.tokenize import TokenizeConfig, TokenizeParams
from stages.tokenize import run as tokenize_run
from stages.train_vqgan import LossParams, TrainVQGANParams
from training import vqgan as vqgan_loop
from training.common import StepBatches

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, n_codes=16, code_dim=4, dead_code_steps=0)


def _prepare(base: Path, seed: int = 2, n_val: int = 4) -> Path:
    src = make_idx_dataset(base / f"idx{seed}", n_train=16, n_val=n_val, seed=seed)
    prepare(PrepareConfig("tiny", DatasetSpec(source="idx", path=str(src), resolution=16),
                          PrepareParams(out_dir=str(base / "prepared"))))
    return base / "prepared"


@pytest.fixture(autouse=True)
def no_lpips(monkeypatch):
    """finish() reports LPIPS when it can load one; these tests do not read it (loading costs seconds a run)."""
    def unavailable(*args, **kwargs):
        raise OSError("LPIPS left out of these tests")
    monkeypatch.setattr(vqgan_loop, "LPIPS", unavailable)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("vq_planted"))


def vq_cfg(prepared: Path, out: Path, **kw) -> TrainVQGANParams:
    cfg = TrainVQGANParams(
        dataset="tiny", prepared_dir=str(prepared), out_dir=str(out / "vqgan"), ckpt_dir=str(out / "ckpt"),
        metrics=str(out / "m.json"), plots=str(out / "log.tsv"), steps=4, batch_size=8, ckpt_every=2, log_every=1,
        kmeans_images=16, device="cpu", val_images=4, model=VQGANConfig(**TINY),
        loss=LossParams(lpips_weight=0.0, disc_start=0, disc_channels=8, disc_layers=1, disc_weight=0.5))
    return dataclasses.replace(cfg, **kw)


def exported(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "vqgan" / "model.safetensors"))


# ---------------------------------------------------------------- training/vqgan.py


def test_logged_losses_are_means_over_micro_batches_and_over_each_log_window(prepared, tmp_path, monkeypatch):
    """History rows: each step's value is the mean over its grad_accum micro-batches, each row the mean over the
    log_every steps since the last row (not a running sum). Stand-in losses report known values k + 1 (call k)."""
    real_g, real_d = vqgan_loop.generator_loss, vqgan_loop.discriminator_loss
    g_calls, d_calls = [], []

    def gen(*args, **kwargs):
        loss, parts = real_g(*args, **kwargs)
        v = float(len(g_calls) + 1)
        g_calls.append(v)
        return loss, {**parts, "rec": torch.tensor(v), "g": torch.tensor(3 * v), "d_weight": torch.tensor(4 * v)}

    def disc(*args, **kwargs):
        d = real_d(*args, **kwargs)
        v = float(len(d_calls) + 1)
        d_calls.append(v)
        return d - d.detach() + 5 * v  # the real gradient, a known value

    history: list[dict] = []
    monkeypatch.setattr(vqgan_loop, "generator_loss", gen)
    monkeypatch.setattr(vqgan_loop, "discriminator_loss", disc)
    monkeypatch.setattr(vqgan_loop, "finish", lambda *args, **kwargs: history.extend(args[5]))  # (cfg, ..., history)
    train_vqgan.run(vq_cfg(prepared, tmp_path, steps=4, grad_accum=2, log_every=2, ckpt_every=4, kmeans_init=False))
    assert len(g_calls) == len(d_calls) == 4 * 2
    for row, first_step in zip(history, (0, 2), strict=True):
        calls = [2 * s + m + 1 for s in (first_step, first_step + 1) for m in (0, 1)]  # values of the 4 calls
        mean = sum(calls) / 4  # (mean over micro-batches), then mean over the window's 2 steps
        assert row["step"] == first_step + 2
        assert (row["rec"], row["g"], row["d_weight"], row["d"]) == (mean, 3 * mean, 4 * mean, 5 * mean)


def test_an_interrupted_run_with_ema_exports_and_logs_what_the_uninterrupted_one_does(prepared, tmp_path,
                                                                                      monkeypatch):
    """Resume restores the EMA shadow and the history: weights bit for bit, log.tsv line for line."""
    train_vqgan.run(vq_cfg(prepared, tmp_path / "a", ema=0.5))
    crash_after_first_checkpoint(lambda: train_vqgan.run(vq_cfg(prepared, tmp_path / "b", ema=0.5)), monkeypatch)
    train_vqgan.run(vq_cfg(prepared, tmp_path / "b", ema=0.5))
    a, b = exported(tmp_path / "a"), exported(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "a" / "log.tsv").read_text()
    assert len(log_a.splitlines()) == 1 + 4 and (tmp_path / "b" / "log.tsv").read_text() == log_a


def test_a_resume_between_two_log_rows_logs_what_the_uninterrupted_run_does(prepared, tmp_path, monkeypatch):
    """A checkpoint at step 3 with a log row every 2 steps: row 4 averages steps 3 and 4 and counts their codes
    either way (the partial row's sums and the code counts are in the checkpoint). Before the fix the resumed row
    held step 4 alone and reset counts (rec 0.475029 instead of 0.474367)."""
    kw = dict(ckpt_every=3, log_every=2)
    train_vqgan.run(vq_cfg(prepared, tmp_path / "a", **kw))
    crash_after_first_checkpoint(lambda: train_vqgan.run(vq_cfg(prepared, tmp_path / "b", **kw)), monkeypatch)
    assert ckpt.load_latest(str(tmp_path / "b" / "ckpt"), "cpu")["step"] == 3
    train_vqgan.run(vq_cfg(prepared, tmp_path / "b", **kw))
    log_a = (tmp_path / "a" / "log.tsv").read_text()
    assert [line.split("\t")[0] for line in log_a.splitlines()[1:]] == ["2", "4"]
    assert (tmp_path / "b" / "log.tsv").read_text() == log_a


def test_the_plots_file_of_train_vqgan_is_never_newer_than_its_run_log(prepared, tmp_path, monkeypatch):
    """What the out guard reads (see test_train_transformer.py's test of the same contract): at every rename, a
    plots file in place has its run log beside it, at least as new; a pause after the run log's rename makes a
    later write strictly newer."""
    plots = tmp_path / "log.tsv"
    check_never_newer_than_run_log(monkeypatch, plots, tmp_path / "m.run.json")
    train_vqgan.run(vq_cfg(prepared, tmp_path, steps=2))
    assert plots.is_file()


def test_ema_with_decay_1_exports_the_model_as_kmeans_left_it(prepared, tmp_path):
    """The shadow starts from the k-means-initialised model and decay 1 never moves it, so the export equals the
    model of a run that cannot learn (lr 0): not the random init from before k-means, not the trained weights."""
    frozen = dataclasses.replace(vq_cfg(prepared, tmp_path / "frozen", steps=2).optim, lr=0.0)
    train_vqgan.run(vq_cfg(prepared, tmp_path / "frozen", steps=2, optim=frozen))
    train_vqgan.run(vq_cfg(prepared, tmp_path / "ema", steps=2, ema=1.0))
    want, got = exported(tmp_path / "frozen"), exported(tmp_path / "ema")
    params = [name for name, _ in VQGAN(VQGANConfig(**TINY)).named_parameters()]
    assert "quantizer.codebook" in params
    for name in params:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("clip", [1e-3, None])
def test_grad_clip_bounds_the_generators_gradient_norm(prepared, tmp_path, clip):
    norms: list[float] = []

    def before_step(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad.norm() for p in params if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    cfg = vq_cfg(prepared, tmp_path, steps=2, kmeans_init=False, loss=LossParams(lpips_weight=0.0, disc_weight=0.0))
    handle = register_optimizer_step_pre_hook(before_step)  # with disc_weight 0 only the generator's steps
    try:
        train_vqgan.run(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_clip=clip)))
    finally:
        handle.remove()
    assert len(norms) == 2
    if clip is None:  # the unclipped norms are far above the bound: the clipped case below is not vacuous
        assert min(norms) > 1e-2
    else:  # clip_grad_norm_ scales by clip / (norm + 1e-6): the norm ends a hair below the bound
        assert max(norms) <= clip * (1 + 1e-5)


def test_a_checkpoint_of_other_input_data_is_not_resumed(tmp_path):
    """The resume identity holds the data's fingerprint: the same dataset name over other images trains anew."""
    prepared = _prepare(tmp_path / "d", seed=2)
    train_vqgan.run(vq_cfg(prepared, tmp_path / "run", steps=2))
    _prepare(tmp_path / "d", seed=5)  # the same name and settings, other images
    train_vqgan.run(vq_cfg(prepared, tmp_path / "run", steps=2))
    train_vqgan.run(vq_cfg(prepared, tmp_path / "fresh", steps=2))
    a, b = exported(tmp_path / "run"), exported(tmp_path / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_batches_equal_the_in_memory_ones_from_any_start_step(prepared):
    """Datasets above max_memory_mb stream from the shards; a resumed run's batches start at its step either way."""
    data = PreparedImages(prepared / "tiny", "train")
    images = data.load_all()[0]
    sched = StepBatches(len(data), 4, 3)
    want = [images[sched.indices(s)] for s in range(3, 6)]
    for mb in (0, 4096):  # 0: streamed through a loader, 4096: held in memory
        cfg = SimpleNamespace(batch_size=4, seed=3, max_memory_mb=mb, num_workers=0)
        batches = vqgan_loop.Batches(data, cfg, 0, 1)
        assert (batches.memory is None) == (mb == 0)
        got = list(batches.iterate(3, 6))
        assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))


def test_kmeans_seeds_from_a_random_sample_drawn_with_the_seed(prepared, tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    real = vqgan_loop.kmeans_init

    def spy(model, images, *args):
        seen.append(images)
        real(model, images, *args)

    monkeypatch.setattr(vqgan_loop, "kmeans_init", spy)
    monkeypatch.setattr(vqgan_loop, "finish", lambda *a, **k: None)
    train_vqgan.run(vq_cfg(prepared, tmp_path, steps=1, kmeans_images=8, seed=7))
    images = PreparedImages(prepared / "tiny", "train").load_all()[0]
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(7))[:8]
    assert pick.tolist() != list(range(8)) and len(seen) == 1 and torch.equal(seen[0], images[pick])


def test_the_last_step_is_checkpointed_when_steps_is_not_a_multiple_of_ckpt_every(prepared, tmp_path):
    train_vqgan.run(vq_cfg(prepared, tmp_path, steps=3, ckpt_every=2, kmeans_init=False))
    assert [p.name for p in ckpt.step_files(tmp_path / "ckpt")] == ["step-00000003.pt", "step-00000002.pt"]
    assert ckpt.read(tmp_path / "ckpt" / "last.pt")["step"] == 3


def test_the_exported_config_records_the_training_resolution_data_and_ema(prepared, tmp_path):
    """`pipeline tokenize` prepares raw images at the resolution config.json records (it refuses a VQGAN without)."""
    train_vqgan.run(vq_cfg(prepared, tmp_path, steps=1, kmeans_init=False, ema=0.5))
    meta = json.loads((tmp_path / "vqgan" / "config.json").read_text())
    manifest = json.loads((prepared / "tiny" / "manifest.json").read_text())
    assert (meta["resolution"], meta["dataset"], meta["dataset_fingerprint"], meta["steps"], meta["ema"]) == \
        (16, "tiny", manifest["fingerprint"], 1, 0.5)


def test_val_images_caps_the_images_and_their_labels_together(tmp_path):
    """The reconstruction grid picks one image per class from the capped labels: classes found only past the cap
    must not index images that were cut off."""
    prepared = _prepare(tmp_path / "d", n_val=12)
    labels = [e.label for e in PreparedImages(prepared / "tiny", "val").entries]
    assert len(set(labels)) >= 4 and max(labels.index(c) for c in set(labels)) >= 3  # classes past the cap
    train_vqgan.run(vq_cfg(prepared, tmp_path, steps=1, kmeans_init=False, val_images=3))
    assert json.loads((tmp_path / "vqgan" / "metrics.json").read_text())["val_images"] == 3


def test_disc_weight_0_trains_no_discriminator(prepared, tmp_path, monkeypatch):
    """disc_weight 0 switches the GAN off at every step: one optimiser step a step (G's), no g / d in the log."""
    stepped: list[int] = []
    history: list[dict] = []
    monkeypatch.setattr(vqgan_loop, "finish", lambda *args, **kwargs: history.extend(args[5]))  # (cfg, ..., history)
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: stepped.append(id(optimizer)))
    try:
        train_vqgan.run(vq_cfg(prepared, tmp_path, steps=2, kmeans_init=False,
                               loss=LossParams(lpips_weight=0.0, disc_start=0, disc_weight=0.0)))
    finally:
        handle.remove()
    assert len(stepped) == 2 and len(set(stepped)) == 1
    assert [(row["g"], row["d"]) for row in history] == [(None, None)] * 2


@pytest.mark.parametrize("n_codes, allowed", [(64, True), (65, False)])
def test_kmeans_init_needs_as_many_encoder_vectors_as_codes_and_no_more(prepared, tmp_path, monkeypatch,
                                                                       n_codes, allowed):
    """One 16 px image gives 8 x 8 = 64 encoder vectors at downsampling 2: enough for 64 codes, not for 65."""
    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(vqgan_loop, "Batches", reached)  # made right after the check: stop there
    cfg = vq_cfg(prepared, tmp_path, kmeans_images=1, model=VQGANConfig(**{**TINY, "n_codes": n_codes}))
    with pytest.raises(Reached if allowed else UserError):
        train_vqgan.run(cfg)


# ---------------------------------------------------------------- stages/train_vqgan.py check


def _vq_check(**model):
    return train_vqgan.check({"datasets": {"fashion_mnist": {"source": "idx", "path": "x"}},
                              "train_vqgan": {"model": model}}, "params.yaml")


def test_train_vqgan_check_holds_at_its_boundaries():
    assert _vq_check(dead_code_steps=0).model.dead_code_steps == 0  # 0: no revival
    assert _vq_check(n_codes=2**31).model.n_codes == 2**31
    assert len(_vq_check(ch_mult=[1, 1, 1, 1, 1]).model.ch_mult) == 5
    for bad, says in ((dict(dead_code_steps=-1), "dead_code_steps"), (dict(n_codes=2**31 + 1), "n_codes"),
                      (dict(ch_mult=[1] * 6), "ch_mult")):
        with pytest.raises(UserError, match=says):
            _vq_check(**bad)


# ---------------------------------------------------------------- stages/tokenize.py


def tok_params(**kw) -> TokenizeParams:
    return TokenizeParams(**{"batch_size": 16, "shard_size": 10, "num_workers": 0, "roundtrip_images": 4, **kw})


def tokenize(prepared: Path, vqgan: Path, out: Path, **kw) -> dict:
    tokenize_run(TokenizeConfig("a", prepared, vqgan, out, out.parent / f"m_{out.name}.json", None, tok_params(**kw)))
    return json.loads((out / "metrics.json").read_text())


def store_records(store: Path) -> dict[bytes, bytes]:
    with read_txn(store / "tokens.lmdb") as txn:
        return dict(txn.cursor().iternext())


def test_code_usage_counts_each_image_once_and_bytes_per_image_count_every_record(tiny_world, tmp_path):
    """With flips the store holds 2 records per image; the usage metrics are over the original records only (a
    perplexity recomputed here from the stored grids), the bytes per record over all of them."""
    out = tmp_path / "a"
    m = tokenize(tiny_world["prepared"], tiny_world["vqgan"], out, hflip=True)
    counts, flipped = [0] * 16, 0
    for key, value in store_records(out).items():
        if key.startswith(b"__"):
            continue
        rec = decode_record(value)
        if key.endswith(b"_hflip"):
            assert rec.flags & FLAG_HFLIP
            flipped += 1
            continue
        for code in rec.grid.ravel().tolist():
            counts[code] += 1
    total = sum(counts)
    assert total == 60 * 16 and flipped == 60 and m["images"] == 60 and m["records"] == 120
    entropy = -sum(c / total * math.log(c / total) for c in counts if c)
    used = sum(c > 0 for c in counts)
    usage = m["code_usage"]
    assert (usage["used_codes"], usage["dead_codes"], usage["usage_fraction"]) == (used, 16 - used, used / 16)
    assert usage["perplexity"] == pytest.approx(math.exp(entropy), rel=1e-12)
    size = (out / "tokens.lmdb").stat().st_size
    assert m["bytes_per_image"]["lmdb"] == round(size / 120, 1)


def test_every_record_carries_the_label_of_its_own_split_and_index(tiny_world):
    for split in ("train", "val"):
        want = [e.label for e in PreparedImages(tiny_world["prepared"], split).entries]
        store = TokenLMDBDataset(tiny_world["tokens"], split, hflip=False)
        labels = store.get_batch(range(len(store)))[1].tolist()
        assert labels == want and len(set(want)) > 1, split


def test_a_store_without_a_roundtrip_check_is_published(tiny_world, tmp_path):
    out = tmp_path / "a"
    m = tokenize(tiny_world["prepared"], tiny_world["vqgan"], out, roundtrip_images=0)
    assert m["roundtrip"] == {"images": 0, "exact": None} and (out / "tokens.lmdb").is_file()


def test_the_roundtrip_check_spreads_its_images_over_the_dataset(tiny_world, monkeypatch):
    """A wrong record at the dataset's last image is seen by a check of 2 images (the first and the last)."""
    from stages import tokenize as tok
    model, _ = load_vqgan(tiny_world["vqgan"])
    splits = [PreparedImages(tiny_world["prepared"], s) for s in ("train", "val")]
    items = [(s, i) for s, d in enumerate(splits) for i in range(len(d))]
    last = len(items) - 1

    class OneBadRecord(TokenLMDBDataset):
        def get_batch(self, indices):
            grids, labels = super().get_batch(indices)
            bad = torch.tensor([j == last for j in indices])
            grids[bad] = (grids[bad] + 1) % 16
            return grids, labels

    monkeypatch.setattr(tok, "TokenLMDBDataset", OneBadRecord)
    lmdb_path = tiny_world["tokens"] / "tokens.lmdb"
    result = tok.roundtrip_check(model, lmdb_path, splits, items, 2, 16, torch.device("cpu"), False)
    assert result["images"] == 2 and result["token_mismatches"] == 16 and result["exact"] is False


def _interrupted_before_assembly(prepared: Path, vqgan: Path, out: Path, monkeypatch, **kw) -> None:
    """A run killed after every batch was encoded into its part, before the store was assembled."""
    from stages import tokenize as tok

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before assembly")

    with monkeypatch.context() as m:
        m.setattr(tok, "assemble", killed)
        with pytest.raises(KeyboardInterrupt):
            tokenize(prepared, vqgan, out, **kw)
    assert (out.parent / f".{out.name}.partial" / "parts").is_dir()


def test_parts_made_without_flips_are_not_resumed_by_a_run_with_flips(tiny_world, tmp_path, monkeypatch):
    p, v = tiny_world["prepared"], tiny_world["vqgan"]
    _interrupted_before_assembly(p, v, tmp_path / "a", monkeypatch, hflip=False)
    tokenize(p, v, tmp_path / "a", hflip=True)
    tokenize(p, v, tmp_path / "fresh", hflip=True)
    assert store_records(tmp_path / "a") == store_records(tmp_path / "fresh")


def test_parts_of_other_images_under_the_same_dataset_name_are_not_resumed(tiny_world, tmp_path, monkeypatch):
    def prepared(seed: int) -> Path:
        src = make_idx_dataset(tmp_path / f"idx{seed}", n_train=16, n_val=4, seed=seed)
        prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(src), resolution=16, channels=1),
                              PrepareParams(out_dir=str(tmp_path / "prepared"))))
        return tmp_path / "prepared" / "a"

    v = tiny_world["vqgan"]
    _interrupted_before_assembly(prepared(1), v, tmp_path / "a", monkeypatch)
    m = tokenize(prepared(2), v, tmp_path / "a")  # same name, same settings, other images
    tokenize(prepared(2), v, tmp_path / "fresh")
    assert m["roundtrip"]["exact"] is True
    assert store_records(tmp_path / "a") == store_records(tmp_path / "fresh")


def test_a_prepared_key_that_ends_like_a_flipped_record_is_refused(tiny_world, tmp_path):
    """A hand-made prepared folder may hold any key: one ending in _hflip would be taken for (or overwrite) the flip of
    another sample, so the store refuses it in one line, with flips or without."""
    src = make_idx_dataset(tmp_path / "idx", n_train=4, n_val=2)
    prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(src), resolution=16),
                          PrepareParams(out_dir=str(tmp_path / "p"))))
    shard = tmp_path / "p" / "a" / json.loads((tmp_path / "p" / "a" / "manifest.json").read_text())[
        "splits"]["val"]["shards"][0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            m.name = m.name.replace("t10k_000000", "train_000000_hflip")
            tar.addfile(m, io.BytesIO(data))
    for hflip in (False, True):
        with pytest.raises(UserError, match="train_000000_hflip"):
            tokenize(tmp_path / "p" / "a", tiny_world["vqgan"], tmp_path / f"t{int(hflip)}", hflip=hflip)


# ---------------------------------------------------------------- stages/prepare.py


def _grey_folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """One class folder `c` with a grey PNG per name, of the given (width, height)."""
    rng = np.random.default_rng(0)
    (root / "c").mkdir(parents=True)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(root / "c" / f"{name}.png")
    return root


def _prepare_folder(src: Path, out: Path, **pp) -> dict:
    prepare(PrepareConfig("f", DatasetSpec(source="folder", path=str(src), resolution=8, split="random",
                                           val_fraction=0.0), PrepareParams(out_dir=str(out), **pp)))
    return json.loads((out / "f" / "report.json").read_text())


def test_max_per_split_keeps_exactly_the_first_n_of_each_split(tmp_path):
    src = make_idx_dataset(tmp_path / "idx", n_train=10, n_val=6)
    prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(src), resolution=8, max_per_split=3),
                          PrepareParams(out_dir=str(tmp_path / "p"))))
    for split, stem in (("train", "train"), ("val", "t10k")):
        keys = [e.key for e in PreparedImages(tmp_path / "p" / "a", split).entries]
        assert keys == [f"{stem}_{i:06d}" for i in range(3)]


def test_the_fingerprint_covers_the_labels(tmp_path):
    """Two IDX datasets with the same images, one label apart: downstream caches must see other data."""
    src = make_idx_dataset(tmp_path / "idx", n_train=6, n_val=2)
    prints = []
    for relabel in (False, True):
        if relabel:
            labels = read_idx(src / "train-labels-idx1-ubyte.gz").copy()
            labels[0] = (labels[0] + 1) % 10
            write_idx(src / "train-labels-idx1-ubyte.gz", labels)
        out = tmp_path / f"p{int(relabel)}"
        prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(src), resolution=8),
                              PrepareParams(out_dir=str(out))))
        prints.append(json.loads((out / "a" / "manifest.json").read_text())["fingerprint"])
    assert prints[0] != prints[1]


def test_min_side_and_max_pixels_are_the_prepare_sections(tmp_path):
    src = _grey_folder(tmp_path / "src", {"small": (6, 6), "big": (20, 24)})
    kept = _prepare_folder(src, tmp_path / "p1", min_side=4)  # the default 8 would skip the 6x6 image
    assert kept["skipped"] == []
    report = _prepare_folder(src, tmp_path / "p2", min_side=4, max_pixels=400)  # 20 x 24 = 480 pixels
    assert [Path(s["origin"]).name for s in report["skipped"]] == ["big.png"]


def test_shards_of_files_carry_their_origin_and_idx_shards_do_not(tmp_path):
    src = _grey_folder(tmp_path / "src", {"a": (8, 8)})
    _prepare_folder(src, tmp_path / "p")
    (shard,) = (tmp_path / "p" / "f").glob("train-*.tar")
    with tarfile.open(shard) as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar}
    assert sorted(members) == ["cls", "json", "png"]
    assert json.loads(members["json"]) == {"origin": str(src / "c" / "a.png")}
    idx = make_idx_dataset(tmp_path / "idx", n_train=2, n_val=1)
    prepare(PrepareConfig("i", DatasetSpec(source="idx", path=str(idx), resolution=8),
                          PrepareParams(out_dir=str(tmp_path / "p"))))
    with tarfile.open(next((tmp_path / "p" / "i").glob("train-*.tar"))) as tar:
        assert sorted(m.name for m in tar) == ["train_000000.cls", "train_000000.png", "train_000001.cls",
                                               "train_000001.png"]


# ---------------------------------------------------------------- pipeline/retokenize.py


def test_peek_keeps_images_of_exactly_min_side(tmp_path):
    from pipeline.retokenize import peek_images
    src = _grey_folder(tmp_path / "src", {"a": (8, 8), "b": (7, 9)})
    peek = peek_images(src)
    assert peek.sizes == {(8, 8)} and dict(peek.skipped) == {"too small": 1}


def test_peek_reads_only_the_tars_of_a_folder_that_has_tars(tmp_path):
    """Beside tars the prepare step reads the tars alone (a WebDataset source): a loose colour PNG is not looked at."""
    from pipeline.retokenize import peek_images
    src = tmp_path / "src"
    src.mkdir()
    grey = io.BytesIO()
    Image.fromarray(np.full((16, 16), 7, np.uint8), "L").save(grey, format="PNG")
    Image.fromarray(np.dstack([np.full((12, 12), v, np.uint8) for v in (0, 90, 200)]), "RGB").save(src / "c.png")
    with tarfile.open(src / "train-0.tar", "w") as tar:
        info = tarfile.TarInfo("s0.png")
        info.size = len(grey.getvalue())
        tar.addfile(info, io.BytesIO(grey.getvalue()))
    peek = peek_images(src)
    assert (peek.colour, peek.sizes) == (False, {(16, 16)})


def test_the_side_commands_image_options_reach_the_prepare_step(tiny_world, tmp_path, monkeypatch):
    import stages.prepare
    from pipeline.retokenize import tokenize_source
    seen: list[DatasetSpec] = []
    real = stages.prepare.run
    monkeypatch.setattr(stages.prepare, "run", lambda cfg: seen.append(cfg.dataset) or real(cfg))
    src = _grey_folder(tmp_path / "src", {"a": (16, 20), "b": (20, 16)})
    tokenize_source(src, tiny_world["vqgan"], tmp_path / "tok" / "a", tok_params(), resize="center_crop",
                    background=255, split="random")
    assert [(s.resize, s.background, s.split, s.resolution, s.channels) for s in seen] == \
        [("center_crop", 255, "random", 16, 1)]
