"""Counter-based, decomposition-independent random numbers: Philox4x32-10.

Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC11; the Random123 library) is a keyed bijection of a 128-bit counter. A draw is a pure
function of ``(seed, stream, index, step, draw number)``, so every lattice site gets the
same numbers whichever rank owns it, in whatever order the ranks run, and a resumed chain
continues bit for bit (the state is just ``(seed, stream)``).

Exact mapping (all words are unsigned 32-bit; ``lo``/``hi`` are the low/high 32 bits):

* key: ``(k0, k1) = philox(ctr=(lo(stream), hi(stream), TAG, 0), key=(lo(seed), hi(seed)))[:2]``
  with ``TAG = 0x53495445`` ("SITE") for per-index draws and ``TAG = 0x4348414E`` ("CHAN")
  for chain-level scalar draws (:meth:`CounterRNG.uniform_scalar`). For a fixed seed,
  Philox is a bijection of the counter, so distinct streams (and the two tags) give
  distinct keys exactly; distinct seeds give unrelated keys.
* counter: ``c0 = lo(index)``, ``c1 = hi(index)``, ``c2 = step``,
  ``c3 = block | kind << 24`` with ``kind = 0`` for uniforms, ``1`` for normals, and
  ``block`` the number of the 4-word output block (draw ``j`` of a call uses words
  ``4 block ...``). Limits: ``0 <= index < 2**63``, ``0 <= step < 2**32``,
  ``seed, stream < 2**64``, ``block < 2**24``.
* float64 uniform ``j`` uses words ``2j`` (a) and ``2j+1`` (b):
  ``k = (a >> 5) * 2**26 + (b >> 6)`` (53 bits), ``u = k * 2**-53``; float32 uniform ``j``
  uses word ``j``: ``k = w >> 8`` (24 bits), ``u = k * 2**-24``. ``k = 0`` is replaced by
  ``1/2`` so that ``u`` lies strictly in ``(0, 1)`` (a shift of probability ``2**-53``).
* normals (Box-Muller): uniforms ``(u1, u2) = (2i, 2i+1)`` of the ``kind = 1`` sequence give
  ``r cos(2 pi u2)`` and ``r sin(2 pi u2)`` with ``r = sqrt(-2 ln u1)`` as normals ``2i``
  and ``2i + 1``.

The draws of ``uniform(index[m], step, n)`` equal the corresponding slice of
``uniform(index, step, n)``: this is what domain decomposition relies on.
The 32x32 -> 64-bit products are done in int64 on 16-bit halves of the multiplier, so no
intermediate exceeds 2**49 and signed overflow never happens (CPU and CUDA alike).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["CounterRNG", "philox4x32", "spawn_seed"]

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
# Philox4x32 round multipliers and Weyl key increments (Random123, philox.h).
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_ROUNDS = 10

_TAG_SITE = 0x53495445
_TAG_CHAIN = 0x4348414E
_KIND_UNIFORM = 0
_KIND_NORMAL = 1
_MAX_BLOCKS = 1 << 24


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``m * x`` for a 32-bit constant ``m`` and int64 ``x``.

    ``m = m_hi 2^16 + m_lo``; ``x m_lo < 2^48`` and ``t = x m_hi + (x m_lo >> 16) < 2^49``, so
    ``x m = t 2^16 + (x m_lo & 0xffff)`` is assembled without signed int64 overflow.
    """
    p_lo = x * (m & _MASK16)
    t = x * (m >> 16) + (p_lo >> 16)
    hi = t >> 16
    lo = ((t & _MASK16) << 16) | (p_lo & _MASK16)
    return hi, lo


def _philox_words(
    c: list[torch.Tensor], k0: int, k1: int, rounds: int = _ROUNDS
) -> list[torch.Tensor]:
    """Philox4x32-R on four int64 tensors of 32-bit words (broadcastable); key as ints."""
    c0, c1, c2, c3 = c
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def philox4x32(
    counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = _ROUNDS
) -> tuple[int, int, int, int]:
    """Philox4x32-R of one counter and key given as Python ints (reference / known answers)."""
    for name, words in (("counter", counter), ("key", key)):
        if any(not 0 <= int(w) <= _MASK32 for w in words):
            raise ValueError(f"{name} words must be in [0, 2**32), got {tuple(words)}")
    c = [torch.tensor([int(w)], dtype=torch.int64) for w in counter]
    out = _philox_words(c, int(key[0]), int(key[1]), rounds)
    return tuple(int(w.item()) for w in out)  # type: ignore[return-value]


def _split64(v: int) -> tuple[int, int]:
    return v & _MASK32, (v >> 32) & _MASK32


def _check_u64(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {v!r}")
    v = int(v)
    if not 0 <= v < 1 << 64:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v


def spawn_seed(seed: int, *keys: int) -> int:
    """Independent 64-bit seed for ``(seed, *keys)`` via ``numpy.random.SeedSequence``.

    ``spawn_seed(seed, rank)``, ``spawn_seed(seed, chain, 7)``, ...: the SeedSequence hash
    (O'Neill's design) gives well-mixed, practically non-colliding seeds per key tuple.
    """
    seed = _check_u64("seed", seed)
    ks = tuple(_check_u64("spawn key", k) for k in keys)
    ss = np.random.SeedSequence(entropy=seed, spawn_key=ks)
    return int(ss.generate_state(1, dtype=np.uint64)[0])


class CounterRNG:
    """Philox4x32-10 keyed by ``(seed, stream)``; see the module docstring for the mapping."""

    def __init__(self, seed: int, stream: int = 0) -> None:
        self._set(seed, stream)

    def _set(self, seed: int, stream: int) -> None:
        self.seed = _check_u64("seed", seed)
        self.stream = _check_u64("stream", stream)
        s_lo, s_hi = _split64(self.stream)
        key = _split64(self.seed)
        self._key_site = philox4x32((s_lo, s_hi, _TAG_SITE, 0), key)[:2]
        self._key_chain = philox4x32((s_lo, s_hi, _TAG_CHAIN, 0), key)[:2]

    def __repr__(self) -> str:
        return f"CounterRNG(seed={self.seed}, stream={self.stream})"

    @property
    def key_site(self) -> tuple[int, int]:
        """Philox key ``(k0, k1)`` of the per-index draws (for the host kernels' philox.h)."""
        return self._key_site

    @property
    def key_chain(self) -> tuple[int, int]:
        """Philox key ``(k0, k1)`` of the chain-level draws (:meth:`uniform_scalar`)."""
        return self._key_chain

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same numbers: ``(seed, stream)``."""
        return {"generator": "philox4x32-10", "seed": self.seed, "stream": self.stream}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen = state.get("generator", "philox4x32-10")
        if gen != "philox4x32-10":
            raise ValueError(f"state['generator'] must be 'philox4x32-10', got {gen!r}")
        self._set(state["seed"], state["stream"])

    # ---- raw words ---------------------------------------------------------------------
    @staticmethod
    def _check_index(index: torch.Tensor) -> torch.Tensor:
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be an integer torch.Tensor, got {type(index).__name__}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
        index = index.to(torch.int64)
        if index.numel() and bool((index < 0).any()):
            raise ValueError(f"index must be >= 0, got min {int(index.min())}")
        return index

    @staticmethod
    def _check_step(step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int in [0, 2**32), got {step!r}")
        if not 0 <= int(step) <= _MASK32:
            raise ValueError(f"step must be in [0, 2**32), got {step}")
        return int(step)

    @staticmethod
    def _check_n(n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return int(n)

    def _words(
        self, index: torch.Tensor, step: int, n_words: int, kind: int, key: tuple[int, int]
    ) -> torch.Tensor:
        """``(*index.shape, n_words)`` int64 tensor of 32-bit Philox output words."""
        n_blocks = (n_words + 3) // 4
        if n_blocks > _MAX_BLOCKS:
            raise ValueError(f"too many draws per call: {n_words} words > {4 * _MAX_BLOCKS}")
        dev = index.device
        idx = index.unsqueeze(-1)
        c0 = idx & _MASK32
        c1 = idx >> 32
        blocks = torch.arange(n_blocks, dtype=torch.int64, device=dev)
        c2 = torch.full_like(blocks, step)
        c3 = blocks | (kind << 24)
        out = _philox_words([c0, c1, c2, c3], key[0], key[1])
        # broadcast c0/c1 (..., 1) against the block axis, interleave the 4 words per block
        out = [w.expand(*index.shape, n_blocks) for w in out]
        return torch.stack(out, dim=-1).reshape(*index.shape, 4 * n_blocks)[..., :n_words]

    @staticmethod
    def _to_uniform(words: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.float64:
            a = words[..., 0 : 2 * n : 2] >> 5
            b = words[..., 1 : 2 * n : 2] >> 6
            k = (a << 26) | b
            u = k.to(torch.float64)
            u = torch.where(k == 0, torch.full_like(u, 0.5), u)
            return u * 2.0**-53
        k = words[..., :n] >> 8
        u = k.to(torch.float32)
        u = torch.where(k == 0, torch.full_like(u, 0.5), u)
        return u * 2.0**-24

    @staticmethod
    def _check_dtype(dtype: torch.dtype) -> torch.dtype:
        if dtype not in (torch.float64, torch.float32):
            raise TypeError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        return dtype

    @staticmethod
    def _words_per_uniform(dtype: torch.dtype) -> int:
        return 2 if dtype == torch.float64 else 1

    # ---- public draws ------------------------------------------------------------------
    def uniform(
        self, index: torch.Tensor, step: int, n: int, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """``n`` uniforms in (0, 1) per entry of ``index``: shape ``(*index.shape, n)``."""
        index = self._check_index(index)
        step, n, dtype = self._check_step(step), self._check_n(n), self._check_dtype(dtype)
        w = self._words(index, step, n * self._words_per_uniform(dtype), _KIND_UNIFORM,
                        self._key_site)
        return self._to_uniform(w, n, dtype)

    def _normal_from(self, index: torch.Tensor, step: int, n: int, dtype: torch.dtype,
                     key: tuple[int, int]) -> torch.Tensor:
        m = 2 * ((n + 1) // 2)
        w = self._words(index, step, m * self._words_per_uniform(dtype), _KIND_NORMAL, key)
        u = self._to_uniform(w, m, dtype)
        u1, u2 = u[..., 0::2], u[..., 1::2]
        # Box-Muller: (r cos phi, r sin phi) are two independent N(0, 1)
        r = torch.sqrt(-2.0 * torch.log(u1))
        phi = (2.0 * math.pi) * u2
        z = torch.stack((r * torch.cos(phi), r * torch.sin(phi)), dim=-1)
        return z.reshape(*index.shape, m)[..., :n]

    def normal(
        self, index: torch.Tensor, step: int, n: int, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """``n`` standard normals per entry of ``index`` (Box-Muller): ``(*index.shape, n)``."""
        index = self._check_index(index)
        step, n, dtype = self._check_step(step), self._check_n(n), self._check_dtype(dtype)
        return self._normal_from(index, step, n, dtype, self._key_site)

    def uniform_scalar(
        self, step: int, n: int = 1, dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``n`` chain-level uniforms (e.g. Metropolis accept) for ``step``: shape ``(n,)``.

        Drawn with index 0 under a key reserved for chain-level draws, so they never
        coincide with the per-site draws of :meth:`uniform`.
        """
        step, n, dtype = self._check_step(step), self._check_n(n), self._check_dtype(dtype)
        index = torch.zeros((), dtype=torch.int64, device=device)
        w = self._words(index, step, n * self._words_per_uniform(dtype), _KIND_UNIFORM,
                        self._key_chain)
        return self._to_uniform(w, n, dtype)

    def normal_scalar(
        self, step: int, n: int = 1, dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``n`` chain-level standard normals for ``step``: shape ``(n,)``."""
        step, n, dtype = self._check_step(step), self._check_n(n), self._check_dtype(dtype)
        index = torch.zeros((), dtype=torch.int64, device=device)
        return self._normal_from(index, step, n, dtype, self._key_chain)
