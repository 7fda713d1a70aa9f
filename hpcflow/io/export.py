"""``hpcflow export`` / ``hpcflow import``: gauge configurations to and from other codes' formats.

Formats (4D SU(3) only; :data:`FORMATS`):

* ``ildg``: ILDG/LIME (:mod:`hpcflow.io.ildg`), with the QCDml 2.0 configuration document in
  the file (``scidac-record-xml``) and, with ``qcdml_dir``, the QCDml ensemble document and one
  configuration document per file there, as the ILDG metadata catalogue takes them
  (:mod:`hpcflow.io.qcdml`); ``lfn`` is a pattern for each file's ILDG logical file name;
* ``nersc``: NERSC archive, ``4D_SU3_GAUGE_3x3`` (:mod:`hpcflow.io.nersc`);
* ``openqcd``: openQCD ``export_cnfg`` format (:mod:`hpcflow.io.openqcd`).

:func:`export_configs` writes any selection of one chain's configurations in one call
(``index``: ``"I"``, ``"A:B"``, ``"A:B:S"`` (Python slices, negative from the end), comma-separated
lists of those, or ``"all"``), reading them through one verified :class:`~hpcflow.io.ensemble.Ensemble`.
The output name (and the LFN) is a pattern with the fields ``{index}``, ``{step}`` and
``{chain}`` (``cfg_{index:05d}.lime``). Everything that can be checked is checked before the
first file is written: the ensemble holds 4D SU(3) configurations (U(1) and SU(2) ensembles,
and 2D lattices, are refused in one line naming the formats that take them), the selection is
in range, the names are distinct and new (unless ``overwrite``), the folders exist; each file
is then written atomically (temporary name, fsync, rename). Every refusal is one
:class:`ExportError` (an :class:`~hpcflow.io.ensemble.EnsembleError`; an index out of range an
:class:`~hpcflow.io.ensemble.EnsembleIndexError`): the CLI prints one line and exits 2.
"""

from __future__ import annotations

import math
import os
import string
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hpcflow.io.ensemble import EnsembleError, EnsembleIndexError, open_ensemble
from hpcflow.lattice.action import average_plaquette
from hpcflow.lattice.geometry import Lattice

__all__ = ["FORMATS", "ExportError", "Exported", "export_configs", "read_gauge_file", "select_indices",
           "sniff_format"]

FORMATS = ("ildg", "nersc", "openqcd")
_NAMES = {"ildg": "ILDG", "nersc": "NERSC", "openqcd": "openQCD"}
_FIELDS = ("index", "step", "chain")
# what the refusal of a non-4D-SU(3) ensemble points to
_OTHER_GROUPS = ("ILDG (su3gauge), NERSC (4D_SU3_GAUGE_3x3) and openQCD take 4D SU(3) only; U(1) and SU(2) "
                 "ensembles and 2D lattices stay in hpcflow's HDF5 segments (any HDF5 reader: dataset "
                 "U[row, mu, x_0.., i, j], see the 'layout' attribute)")


class ExportError(EnsembleError):
    """A refused export (unsupported ensemble, bad selection or name, existing output): one line."""


@dataclass(frozen=True)
class Exported:
    """One written file: its path, chain index and step, and a one-line checksum summary."""

    path: str
    index: int
    step: int
    checksum: str


def select_indices(spec: str | int, n: int, root: str = "", chain: int = 0) -> list[int]:
    """The configuration indices (0..n-1, in order of appearance, duplicates dropped) that ``spec``
    selects among ``n``: ``"I"`` (negative from the end), ``"A:B"``/``"A:B:S"`` (Python slices),
    a comma-separated list of those, or ``"all"``. An index or an explicit range bound outside
    the chain is an :class:`~hpcflow.io.ensemble.EnsembleIndexError`; an empty selection or a
    malformed one an :class:`ExportError` (one line each)."""
    where = f"{root}: " if root else ""
    allowed = f"chain {chain} has {n} committed configurations (allowed {-n}..{n - 1})" if n else \
        f"chain {chain} has no committed configurations"
    text = str(spec).strip()
    if text == "all":
        if not n:
            raise EnsembleIndexError(f"{where}--index all: {allowed}")
        return list(range(n))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            bounds = [int(b) if b.strip() else None for b in part.split(":")]
        except ValueError:
            bounds = []
        if not 1 <= len(bounds) <= 3 or (len(bounds) == 1 and bounds[0] is None):
            raise ExportError(f"{where}--index {spec!r}: {part!r} is not an index; allowed: I, A:B, A:B:S "
                              "(Python slices, negative from the end), a comma-separated list of those, or all")
        if len(bounds) == 1:
            i = bounds[0]
            assert i is not None
            if not -n <= i < n:
                raise EnsembleIndexError(f"{where}index {i} out of range: {allowed}")
            out.append(i % n)
            continue
        start, stop = bounds[0], bounds[1]
        step = bounds[2] if len(bounds) == 3 else None
        if step == 0:
            raise ExportError(f"{where}--index {part!r}: the step of a range must not be 0")
        for b, lo, hi in ((start, -n, n - 1), (stop, -n - 1, n)):
            if b is not None and not lo <= b <= hi:
                raise EnsembleIndexError(f"{where}index range {part} out of range: {allowed}")
        out.extend(range(n)[slice(start, stop, step)])
    uniq = list(dict.fromkeys(out))  # first occurrences, in order
    if not uniq:
        raise ExportError(f"{where}--index {spec!r} selects no configuration ({allowed})")
    return uniq


def _pattern_fields(pattern: str, what: str) -> set[str]:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as e:
        raise ExportError(f"{what} {pattern!r}: {e} (write literal braces as {{{{ and }}}})") from None
    bad = sorted(f for f in names if f.split(".")[0].split("[")[0] not in _FIELDS)
    if bad:
        raise ExportError(f"{what} {pattern!r}: unknown field {{{bad[0]}}}; allowed: "
                          + ", ".join("{" + f + "}" for f in _FIELDS))
    return names


def _fill(pattern: str, what: str, **values: Any) -> str:
    try:
        return pattern.format(**values)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise ExportError(f"{what} {pattern!r}: cannot be filled in ({type(e).__name__}: {e})") from None


def _refuse_existing(paths: Sequence[str], overwrite: bool) -> None:
    seen: set[str] = set()
    for p in paths:
        key = os.path.abspath(p)
        if key in seen:
            raise ExportError(f"{p}: two outputs get this name; put {{index}} in the name pattern")
        seen.add(key)
        if os.path.isdir(p):
            raise ExportError(f"{p}: is a directory")
        if os.path.lexists(p) and not overwrite:
            more = sum(os.path.lexists(q) for q in paths) - 1
            raise ExportError(f"{p}: exists; refusing to overwrite (--overwrite / overwrite=True replaces it)"
                              + (f"; {more} more outputs exist" if more > 0 else ""))
        d = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(d):
            raise ExportError(f"{p}: no such directory {d}")


def export_configs(root: str | os.PathLike, out: str | os.PathLike, fmt: str = "ildg", index: str | int = -1,
                   chain: int = 0, overwrite: bool = False, lfn: str | None = None, precision: int = 64,
                   markov_chain_uri: str | None = None, qcdml_dir: str | os.PathLike | None = None) -> list[Exported]:
    """Write configurations ``index`` of ``chain`` of the ensemble ``root`` in format ``fmt``;
    returns one :class:`Exported` per file, in order (module docstring).

    ``out``: the output file, or a pattern with ``{index}``/``{step}``/``{chain}`` (required when
    several configurations are selected). ``precision``: 64 or 32 bits (ILDG, NERSC; openQCD is
    always 64). ILDG only: ``lfn`` (pattern; default the file's base name), ``markov_chain_uri``
    (the QCDml ensemble URI; default ``mc://hpcflow/<ensemble folder name>``), ``qcdml_dir``
    (where ``ensemble.xml`` and ``<file name>.xml`` per configuration are written)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; allowed: " + ", ".join(FORMATS))
    name = _NAMES[fmt]
    if precision not in (32, 64) or (fmt == "openqcd" and precision != 64):
        raise ExportError(f"--precision {precision}: {name} takes " + ("64 only" if fmt == "openqcd" else "32 or 64"))
    if fmt != "ildg":
        for opt, v in (("--lfn", lfn), ("--markov-chain-uri", markov_chain_uri), ("--qcdml", qcdml_dir)):
            if v is not None:
                raise ExportError(f"{opt} applies to ILDG export only, not {name}")
    out = os.fspath(out)
    used = _pattern_fields(out, "output name")
    if lfn is not None:
        _pattern_fields(lfn, "--lfn")
    ens = open_ensemble(root, verify="rows")
    segs = ens._chain(chain)  # one line "no chain N" when it does not exist
    attrs = ens.attrs
    group = str(attrs.get("group", "?"))
    if segs:
        shape = segs[0].u_shape[1:]
        if len(shape) != 7 or shape[0] != 4 or shape[-2:] != (3, 3):
            raise ExportError(f"{ens.root}: chain {chain} holds {group} configurations of shape {tuple(shape)}; "
                              f"{name} export supports 4D SU(3) only (shape (4, Lx, Ly, Lz, Lt, 3, 3)): "
                              + _OTHER_GROUPS)
        if fmt == "openqcd" and any(n % 2 for n in shape[1:5]):
            raise ExportError(f"{ens.root}: lattice {tuple(shape[1:5])} (x, y, z, t) has an odd extent; openQCD "
                              "needs even extents (its files hold the links of the odd points); ILDG and NERSC "
                              "take any extents")
    indices = select_indices(index, ens.n_committed(chain), ens.root, chain)
    if len(indices) > 1 and not ({"index", "step"} & {f.split(".")[0].split("[")[0] for f in used}):
        raise ExportError(f"output name {out!r} names one file, but {len(indices)} configurations are selected: "
                          "put {index} (or {step}) in it, e.g. cfg_{index:05d}." + {"ildg": "lime", "nersc": "nersc",
                                                                                     "openqcd": "oqcd"}[fmt])
    rows = [ens.row(chain, i) for i in indices]  # verified row columns (digests)
    paths = [_fill(out, "output name", index=i, step=int(r["step"]), chain=chain) for i, r in zip(indices, rows)]
    _refuse_existing(paths, overwrite)
    qcdml_paths: list[str] = []
    uri = markov_chain_uri or f"mc://hpcflow/{os.path.basename(os.path.abspath(ens.root))}"
    if qcdml_dir is not None:
        qd = os.fspath(qcdml_dir)
        if not os.path.isdir(qd):
            raise ExportError(f"--qcdml {qd}: no such directory")
        qcdml_paths = [os.path.join(qd, "ensemble.xml")] + [os.path.join(qd, os.path.basename(p) + ".xml")
                                                             for p in paths]
        _refuse_existing(qcdml_paths, overwrite)
    lfns = [_fill(lfn, "--lfn", index=i, step=int(r["step"]), chain=chain) if lfn is not None
            else os.path.basename(p) for i, r, p in zip(indices, rows, paths)]
    lattice = [int(n) for n in segs[0].u_shape[2:6]] if segs else []
    params = {"beta": attrs.get("beta"), "algorithm": attrs.get("algorithm"), "seed": attrs.get("seed"),
              "chain": chain}
    if qcdml_paths:
        from hpcflow.io.checkpoint import atomic_write_bytes
        from hpcflow.io.qcdml import ensemble_xml

        doc = ensemble_xml(markov_chain_uri=uri, size=lattice, beta=float(attrs.get("beta", float("nan"))),
                           algorithm=str(attrs.get("algorithm", "?")),
                           parameters={"seed": attrs.get("seed"), "hpcflow_version": attrs.get("hpcflow_version"),
                                       "config_fingerprint": attrs.get("config_fingerprint")})
        _write_new(qcdml_paths[0], doc, overwrite, atomic_write_bytes)
    done: list[Exported] = []
    for k, (i, r, path) in enumerate(zip(indices, rows, paths)):
        U = ens.config(chain, i).to(torch.complex128)  # verified against its SciDAC checksum
        step = int(r["step"])
        plaq = float(average_plaquette(U, Lattice(tuple(U.shape[1:-2]))))  # what the file's header states
        try:
            if fmt == "ildg":
                done.append(_write_ildg(path, U, r, i, chain, attrs, params, lfns[k], uri, precision, overwrite,
                                        qcdml_paths[k + 1] if qcdml_paths else None, plaq))
            elif fmt == "nersc":
                from hpcflow.io.nersc import write_nersc

                h = write_nersc(path, U, precision=precision, overwrite=overwrite, ensemble_id="hpcflow",
                                ensemble_label=uri, sequence_number=step, plaquette=plaq)
                done.append(Exported(path, i, step, f"NERSC checksum {h['CHECKSUM']}"))
            else:
                from hpcflow.io.openqcd import write_openqcd

                oq_plaq = write_openqcd(path, U, overwrite=overwrite)
                done.append(Exported(path, i, step, f"openQCD plaquette {oq_plaq:.12g}"))
        except FileExistsError:
            raise ExportError(f"{path}: exists; refusing to overwrite (--overwrite / overwrite=True replaces it)"
                              + (f"; {len(done)} files were written before it" if done else "")) from None
        except IsADirectoryError:
            raise ExportError(f"{path}: is a directory") from None
    return done


def _write_new(path: str, data: bytes, overwrite: bool, writer: Any) -> None:
    try:
        writer(path, data, overwrite=overwrite)
    except FileExistsError:
        raise ExportError(f"{path}: exists; refusing to overwrite (--overwrite / overwrite=True replaces it)") \
            from None


def _write_ildg(path: str, U: torch.Tensor, r: dict[str, Any], i: int, chain: int, attrs: dict[str, Any],
                params: dict[str, Any], lfn: str, uri: str, precision: int, overwrite: bool,
                qcdml_path: str | None, plaq: float) -> Exported:
    from hpcflow.io.ildg import write_ildg
    from hpcflow.io.lime import read_lime_payload, read_lime_records

    step = int(r["step"])
    info = {"beta": attrs.get("beta"), "step": step, "chain": chain, "index": i, "plaquette": float(r["plaquette"]),
            "seed": attrs.get("seed"), "algorithm": attrs.get("algorithm"),
            "hpcflow_version": attrs.get("hpcflow_version")}
    qcdml = {"markov_chain_uri": uri, "series": chain, "update": step, "plaquette": plaq,
             "code_version": str(attrs.get("hpcflow_version") or ""),
             "parameters": {**params, "multiplicity": int(r["multiplicity"]),
                            "log_w": float(r["log_w"]) if math.isfinite(float(r["log_w"])) else None}}
    suma, sumb = write_ildg(path, U, lfn=lfn, precision=precision, info=info, overwrite=overwrite, qcdml=qcdml)
    if qcdml_path is not None:  # the same configuration document, for the metadata catalogue
        from hpcflow.io.checkpoint import atomic_write_bytes

        rec = next(x for x in read_lime_records(path) if x.type == "scidac-record-xml")
        _write_new(qcdml_path, read_lime_payload(path, rec), overwrite, atomic_write_bytes)
    return Exported(path, i, step, f"SciDAC checksum suma={suma:08x} sumb={sumb:08x}")


def sniff_format(path: str | os.PathLike) -> str | None:
    """The format a file looks like from its first bytes (LIME magic: ildg; ``BEGIN_HEADER``:
    nersc; four positive even little-endian int32 sizes that fit the file size: openqcd), or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
        size = os.path.getsize(path)
    except OSError:
        return None
    if head[:4] == b"\x45\x67\x89\xab":
        return "ildg"
    if head.startswith(b"BEGIN_HEADER"):
        return "nersc"
    if len(head) == 24:
        n = struct.unpack("<iiii", head[:16])
        if all(0 < k and k % 2 == 0 for k in n) and size == 24 + n[0] * n[1] * n[2] * n[3] * 4 * 9 * 16:
            return "openqcd"
    return None


def read_gauge_file(path: str | os.PathLike, fmt: str = "ildg", verify: bool = True) -> tuple[torch.Tensor,
                                                                                               dict[str, Any]]:
    """Read a gauge configuration written by another code (``hpcflow import``): ``(U, meta)``,
    ``U`` complex128 (4, Lx, Ly, Lz, Lt, 3, 3), every check of the format's reader applied.
    A file that fails and looks like another format gets a hint naming it (one line)."""
    from hpcflow.io.ildg import ILDGError
    from hpcflow.io.lime import LimeError

    try:
        return _read(path, fmt, verify)
    except (ILDGError, LimeError) as e:
        other = sniff_format(path)
        if other is None or other == fmt:
            raise
        raise type(e)(f"{e} (the file looks like {_NAMES[other]}: --format {other})") from None


def _read(path: str | os.PathLike, fmt: str, verify: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    if fmt == "ildg":
        from hpcflow.io.ildg import read_ildg

        return read_ildg(path, verify=verify)
    if fmt == "nersc":
        from hpcflow.io.nersc import read_nersc

        return read_nersc(path, verify=verify)
    if fmt == "openqcd":
        from hpcflow.io.openqcd import read_openqcd

        return read_openqcd(path, verify=verify)
    raise ExportError(f"--format {fmt!r}; allowed: " + ", ".join(FORMATS))
