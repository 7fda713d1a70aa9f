"""Training toolkit for high beta and large volume (``train.beta_schedule``, ``init_from``,
``gradient: path``, ``accumulate``, ``diagnostics_every``): config validation, the trainer's
behaviour, and the statistics of the path-gradient estimator."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import types
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch

from hpcflow.config import ConfigError, config_from_dict, load_config, to_yaml
from hpcflow.flows import build_u1_flow, u1_action
from hpcflow.flows.build import build_flow, mask_periods, missing_inverse, transfer_problem
from hpcflow.flows.distributed import DistributedFlow
from hpcflow.flows.distributed_train import DistributedTrainer
from hpcflow.flows.train import Trainer, TrainSetupError, path_log_prob, scheduled_beta
from hpcflow.lattice.geometry import Lattice


@dataclass(frozen=True)
class _Train:
    steps: int = 4
    batch: int = 16
    lr: float = 3e-3
    schedule: str = "constant"
    grad_clip: float = 10.0
    checkpoint_every: int = 2
    log_every: int = 1
    beta_schedule: object = None
    init_from: object = None
    gradient: str = "reparam"
    accumulate: int = 1
    diagnostics_every: int = 0


def _flow(lat: Lattice, n_layers: int = 2, kernel: str = "ncp", dtype=torch.float64, seed: int = 0,
          hidden=(4,)):
    torch.manual_seed(seed)
    cfg = SimpleNamespace(n_layers=n_layers, kernel=kernel, n_components=2, n_knots=4,
                          hidden=hidden, kernel_size=3, checkpoint_activations=False)
    return build_u1_flow(cfg, lat, dtype)


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


# ---- configuration --------------------------------------------------------------------------
def test_toolkit_defaults_are_todays_training() -> None:
    tr = config_from_dict({}).train
    assert (tr.beta_schedule, tr.init_from, tr.gradient, tr.accumulate, tr.diagnostics_every) == \
        (None, None, "reparam", 1, 0)


def test_beta_schedule_forms_and_roundtrip(tmp_path) -> None:
    """The pair list is kept; the mapping {from, steps} is resolved against action.beta into
    the equivalent pairs; both survive to_yaml -> load."""
    base = {"action": {"beta": 2.0}, "train": {"steps": 300}}
    cfg = config_from_dict({**base, "train": {"steps": 300, "beta_schedule": [[0, 1], [100, 1.5],
                                                                               [200, 2.0]]}})
    assert cfg.train.beta_schedule == ((0, 1.0), (100, 1.5), (200, 2.0))
    cfg2 = config_from_dict({**base, "train": {"steps": 300, "beta_schedule": {"from": 0.5, "steps": 250}}})
    assert cfg2.train.beta_schedule == ((0, 0.5), (250, 2.0))
    for c in (cfg, cfg2):
        p = tmp_path / "c.yaml"
        p.write_text(to_yaml(c))
        assert load_config(str(p)) == c
    # --set works on the whole value; the mapping follows an overridden action.beta
    c3 = load_config(None, ["action.beta=3.0", "train.beta_schedule={from: 1.0, steps: 10}"])
    assert c3.train.beta_schedule == ((0, 1.0), (10, 3.0))


BAD = [
    ({"beta_schedule": [[1, 1.0], [5, 2.0]]}, ["train.beta_schedule[0][0]", "1", "starts at step 0"]),
    ({"beta_schedule": [[0, 1.0], [5, 1.5], [5, 2.0]]}, ["train.beta_schedule[2][0]", "5", "> 5"]),
    ({"beta_schedule": [[0, 1.0], [5, 1.5]]}, ["train.beta_schedule[1][1]", "1.5", "action.beta = 2"]),
    ({"beta_schedule": [[0, 0.0], [5, 2.0]]}, ["train.beta_schedule[0][1]", "0.0", "> 0"]),
    ({"beta_schedule": [[0, 1.0], [5]]}, ["train.beta_schedule[1]", "[step, beta]"]),
    ({"beta_schedule": [[0, 1.0], [2.5, 2.0]]}, ["train.beta_schedule[1][0]", "2.5", "integer"]),
    ({"beta_schedule": [[0, 1.0], [5000, 2.0]]}, ["train.beta_schedule", "train.steps = 1000"]),
    ({"beta_schedule": {"from": 1.0}}, ["train.beta_schedule", "from and steps"]),
    ({"beta_schedule": {"from": -1.0, "steps": 10}}, ["train.beta_schedule.from", "-1.0", "> 0"]),
    ({"beta_schedule": {"from": 1.0, "steps": 0}}, ["train.beta_schedule.steps", "0", ">= 1"]),
    ({"beta_schedule": "linear"}, ["train.beta_schedule", "linear", "[step, beta] pairs"]),
    ({"init_from": ""}, ["train.init_from", "non-empty path"]),
    ({"init_from": 3}, ["train.init_from", "3"]),
    ({"gradient": "score"}, ["train.gradient", "score", "reparam, path"]),
    ({"accumulate": 0}, ["train.accumulate", "0", ">= 1"]),
    ({"accumulate": 1.5}, ["train.accumulate", "1.5", "integer"]),
    ({"diagnostics_every": -1}, ["train.diagnostics_every", "-1", ">= 0"]),
]


@pytest.mark.parametrize("train,fragments", BAD)
def test_bad_toolkit_values_are_one_line_errors(tmp_path, train, fragments) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"action": {"beta": 2.0}, "train": train}))
    with pytest.raises(ConfigError) as ei:
        load_config(str(path))
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and "allowed:" in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_diagnostics_option_checked_at_config_time_only_when_used(monkeypatch) -> None:
    import hpcflow.config as config

    monkeypatch.setattr(config, "_diagnostics_module_present", lambda: False)
    config_from_dict({"train": {"diagnostics_every": 0}})  # off: the module is not needed
    with pytest.raises(ConfigError, match=r"train.diagnostics_every.*no hpcflow.flows.diagnostics"):
        config_from_dict({"train": {"diagnostics_every": 5}})
    monkeypatch.setattr(config, "_diagnostics_module_present", lambda: True)
    assert config_from_dict({"train": {"diagnostics_every": 5}}).train.diagnostics_every == 5
    with pytest.raises(ConfigError, match=r"train.diagnostics_every.*2D U\(1\)"):
        config_from_dict({"group": "su2", "train": {"diagnostics_every": 5}})


# ---- beta schedule --------------------------------------------------------------------------
def test_scheduled_beta_is_piecewise_linear_then_constant() -> None:
    pts = ((0, 1.0), (10, 2.0), (20, 2.5))
    got = [scheduled_beta(pts, t, 2.5) for t in (0, 5, 10, 15, 20, 1000)]
    assert got == pytest.approx([1.0, 1.5, 2.0, 2.25, 2.5, 2.5], abs=1e-15)
    assert scheduled_beta(None, 7, 3.0) == 3.0 and scheduled_beta(((0, 3.0),), 7, 3.0) == 3.0


def test_schedule_sets_the_beta_of_each_loss(tmp_path) -> None:
    """Step 1 of a schedule starting at 0.4 is bit for bit step 1 of a run at beta 0.4 (same
    seed, weights, draws); the rows log the scheduled betas; the checkpoint's beta is the final
    one, so ``load_flow_checkpoint(beta=action.beta)`` (the sampling check) passes."""
    from hpcflow.flows.train import load_flow_checkpoint

    lat = Lattice((4, 4))
    sched = _Train(steps=3, beta_schedule=[[0, 0.4], [2, 1.0]])
    rows = Trainer(_flow(lat), lat, 1.0, sched, tmp_path / "s", seed=4, progress=False).train()
    ref = Trainer(_flow(lat), lat, 0.4, _Train(steps=1), tmp_path / "r", seed=4, progress=False).train()
    assert rows[0]["loss"] == ref[0]["loss"]
    assert [r["beta"] for r in rows] == pytest.approx([0.4, 0.7, 1.0], abs=1e-15)
    load_flow_checkpoint(_flow(lat, seed=9), tmp_path / "s" / "train" / "checkpoint.pt", beta=1.0)
    ck = torch.load(tmp_path / "s" / "train" / "checkpoint.pt", weights_only=False)
    assert ck["meta"]["beta_schedule"] == [[0, 0.4], [2, 1.0]]


def test_schedule_needs_the_action_at_any_beta_and_the_final_beta(tmp_path) -> None:
    lat = Lattice((4, 4))
    cfg = _Train(beta_schedule=[[0, 0.4], [2, 1.0]])
    m = _flow(lat)
    with pytest.raises(ValueError, match="action_at"):
        Trainer(m, lat, 1.0, cfg, tmp_path, action=lambda x: m.action(x, 1.0), progress=False)
    with pytest.raises(TrainSetupError, match=r"key 'train.beta_schedule\[1\]\[1\]'.*action.beta = 2"):
        Trainer(m, lat, 2.0, cfg, tmp_path, progress=False)
    tr = Trainer(m, lat, 1.0, cfg, tmp_path, action_at=lambda x, b: m.action(x, b), progress=False)
    assert [tr.beta_at(t) for t in range(3)] == pytest.approx([0.4, 0.7, 1.0])


# ---- volume transfer / warm start -------------------------------------------------------------
@pytest.fixture(scope="module")
def source_4x4(tmp_path_factory):
    """A U(1) flow trained 3 steps on 4x4 at beta 1 (its checkpoint and weights)."""
    d = tmp_path_factory.mktemp("src")
    lat = Lattice((4, 4))
    tr = Trainer(_flow(lat, n_layers=4, seed=1), lat, 1.0, _Train(steps=3), d, seed=2, progress=False)
    tr.train()
    return d / "train" / "checkpoint.pt", _params(tr.model), tr.model


def test_init_from_transfers_a_4x4_flow_to_8x8(tmp_path, source_4x4) -> None:
    """The 8x8 flow starts from the 4x4 weights (optimizer fresh); it is the same map: on a
    2x2 tiling of a 4x4 field its output is the tiling of the 4x4 output and its log q is 4
    times the 4x4 log q; log q through the inverse agrees with the push. The source path and
    sha256 are in the checkpoint meta and in the first metrics row; at beta 1.5 the sampling
    check of the new checkpoint is its own beta."""
    from hpcflow.flows.train import load_flow_checkpoint

    src, w_src, m4 = source_4x4
    lat8 = Lattice((8, 8))
    m8 = _flow(lat8, n_layers=4, seed=7)
    assert not torch.equal(_params(m8), w_src)
    tr = Trainer(m8, lat8, 1.5, _Train(steps=2, init_from=str(src)), tmp_path, seed=3, progress=False)
    rec = tr.warm_start()
    assert torch.equal(_params(m8), w_src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert rec["sha256"] == sha and rec["lattice"] == [4, 4] and rec["beta"] == 1.0
    assert all(len(s) == 0 for s in tr.opt.state.values())  # optimizer fresh
    with torch.no_grad():
        z4 = m4.prior.sample(3, torch.Generator().manual_seed(0))
        x4, lq4 = m4.push(z4)
        x8, lq8 = m8.push(z4.repeat(1, 1, 2, 2))
        assert torch.allclose(x8, x4.repeat(1, 1, 2, 2), atol=1e-12)
        assert torch.allclose(lq8, 4 * lq4, rtol=1e-12)
        x, lq = m8.sample(4, torch.Generator().manual_seed(1))
        assert torch.isfinite(lq).all() and torch.allclose(m8.log_prob(x), lq, atol=1e-8)
    rows = Trainer(_flow(lat8, n_layers=4, seed=7), lat8, 1.5, _Train(steps=2, init_from=str(src)),
                   tmp_path / "run", seed=3, progress=False).train()
    assert rows[0]["init_from"]["sha256"] == sha and "init_from" not in rows[1]
    ck_path = tmp_path / "run" / "train" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=False)
    assert ck["meta"]["init_from"]["sha256"] == sha and ck["meta"]["beta"] == 1.5
    assert ck["meta"]["init_from"]["path"] == str(src.resolve())
    load_flow_checkpoint(_flow(lat8, n_layers=4), ck_path, beta=1.5)
    line = json.loads((tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["init_from"]["sha256"] == sha


def test_init_from_survives_a_resume(tmp_path, source_4x4) -> None:
    src = source_4x4[0]
    lat8 = Lattice((8, 8))
    cfg = _Train(steps=4, init_from=str(src))
    full = Trainer(_flow(lat8, n_layers=4), lat8, 1.0, cfg, tmp_path / "a", seed=3, progress=False)
    rows_full = full.train()
    Trainer(_flow(lat8, n_layers=4), lat8, 1.0, cfg, tmp_path / "b", seed=3, progress=False).train(stop_at=2)
    again = Trainer(_flow(lat8, n_layers=4, seed=5), lat8, 1.0, cfg, tmp_path / "b", seed=3, progress=False)
    rows = again.train(resume=True)
    assert torch.equal(_params(again.model), _params(full.model)) and _strip(rows) == _strip(rows_full)
    ck = torch.load(tmp_path / "b" / "train" / "checkpoint.pt", weights_only=False)
    assert ck["meta"]["init_from"]["sha256"] == rows_full[0]["init_from"]["sha256"]


def _doctored(tmp_path, src, name: str, **changes):
    ck = torch.load(src, weights_only=False)
    for k, v in changes.items():
        if k == "lattice":
            ck["meta"]["lattice"] = ck["meta"]["arch"]["lattice"] = v
        elif k == "group":
            ck["meta"]["group"] = ck["meta"]["arch"]["group"] = v
        else:
            ck["meta"]["arch"][k] = v
    p = tmp_path / name
    torch.save(ck, p)
    return p


def test_init_from_refusals_are_one_line_errors(tmp_path, source_4x4) -> None:
    src = source_4x4[0]
    lat8 = Lattice((8, 8))
    cases = [
        (tmp_path / "nope.pt", r"no such file"),
        (_doctored(tmp_path, src, "g.pt", group="su2"), r"group is 'su2' in the source, 'u1' in this run"),
        (_doctored(tmp_path, src, "n.pt", n_layers=2), r"flow.n_layers is 2 in the source, 4 in this run"),
        (_doctored(tmp_path, src, "h.pt", hidden=[8]), r"flow.hidden is \[8\] in the source, \[4\]"),
        (_doctored(tmp_path, src, "k.pt", kernel="spline"), r"flow.kernel is 'spline'"),
        (_doctored(tmp_path, src, "l.pt", lattice=[6, 4]),
         r"mask period 4 of direction 0 must divide both lattice extents \(source \[6, 4\], this run \[8, 8\]\)"),
        (_doctored(tmp_path, src, "d.pt", lattice=[4, 4, 4, 4]), r"4 dimensions"),
    ]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    cases.append((junk, r"cannot be read"))
    for path, pattern in cases:
        tr = Trainer(_flow(lat8, n_layers=4), lat8, 1.0, _Train(init_from=str(path)), tmp_path / "o",
                     progress=False)
        with pytest.raises(TrainSetupError) as ei:
            tr.train()
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith(f"key 'train.init_from': got {path} (str); allowed: ")
        assert __import__("re").search(pattern, msg), msg


def test_transfer_rules_for_sun_masks() -> None:
    """SU(N) masks have period 4, or 2 on extents = 2 mod 4: the pattern must be the same on
    both lattices."""
    arch = {"group": "su2", "layer": "spectral", "n_layers": 4, "lattice": [8, 8]}
    meta = lambda shape: {"arch": {**arch, "lattice": shape}}  # noqa: E731
    assert mask_periods("su2", [6, 8, 10, 3]) == [2, 4, 2, 0] and mask_periods("u1", [8, 6]) == [4, 0]
    assert transfer_problem(meta([4, 4]), arch) is None
    assert "mask period 2 of direction 0" in transfer_problem(meta([6, 8]), arch)
    assert transfer_problem(meta([6, 6]), {**arch, "lattice": [10, 10]}) is None
    assert "flow.layer is None" in transfer_problem({"arch": {**arch, "layer": None}}, arch)


def test_driver_reports_init_from_with_the_config_file(tmp_path) -> None:
    from hpcflow.run.driver import train

    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({
        "lattice": {"shape": [4, 4]}, "algorithm": "flow", "action": {"beta": 1.0},
        "flow": {"n_layers": 2, "hidden": [4]}, "run": {"progress": False},
        "train": {"steps": 1, "batch": 4, "init_from": str(tmp_path / "missing.pt")},
        "output": {"dir": str(tmp_path / "out")}}))
    with pytest.raises(ConfigError) as ei:
        train(load_config(str(path)))
    msg = str(ei.value)
    assert msg.startswith(f"{path}: key 'train.init_from': got {tmp_path / 'missing.pt'}") and "\n" not in msg


# ---- path gradient --------------------------------------------------------------------------
def _both_gradients(model, lat, beta: float, batches: int, batch: int, seed: int):
    """Per-batch reparam and path gradients of the mean loss on the same samples."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    re, pa = [], []
    for _ in range(batches):
        x, logq = model.sample(batch, gen)
        s = u1_action(x, lat, beta)
        g_re = torch.autograd.grad((logq + s).mean(), params, retain_graph=True)
        g_pa = torch.autograd.grad((path_log_prob(model, x) + s).mean(), params)
        re.append(torch.cat([g.reshape(-1) for g in g_re]))
        pa.append(torch.cat([g.reshape(-1) for g in g_pa]))
    return torch.stack(re), torch.stack(pa)


def _identity_flow(lat, kernel: str = "ncp"):
    """Zero output convolutions: kernel parameters 0 (NCP: s = 0, equal weights, t = 0), so
    the flow's Jacobian determinant is constant: q is the uniform prior."""
    m = _flow(lat, n_layers=4, kernel=kernel)
    with torch.no_grad():
        for layer in m.layers:
            for p in layer.net.convs[-1].parameters():
                p.zero_()
    return m


def test_path_gradient_is_exactly_zero_when_the_flow_is_exact() -> None:
    """At beta = 0 the target is uniform; the identity-initialised flow is exact: the path
    gradient vanishes identically on every batch, the reparam gradient does not (its score
    term is nonzero per batch, zero only on average)."""
    lat = Lattice((4, 4))
    m = _identity_flow(lat)
    re, pa = _both_gradients(m, lat, 0.0, batches=3, batch=8, seed=0)
    assert torch.count_nonzero(pa) == 0
    assert float(re.abs().max()) > 1e-3


def test_path_gradient_has_the_reparam_expectation() -> None:
    """Same expectation: on 400 batches of 8 (fixed seed) the paired difference path - reparam
    (the score term, mean 0) projected on 8 random directions and on the mean gradient is
    within 3 standard errors of 0, while the mean path gradient along the mean gradient
    direction is many standard errors from 0 (the test has power)."""
    lat = Lattice((4, 4))
    m = _flow(lat, n_layers=4)
    re, pa = _both_gradients(m, lat, 1.0, batches=400, batch=8, seed=7)
    n = len(re)
    dirs = torch.randn(8, re.shape[1], generator=torch.Generator().manual_seed(0), dtype=re.dtype)
    dirs = torch.cat([dirs, re.mean(0, keepdim=True)])
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    proj = (pa - re) @ dirs.T
    z = proj.mean(0) / (proj.std(0) / math.sqrt(n))
    assert float(z.abs().max()) < 3.0, z
    along = pa @ dirs[-1]
    assert float(along.mean() / (along.std() / math.sqrt(n))) > 10


def test_path_gradient_variance_is_smaller_near_the_target(tmp_path) -> None:
    """After 40 training steps at beta = 1 (4x4) the summed variance of the per-batch path
    gradient is below 0.6 of the reparam one on the same 60 batches (about 0.45 measured); near
    the exact flow (identity flow at beta = 0.05) it is below 5% of it (1.3% measured: the path
    gradient scales with beta, the score term of reparam does not)."""
    lat = Lattice((4, 4))
    m = _flow(lat, n_layers=4)
    Trainer(m, lat, 1.0, _Train(steps=40, batch=64, lr=5e-3, checkpoint_every=100), tmp_path,
            seed=1, progress=False).train()
    re, pa = _both_gradients(m, lat, 1.0, batches=60, batch=16, seed=5)
    assert float(pa.var(0).sum()) < 0.6 * float(re.var(0).sum())
    m0 = _identity_flow(lat)
    re0, pa0 = _both_gradients(m0, lat, 0.05, batches=20, batch=16, seed=5)
    assert float(pa0.var(0).sum()) < 0.05 * float(re0.var(0).sum())


def test_path_trainer_reports_the_reparam_loss(tmp_path) -> None:
    """Same seed and weights: step 1 of ``gradient: path`` logs the loss, ESS and acceptance of
    ``reparam`` bit for bit (same batch, loss from the forward log q), but updates differently."""
    lat = Lattice((4, 4))
    a = Trainer(_flow(lat), lat, 1.0, _Train(steps=1), tmp_path / "a", seed=5, progress=False)
    b = Trainer(_flow(lat), lat, 1.0, _Train(steps=1, gradient="path"), tmp_path / "b", seed=5,
                progress=False)
    ra, rb = a.train(), b.train()
    assert _strip(ra) == _strip(rb)
    assert not torch.equal(_params(a.model), _params(b.model))
    ck = torch.load(tmp_path / "b" / "train" / "checkpoint.pt", weights_only=False)
    assert ck["meta"]["gradient"] == "path"


@pytest.mark.parametrize("kernel,dtype", [("spline", torch.float64), ("ncp", torch.float32)])
def test_path_gradient_trains_u1_kernels_and_float32(tmp_path, kernel, dtype) -> None:
    lat = Lattice((4, 4))
    tr = Trainer(_flow(lat, kernel=kernel, dtype=dtype), lat, 1.0, _Train(steps=2, gradient="path"),
                 tmp_path, seed=1, dtype=dtype, progress=False)
    rows = tr.train()
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(p.dtype == dtype and torch.isfinite(p.grad).all() for p in tr.model.parameters())


def test_path_gradient_sun_and_distributed(tmp_path) -> None:
    """SU(2) (spectral layers run backwards) through the DistributedTrainer on one rank: the
    path step reports the reparam loss of the same counter-RNG batch."""
    lat = Lattice((4, 4))
    fcfg = SimpleNamespace(n_layers=2, kernel="ncp", n_components=2, n_knots=4, hidden=(4,),
                           kernel_size=3, checkpoint_activations=False)

    def trainer(gradient: str, out: str) -> DistributedTrainer:
        torch.manual_seed(0)
        model = DistributedFlow(build_flow(fcfg, lat, "su2"))
        # a non-trivial flow: the SU(N) output layers start at zero (the identity map)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                          dtype=p.dtype))
        return DistributedTrainer(model, 2.0, _Train(steps=1, batch=4, gradient=gradient),
                                  tmp_path / out, seed=3, progress=False)

    ra, rb = trainer("reparam", "a").train(), trainer("path", "b").train()
    assert ra[0]["loss"] == pytest.approx(rb[0]["loss"], rel=0, abs=0) and math.isfinite(rb[0]["loss"])


def test_path_refused_for_a_flow_without_inverse(tmp_path) -> None:
    from hpcflow.flows.kernels1d import CircularKernel, NCPMixtureKernel

    class ForwardOnly(NCPMixtureKernel):
        inverse = CircularKernel.inverse

    lat = Lattice((4, 4))
    m = _flow(lat)
    assert missing_inverse(m) is None
    m.layers[1].kernel.__class__ = ForwardOnly
    assert missing_inverse(m) == "layer 1 (kernel ForwardOnly)"
    with pytest.raises(TrainSetupError) as ei:
        Trainer(m, lat, 1.0, _Train(gradient="path"), tmp_path, progress=False)
    msg = str(ei.value)
    assert msg.startswith("key 'train.gradient': got path (str); allowed: reparam") and "no inverse" in msg
    Trainer(m, lat, 1.0, _Train(), tmp_path, progress=False)  # reparam needs no inverse


# ---- gradient accumulation --------------------------------------------------------------------
def test_accumulate_equals_one_large_batch(tmp_path) -> None:
    """accumulate = 2 with batch 8 draws the same 16 samples as batch 16 (the generator's
    draws concatenate), so loss, ESS and acceptance agree, and the gradient and the updated
    weights agree to rounding (only the summation order differs); rows log batch 16."""
    lat = Lattice((4, 4))
    a = Trainer(_flow(lat), lat, 1.0, _Train(steps=2, batch=16), tmp_path / "a", seed=6, progress=False)
    b = Trainer(_flow(lat), lat, 1.0, _Train(steps=2, batch=8, accumulate=2), tmp_path / "b", seed=6,
                progress=False)
    for _ in range(2):
        ra, rb = a.train_step(), b.train_step()
        assert rb["batch"] == ra["batch"] == 16
        for k in ("loss", "ess", "acceptance"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-12), k
        assert torch.allclose(_grad(b.model), _grad(a.model), rtol=1e-10, atol=1e-14)
        assert torch.allclose(_params(b.model), _params(a.model), rtol=1e-10, atol=1e-13)
    assert float(_grad(a.model).abs().max()) > 0


def test_accumulate_equals_one_large_batch_distributed(tmp_path) -> None:
    """The counter-RNG trainer: micro-batch m of step t takes proposals (2t + m) 8 + [0, 8),
    i.e. exactly the 16 proposals of step t with batch 16 (also with path gradients)."""
    lat = Lattice((4, 4))

    def trainer(out: str, **kw) -> DistributedTrainer:
        return DistributedTrainer(DistributedFlow(_flow(lat)), 1.0, _Train(**kw), tmp_path / out,
                                  seed=8, progress=False)

    for gradient in ("reparam", "path"):
        a = trainer(f"a{gradient}", steps=2, batch=16, gradient=gradient)
        b = trainer(f"b{gradient}", steps=2, batch=8, accumulate=2, gradient=gradient)
        for _ in range(2):
            ra, rb = a.train_step(), b.train_step()
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-12) and rb["batch"] == 16
            # path: the inverse's Newton iterations amplify rounding a little (~1e-12)
            assert torch.allclose(_grad(b.model), _grad(a.model), rtol=1e-9, atol=1e-10)
            assert torch.allclose(_params(b.model), _params(a.model), rtol=1e-10, atol=1e-11)


# ---- diagnostics hook -----------------------------------------------------------------------
@pytest.fixture
def fake_diagnostics(monkeypatch):
    """A stand-in ``hpcflow.flows.diagnostics`` recording its calls."""
    calls = []

    def u1_diagnostics(phi, log_q, S, beta, shape):
        calls.append((phi.clone(), log_q.clone(), S.clone(), beta, shape))
        return {"n": int(phi.shape[0]), "mean_S": S.mean(), "hist": torch.tensor([1, 2])}

    mod = types.ModuleType("hpcflow.flows.diagnostics")
    mod.u1_diagnostics = u1_diagnostics
    monkeypatch.setitem(sys.modules, "hpcflow.flows.diagnostics", mod)
    return calls


@pytest.mark.parametrize("distributed", [False, True], ids=["Trainer", "DistributedTrainer"])
def test_diagnostics_every_calls_the_module_on_the_batch(tmp_path, fake_diagnostics, distributed) -> None:
    """Every 2nd step: u1_diagnostics(phi[B, 2, L0, L1], log q, S, beta of the step, shape) on
    the step's whole batch (both micro-batches); its dict lands under "diagnostics" as JSON."""
    lat = Lattice((4, 4))
    cfg = _Train(steps=4, batch=4, accumulate=2, diagnostics_every=2, beta_schedule=[[0, 0.5], [4, 1.0]])
    if distributed:
        tr = DistributedTrainer(DistributedFlow(_flow(lat)), 1.0, cfg, tmp_path, seed=2, progress=False)
    else:
        tr = Trainer(_flow(lat), lat, 1.0, cfg, tmp_path, seed=2, progress=False)
    rows = tr.train()
    assert ["diagnostics" in r for r in rows] == [False, True, False, True]
    assert len(fake_diagnostics) == 2
    for (phi, logq, s, beta, shape), row in zip(fake_diagnostics, (rows[1], rows[3])):
        assert phi.shape == (8, 2, 4, 4) and logq.shape == s.shape == (8,) and shape == (4, 4)
        assert beta == row["beta"]
        assert torch.allclose(s, u1_action(phi, lat, beta), atol=1e-12)  # S belongs to phi
        assert row["diagnostics"] == {"n": 8, "mean_S": pytest.approx(float(s.mean())), "hist": [1, 2]}
    logged = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert logged[1]["diagnostics"]["hist"] == [1, 2]


def test_diagnostics_refused_when_the_module_is_missing_or_the_model_is_not_u1(tmp_path, monkeypatch) -> None:
    lat = Lattice((4, 4))
    monkeypatch.setitem(sys.modules, "hpcflow.flows.diagnostics", None)  # import fails
    with pytest.raises(TrainSetupError, match=r"train.diagnostics_every.*cannot be imported"):
        Trainer(_flow(lat), lat, 1.0, _Train(diagnostics_every=3), tmp_path, progress=False)
    Trainer(_flow(lat), lat, 1.0, _Train(), tmp_path, progress=False)  # off: not imported
    su2 = build_flow(SimpleNamespace(n_layers=1, kernel="ncp", n_components=2, n_knots=4, hidden=(),
                                     kernel_size=3), lat, "su2")
    with pytest.raises(TrainSetupError, match=r"2D U\(1\)"):
        Trainer(su2, lat, 1.0, replace(_Train(), diagnostics_every=3), tmp_path, progress=False,
                action_at=lambda x, b: su2.action(x, b))


# ---- the CLI path ---------------------------------------------------------------------------
def test_hpcflow_train_with_the_toolkit(tmp_path) -> None:
    """``hpcflow train`` (driver.train) with a schedule, path gradients and accumulation:
    metrics rows carry beta and the effective batch; the checkpoint records the final beta."""
    from hpcflow.run.driver import train

    cfg = config_from_dict({
        "lattice": {"shape": [4, 4]}, "algorithm": "flow", "action": {"beta": 1.2}, "seed": 3,
        "flow": {"n_layers": 2, "hidden": [4]}, "run": {"progress": False},
        "train": {"steps": 3, "batch": 4, "accumulate": 2, "gradient": "path",
                  "beta_schedule": {"from": 0.6, "steps": 2}, "checkpoint_every": 10},
        "output": {"dir": str(tmp_path / "out")}})
    assert train(cfg).exit_code == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in rows] == pytest.approx([0.6, 0.9, 1.2]) and {r["batch"] for r in rows} == {8}
    ck = torch.load(tmp_path / "out" / "train" / "checkpoint.pt", weights_only=False)
    assert ck["meta"]["beta"] == 1.2 and ck["meta"]["accumulate"] == 2 and ck["step"] == 3
    # volume transfer through the CLI path: fine-tune the 4x4 flow on 8x8
    src = tmp_path / "out" / "train" / "checkpoint.pt"
    big = config_from_dict({
        "lattice": {"shape": [8, 8]}, "algorithm": "flow", "action": {"beta": 1.2}, "seed": 3,
        "flow": {"n_layers": 2, "hidden": [4]}, "run": {"progress": False},
        "train": {"steps": 1, "batch": 4, "init_from": str(src)},
        "output": {"dir": str(tmp_path / "big")}})
    assert train(big).exit_code == 0
    meta = torch.load(tmp_path / "big" / "train" / "checkpoint.pt", weights_only=False)["meta"]
    assert meta["lattice"] == [8, 8] and meta["init_from"]["lattice"] == [4, 4]
    assert meta["init_from"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_diagnostics_with_the_real_module(tmp_path) -> None:
    """``train.diagnostics_every`` with hpcflow.flows.diagnostics itself: every n-th metrics row
    carries the KL gap to the exact -log Z (>= 0 within its error), the proposals' charge
    histogram beside the exact sector weights (probabilities summing to 1), ESS and acceptance."""
    from hpcflow.flows.diagnostics import _LIST_TAIL  # sectors listed: all but this much exact mass
    from hpcflow.run.driver import train

    cfg = config_from_dict({
        "lattice": {"shape": [4, 4]}, "algorithm": "flow", "action": {"beta": 1.0}, "seed": 5,
        "flow": {"n_layers": 2, "hidden": [4]}, "run": {"progress": False},
        "train": {"steps": 4, "batch": 16, "diagnostics_every": 2, "checkpoint_every": 10},
        "output": {"dir": str(tmp_path / "out")}})
    assert train(cfg).exit_code == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "train" / "metrics.jsonl").read_text().splitlines()]
    diag = [r["diagnostics"] for r in rows if "diagnostics" in r]
    assert len(diag) == 2
    for d in diag:
        assert d["kl_gap"] > -3 * d["kl_gap_error"]
        assert 1.0 - _LIST_TAIL <= sum(p for _, p in d["q_exact"]) <= 1.0 + 1e-12
        assert sum(f for _, f in d["q_hist"]) == pytest.approx(1.0, abs=1e-12)
        assert 0 < d["ess"] <= 1 and 0 <= d["acceptance"] <= 1
