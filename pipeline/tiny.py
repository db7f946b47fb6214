"""The first run: every stage of the pipeline on a small copy of Fashion-MNIST, in a few minutes on a CPU.

`python -m pipeline tiny` (also `bash scripts/run.sh --tiny`) builds a throwaway project at runs/tiny/ (this
checkout's code and dvc.yaml, its own git + DVC repository, params.yaml = the project's params with the tiny preset
configs/tiny.yaml and the dataset pointed at the small copy inside it, by a relative path, so the folder can be
moved), commits its files, runs `dvc repro` there, commits dvc.lock and says where the results are. With the
commits, `dvc exp run -S ...` and `python -m pipeline compare` work inside it as in any project. The checkout's
params.yaml, dvc.lock and data/ are never touched. A second run refreshes the code (a commit when it changed) and
re-runs only what changed, like any DVC project. 16x16 images, 4x4 tokens, tiny models: the numbers show that
everything works, not what the models can do.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import apply_overrides, load_params
from pipeline.errors import UserError
from pipeline.out_guard import planned_outputs
from pipeline.run_checks import check_params_dict, preset_overrides
from pipeline.sandbox import PROJECT_FILES, ROOT, fashion_mnist_subset, make_project

MARKER = ".tokenmill-tiny"
DATASET = "fashion-mnist-small"  # inside the project; DVC and the prepare stage resolve it from the project root
# commits of the tiny project name this identity: works without a git config, changes no config
GIT_IDENTITY = ("-c", "user.name=pipeline tiny", "-c", "user.email=tiny@tokenmill.invalid")
PRESET = ROOT / "configs" / "tiny.yaml"
TINY_FILES = (*PROJECT_FILES, "configs")
N_TRAIN, N_VAL = 2000, 400  # the first images of each Fashion-MNIST split
RESULTS = (("report of the samples (gFID, per class, grids)", "data/reports/evaluate/report.md"),
           ("report of the VQGAN (rFID, worst reconstructions)", "data/reports/eval_vqgan/report.md"),
           ("samples, a row per class", "data/samples/default/grid.png"),
           ("VQGAN reconstructions", "data/vqgan/recon_grid.png"),
           ("training curves", "data/vqgan/curves.png, data/transformer/curves.png"))


def _fid_ref_output(params: dict) -> str | None:
    """The reference folder dvc.yaml's fid_ref stage writes under `params` (its path names the dataset)."""
    return next((path for stage, _, path, _ in planned_outputs(ROOT, params, ("outs",)) if stage == "fid_ref"), None)


def tiny_params(dataset: str) -> dict:
    params = apply_overrides(load_params(ROOT / "params.yaml"), preset_overrides(str(PRESET)))
    params["datasets"] = {"fashion_mnist": {**params["datasets"]["fashion_mnist"], "path": dataset}}
    # the user's stages may read a dataset of theirs (add-dataset, then train_vqgan.dataset=pets), which is not
    # here: every stage reads the small copy, and a reference that was fid_ref's output stays fid_ref's output
    made = _fid_ref_output(params)
    for section in params.values():
        if isinstance(section, dict) and "dataset" in section:
            section["dataset"] = "fashion_mnist"
    now = _fid_ref_output(params)
    gan = (params.get("train_transformer") or {}).get("gan")
    for holder, key in ((params.get("eval_vqgan") or {}, "reference"), (params.get("evaluate") or {}, "reference"),
                        (gan if isinstance(gan, dict) else {}, "fid_reference")):
        if holder.get(key) == made:
            holder[key] = now
    return params


def _git(dest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=dest, capture_output=True, text=True)


def commit(dest: Path, message: str, paths: list[str]) -> bool:
    """Commit `paths` of the tiny project (what this command wrote, not the user's other edits); False when none
    of them changed."""
    added = _git(dest, "add", "-A", "--", *[p for p in paths if (dest / p).exists()])
    if added.returncode == 0 and _git(dest, "diff", "--cached", "--quiet").returncode == 0:
        return False
    done = _git(dest, "commit", "-q", "-m", message) if added.returncode == 0 else added
    if done.returncode:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no message"])[-1]
        raise UserError(f"tiny: `git {done.args[5]}` in {dest} failed: {last}")
    return True


def build(dest: Path) -> Path:
    """Make (or refresh the code of) the tiny project at `dest`; refuse a folder this command did not make."""
    if dest.exists() and not (dest / MARKER).is_file():
        if not dest.is_dir() or any(dest.iterdir()):
            raise UserError(f"{dest}: exists and was not made by `pipeline tiny`; give another --dest")
    fashion_mnist_subset(dest / DATASET, N_TRAIN, N_VAL)
    params = tiny_params(DATASET)
    # same dvc.yaml, same relative out paths; the outputs that exist are in the tiny project, which this command made
    check_params_dict(params, str(dest / "params.yaml"), ROOT, outputs=False)
    text = ("# made by `python -m pipeline tiny`: the project's params.yaml + configs/tiny.yaml, small dataset\n"
            + yaml.safe_dump(params, sort_keys=False))
    refresh = (dest / MARKER).is_file()
    if not refresh:
        make_project(dest, text)
        (dest / MARKER).write_text(json.dumps({"made_by": "python -m pipeline tiny", "source": str(ROOT)}) + "\n")
    # on a refresh this checkout's code again (same DVC repository and cache); the presets (`--preset configs/..`)
    for name in TINY_FILES if refresh else [n for n in TINY_FILES if n not in PROJECT_FILES]:
        src, dst = ROOT / name, dest / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dst)
    (dest / "params.yaml").write_text(text)
    (dest / ".gitignore").write_text(f"/data/\n/{DATASET}/\n__pycache__/\n/.prefect/\n")  # .prefect: its UI's state
    # `dvc exp run` needs a commit to start from
    commit(dest, f"pipeline tiny: {'code refreshed from' if refresh else 'the project files of'} {ROOT}",
           [*TINY_FILES, "params.yaml", ".gitignore", MARKER, ".dvc", ".dvcignore"])
    return dest


def run(dest: Path) -> None:
    dest = dest.resolve()
    start = time.monotonic()
    build(dest)
    print(f"tiny: project at {dest} (every stage on {N_TRAIN}+{N_VAL} Fashion-MNIST images at 16x16)",
          file=sys.stderr)
    code = subprocess.call(["dvc", "repro"], cwd=dest)
    if code:
        raise UserError(f"tiny: `dvc repro` in {dest} failed (exit {code}); the lines above say which stage")
    # the baseline of `dvc exp run` and the first row of `pipeline compare`: this run's outputs
    commit(dest, "pipeline tiny: dvc.lock of the run", ["dvc.lock"])
    shown = subprocess.run(["dvc", "metrics", "show"], cwd=dest, capture_output=True, text=True)
    print(shown.stdout.rstrip())
    print(f"\ntiny: done in {time.monotonic() - start:.0f} s. Look at:")
    for what, where in RESULTS:
        print(f"  {what:<50} {', '.join(str(dest / p.strip()) for p in where.split(','))}")
    print(f"  all metrics: cd {dest} && dvc metrics show")
