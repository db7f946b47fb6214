"""tokenmill's LPIPS (models/lpips.py) against the ST-LPIPS reference package (stlpips-pytorch 0.0.2, whose weights
the project ships) on fixed inputs: prints both, per image, and the largest relative difference. The values it
prints are pinned in tests/test_vqgan_models.py::test_lpips_equals_the_st_lpips_reference.

The reference package imports torchvision, IPython and torchsummary, which the project's CPU venv does not have
(PyPI's torchvision does not load beside torch 2.13); run it from a venv that has them, with the project on the path:

    python -m venv /tmp/lpips-ref && /tmp/lpips-ref/bin/pip install torch==2.14.1 torchvision==0.29.1 ipython \\
        torchsummary stlpips-pytorch==0.0.2 safetensors
    /tmp/lpips-ref/bin/python scripts/lpips_reference.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.lpips import LPIPS  # noqa: E402


def inputs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two pairs in [-1, 1]: near images at 32 x 32, unrelated ones at 48 x 40 (not square, not a power of 2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    z = torch.rand(4, 3, 48, 40, generator=g) * 2 - 1
    w = torch.rand(4, 3, 48, 40, generator=g) * 2 - 1
    return [(x, y), (z, w)]


def main() -> int:
    from stlpips_pytorch.stlpips import LPIPS as Reference

    ref = Reference(net="vgg", variant="shift_tolerant", verbose=False).eval()
    ours = LPIPS().eval()
    worst = 0.0
    with torch.no_grad():
        for a, b in inputs():
            r, o = ref(a, b).flatten().double(), ours(a, b).flatten().double()
            print("reference", [float(f"{v:.9g}") for v in r.tolist()])
            print("tokenmill", [float(f"{v:.9g}") for v in o.tolist()])
            worst = max(worst, ((r - o).abs() / r.abs()).max().item())
    print(f"largest relative difference: {worst:.3g} (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
