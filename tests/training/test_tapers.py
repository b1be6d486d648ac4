"""Learning-rate families and tapers of the learning rate (issue 15): values, identity, and what trains."""

import math

import pytest
import torch
import torch.nn.functional as F
from stops import Stop, StopAfter

import training.loop
from orchestrator.identity import run_key
from training import Callback, RunConfig, train
from training.checkpoint import load_checkpoint
from training.config import ConfigError, shape_of
from training.data import Batches, load_splits
from training.packed import check_shape, train_packed
from training.regularizers import SparseSGD, draw_masks, dropout_generator, mask_seed
from training.schedules import phase_bounds, plan_for

TIMING = {"epoch_seconds", "images_per_second"}
# 150 digits at batch 50: 3 steps an epoch; one phase of three one-epoch steps.
BASE = dict(arch="resnet8", dataset="digits", train_subset=150, label_noise=0.1, lr=[0.1, 0.05, 0.02],
            epochs_per_step=(1,))


def small(**changes) -> RunConfig:
    """A run of ``BASE`` (weight decay 1e-4, dense unless changed)."""
    return RunConfig(**{**BASE, "weight_decay": 1e-4, "grad_sparsity": 0.0, **changes})


def sgdr(t: int, cycle: int, peak: float, low: float) -> float:
    """Loshchilov & Hutter's eq. (5): eta = min + (max - min) (1 + cos(pi T_cur / T_i)) / 2."""
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t / cycle))


# ------------------------------------------------------------------------------ learning-rate families


def test_cosine_restarts_give_textbook_sgdr_values_at_first_middle_and_last_epoch():
    config = RunConfig(lr={"family": "cosine", "max": [0.1, 0.05, 0.02], "min": 0.001}, epochs_per_step=[10, 6, 4],
                       weight_decay=1e-4, grad_sparsity=0.0)
    plan = plan_for(config)
    assert phase_bounds(plan) == {1: (1, 10), 2: (11, 16), 3: (17, 20)}
    for (first, last), peak in zip(phase_bounds(plan).values(), (0.1, 0.05, 0.02)):
        cycle = last - first + 1
        middle = first + cycle // 2
        assert plan[first - 1].lr == peak
        assert math.isclose(plan[middle - 1].lr, (peak + 0.001) / 2, rel_tol=1e-12)
        assert math.isclose(plan[last - 1].lr, sgdr(cycle - 1, cycle, peak, 0.001), rel_tol=1e-12)
        assert plan[last - 1].lr > 0.001 and plan[last - 1].lr < plan[last - 2].lr


def test_cosine_restarts_match_pytorchs_scheduler_epoch_by_epoch():
    config = RunConfig(lr={"family": "cosine", "max": 0.1, "min": 0.0005}, epochs_per_step=[8, 8, 8],
                       weight_decay=1e-4, grad_sparsity=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=8, eta_min=0.0005)
    theirs = []
    for _ in range(24):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    ours = [e.lr for e in plan_for(config)]
    assert len(ours) == 24
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-15


def test_a_cosine_cycle_of_several_steps_is_as_long_as_the_grids_phase():
    """``steps: 5`` makes each cycle span the phase of a five-step grid (5 x epochs_per_step epochs), so a
    cosine run trains as many epochs as the step grid it is compared with; per-step tapers apply within it."""
    grid = RunConfig(epochs_per_step=[4, 2], lr=[0.1, 0.01, 0.001, 0.0001, 0.00001], weight_decay=1e-4,
                     grad_sparsity=0.0)
    cosine = RunConfig(lr={"family": "cosine", "max": 0.1, "min": 1e-5, "steps": 5}, epochs_per_step=[4, 2],
                       weight_decay=[1e-4, 1e-4, 8e-4, 1.6e-3, 1.6e-3], grad_sparsity=0.0)
    plan = plan_for(cosine)
    assert phase_bounds(plan) == phase_bounds(plan_for(grid)) == {1: (1, 20), 2: (21, 30)}
    assert [plan[e - 1].lr for e in (1, 11, 21, 26)] == pytest.approx([0.1, (0.1 + 1e-5) / 2, 0.1, (0.1 + 1e-5) / 2],
                                                                    rel=1e-12)
    assert [plan[e - 1].weight_decay for e in (1, 9, 13, 17, 21, 29)] == [1e-4, 8e-4, 1.6e-3, 1.6e-3, 1e-4, 1.6e-3]
    for bad, field in (({"family": "cosine", "max": 0.1, "steps": 0}, "lr.steps"),
                       ({"family": "step", "values": [0.1], "steps": 2}, "lr.steps")):
        with pytest.raises(ConfigError) as e:
            RunConfig(lr=bad, epochs_per_step=[4], weight_decay=1e-4, grad_sparsity=0.0)
        assert e.value.field == field


def test_linear_warm_up_scales_the_first_epochs():
    config = RunConfig(lr={"family": "step", "values": [0.1, 0.01], "warmup": 4}, epochs_per_step=[5, 5],
                       weight_decay=1e-4, grad_sparsity=0.0)
    assert [e.lr for e in plan_for(config)][:6] == [0.1 * 1 / 4, 0.1 * 2 / 4, 0.1 * 3 / 4, 0.1, 0.1, 0.01]
    scaled = config.replace(epochs_scale=0.5)  # the warm-up scales like a step: 4 x 0.5 = 2 epochs
    assert [e.lr for e in plan_for(scaled)][:4] == [0.05, 0.1, 0.1, 0.01]


def test_step_family_spelled_as_a_mapping_is_todays_grid():
    plain = RunConfig()
    spelled = RunConfig(lr={"family": "step", "values": [0.1, 0.01, 0.001, 0.0001, 0.00001]})
    assert spelled == plain and run_key(spelled) == run_key(plain)


# ------------------------------------------------------------------------------------------ tapers


def test_power_law_alpha_0_is_a_constant_and_alpha_1_keeps_lr_times_value_fixed():
    constant = RunConfig(weight_decay=1e-4)
    power0 = RunConfig(weight_decay={"taper": "power", "ref": 1e-4, "alpha": 0})
    assert power0 == constant and run_key(power0) == run_key(constant) == "556bcbfc0ad1"
    power1 = RunConfig(weight_decay={"taper": "power", "ref": 1e-4, "ref_lr": 0.1, "alpha": 1})
    assert {round(e.lr * e.weight_decay, 18) for e in plan_for(power1)} == {1e-5}
    clipped = RunConfig(weight_decay={"taper": "power", "ref": 1e-4, "alpha": 1, "max": 0.002})
    assert clipped.weight_decay[0] == (1e-4, pytest.approx(1e-3, rel=1e-12), 0.002, 0.002, 0.002)


def test_a_table_of_the_learning_rate_equal_to_a_grid_is_that_grid():
    grid = RunConfig(weight_decay=[0.0001, 0.0001, 0.0008, 0.0016, 0.0016], grad_sparsity=0.0)
    table = RunConfig(weight_decay={"taper": "table", "values": {0.1: 0.0001, 0.001: 0.0008, 0.0001: 0.0016}},
                      grad_sparsity=0.0)
    assert table == grid and run_key(table) == run_key(grid)


def test_a_taper_limited_to_cycle_1_is_todays_phase_1_grid():
    grid = RunConfig(weight_decay=1e-4, grad_sparsity=[[0, 0, 0.5, 0.5, 0.5], [0] * 5, [0] * 5])
    taper = RunConfig(weight_decay=1e-4, grad_sparsity={"taper": "table", "values": {0.1: 0.0, 0.001: 0.5},
                                                         "cycles": [1]})
    assert run_key(taper) == run_key(grid)


def test_a_taper_on_cosine_varies_within_a_cycle_and_keys_by_its_values():
    cosine = {"family": "cosine", "max": 0.1, "min": 0.001}
    a = RunConfig(lr=cosine, epochs_per_step=[4, 4], grad_sparsity=0.0,
                  weight_decay={"taper": "power", "ref": 1e-4, "alpha": 1})
    plan = plan_for(a)
    assert [e.weight_decay for e in plan] == pytest.approx([1e-4 * 0.1 / e.lr for e in plan], rel=1e-12)
    assert a.weight_decay == ((1e-4,), (1e-4,)) and dict(a.per_epoch)["weight_decay"][1] > 1e-4
    same = RunConfig(lr=cosine, epochs_per_step=[4, 4], grad_sparsity=0.0,
                     weight_decay={"taper": "power", "ref": 1e-3, "ref_lr": 0.01, "alpha": 1})
    assert run_key(same) == run_key(a)  # another spelling of the same values
    assert RunConfig.from_dict(a.to_dict()) == a


def test_a_constant_batch_size_taper_is_the_batch_size():
    assert RunConfig(batch_sizes=[64] * 5) == RunConfig(batch_size=64)
    assert RunConfig(dropout=0.0, label_smoothing=[0.0] * 5) == RunConfig()


def test_runs_of_different_batch_schedules_never_share_a_pack():
    a, b = small(seed=1), small(seed=2, batch_sizes=[50, 25, 25])
    assert shape_of(a) != shape_of(b)
    with pytest.raises(ConfigError, match="batch_schedule"):
        check_shape([a, b])
    dropout = small(seed=2, dropout=[0.1, 0.2, 0.3], label_smoothing=0.1, weight_decay_mode="decoupled")
    assert shape_of(a) == shape_of(dropout)


@pytest.mark.parametrize("changes, field, says", [
    ({"lr": {"family": "cosine", "max": 0.1, "min": -0.01}}, "lr.min", "must be >= 0"),
    ({"lr": {"family": "cosine", "max": -0.1}}, "lr.max", "must be > 0"),
    ({"lr": {"family": "linear", "values": [0.1]}}, "lr.family", "unknown family 'linear'"),
    ({"lr": {"family": "step", "values": [0.1] * 5, "warmup": 500}}, "warmup_epochs", "longer than the run"),
    ({"dropout": -0.1}, "dropout[0][0]", "must be in [0, 1)"),
    ({"label_smoothing": {"taper": "power", "ref": 1.5}}, "label_smoothing", "must be in [0, 1), got 1.5 at epoch 1"),
    ({"batch_sizes": [50, 50, 12.5, 25, 25]}, "batch_sizes[0][2]", "must be a whole number >= 1"),
    ({"batch_sizes": [50, 25]}, "batch_sizes", "has 2 values, the schedule has 5 steps per phase"),
    ({"weight_decay": {"taper": "table", "values": {0.01: 1e-4, 0.001: 1e-3}}}, "weight_decay.values",
     "no value for lr 0.1, which is in force at epoch 1: the table's largest lr is 0.01"),
    ({"weight_decay": {"taper": "exponential", "ref": 1e-4}}, "weight_decay.taper", "unknown taper"),
    ({"weight_decay": {"taper": "power", "ref": 1e-4, "beta": 1}}, "weight_decay.beta", "unknown key"),
    ({"dropout": 0.1, "graph": True}, "graph", "does not support dropout"),
])
def test_bad_schedule_values_name_the_field(changes, field, says):
    with pytest.raises(ConfigError) as e:
        RunConfig(**changes)
    assert e.value.field == field and says in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------- what trains


class Seen(Callback):
    """What the classifier saw: per training batch (epoch, dropout rate, batch size, share of zeroed features)."""

    def __init__(self):
        self.epoch, self.batches = 1, []

    def on_epoch_end(self, epoch, metrics):
        self.epoch = epoch + 1

    def hook(self, module, args):
        if module.training:
            x = args[0]
            self.batches.append((self.epoch, self.model.dropout, x.shape[0], (x == 0).float().mean().item()))


TAPERED = dict(dropout=[0.0, 0.3, 0.6], batch_sizes=[50, 30, 75], label_smoothing=[0.0, 0.1, 0.2])


def test_dropout_batch_size_and_label_smoothing_in_force_on_a_real_run(monkeypatch):
    torch.set_num_threads(1)
    seen = Seen()
    built = training.loop.seeded_model

    def instrumented(config):
        model = built(config)
        seen.model = model
        model.fc.register_forward_pre_hook(seen.hook)
        return model

    monkeypatch.setattr(training.loop, "seeded_model", instrumented)
    tapered = train(small(seed=4, **TAPERED), [seen])
    by_epoch = {e: [(p, b) for ep, p, b, _ in seen.batches if ep == e] for e in (1, 2, 3)}
    assert by_epoch == {1: [(0.0, 50)] * 3, 2: [(0.3, 30)] * 5, 3: [(0.6, 75)] * 2}
    zeros = {e: sum(z for ep, _, _, z in seen.batches if ep == e) / len(by_epoch[e]) for e in (1, 2, 3)}
    assert zeros[1] < 0.05 and 0.2 < zeros[2] - zeros[1] < 0.4 and 0.5 < zeros[3] - zeros[1] < 0.7
    h = tapered.history
    assert [(m["dropout"], m["batch_size"], m["label_smoothing"]) for m in h] == [
        (0.0, 50.0, 0.0), (0.3, 30.0, 0.1), (0.6, 75.0, 0.2)]

    monkeypatch.setattr(training.loop, "seeded_model", built)
    plain = train(small(seed=4))
    assert without_timing(h)[0] == {**without_timing(plain.history)[0], "dropout": 0.0, "batch_size": 50.0,
                                    "label_smoothing": 0.0}  # epoch 1 tapers nothing: the same numbers
    assert h[1]["train_loss"] != plain.history[1]["train_loss"]
    for name in ("dropout", "batch_sizes", "label_smoothing"):  # each alone changes what trains
        alone = {k: (v if k == name else None) for k, v in TAPERED.items()}
        one = train(small(seed=4, **alone))
        assert one.history[1]["train_loss"] != plain.history[1]["train_loss"], name


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_tapered_runs_resume_bit_identically(tmp_path):
    torch.set_num_threads(1)
    config = small(seed=5, **TAPERED, weight_decay_mode="decoupled", weight_decay=[1e-3, 2e-3, 4e-3])
    whole = train(config, checkpoint_path=tmp_path / "whole.pt")
    with pytest.raises(Stop):
        train(config, [StopAfter(2)], checkpoint_path=tmp_path / "cut.pt")
    resumed = train(config, checkpoint_path=tmp_path / "cut.pt")
    assert resumed.resumed_from == 2
    assert without_timing(resumed.history) == without_timing(whole.history)
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_decoupled_decay_shrinks_by_wd_independent_of_lr():
    p = torch.nn.Parameter(torch.ones(4))
    opt = SparseSGD([p], momentum=0.0)
    opt.set_hyper(1e-6, 0.01, decoupled=True)
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 0.99), rtol=0, atol=1e-7)
    opt.set_masks([torch.tensor([1.0, 0.0, 1.0, 0.0])])
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.99 * 0.99, 0.99, 0.99 * 0.99, 0.99], abs=1e-7)


# ---------------------------------------------------------------------------------------------- packs


def members():
    """Different dropout and label-smoothing tapers (and decay modes) from epoch 1; sparsity on one."""
    return [small(seed=1, dropout=[0.3, 0.5, 0.5], label_smoothing=0.0),
            small(seed=2, dropout=0.0, label_smoothing=[0.2, 0.1, 0.0], weight_decay=[1e-3, 2e-3, 4e-3],
                  weight_decay_mode="decoupled"),
            small(seed=3, dropout=[0.1, 0.2, 0.3], label_smoothing=[0.05, 0.1, 0.1], grad_sparsity=0.3,
                  weight_decay_mode="decoupled", weight_decay=5e-3)]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def solo_reference(config):
    """Epoch 1 of ``training.loop.train`` in float64, from the same building blocks."""
    train_split, _ = load_splits(config, "cpu")
    batches = Batches(train_split, config.dataset, config.batch_size, augment=config.augment)
    model = training.loop.seeded_model(config).double()
    params = list(model.parameters())
    opt = SparseSGD(params, momentum=config.momentum)
    first = plan_for(config)[0]
    opt.set_hyper(first.lr, first.weight_decay, config.weight_decay_mode == "decoupled")
    if first.grad_sparsity:
        opt.set_masks(draw_masks(params, first.grad_sparsity, mask_seed(config.seed, 1)))
    model.dropout = first.dropout
    model.dropout_generator = dropout_generator(config.seed, 1, "cpu")
    model.train()
    for x, y in batches.epoch(torch.Generator().manual_seed(training.loop.epoch_seed(config.seed, 1))):
        loss = F.cross_entropy(model(x.double()), y, label_smoothing=first.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_a_pack_of_different_dropout_and_label_smoothing_tapers_matches_solo_in_float64(tmp_path):
    torch.set_num_threads(1)
    configs = members()
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    with pytest.raises(Stop):
        train_packed(configs, [[StopAfter(1)], [], []], checkpoint_paths=paths, dtype=torch.float64)
    for config, path in zip(configs, paths):
        model, opt = solo_reference(config)
        state = load_checkpoint(path)
        for key, value in model.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                assert rel(state["model"][key], value) <= 1e-5, (config.seed, key)
        buffers = state["optimizer"]["optimizer"]["state"]
        for j, p in enumerate(opt.params):
            assert rel(buffers[j]["momentum_buffer"], opt.optimizer.state[p]["momentum_buffer"]) <= 1e-5, j


def test_a_pack_of_different_tapers_reports_what_its_solo_runs_do():
    torch.set_num_threads(1)
    solo = [train(c) for c in members()]
    pack = train_packed(members())
    for s, p in zip(solo, pack.members):
        assert len(s.history) == len(p.history) == 3
        for epoch, (a, b) in enumerate(zip(s.history, p.history), start=1):
            # epoch 1 to the packed trainer's float32 tolerance (test_packed.py); later epochs drift apart in
            # float32 with BatchNorm as any two correct implementations do (the float64 test above is exact)
            tolerance = 1e-3 if epoch == 1 else 1e-2
            assert math.isclose(b["train_loss"], a["train_loss"], rel_tol=tolerance)
            assert math.isclose(b["test_loss"], a["test_loss"], rel_tol=tolerance)
            names = ("lr", "weight_decay", "dropout", "label_smoothing")
            assert [b.get(n) for n in names] == [a.get(n) for n in names]


def test_a_grid_replaced_after_resolution_wins_over_the_resolved_values():
    cosine = {"family": "cosine", "max": 0.1, "min": 0.001}
    tapered = RunConfig(lr=cosine, epochs_per_step=[4, 4], grad_sparsity=0.0,
                        weight_decay={"taper": "power", "ref": 1e-4, "alpha": 1})
    assert RunConfig.from_dict(tapered.to_dict()) == tapered
    changed = tapered.replace(weight_decay=5e-4)
    assert changed.per_epoch == () and {e.weight_decay for e in plan_for(changed)} == {5e-4}
