"""The epoch loop: exact resume, frozen sparse entries, divergence, checkpoint-before-callback."""

import pytest
import torch
from stops import Stop, StopAfter

from training import Callback, RunConfig, train
from training.callbacks import METRICS, history_metrics, metric_names
from training.checkpoint import load_checkpoint
from training.loop import Diverged

TIMING = {"epoch_seconds", "images_per_second"}
SPARSE = [[0, 0, 0.5, 0.5, 0.5], [0] * 5, [0] * 5]


def small(**kw):
    base = dict(arch="resnet8", dataset="digits", seed=1, epochs_scale=0.02, train_subset=150,
                grad_sparsity=SPARSE, weight_decay=[1e-4, 1e-4, 8e-4, 1.6e-3, 1.6e-3], label_noise=0.1)
    base.update(kw)
    return RunConfig(**base)


def result_metrics(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


@pytest.fixture(scope="module")
def uninterrupted():
    torch.set_num_threads(1)
    return train(small(), device="cpu")


def test_plan_length_and_metric_names(uninterrupted):
    assert len(uninterrupted.history) == 15
    assert [int(h["epoch"]) for h in uninterrupted.history] == list(range(1, 16))
    assert set(uninterrupted.history[0]) == {"epoch", *METRICS}
    for h in uninterrupted.history:
        assert 0 <= h["train_error"] <= 1 and 0 <= h["test_error"] <= 1
        assert h["images_per_second"] > 0 and h["epoch_seconds"] > 0


def test_updated_fraction_follows_sparsity(uninterrupted):
    for h in uninterrupted.history:
        if h["grad_sparsity"] == 0.5:
            assert 0.45 <= h["updated_fraction"] <= 0.5 + 1e-6, h
        else:
            assert h["updated_fraction"] > 0.95, h


def test_resume_after_crash_is_bit_identical(uninterrupted, tmp_path):
    torch.set_num_threads(1)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(Stop):
        train(small(), [StopAfter(7)], device="cpu", checkpoint_path=ckpt)  # crashes inside the sparse phase
    assert load_checkpoint(ckpt)["epoch"] == 7
    resumed = train(small(), device="cpu", checkpoint_path=ckpt)
    assert resumed.resumed_from == 7
    assert result_metrics(resumed.history) == result_metrics(uninterrupted.history)
    for (name, a), b in zip(resumed.model.state_dict().items(), uninterrupted.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_is_durable_before_callbacks(tmp_path):
    ckpt = tmp_path / "c.pt"
    seen = []

    class Check(Callback):
        def on_epoch_end(self, epoch, metrics):
            seen.append(load_checkpoint(ckpt)["epoch"] == epoch)

    train(small(epochs_scale=0.01, grad_sparsity=0.0), [Check()], checkpoint_path=ckpt)
    assert seen and all(seen)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_of_another_config_is_refused(tmp_path):
    ckpt = tmp_path / "c.pt"
    train(small(epochs_scale=0.01), checkpoint_path=ckpt)
    from training.loop import CheckpointMismatch

    with pytest.raises(CheckpointMismatch):
        train(small(epochs_scale=0.01, seed=2), checkpoint_path=ckpt)


def test_divergence_names_the_epoch():
    with pytest.raises(Diverged, match=r"^diverged at epoch 1: train loss is nan$") as info:
        train(small(lr=1e12, grad_sparsity=0.0))
    assert info.value.metric == "train_loss"


class NanInEval(torch.nn.Module):
    """A model that trains normally and emits NaN logits in evaluation mode."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out if self.training else out * float("nan")


def test_divergence_in_evaluation_names_the_metric(monkeypatch, tmp_path):
    import training.core as core

    build = core.build_model
    monkeypatch.setattr(core, "build_model", lambda *args: NanInEval(build(*args)))
    seen = []

    class Seen(Callback):
        def on_epoch_end(self, epoch, metrics):
            seen.append(epoch)

    ckpt = tmp_path / "c.pt"
    with pytest.raises(Diverged, match=r"^diverged at epoch 1: test loss is nan$") as info:
        train(small(epochs_scale=0.01, grad_sparsity=0.0), [Seen()], checkpoint_path=ckpt)
    assert (info.value.epoch, info.value.metric) == (1, "test_loss")
    assert seen == [] and not ckpt.exists()  # a diverged epoch is neither checkpointed nor reported


def test_validation_run_reports_val_metrics_and_never_loads_the_test_split(monkeypatch):
    import training.data as data

    def refuse(config):
        raise AssertionError("the test split was loaded")

    monkeypatch.setattr(data, "load_test_arrays", refuse)
    config = small(epochs_scale=0.01, grad_sparsity=0.0, validation=0.2)
    names = metric_names(config)
    assert names == ("train_loss", "train_error", "val_loss", "val_error", *METRICS[4:])
    assert metric_names(small()) == METRICS
    seen = []

    class Seen(Callback):
        def on_epoch_end(self, epoch, metrics):
            seen.append(tuple(metrics))

    result = train(config, [Seen()])
    assert seen == [names] * 15
    assert all(tuple(history_metrics(h)) == names for h in result.history)
    assert all(0 <= h["val_error"] <= 1 for h in result.history)


def test_history_metrics_returns_every_metric():
    entry = {"epoch": 3.0, "train_loss": 1, "val_loss": 2.5, "val_error": 0.25, "custom": 7}
    assert history_metrics(entry) == {"train_loss": 1.0, "val_loss": 2.5, "val_error": 0.25, "custom": 7.0}


def short(**kw):
    """Two epochs of one learning-rate step on 150 digits."""
    return small(lr=[0.1], epochs_per_step=[2], weight_decay=1e-4, grad_sparsity=0.0, **kw)


def test_precision_bf16_autocasts_and_tf32_is_fp32_on_the_cpu(monkeypatch):
    import training.core as core

    torch.set_num_threads(1)
    dtypes = []
    build = core.build_model

    def recording(*args):
        model = build(*args)
        model.fc.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
        return model

    monkeypatch.setattr(core, "build_model", recording)
    fp32 = train(short())
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = train(short(precision="bf16"))
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    a, b = fp32.history[0], bf16.history[0]
    assert a["train_loss"] != b["train_loss"]  # another arithmetic ...
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)  # ... for the same training
    assert result_metrics(train(short(precision="tf32")).history) == result_metrics(fp32.history)


@pytest.mark.parametrize("precision, mode", [("fp32", "ieee"), ("tf32", "tf32"), ("bf16", "tf32")])
def test_precision_mode_sets_cuda_flags_for_the_run_only(precision, mode):
    from training.loop import precision_mode

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with precision_mode(precision, torch.device("cpu")):
        assert (matmul.fp32_precision, conv.fp32_precision) == before
    with precision_mode(precision, torch.device("cuda")):  # only sets flags: no GPU needed
        assert (matmul.fp32_precision, conv.fp32_precision) == (mode, mode)
    assert (matmul.fp32_precision, conv.fp32_precision) == before
