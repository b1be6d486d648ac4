"""The packed trainer: every member trains as it would alone, checkpoints in the solo format, resumes."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from stops import Stop, StopAfter
from trio import trio, without_timing

from training import Callback, train
from training.callbacks import DIAGNOSTICS, metric_names
from training.checkpoint import CheckpointError, load_checkpoint
from training.data import Batches, Split, load_splits
from training.diagnostics import model_diagnostics
from training.fused import PackedBatches
from training.loop import CheckpointMismatch, epoch_seed
from training.models import build_model
from training.packed import group_by_epoch, train_packed
from training.regularizers import SparseSGD, draw_masks, mask_seed
from training.schedules import plan_for


class Record(Callback):
    def __init__(self):
        self.started, self.epochs, self.diverged = [], [], []

    def on_start(self, config, plan, history):
        self.started.append((config, len(plan), len(history)))

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, dict(metrics)))

    def on_diverged(self, epoch, message):
        self.diverged.append((epoch, message))


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def solo_reference(config, steps):
    """``training.loop.train``'s first ``steps`` steps, in float64, from the same building blocks."""
    train_split, _ = load_splits(config, "cpu")
    batches = Batches(train_split, config.dataset, config.batch_size, augment=config.augment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.arch, config.num_classes)
    model = model.double()
    params = list(model.parameters())
    opt = SparseSGD(params, momentum=config.momentum)
    first = plan_for(config)[0]
    opt.set_hyper(first.lr, first.weight_decay)
    if first.grad_sparsity:
        opt.set_masks(draw_masks(params, first.grad_sparsity, mask_seed(config.seed, 1)))
    losses = []
    model.train()
    for x, y in itertools.islice(batches.epoch(torch.Generator().manual_seed(epoch_seed(config.seed, 1))), steps):
        loss = F.cross_entropy(model(x.double()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each member solo and the uninterrupted pack, 3 epochs, with checkpoints (float32)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("packed")
    solo = [train(c, checkpoint_path=tmp / f"solo{i}.pt") for i, c in enumerate(trio())]
    records = [Record() for _ in range(3)]
    paths = [tmp / f"pack{i}.pt" for i in range(3)]
    pack = train_packed(trio(), [[r] for r in records], checkpoint_paths=paths)
    return {"solo": solo, "pack": pack, "records": records, "paths": paths}


def test_three_steps_match_solo_in_float64(tmp_path):
    """Loss, every parameter, momentum and BatchNorm running statistics after the first 3 steps."""
    torch.set_num_threads(1)
    configs = trio()
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    with pytest.raises(Stop):
        train_packed(configs, [[StopAfter(1)], [], []], checkpoint_paths=paths, dtype=torch.float64)
    for config, path in zip(configs, paths):
        model, opt, losses = solo_reference(config, 3)
        state = load_checkpoint(path)
        assert state["epoch"] == 1
        assert math.isclose(state["history"][0]["train_loss"], sum(losses) / 3, rel_tol=1e-5)
        first = plan_for(config)[0]
        diagnostics = model_diagnostics(model.named_parameters(), lr=first.lr, weight_decay=first.weight_decay,
                                        momentum=config.momentum, steps_per_epoch=3)
        for name, value in diagnostics.items():
            assert math.isclose(state["history"][0][name], value, rel_tol=1e-9), name
        reference = model.state_dict()
        assert state["model"].keys() == reference.keys()
        for key, value in reference.items():
            if key.endswith("num_batches_tracked"):
                assert int(state["model"][key]) == int(value) == 3
            else:
                assert rel(state["model"][key], value) <= 1e-5, key
        buffers = state["optimizer"]["optimizer"]["state"]
        assert len(buffers) == len(opt.params)
        for j, p in enumerate(opt.params):
            assert rel(buffers[j]["momentum_buffer"], opt.optimizer.state[p]["momentum_buffer"]) <= 1e-5, j
        if config.seed == 3:
            assert [torch.equal(a, b.float()) for a, b in zip(state["masks"], opt.masks)] == [True] * len(opt.params)
        else:
            assert state["masks"] == []


def test_one_epoch_metrics_match_solo(runs):
    for solo, member in zip(runs["solo"], runs["pack"].members):
        s, p = solo.history[0], member.history[0]
        assert math.isclose(p["train_loss"], s["train_loss"], rel_tol=1e-3)
        assert math.isclose(p["test_loss"], s["test_loss"], rel_tol=1e-3)
        assert abs(p["test_error"] - s["test_error"]) * 500 <= 2
        assert (p["lr"], p["weight_decay"], p["grad_sparsity"]) == (s["lr"], s["weight_decay"], s["grad_sparsity"])


def test_diagnostics_match_solo_every_epoch(runs):
    """Weight norms and effective steps per stage to the packed trainer's tolerance (the weights differ in
    float32 rounding), the decay timescale exactly, in every epoch."""
    for solo, member in zip(runs["solo"], runs["pack"].members):
        assert len(member.history) == len(solo.history) == 3
        for s, p in zip(solo.history, member.history):
            assert p["decay_epochs"] == s["decay_epochs"]
            for name in DIAGNOSTICS:
                assert math.isclose(p[name], s[name], rel_tol=1e-3), (name, p["epoch"])
        assert abs(p["updated_fraction"] - s["updated_fraction"]) < 1e-3


def test_callbacks_hear_what_a_solo_run_hears(runs):
    for record, member in zip(runs["records"], runs["pack"].members):
        assert record.started == [(member.config, 3, 0)]
        assert [e for e, _ in record.epochs] == [1, 2, 3]
        assert [m for _, m in record.epochs] == [{k: v for k, v in h.items() if k != "epoch"}
                                                  for h in member.history]
        assert record.diverged == []
    assert runs["pack"].diverged == {}


def test_checkpoints_have_the_solo_format(runs):
    for i, path in enumerate(runs["paths"]):
        mine = load_checkpoint(path)
        theirs = load_checkpoint(path.parent / f"solo{i}.pt")
        assert set(mine) == set(theirs)
        assert (mine["version"], mine["identity"], mine["epoch"]) == (theirs["version"], theirs["identity"], 3)
        assert {k: v.shape for k, v in mine["model"].items()} == {k: v.shape for k, v in theirs["model"].items()}
        assert mine["optimizer"]["optimizer"]["param_groups"] == theirs["optimizer"]["optimizer"]["param_groups"]
        assert mine["optimizer"]["weight_decay"] == theirs["optimizer"]["weight_decay"]
        assert [m.shape for m in mine["masks"]] == [m.shape for m in theirs["masks"]]
        assert without_timing(mine["history"]) == without_timing(runs["pack"].members[i].history)


def test_pack_resume_is_bit_identical(runs, tmp_path):
    torch.set_num_threads(1)
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    with pytest.raises(Stop):
        train_packed(trio(), [[], [StopAfter(2)], []], checkpoint_paths=paths)
    assert [load_checkpoint(p)["epoch"] for p in paths] == [2, 2, 2]
    resumed = train_packed(trio(), checkpoint_paths=paths)
    for member, reference, path, ref_path in zip(resumed.members, runs["pack"].members, paths, runs["paths"]):
        assert member.resumed_from == 2
        assert without_timing(member.history) == without_timing(reference.history)
        mine, theirs = load_checkpoint(path), load_checkpoint(ref_path)
        assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
        buffers = [s["momentum_buffer"] for s in mine["optimizer"]["optimizer"]["state"].values()]
        ref_buffers = [s["momentum_buffer"] for s in theirs["optimizer"]["optimizer"]["state"].values()]
        assert all(torch.equal(a, b) for a, b in zip(buffers, ref_buffers))


def test_a_pack_checkpoint_resumes_solo(runs, tmp_path):
    torch.set_num_threads(1)
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    with pytest.raises(Stop):
        train_packed(trio(), [[StopAfter(1)], [], []], checkpoint_paths=paths)
    config = trio()[2]  # the sparse one: masks and frozen momentum must carry over
    result = train(config, checkpoint_path=paths[2])
    assert result.resumed_from == 1
    assert [int(h["epoch"]) for h in result.history] == [1, 2, 3]
    assert without_timing(result.history[:1]) == without_timing(runs["pack"].members[2].history[:1])
    solo = runs["solo"][2].history
    for h, s in zip(result.history, solo):
        assert math.isclose(h["train_loss"], s["train_loss"], rel_tol=2e-2)
        assert math.isclose(h["updated_fraction"], s["updated_fraction"], rel_tol=1e-3)


def test_a_diverging_member_is_dropped_and_the_others_finish(runs, tmp_path):
    torch.set_num_threads(1)
    configs = trio()
    configs[1] = configs[1].replace(weight_decay=1e8)  # lr x wd = 1e7: the weights blow up in epoch 1 or 2
    records = [Record() for _ in range(3)]
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    result = train_packed(configs, [[r] for r in records], checkpoint_paths=paths)
    assert list(result.diverged) == [1]
    epoch, message = records[1].diverged[0]
    assert len(records[1].diverged) == 1 and message == result.diverged[1]
    assert message.startswith(f"diverged at epoch {epoch}: ")
    assert [e for e, _ in records[1].epochs] == list(range(1, epoch))
    assert result.members[1].model is None and len(result.members[1].history) == epoch - 1
    assert checkpoint_epoch_or_none(paths[1]) == (epoch - 1 or None)
    for i in (0, 2):
        assert [e for e, _ in records[i].epochs] == [1, 2, 3] and records[i].diverged == []
        assert load_checkpoint(paths[i])["epoch"] == 3
        # the survivors' numbers are not changed by the diverged member, nor by training on without it
        assert without_timing(result.members[i].history) == without_timing(runs["pack"].members[i].history)


def test_a_lone_member_resumes_bit_identical_to_its_pack(runs, tmp_path):
    """A kill between the members' checkpoints splits a pack by epoch on resume: a member left alone trains
    beside a copy of itself (grouped kernels), so its numbers are the uninterrupted pack's, bit for bit."""
    torch.set_num_threads(1)
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    with pytest.raises(Stop):
        train_packed(trio(), [[StopAfter(1)], [], []], checkpoint_paths=paths)
    alone = train_packed(trio()[2:], checkpoint_paths=paths[2:]).members[0]
    assert alone.resumed_from == 1
    assert without_timing(alone.history) == without_timing(runs["pack"].members[2].history)
    mine, theirs = load_checkpoint(paths[2]), load_checkpoint(runs["paths"][2])
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert [torch.equal(a, b) for a, b in zip(mine["masks"], theirs["masks"])] == [True] * len(theirs["masks"])


def test_a_pack_on_a_validation_split_reports_what_a_solo_run_does():
    """With ``validation`` the members report val_loss / val_error (in metric_names' order), on the held-out
    part, as a solo run does (within float32 rounding after an epoch)."""
    torch.set_num_threads(1)
    configs = [c.replace(validation=0.2) for c in trio()[:2]]
    records = [Record() for _ in configs]
    train_packed(configs, [[r] for r in records])
    solo = train(configs[0])
    for record, config in zip(records, configs):
        assert [list(m) for _, m in record.epochs] == [list(metric_names(config))] * 3
    (_, packed), first = records[0].epochs[0], solo.history[0]
    assert math.isclose(packed["val_loss"], first["val_loss"], rel_tol=1e-3)
    held_out = len(load_splits(configs[0], "cpu")[1].labels)
    assert round(abs(packed["val_error"] - first["val_error"]) * held_out) <= 2  # at most two images apart


def checkpoint_epoch_or_none(path):
    state = load_checkpoint(path)
    return state["epoch"] if state is not None else None


def test_a_checkpoint_of_another_config_is_refused_naming_the_file(tmp_path):
    """``CheckpointError(path, what)``, as a solo run raises it (this was a TypeError: one argument given)."""
    torch.set_num_threads(1)
    configs = trio()[:2]
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    with pytest.raises(Stop):
        train(configs[0].replace(seed=9), [StopAfter(1)], checkpoint_path=paths[0])
    started = []

    class Started(Callback):
        def on_start(self, config, plan, history):
            started.append(config.seed)

    with pytest.raises(CheckpointError) as info:
        train_packed(configs, [[Started()], [Started()]], checkpoint_paths=paths)
    assert str(info.value) == f"cannot resume from checkpoint {paths[0]}: belongs to another configuration"
    assert (info.value.path, info.value.what) == (str(paths[0]), "belongs to another configuration")
    assert started == [] and not paths[1].exists()  # refused before anything trained
    with pytest.raises(CheckpointMismatch):  # the former name still catches it
        train_packed(configs, checkpoint_paths=paths)


def test_members_of_another_shape_are_refused():
    configs = trio()
    configs[2] = configs[2].replace(batch_size=30)
    with pytest.raises(ValueError, match=r"^batch_size: member 2 has 30, member 0 has 50"):
        train_packed(configs)


def test_members_at_different_epochs_are_refused_and_grouped(tmp_path):
    torch.set_num_threads(1)
    configs = trio()[:2]
    first = tmp_path / "a.pt"
    with pytest.raises(Stop):
        train(configs[0], [StopAfter(1)], checkpoint_path=first)
    paths = [first, tmp_path / "b.pt"]
    assert group_by_epoch(paths + [None]) == {0: [1, 2], 1: [0]}
    with pytest.raises(ValueError, match=r"^checkpoint_paths: members resume from different epochs "
                                         r"\(member 0 at 1, member 1 at 0\)"):
        train_packed(configs, checkpoint_paths=paths)
    assert load_checkpoint(first)["epoch"] == 1 and not paths[1].exists()


@pytest.mark.parametrize("shared", [True, False])
def test_packed_batches_are_the_members_batches(shared):
    """Crops, flips (CIFAR), order and labels of every member, fused, equal to its own ``Batches.epoch``."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8, generator=g)
    splits = [Split(images if shared else torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (23,), generator=g)) for _ in range(3)]
    alone = [Batches(Split(s.images.clone(), s.labels.clone()), "cifar10", 10, augment=True) for s in splits]
    packed = PackedBatches([Batches(s, "cifar10", 10, augment=True) for s in splits])
    fused = list(packed.epoch([torch.Generator().manual_seed(seed) for seed in (5, 6, 7)]))
    members = [list(b.epoch(torch.Generator().manual_seed(seed))) for b, seed in zip(alone, (5, 6, 7))]
    assert [x.shape for x, _ in fused] == [(10, 9, 32, 32), (10, 9, 32, 32), (3, 9, 32, 32)]
    for step, (x, y) in enumerate(fused):
        for i in range(3):
            assert torch.equal(x[:, 3 * i:3 * i + 3], members[i][step][0])
            assert torch.equal(y[i], members[i][step][1])


def test_the_pack_evaluates_without_an_autograd_graph(monkeypatch):
    """Evaluation keeps no graph: with one, the activations of the whole test split stayed alive until the last
    batch (Fashion-MNIST's 10,000 test images: 11 GB for a pack of two resnet8)."""
    import training.packed as packed

    seen = []
    original = packed.full_precision

    def spy(logits):
        seen.append(logits.requires_grad)
        return original(logits)

    monkeypatch.setattr(packed, "full_precision", spy)
    torch.set_num_threads(1)
    train_packed(trio()[:2])
    # per epoch 3 training steps (150 images at batch 50), then 10 evaluation batches (500 test digits at batch 50)
    assert seen == ([True] * 3 + [False] * 10) * 3
