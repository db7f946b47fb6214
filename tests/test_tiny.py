"""`python -m pipeline tiny` builds runs/tiny as a project a stranger can keep working in: its files committed
(`dvc exp run` stops with "Empty git repo" in a repository without a commit, and `pipeline compare` finds no run),
dvc.lock committed after the run, and the dataset named by a path inside the project, so a moved copy is up to date.
The real 3-minute `dvc repro` is replaced by one that writes a dvc.lock."""
from __future__ import annotations

import subprocess

import yaml

from pipeline import tiny


def git(dest, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=dest, capture_output=True, text=True, check=True).stdout


def test_tiny_commits_its_project_and_the_lock_with_a_relative_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))  # a machine without a git identity
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    dest = tmp_path / "tiny"
    repro = []

    def fake_repro(cmd, cwd):
        repro.append(cmd)
        (cwd / "dvc.lock").write_text(f"schema: '2.0'\nruns: {len(repro)}\n")
        return 0

    monkeypatch.setattr(tiny.subprocess, "call", fake_repro)
    tiny.run(dest)
    assert repro == [["dvc", "repro"]]
    log = git(dest, "log", "--format=%an|%s").splitlines()
    assert log == ["pipeline tiny|pipeline tiny: dvc.lock of the run",
                   f"pipeline tiny|pipeline tiny: the project files of {tiny.ROOT}"]
    tracked = git(dest, "ls-files").split()
    assert {"dvc.yaml", "params.yaml", "dvc.lock", ".gitignore", ".dvc/config", "pipeline/tiny.py"} <= set(tracked)
    assert not [p for p in tracked if p.startswith(("data/", tiny.DATASET))]
    assert git(dest, "status", "--porcelain") == ""

    params = yaml.safe_load((dest / "params.yaml").read_text())
    assert params["datasets"]["fashion_mnist"]["path"] == "fashion-mnist-small"  # resolved from the project root
    assert (dest / "fashion-mnist-small" / "train-images-idx3-ubyte.gz").is_file()

    # a second run: nothing changed, nothing committed; a changed code file is refreshed and committed
    tiny.run(dest)
    assert len(git(dest, "log", "--oneline").splitlines()) == 3  # only the new dvc.lock
    (dest / "pipeline" / "tiny.py").write_text("# the code of an older checkout\n")
    git(dest, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qam", "older code")
    tiny.build(dest)
    assert git(dest, "log", "-1", "--format=%s").startswith("pipeline tiny: code refreshed from")
    assert git(dest, "status", "--porcelain") == ""


def test_tiny_runs_on_its_copy_when_the_projects_stages_read_a_dataset_the_user_added(tmp_path, monkeypatch):
    """The project's params.yaml after `add-dataset pets` with the stages pointed at pets: the tiny project keeps
    only its Fashion-MNIST copy, so its stages must read that copy (they named pets, and its params failed with
    `train_vqgan.dataset = 'pets' is not an entry of the datasets section ... add it with add-dataset`), and a
    reference that was fid_ref's output must follow fid_ref."""
    from pipeline.config import load_params
    from pipeline.run_checks import check_params_dict

    params = load_params(tiny.ROOT / "params.yaml")
    params["datasets"]["pets"] = {**params["datasets"]["fashion_mnist"], "path": str(tmp_path)}
    for section in ("train_vqgan", "fid_ref", "eval_vqgan", "train_transformer", "evaluate"):
        params[section]["dataset"] = "pets"
    pets_ref = "data/fid_ref/pets-val-tf_bilinear"
    params["eval_vqgan"]["reference"] = params["evaluate"]["reference"] = pets_ref
    params["train_transformer"]["gan"]["fid_reference"] = pets_ref
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text((tiny.ROOT / "dvc.yaml").read_text())
    monkeypatch.setattr(tiny, "ROOT", tmp_path)  # the user's params.yaml and dvc.yaml; the checkout's code

    got = tiny.tiny_params(tiny.DATASET)
    check_params_dict(got, "runs/tiny/params.yaml", tiny.PRESET.parents[1], outputs=False)
    assert list(got["datasets"]) == ["fashion_mnist"] and got["train_vqgan"]["dataset"] == "fashion_mnist"
    ref = "data/fid_ref/fashion_mnist-val-tf_bilinear"
    assert got["eval_vqgan"]["reference"] == got["evaluate"]["reference"] == ref
    assert got["train_transformer"]["gan"]["fid_reference"] == ref
