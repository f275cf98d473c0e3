#!/usr/bin/env bash
# GPU validation on one CUDA device: the CUDA test suite with the native kernels required, the
# SJLT kernel's GB/s against the device's copy bandwidth, and the op/compress/pipeline
# benchmarks. Run from the repository root on a machine with a GPU (after installing the
# package with its CUDA kernels and faiss-gpu, e.g. `pip install --no-build-isolation -e
# ".[gpu,test]"` where nvcc is present):
#
#     bash benchmarks/gpu.sh [LOG_DIR]        # logs and tables go to LOG_DIR (default gpu-logs/)
#
# Each step's output is kept in LOG_DIR/<step>.log and the script goes on after a failing step;
# it exits non-zero if any step failed. QUICK=1 runs the benchmarks in their --quick forms.
set -uo pipefail

cd "$(dirname "$0")/.."
LOG_DIR=${1:-gpu-logs}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python}
QUICK_FLAG=()
[[ "${QUICK:-0}" == 1 ]] && QUICK_FLAG=(--quick)
failed=()

step() {  # step NAME CMD...: run, tee to LOG_DIR/NAME.log, remember failures
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc, $((SECONDS - t0)) s"
    [[ $rc -eq 0 ]] || failed+=("$name")
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to torch; this script validates the GPU path" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    | tee "$LOG_DIR/device.log"
"$PY" -c 'import grass_index as gi, json; print(json.dumps(gi.native_status(), indent=1))' \
    | tee -a "$LOG_DIR/device.log"

# 1. the CUDA tests, failing (not falling back) if the native kernels did not load
step tests env GRASS_INDEX_REQUIRE_NATIVE=1 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests

# 2. SJLT CUDA kernel throughput (input GB/s) vs the device's copy bandwidth
#    (benchmarks/ops.py times the CPU kernel only)
step sjlt_cuda "$PY" - <<'EOF'
import torch
import grass_index as gi

def cuda_time(fn, repeats=20):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats

dev = "cuda"
big = torch.ones(256 * 2**20, dtype=torch.float32, device=dev)  # 1 GiB
dst = torch.empty_like(big)
bw = big.numel() * 4 / cuda_time(lambda: dst.copy_(big))
print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read side)")
print(f"sjlt kernel: {gi.native_status()['kernels']['sjlt']}")
print("| batch | d | k | zeros | s (rows) | ms | input GB/s | % of copy |")
print("|---|---|---|---|---|---|---|---|")
g = torch.Generator(device=dev).manual_seed(0)
for batch, d, k, zero, s in [(32, 2**20, 4096, 0.0, 1), (32, 2**20, 4096, 0.0, 4),
                             (256, 2**16, 4096, 0.0, 1), (32, 2**20, 4096, 0.9, 1),
                             (8, 2**24, 8192, 0.0, 1)]:
    x = torch.randn(batch, d, device=dev, generator=g)
    if zero:
        x = x * (torch.rand(batch, d, device=dev, generator=g) >= zero)
    idx = torch.randint(0, k, (s, d), device=dev, generator=g)
    sign = (torch.randint(0, 2, (s, d), device=dev, generator=g) * 2 - 1).to(torch.int8)
    if s == 1:
        idx, sign = idx[0], sign[0]
    t = cuda_time(lambda: gi.ops.sjlt(x, idx, sign, k))
    gbs = x.numel() * 4 / t / 1e9
    print(f"| {batch} | {d} | {k} | {zero:.0%} | {s} | {t * 1e3:.3f} | {gbs:.0f} | "
          f"{100 * gbs * 1e9 / bw:.0f}% |")
EOF

# 3. the benchmarks. ops.py times the CPU kernels (reference for step 2); compress.py runs on
#    the GPU (FactGraSS vs LoGra ratio on the GPT-2 and Llama-like layers); pipeline.py has no
#    device option yet, so its build numbers are the CPU path on this machine.
step ops "$PY" benchmarks/ops.py
step compress "$PY" benchmarks/compress.py --device cuda "${QUICK_FLAG[@]}"
step pipeline "$PY" benchmarks/pipeline.py "${QUICK_FLAG[@]}"

if ((${#failed[@]})); then
    echo "FAILED steps: ${failed[*]} (logs in $LOG_DIR/)" >&2
    exit 1
fi
echo "all steps passed; logs in $LOG_DIR/"
