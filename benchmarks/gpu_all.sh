#!/usr/bin/env bash
# Everything that needs a GPU, in one invocation (< 10 minutes, no network needed):
# build with CUDA, the whole test suite (the engine's CUDA tests and the no-sync, CUDA-graph
# and torch.compile training checks among them), compute-sanitizer memcheck and racecheck
# over the engine tests, and both benchmarks.
#   bash benchmarks/gpu_all.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
status=0
step() {  # step NAME CMD...: runs CMD, logs to $out/NAME.txt, remembers failures
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"
  tail -n 3 "$out/$name.txt"
  [ $rc -eq 0 ] || status=1
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

# The GPU image lacks a few test dependencies (polars, duckdb, ruptures as of 2026-11): carry
# their wheels in .whl/ (see the device tool's notes) and they are put on the path here.
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step build env TORCHVITALS_CUDA=ON python -m pip install --no-build-isolation --no-deps -v .
step tests python -m pytest -q -p no:cacheprovider tests
kernel_tests="tests/engine"
# The binning tests launch tens of thousands of one-element tensors: too slow under the sanitizer.
sanitize="not cpu and not 2_pow_31 and not 2000 and not every_exponent and not every_bit_pattern"
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -p no:cacheprovider $kernel_tests -k "$sanitize"
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python -m pytest -q -p no:cacheprovider $kernel_tests -k "$sanitize"
step kernels python benchmarks/bench_kernels.py --device cuda
step overhead python benchmarks/bench_overhead.py --device cuda
cp benchmarks/results/*.json "$out/" 2>/dev/null
exit $status
