"""Bijections of the circle [0, 2 pi): the kernels of U(1) coupling layers.

The kernels live in :mod:`hpcflow.flows.kernels1d` with their interval twins (SU(N) layers);
this module keeps the circle names importable where they always were.
"""

from hpcflow.flows.kernels1d import (
    TWO_PI,
    CircularKernel,
    CircularSplineKernel,
    NCPMixtureKernel,
    make_kernel,
)

__all__ = ["TWO_PI", "CircularKernel", "CircularSplineKernel", "NCPMixtureKernel", "make_kernel"]
