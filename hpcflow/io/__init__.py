"""hpcflow.io: parallel HDF5 ensembles, crash-safe checkpoints, ILDG/LIME and SciDAC checksums,
NERSC and openQCD gauge files, QCDml metadata, export/import of configurations."""

from hpcflow.io.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from hpcflow.io.ensemble import (
    Ensemble,
    EnsembleError,
    EnsembleIndexError,
    SegmentWriter,
    UnverifiedSegmentWarning,
    check_tail,
    ensemble_info,
    export_ildg,
    open_ensemble,
    verify_ensemble,
)
from hpcflow.io.export import ExportError, export_configs, read_gauge_file
from hpcflow.io.ildg import ILDGError, read_ildg, write_ildg
from hpcflow.io.nersc import NERSCError, read_nersc, write_nersc
from hpcflow.io.openqcd import OpenQCDError, read_openqcd, write_openqcd

__all__ = [
    "CheckpointError",
    "Ensemble",
    "EnsembleError",
    "EnsembleIndexError",
    "ExportError",
    "ILDGError",
    "NERSCError",
    "OpenQCDError",
    "SegmentWriter",
    "UnverifiedSegmentWarning",
    "atomic_write_bytes",
    "check_tail",
    "ensemble_info",
    "export_configs",
    "export_ildg",
    "load_checkpoint",
    "open_ensemble",
    "read_gauge_file",
    "read_ildg",
    "read_nersc",
    "read_openqcd",
    "save_checkpoint",
    "verify_ensemble",
    "write_ildg",
    "write_nersc",
    "write_openqcd",
]
