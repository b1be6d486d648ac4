"""Fields added to RunConfig after runs were logged change no existing run key."""

import dataclasses

import pytest

from orchestrator.identity import group_key, run_key
from training.config import ConfigError, RunConfig

# Computed with orchestrator.identity before validation / variant / precision / allow_unofficial_data existed.
PINNED = [
    (RunConfig(), "556bcbfc0ad1", "466396f9e8da"),
    (RunConfig(arch="resnet32", dataset="cifar10", seed=3, train_subset=100, label_noise=0.3, epochs_scale=0.1,
               weight_decay=8e-3), "7cdf170ddcb7", "98ded14abbf2"),
]
NEW_FIELDS = {"validation": 0.1, "variant": "study-a/trial-3", "precision": "bf16", "warmup_epochs": 2,
              "weight_decay_mode": "decoupled"}
NORMALISED_FIELDS = {  # issue 15: set in a normalised form (a grid, per-epoch values), tested in test_tapers.py
    "lr_family", "lr_min", "dropout", "label_smoothing", "batch_sizes", "per_epoch"}


@pytest.mark.parametrize("config, key, group", PINNED)
def test_keys_of_existing_configs_are_unchanged(config, key, group):
    assert (run_key(config), group_key(config)) == (key, group)
    assert not set(NEW_FIELDS) & set(config.identity_dict())
    assert "allow_unofficial_data" not in config.identity_dict()


@pytest.mark.parametrize("field, value", sorted(NEW_FIELDS.items()))
def test_new_fields_count_when_set(field, value):
    base = PINNED[1][0]
    changed = base.replace(**{field: value})
    assert changed.identity_dict() == {**base.identity_dict(), field: value}
    assert run_key(changed) != run_key(base) and group_key(changed) != group_key(base)
    assert run_key(changed.replace(**{field: getattr(base, field)})) == run_key(base)  # back to the default


def test_allow_unofficial_data_never_counts():
    base = PINNED[1][0]
    assert run_key(base.replace(allow_unofficial_data=True)) == run_key(base)


def test_if_set_fields_are_the_new_ones():
    marked = {f.name: f.metadata.get("identity", True) for f in dataclasses.fields(RunConfig)}
    assert {k for k, v in marked.items() if v == "if_set"} == set(NEW_FIELDS) | NORMALISED_FIELDS


@pytest.mark.parametrize("field, value, message", [
    ("validation", 1.0, "validation: must be in [0, 1)"),
    ("validation", -0.1, "validation: must be in [0, 1)"),
    ("validation", True, "validation: must be in [0, 1)"),
    ("precision", "fp16", "precision: unknown precision 'fp16' (expected one of fp32, tf32, bf16)"),
    ("variant", 3, "variant: must be a string, got 3"),
    ("allow_unofficial_data", "yes", "allow_unofficial_data: must be true or false, got 'yes'"),
    ("compile", 1, "compile: must be true or false, got 1"),
])
def test_new_fields_are_validated(field, value, message):
    with pytest.raises(ConfigError) as info:
        RunConfig(**{field: value})
    assert str(info.value).startswith(message) and info.value.field == field


def test_round_trip_through_dict():
    config = RunConfig(validation=0.25, variant="v", precision="tf32", allow_unofficial_data=True)
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.validation == 0.25 and isinstance(RunConfig(validation=0).validation, float)
