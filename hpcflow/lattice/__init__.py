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

__all__ = [
    "GROUP_NAMES",
    "Group",
    "Lattice",
    "SerialComm",
    "average_plaquette",
    "cold_field",
    "dagger",
    "gauge_transform",
    "gauge_transform_site",
    "get_group",
    "group_for_field",
    "local_action_density",
    "plaquette",
    "plaquette_re_tr",
    "plaquette_re_tr_torch",
    "random_field",
    "random_gauge",
    "staple_sum",
    "staple_sum_torch",
    "wilson_action",
]
