"""``hpcflow`` command line: a thin argparse front; every sub-command calls one library function.

Exit status (``hpcflow.exit_codes``): 0 success; 1 ``ensemble verify`` found problems, or an
internal error (a bug: traceback); 2 bad input (config, arguments, files, an output.dir locked
by another process or holding results), with one line on stderr; 3 stopped by a signal with a
checkpoint written (resumable: rerun the same command).

Under MPI (``mpirun``/``srun`` of ``run``, ``train``, ``sample``) an error is printed once, by
rank 0, and every rank exits with the same code (``hpcflow.run.world.settle_error``); a rank
that fails alone prints its own line and aborts the job instead of leaving it hanging.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from collections.abc import Callable, Sequence

from hpcflow.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_RESUMABLE

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_RESUMABLE", "EXIT_INTERNAL"]

# commands that may run under mpirun/srun on several ranks
_MPI_COMMANDS = ("run", "train", "sample")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="YAML configuration file")
    else:
        p.add_argument("config", nargs="?", default=None, help="YAML configuration file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set action.beta=3.0 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpcflow",
        description="Lattice gauge ensembles with gauge-equivariant flows, HMC and heat bath.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run the configured chain (train first for flow/mixed) and summarise")
    _add_config_args(r)
    g = r.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the checkpoints in output.dir")
    g.add_argument("--fresh", action="store_true",
                   help="move earlier results in output.dir aside (previous-<time>/) and start over")

    t = sub.add_parser("train", help="train the configured flow")
    _add_config_args(t)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    g.add_argument("--fresh", action="store_true",
                   help="move the trained model (and what was sampled with it) aside and start over")

    s = sub.add_parser("sample", help="production sampling: worker chains into HDF5 ensembles, "
                       "checkpoints, resume")
    _add_config_args(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_const", const=True, default=None,
                   help="require a checkpoint and continue from it (default: continue if one exists)")
    g.add_argument("--fresh", action="store_true",
                   help="move an existing ensemble and its chain checkpoints aside "
                   "(previous-<time>/) and start new chains")

    en = sub.add_parser("ensemble", help="inspect a stored ensemble")
    en_sub = en.add_subparsers(dest="ensemble_command", metavar="ACTION")
    en_info = en_sub.add_parser("info", help="lattice, chains, committed configurations, provenance")
    en_info.add_argument("path", help="ensemble directory (<output.dir>/ensemble)")
    en_verify = en_sub.add_parser("verify", help="check every segment, row and configuration "
                                  "(checksums, digests); exit 1 naming each problem")
    en_verify.add_argument("path", help="ensemble directory (<output.dir>/ensemble)")

    m = sub.add_parser("measure", help="observables of the stored chain states with Gamma-method "
                       "errors (strict JSON) from an ensemble")
    m.add_argument("path", help="ensemble directory")
    m.add_argument("--chain", type=int, default=None, help="only this chain")

    x = sub.add_parser("export", help="export a configuration of an ensemble (ILDG/LIME)")
    x.add_argument("path", help="ensemble directory")
    x.add_argument("out", help="output file")
    x.add_argument("--format", choices=("ildg",), default="ildg")
    x.add_argument("--index", type=int, default=-1, help="configuration index in the chain (-1: last)")
    x.add_argument("--chain", type=int, default=0)
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    im = sub.add_parser("import", help="read an ILDG file from another code: check it and measure it")
    im.add_argument("path", help="ILDG/LIME file")
    im.add_argument("--format", choices=("ildg",), default="ildg")

    cp = sub.add_parser("campaign", help="expand, submit and follow a Slurm campaign (see docs/HPC.md)",
                        add_help=False)
    cp.add_argument("campaign_args", nargs=argparse.REMAINDER,
                    help="[submit] CAMPAIGN.yaml [--dry-run] | status CAMPAIGN.yaml [--json]")

    c = sub.add_parser("config", help="print the resolved configuration, or the commented defaults")
    _add_config_args(c, required=False)
    c.add_argument("--defaults", action="store_true", help="print a complete commented default config")

    i = sub.add_parser("info", help="versions of hpcflow and its stack, MPI and GPU capabilities, "
                       "and the kernel backend a run will use")
    _add_config_args(i, required=False)
    i.add_argument("--json", action="store_true", help="print as JSON")

    m = sub.add_parser("models", help="list the shipped flow models (flow.model) and where they are")
    m.add_argument("--json", action="store_true", help="print as JSON")

    e = sub.add_parser("exact", help="exact 2D U(1) finite-volume values for (L, beta)")
    e.add_argument("--L", type=int, required=True, help="lattice extent (L x L)")
    e.add_argument("--beta", type=float, required=True, help="inverse coupling")
    return p


def _fail(msg: str) -> int:
    print(f"hpcflow: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


# ---- one function per sub-command: (parsed arguments) -> exit status -----------------------
def _cmd_import(args: argparse.Namespace) -> int:
    """Read an ILDG file from another code, verify its checksums, print its metadata and plaquette."""
    import torch

    from hpcflow.io import read_ildg
    from hpcflow.lattice.action import average_plaquette
    from hpcflow.lattice.geometry import Lattice

    U, meta = read_ildg(args.path, verify=True)
    lat = Lattice(tuple(U.shape[1:-2]))
    out = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, list, tuple))}
    out["plaquette"] = float(average_plaquette(U.to(torch.complex128), lat))
    print(json.dumps(out, indent=2, default=str))
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from hpcflow.run.info import collect_info, format_info

    info = collect_info()
    if args.config is not None:
        from hpcflow.backend import run_backend
        from hpcflow.config import load_config

        cfg = load_config(args.config, args.overrides)
        info["backend_of_config"] = f"{run_backend(cfg)} (backend: {cfg.backend} in {cfg.source})"
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from hpcflow.config import default_yaml, load_config, to_yaml

    if args.defaults:
        print(default_yaml(), end="")
        return EXIT_OK
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return EXIT_OK


#: Bounds of ``hpcflow exact`` (the character sums' quadrature grows like sqrt(beta)).
EXACT_MAX_BETA = 1e4
EXACT_MAX_L = 1 << 16


def _cmd_exact(args: argparse.Namespace) -> int:
    from hpcflow.analysis import u1_2d_exact

    if not 2 <= args.L <= EXACT_MAX_L:
        return _fail(f"exact: --L: got {args.L}; allowed: an integer 2 .. {EXACT_MAX_L}")
    if not (math.isfinite(args.beta) and 0 <= args.beta <= EXACT_MAX_BETA):
        # the quadrature grows like sqrt(beta): beyond this it would allocate gigabytes
        return _fail(f"exact: --beta: got {args.beta}; allowed: a finite number 0 .. {EXACT_MAX_BETA:g}")
    ex = u1_2d_exact(args.beta, L=args.L)
    areas = {f"W_area{a}": ex.wilson_loop(a) for a in (1, 2, 4, 9)}
    print(json.dumps({"L": args.L, "beta": args.beta, "plaquette": ex.plaquette, "Q2": ex.q2,
                      "chi_Q": ex.chi_q, **areas}, indent=2))
    return EXIT_OK


def _cmd_ensemble(args: argparse.Namespace) -> int:
    if args.ensemble_command == "verify":
        from hpcflow.io.ensemble import verify_ensemble

        problems = verify_ensemble(args.path)
        for line in problems:
            print(line)
        if problems:
            print(f"hpcflow: {args.path}: {len(problems)} problem(s) found", file=sys.stderr)
            return EXIT_FAILED
        print(f"{args.path}: ok")
        return EXIT_OK
    if args.ensemble_command != "info":
        return _fail("ensemble: expected an action: info, verify")
    from hpcflow.io import ensemble_info

    print(ensemble_info(args.path))
    return EXIT_OK


def _cmd_measure(args: argparse.Namespace) -> int:
    from hpcflow.analysis.ensemble import measure_ensemble

    print(json.dumps(measure_ensemble(args.path, chain=args.chain), indent=2, default=float,
                     allow_nan=False))
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    """The models ``flow.model`` can name: one line each (or JSON), and the search path."""
    from hpcflow.models import list_models, model_search_path

    models = list_models()
    if args.json:
        print(json.dumps([{**m.meta, "path": str(m.path)} for m in models], indent=2, default=str))
        return EXIT_OK
    print(f"{'name':<16} {'group':<5} {'lattice':<10} {'beta':>6} {'steps':>7} {'accept':>7} {'tau_int(Q)':>12}  path")
    for m in models:
        ch = m.meta.get("chain") or {}
        tau = ch.get("tau_Q")
        tau_s = "-" if tau is None else (f">={tau:.0f}" if ch.get("tau_Q_lower_bound") else f"{tau:.3g}")
        acc = ch.get("acceptance")
        print(f"{m.name:<16} {str(m.meta.get('group')):<5} {'x'.join(map(str, m.meta.get('lattice') or [])):<10} "
              f"{m.meta.get('beta', float('nan')):>6g} {m.meta.get('training_steps', 0):>7} "
              f"{'-' if acc is None else f'{acc:.3f}':>7} {tau_s:>12}  {m.path}")
    print("search path: " + ":".join(str(d) for d in model_search_path()))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from hpcflow.io import export_ildg

    suma, sumb = export_ildg(args.path, args.out, index=args.index, chain=args.chain,
                             overwrite=args.overwrite)
    print(f"wrote {args.out} (ILDG, SciDAC checksum suma={suma:08x} sumb={sumb:08x})")
    return EXIT_OK


def _cmd_sample(args: argparse.Namespace) -> int:
    from hpcflow.config import load_config
    from hpcflow.run.sample import sample

    return sample(load_config(args.config, args.overrides), resume=args.resume, fresh=args.fresh)


def _cmd_run(args: argparse.Namespace) -> int:
    from hpcflow.config import load_config
    from hpcflow.run.driver import run

    return run(load_config(args.config, args.overrides), resume=args.resume, fresh=args.fresh).exit_code


def _cmd_train(args: argparse.Namespace) -> int:
    from hpcflow.config import load_config
    from hpcflow.run.driver import train

    return train(load_config(args.config, args.overrides), resume=args.resume, fresh=args.fresh).exit_code


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": _cmd_info,
    "config": _cmd_config,
    "exact": _cmd_exact,
    "ensemble": _cmd_ensemble,
    "measure": _cmd_measure,
    "export": _cmd_export,
    "models": _cmd_models,
    "import": _cmd_import,
    "sample": _cmd_sample,
    "run": _cmd_run,
    "train": _cmd_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``hpcflow COMMAND ...``: parse, call the command's function, turn bad input into one line
    and exit 2 (under MPI: printed by rank 0 only, the same exit code on every rank)."""
    from hpcflow.run.world import launched_rank, run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["campaign"]:  # its own parser (hpcflow.run.campaign), options included
        from hpcflow.run.campaign import main as campaign_main

        return campaign_main(argv[1:])
    parser = build_parser()
    quiet = launched_rank() > 0  # argparse output (usage, errors, help) from rank 0 only
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext(), \
            contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        args = parser.parse_args(argv)
    if args.command is None:
        if not quiet:
            parser.print_help()
        return EXIT_BAD_INPUT
    command = _COMMANDS.get(args.command)
    if command is None:
        parser.error(f"unknown command {args.command}")
    return run_guarded(lambda: command(args), mpi=args.command in _MPI_COMMANDS)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
