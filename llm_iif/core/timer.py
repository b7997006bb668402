"""Wall-clock timing of a round's phases."""

from __future__ import annotations

import time
from contextlib import contextmanager


class PhaseTimer:
    """Seconds spent in named phases, summed over repeated entries.

        timer = PhaseTimer()
        with timer.phase("generate"):
            ...
        timer.as_metrics()  # {"time_generate_s": 0.41}
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_metrics(self) -> dict[str, float]:
        """``time_<phase>_s`` for every phase, the form metrics and timings.jsonl use."""
        return {f"time_{name}_s": seconds for name, seconds in self.seconds.items()}
