"""The two labelled training recipes per GAN family (gan.recipe: paper | tokenmill), WGAN-GP, and the paper's
architecture switches (TransGAN relative positions and locality layers, STransGAN equalized attention and end-of-block
activations). docs/gan_recipes.md has the table these pin."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from helpers import ROOT
from models.attention import MultiHeadAttention
from models.gan_common import (PAPER_RECIPES, TOKENMILL_RECIPES, d_loss, g_loss, gan_config, random_interpolates,
                               wgan_gp_penalty)
from models.gan_stransgan import EqualLinear, STransDiscriminator
from models.gan_transgan import TransGANGenerator, locality_mask, relative_position_index
from pipeline.errors import UserError
from stages import train_transformer
from test_train_gan import TINY, assert_runs_equal, gan_cfg, one_line, run_interrupted_then_resumed, world  # noqa: F401
from training.gan import GANParams, config_dict, d_config, family_config

# Every family's resolved config before the recipes existed (commit 838cf13, default GANParams, an 8x8x8 grid, 10
# classes): the tokenmill recipe must give exactly these values, plus the new fields at their neutral values.
TODAY = {
    "lada": {'family': 'lada', 'code_dim': 8, 'grid': 8, 'z_dim': 64, 'n_classes': 10, 'class_dim': 32,
             'attention_kind': 'native', 'n_heads': 4, 'mlp_ratio': 2.0, 'backend': None, 'loss': 'nonsat',
             'r1_gamma': 0.01, 'lr_g': 0.0002, 'lr_d': 0.0002, 'betas': [0.5, 0.99], 'ema_decay': 0.999,
             'diffaug': 'translation', 'ms_weight': 0.2, 'g_dims': [128, 64, 32], 'g_depth': 1, 'd_base': 32,
             'd_grid': 4, 'd_depth': 1},
    "transgan": {'family': 'transgan', 'code_dim': 8, 'grid': 8, 'z_dim': 64, 'n_classes': 10, 'class_dim': 32,
                 'attention_kind': 'native', 'n_heads': 4, 'mlp_ratio': 2.0, 'backend': None, 'loss': 'hinge',
                 'r1_gamma': 0.0, 'lr_g': 0.0001, 'lr_d': 0.0001, 'betas': [0.0, 0.99], 'ema_decay': 0.999,
                 'diffaug': 'translation,cutout', 'ms_weight': 0.2, 'g_dim': 256, 'g_depths': [2, 2, 2],
                 'grid_attention_min': 8, 'grid_cell': 4, 'locality_radius': 1, 'locality_until': 0.5,
                 'sr_weight': 0.0, 'd_dim': 64, 'd_depth': 3, 'd_patch': 1},
    "stransgan": {'family': 'stransgan', 'code_dim': 8, 'grid': 8, 'z_dim': 64, 'n_classes': 10, 'class_dim': 32,
                  'attention_kind': 'native', 'n_heads': 4, 'mlp_ratio': 2.0, 'backend': None, 'loss': 'hinge',
                  'r1_gamma': 0.0, 'lr_g': 0.0002, 'lr_d': 0.0002, 'betas': [0.0, 0.99], 'ema_decay': 0.999,
                  'diffaug': 'translation', 'ms_weight': 0.2, 'g_dims': [128, 64, 32], 'g_depth': 2, 'window': 4,
                  'd_dim': 32, 'd_depth': 2, 'd_grid': 4},
}
# What the tokenmill recipe has changed since then, by measurement (docs/results.md): the learning rates of every
# family, LadaGAN's mode-seeking weight and learning-rate decay, and the D-side training (loss, R1, augmentation).
TOKENMILL_SINCE = {"lada": {"lr_g": 8e-4, "lr_d": 8e-4, "ms_weight": 0.5, "lr_decay_from": 0.5},
                   "transgan": {"lr_g": 5e-4, "lr_d": 5e-4,
                                "loss": "nonsat", "r1_gamma": 0.01, "diffaug": "translation"},
                   "stransgan": {"lr_g": 4e-4, "lr_d": 4e-4,
                                 "loss": "nonsat", "r1_gamma": 0.01, "diffaug": "translation"}}
NEUTRAL = {"gp_lambda": 10.0, "wgan_drift": 0.0, "n_critic": 1, "grad_clip": 0.0, "mbstd_group": 0,
           "lr_decay_from": 1.0}
NEUTRAL_FAMILY = {"lada": {}, "transgan": {"locality_layers": "all", "rel_pos": False},
                  "stransgan": {"equalized_attention": False, "block_act": False}}


def resolved(family: str, **gan) -> dict:
    return config_dict(family_config(GANParams(family=family, **gan), code_dim=8, grid=8, n_classes=10))


# ---------------------------------------------------------------- WGAN-GP

def test_wgan_gp_on_a_linear_critic_by_hand():
    # D(x) = <w, x>: its input gradient is w at every x, ||w|| = 5 (entries 3 and 4 in different channels and cells),
    # so the penalty is lam (5 - 1)^2 = 16 lam whatever the interpolates; a squared norm would give 24^2
    w = torch.zeros(2, 2, 2)
    w[0, 0, 1], w[1, 1, 0] = 3.0, 4.0
    w.requires_grad_(True)
    real, fake = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)

    def critic(x):
        return (x * w).flatten(1).sum(1)

    assert torch.allclose(d_loss("wgan-gp", critic(real), critic(fake)), critic(fake).mean() - critic(real).mean())
    assert torch.allclose(g_loss("wgan-gp", critic(fake)), -critic(fake).mean())
    x_hat = random_interpolates(real, fake, torch.Generator().manual_seed(0))
    gp = wgan_gp_penalty(critic(x_hat), x_hat, 10.0)
    assert gp.item() == pytest.approx(160.0, rel=1e-6)
    # the penalty trains the critic: d/dw lam (||w|| - 1)^2 = 2 lam (||w|| - 1) w / ||w|| (create_graph kept)
    gp.backward()
    assert torch.allclose(w.grad, 2 * 10.0 * (5.0 - 1.0) * w.detach() / 5.0)


def test_wgan_gp_interpolates_and_per_sample_norm_by_hand():
    # D(x) = ||x||^2 / 2 per sample has gradient x, so the penalty is lam * mean_i (||x_hat_i|| - 1)^2 with
    # x_hat_i = a_i real_i + (1 - a_i) fake_i and a ~ U[0, 1) from the given generator (one draw per sample)
    real = torch.zeros(4, 1, 1, 2)
    real[..., 0] = 2.0  # ||real_i|| = 2, fake = 0: ||x_hat_i|| = 2 a_i
    fake = torch.zeros_like(real)
    x_hat = random_interpolates(real, fake, torch.Generator().manual_seed(7))
    a = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(x_hat[:, 0, 0, 0], 2 * a) and x_hat.requires_grad
    gp = wgan_gp_penalty(0.5 * x_hat.pow(2).flatten(1).sum(1), x_hat, 3.0)
    assert gp.item() == pytest.approx(3.0 * ((2 * a - 1) ** 2).mean().item(), rel=1e-6)


def test_a_wgan_critic_runs_on_the_math_backend():
    cfg = family_config(GANParams(family="transgan", recipe="paper"), code_dim=8, grid=8, n_classes=0)
    assert cfg.loss == "wgan-gp" and cfg.r1_gamma == 0 and d_config(cfg).backend == "math"


# ---------------------------------------------------------------- recipe resolution

@pytest.mark.parametrize("family", TODAY)
def test_tokenmill_recipe_is_todays_config(family):
    assert resolved(family) == {**TODAY[family], **NEUTRAL, **NEUTRAL_FAMILY[family], **TOKENMILL_SINCE[family]}
    # and params.yaml's gan section resolves to it (ms_weight: null there = the recipe's)
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["train_transformer"]
    cfg = train_transformer.check({"datasets": {section["dataset"]: {}}, "train_transformer": {
        **section, "kind": "gan", "gan": {**section["gan"], "family": family}}}, "params.yaml")
    assert cfg.gan.recipe == "tokenmill" and config_dict(family_config(cfg.gan, 8, 8, 10)) == resolved(family)


def test_paper_recipe_values_per_family():
    lada = resolved("lada", recipe="paper")
    # LadaGAN's defaults are its code's recipe: constant lr 2e-4, no mode-seeking term
    assert lada == {**resolved("lada"), "ms_weight": 0.0, "lr_g": 2e-4, "lr_d": 2e-4, "lr_decay_from": 1.0}
    t = resolved("transgan", recipe="paper")
    assert {k: t[k] for k in ("loss", "gp_lambda", "wgan_drift", "n_critic", "grad_clip", "lr_g", "lr_d", "betas",
                              "ema_decay", "diffaug", "sr_weight", "locality_layers", "rel_pos", "ms_weight")} == {
        "loss": "wgan-gp", "gp_lambda": 10.0, "wgan_drift": 1e-3, "n_critic": 4, "grad_clip": 5.0, "lr_g": 1e-4,
        "lr_d": 1e-4, "betas": [0.0, 0.99], "ema_decay": 0.9999, "diffaug": "translation,cutout", "sr_weight": 50.0,
        "locality_layers": "last", "rel_pos": True, "ms_weight": 0.0}
    s = resolved("stransgan", recipe="paper")
    assert (s["equalized_attention"], s["block_act"], s["lr_d"], s["lr_g"], s["ms_weight"]) == (True, True, 2e-3,
                                                                                                2e-4, 0.0)
    # a recipe sets only what its dict names: every other field is the family default
    for family, fields in PAPER_RECIPES.items():
        paper, tokenmill = resolved(family, recipe="paper"), resolved(family)
        changed = {k for k in paper if paper[k] != tokenmill[k]}
        assert changed <= set(fields) | set(TOKENMILL_RECIPES[family]) and "ms_weight" in changed


def test_explicit_overrides_win_over_the_recipe():
    t = resolved("transgan", recipe="paper", lr_g=3e-4, ms_weight=0.5, diffaug="",
                 model={"n_critic": 2, "sr_weight": 0.0, "rel_pos": False})
    assert (t["lr_g"], t["ms_weight"], t["diffaug"], t["n_critic"], t["sr_weight"], t["rel_pos"]) == (
        3e-4, 0.5, "", 2, 0.0, False)
    assert (t["loss"], t["lr_d"], t["grad_clip"]) == ("wgan-gp", 1e-4, 5.0)  # the rest stays the paper's
    assert resolved("lada", ms_weight=0.0)["ms_weight"] == 0.0  # 0 turns the tokenmill term off


def test_unknown_recipe_is_a_one_line_error_naming_the_key():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["train_transformer"]
    raw = {**section, "kind": "gan", "gan": {**section["gan"], "recipe": "best"}}
    with pytest.raises(UserError) as exc:
        train_transformer.check({"train_transformer": raw}, "params.yaml")
    assert "train_transformer.gan.recipe" in one_line(exc)
    with pytest.raises(UserError) as exc:  # a config value the recipe cannot take is named too
        train_transformer.check({"train_transformer": {**raw, "gan": {**raw["gan"], "recipe": "paper",
                                                                       "model": {"n_critic": 0}}}}, "params.yaml")
    assert "n_critic must be >= 1" in one_line(exc)


# ---------------------------------------------------------------- architecture switches

def test_stransgan_paper_d_has_equalized_attention_projections():
    plain = STransDiscriminator(gan_config("stransgan", code_dim=8, grid=8))
    paper = STransDiscriminator(gan_config("stransgan", code_dim=8, grid=8, equalized_attention=True))
    # the count: 4 D blocks x (qkv, out) are plain nn.Linear in the tokenmill D, none in the paper's
    assert sum(isinstance(m, nn.Linear) for m in plain.modules()) == 8
    assert sum(isinstance(m, nn.Linear) for m in paper.modules()) == 0
    attns = [block.attn for stage in paper.stages for block in stage]
    assert len(attns) == 4 and all(isinstance(a.qkv, EqualLinear) and isinstance(a.proj, EqualLinear) for a in attns)
    # runtime scale: stored weights of ones on an input of ones give sqrt(fan_in) (He's constant), not fan_in
    qkv = attns[0].qkv
    with torch.no_grad():
        qkv.weight.fill_(1.0), qkv.bias.zero_()
    out = qkv(torch.ones(1, 32))
    assert out.shape == (1, 96) and torch.allclose(out, torch.full((1, 96), math.sqrt(32.0)))
    # same parameter shapes: one state dict layout for both recipes
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in paper.state_dict().items()}


def test_stransgan_block_act_ends_every_d_block_with_leaky_relu():
    cfg = gan_config("stransgan", code_dim=8, grid=8, block_act=True)
    D = STransDiscriminator(cfg)
    blocks = [b for stage in D.stages for b in stage]
    assert all(isinstance(b.end_act, nn.LeakyReLU) for b in blocks)
    block = blocks[0]
    x = torch.randn(2, 64, 32)
    with_act = block(x)
    block.end_act = None
    without = block(x)
    assert (without < 0).any() and torch.allclose(with_act, F.leaky_relu(without, 0.2))


def test_relative_position_index_by_hand():
    # 2x2 grid, offsets (dr, dc) + 1 in a 3x3 table: index (dr + 1) * 3 + (dc + 1)
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


def test_transgan_paper_generator_locality_on_the_last_block_and_relative_positions_everywhere():
    cfg = family_config(GANParams(family="transgan", recipe="paper"), code_dim=8, grid=8, n_classes=0)
    G = TransGANGenerator(cfg)
    # full attention on every stage at these grid sides (grid attention only from 64x64 on), each block its own table
    assert all(isinstance(b.attn, MultiHeadAttention) for stage in G.stages for b in stage)
    assert sorted(G.rel_bias) == ["0_0", "0_1", "1_0", "1_1", "2_0", "2_1"]
    last = len(G.stages) - 1
    for i, stage in enumerate(G.stages):
        for j in range(len(stage)):
            bias = G.attention_bias(i, j, 0.0)
            assert bias.dtype == torch.float32 and bias.shape == (4, (G.start << i) ** 2, (G.start << i) ** 2)
            if (i, j) == (last, 1):  # the mask: -inf exactly outside the radius-1 neighbourhood
                assert torch.equal(torch.isinf(bias[0]), ~locality_mask(8, 1))
            else:
                assert torch.isfinite(bias).all()
    assert torch.isfinite(G.attention_bias(last, 1, 0.5)).all()  # full attention from locality_until on
    # tokenmill: masks on every full-attention stage, no relative tables (today's generator)
    T = TransGANGenerator(family_config(GANParams(family="transgan"), code_dim=8, grid=8, n_classes=0))
    assert T.rel_bias is None and T.attention_bias(1, 0, 0.0).dtype == torch.bool


# ---------------------------------------------------------------- a paper-recipe run

PAPER_TINY = dict(g_dim=64, g_depths=[1, 1], d_dim=16, d_depth=1, z_dim=16, class_dim=8)


def paper_cfg(world, out, **kw):
    cfg = gan_cfg(world, out, "transgan", gan={"recipe": "paper"}, **kw)
    return dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, model=dict(PAPER_TINY)))


def test_paper_transgan_run_resumes_exactly(world, tmp_path, monkeypatch):
    # WGAN-GP interpolates, 4 critic steps per G step, clipping, SR co-training, locality mask, relative positions
    train_transformer.run(paper_cfg(world, tmp_path / "a"))
    run_interrupted_then_resumed(paper_cfg(world, tmp_path / "b"), monkeypatch)
    a = assert_runs_equal(tmp_path / "a", tmp_path / "b")
    m = json.loads((tmp_path / "a" / "model" / "metrics.json").read_text())
    assert m["recipe"]["name"] == "paper" and m["recipe"]["loss"] == "wgan-gp" and m["recipe"]["n_critic"] == 4
    assert m["gp"] > 0 and any(k.startswith("rel_bias.") for k in a)
    # G steps at steps 0 and 4 only: the log row for steps 3-4 (logged at 4) has no generator loss
    lines = (tmp_path / "a" / "log.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert lines[0].split("\t")[:5] == ["step", "g_loss", "d_loss", "r1", "gp"]
    assert [(r["step"], r["g_loss"] != "") for r in rows] == [("2", True), ("4", False), ("6", True)]
    # another seed ends elsewhere (so the comparison above can fail)
    train_transformer.run(paper_cfg(world, tmp_path / "c", seed=1))
    c = load_file(str(tmp_path / "c" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tokenmill_run_writes_todays_config(world, tmp_path):
    train_transformer.run(gan_cfg(world, tmp_path, "transgan", steps=2))
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["model"]
    today = {**TODAY["transgan"], **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY["transgan"].items()},
             "code_dim": 4, "grid": 4, "n_classes": 10}
    assert saved == {**today, **NEUTRAL, **NEUTRAL_FAMILY["transgan"], **TOKENMILL_SINCE["transgan"]}
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert m["recipe"]["name"] == "tokenmill" and m["recipe"]["ms_weight"] == 0.2 and "gp" not in m
    assert (tmp_path / "log.tsv").read_text().splitlines()[0].split("\t")[4] == "d_acc_real"  # today's columns
