"""hpcflow.analysis: exact 2D results, Gamma-method errors, resampling, reweighting, topology.

Not imported here (they read ensembles, hence h5py and torch): :mod:`hpcflow.analysis.ensemble`
(``measure_ensemble``, ``format_table``, ``export_pyerrors``: ``hpcflow measure``) and
:mod:`hpcflow.analysis.plots` (``write_plots``: ``hpcflow plot``).
"""

from hpcflow.analysis.exact import (
    U1Exact2D,
    bessel_i_scaled,
    su2_2d_plaquette,
    su3_2d_plaquette,
    sun_2d_plaquette,
    u1_2d_charge_distribution,
    u1_2d_chi_q,
    u1_2d_exact,
    u1_2d_log_z,
    u1_2d_plaquette,
    u1_2d_q2,
    u1_2d_wilson_loop,
)
from hpcflow.analysis.gamma import (
    FLAGS,
    GammaResult,
    autocorrelation,
    gamma_method,
    gamma_method_derived,
    gamma_method_ratio,
)
from hpcflow.analysis.resampling import ResamplingResult, bootstrap, jackknife
from hpcflow.analysis.reweighting import (
    ReweightedEstimate,
    WeightStats,
    ess,
    logsumexp,
    normalized_weights,
    reweighted_estimate,
    reweighted_gamma,
    reweighted_mean,
    reweighted_mean_error,
)
from hpcflow.analysis.topology import (
    as_charges,
    charge_histogram,
    chi2_sf,
    coverage_report,
    sector_acceptance,
)

__all__ = [
    "FLAGS",
    "GammaResult",
    "ResamplingResult",
    "U1Exact2D",
    "as_charges",
    "autocorrelation",
    "bessel_i_scaled",
    "bootstrap",
    "charge_histogram",
    "chi2_sf",
    "coverage_report",
    "ess",
    "gamma_method",
    "gamma_method_derived",
    "gamma_method_ratio",
    "jackknife",
    "logsumexp",
    "normalized_weights",
    "ReweightedEstimate",
    "WeightStats",
    "reweighted_estimate",
    "reweighted_gamma",
    "reweighted_mean",
    "reweighted_mean_error",
    "sector_acceptance",
    "su2_2d_plaquette",
    "su3_2d_plaquette",
    "sun_2d_plaquette",
    "u1_2d_charge_distribution",
    "u1_2d_chi_q",
    "u1_2d_exact",
    "u1_2d_log_z",
    "u1_2d_plaquette",
    "u1_2d_q2",
    "u1_2d_wilson_loop",
]
