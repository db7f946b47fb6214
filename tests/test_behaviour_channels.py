"""RGB -> grey conversion, at prepare time (pipeline/images.py) and at tokenize time (stages/tokenize.py), with
colours whose grey value depends on which channel carries which weight (ITU-R 601-2 luma, as PIL computes it:
L = R * 299/1000 + G * 587/1000 + B * 114/1000). Pure red, green and blue give 76, 150 and 29, so any swap of
channels changes the answer; the two conversions must also agree with each other, so a dataset tokenized with
`convert_channels` gives the same tokens as the same dataset prepared grey."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.vqgan import VQGAN, VQGANConfig
from pipeline.images import conform
from pipeline.tokens import META_KEY, read_txn
from pipeline.vqgan_io import save_vqgan, to_model_range
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
from stages.prepare import run as prepare
from stages.tokenize import TokenizeConfig, TokenizeParams, to_model_input
from stages.tokenize import run as tokenize

# (R, G, B) -> grey, from the luma weights above (PIL rounds its fixed-point sum, 76.2 -> 76, 149.7 -> 150)
PURE = {(255, 0, 0): 76, (0, 255, 0): 150, (0, 0, 255): 29, (255, 255, 255): 255, (0, 0, 0): 0}


def stripes() -> np.ndarray:
    """An 8x8 RGB image: one row of each pure colour above, the rest random colours."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for row, colour in enumerate(PURE):
        img[row] = colour
    return img


def test_prepare_converts_rgb_to_grey_with_luma_weights():
    img = stripes()
    arr, _ = conform(Image.fromarray(img, "RGB"), resolution=8, channels=1, resize="pad", background=0, min_side=1)
    assert arr.shape == (8, 8, 1)
    assert [int(arr[row, 0, 0]) for row in range(len(PURE))] == list(PURE.values())
    # every other colour as PIL's own conversion gives it (what `prepare` promises)
    assert np.array_equal(arr[:, :, 0], np.asarray(Image.fromarray(img, "RGB").convert("L")))


def test_tokenize_converts_rgb_to_grey_with_luma_weights():
    img = stripes()
    batch = torch.from_numpy(img).permute(2, 0, 1)[None]  # [1, 3, 8, 8] uint8
    x = to_model_input(batch, channels=1, device=torch.device("cpu"))
    assert x.shape == (1, 1, 8, 8)
    grey = torch.from_numpy(np.asarray(Image.fromarray(img, "RGB").convert("L")).copy())
    assert torch.equal(x, to_model_range(grey[None, None]))
    assert torch.equal(x[0, 0, :len(PURE), 0], to_model_range(torch.tensor(list(PURE.values()), dtype=torch.uint8)))


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """Two classes of 16x16 colour images (mostly saturated: the grey values differ with the channel order)."""
    root = tmp_path_factory.mktemp("colour") / "src"
    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            img = np.zeros((16, 16, 3), np.uint8)
            img[..., rng.integers(0, 3)] = rng.integers(0, 256, (16, 16))  # one dominant channel per image
            img[..., rng.integers(0, 3)] //= 2
            Image.fromarray(img, "RGB").save(root / c / f"{i}.png")
    return root


def test_tokenized_rgb_equals_the_same_dataset_prepared_grey(colour_folder, tmp_path):
    """Grey VQGAN; dataset prepared as RGB and tokenized with convert_channels vs prepared grey: same tokens."""
    for channels in (1, 3):
        prepare(PrepareConfig(f"c{channels}", DatasetSpec(source="folder", path=str(colour_folder), resolution=16,
                                                          channels=channels, split="random", val_fraction=0.2),
                              PrepareParams(out_dir=str(tmp_path / "prepared"))))
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(in_channels=1, ch=8, ch_mult=(1, 2, 2), z_channels=8, n_codes=16, code_dim=4,
                              dead_code_steps=0)).eval()
    save_vqgan(tmp_path / "vqgan", vqgan, {"resolution": 16})
    stores = {}
    for channels in (1, 3):
        out = tmp_path / "tokens" / f"c{channels}"
        tokenize(TokenizeConfig(f"c{channels}", tmp_path / "prepared" / f"c{channels}", tmp_path / "vqgan", out,
                                params=TokenizeParams(batch_size=8, num_workers=0, roundtrip_images=0),
                                convert_channels=channels == 3))
        with read_txn(out / "tokens.lmdb") as txn:
            stores[channels] = {k: v for k, v in txn.cursor().iternext() if k != META_KEY}
    samples = [k for k in stores[1] if not k.startswith(b"__")]  # besides the per-split key lists
    assert len(samples) == 20 and stores[1] == stores[3]
