"""What the MPI stack is: library version and GPU awareness (for ``hpcflow info``).

Lives in ``hpcflow.comm`` because this is the only package that may import mpi4py.
Importing mpi4py initialises MPI; this is fine in a singleton (non-mpirun) process.
"""

from __future__ import annotations

import shutil
import subprocess

__all__ = ["mpi_info"]


def _ompi_cuda_support() -> bool | None:
    exe = shutil.which("ompi_info")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--parsable", "--all"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "mpi_built_with_cuda_support:value" in line:
            return line.rsplit(":", 1)[-1].strip() == "true"
    return None


def mpi_info() -> dict:
    """Versions of mpi4py and the MPI library, and whether MPI is CUDA-aware."""
    info: dict = {"mpi4py": None, "mpi_library": None, "mpi_standard": None, "gpu_aware_mpi": None}
    try:
        import mpi4py
        from mpi4py import MPI
    except Exception as e:  # noqa: BLE001 - report any import failure as a fact
        info["error"] = f"mpi4py not importable: {e}"
        return info
    info["mpi4py"] = mpi4py.__version__
    # Open MPI ends the string with a NUL byte: it made `hpcflow info` binary to grep
    info["mpi_library"] = MPI.Get_library_version().replace("\0", "").strip().splitlines()[0]
    info["mpi_standard"] = "{}.{}".format(*MPI.Get_version())
    aware = None
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            aware = bool(query())
        except Exception:  # noqa: BLE001
            aware = None
    if aware is None:
        aware = _ompi_cuda_support()
    info["gpu_aware_mpi"] = aware
    return info
