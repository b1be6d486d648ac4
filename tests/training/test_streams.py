"""Streams (``training.streams``): a pack of solo runs in one process; every member is, bit for bit, its
solo run (on the CPU one after another, or on threads), checkpoints in the solo format, resumes."""

import pytest
import torch
from stops import Stop, StopAfter
from trio import trio, without_timing  # the packed trainer's three members, here on streams

from training import Callback, train
from training.checkpoint import load_checkpoint
from training.streams import MemberStopped, train_streams


class Record(Callback):
    def __init__(self):
        self.epochs, self.diverged = [], []

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append(epoch)

    def on_diverged(self, epoch, message):
        self.diverged.append((epoch, message))


class StopMember(Callback):
    def on_epoch_end(self, epoch, metrics):
        if epoch == 1:
            raise MemberStopped()


def assert_same_run(path, ref_path, result=None, reference=None):
    mine, theirs = load_checkpoint(path), load_checkpoint(ref_path)
    assert (mine["epoch"], mine["identity"]) == (theirs["epoch"], theirs["identity"])
    assert without_timing(mine["history"]) == without_timing(theirs["history"])
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
    a, b = mine["optimizer"]["optimizer"]["state"], theirs["optimizer"]["optimizer"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[j]["momentum_buffer"], b[j]["momentum_buffer"]) for j in b)
    assert [torch.equal(x, y) for x, y in zip(mine["masks"], theirs["masks"])] == [True] * len(theirs["masks"])
    if result is not None:
        assert without_timing(result.history) == without_timing(reference.history)
        assert all(torch.equal(x, y) for x, y in zip(result.model.state_dict().values(),
                                                      reference.model.state_dict().values()))


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("solo")
    paths = [tmp / f"solo{i}.pt" for i in range(3)]
    return [train(c, checkpoint_path=p) for c, p in zip(trio(), paths)], paths


@pytest.mark.parametrize("parallel", [False, True], ids=["one-after-another", "threads"])
def test_every_member_is_its_solo_run_bit_for_bit(solo, tmp_path, parallel):
    torch.set_num_threads(1)
    records = [Record() for _ in range(3)]
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    result = train_streams(trio(), [[r] for r in records], checkpoint_paths=paths, parallel=parallel)
    assert result.diverged == {} and [r.epochs for r in records] == [[1, 2, 3]] * 3
    for member, reference, path, ref_path in zip(result.members, solo[0], paths, solo[1]):
        assert_same_run(path, ref_path, member, reference)


def test_a_stopped_pack_resumes_every_member_to_its_solo_run(solo, tmp_path):
    torch.set_num_threads(1)
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    with pytest.raises(Stop):
        train_streams(trio(), [[], [StopAfter(2)], []], checkpoint_paths=paths, parallel=True)
    epochs = [load_checkpoint(p)["epoch"] if p.exists() else 0 for p in paths]
    assert epochs[1] == 2 and all(1 <= e <= 3 for e in epochs)  # the others stopped at the end of an epoch
    resumed = train_streams(trio(), checkpoint_paths=paths)  # members at different epochs: fine
    assert [m.resumed_from for m in resumed.members] == epochs
    for member, reference, path, ref_path in zip(resumed.members, solo[0], paths, solo[1]):
        assert_same_run(path, ref_path, member, reference)


def test_a_member_that_stops_or_diverges_ends_alone(solo, tmp_path):
    torch.set_num_threads(1)
    configs = trio()
    configs[1] = configs[1].replace(weight_decay=1e8)  # lr x wd = 1e7: the weights blow up in epoch 1 or 2
    records = [Record() for _ in range(3)]
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    result = train_streams(configs, [[records[0], StopMember()], [records[1]], [records[2]]], checkpoint_paths=paths,
                           parallel=True)
    assert list(result.diverged) == [1]
    epoch, message = records[1].diverged[0]
    assert message == result.diverged[1] and message.startswith(f"diverged at epoch {epoch}: ")
    assert records[1].epochs == list(range(1, epoch)) and result.members[1].model is None
    assert records[0].epochs == [1] and load_checkpoint(paths[0])["epoch"] == 1 and result.members[0].model is None
    assert records[2].epochs == [1, 2, 3]
    assert_same_run(paths[2], solo[1][2], result.members[2], solo[0][2])
