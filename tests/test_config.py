from pathlib import Path

import pytest

from pipeline.run_checks import check_params as _check_params
from pipeline.config import apply_overrides, load_params, set_params_file
from pipeline.errors import UserError


def check_params(path: Path) -> list[str]:
    """Every stage of the project's dvc.yaml checks its sections; outputs must stay in the params file's folder."""
    return _check_params(path, ROOT if path == ROOT / "params.yaml" else path.parent)


ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


BASE = """
datasets:
  d1:
    source: folder
    path: /tmp/x
    resolution: 32
prepare:
  shard_size: 100
"""


def test_repo_params_are_valid():
    assert check_params(ROOT / "params.yaml") == ["fashion_mnist"]


@pytest.mark.parametrize("edit, expected", [
    ("datasets.d1.resolution=-3", "datasets.d1.resolution = -3 is out of range (allowed: >= 4"),
    ("datasets.d1.resolution=abc", "datasets.d1.resolution = 'abc' has the wrong type (allowed: int)"),
    ("datasets.d1.resolution=true", "datasets.d1.resolution = True has the wrong type"),
    ("datasets.d1.channels=2", "datasets.d1.channels = 2 is not allowed (allowed: 1, 3)"),
    ("datasets.d1.resize=stretch", "datasets.d1.resize = 'stretch' is not allowed (allowed: 'pad' | 'resize'"),
    ("datasets.d1.colour=1", "unknown key 'datasets.d1.colour' (allowed: background, channels"),
    ("prepare.shard_size=0", "prepare.shard_size = 0 is out of range"),
    ("prepare.shardsize=10", "unknown key 'prepare.shardsize'"),
    ("datasets.d1.val_fraction=1.5", "datasets.d1.val_fraction = 1.5 is out of range (allowed: <= 0.9"),
    ("datasets.d1.class_names=[1, 2]", "datasets.d1.class_names[0] = 1 has the wrong type (allowed: str)"),
    ("extra.key=1", "unknown section 'extra'"),
    ("datasets.d1.val_fraction=.nan", "datasets.d1.val_fraction = nan is not allowed (allowed: a finite number)"),
    ("train_vqgan.optim.lr=.inf", "train_vqgan.optim.lr = inf is not allowed (allowed: a finite number)"),
    ("prepare.out_dir=/etc", "prepare.out_dir = '/etc' is not allowed"),
    ("train_vqgan.metrics=../outside.json", "train_vqgan.metrics = '../outside.json' is not allowed"),
    ("fid_ref.split=../x", "fid_ref.split = '../x' is not allowed"),
    ("sample.top_p=1.5", "sample.top_p = 1.5 is out of range (allowed: <= 1.0"),   # the sample stage's own check
    ("sample.device=tpu", "sample.device = 'tpu' is not allowed (allowed: 'auto' | 'cpu' | 'cuda'"),
    ("sample.cfg_scal=2", "unknown key 'sample.cfg_scal'"),
])
def test_validation_errors_name_key_value_and_allowed(tmp_path, edit, expected):
    # the repo's params (every stage section) with the small dataset d1 in place of the real ones
    p = write(tmp_path, (ROOT / "params.yaml").read_text())
    set_params_file(p, ["datasets.d1.source=folder", "datasets.d1.path=/tmp/x", "datasets.d1.resolution=32"])
    check_params(p)  # valid before the edit
    set_params_file(p, [edit])
    with pytest.raises(UserError) as err:
        check_params(p)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key(tmp_path):
    p = write(tmp_path, "datasets:\n  d1:\n    source: folder\nprepare: {}\n")
    with pytest.raises(UserError, match="missing key 'datasets.d1.path'"):
        check_params(p)


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, "datasets:\n  d1: [unclosed\n")
    with pytest.raises(UserError, match=r"params.yaml: line \d+ is not valid YAML"):
        load_params(p)


def test_overrides_keep_comments_and_parse_types(tmp_path):
    p = write(tmp_path, "# top comment\n" + BASE)
    set_params_file(p, ["prepare.shard_size=7", "datasets.d1.class_names=[a, b]"])
    text = p.read_text()
    assert "# top comment" in text
    params = load_params(p)
    assert params["prepare"]["shard_size"] == 7
    assert params["datasets"]["d1"]["class_names"] == ["a", "b"]
    assert apply_overrides(params, ["new.deep.key=1.5"])["new"]["deep"]["key"] == 1.5


def test_floats_in_yaml_1_2_form_are_floats_as_in_dvc(tmp_path):
    # PyYAML (YAML 1.1) reads `5e-4` as a string; DVC writes and reads params with YAML 1.2, where it is a float.
    # A learning rate written that way, in the file or as an override, must validate as the float it is.
    p = write(tmp_path, BASE + "lr: 5e-4\nbig: 1E3\nsigned: -2.5e-3\nquoted: '5e-4'\nword: 1e\n")
    params = load_params(p)
    assert (params["lr"], params["big"], params["signed"]) == (0.0005, 1000.0, -0.0025)
    assert (params["quoted"], params["word"]) == ("5e-4", "1e")
    repo = apply_overrides(load_params(ROOT / "params.yaml"), ["train_transformer.gan.lr_g=5e-4"])
    assert repo["train_transformer"]["gan"]["lr_g"] == 0.0005
    out = tmp_path / "repo.yaml"
    out.write_text((ROOT / "params.yaml").read_text())
    set_params_file(out, ["train_transformer.gan.lr_d=3e-4"])
    assert load_params(out)["train_transformer"]["gan"]["lr_d"] == 0.0003
    from stages.train_transformer import check
    assert check(repo, "params.yaml").gan.lr_g == 0.0005


def test_params_loader_builds_no_objects(tmp_path):
    # the YAML 1.2 loader is still a safe one: a python tag is refused, and nothing runs
    p = write(tmp_path, BASE + f"x: !!python/object/apply:os.system ['touch {tmp_path}/ran']\n")
    with pytest.raises(UserError, match=r"params.yaml: line 9 is not valid YAML"):
        load_params(p)
    assert not (tmp_path / "ran").exists()
