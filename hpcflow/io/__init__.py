"""hpcflow.io: parallel HDF5 ensembles, crash-safe checkpoints, ILDG/LIME and SciDAC checksums."""

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
from hpcflow.io.ildg import ILDGError, read_ildg, write_ildg

__all__ = [
    "CheckpointError",
    "Ensemble",
    "EnsembleError",
    "EnsembleIndexError",
    "ILDGError",
    "SegmentWriter",
    "UnverifiedSegmentWarning",
    "atomic_write_bytes",
    "check_tail",
    "ensemble_info",
    "export_ildg",
    "load_checkpoint",
    "open_ensemble",
    "read_ildg",
    "save_checkpoint",
    "verify_ensemble",
    "write_ildg",
]
