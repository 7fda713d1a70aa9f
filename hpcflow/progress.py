"""Progress reports for ``hpcflow run``, ``sample`` and ``train``: a bar on a terminal, plain
lines in batch jobs.

:class:`Progress` ``(total, desc, initial=0, stream=sys.stderr)`` shows a tqdm bar when the
stream is a terminal. Otherwise (a batch job's log file, a pipe) it writes one plain line,
never a carriage return, whenever another ``every_percent`` (10) percent of the steps are done
or ``every_seconds`` (60) seconds have passed since the last line, and a last line at
:meth:`close`::

    hpcflow sample chain 0: step 120/250 (48%), 3.21 steps/s, ETA 40 s, acceptance 0.812

(rate and ETA over the steps of this process; ``acceptance`` over the steps reported with an
``accepted`` flag, left out when none was; ``postfix`` values such as the training loss are
appended as ``key value``). A disabled progress writes nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["ChainProgress", "Progress", "format_seconds", "is_terminal", "time_split"]


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if s != s or s == float("inf"):
        return "?"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class Progress:
    """Progress of ``total`` steps (module docstring). ``update(n, accepted=None)`` after each
    step; ``set_postfix(**kv)`` for extra values; ``close()`` at the end (idempotent)."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, every_percent: float = 10.0, every_seconds: float = 60.0,
                 unit: str = "step", tty: bool | None = None) -> None:
        self.total, self.desc, self.n, self.start_n = int(total), desc, int(initial), int(initial)
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.every_percent, self.every_seconds, self.unit = float(every_percent), float(every_seconds), unit
        self.tty = is_terminal(self.stream) if tty is None else bool(tty)
        self.n_acc = self.n_flag = 0
        self.postfix: dict[str, Any] = {}
        self.t0 = self._last_t = time.monotonic()
        self._last_pct = self._pct_bucket(self.n)
        self.lines = 0
        self._last_n = self.n
        self._bar: Any = None
        self._closed = False
        if self.enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, mininterval=1.0, dynamic_ncols=True,
                             file=self.stream)

    def _pct_bucket(self, n: int) -> int:
        if self.total <= 0 or self.every_percent <= 0:
            return 0
        return int(100.0 * n / self.total // self.every_percent)

    def update(self, n: int = 1, accepted: bool | None = None) -> None:
        self.n += n
        if accepted is not None:
            self.n_flag += 1
            self.n_acc += int(bool(accepted))
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        b = self._pct_bucket(self.n)
        if b > self._last_pct or now - self._last_t >= self.every_seconds:
            self._last_pct = b
            self._write(now)

    def set_postfix(self, **kv: Any) -> None:
        self.postfix.update(kv)
        if self._bar is not None:
            self._bar.set_postfix(**self.postfix)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        dt = now - self.t0
        done = self.n - self.start_n
        rate = done / dt if dt > 0 else float("nan")
        eta = (self.total - self.n) / rate if rate and rate == rate and rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        s = f"{self.desc}: {self.unit} {self.n}/{self.total} ({pct:.0f}%), "
        s += (f"{rate:.3g}" if rate < 100 else f"{rate:.0f}") + f" {self.unit}s/s" if rate == rate else "- steps/s"
        s += f", ETA {format_seconds(eta)}" if self.n < self.total else f", {format_seconds(dt)}"
        if self.n_flag:
            s += f", acceptance {self.n_acc / self.n_flag:.3f}"
        for k, v in self.postfix.items():
            s += f", {k} {v}"
        return s

    def _write(self, now: float) -> None:
        self._last_t, self._last_n = now, self.n
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.lines += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n > self.start_n and self.n != self._last_n:
            self._write(time.monotonic())


class ChainProgress:
    """A chain's progress callback ``(step, info)`` (``hpcflow.sampling.chain.Chain``): a
    :class:`Progress` created at the first step (when a resumed chain knows where it
    continues); acceptance over the steps that are not heat-bath sweeps."""

    def __init__(self, chain: Any, enabled: bool, desc: str) -> None:
        self.chain, self.enabled, self.desc = chain, enabled, desc
        self.bar: Progress | None = None

    def __call__(self, step: int, info: Any) -> None:
        if self.bar is None:
            self.bar = Progress(self.chain.total, self.desc, initial=step - 1, enabled=self.enabled)
        self.bar.update(1, accepted=None if info.kind == "heatbath" else bool(info.accepted))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def time_split(total: float, measure: float) -> str:
    """``hpcflow: time 12.3 s: updates 10.1 s (82%), measurements 2.2 s (18%)``."""
    upd = max(0.0, total - measure)
    p_upd, p_meas = (100.0 * upd / total, 100.0 * measure / total) if total > 0 else (0.0, 0.0)
    return (f"hpcflow: time {total:.1f} s: updates {upd:.1f} s ({p_upd:.0f}%), measurements "
            f"{measure:.1f} s ({p_meas:.0f}%)")
