"""The kernel backend names: defined once, here, for the config and the dispatch.

A leaf module without torch, so that ``hpcflow.config`` (which offers these names as the
choices of its ``backend`` key) can import it without loading torch; ``.dispatch`` imports
it too and resolves ``auto`` to one of the others.
"""

from __future__ import annotations

__all__ = ["BACKENDS"]

BACKENDS = ("auto", "torch", "host", "cuda")
