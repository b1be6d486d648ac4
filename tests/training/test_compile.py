"""``train.compile`` (torch.compile), a speed option: the same run (key, checkpoint format) and the same
numbers up to float rounding, solo and packed. Slow: compiling takes a minute per model on the CPU."""

import math

import pytest
import torch
from stops import Stop, StopAfter
from torch._dynamo.utils import counters

from orchestrator.identity import run_key
from training import RunConfig, train
from training.checkpoint import load_checkpoint
from training.packed import train_packed

pytestmark = pytest.mark.slow

BASE = RunConfig(arch="resnet8", dataset="digits", train_subset=150, lr=[0.1, 0.05, 0.02], epochs_per_step=(1,),
                 weight_decay=1e-4, grad_sparsity=0.0)


def close(a, b, rel):
    return all(math.isclose(a[k], b[k], rel_tol=rel) for k in ("train_loss", "test_loss"))


def test_compiled_training_is_the_same_run_and_resumes_eagerly(tmp_path):
    torch.set_num_threads(2)
    compiled = BASE.replace(seed=1, compile=True)
    assert run_key(compiled) == run_key(BASE.replace(seed=1))
    eager = train(BASE.replace(seed=1))
    path = tmp_path / "c.pt"
    counters.clear()
    with pytest.raises(Stop):
        train(compiled, [StopAfter(2)], checkpoint_path=path)
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    state = load_checkpoint(path)
    assert list(state["model"]) == list(eager.model.state_dict())  # no torch.compile prefixes
    resumed = train(BASE.replace(seed=1), checkpoint_path=path)  # eager, from the compiled run's checkpoint
    assert resumed.resumed_from == 2 and len(resumed.history) == 3
    for h, e in zip(resumed.history, eager.history):
        assert close(h, e, 1e-2), (h, e)


def test_a_compiled_pack_trains_as_the_eager_pack():
    torch.set_num_threads(2)
    configs = [BASE.replace(seed=1), BASE.replace(seed=2, weight_decay=5e-4)]
    eager = train_packed(configs)
    counters.clear()
    compiled = train_packed([c.replace(compile=True) for c in configs])
    assert counters["stats"]["unique_graphs"] >= 1
    for a, b in zip(compiled.members, eager.members):
        for h, e in zip(a.history, b.history):
            assert close(h, e, 1e-2), (h, e)
