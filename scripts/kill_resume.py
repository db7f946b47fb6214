"""Kill and resume: SIGKILL each long stage at random points, then finish with `dvc repro`, and compare every
output with an uninterrupted run of the same project.

Two throwaway projects are built from this checkout (pipeline/sandbox.py) with the tiny preset (configs/tiny.yaml)
on a small copy of Fashion-MNIST: the reference runs `dvc repro` once; the faulted one runs the stages in order and,
for each long stage, starts `dvc repro --single-item <stage>` in its own process group and SIGKILLs the whole
group (DVC, the stage and its loader workers) after a random delay, `--kills` times, before letting it finish.
Both projects are then switched to `train_transformer.kind=gan` and the same is done to the GAN training stage.

Checked after every kill: each file under a final name equals the reference file (so no partial file ever sits
under a final name); other files must have temp names (`.<name>.tmp-<pid>`, `.partial`). Checked at the end:
every output equals the reference (bitwise; for metrics and reports, everything but throughput, wall time and
tokenize's resume accounting, which differ from run to run by nature) and `dvc status` is clean. Temp-named files
still present at the end are listed: a killed run's work folder stays when DVC restores that stage from its run
cache instead of running it (the stage's next real run reuses or removes it).

  python scripts/kill_resume.py                     # 10 kills per long stage, ~15 min on 2 CPU cores
  python scripts/kill_resume.py --kills 2 --json out.json
Exit status 0 when nothing was lost, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipeline.run_checks import preset_overrides  # noqa: E402
from pipeline.config import apply_overrides, load_params  # noqa: E402
from pipeline.sandbox import fashion_mnist_subset, make_project  # noqa: E402

STAGES = ["prepare@fashion_mnist", "train_vqgan", "tokenize@fashion_mnist", "fid_ref", "eval_vqgan",
          "train_transformer", "sample", "evaluate"]
LONG = ["train_vqgan", "tokenize@fashion_mnist", "train_transformer", "sample", "evaluate"]
# Metrics fields that measure speed or wall time: they differ between any two runs, interrupted or not.
# Also the resume accounting of tokenize (how many records this run encoded, how many it found done).
VOLATILE = re.compile(r"(per_s|_s_|seconds|_time|time_s|_s$|elapsed|tflops|mfu|this_run|resumed_records)")
TIMING_LINE = re.compile(r"\d s\b|/s\b")  # report lines that state wall times or rates
TEMP = re.compile(r"^\..+\.(tmp|old)-\d+$|^\..+\.partial$")
LOCK = re.compile(r"^\..+\.lock$")  # a stage's work lock beside its output (pipeline/locks.py): not an output
WORK_DIRS = ("data/checkpoints",)  # resume state: work folders, not DVC outs


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed in {project}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def params_text(data: Path, kind: str) -> str:
    params = apply_overrides(load_params(ROOT / "params.yaml"), preset_overrides(str(ROOT / "configs/tiny.yaml")) +
                             [f"datasets.fashion_mnist.path={data}", f"train_transformer.kind={kind}"])
    return yaml.safe_dump(params, sort_keys=False)


def digest(path: Path) -> str:
    """sha256 of a file; metrics (JSON), plot tables (TSV) and reports (Markdown) without timing fields."""
    raw = path.read_bytes()
    if path.suffix == ".json":
        try:
            raw = json.dumps(strip_volatile(json.loads(raw)), sort_keys=True).encode()
        except ValueError:
            pass  # not JSON after all: compare the bytes (a partial file then differs)
    elif path.suffix == ".md":
        raw = "\n".join(x for x in raw.decode(errors="replace").splitlines() if not TIMING_LINE.search(x)).encode()
    elif path.suffix == ".tsv":
        rows = [line.split("\t") for line in raw.decode(errors="replace").splitlines()]
        keep = [i for i, name in enumerate(rows[0] if rows else []) if not VOLATILE.search(name)]
        raw = "\n".join("\t".join(r[i] for i in keep if i < len(r)) for r in rows).encode()
    return hashlib.sha256(raw).hexdigest()


def strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if not VOLATILE.search(k)}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def snapshot(project: Path) -> tuple[dict[str, str], list[str]]:
    """({file under a final name: digest}, [temp files]) for everything under data/ except resume state."""
    files, temps = {}, []
    for path in sorted((project / "data").rglob("*")):
        rel = path.relative_to(project).as_posix()
        if any(rel.startswith(w) for w in WORK_DIRS) or rel.endswith(".run.json") or LOCK.match(path.name):
            continue  # resume state, and run logs (absent when DVC restored the stage from its run cache)
        if any(TEMP.match(part) for part in path.relative_to(project).parts):
            if TEMP.match(path.name):
                temps.append(rel)
            continue
        if path.is_file():
            files[rel] = digest(path)
    return files, temps


def violations(now: dict[str, str], *refs: dict[str, str]) -> list[str]:
    """Files under final names that are no uninterrupted run's: partial, corrupt or unexpected. (Several references:
    after switching to kind gan, the AR run's downstream outputs stay in place until their stages re-run.)"""
    return [f"{p} differs from the uninterrupted run" if any(p in r for r in refs) else
            f"{p} is not an output of the uninterrupted run"
            for p, d in now.items() if all(r.get(p) != d for r in refs)]


REPAIRS: list[str] = []  # stages whose next run found DVC's rwlock corrupt and repaired it


def run_stage(project: Path, stage: str, force: bool, delay: float | None) -> tuple[bool, float, str]:
    """`python -m pipeline stage <stage>` in its own process group; SIGKILL the group after `delay` seconds.
    Returns (killed, seconds, output); the output ends with a line `[kill phase: <phase>]` when killed."""
    # `python -m pipeline stage` is `dvc repro --single-item` after the repairs our entry points make (a killed DVC
    # can leave its .dvc/tmp/rwlock corrupt: pipeline/dvc_repair.py)
    cmd = [sys.executable, "-m", "pipeline", "stage", stage, *(["--force"] if force else [])]
    log = tempfile.TemporaryFile(mode="w+")
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=project, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # a killed DVC keeps what it printed
    in_stage = False
    try:
        proc.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        # was the stage's own process running at the kill, or only DVC (starting, or recording the results)?
        in_stage = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "stages[.]"],
                                  capture_output=True).returncode == 0
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    seconds = time.monotonic() - t
    try:  # loader workers may outlive the leader by a moment; the whole group must be gone before the next run
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # DVC treats a lock-table entry whose PID still exists as a live writer: wait until the killed DVC (reaped by
    # init, not by us: it was our child's child) is really gone, as it would be after a crash and a restart
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"processes of the killed {stage} run (group {proc.pid}) did not go away")
        time.sleep(0.05)
    log.seek(0)
    out = log.read()
    if "rwlock: a killed dvc command left it corrupt" in out:
        REPAIRS.append(stage)
    if killed:
        where = "stage" if in_stage else "dvc bookkeeping" if "Running stage" in out else "dvc start"
        out += f"\n[kill phase: {where}]\n"
    if not killed and proc.returncode != 0:
        raise SystemExit(f"{stage} failed in {project} (exit {proc.returncode}):\n{out[-3000:]}")
    return killed, seconds, out


def reference(project: Path) -> dict[str, float]:
    """Run every stage once, uninterrupted; their wall times (seconds) set the kill delays."""
    return {stage: run_stage(project, stage, False, None)[1] for stage in STAGES}


def phase(out: str) -> str:
    """Where a kill landed: DVC starting, the stage's own process, or DVC recording the results."""
    return re.search(r"\[kill phase: ([a-z ]+)\]", out).group(1)


def faulted(project: Path, refs: list[dict[str, str]], times: dict[str, float], long: list[str], kills: int,
            rng: random.Random) -> list[dict]:
    """Run STAGES in order, killing each stage in `long` `kills` times first. One record per kill."""
    records = []
    for stage in STAGES:
        if stage in long:
            delivered, attempts, force, span = 0, 0, False, times[stage]
            while delivered < kills and attempts < 3 * kills:
                attempts += 1
                delay = rng.uniform(0.05, 1.0) * span
                killed, seconds, out = run_stage(project, stage, force, delay)
                if not killed:
                    # Finished first (a resumed run has less left to do): the next attempts re-run it with --force
                    # and aim within the length of the run just seen.
                    force, span = True, seconds
                    continue
                delivered += 1
                files, temps = snapshot(project)
                bad = violations(files, *refs)
                records.append({"stage": stage, "delay_s": round(delay, 2), "phase": phase(out),
                                "resumed": "resuming from" in out,  # it had picked up an earlier kill's work
                                "final_name_violations": bad, "temp_files": len(temps)})
                print(f"  {stage}: kill {delivered} after {delay:.1f}s ({records[-1]['phase']}); {len(temps)} temp "
                      f"file(s), {len(bad)} violation(s){' (resumed)' if records[-1]['resumed'] else ''}"
                      + "".join(f"\n    {b}" for b in bad), flush=True)
        run_stage(project, stage, False, None)
    return records


def compare(faulty: Path, ref_files: dict[str, str]) -> dict:
    dvc(faulty, "repro")  # what the issue asks a user to run after the faults: must find nothing to do
    files, temps = snapshot(faulty)
    status = dvc(faulty, "status").stdout
    return {"outputs": len(ref_files),
            "missing": sorted(set(ref_files) - set(files)),
            "different": violations(files, ref_files),
            "temp_files_left": temps,
            "dvc_status_clean": "Data and pipelines are up to date." in status}


def switch_to_gan(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_transformer"]["kind"] = "gan"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs per long stage (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for the two projects (default: a temp folder, removed afterwards)")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the venv's dvc
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kill_resume-"))
    t0 = time.monotonic()
    try:
        data = fashion_mnist_subset(work / "idx", args.n_train, args.n_val)
        text = params_text(data, "ar")
        ref, faulty = make_project(work / "reference", text), make_project(work / "faulted", text)
        print(f"reference run in {ref}", flush=True)
        times = reference(ref)
        ref_files, _ = snapshot(ref)
        print("stage seconds (uninterrupted): " + ", ".join(f"{s} {t:.1f}" for s, t in times.items()), flush=True)
        print(f"faulted run in {faulty}", flush=True)
        records = faulted(faulty, [ref_files], times, LONG, args.kills, rng)
        result_ar = compare(faulty, ref_files)

        print("kind gan: train_transformer, sample, evaluate again in both projects", flush=True)
        for p in (ref, faulty):
            switch_to_gan(p)
        gan_times = {s: run_stage(ref, s, False, None)[1] for s in ("train_transformer", "sample", "evaluate")}
        ref_gan, _ = snapshot(ref)
        gan_records = faulted(faulty, [ref_gan, ref_files], {**times, **gan_times}, ["train_transformer"],
                              args.kills, rng)
        for r in gan_records:
            r["stage"] = "train_transformer (gan)"
        result_gan = compare(faulty, ref_gan)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    records += gan_records
    per_stage: dict[str, dict] = {}
    for r in records:
        s = per_stage.setdefault(r["stage"], {"kills": 0, "resumed": 0, "final_name_violations": 0,
                                              "dvc start": 0, "stage": 0, "dvc bookkeeping": 0})
        s["kills"] += 1
        s[r["phase"]] += 1
        s["resumed"] += r["resumed"]
        s["final_name_violations"] += len(r["final_name_violations"])
    lost = sum(len(x["missing"]) + len(x["different"]) for x in (result_ar, result_gan)) + \
        sum(len(r["final_name_violations"]) for r in records)
    summary = {"kills": len(records), "survived": sum(1 for r in records if not r["final_name_violations"]),
               "files_lost_or_corrupt": lost, "dvc_rwlock_repairs": len(REPAIRS), "per_stage": per_stage,
               "ar": result_ar, "gan": result_gan,
               "seconds": round(time.monotonic() - t0), "seed": args.seed, "kills_per_stage": args.kills}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "records": records}, indent=2) + "\n")
    # Temp-named files are not data: the one way one stays is a killed run's work folder when the next `dvc repro`
    # restores the stage from DVC's run cache instead of running it (reported, not counted as lost).
    clean = lost == 0 and all(x["dvc_status_clean"] for x in (result_ar, result_gan))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
