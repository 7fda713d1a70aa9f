"""hpcflow.lattice: physics on local tensors (geometry, groups, actions, observables, gauge)."""

from hpcflow.lattice.action import (
    average_plaquette,
    local_action_density,
    plaquette,
    plaquette_re_tr,
    plaquette_re_tr_torch,
    staple_sum,
    staple_sum_torch,
    wilson_action,
)
from hpcflow.lattice.gauge import gauge_transform, gauge_transform_site, random_gauge
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import (
    GROUP_NAMES,
    Group,
    cold_field,
    dagger,
    get_group,
    group_for_field,
    random_field,
)
from hpcflow.lattice.observables import (
    clover_field_strength,
    energy_density_clover,
    polyakov_loop,
    topological_charge_clover,
    topological_charge_u1_2d,
    wilson_flow,
    wilson_flow_force,
    wilson_line,
    wilson_loop,
)

__all__ = [
    "GROUP_NAMES",
    "Group",
    "Lattice",
    "SerialComm",
    "average_plaquette",
    "clover_field_strength",
    "cold_field",
    "dagger",
    "energy_density_clover",
    "gauge_transform",
    "gauge_transform_site",
    "get_group",
    "group_for_field",
    "local_action_density",
    "plaquette",
    "plaquette_re_tr",
    "plaquette_re_tr_torch",
    "polyakov_loop",
    "random_field",
    "random_gauge",
    "staple_sum",
    "staple_sum_torch",
    "topological_charge_clover",
    "topological_charge_u1_2d",
    "wilson_action",
    "wilson_flow",
    "wilson_flow_force",
    "wilson_line",
    "wilson_loop",
]
