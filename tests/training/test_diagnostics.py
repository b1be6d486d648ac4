"""The diagnostics of what weight decay does: weight norms per stage, effective steps, the decay timescale."""

import math

import pytest
import torch

from training import RunConfig, train
from training.callbacks import DIAGNOSTICS, METRICS, NO_DECAY
from training.core import seeded_model
from training.diagnostics import decay_epochs, model_diagnostics, packed_diagnostics, stage_of
from training.fused import PackedResNet, stack_states


def test_names_are_metrics_and_every_stage_is_read():
    assert DIAGNOSTICS == ("weight_norm_stem", "weight_norm_stage1", "weight_norm_stage2", "weight_norm_stage3",
                           "weight_norm_fc", "effective_lr_stem", "effective_lr_stage1", "effective_lr_stage2",
                           "effective_lr_stage3", "decay_epochs")
    assert METRICS[-len(DIAGNOSTICS):] == DIAGNOSTICS and METRICS[:10][-1] == "images_per_second"
    names = [name for name, _ in seeded_model(RunConfig(arch="resnet14", dataset="digits")).named_parameters()]
    stages = [stage_of(n) for n in names]
    # ResNet-14: 2 blocks per stage, 2 convolutions each; every convolution is followed by BatchNorm
    assert {s: stages.count(s) for s in set(stages)} == {"stem": 1, "stage1": 4, "stage2": 4, "stage3": 4, "fc": 1,
                                                          None: len(names) - 14}
    assert [n for n, s in zip(names, stages) if s is None and not n.split(".")[-2].startswith("bn")] == ["fc.bias"]
    assert [stage_of(f"model.{n}") for n in names] == stages  # inside a wrapper too
    assert [stage_of(n) for n in ("stages.0.0.bn1.weight", "convx.weight", "xfc.weight", "conv.bias")] == [None] * 4


def test_decay_timescale_of_table1_scheme_01():
    """Batch 50 on 50,000 images (1,000 steps an epoch), momentum 0.9: the issue's ~10 epochs at lr 0.1
    (wd 1e-4) and ~6,000 at lr 1e-5 (wd 1.6e-3); decoupled decay does not depend on the learning rate."""
    steps = 50_000 // 50
    expected = {(0.1, 1e-4): 10, (0.01, 1e-4): 100, (1e-3, 8e-4): 125, (1e-4, 1.6e-3): 625, (1e-5, 1.6e-3): 6250}
    for (lr, wd), epochs in expected.items():
        assert math.isclose(decay_epochs(lr, wd, 0.9, steps), epochs, rel_tol=1e-12), (lr, wd)
        assert math.isclose(decay_epochs(lr, wd, 0.9, steps, decoupled=True), 1 / (wd * steps), rel_tol=1e-12)
    assert math.isclose(decay_epochs(0.1, 1e-4, 0.0, steps), 100, rel_tol=1e-12)  # no momentum: 1 / (lr wd steps)
    assert decay_epochs(0.1, 0.0, 0.9, steps) == decay_epochs(0.1, 0.0, 0.9, steps, decoupled=True) == NO_DECAY
    assert math.isfinite(NO_DECAY)


def test_model_diagnostics_are_the_stage_norms_and_mean_effective_steps():
    model = seeded_model(RunConfig(arch="resnet8", dataset="digits", seed=4))
    params = dict(model.named_parameters())
    lr = 0.05
    d = model_diagnostics(model.named_parameters(), lr=lr, weight_decay=2e-4, momentum=0.9, steps_per_epoch=26)
    assert list(d) == list(DIAGNOSTICS)
    by_stage = {"stem": ["conv.weight"], "fc": ["fc.weight"]}
    for i in range(3):
        by_stage[f"stage{i + 1}"] = [f"stages.{i}.0.conv1.weight", f"stages.{i}.0.conv2.weight"]
    for stage, names in by_stage.items():
        sq = [float(params[n].detach().double().pow(2).sum()) for n in names]
        assert math.isclose(d[f"weight_norm_{stage}"], math.sqrt(sum(sq)), rel_tol=1e-12), stage
        if stage != "fc":
            assert math.isclose(d[f"effective_lr_{stage}"], sum(lr / s for s in sq) / len(sq), rel_tol=1e-12)
    assert math.isclose(d["decay_epochs"], 0.1 / (lr * 2e-4 * 26), rel_tol=1e-12)
    # BatchNorm makes the convolutions scale-invariant: twice the weights, twice the norm, a quarter of the step
    with torch.no_grad():
        for n in by_stage["stage2"]:
            params[n].mul_(2)
    e = model_diagnostics(model.named_parameters(), lr=lr, weight_decay=2e-4, momentum=0.9, steps_per_epoch=26)
    assert math.isclose(e["weight_norm_stage2"], 2 * d["weight_norm_stage2"], rel_tol=1e-12)
    assert math.isclose(e["effective_lr_stage2"], d["effective_lr_stage2"] / 4, rel_tol=1e-12)
    assert e["weight_norm_stage1"] == d["weight_norm_stage1"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_diagnostics_are_each_members_solo_diagnostics(channels_last):
    configs = [RunConfig(arch="resnet8", dataset="digits", seed=s) for s in (1, 2, 3)]
    solos = [seeded_model(c) for c in configs]
    fused = PackedResNet(3, 1, 10)
    fused.load_state_dict(stack_states([m.state_dict() for m in solos], fused))
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    names, params = zip(*fused.named_parameters())
    wds = [1e-4, 5e-4, 0.0]
    packed = packed_diagnostics(names, params, 3, lr=0.1, weight_decays=wds, momentum=0.9, steps_per_epoch=3)
    assert len(packed) == 3
    for solo, wd, mine in zip(solos, wds, packed):
        alone = model_diagnostics(solo.named_parameters(), lr=0.1, weight_decay=wd, momentum=0.9, steps_per_epoch=3)
        assert list(mine) == list(alone)
        for name in DIAGNOSTICS:
            assert math.isclose(mine[name], alone[name], rel_tol=1e-12), name
    assert packed[2]["decay_epochs"] == NO_DECAY
    assert packed[0]["weight_norm_stem"] != packed[1]["weight_norm_stem"]  # the members' own weights


def test_a_run_logs_its_final_weights_diagnostics_every_epoch():
    """The last epoch's numbers are those of the model the run hands back (computed after its last step)."""
    torch.set_num_threads(1)
    config = RunConfig(arch="resnet8", dataset="digits", train_subset=100, seed=5, lr=[0.1, 0.01],
                       epochs_per_step=(1,), weight_decay=[1e-3, 0.0], grad_sparsity=0.0)
    result = train(config)
    assert [set(DIAGNOSTICS) <= set(h) for h in result.history] == [True, True]
    last = result.history[-1]
    assert {k: last[k] for k in DIAGNOSTICS} == model_diagnostics(
        result.model.named_parameters(), lr=0.01, weight_decay=0.0, momentum=0.9, steps_per_epoch=2)
    first = result.history[0]
    assert math.isclose(first["decay_epochs"], 0.1 / (0.1 * 1e-3 * 2), rel_tol=1e-12)
    assert last["decay_epochs"] == NO_DECAY
    assert first["weight_norm_stage3"] != last["weight_norm_stage3"]  # the weights moved


def test_decoupled_decay_and_a_batch_size_taper_set_the_logged_timescale():
    """Decoupled decay shrinks by wd per step whatever the learning rate: 1 / (wd x steps per epoch), with the
    steps of the epoch's own batch size; a pack logs each member's own mode."""
    torch.set_num_threads(1)
    common = dict(arch="resnet8", dataset="digits", train_subset=100, seed=5, lr=[0.1, 0.01], epochs_per_step=(1,),
                  weight_decay=[1e-3, 2e-3], grad_sparsity=0.0, batch_size=50)
    decoupled = RunConfig(**common, weight_decay_mode="decoupled", batch_sizes=((50, 25),))
    coupled = RunConfig(**common)
    assert [h["decay_epochs"] for h in train(decoupled).history] == [1 / (1e-3 * 2), 1 / (2e-3 * 4)]
    solo = [h["decay_epochs"] for h in train(coupled).history]
    assert solo == [(1 - 0.9) / (0.1 * 1e-3 * 2), (1 - 0.9) / (0.01 * 2e-3 * 2)]
    from training.packed import train_packed

    pack = train_packed([coupled, RunConfig(**{**common, "seed": 6}, weight_decay_mode="decoupled")])
    assert [[h["decay_epochs"] for h in m.history] for m in pack.members] == [solo, [1 / (1e-3 * 2), 1 / (2e-3 * 2)]]
