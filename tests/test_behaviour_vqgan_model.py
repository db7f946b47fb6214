"""The VQGAN's encoder and decoder (models/vqgan.py) against a reference written from the architecture's description
(Taming's layout, with this project's choices as the docstrings state them), in float64 with the model's own weights
fetched by name: the order of every block, residual signs, group counts, the attention layout and the quantizer's
settings, none of which the shape and round-trip tests can see."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.vqgan import VQGAN, VQGANConfig, Norm


def groups_for(c: int) -> int:
    """The largest divisor of c that is at most min(32, c // 4) (at least 1)."""
    return max(g for g in range(1, max(1, min(32, c // 4)) + 1) if c % g == 0)


class Reference:
    def __init__(self, model: VQGAN):
        self.cfg = model.cfg
        self.w = {k: v.double() for k, v in model.state_dict().items()}

    def conv(self, x, name, stride=1, pad=None, k=3):
        weight = self.w[f"{name}.weight"]
        assert weight.shape[-2:] == (k, k), name  # 3x3 convs, 1x1 projections
        pad = k // 2 if pad is None else pad
        return F.conv2d(x, weight, self.w[f"{name}.bias"], stride=stride, padding=pad)

    def norm(self, x, name):
        return F.group_norm(x, groups_for(x.shape[1]), self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps=1e-6)

    def res(self, x, name, c_out):
        h = self.conv(F.silu(self.norm(x, f"{name}.norm1")), f"{name}.conv1")
        h = self.conv(F.silu(self.norm(h, f"{name}.norm2")), f"{name}.conv2")
        assert h.shape[1] == c_out
        skip = self.conv(x, f"{name}.skip", k=1) if x.shape[1] != c_out else x  # 1x1 only where widths differ
        return skip + h

    def attn(self, x, name):  # one head over all h*w positions
        B, C, H, W = x.shape
        q, k, v = self.conv(self.norm(x, f"{name}.norm"), f"{name}.qkv", k=1).reshape(B, 3, C, H * W).unbind(1)
        att = (torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C)).softmax(-1)
        out = torch.einsum("bij,bcj->bci", att, v).reshape(B, C, H, W)
        return x + self.conv(out, f"{name}.proj", k=1)

    def mid(self, x, name):
        x = self.res(x, f"{name}.res1", x.shape[1])
        if self.cfg.attn:
            x = self.attn(x, f"{name}.attn")
        return self.res(x, f"{name}.res2", x.shape[1])

    def encode_latent(self, x):
        cfg, i = self.cfg, 0
        h = self.conv(x, "encoder.conv_in")
        assert h.shape[1] == cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                h, i = self.res(h, f"encoder.down.{i}", cfg.ch * mult), i + 1
            if level < len(cfg.ch_mult) - 1:  # a stride-2 3x3 conv halves the grid
                h, i = self.conv(h, f"encoder.down.{i}.conv", stride=2, pad=1), i + 1
        h = self.mid(h, "encoder.mid")
        h = self.conv(F.silu(self.norm(h, "encoder.norm_out")), "encoder.conv_out")
        return self.conv(h, "quant_conv", k=1)

    def decode(self, z):
        cfg, i = self.cfg, 0
        h = self.conv(self.conv(z, "post_quant_conv", k=1), "decoder.conv_in")
        assert h.shape[1] == cfg.ch * cfg.ch_mult[-1]  # the decoder starts at the widest level
        h = self.mid(h, "decoder.mid")
        for level in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):  # one block more per level than the encoder
                h, i = self.res(h, f"decoder.up.{i}", cfg.ch * cfg.ch_mult[level]), i + 1
            if level > 0:  # nearest x2, then a 3x3 conv down to the next level's width
                h = self.conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"decoder.up.{i}.conv")
                assert h.shape[1] == cfg.ch * cfg.ch_mult[level - 1]
                i += 1
        return self.conv(F.silu(self.norm(h, "decoder.norm_out")), "decoder.conv_out")


@pytest.mark.parametrize("ch_mult,num_res_blocks,attn", [((1, 2), 2, True), ((1, 2, 2), 1, False),
                                                          ((2, 1, 3), 1, True)])
def test_encoder_and_decoder_equal_the_reference(ch_mult, num_res_blocks, attn):
    torch.manual_seed(0)
    cfg = VQGANConfig(in_channels=3, ch=8, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn=attn, z_channels=8,
                      n_codes=16, code_dim=4, dead_code_steps=0)
    model = VQGAN(cfg)
    with torch.no_grad():  # norm weights start at 1 and biases at 0: give every parameter a value of its own
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model = model.double().eval()
    ref = Reference(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        z = model.encode_latent(x)
        want = ref.encode_latent(x)
        assert z.shape == want.shape == (2, 4, 16 // cfg.downsample, 16 // cfg.downsample)
        assert torch.allclose(z, want, rtol=1e-9, atol=1e-9), (z - want).abs().max()
        out, want = model.decode(z), ref.decode(z)
        assert out.shape == want.shape == x.shape
        assert torch.allclose(out, want, rtol=1e-9, atol=1e-9), (out - want).abs().max()


def test_group_counts_keep_four_channels_a_group_and_divide_the_width():
    for c, groups in ((4, 1), (8, 2), (12, 3), (20, 5), (64, 16), (128, 32), (132, 22), (200, 25), (256, 32), (3, 1)):
        norm = Norm(c)
        assert (norm.num_groups, norm.eps) == (groups, 1e-6), c
        assert groups == groups_for(c)


@pytest.mark.parametrize("l2_norm,ema", [(False, True), (True, False)])
def test_the_quantizer_gets_the_config_settings(l2_norm, ema):
    cfg = VQGANConfig(n_codes=16, code_dim=4, beta=0.5, l2_norm=l2_norm, ema=ema, ema_decay=0.9, dead_code_steps=7,
                      buffer_size=33, ch=8, ch_mult=(1, 2), z_channels=8)
    q = VQGAN(cfg).quantizer
    assert (q.n_codes, q.code_dim, q.beta, q.l2_norm, q.ema, q.ema_decay, q.dead_code_steps) == (
        16, 4, 0.5, l2_norm, ema, 0.9, 7)
    assert tuple(q.z_buffer.shape) == (33, 4)


def test_fingerprint_covers_the_config_and_sizes_must_divide():
    torch.manual_seed(0)
    a = VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2), z_channels=8, n_codes=16, code_dim=4, beta=0.25))
    torch.manual_seed(0)
    b = VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2), z_channels=8, n_codes=16, code_dim=4, beta=0.5))
    assert torch.equal(a.quantizer.codebook, b.quantizer.codebook)
    assert a.codebook_fingerprint() != b.codebook_fingerprint()  # same codes, another model: another fingerprint
    with pytest.raises(ValueError, match=r"^image size \(16, 15\) is not divisible by the downsampling factor 2$"):
        a.encode_latent(torch.zeros(1, 1, 16, 15))
    with pytest.raises(ValueError, match=r"^in_channels must be 1 or 3, got 2$"):
        VQGAN(VQGANConfig(in_channels=2))
