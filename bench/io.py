"""I/O benchmark: ensemble write throughput vs a plain sequential write of the same bytes to
the same disk (same run), checkpoint time and time to resume (recover + load).

The ensemble write (``SegmentWriter``: per-site SciDAC checksum, HDF5 hyperslab write, row
table, flush, fsync, rename) is timed twice in the same run, alternating, median of
``--repeat``: with the zlib per-site CRC (``crc32_rows``, what hpcflow uses) and with the
column-vectorised table CRC (``crc32_rows_table``, the implementation before), so the
before/after ratio is measured on the same disk at the same moment. The checksum alone is
timed too, to show what is left of the gap to the plain write. The segment digests (sha256
over the row columns, a BLAKE2b per row, computed at commit) are part of the ensemble write.
The verified read (``verify_ensemble``: every configuration's SciDAC checksum, the row and
segment digests) of the same ensemble is timed against a plain read of the same bytes.

    python bench/io.py [--shape 8 8 8 8] [--group su3] [--n 8] [--repeat 3] [--dir /tmp/hpcflow-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable

import hpcflow.io.lime as lime
from hpcflow.io.checkpoint import load_checkpoint, save_checkpoint
from hpcflow.io.ensemble import SegmentWriter, field_checksum, verify_ensemble
from hpcflow.lattice import Lattice, get_group, random_field
from hpcflow.rng import CounterRNG


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs="+", default=[8, 8, 8, 8])
    ap.add_argument("--group", default="su3")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/hpcflow-bench")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    lat, g = Lattice(tuple(a.shape)), get_group(a.group)
    U = random_field(lat, g, CounterRNG(1))
    nbytes = U.numel() * U.element_size() * a.n
    raw = U.numpy().tobytes()

    def ensemble_write(k: int) -> float:
        root = os.path.join(a.dir, f"ens{k}")
        t = time.perf_counter()
        w = SegmentWriter(root, 0, 0, lat, a.n, U.dtype, g.N, {"bench": 1})
        for s in range(a.n):
            w.append(U, {"step": s})
        w.commit()
        dt = time.perf_counter() - t
        shutil.rmtree(root)
        return dt

    def plain_write(k: int) -> float:
        path = os.path.join(a.dir, f"plain{k}.bin")
        t = time.perf_counter()
        with open(path, "wb") as fh:
            fh.writelines(raw for _ in range(a.n))
            fh.flush()
            os.fsync(fh.fileno())
        dt = time.perf_counter() - t
        os.unlink(path)
        return dt

    def checksums(k: int) -> float:
        t = time.perf_counter()
        for _ in range(a.n):
            field_checksum(U, lat)
        return time.perf_counter() - t

    vroot = os.path.join(a.dir, "verify")
    w = SegmentWriter(vroot, 0, 0, lat, a.n, U.dtype, g.N, {"bench": 1}, fingerprint="bench")
    for s in range(a.n):
        w.append(U, {"step": s})
    w.commit()
    plain_file = os.path.join(a.dir, "plain-read.bin")
    with open(plain_file, "wb") as fh:
        fh.writelines(raw for _ in range(a.n))

    def verified_read(k: int) -> float:
        t = time.perf_counter()
        probs = verify_ensemble(vroot)
        dt = time.perf_counter() - t
        assert probs == [], probs
        return dt

    def plain_read(k: int) -> float:  # page-cached like the verified read: compares CPU cost
        t = time.perf_counter()
        with open(plain_file, "rb") as fh:
            while fh.read(1 << 24):
                pass
        return time.perf_counter() - t

    fast, table = lime.crc32_rows, lime.crc32_rows_table

    def with_crc(crc: Callable, f: Callable[[int], float]) -> Callable[[int], float]:
        def run(k: int) -> float:
            lime.crc32_rows = crc  # scidac_checksum looks it up at call time
            try:
                return f(k)
            finally:
                lime.crc32_rows = fast
        return run

    cases = {"plain": plain_write, "ensemble": with_crc(fast, ensemble_write),
             "ensemble_before": with_crc(table, ensemble_write), "checksum": with_crc(fast, checksums),
             "checksum_before": with_crc(table, checksums), "verified_read": verified_read,
             "plain_read": plain_read}
    times: dict[str, list[float]] = {k: [] for k in cases}
    ensemble_write(-1)  # warm-up: imports, HDF5 library initialisation
    for k in range(a.repeat):
        for name, f in cases.items():
            times[name].append(f(k))
    t = {k: statistics.median(v) for k, v in times.items()}

    ck = os.path.join(a.dir, "c.ckpt")
    t0 = time.perf_counter()
    save_checkpoint(ck, {"U": U, "step": 1}, "fp")
    t_ck = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_checkpoint(ck, "fp")
    t_res = time.perf_counter() - t0

    def gbs(x: float) -> str:
        return f"{nbytes / x / 1e9:.3f} GB/s"

    print(f"lattice {a.shape} {a.group}, {a.n} configs, {nbytes / 1e9:.3f} GB, median of {a.repeat}")
    print(f"plain sequential write            {gbs(t['plain'])}")
    print(f"ensemble write (zlib CRC, now)    {gbs(t['ensemble'])}  ratio to plain {t['plain'] / t['ensemble']:.2f}")
    print(f"ensemble write (table CRC, before) {gbs(t['ensemble_before'])}  ratio to plain "
          f"{t['plain'] / t['ensemble_before']:.2f}")
    print(f"speed-up of the ensemble write    {t['ensemble_before'] / t['ensemble']:.2f}x")
    print(f"checksums alone: now {gbs(t['checksum'])}, before {gbs(t['checksum_before'])} "
          f"({t['checksum'] / t['ensemble']:.0%} of the ensemble write now)")
    print(f"verified read (verify_ensemble)   {gbs(t['verified_read'])}  plain read (page cache) "
          f"{gbs(t['plain_read'])}")
    print(f"checkpoint write {t_ck * 1e3:.1f} ms, checkpoint load (resume) {t_res * 1e3:.1f} ms")
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
