"""Plots at the end of ``hpcflow sample`` (and of a flow ``hpcflow run``): ``run.plots``."""

from __future__ import annotations

from typing import Any

__all__ = ["write_plots_safely"]


def write_plots_safely(out_dir: str, say: Any = print) -> None:
    """``hpcflow.analysis.plots.write_plots(out_dir)``; a failure is one warning line, never an
    error (the run it follows succeeded)."""
    import os

    try:
        from hpcflow.analysis.plots import write_plots

        paths = write_plots(out_dir, log=say)
        if paths:
            say(f"hpcflow: plots: {len(paths)} files in {os.path.dirname(str(paths[0]))}")
    except Exception as e:  # noqa: BLE001 - plots never change the exit status of a finished run
        msg = str(e).splitlines()[0] if str(e) else ""
        say(f"hpcflow: warning: plots not written ({type(e).__name__}: {msg[:200]}); "
            f"retry with 'hpcflow plot {out_dir}' (run.plots: false skips them)")
