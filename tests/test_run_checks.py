"""pipeline/run_checks.py in process: the checks a run passes before it writes anything (the CLI and flow tests reach
them through subprocesses, where a wrong message or a check skipped for some overrides is easy to miss)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import run_checks
from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.sandbox import ROOT

STAGES = ["prepare@fashion_mnist", "train_vqgan", "tokenize@fashion_mnist", "fid_ref", "eval_vqgan",
          "train_transformer", "sample", "evaluate"]


def said(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    return str(err.value)


@pytest.fixture
def project(tmp_path) -> Path:
    """The project's params.yaml and dvc.yaml in an empty folder, its dataset path pointing at a folder there."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "fmnist").mkdir()
    text = (tmp_path / "params.yaml").read_text()
    path = load_params(tmp_path / "params.yaml")["datasets"]["fashion_mnist"]["path"]
    (tmp_path / "params.yaml").write_text(text.replace(f"path: {path}", f"path: {tmp_path / 'fmnist'}", 1))
    return tmp_path


def vqgan_config(root: Path, **meta) -> None:
    """data/vqgan/config.json as train_vqgan writes it, with `meta` replacing its fields."""
    (root / "data" / "vqgan").mkdir(parents=True, exist_ok=True)
    full = {"model": {"ch_mult": [1, 2, 2], "in_channels": 1}, "resolution": 32, **meta}
    (root / "data" / "vqgan" / "config.json").write_text(json.dumps({k: v for k, v in full.items() if v is not None}))


def test_where_a_run_checks_is_named_with_up_to_three_overrides(tmp_path):
    assert run_checks.where_overrides(tmp_path, []) == str(tmp_path / "params.yaml")
    assert run_checks.where_overrides(tmp_path, ["a.b=1", "c.d=2", "e.f=3"]) == "params.yaml with a.b=1, c.d=2, e.f=3"
    assert run_checks.where_overrides(tmp_path, ["a.b=1", "c.d=2", "e.f=3", "g.h=4"]) == "params.yaml with 4 overrides"


def test_an_override_must_be_a_string_with_a_dotted_key(project):
    assert said(lambda: run_checks.validate_overrides(project, [3])) == "override 3 must be a string key.path=value"
    for text, key in (("a..b=1", "a..b"), (".a=1", ".a"), ("a.=1", "a.")):
        assert said(lambda: run_checks.validate_overrides(project, [text])) == (
            f"override {text!r}: the key must look like section.key (got {key!r})")
    assert run_checks.validate_overrides(project, ["sample.n=10"])["sample"]["n"] == 10
    assert run_checks.validate_overrides(project, []) == load_params(project / "params.yaml")


def test_a_run_checks_the_dataset_paths_it_sets(project):
    """Any key under datasets.<name> makes that dataset's path checked; a whole `datasets` mapping checks them all;
    a dataset the run does not touch may be absent (its outputs pulled)."""
    params = load_params(project / "params.yaml")
    entry = params["datasets"]["fashion_mnist"]
    where = "params.yaml with"
    missing = project / "gone"
    with_n = [f"datasets.n={json.dumps({**entry, 'path': str(missing)})}"]  # a dataset named like sample.n's key
    with pytest.raises(UserError, match=f"datasets.n.path = {missing} does not exist"):
        run_checks.validate_overrides(project, with_n)
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace(
        "datasets:\n", f"datasets:\n  n: {json.dumps({**entry, 'path': str(missing)})}\n", 1))
    assert run_checks.validate_overrides(project, ["sample.n=10"])  # dataset n is absent, and not this run's
    assert run_checks.validate_overrides(project, ["datasets.fashion_mnist.resolution=32"])
    assert said(lambda: run_checks.validate_overrides(project, ["datasets.n.resolution=32"])) == (
        f"{where} datasets.n.resolution=32: datasets.n.path = {missing} does not exist (install the dataset there, "
        f"or point the path at it)")
    whole = [f"datasets={json.dumps({'fashion_mnist': entry, 'n': {**entry, 'path': str(missing)}})}"]
    assert f"datasets.n.path = {missing} does not exist" in said(lambda: run_checks.validate_overrides(project, whole))


def test_dataset_paths_are_refused_by_key_and_value(project):
    where = "params.yaml"

    def check(path, exist=()):
        run_checks.check_dataset_paths({"datasets": {"skip": ["a list"], "none": {}, "empty": {"path": ""},
                                                     "int": {"path": 5}, "x": {"path": path}}}, where, project, exist)

    assert said(lambda: check("~/d")) == (f"{where}: datasets.x.path = ~/d: DVC does not expand '~'; write the full "
                                          f"path ({Path('~/d').expanduser()})")
    for path in (str(project), ".", "..", "/"):
        assert said(lambda: check(path)) == (f"{where}: datasets.x.path = {path} is this project's folder or holds "
                                             f"it; point it at the dataset's own folder")
    check("absent")  # existence only where asked
    assert said(lambda: check("absent", exist=["x"])) == (
        f"{where}: datasets.x.path = absent does not exist (install the dataset there, or point the path at it)")
    assert said(lambda: check("absent", exist=None)).startswith(f"{where}: datasets.x.path = absent does not exist")
    check("fmnist", exist=None)  # relative to the project


def test_check_params_names_the_file(project):
    bad = project / "mine.yaml"
    bad.write_text((project / "params.yaml").read_text().replace("steps:", "stepz:", 1))
    assert said(lambda: run_checks.check_params(bad, project)).startswith(f"{bad}: unknown key")
    assert run_checks.check_params(project / "params.yaml", project) == ["fashion_mnist"]


def test_the_whole_check_names_its_source_and_judges_paths_from_the_project(project, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    params = load_params(project / "params.yaml")
    assert said(lambda: run_checks.check_params_dict({**params, "sample": {**params["sample"], "out_dir": "../x"}},
                                                     "S", project)).startswith(
        f"S: sample.out_dir = '../x' is not allowed (allowed: a path inside the project {project.resolve()}, e.g.")
    home = {**params, "datasets": {"fashion_mnist": {**params["datasets"]["fashion_mnist"], "path": "~/fmnist"}}}
    assert said(lambda: run_checks.check_params_dict(home, "S", project)).startswith(
        "S: datasets.fashion_mnist.path = ~/fmnist: DVC does not expand '~'")
    (project / "data" / "vqgan").mkdir(parents=True)
    (project / "data" / "vqgan" / "mine.txt").write_text("a file of the user's")
    assert said(lambda: run_checks.check_params_dict(params, "S", project)).startswith(
        "S: data/vqgan (train_vqgan.out_dir) exists and is a folder without a .tokenmill-stage marker")
    run_checks.check_params_dict(params, "S", project, outputs=False)


def test_a_checkpoint_folder_on_another_stages_output_is_refused(project):
    params = load_params(project / "params.yaml")
    params["train_transformer"]["ckpt_dir"] = params["train_vqgan"]["out_dir"]
    assert "train_transformer.ckpt_dir = data/vqgan, where stage train_transformer keeps its checkpoints" in said(
        lambda: run_checks.check_params_dict(params, "params.yaml", project))


def test_tokenize_is_judged_by_the_vqgan_the_run_will_read(project):
    """The run that retrains the VQGAN is judged by train_vqgan's params; a run that does not, by the config.json in
    tokenize.vqgan_dir. Stages that do not tokenize are never refused for it."""
    params = load_params(project / "params.yaml")
    vqgan_config(project, resolution=64)
    refused = (f"{project / 'params.yaml'}: tokenize@fashion_mnist would refuse datasets.fashion_mnist (32 px, 1 "
               f"channel(s)): resolution 32 differs from the VQGAN's training resolution 64; prepare this dataset at "
               f"resolution 64 or train a VQGAN for it (the VQGAN in data/vqgan: its config.json); or run "
               f"prepare@fashion_mnist alone (pipeline run --stage prepare@fashion_mnist)")
    run_checks.check_selection(project, params, [], ["tokenize@fashion_mnist"], names=STAGES)  # retrains it first
    run_checks.check_selection(project, params, [], None, names=STAGES)
    assert said(lambda: run_checks.check_selection(project, params, [], ["tokenize@fashion_mnist"], with_deps=False,
                                                   names=STAGES)) == refused
    run_checks.check_selection(project, params, [], ["prepare@fashion_mnist"], with_deps=False, names=STAGES)
    run_checks.check_tokenizable(project, params, "p", {"prepare@fashion_mnist", "sample"})
    assert said(lambda: run_checks.check_selection(project, params, ["sample.n=10"], ["tokenize"], with_deps=False,
                                                   names=STAGES)).startswith(
        "params.yaml with sample.n=10: tokenize@fashion_mnist would refuse")
    # a target that only the run's params add (a second dataset) is known before DVC lists it
    more = {**params, "datasets": {**params["datasets"], "b": params["datasets"]["fashion_mnist"]}}
    run_checks.check_selection(project, more, ["datasets.b.path=x"], ["prepare@b"], names=STAGES)
    # a misspelt target lists DVC's stages and those the run's params add
    assert said(lambda: run_checks.check_selection(project, params, [], ["tokenise"], names=["mine"] + STAGES)) == (
        f"unknown stage 'tokenise' (dvc.yaml has: {', '.join(['mine'] + STAGES)})")


@pytest.mark.parametrize("meta, why", [
    (dict(model={"ch_mult": [1, 2, 2, 2, 2, 2, 2], "in_channels": 1}),
     "resolution 32 is not divisible by the VQGAN's downsampling 64"),
    (dict(model={"ch_mult": [1, 2, 2], "in_channels": 3}), "images have 1 channel(s), the VQGAN takes 3;"),
    (dict(model={"ch_mult": [1, 2, 2], "in_channels": 3}, resolution=None), "the VQGAN takes 3;"),  # not recorded
])
def test_the_vqgan_folder_is_read_for_downsampling_channels_and_resolution(project, meta, why):
    vqgan_config(project, **meta)
    params = load_params(project / "params.yaml")
    assert why in said(lambda: run_checks.check_tokenizable(project, params, "p", {"tokenize@fashion_mnist"}))


def test_an_unreadable_vqgan_folder_is_left_to_the_stage(project):
    params = load_params(project / "params.yaml")
    run = {"tokenize@fashion_mnist"}
    run_checks.check_tokenizable(project, params, "p", run)  # no VQGAN yet
    for text in ("{", json.dumps({"model": {}}), json.dumps({"model": {"ch_mult": 3, "in_channels": 1}}),
                 json.dumps([1])):
        (project / "data" / "vqgan").mkdir(parents=True, exist_ok=True)
        (project / "data" / "vqgan" / "config.json").write_text(text)
        run_checks.check_tokenizable(project, params, "p", run)


def test_a_dataset_converted_at_tokenize_may_differ_in_channels(project):
    vqgan_config(project, model={"ch_mult": [1, 2, 2], "in_channels": 3})
    params = load_params(project / "params.yaml")
    params["datasets"]["fashion_mnist"]["convert_channels"] = True
    run_checks.check_tokenizable(project, params, "p", {"tokenize@fashion_mnist"})
