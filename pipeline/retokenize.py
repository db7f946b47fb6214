"""`python -m pipeline tokenize`: tokenize any image folder, WebDataset or prepared dataset with a chosen VQGAN.

Raw images are first prepared (the prepare stage) at the VQGAN's resolution and channels in a work folder beside
the store, then tokenized (the tokenize stage). Orchestration: it runs two stages, so it lives above them.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from pipeline.atomic import check_replaceable, read_json
from pipeline.config import from_dict
from pipeline.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def peek_images(source: Path, n: int = 64) -> tuple[bool, set[tuple[int, int]]]:
    """(any colour image, sizes) of the first `n` images of a raw source (a folder or WebDataset tars): what
    tokenizing it with a VQGAN would convert. An RGB image whose channels are all equal counts as grey."""
    import tarfile

    import numpy as np
    from PIL import Image

    def opened() -> Iterator[Image.Image]:
        tars = [source] if source.suffix == ".tar" else sorted(source.glob("*.tar"))
        if tars:
            for path in tars:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                            yield Image.open(io.BytesIO(tar.extractfile(member).read()))
        else:
            for path in sorted(source.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    yield Image.open(path)

    colour, sizes = False, set()
    for i, im in zip(range(n), opened()):
        sizes.add(im.size)
        if im.mode not in ("L", "1", "I", "I;16", "F", "LA"):
            rgb = np.asarray(im.convert("RGB"))
            colour = colour or bool((rgb != rgb[..., :1]).any())
    return colour, sizes


def tokenize_source(source: str | Path, vqgan: str | Path, out: str | Path, p: Any, *,
                    resolution: int | None = None, resize: str = "pad", background: int = 0,
                    split: str = "random", metrics: str | Path | None = None, convert_channels: bool = False) -> Path:
    """Tokenize a prepared dataset folder (with manifest.json), an image folder or WebDataset tar(s) of images
    with the VQGAN in `vqgan`, into the store folder `out`. Raw images are first prepared (the prepare stage) at
    the VQGAN's resolution and channels into a work folder beside `out`, removed when done. Images of the other
    colour kind than the VQGAN's are refused unless `convert_channels`; what is converted is printed."""
    from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
    from stages.prepare import run as prepare_run
    from stages.tokenize import TokenizeConfig
    from stages.tokenize import run as tokenize_run

    source, out, vqgan = Path(source), Path(out), Path(vqgan)
    if not source.exists():
        raise UserError(f"{source} does not exist")
    check_replaceable(out, "tokenize")  # never replace a folder that is not an earlier token store
    name = out.name
    staging = None
    if (source / "manifest.json").is_file():
        prepared = source
    else:
        vmeta = read_json(vqgan / "config.json") if (vqgan / "config.json").is_file() else None
        if vmeta is None:
            raise UserError(f"{vqgan / 'config.json'}: not found (give a VQGAN folder from train_vqgan)")
        resolution = resolution or vmeta.get("resolution")
        if resolution is None:
            raise UserError(f"{vqgan}: config.json has no training resolution; pass --resolution")
        kind = "webdataset" if source.suffix == ".tar" or any(source.glob("*.tar")) else "folder"
        in_ch = vmeta["model"]["in_channels"]
        colour, sizes = peek_images(source)
        if not sizes:
            raise UserError(f"{source}: no images found ({', '.join(IMAGE_SUFFIXES)})")
        if colour != (in_ch == 3):
            have, want = ("colour", "grey (1 channel)") if colour else ("grey", "colour (3 channels)")
            if not convert_channels:
                raise UserError(f"{source}: the images are {have}, the VQGAN in {vqgan} takes {want}; pass "
                                f"--convert-channels to tokenize them as {want.split()[0]}")
            print(f"tokenize: converting {have} images to {want} for the VQGAN", file=sys.stderr)
        if sizes != {(resolution, resolution)}:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4]) + (", ..." if len(sizes) > 4 else "")
            print(f"tokenize: images of {shown} made {resolution}x{resolution} (--resize {resize}), the VQGAN's "
                  f"resolution", file=sys.stderr)
        staging = out.parent / f".{name}.prepared"
        spec = from_dict(DatasetSpec, {"source": kind, "path": str(source), "resolution": resolution,
                                       "channels": in_ch, "resize": resize,
                                       "background": background, "split": split}, f"tokenize {source}", "command line")
        prepare_run(PrepareConfig(name, spec, PrepareParams(out_dir=str(staging))))
        prepared = staging / name
    tokenize_run(TokenizeConfig(name, prepared, vqgan, out, Path(metrics) if metrics else None, None, p,
                                convert_channels))
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def workers_option(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a number of processes") from None


def tokenize_command(args: argparse.Namespace, root: Path) -> None:
    """`pipeline tokenize`: the options as parsed by pipeline.cli; the default store is <root>/data/tokens/<name>."""
    from stages.tokenize import params_from

    source = Path(args.source)
    name = args.name or source.name
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"store name {name!r} must be letters, digits, - and _ (give --name)")
    p = params_from({"batch_size": args.batch_size, "shard_size": args.shard_size, "hflip": args.hflip,
                     "search": args.search, "device": args.device, "num_workers": args.num_workers}, "command line")
    out = Path(args.out) if args.out else root / "data" / "tokens" / name
    tokenize_source(source, args.vqgan, out, p, resolution=args.resolution, resize=args.resize,
                    background=args.background, split=args.split, metrics=args.metrics,
                    convert_channels=args.convert_channels)
    print(f"token store: {out}", file=sys.stderr)
