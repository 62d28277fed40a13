#!/usr/bin/env bash
# The GPU suite in one command: bench/sweeps/gpu.toml (PT-DiT/XL, PT-DiT/L, PixArt-XL/2 and
# DiT-XL/2 in bfloat16, 256-2048 px and 16-48 latent frames of video, forward and train step),
# about 5 minutes on one H100/H200, into results/gpu/<device-name>/: the results store
# (store.jsonl; rerun to resume an interrupted suite) and `ptdit report`'s tables and plots.
#
#   bench/gpu_suite.sh            # on the GPU
#   bench/gpu_suite.sh --dry-run  # the same grid on the CPU, tiny (depth 1, width 64, <= 256
#                                 # px, <= 4 frames, 1 repeat, 1 thread), into a temp folder
set -euo pipefail
cd "$(dirname "$0")/.."
ptdit=ptdit
if [[ -x .venv/bin/ptdit ]]; then
    ptdit=.venv/bin/ptdit
fi
case "${1:-}" in
    "") out="results/gpu/{device}"; flags=() ;;
    --dry-run) out="$(mktemp -d)/{device}"; flags=(--smoke --threads 1) ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
"$ptdit" sweep bench/sweeps/gpu.toml ${flags[@]+"${flags[@]}"} --out "$out/store.jsonl" \
    --report "$out"
