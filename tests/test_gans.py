"""Tests for the transformer GANs in the latent space (models/gan_common.py, gan_lada.py, gan_transgan.py,
gan_stransgan.py): shapes, each family's signature behaviour, the shared pieces (DiffAugment, R1, EMA, equalized lr)
and a few seeded training steps per family. CPU, tiny configs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.attention import GridAttention, LadaAttention, MultiHeadAttention, WindowAttention, YLGAttention
from models.gan_common import (FAMILIES, LadaConfig, STransGANConfig, TransGANConfig, d_loss, diff_augment, g_loss,
                               gan_config, minibatch_std, r1_penalty)
from models.gan import build_discriminator, build_generator
from training.common import EMA
from models.gan_lada import LadaDiscriminator, LadaGenerator, LadaGeneratorBlock, SelfModulatedLayerNorm
from models.gan_stransgan import (EqualConv2d, EqualLinear, SkipProjectionBlock, STransDiscriminator,
                                  STransGenerator, TrunkAdaNormBlock)
from models.gan_transgan import (TransGANDiscriminator, TransGANGenerator, locality_mask, locality_radius,
                                 sr_loss)

TINY = {
    "lada": dict(g_dims=(32, 16), d_base=8, d_depth=1),
    "transgan": dict(g_dim=64, g_depths=(1, 1), grid_attention_min=4, grid_cell=2, d_dim=16, d_depth=1),
    "stransgan": dict(g_dims=(32, 16), g_depth=2, window=2, d_dim=16, d_depth=2),
}
NATIVE = {"lada": (LadaAttention,), "transgan": (GridAttention,), "stransgan": (WindowAttention,)}


def tiny(family: str, **overrides):
    fields = dict(code_dim=8, grid=4, z_dim=16, class_dim=8, n_heads=4, mlp_ratio=2.0)
    fields.update(TINY[family])
    fields.update(overrides)
    return gan_config(family, **fields)


def models(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_generator(cfg), build_discriminator(cfg)


def noise(n: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# --- shapes and dispatch --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("grid", [4, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_shapes(family, grid, conditional):
    cfg = tiny(family, grid=grid, n_classes=3 if conditional else 0)
    G, D = models(cfg)
    y = torch.tensor([0, 2, 1]) if conditional else None
    x = G(noise(3, cfg.z_dim), y)
    assert x.shape == (3, cfg.code_dim, grid, grid)
    assert D(x, y).shape == (3,)
    assert torch.isfinite(x).all()


def test_build_dispatch_and_config_checks():
    classes = {"lada": (LadaGenerator, LadaDiscriminator), "transgan": (TransGANGenerator, TransGANDiscriminator),
               "stransgan": (STransGenerator, STransDiscriminator)}
    for family, (g_cls, d_cls) in classes.items():
        G, D = models(tiny(family))
        assert type(G) is g_cls and type(D) is d_cls
    assert isinstance(gan_config("lada"), LadaConfig) and isinstance(gan_config("transgan"), TransGANConfig)
    assert isinstance(gan_config("stransgan", betas=[0.0, 0.9]), STransGANConfig)
    assert gan_config("stransgan", betas=[0.0, 0.9]).betas == (0.0, 0.9)  # YAML lists become tuples
    assert gan_config("lada", g_dims=[64, 32]) == gan_config("lada", g_dims=(64, 32))
    with pytest.raises(ValueError, match="attention_kind"):
        gan_config("lada", attention_kind="window")
    with pytest.raises(ValueError, match="multiple of 4"):
        gan_config("lada", attention_kind="ylg", n_heads=2)
    with pytest.raises(ValueError, match="power of two"):
        gan_config("lada", grid=6)
    with pytest.raises(ValueError, match="family"):
        gan_config("stylegan")


def test_labels_required_exactly_when_conditional():
    G, D = models(tiny("lada", n_classes=3))
    with pytest.raises(ValueError, match="conditional"):
        G(noise(2, 16))
    G0, D0 = models(tiny("lada"))
    with pytest.raises(ValueError, match="unconditional"):
        D0(torch.zeros(2, 8, 4, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("kind,expected", [("ylg", YLGAttention), ("full", MultiHeadAttention)])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_kind_swaps_attention(family, kind, expected):
    cfg = tiny(family, grid=8, attention_kind=kind)
    G, D = models(cfg)
    for net in (G, D):
        kinds = {type(m) for m in net.modules()}
        assert expected in kinds, f"{type(net).__name__} has no {expected.__name__}"
        assert not kinds & set(NATIVE[family]), f"{type(net).__name__} still has its native attention"
    if kind == "ylg":  # everywhere in G: no full attention left either
        assert MultiHeadAttention not in {type(m) for m in G.modules()}
    x = G(noise(2, cfg.z_dim))
    assert x.shape == (2, 8, 8, 8) and D(x).shape == (2,)


def test_native_attention_is_the_familys():
    lada_g, lada_d = models(tiny("lada", grid=8))
    assert all(isinstance(b.attn, LadaAttention) for b in lada_g.modules() if isinstance(b, LadaGeneratorBlock))
    assert any(isinstance(m, LadaAttention) for m in lada_d.modules())
    trans_g, _ = models(tiny("transgan", grid=8))  # stages 4x4 (grid attention: side >= 4 > cell 2) and 8x8
    assert [type(s[0].attn) for s in trans_g.stages] == [GridAttention, GridAttention]
    trans_g, _ = models(tiny("transgan", grid=8, grid_attention_min=8))
    assert [type(s[0].attn) for s in trans_g.stages] == [MultiHeadAttention, GridAttention]
    st_g, st_d = models(tiny("stransgan", grid=8))
    shifts = [b.attn.shift for s in st_g.stages for b in s]
    assert shifts == [0, 1, 0, 1]  # alternating shifted windows (window 2 on 4x4 and 8x8)


# --- conditioning ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_class_changes_generator_output(family):
    cfg = tiny(family, n_classes=4)
    G, _ = models(cfg)
    z = noise(1, cfg.z_dim).repeat(2, 1)
    x = G(z, torch.tensor([0, 3]))
    assert not torch.allclose(x[0], x[1], atol=1e-4)


def test_sln_is_modulated_by_its_input_vector():
    torch.manual_seed(0)
    sln = SelfModulatedLayerNorm(8, 5)
    x = torch.randn(1, 6, 8).repeat(2, 1, 1)
    out = sln(x, torch.randn(2, 5))
    assert not torch.allclose(out[0], out[1])
    # with the modulation heads zeroed it is a plain (affine-free) LayerNorm
    for head in (sln.gamma, sln.beta):
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    assert torch.allclose(sln(x, torch.randn(2, 5)), F.layer_norm(x, (8,)), atol=1e-6)


def test_trunk_adanorm_carries_the_class_on_the_skip_path():
    """With both residual branches silenced, a branch-AdaNorm block would return its input unchanged (the class
    would only reach the branches). Trunk AdaNorm normalises and modulates the stream itself, so the output still
    depends on the class, and equals AdaNorm_2(AdaNorm_1(x, c), c)."""
    cfg = tiny("stransgan", n_classes=4)
    G, _ = models(cfg)
    block = G.stages[0][0]
    assert isinstance(block, TrunkAdaNormBlock)
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp[-1]):
            layer.weight.zero_(), layer.bias.zero_()
    x = torch.randn(1, 4, 32).repeat(2, 1, 1)
    c = G.cond(noise(1, cfg.z_dim).repeat(2, 1), torch.tensor([0, 3]))
    out = block(x, c)
    assert torch.allclose(out, block.norm2(block.norm1(x, c), c), atol=1e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert not torch.allclose(out, x, atol=1e-3)


# --- LadaGAN: no attention -> MLP-output residual --------------------------------------------------------------------

def test_lada_generator_blocks_have_no_residual_around_the_mlp():
    """Hooks record each generator block's data flow: its output must BE the MLP output (no skip added around the
    MLP), while the MLP's normalised input comes from x + attention output (the first residual stays)."""
    cfg = tiny("lada", grid=8, n_classes=2)
    G, _ = models(cfg)
    blocks = [m for m in G.modules() if isinstance(m, LadaGeneratorBlock)]
    assert len(blocks) == 2
    seen: dict[str, list] = {"in": [], "attn": [], "norm2_in": [], "mlp": [], "out": []}

    def record(*names: str):
        def hook(module, args, output) -> None:  # returns None: a hook must not replace the output
            for name, value in zip(names, (args[0], output)):
                if name:
                    seen[name].append(value)
        return hook

    handles = []
    for b in blocks:
        handles += [b.register_forward_hook(record("in", "out")), b.attn.register_forward_hook(record("", "attn")),
                    b.norm2.register_forward_hook(record("norm2_in")), b.mlp.register_forward_hook(record("", "mlp"))]
    G(noise(2, cfg.z_dim), torch.tensor([0, 1]))
    for h in handles:
        h.remove()
    for i in range(len(blocks)):
        assert torch.equal(seen["out"][i], seen["mlp"][i]), "the block adds a residual to its MLP output"
        assert torch.allclose(seen["norm2_in"][i], seen["in"][i] + seen["attn"][i]), "attention residual missing"


# --- TransGAN: locality-aware init, super-resolution, class token ---------------------------------------------------

def test_locality_mask_by_hand():
    m = locality_mask(3, 1)  # 3x3 grid, 8-neighbourhood
    assert m.shape == (9, 9) and m.equal(m.T) and m.diagonal().all()
    assert m[4].all()  # the centre sees everything
    assert m[0].nonzero().flatten().tolist() == [0, 1, 3, 4]  # a corner sees its 2x2 square
    assert locality_mask(3, 2).all()


def test_transgan_locality_mask_widens_with_progress():
    cfg = tiny("transgan", grid=8, g_depths=(1, 1, 1), g_dim=64, grid_attention_min=16,
               locality_radius=1, locality_until=0.5)
    G, _ = models(cfg)
    stage = 2  # 8x8, full attention
    counts = []
    for p in [0.0, 0.1, 0.2, 0.3, 0.4, 0.49]:
        G.set_progress(p)
        counts.append(int(G.attention_mask(stage).sum()))
    assert counts == sorted(counts) and counts[0] < counts[-1], counts
    G.set_progress(0.0)
    assert G.attention_mask(stage).equal(locality_mask(8, 1))
    G.set_progress(0.5)
    assert G.attention_mask(stage) is None  # full attention from `locality_until` on
    assert locality_radius(0.25, 8, 1, 0.5) == 4  # 1 + floor(6 * 0.5)
    # the mask is used: outputs differ between the narrow and the full neighbourhood
    z = noise(2, cfg.z_dim)
    G.set_progress(0.0)
    narrow = G(z)
    G.set_progress(1.0)
    assert not torch.allclose(narrow, G(z), atol=1e-5)
    # progress travels with the weights (checkpoints, EMA copies)
    G2, _ = models(cfg, seed=1)
    G2.load_state_dict(G.state_dict())
    assert G2.progress.item() == 1.0 and G2.attention_mask(stage) is None


def test_transgan_super_resolution_head():
    cfg = tiny("transgan", grid=8, sr_weight=1.0)
    G, _ = models(cfg)
    real = torch.randn(2, 8, 8, 8)
    assert G.super_resolve(F.avg_pool2d(real, 2)).shape == real.shape
    loss = sr_loss(G, real)
    loss.backward()
    assert G.sr_in.weight.grad.abs().sum() > 0 and G.out.weight.grad.abs().sum() > 0
    assert G.input.weight.grad is None  # the noise path is not part of the SR task
    opt = torch.optim.Adam(G.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(10):
        opt.zero_grad()
        loss = sr_loss(G, real)
        loss.backward()
        opt.step()
    assert loss.item() < first
    G_off, _ = models(tiny("transgan", grid=8))
    assert G_off.sr_in is None
    with pytest.raises(RuntimeError, match="super-resolution"):
        G_off.super_resolve(torch.zeros(1, 8, 4, 4))


def test_transgan_discriminator_reads_the_class_token():
    _, D = models(tiny("transgan", grid=4))
    D.eval()
    seen = []
    D.norm.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    D(torch.randn(2, 8, 4, 4))
    assert seen[0].shape == (2, 16)  # the normalised feature is the class token alone
    assert D.pos.shape[1] == 4 * 4 + 1


# --- minibatch standard deviation (gan.model.mbstd_group) -----------------------------------------------------------

def test_minibatch_std_by_hand():
    # groups of 2 strided samples: {0, 2} are equal (std 0), {1, 3} differ by 2 in every feature (std 1); grouping
    # consecutive samples would give 0.5 and 1.5, and the unbiased estimate sqrt(2)
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
    assert torch.allclose(minibatch_std(x, 2).squeeze(1), torch.tensor([1e-4, 1.0, 1e-4, 1.0]), atol=1e-6)
    # group larger than the batch: the whole batch; a group that does not divide it: the largest divisor below
    assert torch.allclose(minibatch_std(x, 8), minibatch_std(x, 4))
    x6 = torch.arange(12.0).view(6, 2)
    # group 4 on 6 samples: groups of 3, {0, 2, 4} and {1, 3, 5}; each feature runs 0, 4, 8 (+1): std sqrt(32 / 3)
    assert torch.allclose(minibatch_std(x6, 4).squeeze(1), torch.full((6,), math.sqrt(32 / 3)))


@pytest.mark.parametrize("family", FAMILIES)
def test_minibatch_std_lets_d_see_the_rest_of_the_batch(family):
    """With the layer, one sample's logit depends on the others in its group (D sees the batch's variety); without
    it, not (eval mode: LadaGAN's down block batch-norms with its running statistics)."""
    x = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    varied = x.clone()
    varied[2] = 5 * torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(1))  # sample 0's group: {0, 2}
    for group, depends in ((0, False), (2, True)):
        _, D = models(tiny(family, mbstd_group=group))
        D.eval()
        with torch.no_grad():
            a, b = D(x), D(varied)
        assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])  # the other group {1, 3} is untouched
        assert (not torch.allclose(a[0], b[0])) == depends
    with pytest.raises(ValueError, match="mbstd_group"):
        tiny("lada", mbstd_group=1)


def test_image_discriminator_takes_the_familys_minibatch_std():
    from models.gan_pixel_d import PixelDiscriminator
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    varied = torch.cat([x[:2], x[2:3] + 3, x[3:]])
    for group, depends in ((0, False), (2, True)):
        torch.manual_seed(0)
        D = PixelDiscriminator(1, 8, base=4, n_classes=0, mbstd_group=group)
        with torch.no_grad():
            a, b = D(x), D(varied)
        assert torch.equal(a[1], b[1]) and (not torch.allclose(a[0], b[0])) == depends


# --- STransGAN: equalized lr, skip projections ----------------------------------------------------------------------

def test_equalized_linear_scales_weights_at_runtime():
    torch.manual_seed(0)
    layer = EqualLinear(256, 128)
    w = layer.weight
    assert abs(w.mean().item()) < 0.02 and abs(w.std().item() - 1.0) < 0.02  # stored N(0, 1)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, 256)
    assert torch.allclose(layer(x), F.linear(x, w / math.sqrt(256), layer.bias), atol=1e-5)
    with torch.no_grad():  # the scale is applied at every call, not baked into the parameter
        w.mul_(2.0)
    assert torch.allclose(layer(x) - layer.bias, 2 * (F.linear(x, w / 2 / math.sqrt(256))), atol=1e-5)


def test_equalized_conv_scales_weights_at_runtime():
    torch.manual_seed(0)
    conv = EqualConv2d(16, 32, 3, padding=1)
    assert abs(conv.weight.std().item() - 1.0) < 0.03
    x = torch.randn(2, 16, 5, 5)
    expected = F.conv2d(x, conv.weight / math.sqrt(16 * 9), conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_stransgan_discriminator_uses_skip_projections_and_equalized_layers():
    _, D = models(tiny("stransgan", grid=8))
    blocks = [m for m in D.modules() if isinstance(m, SkipProjectionBlock)]
    assert len(blocks) == 4  # 2 per stage, stages at 8x8 and 4x4
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in D.tokenizer.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in D.modules())
    block = blocks[0]
    with torch.no_grad():  # silence the attention branch: the skip path is a projection, not the identity
        block.attn.proj.weight.zero_(), block.attn.proj.bias.zero_()
    x = torch.randn(2, 64, 16)
    seen = []
    block.norm2.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    block(x)
    assert torch.allclose(seen[0], block.skip1(x), atol=1e-6)
    assert not torch.allclose(seen[0], x, atol=1e-2)


# --- shared pieces --------------------------------------------------------------------------------------------------

def test_diff_augment_shapes_and_determinism():
    x = torch.randn(6, 8, 8, 8)
    a = diff_augment(x, "translation,cutout", torch.Generator().manual_seed(3))
    b = diff_augment(x, "translation,cutout", torch.Generator().manual_seed(3))
    c = diff_augment(x, "translation,cutout", torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.equal(b) and not a.equal(c)
    assert diff_augment(x, "").equal(x)
    with pytest.raises(ValueError, match="unknown augmentation"):
        diff_augment(x, "color")


def test_translation_is_a_zero_padded_shift():
    x = torch.randn(16, 2, 8, 8)
    out = diff_augment(x, "translation", torch.Generator().manual_seed(0))
    shifts = set()
    for i in range(16):
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = torch.zeros_like(x[i])
                shifted[:, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
                    x[i, :, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
                if out[i].equal(shifted):
                    matches.append((dy, dx))
        assert len(matches) == 1, f"sample {i} is not a shift by at most 1 cell (8 * 1/8)"
        shifts.add(matches[0])
    assert len(shifts) > 1  # per-sample randomness


def test_cutout_zeroes_one_clipped_square():
    x = torch.randn(16, 2, 8, 8).abs() + 1  # no zeros of its own
    out = diff_augment(x, "cutout", torch.Generator().manual_seed(0))
    for i in range(16):
        zero = (out[i] == 0).all(dim=0)
        kept = ~zero
        assert out[i][:, kept].equal(x[i][:, kept])
        rows, cols = zero.nonzero(as_tuple=True)
        assert len(rows) > 0
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h <= 4 and w <= 4 and zero.sum() == h * w  # a solid rectangle, at most half the side
        assert (h == 4 and w == 4) or rows.min() == 0 or cols.min() == 0 or rows.max() == 7 or cols.max() == 7


def test_r1_penalty_on_linear_discriminator_by_hand():
    w = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2, 3)) + 0.7  # D(x) = <w, x> + b: grad_x D = w for every sample
    gamma = 10.0
    expected = gamma / 2 * w.pow(2).sum()
    assert torch.allclose(r1_penalty(logits, x, gamma), expected)
    # a quadratic D: grad = 2x, penalty = gamma / 2 * mean ||2x||^2; and the penalty is differentiable
    x2 = torch.randn(5, 3, 4, 4, requires_grad=True)
    pen = r1_penalty(x2.pow(2).sum(dim=(1, 2, 3)), x2, gamma)
    assert torch.allclose(pen, gamma / 2 * (2 * x2).pow(2).sum(dim=(1, 2, 3)).mean())
    (g,) = torch.autograd.grad(pen, x2)
    assert torch.allclose(g, gamma / 2 * 8 * x2 / 5)


def test_losses_dispatch():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    assert torch.allclose(d_loss("hinge", real, fake), 0.5 * (torch.tensor([0.0, 2.0]).mean()
                                                              + torch.tensor([1.5, 0.0]).mean()))
    assert torch.allclose(g_loss("hinge", fake), -fake.mean())
    assert torch.allclose(d_loss("nonsat", real, fake), 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()))
    assert torch.allclose(g_loss("nonsat", fake), F.softplus(-fake).mean())


def test_ema_update_formula_copy_and_state():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9)
    p0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(5.0)
    ema.update()
    assert torch.allclose(ema.shadow["0.weight"], 0.9 * p0 + 0.1 * (p0 + 1.0))
    assert ema.shadow["1.running_mean"].equal(torch.full((2,), 5.0))  # buffers are copied, not averaged
    ema.update()
    assert torch.allclose(ema.shadow["0.weight"], 0.9 * (0.9 * p0 + 0.1 * (p0 + 1)) + 0.1 * (p0 + 1))
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema.copy_to(target)
    assert target[0].weight.equal(ema.shadow["0.weight"])
    other = EMA(target, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.shadow["0.weight"].equal(ema.shadow["0.weight"])


# --- a few training steps -------------------------------------------------------------------------------------------

def train(cfg, steps: int = 20, seed: int = 0, batch: int = 16) -> list[float]:
    """Seeded GAN steps on 32 synthetic latent grids (random grids over a 16-code codebook); D losses per step."""
    torch.manual_seed(seed)
    G, D = build_generator(cfg), build_discriminator(cfg)
    data_rng = torch.Generator().manual_seed(seed)
    codebook = torch.randn(16, cfg.code_dim, generator=data_rng)
    data = codebook[torch.randint(0, 16, (32, cfg.grid, cfg.grid), generator=data_rng)].permute(0, 3, 1, 2)
    labels = torch.randint(0, max(cfg.n_classes, 1), (32,), generator=data_rng)
    aug_rng = torch.Generator().manual_seed(seed + 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
    losses = []
    for step in range(steps):
        if hasattr(G, "set_progress"):
            G.set_progress(step / steps)
        idx = torch.randperm(32, generator=data_rng)[:batch]
        real = data[idx]
        y = labels[idx] if cfg.n_classes else None
        z = torch.randn(batch, cfg.z_dim, generator=data_rng)
        # D step
        real_in = diff_augment(real, cfg.diffaug, aug_rng).requires_grad_(cfg.r1_gamma > 0)
        logits_real = D(real_in, y)
        logits_fake = D(diff_augment(G(z, y).detach(), cfg.diffaug, aug_rng), y)
        loss = d_loss(cfg.loss, logits_real, logits_fake)
        if cfg.r1_gamma > 0:
            loss = loss + r1_penalty(logits_real, real_in, cfg.r1_gamma)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        losses.append(loss.item())
        # G step
        loss_g = g_loss(cfg.loss, D(diff_augment(G(z, y), cfg.diffaug, aug_rng), y))
        if getattr(cfg, "sr_weight", 0) > 0:
            loss_g = loss_g + cfg.sr_weight * sr_loss(G, real)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_decrease_discriminator_loss(family):
    # the family's loss, R1, DiffAugment and betas; D's learning rate raised (and G's lowered) so that 20 steps show
    # D learning rather than the noise of the two-player game (margins over seeds 0-5: 0.23 .. 0.86)
    cfg = tiny(family, n_classes=2, lr_d=1e-3, lr_g=1e-4, **({"sr_weight": 1.0} if family == "transgan" else {}))
    losses = train(cfg)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert train(cfg, steps=3) == losses[:3]  # seeded: the same run gives the same numbers
