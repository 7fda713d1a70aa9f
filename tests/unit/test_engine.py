"""The one chain engine: `hpcflow run` and `hpcflow sample` give the same chain for the same
config and seed (heat bath, HMC, flow, mixed), and mixed chains honour `hmc.lam`.

Regressions of issue 15: mixed chains ignored `hmc.lam` (sampling/mixed.py and
sampling/flow_chains.py did not pass it), and the heat-bath/HMC steps of a mixed chain drew
from stream 1 under `hpcflow run` but from stream 2**32 + c under `hpcflow sample`.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from hpcflow.config import config_from_dict
from hpcflow.io import open_ensemble
from hpcflow.run.driver import run
from hpcflow.run.sample import EXIT_OK, ensemble_dir, sample


def _cfg(out, algorithm: str, **extra):  # type: ignore[no-untyped-def]
    d = {
        "lattice": {"shape": [8, 8]}, "group": "u1", "algorithm": algorithm, "seed": 31,
        "action": {"beta": 2.0}, "hmc": {"n_steps": 4, "tau": 0.6, "lam": 0.17},
        "heatbath": {"n_overrelax": 1},
        "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
        "train": {"steps": 4, "batch": 8, "lr": 0.01, "checkpoint_every": 4},
        "mixed": {"pattern": ["flow", "heatbath", "hmc"]},
        "run": {"n_therm": 3, "n_steps": 12, "measure_every": 2, "progress": False},
        "sample": {"n_therm": 3, "n_steps": 12, "batch": 5, "checkpoint_every": 4},
        "measure": {"wilson_loops": []},
        "output": {"dir": str(out)},
    }
    d.update(extra)
    return config_from_dict(d)


def _history(out) -> list[dict]:  # type: ignore[no-untyped-def]
    with open(os.path.join(out, "history.jsonl"), encoding="utf-8") as fh:
        return [json.loads(x) for x in fh]


@pytest.mark.parametrize("algorithm", ["heatbath", "hmc", "flow", "mixed"])
def test_run_and_sample_give_the_same_chain(tmp_path, algorithm: str) -> None:
    a, b = tmp_path / "run", tmp_path / "sample"
    assert run(_cfg(a, algorithm)).exit_code == EXIT_OK
    if algorithm in ("flow", "mixed"):  # sample with the model that run trained
        os.makedirs(b / "train")
        shutil.copy(a / "train" / "checkpoint.pt", b / "train" / "checkpoint.pt")
    assert sample(_cfg(b, algorithm), use_mpi=False) == EXIT_OK
    hist = _history(a)
    rec = open_ensemble(ensemble_dir(_cfg(b, algorithm))).records(0)
    assert len(hist) == len(rec["step"]) == 6
    assert [h["step"] for h in hist] == list(rec["step"])
    # run measures the plaquette from the links, a flow chain's row from the model's variables
    np.testing.assert_allclose([h["plaquette"] for h in hist], rec["plaquette"], rtol=1e-13, atol=0)
    if algorithm != "heatbath":
        np.testing.assert_array_equal([bool(h["accepted"]) for h in hist], rec["accepted"].astype(bool))
    if algorithm in ("flow", "mixed"):
        np.testing.assert_array_equal([h["S"] for h in hist], rec["S"])
        np.testing.assert_array_equal([h["logw"] for h in hist], rec["log_w"])
    if algorithm == "mixed":
        assert [h["kind"] for h in hist] == [("flow", "heatbath", "hmc")[(s - 1) % 3] for s in rec["step"]]


def _tiny_flow():  # type: ignore[no-untyped-def]
    from hpcflow.flows.u1 import build_u1_flow
    from hpcflow.lattice.geometry import Lattice

    lat = Lattice((8, 8))
    return build_u1_flow(SimpleNamespace(n_layers=2, kernel="ncp", n_components=1, n_knots=4,
                                         hidden=(), kernel_size=3), lat), lat


def test_mixed_chain_honours_hmc_lam() -> None:
    from hpcflow.sampling.flow_chains import mixed_chain
    from hpcflow.sampling.hmc import HMC
    from hpcflow.sampling.updates import LOCAL_STREAM_OFFSET

    model, lat = _tiny_flow()
    res = {}
    for lam in (0.12, 0.3):
        hmc = SimpleNamespace(n_steps=3, tau=0.8, integrator="omelyan", lam=lam)
        res[lam] = mixed_chain(model, lat, 2.0, ["hmc"], 4, seed=5, batch=4, hmc_cfg=hmc)
    assert not np.array_equal(res[0.12]["S"], res[0.3]["S"])
    # and it is exactly the HMC chain with that lam on the local stream of chain 0
    from hpcflow.lattice.groups import get_group, random_field
    from hpcflow.rng import CounterRNG

    rng = CounterRNG(5, LOCAL_STREAM_OFFSET)
    U = random_field(lat, get_group("u1"), rng, 0)
    ref = HMC(lat, "u1", 2.0, 3, 0.8, "omelyan", rng, lam=0.3)
    for step in range(1, 5):
        U, _, _ = ref.trajectory(U, step)
    np.testing.assert_allclose(np.angle(res[0.3]["state"].numpy()), np.angle(U.numpy()), atol=1e-12)


def test_no_import_cycles() -> None:
    """The import graph of the package has no cycle (every import, module level or lazy)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    mods: dict[str, pathlib.Path] = {}
    for base, pkg in ((root / "hpcflow", "hpcflow"), (root / "kernels", "hpcflow.kernels")):
        for p in base.rglob("*.py"):
            rel = p.relative_to(base).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            mods[".".join([pkg, *parts])] = p

    def resolve(mod: str, node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = mod.split(".")
            is_pkg = mods[mod].name == "__init__.py"
            base = base[: len(base) - node.level + (1 if is_pkg else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        out = [target] if target in mods else []
        out += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
        return out

    def imports(tree: ast.AST) -> list[ast.AST]:
        """Every import statement, also inside functions (a lazy import is a dependency too),
        except under ``if TYPE_CHECKING:`` (annotations only)."""
        out: list[ast.AST] = []
        todo = [tree]
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            todo.extend(ast.iter_child_nodes(node))
        return out

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in imports(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                graph[m] |= set(resolve(m, node))
        graph[m].discard(m)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for k in sorted(graph[n]):
            if state.get(k) == 1:
                cycles.append(" -> ".join(stack[stack.index(k):] + [k]))
            if k not in state:
                visit(k)
        stack.pop()
        state[n] = 2

    cycles: list[str] = []
    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
