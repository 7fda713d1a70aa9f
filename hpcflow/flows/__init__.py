"""hpcflow.flows: bijections with log-dets, gauge-equivariant coupling layers, priors, training."""

from hpcflow.flows.base import Bijection, Flow
from hpcflow.flows.circular import CircularSplineKernel, NCPMixtureKernel, make_kernel
from hpcflow.flows.context import ContextCNN, circular_pad
from hpcflow.flows.prior import HaarPriorU1
from hpcflow.flows.u1 import (
    U1GaugeFlow,
    U1PlaquetteCoupling,
    angles_from_links,
    build_u1_flow,
    links_from_angles,
    plaquette_angles,
    u1_action,
    u1_mean_cos_plaquette,
    u1_topological_charge,
)

__all__ = [
    "Bijection",
    "CircularSplineKernel",
    "ContextCNN",
    "Flow",
    "HaarPriorU1",
    "NCPMixtureKernel",
    "U1GaugeFlow",
    "U1PlaquetteCoupling",
    "angles_from_links",
    "build_u1_flow",
    "circular_pad",
    "links_from_angles",
    "make_kernel",
    "plaquette_angles",
    "u1_action",
    "u1_mean_cos_plaquette",
    "u1_topological_charge",
]
