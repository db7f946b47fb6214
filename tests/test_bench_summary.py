"""A compare benchmark's summary-<tag>.json lists every run of that tag, not only the last command's (the figures in
docs/ are drawn from those files by bench/plot_fid_curves.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_stage_run():
    spec = importlib.util.spec_from_file_location("stage_run", ROOT / "bench" / "stage_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_keeps_the_earlier_runs_of_the_same_tag(tmp_path):
    with_earlier_runs = load_stage_run().with_earlier_runs
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
