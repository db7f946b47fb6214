"""Compare VQGAN loss recipes at equal wall time, by rFID on the eval_vqgan protocol.

Each recipe is a set of train_vqgan.loss overrides whose phase switches (LPIPS on, GAN on) are fractions of the
run. First a short probe of each phase (plain, +GAN, +LPIPS, +LPIPS+GAN) measures its seconds per step on this
machine; each recipe then gets the step count whose predicted training time is --minutes, and runs as the real
stages (train_vqgan -> eval_vqgan) with a params file under data/compare_vqgan/<recipe>/, so the default
pipeline's outputs are untouched. Needs the default pipeline's prepared data and FID reference
(`dvc repro prepare fid_ref`). Run it on an otherwise idle machine: the step counts come from the probe.

  python bench/compare_vqgan.py --minutes 9               # every recipe (~60 min on 2 cores)
  python bench/compare_vqgan.py --recipes today --minutes 5
  python bench/compare_vqgan.py --reuse                   # only the recipes not run yet (earlier probe), + table
  python bench/compare_vqgan.py --recipes today --steps 2000 --tag ema --set train_vqgan.ema=0.999
                                                          # a variant that costs what the recipe costs: the default's
                                                          # step count, under data/compare_vqgan/<recipe>-<tag>/
Prints a markdown table (recipe, steps, measured train minutes, rFID, PSNR, LPIPS, usage) and writes
data/compare_vqgan/summary.json (summary-<tag>.json for a tagged variant).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import apply_overrides, load_params  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.runlog import read_run_facts  # noqa: E402
from pipeline.run_checks import validate_overrides  # noqa: E402
# bench/, the script's own folder, is on sys.path
from stage_run import stage, tag_problem, with_earlier_runs  # noqa: E402

# recipe -> (lpips_weight, lpips_start fraction, disc_weight, disc_start fraction); None: that term is off
RECIPES: dict[str, tuple[float, float | None, float, float | None]] = {
    # the default before this comparison: no LPIPS, a weak adversarial term for the last quarter
    "today": (0.0, None, 0.1, 0.75),
    # Taming Transformers: LPIPS weight 1 throughout, adaptive-weight PatchGAN at 0.8 from an early step (20%)
    "taming": (1.0, 0.0, 0.8, 0.2),
    # the cheaper schedule: both terms only for the second half, so the first half runs at the plain step rate
    "lpips_late": (1.0, 0.5, 0.8, 0.5),
    # taming's adversarial term (adaptive weight 0.8 from 20%) without LPIPS: the GAN step costs ~1.3x a plain one
    "gan_early": (0.0, None, 0.8, 0.2),
}
PHASES = {"plain": (False, False), "gan": (False, True), "lpips": (True, False), "lpips_gan": (True, True)}


def vqgan_paths(d: Path) -> list[str]:
    return [f"train_vqgan.out_dir={d}/vqgan", f"train_vqgan.ckpt_dir={d}/ckpt",
            f"train_vqgan.metrics={d}/train.json", f"train_vqgan.plots={d}/train.tsv"]


def write_params(base: dict, overrides: list[str], d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(base, overrides), sort_keys=False))
    return path


def probe(base: dict, out: Path, steps: int) -> dict[str, float]:
    """Seconds per training step of each phase, from the stage's own images/s (k-means and final eval excluded)."""
    rates = {}
    batch = base["train_vqgan"]["batch_size"]
    for phase, (lpips_on, gan_on) in PHASES.items():
        d = out / "probe" / phase
        path = write_params(base, vqgan_paths(d) + [
            f"train_vqgan.steps={steps}", "train_vqgan.val_images=64", "train_vqgan.kmeans_images=512",
            f"train_vqgan.ckpt_every={steps}", f"train_vqgan.loss.lpips_weight={1.0 if lpips_on else 0.0}",
            "train_vqgan.loss.lpips_start=0", f"train_vqgan.loss.disc_weight={0.8 if gan_on else 0.0}",
            "train_vqgan.loss.disc_start=0"], d)
        subprocess.run(["rm", "-rf", str(d / "ckpt")], check=True)  # a probe is re-measured, never resumed
        stage("train_vqgan", path)
        rates[phase] = batch / read_run_facts(d / "train.json")["train_images_per_s"]
        print(f"probe {phase}: {rates[phase]:.3f} s/step", file=sys.stderr)
    return rates


def recipe_overrides(recipe: str, steps: int) -> list[str]:
    lw, ls, dw, ds = RECIPES[recipe]
    return [f"train_vqgan.steps={steps}", f"train_vqgan.loss.lpips_weight={lw}",
            f"train_vqgan.loss.lpips_start={round((ls or 0) * steps)}", f"train_vqgan.loss.disc_weight={dw}",
            f"train_vqgan.loss.disc_start={round((ds if ds is not None else 1) * steps)}"]


def seconds_per_step(recipe: str, rates: dict[str, float]) -> float:
    """The mean step time of a recipe: its phases weighted by the fraction of the run each covers."""
    lw, ls, dw, ds = RECIPES[recipe]
    ls = 1.0 if lw == 0 or ls is None else ls
    ds = 1.0 if dw == 0 or ds is None else ds
    cuts = sorted({0.0, ls, ds, 1.0})
    total = 0.0
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        phase = {(False, False): "plain", (False, True): "gan", (True, False): "lpips",
                 (True, True): "lpips_gan"}[(mid >= ls, mid >= ds)]
        total += (b - a) * rates[phase]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--minutes", type=float, default=9.0, help="training wall time each recipe gets")
    ap.add_argument("--probe-steps", type=int, default=40)
    ap.add_argument("--val-images", type=int, default=2000, help="val images for train_vqgan's PSNR/LPIPS")
    ap.add_argument("--out", default=str(ROOT / "data" / "compare_vqgan"))
    ap.add_argument("--reuse", action="store_true", help="keep recipes already evaluated under --out")
    ap.add_argument("--steps", type=int, help="train every recipe this many steps instead of --minutes' count "
                                              "(no probe): for variants whose step costs what the default's does")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra override on top of each recipe (repeatable; e.g. train_vqgan.ema=0.999); "
                         "needs --tag")
    ap.add_argument("--tag", help="name of the variant: its runs go to <out>/<recipe>-<tag>")
    args = ap.parse_args()
    if bool(args.set) != bool(args.tag):
        ap.error("--set and --tag go together: the tag names the folder of the overridden runs")
    if problem := tag_problem(args.tag):
        ap.error(problem)
    out = Path(args.out)
    base = load_params(ROOT / "params.yaml")
    try:  # a typo'd key or a bad value stops here, before anything runs
        validate_overrides(ROOT, args.set)
    except UserError as exc:
        ap.error(str(exc))
    rates_path = out / "probe.json"
    folder = {r: r + (f"-{args.tag}" if args.tag else "") for r in RECIPES}
    todo = [r for r in args.recipes if not (args.reuse and (out / folder[r] / "eval.json").is_file())]
    if todo and args.steps is None and not (args.reuse and rates_path.is_file()):  # --reuse: equal budgets
        rates = probe(base, out, args.probe_steps)
        rates_path.write_text(json.dumps(rates, indent=2) + "\n")
    rows = []
    for recipe in with_earlier_runs(args.recipes, list(RECIPES), lambda r: (out / folder[r] / "eval.json").is_file()):
        d = out / folder[recipe]
        if recipe in todo:
            steps = args.steps or int(args.minutes * 60 / seconds_per_step(recipe, json.loads(rates_path.read_text())))
            path = write_params(base, vqgan_paths(d) + recipe_overrides(recipe, steps) + args.set + [
                f"train_vqgan.val_images={args.val_images}", f"train_vqgan.ckpt_every={max(1, steps // 4)}",
                f"eval_vqgan.vqgan_dir={d}/vqgan", f"eval_vqgan.metrics={d}/eval.json",
                f"eval_vqgan.report_dir={d}/report"], d)
            seconds = {s: round(stage(s, path), 1) for s in ("train_vqgan", "eval_vqgan")}
            (d / "seconds.json").write_text(json.dumps(seconds) + "\n")
        train = json.loads((d / "vqgan" / "metrics.json").read_text())
        facts = read_run_facts(d / "train.json")
        ev = json.loads((d / "report" / "metrics.json").read_text())
        batch = base["train_vqgan"]["batch_size"]
        loss = dict(zip(("lpips_weight", "lpips_start", "disc_weight", "disc_start"), RECIPES[recipe]))
        rows.append({"recipe": folder[recipe], "loss": loss, "set": args.set,
                     "steps": train["steps"],
                     "train_minutes": round(train["steps"] * batch / facts["train_images_per_s"] / 60, 2)
                     if facts.get("train_images_per_s") else None,
                     "stage_seconds": json.loads((d / "seconds.json").read_text()),
                     "rFID": round(ev["rfid"]["value"], 2), "val_psnr": round(train["val_psnr"], 2),
                     "val_lpips": round(train["val_lpips"], 4), "usage_pct": train["code_usage_pct"]})
    (out / f"summary{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = ["recipe", "steps", "train_minutes", "rFID", "val_psnr", "val_lpips", "usage_pct", "stage_seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
