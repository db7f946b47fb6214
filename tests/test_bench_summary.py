"""A compare benchmark's summary-<tag>.json lists every run of that tag, not only the last command's (the figures in
docs/ are drawn from those files by bench/plot_fid_curves.py)."""
from __future__ import annotations

import json

from helpers import load_bench


def test_summary_keeps_the_earlier_runs_of_the_same_tag(tmp_path):
    with_earlier_runs = load_bench("stage_run").with_earlier_runs
    known = ("ar", "maskgit", "lada", "transgan", "stransgan")
    for done in ("lada-t", "ar-t", "stransgan-t"):  # complete earlier runs of tag t
        (tmp_path / done).mkdir()
        (tmp_path / done / "eval.json").write_text("{}")
    (tmp_path / "transgan-t").mkdir()  # an interrupted one: no eval.json, so no row
    (tmp_path / "maskgit-u").mkdir()  # another tag's run
    (tmp_path / "maskgit-u" / "eval.json").write_text("{}")

    def done(name: str) -> bool:
        return (tmp_path / f"{name}-t" / "eval.json").is_file()

    # this command's families first, in its order; then the tag's earlier complete runs in the known order, once
    assert with_earlier_runs(["stransgan", "maskgit"], known, done) == ["stransgan", "maskgit", "ar", "lada"]
    assert with_earlier_runs([], known, done) == ["ar", "lada", "stransgan"]
    assert with_earlier_runs(["transgan"], known, lambda name: False) == ["transgan"]


def test_the_figure_bundles_a_variants_seeds_by_tag_name(tmp_path):
    plot = load_bench("plot_fid_curves")
    # seeds share a colour (the variant) and differ in line style; a tag without -seedN is compare_stage2's seed 0
    assert plot.variant_and_seed("vq2e-3-b128-seed2") == ("vq2e-3-b128", 2)
    assert plot.variant_and_seed("vq2e-3-b128") == ("vq2e-3-b128", 0)
    assert plot.variant_and_seed("seed1-lr8") == ("seed1-lr8", 0)  # only a trailing -seedN counts
    # one curve per family that has one; the AR row (no curve) is skipped; the family is the model name's first word
    rows = [{"model": "lada (tokenmill recipe)", "fid_over_training": [[500, 70.5], [1000, 62.0]]},
            {"model": "ar", "fid_over_training": []}]
    (tmp_path / "summary-x-seed1.json").write_text(json.dumps(rows))
    assert plot.curves(tmp_path, ["x-seed1"]) == {"lada": {"x-seed1": [(500, 70.5), (1000, 62.0)]}}
