"""A callback that stops a training at a given epoch, as a crash would (after that epoch's checkpoint)."""

from training import Callback


class Stop(Exception):
    """Raised by ``StopAfter``."""


class StopAfter(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.epoch:
            raise Stop()
