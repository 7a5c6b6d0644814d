"""Durable writes: atomic_dir keeps one whole copy through any crash, data reaches the disk before
the names and markers that vouch for it, file records catch changed files, a full disk is one line."""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import pytest

from pipeline import run_dir
from pipeline.errors import UserError
from pipeline.run_dir import atomic_dir, damaged_file, file_record, remove_stale_tmp, room_for


class FsyncLog:
    """What os.fsync was called on, in order, and the renames between (the real calls still run)."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        real_fsync = os.fsync

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def renaming(real):
            def rename(src, dst):
                self.events.append(("rename", str(dst)))
                return real(src, dst)
            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renaming(os.replace))
        monkeypatch.setattr(os, "rename", renaming(os.rename))

    def first(self, kind: str, ending: str) -> int:
        return next(i for i, (k, path) in enumerate(self.events) if k == kind and path.endswith(ending))


@pytest.fixture
def fsync_log(monkeypatch) -> FsyncLog:
    return FsyncLog(monkeypatch)


def _old_copy(final: Path) -> None:
    final.mkdir()
    (final / "a.txt").write_text("old")


def test_atomic_dir_flushes_files_before_the_rename_and_the_folder_after(tmp_path, fsync_log):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    rename = fsync_log.first("rename", "/out")
    assert fsync_log.first("fsync", "/a.txt") < rename
    assert ("fsync", str(tmp_path)) in fsync_log.events[rename:]
    assert (final / "a.txt").read_text() == "new"


def test_a_crash_between_atomic_dirs_renames_leaves_the_old_copy(tmp_path, monkeypatch):
    final = tmp_path / "out"
    _old_copy(final)
    real_replace = os.replace

    def crash_on_new_copy(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise KeyboardInterrupt  # killed after the old copy went aside, before the new came in
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_new_copy)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / ".out.aside" / "a.txt").read_text() == "old"  # never neither copy
    remove_stale_tmp(tmp_path)  # what a unit-wise stage's next run does first
    assert (final / "a.txt").read_text() == "old" and not (tmp_path / ".out.aside").exists()


def test_a_crash_before_the_old_copy_is_removed_keeps_the_new_one(tmp_path, monkeypatch):
    final = tmp_path / "out"
    _old_copy(final)
    real_rmtree = run_dir.shutil.rmtree

    def crash_on_aside(path, *args, **kwargs):
        if Path(path).name == ".out.aside":
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(run_dir.shutil, "rmtree", crash_on_aside)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.setattr(run_dir.shutil, "rmtree", real_rmtree)
    with atomic_dir(final) as tmp:  # the next writer settles it first
        assert (final / "a.txt").read_text() == "new" and not (tmp_path / ".out.aside").exists()
        (tmp / "a.txt").write_text("newer")
    assert (final / "a.txt").read_text() == "newer"


def test_atomic_write_flushes_the_folder_after_the_rename(tmp_path, fsync_log):
    run_dir.atomic_write_text(tmp_path / "m.json", "{}")
    assert fsync_log.first("rename", "/m.json") < fsync_log.events.index(("fsync", str(tmp_path)))


def test_file_records_catch_size_and_torn_tails(tmp_path):
    path = tmp_path / "big.bin"
    data = os.urandom(3 * run_dir.CHECKED_BYTES + 5)
    path.write_bytes(data)
    records = {"big.bin": file_record(path)}
    assert records["big.bin"]["bytes"] == len(data)
    assert damaged_file(records, tmp_path, tmp_path / "m") is None
    path.write_bytes(data[:-4096] + b"\0" * 4096)  # the NUL-filled tail a power loss leaves
    assert damaged_file(records, tmp_path, tmp_path / "m") == f"{path} does not match the checksum in " \
                                                              f"{tmp_path / 'm'}"
    path.write_bytes(data[:-10])
    assert f"{path} has {len(data) - 10} bytes, but" in damaged_file(records, tmp_path, tmp_path / "m")
    path.unlink()
    assert damaged_file(records, tmp_path, tmp_path / "m") == f"{path} is missing, but {tmp_path / 'm'} " \
                                                              "vouches for it"
    small = tmp_path / "s.txt"
    small.write_bytes(b"abc")
    assert file_record(small) == {"bytes": 3, "crc32": zlib.crc32(b"abc")}  # all of a small file


def test_a_full_disk_is_one_line_naming_the_path_and_the_space(tmp_path):
    target = tmp_path / "out" / "x.arrow"
    with pytest.raises(UserError) as caught, room_for(target, lambda: 5 * 2**20):
        raise OSError(errno.ENOSPC, "No space left on device")
    line = str(caught.value)
    assert line.startswith(f"{target}: no space left on device (") and "about 5.0 MiB needed" in line
    assert "\n" not in line
    with pytest.raises(OSError), room_for(target):  # other errors are not disk space
        raise OSError(errno.EIO, "I/O error")
