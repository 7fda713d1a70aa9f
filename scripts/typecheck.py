"""The type-check tier: ``mypy hpcflow`` against a baseline that only shrinks.

Usage: python scripts/typecheck.py [--junitxml FILE] [--update]

Runs mypy (configuration: setup.cfg ``[mypy]``) and counts the errors per file. It fails
when a file has more errors than ``scripts/mypy_baseline.json`` allows (new errors: fix them,
never raise the baseline), and prints a hint when a file has fewer (lower its baseline with
``--update``, which only ever lowers counts). ``--junitxml`` writes one testcase, so the
closing line of scripts/test.sh counts this tier.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE = os.path.join(HERE, "mypy_baseline.json")
_ERROR = re.compile(r"^(?P<file>[^:\s]+\.py):\d+(?::\d+)?: error: ")


def run_mypy() -> tuple[Counter[str], str, int]:
    """``(errors per file, mypy's output, mypy's exit status)``."""
    cmd = [sys.executable, "-m", "mypy", "--no-color-output", "--no-error-summary", "hpcflow"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    counts: Counter[str] = Counter()
    for line in out.splitlines():
        m = _ERROR.match(line)
        if m:
            counts[m.group("file").replace(os.sep, "/")] += 1
    return counts, out, proc.returncode


def compare(counts: Counter[str], baseline: dict[str, int]) -> tuple[list[str], list[str]]:
    """``(failures, hints)``: files above their baseline, files below it."""
    worse, better = [], []
    for f in sorted(set(counts) | set(baseline)):
        n, b = counts.get(f, 0), int(baseline.get(f, 0))
        if n > b:
            worse.append(f"{f}: {n} mypy errors, baseline {b} (new errors: fix them)")
        elif n < b:
            better.append(f"{f}: {n} mypy errors, baseline {b}")
    return worse, better


def write_junit(path: str, failure: str | None, seconds: float) -> None:
    suite = ET.Element("testsuite", name="typecheck", tests="1", failures="1" if failure else "0",
                       errors="0", skipped="0", time=f"{seconds:.2f}")
    case = ET.SubElement(suite, "testcase", classname="scripts.typecheck", name="mypy_baseline",
                         time=f"{seconds:.2f}")
    if failure:
        ET.SubElement(case, "failure", message="mypy errors above the baseline").text = failure
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--junitxml", help="write a JUnit XML file with one testcase")
    ap.add_argument("--update", action="store_true",
                    help="lower the baseline to the current counts (never raises a count)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    counts, out, rc = run_mypy()
    failure = None
    if rc not in (0, 1) or (rc == 1 and not counts):
        failure = f"mypy did not run (exit status {rc}):\n{out}"
        print(failure, file=sys.stderr)
    else:
        with open(BASELINE) as fh:
            baseline = {k: int(v) for k, v in json.load(fh).items()}
        worse, better = compare(counts, baseline)
        total, base_total = sum(counts.values()), sum(baseline.values())
        if worse:
            new = [line for line in out.splitlines()
                   if (m := _ERROR.match(line)) and m.group("file") in {w.split(":")[0] for w in worse}]
            failure = "\n".join(worse + ["", *new])
            print(failure, file=sys.stderr)
        if better:
            if args.update and not worse:
                lowered = {f: min(int(baseline.get(f, 0)), counts.get(f, 0)) for f in baseline}
                lowered = {f: n for f, n in sorted(lowered.items()) if n > 0}
                with open(BASELINE, "w") as fh:
                    json.dump(lowered, fh, indent=2, sort_keys=True)
                    fh.write("\n")
                print(f"typecheck: baseline lowered to {sum(lowered.values())} errors")
            else:
                print("typecheck: fewer mypy errors than the baseline; lower it with "
                      "`python scripts/typecheck.py --update` (the baseline only shrinks):")
                for b in better:
                    print(f"  {b}")
        print(f"typecheck: {total} mypy errors (baseline {base_total})"
              + (": FAILED" if failure else ": ok"))
    if args.junitxml:
        write_junit(args.junitxml, failure, time.perf_counter() - t0)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
