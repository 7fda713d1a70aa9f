#!/usr/bin/env bash
# The README demo on a fresh machine: installs what is missing, then runs the main job on a
# small default lattice (examples/demo.yaml: train a U(1) flow on 8x8 at beta 2, then sample
# it in an exact chain) and prints observables beside exact values.
# Extra arguments go to 'hpcflow run', e.g. scripts/demo.sh --set action.beta=3.0
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/bootstrap.sh
# small tensors: one thread per process is fastest here, and robust on a shared node
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# a second demo starts over: the earlier results move into runs/demo/previous-<time>/ (hpcflow
# never overwrites results silently); --resume or --fresh given here are passed on unchanged
fresh=()
case " $* " in *" --resume "*|*" --fresh "*) ;; *) [ -e runs/demo/history.jsonl ] || [ -e runs/demo/train ] && fresh=(--fresh) ;; esac
"${HPCFLOW_VENV:-$here/.venv}/bin/hpcflow" run examples/demo.yaml "${fresh[@]}" "$@"
