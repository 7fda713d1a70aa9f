"""Crash-safe files: atomic writes and verified checkpoints.

Crash rule (ARCHITECTURE.md): a file is written to a temporary name in the same
directory, flushed and fsynced, then renamed over its final name and the directory is
fsynced. POSIX ``rename`` is atomic, so after any stop (SIGKILL, node loss) the final name
holds either the old or the new complete file, never a torn one. The temporary name is
unpredictable and created exclusively (``O_EXCL | O_NOFOLLOW``), so a symlink planted in
the folder is never followed, and the committed file is the regular file written here.

Checkpoint layout: ``MAGIC (16 bytes) | sha256 of payload (32) | payload length (8, LE) |
payload`` where the payload is ``torch.save`` of a dict. Loading checks all three, so a
truncated or corrupted checkpoint is a clear :class:`CheckpointError`, never a silent
restart. A checkpoint carries the *fingerprint* of the configuration that wrote it
(:func:`config_fingerprint`): resuming with a different physics configuration is refused.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import secrets
import struct
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import torch

__all__ = [
    "atomic_torch_save",
    "CheckpointError",
    "atomic_write_bytes",
    "config_fingerprint",
    "file_sha256",
    "fsync_dir",
    "load_checkpoint",
    "save_checkpoint",
]

_MAGIC = b"HPCFLOW-CKPT-v1\n"
_HEAD = struct.Struct("<16s32sQ")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or from another config."""


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename inside it survives a crash."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


def _create_temp(d: str, base: str) -> tuple[int, str]:
    """Create a fresh temporary file next to its target: an unpredictable name opened with
    ``O_CREAT | O_EXCL | O_NOFOLLOW`` (an existing name, a planted symlink included, is never
    opened or followed), permissions from the umask like a plain ``open``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(64):
        tmp = os.path.join(d, f".{base}.tmp.{os.getpid()}.{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(d, base))


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None],
                       overwrite: bool = True) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file) atomically to ``path``.

    The temporary file ``.NAME.tmp.PID.RANDOM`` in the target's folder is created exclusively
    (:func:`_create_temp`), fsynced, then renamed over ``path`` (a symlink at ``path`` is
    replaced, never followed), and the folder is fsynced. With ``overwrite=False`` the file is
    published with ``link`` instead, which fails with :class:`FileExistsError` when ``path``
    exists (no check-then-replace race). An error while creating the temporary file names
    ``path``.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = _create_temp(d, os.path.basename(path))
    except OSError as e:
        raise type(e)(e.errno, e.strerror or str(e), path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


def _publish_new(tmp: str, path: str) -> None:
    """Give ``tmp`` the name ``path`` only if ``path`` does not exist (then remove ``tmp``)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "File exists; refusing to overwrite", path) from None
    except OSError as e:  # a file system without hard links: check, then rename
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists; refusing to overwrite", path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write_bytes` (model files: plain
    torch format, loadable with ``torch.load``); creates the parent folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, lambda fh: torch.save(obj, fh))


def config_fingerprint(cfg_dict: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """sha256 of the listed top-level sections/keys of a plain config dict (order-independent)."""
    import json

    sub = {k: cfg_dict.get(k) for k in keys}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (model checkpoint hash stored with ensembles)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], fingerprint: str | None = None) -> None:
    """Atomically write ``state`` (tensors, numbers, strings, dicts) with a checksum header."""
    buf = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "state": dict(state)}, buf)
    payload = buf.getvalue()
    head = _HEAD.pack(_MAGIC, hashlib.sha256(payload).digest(), len(payload))
    atomic_write_bytes(path, head + payload)


def load_checkpoint(path: str | os.PathLike, fingerprint: str | None = None) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` naming the file when it is not a checkpoint, is
    truncated or corrupted, or (``fingerprint`` given) was written by another configuration.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    if len(raw) < _HEAD.size or raw[:16] != _MAGIC:
        raise CheckpointError(f"{path}: not an hpcflow checkpoint (bad header)")
    _, digest, n = _HEAD.unpack(raw[: _HEAD.size])
    payload = raw[_HEAD.size:]
    if len(payload) != n:
        raise CheckpointError(f"{path}: truncated checkpoint ({len(payload)} of {n} payload bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: corrupted checkpoint (sha256 mismatch)")
    obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if fingerprint is not None and obj.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: checkpoint was written by another configuration (fingerprint "
            f"{str(obj.get('fingerprint'))[:12]}..., this config {fingerprint[:12]}...); "
            "use a fresh output.dir or the original config")
    return obj["state"]
