"""Stage `sample`: generate token grids with the stage-2 model, decode them with the VQGAN, store them.

AR models sample with a KV cache (temperature, top-k, top-p, classifier-free guidance); GAN generators give
latent grids that are snapped to the nearest codes, so both kinds end as token grids decoded the same way.
Tokens from another codebook are refused: the stage-2 model records the fingerprint it was trained on.

Output `<out_dir>/`: `samples-%06d.tar` (per sample `s%07d.png` decoded image, `.cls` label or -1, `.tok` raw
little-endian token grid), `manifest.json` (count, grid, token dtype, codebook fingerprint, sampler, seed, ...),
`grid.png` (one row per class when conditional); metrics JSON with sampling images/s.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from models.gpt import GPT, GPTConfig
from models.maskgit import MaskGIT, MaskGITConfig
from pipeline.atomic import check_replaceable, new_partial_dir, replace_dir, sha256_file, write_json
from pipeline.config import SEED_MAX, param, section
from pipeline.errors import UserError
from pipeline.stage_cli import run_stage_cli
from models.gan import generator_from_config, snap_to_codes
from pipeline.images import encode_png
from pipeline.runlog import write_metrics
from pipeline.shards import ShardWriter
from pipeline.device import autocast, pick_device
from pipeline.vqgan_io import check_fingerprint, load_vqgan, to_uint8

log = logging.getLogger("tokenmill.sample")
SECTIONS = ("sample",)


@dataclass
class SampleParams:
    model_dir: str = "data/transformer"
    vqgan_dir: str = "data/vqgan"
    out_dir: str = param("data/samples/default", kind="out_path")
    metrics: str = param("data/metrics/sample.json", kind="out_path")
    n: int = param(1000, min=1)
    batch_size: int = param(100, min=1)
    temperature: float = param(1.0, min=0.0)  # 0: greedy
    top_k: int | None = param(None, min=1)
    top_p: float | None = param(None, min=0.0, max=1.0)
    cfg_scale: float = param(1.5, min=0.0)  # 1.0: plain conditional sampling
    maskgit_steps: int = param(8, min=1)  # kind maskgit: decoding steps T (forward passes per batch)
    choice_temperature: float = param(2.0, min=0.0)  # kind maskgit: Gumbel noise on confidences, annealed to 0
    seed: int = param(0, min=0, max=SEED_MAX)
    shard_size: int = param(1000, min=1)
    grid_per_class: int = param(10, min=1)  # images per row of grid.png
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True


def check(params: dict, source: str) -> SampleParams:
    return section(params, "sample", SampleParams, source)


def load_stage2(folder: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The stage-2 model and its config.json: a GPT (kind ar), a MaskGIT (kind maskgit) or a GAN generator, the EMA
    weights (kind gan)."""
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise UserError(f"{p}: not found (run train_transformer first)")
    meta = json.loads(cfg_path.read_text())
    if meta["kind"] in ("ar", "maskgit"):
        raw = dict(meta["model"])
        raw["grid"] = tuple(raw["grid"])
        model = GPT(GPTConfig(**raw)) if meta["kind"] == "ar" else MaskGIT(MaskGITConfig(**raw))
    elif meta["kind"] == "gan":
        model = generator_from_config(meta["model"])
    else:
        raise UserError(f"{cfg_path}: kind {meta['kind']!r} cannot be sampled (allowed: 'ar', 'maskgit', 'gan')")
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), meta


def labels_for(n: int, n_classes: int) -> torch.Tensor | None:
    """Classes in equal shares, cycling 0..K-1, so every class gets n/K samples (+1 for the first n % K)."""
    return torch.arange(n) % n_classes if n_classes else None


def run(cfg: SampleParams) -> None:
    check_replaceable(cfg.out_dir, "sample")
    device = pick_device(cfg.device)
    model, meta = load_stage2(Path(cfg.model_dir), device)
    vqgan, vmeta = load_vqgan(cfg.vqgan_dir, device)
    check_fingerprint(meta["fingerprint"], vmeta["fingerprint"], f"{cfg.model_dir} (the tokens it was trained on)",
                      cfg.vqgan_dir)
    gan = meta["kind"] == "gan"
    if gan:
        gcfg = model.cfg
        h = w = meta["latent"]["grid"]
        n_codes = vqgan.cfg.n_codes
        codebook, l2_norm = vqgan.quantizer.codes().detach(), bool(meta["latent"]["l2_norm"])
    else:
        gcfg = model.config
        h, w = gcfg.grid
        n_codes = gcfg.vocab_size
    tok_dtype = np.dtype("<u2") if n_codes <= 65536 else np.dtype("<i4")  # as the token store (tokens.dtype_code)
    labels = labels_for(cfg.n, gcfg.n_classes)
    final = Path(cfg.out_dir)
    tmp = new_partial_dir(final)  # a killed run's leftovers are not part of this one
    grid_rows: dict[int, list[torch.Tensor]] = {}
    t0, done = time.monotonic(), 0
    with ShardWriter(tmp, "samples", cfg.shard_size) as writer:
        for b, start in enumerate(tqdm(range(0, cfg.n, cfg.batch_size), desc="sample", unit="batch",
                                       file=sys.stderr, mininterval=2.0)):
            n = min(cfg.batch_size, cfg.n - start)
            y = labels[start:start + n].to(device) if labels is not None else None
            # one generator per batch, seeded by (seed, batch): any batch can be regenerated alone
            g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b)
            with torch.no_grad(), autocast(device, cfg.bf16):
                if gan:  # the generator's latent grid, each vector snapped to its nearest code
                    z = torch.randn(n, model.z_dim, generator=g, device=device)
                    tokens = snap_to_codes(model(z, y), codebook, l2_norm).view(n, h * w)
                elif meta["kind"] == "maskgit":  # T parallel decoding steps
                    tokens = model.generate(n, y, steps=cfg.maskgit_steps, temperature=cfg.temperature,
                                            top_k=cfg.top_k, top_p=cfg.top_p, choice_temperature=cfg.choice_temperature,
                                            cfg_scale=cfg.cfg_scale if y is not None else 1.0, generator=g)
                else:
                    tokens = model.generate(n, y, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                            cfg_scale=cfg.cfg_scale if y is not None else 1.0, generator=g)
                images = vqgan.decode_indices(tokens.view(n, h, w)).float()
            images = to_uint8(images).cpu()
            tokens = tokens.cpu().numpy().astype(tok_dtype)
            for i in range(n):
                label = int(y[i]) if y is not None else -1
                arr = images[i].permute(1, 2, 0).numpy()
                writer.write(f"s{start + i:07d}", {"png": encode_png(arr), "cls": str(label).encode(),
                                                   "tok": tokens[i].tobytes()})
                row = grid_rows.setdefault(label, [])
                if len(row) < cfg.grid_per_class:
                    row.append(images[i])
            done += n
    seconds = time.monotonic() - t0
    if gan:
        snap = "nearest code by cosine (vectors and codes l2-normalised)" if l2_norm else "nearest code by squared L2"
        sampler = {"generator": "ema", "z": "standard normal", "snap": snap, "batch_size": cfg.batch_size}
    elif meta["kind"] == "maskgit":
        sampler = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                   "cfg_scale": cfg.cfg_scale, "batch_size": cfg.batch_size, "steps": cfg.maskgit_steps,
                   "choice_temperature": cfg.choice_temperature}
    else:
        sampler = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                   "cfg_scale": cfg.cfg_scale, "batch_size": cfg.batch_size, "kv_cache": True}
    manifest = {
        "count": cfg.n, "grid": [h, w], "token_dtype": "uint16" if tok_dtype.itemsize == 2 else "int32",
        "codebook_fingerprint": vmeta["fingerprint"], "resolution": vmeta.get("resolution"),
        "channels": vqgan.cfg.in_channels, "class_names": meta.get("class_names", []),
        "conditional": gcfg.n_classes > 0, "n_codes": n_codes, "seed": cfg.seed, "kind": meta["kind"],
        # which weights made the samples: evaluate records it in every gFID's protocol
        "model_fingerprint": sha256_file(Path(cfg.model_dir) / "model.safetensors"),
        "sampler": sampler,
        "shards": writer.shards,
    }
    write_json(tmp / "manifest.json", manifest)
    save_class_grid(tmp / "grid.png", grid_rows)
    replace_dir(tmp, final, "sample")
    write_metrics(cfg.metrics, {"images": done},
                  {"seconds": round(seconds, 2), "images_per_s": round(done / seconds, 2) if seconds > 0 else None,
                   "tokens_per_s": round(done * h * w / seconds, 1) if seconds > 0 else None,
                   "device": device.type})
    log.info("sampled %d images in %.1f s (%.2f images/s) -> %s", done, seconds, done / max(seconds, 1e-9), final)


def save_class_grid(path: Path, rows: dict[int, list[torch.Tensor]], scale: int = 2) -> None:
    from pipeline.report import save_rows_grid
    save_rows_grid(path, [torch.stack(rows[k]) for k in sorted(rows)], scale=scale)


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
