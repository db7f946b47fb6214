"""tokenmill command line: `python -m pipeline <command>` (also installed as `tokenmill`).

  run          the whole pipeline (or some stages) as a Prefect flow; DVC skips what is up to date
  stage        one stage through DVC, without Prefect
  check        validate params.yaml
  ui           start the Prefect server + UI on 127.0.0.1
  serve        serve the flow as a deployment, so runs with parameters start from the UI
  add-dataset  add an image folder / WebDataset / IDX dataset to params.yaml and prepare it
  tokenize     tokenize any image folder or prepared dataset with a chosen VQGAN checkpoint
  doctor       what this machine runs: torch build, CUDA device, bf16, xformers kernels, faiss, threads
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from pipeline.config import from_dict, load_params, set_params_file
from pipeline.dvc_repair import repair_rwlock
from pipeline.errors import UserError, main_guard

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULES = ("prepare", "train_vqgan", "tokenize", "fid_ref", "eval_vqgan", "train_transformer", "sample", "evaluate")  # stages/<name>.py, in pipeline order
DEFAULT_PORT = 4200


def _prefect_env(port: int) -> None:
    """Point Prefect at the project's local server when one runs; otherwise Prefect runs ephemerally."""
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    if "PREFECT_API_URL" not in os.environ:
        url = f"http://127.0.0.1:{port}/api"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                os.environ["PREFECT_API_URL"] = url
        except OSError:
            pass


def check_params(path: Path) -> list[str]:
    """Validate every section every stage uses; return the dataset names. Raises UserError."""
    params = load_params(path)
    known: set[str] = set()
    for name in STAGE_MODULES:
        mod = importlib.import_module(f"stages.{name}")
        known.update(mod.SECTIONS)
        mod.check(params, str(path))
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"{path}: unknown section '{unknown[0]}' (allowed: {', '.join(sorted(known))})")
    return list(params.get("datasets") or {})


def preset_overrides(path: str) -> list[str]:
    """A preset file (configs/*.yaml) is a partial params.yaml; flatten it to `key.path=value` overrides."""
    import json

    p = Path(path)
    preset = load_params(p)

    def flat(node: dict, prefix: str) -> list[str]:
        out = []
        for k, v in node.items():
            key = f"{prefix}{k}"
            out += flat(v, key + ".") if isinstance(v, dict) and v else [f"{key}={json.dumps(v)}"]
        return out

    return flat(preset, "")


def cmd_run(args: argparse.Namespace) -> None:
    overrides = (preset_overrides(args.preset) if args.preset else []) + (args.set or [])
    if overrides:
        set_params_file(ROOT / "params.yaml", overrides)
    check_params(ROOT / "params.yaml")
    repair_rwlock(ROOT)
    if args.no_prefect:
        cmd = ["dvc", "repro", *(args.stage or [])] + (["--force"] if args.force else [])
        sys.exit(subprocess.call(cmd, cwd=ROOT))
    _prefect_env(args.port)
    if "PREFECT_API_URL" not in os.environ:
        print(f"note: no Prefect server on 127.0.0.1:{args.port}; running with a temporary one "
              f"(start `python -m pipeline ui` to keep runs in the UI)", file=sys.stderr)
    from pipeline.flow import tokenmill_pipeline
    results = tokenmill_pipeline(stages=args.stage, force=args.force, root=str(ROOT))
    for r in results:
        print(f"{r['stage']:<32} {r['status']:<22} {r['seconds']:>8.1f} s")


def cmd_stage(args: argparse.Namespace) -> None:
    check_params(ROOT / "params.yaml")
    repair_rwlock(ROOT)
    sys.exit(subprocess.call(["dvc", "repro", "--single-item", args.name] + (["--force"] if args.force else []),
                             cwd=ROOT))


def cmd_check(args: argparse.Namespace) -> None:
    names = check_params(Path(args.params))
    print(f"{args.params}: ok ({len(names)} dataset(s): {', '.join(names)})")


def cmd_ui(args: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    print(f"Prefect UI on http://127.0.0.1:{args.port}  (runs reach it when started from this project)",
          file=sys.stderr)
    sys.exit(subprocess.call(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port)]))


def cmd_serve(args: argparse.Namespace) -> None:
    _prefect_env(args.port)
    if "PREFECT_API_URL" not in os.environ:
        raise UserError(f"no Prefect server on 127.0.0.1:{args.port}: start `python -m pipeline ui` first")
    from pipeline.flow import tokenmill_pipeline
    tokenmill_pipeline.serve(name=args.name, parameters={"root": str(ROOT)},
                             description="tokenmill pipeline; set stages / force / overrides when starting a run")


def cmd_add_dataset(args: argparse.Namespace) -> None:
    path = Path(args.path).resolve()
    if not path.exists():
        raise UserError(f"{path} does not exist")
    source = args.source or ("webdataset" if path.suffix == ".tar" or any(path.glob("*.tar")) else "folder")
    entry = {"source": source, "path": str(path), "resolution": args.resolution, "channels": args.channels,
             "resize": args.resize, "background": args.background, "split": args.split}
    params_path = ROOT / "params.yaml"
    if args.name in (load_params(params_path).get("datasets") or {}):
        raise UserError(f"{params_path}: dataset '{args.name}' exists already; edit it there")
    from stages.prepare import DatasetSpec
    from_dict(DatasetSpec, entry, f"datasets.{args.name}", "add-dataset")  # validate before writing
    set_params_file(params_path, [f"datasets.{args.name}.{k}={v}" for k, v in entry.items()])
    print(f"added datasets.{args.name} to params.yaml", file=sys.stderr)
    if not args.no_run:
        sys.exit(subprocess.call(["dvc", "repro", f"prepare@{args.name}"], cwd=ROOT))


def cmd_tokenize(args: argparse.Namespace) -> None:
    from stages.tokenize import TokenizeParams, tokenize_source

    source = Path(args.source)
    name = args.name or source.name
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"store name {name!r} must be letters, digits, - and _ (give --name)")
    p = from_dict(TokenizeParams, {"batch_size": args.batch_size, "shard_size": args.shard_size, "hflip": args.hflip,
                                   "search": args.search, "device": args.device, "num_workers": args.num_workers,
                                   "convert_channels": args.convert_channels}, "tokenize", "command line")
    out = Path(args.out) if args.out else ROOT / "data" / "tokens" / name
    tokenize_source(source, args.vqgan, out, p, resolution=args.resolution, resize=args.resize,
                    background=args.background, split=args.split, metrics=args.metrics)
    print(f"token store: {out}", file=sys.stderr)


def cmd_doctor(args: argparse.Namespace) -> None:
    from pipeline.doctor import report
    print("\n".join(report()))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tokenmill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline as a Prefect flow (DVC skips what is up to date)")
    p.add_argument("--stage", action="append", help="stage to run (repeatable; base name selects all items)")
    p.add_argument("--force", action="store_true", help="re-run even when up to date")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="edit params.yaml first")
    p.add_argument("--preset", help="a configs/*.yaml file merged into params.yaml first")
    p.add_argument("--no-prefect", action="store_true", help="plain `dvc repro`, no flow")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("stage", help="run one stage through DVC (no Prefect)")
    p.add_argument("name", help="e.g. prepare@fashion_mnist")
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_stage)

    p = sub.add_parser("check", help="validate params.yaml")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("ui", help="start the Prefect server and UI on 127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser("serve", help="serve the flow as a deployment (start runs from the UI)")
    p.add_argument("--name", default="tokenmill-local")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("add-dataset", help="add a dataset from a path to params.yaml and prepare it")
    p.add_argument("name", help="dataset name (letters, digits, _)")
    p.add_argument("path", help="image folder (class sub-folders = labels), WebDataset tar(s), or IDX folder")
    p.add_argument("--source", choices=("folder", "webdataset", "idx"))
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--resize", default="pad", choices=("pad", "resize", "center_crop"))
    p.add_argument("--background", type=int, default=255)
    p.add_argument("--split", default="random", choices=("keep", "random"))
    p.add_argument("--no-run", action="store_true", help="only add the params entry")
    p.set_defaults(fn=cmd_add_dataset)

    p = sub.add_parser("tokenize", help="tokenize any image folder or prepared dataset with a chosen VQGAN checkpoint")
    p.add_argument("source", help="prepared dataset folder (with manifest.json), image folder or WebDataset tar(s)")
    p.add_argument("--vqgan", default=str(ROOT / "data" / "vqgan"), help="VQGAN folder (model.safetensors + "
                   "config.json)")
    p.add_argument("--out", help="token store folder (default data/tokens/<name>)")
    p.add_argument("--name", help="store name (default: the source folder's name)")
    p.add_argument("--metrics", help="also write the metrics JSON here")
    p.add_argument("--hflip", action="store_true", help="also store horizontally flipped copies")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--search", default="auto", choices=("auto", "faiss", "torch"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--convert-channels", action="store_true", help="grey <-> RGB to match the VQGAN")
    p.add_argument("--resolution", type=int, help="for raw images: default the VQGAN's training resolution")
    p.add_argument("--resize", default="pad", choices=("pad", "resize", "center_crop"))
    p.add_argument("--background", type=int, default=0)
    p.add_argument("--split", default="random", choices=("keep", "random"))
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("doctor", help="what this machine runs: torch/CUDA, bf16, xformers kernels, faiss, threads")
    p.set_defaults(fn=cmd_doctor)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "add-dataset" and not args.name.replace("_", "").isalnum():
        raise SystemExit(f"error: dataset name {args.name!r} must be letters, digits and _")
    main_guard(lambda: args.fn(args))
