"""`python -m pipeline tokenize` (pipeline/retokenize.py): every mistake is one line and exit 2 before anything is
written, damaged inputs are skipped as prepare skips them, a second run into the same store stops at once, and
no path the command did not create is replaced (a user's file named as --metrics, a DVC-tracked store)."""
from __future__ import annotations

import fcntl
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import ROOT, files_under, make_bad_corpus, tiny_vqgan
from pipeline.cli import build_parser, main
from pipeline.retokenize import peek_images, tokenize_command
from pipeline.tokens import read_meta
from pipeline.vqgan_io import save_vqgan


@pytest.fixture(scope="module")
def vq(tmp_path_factory) -> dict[int, Path]:
    """Random-init VQGANs for 16x16 images: {channels: folder}."""
    base = tmp_path_factory.mktemp("vq")
    for ch in (1, 3):
        save_vqgan(base / f"vq{ch}", tiny_vqgan(in_channels=ch), {"resolution": 16})
    return {1: base / "vq1", 3: base / "vq3"}


def grey_folder(root: Path, n: int = 3, size: int = 16) -> Path:
    (root / "c").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size), 40 * i % 256, np.uint8), "L").save(root / "c" / f"img{i:03d}.png")
    return root


def tokenize(*args: str | Path) -> None:
    main(["tokenize", *map(str, args), "--num-workers", "0", "--batch-size", "8"])


def refused(capsys, *args: str | Path) -> str:
    """The one `error:` line of a refused run (after any progress bars), exit 2, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        tokenize(*args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


# ---------------------------------------------------------------- bug 1: --metrics

def test_metrics_never_replaces_a_file_it_did_not_write(vq, tmp_path, capsys):
    src = grey_folder(tmp_path / "imgs")
    image = src / "c" / "img000.png"
    (tmp_path / "mine.json").write_text('{"a": 1}\n')
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.json").mkdir()
    before = files_under(tmp_path)
    out = tmp_path / "o" / "g"
    for metrics, says in [(image, "must be a .json file"), (tmp_path / "adir", "must be a .json file"),
                          (tmp_path / "adir.json", "is a folder"), (tmp_path / "mine.json", "not a metrics file"),
                          (src / "m.json", "inside the source"), (vq[1] / "m.json", "inside the VQGAN folder"),
                          (out / "m.json", "inside the token store")]:
        line = refused(capsys, src, "--vqgan", vq[1], "--out", out, "--metrics", metrics)
        assert says in line and str(metrics) in line
    assert files_under(tmp_path) == before  # nothing written: no store, no work folder, no lock
    ok = tmp_path / "m" / "tok.json"
    tokenize(src, "--vqgan", vq[1], "--out", out, "--metrics", ok)
    assert set(json.loads(ok.read_text())) == {"images", "perplexity", "usage_pct"}
    tokenize(src, "--vqgan", vq[1], "--out", out, "--metrics", ok)  # its own file from before: replaced


# ---------------------------------------------------------------- bug 2: damaged inputs

def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_damaged_images_and_tars_are_skipped_as_prepare_skips_them(vq, tmp_path, capsys):
    expected = make_bad_corpus(tmp_path / "corpus")  # garbage, truncated PNG/JPEG, a 144-Mpixel bomb, ...
    out = tmp_path / "o" / "c"
    capsys.readouterr()
    tokenize(tmp_path / "corpus", "--vqgan", vq[1], "--out", out, "--convert-channels")
    kept = sum(v == "kept" for v in expected.values())
    assert sum(read_meta(out)["counts"].values()) == kept
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenize: skipped")]
    skipped = sum(v == "skipped" for v in expected.values())
    assert len(said) == 1 and said[0].startswith(f"tokenize: skipped {skipped} file(s) of {tmp_path / 'corpus'} ("), \
        (said, expected)
    shards = tmp_path / "wds"
    shards.mkdir()
    (shards / "a.tar").write_bytes(b"not a tar at all\n" * 40)  # sorted first: peek reads it first
    _tar(shards / "b.tar", {f"s{i}.png": _png(np.full((16, 16), i, np.uint8)) for i in range(3)})
    tokenize(shards, "--vqgan", vq[1], "--out", tmp_path / "o" / "w")
    assert sum(read_meta(tmp_path / "o" / "w")["counts"].values()) == 3
    assert peek_images(shards).skipped == {"unreadable tar": 1}


def test_a_source_with_no_usable_image_is_one_line(vq, tmp_path, capsys):
    bad = tmp_path / "bad" / "c"
    bad.mkdir(parents=True)
    (bad / "garbage.png").write_bytes(b"no image here")
    (bad / "cut.png").write_bytes(_png(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8))[:300])
    line = refused(capsys, bad.parent, "--vqgan", vq[1], "--out", tmp_path / "o" / "x")
    assert "no usable images" in line and "corrupt or truncated image x1" in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- bug 3: two runs, one store

def test_a_second_run_into_the_same_store_stops_before_the_prepare_step(vq, tmp_path, capsys):
    src = grey_folder(tmp_path / "imgs")
    out = tmp_path / "o" / "b"
    out.parent.mkdir()
    lock = out.parent / ".b.lock"
    with open(lock, "a+") as held:  # another process's run holds the store (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        line = refused(capsys, src, "--vqgan", vq[1], "--out", out)
        assert f"token store {out} is in use" in line
        assert sorted(p.name for p in out.parent.iterdir()) == [".b.lock"]  # no .b.prepared, no .b.partial
    lock.unlink()
    tokenize(src, "--vqgan", vq[1], "--out", out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]  # the lock it made is gone again


# ---------------------------------------------------------------- bug 4: a foreign or damaged VQGAN folder

@pytest.mark.parametrize("damage", ["foreign-config", "list-config", "zero-byte-weights", "truncated-weights",
                                    "no-weights"])
def test_a_foreign_or_damaged_vqgan_is_refused_before_any_work(vq, tmp_path, capsys, damage):
    folder = tmp_path / "vq"
    folder.mkdir()
    weights = (vq[1] / "model.safetensors").read_bytes()
    (folder / "config.json").write_bytes((vq[1] / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(weights)
    if damage == "foreign-config":
        (folder / "config.json").write_text('{"resolution": 16, "foo": 1}')
    elif damage == "list-config":
        (folder / "config.json").write_text("[1, 2]")
    elif damage == "no-weights":
        (folder / "model.safetensors").unlink()
    else:
        (folder / "model.safetensors").write_bytes(b"" if damage == "zero-byte-weights" else weights[:2000])
    line = refused(capsys, grey_folder(tmp_path / "imgs"), "--vqgan", folder, "--out", tmp_path / "o" / "a")
    assert str(folder / ("config.json" if "config" in damage else "model.safetensors")) in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- bug 5: --resolution

@pytest.mark.parametrize("value, says", [("7", "--resolution 7 differs from the VQGAN's training resolution 16"),
                                         ("0", "--resolution 0: must be a positive"),
                                         ("-3", "--resolution -3: must be a positive")])
def test_resolution_other_than_the_vqgans_is_refused_before_any_work(vq, tmp_path, capsys, value, says):
    line = refused(capsys, grey_folder(tmp_path / "imgs"), "--vqgan", vq[1], "--out", tmp_path / "o" / "a6",
                   "--resolution", value)
    assert says in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- bug 6: colour beyond the first images

def test_a_colour_image_after_the_first_64_is_refused_for_a_grey_vqgan(vq, tmp_path, capsys):
    src = grey_folder(tmp_path / "imgs", n=70)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # red: sorted after every grey image
    Image.fromarray(rgb, "RGB").save(src / "c" / "zz_red.png")
    out = tmp_path / "o" / "g"
    line = refused(capsys, src, "--vqgan", vq[1], "--out", out)
    assert "1 colour image(s) (the first: " in line and "zz_red.png" in line and "--convert-channels" in line
    assert not out.parent.exists()  # the work folder, the lock and the folder it made for them: all gone
    tokenize(src, "--vqgan", vq[1], "--out", out, "--convert-channels")
    assert "1 colour image(s) made grey" in capsys.readouterr().err
    assert sum(read_meta(out)["counts"].values()) == 71


# ---------------------------------------------------------------- bug 7: the store's name

def test_store_name_is_name_else_the_out_folder_else_the_source_folder(vq, tmp_path, capsys):
    src = grey_folder(tmp_path / "with space é")
    tokenize(src, "--vqgan", vq[1], "--out", tmp_path / "o" / "ws")
    assert read_meta(tmp_path / "o" / "ws")["dataset"] == "ws"
    tokenize(src, "--vqgan", vq[1], "--out", tmp_path / "o" / "ws2", "--name", "foo")
    assert read_meta(tmp_path / "o" / "ws2")["dataset"] == "foo"
    assert "store name 'bad name' (the name of" in refused(capsys, src, "--vqgan", vq[1], "--out",
                                                             tmp_path / "o" / "bad name")
    assert "--name 'a b'" in refused(capsys, src, "--vqgan", vq[1], "--out", tmp_path / "o" / "x", "--name", "a b")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ws", "ws2"]


# ---------------------------------------------------------------- bug 8: output paths

def test_unusable_output_paths_are_one_line(vq, tmp_path, capsys):
    src = grey_folder(tmp_path / "imgs")
    (tmp_path / "x.txt").write_text("a file")
    assert f"{tmp_path / 'x.txt'} is not a folder" in refused(capsys, src, "--vqgan", vq[1], "--out",
                                                              tmp_path / "x.txt" / "sub")
    assert "--out '': empty" in refused(capsys, src, "--vqgan", vq[1], "--out", "")
    assert "overlaps the source" in refused(capsys, src, "--vqgan", vq[1], "--out", src / "tok")
    if Path("/proc/self").is_dir():
        assert "cannot write in /proc" in refused(capsys, src, "--vqgan", vq[1], "--out", "/proc/x")
    assert (tmp_path / "x.txt").read_text() == "a file"


# ---------------------------------------------------------------- bug 9: DVC-tracked stores

def test_a_dvc_tracked_store_is_never_replaced(vq, tmp_path, capsys):
    """`pipeline tokenize data/prepared/a` with another VQGAN used to replace data/tokens/a (its default --out),
    which dvc.lock records as tokenize@a's output."""
    root = tmp_path / "project"
    src = grey_folder(tmp_path / "imgs")
    tokenize(src, "--vqgan", vq[3], "--out", root / "data" / "tokens" / "a", "--convert-channels", "--name", "a")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the project's own, with a dataset `a`
    params["datasets"] = {"a": {**params["datasets"]["fashion_mnist"], "path": str(src)}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (root / "dvc.lock").write_text(yaml.safe_dump({"stages": {"tokenize@a": {"outs": [{"path": "data/tokens/a"}]}}}))
    before = files_under(root)
    for extra in ([], ["--out", str(root / "data" / "tokens" / "a")],
                  ["--out", str(tmp_path / "elsewhere"), "--metrics", str(root / "data/metrics/tokenize_a.json")]):
        args = build_parser().parse_args(["tokenize", str(src), "--vqgan", str(vq[1]), "--name", "a",
                                          "--num-workers", "0", *extra])
        with pytest.raises(Exception) as e:
            tokenize_command(args, root)
        assert "is the pipeline's output of tokenize@a (tracked by DVC)" in str(e.value)
    assert files_under(root) == before
    args = build_parser().parse_args(["tokenize", str(src), "--vqgan", str(vq[1]), "--name", "b",
                                      "--num-workers", "0"])
    tokenize_command(args, root)  # another name: an untracked store under data/tokens
    assert read_meta(root / "data" / "tokens" / "b")["dataset"] == "b"


def test_store_lock_nests_only_when_asked_and_remove_leaves_no_file(tmp_path):
    from pipeline.errors import UserError
    from pipeline.locks import exclusive

    lock = tmp_path / ".s.lock"
    with exclusive(lock, "store", remove=True, nested=True):
        with exclusive(lock, "store"):  # the stage inside the command: no second flock, no refusal
            pass
        assert lock.exists()
    assert not lock.exists()
    with exclusive(lock, "store"):
        with pytest.raises(UserError, match="store is in use"):  # not nested: refused in this process too
            with exclusive(lock, "store"):
                pass
    assert lock.exists()  # without remove=True it stays, as the DVC stage's lock always did
    with exclusive(lock, "store", remove=True):
        pass
    assert not lock.exists()  # one a killed run left goes too


def test_an_earlier_store_holding_the_users_files_is_not_replaced(vq, tmp_path, capsys):
    src, out = grey_folder(tmp_path / "imgs"), tmp_path / "o" / "s"
    tokenize(src, "--vqgan", vq[1], "--out", out)
    tokenize(src, "--vqgan", vq[1], "--out", out)  # its own earlier store: replaced
    (out / "mine").mkdir()
    (out / "mine" / "r.txt").write_text("precious")
    line = refused(capsys, src, "--vqgan", vq[1], "--out", out)
    assert line == (f"error: --out {out}: holds files added or edited after tokenize wrote it, which a new store "
                    f"would replace; move them out or choose another --out")
    assert (out / "mine" / "r.txt").read_text() == "precious"
