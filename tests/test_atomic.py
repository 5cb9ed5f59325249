import stat
from unittest import mock

import pytest

from hf_flag.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_text_replaces_keeps_line_endings_and_mode(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new\r\n", mode=0o640)
    assert target.read_bytes() == b"new\r\n"  # line endings written as given
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_bytes_replace_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "kept")
    with mock.patch("hf_flag.atomic.os.replace", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            atomic_write_text(target, "half")

    def broken(tmp):
        tmp.write_text("partial")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        atomic_write(target, broken)
    assert target.read_text() == "kept"  # the old file survives both failures
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left behind


def test_missing_folder_is_named_and_nothing_is_created(tmp_path):
    target = tmp_path / "absent" / "report.json"
    with pytest.raises(FileNotFoundError, match=r"report\.json'.*folder .*absent' does not exist"):
        atomic_write_text(target, "x")
    assert list(tmp_path.iterdir()) == []
