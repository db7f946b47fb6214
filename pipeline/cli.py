"""tokenmill command line: `python -m pipeline <command>` (also installed as `tokenmill`).

  run          the whole pipeline (or some stages) as a Prefect flow; DVC skips what is up to date
  stage        one stage through DVC, without Prefect
  check        validate params.yaml
  deps         check (or --write) dvc.yaml's code deps against each stage's import closure
  ui           start the Prefect server + UI on 127.0.0.1
  serve        serve the flow as a deployment, so runs with parameters start from the UI
  add-dataset  add an image folder / WebDataset / IDX dataset to params.yaml and prepare it
  tokenize     tokenize any image folder or prepared dataset with a chosen VQGAN checkpoint
  compare      experiments side by side: the params that differ, gFID, rFID, PSNR, recall, bits/token
  tiny         the first run: every stage on a small Fashion-MNIST copy in runs/tiny/, a few minutes on a CPU
  doctor       what this machine runs: torch build, CUDA device, bf16, xformers kernels, faiss, threads
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline import dvc_deps
from pipeline.config import check_dataset_name, load_params, printable
from pipeline.dvc_graph import missing_dependency, select, stage_names, stages_in_run, stale_upstream_note
from pipeline.errors import UserError, main_guard
from pipeline.prefect_server import project_server, same_path, server_home, supervise, temporary_server
from pipeline.presets import did_you_mean, resolve_overrides, unread_note
from pipeline.retokenize import tokenize_command, workers_option
from pipeline.run_checks import (check_dataset_paths, check_params, check_selection, check_tokenizable,
                                 validate_overrides)
from pipeline.runs import project_lock, run_with_overrides, undo_killed_run

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 4200
# a deployment's flow run, stopped with `serve`: up to 30 s to stop its stage (runs._stop_on_terminate), then undo
RUN_STOP_S = 60.0


AUTH_ENV = "TOKENMILL_PREFECT_AUTH"  # optional 'user:password' for the local server's basic auth


def server_env(port: int) -> dict[str, str]:
    """Settings of the local Prefect server: bound to 127.0.0.1, cross-origin requests accepted from its own UI
    origin only (Prefect's default is any origin, so any web page open in the browser could start runs), and
    basic auth when the user sets TOKENMILL_PREFECT_AUTH."""
    env = {"PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{port},http://localhost:{port}"}
    if os.environ.get(AUTH_ENV):
        env["PREFECT_SERVER_API_AUTH_STRING"] = os.environ[AUTH_ENV]
    return env


def _prefect_env(port: int, temp_server: bool = False) -> None:
    """Point Prefect at this project's local server when one runs on `port`; with none there (or with
    `temp_server`) Prefect runs with a temporary one. A server of another project on the port is refused with
    one line (its PREFECT_HOME differs from ours): runs never land silently in another project's UI."""
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    if os.environ.get(AUTH_ENV):
        os.environ.setdefault("PREFECT_API_AUTH_STRING", os.environ[AUTH_ENV])
    if "PREFECT_API_URL" not in os.environ:  # a URL the user set (e.g. Prefect Cloud) is theirs to choose
        url = None if temp_server else project_server(port, os.environ["PREFECT_HOME"], os.environ.get(AUTH_ENV))
        if url:
            os.environ["PREFECT_API_URL"] = url
        else:  # cmd_run starts a temporary server: no browser UI needs it, so no origin may call it
            os.environ.setdefault("PREFECT_SERVER_CORS_ALLOWED_ORIGINS", "http://127.0.0.1")


def _preset_param(preset: str | None) -> str | None:
    """The preset as the flow records it: its path relative to the project (it must lie under configs/). An empty
    --preset (an unset shell variable) is refused: taken as none, it would run params.yaml as it is."""
    if preset is None:
        return None
    if not preset.strip():
        raise UserError("--preset is empty: name a file under configs/ (e.g. configs/tiny.yaml), or leave --preset "
                        "out to run params.yaml as it is")
    path = Path(preset).resolve()
    if not path.is_relative_to(ROOT):
        raise UserError(f"preset {printable(preset)}: must be a .yaml file under {ROOT / 'configs'}"
                        f"{did_you_mean(ROOT, preset)}")
    return path.relative_to(ROOT).as_posix()


def _print_results(results: list[dict[str, Any]]) -> None:
    width = max([len(r["status"]) for r in results] + [22])
    for r in results:
        print(f"{r['stage']:<32} {r['status']:<{width}} {r['seconds']:>8.1f} s")


def _repro_keep_going(cmd: list[str]) -> list[tuple[str, int, str]]:
    """`dvc repro --keep-going`, its output passed through as it comes; returns the failed stages as
    (stage, exit code, its last `error:` line or '')."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        return _follow_repro(proc)
    except BaseException:  # Ctrl-C reached dvc too: let it finish stopping (and release its locks) before the undo
        _reap(proc)
        raise


def _reap(proc: subprocess.Popen) -> None:
    import threading

    # keep reading what it prints while it stops, so a full pipe never blocks it; not shown: after a stop it is
    # DVC's own "interrupted" noise, or a traceback when the signal caught it starting up
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    for stop, grace in ((None, 30), (proc.terminate, 10), (proc.kill, 10)):
        if stop is not None:
            stop()
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:  # pressed again: stop waiting politely
            continue


def _follow_repro(proc: subprocess.Popen) -> list[tuple[str, int, str]]:
    import re

    failed, current, error, missing, text = [], "", "", "", b""
    for chunk in iter(lambda: os.read(proc.stdout.fileno(), 4096), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        text += chunk
        *done, text = text.split(b"\n")
        for raw in done:
            line = raw.decode(errors="replace").split("\r")[-1].strip()
            if m := re.match(r"Running stage '([^']+)'", line):
                current, error = m.group(1), ""
            elif line.startswith("error: "):
                error = line
            elif m := re.search(r"failed to run: .*, exited with (\d+)", line):
                failed.append((current, int(m.group(1)), error))
            elif m := re.search(r"No such file or directory: '([^']+)'|'([^']+)' does not exist", line):
                missing = m.group(1) or m.group(2)  # DVC's WARNING before its "failed to reproduce"
            elif (m := re.match(r"ERROR: failed to reproduce '([^']+)'", line)) and missing:
                # DVC stopped before the stage's command: a dependency is missing (the stage never ran)
                failed.append((m.group(1), 2, f"error: {m.group(1)}: {missing_dependency(missing, ROOT)}"))
                missing = ""
    code = proc.wait()
    if code and not failed:  # DVC itself failed (a missing dependency, a lock): nothing to attribute
        failed.append(("dvc repro", code, ""))
    return failed


def _repro_undone_on_failure(cmd: list[str], overrides: list[str], started: str | None = None,
                             targets: list[str] | None = None, with_deps: bool = True) -> None:
    """Run `dvc repro ... --keep-going` under `run_with_overrides` (validated, locked, undone if it fails); a failure
    ends with the failed stages and their error lines, last, and exit 2 when every one was the user's mistake."""
    failed: list[tuple[str, int, str]] = []
    try:
        with run_with_overrides(ROOT, overrides, targets, with_deps):  # a failed run is undone: raise inside
            if started:
                print(started, file=sys.stderr)
            failed = _repro_keep_going(cmd)
            if failed:
                raise SystemExit(2 if all(code == 2 and error for _, code, error in failed) else 1)
    finally:
        if failed:  # last, after DVC's and the rollback's messages
            print("failed stages (the stages that need them were skipped; everything else ran):", file=sys.stderr)
            for stage, code, error in failed:
                print(f"  {stage:<32} exit {code}  {error}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> None:
    preset = _preset_param(args.preset)
    overrides = resolve_overrides(ROOT, preset, args.set)
    params = validate_overrides(ROOT, overrides)  # before anything is written or started
    check_selection(ROOT, params, overrides, args.stage)  # a typo in --stage is one line, before anything runs
    if note := unread_note(ROOT, overrides, args.set):
        print(note, file=sys.stderr)
    if args.no_prefect:
        cmd = ["dvc", "repro", "--keep-going", *(args.stage or [])] + (["--force"] if args.force else [])
        _repro_undone_on_failure(cmd, overrides, targets=args.stage)
        return
    _prefect_env(args.port, args.temp_server)
    with contextlib.ExitStack() as server:  # the results are read while the server is still up
        if "PREFECT_API_URL" not in os.environ:
            print(f"note: no Prefect server of this project on 127.0.0.1:{args.port}; running with a temporary one "
                  f"(start `python -m pipeline ui` to keep runs in the UI)", file=sys.stderr)
            env = {**os.environ, "PYTHONPATH": _with_root(os.environ.get("PYTHONPATH"))}
            os.environ["PREFECT_API_URL"] = server.enter_context(temporary_server(env))
            server.callback(_drain_prefect)  # runs first: what Prefect still holds reaches the server before it stops
        _run_flow(args, preset)


def _drain_prefect() -> None:
    """Send the logs and events Prefect's background workers still queue (they would go at exit, to a server gone
    by then, as "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def _run_flow(args: argparse.Namespace, preset: str | None) -> None:
    from pipeline.flow import PipelineFailed, tokenmill_pipeline
    from pipeline.runs import STOPPED_BY

    try:
        state = tokenmill_pipeline(stages=args.stage, force=args.force, overrides=args.set or [], preset=preset,
                                   root=str(ROOT), return_state=True)
    except Exception:
        if STOPPED_BY:  # stopped and undone; what failed after it is Prefect reporting the stop
            raise KeyboardInterrupt from None
        raise
    if state.is_completed():
        _print_results(state.result())
        return
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, PipelineFailed):  # some stages failed, the rest ran: the table, then one line
        _print_results(exc.results)
        for r in exc.results:
            if r["status"] == "failed":
                print(r["error"], file=sys.stderr)
        sys.exit(2 if exc.user_error else 1)
    if isinstance(exc, UserError):
        raise exc
    raise SystemExit(f"error: the flow run ended {state.name}: {state.message}")


def cmd_stage(args: argparse.Namespace) -> None:
    check_params(ROOT / "params.yaml", ROOT)
    names = select(stage_names(ROOT), [args.name])  # a base name (`prepare`) is every prepare@..., as in run --stage
    if note := stale_upstream_note(ROOT, names):
        print(f"note: {note}", file=sys.stderr)
    _repro_undone_on_failure(["dvc", "repro", "--keep-going", "--single-item", *names]
                             + (["--force"] if args.force else []), [], targets=names, with_deps=False)


def cmd_deps(args: argparse.Namespace) -> None:
    """dvc.yaml's code deps = each stage's import closure; --check reports drift, --write fixes it."""
    if args.write:
        changed = dvc_deps.write(ROOT / "dvc.yaml", ROOT)
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed
              else "dvc.yaml: code deps up to date")
        return
    drift = dvc_deps.drift(ROOT / "dvc.yaml", ROOT)
    for name, (listed, wanted) in drift.items():
        print(f"{name}: {dvc_deps.describe(listed, wanted)}")
    if drift:
        raise UserError(f"dvc.yaml: the code deps of {len(drift)} stage(s) differ from their imports; "
                        f"run `python -m pipeline deps --write`")
    print("dvc.yaml: code deps equal every stage's import closure")


def cmd_check(args: argparse.Namespace) -> None:
    if not args.params.strip():  # Path("") is the working folder
        raise UserError("--params is empty: give a params file, or leave --params out to check params.yaml")
    if Path(args.params).resolve() == (ROOT / "params.yaml").resolve():
        with project_lock(ROOT):  # before a plain `dvc repro`: not with a killed run's overrides still applied
            undo_killed_run(ROOT)
    names = check_params(Path(args.params), ROOT)
    # before a plain `dvc repro`, every dataset's folder must be there; relative paths are the params file's project's
    params = load_params(Path(args.params))
    check_dataset_paths(params, args.params, Path(args.params).resolve().parent)
    check_tokenizable(ROOT, params, args.params, stages_in_run(ROOT, params))  # a full `dvc repro` runs every stage
    if Path(args.params).resolve() == (ROOT / "params.yaml").resolve() and (ROOT / "dvc.lock").is_file():
        from pipeline.dvc_repair import repair_rwlock
        from pipeline.out_guard import check_unrecorded_changes
        repair_rwlock(ROOT)  # a killed dvc's cut table of running stages makes `dvc status` fail
        check_unrecorded_changes(ROOT)  # before a plain `dvc repro` (scripts/run.sh): files of yours in outputs
    print(f"{args.params}: ok ({len(names)} dataset(s): {', '.join(names)})")


def _with_root(pythonpath: str | None) -> str:
    """PYTHONPATH for a child that imports this checkout's pipeline package (not an installed copy)."""
    return os.pathsep.join(filter(None, [str(ROOT), pythonpath]))


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1..65535)")
    return port


def cmd_ui(args: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    home = server_home(args.port)
    if home is not None:
        mine = bool(home) and same_path(home, os.environ["PREFECT_HOME"])
        raise UserError(f"port {args.port} already holds " + ("this project's Prefect server: open "
                        f"http://127.0.0.1:{args.port}" if mine else f"another Prefect server (state in "
                        f"{home or 'an unknown folder'}); use --port"))
    with socket.socket() as probe:  # another program there: one line here, not the server's failed start-up
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as exc:
            raise UserError(f"port {args.port} on 127.0.0.1 is in use by another program ({exc.strerror}); use "
                            f"--port") from None
    print(f"Prefect UI on http://127.0.0.1:{args.port}  (runs reach it when started from this project; "
          f"Ctrl-C stops it)", file=sys.stderr)
    # not `prefect server start`: the same app and services, behind pipeline.ui_server.LocalOnly, which refuses
    # requests of other web origins (CORS alone lets a page's "simple" POST through and Prefect executes it)
    env = {**os.environ, **server_env(args.port), "PYTHONPATH": _with_root(os.environ.get("PYTHONPATH"))}
    sys.exit(supervise([sys.executable, "-c", "from pipeline.ui_server import serve; serve()"], env=env))


def cmd_serve(args: argparse.Namespace) -> None:
    _prefect_env(args.port)
    if "PREFECT_API_URL" not in os.environ:
        raise UserError(f"no Prefect server of this project on 127.0.0.1:{args.port}: "
                        f"start `python -m pipeline ui` first")
    # in a child we can always stop: Prefect's runner ignores an inherited SIGINT-ignore and can hang on SIGTERM
    code = supervise([sys.executable, "-c", "import sys; from pathlib import Path; from pipeline.flow import serve; "
                      "serve(Path(sys.argv[1]), sys.argv[2])", str(ROOT), args.name],
                     env={"PREFECT_LOGGING_EXTRA_LOGGERS": "tokenmill", **os.environ,  # the undo's lines reach the UI
                          "PYTHONPATH": _with_root(os.environ.get("PYTHONPATH"))},
                     runs_first=RUN_STOP_S)
    sys.exit(code)


def cmd_add_dataset(args: argparse.Namespace) -> None:
    check_dataset_name(args.name, "add-dataset")
    if not args.path.strip():  # os.path.abspath("") is the working folder
        raise UserError("add-dataset: the dataset path is empty")
    # absolute, but a symlink stays a symlink: re-pointing it later is a change of the data DVC sees
    path = Path(os.path.abspath(Path(args.path).expanduser()))
    if not path.exists():
        raise UserError(f"{path} does not exist")
    source = args.source or ("webdataset" if path.suffix == ".tar" or any(path.glob("*.tar")) else "folder")
    params_path = ROOT / "params.yaml"
    params = load_params(params_path)
    datasets = params.get("datasets") if isinstance(params.get("datasets"), dict) else {}
    if args.name in datasets:
        raise UserError(f"{params_path}: dataset '{args.name}' exists already; edit it there")
    # unset: the VQGAN's dataset's, so that tokenize@<name> takes it (it refuses another resolution or channels)
    vq_name = params["train_vqgan"].get("dataset") if isinstance(params.get("train_vqgan"), dict) else None
    vq_data = datasets.get(vq_name) if isinstance(datasets.get(vq_name), dict) else {}
    resolution = args.resolution if args.resolution is not None else vq_data.get("resolution", 32)
    channels = args.channels if args.channels is not None else vq_data.get("channels", 3)
    # every dataset is tokenized with the one VQGAN (tokenize@<name>), which refuses another resolution, and other
    # channels unless converted: refused here, before the entry would fail every later run
    vq = f"the VQGAN's dataset '{vq_name}'"
    if vq_data.get("resolution") not in (None, resolution):
        raise UserError(f"add-dataset: --resolution {resolution} differs from {vq_data['resolution']}, that of {vq}; "
                        f"tokenize@{args.name} would refuse it (leave --resolution out to take "
                        f"{vq_data['resolution']})")
    if vq_data.get("channels") not in (None, channels) and not args.convert_channels:
        raise UserError(f"add-dataset: --channels {channels} differs from {vq_data['channels']}, that of {vq}; add "
                        f"--convert-channels to convert at tokenize, or leave --channels out")
    background = args.background if args.background is not None else vq_data.get("background", 255)
    entry = {"source": source, "path": str(path), "resolution": resolution, "channels": channels,
             "resize": args.resize, "background": background, "split": args.split}
    if args.convert_channels:
        entry["convert_channels"] = True
    overrides = [f"datasets.{args.name}.{k}={json.dumps(v)}" for k, v in entry.items()]
    # validated as a whole before writing; if its prepare stage fails the entry is taken out again
    added = f"added datasets.{args.name} to params.yaml ({resolution} px, {channels} channel(s))"
    if args.no_run:
        with run_with_overrides(ROOT, overrides):
            print(added, file=sys.stderr)
        return
    _repro_undone_on_failure(["dvc", "repro", "--keep-going", f"prepare@{args.name}"], overrides, started=added)


def cmd_tokenize(args: argparse.Namespace) -> None:
    tokenize_command(args, ROOT)


def cmd_compare(args: argparse.Namespace) -> None:
    from pipeline.compare import compare
    print(compare(ROOT, args.rev))


def cmd_tiny(args: argparse.Namespace) -> None:
    from pipeline.tiny import run
    run(Path(args.dest))


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
    p.add_argument("--no-prefect", action="store_true", help="plain `dvc repro --keep-going`, no flow")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="this project's Prefect server (`ui`) port")
    p.add_argument("--temp-server", action="store_true",
                   help="run with a temporary Prefect server even when this project's UI runs")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("stage", help="run one stage through DVC (no Prefect)")
    p.add_argument("name", help="e.g. prepare@fashion_mnist, or prepare for every dataset's")
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_stage)

    p = sub.add_parser("deps", help="check or write dvc.yaml's code deps (each stage's import closure)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="report drift and exit 2 if any (the default)")
    g.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    p.set_defaults(fn=cmd_deps)

    p = sub.add_parser("check", help="validate params.yaml")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("ui", help="start the Prefect server and UI on 127.0.0.1")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT)
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser("serve", help="serve the flow as a deployment (start runs from the UI)")
    p.add_argument("--name", default="tokenmill-local")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("add-dataset", help="add a dataset from a path to params.yaml and prepare it")
    p.add_argument("name", help="dataset name (letters, digits, _)")
    p.add_argument("path", help="image folder (class sub-folders = labels), WebDataset tar(s), or IDX folder")
    p.add_argument("--source", choices=("folder", "webdataset", "idx"))
    p.add_argument("--resolution", type=int, help="default: the resolution of the dataset the VQGAN trains on")
    p.add_argument("--channels", type=int, choices=(1, 3), help="default: the channels of the VQGAN's dataset")
    p.add_argument("--resize", default="pad", choices=("pad", "resize", "center_crop"))
    p.add_argument("--background", type=int, help="padding and alpha fill, 0..255 (default: the VQGAN's dataset's)")
    p.add_argument("--split", default="random", choices=("keep", "random"))
    p.add_argument("--convert-channels", action="store_true", help="grey <-> RGB at tokenize, when --channels differs "
                   "from the VQGAN's")
    p.add_argument("--no-run", action="store_true", help="only add the params entry")
    p.set_defaults(fn=cmd_add_dataset)

    p = sub.add_parser("tokenize", help="tokenize any image folder or prepared dataset with a chosen VQGAN checkpoint")
    p.add_argument("source", help="prepared dataset folder (with manifest.json), image folder or WebDataset tar(s)")
    p.add_argument("--vqgan", default=str(ROOT / "data" / "vqgan"), help="VQGAN folder (model.safetensors + "
                   "config.json)")
    p.add_argument("--out", help="token store folder (default data/tokens/<name>; never a DVC-tracked store)")
    p.add_argument("--name", help="store name (default: the --out folder's name, else the source folder's)")
    p.add_argument("--metrics", help="also write the metrics JSON here (a .json path: absent, or written by tokenize)")
    p.add_argument("--hflip", action="store_true", help="also store horizontally flipped copies")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--search", default="auto", choices=("auto", "faiss", "torch"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=workers_option, default="auto",
                   help="image-decoding processes (default auto: sized to the device)")
    p.add_argument("--convert-channels", action="store_true", help="grey <-> RGB to match the VQGAN")
    p.add_argument("--resolution", type=int, help="raw images, a VQGAN whose config records no training resolution: "
                   "prepare them at this one (otherwise the recorded one, the only one allowed)")
    p.add_argument("--resize", default="pad", choices=("pad", "resize", "center_crop"))
    p.add_argument("--background", type=int, default=0,
                   help="padding and alpha fill, 0..255 (default 0, black: a VQGAN folder records no dataset setting)")
    p.add_argument("--split", default="random", choices=("keep", "random"))
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("compare", help="experiments side by side (params that differ, gFID, rFID, PSNR, recall)")
    p.add_argument("--rev", action="append", help="git commit whose experiments to show (repeatable; default HEAD)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("tiny", help="the first run: every stage on a small copy of the data, in its own project")
    p.add_argument("--dest", default=str(ROOT / "runs" / "tiny"), help="project folder (default runs/tiny)")
    p.set_defaults(fn=cmd_tiny)

    p = sub.add_parser("doctor", help="what this machine runs: torch/CUDA, bf16, xformers kernels, faiss, threads")
    p.set_defaults(fn=cmd_doctor)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    main_guard(lambda: args.fn(args))
