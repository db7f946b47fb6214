"""Bad inputs, end to end: every input of the corpus (tests/corpus/) goes through the command a user would run, and
each must give what tests/corpus/expected.json says: a kept (maybe converted) or skipped image with its reason, a
refused tar member, a one-line `error:` with exit status 2, or a warning and a fallback. Never a traceback.

Inputs: the corpus images (+ a generated decompression bomb) and a hostile WebDataset source through `prepare`; an
empty dataset, a missing path and a truncated IDX file; params edits and broken YAML through `python -m pipeline
check`; token stores that are zero bytes, not LMDB, truncated, or from another codebook through `train_transformer`;
a too-small LMDB map ceiling and a VQGAN folder of another program through `tokenize`; a truncated and a zero-byte
checkpoint through `train_transformer`; a read-only output folder through `prepare`. The token-store cases need a
small VQGAN and store: trained here on the tiny preset (configs/tiny.yaml), about a minute.

  python scripts/bad_inputs.py                  # prints one line per input and the totals
  python scripts/bad_inputs.py --json out.json
Exit status 0 when every input gave its expected outcome and none a traceback.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "corpus"))

import yaml  # noqa: E402
from make_corpus import generated_inputs  # noqa: E402

from pipeline.run_checks import preset_overrides  # noqa: E402
from pipeline.config import apply_overrides, load_params  # noqa: E402
from pipeline.sandbox import fashion_mnist_subset, read_only_prefix  # noqa: E402

CORPUS = ROOT / "tests" / "corpus"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


class Sweep:
    def __init__(self, work: Path):
        self.work = work
        self.results: list[dict] = []

    def record(self, category: str, item: str, expected: str, outcome: str, ok: bool, detail: str = "") -> None:
        self.results.append({"category": category, "input": item, "expected": expected, "outcome": outcome,
                             "ok": ok, "detail": detail})
        print(f"{'ok ' if ok else 'BAD'} {category:<12} {item:<28} {outcome:<22} {detail[:110]}", flush=True)

    def params(self, overrides: list[str], name: str) -> Path:
        """The repo's params with the tiny preset, paths under the work folder, and `overrides`."""
        base = apply_overrides(load_params(ROOT / "params.yaml"), preset_overrides(str(ROOT / "configs/tiny.yaml")))
        for section in base.values():  # every output under the work folder
            if isinstance(section, dict):
                for key, value in list(section.items()):
                    if isinstance(value, str) and value.startswith("data/"):
                        section[key] = str(self.work / value)
        path = self.work / f"params-{name}.yaml"
        path.write_text(yaml.safe_dump(apply_overrides(base, overrides), sort_keys=False))
        return path

    def run(self, args: list[str], prefix: list[str] | None = None) -> tuple[int, str]:
        proc = subprocess.run((prefix or []) + [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                              text=True)
        return proc.returncode, proc.stderr

    def expect_error(self, category: str, item: str, args: list[str], needle: str,
                     prefix: list[str] | None = None) -> None:
        """The command must exit 2 with a last stderr line `error: ...` containing `needle`, and no traceback."""
        rc, err = self.run(args, prefix)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        traceback = "Traceback" in err
        ok = rc == 2 and last.startswith("error: ") and needle in last and not traceback
        outcome = "traceback" if traceback else f"one-line error (exit {rc})" if last.startswith("error: ") \
            else f"exit {rc}"
        self.record(category, item, "one-line error", outcome, ok, last)

    def expect_success(self, args: list[str], what: str) -> str:
        rc, err = self.run(args)
        if rc != 0:
            raise SystemExit(f"{what} failed (exit {rc}):\n{err[-3000:]}")
        return err


def images(s: Sweep) -> None:
    expected = json.loads((CORPUS / "expected.json").read_text())
    folder = s.work / "images"
    shutil.copytree(CORPUS / "images", folder)
    shutil.copy2(generated_inputs(s.work / "generated")["bomb"], folder / "things" / "bomb.png")
    p = s.params(["datasets={}", "datasets.things.source=folder", f"datasets.things.path={folder}",
                  "datasets.things.resolution=16", "datasets.things.channels=3", "datasets.things.split=random",
                  "datasets.things.val_fraction=0.0"], "images")
    s.expect_success(["-m", "stages.prepare", "--dataset", "things", "--params", str(p)], "prepare of the images")
    report = json.loads((s.work / "data/prepared/things/report.json").read_text())
    skipped = {Path(x["origin"]).name: x["reason"] for x in report["skipped"]}
    for name, want in sorted(expected["images"].items()):
        got = "skipped" if name in skipped else "kept"
        s.record("image", name, want, got, got == want, skipped.get(name, ""))

    p = s.params(["datasets={}", "datasets.wds.source=webdataset", f"datasets.wds.path={CORPUS / 'webdataset'}",
                  "datasets.wds.resolution=16"], "wds")
    s.expect_success(["-m", "stages.prepare", "--dataset", "wds", "--params", str(p)], "prepare of the tars")
    report = json.loads((s.work / "data/prepared/wds/report.json").read_text())
    refused = {x["origin"].split(":", 1)[-1]: x["reason"] for x in report["skipped"] if "refused" in x["reason"]}
    for name, want in sorted(expected["webdataset"].items()):
        hit = next((r for o, r in refused.items() if o.endswith(name)), None)
        got = "refused" if hit else "kept"
        outside = name.startswith(("/", "..")) and ((s.work / "data/prepared" / name).resolve().exists()
                                                    or Path("/abs.png").exists())
        s.record("tar member", name, want, got + (" (WRITTEN OUTSIDE)" if outside else ""),
                 got == want and not outside, hit or "")


def datasets(s: Sweep) -> None:
    empty = generated_inputs(s.work / "generated")["empty"]
    p = s.params(["datasets={}", "datasets.e.source=folder", f"datasets.e.path={empty}", "datasets.e.split=random"],
                 "empty")
    s.expect_error("dataset", "empty folder", ["-m", "stages.prepare", "--dataset", "e", "--params", str(p)],
                   "no usable images")
    p = s.params(["datasets={}", "datasets.m.source=folder", f"datasets.m.path={s.work / 'nowhere'}"], "missing")
    s.expect_error("dataset", "missing path", ["-m", "stages.prepare", "--dataset", "m", "--params", str(p)],
                   "does not exist")
    idx = fashion_mnist_subset(s.work / "idx_bad", 20, 5)
    images_file = idx / "train-images-idx3-ubyte.gz"
    images_file.write_bytes(gzip.compress(gzip.decompress(images_file.read_bytes())[:-100], mtime=0))
    p = s.params(["datasets={}", "datasets.t.source=idx", f"datasets.t.path={idx}"], "idx")
    s.expect_error("dataset", "truncated IDX file", ["-m", "stages.prepare", "--dataset", "t", "--params", str(p)],
                   "IDX body has")


def params(s: Sweep) -> None:
    expected = json.loads((CORPUS / "expected.json").read_text())["params"]
    for name, case in sorted(expected.items()):
        base = load_params(ROOT / "params.yaml")
        if case["edit"].startswith("-"):
            base.pop(case["edit"][1:])
            text = yaml.safe_dump(base, sort_keys=False)
        else:
            text = yaml.safe_dump(apply_overrides(base, [case["edit"]]), sort_keys=False)
        path = s.work / f"bad-params-{name.replace(' ', '_')}.yaml"
        path.write_text(text)
        s.expect_error("params", name, ["-m", "pipeline", "check", "--params", str(path)], case["error"])
    path = s.work / "broken.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + "\nprepare: [unclosed\n")
    s.expect_error("params", "broken YAML", ["-m", "pipeline", "check", "--params", str(path)], "line")


def stores_and_checkpoints(s: Sweep) -> None:
    """A small real run (prepare, train_vqgan, tokenize, train_transformer), then damaged copies of its files."""
    data = fashion_mnist_subset(s.work / "idx", 300, 60)
    ds = [f"datasets.fashion_mnist.path={data}"]
    p = s.params(ds, "run")
    s.expect_success(["-m", "stages.prepare", "--dataset", "fashion_mnist", "--params", str(p)], "prepare")
    s.expect_success(["-m", "stages.train_vqgan", "--params", str(p)], "train_vqgan")
    s.expect_success(["-m", "stages.tokenize", "--dataset", "fashion_mnist", "--params", str(p)], "tokenize")
    tokens = s.work / "data/tokens/fashion_mnist"
    for damage in ("zero-byte", "not-lmdb", "truncated"):
        bad = s.work / f"tokens-{damage}" / "fashion_mnist"
        shutil.copytree(tokens, bad)
        raw = (bad / "tokens.lmdb").read_bytes()
        (bad / "tokens.lmdb").write_bytes({"zero-byte": b"", "not-lmdb": b"junk\n" * 4096,
                                           "truncated": raw[: len(raw) // 2]}[damage])
        q = s.params(ds + [f"train_transformer.tokens_dir={bad.parent}"], f"store-{damage}")
        s.expect_error("token store", f"{damage} LMDB", ["-m", "stages.train_transformer", "--params", str(q)],
                       "tokens.lmdb")
    other = s.params(ds + ["train_vqgan.seed=1", "train_vqgan.steps=10", f"train_vqgan.out_dir={s.work}/vqgan-other",
                           f"train_vqgan.ckpt_dir={s.work}/ckpt-other"], "other-vqgan")
    s.expect_success(["-m", "stages.train_vqgan", "--params", str(other)], "train_vqgan (another codebook)")
    q = s.params(ds + [f"train_transformer.vqgan_dir={s.work}/vqgan-other"], "foreign")
    s.expect_error("token store", "store of another codebook", ["-m", "stages.train_transformer", "--params", str(q)],
                   "codebook")
    q = s.params(ds + ["tokenize.max_map_mb=0.01", f"tokenize.out_dir={s.work}/tokens-ceiling"], "ceiling")
    s.expect_error("resource", "LMDB map ceiling too small",
                   ["-m", "stages.tokenize", "--dataset", "fashion_mnist", "--params", str(q)], "LMDB map is full")
    foreign = s.work / "vqgan-foreign"  # re-tokenizing with a folder that holds another program's model
    shutil.copytree(s.work / "data/vqgan", foreign)
    (foreign / "config.json").write_text('{"architectures": ["BertModel"], "hidden_size": 768}\n')
    q = s.params(ds + [f"tokenize.vqgan_dir={foreign}", f"tokenize.out_dir={s.work}/tokens-foreign"], "foreign-vq")
    s.expect_error("vqgan", "foreign VQGAN folder",
                   ["-m", "stages.tokenize", "--dataset", "fashion_mnist", "--params", str(q)],
                   f"{foreign}/config.json: not a tokenmill VQGAN config")

    s.expect_success(["-m", "stages.train_transformer", "--params", str(p)], "train_transformer")
    last = s.work / "data/checkpoints/train_transformer/last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a write cut short (last.pt is a hard link: the step file too)
    rc, err = s.run(["-m", "stages.train_transformer", "--params", str(p)])
    warned = "last.pt is unreadable" in err
    s.record("checkpoint", "truncated last.pt", "warning + fallback",
             f"exit {rc}" + (", warned" if warned else ""), rc == 0 and warned and "Traceback" not in err,
             next((x for x in err.splitlines() if "unreadable" in x), "")[-110:])
    last.write_bytes(b"")  # a checkpoint cut to nothing (torch's EOFError has no message)
    rc, err = s.run(["-m", "stages.train_transformer", "--params", str(p)])
    warned = "last.pt is unreadable (EOFError)" in err
    s.record("checkpoint", "zero-byte last.pt", "warning + fallback",
             f"exit {rc}" + (", warned" if warned else ""), rc == 0 and warned and "Traceback" not in err,
             next((x for x in err.splitlines() if "unreadable" in x), "")[-110:])

    out = s.work / "data/prepared"
    prefix = read_only_prefix(out)
    if prefix is None:
        s.record("resource", "read-only output folder", "one-line error", "not run", True,
                 "cannot make a read-only folder here (root without mount namespaces)")
        return
    q = s.params(ds + ["datasets.fashion_mnist.resolution=20"], "readonly")
    try:
        s.expect_error("resource", "read-only output folder",
                       ["-m", "stages.prepare", "--dataset", "fashion_mnist", "--params", str(q)], str(out), prefix)
    finally:
        out.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="work folder (default: a temp folder, removed afterwards)")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bad_inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    s = Sweep(work)
    try:
        for part in (images, datasets, params, stores_and_checkpoints):
            part(s)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"inputs": len(s.results), "as_expected": sum(r["ok"] for r in s.results),
               "tracebacks": sum(r["outcome"] == "traceback" for r in s.results),
               "by_outcome": {}, "seconds": round(time.monotonic() - t0)}
    for r in s.results:
        summary["by_outcome"][r["outcome"]] = summary["by_outcome"].get(r["outcome"], 0) + 1
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "results": s.results}, indent=2) + "\n")
    return 0 if summary["as_expected"] == summary["inputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
