"""Long, resumable 2D U(1) Markov chains of the topological charge: the baseline side of the
seed experiment (Kanwar et al. 2020, arXiv 2003.06413: L = 16, beta = 1..7, tau_int(Q) of HMC
and heat bath), one chain per process call, on one core.

Algorithms (Wilson action, one "step" = one recorded configuration):

* ``hmc``: one leapfrog trajectory of ``--md-steps`` (default 5, the seed's tuning) steps of
  size ``eps``, tuned during thermalisation so that the acceptance lies in ``--acc-band``
  (default [0.80, 0.90]);
* ``hmc-long``: one leapfrog trajectory of fixed length ``--tau`` (default 2), ``n = ceil(tau /
  eps)`` steps with ``eps`` tuned the same way, then ``n`` raised until the acceptance is >= 0.80
  (lowered while it is above 0.90 and ``n - 1`` was not tried); ``eps = tau / n``;
* ``heatbath``: one heat-bath sweep (exact von Mises, checkerboard) per step;
* ``hb-or``: one heat-bath sweep followed by ``--n-or`` (default 1) overrelaxation sweeps.

Each step is one call of the host C++ kernels ``kernels/u1_updates.cpp`` through their ctypes
handles (the functions behind ``hpcflow.kernels.u1_updates.hmc_trajectory_u1`` /
``heatbath_sweep_u1`` / ``overrelax_sweep_u1``, called with preallocated numpy buffers: no
torch tensor is made per step); the chain equals ``HMC.trajectory`` / ``heatbath_sweep`` /
``overrelax_sweep`` of the library to rounding (tests/unit/test_topo_chains.py). Per step the
geometric charge ``Q = (1/2pi) sum_x arg P(x)`` (``arg`` in (-pi, pi], rounded to the integer it
is; stored int16) and the plaquette ``<cos P>`` (float64) are computed with numpy from the
field; HMC steps also store the accept flag and ``dH`` (float32). Random numbers are counter
based (``hpcflow.rng.CounterRNG``, Philox): production step ``i`` uses the counter
``step_base + i``, so the state of a chain is just (field, number of steps done).

Output, per chain: ``OUT/<algo>_L<L>_b<beta>/chain<ii>/``

* ``chunk_<start>.npz``: the series ``q``, ``plaq`` (and ``acc``, ``dH``) of production steps
  ``start ..``; one chunk per checkpoint;
* ``state.npz``: the field (complex128), the step counters and the committed chunk list;
* ``meta.json``: provenance (algorithm, beta, L, seeds, eps, n_md, tau, acceptance, start,
  thermalisation, git commit, wall / CPU time per step).

Checkpoints every ``--checkpoint-seconds`` (and on SIGTERM / SIGINT, then exit 143 / 130):
the chunk first, then the state, each written atomically (tmp + fsync + rename + directory
fsync). A chain killed at any moment (even SIGKILL) and rerun with ``--resume`` continues from
its last checkpoint and produces bit for bit the series of an uninterrupted run (chunks written
after the last committed state are discarded). ``--resume`` on a finished chain does nothing;
a larger ``--n-steps`` extends it.

    OMP_NUM_THREADS=1 python bench/topo_chains.py --algo hmc --beta 7 --L 16 --chains 4 \
        --chain-index all --n-steps 1000000 --out topo_out --seed 1 --resume

Analysis: bench/topo_analyse.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ALGOS = ("hmc", "hmc-long", "heatbath", "hb-or")
_ALGO_ID = {a: i for i, a in enumerate(ALGOS)}
FORMAT = "hpcflow-topo-chain/1"
BUF_CAP = 1 << 20  # steps per chunk at most (~15 MB of buffers)
BLOCK = 1024  # steps between checks of the clock / stop flag
TWO_PI = 2.0 * math.pi


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ChainConfig:
    """Everything that determines a chain's series (checked on resume)."""

    algo: str
    beta: float
    L: int
    seed: int
    chain: int
    n_chains: int
    start: str = "cold"
    n_therm: int = 2000
    md_steps: int = 5  # hmc
    tau: float = 2.0  # hmc-long
    n_or: int = 1  # hb-or
    acc_lo: float = 0.80
    acc_hi: float = 0.90
    eps: float | None = None  # fixed HMC step size: no tuning
    tune_block: int = 200
    verify_steps: int = 2000

    def key(self) -> dict:
        d = asdict(self)
        if self.algo != "hmc":
            d.pop("md_steps")
        if self.algo != "hmc-long":
            d.pop("tau")
        if self.algo != "hb-or":
            d.pop("n_or")
        if not self.algo.startswith("hmc"):
            for k in ("acc_lo", "acc_hi", "eps", "tune_block", "verify_steps"):
                d.pop(k)
        return d


def chain_seed(cfg: ChainConfig) -> int:
    """Independent Philox seed per (seed, algorithm, beta, L, chain)."""
    from hpcflow.rng import spawn_seed

    return spawn_seed(cfg.seed, _ALGO_ID[cfg.algo], int(round(cfg.beta * 1_000_000)), cfg.L, cfg.chain)


def chain_dir(out: Path, algo: str, beta: float, L: int, chain: int) -> Path:
    return Path(out) / f"{algo}_L{L}_b{beta:g}" / f"chain{chain:02d}"


# ---- atomic files ----------------------------------------------------------------------------
def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    """``write(fileobj)`` into ``path.tmp``, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


# ---- the kernels -----------------------------------------------------------------------------
class Kernels:
    """The u1_updates C++ entry points on numpy complex128 ``(2, L, L)`` buffers, one call per
    trajectory / sweep, single-threaded (the arguments of ``kernels/u1_updates.py``)."""

    def __init__(self, L: int, beta: float, rng) -> None:  # type: ignore[no-untyped-def]
        from hpcflow.kernels.u1_updates import load_u1_library
        from hpcflow.lattice.draws import BLOCKS_PER_CONFIG

        lib = load_u1_library()
        self.hmc_fn = lib.hpcflow_u1_hmc_d
        self.sweep_fn = lib.hpcflow_u1_sweep_d
        self.L, self.beta = int(L), float(beta)
        self.ks, self.kc = rng.key_site, rng.key_chain
        self.bpc = int(BLOCKS_PER_CONFIG)
        self.tol = 1e3 * float(np.finfo(np.float64).eps)  # reproject_if_drifted's default
        self.acc = np.zeros(1, np.uint8)
        self.dH = np.zeros(1, np.float64)

    def hmc(self, src: np.ndarray, dst: np.ndarray, n_md: int, tau: float, step: int) -> tuple[bool, float]:
        L = self.L
        self.hmc_fn(src.ctypes.data, dst.ctypes.data, self.acc.ctypes.data, self.dH.ctypes.data, 1, L, L,
                    self.beta, n_md, tau, 0, 0.0, self.ks[0], self.ks[1], self.kc[0], self.kc[1], step,
                    self.tol, 1)
        return bool(self.acc[0]), float(self.dH[0])

    def heatbath(self, src: np.ndarray, dst: np.ndarray, step: int) -> None:
        L = self.L
        self.sweep_fn(src.ctypes.data, dst.ctypes.data, 1, L, L, self.beta, self.ks[0], self.ks[1], step,
                      self.bpc, 0, self.tol, 1)

    def overrelax(self, src: np.ndarray, dst: np.ndarray) -> None:
        L = self.L
        self.sweep_fn(src.ctypes.data, dst.ctypes.data, 1, L, L, 0.0, 0, 0, 0, self.bpc, 1, self.tol, 1)


class Measure:
    """Geometric charge and mean plaquette of a ``(2, L, L)`` complex128 field with preallocated
    numpy scratch: ``P(x) = U_0(x) U_1(x+0) [U_1(x) U_0(x+1)]^*`` (as
    ``hpcflow.lattice.observables.topological_charge_u1_2d``), ``Q = sum arg P / 2pi``."""

    def __init__(self, L: int) -> None:
        V = L * L
        idx = np.arange(V).reshape(L, L)
        self.xp0 = np.roll(idx, -1, 0).ravel()  # x + 0
        self.xp1 = np.roll(idx, -1, 1).ravel()  # x + 1
        self.V = V
        self.t1 = np.empty(V, np.complex128)
        self.t2 = np.empty(V, np.complex128)
        self.a = np.empty(V, np.float64)

    def __call__(self, U: np.ndarray) -> tuple[float, float]:
        """``(Q as a float, <cos P>)``."""
        u = U.reshape(2, self.V)
        u0, u1, t1, t2 = u[0], u[1], self.t1, self.t2
        np.take(u1, self.xp0, out=t1)
        np.multiply(u0, t1, out=t1)
        np.take(u0, self.xp1, out=t2)
        np.multiply(u1, t2, out=t2)
        np.conjugate(t2, out=t2)
        np.multiply(t1, t2, out=t1)
        a = np.arctan2(t1.imag, t1.real, out=self.a)  # [-pi, pi]; -pi only for Im P = -0.0
        a[a <= -math.pi] += TWO_PI
        return float(a.sum()) / TWO_PI, float(t1.real.sum()) / self.V


def geometric_charge(U: np.ndarray) -> float:
    """``Q`` (float) of one ``(2, L, L)`` field (convenience, not the hot path)."""
    U = np.ascontiguousarray(U, dtype=np.complex128)
    return Measure(U.shape[-1])(U)[0]


# ---- the chain -------------------------------------------------------------------------------
class SimulatedKill(Exception):
    """Raised by ``run_chain(abort_after=...)``: stops without a final checkpoint (tests)."""


@dataclass
class State:
    n_done: int = 0
    step_base: int = 0  # counter of production step 0
    eps: float | None = None
    n_md: int | None = None
    tau: float | None = None
    tuning: dict = field(default_factory=dict)
    n_therm_done: int = 0
    chunks: list = field(default_factory=list)  # [[start, n], ...]
    q_last: int | None = None
    n_tunnel: int = 0
    n_acc: int = 0
    max_q_dev: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    therm_cpu_s: float = 0.0
    segments: int = 0


def _erfcinv(y: float) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if math.erfc(mid) > y:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _dH_for(acc: float) -> float:
    """<dH> giving acceptance ``acc`` (for Gaussian dH with var = 2 <dH>: acc = erfc(sqrt(<dH>)/2))."""
    acc = min(max(acc, 1e-6), 1 - 1e-9)
    return (2.0 * _erfcinv(acc)) ** 2


class Chain:
    def __init__(self, cfg: ChainConfig, directory: Path, log=print) -> None:  # type: ignore[no-untyped-def]
        from hpcflow.rng import CounterRNG

        if cfg.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {cfg.algo!r}")
        if cfg.L % 2 or cfg.L < 2:
            raise ValueError(f"L must be even and >= 2 (checkerboard sweeps), got {cfg.L}")
        self.cfg, self.dir, self.log = cfg, Path(directory), log
        self.seed = chain_seed(cfg)
        self.rng = CounterRNG(self.seed, 0)
        self.k = Kernels(cfg.L, cfg.beta, self.rng)
        self.measure = Measure(cfg.L)
        self.A = np.empty((2, cfg.L, cfg.L), np.complex128)
        self.B = np.empty_like(self.A)
        self.st = State()
        self._prov: dict | None = None

    # -- start and thermalisation ---------------------------------------------------------------
    def _init_field(self) -> None:
        cfg = self.cfg
        if cfg.start == "cold":
            self.A[...] = 1.0
        elif cfg.start == "hot":
            th = np.random.default_rng(self.seed).uniform(-math.pi, math.pi, self.A.shape)
            self.A[...] = np.exp(1j * th)
        else:
            raise ValueError(f"start must be 'cold' or 'hot', got {cfg.start!r}")

    def _hmc_block(self, n: int, n_md: int, tau: float, step: int) -> tuple[float, float]:
        """``n`` trajectories from counter ``step``: (accept fraction, mean min(1, e^-dH))."""
        k, A, B = self.k, self.A, self.B
        n_acc, p = 0, 0.0
        for i in range(n):
            a, dH = k.hmc(A, B, n_md, tau, step + i)
            A, B = B, A
            n_acc += a
            p += math.exp(-dH) if dH > 0 else 1.0
        if A is not self.A:
            self.A[...] = A
        return n_acc / n, p / n

    def _tune(self) -> int:
        """Tune eps (``hmc``: n_md fixed) or n_md (``hmc-long``: tau fixed) for acceptance in
        the band; returns the number of steps used (all count as thermalisation)."""
        cfg, st = self.cfg, self.st
        lo, hi = cfg.acc_lo, cfg.acc_hi
        target = 0.5 * (lo + hi)
        long = cfg.algo == "hmc-long"
        eps = cfg.eps if cfg.eps is not None else 0.45 / math.sqrt(max(cfg.beta, 0.25))
        step, hist = 0, []

        def params(e: float) -> tuple[int, float, float]:
            if long:
                n = max(1, math.ceil(cfg.tau / e - 1e-9))
                return n, cfg.tau, cfg.tau / n
            return cfg.md_steps, cfg.md_steps * e, e

        if cfg.eps is None:
            # adaptive: <dH> ~ eps^4, eps <- eps (dH_target / <dH>)^(1/4), a factor in [1/2, 2]
            dh_t = _dH_for(target)
            good = 0
            for _ in range(200):
                n, tau, e = params(eps)
                fr, p = self._hmc_block(cfg.tune_block, n, tau, step)
                step += cfg.tune_block
                hist.append({"eps": e, "n_md": n, "acc": fr, "p_acc": p})
                good = good + 1 if abs(p - target) < 0.4 * (hi - lo) else 0
                if good >= 2:
                    break
                eps = e * min(2.0, max(0.5, (dh_t / _dH_for(p)) ** 0.25))
            else:
                self.log("warning: HMC tuning did not converge in 200 blocks")
        # verification at fixed parameters (hmc-long: the fewest n with acceptance >= lo)
        n, tau, e = params(eps)
        tried: dict[int, float] = {}
        for _ in range(20):
            fr, p = self._hmc_block(cfg.verify_steps, n, tau, step)
            step += cfg.verify_steps
            hist.append({"eps": tau / n, "n_md": n, "acc": fr, "p_acc": p, "verify": True})
            tried[n] = fr
            if cfg.eps is not None:
                break
            if long:
                if fr < lo:
                    n += 1
                elif n > 1 and (n - 1) not in tried and fr > hi:
                    n -= 1
                else:
                    break
            else:
                if lo <= fr <= hi:
                    break
                e *= min(1.25, max(0.8, (_dH_for(target) / _dH_for(p)) ** 0.25))
                n, tau, e = params(e)
        else:
            self.log(f"warning: HMC acceptance not in [{lo}, {hi}] after verification: {fr:.3f}")
        if long and tried.get(n, -1.0) < 0:  # the loop moved to an n it did not measure
            fr, p = self._hmc_block(cfg.verify_steps, n, tau, step)
            step += cfg.verify_steps
            hist.append({"eps": tau / n, "n_md": n, "acc": fr, "p_acc": p, "verify": True})
        st.eps, st.n_md, st.tau = tau / n, n, tau
        st.tuning = {"blocks": hist, "acceptance_verify": hist[-1]["acc"], "verify_steps": cfg.verify_steps}
        self.log(f"tuned: eps {st.eps:.5g}, n_md {n}, tau {tau:.4g}, acceptance {hist[-1]['acc']:.3f} "
                 f"({len(hist)} blocks, {step} trajectories)")
        return step

    def thermalise(self) -> None:
        cfg, st = self.cfg, self.st
        c0 = time.process_time()
        self._init_field()
        step = 0
        if cfg.algo.startswith("hmc"):
            step = self._tune()
            rest = max(0, cfg.n_therm - step)
            if rest:
                self._hmc_block(rest, st.n_md, st.tau, step)
            step += rest
        else:
            A, B, k = self.A, self.B, self.k
            for i in range(cfg.n_therm):
                k.heatbath(A, B, i)
                A, B = B, A
                for _ in range(cfg.n_or if cfg.algo == "hb-or" else 0):
                    k.overrelax(A, B)
                    A, B = B, A
            if A is not self.A:
                self.A[...] = A
            step = cfg.n_therm
        st.step_base = step
        st.n_therm_done = step
        st.therm_cpu_s = time.process_time() - c0

    # -- production -----------------------------------------------------------------------------
    def _run_block(self, m: int, j0: int, q: np.ndarray, plaq: np.ndarray, acc: np.ndarray, dH: np.ndarray,
                   step0: int) -> None:
        """``m`` production steps from counter ``step0``; series into buffers at ``j0``."""
        algo, k, meas = self.cfg.algo, self.k, self.measure
        A, B = self.A, self.B
        st = self.st
        maxdev = st.max_q_dev
        qf, pl = meas(A)
        if algo.startswith("hmc"):
            hmc, n_md, tau = k.hmc, st.n_md, st.tau
            for i in range(m):
                a, d = hmc(A, B, n_md, tau, step0 + i)
                A, B = B, A
                if a:
                    qf, pl = meas(A)
                j = j0 + i
                acc[j] = a
                dH[j] = d
                qi = round(qf)
                q[j] = qi
                plaq[j] = pl
                dev = abs(qf - qi)
                if dev > maxdev:
                    maxdev = dev
        else:
            hb, orx = k.heatbath, k.overrelax
            n_or = self.cfg.n_or if algo == "hb-or" else 0
            for i in range(m):
                hb(A, B, step0 + i)
                A, B = B, A
                for _ in range(n_or):
                    orx(A, B)
                    A, B = B, A
                qf, pl = meas(A)
                j = j0 + i
                qi = round(qf)
                q[j] = qi
                plaq[j] = pl
                dev = abs(qf - qi)
                if dev > maxdev:
                    maxdev = dev
            acc[j0:j0 + m] = 1
        if A is not self.A:
            self.A[...] = A
        st.max_q_dev = maxdev

    def _checkpoint(self, start: int, fill: int, bufs: dict, t_seg: tuple[float, float]) -> None:
        st = self.st
        hmc = self.cfg.algo.startswith("hmc")
        if fill:
            q = bufs["q"][:fill]
            arrays = {"q": q, "plaq": bufs["plaq"][:fill]}
            if hmc:
                arrays.update(acc=bufs["acc"][:fill], dH=bufs["dH"][:fill])
            _atomic_write(self.dir / f"chunk_{start:010d}.npz", lambda f: np.savez(f, **arrays))
            prev = st.q_last if st.q_last is not None else int(q[0])
            st.n_tunnel += int(q[0] != prev) + int(np.count_nonzero(np.diff(q)))
            st.q_last = int(q[-1])
            st.n_acc += int(bufs["acc"][:fill].sum())
            st.chunks.append([start, fill])
            st.n_done = start + fill
        c, w = time.process_time(), time.perf_counter()
        st.cpu_s += c - t_seg[0]
        st.wall_s += w - t_seg[1]
        self._write_state()

    def _write_state(self) -> None:
        st = self.st
        payload = {"format": FORMAT, "config": self.cfg.key(), "state": asdict(st)}
        U = self.A.copy()
        _atomic_write(self.dir / "state.npz",
                      lambda f: np.savez(f, U=U, state_json=np.array(json.dumps(payload))))
        self._write_meta(done=False)

    def _write_meta(self, done: bool, target: int | None = None) -> None:
        from hpcflow.provenance import provenance

        if self._prov is None:
            self._prov = provenance({"host": os.uname().nodename, "argv": sys.argv})
        cfg, st = self.cfg, self.st
        n = max(st.n_done, 1)
        meta = {
            "format": FORMAT, "algo": cfg.algo, "beta": cfg.beta, "L": cfg.L, "seed": cfg.seed,
            "chain": cfg.chain, "n_chains": cfg.n_chains, "chain_seed": self.seed, "start": cfg.start,
            "n_therm": st.n_therm_done, "n_steps_done": st.n_done, "n_steps_target": target,
            "complete": bool(done),
            "update": {"hmc": f"leapfrog, {cfg.md_steps} steps, eps tuned for acceptance in "
                              f"[{cfg.acc_lo}, {cfg.acc_hi}]",
                       "hmc-long": f"leapfrog, tau {cfg.tau}, fewest steps with acceptance >= {cfg.acc_lo}",
                       "heatbath": "1 heat-bath sweep", "hb-or": f"1 heat-bath + {cfg.n_or} overrelaxation sweeps",
                       }[cfg.algo],
            "eps": st.eps, "n_md": st.n_md, "tau": st.tau, "n_or": cfg.n_or if cfg.algo == "hb-or" else 0,
            "acceptance": st.n_acc / n if cfg.algo.startswith("hmc") else None,
            "acceptance_tuning": st.tuning.get("acceptance_verify"),
            "tuning": st.tuning,
            "n_tunnel": st.n_tunnel, "max_q_rounding": st.max_q_dev,
            "wall_s": st.wall_s, "cpu_s": st.cpu_s, "therm_cpu_s": st.therm_cpu_s,
            "cpu_s_per_step": st.cpu_s / n, "wall_s_per_step": st.wall_s / n,
            "steps_per_s": st.n_done / st.wall_s if st.wall_s > 0 else None,
            "segments": st.segments, "kernels": "kernels/u1_updates.cpp via ctypes, complex128, 1 thread",
            "files": "chunk_<start>.npz: q int16 (geometric charge), plaq float64 (<cos P>), "
                     "acc uint8 and dH float32 (HMC); state.npz: field + counters",
            "provenance": self._prov,
        }
        _atomic_json(self.dir / "meta.json", meta)

    def _load(self) -> bool:
        """Restore from ``state.npz``; False if there is none. Drops uncommitted chunks."""
        path = self.dir / "state.npz"
        if not path.exists():
            return False
        with np.load(path) as z:
            payload = json.loads(str(z["state_json"]))
            U = z["U"]
        if payload.get("format") != FORMAT:
            raise SystemExit(f"{path}: unknown format {payload.get('format')!r}")
        want, got = self.cfg.key(), payload["config"]
        if want != got:
            diff = {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}
            raise SystemExit(f"{path}: the chain was started with other settings (stored, requested): {diff}")
        self.st = State(**payload["state"])
        self.A[...] = U
        committed = {f"chunk_{s:010d}.npz" for s, _ in self.st.chunks}
        pos = 0
        for s, n in self.st.chunks:
            if s != pos or not (self.dir / f"chunk_{s:010d}.npz").exists():
                raise SystemExit(f"{self.dir}: chunk list broken at step {s} (expected {pos} and the file)")
            pos = s + n
        if pos != self.st.n_done:
            raise SystemExit(f"{self.dir}: chunks cover {pos} steps, state says {self.st.n_done}")
        for p in self.dir.glob("chunk_*.npz*"):
            if p.name not in committed:
                p.unlink()
        return True

    def run(self, n_steps: int, resume: bool, checkpoint_seconds: float = 120.0,
            checkpoint_every_steps: int | None = None, abort_after: int | None = None) -> dict:
        """Run until ``n_steps`` production steps are done; returns the meta dict's speeds."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "state.npz").exists() and not resume:
            raise SystemExit(f"{self.dir} holds a chain already: pass --resume to continue it")
        if not (resume and self._load()):
            for p in self.dir.glob("chunk_*.npz*"):
                p.unlink()
            self.thermalise()
            self._write_state()
        st = self.st
        st.segments += 1
        if st.n_done >= n_steps:
            self.log(f"{self.dir}: {st.n_done} steps done already (target {n_steps})")
            self._write_meta(done=True, target=n_steps)
            return {"n_new": 0}
        cap = min(BUF_CAP, n_steps - st.n_done)
        if checkpoint_every_steps:
            cap = min(cap, checkpoint_every_steps)
        bufs = {"q": np.zeros(cap, np.int16), "plaq": np.zeros(cap), "acc": np.zeros(cap, np.uint8),
                "dH": np.zeros(cap, np.float32)}
        stop = {"sig": 0}

        def on_signal(signum, frame):  # type: ignore[no-untyped-def]
            stop["sig"] = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        n0, c_start, w_start = st.n_done, time.process_time(), time.perf_counter()
        try:
            start, fill = st.n_done, 0
            t_seg = (time.process_time(), time.perf_counter())
            last_ckpt = t_seg[1]
            while st.n_done + fill < n_steps and not stop["sig"]:
                m = min(BLOCK, n_steps - st.n_done - fill, cap - fill)
                if abort_after is not None:
                    m = min(m, n0 + abort_after - (st.n_done + fill))
                    if m <= 0:
                        raise SimulatedKill(st.n_done + fill)
                step0 = st.step_base + start + fill
                if step0 + m > 0xFFFFFFFF:
                    raise SystemExit("the Philox step counter would pass 2**32: run fewer steps")
                self._run_block(m, fill, bufs["q"], bufs["plaq"], bufs["acc"], bufs["dH"], step0)
                fill += m
                now = time.perf_counter()
                if (fill == cap or now - last_ckpt >= checkpoint_seconds or st.n_done + fill >= n_steps):
                    self._checkpoint(start, fill, bufs, t_seg)
                    done = st.n_done - n0
                    rate = done / max(time.perf_counter() - w_start, 1e-9)
                    acc = f", acceptance {st.n_acc / st.n_done:.3f}" if self.cfg.algo.startswith("hmc") else ""
                    self.log(f"{self.dir.parent.name}/{self.dir.name}: {st.n_done}/{n_steps} steps, "
                             f"{rate:,.0f} steps/s, {st.n_tunnel} Q changes, Q = {st.q_last}{acc}")
                    start, fill = st.n_done, 0
                    t_seg = (time.process_time(), time.perf_counter())
                    last_ckpt = t_seg[1]
            if fill:
                self._checkpoint(start, fill, bufs, t_seg)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        n_new = st.n_done - n0
        wall, cpu = time.perf_counter() - w_start, time.process_time() - c_start
        self._write_meta(done=st.n_done >= n_steps, target=n_steps)
        res = {"n_new": n_new, "wall_s": wall, "cpu_s": cpu,
               "us_per_step": 1e6 * wall / max(n_new, 1), "cpu_us_per_step": 1e6 * cpu / max(n_new, 1),
               "signal": stop["sig"]}
        self.log(f"{self.dir.parent.name}/{self.dir.name}: {n_new} new steps in {wall:.1f} s: "
                 f"{n_new / max(wall, 1e-9):,.0f} steps/s ({res['us_per_step']:.1f} us/step wall, "
                 f"{res['cpu_us_per_step']:.1f} us/step CPU)")
        return res


# ---- reading -----------------------------------------------------------------------------------
def load_series(directory: Path) -> dict:
    """The committed series of one chain: ``{"q", "plaq"[, "acc", "dH"], "meta", "n"}``."""
    directory = Path(directory)
    with np.load(directory / "state.npz") as z:
        payload = json.loads(str(z["state_json"]))
    parts: dict[str, list] = {}
    for s, n in payload["state"]["chunks"]:
        with np.load(directory / f"chunk_{s:010d}.npz") as z:
            for k in z.files:
                a = z[k]
                if a.shape[0] != n:
                    raise ValueError(f"{directory}: chunk {s} holds {a.shape[0]} steps, expected {n}")
                parts.setdefault(k, []).append(a)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if "q" not in out:
        out["q"] = np.zeros(0, np.int16)
        out["plaq"] = np.zeros(0)
    meta_path = directory / "meta.json"
    out["meta"] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    out["state"] = payload["state"]
    out["config"] = payload["config"]
    out["n"] = int(out["q"].shape[0])
    return out


def load_field(directory: Path) -> np.ndarray:
    with np.load(Path(directory) / "state.npz") as z:
        return z["U"].copy()


# ---- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", choices=ALGOS, required=True)
    ap.add_argument("--beta", type=float, required=True)
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--chains", type=int, default=4, help="chains of this (algo, beta) in all")
    ap.add_argument("--chain-index", default="all", help="which chain (0 .. chains-1) or 'all' (in turn)")
    ap.add_argument("--n-steps", type=int, required=True, help="production steps per chain (after thermalisation)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--checkpoint-seconds", type=float, default=120.0)
    ap.add_argument("--resume", action="store_true", help="continue a chain found under --out (else start it)")
    ap.add_argument("--n-therm", type=int, default=2000, help="thermalisation steps (HMC: at least, tuning included)")
    ap.add_argument("--start", choices=["cold", "hot"], default="cold")
    ap.add_argument("--md-steps", type=int, default=5, help="hmc: leapfrog steps per trajectory")
    ap.add_argument("--tau", type=float, default=2.0, help="hmc-long: trajectory length")
    ap.add_argument("--n-or", type=int, default=1, help="hb-or: overrelaxation sweeps per heat-bath sweep")
    ap.add_argument("--acc-band", type=float, nargs=2, default=[0.80, 0.90], metavar=("LO", "HI"))
    ap.add_argument("--eps", type=float, default=None, help="hmc: fixed step size (no tuning)")
    ap.add_argument("--tune-block", type=int, default=200)
    ap.add_argument("--verify-steps", type=int, default=2000)
    ap.add_argument("--checkpoint-every-steps", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # the kernels' loader imports torch; keep it on one thread

    torch.set_num_threads(1)
    if args.chain_index == "all":
        chains = list(range(args.chains))
    else:
        i = int(args.chain_index)
        if not 0 <= i < args.chains:
            raise SystemExit(f"--chain-index must be in [0, {args.chains}) or 'all', got {i}")
        chains = [i]
    if args.n_steps < 1 or args.n_therm < 0:
        raise SystemExit("--n-steps must be >= 1 and --n-therm >= 0")
    lo, hi = args.acc_band
    for i in chains:
        cfg = ChainConfig(algo=args.algo, beta=args.beta, L=args.L, seed=args.seed, chain=i,
                          n_chains=args.chains, start=args.start, n_therm=args.n_therm,
                          md_steps=args.md_steps, tau=args.tau, n_or=args.n_or, acc_lo=lo, acc_hi=hi,
                          eps=args.eps, tune_block=args.tune_block, verify_steps=args.verify_steps)
        d = chain_dir(args.out, args.algo, args.beta, args.L, i)
        res = Chain(cfg, d, log=lambda s: print(s, flush=True)).run(
            args.n_steps, args.resume, args.checkpoint_seconds, args.checkpoint_every_steps)
        if res.get("signal"):
            return 128 + int(res["signal"])
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
