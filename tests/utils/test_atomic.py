"""The one atomic-write helper: complete-or-absent files and folders, with one permission policy."""

from __future__ import annotations

import os
import stat

import pytest

from diffusion_policy.utils.atomic import (
    atomic_write,
    atomic_write_dir,
    atomic_write_text,
    file_mode,
)
from diffusion_policy.utils.jsonl import read_jsonl


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_open_permissions_never_executable(tmp_path, umask):
    atomic_write_text(tmp_path / "a.json", "{}")
    with open(tmp_path / "plain", "w") as f:  # the reference: what open() makes
        f.write("x")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "plain") == 0o666 & ~umask
    assert file_mode() == 0o666 & ~umask
    assert not _mode(tmp_path / "a.json") & 0o111


def test_replay_buffer_store_files_follow_the_policy(tmp_path, umask, make_replay_buffer):
    store = make_replay_buffer((3, 4)).save(tmp_path / "s.zarr")
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files and {_mode(p) for p in files} == {0o666 & ~umask}
    assert _mode(store) == 0o777 & ~umask  # folders as mkdir makes them


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_failed_folder_write_keeps_the_previous_folder(tmp_path):
    path = tmp_path / "d"
    atomic_write_dir(path, lambda tmp: (tmp / "x").write_text("old"))

    def fail(tmp):
        (tmp / "x").write_text("new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_dir(path, fail)
    assert (path / "x").read_text() == "old" and os.listdir(tmp_path) == ["d"]
    atomic_write_dir(path, lambda tmp: (tmp / "y").write_text("new"))
    assert os.listdir(path) == ["y"] and os.listdir(tmp_path) == ["d"]


def test_read_jsonl_skips_partial_and_non_object_lines(tmp_path, caplog):
    path = tmp_path / "logs.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "logs.jsonl:2 is not a complete JSON record" in caplog.text
    assert "logs.jsonl:5 is not a complete JSON record" in caplog.text
