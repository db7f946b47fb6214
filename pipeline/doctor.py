"""`python -m pipeline doctor`: what this machine runs, on one screen, and the install-time xformers/torch check.

Why a doctor: xformers gates every fMHA operator of `memory_efficient_attention` (even the ones that only forward to
PyTorch's own flash / memory-efficient kernels, as all of them do in xformers 0.0.35) on its C++/CUDA extension
`xformers/_C.so` having loaded. `xformers/cpp_lib.json` names the build it was made for (0.0.35: torch 2.10.0+cu128).
The 0.0.35 extension holds only sparse 2:4 kernels and calls torch through its stable C ABI alone, so what it needs
from the machine is the CUDA runtime it links, libcudart.so.12: torch 2.14.1+cu130 loads it once
nvidia-cuda-runtime-cu12 is installed, and not without (checked on a CPU machine, 2026-12-06). Where it does not
load, models.attention logs one line and runs torch sdpa, and nothing else says so. This module tells which case a
machine is in:

  check_pair(build, torch_version, torch_cuda)   cpp_lib.json against the installed torch: match / mismatch / cpu
  report()                                       the doctor's screen, as lines
  summary(device)                                one line for a stage's log
  python -m pipeline.doctor --pair [--require-cuda]   what scripts/install.sh runs after installing (exit 1 on a
                                                 mismatch, or on a CPU torch with --require-cuda)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from pipeline import env

# The project's attention shapes the doctor probes on CUDA (B, H, N, D as models.attention uses them): a GPT over a
# 16x16 token grid, Swin shifted windows with a relative-position bias, YLG masks, and KV-cache decoding with 16 new
# tokens against 256 cached ones (bottom-right causal).
GRID, HEADS, HEAD_DIM, WINDOW, NEW_TOKENS = 16, 8, 64, 8, 16
SHAPE_NAMES = ("causal", "window bias", "YLG mask", "KV cache (bottom-right causal)")
FIX = ("install the pair pinned in requirements/constraints-cuda.txt "
       "(bash scripts/install.sh on a machine with nvidia-smi)")


# ----------------------------------------------------------------------------------------- the version-pair check

@dataclass(frozen=True)
class PairCheck:
    status: str  # "match", "mismatch", "cpu" (CPU build of torch: the kernels are not used) or "missing"
    message: str
    facts: str = ""  # a mismatch's facts alone ("xformers was built for ..., but ..."), without the consequence

    @property
    def ok(self) -> bool:
        return self.status == "match"


def xformers_folder() -> Path | None:
    """The installed xformers package folder, found without importing it (the import loads torch and the extension)."""
    spec = importlib.util.find_spec("xformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def read_build_info(folder: Path | None = None) -> dict | None:
    """xformers/cpp_lib.json: {"version": {"torch": "2.10.0+cu128", "cuda": 1208, "hip": null, ...}, "env": {...}};
    None when xformers is not installed or ships no build info (a source build without the extension)."""
    folder = folder if folder is not None else xformers_folder()
    path = folder / "cpp_lib.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def cuda_tuple(version: int | str | None) -> tuple[int, int] | None:
    """CUDA version as (major, minor) from cpp_lib.json's integer (major * 100 + minor: 1208 = 12.8) or from
    torch.version.cuda ("12.8")."""
    if version is None:
        return None
    if isinstance(version, int):
        return version // 100, version % 100
    major, minor = str(version).split(".")[:2]
    return int(major), int(minor)


def _cuda_text(version: int | str | None) -> str:
    t = cuda_tuple(version)
    return "none" if t is None else f"{t[0]}.{t[1]}"


def _release(version: str) -> str:
    """"2.10.0+cu128" -> "2.10.0": the local label names the wheel's variant, which the CUDA check covers."""
    return version.split("+")[0]


def check_pair(build: dict | None, torch_version: str, torch_cuda: str | None,
               torch_hip: str | None = None) -> PairCheck:
    """Does the installed torch match the one xformers' extension was built for?

    Strict on purpose: same torch release and same CUDA major.minor, the pair xformers built and tested. Another
    pair can work (the extension needs libcudart.so.<major> and torch's stable C ABI), which the doctor's
    `extension` line then shows; the install pins the tested pair. Python is not compared: the 0.0.35 wheel is
    Python-version agnostic (py39-none) even though cpp_lib.json names the Python it was built with.
    """
    if build is None:
        return PairCheck("missing", "xformers is not installed (no xformers/cpp_lib.json): attention uses torch sdpa")
    built = build.get("version") or {}
    built_torch, built_cuda, built_hip = built.get("torch"), built.get("cuda"), built.get("hip")
    target = f"torch {built_torch}, CUDA {_cuda_text(built_cuda)}" if built_hip is None else \
        f"torch {built_torch}, ROCm {built_hip}"
    if not built_torch:
        return PairCheck("mismatch", f"xformers/cpp_lib.json names no torch version ({build!r}); {FIX}")
    if torch_cuda is None and torch_hip is None:
        return PairCheck("cpu", f"torch {torch_version} is a CPU build: xformers' kernels (built for {target}) are "
                                f"not used; attention runs on torch sdpa")
    problems = []
    if _release(torch_version) != _release(built_torch):
        problems.append(f"torch {torch_version} is installed")
    if torch_hip is not None:  # ROCm versions as torch.version.hip writes them ("6.4.43482-0f2d60242")
        if built_hip is None or str(built_hip).split(".")[:2] != str(torch_hip).split(".")[:2]:
            problems.append(f"torch is a ROCm {torch_hip} build")
    elif built_cuda is None:
        problems.append("xformers was built without CUDA")
    elif cuda_tuple(built_cuda) != cuda_tuple(torch_cuda):
        problems.append(f"torch was built with CUDA {torch_cuda}")
    if problems:
        facts = f"xformers was built for {target}, but {' and '.join(problems)}: not the pair xformers tested"
        return PairCheck("mismatch", f"{facts}; its C++/CUDA extension loads only where the CUDA runtime it links is "
                                     f"found, and without it memory_efficient_attention has no usable operator and "
                                     f"attention falls back to torch sdpa; {FIX}", facts)
    return PairCheck("match", f"xformers was built for {target}: matches torch {torch_version}")


def installed_pair() -> PairCheck:
    return check_pair(read_build_info(), torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None))


# ----------------------------------------------------------------------------------------- what is installed

def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _innermost(exc: BaseException) -> str:
    """The first line of the deepest cause: for a failed extension load that is the dynamic loader's own message
    (e.g. "libcudart.so.12: cannot open shared object file")."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


@contextmanager
def _quiet_xformers() -> Iterator[None]:
    """xformers warns loudly (several lines) when its extension does not load; the doctor says it in one."""
    xlog = logging.getLogger("xformers")
    level = xlog.level
    xlog.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        xlog.setLevel(level)


def extension_status() -> tuple[bool | None, str]:
    """(loaded, detail) for xformers' C++/CUDA extension; loaded is None when xformers is not installed."""
    if xformers_folder() is None:
        return None, "xformers is not installed"
    with _quiet_xformers():
        try:
            import xformers
        except Exception as exc:  # a broken install: say why, the rest of the report still helps
            return False, f"import xformers failed: {_innermost(exc)}"
    exc = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    if exc is None and getattr(xformers, "_has_cpp_library", False):
        return True, "loaded"
    return False, "not loaded: " + (_innermost(exc) if exc is not None else "xformers reports no C++ library")


def torch_build_text() -> str:
    if torch.version.cuda:
        v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        # cuDNN packs its version as one integer: 9.10.2 -> 91002 (9.x), 8.9.2 -> 8902 (8.x)
        cudnn = v and (f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 90000 else
                       f"{v // 1000}.{v % 1000 // 100}.{v % 100}")
        return f"CUDA {torch.version.cuda} build" + (f", cuDNN {cudnn}" if cudnn else "")
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} build"
    return "CPU build"


def cuda_devices_text() -> list[str]:
    if not torch.cuda.is_available():
        why = "CPU build of torch" if torch.version.cuda is None else "no device visible to this CUDA build"
        return [f"no CUDA ({why})"]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i} {p.name}, capability {p.major}.{p.minor} (sm{p.major}{p.minor}), "
                     f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    return lines


def bf16_text() -> str:
    if torch.cuda.is_available():
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation argument
            native = torch.cuda.is_bf16_supported()
        return ("supported on CUDA: training autocasts to bf16 where the config says bf16: true" if native else
                "NOT supported natively by this GPU (needs sm80+): keep bf16: false")
    return "CPU: training runs fp32 (pipeline.device.autocast uses bf16 on CUDA only)"


def cpu_isa_text() -> str:
    """The instruction set torch's CPU kernels use, and whether pipeline.env capped it (portable bytes)."""
    active = torch.backends.cpu.get_cpu_capability()
    if env.cpu_isa_mode() == "native":
        why = f"native ({env.CPU_ISA_VAR}=native): bytes match only CPUs with the same kernels"
    elif os.environ.get("ATEN_CPU_CAPABILITY") == env.CPU_ISA_CAPS["ATEN_CPU_CAPABILITY"]:
        why = f"capped to AVX2 for the same bytes on any x86-64 machine ({env.CPU_ISA_VAR}=native lifts it)"
    else:
        why = "not capped (set before tokenmill loaded, or not x86-64)"
    return f"kernels {active}, {why}; this CPU offers {env.native_cpu_isa()}"


def faiss_text() -> str:
    try:
        import faiss
    except ImportError as exc:
        return f"not importable ({exc}): tokenize --search faiss is unavailable, torch lookup works"
    gpu = hasattr(faiss, "StandardGpuResources")
    dist = "faiss-gpu-cu12" if package_version("faiss-gpu-cu12") else "faiss-cpu" if package_version("faiss-cpu") \
        else "faiss"
    if gpu:
        return f"{faiss.__version__} GPU build ({dist}), {faiss.get_num_gpus()} GPU(s) visible"
    return f"{faiss.__version__} CPU build ({dist}): code search on CPU only"


def threads_text() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    return (f"torch {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op threads; "
            f"{usable} usable of {os.cpu_count()} cores; {env}; "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def attention_fallback_text(device_type: str, cuda_available: bool, xformers_reason: str) -> str:
    """The attention backend `models.attention` picks for tensors on `device_type`, and why (the fallback message)."""
    if device_type != "cuda":
        return "torch sdpa on CPU (xformers has no CPU kernels)"
    if not cuda_available:
        return "no CUDA: torch sdpa on CPU (xformers has no CPU kernels)"
    if xformers_reason == "loaded":
        return "xformers memory_efficient_attention on CUDA"
    return f"torch sdpa on CUDA: fallback, xformers unavailable ({xformers_reason})"


def attention_backend_text(device: torch.device | str | None = None) -> str:
    from models.attention import active_backend, xformers_status

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    active_backend(device)  # probes xformers once on CUDA, so xformers_status() has the answer
    return attention_fallback_text(device.type, torch.cuda.is_available(), xformers_status())


# ----------------------------------------------------------------------------------------- fMHA operators per shape

@dataclass
class ShapeProbe:
    name: str
    fw: dict[str, list[str]] = field(default_factory=dict)  # operator name -> reasons it cannot run ([] = usable)
    bw: dict[str, list[str]] = field(default_factory=dict)
    chosen: str = ""  # what xformers' dispatcher picks, "fw / bw"
    result: str = ""  # "fw+bw ran" or the first line of the error

    def line(self) -> str:
        fw = [n for n, r in self.fw.items() if not r]
        bw = [n for n, r in self.bw.items() if not r]
        if fw:
            text = f"fw {', '.join(fw)}; bw {', '.join(bw) or 'none'}"
            text += f"; dispatch {self.chosen}" if self.chosen else ""
        else:
            why = sorted({r for reasons in self.fw.values() for r in reasons})
            text = "no usable operator: " + "; ".join(why)
        return f"{self.name:<31} {text} -> {self.result}"


class _Recorder:
    """Stands in for the xformers.ops module inside models.attention for one call: records the exact inputs the
    project hands to memory_efficient_attention, then runs the real thing."""

    def __init__(self, xops) -> None:
        self._xops, self.inputs = xops, []

    def __getattr__(self, name: str):
        return getattr(self._xops, name)

    def memory_efficient_attention(self, q, k, v, attn_bias=None, p: float = 0.0):
        self.inputs.append(self._xops.fmha.Inputs(q, k, v, attn_bias=attn_bias, p=p))
        return self._xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=p)


def project_shapes(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[str], torch.Tensor]]:
    """name -> fn(backend) running that attention shape through the project's public functions (grad-enabled)."""
    from models.attention import attention, window_attention, ylg_attention, ylg_head_masks

    g = torch.Generator(device=device).manual_seed(0)
    n = GRID * GRID

    def qkv(m: int = n) -> list[torch.Tensor]:
        return [torch.randn(2, HEADS, s, HEAD_DIM, device=device, dtype=dtype, generator=g).requires_grad_()
                for s in (m, n, n)]

    rel_bias = torch.randn(HEADS, WINDOW * WINDOW, WINDOW * WINDOW, device=device, dtype=dtype, generator=g)
    ylg = ylg_head_masks(GRID, GRID, HEADS).to(device)
    return {
        "causal": lambda b: attention(*qkv(), causal=True, backend=b),
        "window bias": lambda b: window_attention(*qkv(), (GRID, GRID), WINDOW, shift=WINDOW // 2, bias=rel_bias,
                                                  backend=b),
        "YLG mask": lambda b: ylg_attention(*qkv(), ylg, backend=b),
        "KV cache (bottom-right causal)": lambda b: attention(*qkv(NEW_TOKENS), causal=True, backend=b),
    }


def _fmha_ops(fmha) -> tuple[list, list]:
    """The CUDA fMHA operator classes this xformers has (names differ between versions, so look them up)."""
    fw, bw = [], []
    for mod_name in ("flash3", "flash", "cutlass", "cutlass_blackwell"):
        mod = getattr(fmha, mod_name, None)
        for cls_name, out in (("FwOp", fw), ("BwOp", bw)):
            op = getattr(mod, cls_name, None)
            if op is not None:
                out.append(op)
    return fw, bw


def probe_fmha(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> list[ShapeProbe] | str:
    """Which fMHA operators can run each project shape; a one-line reason instead when there is nothing to probe."""
    import models.attention as attn

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA: every attention shape runs on torch sdpa"
    if xformers_folder() is None:
        return "xformers is not installed: every attention shape runs on torch sdpa"
    with _quiet_xformers():
        try:
            import xformers.ops as xops
        except Exception as exc:  # a broken install: the rest of the report still helps
            return f"xformers.ops does not import ({_innermost(exc)}): every attention shape runs on torch sdpa"
    attn.active_backend(device)  # probe once, so the module's own state is settled before we swap it
    fw_ops, bw_ops = _fmha_ops(xops.fmha)
    probes = []
    for name, run in project_shapes(device, dtype).items():
        recorder, saved = _Recorder(xops), attn._xformers_ops
        attn._xformers_ops = recorder  # models.attention calls recorder.memory_efficient_attention
        try:
            run("xformers").float().square().mean().backward()
            result = "fw+bw ran"
        except Exception as exc:
            result = f"failed: {_innermost(exc)}"
        finally:
            attn._xformers_ops = saved
        probe = ShapeProbe(name, result=result)
        if recorder.inputs:
            inp = recorder.inputs[0]
            probe.fw = {op.NAME: op.not_supported_reasons(inp) for op in fw_ops}
            probe.bw = {op.NAME: op.not_supported_reasons(inp) for op in bw_ops}
            try:
                chosen_fw = xops.fmha._dispatch_fw(inp, True).NAME
                chosen_bw = xops.fmha._dispatch_bw(inp, None).NAME
                probe.chosen = f"{chosen_fw} / {chosen_bw}"
            except Exception:  # private API or no operator: the usable lists above already say it
                pass
        probes.append(probe)
    return probes


# ----------------------------------------------------------------------------------------- the screen and the line

def report() -> list[str]:
    """The doctor's screen."""
    pair = installed_pair()
    loaded, detail = extension_status()
    lines = [
        "tokenmill doctor",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} ({torch_build_text()})",
    ]
    devices = cuda_devices_text()
    lines += [f"cuda        {devices[0]}"] + [f"            {d}" for d in devices[1:]]
    lines.append(f"bf16        {bf16_text()}")
    lines.append(f"cpu         {cpu_isa_text()}")
    xver = package_version("xformers")
    message = pair.message
    if pair.status == "mismatch" and loaded and pair.facts:  # an untested pair whose extension loaded all the same
        message = f"{pair.facts}; its extension loaded all the same (see `extension` and `fMHA`)"
    lines.append(f"xformers    {xver or 'not installed'}; pair check: {pair.status.upper()}: {message}")
    if loaded is not None:
        lines.append(f"extension   xformers C++/CUDA extension {detail}")
    lines.append(f"attention   {attention_backend_text()}")
    probes = probe_fmha()
    if isinstance(probes, str):
        lines.append(f"fMHA        {probes}")
    else:
        lines.append(f"fMHA        usable operators per project shape, bf16 ({GRID}x{GRID} grid, {HEADS} heads x "
                     f"{HEAD_DIM}):")
        lines += [f"  {p.line()}" for p in probes]
    lines.append(f"faiss       {faiss_text()}")
    lines.append(f"threads     {threads_text()}")
    return lines


def summary(device: torch.device | str | None = None) -> str:
    """One line for a stage's log: torch build, device, attention backend (and why), faiss, threads."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        where = f"{p.name} sm{p.major}{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    else:
        where = "no CUDA" if not torch.cuda.is_available() else "CPU (CUDA present)"
    faiss = "faiss gpu" if package_version("faiss-gpu-cu12") else "faiss cpu" if package_version("faiss-cpu") \
        else "no faiss"
    return (f"environment: torch {torch.__version__} ({torch_build_text()}) | {where} | attention "
            f"{attention_backend_text(device)} | xformers {package_version('xformers') or 'absent'} | {faiss} | "
            f"CPU kernels {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--pair", action="store_true", help="only the xformers/torch pair check (scripts/install.sh)")
    ap.add_argument("--require-cuda", action="store_true", help="with --pair: a CPU build of torch is an error too")
    args = ap.parse_args(argv)
    if not args.pair:
        print("\n".join(report()))
        return 0
    pair = installed_pair()
    loaded, detail = extension_status() if pair.status == "match" else (None, "")
    if pair.status == "match" and loaded is False:  # versions agree but the loader still refuses (e.g. no cudart)
        pair = PairCheck("mismatch", f"{pair.message}, yet its extension did not load ({detail}); {FIX}")
    bad = pair.status == "mismatch" or (args.require_cuda and pair.status != "match")
    message = pair.message
    if bad and pair.status in ("cpu", "missing"):  # install.sh asks so only where nvidia-smi saw a GPU
        message += f"; --require-cuda asks for the CUDA pair: {FIX}"
    print(f"{'error' if bad else 'xformers'}: {message}", file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
