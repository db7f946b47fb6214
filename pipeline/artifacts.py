"""Prefect artifacts for finished stages: manifests, metrics tables, images.

Each stage base name maps to a publisher that reads the stage's outputs (paths from params.yaml) and creates
artifacts; stages without a publisher publish nothing. Artifact keys are lowercase-dash as Prefect requires.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.atomic import read_json
from pipeline.config import load_params
from pipeline.runlog import read_run_facts


def artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_prepare(item: str, root: Path) -> None:
    params = load_params(root / "params.yaml")
    manifest = read_json(root / params["prepare"]["out_dir"] / item / "manifest.json")
    names = manifest["class_names"]
    rows = [{"class": names[i], **{s: v["per_class"][i] for s, v in manifest["splits"].items()}}
            for i in range(len(names))]
    rows.append({"class": "total", **{s: v["count"] for s, v in manifest["splits"].items()}})
    create_table_artifact(rows, key=artifact_key("prepare", item, "counts"),
                          description=f"prepare {item}: samples per split and class")
    create_markdown_artifact(
        f"### prepare {item}\n\n"
        f"- source: `{manifest['source']['kind']}` {manifest['source']['path']}\n"
        f"- resolution: {manifest['resolution']}x{manifest['resolution']}, channels {manifest['channels']}, "
        f"resize `{manifest['resize']}`\n"
        f"- splits: " + ", ".join(f"{s} {v['count']} ({len(v['shards'])} shards)"
                                  for s, v in manifest["splits"].items()) + "\n"
        f"- skipped inputs: {manifest['skipped']} (see report.json)\n"
        f"- fingerprint: `{manifest['fingerprint']}`\n",
        key=artifact_key("prepare", item, "manifest"), description=f"prepare {item}: manifest")


def publish_evaluation(stage: str, root: Path) -> None:
    """eval_vqgan / evaluate: the metrics with their protocols as a table, and the report with its PNGs inlined
    (a markdown artifact cannot reference files)."""
    import importlib

    from pipeline.report import embed_images, metric_rows

    params_path = root / "params.yaml"
    cfg = importlib.import_module(f"stages.{stage}").check(load_params(params_path), str(params_path))
    report = root / cfg.report_dir
    metrics = read_json(report / "metrics.json")  # the full record; cfg.metrics holds its headline columns
    create_table_artifact(metric_rows(metrics), key=artifact_key(stage, "metrics"),
                          description=f"{stage}: metrics and the protocol each was made with")
    run = read_run_facts(root / cfg.metrics)  # timing is not in the report: it would change the out's hash
    timing = (f"{run['images']} images; networks {run['feature_seconds']} s "
              f"({run['images'] / max(run['feature_seconds'], 1e-9):.1f} images/s, {run['device']}); whole stage "
              f"{run['seconds']} s" if run else "restored from the cache: no run here")
    create_markdown_artifact(embed_images((report / "report.md").read_text(), report)
                             + f"\n## Timing (the last run here)\n\n{timing}.\n",
                             key=artifact_key(stage, "report"), description=f"{stage}: report")


def publish_tokenize(item: str, root: Path) -> None:
    """tokenize@<dataset>: the store's metrics as a table, and the code-usage histogram."""
    from pipeline.report import embed_images
    from stages.tokenize import load_config

    cfg = load_config(str(root / "params.yaml"), item)
    m = read_json(root / cfg.out / "metrics.json")
    run = read_run_facts(root / cfg.metrics) if cfg.metrics else {}
    rows = [{"metric": "records", "value": m["records"]},
            {"metric": "images/s (last run here)", "value": run.get("images_per_s", "restored from cache")},
            {"metric": "grid", "value": f"{m['grid'][0]}x{m['grid'][1]} {m['dtype']}"},
            *({"metric": f"bytes per image ({k})", "value": v} for k, v in m["bytes_per_image"].items()),
            {"metric": "round trip exact", "value": m["roundtrip"]["exact"]},
            *({"metric": f"code usage: {k}", "value": v} for k, v in m["code_usage"].items()),
            {"metric": "codebook fingerprint", "value": m["fingerprint"][:16]}]
    create_table_artifact(rows, key=artifact_key("tokenize", item, "metrics"),
                          description=f"tokenize {item}: token store metrics")
    create_markdown_artifact(embed_images(f"### tokenize {item}: code usage\n\n![code usage]({cfg.plot.name})\n",
                                          root / cfg.plot.parent),
                             key=artifact_key("tokenize", item, "code-usage"),
                             description=f"tokenize {item}: code usage")


def publish_metrics(stage: str, metrics: dict[str, Any], folder: Path, headline: str,
                    images: list[tuple[str, str]]) -> None:
    """A stage's scalar metrics as a table, and a markdown report with its PNGs (files in `folder`) inlined."""
    from pipeline.report import embed_images

    rows = [{"metric": k, "value": v} for k, v in sorted(metrics.items()) if isinstance(v, (int, float, str))]
    create_table_artifact(rows, key=artifact_key(stage, "metrics"), description=f"{stage}: metrics")
    body = "\n\n".join(f"{caption}:\n\n![{caption}]({name})" for name, caption in images)
    create_markdown_artifact(embed_images(f"### {stage}\n\n{headline}\n\n{body}\n", folder),
                             key=artifact_key(stage, "report"), description=f"{stage}: report")


def publish_train_vqgan(item: str, root: Path) -> None:
    p = load_params(root / "params.yaml")["train_vqgan"]
    m = read_json(root / p["out_dir"] / "metrics.json") | read_run_facts(root / p["metrics"])
    publish_metrics("train_vqgan", m, root / p["out_dir"],
                    f"val PSNR {m['val_psnr']:.2f} dB, L1 {m['val_l1']:.4f}, code usage {m['code_usage_pct']:.1f}% "
                    f"(perplexity {m['perplexity']:.0f}), fingerprint `{m['fingerprint'][:16]}`",
                    [("recon_grid.png", "val images (top) and their reconstructions (bottom)"),
                     ("curves.png", "training curves")])


def publish_train_transformer(item: str, root: Path) -> None:
    p = load_params(root / "params.yaml")["train_transformer"]
    m = read_json(root / p["out_dir"] / "metrics.json") | read_run_facts(root / p["metrics"])
    backend = f"attention backend {m.get('attention_backend', '(restored from cache)')}"
    if m["kind"] == "ar":
        headline = (f"val {m['val_bits_per_token']:.3f} bits/token (unigram entropy "
                    f"{m['unigram_bits_per_token']:.3f}), {m['params_m']}M params, {backend}")
    elif m["kind"] == "maskgit":  # its val loss is per masked token, at a mask ratio drawn from the schedule
        headline = (f"maskgit: val {m['val_bits_per_token']:.3f} bits per masked token, masked-token accuracy "
                    f"{m['val_masked_accuracy']:.1%}, {m['params_m']}M params, {backend}")
    else:
        headline = (f"{m['family']}: D loss {m['d_loss']}, G loss {m['g_loss']}, D acc real/fake "
                    f"{m['d_acc_real']}/{m['d_acc_fake']}")
    publish_metrics("train_transformer", m, root / p["out_dir"], headline, [("curves.png", "training curves")])


def publish_sample(item: str, root: Path) -> None:
    p = load_params(root / "params.yaml")["sample"]
    m = read_json(root / p["metrics"]) | read_run_facts(root / p["metrics"])
    publish_metrics("sample", m, root / p["out_dir"], f"{m['images']} images at {m.get('images_per_s', '?')} images/s",
                    [("grid.png", "samples (a row per class when conditional)")])


PUBLISHERS: dict[str, Callable[[str, Path], None]] = {
    "prepare": publish_prepare,
    "train_vqgan": publish_train_vqgan,
    "train_transformer": publish_train_transformer,
    "sample": publish_sample,
    "tokenize": publish_tokenize,
    "eval_vqgan": lambda item, root: publish_evaluation("eval_vqgan", root),
    "evaluate": lambda item, root: publish_evaluation("evaluate", root),
}


def publish_stage(name: str, root: Path) -> None:
    base, _, item = name.partition("@")
    if base in PUBLISHERS:
        PUBLISHERS[base](item, root)


def publish_summary(results: list[dict[str, Any]]) -> None:
    """A row per stage: ran / restored from the run cache / skipped (unchanged) / failed / skipped because a
    stage it needs failed."""
    if results:
        rows = [{"stage": r["stage"], "status": r["status"], "seconds": r["seconds"], "error": r.get("error", "")}
                for r in results]
        create_table_artifact(rows, key="pipeline-stages",
                              description="stages of this run: status, seconds and the error of a failed one")


def publish_parameters(preset: str | None, overrides: list[str], applied: list[str], stages: list[str] | None,
                       force: bool) -> None:
    """What the run was started with (the run list shows only names): the preset, the overrides, the stages, and
    every params.yaml setting they applied."""
    lines = ["### tokenmill run", "",
             f"- preset: `{preset}`" if preset else "- preset: none",
             "- overrides: " + (", ".join(f"`{o}`" for o in overrides) if overrides else "none"),
             "- stages: " + (", ".join(f"`{s}`" for s in stages) if stages else "all"),
             f"- force: {'yes' if force else 'no'}"]
    if applied:
        lines += ["", "params.yaml settings applied (the preset's first, the overrides win):", ""]
        lines += [f"    {o}" for o in applied]
    create_markdown_artifact("\n".join(lines) + "\n", key="run-parameters",
                             description="the preset, overrides and stages this run was started with")
