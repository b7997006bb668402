"""Stopping a run cleanly: SIGINT and SIGTERM (a scheduler's preemption) let the trainer finish and save.

A signal stops a run at the end of the round (PPO) or generation batch (GRPO) it arrives in, the last one
included: the run saves ``checkpoint-N/`` there, not ``final/``, and its trainer reports ``stopped_by``, so
that the command, or a suite, stops as after any other round; resuming the run saves ``final/``. A signal that
arrives during the final save lets the save finish (the run is then complete) and is reported all the same.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

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

    def received_anywhere(self, accelerator) -> str | None:
        """The signal this process received, "a signal on another process" when only another one did, or None.
        A collective: every process calls it at the same point, so that all stop after the same round."""
        anywhere = accelerator.reduce(torch.tensor(float(self.received is not None), device=accelerator.device),
                                      "max").item()
        return (self.received or "a signal on another process") if anywhere else None

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
