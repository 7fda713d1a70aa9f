"""Shipped flow models: find a trained flow by name (``flow.model`` in the YAML).

A *model directory* holds what ``hpcflow train`` wrote and what is needed to trust it::

    NAME/checkpoint.pt   the trainer's checkpoint (weights, architecture record, beta)
    NAME/config.yaml     the resolved configuration it was trained with
    NAME/model.json      {"name", "sha256" of checkpoint.pt, "lattice", "group", "beta", ...}
    NAME/CARD.md         the model card (recipe, budget, acceptance, ESS, tau_int(Q))

``flow.model: NAME`` is looked up, in order, in the directories of ``$HPCFLOW_MODELS``
(separated by ``:``), in ``models/`` beside the ``hpcflow`` package (a source checkout) and in
``<sys.prefix>/share/hpcflow/models`` (``pip install``, the container images). A value with a
``/`` (or starting with ``.`` or ``~``) is a model directory itself. ``hpcflow models`` lists
what is found. Before a chain uses a model its checkpoint's sha256 is compared with
``model.json`` (a changed or truncated file is refused, never sampled with).

This module imports no torch (the config parser uses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcflow.yamlio import YAMLReadError, read_yaml

__all__ = ["MODELS_ENV", "ModelError", "ShippedModel", "list_models", "model_search_path", "resolve_model",
           "verify_model", "write_model_json"]

MODELS_ENV = "HPCFLOW_MODELS"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FILES = ("checkpoint.pt", "config.yaml", "model.json")


class ModelError(ValueError):
    """A model reference that names no usable model (the message says why, in one line)."""


@dataclass(frozen=True)
class ShippedModel:
    """A resolved model directory: ``name``, ``path``, its ``config`` (raw YAML mapping) and
    ``meta`` (``model.json``)."""

    name: str
    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def sha256(self) -> str:
        return str(self.meta.get("sha256", ""))


def model_search_path() -> list[Path]:
    """The directories searched for a model name, in order (existing or not)."""
    dirs = [Path(p).expanduser() for p in os.environ.get(MODELS_ENV, "").split(":") if p.strip()]
    dirs.append(Path(__file__).resolve().parent.parent / "models")
    dirs.append(Path(sys.prefix) / "share" / "hpcflow" / "models")
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _is_path(ref: str) -> bool:
    return "/" in ref or ref.startswith((".", "~")) or os.sep in ref


def _load_dir(d: Path, name: str) -> ShippedModel:
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise ModelError(f"{d}: not a model directory (missing {', '.join(missing)}; a model directory "
                         "has checkpoint.pt, config.yaml and model.json: bench/ship_model.py writes one)")
    try:
        config = read_yaml(str(d / "config.yaml"))
        meta = json.loads((d / "model.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLReadError, json.JSONDecodeError) as e:
        raise ModelError(f"{d}: unreadable model description ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(config, dict) or not isinstance(meta, dict) or not re.fullmatch(
            r"[0-9a-f]{64}", str(meta.get("sha256", ""))):
        raise ModelError(f"{d}: malformed config.yaml or model.json (model.json needs the sha256 of "
                         "checkpoint.pt)")
    return ShippedModel(name, d, config, meta)


def resolve_model(ref: str) -> ShippedModel:
    """The model ``ref`` names (a name on the search path, or a directory); :class:`ModelError`
    with the names that exist when there is none."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError("expected a model name or a model directory")
    if _is_path(ref):
        d = Path(ref).expanduser()
        if not d.is_dir():
            raise ModelError(f"{ref}: no such model directory")
        return _load_dir(d.resolve(), d.resolve().name)
    if not _NAME.match(ref):
        raise ModelError(f"{ref!r} is not a model name (letters, digits, '.', '_', '-')")
    for base in model_search_path():
        d = base / ref
        if d.is_dir():
            return _load_dir(d, ref)
    names = sorted({m.name for m in list_models()})
    have = ", ".join(names) if names else "none found"
    raise ModelError(f"no model {ref!r} on the model path ({have}; `hpcflow models` lists them, "
                     f"${MODELS_ENV} adds directories)")


def list_models() -> list[ShippedModel]:
    """Every readable model on the search path (the first of a name wins, as in lookup)."""
    seen: set[str] = set()
    out: list[ShippedModel] = []
    for base in model_search_path():
        if not base.is_dir():
            continue
        for d in sorted(base.iterdir()):
            if d.name in seen or not d.is_dir() or not _NAME.match(d.name):
                continue
            try:
                m = _load_dir(d, d.name)
            except ModelError:
                continue
            seen.add(d.name)
            out.append(m)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_model(m: ShippedModel) -> str:
    """The checkpoint's sha256 after checking it against ``model.json`` (:class:`ModelError` if
    it differs: a changed, truncated or replaced weights file is never sampled with)."""
    sha = file_sha256(m.checkpoint)
    if sha != m.sha256:
        raise ModelError(f"{m.checkpoint}: sha256 {sha[:16]}... differs from model.json's "
                         f"{m.sha256[:16]}...: the model file was changed or damaged; reinstall it")
    return sha


def write_model_json(d: Path, name: str, config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """Write ``d/model.json`` for the checkpoint in ``d`` (used by ``bench/ship_model.py``)."""
    meta: dict[str, Any] = {
        "name": name,
        "sha256": file_sha256(d / "checkpoint.pt"),
        "lattice": list((config.get("lattice") or {}).get("shape") or []),
        "group": config.get("group"),
        "beta": (config.get("action") or {}).get("beta"),
        "precision": config.get("precision"),
        "flow": config.get("flow"),
    }
    meta.update(extra or {})
    tmp = d / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, d / "model.json")
    return meta
