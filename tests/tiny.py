"""A one-run sweep small enough to train in a test (ResNet-8, 100 digits, 2 epochs), and ``adareg`` run in the
test's process with the CLI's own error handling."""

import pytest

TINY = """\
name: tiny
experiment: adareg-tiny
datasets: [digits]
archs: [resnet8]
seeds: [0]
schedule: {lr: [0.1, 0.01], epochs_per_step: [1]}
train: {batch_size: 50, train_subset: 100}
schemes:
  a: {weight_decay: [0.0001, 0.001]}
"""


def adareg(capsys, *argv: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``adareg ARGV``."""
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err
