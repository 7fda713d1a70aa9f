"""hpcflow: lattice gauge ensembles from gauge-equivariant normalizing flows on HPC machines."""
import glob
import os

from setuptools import setup


def _model_files() -> list:
    """models/NAME/* -> share/hpcflow/models/NAME (found by hpcflow.models after pip install)."""
    out = []
    for d in sorted(glob.glob(os.path.join("models", "*"))):
        files = sorted(f for f in glob.glob(os.path.join(d, "*")) if os.path.isfile(f))
        if files:
            out.append((os.path.join("share", "hpcflow", d), files))
    return out


setup(
    name="hpcflow",
    version="0.1.0",
    description="Lattice gauge theory ensembles with gauge-equivariant normalizing flows, MPI and parallel HDF5",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "hpcflow",
        "hpcflow.lattice",
        "hpcflow.sampling",
        "hpcflow.analysis",
        "hpcflow.comm",
        "hpcflow.flows",
        "hpcflow.io",
        "hpcflow.run",
        "hpcflow.run.campaign",
        "hpcflow.kernels",
    ],
    # the top-level kernels/ folder (CUDA sources, host harness, loader) is hpcflow.kernels
    package_dir={"hpcflow.kernels": "kernels"},
    package_data={"hpcflow.kernels": ["*.cu", "*.h", "*.cuh", "*.cpp"]},
    data_files=_model_files(),
    install_requires=["torch>=2.1", "numpy", "pyyaml", "mpi4py", "h5py", "tqdm", "matplotlib"],
    extras_require={
        "cuda": ["cupy-cuda12x"],
        "test": ["pytest", "pytest-mpi", "ruff"],
    },
    entry_points={"console_scripts": ["hpcflow=hpcflow.run.cli:main"]},
)
