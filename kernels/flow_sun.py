"""Host (CPU) kernels of the 4D SU(3) spectral flow (``flow_sun.cpp``; docs/DESIGN.md, "Host
kernels of the 4D SU(3) flow").

:func:`sun_flow` runs coupling layers of :class:`hpcflow.flows.sun.SUNSpectralCoupling` (NCP
interval kernels) as **one autograd node**: per layer the features of the frozen plaquettes,
the context CNN's circular 4D convolutions and the spectral map with the link update are C++
kernels on the *lanes* layout, batch innermost (:func:`to_lanes`): ``Ut[chunk, mu, site, 18,
W]`` real, ``W`` = :func:`lanes` batch entries per SIMD vector (8 in float64, 16 in float32).
The forward works in place on one copy of the field and keeps, per layer, the links it
overwrites, the CNN's activations and the eigen-decompositions; the backward (analytic, see
``flow_sun.cpp``) walks the layers in reverse, writing the saved links back.
:func:`sun_flow_inverse` is the inverse map for inference (``log q`` of a given field): the
layers in reverse, the same features and CNN, the NCP maps inverted by Newton in C++.

:class:`LayerPlan` holds what depends only on the lattice and the layer's masks: the frozen
masks, the active sites and their interior weights, and for every convolution the sites it is
evaluated on (the last one: the active sites; each earlier one: the sites the next one reads),
so the context network computes nothing that the layer does not use. Also here: the Haar draws
(:func:`haar_su3`, :func:`haar_su3_counter`), the plaquette sum of the action
(:func:`plaquette_sum`) and the clover charge (:func:`clover_charge`) on the same kernels.
Results equal the torch path (``backend: torch``) to rounding (tests/unit/test_sun_fast.py).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .host import build_library

__all__ = [
    "LayerPlan",
    "LayerSpec",
    "clover_charge",
    "from_lanes",
    "haar_su3",
    "haar_su3_counter",
    "lanes",
    "layer_plan_of",
    "plaquette_sum",
    "sun_coupling",
    "sun_flow",
    "sun_flow_inverse",
    "sun_library",
    "to_lanes",
]

_SUFFIX = {torch.float32: "f", torch.float64: "d"}


@functools.cache
def sun_library() -> ctypes.CDLL:
    """Build if needed and load ``flow_sun.cpp`` (once per process)."""
    lib = ctypes.CDLL(str(build_library("flow_sun.cpp", ("flow_sun.cpp", "philox.h"), (),
                                        "libhpcflow_flow_sun.so")))
    vp, ci, i64, cd = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
    lib.hpcflow_sun_lanes.argtypes = [ci]
    lib.hpcflow_sun_lanes.restype = ci
    lib.hpcflow_sun_max_components.restype = ci
    lib.hpcflow_sun_haar.argtypes = [vp, i64, vp, ci]
    lib.hpcflow_sun_haar.restype = None
    u32 = ctypes.c_uint32
    lib.hpcflow_sun_haar_counter.argtypes = [u32, u32, vp, i64, vp, ci]
    lib.hpcflow_sun_haar_counter.restype = None
    for s in _SUFFIX.values():
        f = getattr(lib, f"hpcflow_sun_feat_fwd_{s}")
        f.argtypes = [vp, vp, vp, i64, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_feat_bwd_{s}")
        f.argtypes = [vp, vp, vp, vp, i64, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_conv_{s}")
        f.argtypes = [vp, i64, i64, vp, vp, i64, vp, i64, vp, ci, ci, vp, vp, i64, vp, ci, cd, vp,
                      i64, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_conv_wgrad_{s}")
        f.argtypes = [vp, i64, i64, vp, vp, i64, vp, ci, vp, i64, vp, vp, i64, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_pack_{s}")
        f.argtypes = [vp, i64, i64, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_unpack_{s}")
        f.argtypes = [vp, i64, i64, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_weights_{s}")
        f.argtypes = [vp, i64, i64, i64, ci, vp]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_clover_q_{s}")
        f.argtypes = [vp, vp, vp, i64, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_spec_fwd_{s}")
        f.argtypes = [vp, vp, i64, vp, i64, vp, ci, ci, ci, cd, vp, i64, vp, vp, vp, vp, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_spec_bwd_{s}")
        f.argtypes = [vp, vp, vp, i64, vp, i64, vp, ci, ci, ci, cd, vp, i64, vp, vp, vp, vp, vp, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_sun_spec_inv_{s}")
        f.argtypes = [vp, vp, i64, vp, i64, vp, ci, ci, ci, cd, vp, i64, vp, vp, vp, ci]
        f.restype = None
    return lib


def lanes(dtype: torch.dtype) -> int:
    """Batch entries per SIMD vector of the lanes layout (64 bytes of ``dtype``)."""
    return 64 // torch.empty((), dtype=dtype).element_size()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _fresh(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` on the CPU. (Advising large buffers to transparent huge pages was tried:
    2x faster fills in isolation, but 4x slower inside a training process, where the kernel's
    direct compaction on fault stalls; bench/RESULTS.md.)"""
    return torch.empty(*shape, dtype=dtype)


def _clone(t: torch.Tensor) -> torch.Tensor:
    out = _fresh(*t.shape, dtype=t.dtype)
    out.copy_(t)
    return out


# ---- layout ------------------------------------------------------------------------------
def _pack(r: torch.Tensor, width: int, links: int = 1) -> torch.Tensor:
    """``r[b, X, 18]`` real -> ``[nchunk, X, 18, width]`` (padding lanes: copies of entry b-1),
    allocated as ``[nchunk, links, X / links, 18, width]`` when ``links > 1`` (not a view)."""
    b, nx = r.shape[0], r.shape[1]
    nchunk = -(-b // width)
    r = r.contiguous()
    if r.device.type == "cpu" and r.dtype in _SUFFIX:
        shape = (nchunk, nx, 18, width) if links == 1 else (nchunk, links, nx // links, 18, width)
        out = _fresh(*shape, dtype=r.dtype)
        getattr(sun_library(), f"hpcflow_sun_pack_{_SUFFIX[r.dtype]}")(
            r.data_ptr(), b, nx, out.data_ptr(), torch.get_num_threads())
        return out
    pad = nchunk * width - b
    if pad:
        r = torch.cat([r, r[-1:].expand(pad, nx, 18)], 0)
    out = r.reshape(nchunk, width, nx, 18).permute(0, 2, 3, 1).contiguous()
    return out if links == 1 else out.reshape(nchunk, links, nx // links, 18, width).clone()


def _unpack(t: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: ``[nchunk, X, 18, width]`` -> ``[b, X, 18]``."""
    nchunk, nx, _, width = t.shape
    t = t.contiguous()
    if t.device.type == "cpu" and t.dtype in _SUFFIX:
        out = _fresh(b, nx, 18, dtype=t.dtype)
        getattr(sun_library(), f"hpcflow_sun_unpack_{_SUFFIX[t.dtype]}")(
            t.data_ptr(), b, nx, out.data_ptr(), torch.get_num_threads())
        return out
    return t.permute(0, 3, 1, 2).reshape(nchunk * width, nx, 18)[:b].contiguous()


class _ToLanes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, width, links):  # type: ignore[override]
        ctx.b = r.shape[0]
        return _pack(r, width, links)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        # the padding lanes are copies of entry b - 1: their gradient belongs to it; the flow
        # hands zeros there (their outputs are dropped), so it is dropped here
        return _unpack(g.reshape(g.shape[0], -1, *g.shape[-2:]), ctx.b), None, None


class _FromLanes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, b):  # type: ignore[override]
        ctx.width = t.shape[3]
        return _unpack(t, b)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        t = _pack(g, ctx.width)
        b = g.shape[0]
        if t.shape[0] * ctx.width > b:  # padding lanes get no gradient
            t.view(-1, *t.shape[1:3], ctx.width)[-1, ..., b % ctx.width :] = 0
        return t, None


def to_lanes(U: torch.Tensor, width: int) -> torch.Tensor:
    """``U[B, 4, *sites, 3, 3]`` (complex) -> ``Ut[nchunk, 4, V, 18, width]`` (real), the batch
    padded to ``nchunk * width`` with copies of its last entry (valid fields, so the padding
    lanes compute finite values; their outputs are dropped and their gradients are zero).
    One C++ pass; differentiable."""
    b, v = U.shape[0], U[0, 0, ..., 0, 0].numel()
    r = torch.view_as_real(U).reshape(b, 4 * v, 18)
    return _ToLanes.apply(r, width, 4)


def from_lanes(Ut: torch.Tensor, batch: int, sites: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_lanes`: ``U[batch, 4, *sites, 3, 3]`` complex (one C++ pass)."""
    nchunk, _, v, _, width = Ut.shape
    out = _FromLanes.apply(Ut.reshape(nchunk, 4 * v, 18, width), batch)
    return torch.view_as_complex(out.view(batch, 4, *sites, 3, 3, 2))


def haar_su3(normals: torch.Tensor, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
    """:meth:`hpcflow.lattice.groups.SUN.haar` for SU(3) (QR of the Ginibre matrix by
    Gram-Schmidt, equal to it to rounding): ``normals[..., 18]`` float64 -> ``[..., 3, 3]``."""
    if normals.shape[-1] != 18 or normals.device.type != "cpu":
        raise ValueError(f"haar_su3 needs CPU normals [..., 18], got {tuple(normals.shape)} on {normals.device}")
    x = normals.to(torch.float64).contiguous()
    out = torch.empty(*x.shape[:-1], 3, 3, dtype=torch.complex128)
    sun_library().hpcflow_sun_haar(x.data_ptr(), x.numel() // 18, out.data_ptr(), torch.get_num_threads())
    return out if dtype == torch.complex128 else out.to(dtype)


def haar_su3_counter(key: tuple[int, int], index: torch.Tensor, dtype: torch.dtype = torch.complex128
                     ) -> torch.Tensor:
    """``SUN.haar(rng.normal(index, 0, 18))`` for a ``CounterRNG`` with ``key = rng.key_site``:
    the Philox normals of ``philox.h`` (those of ``hpcflow.rng`` to rounding) and the Haar
    matrices in one call; ``[*index.shape, 3, 3]``."""
    idx = index.to(torch.int64).contiguous()
    if idx.device.type != "cpu":
        raise ValueError(f"haar_su3_counter needs a CPU index, got {idx.device}")
    out = torch.empty(*idx.shape, 3, 3, dtype=torch.complex128)
    sun_library().hpcflow_sun_haar_counter(int(key[0]), int(key[1]), idx.data_ptr(), idx.numel(),
                                           out.data_ptr(), torch.get_num_threads())
    return out if dtype == torch.complex128 else out.to(dtype)


def clover_charge(U: torch.Tensor, interior: torch.Tensor) -> torch.Tensor:
    """Local part of :func:`hpcflow.lattice.observables.topological_charge_clover` (sum over
    the sites where ``interior`` is True) of 4D SU(3) ``U[*B, 4, *sites, 3, 3]`` on the CPU,
    ``(*B)`` real."""
    dt = torch.float64 if U.dtype == torch.complex128 else torch.float32
    width = lanes(dt)
    batch = U.shape[: U.dim() - 7]
    Ub = U.reshape(-1, *U.shape[U.dim() - 7 :])
    n = Ub.shape[0]
    Ut = to_lanes(Ub, width)
    mask = interior.reshape(-1).to(torch.uint8).contiguous()
    dims = torch.tensor(list(U.shape[U.dim() - 6 : U.dim() - 2]), dtype=torch.int32)
    out = torch.empty(Ut.shape[0], width, dtype=dt)
    getattr(sun_library(), f"hpcflow_sun_clover_q_{_SUFFIX[dt]}")(
        Ut.data_ptr(), mask.data_ptr(), dims.data_ptr(), Ut.shape[0], out.data_ptr(),
        torch.get_num_threads())
    return out.reshape(-1)[:n].reshape(batch)


class _PlaquetteSum(torch.autograd.Function):
    """``Ut -> sum over the sites in `mask` and the 6 planes of Re tr P`` per lane
    ``[nchunk, W]`` (the features kernel on every plane; its backward for the gradient)."""

    @staticmethod
    def forward(ctx, Ut, frozen, dims):  # type: ignore[override]
        lib = sun_library()
        dt = Ut.dtype
        nchunk, _, v, _, width = Ut.shape
        Ut = Ut.contiguous()
        feats = _fresh(nchunk, v, 24, width, dtype=dt)
        getattr(lib, f"hpcflow_sun_feat_fwd_{_SUFFIX[dt]}")(Ut.data_ptr(), frozen.data_ptr(),
                                                            dims.data_ptr(), nchunk, feats.data_ptr(),
                                                            torch.get_num_threads())
        ctx.save_for_backward(Ut)
        ctx.frozen, ctx.dims = frozen, dims
        return feats[:, :, 0::4].sum((1, 2))

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (Ut,) = ctx.saved_tensors
        nchunk, _, v, _, width = Ut.shape
        gF = torch.zeros(nchunk, v, 24, width, dtype=Ut.dtype)
        gF[:, :, 0::4] = g[:, None, None, :]
        gU = torch.zeros_like(Ut)
        getattr(sun_library(), f"hpcflow_sun_feat_bwd_{_SUFFIX[Ut.dtype]}")(
            Ut.data_ptr(), gF.data_ptr(), ctx.frozen.data_ptr(), ctx.dims.data_ptr(), nchunk,
            gU.data_ptr(), torch.get_num_threads())
        return gU, None, None


def plaquette_sum(U: torch.Tensor, interior: torch.Tensor) -> torch.Tensor:
    """``sum_{x in interior, mu < nu} Re tr P_{mu nu}(x)`` of 4D SU(3) ``U[*B, 4, *sites, 3, 3]``
    on the CPU, ``(*B)`` real, differentiable (the local part of
    :func:`hpcflow.lattice.action.wilson_action`, on the lanes layout)."""
    dt = torch.float64 if U.dtype == torch.complex128 else torch.float32
    batch = U.shape[: U.dim() - 7]
    Ub = U.reshape(-1, *U.shape[U.dim() - 7 :])
    n = Ub.shape[0]
    Ut = to_lanes(Ub, lanes(dt))
    mask = interior.reshape(1, -1).to(torch.uint8).expand(6, -1).contiguous()
    dims = torch.tensor(list(U.shape[U.dim() - 6 : U.dim() - 2]), dtype=torch.int32)
    return _PlaquetteSum.apply(Ut, mask, dims).reshape(-1)[:n].reshape(batch)


# ---- per-layer index data ----------------------------------------------------------------
@dataclass(frozen=True)
class ConvPlan:
    """One convolution: its output sites (stored in this order), the maps of its output and
    input arrays (full site index -> row, -1 where the array holds no such site)."""

    sites: torch.Tensor      # int64 [n] full site indices, processing order = storage order
    n_store: int             # rows of the output array
    out_map: torch.Tensor    # int32 [V] full index -> storage row of this output (-1)
    in_map: torch.Tensor     # int32 [V] full index -> storage row of the input (-1)
    n_in: int                # rows of the input array


@dataclass(frozen=True)
class LayerPlan:
    """Lattice- and mask-dependent data of one layer for the kernels (CPU tensors)."""

    dims: torch.Tensor       # int32 [4] local extents
    volume: int
    frozen: torch.Tensor     # uint8 [6, V]
    active: torch.Tensor     # int64 [n_act]
    weights: torch.Tensor    # float64 [n_act] interior weights of the active loops
    mu: int
    nu: int
    convs: tuple[ConvPlan, ...]
    kernel_size: int
    all_rows: tuple[torch.Tensor, torch.Tensor]  # features: class-sorted order, its storage rows
    weights32: torch.Tensor  # float32 copy of weights
    zgroups: torch.Tensor    # uint8 [V]: bit k set where plane k is not frozen (its 4 features are 0)

    def weights_of(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weights if dtype == torch.float64 else self.weights32


def _dilate(needed: torch.Tensor, dims: Sequence[int], k: int) -> torch.Tensor:
    """Sites read by a k^4 circular convolution evaluated on the bool mask ``needed``."""
    p = (k - 1) // 2
    out = torch.zeros_like(needed)
    shifts = range(-p, p + 1)
    for s0 in shifts:
        for s1 in shifts:
            for s2 in shifts:
                for s3 in shifts:
                    out |= torch.roll(needed, (s0, s1, s2, s3), (0, 1, 2, 3))
    return out


def _class_order(mask: torch.Tensor, nu: int, period: int) -> torch.Tensor:
    """Flat indices of the True sites of ``mask``, grouped by ``x_nu mod period`` (sites of
    one class read the same taps of a row-sparse input)."""
    flat = torch.nonzero(mask.flatten()).flatten()
    xnu = torch.arange(mask.shape[nu]).view([-1 if d == nu else 1 for d in range(4)])
    cls = torch.remainder(xnu.expand(mask.shape), period).flatten()[flat]
    order = torch.argsort(cls * mask.numel() + flat)
    return flat[order]


def layer_plan_of(dims: Sequence[int], frozen: torch.Tensor, active: torch.Tensor,
                  weights: torch.Tensor, mu: int, nu: int, n_convs: int, kernel_size: int,
                  period: int) -> LayerPlan:
    """The :class:`LayerPlan` of a layer: ``frozen`` bool ``[6, *dims]``, ``active`` the flat
    indices of the active loops (the order of the parameters and of ``weights``)."""
    dims = tuple(int(d) for d in dims)
    v = 1
    for d in dims:
        v *= d
    k = int(kernel_size)
    needed = torch.zeros(v, dtype=torch.bool)
    needed[active] = True
    needed = needed.view(dims)
    masks = [needed]
    for _ in range(n_convs - 1):
        masks.append(_dilate(masks[-1], dims, k))
    masks.reverse()  # masks[i]: output sites of convolution i
    identity = torch.arange(v, dtype=torch.int32)
    convs = []
    in_map, n_in = identity, v
    for i, m in enumerate(masks):
        if i == n_convs - 1:
            sites = active.to(torch.int64)
        else:
            sites = _class_order(m, nu, period)
        out_map = torch.full((v,), -1, dtype=torch.int32)
        out_map[sites] = torch.arange(sites.numel(), dtype=torch.int32)
        convs.append(ConvPlan(sites.contiguous(), int(sites.numel()), out_map, in_map, n_in))
        in_map, n_in = out_map, int(sites.numel())
    order = _class_order(torch.ones(dims, dtype=torch.bool), nu, period)
    return LayerPlan(
        dims=torch.tensor(dims, dtype=torch.int32), volume=v,
        frozen=frozen.reshape(6, v).to(torch.uint8).contiguous(),
        active=active.to(torch.int64).contiguous(),
        weights=weights.to(torch.float64).contiguous(), mu=int(mu), nu=int(nu),
        convs=tuple(convs), kernel_size=k, all_rows=(order.contiguous(), order.contiguous()),
        weights32=weights.to(torch.float32).contiguous(),
        zgroups=(~frozen.reshape(6, v).bool()).to(torch.uint8).mul(
            (1 << torch.arange(6, dtype=torch.uint8))[:, None]).sum(0).to(torch.uint8).contiguous(),
    )


# ---- the fused layer ---------------------------------------------------------------------
def _weights(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``Conv4d`` weight ``[O, C, k, k, k, k]`` -> tap-major ``[k^4, C, O]`` (``[k^4, O, C]``
    transposed), the layouts of the forward and input-gradient kernels."""
    w = w.detach().contiguous()
    o, c = w.shape[0], w.shape[1]
    q = w[0, 0].numel()
    out = torch.empty(q, o, c, dtype=w.dtype) if transposed else torch.empty(q, c, o, dtype=w.dtype)
    getattr(sun_library(), f"hpcflow_sun_weights_{_SUFFIX[w.dtype]}")(
        w.data_ptr(), o, c, q, int(transposed), out.data_ptr())
    return out


@dataclass(frozen=True)
class LayerSpec:
    """One layer of :func:`sun_flow`: its plan and the NCP kernel's constants."""

    plan: LayerPlan
    n_components: int
    s_max: float
    slope: float = 0.01


def _conv_forward(lib, s: str, plan: LayerPlan, feats: torch.Tensor, wb: Sequence[torch.Tensor],
                  slope: float, threads: int) -> list[torch.Tensor]:
    """The context CNN on its site lists: ``[feats, h_1, ..., params]``."""
    nchunk, width, dt = feats.shape[0], feats.shape[-1], feats.dtype
    k = plan.kernel_size
    acts = [feats]
    nconv = len(plan.convs)
    for i, cp in enumerate(plan.convs):
        w, b = wb[2 * i], wb[2 * i + 1]
        cout, cin = w.shape[0], w.shape[1]
        out = _fresh(nchunk, cp.n_store, cout, width, dtype=dt)
        wt, bias = _weights(w, False), b.detach().contiguous()  # alive during the call
        getattr(lib, f"hpcflow_sun_conv_{s}")(
            acts[-1].data_ptr(), cp.n_in, cin, cp.in_map.data_ptr(), cp.sites.data_ptr(),
            cp.sites.numel(), None, cp.n_store, plan.dims.data_ptr(), k, 1, wt.data_ptr(),
            bias.data_ptr(), cout, out.data_ptr(), int(i < nconv - 1), float(slope), None, nchunk,
            plan.zgroups.data_ptr() if i == 0 else None, threads)
        acts.append(out)
    return acts


class _SUNFlow(torch.autograd.Function):
    """``(Ut, *weights and biases of every layer) -> (Ut', logdet[nchunk, W])``: the layers of
    ``specs`` in order, in place on one copy of the field.

    Each layer overwrites only its active links; the forward keeps the old ones (1/16 of a
    field), the CNN's activations and the eigen-decompositions. The backward walks the layers
    in reverse on one copy of the final field, writing the saved links back (so the field is
    each layer's input again) and turning the gradient of a layer's output into that of its
    input in place: no per-layer copies of the field or of its gradient."""

    @staticmethod
    def forward(ctx, Ut, specs, own, *wb):  # type: ignore[override]
        lib = sun_library()
        dt = Ut.dtype
        s = _SUFFIX[dt]
        threads = torch.get_num_threads()
        nchunk, _, v, _, width = Ut.shape
        grad = any(ctx.needs_input_grad)
        # own: the caller hands over Ut (a temporary of its own) and the gradient of the output
        # (consumed by nothing else): the walks run in them instead of copies (3 fields less)
        if own and Ut.is_contiguous():
            field = Ut
            ctx.mark_dirty(Ut)
        else:
            field = _clone(Ut.contiguous())
        ld = torch.zeros(nchunk, width, dtype=dt)
        saved: list[tuple[torch.Tensor, ...]] = []
        feats = _fresh(nchunk, v, 24, width, dtype=dt)
        off = 0
        for spec in specs:
            plan = spec.plan
            nconv = len(plan.convs)
            wb_l = wb[off : off + 2 * nconv]
            off += 2 * nconv
            if grad:
                feats = _fresh(nchunk, v, 24, width, dtype=dt)
            getattr(lib, f"hpcflow_sun_feat_fwd_{s}")(field.data_ptr(), plan.frozen.data_ptr(),
                                                      plan.dims.data_ptr(), nchunk,
                                                      feats.data_ptr(), threads)
            acts = _conv_forward(lib, s, plan, feats, wb_l, spec.slope, threads)
            prm = acts[-1]
            n_act = plan.active.numel()
            fresh = _fresh(nchunk, n_act, 18, width, dtype=dt)
            save = _fresh(nchunk, n_act, 18, width, dtype=dt) if grad else None
            eig = _fresh(nchunk, n_act, 21, width, dtype=dt) if grad else None
            ldl = torch.empty(nchunk, width, dtype=dt)
            ldsite = torch.empty(nchunk, n_act, width, dtype=dt)
            getattr(lib, f"hpcflow_sun_spec_fwd_{s}")(
                field.data_ptr(), prm.data_ptr(), prm.shape[2], plan.active.data_ptr(), n_act,
                plan.weights_of(dt).data_ptr(), plan.mu, plan.nu, spec.n_components,
                spec.s_max, plan.dims.data_ptr(), nchunk, fresh.data_ptr(), _ptr(save),
                ldsite.data_ptr(), ldl.data_ptr(), _ptr(eig), threads)
            ld += ldl
            if grad:
                saved.append((save, eig, *acts))
        ctx.specs, ctx.saved_layers, ctx.final, ctx.own, ctx.walked = specs, saved, field, own, False
        ctx.save_for_backward(*wb)
        return field, ld

    @staticmethod
    def backward(ctx, g_out, g_ld):  # type: ignore[override]
        lib = sun_library()
        specs, saved_layers = ctx.specs, ctx.saved_layers
        wb = ctx.saved_tensors
        # walked back to the input layer by layer; the final field itself when owned (then
        # the graph can be walked once: a second backward would start from the input)
        if ctx.final is None or (ctx.own and ctx.walked):  # buffers dropped by the first backward
            raise RuntimeError("the fused SU(3) flow's graph was already walked back (no "
                               "second backward through it)")
        if ctx.own:
            ctx.walked = True
            field = ctx.final
        else:
            field = _clone(ctx.final)
        dt = field.dtype
        s = _SUFFIX[dt]
        threads = torch.get_num_threads()
        nchunk, _, v, _, width = field.shape
        need_u = ctx.needs_input_grad[0]
        if g_out is None:
            gU = torch.zeros_like(field)
        elif ctx.own and g_out.is_contiguous():
            gU = g_out
        else:
            gU = _clone(g_out.contiguous())
        g_ld = torch.zeros(nchunk, width, dtype=dt) if g_ld is None else g_ld.contiguous()
        offs = []
        off = 0
        for spec in specs:
            offs.append(off)
            off += 2 * len(spec.plan.convs)
        grads: list[torch.Tensor | None] = [None] * len(wb)
        for li in reversed(range(len(specs))):
            spec, plan = specs[li], specs[li].plan
            save, eig, *acts = saved_layers[li]
            nconv = len(plan.convs)
            prm = acts[-1]
            n_act = plan.active.numel()
            gprm = _fresh(*prm.shape, dtype=dt)
            gnew = _fresh(nchunk, n_act, 18, width, dtype=dt)
            getattr(lib, f"hpcflow_sun_spec_bwd_{s}")(
                field.data_ptr(), save.data_ptr(), prm.data_ptr(), prm.shape[2],
                plan.active.data_ptr(), n_act, plan.weights_of(dt).data_ptr(), plan.mu, plan.nu,
                spec.n_components, spec.s_max, plan.dims.data_ptr(), nchunk, gnew.data_ptr(),
                g_ld.data_ptr(), gU.data_ptr(), gprm.data_ptr(), eig.data_ptr(), threads)
            # the input gradient of the first layer's features is needed only for U's
            first = li == 0 and not need_u
            g = gprm
            k = plan.kernel_size
            for i in reversed(range(nconv)):
                cp = plan.convs[i]
                w = wb[offs[li] + 2 * i]
                cout, cin = w.shape[0], w.shape[1]
                gw = torch.empty(cout, cin, k, k, k, k, dtype=dt)
                gb = torch.empty(cout, dtype=dt)
                getattr(lib, f"hpcflow_sun_conv_wgrad_{s}")(
                    acts[i].data_ptr(), cp.n_in, cin, cp.in_map.data_ptr(), cp.sites.data_ptr(),
                    cp.sites.numel(), plan.dims.data_ptr(), k, g.data_ptr(), cout, gw.data_ptr(),
                    gb.data_ptr(), nchunk, plan.zgroups.data_ptr() if i == 0 else None, threads)
                grads[offs[li] + 2 * i], grads[offs[li] + 2 * i + 1] = gw, gb
                if i == 0 and first:
                    break
                if i > 0:
                    prev = plan.convs[i - 1]
                    sites, rows, n_store = prev.sites, None, prev.n_store
                else:
                    sites, rows, n_store = plan.all_rows[0], plan.all_rows[1], plan.volume
                gx = _fresh(nchunk, n_store, cin, width, dtype=dt)
                wbk = _weights(w, True)  # alive during the call
                getattr(lib, f"hpcflow_sun_conv_{s}")(
                    g.data_ptr(), cp.n_store, cout, cp.out_map.data_ptr(), sites.data_ptr(),
                    sites.numel(), _ptr(rows), n_store, plan.dims.data_ptr(), k, -1, wbk.data_ptr(),
                    None, cin, gx.data_ptr(), 0, spec.slope, _ptr(acts[i]) if i > 0 else None,
                    nchunk, None, threads)
                g = gx
            if not first:
                getattr(lib, f"hpcflow_sun_feat_bwd_{s}")(field.data_ptr(), g.data_ptr(),
                                                          plan.frozen.data_ptr(), plan.dims.data_ptr(),
                                                          nchunk, gU.data_ptr(), threads)
        # the final field (an output of this node) and the per-layer buffers are plain ctx
        # attributes: drop them now, or the cycle output -> grad_fn -> ctx keeps them alive until
        # Python's cyclic collector happens to run (a decomposed training grew ~90 MB per rank
        # and step at 8x4^3, 0.5-0.8 GB at 8^4)
        ctx.final = ctx.saved_layers = None
        return (gU if need_u else None, None, None, *grads)


def _check_specs(Ut: torch.Tensor, specs: Sequence[LayerSpec]) -> None:
    if Ut.device.type != "cpu" or Ut.dtype not in _SUFFIX:
        raise ValueError(f"host SU(3) kernels need a CPU float32/float64 field, got {Ut.dtype} on {Ut.device}")
    kmax = sun_library().hpcflow_sun_max_components()
    for spec in specs:
        if not 1 <= int(spec.n_components) <= kmax:
            raise ValueError(f"host SU(3) kernels support 1..{kmax} NCP components, got {spec.n_components}")


def sun_flow(Ut: torch.Tensor, specs: Sequence[LayerSpec], weights: Sequence[Sequence[torch.Tensor]],
             biases: Sequence[Sequence[torch.Tensor]], own: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """SU(3) spectral coupling layers with NCP interval kernels, in order, on the lanes layout:
    ``(Ut', logdet[nchunk, W])`` (log-dets summed over the layers' active loops with their
    interior weights). ``weights[l][i]``: ``[C_out, C_in, k, k, k, k]`` (``Conv4d`` layout) of
    convolution ``i`` of layer ``l``. ``Ut`` is not modified, unless ``own``: the caller hands
    over ``Ut`` (a temporary, returned transformed as ``Ut'``) and guarantees that nothing else
    consumes the gradient of ``Ut'`` (the fused walk: ``to_lanes`` -> flow -> ``from_lanes``);
    the graph can then be walked back once."""
    _check_specs(Ut, specs)
    wb = [t for ws, bs in zip(weights, biases, strict=True) for pair in zip(ws, bs, strict=True)
          for t in pair]
    return _SUNFlow.apply(Ut, tuple(specs), bool(own), *wb)


def sun_flow_inverse(Ut: torch.Tensor, specs: Sequence[LayerSpec],
                     weights: Sequence[Sequence[torch.Tensor]],
                     biases: Sequence[Sequence[torch.Tensor]], own: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`sun_flow` (same arguments, ``specs`` in the forward's order): the layers
    walked in reverse on the lanes layout, ``(Ut_in, logdet[nchunk, W])`` with ``logdet`` the
    log-det of the inverse (minus the forward's at the pre-image), as
    :meth:`hpcflow.flows.sun.SUNSpectralCoupling.inverse` returns it.

    Per layer: the features of the frozen plaquettes and the context CNN exactly as the
    forward (frozen loops are unchanged by the layer, so the context is the forward's), then
    the inverse spectral map (``spec_inv`` of ``flow_sun.cpp``: the NCP maps inverted by
    bracketed Newton on the forward's formulas). Inference only (``log q`` of given fields,
    e.g. a mixed chain's state): the result carries no gradient, and a call that would need
    one raises (the torch path, :meth:`SUNSpectralCoupling._couple`, differentiates the
    inverse). ``own``: ``Ut`` is the caller's temporary and is transformed in place."""
    _check_specs(Ut, specs)
    wb = [t for ws, bs in zip(weights, biases, strict=True) for pair in zip(ws, bs, strict=True)
          for t in pair]
    if torch.is_grad_enabled() and (Ut.requires_grad or any(t.requires_grad for t in wb)):
        raise RuntimeError("sun_flow_inverse has no backward: call it under torch.no_grad() "
                           "(the torch path differentiates the inverse)")
    lib = sun_library()
    dt = Ut.dtype
    s = _SUFFIX[dt]
    threads = torch.get_num_threads()
    nchunk, _, v, _, width = Ut.shape
    field = Ut if own and Ut.is_contiguous() else _clone(Ut.contiguous())
    ld = torch.zeros(nchunk, width, dtype=dt)
    feats = _fresh(nchunk, v, 24, width, dtype=dt)
    ldl = torch.empty(nchunk, width, dtype=dt)
    offs = [0]
    for spec in specs:
        offs.append(offs[-1] + 2 * len(spec.plan.convs))
    for li in reversed(range(len(specs))):
        spec, plan = specs[li], specs[li].plan
        getattr(lib, f"hpcflow_sun_feat_fwd_{s}")(field.data_ptr(), plan.frozen.data_ptr(),
                                                  plan.dims.data_ptr(), nchunk, feats.data_ptr(),
                                                  threads)
        prm = _conv_forward(lib, s, plan, feats, wb[offs[li] : offs[li + 1]], spec.slope, threads)[-1]
        n_act = plan.active.numel()
        fresh = _fresh(nchunk, n_act, 18, width, dtype=dt)
        ldsite = _fresh(nchunk, n_act, width, dtype=dt)
        getattr(lib, f"hpcflow_sun_spec_inv_{s}")(
            field.data_ptr(), prm.data_ptr(), prm.shape[2], plan.active.data_ptr(), n_act,
            plan.weights_of(dt).data_ptr(), plan.mu, plan.nu, spec.n_components, spec.s_max,
            plan.dims.data_ptr(), nchunk, fresh.data_ptr(), ldsite.data_ptr(), ldl.data_ptr(),
            threads)
        ld -= ldl
    return field, ld


def sun_coupling(Ut: torch.Tensor, plan: LayerPlan, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor], n_components: int, s_max: float,
                 slope: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of :func:`sun_flow`."""
    return sun_flow(Ut, [LayerSpec(plan, int(n_components), float(s_max), float(slope))],
                    [weights], [biases])
