"""Transformer-GAN training in the VQGAN latent space: the body of `train_transformer` with `kind: gan`.

Frame. A real sample is the codebook embedding of a stored token grid: codes()[tokens], a (B, d, h, w) grid in the
quantizer's lookup space (unit vectors when the codebook is l2-normalised). The generator (models/gan_*.py, picked by
`gan.family`) maps noise, and a class when conditional, to a (B, d, h, w) grid; the discriminator scores such grids.
Sampling snaps every generated vector to its nearest code (`snap_to_codes`), which gives a token grid that the
VQGAN decodes exactly like an AR sample, so `sample` and `evaluate` treat both kinds the same.

Where the discriminator looks (`gan.d_space`). latent: the family's own D judges latent grids. A real grid is
made of exact codewords and G's grids are continuous, so such a D can tell them apart by the distance to the nearest
codeword alone, without looking at the image; `gan.snap` removes that shortcut by giving D G's grids snapped to their
nearest codes (straight-through gradient), i.e. codewords like every real grid and every sample. image: G's grids
go through the frozen VQGAN decoder (differentiable) and a conv discriminator (models/gan_pixel_d.py) judges the
pixels, with DiffAugment in pixel space; the real images are the decoder's reconstructions of the real grids
(`gan.image_reals: recon`, like with like: both sides carry the decoder's artifacts) or the dataset's own images
(`dataset`). Every D input is made in `TrainingInputs`; nothing else (data, checkpoints, sampling) depends on it.

Recipe. `gan.recipe` picks one of two labelled recipes per family (models/gan_common.py): `tokenmill` (the family
config's defaults + the mode-seeking term: what measures best here) or `paper` (the family's paper/code: loss,
gradient penalty, learning rates, betas, n_critic, EMA, augmentation, SR co-training, locality init and the
architecture switches; docs/gan_recipes.md). `gan:` params override either: `model.*` any config field, and the
explicit lr_g, lr_d, r1_gamma, diffaug, ema_decay, ms_weight. One step:
  D: loss_D(D(aug(real)), D(aug(G(z).detach()))) + R1 on the reals | + WGAN-GP on interpolates -> Adam step on D
  G (when step % n_critic == 0): loss_G(D(aug(G(z)))) [+ TransGAN's super-resolution loss]     -> Adam step on G, EMA
R1 differentiates D(aug(x)) with respect to the un-augmented x, as StyleGAN2-ADA does with its augmentation inside D;
the gradient penalty likewise differentiates D(aug(x_hat)) at the un-augmented interpolate x_hat (TransGAN's D augments
its input inside, the interpolates too). TransGAN's locality masks widen with `G.set_progress(step / steps)`. With an
l2-normalised codebook the generator's vectors are normalised before D (real codes all have norm 1; otherwise D could
tell real from fake by the norm alone and G would spend its first steps learning the norm). The EMA decay ramps up as
min(decay, (1 + s) / (10 + s)) (TensorFlow's num_updates rule): with a fixed 0.999 a run of a few hundred steps would
export mostly the initial weights.

Exact resume. Batches come from StepBatches and the noise, augmentation and interpolation draws from CPU generators
seeded by (seed, step), so nothing depends on a data loader or the global RNG stream; the checkpoint holds G, D, both
optimisers, the EMA and the RNG state. An interrupted-and-resumed CPU run ends with bitwise the same weights.

DDP (torchrun). G and D are not wrapped in DistributedDataParallel: R1 needs a double backward through D and the G
step backpropagates through D without updating it, neither of which DDP's reducer handles. Gradients are averaged
across ranks by hand after each backward (as StyleGAN2-ADA does); each rank takes its slice of the global batch and
of the step's noise, so 1 rank x B and N ranks x B/N see the same real grids and noise (augmentation draws and D's
batch-norm statistics are per rank). Logged values are rank 0's.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.gan_common import (FAMILIES, GANConfig, d_loss, diff_augment, g_loss, gan_config, r1_penalty,
                               random_interpolates, recipe_fields, wgan_gp_penalty)
from models.gan import build_discriminator, build_generator, embed_tokens, project_to_codes_space, snap_to_codes
from models.gan_pixel_d import PixelDiscriminator, straight_through_snap
from models.gan_transgan import sr_loss
from models.ranks import mean_over_ranks
from pipeline import checkpoint as ckpt
from pipeline import doctor
from pipeline.atomic import new_partial_dir, replace_dir, write_json
from pipeline.config import from_dict, param
from pipeline.errors import UserError
from pipeline.fid import Protocol, extract_features, frechet_distance_features, protocol_id
from pipeline.prepared import PreparedImages, read_manifest
from training.common import (EMA, StepBatches, check_batch_fits, check_batch_splits, check_finite, config_hash,
                             export_weights, linear_decay_scale, seed_everything, set_lr, token_data_id, write_tsv)
from pipeline.device import Dist, autocast
from pipeline.vqgan_io import load_vqgan, to_model_range, to_uint8
from pipeline.fid_reference import NetworkParams, check_reference, load_network, load_reference
from pipeline.runlog import run_log_path, write_metrics
from pipeline.tokens import TokenData

if TYPE_CHECKING:
    from models.vqgan import VQGAN

log = logging.getLogger("tokenmill.train_gan")

# Keys of the family config that `gan.model` may not set, and where they come from instead.
RESERVED = {
    "family": "train_transformer.gan.family",
    "attention_kind": "train_transformer.gan.attention_kind",
    "code_dim": "the VQGAN codebook",
    "grid": "the token store",
    "n_classes": "train_transformer.gan.conditional (classes from the prepared manifest)",
    "lr_g": "train_transformer.gan.lr_g",
    "lr_d": "train_transformer.gan.lr_d",
    "r1_gamma": "train_transformer.gan.r1_gamma",
    "diffaug": "train_transformer.gan.diffaug",
    "ema_decay": "train_transformer.gan.ema_decay",
    "ms_weight": "train_transformer.gan.ms_weight",
}
LOG_KEYS = ["step", "g_loss", "d_loss", "r1", "d_acc_real", "d_acc_fake", "ms_ratio", "fid"]


@dataclass
class GANParams:
    """params.yaml `train_transformer.gan:` (read when kind is 'gan')."""
    family: Literal["lada", "transgan", "stransgan"] = "lada"
    recipe: Literal["paper", "tokenmill"] = "tokenmill"  # the family's labelled recipe (docs/gan_recipes.md)
    attention_kind: Literal["native", "ylg", "full"] = "native"  # native: the family's own attention
    conditional: bool = True  # class-conditional G and D (classes from the prepared dataset's manifest)
    model: dict[str, Any] = field(default_factory=dict)  # family config overrides (models/gan_common.py)
    lr_g: float | None = param(None, min=0.0)  # null: the family's recipe
    lr_d: float | None = param(None, min=0.0)
    r1_gamma: float | None = param(None, min=0.0)
    diffaug: str | None = None  # comma-separated subset of translation, cutout; "" = off
    ema_decay: float | None = param(None, min=0.0, max=1.0)
    ms_weight: float | None = param(None, min=0.0)  # mode-seeking term (MSGAN) in G's loss; null: the recipe's
    fid_every: int = param(0, min=0)  # FID of the EMA generator every this many steps; 0 = off
    fid_images: int = param(256, min=2)  # generated images per FID point (the reference's count is its own)
    fid_reference: str = "data/fid_ref/fashion_mnist-val-tf_bilinear"  # a fid_ref output folder
    fid_network: NetworkParams = field(default_factory=NetworkParams)
    # what D judges: latent grids (the family's D) or images decoded by the frozen VQGAN decoder (a conv D)
    d_space: Literal["latent", "image"] = "latent"
    image_reals: Literal["recon", "dataset"] = "recon"  # d_space image: real images are the VQGAN's reconstructions
    image_d_channels: int = param(32, min=1)  # d_space image: the conv D's first width (doubling per halving)
    snap: bool = False  # D sees G's grids snapped to their nearest codes (straight-through), as real grids are


def check_gan(g: GANParams, source: str) -> None:
    """Validate `gan.model` against the family's config class: reserved keys, unknown keys, types, values."""
    where = "train_transformer.gan.model"
    for key in g.model:
        if key in RESERVED:
            raise UserError(f"{source}: {where}.{key} cannot be set here (it comes from {RESERVED[key]})")
    family_cls = type(gan_config(g.family))
    own = {f.name for f in dataclasses.fields(family_cls)}
    for key in g.model:
        others = [f for f in FAMILIES if f != g.family and key in {x.name for x in dataclasses.fields(gan_config(f))}]
        if key not in own and others:  # left from another family (a switch of gan.family with -S, say)
            raise UserError(f"{source}: {where}.{key} is a setting of family {' and '.join(others)}, not of "
                            f"{g.family} (gan.family); clear the family's settings with -S '{where}={{}}' or set "
                            f"{g.family}'s own")
    try:
        from_dict(family_cls, g.model, where, source)
        family_config(g, code_dim=16, grid=8, n_classes=0)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{source}: {where}: {exc}") from None


def family_config(g: GANParams, code_dim: int, grid: int, n_classes: int) -> GANConfig:
    """The family config for a latent grid of (code_dim, grid, grid): the family's defaults, then its `gan.recipe`,
    then `gan.model`, then the explicit overrides."""
    fields: dict[str, Any] = {**recipe_fields(g.family, g.recipe), **g.model, "code_dim": code_dim, "grid": grid,
                              "n_classes": n_classes, "attention_kind": g.attention_kind}
    for name in ("lr_g", "lr_d", "r1_gamma", "diffaug", "ema_decay", "ms_weight"):
        if getattr(g, name) is not None:
            fields[name] = getattr(g, name)
    cfg = gan_config(g.family, **fields)
    if len(cfg.betas) != 2:
        raise ValueError(f"betas must be two numbers, got {list(cfg.betas)}")
    return cfg


def d_config(cfg: GANConfig) -> GANConfig:
    """The config D is built from. R1 and WGAN-GP differentiate D's input gradient once more (a double backward),
    which the fused attention kernels (SDPA's flash / memory-efficient kernels, xformers) do not implement, so with
    either on and no backend chosen D's softmax attention runs on the written-out "math" backend; G keeps the fast
    kernels."""
    if (cfg.r1_gamma > 0 or cfg.loss == "wgan-gp") and cfg.backend is None:
        return dataclasses.replace(cfg, backend="math")
    return cfg


def config_dict(cfg: GANConfig) -> dict[str, Any]:
    """JSON form of a family config (tuples as lists); `generator_from_config` reads it back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# -----------------------------------------------------------------------------------------------------------------
# The mode-seeking term

def mode_seeking_ratio(fake1: Tensor, fake2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """MSGAN's ratio (Mao et al., 2019): mean |G(z1, y) - G(z2, y)| over mean |z1 - z2|, per pair, averaged. The
    generator adds ms_weight / ratio to its loss, so outputs of one class must move when the noise moves: a
    class-conditional G that maps every z of a class to one grid (intra-class mode collapse) pays for it."""
    return ((fake1 - fake2).abs().flatten(1).mean(1) / (z1 - z2).abs().mean(1)).mean()


# -----------------------------------------------------------------------------------------------------------------
# Per-step randomness and the pieces of one step

def step_generator(seed: int, step: int, stream: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one purpose (stream) of one step: draws are a function of (seed, step, stream, rank)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 8 + stream) * 4096 + rank)


NOISE, AUGMENT, FID_NOISE, MS_NOISE, INTERPOLATE = 0, 1, 2, 3, 4  # INTERPOLATE: WGAN-GP's mixing weights (+ their aug)


def log_keys(gcfg: GANConfig) -> list[str]:
    """Columns of the training log: a "gp" column only when the loss has a gradient penalty (so the tokenmill log
    keeps its columns)."""
    return LOG_KEYS[:4] + ["gp"] + LOG_KEYS[4:] if gcfg.loss == "wgan-gp" else list(LOG_KEYS)


def d_logits(D: nn.Module, grids: Tensor, y: Tensor | None, policy: str, aug: torch.Generator) -> Tensor:
    """D's logits for its inputs (latent grids or images) after DiffAugment (the single place where D sees them)."""
    return D(diff_augment(grids, policy, aug), y)


def average_gradients(module: nn.Module, dist: Dist) -> None:
    """Mean of the gradients over ranks, in one all-reduce (no-op on one process)."""
    if dist.world == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    flat = mean_over_ranks(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def clip_gradients(module: nn.Module, max_norm: float) -> None:
    """Clip the total gradient norm of `module` to max_norm (after the ranks' average, so every rank clips alike);
    0 = off."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)


def _no_grad(G: nn.Module, z: Tensor, y: Tensor | None) -> Tensor:
    """G's output on a critic-only step (no G update follows, so no graph is kept)."""
    with torch.no_grad():
        return G(z, y)


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1.0 + step) / (10.0 + step))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------------------------------------------
# FID over training

class FIDTracker:
    """FID of a fixed set of samples of the EMA generator against a fid_ref reference.

    The noise and labels are fixed for the run (seeded), so points along the curve differ only by the weights.
    Samples go the way `sample` sends them: G -> nearest codes -> VQGAN decode -> uint8."""

    def __init__(self, g: GANParams, seed: int, z_dim: int, n_classes: int, dataset_fingerprint: str,
                 channels: int):
        self.ref = load_reference(g.fid_reference)
        check_reference(self.ref, dataset_fingerprint=dataset_fingerprint, channels=channels)
        self.net, self.device = load_network(g.fid_network)
        check_reference(self.ref, feature_network_hash=self.net.feature_network_hash)
        self.resize = self.ref.meta["resize_mode"]
        self.batch_size = g.fid_network.batch_size
        self.z = torch.randn(g.fid_images, z_dim, generator=step_generator(seed, 0, FID_NOISE))
        self.y = torch.arange(g.fid_images) % n_classes if n_classes else None
        self.protocol = Protocol(n_gen=g.fid_images, n_ref=len(self.ref.features), ref_split=self.ref.meta["split"],
                                 resize_mode=self.resize, feature_network_hash=self.net.feature_network_hash,
                                 seed=seed, ref_seed=self.ref.meta.get("seed"),
                                 dataset_fingerprint=dataset_fingerprint,
                                 sampler={"generator": "ema", "snap": "nearest code", "z_seed": seed}).as_dict()

    @torch.no_grad()
    def __call__(self, G: nn.Module, vqgan: "VQGAN", l2_norm: bool, device: torch.device, bf16: bool) -> float:
        codebook = vqgan.quantizer.codes()

        def images():
            for start in range(0, len(self.z), self.batch_size):
                z = self.z[start:start + self.batch_size].to(device)
                y = self.y[start:start + self.batch_size].to(device) if self.y is not None else None
                with autocast(device, bf16):
                    tokens = snap_to_codes(G(z, y), codebook, l2_norm)
                    yield to_uint8(vqgan.decode_indices(tokens)).cpu()

        try:
            feats = extract_features(images(), self.net, self.batch_size, self.resize, self.device,
                                     total=len(self.z), progress=False)
        except ValueError as exc:
            raise UserError(f"FID over training: {exc}") from None
        # a few hundred samples against 2048-d features: the n x n route, exact and far cheaper than d x d
        return frechet_distance_features(self.ref.features, feats, (self.ref.mu, self.ref.sigma))


# -----------------------------------------------------------------------------------------------------------------
# What D sees

class TrainingInputs:
    """The discriminator's inputs for a step: real and fake grids mapped into `gan.d_space` (see the docstring)."""

    def __init__(self, g: GANParams, vqgan: "VQGAN", codebook: Tensor, l2_norm: bool, prepared: Path, meta: dict):
        self.g, self.vqgan, self.codebook, self.l2_norm = g, vqgan, codebook, l2_norm
        self.images: PreparedImages | None = None
        if g.d_space == "image" and g.image_reals == "dataset":
            manifest = read_manifest(prepared)
            if manifest["fingerprint"] != meta.get("dataset_fingerprint"):
                raise UserError(f"{prepared}: not the prepared dataset the token store was made from (fingerprints "
                                f"differ); train_transformer.gan.image_reals: dataset needs that one, or use recon")
            if manifest["channels"] != vqgan.cfg.in_channels:
                raise UserError(f"{prepared}: images have {manifest['channels']} channel(s), the VQGAN decodes "
                                f"{vqgan.cfg.in_channels}; use train_transformer.gan.image_reals: recon")
            self.images = PreparedImages(prepared, "train")
            self.n = meta["counts"]["train"]  # store index i >= n: the flipped copy of image i - n
            if len(self.images) != self.n:
                raise UserError(f"{prepared}: the train split has {len(self.images)} images, the token store "
                                f"{self.n}; re-run tokenize")

    def real(self, grids: Tensor, idx: Tensor) -> Tensor:
        if self.g.d_space == "latent":
            return grids
        if self.images is None:
            with torch.no_grad():
                return self.vqgan.decode(grids)
        ids = idx.tolist()
        x = torch.stack([self.images[i % self.n][0] for i in ids]).to(grids.device)
        flip = torch.tensor([i >= self.n for i in ids], device=grids.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return to_model_range(x)

    def fake(self, grids: Tensor) -> Tensor:
        if self.g.snap:
            grids = straight_through_snap(grids, self.codebook, snap_to_codes(grids.detach(), self.codebook,
                                                                               self.l2_norm))
        return self.vqgan.decode(grids) if self.g.d_space == "image" else grids


def build_d(g: GANParams, gcfg: GANConfig, vqgan: "VQGAN", resolution: int) -> nn.Module:
    if g.d_space == "image":
        return PixelDiscriminator(vqgan.cfg.in_channels, resolution, g.image_d_channels, gcfg.n_classes,
                                  gcfg.mbstd_group)
    return build_discriminator(d_config(gcfg))


# -----------------------------------------------------------------------------------------------------------------
# The training run

def train_gan(cfg: Any, device: torch.device, dist: Dist, code: str) -> None:
    """Train cfg.gan's family on the token store, checkpointing for exact resume; the main rank writes the outputs."""
    if dist.main:
        log.info("%s", doctor.summary(device))  # what this machine runs, in the stage's own log
    g = cfg.gan
    vq_dir = Path(cfg.vqgan_dir)
    vqgan, vmeta = load_vqgan(vq_dir, device)
    vqgan.eval().requires_grad_(False)  # frozen: with d_space image, D's gradient reaches G through its decoder
    fingerprint = vmeta["fingerprint"]
    store = Path(cfg.tokens_dir) / cfg.dataset
    train = TokenData.load(store, "train", cfg.hflip, fingerprint, str(vq_dir / "config.json"))
    meta = train.meta
    h, w = meta["grid"]
    if h != w:
        raise UserError(f"{store}: the GAN generators make square latent grids, the token grid is {h}x{w}")
    manifest = read_manifest(Path(cfg.prepared_dir) / cfg.dataset)
    class_names = manifest["class_names"] if g.conditional else []
    l2_norm = bool(vqgan.cfg.l2_norm)
    codebook = vqgan.quantizer.codes().detach()
    try:
        gcfg = family_config(g, code_dim=codebook.shape[1], grid=h, n_classes=len(class_names))
        seed_everything(cfg.seed)
        G, D = build_generator(gcfg).to(device), build_d(g, gcfg, vqgan, h * vqgan.cfg.downsample).to(device)
    except ValueError as exc:
        raise UserError(f"train_transformer.gan ({g.family}, {h}x{h}x{codebook.shape[1]} latent grid): {exc}") \
            from None
    G_ema = build_generator(gcfg).to(device).eval().requires_grad_(False)  # the averaged weights, for FID and export
    opt_g = torch.optim.Adam(G.parameters(), lr=gcfg.lr_g, betas=gcfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=gcfg.lr_d, betas=gcfg.betas)
    ema = EMA(G, gcfg.ema_decay)
    run_id = config_hash({"cfg": dataclasses.asdict(cfg) | {"device": None}, "tokens": fingerprint,
                          "data": token_data_id(meta, train.tokens, train.labels), "classes": class_names,
                          "world": dist.world})

    state = ckpt.load_latest(cfg.ckpt_dir, device, expect={"run_id": run_id, "code": code})
    history: list[dict] = []
    keys = log_keys(gcfg)
    # per-step values since the last log row (checkpointed, so a resumed run logs the same rows)
    window: dict[str, list[float]] = {k: [] for k in keys[1:-1]}
    start, train_seconds = 0, 0.0
    if state is not None:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        history, start = list(state["history"]), int(state["step"])
        window = {k: list(v) for k, v in state["window"].items()}
        train_seconds = float(state["train_seconds"])
        log.info("resuming from %s at step %d", cfg.ckpt_dir, start)

    conditional = gcfg.n_classes > 0
    inputs = TrainingInputs(g, vqgan, codebook, l2_norm, Path(cfg.prepared_dir) / cfg.dataset, meta)
    fid = None
    if g.fid_every and dist.main:
        fid = FIDTracker(g, cfg.seed, gcfg.z_dim, gcfg.n_classes, manifest["fingerprint"], vqgan.cfg.in_channels)
    check_batch_fits("train_transformer.batch_size", cfg.batch_size, len(train.tokens),
                     f"the train split of the token store of {cfg.dataset} (records)")
    check_batch_splits("train_transformer", cfg.batch_size, dist.world, cfg.grad_accum)
    batches = StepBatches(len(train.tokens), cfg.batch_size, cfg.seed, dist.rank, dist.world)
    g_params, d_params = num_params(G), num_params(D)
    log.info("GAN %s (attention %s, %s recipe): G %.2fM, D %.2fM parameters (D on %s%s%s%s); %s loss%s, R1 %g, "
             "n_critic %d, lr G %g D %g%s, betas %s, diffaug %r, ms_weight %g; %d train grids of %dx%dx%d%s", g.family,
             g.attention_kind, g.recipe, g_params / 1e6, d_params / 1e6, g.d_space,
             f", {g.image_reals} reals" if g.d_space == "image" else "", ", snapped fakes" if g.snap else "",
             f", minibatch std over groups of {gcfg.mbstd_group}" if gcfg.mbstd_group else "",
             gcfg.loss, f" (lambda {gcfg.gp_lambda:g}, drift {gcfg.wgan_drift:g})" if gcfg.loss == "wgan-gp" else "",
             gcfg.r1_gamma, gcfg.n_critic, gcfg.lr_g, gcfg.lr_d,
             f" (linear decay to 0 from step {gcfg.lr_decay_from * cfg.steps:g})" if gcfg.lr_decay_from < 1 else "",
             gcfg.betas, gcfg.diffaug, gcfg.ms_weight,
             len(train.tokens), h, w, codebook.shape[1], f", {gcfg.n_classes} classes" if conditional else "")

    def save_checkpoint(step: int) -> None:
        if dist.main:
            ckpt.save(cfg.ckpt_dir, {"step": step, "run_id": run_id, "code": code,
                                     "G": G.state_dict(), "D": D.state_dict(),
                                     "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                     "ema": ema.state_dict(), "rng": ckpt.rng_state(), "history": history,
                                     "window": window, "train_seconds": train_seconds}, step, keep=cfg.ckpt_keep)
        dist.barrier()

    G.train(), D.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train_gan ({g.family})", unit="step", disable=not dist.main,
               mininterval=2.0, file=sys.stderr)
    for step in range(start, cfg.steps):
        t_step = time.monotonic()
        if gcfg.family == "transgan":
            G.set_progress(step / cfg.steps)
        idx = batches.indices(step)
        real = embed_tokens(train.tokens[idx].to(device, non_blocking=True), codebook, h, w)
        y = train.labels[idx].to(device) if conditional else None
        # the step's global noise batch, this rank's slice of it (same rule as StepBatches)
        z = torch.randn(cfg.batch_size, gcfg.z_dim, generator=step_generator(cfg.seed, step, NOISE))
        z = z[dist.rank::dist.world].to(device)
        aug = step_generator(cfg.seed, step, AUGMENT, dist.rank)
        scale = linear_decay_scale(step, cfg.steps, gcfg.lr_decay_from)
        set_lr(opt_g, gcfg.lr_g * scale)
        set_lr(opt_d, gcfg.lr_d * scale)

        # D step: the fake batch is made once; D learns on it detached, then G learns through it
        g_step = step % gcfg.n_critic == 0  # TransGAN's code: G steps at global_steps % n_critic == 0
        with autocast(device, cfg.bf16):
            fake = project_to_codes_space(G(z, y) if g_step else _no_grad(G, z, y), l2_norm)
            fake_in = inputs.fake(fake)
            real_in = inputs.real(real, idx).requires_grad_(gcfg.r1_gamma > 0)
            logits_real = d_logits(D, real_in, y, gcfg.diffaug, aug)
            logits_fake = d_logits(D, fake_in.detach(), y, gcfg.diffaug, aug)
            loss_d = d_loss(gcfg.loss, logits_real.float(), logits_fake.float())
            r1 = r1_penalty(logits_real.float(), real_in, gcfg.r1_gamma) if gcfg.r1_gamma > 0 else loss_d.new_zeros(())
            gp = None
            if gcfg.loss == "wgan-gp":
                # interpolates and their augmentation draw from their own stream: the other streams are untouched
                mix = step_generator(cfg.seed, step, INTERPOLATE, dist.rank)
                x_hat = random_interpolates(real_in, fake_in, mix)
                gp = wgan_gp_penalty(d_logits(D, x_hat, y, gcfg.diffaug, mix).float(), x_hat, gcfg.gp_lambda)
                if gcfg.wgan_drift > 0:  # keeps the critic's real scores near 0 (TransGAN's "eps")
                    loss_d = loss_d + gcfg.wgan_drift * logits_real.float().mean() ** 2
        check_finite(step, cfg.ckpt_dir, d_loss=loss_d.detach(), r1=r1.detach(),
                     **({"gp": gp.detach()} if gp is not None else {}))
        opt_d.zero_grad(set_to_none=True)
        (loss_d + r1 if gp is None else loss_d + r1 + gp).backward()
        average_gradients(D, dist)
        clip_gradients(D, gcfg.grad_clip)
        opt_d.step()

        if g_step:  # G step: D frozen (its gradients are not needed)
            D.requires_grad_(False)
            with autocast(device, cfg.bf16):
                loss_g = g_loss(gcfg.loss, d_logits(D, fake_in, y, gcfg.diffaug, aug).float())
                if gcfg.family == "transgan" and gcfg.sr_weight > 0:
                    loss_g = loss_g + gcfg.sr_weight * sr_loss(G, real.detach())
                if gcfg.ms_weight > 0:
                    z2 = torch.randn(cfg.batch_size, gcfg.z_dim, generator=step_generator(cfg.seed, step, MS_NOISE))
                    z2 = z2[dist.rank::dist.world].to(device)
                    ratio = mode_seeking_ratio(fake, project_to_codes_space(G(z2, y), l2_norm), z, z2)
                    loss_g = loss_g + gcfg.ms_weight / (ratio + 1e-5)
            check_finite(step, cfg.ckpt_dir, g_loss=loss_g.detach())
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            average_gradients(G, dist)
            clip_gradients(G, gcfg.grad_clip)
            opt_g.step()
            D.requires_grad_(True)
            ema.decay = ema_decay_at(step // gcfg.n_critic, gcfg.ema_decay)  # the ramp counts G updates
            ema.update()
        train_seconds += time.monotonic() - t_step

        values: list[tuple[str, Tensor]] = [("d_loss", loss_d), ("r1", r1)] + ([("gp", gp)] if gp is not None else [])
        if g_step:
            values = [("g_loss", loss_g), *values] + ([("ms_ratio", ratio)] if gcfg.ms_weight > 0 else [])
        values += [("d_acc_real", (logits_real > 0).float().mean()), ("d_acc_fake", (logits_fake < 0).float().mean())]
        step_values = {key: float(value.detach()) for key, value in values}
        for key, value in dist.mean_floats(step_values, device).items():  # the whole batch's, not rank 0's share
            window[key].append(value)
        done = step + 1
        row = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {"step": done, **{k: sum(v) / len(v) for k, v in window.items() if v}}
            window = {k: [] for k in window}
        if fid is not None and (done % g.fid_every == 0 or done == cfg.steps):
            ema.copy_to(G_ema)
            row = row or {"step": done}
            row["fid"] = fid(G_ema, vqgan, l2_norm, device, cfg.bf16)
            log.info("step %d: FID %.2f (%d EMA samples)", done, row["fid"], g.fid_images)
        if row is not None:
            history.append(row)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("d_loss", "g_loss") if k in row}
                            | ({"fid": f"{row['fid']:.1f}"} if "fid" in row else {}), refresh=False)
        bar.update(1)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(done)
    bar.close()
    if dist.main:
        ema.copy_to(G_ema)
        finish_gan(cfg, G_ema, gcfg, history, fingerprint, class_names, l2_norm, g_params, d_params,
                   train_seconds / cfg.steps, device, fid.protocol if fid is not None else None)


def finish_gan(cfg: Any, G_ema: nn.Module, gcfg: GANConfig, history: list[dict],
               fingerprint: str, class_names: list[str], l2_norm: bool, g_params: int, d_params: int,
               step_seconds: float, device: torch.device, fid_protocol: dict | None) -> None:
    """Write the EMA generator + config.json, the metrics JSON, the TSV log and curves.png."""
    out = new_partial_dir(cfg.out_dir)
    export_weights(out, G_ema)
    write_json(out / "config.json", {
        "kind": "gan", "family": gcfg.family, "model": config_dict(gcfg), "fingerprint": fingerprint,
        "dataset": cfg.dataset, "class_names": class_names, "steps": cfg.steps,
        "latent": {"code_dim": gcfg.code_dim, "grid": gcfg.grid, "l2_norm": l2_norm}})
    last = {k: next((h[k] for h in reversed(history) if h.get(k) is not None), None) for k in log_keys(gcfg)[1:]}
    curve = [{"step": h["step"], "value": h["fid"]} for h in history if h.get("fid") is not None]
    metrics = {
        "kind": "gan", "family": gcfg.family, "attention_kind": gcfg.attention_kind, "steps": cfg.steps,
        "batch_size": cfg.batch_size, "g_params_m": round(g_params / 1e6, 3), "d_params_m": round(d_params / 1e6, 3),
        "g_loss": last["g_loss"], "d_loss": last["d_loss"], "r1": last["r1"],
        **({"gp": last["gp"]} if "gp" in last else {}),
        "d_acc_real": last["d_acc_real"], "d_acc_fake": last["d_acc_fake"],
        "fingerprint": fingerprint,
        "recipe": {"name": cfg.gan.recipe, "loss": gcfg.loss, "r1_gamma": gcfg.r1_gamma,
                   **({"gp_lambda": gcfg.gp_lambda, "wgan_drift": gcfg.wgan_drift} if gcfg.loss == "wgan-gp" else {}),
                   "n_critic": gcfg.n_critic, "grad_clip": gcfg.grad_clip, "lr_g": gcfg.lr_g, "lr_d": gcfg.lr_d,
                   "lr_decay_from": gcfg.lr_decay_from,
                   "betas": list(gcfg.betas), "ema_decay": gcfg.ema_decay, "diffaug": gcfg.diffaug,
                   "ms_weight": gcfg.ms_weight, "d_space": cfg.gan.d_space, "snap": cfg.gan.snap,
                   "image_reals": cfg.gan.image_reals if cfg.gan.d_space == "image" else None},
        "ms_ratio": last["ms_ratio"],
        # every FID carries its protocol (sample counts, reference split, resize, network hash, seed)
        "fid": {"value": curve[-1]["value"], "protocol": fid_protocol} if curve else None,
        "fid_curve": curve,
    }
    write_json(out / "metrics.json", metrics)
    plot_gan_curves(out / "curves.png", history, gcfg.family)
    replace_dir(out, Path(cfg.out_dir), "train_transformer")
    fid_columns = {"fid": curve[-1]["value"], "protocol": protocol_id(fid_protocol)} if curve else {}
    write_metrics(cfg.metrics, fid_columns, {
        "step_time_s": round(step_seconds, 5),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    write_tsv(Path(cfg.plots), history, log_keys(gcfg), stamp=run_log_path(cfg.metrics))
    log.info("GAN %s: D loss %.3f, G loss %.3f, D acc real %.2f fake %.2f, %.3f s/step%s", gcfg.family,
             last["d_loss"] or float("nan"), last["g_loss"] or float("nan"), last["d_acc_real"] or float("nan"),
             last["d_acc_fake"] or float("nan"), step_seconds,
             f", FID {curve[-1]['value']:.2f}" if curve else "")


def plot_gan_curves(path: Path, history: list[dict], family: str) -> None:
    """Losses, D accuracies and (when measured) FID against the step, rendered offline."""
    from pipeline.report import new_figure, save_figure
    fid_points = [(h["step"], h["fid"]) for h in history if h.get("fid") is not None]
    fig, axes = new_figure(1, 3 if fid_points else 2, figsize=(12 if fid_points else 8, 3.5))

    def series(key: str) -> tuple[list, list]:
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        return ([p[0] for p in pts], [p[1] for p in pts])

    for key in ("d_loss", "g_loss", "r1"):
        axes[0].plot(*series(key), label=key)
    axes[0].set_title(f"train_transformer (gan: {family})"), axes[0].set_xlabel("step"), axes[0].legend()
    for key in ("d_acc_real", "d_acc_fake"):
        axes[1].plot(*series(key), label=key)
    axes[1].set_ylim(-0.05, 1.05), axes[1].set_title("D accuracy"), axes[1].set_xlabel("step"), axes[1].legend()
    if fid_points:
        axes[2].plot(*zip(*fid_points), "o-")
        axes[2].set_title("FID (EMA generator)"), axes[2].set_xlabel("step")
    save_figure(fig, path)
