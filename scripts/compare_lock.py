"""Compare the outputs recorded in two dvc.lock files, file by file where a folder's listing is in the DVC cache.

    python scripts/compare_lock.py OLD_LOCK [NEW_LOCK] [--cache .dvc/cache] [--ignore .tokenmill-stage]

For a folder out, DVC records the md5 of its listing (`<md5>.dir` in the cache: relpath + md5 per file). With
--ignore, the listing's hash is recomputed without those names, so a refactor that only adds a marker file can be
shown to leave every other byte as it was. A folder whose old listing is not in this cache is compared by that
recomputed hash alone. Prints one line per out: same, differs (with the files that differ where known), missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml


def outs(lock: Path) -> dict[str, dict]:
    spec = yaml.safe_load(lock.read_text())
    found = {}
    for body in spec.get("stages", {}).values():
        for out in body.get("outs", []):
            found[out["path"]] = out
    return found


def listing(cache: Path, md5: str) -> list[dict] | None:
    path = cache / "files" / "md5" / md5[:2] / md5[2:]
    return json.loads(path.read_text()) if path.is_file() else None


def dir_hash(entries: list[dict]) -> str:
    # DVC's folder hash: md5 of the JSON listing, sorted keys (checked against dvc.lock in this project)
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path, nargs="?", default=Path("dvc.lock"))
    ap.add_argument("--cache", type=Path, default=Path(".dvc/cache"))
    ap.add_argument("--ignore", action="append", default=[], help="file names left out of folder listings")
    args = ap.parse_args()
    old, new = outs(args.old), outs(args.new)
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a is None or b is None:
            print(f"{path}: only in the {'new' if a is None else 'old'} lock")
            continue
        if not b["md5"].endswith(".dir"):
            print(f"{path}: {'same' if a['md5'] == b['md5'] else 'differs'}")
            continue
        if a["md5"] == b["md5"]:
            print(f"{path}: same")
            continue
        entries = listing(args.cache, b["md5"])
        if entries is None:
            print(f"{path}: {'same' if a['md5'] == b['md5'] else 'differs'} (listing not in the cache)")
            continue
        kept = [e for e in entries if e["relpath"] not in args.ignore]
        if dir_hash(kept) == a["md5"]:
            ignoring = f"; ignoring {', '.join(args.ignore)})" if args.ignore else ")"
            print(f"{path}: same ({len(kept)} files" + ignoring)
            continue
        before = listing(args.cache, a["md5"])
        if before is None:
            print(f"{path}: differs ({len(kept)} files; the old listing is not in this cache)")
            continue
        old_files = {e["relpath"]: e["md5"] for e in before}
        new_files = {e["relpath"]: e["md5"] for e in kept}
        changed = sorted(k for k in old_files.keys() | new_files.keys() if old_files.get(k) != new_files.get(k))
        print(f"{path}: differs in {', '.join(changed)}")


if __name__ == "__main__":
    main()
