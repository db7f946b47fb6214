"""User mistakes through every entry point: each must end in one `error:` line naming the key, value or path, with
exit status 2, no traceback and no retry.

The mistakes (bad params, NaN/inf, wrong types, paths outside the project, datasets too small for the batch or the
codebook, missing earlier outputs, a moved key, ...) are made in a copy of the tiny project (`python -m pipeline
tiny`, which this script builds first when --base is not given) and run through:

  dvc    `dvc repro <stage>` with the mistake in params.yaml (DVC exits 255 for any failed stage; the stage's own
         exit status is in DVC's message, "exited with 2")
  flow   `python -m pipeline run --stage <stage> -S <mistake>`: the Prefect flow (a temporary server)
  cli    `python -m stages.<name> --params <params with the mistake>`: the stage's own command line

  python scripts/mistakes.py [--base runs/tiny] [--only dvc,cli] [--json out.json]
Prints one line per mistake and entry point and the totals; exit status 0 when every one gave its expected outcome.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipeline.config import apply_overrides, load_params  # noqa: E402

# (stage, override, what the error line must name)
MISTAKES = [
    ("train_vqgan", "train_vqgan.stepz=10", "stepz"),
    ("train_vqgan", "train_vqgan.steps=-1", "train_vqgan.steps"),
    ("prepare@fashion_mnist", "datasets.fashion_mnist.val_fraction=.nan", "val_fraction"),
    ("train_vqgan", "train_vqgan.optim.lr=inf", "train_vqgan.optim.lr"),
    ("train_vqgan", 'train_vqgan.batch_size="big"', "train_vqgan.batch_size"),
    ("train_vqgan", "train_vqgan.out_dir=/tmp/elsewhere", "/tmp/elsewhere"),
    ("prepare@fashion_mnist", "datasets.fashion_mnist.path=/nonexistent/fmnist", "/nonexistent/fmnist"),
    ("train_vqgan", "train_vqgan.batch_size=5000", "train_vqgan.batch_size = 5000 is larger than"),
    ("train_vqgan", "train_vqgan.kmeans_images=1", "kmeans_init needs at least"),
    ("train_vqgan", "train_vqgan.model.n_codes=0", "n_codes"),
    ("train_vqgan", "train_vqgan.dataset=cats", "cats"),
    ("tokenize@fashion_mnist", "tokenize.convert_channels=true", "now per dataset"),
    ("tokenize@fashion_mnist", 'datasets.fashion_mnist.convert_channels="yes"', "convert_channels"),
    ("fid_ref", "fid_ref.network.path=/nonexistent/net.pt", "/nonexistent/net.pt"),
    ("fid_ref", "fid_ref.dataset=fashion-mnist", "fashion-mnist"),
    ("eval_vqgan", "eval_vqgan.reference=data/fid_ref/nope", "data/fid_ref/nope"),
    ("eval_vqgan", "eval_vqgan.n_images=100000", "n_images"),
    ("train_transformer", "train_transformer.batch_size=100000", "train_transformer.batch_size = 100000 is larger"),
    ("train_transformer", "train_transformer.kind=diffusion", "train_transformer.kind"),
    ("train_transformer", "train_transformer.gan.family=ladda", "ladda"),
    ("sample", "sample.cfg_scale=-1", "sample.cfg_scale"),
    ("sample", "sample.model_dir=data/nothing_here", "data/nothing_here"),
    ("evaluate", "evaluate.resize=clean_bicubic", "clean_bicubic"),
    ("evaluate", "evaluate.samples_dir=data/samples/none", "data/samples/none"),
]
ENTRY_POINTS = ("dvc", "flow", "cli")


def one_line_verdict(rc: int, out: str, needle: str, want_rc: int = 2) -> tuple[bool, str]:
    """ok when the last `error:` line names `needle`, there is exactly one such line, no traceback, no retry."""
    errors = [line for line in out.splitlines() if line.lstrip().startswith("error: ")]
    traceback = "Traceback" in out
    retried = "AwaitingRetry" in out or "Retrying" in out
    ok = (rc == want_rc and len(errors) == 1 and needle in errors[0] and not traceback and not retried)
    what = "traceback" if traceback else "retried" if retried else (
        f"{len(errors)} error lines (exit {rc})" if len(errors) != 1 else f"one-line error (exit {rc})")
    return ok, (what, errors[-1].strip() if errors else (out.strip().splitlines() or [""])[-1])


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="a tiny project to copy (default: build one with `python -m pipeline tiny`)")
    ap.add_argument("--only", default=",".join(ENTRY_POINTS))
    ap.add_argument("--json")
    ap.add_argument("--from", dest="first", type=int, default=0, help="start at this mistake (0-based)")
    args = ap.parse_args()
    work_root = Path(tempfile.mkdtemp(prefix="tokenmill-mistakes-"))
    base = Path(args.base).resolve() if args.base else work_root / "base"
    if not args.base:
        subprocess.run([sys.executable, "-m", "pipeline", "tiny", "--dest", str(base)], cwd=ROOT, check=True)
    project = work_root / "project"
    shutil.copytree(base, project, symlinks=True)
    env = {**os.environ, "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1",
           "PREFECT_HOME": str(work_root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    params_path = project / "params.yaml"
    clean = params_path.read_text()
    results = []
    for stage, override, needle in MISTAKES[args.first:]:
        for entry in args.only.split(","):
            params_path.write_text(clean)
            start = time.monotonic()
            if entry == "flow":
                rc, out = run([sys.executable, "-m", "pipeline", "run", "--stage", stage, "-S", override,
                               "--temp-server"], project, env)
                ok, (what, line) = one_line_verdict(rc, out, needle)
            else:
                broken = apply_overrides(load_params(params_path), [override])
                if entry == "dvc":
                    params_path.write_text(yaml.safe_dump(broken, sort_keys=False))
                    rc, out = run(["dvc", "repro", "--single-item", stage], project, env)
                    # DVC ends with its own "ERROR: failed to reproduce ... exited with 2": one `error:` line
                    # of the stage's own before it
                    ok, (what, line) = one_line_verdict(2 if "exited with 2" in out else rc, out, needle)
                    dvc_line = next((x for x in out.splitlines() if x.startswith("ERROR: failed to reproduce")), "")
                    if not ok and "No such file or directory" in dvc_line and needle in dvc_line \
                            and "Traceback" not in out:
                        # a dep path that does not exist: DVC refuses before the stage starts, in one line
                        ok, what, line = True, f"DVC's own ERROR (exit {rc})", dvc_line
                    # a failed `dvc repro` removes the stage's old outputs; they are in the cache
                    params_path.write_text(clean)
                    run(["dvc", "checkout", "--force", "-q"], project, env)
                else:
                    alt = project / "params-mistake.yaml"
                    alt.write_text(yaml.safe_dump(broken, sort_keys=False))
                    base_name, _, item = stage.partition("@")
                    cmd = [sys.executable, "-m", f"stages.{base_name}", "--params", str(alt)]
                    rc, out = run(cmd + (["--dataset", item] if item else []), project, env)
                    ok, (what, line) = one_line_verdict(rc, out, needle)
            seconds = time.monotonic() - start
            results.append({"stage": stage, "mistake": override, "entry": entry, "ok": ok, "outcome": what,
                            "line": line, "seconds": round(seconds, 1)})
            print(f"{'ok ' if ok else 'BAD'} {entry:<4} {override:<48} {what:<24} {line[:110]}", flush=True)
    params_path.write_text(clean)
    bad = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(bad)} of {len(results)} gave one `error:` line, exit 2, no traceback, no retry "
          f"({len(MISTAKES) - args.first} mistakes x {len(args.only.split(','))} entry points)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work_root, ignore_errors=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
