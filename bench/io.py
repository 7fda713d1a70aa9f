"""I/O benchmark: ensemble write throughput vs a plain sequential write of the same bytes to
the same disk (same run), checkpoint time and time to resume (recover + load).

    python bench/io.py [--shape 8 8 8 8] [--group su3] [--n 8] [--dir /tmp/hpcflow-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from hpcflow.io.checkpoint import load_checkpoint, save_checkpoint
from hpcflow.io.ensemble import SegmentWriter
from hpcflow.lattice import Lattice, get_group, random_field
from hpcflow.rng import CounterRNG


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs="+", default=[8, 8, 8, 8])
    ap.add_argument("--group", default="su3")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/hpcflow-bench")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    lat, g = Lattice(tuple(a.shape)), get_group(a.group)
    U = random_field(lat, g, CounterRNG(1))
    nbytes = U.numel() * U.element_size() * a.n

    t = time.perf_counter()
    w = SegmentWriter(os.path.join(a.dir, "ens"), 0, 0, lat, a.n, U.dtype, g.N, {"bench": 1})
    for s in range(a.n):
        w.append(U, {"step": s})
    w.commit()
    t_ens = time.perf_counter() - t

    raw = U.numpy().tobytes()
    t = time.perf_counter()
    with open(os.path.join(a.dir, "plain.bin"), "wb") as fh:
        fh.writelines(raw for _ in range(a.n))
        fh.flush()
        os.fsync(fh.fileno())
    t_plain = time.perf_counter() - t

    ck = os.path.join(a.dir, "c.ckpt")
    t = time.perf_counter()
    save_checkpoint(ck, {"U": U, "step": 1}, "fp")
    t_ck = time.perf_counter() - t
    t = time.perf_counter()
    load_checkpoint(ck, "fp")
    t_res = time.perf_counter() - t
    print(f"lattice {a.shape} {a.group}, {a.n} configs, {nbytes / 1e9:.3f} GB")
    print(f"ensemble write {nbytes / t_ens / 1e9:.3f} GB/s (incl. checksums), plain sequential "
          f"{nbytes / t_plain / 1e9:.3f} GB/s, ratio {t_plain / t_ens:.2f}")
    print(f"checkpoint write {t_ck * 1e3:.1f} ms, checkpoint load (resume) {t_res * 1e3:.1f} ms")
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
