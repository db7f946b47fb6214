"""VQGAN training (Taming Transformers' stage 1): the loop of the `train_vqgan` stage, read top to bottom.

Loss (training/vq_loss.py) = reconstruction (L1/L2) + lpips_weight * LPIPS + quantizer loss + lambda * GAN (after
disc_start), where lambda = disc_weight * |grad L_rec| / (|grad L_GAN| + delta) at the decoder's last layer. The
codebook is kept healthy by k-means initialisation from encoder outputs, dead-code revival and l2-normalised
low-dim codes.

1. Batches        the images of step s: a slice of a permutation seeded by (seed, epoch), from memory or shards
2. kmeans_init    the codebook starts at k-means centroids of encoder outputs
3. evaluate       reconstruction metrics (L1, PSNR, LPIPS, code usage) on the val split
4. train_vqgan    resume (same identity only), then one loop: G step (rec + LPIPS + q + adaptive GAN), D step
5. finish         EMA weights exported, metrics, curves, reconstruction grid
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.discriminator import NLayerDiscriminator
from models.lpips import LPIPS
from models.vqgan import VQGAN
from pipeline import checkpoint as ckpt
from pipeline import doctor
from pipeline.atomic import atomic_path, new_partial_dir, replace_dir, write_json
from pipeline.device import autocast, init_distributed, pick_device
from pipeline.errors import UserError
from pipeline.prepared import PreparedImages
from pipeline.report import save_rows_grid
from pipeline.runlog import headline, run_log_path, write_metrics
from pipeline.vqgan_io import save_vqgan, to_model_range, to_uint8
from training.common import (EMA, StepBatches, check_batch_fits, check_batch_splits, check_finite, config_hash,
                             cosine_lr, seed_everything, set_lr, unwrap, write_tsv)
from training.vq_loss import discriminator_loss, generator_loss

log = logging.getLogger("tokenmill.train_vqgan")
# the metrics file's columns (`dvc metrics show`); the full record is <out_dir>/metrics.json
HEADLINE = {"psnr": "val_psnr", "lpips": "val_lpips", "perplexity": "perplexity", "usage_pct": "code_usage_pct"}
LOG_KEYS = ["step", "rec", "lpips", "q", "g", "d", "d_weight", "usage_pct", "perplexity", "lr"]


class Batches:
    """The training images for a step: from memory (small datasets) or from the shards through a loader."""

    def __init__(self, data: PreparedImages, cfg: Any, rank: int, world: int):
        self.sched = StepBatches(len(data), cfg.batch_size, cfg.seed, rank, world)
        m = data.manifest
        size_mb = len(data) * m["channels"] * m["resolution"] ** 2 / 2**20
        self.memory = data.load_all()[0] if size_mb <= cfg.max_memory_mb else None
        self.data, self.workers = data, cfg.num_workers

    def iterate(self, start: int, stop: int):
        if self.memory is not None:
            for step in range(start, stop):
                yield self.memory[self.sched.indices(step)]
            return
        sampler = [self.sched.indices(s).tolist() for s in range(start, stop)]
        loader = torch.utils.data.DataLoader(self.data, batch_sampler=sampler, num_workers=self.workers,
                                             persistent_workers=False)
        for images, _ in loader:
            yield images


@torch.no_grad()
def kmeans_init(model: VQGAN, images: torch.Tensor, seed: int, device: torch.device) -> None:
    """Seed the codebook with k-means centroids of encoder outputs: every code starts where data is."""
    zs = []
    for chunk in images.split(256):
        z = model.encode_latent(to_model_range(chunk).to(device))
        zs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float().cpu())
    model.quantizer.kmeans_init(torch.cat(zs), seed=seed)


@torch.no_grad()
def evaluate(model: VQGAN, images: torch.Tensor, lpips: LPIPS | None, device: torch.device,
             batch: int = 256) -> tuple[dict[str, float], torch.Tensor]:
    """Reconstruction metrics on uint8 images; returns metrics and the reconstructions (uint8)."""
    model.eval()
    l1 = mse_psnr = lp = 0.0
    all_idx, recons = [], []
    for chunk in images.split(batch):
        x = to_model_range(chunk).to(device)
        recon, aux = model(x)
        recon = recon.clamp(-1, 1).float()
        l1 += (recon - x).abs().mean(dim=(1, 2, 3)).sum().item()
        mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)  # on the [0, 1] scale
        mse_psnr += (-10 * torch.log10(mse)).sum().item()
        if lpips is not None and min(x.shape[-2:]) >= 18:
            lp += lpips(x, recon).sum().item()
        all_idx.append(aux["indices"].cpu())
        recons.append(to_uint8(recon).cpu())
    n = len(images)
    usage = model.quantizer.usage_stats(torch.cat(all_idx))
    metrics = {"val_l1": l1 / n, "val_psnr": mse_psnr / n, "code_usage_pct": 100 * usage["usage_fraction"],
               "perplexity": usage["perplexity"], "dead_codes": int(usage["dead_codes"]), "val_images": n}
    if lpips is not None and min(images.shape[-2:]) >= 18:
        metrics["val_lpips"] = lp / n
    return metrics, torch.cat(recons)


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss and code-usage curves as a PNG (DVC's HTML plots need the internet for Vega)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("rec", "lpips", "q", "g", "d"):
        ys = [h.get(key) for h in history]
        if any(y is not None for y in ys):
            a.plot(steps, [np.nan if y is None else y for y in ys], label=key)
    a.set_yscale("log"), a.set_xlabel("step"), a.legend(), a.set_title("training losses")
    b.plot(steps, [h["usage_pct"] for h in history], label="code usage % (window)")
    b.set_xlabel("step"), b.set_ylim(0, 105), b.legend(), b.set_title("codebook usage")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def train_vqgan(cfg: Any, code: str) -> None:
    """The training loop: `cfg` is the validated `train_vqgan` section, `code` the stage's code hash (part of the
    resume identity)."""
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if dist.main:
        log.info("%s", doctor.summary(device))  # what this machine runs, in the stage's own log
    prepared = Path(cfg.prepared_dir) / cfg.dataset
    train = PreparedImages(prepared, "train")
    manifest = train.manifest
    mcfg = dataclasses.replace(cfg.model, in_channels=manifest["channels"])
    f = mcfg.downsample
    if manifest["resolution"] % f:
        raise UserError(f"train_vqgan.model.ch_mult gives downsampling {f}, which does not divide the "
                        f"{cfg.dataset} resolution {manifest['resolution']}")
    run_id = config_hash({"cfg": dataclasses.asdict(cfg) | {"device": None, "num_workers": None},
                          "data": manifest["fingerprint"], "world": dist.world})

    seed_everything(cfg.seed)
    model = VQGAN(mcfg).to(device)
    disc = NLayerDiscriminator(mcfg.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers,
                               norm=cfg.loss.disc_norm).to(device)
    lpips = None
    if cfg.loss.lpips_weight > 0 or cfg.loss.lpips_path:
        try:
            lpips = LPIPS(cfg.loss.lpips_path, cfg.loss.lpips_vgg_path).to(device)
        except (OSError, ValueError) as exc:
            raise UserError(f"train_vqgan.loss.lpips_path: {exc}") from None
        if min(manifest["resolution"], manifest["resolution"]) < 18 and lpips.variant == "shift_tolerant":
            raise UserError(f"train_vqgan.loss.lpips_weight > 0 needs images of at least 18x18 with the shipped "
                            f"shift-tolerant LPIPS; {cfg.dataset} is {manifest['resolution']}")
    o = cfg.optim
    opt_g = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=o.disc_lr, betas=(o.beta1, o.beta2),
                              weight_decay=o.weight_decay)
    ema = EMA(model, cfg.ema) if cfg.ema is not None else None
    check_batch_fits("train_vqgan.batch_size", cfg.batch_size, len(train), f"the train split of {cfg.dataset} (images)")
    if len(PreparedImages(prepared, "val")) == 0:  # the final metrics (PSNR, code usage) are means over it
        raise UserError(f"{prepared}: split 'val' has no images; the VQGAN's final metrics need some: give dataset "
                        f"{cfg.dataset} images for val (split: random: raise datasets.{cfg.dataset}.val_fraction or "
                        f"add images; split: keep: add a val/ folder)")
    vectors = min(cfg.kmeans_images, len(train)) * (manifest["resolution"] // model.cfg.downsample) ** 2
    if cfg.kmeans_init and vectors < model.cfg.n_codes:
        raise UserError(f"train_vqgan.kmeans_init needs at least model.n_codes = {model.cfg.n_codes} encoder vectors; "
                        f"{min(cfg.kmeans_images, len(train))} images give {vectors}: raise kmeans_images, add images, "
                        f"or set kmeans_init: false")
    check_batch_splits("train_vqgan", cfg.batch_size, dist.world, cfg.grad_accum)
    batches = Batches(train, cfg, dist.rank, dist.world)

    state = ckpt.load_latest(cfg.ckpt_dir, device, expect={"run_id": run_id, "code": code})
    history: list[dict] = []
    window: dict[str, float] = {}  # sums over the steps since the last log row
    if state is not None:
        model.load_state_dict(state["model"])
        disc.load_state_dict(state["disc"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        history, start = list(state["history"]), int(state["step"])
        window = dict(state["window"])  # the log row being summed (its code counts came back with the model)
        log.info("resuming from %s at step %d", cfg.ckpt_dir, start)
    else:
        start = 0
        if cfg.kmeans_init:
            g = torch.Generator().manual_seed(cfg.seed)
            sample = torch.randperm(len(train), generator=g)[:cfg.kmeans_images]
            images = batches.memory[sample] if batches.memory is not None else \
                torch.stack([train[int(i)][0] for i in sample])
            kmeans_init(model, images, cfg.seed, device)
            if ema is not None:
                ema = EMA(model, cfg.ema)
        model.quantizer.reset_usage()  # code counts start with the first log row

    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [dist.local_rank] if device.type == "cuda" else None
        model, disc = DDP(model, device_ids=ids), DDP(disc, device_ids=ids)
    core = unwrap(model)
    micro = cfg.batch_size // dist.world // cfg.grad_accum

    def save_checkpoint(step: int) -> None:
        if dist.main:
            ckpt.save(cfg.ckpt_dir, {
                "step": step, "run_id": run_id, "code": code, "model": core.state_dict(),
                "disc": unwrap(disc).state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "rng": ckpt.rng_state(),
                "ema": ema.state_dict() if ema is not None else {}, "history": history, "window": window},
                step, keep=cfg.ckpt_keep)
        dist.barrier()

    model.train(), disc.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="train_vqgan", unit="step", disable=not dist.main,
               mininterval=2.0, file=sys.stderr)
    t0, img_count = time.monotonic(), 0
    for step, batch in zip(range(start, cfg.steps), batches.iterate(start, cfg.steps)):
        lr = cosine_lr(step, o.lr, o.warmup_steps, cfg.steps, o.min_lr_ratio)
        set_lr(opt_g, lr)
        set_lr(opt_d, lr * o.disc_lr / o.lr if o.lr > 0 else o.disc_lr)
        gan_on = step >= cfg.loss.disc_start and cfg.loss.disc_weight > 0
        lpips_on = step >= cfg.loss.lpips_start and cfg.loss.lpips_weight > 0
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        logs = {"rec": 0.0, "lpips": 0.0, "q": 0.0, "g": 0.0, "d": 0.0, "d_weight": 0.0}
        pairs = []  # (real, fake.detach()) per micro-batch, for the discriminator pass
        for chunk in batch.split(micro):
            x = to_model_range(chunk).to(device, non_blocking=True)
            with autocast(device, cfg.bf16):
                recon, aux = model(x)
                recon = recon.float()
                loss, parts = generator_loss(x, recon, aux["loss"], cfg.loss, lpips, disc, core.last_layer(), gan_on,
                                             lpips_on)
                if gan_on:
                    logs["g"] += parts["g"].item() / cfg.grad_accum
                    logs["d_weight"] += float(parts["d_weight"]) / cfg.grad_accum
                    pairs.append((x, recon.detach()))
            check_finite(step, cfg.ckpt_dir, loss=loss)
            (loss / cfg.grad_accum).backward()
            logs["rec"] += parts["rec"].item() / cfg.grad_accum
            logs["lpips"] += float(parts["lpips"].detach()) / cfg.grad_accum
            logs["q"] += aux["loss"].item() / cfg.grad_accum
        if gan_on:
            # The generator loss also reached D's weights; D's own update must not include that.
            opt_d.zero_grad(set_to_none=True)
            for x, fake in pairs:
                with autocast(device, cfg.bf16):
                    d = discriminator_loss(disc, x, fake, cfg.loss)
                check_finite(step, cfg.ckpt_dir, disc_loss=d)
                (d / cfg.grad_accum).backward()
                logs["d"] += d.item() / cfg.grad_accum
        logs = dist.mean_floats(logs, device)
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt_g.step()
        if gan_on:
            opt_d.step()
        if ema is not None:
            ema.update()
        img_count += cfg.batch_size
        for k, v in logs.items():
            window[k] = window.get(k, 0.0) + v
        window["n"] = window.get("n", 0) + 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            usage = core.quantizer.usage_stats()  # assignments since the last log line
            core.quantizer.reset_usage()
            n = window.pop("n")
            row = {"step": done, **{k: v / n for k, v in window.items()}, "lr": lr,
                   "usage_pct": 100 * usage["usage_fraction"], "perplexity": usage["perplexity"]}
            if not gan_on:
                row["g"] = row["d"] = None
            if not lpips_on:
                row["lpips"] = None
            history.append(row)
            window = {}
            rate = img_count / max(1e-9, time.monotonic() - t0)
            bar.set_postfix(rec=f"{row['rec']:.4f}", usage=f"{row['usage_pct']:.0f}%", img_s=f"{rate:.0f}",
                            refresh=False)
        bar.update(1)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(done)
    bar.close()
    train_seconds = time.monotonic() - t0
    if not dist.main:
        return
    finish(cfg, core, ema, lpips, device, history, manifest, run_id,
           images_per_s=img_count / max(1e-9, train_seconds) if img_count else None)


def finish(cfg: Any, model: VQGAN, ema: EMA | None, lpips: LPIPS | None, device: torch.device,
           history: list[dict], manifest: dict, run_id: str, images_per_s: float | None) -> None:
    """Final metrics on the val split, exported weights, plots and the reconstruction grid."""
    final = ema.averaged() if ema is not None else model
    val = PreparedImages(Path(cfg.prepared_dir) / cfg.dataset, "val")
    images, labels = val.load_all()
    if cfg.val_images is not None:
        images, labels = images[:cfg.val_images], labels[:cfg.val_images]
    if lpips is None:
        try:
            lpips = LPIPS().to(device)  # always report LPIPS when the images are big enough
        except (OSError, ValueError):
            lpips = None
    metrics, recons = evaluate(final, images, lpips, device)
    metrics.update({"steps": cfg.steps, "n_codes": final.cfg.n_codes, "grid": [
        manifest["resolution"] // final.cfg.downsample] * 2})
    if lpips is not None:
        metrics["lpips_variant"] = lpips.variant_info()["variant"]
    out = new_partial_dir(cfg.out_dir)
    fp = save_vqgan(out, final, {"dataset": cfg.dataset, "dataset_fingerprint": manifest["fingerprint"],
                                 "resolution": manifest["resolution"], "steps": cfg.steps, "run_id": run_id,
                                 "ema": cfg.ema})
    metrics["fingerprint"] = fp
    # one image per class where possible, else the first 10
    pick = [int((labels == c).nonzero()[0]) for c in labels.unique()[:10].tolist()]
    pick = pick if len(pick) >= 4 else list(range(min(10, len(images))))
    save_rows_grid(out / "recon_grid.png", [images[pick], recons[pick]], scale=3)
    plot_curves(out / "curves.png", history)
    write_json(out / "metrics.json", metrics)
    replace_dir(out, Path(cfg.out_dir), "train_vqgan")
    write_metrics(cfg.metrics, headline(metrics, HEADLINE), {"train_images_per_s": images_per_s, "device": device.type})
    write_tsv(Path(cfg.plots), history, LOG_KEYS, stamp=run_log_path(cfg.metrics))
    log.info("val: L1 %.4f  PSNR %.2f dB  usage %.1f%%  perplexity %.1f  dead %d", metrics["val_l1"],
             metrics["val_psnr"], metrics["code_usage_pct"], metrics["perplexity"], metrics["dead_codes"])


