"""Stage-1 tokenizer models: quantizer, VQGAN, discriminator, LPIPS. CPU, small, fast."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import load_bench

from models.discriminator import (NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss,
                                  nonsaturating_d_loss, nonsaturating_g_loss)
from models.lpips import LPIPS, VGG16Trunk, shipped_weights_path
from models.quantizer import VectorQuantizer, fingerprint_codebook, nearest_codes
from models.vqgan import VQGAN, VQGANConfig


# ---------------------------------------------------------------- quantizer

def test_nearest_codes_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(200, 5, generator=g), torch.randn(37, 5, generator=g)
    assert torch.equal(nearest_codes(z, codebook), torch.cdist(z, codebook).argmin(1))


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=16, code_dim=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, indices, _ = vq(z)
    assert torch.allclose(z_q, vq.lookup(indices))  # forward value is the code
    upstream = torch.randn_like(z)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


def test_projection_path_trains_in_and_out_projections():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=16, code_dim=3, in_dim=6)
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    z_q, indices, aux = vq(z)
    assert z_q.shape == z.shape and indices.shape == (2, 3, 3)
    (z_q.sum() + aux["loss"]).backward()
    assert vq.in_proj.weight.grad.abs().sum() > 0 and vq.out_proj.weight.grad.abs().sum() > 0


def test_codebook_and_commitment_losses_hand_case():
    vq = VectorQuantizer(n_codes=2, code_dim=2, beta=0.25)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # two positions: (0.2, 0.1) -> code 0, (0.9, 1.2) -> code 1; squared errors .04+.01 and .01+.04 over 4 elements
    z = torch.tensor([[0.2, 0.9], [0.1, 1.2]]).view(1, 2, 1, 2).requires_grad_(True)
    _, indices, aux = vq(z)
    assert indices.flatten().tolist() == [0, 1]
    assert aux["commit_loss"].item() == pytest.approx(0.025)
    assert aux["codebook_loss"].item() == pytest.approx(0.025)
    assert aux["loss"].item() == pytest.approx(0.025 * 1.25)
    aux["loss"].backward()
    # codebook loss moves codes toward z: d/dc mean((c - z)^2) = 2 (c - z) / 4
    expected = torch.tensor([[0.0 - 0.2, 0.0 - 0.1], [1.0 - 0.9, 1.0 - 1.2]]) / 2
    assert torch.allclose(vq.codebook.grad, expected)
    # commitment loss moves z toward codes, scaled by beta
    assert torch.allclose(z.grad.view(2, 2).t(), -0.25 * expected)


def test_l2_norm_mode_returns_unit_norm_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=32, code_dim=8, l2_norm=True)
    vq.codebook.data *= 100.0  # far from unit length
    z_q, indices, _ = vq(torch.randn(2, 8, 4, 4) * 7)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    assert torch.allclose(vq.lookup(indices).norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


def test_kmeans_init_places_codes_on_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 5
    samples = centres.repeat_interleave(300, 0) + 0.01 * torch.randn(2400, 4, generator=g)
    vq = VectorQuantizer(n_codes=8, code_dim=4)
    vq.kmeans_init(samples, seed=0)
    dist = torch.cdist(vq.codebook.detach(), centres)
    assert dist.min(1).values.max() < 0.05          # every code sits on a cluster
    assert set(dist.argmin(1).tolist()) == set(range(8))  # and every cluster has a code


def test_dead_code_revival_restores_usage():
    torch.manual_seed(0)
    steps = 3
    vq = VectorQuantizer(n_codes=8, code_dim=2, dead_code_steps=steps, buffer_size=64).train()
    far = torch.tensor([[100.0 + i, 100.0] for i in range(7)])
    vq.codebook.data = torch.cat([torch.zeros(1, 2), far])  # every z near 0 picks code 0: a collapsed codebook
    for _ in range(steps):
        _, indices, aux = vq(torch.randn(2, 2, 4, 4) * 0.5)
        assert indices.unique().tolist() == [0]
    assert torch.equal(vq.codebook.data[1:], far)  # not revived before N steps
    buffered = vq.z_buffer.clone()

    _, indices, aux = vq(torch.randn(2, 2, 4, 4) * 0.5)  # step N+1
    revived = vq.codebook.data[1:]
    assert (torch.cdist(revived, buffered).min(1).values < 1e-6).all()  # each dead code is a buffered output
    assert indices.unique().numel() > 1 and aux["usage_fraction"].item() > 1 / 8
    assert vq.steps_unused.max().item() <= 1


def test_ema_moves_codes_toward_assigned_mean():
    decay, eps = 0.5, 1e-5
    vq = VectorQuantizer(n_codes=2, code_dim=2, ema=True, ema_decay=decay, ema_eps=eps).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.ema_embed_sum.copy_(vq.codebook)
    z = (torch.tensor([1.0, 1.0]).view(1, 2, 1, 1) + 0.1 * torch.randn(1, 2, 3, 3))
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    _, indices, aux = vq(z)
    assert indices.unique().tolist() == [0] and aux["codebook_loss"].item() == 0.0
    # hand-computed EMA update with Laplace smoothing
    size = torch.tensor([decay + (1 - decay) * 9, decay])
    embed = torch.stack([decay * torch.zeros(2) + (1 - decay) * z_flat.sum(0), decay * torch.tensor([10.0, 10.0])])
    n = size.sum()
    expected = embed / ((size + eps) / (n + 2 * eps) * n)[:, None]
    assert torch.allclose(vq.codebook, expected, atol=1e-5)
    mean = z_flat.mean(0)
    assert (vq.codebook[0] - mean).norm() < 0.6 * mean.norm()  # moved most of the way from the origin
    assert torch.allclose(vq.codebook[1], torch.tensor([10.0, 10.0]), atol=1e-3)  # unused code stays


def test_state_dict_captures_everything_needed_to_resume():
    def make():
        return VectorQuantizer(n_codes=16, code_dim=3, l2_norm=True, ema=True, dead_code_steps=2, buffer_size=32)

    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 4, 4) for _ in range(6)]
    a = make().train()
    for z in batches[:3]:
        a(z)
    b = make().train()
    b.load_state_dict(a.state_dict())
    for z in batches[3:]:  # includes revivals (codes unused for 2 steps)
        a(z)
        b(z)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert {"steps_unused", "code_counts", "z_buffer", "ema_cluster_size", "ema_embed_sum"} <= set(a.state_dict())


def test_usage_stats_hand_case():
    vq = VectorQuantizer(n_codes=4, code_dim=2)
    stats = vq.usage_stats(torch.tensor([[0, 0], [1, 1]]))
    assert stats == {"usage_fraction": 0.5, "perplexity": pytest.approx(2.0), "dead_codes": 2}
    assert vq.usage_stats(torch.tensor([0, 1, 2, 3]))["perplexity"] == pytest.approx(4.0)


def test_fingerprint_changes_with_one_codebook_entry_and_config():
    vq = VectorQuantizer(n_codes=8, code_dim=4)
    cfg = {"n_codes": 8, "code_dim": 4, "ch_mult": [1, 2]}
    fp = vq.codebook_fingerprint(cfg)
    assert fp == fingerprint_codebook(vq.codebook.detach().clone(), dict(reversed(cfg.items())))  # canonical JSON
    assert vq.codebook_fingerprint({**cfg, "n_codes": 9}) != fp
    vq.codebook.data[5, 2] += 1e-3
    assert vq.codebook_fingerprint(cfg) != fp


# ---------------------------------------------------------------- VQGAN

def tiny_config(in_channels: int, ch_mult: tuple[int, ...]) -> VQGANConfig:
    return VQGANConfig(in_channels=in_channels, ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=8,
                       n_codes=16, code_dim=4, dead_code_steps=0)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("ch_mult,f", [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_vqgan_shapes_and_decode_indices_roundtrip(in_channels, ch_mult, f):
    torch.manual_seed(0)
    model = VQGAN(tiny_config(in_channels, ch_mult))
    assert model.cfg.downsample == f
    x = torch.rand(2, in_channels, 16, 16) * 2 - 1
    recon, aux = model(x)
    assert recon.shape == x.shape
    z_q, indices, stats = model.encode(x)
    assert z_q.shape == (2, 4, 16 // f, 16 // f) and indices.shape == (2, 16 // f, 16 // f)
    assert {"loss", "codebook_loss", "commit_loss", "perplexity", "usage_fraction"} <= set(stats)
    model.eval()
    with torch.no_grad():
        recon, aux = model(x)
        assert torch.equal(model.decode_indices(aux["indices"]), recon)


def test_vqgan_gradients_reach_encoder_and_last_layer():
    torch.manual_seed(0)
    model = VQGAN(tiny_config(1, (1, 2)))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    recon, aux = model(x)
    ((recon - x).pow(2).mean() + aux["loss"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through quantizer
    assert model.last_layer() is model.decoder.conv_out.weight and model.last_layer().grad is not None
    assert model.codebook_fingerprint() != VQGAN(tiny_config(1, (1, 2))).codebook_fingerprint()


# ---------------------------------------------------------------- discriminator

def test_discriminator_output_shapes():
    x = torch.randn(2, 3, 32, 32)
    assert NLayerDiscriminator(3, ndf=8, n_layers=3)(x).shape == (2, 1, 2, 2)
    assert NLayerDiscriminator(1, ndf=8, n_layers=2, norm="group")(x[:, :1]).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError):
        NLayerDiscriminator(3, norm="instance")


def test_gan_losses_hand_values():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)   # 0.5 * (mean(0, 1) + mean(0, 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    sp = torch.nn.functional.softplus
    assert nonsaturating_d_loss(real, fake).item() == pytest.approx(0.5 * (sp(-real).mean() + sp(fake).mean()).item())
    assert nonsaturating_g_loss(torch.zeros(3)).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_adaptive_weight_matches_hand_formula():
    torch.manual_seed(0)
    last = nn.Linear(3, 2, bias=False)
    x, target = torch.randn(4, 3), torch.randn(4, 2)
    y = last(x)
    rec_loss = (y - target).pow(2).mean()
    g_loss = -5.0 * y.mean()
    # d rec / dW = 2 (y - t)^T x / 8 ;  d g / dW = -5 * 1^T x / 8
    grad_rec = 2 * (y - target).detach().t() @ x / 8
    grad_g = -5.0 * torch.ones(4, 2).t() @ x / 8
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4)
    w = adaptive_weight(rec_loss, g_loss, last.weight)
    assert not w.requires_grad
    assert w.item() == pytest.approx(expected.item(), rel=1e-5)
    assert adaptive_weight(rec_loss, g_loss, last.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    (rec_loss + w * g_loss).backward()  # graph retained for the real backward


# ---------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    try:
        path = shipped_weights_path()
    except FileNotFoundError as exc:
        pytest.skip(f"stlpips-pytorch not installed: {exc}")
    if not path.is_file():
        pytest.skip(f"shipped LPIPS weights absent: {path}")
    return LPIPS()


def test_lpips_loads_shipped_shift_tolerant_weights(lpips):
    sd = torch.load(shipped_weights_path(), map_location="cpu", weights_only=True)
    assert lpips.variant_info()["variant"] == "shift_tolerant"
    assert torch.equal(lpips.trunk.features[0].weight, sd["net.slice1.0.weight"])
    assert torch.equal(lpips.trunk.features[32].bias, sd["net.slice5.32.bias"])
    assert torch.equal(lpips.lins[4].weight, sd["lin4.model.1.weight"])
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training


def test_lpips_zero_positive_ordered_symmetric(lpips):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 32, 32, generator=g)
    near, far = (x + 0.05 * noise).clamp(-1, 1), (x + 0.5 * noise).clamp(-1, 1)
    with torch.no_grad():
        assert torch.equal(lpips(x, x), torch.zeros(3))
        d_near, d_far = lpips(x, near), lpips(x, far)
        assert (d_near > 0).all() and (d_far > d_near).all()
        assert torch.allclose(lpips(far, x), d_far, rtol=1e-5)


def test_lpips_equals_the_st_lpips_reference(lpips):
    """Values the reference package (stlpips-pytorch 0.0.2's own network, torch 2.14.1) gives on the inputs of
    scripts/lpips_reference.py, which printed them; tokenmill's LPIPS matched them exactly there. The tolerance
    allows for float32 convolutions summed in another order on another CPU or torch."""
    reference = [[0.0123746516, 0.0126742125, 0.0124383038, 0.0122255245],
                 [0.0687679648, 0.0696711093, 0.0728485808, 0.069917582]]
    net = LPIPS()  # built here, not taken from the module fixture, so that mutation testing credits the constructor
    with torch.no_grad():
        got = [net(a, b).flatten().tolist() for a, b in load_bench("lpips_reference", "scripts").inputs()]
    for row, want in zip(got, reference):
        assert row == pytest.approx(want, rel=1e-4)


def test_lpips_grey_input_and_gradient(lpips):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 1, 24, 24, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 1, 24, 24, generator=g) * 2 - 1
    d = lpips(x, y)
    assert torch.allclose(d, lpips(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
    d.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="18x18"):
        lpips(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))


def test_lpips_bad_weight_files(tmp_path, lpips):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        LPIPS(tmp_path / "nothere.pth")
    bogus = tmp_path / "bogus.pth"
    torch.save({"foo": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="bogus.pth"):
        LPIPS(bogus)
    # the original LPIPS release ships heads only: it needs torchvision-layout VGG16 weights next to it
    heads = tmp_path / "vgg.pth"
    torch.save({f"lin{i}.model.1.weight": lin.weight.clone() for i, lin in enumerate(lpips.lins)}, heads)
    with pytest.raises(ValueError, match="vgg_path"):
        LPIPS(heads)
    vgg = tmp_path / "vgg16.pth"
    torch.save({k: v for k, v in VGG16Trunk(shift_tolerant=False).state_dict().items()}, vgg)
    standard = LPIPS(heads, vgg_path=vgg)
    assert standard.variant == "vgg"
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert standard(x, x).item() == 0.0 and standard(x, -x).item() > 0
