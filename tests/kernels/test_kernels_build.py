"""Host library build: cached by content, safe under concurrent builders, clear errors."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from hpcflow.kernels import host


def _build(root: str) -> str:
    return str(host.build_host_library(1, "double", 2, root=Path(root)))


def test_concurrent_builds_share_one_library(tmp_path: Path):
    """Two processes building the same key at once (like MPI ranks) end with one valid
    library and no temporary files left behind; a later call reuses it untouched."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_build, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    lib = Path(paths[0])
    assert lib.is_file() and lib.stat().st_size > 0
    assert sorted(p.name for p in lib.parent.iterdir()) == sorted([".lock", lib.name])
    mtime = lib.stat().st_mtime_ns
    assert host.build_host_library(1, "double", 2, root=tmp_path) == lib
    assert lib.stat().st_mtime_ns == mtime


def test_missing_compiler_is_a_clear_error(tmp_path: Path, monkeypatch):
    """Without a C++ compiler the host backend says what is missing."""
    monkeypatch.setenv("HPCFLOW_CXX", "no-such-compiler-hpcflow")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler: 'no-such-compiler-hpcflow'"):
        host.build_host_library(1, "double", 2, root=tmp_path)


@pytest.mark.parametrize("args, match", [((4, "double", 2), "n must be"),
                                         ((2, "half", 2), "real must be"),
                                         ((2, "double", 3), "nd must be")])
def test_unsupported_variants(tmp_path: Path, args, match):
    """Only the variants the kernels support can be built."""
    with pytest.raises(ValueError, match=match):
        host.build_host_library(*args, root=tmp_path)


def test_cache_dir_follows_environment(tmp_path: Path, monkeypatch):
    """$HPCFLOW_CACHE relocates the cache (e.g. to a node-local or project file system)."""
    monkeypatch.setenv("HPCFLOW_CACHE", str(tmp_path))
    assert host.cache_dir() == tmp_path / "kernels"
