"""`python -m pipeline tokenize`: tokenize any image folder, WebDataset or prepared dataset with a chosen VQGAN.

Raw images are first prepared (the prepare stage) at the VQGAN's resolution and channels in a work folder beside
the store, then tokenized (the tokenize stage): orchestration, since it runs two stages. Everything the user
named is checked before anything is written (the VQGAN loads, the paths are writable and nobody else's, the
metrics file is one this command wrote); then the store's lock is taken for both steps, so a second run into
the same store stops with one line instead of removing the first run's work.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from pipeline.atomic import check_replaceable, read_json
from pipeline.config import from_dict, load_params
from pipeline.errors import UserError
from pipeline.locks import exclusive
from pipeline.out_guard import LOCK_LOADER, changed_after_written, planned_outputs
from pipeline.runlog import run_log_path

NAME = re.compile(r"[A-Za-z0-9_-]+")
METRICS_KEYS = {"images", "perplexity", "usage_pct"}  # what the tokenize stage writes to its metrics file


class Peek(NamedTuple):
    colour: bool  # any of the images looked at has a pixel whose red, green and blue differ
    sizes: set[tuple[int, int]]
    skipped: Counter  # reasons of the inputs that the prepare step would skip too


def _raw_inputs(source: Path, skipped: Counter) -> Iterator[bytes]:
    """The bytes of each image file of a raw source, in the order the prepare stage reads them."""
    from pipeline.shards import iter_tar_samples
    from stages.prepare import IMAGE_EXTS

    tars = [source] if source.suffix == ".tar" else sorted(source.glob("*.tar"))
    for tar in tars:
        try:
            for _, files, _ in iter_tar_samples(tar):
                ext = next((e for e in files if "." + e.split(".")[-1] in IMAGE_EXTS), None)
                if ext is not None:
                    yield files[ext]
        except Exception:  # as prepare: a damaged tar is skipped (tarfile.ReadError, a truncated archive)
            skipped["unreadable tar"] += 1
    if tars:
        return
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTS and path.is_file():
            if path.is_symlink() and not path.resolve().is_relative_to(source.resolve()):
                continue  # prepare skips a link out of the folder
            try:
                data = path.read_bytes()
            except OSError:  # as prepare: skipped
                skipped["unreadable"] += 1
                continue
            yield data


def peek_images(source: Path, n: int = 64) -> Peek:
    """Colour and sizes of the first `n` usable images of a raw source (a folder or WebDataset tars): what
    tokenizing it with a VQGAN would convert, for the messages and an early refusal. Inputs the prepare step
    skips (not images, truncated, decompression bombs, too small) are skipped here too; when none is usable it
    reads to the end (then the caller refuses the source). A colour image after the first `n` is caught by the
    prepare step's report (`colour_made_grey`)."""
    from pipeline.images import SkipImage, decode_image, is_colour
    from stages.prepare import PrepareParams

    guard = PrepareParams()
    colour, sizes, skipped, used = False, set(), Counter(), 0
    for data in _raw_inputs(source, skipped):
        try:
            im = decode_image(data, max_pixels=guard.max_pixels)
        except SkipImage as exc:
            skipped[str(exc).split(" (")[0]] += 1
            continue
        if min(im.size) < guard.min_side:
            skipped["too small"] += 1
            continue
        sizes.add(im.size)
        colour = colour or is_colour(im)
        used += 1
        if used >= n:
            break
    return Peek(colour, sizes, skipped)


# ---------------------------------------------------------------- checks, before anything is written

def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def check_writable_parent(path: Path, what: str) -> None:
    """The nearest existing folder above `path` must be a folder this user may write in: a file in the way or a
    read-only folder is one line here, not a traceback after the work."""
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                raise UserError(f"{what} {path}: {above} is not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                raise UserError(f"{what} {path}: cannot write in {above} (check the folder's permissions)")
            return


def pipeline_outputs(root: Path) -> dict[Path, str]:
    """{output path: stage} of the project's DVC pipeline: what dvc.lock records, and what dvc.yaml's stages will
    write under params.yaml (a stage not run yet, e.g. tokenize@<dataset> of a dataset just added), resolved from
    dvc.yaml itself so the paths cannot drift from its templates."""
    import yaml

    outs: dict[Path, str] = {}
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, TypeError):
        lock = yaml.load((root / "dvc.lock").read_text(), Loader=LOCK_LOADER)  # noqa: S506 (a safe loader)
        for stage, body in (lock["stages"] or {}).items():
            for out in body.get("outs") or []:
                outs[(root / out["path"]).resolve()] = stage
    with contextlib.suppress(UserError):  # a params.yaml DVC cannot run with: dvc.lock's outputs still count
        for stage, _, path, _ in planned_outputs(root, load_params(root / "params.yaml")):
            outs.setdefault((root / path).resolve(), stage)
    return outs


def _check_not_tracked(path: Path, what: str, tracked: dict[Path, str]) -> None:
    """A side command never replaces an output DVC recorded: dvc.lock would then certify bytes it did not make
    (and the stage's resumable work beside it would be discarded)."""
    resolved = path.resolve()
    for out, stage in tracked.items():
        if _inside(resolved, out) or out.is_relative_to(resolved):
            raise UserError(f"{what} {path}: {out} is the pipeline's output of {stage} (tracked by DVC); "
                            f"`pipeline tokenize` does not replace it: give {what} elsewhere "
                            f"(or run `dvc repro {stage}`)")


def check_out(out: Path, source: Path, vqgan: Path, tracked: dict[Path, str]) -> None:
    o, s, v = out.resolve(), source.resolve(), vqgan.resolve()
    for folder, role in ((s, "the source"), (v, "the VQGAN folder")):
        if _inside(o, folder) or folder.is_relative_to(o):
            raise UserError(f"--out {out}: overlaps {role} {folder}; give a folder outside it")
    _check_not_tracked(out, "--out", tracked)
    check_replaceable(out, "tokenize")  # never replace a folder that is not an earlier token store
    if out.is_dir() and changed_after_written(out):  # an earlier store, with files of the user's put in since
        raise UserError(f"--out {out}: holds files added or edited after tokenize wrote it, which a new store "
                        f"would replace; move them out or choose another --out")
    check_writable_parent(out, "--out")


def _is_our_json(path: Path, keys: set[str], exact: bool) -> bool:
    try:
        data = read_json(path)
    except (UserError, OSError):
        return False
    return isinstance(data, dict) and (set(data) == keys if exact else keys <= set(data))


def check_metrics(metrics: Path, source: Path, vqgan: Path, out: Path, tracked: dict[Path, str]) -> None:
    """--metrics names a .json file that is absent or one this command wrote before (exactly the keys the
    tokenize stage writes; its run facts beside it, `<stem>.run.json`, likewise), outside the folders read or
    replaced: anything else is refused, so no user file is ever overwritten."""
    if metrics.suffix != ".json":
        raise UserError(f"--metrics {metrics}: must be a .json file (the run's facts go beside it in "
                        f"{run_log_path(metrics).name})")
    m = metrics.resolve()
    for folder, role in ((source, "the source"), (vqgan, "the VQGAN folder"), (out, "the token store")):
        if _inside(m, folder.resolve()):
            raise UserError(f"--metrics {metrics}: inside {role} {folder}; give a path outside it")
    _check_not_tracked(metrics, "--metrics", tracked)
    for path, keys, exact in ((metrics, METRICS_KEYS, True), (run_log_path(metrics), {"encoded_this_run"}, False)):
        if path.is_dir():
            raise UserError(f"--metrics {metrics}: {path} is a folder; give a .json file path")
        if (path.exists() or path.is_symlink()) and (path.is_symlink() or not _is_our_json(path, keys, exact)):
            raise UserError(f"--metrics {metrics}: {path} exists and is not a metrics file written by "
                            f"`pipeline tokenize`; refusing to replace it (give another path)")
    check_writable_parent(metrics, "--metrics")


def vqgan_resolution(vmeta: dict, downsample: int, wanted: int | None, vqgan: Path) -> int:
    """The resolution to prepare raw images at: the VQGAN's training resolution, which the tokenize stage
    requires (the store's grid is the one the VQGAN was trained for). --resolution only fills in a config
    that does not record it."""
    if wanted is not None and wanted <= 0:
        raise UserError(f"--resolution {wanted}: must be a positive number of pixels")
    trained = vmeta.get("resolution")
    if trained is not None and (type(trained) is not int or trained <= 0):
        raise UserError(f"{vqgan / 'config.json'}: resolution {trained!r} is not a positive integer")
    if wanted is not None and trained is not None and wanted != trained:
        raise UserError(f"--resolution {wanted} differs from the VQGAN's training resolution {trained} "
                        f"({vqgan}); tokens are made at {trained}: leave --resolution out")
    res = wanted or trained
    if res is None:
        raise UserError(f"{vqgan / 'config.json'}: records no training resolution; pass --resolution")
    if res % downsample:
        raise UserError(f"resolution {res} is not divisible by the downsampling {downsample} of the VQGAN in {vqgan}")
    return res


def check_staging(staging: Path) -> None:
    """The prepare step's work folder is removed at the end: it may hold only what an earlier run put there."""
    from pipeline.atomic import OWNER_FILE

    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise UserError(f"{staging}: exists and is not this command's work folder; move it away")
    for entry in staging.iterdir() if staging.is_dir() else ():
        ours = entry.name.startswith(".") or (entry / OWNER_FILE).is_file()
        if not ours or entry.is_symlink():
            raise UserError(f"{staging}: holds {entry.name}, not this command's; move it away")


def store_name(name: str | None, source: Path, out: str | None) -> str:
    """The store's dataset name: --name, else the --out folder's name, else the source folder's name."""
    chosen = name if name is not None else Path(out or source).resolve().name
    if not NAME.fullmatch(chosen):
        if name is not None:
            raise UserError(f"--name {chosen!r}: allowed are ASCII letters, digits, - and _")
        raise UserError(f"store name {chosen!r} (the name of {out or source}): allowed are ASCII letters, digits, "
                        f"- and _; give --name")
    return chosen


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (top first), so a failed run can take them away again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: an interrupted run's work stays for the next run to resume


# ---------------------------------------------------------------- the command

def _announce(peek: Peek, source: Path, vqgan: Path, in_ch: int, res: int, resize: str, convert: bool,
              trained: bool) -> None:
    """Refuse what the first images show cannot be tokenized as asked; say what will be converted."""
    from stages.prepare import IMAGE_EXTS

    if not peek.sizes:
        reasons = ", ".join(f"{r} x{n}" for r, n in peek.skipped.most_common(3))
        raise UserError(f"{source}: no usable images ({', '.join(IMAGE_EXTS)})"
                        + (f"; skipped: {reasons}" if reasons else ""))
    if peek.colour != (in_ch == 3):
        have, want = ("colour", "grey (1 channel)") if peek.colour else ("grey", "colour (3 channels)")
        if not convert:
            raise UserError(f"{source}: the images are {have}, the VQGAN in {vqgan} takes {want}; pass "
                            f"--convert-channels to tokenize them as {want.split()[0]}")
        print(f"tokenize: converting {have} images to {want} for the VQGAN", file=sys.stderr)
    if peek.sizes != {(res, res)}:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(peek.sizes)[:4]) + (", ..." if len(peek.sizes) > 4 else "")
        print(f"tokenize: images of {shown} made {res}x{res} (--resize {resize})"
              + (", the VQGAN's resolution" if trained else ""), file=sys.stderr)


def _check_made_grey(prepared: Path, source: Path, vqgan: Path, convert: bool) -> None:
    """Colour images beyond the few looked at first: the prepare step's report counts those it made grey."""
    made = read_json(prepared / "report.json").get("colour_made_grey")
    if not made:
        return
    if not convert:
        raise UserError(f"{source}: {made['count']} colour image(s) (the first: {made['first'][0]}), the VQGAN in "
                        f"{vqgan} takes grey (1 channel); pass --convert-channels to tokenize them as grey")
    print(f"tokenize: {made['count']} colour image(s) made grey (1 channel) for the VQGAN", file=sys.stderr)


def _report_skipped(prepared: Path, source: Path) -> None:
    """Say what the prepare step left out (unreadable, truncated, too small...), as the prepare stage's log does."""
    report = prepared / "report.json"
    by_reason = (read_json(report).get("skipped_by_reason") or {}) if report.is_file() else {}
    if by_reason:
        shown = ", ".join(f"{reason} x{n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1])[:4])
        print(f"tokenize: skipped {sum(by_reason.values())} file(s) of {source} ({shown})", file=sys.stderr)


@contextlib.contextmanager
def _store_lock(out: Path) -> Iterator[None]:
    """The tokenize stage's own lock on the store (it re-enters it), taken here before the prepare step so a
    second run into the same store stops at once; removed when done, so no lock file stays beside --out (nor
    one a killed run left)."""
    lock = out.parent / f".{out.name}.lock"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(lock, f"token store {out}", remove=True, nested=True))
        except OSError as exc:
            raise UserError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
        yield


def tokenize_source(source: str | Path, vqgan: str | Path, out: str | Path, p: Any, *, name: str | None = None,
                    resolution: int | None = None, resize: str = "pad", background: int = 0,
                    split: str = "random", metrics: str | Path | None = None, convert_channels: bool = False,
                    tracked: dict[Path, str] | None = None) -> Path:
    """Tokenize a prepared dataset folder (with manifest.json), an image folder or WebDataset tar(s) of images
    with the VQGAN in `vqgan` (`p`: stages.tokenize.TokenizeParams) into the store folder `out`, whose dataset
    is `name` (default: out's folder name). Raw images are first prepared at the VQGAN's resolution and channels
    into a work folder beside `out`, removed when done. Images of the other colour kind than the VQGAN's are
    refused unless `convert_channels`; what is converted is printed. `tracked`: outputs of the DVC pipeline,
    never replaced. Everything is checked before the first write."""
    from pipeline.vqgan_io import load_vqgan
    from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
    from stages.prepare import run as prepare_run
    from stages.tokenize import TokenizeConfig
    from stages.tokenize import run as tokenize_run

    source, out, vqgan = Path(source), Path(out), Path(vqgan)
    metrics = Path(metrics) if metrics is not None else None
    name = store_name(name, source, str(out))
    if not source.exists():
        raise UserError(f"{source} does not exist")
    check_out(out, source, vqgan, tracked or {})
    if metrics is not None:
        check_metrics(metrics, source, vqgan, out, tracked or {})
    model, vmeta = load_vqgan(vqgan)  # another program's config.json, missing or damaged weights: one line, now
    in_ch, downsample = model.cfg.in_channels, model.cfg.downsample
    del model  # the stage loads it again on its device
    res = vqgan_resolution(vmeta, downsample, resolution, vqgan)
    raw = not (source / "manifest.json").is_file()
    staging = out.parent / f".{out.name}.prepared"
    if raw:
        check_staging(staging)
        kind = "webdataset" if source.suffix == ".tar" or any(source.glob("*.tar")) else "folder"
        spec = from_dict(DatasetSpec, {"source": kind, "path": str(source), "resolution": res, "channels": in_ch,
                                       "resize": resize, "background": background, "split": split},
                         "tokenize", f"{source} (options)")
        _announce(peek_images(source), source, vqgan, in_ch, res, resize, convert_channels,
                  vmeta.get("resolution") is not None)
    created = _make_parents(out.parent)  # the first write
    try:
        with _store_lock(out):
            try:
                if raw:
                    prepare_run(PrepareConfig(name, spec, PrepareParams(out_dir=str(staging))))
                    _check_made_grey(staging / name, source, vqgan, convert_channels)
                    _report_skipped(staging / name, source)
                tokenize_run(TokenizeConfig(name, staging / name if raw else source, vqgan, out, metrics, None, p,
                                            convert_channels))
            finally:
                if raw:  # prepared again by a re-run (same bytes), which then resumes the tokenize step's work
                    shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        _remove_if_empty(created)
        raise
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

    for option, value in (("source", args.source), ("--out", args.out), ("--metrics", args.metrics),
                          ("--vqgan", args.vqgan), ("--name", args.name)):
        if value is not None and not value.strip():
            raise UserError(f"{option} {value!r}: empty; give a path" + (" or leave the option out"
                                                                       if option != "source" else ""))
    source = Path(args.source)
    name = store_name(args.name, source, args.out)
    p = params_from({"batch_size": args.batch_size, "shard_size": args.shard_size, "hflip": args.hflip,
                     "search": args.search, "device": args.device, "num_workers": args.num_workers}, "command line")
    out = Path(args.out) if args.out else root / "data" / "tokens" / name
    tokenize_source(source, args.vqgan, out, p, name=name, resolution=args.resolution, resize=args.resize,
                    background=args.background, split=args.split, metrics=args.metrics,
                    convert_channels=args.convert_channels, tracked=pipeline_outputs(root))
    print(f"token store: {out}", file=sys.stderr)
