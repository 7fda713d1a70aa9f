"""``hpcflow info``: versions of everything that matters for reproducibility and performance,
and loud warnings about a stack that cannot do what hpcflow is for.

A pip-installed h5py is a serial build (PyPI's wheel bundles a serial HDF5): everything runs,
but an ensemble shared by the ranks of one chain needs h5py's ``mpio`` driver and fails when it
is opened. ``hpcflow info`` says so on stderr (one line per problem, ``hpcflow info:
WARNING: ...``) and in the ``warnings`` field of ``--json``; the exit status stays 0.
"""

from __future__ import annotations

import importlib
import platform
import sys

import hpcflow

__all__ = ["collect_info", "format_info", "stack_warnings"]

# how scripts/bootstrap.sh and the container recipes build h5py against parallel HDF5
# (Debian/Ubuntu path of the Open MPI build of HDF5; docker/hpcflow-mpich.def: .../hdf5/mpich)
H5PY_MPI_BUILD = ("pip install setuptools cython pkgconfig numpy mpi4py, then "
                  "HDF5_MPI=ON HDF5_DIR=/usr/lib/x86_64-linux-gnu/hdf5/openmpi CC=mpicc "
                  "pip install --no-binary=h5py --no-build-isolation --force-reinstall h5py")


def _version(mod: str) -> str | None:
    try:
        return getattr(importlib.import_module(mod), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - absent or broken: reported as not available
        return None


def stack_warnings(info: dict) -> list[str]:
    """What in ``info`` (from :func:`collect_info`) keeps hpcflow from running in parallel."""
    out: list[str] = []
    if info.get("h5py") is None:
        out.append("h5py is not importable: ensembles cannot be written; "
                   f"install it built against parallel HDF5: {H5PY_MPI_BUILD}")
    elif info.get("h5py_mpi") is not True:
        out.append(f"h5py {info['h5py']} is built without MPI (serial HDF5, as pip's binary wheel is): "
                   "a chain spread over several ranks cannot open its ensemble (h5py driver 'mpio'); "
                   f"rebuild it against parallel HDF5: {H5PY_MPI_BUILD} (scripts/bootstrap.sh does this)")
    if info.get("mpi4py") is None:
        out.append(f"mpi4py is not importable ({info.get('error', 'not installed')}): no MPI runs; "
                   "install it built against the MPI you run with: CC=mpicc pip install --no-binary=mpi4py mpi4py")
    return out


def collect_info(*, warn: bool = True) -> dict:
    """A dict of versions and capabilities; ``warnings`` lists what :func:`stack_warnings` found,
    each also printed on stderr when ``warn``."""
    info: dict = {
        "hpcflow": hpcflow.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "pyyaml": _version("yaml"),
        "h5py": _version("h5py"),
        "h5py_mpi": None,
        "hdf5": None,
        "cupy": _version("cupy"),
        "cuda_available": False,
    }
    try:
        import h5py

        info["h5py_mpi"] = bool(h5py.get_config().mpi)
        info["hdf5"] = h5py.version.hdf5_version
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if info["cuda_available"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        pass
    from hpcflow.kernels.dispatch import choose_backend, host_compiler

    info["host_compiler"] = host_compiler()
    # what `backend: auto` (the default) runs on this machine's CPUs (checked by building the
    # SU(3) 4D host library, cached after the first time)
    info["backend_auto_cpu"] = choose_backend("auto", "cpu", 3, "double", 4)
    from hpcflow.comm.mpi_info import mpi_info

    info.update(mpi_info())
    try:
        from hpcflow.provenance import git_commit

        info["git_commit"] = git_commit()
    except Exception:  # noqa: BLE001
        pass
    info["warnings"] = stack_warnings(info)
    if warn:
        for w in info["warnings"]:
            print(f"hpcflow info: WARNING: {w}", file=sys.stderr)
    return info


def format_info(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if v is None:
            v = "not available"
        elif v is True:
            v = "yes"
        elif v is False:
            v = "no"
        elif k == "warnings":
            v = f"{len(v)} (on stderr)" if v else "none"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
