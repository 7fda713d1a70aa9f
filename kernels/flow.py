"""Host (CPU) kernels of the U(1) flows: the context CNN's circular convolutions with the
batch as the innermost axis (``flow_conv.cpp``) and the NCP-mixture bijection with its
analytic backward (``flow_ncp.cpp``).

:func:`circular_cnn` runs ``conv -> leaky ReLU -> ... -> conv`` (the layers of
:class:`hpcflow.flows.context.ContextCNN`) as one autograd node whose backward calls the
kernels too, so a training step of a tutorial-size flow spends a fraction of the time oneDNN
needs for the same convolutions (bench/RESULTS.md). Fields are ``[C, L0, L1, N]``
(channel-first, batch-last) contiguous; the result equals the torch path to rounding
(tests/kernels/test_flow_conv.py). The library is built at first use with the flags and the
cache of :mod:`.host`. Threads: torch's intra-op thread count (``torch.get_num_threads``).

:func:`ncp_mixture` is :meth:`hpcflow.flows.circular.NCPMixtureKernel.forward` with the
parameters channel-first (``p[2K + 1, *S]``, the CNN's output layout) in two calls (forward,
backward) instead of ~80 small autograd ops.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
from collections.abc import Sequence

import torch

from .host import build_library

__all__ = ["circular_cnn", "conv_library", "host_conv_available", "ncp_library", "ncp_mixture"]
_SUFFIX = {torch.float32: "f", torch.float64: "d"}


def host_conv_available() -> bool:
    """True when a C++ compiler for the host kernels is on PATH (``HPCFLOW_CXX`` or g++)."""
    import os

    return shutil.which(os.environ.get("HPCFLOW_CXX", "g++")) is not None


@functools.cache
def conv_library() -> ctypes.CDLL:
    """Build if needed and load ``flow_conv.cpp`` (once per process)."""
    lib = ctypes.CDLL(str(build_library("flow_conv.cpp", ("flow_conv.cpp",), (),
                                        "libhpcflow_flow_conv.so")))
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


@functools.cache
def ncp_library() -> ctypes.CDLL:
    """Build if needed and load ``flow_ncp.cpp`` (once per process)."""
    lib = ctypes.CDLL(str(build_library("flow_ncp.cpp", ("flow_ncp.cpp",), (),
                                        "libhpcflow_flow_ncp.so")))
    vp, ci, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.hpcflow_ncp_max_components.restype = ci
    lib.hpcflow_ncp_aux_rows.argtypes = [ci]
    lib.hpcflow_ncp_aux_rows.restype = ci
    for s in _SUFFIX.values():
        f = getattr(lib, f"hpcflow_ncp_fwd_{s}")
        f.argtypes = [vp, vp, vp, vp, vp, i64, ci, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_ncp_bwd_{s}")
        f.argtypes = [vp, vp, vp, vp, vp, i64, ci, ci]
        f.restype = None
    return lib


class _NCPMixture(torch.autograd.Function):
    """``(x[M], p[2K + 1, M]) -> (y[M], logj[M])``, contiguous CPU float32/float64."""

    @staticmethod
    def forward(ctx, x, p, k):
        lib = ncp_library()
        y, logj = torch.empty_like(x), torch.empty_like(x)
        # the forward's per-site derivatives, for the backward (none when no grad is needed)
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        aux = torch.empty(lib.hpcflow_ncp_aux_rows(k), x.numel(), dtype=x.dtype) if need else None
        getattr(lib, f"hpcflow_ncp_fwd_{_SUFFIX[x.dtype]}")(
            x.data_ptr(), p.data_ptr(), y.data_ptr(), logj.data_ptr(),
            None if aux is None else aux.data_ptr(), x.numel(), k, torch.get_num_threads())
        ctx.save_for_backward(aux)
        ctx.k = k
        return y, logj

    @staticmethod
    def backward(ctx, gy, gl):
        (aux,) = ctx.saved_tensors
        k, m = ctx.k, aux.shape[1]
        gx = torch.empty(m, dtype=aux.dtype)
        gp = torch.empty(2 * k + 1, m, dtype=aux.dtype)
        gy = None if gy is None else gy.contiguous()
        gl = None if gl is None else gl.contiguous()
        getattr(ncp_library(), f"hpcflow_ncp_bwd_{_SUFFIX[aux.dtype]}")(
            aux.data_ptr(), None if gy is None else gy.data_ptr(),
            None if gl is None else gl.data_ptr(), gx.data_ptr(), gp.data_ptr(), m, k,
            torch.get_num_threads())
        return gx, gp, None


def ncp_mixture(x: torch.Tensor, p: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NCP mixture ``(y, log h'(x))`` of ``x[*S]`` with channel-first parameters
    ``p[2K + 1, *S]`` (``s_1..K``, softmax logits ``a_1..K``, rotation ``t``)."""
    k = int(n_components)
    if x.device.type != "cpu" or p.device.type != "cpu":
        raise ValueError(f"host NCP kernel needs CPU tensors, got {x.device} and {p.device}")
    if x.dtype not in _SUFFIX or p.dtype != x.dtype:
        raise TypeError(f"host NCP kernel supports float32 and float64, got {x.dtype} and {p.dtype}")
    if tuple(p.shape) != (2 * k + 1, *x.shape):
        raise ValueError(f"NCP parameters of shape {tuple(p.shape)} do not fit x of shape "
                         f"{tuple(x.shape)} with {k} components (wanted {(2 * k + 1, *x.shape)})")
    kmax = ncp_library().hpcflow_ncp_max_components()
    if not 1 <= k <= kmax:
        raise ValueError(f"host NCP kernel supports 1..{kmax} components, got {k}")
    y, logj = _NCPMixture.apply(x.contiguous().reshape(-1), p.contiguous().reshape(2 * k + 1, -1), k)
    return y.view(x.shape), logj.view(x.shape)
