"""Read prepared image shards (data/prepared/<dataset>/) with random access.

The tar headers are scanned once to index where each sample's PNG and label sit; `__getitem__` then seeks
straight to them, so any sample order (a seeded permutation, an exact resume position) costs no streaming.
File handles are opened lazily per process, so DataLoader workers never share one across fork.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipeline.atomic import read_json
from pipeline.errors import UserError, first_line
from pipeline.images import decode_png
from pipeline.shards import safe_member


@dataclass(frozen=True)
class Entry:
    shard: int
    key: str
    png: tuple[int, int]  # (offset, size) in the tar
    label: int


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; run the prepare stage for this dataset first")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{path}: no `splits` mapping, so not a manifest the prepare stage wrote; run it again")
    return manifest


def _label(raw: bytes, shard: Path, member: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{shard}: {member} holds {raw[:20]!r}, not a class index; the prepared dataset is damaged: "
                        f"run its prepare stage again") from None


class PreparedImages(Dataset):
    """One split of a prepared dataset: item i -> (uint8 tensor [C, H, W], label)."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.root}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        self.shards = [self.root / s for s in self.manifest["splits"][split]["shards"]]
        self.entries = self._index(self.manifest["splits"][split].get("shard_sizes"))
        self._files: dict[int, object] = {}
        self._pid = None

    def _index(self, sizes: list[int] | None) -> list[Entry]:
        """Every sample with a PNG, shard by shard; with `sizes` (the manifest's images per shard) a shard holding
        another number is refused: tarfile ends an archive quietly at a damaged header after the first, so a
        damaged shard would otherwise lose its remaining images without a word."""
        entries = []
        for si, shard in enumerate(self.shards):
            pending: dict[str, dict] = {}
            try:  # "r:", not "r:*": the PNGs are read by offset, so a compressed shard must be refused, not inflated
                with tarfile.open(shard, "r:") as tar:
                    for m in tar:
                        if not safe_member(m) or "." not in m.name:
                            continue
                        key, ext = m.name.split(".", 1)  # WebDataset's rule: the key ends at the first dot
                        rec = pending.setdefault(key, {})
                        if ext == "png":
                            rec["png"] = (m.offset_data, m.size)
                        elif ext == "cls":
                            rec["cls"] = _label(tar.extractfile(m).read(), shard, m.name)
            except tarfile.TarError as exc:
                raise UserError(f"{shard}: not a readable uncompressed tar ({first_line(exc)}); the prepared dataset "
                                f"is damaged: run its prepare stage again") from None
            found = [Entry(si, k, r["png"], r.get("cls", 0)) for k, r in pending.items() if "png" in r]
            if sizes is not None and (si >= len(sizes) or len(found) != sizes[si]):
                said = sizes[si] if si < len(sizes) else "nothing about it"
                raise UserError(f"{shard}: {len(found)} image(s), but {self.root / 'manifest.json'} says {said}; the "
                                f"prepared dataset is damaged: run its prepare stage again")
            entries += found
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def _file(self, shard: int):
        import os
        if self._pid != os.getpid():  # new worker process: never reuse the parent's handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")
        return self._files[shard]

    def read_png(self, i: int) -> bytes:
        e = self.entries[i]
        fh = self._file(e.shard)
        fh.seek(e.png[0])
        return fh.read(e.png[1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = decode_png(self.read_png(i))
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), self.entries[i].label

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image as one uint8 tensor [N, C, H, W] plus labels [N] (for small datasets)."""
        m = self.manifest
        out = torch.empty((len(self), m["channels"], m["resolution"], m["resolution"]), dtype=torch.uint8)
        for i in range(len(self)):
            out[i] = self[i][0]
        return out, torch.tensor([e.label for e in self.entries], dtype=torch.long)

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]
