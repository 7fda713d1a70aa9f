"""Plots at the end of ``hpcflow run`` and ``hpcflow sample``: ``run.plots``, and the
environment variable ``HPCFLOW_PLOTS=off`` (``0``, ``false``, ``no``) that skips them for every
run of a session (many short jobs, a campaign's workers, the test suite: matplotlib's import
and the drawing cost 2-6 s per run). ``hpcflow plot`` draws them later either way."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["PLOTS_ENV", "plots_disabled", "write_plots_safely"]

PLOTS_ENV = "HPCFLOW_PLOTS"


def plots_disabled() -> bool:
    """True when ``HPCFLOW_PLOTS`` says off (``off``, ``0``, ``false``, ``no``; any case)."""
    return os.environ.get(PLOTS_ENV, "").strip().lower() in ("off", "0", "false", "no")


def write_plots_safely(out_dir: str, say: Any = print) -> None:
    """``hpcflow.analysis.plots.write_plots(out_dir)``; a failure is one warning line, never an
    error (the run it follows succeeded). Nothing when :func:`plots_disabled`."""
    if plots_disabled():
        return
    try:
        from hpcflow.analysis.plots import write_plots

        paths = write_plots(out_dir, log=say)
        if paths:
            say(f"hpcflow: plots: {len(paths)} files in {os.path.dirname(str(paths[0]))}")
    except Exception as e:  # noqa: BLE001 - plots never change the exit status of a finished run
        msg = str(e).splitlines()[0] if str(e) else ""
        say(f"hpcflow: warning: plots not written ({type(e).__name__}: {msg[:200]}); "
            f"retry with 'hpcflow plot {out_dir}' (run.plots: false skips them)")
