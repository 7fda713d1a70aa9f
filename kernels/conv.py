"""Host (CPU) kernels for the 2D context CNN of the U(1) flows: circular convolutions with
the batch as the innermost axis (``flow_conv.cpp``).

:func:`circular_cnn` runs ``conv -> leaky ReLU -> ... -> conv`` (the layers of
:class:`hpcflow.flows.context.ContextCNN`) as one autograd node whose backward calls the
kernels too, so a training step of a tutorial-size flow spends a fraction of the time oneDNN
needs for the same convolutions (bench/RESULTS.md). Fields are ``[C, L0, L1, N]``
(channel-first, batch-last) contiguous; the result equals the torch path to rounding
(tests/kernels/test_flow_conv.py). The library is built at first use with the flags and the
cache of :mod:`.host`. Threads: torch's intra-op thread count (``torch.get_num_threads``).
"""

from __future__ import annotations

import ctypes
import functools
import shutil
from collections.abc import Sequence

import torch

from .host import build_library

__all__ = ["circular_cnn", "conv_library", "host_conv_available"]

_SOURCES = ("flow_conv.cpp",)
_SUFFIX = {torch.float32: "f", torch.float64: "d"}


def host_conv_available() -> bool:
    """True when a C++ compiler for the host kernels is on PATH (``HPCFLOW_CXX`` or g++)."""
    import os

    return shutil.which(os.environ.get("HPCFLOW_CXX", "g++")) is not None


@functools.cache
def conv_library() -> ctypes.CDLL:
    """Build if needed and load ``flow_conv.cpp`` (once per process)."""
    lib = ctypes.CDLL(str(build_library("flow_conv.cpp", _SOURCES, (), "libhpcflow_flow_conv.so")))
    vp, ci, cd = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for s in _SUFFIX.values():
        f = getattr(lib, f"hpcflow_conv2d_fwd_{s}")
        f.argtypes = [vp, vp, vp, vp, ci, ci, ci, ci, ci, ci, ci, ci, ci, ci, cd, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_conv2d_bwd_input_{s}")
        f.argtypes = [vp, vp, vp, vp, ci, ci, ci, ci, ci, ci, ci, ci, ci, cd, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_conv2d_bwd_weight_{s}")
        f.argtypes = [vp, vp, vp, vp, ci, ci, ci, ci, ci, ci, ci, ci, ci, ci]
        f.restype = None
    return lib


def _rows_args(rows: tuple[int, int, int] | None, shape: Sequence[int]) -> tuple[int, int, int]:
    if rows is None:
        return -1, 0, 1
    axis, start, step = (int(r) for r in rows)
    if axis not in (0, 1) or step < 1 or not 0 <= start < shape[axis]:
        raise ValueError(f"rows must be (axis 0|1, 0 <= start < extent, step >= 1), got {rows}")
    return axis, start, step


def _out_shape(cout: int, L0: int, L1: int, n: int, rows: tuple[int, int, int]) -> tuple[int, ...]:
    axis, start, step = rows
    r = [L0, L1]
    if axis >= 0:
        r[axis] = len(range(start, r[axis], step))
    return (cout, r[0], r[1], n)


def _check(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> None:
    if x.device.type != "cpu":
        raise ValueError(f"host convolutions need CPU tensors, got x on {x.device}")
    if x.dtype not in _SUFFIX:
        raise TypeError(f"host convolutions support float32 and float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be [C, L0, L1, N], got shape {tuple(x.shape)}")
    c = x.shape[0]
    for w in weights:
        if w.dim() != 4 or w.shape[1] != c or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not fit {c} input channels "
                             "(wanted [C_out, C_in, k, k], k odd)")
        if w.dtype != x.dtype:
            raise TypeError(f"weights are {w.dtype} but x is {x.dtype}")
        c = w.shape[0]


class _CircularCNN(torch.autograd.Function):
    """``x[C, L0, L1, N] -> out[C_out, R0, R1, N]``; ``wb = (W_1, b_1, ..., W_n, b_n)``."""

    @staticmethod
    def forward(ctx, x, rows, slope, *wb):
        lib = conv_library()
        s = _SUFFIX[x.dtype]
        threads = torch.get_num_threads()
        _, L0, L1, n = x.shape
        nconv = len(wb) // 2
        acts = [x.contiguous()]
        for i in range(nconv):
            w, b = wb[2 * i].contiguous(), wb[2 * i + 1].contiguous()
            last = i == nconv - 1
            r = rows if last else (-1, 0, 1)
            out = torch.empty(_out_shape(w.shape[0], L0, L1, n, r), dtype=x.dtype)
            getattr(lib, f"hpcflow_conv2d_fwd_{s}")(
                acts[-1].data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), w.shape[1],
                w.shape[0], L0, L1, n, w.shape[2], *r, int(not last), float(slope), threads)
            acts.append(out)
        ctx.save_for_backward(*acts[:-1], *wb)
        ctx.rows, ctx.slope, ctx.nconv = rows, float(slope), nconv
        return acts[-1]

    @staticmethod
    def backward(ctx, gout):
        lib = conv_library()
        saved = ctx.saved_tensors
        nconv = ctx.nconv
        acts, wb = saved[:nconv], saved[nconv:]
        s = _SUFFIX[gout.dtype]
        threads = torch.get_num_threads()
        _, L0, L1, n = acts[0].shape
        g = gout.contiguous()
        grads: list[torch.Tensor | None] = [None] * (2 * nconv)
        gx = None
        for i in reversed(range(nconv)):
            w = wb[2 * i].contiguous()
            cout, cin, k, _ = w.shape
            r = ctx.rows if i == nconv - 1 else (-1, 0, 1)
            gw = torch.empty_like(w)
            gb = torch.empty(cout, dtype=g.dtype)
            getattr(lib, f"hpcflow_conv2d_bwd_weight_{s}")(
                g.data_ptr(), acts[i].data_ptr(), gw.data_ptr(), gb.data_ptr(), cin, cout,
                L0, L1, n, k, *r, threads)
            grads[2 * i], grads[2 * i + 1] = gw, gb
            if i == 0 and not ctx.needs_input_grad[0]:
                break
            gin = torch.empty_like(acts[i])
            act = acts[i].data_ptr() if i > 0 else None  # leaky ReLU before every conv but the first
            getattr(lib, f"hpcflow_conv2d_bwd_input_{s}")(
                g.data_ptr(), w.data_ptr(), act, gin.data_ptr(), cin, cout, L0, L1, n, k, *r,
                ctx.slope, threads)
            if i == 0:
                gx = gin
            g = gin
        return (gx, None, None, *grads)


def circular_cnn(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 rows: tuple[int, int, int] | None = None, slope: float = 0.01) -> torch.Tensor:
    """``conv_1 -> leaky ReLU -> ... -> conv_n`` with periodic boundaries on ``x[C, L0, L1, N]``.

    ``weights[i]``: ``[C_out, C_in, k, k]`` (``torch.nn.Conv2d`` layout, k odd), ``biases[i]``:
    ``[C_out]``. ``rows = (axis, start, step)`` evaluates the last convolution only at rows
    ``start, start + step, ...`` of site axis ``axis``. Returns ``[C_out, R0, R1, N]``.
    """
    _check(x, weights)
    r = _rows_args(rows, x.shape[1:3])
    wb = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return _CircularCNN.apply(x, r, float(slope), *wb)
