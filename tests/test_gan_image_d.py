"""What the stage-2 GAN's discriminator sees (`train_transformer.gan.d_space`, `snap`, `image_reals`): the codeword
shortcut of a latent D and its removal, images decoded through the frozen VQGAN decoder, the dataset's own images
aligned with the token store, and a whole run with an image D that resumes exactly."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from models.gan import embed_tokens, project_to_codes_space
from models.gan_pixel_d import PixelDiscriminator, nearest_code_distance
from pipeline.errors import UserError
from pipeline.tokens import TokenData
from pipeline.vqgan_io import load_vqgan
from stages import train_transformer
from test_train_gan import gan_cfg, run_interrupted_then_resumed
from training.gan import GANParams, TrainingInputs


@pytest.fixture(scope="module")
def world(tiny_world) -> dict:
    return tiny_world


def setup(world: dict, **gan) -> tuple[TrainingInputs, torch.Tensor, TokenData]:
    vqgan, vmeta = load_vqgan(world["vqgan"])
    vqgan.eval().requires_grad_(False)
    codebook = vqgan.quantizer.codes().detach()
    data = TokenData.load(world["tokens"], "train", False, vmeta["fingerprint"], "test")
    inputs = TrainingInputs(GANParams(**gan), vqgan, codebook, True, world["prepared"], data.meta)
    return inputs, codebook, data


def test_latent_d_could_separate_by_codeword_distance_and_snapping_removes_it(world):
    inputs, codebook, data = setup(world, snap=True)
    real = embed_tokens(data.tokens[:16], codebook, 4, 4)
    fake = project_to_codes_space(torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0)), True)
    d_real, d_fake = nearest_code_distance(real, codebook), nearest_code_distance(fake, codebook)
    # one threshold on the distance alone tells every real grid from every fake one: the shortcut
    assert d_real.max() < 1e-6 < 0.05 < d_fake.min()
    fake.requires_grad_(True)
    snapped = inputs.fake(fake)
    assert nearest_code_distance(snapped.detach(), codebook).max() < 1e-6  # now nothing to separate them by
    snapped.mul(torch.arange(snapped.numel()).view_as(snapped)).sum().backward()
    assert torch.equal(fake.grad, torch.arange(fake.numel()).view_as(fake).float())  # straight-through gradient
    unsnapped = setup(world)[0].fake(fake)
    assert unsnapped is fake  # latent D without snap: G's grids as they are


def test_image_d_judges_decoded_pixels_and_its_gradient_reaches_only_g(world):
    inputs, codebook, data = setup(world, d_space="image")
    real = embed_tokens(data.tokens[:4], codebook, 4, 4)
    real_images = inputs.real(real, torch.arange(4))
    assert torch.equal(real_images, inputs.vqgan.decode_indices(data.tokens[:4].view(4, 4, 4)))  # reconstructions
    fake = project_to_codes_space(torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1)), True)
    fake.requires_grad_(True)
    images = inputs.fake(fake)
    assert images.shape == (4, 1, 16, 16) and torch.equal(images.detach(), inputs.vqgan.decode(fake.detach()))
    D = PixelDiscriminator(1, 16, base=8, n_classes=10)
    D(images, torch.arange(4)).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in inputs.vqgan.parameters())  # the decoder stays frozen


def test_dataset_reals_are_the_images_the_store_was_made_from(world):
    inputs, codebook, data = setup(world, d_space="image", image_reals="dataset")
    n = data.meta["counts"]["train"]
    idx = torch.tensor([5, 0, n + 5, n])  # n + i: the flipped copy of image i, from n on
    images = inputs.real(torch.zeros(4, 4, 4, 4), idx)
    tokens = inputs.vqgan.encode(images)[1]
    assert torch.equal(tokens[:2].flatten(1), data.tokens[[5, 0]])  # image i is the one store record i came from
    assert torch.equal(images[2], images[0].flip(-1)) and torch.equal(images[3], images[1].flip(-1))
    assert not torch.equal(images[1], images[1].flip(-1))  # (an image its own mirror would prove nothing)
    grey_vqgan = SimpleNamespace(cfg=SimpleNamespace(in_channels=3))
    with pytest.raises(UserError) as err:
        TrainingInputs(GANParams(d_space="image", image_reals="dataset"), grey_vqgan, codebook, True,
                       world["prepared"], data.meta)
    assert str(err.value) == (f"{world['prepared']}: images have 1 channel(s), the VQGAN decodes 3; use "
                              f"train_transformer.gan.image_reals: recon")
    more = dict(data.meta, counts={**data.meta["counts"], "train": n + 1})
    with pytest.raises(UserError) as err:
        TrainingInputs(GANParams(d_space="image", image_reals="dataset"), inputs.vqgan, codebook, True,
                       world["prepared"], more)
    assert str(err.value) == (f"{world['prepared']}: the train split has {n} images, the token store {n + 1}; "
                              f"re-run tokenize")
    wrong = dict(data.meta, dataset_fingerprint="0" * 64)
    with pytest.raises(UserError, match="not the prepared dataset the token store was made from"):
        TrainingInputs(GANParams(d_space="image", image_reals="dataset"), inputs.vqgan, codebook, True,
                       world["prepared"], wrong)


def test_pixel_discriminator_projection_uses_the_class():
    D = PixelDiscriminator(3, 32, base=8, n_classes=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a, b = D(x, torch.tensor([0, 0])), D(x, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="power-of-two resolution"):
        PixelDiscriminator(1, 24)


@pytest.mark.parametrize("reals", ["recon", "dataset"])
def test_image_d_run_resumes_exactly_and_records_what_d_saw(world, tmp_path, monkeypatch, reals):
    gan = {"d_space": "image", "image_reals": reals, "image_d_channels": 8, "snap": True}
    cfg = gan_cfg(world, tmp_path / "a", "lada", gan=gan)
    train_transformer.run(cfg)
    run_interrupted_then_resumed(gan_cfg(world, tmp_path / "b", "lada", gan=gan), monkeypatch)
    a, b = (load_file(str(tmp_path / x / "model" / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recipe = json.loads((tmp_path / "a" / "model" / "metrics.json").read_text())["recipe"]
    assert (recipe["d_space"], recipe["image_reals"], recipe["snap"]) == ("image", reals, True)
    # the latent D run ends elsewhere: what D sees matters
    train_transformer.run(dataclasses.replace(cfg, out_dir=str(tmp_path / "c" / "model"),
                                              ckpt_dir=str(tmp_path / "c" / "ckpt"),
                                              gan=dataclasses.replace(cfg.gan, d_space="latent")))
    c = load_file(str(tmp_path / "c" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert Path(tmp_path / "c" / "model" / "config.json").is_file()
