"""bench/offline_kit.py: wheels packed into size-capped bins (a wheel larger than a bin split into parts) come back
whole, hash-checked and installed; an incomplete or damaged kit is reported and installs nothing half-made."""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import load_bench

kit = load_bench("offline_kit")
KIB = 1024


def make_wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A minimal pure-Python wheel: package `name` whose data.bin holds `payload` (stored, so its size is the
    wheel's size)."""
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/data.bin": payload,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join(record + [f"{dist}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "bigpkg", os.urandom(250 * KIB))   # larger than a 100 KiB bin: three parts
    make_wheel(folder, "smallpkg", os.urandom(30 * KIB))
    make_wheel(folder, "tinypkg", os.urandom(2 * KIB))
    return folder


def test_plan_bins_splits_and_fills_first_fit():
    bins = kit.plan_bins({"a": 250, "b": 30, "c": 60}, capacity=100)
    assert all(sum(length for _, _, length in b) <= 100 for b in bins)
    # first-fit in decreasing size: a's two full parts fill a bin each, c (60) opens a third, a's last part (50) does
    # not fit beside c and opens a fourth, b (30) joins c
    assert [[(n, o) for n, o, _ in b] for b in bins] == [[("a", 0)], [("a", 100)], [("c", 0), ("b", 0)], [("a", 200)]]
    assert sorted(o for b in bins for n, o, _ in b if n == "a") == [0, 100, 200]


def test_pack_then_unpack_round_trip(tmp_path, wheels):
    bins = kit.pack(tmp_path / "kit", "3.11", 100 / 1024, wheels=wheels)
    for b in bins:
        assert sum(f.stat().st_size for f in b.iterdir() if f.name != kit.MANIFEST) <= 100 * KIB
    parts = sorted(f.name for b in bins for f in b.iterdir() if f.name.startswith("bigpkg"))
    assert parts == [f"bigpkg-1.0-py3-none-any.whl.part{i:02d}of03" for i in range(3)]
    installed, missing = kit.unpack(tmp_path / "site", bins)
    assert missing == [] and len(installed) == 3
    for name in ("bigpkg", "smallpkg", "tinypkg"):
        original = zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl").read(f"{name}/data.bin")
        assert (tmp_path / "site" / name / "data.bin").read_bytes() == original
    env = (tmp_path / "site" / "env.sh").read_text()
    assert f'PYTHONPATH="{tmp_path / "site"}' in env and "nvidia/cuda_runtime/lib" in env


def test_unpack_installs_only_complete_wheels(tmp_path, wheels):
    bins = kit.pack(tmp_path / "kit", "3.11", 100 / 1024, wheels=wheels)
    without_first = [b for b in bins if not any(f.name.endswith("part00of03") for f in b.iterdir())]
    installed, missing = kit.unpack(tmp_path / "site", without_first)
    assert missing == ["bigpkg-1.0-py3-none-any.whl (2 of 3 parts)"]
    assert not (tmp_path / "site" / "bigpkg").exists()
    assert sorted(installed) == ["smallpkg-1.0-py3-none-any.whl", "tinypkg-1.0-py3-none-any.whl"]


def test_a_damaged_part_is_an_error(tmp_path, wheels):
    bins = kit.pack(tmp_path / "kit", "3.11", 100 / 1024, wheels=wheels)
    part = next(f for b in bins for f in b.iterdir() if f.name.endswith("part01of03"))
    data = bytearray(part.read_bytes())
    data[1000] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(kit.KitError, match="bigpkg-1.0-py3-none-any.whl: joined parts do not match"):
        kit.unpack(tmp_path / "site", bins)
    assert not (tmp_path / "site").exists()


def test_cli_refuses_without_writing(tmp_path, wheels):
    script = Path(kit.__file__)
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "mine.txt").write_text("keep")
    r = subprocess.run([sys.executable, str(script), "pack", str(tmp_path / "kit"), "--wheels", str(wheels)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"offline_kit: error: {tmp_path / 'kit'}: exists; pack writes a new folder only"
    assert [p.name for p in (tmp_path / "kit").iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".kit")] == []
    r = subprocess.run([sys.executable, str(script), "unpack", str(tmp_path / "site"), str(wheels)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no MANIFEST.json" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "site").exists()
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(kit.KitError, match="a_file: exists and is not a folder"):
        kit.unpack(tmp_path / "a_file", [wheels])
    with pytest.raises(kit.KitError, match="--bin-mib must be positive, got 0"):
        kit.pack(tmp_path / "kit2", "3.11", 0)  # refused before any download
    assert (tmp_path / "a_file").read_text() == "keep" and not (tmp_path / "kit2").exists()
