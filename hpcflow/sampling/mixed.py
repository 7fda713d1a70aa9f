"""Mixed chains (flow steps interleaved with heat-bath sweeps or HMC trajectories): see
:func:`hpcflow.sampling.flow_chains.mixed_chain`, which runs them on the one chain engine."""

from hpcflow.sampling.flow_chains import MIXED_STEPS, mixed_chain

__all__ = ["MIXED_STEPS", "mixed_chain"]
