#!/usr/bin/env bash
# The mlx-lm comparison end to end on a toy checkpoint, so the script cannot rot (about 20 s).
# The same run is also a test: tests/test_bench.py::test_compare_mlx_lm_runs_on_a_tiny_checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python benchmarks/compare_mlx_lm.py --model tiny -p 16 -g 4 -n 2 --same-weights \
    --work "$work/converted" --json "$work/result.json"
python - "$work/result.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
for key, value in result["ratios"].items():
    assert value > 0, (key, value)
print("ok:", ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
PY
