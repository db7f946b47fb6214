"""Tests for pipeline/doctor.py: the xformers/torch version-pair check (install time), the doctor's screen and summary
line, the attention fallback messages, and bench/gpu_check.sh refusing to run without a GPU. CPU; the CUDA tests at
the end are skipped without a GPU (bench/gpu_check.sh runs them on one)."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.attention as attn
from pipeline import doctor
from pipeline import env as env_module
from pipeline.doctor import PairCheck, check_pair, cuda_tuple, read_build_info

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA reports")

# What xformers 0.0.35 ships in xformers/cpp_lib.json.
XFORMERS_0035 = {"version": {"cuda": 1208, "hip": None, "torch": "2.10.0+cu128", "python": "3.10.19"},
                 "env": {"TORCH_CUDA_ARCH_LIST": "7.5 8.0+PTX 8.0 9.0a", "XFORMERS_PACKAGE_FROM": "wheel-v0.0.35"}}


def build_in(tmp_path: Path, info: dict | None) -> dict | None:
    """Write `info` as xformers/cpp_lib.json in a temp package folder and read it back the way the doctor does."""
    folder = tmp_path / "xformers"
    folder.mkdir()
    if info is not None:
        (folder / "cpp_lib.json").write_text(json.dumps(info))
    return read_build_info(folder)


# --- the version-pair check -----------------------------------------------------------------------------------------

def test_cuda_version_encoding():
    # cpp_lib.json packs major * 100 + minor; torch.version.cuda is "major.minor"
    assert cuda_tuple(1208) == (12, 8) and cuda_tuple(1300) == (13, 0) and cuda_tuple(1108) == (11, 8)
    assert cuda_tuple("12.8") == (12, 8) and cuda_tuple("13.0") == (13, 0) and cuda_tuple(None) is None


@pytest.mark.parametrize("torch_version", ["2.10.0+cu128", "2.10.0"])
def test_pair_matches_the_torch_it_was_built_for(tmp_path, torch_version):
    pair = check_pair(build_in(tmp_path, XFORMERS_0035), torch_version, "12.8")
    assert pair.ok and pair.status == "match", pair
    assert "2.10.0+cu128" in pair.message


def test_pair_mismatch_torch_2_13_cuda_13(tmp_path):
    """The registry's torch 2.13.0 is a CUDA 13.0 build: both the release and the CUDA runtime differ."""
    pair = check_pair(build_in(tmp_path, XFORMERS_0035), "2.13.0+cu130", "13.0")
    assert pair.status == "mismatch" and not pair.ok
    for fact in ("torch 2.10.0+cu128", "CUDA 12.8", "torch 2.13.0+cu130 is installed", "CUDA 13.0",
                 "falls back to torch sdpa", "requirements/constraints-cuda.txt"):
        assert fact in pair.message, (fact, pair.message)


def test_pair_mismatch_on_cuda_alone(tmp_path):
    """Same torch release, other CUDA build (e.g. a cu126 wheel): the extension links another libcudart."""
    pair = check_pair(build_in(tmp_path, XFORMERS_0035), "2.10.0+cu126", "12.6")
    assert pair.status == "mismatch"
    assert "built with CUDA 12.6" in pair.message and "is installed" not in pair.message


def test_pair_mismatch_on_torch_release_alone(tmp_path):
    pair = check_pair(build_in(tmp_path, XFORMERS_0035), "2.11.0+cu128", "12.8")
    assert pair.status == "mismatch"
    assert "torch 2.11.0+cu128 is installed" in pair.message and "built with CUDA" not in pair.message


def test_pair_cpu_torch_is_not_a_mismatch(tmp_path):
    pair = check_pair(build_in(tmp_path, XFORMERS_0035), "2.13.0+cpu", None)
    assert pair.status == "cpu" and not pair.ok
    assert "CPU build" in pair.message and "torch sdpa" in pair.message


def test_pair_rocm_torch_against_a_cuda_build(tmp_path):
    pair = check_pair(build_in(tmp_path, XFORMERS_0035), "2.10.0+rocm6.4", None, torch_hip="6.4")
    assert pair.status == "mismatch" and "ROCm 6.4" in pair.message


def test_pair_rocm_torch_against_a_rocm_build_compares_the_rocm_release():
    rocm = {"version": {"cuda": None, "hip": "6.2.41133-dd7f95766", "torch": "2.10.0+rocm6.2", "python": "3.10"}}
    assert check_pair(rocm, "2.10.0+rocm6.2", None, torch_hip="6.2.41134-65d174c3e").status == "match"
    other = check_pair(rocm, "2.10.0+rocm6.4", None, torch_hip="6.4.43482-0f2d60242")
    assert other.status == "mismatch" and "torch is a ROCm 6.4.43482-0f2d60242 build" in other.message


def test_pair_xformers_missing_or_without_build_info(tmp_path):
    assert build_in(tmp_path, None) is None
    assert check_pair(None, "2.13.0", "13.0").status == "missing"
    broken = check_pair({"version": {"cuda": 1208}}, "2.10.0", "12.8")
    assert broken.status == "mismatch" and "names no torch version" in broken.message


def test_cuda_constraints_pin_the_pair_the_installed_xformers_was_built_for():
    """requirements/constraints-cuda.txt must pin the torch release xformers' cpp_lib.json names, and the same
    xformers as the CPU constraints: bumping one pin without the other fails here, not on a GPU."""
    pins = {}
    for name in ("constraints.txt", "constraints-cuda.txt"):
        text = (ROOT / "requirements" / name).read_text()
        pins[name] = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.M))
    cuda = pins["constraints-cuda.txt"]
    assert cuda["xformers"] == pins["constraints.txt"]["xformers"]
    build = read_build_info()
    if build is None:
        pytest.skip("xformers is not installed here")
    assert doctor.package_version("xformers") == cuda["xformers"]
    assert cuda["torch"] == build["version"]["torch"].split("+")[0]
    assert check_pair(build, cuda["torch"], "12.8").ok  # the registry's torch 2.10.0 wheel is its CUDA 12.8 build
    assert build["version"]["cuda"] == 1208


def test_screen_says_when_an_untested_pair_loads_all_the_same(monkeypatch):
    """torch 2.14.1+cu130 beside nvidia-cuda-runtime-cu12 loads xformers 0.0.35's extension (measured): the screen
    keeps the MISMATCH but must not also claim the fallback; without the extension it names the fallback."""
    monkeypatch.setattr(doctor, "installed_pair", lambda: check_pair(XFORMERS_0035, "2.14.1+cu130", "13.0"))
    monkeypatch.setattr(doctor, "package_version", lambda name: "0.0.35")
    for loaded, expect, absent in ((True, "its extension loaded all the same", "falls back"),
                                   (False, "falls back to torch sdpa", "loaded all the same")):
        monkeypatch.setattr(doctor, "extension_status", lambda loaded=loaded: (loaded, "loaded" if loaded else "no"))
        line = next(x for x in doctor.report() if x.startswith("xformers"))
        assert "pair check: MISMATCH" in line and "torch 2.14.1+cu130 is installed" in line
        assert expect in line and absent not in line, line


def test_pair_command_fails_loudly_on_a_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "installed_pair", lambda: check_pair(XFORMERS_0035, "2.13.0+cu130", "13.0"))
    assert doctor.main(["--pair"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: xformers was built for torch 2.10.0+cu128") and len(err.splitlines()) == 1


def test_pair_command_fails_when_versions_agree_but_the_extension_does_not_load(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "installed_pair", lambda: check_pair(XFORMERS_0035, "2.10.0+cu128", "12.8"))
    monkeypatch.setattr(doctor, "extension_status",
                        lambda: (False, "not loaded: OSError: libcudart.so.12: cannot open shared object file"))
    assert doctor.main(["--pair", "--require-cuda"]) == 1
    assert "libcudart.so.12" in capsys.readouterr().err


def test_pair_command_passes_a_match_and_a_cpu_install(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "installed_pair", lambda: check_pair(XFORMERS_0035, "2.10.0+cu128", "12.8"))
    monkeypatch.setattr(doctor, "extension_status", lambda: (True, "loaded"))
    assert doctor.main(["--pair", "--require-cuda"]) == 0
    monkeypatch.setattr(doctor, "installed_pair", lambda: check_pair(XFORMERS_0035, "2.13.0+cpu", None))
    assert doctor.main(["--pair"]) == 0  # the CPU install: informational
    assert doctor.main(["--pair", "--require-cuda"]) == 1  # a CPU torch on a CUDA machine is an error
    out = capsys.readouterr()
    assert "matches torch 2.10.0+cu128" in out.out and "CPU build" in out.out
    assert out.err.startswith("error: torch 2.13.0+cpu is a CPU build")
    assert "--require-cuda asks for the CUDA pair" in out.err


# --- the fallback messages -------------------------------------------------------------------------------------------

def test_attention_fallback_messages():
    assert doctor.attention_fallback_text("cuda", True, "loaded") == "xformers memory_efficient_attention on CUDA"
    reason = "NotImplementedError: No operator found for `memory_efficient_attention_forward`"
    fallback = doctor.attention_fallback_text("cuda", True, reason)
    assert fallback.startswith("torch sdpa on CUDA: fallback") and reason in fallback
    assert doctor.attention_fallback_text("cpu", True, "loaded") == "torch sdpa on CPU (xformers has no CPU kernels)"
    assert doctor.attention_fallback_text("cuda", False, "whatever").startswith("no CUDA: torch sdpa")


@cpu_only
def test_models_attention_logs_one_fallback_line_when_xformers_cannot_run(monkeypatch, caplog):
    """Without CUDA the xformers probe fails and models.attention says so once, naming sdpa."""
    monkeypatch.setattr(attn, "_xformers_ops", None)
    monkeypatch.setattr(attn, "_xformers_reason", "not probed yet")
    with caplog.at_level(logging.WARNING, logger="models.attention"):
        assert attn._load_xformers() is None
        assert attn._load_xformers() is None  # probed once only
    lines = [r.getMessage() for r in caplog.records if r.name == "models.attention"]
    assert len(lines) == 1 and "falling back to torch sdpa" in lines[0], lines
    assert attn.xformers_status() not in ("loaded", "not probed yet")
    assert attn.xformers_status() in lines[0]
    assert attn.active_backend("cpu") == "sdpa"


# --- the doctor's screen and summary line ---------------------------------------------------------------------------

@cpu_only
def test_doctor_screen_on_cpu(capsys):
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["doctor"])
    args.fn(args)
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    by_key = {line.split()[0]: line for line in lines if line and not line.startswith(" ")}
    assert torch.__version__ in by_key["torch"]
    assert "no CUDA" in by_key["cuda"]
    assert "torch sdpa" in by_key["attention"] and "xformers has no CPU kernels" in by_key["attention"]
    assert by_key["fMHA"].endswith("no CUDA: every attention shape runs on torch sdpa")
    assert "OMP_WAIT_POLICY=" in by_key["threads"] and f"{torch.get_num_threads()} intra-op" in by_key["threads"]
    assert "faiss" in by_key and "bf16" in by_key
    assert by_key["cpu"].startswith(f"cpu         kernels {torch.backends.cpu.get_cpu_capability()}, ")
    if doctor.package_version("xformers"):
        assert doctor.installed_pair().status.upper() in by_key["xformers"]
        assert "extension" in by_key
    assert len(lines) <= 25, text  # one screen


@cpu_only
def test_summary_line_on_cpu():
    line = doctor.summary()
    assert "\n" not in line and line.startswith("environment: torch " + torch.__version__)
    assert "no CUDA" in line and "attention torch sdpa on CPU" in line and "OMP_WAIT_POLICY=" in line


@cpu_only
def test_summary_line_keeps_cpu_runs_free_of_xformers_and_faiss_imports():
    """Stages may log the summary: on CPU it must not import xformers (loud warning, no use) nor faiss."""
    code = ("import sys\nfrom pipeline.doctor import summary\nsummary()\n"
            "assert 'xformers' not in sys.modules and 'faiss' not in sys.modules, sorted(sys.modules)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@cpu_only
def test_probe_fmha_says_no_cuda():
    assert doctor.probe_fmha("cuda") == "no CUDA: every attention shape runs on torch sdpa"


@cpu_only
def test_gpu_check_refuses_without_cuda(tmp_path):
    out = tmp_path / "RESULTS.md"
    env = dict(os.environ, RESULTS=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()] and "no CUDA device" in r.stderr
    assert not out.exists()


@cpu_only
def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    """`--cpu-smoke` runs each section of the GPU check at toy sizes on the CPU, so a section broken by a code change
    shows here and not on a lent GPU; the report goes to $RESULTS, never to bench/RESULTS.md."""
    out = tmp_path / "smoke.md"
    before = (ROOT / "bench" / "RESULTS.md").exists()
    env = dict(os.environ, RESULTS=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = out.read_text()
    for name in ("doctor", "attention", "gpt_100m", "vqgan_256", "inception", "search"):
        assert re.search(rf"^## {name}: ok, \d+ s$", report, flags=re.M), (name, report[-2000:])
    assert "equal outputs within bf16 tolerance: yes" in report and "extract_features" in report
    assert re.search(r"the whole check took \d+ s\.$", report, flags=re.M) and "so far" not in report
    assert [p.name for p in tmp_path.iterdir()] == ["smoke.md"]  # the .partial it rendered into became smoke.md
    assert (ROOT / "bench" / "RESULTS.md").exists() == before


def _env_after_import(extra: dict[str, str], drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A fresh interpreter that imports pipeline (as every entry point does first), then reports the caps and the
    kernels torch picked."""
    env = {k: v for k, v in os.environ.items() if k not in drop + tuple(env_module.CPU_ISA_CAPS) +
           (env_module.CPU_ISA_VAR,)}
    env.update(extra, PYTHONPATH=str(ROOT))
    code = ("import json, os, pipeline, torch; print(json.dumps({k: os.environ.get(k) for k in "
            f"{list(env_module.CPU_ISA_CAPS)!r}}} | {{'isa': torch.backends.cpu.get_cpu_capability()}}))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(env_module.native_cpu_isa() not in ("AVX2", "AVX512"), reason="the cap is for x86-64 with AVX2")
def test_every_entry_point_caps_cpu_kernels_to_avx2():
    """An AVX-512 machine trained a different VQGAN than the AVX2 machine that recorded dvc.lock, and the same bytes
    with these caps: they are on by default, the user's own values win, TOKENMILL_CPU_ISA=native lifts them."""
    r = _env_after_import({})
    seen = json.loads(r.stdout)
    assert seen == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2",
                    "OPENBLAS_CORETYPE": "Haswell", "isa": "AVX2"}
    seen = json.loads(_env_after_import({"ATEN_CPU_CAPABILITY": "default"}).stdout)
    assert seen["ATEN_CPU_CAPABILITY"] == "default" and seen["isa"] == "DEFAULT" and seen["MKL_CBWR"] == "AVX2"
    seen = json.loads(_env_after_import({"TOKENMILL_CPU_ISA": "native"}).stdout)
    assert seen["ATEN_CPU_CAPABILITY"] is None and seen["MKL_CBWR"] is None and seen["OPENBLAS_CORETYPE"] is None
    # AVX512 where torch has kernels for this CPU's AVX-512 subset: the cap is what made it AVX2 above
    assert seen["isa"] in (("AVX2", "AVX512") if env_module.native_cpu_isa() == "AVX512" else ("AVX2",))


def test_a_misspelled_cpu_isa_is_one_line_and_exit_2():
    r = _env_after_import({"TOKENMILL_CPU_ISA": "avx-512"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: TOKENMILL_CPU_ISA='avx-512': use avx2 (the default: the same bytes on any "
                                     "x86-64 machine) or native (the CPU's widest kernels)"]


def test_run_facts_name_what_decides_the_bytes(tmp_path):
    from pipeline.runlog import read_run_facts, write_metrics

    write_metrics(tmp_path / "m.json", {"fid": 1.0}, {"seconds": 3})
    facts = read_run_facts(tmp_path / "m.json")
    assert facts == {"seconds": 3, "cpu_isa": torch.backends.cpu.get_cpu_capability(),
                     "threads": torch.get_num_threads()}
    assert json.loads((tmp_path / "m.json").read_text()) == {"fid": 1.0}  # the hashed file holds none of them


# --- CUDA (skipped without a GPU) -----------------------------------------------------------------------------------

@needs_cuda
def test_cuda_install_pairs_xformers_with_its_torch():
    """The extension must load; the pair must match wherever torch is the pinned CUDA release (scripts/install.sh).
    A machine that brings its own torch (bench/offline_kit.py) runs an untested pair: only the load is required."""
    loaded, detail = doctor.extension_status()
    assert loaded, detail
    text = (ROOT / "requirements" / "constraints-cuda.txt").read_text()
    pinned = re.search(r"^torch==(\S+)", text, flags=re.M).group(1)
    if torch.__version__.split("+")[0] == pinned:
        pair = doctor.installed_pair()
        assert pair.ok, pair.message


@needs_cuda
def test_fmha_runs_every_project_attention_shape():
    probes = doctor.probe_fmha("cuda")
    assert not isinstance(probes, str), probes
    assert [p.name for p in probes] == list(doctor.SHAPE_NAMES)
    for p in probes:
        assert any(not reasons for reasons in p.fw.values()), p.line()
        assert p.result == "fw+bw ran", p.line()
    assert doctor.attention_backend_text("cuda") == "xformers memory_efficient_attention on CUDA"


@needs_cuda
def test_summary_line_names_the_gpu():
    line = doctor.summary("cuda")
    assert torch.cuda.get_device_name(0) in line and "attention xformers" in line
    assert isinstance(doctor.installed_pair(), PairCheck)
