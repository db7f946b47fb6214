"""pipeline.config on its own: every check of `from_dict` (types, ranges, choices, kinds) with the exact one-line
message a user reads, the path and name rules, and the override syntax. Small dataclasses stand in for the
stages' sections, so each rule is pinned without the project's params."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Optional, Union

import pytest

from pipeline import config as C
from pipeline.config import (PROJECT_ROOT, apply_overrides, check_dataset_name, check_name, check_out_path,
                             from_dict, load_params, param, parse_override, section, set_params_file)
from pipeline.errors import UserError
from pipeline.sandbox import ROOT

SRC = "p.yaml"


@dataclasses.dataclass
class Inner:
    size: int = param(3, min=1)


@dataclasses.dataclass
class Section:
    name: str = param()  # required
    n: int = param(4, min=2, max=10)
    lo_only: float = param(0.5, min=0.0)
    hi_only: int = param(1, max=5)
    mode: str = param("a", choices=("a", "b"))
    kind: Literal["x", "y"] = param("x")
    opt: Optional[int] = param(None)
    either: Union[int, str] = param(0)
    items: list[int] = param(default_factory=list)
    pair: tuple[float, ...] = param(default_factory=tuple)
    table: dict[str, int] = param(default_factory=dict)
    inner: Inner = param(default_factory=Inner)
    flag: bool = param(False)
    anything: Any = param(None)
    out: str = param("data/x", kind="out_path")
    label: str = param("ok", kind="name")


def build(**raw: Any) -> Section:
    return from_dict(Section, {"name": "s", **raw}, "sec", SRC)


def message(**raw: Any) -> str:
    with pytest.raises(UserError) as err:
        build(**raw)
    return str(err.value)


def test_param_keeps_its_constraints_and_defaults():
    f = param(3, min=1, max=9, choices=(3, 5), kind="name")
    assert f.default == 3 and dict(f.metadata) == {"min": 1, "max": 9, "choices": (3, 5), "kind": "name"}
    g = param(default_factory=list)
    assert g.default_factory is list and g.default is dataclasses.MISSING
    assert dict(g.metadata) == {"min": None, "max": None, "choices": None, "kind": None}
    assert param().default is dataclasses.MISSING  # required


def test_defaults_and_coerced_values():
    s = build()
    assert (s.n, s.lo_only, s.mode, s.kind, s.opt, s.either, s.items, s.pair, s.table, s.inner.size) == \
        (4, 0.5, "a", "x", None, 0, [], (), {}, 3)
    s = build(n=10, lo_only=0, hi_only=5, mode="b", kind="y", opt=7, either="w", items=[1, 2], pair=[1, 2.5],
              table={1: 2}, inner={"size": 1}, flag=True, anything={"k": [1]}, out="data/y", label="a-b_1")
    assert (s.n, s.hi_only, s.mode, s.kind, s.opt, s.either, s.flag, s.anything) == (10, 5, "b", "y", 7, "w", True,
                                                                                     {"k": [1]})
    assert type(s.lo_only) is float and s.lo_only == 0.0  # an int given for a float becomes a float
    assert s.items == [1, 2] and s.pair == (1.0, 2.5) and type(s.pair) is tuple and type(s.items) is list
    assert s.table == {"1": 2}  # mapping keys become strings
    assert s.inner == Inner(1) and (s.out, s.label) == ("data/y", "a-b_1")
    assert build(either=5).either == 5 and build(opt=None).opt is None
    assert build(n=2).n == 2  # both bounds are inclusive


@pytest.mark.parametrize("raw, expected", [
    (dict(n=1), "sec.n = 1 is out of range (allowed: >= 2 and <= 10)"),
    (dict(n=11), "sec.n = 11 is out of range (allowed: <= 10 and >= 2)"),
    (dict(lo_only=-0.5), "sec.lo_only = -0.5 is out of range (allowed: >= 0.0)"),
    (dict(hi_only=6), "sec.hi_only = 6 is out of range (allowed: <= 5)"),
    (dict(mode="c"), "sec.mode = 'c' is not allowed (allowed: 'a', 'b')"),
    (dict(kind="z"), "sec.kind = 'z' is not allowed (allowed: 'x' | 'y')"),
    (dict(n="4"), "sec.n = '4' has the wrong type (allowed: int)"),
    (dict(n=True), "sec.n = True has the wrong type (allowed: int)"),
    (dict(n=4.0), "sec.n = 4.0 has the wrong type (allowed: int)"),
    (dict(lo_only=True), "sec.lo_only = True has the wrong type (allowed: float)"),
    (dict(lo_only="1"), "sec.lo_only = '1' has the wrong type (allowed: float)"),
    (dict(lo_only=float("nan")), "sec.lo_only = nan is not allowed (allowed: a finite number)"),
    (dict(lo_only=float("-inf")), "sec.lo_only = -inf is not allowed (allowed: a finite number)"),
    (dict(flag=1), "sec.flag = 1 has the wrong type (allowed: bool)"),
    (dict(name=3), "sec.name = 3 has the wrong type (allowed: str)"),
    (dict(opt="x"), "sec.opt = 'x' has the wrong type (allowed: int)"),  # Optional[X]: X's own message
    (dict(either=1.5), "sec.either = 1.5 has the wrong type (allowed: int | str)"),
    (dict(items=3), "sec.items = 3 has the wrong type (allowed: list of int)"),
    (dict(items=[1, "b"]), "sec.items[1] = 'b' has the wrong type (allowed: int)"),
    (dict(pair=(1.0,)), "sec.pair = (1.0,) has the wrong type (allowed: list of float)"),
    (dict(table=[1]), "sec.table = [1] has the wrong type (allowed: mapping of int)"),
    (dict(table={"k": "v"}), "sec.table.k = 'v' has the wrong type (allowed: int)"),
    (dict(inner=5), "sec.inner = 5 has the wrong type (allowed: a mapping)"),
    (dict(inner={"size": 0}), "sec.inner.size = 0 is out of range (allowed: >= 1)"),
    (dict(inner={"sise": 2}), "unknown key 'sec.inner.sise' (allowed: size)"),
    (dict(zeta=1, beta=2), "unknown key 'sec.beta' (allowed: anything, either, flag, hi_only, inner, items, kind, "
                           "label, lo_only, mode, n, name, opt, out, pair, table)"),
    (dict(label="-x"), "sec.label = '-x' is not allowed (allowed: letters, digits, _ and -, not starting with -)"),
])
def test_each_check_names_key_value_and_what_is_allowed(raw, expected):
    assert message(**raw) == f"{SRC}: {expected}"


def test_required_keys_and_the_mapping_itself():
    with pytest.raises(UserError) as err:
        from_dict(Section, {}, "sec", SRC)
    assert str(err.value) == "p.yaml: missing key 'sec.name'"
    with pytest.raises(UserError) as err:
        from_dict(Section, ["name"], "sec", SRC)
    assert str(err.value) == "p.yaml: sec = ['name'] has the wrong type (allowed: a mapping)"
    with pytest.raises(UserError) as err:
        section({"other": {}}, "sec", Section, SRC)
    assert str(err.value) == "p.yaml: missing section 'sec'"
    assert section({"sec": {"name": "t"}}, "sec", Section, SRC).name == "t"
    with pytest.raises(UserError, match=r"^params\.yaml: missing key 'sec\.name'$"):
        section({"sec": {}}, "sec", Section)  # the default source is the project's params file


def test_range_checks_skip_none_and_containers():
    meta = {"min": 5, "max": 6, "choices": (7,)}
    for value in (None, [1], {"a": 1}, (1,), Inner(1)):
        C._check_range(meta, value, "k", SRC)  # nothing to compare: no error
    C._check_range({}, 100, "k", SRC)  # no constraints


def test_type_names():
    assert C._type_name(Optional[int]) == "int | null"
    assert C._type_name(int | None) == "int | null"
    assert C._type_name(dict[str, list[float]]) == "mapping of list of float"
    assert C._type_name(tuple[str, ...]) == "list of str"
    assert C._type_name(Inner) == "a mapping"
    assert C._type_name(Literal[1, "a"]) == "1 | 'a'"


def test_unions_try_each_option_in_order_and_unsupported_types_fail_loudly():
    assert C._coerce(Union[int, str], "7", "k", SRC) == "7"
    assert C._coerce(Union[float, str], 7, "k", SRC) == 7.0 and type(C._coerce(Union[float, str], 7, "k", SRC)) is float
    assert C._coerce(int | None, None, "k", SRC) is None
    with pytest.raises(UserError) as err:
        C._coerce(int | str | None, 1.5, "k", SRC)
    assert str(err.value) == "p.yaml: k = 1.5 has the wrong type (allowed: int | str | null)"
    with pytest.raises(TypeError, match=r"^unsupported config type <class 'bytes'> for k$"):
        C._coerce(bytes, b"x", "k", SRC)


def test_load_params(tmp_path):
    with pytest.raises(UserError) as err:
        load_params(tmp_path / "none.yaml")
    assert str(err.value) == (f"{tmp_path / 'none.yaml'}: params file not found (run from the project root or "
                              f"pass --params)")
    p = tmp_path / "params.yaml"
    p.write_text("")
    assert load_params(p) == {}  # an empty file is no sections
    p.write_text("- a\n- b\n")
    with pytest.raises(UserError) as err:
        load_params(p)
    assert str(err.value) == f"{p}: top level must be a mapping of sections, got list"
    p.write_text("a: 1\nb: [2\nc: 3\n")
    with pytest.raises(UserError) as err:
        load_params(p)
    assert re.fullmatch(re.escape(f"{p}: line ") + r"\d+ is not valid YAML \(.+\)", str(err.value))
    p.write_text("a: 1\n\n\nb: : 2\n")  # the error is on the 4th line (yaml counts from 0)
    with pytest.raises(UserError) as err:
        load_params(p)
    assert str(err.value) == f"{p}: line 4 is not valid YAML (mapping values are not allowed here)"
    p.write_text("a: \x07\n")  # a reader error: no line mark, no problem attribute
    with pytest.raises(UserError) as err:
        load_params(p)
    assert str(err.value) == (f"{p}: line 1 is not valid YAML (unacceptable character #x0007: special characters "
                              f"are not allowed)")
    p.write_text("a: {b: 1}\n")
    assert load_params(str(p)) == {"a": {"b": 1}}


def test_a_control_character_in_params_is_a_one_line_error(tmp_path):
    """A yaml ReaderError has no `problem` and its str() spans two lines; the line comes from its position."""
    p = tmp_path / "params.yaml"
    p.write_text("a: 1\nb: 2\nc: \x07\n")
    with pytest.raises(UserError) as err:
        load_params(p)
    assert "\n" not in str(err.value) and f"{p}: line 3 is not valid YAML (unacceptable character" in str(err.value)


# ---------------------------------------------------------------- paths and names

OUT_MSG = ("p.yaml: out = {!r} is not allowed (allowed: a path inside the project {}, e.g. data/..., without '..' and "
           "outside .dvc, .git, bench, configs, models, pipeline, scripts, stages, tests, training)")


@pytest.mark.parametrize("value", ["", " data/x", "data/x ", "../x", "data/../data/x", "/etc", ".", "data/..",
                                   "models/x", ".git", ".dvc/tmp", "training", "bench/b", "configs/c", "scripts",
                                   "pipeline/p", "stages/s", "tests/t"])
def test_out_paths_outside_the_project_or_into_its_code_are_refused(tmp_path, value):
    token = PROJECT_ROOT.set(tmp_path)
    try:
        with pytest.raises(UserError) as err:
            check_out_path(value, "out", SRC)
    finally:
        PROJECT_ROOT.reset(token)
    assert str(err.value) == OUT_MSG.format(value, tmp_path.resolve())


def test_out_paths_inside_the_project_are_accepted(tmp_path):
    token = PROJECT_ROOT.set(tmp_path)
    try:
        for value in ("data/x", "data", "out/a/b.json", "datasets", str(tmp_path / "data" / "x")):
            check_out_path(value, "out", SRC)
    finally:
        PROJECT_ROOT.reset(token)


def test_out_path_root_is_the_params_files_folder_else_the_working_directory(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    params = project / "params.yaml"
    params.write_text("{}\n")
    monkeypatch.chdir(elsewhere)
    # a symlink that leaves the params file's folder is outside it, though inside the working directory
    (project / "link").symlink_to(elsewhere)
    with pytest.raises(UserError, match=re.escape(f"inside the project {project.resolve()},")):
        check_out_path("link/x", "out", str(params))
    check_out_path("data/x", "out", str(params))
    # the source is not a file: the working directory is the project
    (elsewhere / "link").symlink_to(project)
    with pytest.raises(UserError, match=re.escape(f"inside the project {elsewhere.resolve()},")):
        check_out_path("link/x", "out", "params with overrides")
    check_out_path("data/x", "out", "params with overrides")
    # the orchestration's root wins over both
    token = PROJECT_ROOT.set(project)
    try:  # project/link -> elsewhere: outside the project, although the working directory is elsewhere
        with pytest.raises(UserError, match=re.escape(f"inside the project {project.resolve()},")):
            check_out_path("link/x", "out", "params with overrides")
    finally:
        PROJECT_ROOT.reset(token)


@pytest.mark.parametrize("value, ok", [("a", True), ("A-b_9", True), ("_x", True), ("9", True), ("-a", False),
                                       ("a.b", False), ("", False), ("a b", False), ("a/b", False), ("é", False)])
def test_names(value, ok):
    if ok:
        check_name(value, "k", SRC)
    else:
        with pytest.raises(UserError) as err:
            check_name(value, "k", SRC)
        assert str(err.value) == (f"p.yaml: k = {value!r} is not allowed (allowed: letters, digits, _ and -, "
                                  f"not starting with -)")


@pytest.mark.parametrize("name, ok", [("fashion_mnist", True), ("A1", True), ("a_", True), ("a-b", False),
                                      ("_", False), ("", False), ("é", False), ("a b", False), (3, False),
                                      (None, False)])
def test_dataset_names(name, ok):
    if ok:
        check_dataset_name(name, SRC)
    else:
        with pytest.raises(UserError) as err:
            check_dataset_name(name, SRC)
        assert str(err.value) == f"p.yaml: dataset name {name!r} is not allowed (allowed: letters, digits and _)"


def test_kinds_apply_only_to_values_that_are_set(tmp_path):
    C._check_kind(None, "../x", "k", SRC)
    C._check_kind("out_path", None, "k", SRC)
    C._check_kind("other", "../x", "k", SRC)
    with pytest.raises(UserError, match="k = '../x' is not allowed"):
        C._check_kind("out_path", "../x", "k", SRC)
    with pytest.raises(UserError, match="letters, digits"):
        C._check_kind("name", "a.b", "k", SRC)


# ---------------------------------------------------------------- overrides

def test_parse_override():
    assert parse_override(" a.b = 3 ") == ("a.b", 3)
    assert parse_override("a=[1, x]") == ("a", [1, "x"])
    assert parse_override("a=") == ("a", "") and parse_override("a=  ") == ("a", "")
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")  # split at the first '='
    assert parse_override("a=[unclosed") == ("a", "[unclosed")  # not YAML: the text itself
    with pytest.raises(UserError) as err:
        parse_override("a.b")
    assert str(err.value) == "override 'a.b' must look like key.path=value"


def test_apply_overrides_copies_and_creates_keys():
    params = {"a": {"b": 1, "c": {"d": 2}}, "e": 5}
    out = apply_overrides(params, ["a.c.d=3", "e.f=4", "x.y.z=true", "a.b=[1]"])
    assert out == {"a": {"b": [1], "c": {"d": 3}}, "e": {"f": 4}, "x": {"y": {"z": True}}}
    assert params == {"a": {"b": 1, "c": {"d": 2}}, "e": 5}  # the input is untouched, nested dicts included
    assert apply_overrides(params, []) == params and apply_overrides(params, []) is not params


def test_set_params_file_keeps_comments_and_replaces_scalars_on_the_way(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("# head\na:\n  b: 1  # keep me\n  c: 2\nd: 3\n")
    set_params_file(p, ["a.c=x", "d.e=1.5", "f.g.h=[1, 2]"])
    text = p.read_text()
    assert "# head" in text and "# keep me" in text
    assert load_params(p) == {"a": {"b": 1, "c": "x"}, "d": {"e": 1.5}, "f": {"g": {"h": [1, 2]}}}
    assert list(p.parent.iterdir()) == [p]  # written through a temporary file, nothing left beside it


def test_set_params_file_writes_null_as_null_so_a_diff_shows_only_the_change(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("a:\n  top_k: null  # off\n  ema: 0.9\n")
    set_params_file(p, ["a.ema=null"])
    assert p.read_text() == "a:\n  top_k: null  # off\n  ema: null\n"


def test_the_project_params_spell_every_null_as_set_params_file_writes_it(tmp_path):
    copy = tmp_path / "params.yaml"
    copy.write_text((ROOT / "params.yaml").read_text())
    set_params_file(copy, [])  # what every `-S` run does to params.yaml, minus the overrides
    assert copy.read_text() == (ROOT / "params.yaml").read_text()


def test_asdict_is_plain_data():
    d = C.asdict(build(inner={"size": 2}))
    assert d["inner"] == {"size": 2} and d["name"] == "s" and type(d["inner"]) is dict


# ---------------------------------------------------------------- what the first mutation run left alive

@dataclasses.dataclass
class Output:
    path: str = param(kind="out_path")


def test_section_messages_name_the_given_source():
    with pytest.raises(UserError) as err:
        section({"sec": {}}, "sec", Section, SRC)
    assert str(err.value) == "p.yaml: missing key 'sec.name'"


def test_a_type_without_a_name_is_shown_as_itself():
    import typing
    assert C._type_name(typing.ForwardRef("Later")) == "ForwardRef('Later')"


def test_union_options_keep_the_key_and_the_source(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match=r"^unsupported config type <class 'bytes'> for sec\.k$"):
        C._coerce(Union[int, bytes], "x", "sec.k", SRC)  # int refused, then bytes: a bug in the schema, named
    # a dataclass inside a union still finds the project from the params file's folder
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    params = project / "params.yaml"
    params.write_text("{}\n")
    monkeypatch.chdir(elsewhere)
    out = C._coerce(Union[int, Output], {"path": "data/x"}, "sec.out", str(params))
    assert out == Output("data/x")
    (project / "link").symlink_to(elsewhere)
    with pytest.raises(UserError):  # project/link leaves the params file's folder
        C._coerce(Union[int, Output], {"path": "link/x"}, "sec.out", str(params))


def test_a_source_that_is_not_a_file_means_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = "params.yaml with prepare.out_dir=data/x"  # how validate_overrides names its source
    with pytest.raises(UserError) as err:
        check_out_path("../x", "out", source)
    assert f"inside the project {tmp_path.resolve()}, e.g." in str(err.value)


def test_override_errors_name_the_key_and_list_only_a_few_overrides():
    from pipeline.run_checks import preset_overrides, validate_overrides
    from pipeline.sandbox import ROOT

    with pytest.raises(UserError) as err:
        validate_overrides(ROOT, ["train_transformer.kind=gan", "train_transformer.gan.recipe=papr"])
    assert str(err.value) == ("params.yaml with train_transformer.kind=gan, train_transformer.gan.recipe=papr: "
                              "train_transformer.gan.recipe = 'papr' is not allowed (allowed: 'paper' | 'tokenmill')")
    # the tiny preset is dozens of overrides: the line counts them instead of repeating them
    many = preset_overrides(ROOT / "configs" / "tiny.yaml") + ["train_transformer.gan.recipe=papr"]
    with pytest.raises(UserError) as err:
        validate_overrides(ROOT, many)
    assert str(err.value).startswith(f"params.yaml with {len(many)} overrides: train_transformer.gan.recipe = 'papr'")


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_preset_validates_against_params_yaml(preset):
    # a preset whose key was renamed in params.yaml would otherwise fail only when a user applies it
    from pipeline.run_checks import check_params_dict, preset_overrides

    overrides = preset_overrides(ROOT / "configs" / preset)
    assert overrides and all("=" in o for o in overrides)
    # every key and value; not whether a dataset folder it names is installed here (a run checks that)
    check_params_dict(apply_overrides(load_params(ROOT / "params.yaml"), overrides), preset, ROOT)


# ---------------------------------------------------------------- what the consumers of a value accept

def test_an_int_beyond_int64_is_out_of_range_not_a_crash_later():
    """torch.manual_seed(2**64) and friends raise in the stage, after validation: every int must fit int64."""
    for raw, expected in [
        (dict(opt=2**63), "sec.opt = 9223372036854775808 is out of range (allowed: <= 9223372036854775807)"),
        (dict(opt=-2**63 - 1), "sec.opt = -9223372036854775809 is out of range (allowed: >= -9223372036854775808)"),
        (dict(items=[1, 2**64]), "sec.items[1] = 18446744073709551616 is out of range (allowed: <= "
                                 "9223372036854775807)"),
        (dict(hi_only=2**63), "sec.hi_only = 9223372036854775808 is out of range (allowed: <= 5)"),  # its own bound
        (dict(lo_only=10**400), f"sec.lo_only = {10**400!r} is not allowed (allowed: a finite number)"),  # no float
    ]:
        assert message(**raw) == f"{SRC}: {expected}"
    assert build(opt=2**63 - 1).opt == 2**63 - 1 and build(opt=-2**63).opt == -2**63


def test_every_seed_param_is_capped_where_all_its_consumers_take_it():
    import faiss
    import torch

    from stages import eval_vqgan, evaluate, fid_ref, prepare, sample, train_transformer, train_vqgan
    from training.common import StepBatches, seed_everything
    from training.gan import step_generator
    for cls in (sample.SampleParams, eval_vqgan.EvalVQGANParams, train_transformer.TrainTransformerParams,
                fid_ref.FidRefParams, evaluate.EvaluateParams, prepare.PrepareParams, train_vqgan.TrainVQGANParams):
        seed = next(f for f in dataclasses.fields(cls) if f.name == "seed")
        assert (seed.metadata["min"], seed.metadata["max"]) == (0, C.SEED_MAX), cls
    s = C.SEED_MAX
    seed_everything(s)
    step_generator(s, 10**9, 7, 4095)  # the largest derived seed: GAN streams of step 1e9, rank 4095
    StepBatches(10, 2, s).indices(10**9)
    torch.Generator().manual_seed(s * 1_000_003 + 10**9)  # sample's per-batch and maskgit's per-rank seeds
    faiss.Kmeans(2, 2, niter=1, seed=s)  # train_vqgan's k-means: an int32
    with pytest.raises(UserError) as err:
        from pipeline.run_checks import validate_overrides
        validate_overrides(ROOT, ["train_vqgan.seed=9223372036854775808"])
    assert str(err.value) == ("params.yaml with train_vqgan.seed=9223372036854775808: train_vqgan.seed = "
                              f"9223372036854775808 is out of range (allowed: <= {C.SEED_MAX} and >= 0)")


def test_a_params_file_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path):
    from pipeline.run_checks import preset_overrides
    p = tmp_path / "params.yaml"
    p.write_bytes("a:\n  b: 1\n  # caf\u00e9\n".encode("latin-1"))  # an editor's Latin-1 comment
    before = p.read_bytes()
    for read in (load_params, preset_overrides, lambda path: set_params_file(path, ["a.b=2"])):
        with pytest.raises(UserError) as err:
            read(p)
        assert str(err.value) == f"{p}: not UTF-8 text (byte 0xe9 at line 3); params files are UTF-8"
    assert p.read_bytes() == before
    weights = tmp_path / "model.safetensors"  # --params pointed at a binary file
    weights.write_bytes(b"\x80\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match=r"model\.safetensors: not UTF-8 text \(byte 0x80 at line 1\)"):
        load_params(weights)


@pytest.mark.parametrize("text", ["train_vqgan.steps=5\nx", "a\n.b=1", "a.b=x\ty", "a.b=\x1b[31mred", "a.b=x\ry",
                                  "a.b=x\u2028y", "a.b=\x85", "a.b=\x00"])
def test_an_override_with_a_control_character_is_refused_in_one_line(text):
    from pipeline.run_checks import validate_overrides
    expected = f"override {text!r}: a key or value may not hold a control character or line break"
    for call in (lambda: parse_override(text), lambda: validate_overrides(ROOT, [text])):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == expected and len(str(err.value).splitlines()) == 1


ALLOWED = "anything, either, flag, hi_only, inner, items, kind, label, lo_only, mode, n, name, opt, out, pair, table"


def test_keys_from_the_params_file_stay_on_one_line_in_messages():
    """A quoted YAML key may hold a newline; a key may be an int: the message escapes it, and sorting mixed keys
    does not crash."""
    assert message(**{"a\nb": 1}) == f"{SRC}: unknown key 'sec.a\\nb' (allowed: {ALLOWED})"
    assert message(table={"k\u2028": "v"}) == f"{SRC}: sec.table.k\\u2028 = 'v' has the wrong type (allowed: int)"
    with pytest.raises(UserError) as err:
        from_dict(Section, {"name": "s", 1: 2, "z": 3}, "sec", SRC)
    assert str(err.value) == f"{SRC}: unknown key 'sec.1' (allowed: {ALLOWED})"
    from pipeline.run_checks import check_params_dict
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(UserError) as err:
        check_params_dict({**params, 1: {}, "x\ny": {}}, SRC, ROOT)
    assert str(err.value).startswith(f"{SRC}: unknown section '1' (allowed: datasets,")
    with pytest.raises(UserError) as err:
        check_params_dict({**params, "x\ny": {}}, SRC, ROOT)
    assert str(err.value).startswith(f"{SRC}: unknown section 'x\\ny' (allowed: datasets,")


def test_failed_allocations_become_one_line_and_other_runtime_errors_stay_tracebacks():
    from pipeline.errors import out_of_memory_message
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory_message(cpu).startswith("out of memory: could not allocate 256.0 GiB (lower the model")
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)")
    assert out_of_memory_message(cuda).startswith("out of GPU memory: could not allocate 20.00 GiB (lower")
    assert out_of_memory_message(MemoryError("Unable to allocate 8.00 PiB for an array")).startswith(
        "out of memory: Unable to allocate 8.00 PiB for an array (lower")
    assert out_of_memory_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert out_of_memory_message(ValueError("can't allocate memory")) is None


@pytest.mark.parametrize("stage", ["train_vqgan", "fid_ref", "eval_vqgan", "train_transformer", "evaluate"])
def test_a_dataset_name_outside_the_datasets_section_is_refused_by_the_stage(stage):
    """A prepared folder left from a removed entry is no stage's output: nothing would keep it current."""
    import importlib

    mod = importlib.import_module(f"stages.{stage}")
    params = {"datasets": {"mine": {}, "fashion_mnist": {}}, stage: {"dataset": "flat"}}
    with pytest.raises(UserError) as err:
        mod.check(params, "p.yaml")
    assert str(err.value) == (f"p.yaml: {stage}.dataset = 'flat' is not an entry of the datasets section (it has: "
                              f"fashion_mnist, mine); add it with `python -m pipeline add-dataset flat <path>`")
    mod.check({**params, stage: {"dataset": "mine"}}, "p.yaml")


def test_a_gan_setting_for_another_kind_gets_a_note_and_a_preset_alone_none():
    """`-S train_transformer.gan.attention_kind=ylg` with kind ar retrained the AR model for nothing, unremarked."""
    from pipeline.presets import resolve_overrides, unread_note
    from pipeline.sandbox import ROOT

    ylg = ["train_transformer.gan.attention_kind=ylg"]
    assert unread_note(ROOT, ylg, ylg) == (
        "note: train_transformer.gan.attention_kind: train_transformer.gan.* is read only with kind gan (this run's "
        "kind is ar): train_transformer re-runs for it and trains the same model")
    assert unread_note(ROOT, ["train_transformer.kind=gan", *ylg], ylg) is None  # read: kind gan
    tiny = resolve_overrides(ROOT, "configs/tiny.yaml", [])  # the preset sets gan.* for kind ar: not the user's -S
    assert any(t.startswith("train_transformer.gan.") for t in tiny) and unread_note(ROOT, tiny, []) is None
