"""Helpers the tests share: small synthetic datasets, the bad-input corpus, crash injection, file-tree digests,
and the tiny world (prepared data -> random-init VQGAN -> token store) that the stage-2 tests train on.

Import them from here (`from helpers import ...`); conftest.py only holds fixtures.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.sandbox import ROOT, make_idx_dataset, make_project, write_idx  # noqa: F401 (used by the tests)

CORPUS = ROOT / "tests" / "corpus"  # the checked-in bad-input corpus (tests/corpus/make_corpus.py)
sys.path.insert(0, str(CORPUS))
from make_corpus import generated_inputs, png_bytes  # noqa: E402,F401 (png_bytes: used by the tests)


def load_bench(name: str, folder: str = "bench"):
    """A bench/ (or scripts/) script as a module: neither folder is a package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_good_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size=(20, 24)) -> Path:
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(root / c / f"{i}.png")
    return root


def make_bad_corpus(root: Path) -> dict[str, str]:
    """The checked-in image corpus (tests/corpus/images) plus the generated bomb, as one class folder under `root`.
    Returns {file name: expected outcome ("kept" or "skipped")}."""
    shutil.copytree(CORPUS / "images", root, dirs_exist_ok=True)
    shutil.copy2(generated_inputs(root.parent / "generated")["bomb"], root / "things" / "bomb.png")
    return json.loads((CORPUS / "expected.json").read_text())["images"]


def resumed_step(run, monkeypatch) -> int | None:
    """Call `run()` and return the step of the checkpoint its loop resumed from (None: it started fresh). A run
    that retrains from step 0 ends with the same bytes as a resumed one (every draw is seeded), so a resume test
    that compares only the results cannot tell whether anything was resumed."""
    from pipeline import checkpoint as ckpt
    real_load, loaded = ckpt.load_latest, []

    def recording(*args, **kwargs):
        state = real_load(*args, **kwargs)
        loaded.append(None if state is None else int(state["step"]))
        return state

    monkeypatch.setattr(ckpt, "load_latest", recording)
    run()
    monkeypatch.setattr(ckpt, "load_latest", real_load)
    assert len(loaded) == 1, loaded
    return loaded[0]


def crash_after_first_checkpoint(run, monkeypatch) -> None:
    """Call `run()` with a crash (KeyboardInterrupt) right after its first checkpoint is saved, like a kill between
    two steps, then restore checkpointing so the caller can resume."""
    import pytest

    from pipeline import checkpoint as ckpt
    real_save = ckpt.save

    def save_then_die(ckpt_dir, state, step, keep=2):
        real_save(ckpt_dir, state, step, keep)
        raise KeyboardInterrupt(f"killed after step {step}")

    monkeypatch.setattr(ckpt, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ckpt, "save", real_save)


def files_under(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`: equal dicts mean equal trees, byte for byte."""
    from pipeline.atomic import sha256_file
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_params(datasets: dict[str, Path], resolution: int = 16) -> str:
    lines = ["datasets:"]
    for name, path in datasets.items():
        lines += [f"  {name}:", "    source: idx", f"    path: {path}", f"    resolution: {resolution}",
                  "    channels: 1"]
    lines += ["prepare:", "  out_dir: data/prepared", "  shard_size: 25"]
    return "\n".join(lines) + "\n"


def tiny_vqgan(seed: int = 0, in_channels: int = 1):
    """A random-init VQGAN for 16x16 images: 4x4 token grid, 16 codes of dim 4."""
    from models.vqgan import VQGAN, VQGANConfig
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(in_channels=in_channels, ch=8, ch_mult=(1, 2, 2), z_channels=8, n_codes=16,
                             code_dim=4, dead_code_steps=0)).eval()


def build_tiny_world(base: Path) -> dict[str, Path]:
    """A prepared 16x16 grey dataset `a` (48 train + 12 val, 10 named classes), a random-init VQGAN (and a second
    one with another codebook), and the token store of `a` made with the first."""
    from pipeline.vqgan_io import save_vqgan
    from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
    from stages.prepare import run as prepare
    from stages.tokenize import TokenizeConfig, TokenizeParams
    from stages.tokenize import run as tokenize

    src = make_idx_dataset(base / "idx", n_train=48, n_val=12, seed=4)
    prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(src), resolution=16, channels=1,
                                           class_names=[str(i) for i in range(10)]),
                          PrepareParams(out_dir=str(base / "prepared"), shard_size=25)))
    save_vqgan(base / "vqgan", tiny_vqgan(0), {"resolution": 16, "dataset": "a"})
    save_vqgan(base / "other_vqgan", tiny_vqgan(1), {"resolution": 16, "dataset": "a"})
    tokenize(TokenizeConfig("a", base / "prepared" / "a", base / "vqgan", base / "tokens" / "a",
                            base / "tok_metrics.json", None,
                            TokenizeParams(batch_size=16, shard_size=10, num_workers=0, roundtrip_images=8)))
    return {"base": base, "prepared": base / "prepared" / "a", "vqgan": base / "vqgan",
            "tokens": base / "tokens" / "a"}


TINY_VQGAN_MODEL = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, n_codes=16, code_dim=4,
                        dead_code_steps=2, buffer_size=64)


def tiny_vqgan_params(src: Path, steps: int = 4) -> str:
    """params.yaml of a project with one 16x16 IDX dataset `tiny` and a few-step VQGAN (stages prepare, train_vqgan)."""
    model = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in TINY_VQGAN_MODEL.items())
    return f"""datasets:
  tiny: {{source: idx, path: {src}, resolution: 16, channels: 1}}
prepare: {{out_dir: data/prepared, shard_size: 10}}
train_vqgan:
  dataset: tiny
  prepared_dir: data/prepared
  out_dir: data/vqgan
  ckpt_dir: data/checkpoints/train_vqgan
  metrics: data/metrics/train_vqgan.json
  plots: data/plots/train_vqgan.tsv
  steps: {steps}
  batch_size: 8
  ckpt_every: 2
  log_every: 2
  kmeans_images: 16
  device: cpu
  model:
{model}
  loss: {{lpips_weight: 0.0, disc_start: 2, disc_channels: 8, disc_layers: 1}}
"""


def fake_tree(root: Path, files: dict[str, str]) -> Path:
    """A throwaway project tree (models/, pipeline/, stages/, training/ packages) with the given module sources,
    for tests of the import graph."""
    for pkg in ("models", "pipeline", "stages", "training"):
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)  # a subpackage or a top-level module's folder
        (root / rel).write_text(text)
    return root


def small_disk_prefix(folder: Path, kib: int) -> list[str] | None:
    """A command prefix under which `folder` is an empty tmpfs of `kib` KiB: a disk that fills up on demand. Needs
    root and `unshare` (a private mount namespace); None where that cannot be arranged."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    prefix = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={kib}k tmpfs "{folder}" && exec "$@"', "sh"]
    return prefix if subprocess.run(prefix + ["true"], capture_output=True).returncode == 0 else None


def transformer_cfg(base: Path, out: Path, **kw):
    """train_transformer params for the tiny world at `base` (kind ar unless kw says otherwise), outputs under
    `out` (model in out/gpt): 6 steps of a 1-layer width-16 transformer, checkpoints at 3 and 6."""
    import dataclasses

    from stages import train_transformer as tt
    cfg = tt.TrainTransformerParams(
        dataset="a", tokens_dir=str(base / "tokens"), prepared_dir=str(base / "prepared"),
        vqgan_dir=str(base / "vqgan"), out_dir=str(out / "gpt"), ckpt_dir=str(out / "ckpt"),
        metrics=str(out / "metrics.json"), plots=str(out / "log.tsv"), steps=6, batch_size=8, ckpt_every=3,
        log_every=2, eval_every=3, val_batches=2, device="cpu",
        ar=tt.ARParams(n_layer=1, n_head=2, n_embd=16, class_dropout=0.2),
        optim=tt.OptimParams(lr=3e-3, warmup_steps=2))
    return dataclasses.replace(cfg, **kw)


def reference_stack(model: torch.nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The token transformers' blocks and final norm (models/gpt.py, models/maskgit.py) written out from their
    docstrings in float64, one operation at a time, for reference-forward tests: pre-norm blocks x + attn(norm(x)),
    x + mlp(norm(x)) with softmax attention (causal or full) and the 2D rotary angles computed here per position,
    then norm_f. x: (B, L, C) embedded sequence, position 0 the prefix."""
    import math

    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    B, L, C = x.shape
    H = cfg.n_head
    D = C // H

    def norm(x, name):
        if cfg.norm == "rmsnorm":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w[f"{name}.weight"]
        y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return y * w[f"{name}.weight"] + (w[f"{name}.bias"] if cfg.bias else 0)

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if f"{name}.bias" in w else 0)

    def rope(t):  # t (B, H, L, D): channels [0, D/2) turn with the row, [D/2, D) with the column, in pairs (j, j+D/4)
        out, half, quarter = t.clone(), D // 2, D // 4
        for s in range(L):
            row, col = (s - 1) // cfg.grid[1], (s - 1) % cfg.grid[1]  # the prefix (s = 0) sits at (-1, w - 1)
            for coord, off in ((row, 0), (col, half)):
                for j in range(quarter):
                    theta = coord * 10000.0 ** (-2 * j / half)
                    a, b = t[..., s, off + j], t[..., s, off + j + quarter]
                    out[..., s, off + j] = a * math.cos(theta) - b * math.sin(theta)
                    out[..., s, off + j + quarter] = a * math.sin(theta) + b * math.cos(theta)
        return out

    allowed = torch.ones(L, L, dtype=torch.bool)
    allowed = allowed.tril() if causal else allowed
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        q, k, v = (t.reshape(B, L, H, D).transpose(1, 2)
                   for t in linear(norm(x, f"{p}.norm1"), f"{p}.attn.qkv").split(C, dim=-1))
        if cfg.pos == "rope2d":
            q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, L, C), f"{p}.attn.proj")
        h = linear(norm(x, f"{p}.norm2"), f"{p}.mlp.fc")
        if cfg.mlp == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = gate * torch.sigmoid(gate) * up
        else:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + linear(h, f"{p}.mlp.proj")
    return norm(x, "norm_f")


def check_never_newer_than_run_log(monkeypatch, out: Path, run_log: Path) -> list[str]:
    """Spy on os.replace: after every rename, `out` (a file out of a stage), when in place, must have `run_log`
    beside it and be no newer (what pipeline/out_guard.py reads as "this run's"). A pause after the run log's own
    rename makes a file written after it strictly newer (file times tick in milliseconds). Returns the renamed
    destinations, filled as the run goes."""
    import os
    import time
    renamed: list[str] = []
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        renamed.append(str(dst))
        if Path(dst) == run_log:
            time.sleep(0.05)
        if out.exists():
            assert run_log.exists() and out.stat().st_mtime_ns <= run_log.stat().st_mtime_ns, renamed[-3:]

    monkeypatch.setattr(os, "replace", replace)
    return renamed
