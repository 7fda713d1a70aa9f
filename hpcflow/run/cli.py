"""``hpcflow`` command line: a thin argparse front; every sub-command calls one library function.

Exit status (``hpcflow.exit_codes``): 0 success; 1 ``ensemble verify`` found problems, or an
internal error (a bug: traceback); 2 bad input (config, arguments, files, an output.dir locked
by another process or holding results), with one line on stderr; 3 stopped by a signal with a
checkpoint written (resumable: rerun the same command); 4 the environment failed (disk full,
quota, read-only file system, permission denied on the run's output), with one line naming the
path and what to do. ``--debug`` (anywhere on the command line) or ``HPCFLOW_DEBUG=1`` adds the
traceback of the expected errors (2, 4) before their line.

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

from hpcflow.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_RESUMABLE,
)

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_RESUMABLE", "EXIT_INTERNAL",
           "EXIT_ENVIRONMENT"]

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
    from hpcflow import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of expected errors too (bad input: exit 2, environment: "
                   "exit 4), before their one line; also anywhere after the command, or HPCFLOW_DEBUG=1")
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

    m = sub.add_parser("measure", help="every stored observable of an ensemble, per chain and combined, "
                       "with Gamma-method errors: a table (values rounded to their errors), or --json")
    m.add_argument("path", help="ensemble directory")
    m.add_argument("--chain", type=int, default=None, help="only this chain")
    m.add_argument("--skip", type=int, default=0, metavar="N",
                   help="thermalisation cut: drop the first N stored rows of each chain (default 0)")
    m.add_argument("--bin", type=int, default=1, metavar="B", dest="bin_size",
                   help="average B consecutive rows before the analysis (default 1)")
    m.add_argument("--S", type=float, default=1.5, dest="gamma_s", metavar="S",
                   help="Wolff's S of the window choice (default 1.5)")
    m.add_argument("--no-bias-correction", action="store_true",
                   help="leave out Wolff's bias correction of the error (eq. 49; on by default)")
    m.add_argument("--json", action="store_true",
                   help="print the full report as strict JSON (full precision; null with a note, never NaN)")
    m.add_argument("--pyerrors", default=None, metavar="FILE",
                   help="also write the analysed series through pyerrors' JSON export (FILE.json or "
                   "FILE.json.gz; needs the optional package pyerrors)")

    pl = sub.add_parser("plot", help="PNG plots of an ensemble and its training: Monte Carlo histories, "
                        "autocorrelation functions, topological charge, training curves")
    pl.add_argument("path", help="output directory of a run (holding ensemble/ and/or train/) or an "
                    "ensemble directory")
    pl.add_argument("--out", default=None, metavar="DIR",
                    help="where to write the PNGs (default: <output dir>/plots)")
    pl.add_argument("--skip", type=int, default=0, metavar="N",
                    help="thermalisation cut drawn and used for the statistics (stored rows per chain)")
    pl.add_argument("--bin", type=int, default=1, metavar="B", dest="bin_size",
                    help="bin size for the autocorrelation analysis (default 1)")
    pl.add_argument("--max-q-configs", type=int, default=2000, metavar="N",
                    help="at most N configurations per chain whose topological charge is computed from "
                    "the links when no Q column is stored (evenly spaced; default 2000)")

    x = sub.add_parser("export", help="export configurations of a 4D SU(3) ensemble (ILDG, NERSC, openQCD)")
    x.add_argument("path", help="ensemble directory")
    x.add_argument("out", help="output file, or a name pattern with {index}, {step}, {chain} "
                   "(e.g. cfg_{index:05d}.lime) when several configurations are exported")
    x.add_argument("--format", choices=("ildg", "nersc", "openqcd"), default="ildg",
                   help="ildg: ILDG/LIME with QCDml; nersc: NERSC archive 4D_SU3_GAUGE_3x3; openqcd: openQCD "
                   "export_cnfg (default: ildg)")
    x.add_argument("--index", default="-1", metavar="SEL",
                   help="configurations of the chain: I (negative from the end), A:B or A:B:S (Python slices), "
                   "a comma-separated list, or all (default: -1, the last; write --index=-5: for a range "
                   "that starts with a minus sign)")
    x.add_argument("--chain", type=int, default=0)
    x.add_argument("--overwrite", action="store_true", help="replace existing output files")
    x.add_argument("--precision", type=int, choices=(64, 32), default=64,
                   help="floating-point bits of ILDG/NERSC data (openQCD: 64 only)")
    x.add_argument("--lfn", default=None, metavar="PATTERN",
                   help="ILDG logical file name pattern, e.g. lfn://ildg/COLLAB/ens1/cfg_{index} (default: "
                   "the file's name)")
    x.add_argument("--markov-chain-uri", default=None, metavar="URI",
                   help="ILDG: the QCDml markovChainURI of the ensemble (default: mc://hpcflow/<ensemble folder>)")
    x.add_argument("--qcdml", default=None, metavar="DIR",
                   help="ILDG: also write the QCDml ensemble document (DIR/ensemble.xml) and each file's QCDml "
                   "configuration document (DIR/<file name>.xml) for the metadata catalogue")

    im = sub.add_parser("import", help="read a gauge configuration from another code (ILDG, NERSC, openQCD): "
                        "check it and measure it")
    im.add_argument("path", help="configuration file")
    im.add_argument("--format", choices=("ildg", "nersc", "openqcd"), default="ildg")

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
    """Read a configuration file from another code, verify it (checksums, links, header
    plaquette), print its metadata and plaquette."""
    import torch

    from hpcflow.io.export import read_gauge_file
    from hpcflow.lattice.action import average_plaquette
    from hpcflow.lattice.geometry import Lattice

    U, meta = read_gauge_file(args.path, args.format, verify=True)
    lat = Lattice(tuple(U.shape[1:-2]))
    out = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, list, tuple, dict)) and v != {}}
    out["format"] = args.format
    if "plaquette" in out:  # the file's own header value, in its own normalisation
        out["header_plaquette"] = out.pop("plaquette")
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
    """Table (default) or strict JSON (``--json``) of :func:`hpcflow.analysis.ensemble.measure_ensemble`;
    ``--pyerrors FILE`` also writes the analysed series through pyerrors' JSON export."""
    from hpcflow.analysis.ensemble import export_pyerrors, format_table, load_series, measure_ensemble

    if args.skip < 0:
        return _fail(f"measure: --skip: got {args.skip}; allowed: an integer >= 0")
    if args.bin_size < 1:
        return _fail(f"measure: --bin: got {args.bin_size}; allowed: an integer >= 1")
    if not (math.isfinite(args.gamma_s) and args.gamma_s >= 0):
        return _fail(f"measure: --S: got {args.gamma_s}; allowed: a finite number >= 0")
    if args.pyerrors is not None and not args.pyerrors.endswith((".json", ".json.gz")):
        return _fail(f"measure: --pyerrors: got {args.pyerrors}; allowed: a file name ending in .json or .json.gz")
    ser = load_series(args.path, chain=args.chain, skip=args.skip, bin_size=args.bin_size)  # read once
    report = measure_ensemble(args.path, S=args.gamma_s, bias_correction=not args.no_bias_correction, series=ser)
    if args.pyerrors is not None:
        export_pyerrors(args.path, args.pyerrors, series=ser)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(format_table(report))
        if args.pyerrors is not None:
            print(f"\nwrote {args.pyerrors} (pyerrors JSON: pyerrors.input.json.load_json_dict)")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    """PNGs of :func:`hpcflow.analysis.plots.write_plots`, one line per file."""
    from hpcflow.analysis.plots import write_plots

    if args.skip < 0:
        return _fail(f"plot: --skip: got {args.skip}; allowed: an integer >= 0")
    if args.bin_size < 1:
        return _fail(f"plot: --bin: got {args.bin_size}; allowed: an integer >= 1")
    if args.max_q_configs < 0:
        return _fail(f"plot: --max-q-configs: got {args.max_q_configs}; allowed: an integer >= 0")
    written = write_plots(args.path, out=args.out, skip=args.skip, bin_size=args.bin_size,
                          max_q_configs=args.max_q_configs, log=print)
    for path in written:
        print(f"wrote {path}")
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
    """Export configurations of one chain (a selection, one file each) to ILDG, NERSC or openQCD."""
    from hpcflow.io.export import export_configs

    done = export_configs(args.path, args.out, fmt=args.format, index=args.index, chain=args.chain,
                          overwrite=args.overwrite, lfn=args.lfn, precision=args.precision,
                          markov_chain_uri=args.markov_chain_uri, qcdml_dir=args.qcdml)
    name = {"ildg": "ILDG", "nersc": "NERSC", "openqcd": "openQCD"}[args.format]
    for d in done:
        print(f"wrote {d.path} ({name}, chain {args.chain} index {d.index} step {d.step}, {d.checksum})")
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
    "plot": _cmd_plot,
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
    from hpcflow.run.world import debug_requested, launched_rank, run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested()  # HPCFLOW_DEBUG=1
    while argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if argv[:1] == ["campaign"]:  # its own parser (hpcflow.run.campaign), options included
        from hpcflow.run.campaign import main as campaign_main

        return campaign_main(argv[1:])
    parser = build_parser()
    quiet = launched_rank() > 0  # argparse output (usage, errors, help) from rank 0 only
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext(), \
            contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        # --debug is global, and accepted after the command too (hpcflow run CONFIG --debug)
        args, extra = parser.parse_known_args(argv)
        debug = debug or args.debug or "--debug" in extra
        extra = [a for a in extra if a != "--debug"]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        if not quiet:
            parser.print_help()
        return EXIT_BAD_INPUT
    command = _COMMANDS.get(args.command)
    if command is None:
        parser.error(f"unknown command {args.command}")
    return run_guarded(lambda: command(args), mpi=args.command in _MPI_COMMANDS, debug=debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
