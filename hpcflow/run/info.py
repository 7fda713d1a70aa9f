"""``hpcflow info``: versions of everything that matters for reproducibility and performance."""

from __future__ import annotations

import importlib
import platform
import sys

import hpcflow

__all__ = ["collect_info", "format_info"]


def _version(mod: str) -> str | None:
    try:
        return getattr(importlib.import_module(mod), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - absent or broken: reported as not available
        return None


def collect_info() -> dict:
    """A dict of versions and capabilities (also stored as provenance in outputs)."""
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
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
