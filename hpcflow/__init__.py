"""hpcflow: lattice gauge theory ensembles with gauge-equivariant normalizing flows."""

__version__ = "0.1.0"
__all__ = ["__version__"]
