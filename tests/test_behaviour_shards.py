"""WebDataset shards (pipeline/shards.py) read back byte by byte: the writer's fixed member metadata (what makes the
same samples the same tar on any machine), its key rules, abort-then-continue, and the reader's grouping and
refusals."""
from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.shards import ShardWriter, iter_tar_samples


def test_members_carry_fixed_metadata_in_ustar_format(tmp_path):
    with ShardWriter(tmp_path, "s", maxcount=10) as w:
        w.write("k0", {"png": b"\x89PNG", "cls": b"3"})
    raw = (tmp_path / "s-000000.tar").read_bytes()
    assert raw[257:265] == b"ustar\x0000"  # POSIX ustar magic + version (GNU tar writes "ustar  \0")
    with tarfile.open(tmp_path / "s-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["k0.cls", "k0.png"]  # extensions in sorted order
    for m in members:
        assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o644, 0, 0, "", "")


@pytest.mark.parametrize("key", ["a.b", "a/b", ""])
def test_keys_with_a_dot_or_slash_or_empty_are_refused(tmp_path, key):
    with ShardWriter(tmp_path, "s", maxcount=10) as w:
        with pytest.raises(ValueError) as err:
            w.write(key, {"png": b"x"})
    assert str(err.value) == f"sample key {key!r} must be non-empty without '.' or '/'"


def test_abort_drops_the_open_shard_and_the_writer_goes_on(tmp_path):
    w = ShardWriter(tmp_path, "s", maxcount=2)
    w.write("a", {"cls": b"1"})
    w.write("b", {"cls": b"2"})  # first shard complete
    w.write("c", {"cls": b"3"})
    w.abort()  # the half-filled second shard is dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar"]
    w.write("d", {"cls": b"4"})
    w.close()
    assert w.shards == ["s-000000.tar", "s-000001.tar"] and w.sizes == [2, 1]
    assert [k for k, _, _ in iter_tar_samples(tmp_path / "s-000001.tar")] == ["d"]


def _tar_with(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))


def test_reader_groups_by_key_and_reports_members_it_refuses(tmp_path):
    path = tmp_path / "t.tar"
    _tar_with(path, ["a.png", "a.cls", "README", "b.PNG", "dir\\evil.png", "c.png"])
    got = list(iter_tar_samples(path))
    assert [(k, sorted(f)) for k, f, _ in got] == [("a", ["cls", "png"]), ("b", ["png"]), ("c", ["png"])]
    # a member without an extension does not end the archive, and each refusal travels with the sample it follows
    assert got[0][2] == ["README: no extension, not part of a sample"]
    assert got[1][2] == ["dir\\evil.png: refused tar member (link, absolute or '..' name)"]


def test_directory_entries_are_passed_over_not_reported(tmp_path):
    """`tar cf x.tar folder/` writes an entry per directory: no data, nothing refused, the samples inside kept."""
    src = tmp_path / "folder" / "sub"
    src.mkdir(parents=True)
    (src / "a.png").write_bytes(b"p")
    (src / "a.cls").write_bytes(b"3")
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(tmp_path / "folder", arcname="folder")  # recursive: folder, folder/sub, then the files
    assert [m.isdir() for m in tarfile.open(path)].count(True) == 2
    assert list(iter_tar_samples(path)) == [("folder/sub/a", {"cls": b"3", "png": b"p"}, [])]


def test_a_second_member_of_the_same_name_is_reported_and_the_first_kept(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", b"1"), ("a.png", b"2"), ("a.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (key, files, problems), = iter_tar_samples(path)
    assert key == "a" and files == {"png": b"1", "cls": b"0"}
    assert problems == ["a.png: duplicate member name, the sample's first one is kept"]


def test_the_key_ends_at_the_first_dot_of_the_base_name(tmp_path):
    path = tmp_path / "t.tar"
    _tar_with(path, ["d.v2/photo.2023.00.png", "d.v2/photo.2023.01.png", "pair0.jpg", "pair0.png"])
    got = [(k, list(f)) for k, f, _ in iter_tar_samples(path)]
    assert got == [("d.v2/photo", ["2023.00.png", "2023.01.png"]), ("pair0", ["jpg", "png"])]
