"""Whether the tracking store answers again, probed in the background while it is thought down."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

PROBE_EVERY_S = 5.0


class StoreWatch:
    """Whether the tracking store answers, probed in the background while it is thought down."""

    def __init__(self, probe: Callable[[], bool] | None, every_s: float = PROBE_EVERY_S):
        self.probe, self.every_s = probe, every_s
        self.down_since: float | None = None  # monotonic
        self._thread: threading.Thread | None = None
        self._last = 0.0
        self._ok = False

    def mark_down(self) -> bool:
        """Note an outage; True if it is news."""
        if self.down_since is not None:
            return False
        self.down_since = time.monotonic()
        return True

    def poll(self) -> bool | None:
        """While down: start a probe now and then; True once the store answers again."""
        if self.down_since is None or self.probe is None:
            return None
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
            if self._ok:
                self.down_since = None
                return True
        now = time.monotonic()
        if self._thread is None and now - self._last >= self.every_s:
            self._last, self._ok = now, False

            def run() -> None:
                with contextlib.suppress(Exception):
                    self._ok = bool(self.probe())

            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()
        return None
