"""Stopping a run cleanly: SIGINT and SIGTERM (a scheduler's preemption) let the trainer finish and save."""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)


class FinishOnSignal:
    """While active, SIGINT and SIGTERM only set ``received`` (the signal's name), so that a trainer can finish
    its round (PPO) or generation batch (GRPO) and save. A second signal acts as usual (stops at once)."""

    def __enter__(self):
        self.received, self._previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing this round or step, then saving a checkpoint "
                       "(send it again to stop now)", self.received)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
