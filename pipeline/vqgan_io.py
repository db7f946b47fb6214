"""Final VQGAN weights on disk: `model.safetensors` + `config.json` (model config, codebook fingerprint, provenance).

Every token consumer loads the VQGAN through `load_vqgan`, which recomputes the codebook fingerprint from the
weights and refuses a folder whose weights and config disagree. `check_fingerprint` is the one place that
compares a token store's fingerprint with the VQGAN in use.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.vqgan import VQGAN, VQGANConfig
from pipeline.atomic import atomic_path, read_json, write_json
from pipeline.errors import UserError, first_line


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, C, H, W] -> float in [-1, 1], the VQGAN's input convention."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """VQGAN output in [-1, 1] -> uint8 pixels (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def model_config_dict(cfg: VQGANConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["ch_mult"] = list(d["ch_mult"])
    return d


def fingerprint(model: VQGAN) -> str:
    return model.codebook_fingerprint()  # the config as JSON: a tuple and a list hash alike


def save_vqgan(out_dir: str | Path, model: VQGAN, meta: dict[str, Any]) -> str:
    """Write weights and config atomically; returns the codebook fingerprint."""
    out_dir = Path(out_dir)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(sd, str(tmp))
    fp = fingerprint(model)
    write_json(out_dir / "config.json", {"model": model_config_dict(model.cfg), "fingerprint": fp, **meta})
    return fp


def load_vqgan(folder: str | Path, device: str | torch.device = "cpu") -> tuple[VQGAN, dict[str, Any]]:
    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise UserError(f"{p}: not found (train the VQGAN first: dvc repro train_vqgan)")
    meta = read_json(cfg_path)
    try:  # a folder the user named may hold another program's config.json
        raw = dict(meta["model"])
        raw["ch_mult"] = tuple(raw["ch_mult"])
        model = VQGAN(VQGANConfig(**raw))
        if not isinstance(meta["fingerprint"], str):
            raise TypeError(f"fingerprint is {meta['fingerprint']!r}, not a string")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{cfg_path}: not a tokenmill VQGAN config ({type(exc).__name__}: {first_line(exc)}); "
                        f"train_vqgan writes one") from None
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:
        raise UserError(f"{weights}: cannot load VQGAN weights ({first_line(exc)})") from None
    fp = fingerprint(model)
    if fp != meta["fingerprint"]:
        raise UserError(f"{weights}: codebook fingerprint {fp[:16]} does not match {cfg_path} "
                        f"({meta['fingerprint'][:16]}); the folder is corrupt or mixed")
    return model.to(device).eval(), meta


def check_fingerprint(tokens_fp: str, vqgan_fp: str, tokens_where: str, vqgan_where: str | None) -> None:
    """Stop when tokens were made by another codebook than the VQGAN that will decode them (`vqgan_where`: its
    folder or config file; None when the caller passed only a fingerprint)."""
    if tokens_fp != vqgan_fp:
        vqgan = f"the VQGAN in {vqgan_where}" if vqgan_where is not None else "the VQGAN in use"
        raise UserError(f"codebook mismatch: tokens in {tokens_where} have fingerprint {tokens_fp[:16]}, "
                        f"{vqgan} has {vqgan_fp[:16]}; re-tokenize with this VQGAN")
