"""Disk faults (ENOSPC, EDQUOT, EROFS): recognised wherever they are wrapped, said in words, re-checked."""

import errno

import pytest
from smallfs import remount, small_filesystem

from orchestrator.diskfault import DiskFault, DiskWatch, check, disk_fault, human, reason


def torch_like(inner: BaseException) -> RuntimeError:
    """What torch.save raises on a full disk: a RuntimeError whose context is the write's OSError."""
    try:
        try:
            raise inner
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 470144 vs 470032")  # noqa: B904 - as torch does
    except RuntimeError as e:
        return e


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_disk_fault_is_found_however_it_is_wrapped(code):
    inner = OSError(code, "x", "/r/k/checkpoint.pt")
    assert disk_fault(inner) == DiskFault(code, "/r/k/checkpoint.pt")
    assert disk_fault(torch_like(inner)) == DiskFault(code, "/r/k/checkpoint.pt")


@pytest.mark.parametrize("e", [OSError(errno.EIO, "Input/output error"), RuntimeError("no"), ValueError(),
                               torch_like(OSError(errno.EACCES, "Permission denied", "/r"))])
def test_other_errors_are_not_disk_faults(e):
    assert disk_fault(e) is None


def test_the_reason_of_a_failure_names_errno_and_path_not_torch_internals():
    assert reason(torch_like(OSError(errno.EIO, "Input/output error", "/r/k/checkpoint.pt"))) == (
        "EIO Input/output error: /r/k/checkpoint.pt")
    assert reason(OSError(errno.ENOSPC, "No space left on device")) == "ENOSPC No space left on device"
    assert reason(ValueError("bad")) == "ValueError: bad"


def test_human_sizes():
    assert [human(n) for n in (0, 1023, 1536, 3 * 2**20, 5 * 2**30)] == [
        "0 bytes", "1023 bytes", "1.5 KB", "3.0 MB", "5.0 GB"]


def test_a_full_and_a_read_only_folder_are_seen_and_said(tmp_path):
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        assert check(disk, write=True) is None
        (disk / "filler").write_bytes(b"\0" * (2**20 - 8192))
        fault = check(disk, need=64 * 1024)
        assert fault == DiskFault(errno.ENOSPC, str(disk), need=64 * 1024)
        assert fault.describe() == f"{disk}: 8.0 KB free of 1.0 MB, less than a run needs (64.0 KB)"
        (disk / "filler2").write_bytes(b"\0" * 8192)
        fault = check(disk, write=True)  # the probe file does not fit
        assert fault == DiskFault(errno.ENOSPC, str(disk))
        assert fault.describe() == f"no space left on device: {disk} (0 bytes free of 1.0 MB)"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "filler2"]  # no probe file left
        remount(disk, "ro")
        try:
            assert check(disk) == DiskFault(errno.EROFS, str(disk))
            assert check(disk).describe() == f"read-only file system: {disk}"
        finally:
            remount(disk, "rw")


def test_the_watch_re_checks_while_down_and_needs_room_for_two_checkpoints(tmp_path):
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        (disk / "k").mkdir()
        (disk / "k" / "checkpoint.pt").write_bytes(b"\0" * 300 * 1024)
        watch = DiskWatch(disk, every_s=0)
        assert watch.need() == 600 * 1024 and watch.refuse() is None
        (disk / "filler").write_bytes(b"\0" * 200 * 1024)  # 524 KB left: less than two checkpoints
        assert watch.refuse() == DiskFault(errno.ENOSPC, str(disk), need=600 * 1024)
        assert watch.mark_down(watch.refuse()) and not watch.mark_down(watch.refuse())
        assert watch.poll() is None and watch.down_since is not None
        (disk / "filler").unlink()
        assert watch.poll() is True and watch.down_since is None and watch.fault is None
