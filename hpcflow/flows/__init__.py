"""hpcflow.flows: bijections with log-dets, gauge-equivariant coupling layers, priors, training."""

from hpcflow.flows.base import Bijection, Flow, GaugeFlow, GaugeTheory
from hpcflow.flows.build import build_flow
from hpcflow.flows.context import ContextCNN, circular_pad
from hpcflow.flows.kernels1d import CircularSplineKernel, NCPMixtureKernel, make_interval_kernel, make_kernel
from hpcflow.flows.prior import HaarPriorSUN, HaarPriorU1
from hpcflow.flows.u1 import (
    U1GaugeFlow,
    U1PlaquetteCoupling,
    U1Theory,
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
    "GaugeFlow",
    "GaugeTheory",
    "HaarPriorSUN",
    "HaarPriorU1",
    "NCPMixtureKernel",
    "U1GaugeFlow",
    "U1PlaquetteCoupling",
    "U1Theory",
    "angles_from_links",
    "build_flow",
    "build_u1_flow",
    "circular_pad",
    "links_from_angles",
    "make_interval_kernel",
    "make_kernel",
    "plaquette_angles",
    "u1_action",
    "u1_mean_cos_plaquette",
    "u1_topological_charge",
]
