"""kernels/philox.h draws what hpcflow.rng.CounterRNG draws: the host update kernels consume
the same counter streams as the torch path (bit for bit in float64)."""

from __future__ import annotations

import ctypes
import functools

import pytest
import torch

from hpcflow.kernels.host import build_library
from hpcflow.rng import CounterRNG, philox4x32

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("g++") is None, reason="needs g++"
)


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_library("philox_check.cpp", ("philox.h", "philox_check.cpp"), (),
                                        "libhpcflow_philox_check.so")))
    u, ll, vp, ci = ctypes.c_uint, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int
    lib.hpcflow_philox_block.argtypes = [u, u, ll, u, u, u, vp]
    for name in ("uniform_d", "uniform_f", "normal_d", "normal_f"):
        getattr(lib, f"hpcflow_philox_{name}").argtypes = [u, u, vp, ll, u, ci, vp]
    return lib


def _draw(name: str, key: tuple[int, int], index: torch.Tensor, step: int, n: int,
          dtype: torch.dtype) -> torch.Tensor:
    idx = index.to(torch.int64).contiguous()
    out = torch.empty(idx.numel(), n, dtype=dtype)
    getattr(_lib(), f"hpcflow_philox_{name}")(key[0], key[1], idx.data_ptr(), idx.numel(), step, n,
                                              out.data_ptr())
    return out


def test_block_equals_reference_philox() -> None:
    out = (ctypes.c_uint * 4)()
    for ctr, key in [((0, 0, 0, 0), (0, 0)), ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2),
                     ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))]:
        # block_words packs (index, step, block | kind << 24) into the counter
        index = ctr[0] | (ctr[1] << 32)
        kind, block = ctr[3] >> 24, ctr[3] & 0xFFFFFF
        _lib().hpcflow_philox_block(key[0], key[1], index, ctr[2], kind, block, out)
        assert tuple(out) == philox4x32(ctr, key)
    # Random123's known answer for (0, 0, 0, 0) / (0, 0)
    _lib().hpcflow_philox_block(0, 0, 0, 0, 0, 0, out)
    assert tuple(out) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 9])
def test_uniforms_and_normals_equal_counter_rng(n: int) -> None:
    rng = CounterRNG(1234, 77)
    index = torch.tensor([0, 1, 5, 2**31 + 7, 2**40 + 3, 123456789])
    for step in (0, 3, 2**32 - 1):
        for key in (rng.key_site,):
            u = _draw("uniform_d", key, index, step, n, torch.float64)
            assert torch.equal(u, rng.uniform(index, step, n))
            z = _draw("normal_d", key, index, step, n, torch.float64)
            torch.testing.assert_close(z, rng.normal(index, step, n), rtol=0, atol=1e-14)
            uf = _draw("uniform_f", key, index, step, n, torch.float32)
            assert torch.equal(uf, rng.uniform(index, step, n, dtype=torch.float32))
            zf = _draw("normal_f", key, index, step, n, torch.float32)
            torch.testing.assert_close(zf, rng.normal(index, step, n, dtype=torch.float32),
                                       rtol=0, atol=2e-6)


def test_chain_key_gives_uniform_scalar() -> None:
    rng = CounterRNG(99, 3)
    u = _draw("uniform_d", rng.key_chain, torch.zeros(1, dtype=torch.int64), 17, 5, torch.float64)
    assert torch.equal(u[0], rng.uniform_scalar(17, 5))
