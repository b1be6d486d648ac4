"""Checkpoints that cannot be resumed from raise CheckpointError naming the file."""

import os

import pytest
import torch

from training import CheckpointError, RunConfig, train
from training.checkpoint import (
    CHECKPOINT_VERSION,
    load_checkpoint,
    save_checkpoint,
    set_aside,
)
from training.loop import CheckpointMismatch


def small(**kw):
    base = dict(arch="resnet8", dataset="digits", seed=1, epochs_scale=0.01, train_subset=60, grad_sparsity=0.0,
                lr=[0.1, 0.01, 0.001, 0.0001, 0.00001], epochs_per_step=[50, 20, 20])
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real checkpoint (15 epochs)."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    train(small(), checkpoint_path=path)
    return path


def test_absent_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "absent.pt") is None


def test_a_good_checkpoint_loads_with_its_identity(trained):
    payload = load_checkpoint(trained, identity=small().identity_dict())
    assert payload["version"] == CHECKPOINT_VERSION == 1 and payload["epoch"] == 15


def assert_refused(path, what, **load_kwargs):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **load_kwargs)
    assert info.value.path == str(path)
    assert info.value.what.startswith(what), info.value.what
    assert str(info.value) == f"cannot resume from checkpoint {path}: {info.value.what}"
    assert "\n" not in str(info.value)


def test_zero_byte_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    assert_refused(path, "empty file (0 bytes)")


def test_truncated_checkpoint(trained, tmp_path):
    data = trained.read_bytes()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data[:len(data) // 2])
    assert_refused(path, "truncated or not a checkpoint: ")


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint", b"\x80\x02K\x07."])  # text; a pickled int
def test_garbage_checkpoint(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    assert_refused(path, "truncated or not a checkpoint: ")


def test_other_version(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"version": 7, "identity": {}, "history": []})
    assert_refused(path, "checkpoint version 7, this adareg writes 1")


def test_other_identity(trained):
    assert_refused(trained, "belongs to another configuration", identity=small(seed=2).identity_dict())
    assert load_checkpoint(trained)["epoch"] == 15  # without an identity to compare: readable


def test_train_refuses_a_broken_checkpoint_before_training(trained, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(trained.read_bytes()[:1000])
    started = []

    class Started:
        def on_start(self, config, plan, history):
            started.append(True)

    with pytest.raises(CheckpointError, match=f"^cannot resume from checkpoint {path}: truncated"):
        train(small(), [Started()], checkpoint_path=path)
    assert not started
    with pytest.raises(CheckpointMismatch, match="belongs to another configuration"):  # the former name
        train(small(seed=2), checkpoint_path=trained)


def test_set_aside_keeps_every_bad_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"one")
    assert set_aside(path) == tmp_path / "checkpoint.pt.broken"
    path.write_bytes(b"two")
    assert set_aside(path) == tmp_path / "checkpoint.pt.broken.1"
    assert not path.exists()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt.broken", "checkpoint.pt.broken.1"]
    assert (tmp_path / "checkpoint.pt.broken").read_bytes() == b"one"


# ------------------------------------------------------------------ a full or read-only disk


def test_a_full_disk_keeps_the_last_checkpoint_and_names_errno_and_path(trained, tmp_path):
    """torch.save into a full file says ``[enforce fail at inline_container.cc] unexpected pos``; the checkpoint
    is serialised in memory first, so the write raises ENOSPC naming the file. The checkpoint there before
    is intact and no temp file is left."""
    import errno

    from smallfs import small_filesystem

    payload = load_checkpoint(trained)
    size = trained.stat().st_size
    with small_filesystem(tmp_path / "disk", f"{size * 3 // 2 // 4096 * 4096 + 4096}") as disk:
        path = disk / "run" / "checkpoint.pt"
        save_checkpoint(path, payload)  # fits once
        before = path.read_bytes()
        with pytest.raises(OSError) as info:
            save_checkpoint(path, payload)  # the temp file beside it does not
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(path)
        assert str(info.value) == f"[Errno 28] No space left on device: '{path}'"
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
        assert path.read_bytes() == before
        assert load_checkpoint(path)["epoch"] == 15


def test_a_read_only_disk_names_errno_and_path(trained, tmp_path):
    import errno

    from smallfs import remount, small_filesystem

    payload = load_checkpoint(trained)
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        path = disk / "run" / "checkpoint.pt"
        save_checkpoint(path, payload)
        remount(disk, "ro")
        try:
            with pytest.raises(OSError) as info:
                save_checkpoint(path, payload)
            assert (info.value.errno, info.value.filename) == (errno.EROFS, str(path))
            assert load_checkpoint(path)["epoch"] == 15
        finally:
            remount(disk, "rw")
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
