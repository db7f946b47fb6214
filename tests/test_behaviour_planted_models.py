"""Behaviour of the latent-space GAN layers, the Swin shift rule, the FID network wrapper, the VQGAN validation
metrics and k-means seeding, and two evaluation-stage contracts that the rest of the suite let through. Each test was
written against a realistic one-line bug planted by hand (a round over models/gan_*.py, models/discriminator.py,
models/gan.py, the window / YLG / mask parts of models/attention.py, models/inception.py, models/lpips.py,
training/vqgan.py and the eval_vqgan / fid_ref / evaluate stages) that every existing test passed with; each fails
with its bug and passes without it. Planted changes found to be equivalent (no input tells them apart) are not
pinned here.

Each test pins one behaviour on inputs where the wrong variant gives another answer, against an independent
computation written here (a naive loop, or the documented formula over the module's own sub-layers). Module outputs
are compared in float64 with tolerance 1e-12 (TOL): far above float64 rounding of these few operations, far below
any planted difference (1e-2 and more). The stage-level tests run in the stages' float32 and state their tolerance
where they assert. CPU, tiny shapes, fixed seeds, stand-in networks: the whole file runs in a few seconds.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.attention import MultiHeadAttention
from models.gan_common import LadaConfig, TransGANConfig, TransformerBlock, diff_augment
from models.gan_lada import DownBlock, LadaDiscriminator, SelfModulatedLayerNorm
from models.gan_pixel_d import PixelDiscriminator
from models.gan_stransgan import AdaNorm, SkipProjectionBlock, swin_attention
from models.gan_transgan import RelativePositionBias, TransGANDiscriminator
from models.inception import FIDInception
from pipeline.errors import UserError
from pipeline.fid_reference import NetworkParams, load_reference
from pipeline.sandbox import write_idx
from stages import eval_vqgan, fid_ref
from stages.evaluate import SampleStream
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
from stages.prepare import run as prepare_run
from training.vqgan import evaluate, kmeans_init

TOL = dict(rtol=1e-12, atol=1e-12)  # float64 throughout the compared values


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float64 and every parameter redrawn, so that layers that start equal (two LayerNorms at 1 / 0) differ."""
    module.double()
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype) + (1.0 if p.dim() == 1 else 0.0))
    return module


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis without affine, written out (biased variance, eps 1e-5 as nn.LayerNorm)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


# --------------------------------------------------------------------------------------------- shared layers

def test_transformer_block_normalises_each_branch_with_its_own_layer_norm():
    """x + Attn(LN1(x)), then x + MLP(LN2(x)): after training the two LayerNorms differ, so the MLP branch must read
    norm2 (at init both are 1 / 0 and a swapped norm would not show)."""
    block = randomise(TransformerBlock(8, MultiHeadAttention(8, 2, bias=True, backend="math"), 2.0), seed=0)
    x = randn(2, 5, 8, seed=1)
    with torch.no_grad():
        ln1 = layer_norm(x) * block.norm1.weight + block.norm1.bias
        h = x + block.attn(ln1)
        ln2 = layer_norm(h) * block.norm2.weight + block.norm2.bias
        want = h + block.mlp(ln2)
        assert torch.allclose(block(x), want, **TOL)


def test_translation_moves_each_sample_by_its_drawn_offset_in_the_documented_direction():
    """out[i, j] = x[i - dy, j - dx] with dy then dx drawn from the generator (one per sample, in [-s, s]). The
    random offsets are symmetric, so a sign flipped on one axis keeps the distribution but moves every seeded run's
    sample the other way: the seeded runs are pinned here, sample by sample, against a naive loop."""
    B, C, h, w = 12, 2, 8, 8
    x = randn(B, C, h, w, seed=2)
    out = diff_augment(x, "translation", gen(5))
    g = gen(5)
    s = 1  # round(8 * 0.125)
    dy = torch.randint(-s, s + 1, (B,), generator=g)
    dx = torch.randint(-s, s + 1, (B,), generator=g)
    assert (dy != 0).any() and (dx != 0).any() and (dy != dx).any()
    want = torch.zeros_like(x)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                si, sj = i - int(dy[b]), j - int(dx[b])
                if 0 <= si < h and 0 <= sj < w:
                    want[b, :, i, j] = x[b, :, si, sj]
    assert torch.equal(out, want)


# --------------------------------------------------------------------------------------------- TransGAN

def test_relative_position_bias_leaves_the_prefix_rows_and_columns_first_and_zero():
    """D's class token comes first in the sequence: the bias rows and columns of the prefix are the leading ones and
    hold zeros; entry (1 + i, 1 + j) is the table's entry for the 2-D offset between grid tokens i and j."""
    torch.manual_seed(0)
    side, heads = 3, 2
    rb = RelativePositionBias(side, heads, prefix=1)
    out = rb().detach()
    assert out.shape == (heads, side * side + 1, side * side + 1)
    assert (out[:, 0] == 0).all() and (out[:, :, 0] == 0).all()
    table = rb.table.detach()
    for i in range(side * side):
        for j in range(side * side):
            (ri, ci), (rj, cj) = divmod(i, side), divmod(j, side)
            entry = (ri - rj + side - 1) * (2 * side - 1) + (ci - cj + side - 1)
            assert torch.equal(out[:, 1 + i, 1 + j], table[entry])


def test_transgan_discriminator_adds_the_first_position_to_the_class_token_and_the_rest_to_the_patches():
    cfg = TransGANConfig(code_dim=4, grid=4, d_dim=8, d_depth=1, n_heads=2, backend="math")
    torch.manual_seed(0)
    D = TransGANDiscriminator(cfg).double().eval()
    with torch.no_grad():
        D.pos.copy_(randn(*D.pos.shape, seed=3))  # positions far from each other, not 0.02-small
    seen = []
    D.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = randn(2, 4, 4, 4, seed=4)
    with torch.no_grad():
        D(x)
        patches = D.embed(x).flatten(2).transpose(1, 2)  # (B, 16, C), raster order
        cls = D.cls.expand(2, -1, -1)
    want = torch.cat([cls + D.pos[:, :1], patches + D.pos[:, 1:]], dim=1)
    assert torch.allclose(seen[0], want, **TOL)


# --------------------------------------------------------------------------------------------- STransGAN

@pytest.mark.parametrize("side, window, index, shift", [
    (8, 4, 0, 0), (8, 4, 1, 2), (8, 4, 3, 2), (4, 4, 1, 0), (2, 4, 1, 0), (8, 2, 1, 1)])
def test_swin_blocks_shift_odd_blocks_by_half_a_window_unless_one_window_covers_the_grid(side, window, index, shift):
    attn = swin_attention("native", 8, 2, side, window, index, "math")
    assert attn.shift == shift and attn.window == min(window, side)


def test_a_single_window_block_lets_every_token_attend_every_other():
    """window == side: one window covers the grid, nothing is shifted, so the first token's output depends on the
    last token (a half-window shift would cut the grid into regions that never meet)."""
    torch.manual_seed(0)
    attn = swin_attention("native", 8, 2, 4, 4, 1, "math").double()
    x = randn(1, 16, 8, seed=5).requires_grad_(True)
    attn(x)[0, 0].sum().backward()
    assert x.grad[0, 15].abs().sum() > 1e-6


def test_ada_norm_scales_by_one_plus_gamma_and_shifts_by_beta():
    norm = AdaNorm(6, 3).double()
    with torch.no_grad():
        norm.affine.weight.zero_()
        norm.affine.bias.copy_(torch.cat([torch.full((6,), 0.5), torch.full((6,), -2.0)]).double())
    x, c = randn(2, 5, 6, seed=6), randn(2, 3, seed=7)
    with torch.no_grad():
        assert torch.allclose(norm(x, c), layer_norm(x) * 1.5 - 2.0, **TOL)
        norm.affine.weight.copy_(randn(12, 3, seed=8))
        gamma, beta = norm.affine(c)[:, None].chunk(2, dim=-1)
        assert torch.allclose(norm(x, c), layer_norm(x) * (1 + gamma) + beta, **TOL)


def test_skip_projection_block_projects_each_skip_with_its_own_layer():
    """x <- Attn(LN1(x)) + P1 x; x <- MLP(LN2(x)) + P2 x: the second skip is P2 of the updated stream."""
    torch.manual_seed(0)
    block = SkipProjectionBlock(8, swin_attention("native", 8, 2, 4, 2, 0, "math"), 2.0).double()
    assert not torch.equal(block.skip1.weight, block.skip2.weight)
    x = randn(2, 16, 8, seed=9)
    with torch.no_grad():
        h = block.attn(layer_norm(x)) + F.linear(x, block.skip1.weight * block.skip1.scale)
        want = block.mlp(layer_norm(h)) + F.linear(h, block.skip2.weight * block.skip2.scale)
        assert torch.allclose(block(x), want, **TOL)


# --------------------------------------------------------------------------------------------- LadaGAN

def test_self_modulated_layer_norm_by_hand():
    """SLN(x, w) = LN(x) * (1 + gamma(h)) + beta(h), h = ReLU(hidden(w)): gamma and beta are two heads."""
    sln = randomise(SelfModulatedLayerNorm(6, 4), seed=10)
    x, w = randn(2, 5, 6, seed=11), randn(2, 4, seed=12)
    with torch.no_grad():
        h = torch.relu(w @ sln.hidden[0].weight.T + sln.hidden[0].bias)
        gamma = h @ sln.gamma.weight.T + sln.gamma.bias
        beta = h @ sln.beta.weight.T + sln.beta.bias
        assert torch.allclose(sln(x, w), layer_norm(x) * (1 + gamma[:, None]) + beta[:, None], **TOL)


def test_down_block_averages_its_two_paths():
    block = randomise(DownBlock(3, 4), seed=13).eval()  # eval: batch norm with its running statistics
    x = randn(2, 3, 8, 8, seed=14)
    with torch.no_grad():
        main, direct = block.main(x), block.direct(x)
        assert main.abs().mean() > 0.05 and direct.abs().mean() > 0.05
        assert torch.allclose(block(x), (main + direct) / 2, **TOL)


def test_lada_discriminator_logit_is_the_mean_of_its_logit_map():
    """With d_grid 8 on an 8x8 grid the head's stride-2 conv leaves a 2x2 logit map; the logit is its mean (with
    the default d_grid 4 the map is 1x1 and mean and sum agree)."""
    cfg = LadaConfig(code_dim=4, grid=8, d_grid=8, d_base=4, d_depth=1, n_heads=2)
    torch.manual_seed(0)
    D = LadaDiscriminator(cfg).double().eval()
    maps = []
    D.head.register_forward_hook(lambda m, a, o: maps.append(o))
    with torch.no_grad():
        logit = D(randn(3, 4, 8, 8, seed=15))
    assert maps[0].shape == (3, 1, 2, 2)
    assert torch.allclose(logit, maps[0].mean(dim=(1, 2, 3)), **TOL)


# --------------------------------------------------------------------------------------------- image discriminator

def test_pixel_discriminator_sum_pools_its_features_for_the_head_and_the_projection():
    torch.manual_seed(0)
    D = PixelDiscriminator(1, 8, base=4, n_classes=3).double()
    x, y = randn(2, 1, 8, 8, seed=16), torch.tensor([2, 0])
    with torch.no_grad():
        fmap = D.body(x)
        assert fmap.shape[-2:] == (4, 4)
        h = torch.zeros(2, fmap.shape[1], dtype=torch.float64)
        for i in range(4):
            for j in range(4):
                h += fmap[:, :, i, j]
        want = (h @ D.head.weight.T + D.head.bias).squeeze(1) + (D.embed.weight[y] * h).sum(1)
        assert torch.allclose(D(x, y), want, **TOL)


# --------------------------------------------------------------------------------------------- FID network wrapper

class _StubNet(torch.nn.Module):
    """A stand-in FID network saved as TorchScript (what FIDInception loads): dropout, so train and eval mode give
    different outputs, then the per-image mean, so any input size runs."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x).mean(dim=(1, 2, 3))[:, None]


@pytest.fixture
def stub_inception(tmp_path):
    path = tmp_path / "stub.pt"
    torch.jit.save(torch.jit.script(_StubNet()), str(path))
    return FIDInception(path, "0" * 64)


def test_fid_wrapper_refuses_images_that_are_not_299_pixels(stub_inception):
    """The TorchScript network has no resize: another size yields wrong features (or several rows per image), so
    the wrapper stops before calling it."""
    with pytest.raises(ValueError, match="299"):
        stub_inception(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="299"):
        stub_inception(torch.zeros(1, 3, 299, 298))
    assert stub_inception(torch.zeros(2, 3, 299, 299)).shape == (2, 1)


def test_fid_wrapper_runs_the_network_in_eval_mode(stub_inception):
    """The real network's batch norms must use their stored statistics: the loaded module is put in eval mode (here
    its dropout is then the identity, so ones stay ones)."""
    assert not stub_inception.net.training
    torch.manual_seed(0)
    assert torch.equal(stub_inception(torch.ones(2, 3, 299, 299)), torch.ones(2, 1))


# --------------------------------------------------------------------------------------------- VQGAN validation metrics

class _OffsetVQGAN(torch.nn.Module):
    """A VQGAN stand-in whose reconstruction of image k is the image plus offsets[k] (model range), with fixed token
    indices: the metrics of `training.vqgan.evaluate` are then known in closed form."""

    def __init__(self, offsets: list[float], n_codes: int):
        super().__init__()
        self.offsets, self.seen = offsets, 0
        quantizer = torch.nn.Module()
        quantizer.n_codes = n_codes
        quantizer.usage_stats = self._usage
        self.quantizer = quantizer

    def _usage(self, indices: torch.Tensor) -> dict:
        counts = torch.bincount(indices.flatten(), minlength=self.quantizer.n_codes)
        return {"usage_fraction": float((counts > 0).sum()) / len(counts), "perplexity": 1.0,
                "dead_codes": int((counts == 0).sum())}

    def forward(self, x: torch.Tensor):
        k = self.seen
        self.seen += len(x)
        offsets = torch.tensor(self.offsets[k:k + len(x)], dtype=x.dtype).view(-1, 1, 1, 1)
        return x + offsets, {"indices": torch.arange(k, k + len(x))[:, None].repeat(1, 4) % 3}


def test_vqgan_validation_l1_and_psnr_are_per_image_means_on_the_documented_scales():
    """val_l1: mean |recon - x| in model units ([-1, 1]), averaged over images; val_psnr: the mean over images of
    -10 log10(MSE) with the MSE on the [0, 1] pixel scale (a 0.2 error in model units is 0.1 in pixels: 20 dB). Five
    images in batches of two: the means are over images, not batches."""
    offsets = [0.2, -0.1, 0.4, 0.05, -0.3]
    images = torch.full((5, 1, 4, 4), 128, dtype=torch.uint8)  # model range ~0.004: no clamping at +-0.4
    metrics, recons = evaluate(_OffsetVQGAN(offsets, n_codes=4), images, None, torch.device("cpu"), batch=2)
    l1 = sum(abs(o) for o in offsets) / 5
    psnr = sum(-10 * math.log10((o / 2) ** 2) for o in offsets) / 5
    assert metrics["val_images"] == 5 and recons.shape == images.shape
    assert metrics["val_l1"] == pytest.approx(l1, rel=1e-6)  # float32 sums of 16-pixel means
    assert metrics["val_psnr"] == pytest.approx(psnr, rel=1e-6)
    assert -10 * math.log10((0.2 / 2) ** 2) == pytest.approx(20.0)
    assert metrics["code_usage_pct"] == pytest.approx(75.0) and metrics["dead_codes"] == 1  # codes 0..2 of 4
    assert "val_lpips" not in metrics  # no LPIPS given


def test_kmeans_init_gets_one_vector_per_latent_cell_with_the_channels_as_its_entries():
    """The codebook's k-means runs on the encoder's (B, C, h, w) output read as B h w vectors of C entries (channels
    last), not on the flat memory cut into C-sized pieces."""
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quantizer = torch.nn.Module()
            self.quantizer.kmeans_init = lambda vectors, seed: seen.update(vectors=vectors, seed=seed)

        def encode_latent(self, x):  # (B, 1, h, w) -> (B, 2, h, w): channel 0 the pixel, channel 1 the pixel + 100
            return torch.cat([x, x + 100], dim=1)

    seen: dict = {}
    images = torch.arange(2 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3)
    kmeans_init(Encoder(), images, seed=7, device=torch.device("cpu"))
    x = images.double() / 127.5 - 1
    want = [[float(x[b, 0, i, j]), float(x[b, 0, i, j]) + 100] for b in range(2) for i in range(2) for j in range(3)]
    assert seen["seed"] == 7 and seen["vectors"].shape == (12, 2)
    # float32 entries up to ~101 (spacing 7.6e-6); a channels-first read is off by ~100 in the second entry
    assert torch.allclose(seen["vectors"].double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------- evaluation stages

class _PoolNet(torch.nn.Module):
    """Stand-in FID network: 4x4 average pool of the first channel (16-d features); per image, so a sample's
    features do not depend on the batch it was computed in."""
    feature_network_hash = "stub"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x[:, :1], 4).flatten(1)


class _IdentityVQGAN(torch.nn.Module):
    """A VQGAN that reconstructs every image exactly."""

    def __init__(self):
        super().__init__()
        self.cfg = type("Cfg", (), {"in_channels": 1, "downsample": 1})()

    def forward(self, x: torch.Tensor):
        return x.clone(), {}


def test_eval_vqgan_pairs_each_reconstruction_with_its_own_reference_image(tmp_path, monkeypatch):
    """rFID reconstructs the reference's first n images; the paired feature distance compares reconstruction i with
    reference row i. A perfect reconstruction is then at distance 0 from every original, also when n is smaller than
    the reference (where the last n rows are other images)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    for stem, n in (("train", 2), ("t10k", 8)):
        write_idx(src / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 16, 16)))
        write_idx(src / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 2)
    prepare_run(PrepareConfig("tiny", DatasetSpec(source="idx", path=str(src), resolution=16, class_names=["a", "b"]),
                              PrepareParams(out_dir=str(tmp_path / "prepared"))))
    net = _PoolNet()
    ref_cfg = fid_ref.FidRefParams(dataset="tiny", prepared_dir=str(tmp_path / "prepared"),
                                   out_dir=str(tmp_path / "ref"), n_ref=None,
                                   network=NetworkParams(batch_size=8, device="cpu"))
    monkeypatch.setattr(fid_ref, "load_network", lambda p: (net, torch.device("cpu")))
    fid_ref.run(ref_cfg)
    ref = load_reference(ref_cfg.folder)
    assert np.linalg.norm(ref.features[:4] - ref.features[-4:], axis=1).min() > 0.1  # other images, other features

    seen = {}
    monkeypatch.setattr(eval_vqgan, "load_network", lambda p: (net, torch.device("cpu")))
    monkeypatch.setattr(eval_vqgan, "load_vqgan", lambda d, device: (_IdentityVQGAN(), {"fingerprint": "f" * 64}))
    monkeypatch.setattr(eval_vqgan, "sha256_file", lambda path: "0" * 64)
    monkeypatch.setattr(eval_vqgan, "write_report", lambda *args: seen.update(distance=args[7]))
    cfg = eval_vqgan.EvalVQGANParams(dataset="tiny", prepared_dir=str(tmp_path / "prepared"),
                                     reference=str(ref_cfg.folder), n_images=4, kid_subsets=2,
                                     metrics=str(tmp_path / "m.json"), report_dir=str(tmp_path / "report"),
                                     network=NetworkParams(batch_size=3, device="cpu"))
    eval_vqgan.run(cfg)
    assert seen["distance"].shape == (4,)
    np.testing.assert_allclose(seen["distance"], 0.0, atol=1e-4)  # float32 features of the same uint8 images


def test_evaluate_refuses_a_label_equal_to_the_number_of_classes():
    """Labels of a conditional sample set run 0 .. n_classes - 1: label n_classes is one past the last class."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    manifest = {"resolution": 4, "channels": 1, "class_names": ["a", "b"], "conditional": True,
                "token_dtype": "uint16", "grid": [2, 2], "n_codes": 8}
    stream = SampleStream(Path("unused"), manifest, limit=10, grid_per_class=1)  # _sample reads no folder
    tok = np.array([0, 1, 2, 7], dtype="<u2").tobytes()
    for label in (0, 1):
        stream._sample(f"s{label}", {"png": buf.getvalue(), "cls": str(label).encode(), "tok": tok})
    assert stream.labels == [0, 1]
    with pytest.raises(UserError, match="label 2 is outside the 2 classes"):
        stream._sample("s2", {"png": buf.getvalue(), "cls": b"2", "tok": tok})
    with pytest.raises(UserError, match="label -1 is outside the 2 classes"):
        stream._sample("s3", {"png": buf.getvalue(), "cls": b"-1", "tok": tok})
