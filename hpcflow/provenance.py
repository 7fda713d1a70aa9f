"""Provenance: what produced a result (versions, git commit, config), stored with outputs."""

from __future__ import annotations

import os
import subprocess

__all__ = ["git_commit", "provenance"]


def git_commit() -> str | None:
    """Commit of the hpcflow checkout, with '-dirty' if it has local changes; None if not a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(extra: dict | None = None) -> dict:
    """Versions and commit, for summaries, checkpoints and ensemble attributes."""
    import sys

    import numpy
    import torch

    import hpcflow

    out = {
        "hpcflow": hpcflow.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    if extra:
        out.update(extra)
    return out
