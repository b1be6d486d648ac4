"""Run keys: same result-changing values, same key; anything else, another key."""

import dataclasses
import hashlib
from pathlib import Path

import pytest

from orchestrator.identity import group_key, run_key
from orchestrator.sweep.expand import expand
from orchestrator.sweep.file import load_sweep
from training.config import RunConfig

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"

BASE = RunConfig(arch="resnet14", dataset="cifar10", seed=0)

# One changed value for every field that changes the result.
CHANGES = {
    "arch": "resnet32",
    "dataset": "cifar100",
    "seed": 1,
    "lr": [0.1, 0.01, 0.001, 0.0001, 0.00002],
    "epochs_per_step": [50, 20, 10],
    "weight_decay": [[1e-4] * 5, [1e-4] * 5, [1e-4, 1e-4, 1e-4, 1e-4, 2e-4]],
    "grad_sparsity": [[0, 0, 0, 0, 0.5], [0] * 5, [0] * 5],
    "momentum": 0.8,
    "batch_size": 64,
    "epochs_scale": 0.5,
    "train_subset": 100,
    "label_noise": 0.1,
    "augment": False,
    "validation": 0.1,
    "variant": "study-a/trial-3",
    "precision": "bf16",
    "warmup_epochs": 2,
    "weight_decay_mode": "decoupled",
    "dropout": 0.1,
    "label_smoothing": 0.1,
    "batch_sizes": [50, 50, 25, 25, 25],
    "per_epoch": {"dropout": [0.1] * 225 + [0.2] * 225},
}
SHAPE_ONLY = {"lr_family", "lr_min"}
"""Fields that count only together with another (cosine needs one rate per cycle, lr_min is the cosine's):
tests/training/test_tapers.py."""
NOT_IDENTITY = {"scheme": "renamed", "data_dir": "/elsewhere", "eval_batch_size": 7, "allow_unofficial_data": True,
                "compile": True, "graph": True}


def test_changes_cover_every_field():
    assert set(CHANGES) | set(NOT_IDENTITY) | SHAPE_ONLY == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_result_changing_field_changes_run_key(field):
    changed = BASE.replace(**{field: CHANGES[field]})
    assert run_key(changed) != run_key(BASE)
    assert (group_key(changed) == group_key(BASE)) == (field == "seed")


@pytest.mark.parametrize("field", sorted(NOT_IDENTITY))
def test_labels_and_paths_do_not_change_keys(field):
    changed = BASE.replace(**{field: NOT_IDENTITY[field]})
    assert (run_key(changed), group_key(changed)) == (run_key(BASE), group_key(BASE))


def test_same_values_written_differently_give_the_same_key():
    per_step = BASE.replace(weight_decay=[1e-4] * 5, momentum=0.9, epochs_scale=1)
    per_phase = BASE.replace(weight_decay=[[0.0001] * 5] * 3, epochs_per_step=(50, 20, 20))
    assert run_key(per_step) == run_key(per_phase) == run_key(BASE)


def test_pinned_key():
    """Changing the canonical form or the hash would orphan every logged run: do it on purpose only."""
    config = RunConfig(arch="resnet32", dataset="cifar10", seed=3, weight_decay=0.001)
    canonical = (
        '{"arch":"resnet32","augment":true,"batch_size":50,"dataset":"cifar10","epochs_per_step":[50,20,20],'
        '"epochs_scale":1.0,"grad_sparsity":[[0.0,0.0,0.0,0.0,0.0],[0.0,0.0,0.0,0.0,0.0],[0.0,0.0,0.0,0.0,0.0]],'
        '"label_noise":0.0,"lr":[[0.1,0.01,0.001,0.0001,1e-05],[0.1,0.01,0.001,0.0001,1e-05],'
        '[0.1,0.01,0.001,0.0001,1e-05]],"momentum":0.9,"seed":3,"train_subset":0,'
        '"weight_decay":[[0.001,0.001,0.001,0.001,0.001],[0.001,0.001,0.001,0.001,0.001],'
        '[0.001,0.001,0.001,0.001,0.001]]}'
    )
    assert run_key(config) == hashlib.sha256(canonical.encode()).hexdigest()[:12] == "e050a03e8cc4"
    assert group_key(config) == "ff3679816c48"


def test_table1_keys():
    runs = [p.config for p in expand(load_sweep(SWEEPS / "table1.yaml"))]
    assert len({run_key(c) for c in runs}) == 200
    assert len({group_key(c) for c in runs}) == 40
    assert all(len(run_key(c)) == 12 and int(run_key(c), 16) >= 0 for c in runs)


SWEEP_A = """\
name: order
experiment: e
datasets: [digits, cifar10]
archs: [resnet14]
seeds: [0, 1]
schedule: {lr: [0.1, 0.01, 0.001, 0.0001, 0.00001], epochs_per_step: [50, 20, 20]}
train: {batch_size: 50, momentum: 0.9, label_noise: 0.3, epochs_scale: 0.1}
schemes:
  "01": {weight_decay: [0.0001, 0.0001, 0.0008, 0.0016, 0.0016], grad_sparsity: 0}
  wd: {weight_decay: 1e-4}
"""
# The same sweep with every mapping's keys (and the list orders) shuffled, values written otherwise.
SWEEP_B = """\
schemes:
  wd: {grad_sparsity: [0, 0, 0, 0, 0], weight_decay: 0.0001}
  "01": {grad_sparsity: 0.0, weight_decay: [1.0e-4, 1.0e-4, 8.0e-4, 1.6e-3, 1.6e-3]}
train: {epochs_scale: 0.1, label_noise: 0.3, momentum: 0.9, batch_size: 50, data_dir: /somewhere/else}
seeds: [1, 0]
schedule: {epochs_per_step: [50, 20, 20], lr: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]}
archs: [resnet14]
datasets: [cifar10, digits]
experiment: another-experiment
name: reordered
"""


def test_key_does_not_depend_on_yaml_order_or_spelling(tmp_path):
    keys = []
    for text in (SWEEP_A, SWEEP_B):
        (tmp_path / "s.yaml").write_text(text)
        planned = expand(load_sweep(tmp_path / "s.yaml"))
        keys.append({(p.config.scheme, p.config.dataset, p.config.seed): run_key(p.config) for p in planned})
    assert len(keys[0]) == 8
    assert keys[0] == keys[1]
