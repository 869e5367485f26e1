#!/usr/bin/env bash
# The GPU check: in one run on a GPU machine that has only the carried files,
#   1. lists the adapters (nvidia-smi, `metagrad devices` of each build),
#   2. checks that `metagrad hypergrad` on every GPU backend equals the CPU
#      result for maml, fomaml, ufo (q = 1), implicit, neumann, fixed-point,
#      and maml and implicit with head-only adaptation (f32 tolerance),
#   3. times `metagrad bench train` (maml, fomaml) on Omniglot 5-way 1-shot
#      (T = 32), 20-way 1-shot (T = 16) and Mini-ImageNet 5-way 1-shot (T = 4)
#      on wgpu (WGSL), wgpu with the SPIR-V compiler and CUDA where the GPU
#      build has them, and benches/pytorch_train.py on CUDA with the same
#      workloads, while nvidia-smi samples GPU utilisation,
#   4. writes every table and JSON to $OUT (summary.md first).
# Each step has its own time limit and the whole check a budget (default
# 520 s: on an H100 every step fits in about 510 s), so it always ends in
# time and keeps what it measured.
#
#   bash benches/gpu_check.sh              # on the GPU machine (benches/README.md has the device command)
#   bash benches/gpu_check.sh --dry-run    # anywhere with a wgpu adapter (lavapipe too): tiny meta-batches
#   GPU_CHECK_DRY_BACKEND=cpu bash benches/gpu_check.sh --dry-run   # the script's logic, on the CPU backend
# (on lavapipe, kernel compilation and autotuning take minutes per process:
# one full-width r = 2 MAML hypergradient did not finish in 450 s on 2 busy
# cores, so `cargo test` runs the dry run on the CPU backend).
#
# Binaries: $METAGRAD_BIN (default .gpu/metagrad: the default build, wgpu with
# WGSL) and $METAGRAD_GPU_BIN (default .gpu/metagrad-gpu: built with
# `--features vulkan,cuda`; skipped when absent). Either may be carried
# gzipped (.gpu/metagrad.gz): two stripped builds are above what travels.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
OUT=${OUT:-$root/gpu-check-out}
mkdir -p "$OUT"
BIN=${METAGRAD_BIN:-$root/.gpu/metagrad}
GPU_BIN=${METAGRAD_GPU_BIN:-$root/.gpu/metagrad-gpu}
budget=${GPU_CHECK_BUDGET_S:-520}
# A software adapter (lavapipe) compiles every kernel on the CPU, about a
# minute per process: the dry run checks one mode of each step, with room.
slow=1
# Autotuning (timing several kernel variants per shape) is what costs most there.
[ $dry -eq 1 ] && { budget=${GPU_CHECK_BUDGET_S:-1800}; slow=5; export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}; }
report="python3 $root/benches/gpu_report.py"
work=$(mktemp -d)
for b in BIN GPU_BIN; do
  if [ ! -x "${!b}" ] && [ -f "${!b}.gz" ]; then
    gunzip -c "${!b}.gz" >"$work/$(basename "${!b}")" && chmod +x "$work/$(basename "${!b}")"
    printf -v "$b" '%s' "$work/$(basename "${!b}")"
  fi
done
start=$(date +%s)
log=$OUT/log.txt
: >"$log"

say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$log"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
# run LIMIT CMD...: the command's output goes to the log; it is skipped (exit
# 125) when the budget has no LIMIT seconds left, and killed at LIMIT (124).
run() {
  local limit=$1; shift
  if [ "$(left)" -lt $((limit * slow)) ]; then say "skipped (budget): $*"; return 125; fi
  say "+ $*"
  timeout --kill-after=5 $((limit * slow)) "$@" >>"$log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || say "exit $rc: $*"
  return $rc
}

if [ ! -x "$BIN" ]; then
  echo "no metagrad binary at $BIN: build it (benches/README.md) or set METAGRAD_BIN" | tee -a "$log"
  exit 2
fi

# --- environment: Vulkan loader, NVIDIA's Vulkan driver, NVRTC for CUDA ---
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && ls "$root"/.gl/*.deb >/dev/null 2>&1; then
  say "unpacking the carried Vulkan loader (.gl)"
  for f in "$root"/.gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
# NVIDIA's Vulkan driver manifest: where the loader looks, else wherever the
# driver's files are mounted (the first that gives a hardware adapter wins).
if [ $dry -eq 0 ] && ! timeout 60 "$BIN" devices 2>/dev/null | grep -q 'wgpu  \[0\].*type: \(DiscreteGpu\|IntegratedGpu\)'; then
  for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json $(find /usr/local/nvidia /usr/share/vulkan /etc/vulkan /usr/lib/x86_64-linux-gnu -name 'nvidia_icd*.json' 2>/dev/null); do
    [ -f "$icd" ] || continue
    if VK_DRIVER_FILES=$icd timeout 60 "$BIN" devices 2>/dev/null | grep -q 'wgpu  \[0\].*type: \(DiscreteGpu\|IntegratedGpu\)'; then
      export VK_DRIVER_FILES=$icd; say "Vulkan driver: $icd"; break
    fi
  done
fi
nvrtc=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt -name 'libnvrtc.so*' 2>/dev/null | head -1)
[ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
have_smi=0; command -v nvidia-smi >/dev/null && have_smi=1
have_torch=0; python3 -c "import torch" 2>/dev/null && have_torch=1
torch_device=cpu
[ $have_torch -eq 1 ] && python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && torch_device=cuda

# --- 1. adapters ---
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  [ $have_smi -eq 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "nvrtc: ${nvrtc:-not found}"
  echo "--- $BIN devices"; timeout 60 "$BIN" devices 2>&1
  [ -x "$GPU_BIN" ] && { echo "--- $GPU_BIN devices"; timeout 60 "$GPU_BIN" devices 2>&1; }
} >"$OUT/devices.txt"
cat "$OUT/devices.txt" >>"$log"
gpu_name=$( [ $have_smi -eq 1 ] && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || grep -m1 'wgpu  \[0\]' "$OUT/devices.txt" )
say "GPU: ${gpu_name:-none}"

# The GPU runs: label, binary, backend. The SPIR-V and CUDA ones need the GPU build.
runners=("wgpu|$BIN|wgpu")
[ $dry -eq 1 ] && { b=${GPU_CHECK_DRY_BACKEND:-wgpu}; runners=("$b|$BIN|$b"); }
if [ -x "$GPU_BIN" ] && [ $dry -eq 0 ]; then
  runners+=("wgpu-spirv|$GPU_BIN|wgpu")
  grep -q '^cuda  \[0\]' "$OUT/devices.txt" && runners+=("cuda|$GPU_BIN|cuda")
fi

# --- 2. hypergradients on the GPU equal the CPU's (one mode first, the rest after the speed runs) ---
hg=$OUT/hypergrad.txt
: >"$hg"
run 60 "$BIN" init --dataset omniglot --way 5 --seed 1 --out "$work/params.safetensors"
queries=15; [ $dry -eq 1 ] && queries=1
run 60 "$BIN" export-episode --dataset synthetic --way 5 --shot 1 --queries $queries --seed 3 --out "$work/episode.safetensors"
failures=0
check_mode() {  # name, flags... (INNER_LR=α overrides the inner step size)
  local name=$1; shift
  local lr=${INNER_LR:-0.4}
  run 60 "$BIN" hypergrad --params "$work/params.safetensors" --episode "$work/episode.safetensors" "$@" \
    --inner-steps 2 --inner-lr "$lr" --backend cpu --out "$work/cpu-$name.safetensors"
  case $? in
    0) ;;
    125) echo "$name: skipped: the budget ran out (GPU_CHECK_BUDGET_S)" | tee -a "$hg" "$log"; return ;;
    *) echo "$name: the CPU reference did not run (see log.txt)" | tee -a "$hg" "$log"; failures=$((failures + 1)); return ;;
  esac
  local r label bin backend line
  for r in "${runners[@]}"; do
    IFS='|' read -r label bin backend <<<"$r"
    run 90 "$bin" hypergrad --params "$work/params.safetensors" --episode "$work/episode.safetensors" "$@" \
      --inner-steps 2 --inner-lr "$lr" --backend "$backend" --out "$work/$label-$name.safetensors"
    case $? in
      0) line=$($report compare "$work/cpu-$name.safetensors" "$work/$label-$name.safetensors" --rtol 1e-3) || failures=$((failures + 1)) ;;
      125) line="skipped: the budget ran out (GPU_CHECK_BUDGET_S)" ;;
      *) line="did not run (see log.txt)"; failures=$((failures + 1)) ;;
    esac
    echo "$label $name: $line" | tee -a "$hg" "$log"
  done
}
check_mode maml --mode maml

# --- 3. training speed, with GPU utilisation sampled beside it ---
smi_pid=""
if [ $have_smi -eq 1 ]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 100 >"$OUT/smi.csv" 2>/dev/null &
  smi_pid=$!
fi
if [ $dry -eq 1 ]; then
  workloads=(omniglot-5w1s); steps=1; batch_flags=(--meta-batch 2 --queries 1); bench_modes=maml
else
  workloads=(omniglot-5w1s omniglot-20w1s mini-imagenet-5w1s); steps=${GPU_CHECK_STEPS:-5}; batch_flags=(); bench_modes=maml,fomaml
fi
[ $have_torch -eq 1 ] || say "no PyTorch here (python3 -c 'import torch' failed): the ratio column stays empty"
# Workload by workload, PyTorch (the reference every ratio needs) first, so
# that whatever the budget cuts off is the least important.
for w in "${workloads[@]}"; do
  if [ $have_torch -eq 1 ]; then
    run 90 python3 "$root/benches/pytorch_train.py" --device $torch_device --threads "$(nproc)" --steps "$steps" \
      --modes $bench_modes --workloads "$w" "${batch_flags[@]}" --json "$work/torch-$w.json" \
      && $report add "$OUT" "pytorch-$torch_device" "$work/torch-$w.json" >>"$log"
  fi
  for r in "${runners[@]}"; do
    IFS='|' read -r label bin backend <<<"$r"
    run 120 "$bin" bench train --backend "$backend" --workloads "$w" --modes $bench_modes --steps "$steps" \
      --no-phase-split "${batch_flags[@]}" --json "$work/$label-$w.json" \
      && $report add "$OUT" "metagrad-$label" "$work/$label-$w.json" >>"$log"
  done
done
[ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null

# --- the other modes' hypergradients, then where the time goes in one case ---
if [ $dry -eq 0 ]; then
  check_mode fomaml --mode fomaml
  check_mode ufo-q1 --mode ufo --q 1
  check_mode maml-head --mode maml --inner-params head
  # The implicit family where I + H/λ is positive definite and the series
  # converges at this initialisation (the divergence guard stays silent; it is
  # tested on the CPU): λ = 50, α = 0.005, so fixed-point's η = αλ = 0.25.
  implicit_flags=(--lambda 50 --cg-steps 5 --neumann-steps 5)
  INNER_LR=0.005 check_mode implicit --mode implicit "${implicit_flags[@]}"
  INNER_LR=0.005 check_mode neumann --mode neumann --neumann-lr 0.3 "${implicit_flags[@]}"
  INNER_LR=0.005 check_mode fixed-point --mode fixed-point "${implicit_flags[@]}"
  INNER_LR=0.005 check_mode implicit-head --mode implicit --inner-params head "${implicit_flags[@]}"
  # The split waits for the device at every phase boundary: a profile, not a speed.
  run 90 "$BIN" bench train --backend wgpu --workloads omniglot-5w1s --modes maml --steps 2 \
    --json "$work/split.json" && $report add "$OUT" "metagrad-wgpu-phase-split" "$work/split.json" >>"$log"
fi

# --- 4. summary ---
if [ -f "$OUT/bench.json" ]; then
  $report summary "$OUT" >>"$log"
  { echo "GPU check on ${gpu_name:-no GPU}, $(date -u +%Y-%m-%d), $(( $(date +%s) - start )) s"; echo; cat "$OUT/hypergrad.txt"; echo; cat "$OUT/summary.md"; } >"$OUT/summary.tmp" && mv "$OUT/summary.tmp" "$OUT/summary.md"
  cat "$OUT/summary.md"
else
  say "no benchmark rows were written"
  failures=$((failures + 1))
fi
rm -rf "$work"
say "done: $failures failure(s)"
[ $failures -eq 0 ]
