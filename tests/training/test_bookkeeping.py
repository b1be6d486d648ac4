"""Bookkeeping off the critical path (``training.bookkeeping``): the bulk host copy, and checkpoints and
callbacks on a background thread with every guarantee of the synchronous writer (checked on the CPU,
where the background writer is off by default and switched on here with ``background_writes=True``)."""

import threading

import pytest
import torch
from stops import Stop, StopAfter

from training import Callback, RunConfig, train
from training.bookkeeping import BackgroundEpochWriter, epoch_writer, host_copy
from training.checkpoint import load_checkpoint
from training.core import EpochWriter
from training.packed import train_packed

TIMING = {"epoch_seconds", "images_per_second"}
BASE = dict(arch="resnet8", dataset="digits", train_subset=150, label_noise=0.1, lr=[0.1, 0.05, 0.02],
            epochs_per_step=(1,))


def duo():
    return [RunConfig(seed=1, weight_decay=1e-4, grad_sparsity=[0.3, 0.5, 0.5], **BASE),
            RunConfig(seed=2, weight_decay=[5e-4, 1e-3, 2e-3], grad_sparsity=0.0, **BASE)]


def metrics_of(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def same_checkpoint(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    assert (a["epoch"], a["identity"]) == (b["epoch"], b["identity"])
    assert metrics_of(a["history"]) == metrics_of(b["history"])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["optimizer"], b["optimizer"]["optimizer"]
    assert sa["param_groups"] == sb["param_groups"] and a["optimizer"]["weight_decay"] == b["optimizer"]["weight_decay"]
    assert sa["state"].keys() == sb["state"].keys()
    assert all(torch.equal(sa["state"][j]["momentum_buffer"], sb["state"][j]["momentum_buffer"]) for j in sa["state"])
    assert [torch.equal(x, y) for x, y in zip(a["masks"], b["masks"])] == [True] * len(b["masks"])
    return a


class Heard(Callback):
    """Records each epoch told, the checkpoint's epoch on disk then, and the thread it is told on."""

    def __init__(self, path=None):
        self.path, self.epochs, self.on_disk, self.threads = path, [], [], set()

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, dict(metrics)))
        self.threads.add(threading.current_thread().name)
        if self.path is not None:
            self.on_disk.append(load_checkpoint(self.path)["epoch"])


def test_host_copy_is_one_buffer_per_dtype_with_the_same_values():
    a, b = torch.randn(3, 4), torch.arange(5)
    c = torch.randn(2, 2, 3, 3).contiguous(memory_format=torch.channels_last)
    out = host_copy([a, None, b, c])
    assert out[1] is None
    for x, y in zip((a, b, c), (out[0], out[2], out[3])):
        assert torch.equal(x, y) and x.dtype == y.dtype and y.shape == x.shape and y.is_contiguous()
    assert out[0].untyped_storage().data_ptr() == out[3].untyped_storage().data_ptr()  # one float32 buffer
    a.add_(1)
    assert not torch.equal(a, out[0])  # a copy, not a view of the live tensor


def test_the_writer_runs_in_order_stops_at_the_first_error_and_raises_it_once():
    writer, ran = BackgroundEpochWriter(), []
    writer.submit(lambda: ran.append(1))
    writer.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    writer.submit(lambda: ran.append(3))  # after an error nothing more runs
    with pytest.raises(OSError, match="No space left"):
        writer.check()
    writer.check()  # raised once
    writer.close()
    assert ran == [1] and not writer._thread.is_alive()
    assert isinstance(epoch_writer(torch.device("cpu")), EpochWriter)
    assert not isinstance(epoch_writer(torch.device("cpu")), BackgroundEpochWriter)  # the CPU: synchronous
    assert isinstance(epoch_writer(torch.device("cuda")), BackgroundEpochWriter)  # built, never started on CUDA


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sync")
    solo = train(duo()[0], checkpoint_path=tmp / "solo.pt", background_writes=False)
    paths = [tmp / f"p{i}.pt" for i in range(2)]
    pack = train_packed(duo(), checkpoint_paths=paths, background_writes=False)
    return {"solo": solo, "solo_path": tmp / "solo.pt", "pack": pack, "pack_paths": paths}


def test_a_solo_run_writes_in_the_background_exactly_what_it_writes_in_line(synchronous, tmp_path):
    torch.set_num_threads(1)
    heard = Heard(tmp_path / "c.pt")
    result = train(duo()[0], [heard], checkpoint_path=tmp_path / "c.pt", background_writes=True)
    assert metrics_of(result.history) == metrics_of(synchronous["solo"].history)
    assert same_checkpoint(tmp_path / "c.pt", synchronous["solo_path"])["epoch"] == 3
    assert [e for e, _ in heard.epochs] == [1, 2, 3] and heard.on_disk == [1, 2, 3]  # checkpoint first, once each
    assert heard.threads == {"adareg-epoch-writer"}
    assert [m for _, m in heard.epochs] == [{k: v for k, v in h.items() if k != "epoch"} for h in result.history]


def test_a_stop_in_the_background_leaves_what_it_leaves_in_line_and_resumes_bit_identical(synchronous, tmp_path):
    torch.set_num_threads(1)
    path, heard = tmp_path / "c.pt", Heard()
    with pytest.raises(Stop):
        train(duo()[0], [heard, StopAfter(1)], checkpoint_path=path, background_writes=True)
    # raised one epoch later (epoch 2 trained, then dropped): on disk and told, exactly epoch 1
    assert load_checkpoint(path)["epoch"] == 1 and [e for e, _ in heard.epochs] == [1]
    resumed = train(duo()[0], checkpoint_path=path, background_writes=True)
    assert resumed.resumed_from == 1
    assert metrics_of(resumed.history) == metrics_of(synchronous["solo"].history)
    same_checkpoint(path, synchronous["solo_path"])


def test_a_pack_writes_in_the_background_exactly_what_it_writes_in_line(synchronous, tmp_path):
    torch.set_num_threads(1)
    paths = [tmp_path / f"p{i}.pt" for i in range(2)]
    heard = [Heard(p) for p in paths]
    with pytest.raises(Stop):
        train_packed(duo(), [[heard[0]], [heard[1], StopAfter(2)]], checkpoint_paths=paths, background_writes=True)
    assert [load_checkpoint(p)["epoch"] for p in paths] == [2, 2]
    assert [[e for e, _ in h.epochs] for h in heard] == [[1, 2], [1, 2]] and heard[0].on_disk == [1, 2]
    resumed = train_packed(duo(), checkpoint_paths=paths, background_writes=True)
    for member, reference, path, ref_path in zip(resumed.members, synchronous["pack"].members, paths,
                                                 synchronous["pack_paths"]):
        assert member.resumed_from == 2 and metrics_of(member.history) == metrics_of(reference.history)
        same_checkpoint(path, ref_path)
        assert all(torch.equal(a, b) for a, b in zip(member.model.state_dict().values(),
                                                      reference.model.state_dict().values()))


def test_a_failed_checkpoint_write_in_the_background_raises_and_its_epoch_is_never_told(tmp_path):
    torch.set_num_threads(1)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    heard = Heard()
    with pytest.raises(OSError):
        train(duo()[1], [heard], checkpoint_path=blocked / "c.pt", background_writes=True)
    assert heard.epochs == []
