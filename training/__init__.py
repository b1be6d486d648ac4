"""adareg's training package: plain PyTorch, usable from a notebook.

    from training import RunConfig, train
    result = train(RunConfig(arch="resnet14", dataset="digits", epochs_scale=0.04), device="cpu")

Heavy modules (torch) load on first use, so that ``training.config`` stays cheap to import.
"""

from training.config import ConfigError, RunConfig

__all__ = ["RunConfig", "ConfigError", "train", "Callback", "TrainResult", "Diverged", "METRICS"]


def __getattr__(name: str):
    if name in ("train", "Callback", "TrainResult", "Diverged", "METRICS"):
        from training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
