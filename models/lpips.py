"""LPIPS perceptual distance (Zhang et al. 2018) on a VGG16 trunk, written without torchvision.

distance(x, y) = sum over 5 VGG taps of  mean_{h,w}  w_l . (n(f_l(x)) - n(f_l(y)))^2
where f_l are the relu1_2 .. relu5_3 activations, n() normalises each position's channel vector to unit length
and w_l are learned non-negative 1x1 "lin" heads.

Weights. By default the file shipped inside the installed `stlpips-pytorch` package is used (it is on disk,
the standard LPIPS weights would have to be downloaded): `weights/vST0.0/vgg_shift_tolerant.pth`, the
shift-tolerant LPIPS of Ghildyal & Liu (2022). That file holds the whole network: the ImageNet input scaling,
all 13 VGG16 convs, the 4 blur filters and the 5 lin heads. Its trunk is VGG16 with anti-aliased pooling:
every 2x2/2 max-pool becomes a 2x2 stride-1 max-pool followed by a [1,2,1]x[1,2,1] binomial blur with stride 2
on a reflection padding of 2 ("pad_more"), so features move less when the image shifts by a pixel.

A standard LPIPS file may be given instead (weights_path): either one holding trunk and heads, or the
original heads-only `vgg.pth` together with torchvision's VGG16 ImageNet weights (vgg_path).

We only read the package's weight file (torch.load weights_only=True); its Python code is not imported
(it needs torchvision, which does not import here).
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAP_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIPPED_WEIGHTS = "weights/vST0.0/vgg_shift_tolerant.pth"


def shipped_weights_path() -> Path:
    """Location of the shift-tolerant LPIPS weights inside the installed stlpips-pytorch package."""
    spec = importlib.util.find_spec("stlpips_pytorch")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"LPIPS weights: package stlpips-pytorch is not installed (need its {SHIPPED_WEIGHTS})")
    return Path(list(spec.submodule_search_locations)[0]) / SHIPPED_WEIGHTS


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: binomial [1,2,1] blur per channel on a reflection padding of 2."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = torch.outer(k, k) / 16.0
        self.register_buffer("filt", k.expand(channels, 1, 3, 3).clone())  # loaded from the file too; equal

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class VGG16Trunk(nn.Module):
    """VGG16 conv layers up to relu5_3; returns the 5 LPIPS taps.

    Module indices in `features` match the checkpoints (torchvision's `features.<i>`, and the stlpips
    `net.slice<k>.<i>` keys use the same running index i), so loading is a rename, not a reshuffle.
    """

    def __init__(self, shift_tolerant: bool):
        super().__init__()
        layers: list[nn.Module] = []
        taps: list[int] = []
        c = 3
        for v in VGG16_LAYOUT:
            if v == "M":
                taps.append(len(layers) - 1)  # the ReLU just before each pooling
                layers += [nn.MaxPool2d(2, stride=1), BlurPool(c)] if shift_tolerant else [nn.MaxPool2d(2, stride=2)]
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.taps = frozenset(taps)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def _load(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or not a torch file
        raise ValueError(f"LPIPS weights file {path} cannot be read as a tensor state dict ({exc})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"LPIPS weights file {path} does not hold a state dict")
    return sd


def _rename(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map LPIPS / stlpips / torchvision key names onto this module's names; other keys pass through unchanged
    (so they show up as unexpected in the strict load)."""
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias|filt)", key):     # LPIPS trunk
            key = f"trunk.features.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"features\.(\d+)\.(weight|bias)", key):            # torchvision vgg16
            key = f"trunk.features.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):                 # lin heads (after Dropout)
            key = f"lins.{m[1]}.weight"
        elif m := re.fullmatch(r"scaling_layer\.(shift|scale)", key):
            key = m[1]
        elif key.startswith("classifier."):                                        # torchvision's FC head
            continue
        out[key] = value
    return out


class LPIPS(nn.Module):
    def __init__(self, weights_path: str | Path | None = None, vgg_path: str | Path | None = None):
        """weights_path None: the shipped shift-tolerant file. vgg_path: torchvision VGG16 weights, needed only
        when weights_path holds the lin heads alone (the original LPIPS `vgg.pth`)."""
        super().__init__()
        self.weights_path = Path(weights_path) if weights_path is not None else shipped_weights_path()
        sd = _rename(_load(self.weights_path))
        if vgg_path is not None:
            sd = {**_rename(_load(Path(vgg_path))), **sd}
        self.variant = "shift_tolerant" if any(k.endswith(".filt") for k in sd) else "vgg"

        # ImageNet statistics in [-1, 1] units; the file carries them as well and the load overwrites these
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.trunk = VGG16Trunk(shift_tolerant=self.variant == "shift_tolerant")
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)

        sd.setdefault("shift", self.shift)  # standard LPIPS files do not store the scaling constants
        sd.setdefault("scale", self.scale)
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        badshape = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
        if missing or unexpected or badshape:
            hint = " (heads-only LPIPS file: also pass vgg_path)" if missing and all(
                k.startswith("trunk.") for k in missing) else ""
            raise ValueError(f"LPIPS weights {self.weights_path} do not match VGG16-LPIPS ({self.variant}): "
                             f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {badshape[:4]}{hint}")
        self.load_state_dict(sd)

        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a frozen metric: never leaves eval mode, whatever the parent module does

    def variant_info(self) -> dict[str, str]:
        """Which LPIPS was loaded: variant ('shift_tolerant' or 'vgg'), the weight file and its sha256."""
        digest = hashlib.sha256(self.weights_path.read_bytes()).hexdigest()
        return {"variant": self.variant, "weights": str(self.weights_path), "sha256": digest}

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance [B] between image batches in [-1, 1] ([B, 1 or 3, H, W]; grey is repeated to RGB).
        The shift-tolerant trunk needs H, W >= 18 (its reflection padding must fit the 5th-stage maps)."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if self.variant == "shift_tolerant" and min(x.shape[-2:]) < 18:
            raise ValueError(f"shift-tolerant LPIPS needs images of at least 18x18, got {tuple(x.shape[-2:])}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        # two passes, not one over cat([x, y]): the usual target y needs no gradient, so backward only runs
        # through x's half (half the backward cost of a joint batch)
        feats_x = self.trunk((x - self.shift) / self.scale)
        feats_y = self.trunk((y - self.shift) / self.scale)
        dist = x.new_zeros(x.shape[0])
        for fx, fy, lin in zip(feats_x, feats_y, self.lins):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit channel vector at each position
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return dist
