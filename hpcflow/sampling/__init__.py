"""hpcflow.sampling: Markov chain updates (HMC, heat bath, overrelaxation, ...)."""

from hpcflow.sampling.heatbath import (
    checkerboard_masks,
    heatbath_or_sweep,
    heatbath_substep,
    heatbath_sweep,
    overrelax_substep,
    overrelax_sweep,
    staple_mu,
)
from hpcflow.sampling.hmc import (
    HMC,
    force,
    hamiltonian,
    kinetic_energy,
    leapfrog,
    omelyan,
    sample_momenta,
)

__all__ = [
    "HMC",
    "checkerboard_masks",
    "force",
    "hamiltonian",
    "heatbath_or_sweep",
    "heatbath_substep",
    "heatbath_sweep",
    "kinetic_energy",
    "leapfrog",
    "omelyan",
    "overrelax_substep",
    "overrelax_sweep",
    "sample_momenta",
    "staple_mu",
]
