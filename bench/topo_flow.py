"""Long, resumable flow + independence-Metropolis chains of the topological charge: the flow side
of the seed experiment (Kanwar et al. 2020, arXiv 2003.06413: 2D U(1), L = 16, beta = 1..7,
tau_int(Q) of the flow against HMC and heat bath), written in the layout of
bench/topo_chains.py so that bench/topo_analyse.py analyses both together.

The model is a finished ``hpcflow train`` run: ``--model RUN_DIR`` reads ``RUN_DIR/config.yaml``
(written by the run) and ``RUN_DIR/train/checkpoint.pt``; the flow is built by
``hpcflow.flows.build.build_model`` in the run's precision and loaded by
``hpcflow.flows.train.load_flow_checkpoint`` (architecture, lattice and beta checked). Only 2D
U(1) models on square lattices are accepted.

One chain step = one flow proposal (independence Metropolis, exact for any model):

* proposal ``p`` (0-based over the chain) is ``model.sample_counter(rng, first, batch)`` of the
  batch ``first = p - p % batch`` (the prior draws are keyed on (proposal, link) of a Philox
  ``CounterRNG`` with a seed per (seed, beta, L, chain): independent streams per chain), in one
  forward pass per ``--batch`` proposals under ``torch.inference_mode``;
* its accept uniform is ``rng.uniform([p], ACCEPT_STEP)`` (as ``hpcflow.sampling.updates.
  FlowUpdate``); the walk is ``hpcflow.sampling.metropolis.independence_walk`` (accept iff
  ``log u < log w' - log w``, ``log w = -S - log q``); the first state of a chain is its first
  proposal (``log w0 = -inf``);
* ``S``, the plaquette and the geometric charge (``model.observables`` = ``hpcflow.flows.u1.
  u1_topological_charge``) are evaluated in float64 on the proposal's angles (float32 for a
  float32 model: the configuration *is* the float32 field); ``log q`` comes from the flow in its
  own precision. The accept test therefore targets ``exp(-S)`` exactly up to the rounding of
  ``log q`` (~1e-4 in float32 at L = 16), whatever ``--beta`` is: a model trained at another
  beta (``--allow-beta-mismatch``) is just a worse proposal.

With a float64 model the chain is configuration for configuration the library's own
``hpcflow.sampling.flow_chains.flow_chain`` with ``CounterRNG(chain_seed)`` (proposals
``n_therm ..`` of it; tests/unit/test_topo_flow.py).

Thermalisation: the first ``--therm`` steps (default 100; proposals ``0 .. therm-1``) are walked
but not stored; production step ``i`` is proposal ``therm + i``. (For an independence sampler
whose first state is already a draw of ``q`` the burn-in is short: a state of low weight is left
after ~1/acceptance steps.) ``topo_analyse --discard`` can drop more.

The chain's state is tiny: the current configuration (kept for inspection, never needed to
continue), its ``log w``, ``Q``, plaquette, and the next proposal number; the batch containing
that proposal is recomputed on resume (the same forward pass of the same batch: bit for bit,
with the same ``--batch``, backend and thread count).

Output, per chain: ``OUT/<name>_L<L>_b<beta>/chain<ii>/`` (``--name`` default ``flow``):

* ``chunk_<start>.npz``: ``q`` int16 (geometric charge of the chain's state), ``plaq`` float64
  (``<cos P>``), ``acc`` uint8 (the step accepted its proposal), ``logw`` float64 (``log w`` of
  the step's *proposal*; with ``acc`` and the uniforms it reproduces the walk);
* ``state.npz``: the current field ``x`` (angles), counters, the committed chunk list;
* ``meta.json``: model path, sha256, training steps, architecture, precision, backend, batch,
  acceptance, CPU time per proposal (= per step), git commit, ...

Checkpoints every ``--checkpoint-seconds`` and on SIGTERM / SIGINT (exit 143 / 130) exactly as
topo_chains (chunk, then state, each atomic); ``--resume`` continues bit for bit; a larger
``--n-steps`` extends a finished chain.

    OMP_NUM_THREADS=1 python bench/topo_flow.py --model runs/l16/b7 --chains 4 --chain-index all \
        --n-steps 200000 --out topo_out --seed 1 --resume

Analysis: ``python bench/topo_analyse.py topo_out``; plot: ``python bench/topo_plot.py``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topo_chains import BLOCK, BUF_CAP, SimulatedKill, _atomic_json, _atomic_write, chain_dir  # noqa: E402

FORMAT = "hpcflow-topo-flow-chain/1"
#: spawn key of the flow chains' seeds (topo_chains uses 0..3 for its algorithms)
FLOW_SEED_KEY = 100


# ---- the model -------------------------------------------------------------------------------
@dataclass
class FlowModel:
    model: object
    lat: object
    cfg: object
    run_dir: Path
    ckpt_path: Path
    sha256: str
    train_step: int
    train_steps: int
    backend: str
    precision: str
    train_wall_s: float | None = None

    @property
    def L(self) -> int:
        return int(self.cfg.lattice.shape[0])

    @property
    def beta(self) -> float:
        return float(self.cfg.action.beta)


def load_model(run_dir: Path, backend: str = "auto", allow_unfinished: bool = False) -> FlowModel:
    """The trained flow of an ``hpcflow train`` output directory; ``SystemExit`` with one line
    when it is missing, unreadable, not a 2D U(1) flow, or (without ``allow_unfinished``) its
    training has not reached ``train.steps``."""
    import dataclasses

    import torch

    from hpcflow.config import ConfigError, load_config
    from hpcflow.flows.build import build_model
    from hpcflow.flows.train import load_flow_checkpoint
    from hpcflow.io.checkpoint import file_sha256
    from hpcflow.lattice.geometry import Lattice

    run_dir = Path(run_dir)
    cfg_path, ckpt = run_dir / "config.yaml", run_dir / "train" / "checkpoint.pt"
    if not cfg_path.is_file():
        raise SystemExit(f"--model {run_dir}: no config.yaml there: not an `hpcflow train` output directory")
    if not ckpt.is_file():
        raise SystemExit(f"--model {run_dir}: missing model {ckpt}: run `hpcflow train` first")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as e:
        raise SystemExit(f"--model {run_dir}: {e}") from None
    shape = tuple(int(n) for n in cfg.lattice.shape)
    if cfg.group != "u1" or len(shape) != 2:
        raise SystemExit(f"--model {run_dir}: the model is a {cfg.group} flow on {list(shape)}; "
                         "topo_flow needs a 2D U(1) flow")
    if shape[0] != shape[1]:
        raise SystemExit(f"--model {run_dir}: lattice {list(shape)} is not square (the chains are L x L)")
    if backend == "auto":
        from hpcflow.backend import run_backend

        backend = run_backend(dataclasses.replace(cfg, backend="auto", device="cpu"))
    lat = Lattice(shape, backend=backend)
    try:
        model = build_model(cfg, lat)
        ck = load_flow_checkpoint(model, ckpt, cfg.action.beta)
    except Exception as e:  # noqa: BLE001 - any mismatch or unreadable file: one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SystemExit(f"--model {run_dir}: the checkpoint does not fit its config ({msg})") from None
    step, steps = int(ck.get("step", -1)), int(cfg.train.steps)
    if step < steps and not allow_unfinished:
        raise SystemExit(f"--model {run_dir}: training is at step {step} of {steps} (still running?); "
                         "pass --allow-unfinished to sample with it anyway")
    model.eval()
    model.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    return FlowModel(model, lat, cfg, run_dir.resolve(), ckpt.resolve(), file_sha256(ckpt), step, steps,
                     backend, "float32" if dtype == torch.float32 else "float64",
                     _training_time(run_dir / "train" / "metrics.jsonl"))


def _training_time(path: Path) -> float | None:
    """Sum of the per-step ``time`` (wall seconds) of the training's metrics.jsonl, or None."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    t = [float(r["time"]) for r in rows if isinstance(r, dict) and "time" in r]
    return sum(t) if t else None


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowChainConfig:
    """Everything that determines a chain's series (checked on resume)."""

    beta: float
    L: int
    seed: int
    chain: int
    n_chains: int
    model_sha256: str
    n_therm: int = 100
    batch: int = 256
    backend: str = "host"
    precision: str = "float32"
    algo: str = "flow"

    def key(self) -> dict:
        return asdict(self)


def chain_seed(cfg: FlowChainConfig) -> int:
    """Independent Philox seed per (seed, beta, L, chain) (not per model: two models at the same
    seed see the same prior draws, a fair comparison)."""
    from hpcflow.rng import spawn_seed

    return spawn_seed(cfg.seed, FLOW_SEED_KEY, int(round(cfg.beta * 1_000_000)), cfg.L, cfg.chain)


@dataclass
class State:
    n_done: int = 0
    p: int = 0  # next proposal number
    cur_logw: float = -math.inf  # the chain's state (-inf: none yet)
    cur_q: float = 0.0
    cur_plaq: float = 0.0
    start_logw: float | None = None  # log w of the state production step 0 starts from
    n_therm_done: int = 0
    chunks: list = field(default_factory=list)
    q_last: int | None = None
    n_tunnel: int = 0
    n_acc: int = 0
    n_acc_therm: int = 0
    max_q_dev: float = 0.0
    n_batches: int = 0  # forward passes (all segments; a resume recomputes one)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    therm_cpu_s: float = 0.0
    segments: int = 0


class FlowChain:
    """One independence-Metropolis chain of flow proposals (see the module docstring)."""

    def __init__(self, fm: FlowModel, cfg: FlowChainConfig, directory: Path, log=print) -> None:  # type: ignore[no-untyped-def]
        from hpcflow.rng import CounterRNG

        if cfg.L != fm.L:
            raise ValueError(f"chain L {cfg.L} != model lattice {fm.L}")
        if cfg.batch < 1:
            raise ValueError(f"batch must be >= 1, got {cfg.batch}")
        self.fm, self.cfg, self.dir, self.log = fm, cfg, Path(directory), log
        self.seed = chain_seed(cfg)
        self.rng = CounterRNG(self.seed, 0)
        self.st = State()
        self.x = None  # current field (torch, the model's dtype)
        self._buf: dict | None = None
        self._buf_first = -1
        self._prov: dict | None = None

    # -- proposals ---------------------------------------------------------------------------------
    def _batch(self, first: int) -> dict:
        """Proposals ``first .. first + batch - 1``: fields, log w, Q, plaquette, accept uniforms."""
        import torch

        from hpcflow.sampling.metropolis import ACCEPT_STEP

        if self._buf_first == first:
            return self._buf  # type: ignore[return-value]
        m, b, beta = self.fm.model, self.cfg.batch, self.cfg.beta
        with torch.inference_mode():
            x, logq = m.sample_counter(self.rng, first, b)
            x64 = x.to(torch.float64)
            S = m.action(x64, beta)
            obs = m.observables(x64)
            logw = -S - logq.to(torch.float64)
            u = self.rng.uniform(torch.arange(first, first + b), ACCEPT_STEP, 1)[:, 0]
        self._buf = {"x": x, "logw_t": logw, "logw": logw.numpy(), "q": obs["Q"].numpy(),
                     "plaq": obs["plaquette"].numpy(), "u": u}
        self._buf_first = first
        self.st.n_batches += 1
        return self._buf

    def _walk(self, m: int, out: dict | None, j0: int) -> None:
        """``m`` chain steps from proposal ``st.p``; the series into ``out`` at ``j0`` (None:
        thermalisation, nothing stored)."""
        from hpcflow.sampling.metropolis import independence_walk

        st, b = self.st, self.cfg.batch
        done = 0
        maxdev = st.max_q_dev
        while done < m:
            first = st.p - st.p % b
            j = st.p - first
            k = min(b - j, m - done)
            buf = self._batch(first)
            idx, acc = independence_walk(buf["logw_t"][j:j + k], st.cur_logw, buf["u"][j:j + k])
            if out is not None:
                on = idx >= 0
                src = j + np.where(on, idx, 0)
                qf = np.where(on, buf["q"][src], st.cur_q)
                qi = np.rint(qf)
                dev = float(np.abs(qf - qi).max())
                if dev > maxdev:
                    maxdev = dev
                s = slice(j0 + done, j0 + done + k)
                out["q"][s] = qi
                out["plaq"][s] = np.where(on, buf["plaq"][src], st.cur_plaq)
                out["acc"][s] = acc
                out["logw"][s] = buf["logw"][j:j + k]
            else:
                st.n_acc_therm += int(acc.sum())
            if idx[-1] >= 0:
                i = j + int(idx[-1])
                st.cur_logw, st.cur_q, st.cur_plaq = (float(buf["logw"][i]), float(buf["q"][i]),
                                                      float(buf["plaq"][i]))
                self.x = buf["x"][i].clone()
            st.p += k
            done += k
        st.max_q_dev = maxdev

    def thermalise(self) -> None:
        c0 = time.process_time()
        st = self.st
        if self.cfg.n_therm:  # else production step 0 is the first proposal (log w0 = -inf)
            self._walk(self.cfg.n_therm, None, 0)
        st.n_therm_done = self.cfg.n_therm
        st.start_logw = st.cur_logw if math.isfinite(st.cur_logw) else None
        st.therm_cpu_s = time.process_time() - c0

    # -- files -------------------------------------------------------------------------------------
    def _checkpoint(self, start: int, fill: int, bufs: dict, t_seg: tuple[float, float]) -> None:
        st = self.st
        if fill:
            arrays = {k: bufs[k][:fill] for k in ("q", "plaq", "acc", "logw")}
            _atomic_write(self.dir / f"chunk_{start:010d}.npz", lambda f: np.savez(f, **arrays))
            q = arrays["q"]
            prev = st.q_last if st.q_last is not None else int(q[0])
            st.n_tunnel += int(q[0] != prev) + int(np.count_nonzero(np.diff(q)))
            st.q_last = int(q[-1])
            st.n_acc += int(arrays["acc"].sum())
            st.chunks.append([start, fill])
            st.n_done = start + fill
        c, w = time.process_time(), time.perf_counter()
        st.cpu_s += c - t_seg[0]
        st.wall_s += w - t_seg[1]
        self._write_state()

    def _write_state(self) -> None:
        payload = {"format": FORMAT, "config": self.cfg.key(), "state": asdict(self.st)}
        x = np.zeros(0) if self.x is None else self.x.detach().cpu().numpy().copy()
        _atomic_write(self.dir / "state.npz",
                      lambda f: np.savez(f, x=x, state_json=np.array(json.dumps(payload))))
        self._write_meta(done=False)

    def _write_meta(self, done: bool, target: int | None = None) -> None:
        import torch

        from hpcflow.provenance import provenance

        if self._prov is None:
            self._prov = provenance({"host": os.uname().nodename, "argv": sys.argv,
                                     "torch_threads": torch.get_num_threads()})
        cfg, st, fm = self.cfg, self.st, self.fm
        n = max(st.n_done, 1)
        meta = {
            "format": FORMAT, "algo": cfg.algo, "beta": cfg.beta, "L": cfg.L, "seed": cfg.seed,
            "chain": cfg.chain, "n_chains": cfg.n_chains, "chain_seed": self.seed, "start": "first proposal",
            "n_therm": st.n_therm_done, "n_steps_done": st.n_done, "n_steps_target": target,
            "complete": bool(done),
            "update": "independence Metropolis over flow proposals (hpcflow.sampling.metropolis."
                      "independence_walk), one proposal per step",
            "model": str(fm.run_dir), "model_checkpoint": str(fm.ckpt_path), "model_sha256": fm.sha256,
            "model_beta": fm.beta, "training_steps": fm.train_step, "training_steps_target": fm.train_steps,
            "training_wall_s": fm.train_wall_s,
            "arch": getattr(fm.model, "arch", {}), "precision": fm.precision, "backend": cfg.backend,
            "batch": cfg.batch, "model_seed": fm.cfg.seed,
            "acceptance": st.n_acc / n if st.n_done else None,
            "acceptance_therm": st.n_acc_therm / cfg.n_therm if cfg.n_therm else None,
            "n_tunnel": st.n_tunnel, "max_q_rounding": st.max_q_dev, "n_batches": st.n_batches,
            "wall_s": st.wall_s, "cpu_s": st.cpu_s, "therm_cpu_s": st.therm_cpu_s,
            "cpu_s_per_step": st.cpu_s / n, "cpu_s_per_proposal": st.cpu_s / n, "wall_s_per_step": st.wall_s / n,
            "steps_per_s": st.n_done / st.wall_s if st.wall_s > 0 else None,
            "segments": st.segments,
            "files": "chunk_<start>.npz: q int16 (geometric charge of the state), plaq float64 (<cos P>), "
                     "acc uint8 (accepted), logw float64 (log w = -S - log q of the step's proposal); "
                     "state.npz: current field x + counters",
            "provenance": self._prov,
        }
        _atomic_json(self.dir / "meta.json", meta)

    def _load(self) -> bool:
        import torch

        path = self.dir / "state.npz"
        if not path.exists():
            return False
        with np.load(path) as z:
            payload = json.loads(str(z["state_json"]))
            x = z["x"]
        if payload.get("format") != FORMAT:
            raise SystemExit(f"{path}: unknown format {payload.get('format')!r}")
        want, got = self.cfg.key(), payload["config"]
        if want != got:
            diff = {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}
            raise SystemExit(f"{path}: the chain was started with other settings (stored, requested): {diff}")
        self.st = State(**payload["state"])
        self.x = torch.from_numpy(x.copy()) if x.size else None
        committed = {f"chunk_{s:010d}.npz" for s, _ in self.st.chunks}
        pos = 0
        for s, n in self.st.chunks:
            if s != pos or not (self.dir / f"chunk_{s:010d}.npz").exists():
                raise SystemExit(f"{self.dir}: chunk list broken at step {s} (expected {pos} and the file)")
            pos = s + n
        if pos != self.st.n_done or self.st.p != self.st.n_therm_done + self.st.n_done:
            raise SystemExit(f"{self.dir}: chunks cover {pos} steps, state says {self.st.n_done} "
                             f"(next proposal {self.st.p})")
        for p in self.dir.glob("chunk_*.npz*"):
            if p.name not in committed:
                p.unlink()
        return True

    # -- the run -----------------------------------------------------------------------------------
    def run(self, n_steps: int, resume: bool, checkpoint_seconds: float = 120.0,
            checkpoint_every_steps: int | None = None, abort_after: int | None = None) -> dict:
        """Run until ``n_steps`` production steps are done; returns this segment's speeds."""
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
                "logw": np.zeros(cap)}
        stop = {"sig": 0}

        def on_signal(signum, frame):  # type: ignore[no-untyped-def]
            stop["sig"] = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        n0, c_start, w_start = st.n_done, time.process_time(), time.perf_counter()
        block = max(BLOCK, self.cfg.batch)
        try:
            start, fill = st.n_done, 0
            t_seg = (time.process_time(), time.perf_counter())
            last_ckpt = t_seg[1]
            while st.n_done + fill < n_steps and not stop["sig"]:
                m = min(block, n_steps - st.n_done - fill, cap - fill)
                if abort_after is not None:
                    m = min(m, n0 + abort_after - (st.n_done + fill))
                    if m <= 0:
                        raise SimulatedKill(st.n_done + fill)
                self._walk(m, bufs, fill)
                fill += m
                now = time.perf_counter()
                if fill == cap or now - last_ckpt >= checkpoint_seconds or st.n_done + fill >= n_steps:
                    self._checkpoint(start, fill, bufs, t_seg)
                    rate = (st.n_done - n0) / max(time.perf_counter() - w_start, 1e-9)
                    self.log(f"{self.dir.parent.name}/{self.dir.name}: {st.n_done}/{n_steps} steps, "
                             f"{rate:,.0f} steps/s, {st.n_tunnel} Q changes, Q = {st.q_last}, "
                             f"acceptance {st.n_acc / max(st.n_done, 1):.3f}")
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
        res = {"n_new": n_new, "wall_s": wall, "cpu_s": cpu, "us_per_step": 1e6 * wall / max(n_new, 1),
               "cpu_us_per_step": 1e6 * cpu / max(n_new, 1), "signal": stop["sig"]}
        self.log(f"{self.dir.parent.name}/{self.dir.name}: {n_new} new steps in {wall:.1f} s: "
                 f"{res['us_per_step']:.1f} us/proposal wall, {res['cpu_us_per_step']:.1f} us/proposal CPU")
        return res


def load_field(directory: Path) -> np.ndarray:
    with np.load(Path(directory) / "state.npz") as z:
        return z["x"].copy()


# ---- timing ------------------------------------------------------------------------------------
def time_proposals(fm: FlowModel, batch: int, n_batches: int = 3, beta: float | None = None) -> dict:
    """CPU and wall seconds per proposal of the proposal pipeline (forward pass, action,
    observables, accept uniforms) after one warm-up batch."""
    cfg = FlowChainConfig(beta=fm.beta if beta is None else beta, L=fm.L, seed=0, chain=0, n_chains=1,
                          model_sha256=fm.sha256, batch=batch, backend=fm.backend, precision=fm.precision)
    ch = FlowChain(fm, cfg, Path("."), log=lambda s: None)
    ch._batch(0)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(1, n_batches + 1):
        ch._batch(i * batch)
    c, w = time.process_time() - c0, time.perf_counter() - w0
    n = n_batches * batch
    return {"cpu_s_per_proposal": c / n, "wall_s_per_proposal": w / n, "n": n, "batch": batch}


# ---- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a finished `hpcflow train` output directory")
    ap.add_argument("--beta", type=float, default=None, help="target beta (default: the model's action.beta)")
    ap.add_argument("--allow-beta-mismatch", action="store_true",
                    help="sample at --beta != the model's beta (still exact: the test uses the target at --beta)")
    ap.add_argument("--allow-unfinished", action="store_true",
                    help="use a checkpoint whose training has not reached train.steps")
    ap.add_argument("--chains", type=int, default=4, help="chains of this (model, beta) in all")
    ap.add_argument("--chain-index", default="all", help="which chain (0 .. chains-1) or 'all' (in turn)")
    ap.add_argument("--n-steps", type=int, help="production steps (proposals) per chain")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--checkpoint-seconds", type=float, default=120.0)
    ap.add_argument("--resume", action="store_true", help="continue a chain found under --out (else start it)")
    ap.add_argument("--batch", type=int, default=256, help="proposals per forward pass")
    ap.add_argument("--therm", type=int, default=100, help="steps walked and not stored")
    ap.add_argument("--name", default="flow", help="algorithm name of the output folders (flow*)")
    ap.add_argument("--backend", choices=["auto", "host", "torch"], default="auto",
                    help="kernels of the flow: auto = host (C++) where it builds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the series depends on it at the "
                    "rounding level: resume with the same number)")
    ap.add_argument("--time-only", action="store_true", help="print the CPU time per proposal and exit")
    ap.add_argument("--checkpoint-every-steps", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if not args.name.startswith("flow"):
        raise SystemExit(f"--name must start with 'flow' (topo_analyse treats those as flow chains), got {args.name!r}")
    fm = load_model(args.model, args.backend, args.allow_unfinished)
    beta = fm.beta if args.beta is None else float(args.beta)
    if beta != fm.beta and not args.allow_beta_mismatch:
        raise SystemExit(f"--beta {beta:g} differs from the model's beta {fm.beta:g}: pass "
                         "--allow-beta-mismatch to sample at it anyway (the chain stays exact)")
    if args.time_only:
        t = time_proposals(fm, args.batch, beta=beta)
        print(json.dumps({**t, "model": str(fm.run_dir), "L": fm.L, "precision": fm.precision,
                          "backend": fm.backend, "threads": args.threads}))
        return 0
    if args.n_steps is None or args.out is None:
        raise SystemExit("--n-steps and --out are required (unless --time-only)")
    if args.chain_index == "all":
        chains = list(range(args.chains))
    else:
        i = int(args.chain_index)
        if not 0 <= i < args.chains:
            raise SystemExit(f"--chain-index must be in [0, {args.chains}) or 'all', got {i}")
        chains = [i]
    if args.n_steps < 1 or args.therm < 0 or args.batch < 1:
        raise SystemExit("--n-steps and --batch must be >= 1 and --therm >= 0")
    for i in chains:
        cfg = FlowChainConfig(beta=beta, L=fm.L, seed=args.seed, chain=i, n_chains=args.chains,
                              model_sha256=fm.sha256, n_therm=args.therm, batch=args.batch,
                              backend=fm.backend, precision=fm.precision, algo=args.name)
        d = chain_dir(args.out, args.name, beta, fm.L, i)
        res = FlowChain(fm, cfg, d, log=lambda s: print(s, flush=True)).run(
            args.n_steps, args.resume, args.checkpoint_seconds, args.checkpoint_every_steps)
        if res.get("signal"):
            return 128 + int(res["signal"])
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
