"""DVC caching and the Prefect flow, in a throwaway copy of the project."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import files_under, make_idx_dataset, make_project, tiny_params
from pipeline.sandbox import ROOT
from pipeline.config import set_params_file


def dvc(project, *args):
    proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("proj")
    a = make_idx_dataset(base / "src_a", n_train=30, n_val=5, seed=1)
    b = make_idx_dataset(base / "src_b", n_train=20, n_val=5, seed=2)
    return make_project(base / "project", tiny_params({"a": a, "b": b}), stages=("prepare",))


def test_repro_twice_then_param_change_reruns_only_that_stage(project):
    out = dvc(project, "repro")
    assert "Running stage 'prepare@a'" in out and "Running stage 'prepare@b'" in out
    out = dvc(project, "repro")
    assert "Running stage" not in out
    assert "didn't change, skipping" in out
    assert dvc(project, "status").strip().endswith("Data and pipelines are up to date.")

    set_params_file(project / "params.yaml", ["datasets.a.resolution=20"])
    assert "prepare@a" in dvc(project, "status") and "prepare@b" not in dvc(project, "status")
    out = dvc(project, "repro")
    assert "Running stage 'prepare@a'" in out and "Running stage 'prepare@b'" not in out
    import json
    assert json.loads((project / "data/prepared/a/manifest.json").read_text())["resolution"] == 20


def test_bad_params_stop_stage_with_one_line(project):
    set_params_file(project / "params.yaml", ["prepare.shard_size=-1"])
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--dataset", "a"], cwd=project,
                              capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "error: params.yaml: prepare.shard_size = -1 is out of range (allowed: >= 1)"]
    finally:
        set_params_file(project / "params.yaml", ["prepare.shard_size=25"])


def prefect_sessions(runs: list[tuple[str, Path]], tmp_path) -> dict:
    """Run scenarios of tests/prefect_session.py in one temporary Prefect server, in a child process; returns
    {scenario: its result}."""
    import json
    import os

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [str(x) for scenario, project in runs for x in (scenario, project)]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("prefect_session.py")), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def transient_projects(base: Path) -> tuple[Path, Path]:
    """(flaky, clean): the same prepare stage, the flaky one failing its first attempt (tests/flaky_stage.py)."""
    import shutil

    import yaml
    src = make_idx_dataset(base / "src", n_train=60, n_val=5, seed=4)  # 3 train shards of 25
    clean = make_project(base / "clean", tiny_params({"a": src}), stages=("prepare",))
    dvc(clean, "repro")
    flaky = make_project(base / "flaky", tiny_params({"a": src}), stages=("prepare",))
    shutil.copy2(Path(__file__).with_name("flaky_stage.py"), flaky / "flaky_stage.py")
    spec = yaml.safe_load((flaky / "dvc.yaml").read_text())
    spec["stages"]["prepare"]["do"]["cmd"] = "python flaky_stage.py .failed-once stages.prepare --dataset ${key}"
    (flaky / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return flaky, clean


@pytest.fixture(scope="module")
def prefect_results(project, broken_a, tmp_path_factory) -> dict:
    """The three Prefect scenarios (flow runs, a transient failure, keep-going with user errors) in one temporary
    server: each server start costs ~15 s of the suite."""
    dvc(project, "repro")
    flaky, clean = transient_projects(tmp_path_factory.mktemp("transient"))
    results = prefect_sessions([("flow_runs", project), ("transient", flaky), ("keep_going", broken_a)],
                               tmp_path_factory.mktemp("prefect"))
    return {**results, "flaky": flaky, "clean": clean}


def test_prefect_flow_runs_stages_through_dvc_and_publishes_artifacts(prefect_results):
    r = prefect_results["flow_runs"]
    # Everything was up to date: the flow skips exactly what DVC skips.
    assert [x["stage"] for x in r["skipped"]] == ["prepare@a", "prepare@b"]
    assert all(x["status"] == "skipped (unchanged)" for x in r["skipped"])
    # A param change re-runs only the affected stage, through the flow.
    assert {x["stage"]: x["status"] for x in r["changed"]} == {"prepare@a": "skipped (unchanged)",
                                                               "prepare@b": "ran"}
    # ...and setting it back restores the earlier output from DVC's run cache, said so in the stage table
    assert [(x["stage"], x["status"]) for x in r["restored"]] == [("prepare@b", "restored from DVC's run cache")]
    assert {"prepare-a-counts", "prepare-a-manifest", "prepare-b-counts"} <= set(r["artifact_keys"])
    # the flow (and so the deployment) validates its overrides before writing anything
    assert "unknown key 'prepare.shard_sizee'" in r["refused"] and "\n" not in r["refused"]
    assert r["params_unchanged"]


COUNT_STAGE = """
  count:
    foreach: ${datasets}
    do:
      cmd: python count.py -m stages.prepare data/prepared/${key} data/counts/${key}.json
      deps:
        - data/prepared/${key}
      outs:
        - data/counts/${key}.json
"""
COUNT_PY = """import json, sys
from pathlib import Path
src, out = Path(sys.argv[3]), Path(sys.argv[4])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(json.loads((src / "manifest.json").read_text())["splits"]["train"]["count"]))
"""
IDX_ERROR = "train-images-idx3-ubyte.gz: cannot read IDX file"


@pytest.fixture(scope="module")
def broken_a(tmp_path_factory):
    """Datasets a (its images file is not gzip: prepare@a fails with a user error) and b, each with a stage after
    prepare (count@<dataset>, reading data/prepared/<dataset>), and a preset configs/small.yaml."""
    base = tmp_path_factory.mktemp("broken")
    a = make_idx_dataset(base / "src_a", n_train=30, n_val=5, seed=1)
    (a / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    b = make_idx_dataset(base / "src_b", n_train=20, n_val=5, seed=2)
    project = make_project(base / "project", tiny_params({"a": a, "b": b}), stages=("prepare",))
    with open(project / "dvc.yaml", "a") as f:
        f.write(COUNT_STAGE)
    (project / "count.py").write_text(COUNT_PY)
    (project / "configs").mkdir()
    (project / "configs/small.yaml").write_text("prepare:\n  shard_size: 5\ndatasets:\n  b:\n    resolution: 20\n")
    return project


@pytest.fixture(scope="module")
def keep_going(prefect_results):
    return prefect_results["keep_going"]


def no_traceback(text: str) -> bool:
    return "Traceback" not in text and "^^^^" not in text


def test_cli_run_one_line_user_error_and_keep_going(keep_going):
    r = keep_going["cli"]
    assert r["rc"] == 2, r["stderr"][-3000:]
    errors = [x for x in r["stderr"].splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: prepare@a: ") and IDX_ERROR in errors[0], errors
    assert no_traceback(r["stdout"] + r["stderr"])
    table = {line.split()[0]: line.split(None, 1)[1] for line in r["stdout"].splitlines()}
    assert table["prepare@a"].startswith("failed") and table["count@a"].startswith("skipped: needs prepare@a")
    assert table["prepare@b"].startswith("ran") and table["count@b"].startswith("ran")


def test_flow_run_failed_state_is_the_stage_error_line_without_retries(keep_going):
    run = keep_going["run"]
    assert run["state"] == "FAILED" and run["message"].startswith("error: prepare@a: ") and IDX_ERROR in run["message"]
    assert "\n" not in run["message"]
    task = run["tasks"]["prepare@a"]
    assert task["state"] == "FAILED" and task["run_count"] == 1  # a user error is not retried
    assert task["message"].startswith("error: prepare@a: ") and task["message"].endswith("(Not a gzipped file (b'no'))")
    assert "count@a" not in run["tasks"]  # skipped: it needs prepare@a
    assert {run["tasks"][n]["state"] for n in ("prepare@b", "count@b")} == {"COMPLETED"}
    assert all(no_traceback(line) for line in run["logs"]), [x for x in run["logs"] if not no_traceback(x)]
    assert "count@a" in run["artifacts"]["pipeline-stages"] and "skipped: needs prepare@a" in run["artifacts"][
        "pipeline-stages"]


def test_flow_run_records_preset_and_overrides_from_the_cli(keep_going):
    run = keep_going["run"]
    assert run["parameters"]["preset"] == "configs/small.yaml"
    assert run["parameters"]["overrides"] == ["prepare.shard_size=7"]
    assert run["name"].startswith("small prepare.shard_size=7")
    md = run["artifacts"]["run-parameters"]
    assert "`configs/small.yaml`" in md and "`prepare.shard_size=7`" in md
    # the preset's settings are applied first and the -S override wins
    applied = md[md.index("settings applied"):].split()
    assert applied.index("prepare.shard_size=5") < applied.index("prepare.shard_size=7")
    assert "datasets.b.resolution=20" in applied


@pytest.mark.parametrize("case, message", [
    ("typo", "error: params.yaml with prepare.shard_sizee=5: unknown key 'prepare.shard_sizee'"),
    ("outside", "error: preset ../params.yaml: must be a .yaml file under"),
    ("stage", "error: unknown stage 'tokenise'"),
])
def test_bad_flow_parameters_fail_in_one_line(keep_going, case, message):
    run = keep_going[case]
    assert run["state"] == "FAILED" and run["message"].startswith(message) and "\n" not in run["message"]
    assert run["tasks"] == {}  # refused before any stage
    assert all(no_traceback(line) for line in run["logs"])
    assert keep_going["params_unchanged"]


def test_run_refuses_a_prefect_server_of_another_project(keep_going):
    assert keep_going["home"]  # the server says where it keeps its state
    r = keep_going["foreign"]
    assert r["rc"] == 2 and r["stdout"] == ""
    assert r["stderr"].strip().splitlines() == [r["stderr"].strip()]
    assert "holds a Prefect server that is not this project's" in r["stderr"] and keep_going["home"] in r["stderr"]


def test_serve_stops_within_seconds(keep_going):
    # started with SIGINT ignored (as `cmd &` in a script does): before, SIGINT never stopped it
    assert keep_going["serve_stop_s"]["SIGINT"] is not None and keep_going["serve_stop_s"]["SIGINT"] < 15
    assert keep_going["serve_stop_s"]["SIGTERM"] is not None and keep_going["serve_stop_s"]["SIGTERM"] < 15


def test_a_misspelt_deployment_parameter_is_refused_when_the_run_is_created(keep_going):
    """It used to be accepted, and the run's process crashed on Prefect's signature check: state Crashed, no line in
    the run's log, a traceback only in the serve terminal."""
    assert keep_going["misspelt"] == {"status": 409, "detail": "Error creating flow run: Validation failed. Failure "
                                      "reason: Additional properties are not allowed ('overides' was unexpected)"}


def test_no_prefect_run_keeps_going_and_names_the_failed_stage(broken_a):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--no-prefect"], cwd=broken_a,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Running stage 'count@b'" in proc.stdout and "Running stage 'count@a'" not in proc.stdout
    summary = proc.stderr[proc.stderr.index("failed stages"):].splitlines()  # the last lines
    assert len(summary) == 2 and summary[1].split()[:3] == ["prepare@a", "exit", "2"] and IDX_ERROR in summary[1]


def test_transient_failure_is_retried_without_duplicated_output(prefect_results):
    r, flaky, clean = prefect_results["transient"], prefect_results["flaky"], prefect_results["clean"]
    assert (flaky / ".failed-once").is_file()  # the first run did fail
    assert r["completed"] and r["run_count"] == 2 and r["result"]["status"] == "ran"
    # the retry's output is the clean run's, file for file: no duplicated or partial shard, no temp file
    assert files_under(flaky / "data") == files_under(clean / "data")
    assert "Data and pipelines are up to date." in dvc(flaky, "status")


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("run", "stage", "check", "ui", "serve", "add-dataset"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--help"], capture_output=True, text=True)
    assert "--stage" in proc.stdout and "--force" in proc.stdout


def count_project(tmp_path: Path) -> tuple[Path, Path]:
    """A project of one dataset b (its source folder returned too): prepare@b, then count@b reading its output."""
    b = make_idx_dataset(tmp_path / "src_b", n_train=20, n_val=5, seed=2)
    project = make_project(tmp_path / "project", tiny_params({"b": b}), stages=("prepare",))
    with open(project / "dvc.yaml", "a") as f:
        f.write(COUNT_STAGE)
    (project / "count.py").write_text(COUNT_PY)
    return project, b


def test_a_missing_dataset_path_and_a_missing_dependency_are_one_line_each(tmp_path):
    """DVC hashes a stage's deps before its command runs, so it failed first: `dvc repro  exit 255` and no
    message (--no-prefect), or advice to run earlier stages for the user's own folder (the flow)."""
    project, b = count_project(tmp_path)
    params = (project / "params.yaml").read_text()
    for cmd in (["run", "--no-prefect", "-S", "datasets.b.path=/nonexistent/fmnist"], ["run", "--stage", "prepare@b",
                "--temp-server", "-S", "datasets.b.path=/nonexistent/fmnist"], ["stage", "count@b"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline", *cmd], cwd=project, capture_output=True, text=True)
        assert proc.returncode == 2 and no_traceback(proc.stderr), proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        if cmd[0] == "run":  # refused before anything ran
            assert last == ("error: params.yaml with datasets.b.path=/nonexistent/fmnist: datasets.b.path = "
                            "/nonexistent/fmnist does not exist (install the dataset there, or point the path at it)")
        else:  # prepare@b never ran: DVC stops before count@b's command, and the summary says why
            assert last.split()[:3] == ["count@b", "exit", "2"] and last.endswith(
                "error: count@b: its dependency data/prepared/b does not exist (run the stage that makes it first)"
            ), proc.stderr[-2000:]
        assert (project / "params.yaml").read_text() == params
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--no-prefect", "-S", "datasets.b.path=~/src_b"],
                          cwd=project, capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: params.yaml with datasets.b.path=~/src_b: datasets.b.path = ~/src_b: DVC does not expand '~'; write "
        f"the full path ({tmp_path / 'src_b'})")
    # a dataset folder that is gone (its outputs made, or pulled) blocks only what reads it: prepare@b and `check`
    pipeline = [sys.executable, "-m", "pipeline"]
    proc = subprocess.run([*pipeline, "stage", "prepare"], cwd=project, capture_output=True, text=True)  # base name
    assert proc.returncode == 0 and "Running stage 'prepare@b'" in proc.stdout, proc.stderr[-2000:]
    b.rename(tmp_path / "moved")
    proc = subprocess.run([*pipeline, "stage", "count@b"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([*pipeline, "check"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == (f"error: {project / 'params.yaml'}: datasets.b.path = {b} "
                                                            f"does not exist (install the dataset there, or point the "
                                                            f"path at it)")


def test_the_flow_tells_a_missing_stage_output_from_a_missing_path_of_the_user(tmp_path):
    from pipeline.flow import _classify

    def line(path: str) -> str:
        failed = _classify("s", 255, [f"ERROR: failed to reproduce 's': [Errno 2] No such file or directory: "
                                      f"'{path}'"], None, str(tmp_path))
        assert failed.user_error
        return failed.summary  # the flow run's message (the stage named once: it was twice)

    # the same line as `pipeline stage` prints (the CLI reads DVC's output with the same function)
    hint = "error: s: its dependency data/prepared/a does not exist (run the stage that makes it first)"
    assert line(str(tmp_path / "data/prepared/a")) == hint
    # a stage's own error line gets its name in front
    own = _classify("s", 255, ["error: params.yaml: s.n = 0 is out of range", "ERROR: failed to reproduce 's': "
                               "failed to run: python -m stages.s, exited with 2"], "error: params.yaml: s.n = 0 is "
                    "out of range", str(tmp_path))
    assert own.summary == "error: s: params.yaml: s.n = 0 is out of range"
    assert line("data/prepared/a") == hint
    assert line("/nonexistent/fmnist") == ("error: s: its dependency /nonexistent/fmnist does not exist (a path "
                                           "params.yaml names: check it)")


KILLED_RUN = """import os, signal, sys
from pathlib import Path
from pipeline.runs import run_with_overrides
with run_with_overrides(Path(sys.argv[1]), ["prepare.shard_size=7"]):
    Path(sys.argv[1], "data", "prepared", "b").mkdir(parents=True)  # as a stage would have begun
    Path(sys.argv[1], "data", "prepared", "b", ".tokenmill-stage").write_text("prepare")
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no finally: what a power cut leaves
"""


@pytest.mark.parametrize("then", [["check"], ["run", "--no-prefect", "--stage", "count@b"], ["edited", "check"],
                                  ["put back", "check"], ["finished", "check"]])
def test_a_killed_run_is_undone_by_the_next_command(tmp_path, then):
    """SIGKILL leaves the run's overrides in params.yaml (and what it made); the next run or `check` (run before a
    plain `dvc repro`) puts the project back from the run's journal first, and says so. A params.yaml edited since
    is the user's; one already back (a second Ctrl-C stopped the undo) is not called edited; a run the user
    finished since with `dvc repro` (dvc status up to date) is kept."""
    project, b = count_project(tmp_path)
    params = (project / "params.yaml").read_text()
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(project)], cwd=ROOT, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -9 and "shard_size: 7" in (project / "params.yaml").read_text()
    what, then = (then[0], then[1:]) if then[0] in ("edited", "put back", "finished") else ("", then)
    if what == "edited":  # the user fixed params.yaml by hand since: theirs now, not put back
        (project / "params.yaml").write_text(params.replace("shard_size: 25", "shard_size: 9"))
        params = (project / "params.yaml").read_text()
    elif what == "put back":
        (project / "params.yaml").write_text(params)
    elif what == "finished":
        repro = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True)
        assert repro.returncode == 0, repro.stderr[-2000:]
        params = (project / "params.yaml").read_text()
        assert "shard_size: 7" in params
    proc = subprocess.run([sys.executable, "-m", "pipeline", *then], cwd=project, capture_output=True, text=True)
    assert not (project / ".dvc/tmp/tokenmill-run.json").exists()
    assert ("params.yaml changed after the killed run wrote its overrides; it is left as it is" in proc.stderr) == (
        what == "edited")
    if what == "finished":
        assert "was killed, but its result is complete (dvc status: up to date); it is kept" in proc.stderr
        assert proc.returncode == 0 and (project / "params.yaml").read_text() == params
        assert (project / "data/counts/b.json").is_file()
        return
    put_back = "dvc.lock" if what == "edited" else "params.yaml, dvc.lock"
    assert f"was killed before it could undo itself: {put_back} and the outputs are put back" in (
        proc.stderr), proc.stderr[-2000:]
    if then == ["check"]:
        assert proc.returncode == 0 and (project / "params.yaml").read_text() == params
        assert not (project / "data/prepared/b").exists()  # made at a new path by the killed run: removed
    else:  # undone first, then the run itself (prepare@b, count@b) with the user's params
        assert proc.returncode == 0 and (project / "data/counts/b.json").read_text() == "20", proc.stderr[-2000:]
        assert (project / "params.yaml").read_text() == params


INTERRUPTED_TWICE = """import logging, os, signal, sys
from pathlib import Path
from pipeline import runs
logging.basicConfig(level=logging.WARNING, format="%(message)s")
real_undo = runs._undo

def undo(*args):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C pressed again while the run undoes itself, and again
    os.kill(os.getpid(), signal.SIGTERM)
    return real_undo(*args)

runs._undo = undo
try:
    with runs.run_with_overrides(Path(sys.argv[1]), ["prepare.shard_size=7"]):
        raise KeyboardInterrupt  # the first Ctrl-C
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_second_ctrl_c_waits_for_the_undo_to_finish(tmp_path):
    """A second Ctrl-C during the undo killed the run half-undone (params.yaml back, the outputs still deleted, the
    journal left). It now waits, with one line, and the undo completes."""
    project, _ = count_project(tmp_path)
    params = (project / "params.yaml").read_text()
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_TWICE, str(project)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.count("still undoing the run (params.yaml, dvc.lock, outputs); it stops when that is done") == 1
    assert "the run was stopped: params.yaml (overrides undone), dvc.lock and the outputs are as they were" in (
        proc.stderr)
    assert (project / "params.yaml").read_text() == params and not (project / ".dvc/tmp/tokenmill-run.json").exists()


CTRL_C_DURING_REPRO = """import os, signal, sys, threading, time
from pathlib import Path
from pipeline import cli
signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's: not the SIG_IGN a test runner may pass on
done = Path(sys.argv[1])
ready = done.with_name("ready")
child = ("import signal, sys, time; from pathlib import Path\\n"
         "def stop(*a):\\n    time.sleep(1.5); Path(sys.argv[1]).write_text('stopped'); sys.exit(130)\\n"
         "signal.signal(signal.SIGINT, stop)\\nPath(sys.argv[2]).touch()\\n"
         "print(\\"Running stage 'x':\\", flush=True)\\nwhile True: time.sleep(0.1)\\n")

def ctrl_c():  # the terminal's Ctrl-C (the whole group), once the child's handler is in place however slow its start
    while not ready.exists():
        time.sleep(0.05)
    os.killpg(0, signal.SIGINT)

threading.Thread(target=ctrl_c, daemon=True).start()
try:
    cli._repro_keep_going([sys.executable, "-c", child, str(done), str(ready)])
except KeyboardInterrupt:
    print("child stopped before the undo:", done.exists())
"""


def test_ctrl_c_during_dvc_repro_waits_for_dvc_to_stop(tmp_path):
    """The CLI went on to undo the run (dvc checkout) while the interrupted `dvc repro` was still stopping, holding
    DVC's locks (`dvc status` right after: 'is busy ... blocked by dvc repro')."""
    proc = subprocess.run([sys.executable, "-c", CTRL_C_DURING_REPRO, str(tmp_path / "done")], cwd=ROOT,
                          capture_output=True, text=True, start_new_session=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "child stopped before the undo: True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_a_selected_stage_is_told_which_out_of_date_stages_it_reads(tmp_path, monkeypatch):
    """`--stage evaluate` after `-S sample.n=40`: evaluate runs alone on the old samples; the note names sample,
    not the selected stage itself nor an out-of-date stage it does not read."""
    import json
    from pipeline import dvc_graph

    status = {"sample": ["changed params"], "evaluate": ["changed deps"], "eval_vqgan": ["changed params"]}
    answer = {"code": 0}
    monkeypatch.setattr(dvc_graph.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, answer["code"], json.dumps(status), ""))
    monkeypatch.setattr(dvc_graph, "upstream_stages", lambda root: {"evaluate": {"sample", "train_transformer"},
                                                                    "sample": {"train_transformer"}})
    assert dvc_graph.stale_upstream_note(tmp_path, ["evaluate"]) == (
        "sample is out of date and not selected: evaluate will read its outputs as they are (select it too, or run "
        "the whole pipeline)")
    status["train_transformer"] = ["changed params"]
    assert dvc_graph.stale_upstream_note(tmp_path, ["evaluate"]).startswith(
        "sample, train_transformer are out of date and not selected: evaluate will read their outputs")
    assert dvc_graph.stale_upstream_note(tmp_path, ["sample", "evaluate", "train_transformer"]) is None
    assert dvc_graph.stale_upstream_note(tmp_path, ["eval_vqgan"]) is None  # out of date itself: it runs
    answer["code"] = 1  # dvc status failed: nothing to say here, the run reports DVC's trouble
    assert dvc_graph.stale_upstream_note(tmp_path, ["evaluate"]) is None
