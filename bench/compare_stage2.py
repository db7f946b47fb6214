"""Compare the stage-2 models on the same token store, with one evaluation protocol.

For each family: train_transformer (a GAN family: kind gan, FID over training every --fid-every steps; `ar` or
`maskgit`: that kind at params.yaml's run length, the default pipeline's budget, unless --ar-steps) -> sample ->
evaluate, each the real stage run with a params file written under data/compare/<name>/ (so the default
pipeline's outputs are untouched). The first row is the default pipeline's own AR model when its outputs exist
(data/transformer/metrics.json, data/reports/evaluate/metrics.json). Needs the default pipeline's VQGAN, token store
and FID reference (dvc repro fid_ref tokenize@fashion_mnist).

  python bench/compare_stage2.py --steps 2000 --fid-every 500   # the README table (~45 min on 2 CPU cores)
  python bench/compare_stage2.py                       # lada, transgan, stransgan; 300 steps each
  python bench/compare_stage2.py --families lada --steps 600
  python bench/compare_stage2.py --reuse                # trains only the families not yet evaluated under --out
  python bench/compare_stage2.py --families ar maskgit --tag seed1 --set train_transformer.seed=1  # AR seed spread
  python bench/compare_stage2.py --families lada --steps 1000 --tag image-recon \
      --set train_transformer.gan.d_space=image --set train_transformer.gan.snap=true   # a variant, its own rows
Prints a markdown table (gFID on the evaluate protocol, parameters, step time) and writes
data/compare/summary.json and data/compare/fid_over_training.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.gan_common import FAMILIES  # noqa: E402
from pipeline.config import apply_overrides, load_params  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.run_checks import validate_overrides  # noqa: E402
from pipeline.runlog import read_run_facts  # noqa: E402
# bench/, the script's own folder, is on sys.path
from stage_run import stage, tag_problem, with_earlier_runs  # noqa: E402


def run_model(name: str, overrides: list[str], base: dict, out: Path) -> dict:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    params = apply_overrides(base, overrides + [
        f"train_transformer.out_dir={d}/model", f"train_transformer.ckpt_dir={d}/ckpt",
        f"train_transformer.metrics={d}/train.json", f"train_transformer.plots={d}/train.tsv",
        f"sample.model_dir={d}/model", f"sample.out_dir={d}/samples", f"sample.metrics={d}/sample.json",
        f"evaluate.samples_dir={d}/samples", f"evaluate.metrics={d}/evaluate.json",
        f"evaluate.report_dir={d}/report"])
    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = {s: round(stage(s, path), 1) for s in ("train_transformer", "sample", "evaluate")}
    return {"dir": str(d), "seconds": seconds}


TOKEN_KINDS = ("ar", "maskgit")  # trained on token targets; every other family name is a GAN family


def family_overrides(family: str, args: argparse.Namespace) -> list[str]:
    """The params overrides of one family's run: the kind (and GAN family), the run length, then the user's --set."""
    if family in TOKEN_KINDS:
        steps = [f"train_transformer.steps={args.ar_steps}"] if args.ar_steps is not None else []
        return [f"train_transformer.kind={family}", *steps, *args.set]
    return ["train_transformer.kind=gan", f"train_transformer.gan.family={family}",
            f"train_transformer.steps={args.steps}", f"train_transformer.gan.fid_every={args.fid_every}",
            f"train_transformer.gan.fid_images={args.fid_images}", *args.set]


def token_step_time(train: dict, params: dict) -> float | None:
    """Seconds per step of an ar/maskgit run, from its tokens/s (its metrics hold no step time)."""
    tokens_per_step = params["train_transformer"]["batch_size"] * 64  # 8x8 grids: the f=4 VQGAN on 32 px
    return round(tokens_per_step / train["tokens_per_s"], 3) if train.get("tokens_per_s") else None


def row(name: str, train: dict, evaluate: dict) -> dict:
    if train.get("kind") == "gan":
        params = f"G {train['g_params_m']:.2f}M / D {train['d_params_m']:.2f}M"
        step = train.get("step_time_s")
    else:  # AR: the caller derives the step time from tokens/s
        params = f"{train['params_m']:.2f}M"
        step = None
    fid = evaluate["gfid"]
    return {"model": name, "gFID": round(fid["value"], 2), "n_gen": fid["protocol"]["n_gen"],
            "n_ref": fid["protocol"]["n_ref"], "precision": round(evaluate["gprecision"]["value"], 3),
            "recall": round(evaluate["grecall"]["value"], 3),
            "code_usage_pct": round(evaluate["code_usage_pct"]["value"], 1), "params": params,
            "step_time_s": step, "steps": train["steps"],
            "fid_over_training": [(p["step"], round(p["value"], 2)) for p in train.get("fid_curve") or []]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["lada", "transgan", "stransgan"],
                    help="GAN families, and ar / maskgit")
    ap.add_argument("--steps", type=int, default=300, help="the GAN families' steps")
    ap.add_argument("--ar-steps", type=int, default=None,
                    help="ar and maskgit steps (default: params.yaml's, the default pipeline's run)")
    ap.add_argument("--fid-every", type=int, default=100)
    ap.add_argument("--fid-images", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "data" / "compare"))
    ap.add_argument("--reuse", action="store_true", help="keep families already evaluated under --out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override for every family of this run (e.g. train_transformer.gan.d_space=image)")
    ap.add_argument("--tag", default="", help="names this variant: rows 'family (tag)', folders <out>/family-tag")
    args = ap.parse_args()
    if problem := tag_problem(args.tag):
        ap.error(problem)
    if unknown := [f for f in args.families if f not in TOKEN_KINDS + FAMILIES]:
        ap.error(f"--families {' '.join(unknown)}: unknown (allowed: {' | '.join(TOKEN_KINDS + FAMILIES)})")
    try:  # a typo'd key or a bad value stops here, before any folder is written
        for family in args.families:
            validate_overrides(ROOT, family_overrides(family, args))
    except UserError as exc:
        ap.error(str(exc))
    out = Path(args.out)
    base = load_params(ROOT / "params.yaml")
    rows = []
    # the full records: metrics.json in each out folder (the metrics files hold only the headline columns)
    ar_train = ROOT / base["train_transformer"]["out_dir"] / "metrics.json"
    ar_eval = ROOT / base["evaluate"]["report_dir"] / "metrics.json"
    if ar_train.is_file() and ar_eval.is_file():
        train = json.loads(ar_train.read_text()) | read_run_facts(ROOT / base["train_transformer"]["metrics"])
        r = row("ar (default pipeline)", train, json.loads(ar_eval.read_text()))
        r["step_time_s"] = token_step_time(train, base)
        rows.append(r)

    def folder(family: str) -> Path:
        return out / (f"{family}-{args.tag}" if args.tag else family)

    def evaluated(family: str) -> bool:
        return (folder(family) / "report" / "metrics.json").is_file() and (folder(family) / "train.json").is_file()

    for family in with_earlier_runs(args.families, TOKEN_KINDS + FAMILIES, evaluated):
        name = folder(family).name
        label = f"{family} ({args.tag})" if args.tag else family
        d = folder(family)
        if family in args.families and not (args.reuse and evaluated(family)):
            res = run_model(name, family_overrides(family, args), base, out)
            print(f"{label}: stage seconds {res['seconds']}", file=sys.stderr)
        train = json.loads((d / "model" / "metrics.json").read_text()) | read_run_facts(d / "train.json")
        rows.append(row(label, train, json.loads((d / "report" / "metrics.json").read_text())))
        if family in TOKEN_KINDS:
            rows[-1]["step_time_s"] = token_step_time(train, load_params(d / "params.yaml"))
    suffix = f"-{args.tag}" if args.tag else ""
    (out / f"summary{suffix}.json").write_text(json.dumps(rows, indent=2) + "\n")
    if any(r["fid_over_training"] for r in rows):  # token models (ar, maskgit) have no curve
        plot(out / f"fid_over_training{suffix}.png", rows)
    cols = ["model", "gFID", "n_gen", "n_ref", "precision", "recall", "code_usage_pct", "params", "steps",
            "step_time_s", "fid_over_training"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        if r["fid_over_training"]:
            ax.plot(*zip(*r["fid_over_training"]), "o-", label=r["model"])
    ax.set_xlabel("step"), ax.set_ylabel("FID (EMA G, fid_images samples)"), ax.legend()
    ax.set_title("GAN families: FID over training")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
