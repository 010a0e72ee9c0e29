#!/usr/bin/env bash
# Issue #26's GPU check: on a machine with CUDA, the tests marked `cuda` (calibrate on cuda and cuda:0 with
# bfloat16 weights, torch.cuda.max_memory_allocated against the planner, --low-memory on the GPU, the export loaded
# back on the GPU, Hessian sums widening on the device) and the real-size layer timing on the GPU, in under
# 8 minutes; JSON (and the logs) under $OUT (default benchmarks/results/device_check).
#
#   bash benchmarks/device_check.sh             # PYTHON=... picks the interpreter (default: python3)
#   bash benchmarks/device_check.sh --prepare   # here, with pip: the wheels the device image lacks, into .whl/
#
# A GPU machine that reaches no package registry but has torch (CUDA), transformers, safetensors, click, tqdm,
# scipy and pytest: run --prepare where pip works (it downloads compressed-tensors and its pydantic/loguru as
# wheels into .whl/, git-ignored through .git/info/exclude), copy the checkout with .whl/ over, and this script
# installs them into /tmp/site first. quantkit itself runs from the checkout (PYTHONPATH), not installed.
# Its figures have not been measured yet: no GPU was available where quantkit is developed.
# Without CUDA it runs what it can: the cuda tests skip with their reason and the timing is refused (exit 3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        compressed-tensors==0.20.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0 loguru==0.7.3
    ls -la .whl
    exit 0
fi
OUT=${OUT:-benchmarks/results/device_check}
mkdir -p "$OUT"
started=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/wheels.log" 2>&1 || { echo "wheels did not install: $OUT/wheels.log"; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4

"$PY" - > "$OUT/machine.json" <<'EOF'
import json, torch, transformers
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "cuda": cuda,
                  "device": torch.cuda.get_device_name(0) if cuda else None,
                  "memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None}))
EOF
cat "$OUT/machine.json"

# the cuda tests: at most 4 minutes
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rA -s \
    --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

# the real-size layer timing on the GPU (bfloat16, 8 x 2048 tokens, one layer of each shape): what is left of 7.5 minutes
left=$((450 - ($(date +%s) - started)))
bench_rc=3
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    timeout "$left" "$PY" benchmarks/bench_real_size.py --device cuda --dtype bfloat16 --no-llmc --layers 1 \
        --shapes llama-8b,llama-1b --methods gptq,gptq_fp,tlq,rtn --nsamples 8 --seqlen 2048 \
        -o "$OUT/bench_real_size_cuda.json" > "$OUT/bench_real_size_cuda.log" 2>&1
    bench_rc=$?
fi

"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$started" > "$OUT/device_check.json" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = {"machine": json.loads((out / "machine.json").read_text()), "tests_rc": tests_rc, "bench_rc": bench_rc,
           "seconds": round(time.time() - started)}
if (out / "cuda_tests.xml").is_file():
    suite = ET.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = out / "bench_real_size_cuda.json"
if bench.is_file():
    runs = json.loads(bench.read_text())["runs"]
    summary["layer_seconds"] = {f"{r['shape']} {r['method']}": r.get("total_per_layer", r.get("error"))
                                for r in runs}
    summary["peak_cuda_mb"] = {f"{r['shape']} {r['method']}": r.get("peak_cuda_mb") for r in runs}
print(json.dumps(summary, indent=1))
EOF
cat "$OUT/device_check.json"
[ "$tests_rc" = 0 ] || exit "$tests_rc"
exit "$bench_rc"
