"""Signal-to-flag handling for long jobs (sampling and training).

Batch systems ask a job to stop before its time limit (Slurm ``--signal=B:USR1@120``,
SIGTERM on preemption or ``scancel``); a user presses Ctrl-C (SIGINT). :class:`StopFlag`
turns SIGTERM, SIGUSR1 and SIGINT into a flag that the main loop polls between steps: the
loop finishes (or drops) the current step, checkpoints, and exits with status 3
(``hpcflow.run.cli.EXIT_RESUMABLE``, "stopped, resumable": rerun the same command). Nothing is
done inside the handler itself, which is the only async-signal-safe choice in Python.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Self

__all__ = ["STOP_SIGNALS", "StopFlag"]

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopFlag:
    """Context manager that installs handlers for :data:`STOP_SIGNALS` and restores the old ones.

    ``flag.stop_requested`` becomes True on the first signal; ``flag.signal_name`` names it.
    ``flag.request(name)`` sets it by hand (tests, collective stop decided by another rank).
    Outside the main thread (where Python cannot install handlers) it is a plain flag.
    """

    def __init__(self, signals: tuple[str, ...] = STOP_SIGNALS) -> None:
        for s in signals:
            if not hasattr(signal, s):
                raise ValueError(f"signals: unknown signal {s!r}; allowed: names in the signal module, "
                                 f"e.g. {', '.join(STOP_SIGNALS)}")
        self.signals = signals
        self.stop_requested = False
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def request(self, name: str = "request") -> None:
        if not self.stop_requested:
            self.signal_name = name
        self.stop_requested = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                num = getattr(signal, s)
                self._old[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for num, old in self._old.items():
            signal.signal(num, old)
        self._old.clear()
