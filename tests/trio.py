"""Three tiny digits runs of one shape that a pack (fused or on streams) trains together: 150 images at
batch 50, so every epoch is exactly 3 steps; one phase of 3 one-epoch steps."""

from training import RunConfig

TIMING = {"epoch_seconds", "images_per_second"}
BASE = dict(arch="resnet8", dataset="digits", train_subset=150, label_noise=0.1, lr=[0.1, 0.05, 0.02],
            epochs_per_step=(1,))


def trio() -> list[RunConfig]:
    """Different seeds; member 1 tapers weight decay up, member 2 tapers sparsity up (masks from epoch 1)."""
    return [RunConfig(seed=1, weight_decay=1e-4, grad_sparsity=0.0, **BASE),
            RunConfig(seed=2, weight_decay=[5e-4, 1e-3, 2e-3], grad_sparsity=0.0, **BASE),
            RunConfig(seed=3, weight_decay=1e-4, grad_sparsity=[0.3, 0.5, 0.5], **BASE)]


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]
