"""The MPI tier: refuses to run (instead of silently skipping) without mpirun + --with-mpi.

Run it with ``scripts/run_mpi_tests.sh`` (mpirun at 1, 2 and 4 ranks). Helpers here make
failures collective: a check that fails on one rank fails on every rank, so no rank waits
forever in the next test's collective.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("with_mpi", default=False):
        raise pytest.UsageError(
            "tests/parallel is the MPI tier: run it with scripts/run_mpi_tests.sh "
            "(mpirun -n P python -m pytest --with-mpi tests/parallel; needs pytest-mpi), "
            "or leave it out with --ignore=tests/parallel"
        )
    try:
        from mpi4py import MPI  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the tier must fail, not skip
        raise pytest.UsageError(f"tests/parallel needs mpi4py: {exc}") from exc


@pytest.fixture
def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def all_ranks(ok: bool, what: str) -> None:
    """Assert ``ok`` on every rank at once (collective): names the failing ranks."""
    from mpi4py import MPI

    flags = MPI.COMM_WORLD.allgather(bool(ok))
    bad = [r for r, f in enumerate(flags) if not f]
    assert not bad, f"{what}: failed on ranks {bad}"


@pytest.fixture
def collective():
    return all_ranks
