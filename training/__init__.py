"""adareg's training package: plain PyTorch, usable from a notebook.

    from training import RunConfig, train
    result = train(RunConfig(arch="resnet14", dataset="digits", epochs_scale=0.04), device="cpu")

Heavy modules (torch) load on first use, so that ``training.config`` stays cheap to import.
"""

from training.callbacks import METRICS, Callback, metric_names
from training.config import ConfigError, DataError, RunConfig

__all__ = ["RunConfig", "ConfigError", "DataError", "train", "Callback", "TrainResult", "Diverged", "METRICS",
           "CheckpointError", "metric_names"]


def __getattr__(name: str):
    if name in ("train", "TrainResult", "Diverged"):
        from training import loop

        return getattr(loop, name)
    if name == "CheckpointError":
        from training import checkpoint

        return checkpoint.CheckpointError
    raise AttributeError(f"module 'training' has no attribute {name!r}")
