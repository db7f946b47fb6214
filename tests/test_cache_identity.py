"""Cache identity (issue 12): what DVC records as having made an output is what made it, and no command touches a
path it did not create. Each case of the issue is a test here; the end-to-end ones run real DVC in a throwaway copy
of the project (pipeline/sandbox.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import fake_tree, files_under, make_idx_dataset, make_project, tiny_params, tiny_vqgan_params
from pipeline import checkpoint as ckpt
from pipeline import codegraph, dvc_deps
from pipeline.atomic import OWNER_FILE, check_replaceable, replace_dir
from pipeline.errors import UserError
from pipeline.locks import exclusive


def run_cmd(project: Path, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=project, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def pipeline_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cmd(project, sys.executable, "-m", "pipeline", *args)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    return lines[0]


# ----------------------------------------------------------------------------- 1. code deps from the import graph

def test_dvc_yaml_code_deps_equal_every_stage_import_closure():
    assert dvc_deps.drift() == {}, "run `python -m pipeline deps --write`"


def test_import_graph_sees_function_level_relative_and_submodule_imports(tmp_path):
    fake_tree(tmp_path, {
        "models/net.py": "import torch\n", "pipeline/io.py": "from . import helpers\n",
        "pipeline/helpers.py": "X = 1\n", "pipeline/unused.py": "",
        "stages/s.py": "from pipeline import io\n\ndef run():\n    from models.net import torch  # only when run\n"})
    files = codegraph.closure_files("stages.s", tmp_path)
    assert files == ["models/__init__.py", "models/net.py", "pipeline/__init__.py", "pipeline/helpers.py",
                     "pipeline/io.py", "stages/__init__.py", "stages/s.py"]
    before = codegraph.code_fingerprint("stages.s", tmp_path)
    (tmp_path / "pipeline" / "unused.py").write_text("Y = 2\n")  # outside the closure: same identity
    assert codegraph.code_fingerprint("stages.s", tmp_path) == before
    codegraph._imports_cached.cache_clear()
    (tmp_path / "pipeline" / "helpers.py").write_text("X = 2\n")  # inside: another identity
    assert codegraph.code_fingerprint("stages.s", tmp_path) != before


def test_deps_command_reports_drift_as_one_line(tmp_path):
    project = make_project(tmp_path / "p", tiny_params({"a": tmp_path}), stages=("prepare",))
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["prepare"]["do"]["deps"].remove("pipeline/shards.py")
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = pipeline_cli(project, "deps", "--check")
    assert "prepare: missing pipeline/shards.py" in proc.stdout
    assert "run `python -m pipeline deps --write`" in one_error_line(proc)
    assert pipeline_cli(project, "deps", "--write").returncode == 0
    assert pipeline_cli(project, "deps").returncode == 0
    assert "pipeline/shards.py" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["prepare"]["do"]["deps"]


def test_dvc_repro_refuses_a_stage_whose_listed_code_is_not_what_it_imports(tmp_path):
    """An import added without `deps --write`: DVC would record the output as made by code it does not track. The
    stage stops before any work with one line; run directly (no DVC record) it runs."""
    src = make_idx_dataset(tmp_path / "idx", n_train=8, n_val=2)
    project = make_project(tmp_path / "p", tiny_params({"a": src}), stages=("prepare",))
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["prepare"]["do"]["deps"].remove("pipeline/shards.py")
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = run_cmd(project, "dvc", "repro")
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: "))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert line == (f"error: {project / 'dvc.yaml'}: stage prepare's code deps are not what stages.prepare imports "
                    f"(missing pipeline/shards.py; not imported -); run `python -m pipeline deps --write`, then repro")
    assert not (project / "data").exists() and not (project / "dvc.lock").exists()
    direct = run_cmd(project, sys.executable, "-m", "stages.prepare", "--dataset", "a")
    assert direct.returncode == 0, direct.stderr
    assert pipeline_cli(project, "deps", "--write").returncode == 0
    assert run_cmd(project, "dvc", "repro").returncode == 0


def test_running_stage_check_reads_every_dvc_addressing(tmp_path):
    fake_tree(tmp_path, {"pipeline/io.py": "", "stages/s.py": "import pipeline.io\n"})
    good = ["pipeline/__init__.py", "pipeline/io.py", "stages/__init__.py", "stages/s.py"]
    for folder, deps in (("ok", good), ("bad", good[:1] + good[2:] + ["pipeline/old.py"])):
        (tmp_path / folder).mkdir()
        body = {"cmd": "python -m stages.s --dataset ${key}", "deps": ["data/in"] + deps}
        (tmp_path / folder / "dvc.yaml").write_text(yaml.safe_dump(
            {"stages": {"s": {"foreach": ["x"], "do": body}, "other": {"cmd": "echo", "deps": ["pipeline/nope.py"]}}}))
    for addressing in ("s", "s@x", "dvc.yaml:s@x"):
        dvc_deps.check_running_stage(addressing, tmp_path / "ok", tmp_path)  # listed = imported: runs
        with pytest.raises(UserError) as err:
            dvc_deps.check_running_stage(addressing, tmp_path / "bad", tmp_path)
        assert str(err.value).endswith("stage s's code deps are not what stages.s imports (missing pipeline/io.py; "
                                       "not imported pipeline/old.py); run `python -m pipeline deps --write`, then "
                                       "repro")
    dvc_deps.check_running_stage("ok/dvc.yaml:s", tmp_path, tmp_path)  # a dvc.yaml in a subfolder
    dvc_deps.check_running_stage("unknown", tmp_path / "bad", tmp_path)  # not a stage of this layout: no opinion


def test_every_out_is_cached_and_no_checkpoint_folder_is_an_out():
    """cache: false outs are never pushed (a pulled clone re-runs their stage) and persist outs keep DVC's run cache
    from restoring a stage; checkpoints live in work folders instead."""
    spec = yaml.safe_load((codegraph.ROOT / "dvc.yaml").read_text())
    for name, body in spec["stages"].items():
        body = body.get("do", body)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                if isinstance(entry, dict):
                    opts = next(iter(entry.values())) or {}
                    assert opts.get("cache", True) and not opts.get("persist"), (name, entry)
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                assert "ckpt_dir" not in path, (name, path)


# ----------------------------------------------------------------------------- 2. resume only the same identity

def test_checkpoint_of_other_code_is_not_resumed(tmp_path, caplog):
    ckpt.save(tmp_path, {"step": 3, "run_id": "r", "code": "old"}, 3)
    assert ckpt.load_latest(tmp_path, expect={"run_id": "r", "code": "old"})["step"] == 3
    assert ckpt.load_latest(tmp_path, expect={"run_id": "r", "code": "new"}) is None
    assert "made by a run with other code" in caplog.text


def vqgan_project(tmp_path: Path, steps: int = 4) -> Path:
    params = tiny_vqgan_params(make_idx_dataset(tmp_path / "idx", n_train=24, n_val=8), steps)
    project = make_project(tmp_path / "p", params, stages=("prepare", "train_vqgan"))
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    return project


def dvc_ok(project: Path, *args: str) -> str:
    proc = run_cmd(project, "dvc", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_code_edit_retrains_run_cache_restores_and_remote_round_trip(tmp_path):
    project = vqgan_project(tmp_path)
    dvc_ok(project, "repro")
    weights = (project / "data/vqgan/model.safetensors").read_bytes()

    # An edit anywhere in the stage's import closure makes it stale (here: a module it imports indirectly).
    shards = project / "pipeline/shards.py"
    shards.write_text(shards.read_text() + "\n# an edit\n")
    assert "train_vqgan" in dvc_ok(project, "status") and "prepare@tiny" in dvc_ok(project, "status")
    dvc_ok(project, "repro")

    # Changed training code takes effect: the final checkpoint of the earlier run is not resumed.
    loop = project / "training/vqgan.py"
    assert "lr = cosine_lr(step, o.lr," in loop.read_text()
    loop.write_text(loop.read_text().replace("lr = cosine_lr(step, o.lr,", "lr = 0.5 * cosine_lr(step, o.lr,"))
    out = dvc_ok(project, "repro")
    assert "Running stage 'train_vqgan'" in out
    assert (project / "data/vqgan/model.safetensors").read_bytes() != weights

    # Params back and forth: the second time DVC's run cache restores the outputs instead of retraining.
    edited = (project / "data/vqgan/model.safetensors").read_bytes()
    params = project / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("steps: 4", "steps: 2"))
    dvc_ok(project, "repro")
    params.write_text(text)
    out = dvc_ok(project, "repro")
    assert "Stage 'train_vqgan' is cached - skipping run" in out and "Running stage" not in out, out
    assert (project / "data/vqgan/model.safetensors").read_bytes() == edited

    # Remote round trip: push here, pull into a fresh clone, nothing is stale and nothing re-runs.
    remote = tmp_path / "remote"
    dvc_ok(project, "remote", "add", "-d", "local", str(remote))
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "ran"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    dvc_ok(project, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, capture_output=True)
    dvc_ok(clone, "pull")
    assert "Data and pipelines are up to date." in dvc_ok(clone, "status")
    out = dvc_ok(clone, "repro")
    assert "Running stage" not in out, out
    assert files_under(clone / "data/vqgan") == files_under(project / "data/vqgan")


# ----------------------------------------------------------------------------- 3./4. overrides and the run lock

@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory):
    base = tmp_path_factory.mktemp("prepared")
    a = make_idx_dataset(base / "src_a", n_train=30, n_val=5, seed=1)
    project = make_project(base / "project", tiny_params({"a": a}), stages=("prepare",))
    dvc_ok(project, "repro")
    return project


@pytest.fixture
def prepare_project(prepared_template, tmp_path):
    """A prepared project of its own for each test (they edit params, take its locks, fail its runs): a copy of one
    made once, git and DVC repositories included, without DVC's per-checkout temp folder."""
    project = tmp_path / "project"
    shutil.copytree(prepared_template, project, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [])
    (project / ".dvc" / "tmp").mkdir()
    return project


@pytest.mark.parametrize("args", [
    ["-S", "prepare.shard_sizee=5"],                       # a typo in a key
    ["-S", "prepare.out_dir=/tmp/anywhere"],               # an output outside the project
    ["-S", "prepare.out_dir=../elsewhere"],
    ["-S", "datasets.a.resolution=2"],                     # out of range
    ["-S", "noequals"],
    ["--preset", "configs/missing.yaml"],
    ["-S", "prepare.seed=9223372036854775808"],          # beyond int64: torch's seeding would raise mid-run
    ["-S", "prepare.shard_size=5\nx"],                   # a newline: one line, and not folded into '5 x'
])
def test_bad_override_is_refused_before_anything_is_written(prepare_project, args):
    before_params = (prepare_project / "params.yaml").read_bytes()
    before_data = files_under(prepare_project / "data")
    proc = pipeline_cli(prepare_project, "run", "--no-prefect", *args)
    one_error_line(proc)
    assert (prepare_project / "params.yaml").read_bytes() == before_params
    assert files_under(prepare_project / "data") == before_data


@pytest.mark.parametrize("command", [["check"], ["stage", "prepare"], ["run", "--no-prefect"]])
def test_a_params_file_that_is_not_utf8_is_one_line_with_nothing_written(prepare_project, command):
    params = prepare_project / "params.yaml"
    params.write_bytes(params.read_bytes() + "# caf\u00e9\n".encode("latin-1"))  # an editor's Latin-1 comment
    before, lines = files_under(prepare_project / "data"), params.read_bytes().count(b"\n")
    line = one_error_line(pipeline_cli(prepare_project, *command))
    assert line.endswith(f"params.yaml: not UTF-8 text (byte 0xe9 at line {lines}); params files are UTF-8"), line
    assert files_under(prepare_project / "data") == before


def test_check_of_another_params_file_reads_its_relative_dataset_paths_from_that_files_folder(prepare_project,
                                                                                                tmp_path):
    """`check --params other/params.yaml`: a relative dataset path is the other project's, not this checkout's."""
    other = tmp_path / "other"
    params = yaml.safe_load((prepare_project / "params.yaml").read_text())
    params["datasets"]["a"]["path"] = "imgs"
    other.mkdir()
    (other / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (prepare_project / "imgs").mkdir()  # here, in the checkout, only: the other project's imgs is missing
    line = one_error_line(pipeline_cli(prepare_project, "check", "--params", str(other / "params.yaml")))
    assert line == (f"error: {other / 'params.yaml'}: datasets.a.path = imgs does not exist (install the dataset "
                    f"there, or point the path at it)")
    (prepare_project / "imgs").rmdir()
    (other / "imgs").mkdir()
    proc = pipeline_cli(prepare_project, "check", "--params", str(other / "params.yaml"))
    assert proc.returncode == 0 and proc.stdout.startswith(f"{other / 'params.yaml'}: ok"), proc.stderr


def test_override_waits_for_nobody_and_edits_nothing_while_another_run_holds_the_project(prepare_project):
    before = (prepare_project / "params.yaml").read_bytes()
    with exclusive(prepare_project / ".dvc/tmp/tokenmill-run.lock", "test"):
        proc = pipeline_cli(prepare_project, "run", "--no-prefect", "-S", "prepare.shard_size=7")
    assert "another" not in proc.stdout and "is in use by" in one_error_line(proc)
    assert (prepare_project / "params.yaml").read_bytes() == before


def test_override_is_not_written_while_a_dvc_command_runs(prepare_project):
    from dvc.lock import make_lock
    before = (prepare_project / "params.yaml").read_bytes()
    lock = make_lock(str(prepare_project / ".dvc/tmp/lock"), tmp_dir=str(prepare_project / ".dvc/tmp"))
    lock.lock()
    try:
        proc = pipeline_cli(prepare_project, "run", "--no-prefect", "-S", "prepare.shard_size=7")
    finally:
        lock.unlock()
    assert "a dvc command is running" in one_error_line(proc)
    assert (prepare_project / "params.yaml").read_bytes() == before


def test_failed_run_leaves_params_lock_and_outputs_as_before(prepare_project):
    before = {n: (prepare_project / n).read_bytes() for n in ("params.yaml", "dvc.lock")}
    outputs = files_under(prepare_project / "data")
    # valid params, but the stage fails at run time (the source folder does not exist): DVC removed the old
    # output before running the stage, the rollback brings it back from the cache
    proc = pipeline_cli(prepare_project, "run", "--no-prefect", "-S", "datasets.a.path=/nonexistent/idx")
    assert proc.returncode != 0
    assert {n: (prepare_project / n).read_bytes() for n in before} == before
    assert files_under(prepare_project / "data") == outputs


# ----------------------------------------------------------------------------- 5. writes confined to the outputs

def test_replace_dir_only_replaces_what_the_same_stage_wrote(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="no .tokenmill-stage marker"):
        check_replaceable(foreign, "prepare")
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(UserError):
        replace_dir(new, foreign, "prepare")
    assert (foreign / "holiday.jpg").read_bytes() == b"x" and new.is_dir()

    out = tmp_path / "out"
    replace_dir(new, out, "sample")
    assert (out / OWNER_FILE).read_text().strip() == "sample"
    with pytest.raises(UserError, match="written by 'sample'"):
        check_replaceable(out, "prepare")
    again = tmp_path / "again"
    again.mkdir()
    (again / "x").write_text("2")
    replace_dir(again, out, "sample")  # the same stage may replace its own folder
    assert (out / "x").read_text() == "2"
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty, "prepare")  # an empty folder holds nothing to lose


def test_stage_cli_refuses_hostile_dataset_names(prepare_project):
    before = files_under(prepare_project.parent)
    for name in ("../../x", "a/../../b", "a.b", "a b"):
        proc = run_cmd(prepare_project, sys.executable, "-m", "stages.prepare", "--dataset", name)
        assert "dataset name" in one_error_line(proc)
        proc = run_cmd(prepare_project, sys.executable, "-m", "stages.tokenize", "--dataset", name)
        assert "dataset name" in one_error_line(proc)
    assert files_under(prepare_project.parent) == before


def test_tokenize_cli_never_replaces_an_unrelated_folder(prepare_project, tmp_path):
    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    proc = pipeline_cli(prepare_project, "tokenize", str(prepare_project / "data/prepared/a"), "--out", str(victim))
    assert "refusing to replace it" in one_error_line(proc)
    assert files_under(victim) == {"notes.txt": files_under(victim)["notes.txt"]}
    assert (victim / "notes.txt").read_text() == "keep me"


def test_add_dataset_refuses_bad_names_and_values_without_writing(prepare_project, tmp_path):
    before = (prepare_project / "params.yaml").read_bytes()
    one_error_line(pipeline_cli(prepare_project, "add-dataset", "my-pets", str(tmp_path), "--no-run"))
    one_error_line(pipeline_cli(prepare_project, "add-dataset", "pets", str(tmp_path), "--resolution", "1",
                                "--no-run"))
    assert (prepare_project / "params.yaml").read_bytes() == before


def test_add_dataset_keeps_a_symlinked_folder_as_the_link(prepare_project, tmp_path):
    """Pointing the link at other data later must be a change DVC sees: the entry names the link, not its target.
    Unset resolution and channels are the VQGAN's dataset's (they were 32 px RGB whatever the VQGAN took)."""
    from pipeline.config import load_params

    before = (prepare_project / "params.yaml").read_bytes()
    target = make_idx_dataset(tmp_path / "real", n_train=20, n_val=5)
    (tmp_path / "link").symlink_to(target)
    with open(prepare_project / "params.yaml", "a") as fh:
        fh.write("train_vqgan:\n  dataset: a\n")
    params = yaml.safe_load((prepare_project / "params.yaml").read_text())
    params["datasets"]["a"]["background"] = 7
    (prepare_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = pipeline_cli(prepare_project, "add-dataset", "linked", str(tmp_path / "link"), "--no-run")
        assert proc.returncode == 0, proc.stderr
        entry = load_params(prepare_project / "params.yaml")["datasets"]["linked"]
        assert entry["path"] == str(tmp_path / "link")
        # no --resolution / --channels: the VQGAN's dataset's (a: 16 px grey), which tokenize@linked then takes
        assert (entry["resolution"], entry["channels"]) == (16, 1) and "(16 px, 1 channel(s))" in proc.stderr
        assert entry["background"] == 7  # the padding the VQGAN saw (it was 255 whatever the VQGAN took)
        # what tokenize@<name> would refuse, every run after: refused here, params.yaml untouched
        added = (prepare_project / "params.yaml").read_bytes()
        assert one_error_line(pipeline_cli(prepare_project, "add-dataset", "big", str(target), "--resolution", "32",
                                           "--no-run")) == (
            "error: add-dataset: --resolution 32 differs from 16, that of the VQGAN's dataset 'a'; tokenize@big would "
            "refuse it (leave --resolution out to take 16)")
        assert one_error_line(pipeline_cli(prepare_project, "add-dataset", "rgb", str(target), "--channels", "3",
                                           "--no-run")) == (
            "error: add-dataset: --channels 3 differs from 1, that of the VQGAN's dataset 'a'; add --convert-channels "
            "to convert at tokenize, or leave --channels out")
        assert (prepare_project / "params.yaml").read_bytes() == added
        proc = pipeline_cli(prepare_project, "add-dataset", "rgb", str(target), "--channels", "3", "--convert-channels",
                            "--background", "0", "--no-run")
        assert proc.returncode == 0, proc.stderr
        rgb = load_params(prepare_project / "params.yaml")["datasets"]["rgb"]
        assert rgb["convert_channels"] is True and rgb["background"] == 0  # given 0 is 0, not "unset" (7)
    finally:
        (prepare_project / "params.yaml").write_bytes(before)


def test_deployment_has_no_root_parameter(tmp_path):
    import inspect

    from pipeline.flow import deployment_flow
    params = inspect.signature(deployment_flow(tmp_path).fn).parameters
    assert set(params) == {"stages", "force", "overrides", "preset"}


# ----------------------------------------------------------------------------- 7. stale readers, one writer

def test_second_writer_of_one_token_store_stops_with_one_line(tmp_path):
    from stages.tokenize import TokenizeConfig, TokenizeParams
    from stages.tokenize import run as tokenize

    out = tmp_path / "tokens" / "a"
    with exclusive(out.parent / ".a.lock", "test"):
        with pytest.raises(UserError, match="token store .* is in use by pid"):
            tokenize(TokenizeConfig("a", tmp_path / "prepared", tmp_path / "vqgan", out, params=TokenizeParams()))
    assert not out.exists()


# ----------------------------------------------------------------------------- 8. the local Prefect server

def test_local_prefect_server_refuses_other_origins(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph")}
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(1)

        def preflight(origin: str) -> tuple[int, str | None]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/deployments/filter", method="OPTIONS",
                                         headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "content-type"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status, resp.headers.get("access-control-allow-origin")
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers.get("access-control-allow-origin")

        def simple_post(origin: str) -> int:  # what a page's fetch(..., {method: "POST", body: "..."}) sends
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Origin": origin, "Content-Type": "text/plain"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert preflight("http://evil.example") == (403, None)
        assert simple_post("http://evil.example") == 403  # was 200 with the runs: CORS alone does not stop it
        assert preflight(f"http://127.0.0.1:{port}") == (200, f"http://127.0.0.1:{port}")
        assert simple_post(f"http://127.0.0.1:{port}") == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:  # the UI itself
            assert b"<html" in page.read().lower()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_server_settings_pin_origin_and_pass_the_auth_string(monkeypatch):
    from pipeline.cli import AUTH_ENV, server_env
    monkeypatch.delenv(AUTH_ENV, raising=False)
    env = server_env(4321)
    assert env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4321,http://localhost:4321"
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1" and "PREFECT_SERVER_API_AUTH_STRING" not in env
    monkeypatch.setenv(AUTH_ENV, "me:secret")
    assert server_env(4321)["PREFECT_SERVER_API_AUTH_STRING"] == "me:secret"
