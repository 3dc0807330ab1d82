#!/usr/bin/env bash
# The benchmarks of one device-machine call, step by step, each under its own time limit (and all
# under $BUDGET seconds) so that a slow step cannot starve the rest. Results land in
# $OUT/results.tar.gz, rewritten after every step: a call cut short keeps what it measured.
#
#   KIT=.gpukit/b1 SRC=.gpukit/b1/src BASE=.gpukit/b1/base bash .gpukit/b1/src/benchmarks/device_suite.sh STEP...
#
# KIT holds mamba-kernels-sm90.tar.xz (unpacked to /tmp/site unless already there), wheels in
# wh/, and optionally ray-slim.tar.xz and pipeline-site.tar.xz (build_pipeline_kit.sh); SRC is the checkout under test, BASE a reference checkout.
set -uo pipefail
KIT=$(realpath "${KIT:-.gpukit}")
SRC=$(realpath "${SRC:-.}")
BASE=${BASE:+$(realpath "$BASE")}
RES=/tmp/results
DEADLINE=$(( $(date +%s) + ${BUDGET:-540} ))
mkdir -p "$RES" /tmp/site
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -f "$KIT/mamba-kernels-sm90.tar.xz" ] && [ ! -d /tmp/site/mamba_ssm ] && tar xJf "$KIT/mamba-kernels-sm90.tar.xz" -C /tmp/site
[ -f "$KIT/ray-slim.tar.xz" ] && tar xJf "$KIT/ray-slim.tar.xz" -C /tmp/site
[ -f "$KIT/pipeline-site.tar.xz" ] && tar xJf "$KIT/pipeline-site.tar.xz" -C /tmp/site
ls "$KIT"/wh/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  --upgrade "$KIT"/wh/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=index,name,memory.total,power.limit --format=csv > "$RES/nvidia_smi.csv"
cat "$RES/nvidia_smi.csv"
if [ "${REQUIRE_KERNELS:-1}" = 1 ]; then
  PYTHONPATH=/tmp/site python3 -c "import mamba_ssm, causal_conv1d, selective_scan_cuda; print('kernels import')" \
    || { echo "mamba-ssm kernels missing: stopping"; exit 3; }
fi

save() { tar czf "$OUT/results.tar.gz" -C "$RES" . ; }
run_step() {  # run_step NAME SECONDS CHECKOUT LABEL COMMAND...
  local name=$1 limit=$2 checkout=$3 label=$4; shift 4
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  (( limit < 20 )) && { echo "=== $name skipped: no time left"; return; }
  echo "=== $name ($label, up to ${limit}s)"
  [ "$label" = branch ] && label=${CODE:-branch}
  (cd "$checkout" && NNMAMBA_CODE_LABEL=$label PYTHONPATH="$checkout:$checkout/benchmarks:/tmp/site" \
     timeout "$limit" "$@") > "$RES/$name.log" 2>&1
  echo "rc=$?" >> "$RES/$name.log"
  grep -vE '^\s*$|Warning|warn' "$RES/$name.log" | tail -n 12
  save
}
S=$SRC/benchmarks
for step in "$@"; do
  case $step in
    gpu_tests) run_step gpu_tests 150 "$SRC" branch python3 -m pytest tests/test_ssm.py tests/test_inference.py \
        tests/test_upsampling.py tests/test_models.py tests/test_models_cls.py tests/test_losses.py \
        tests/test_engine.py \
        -q -rA -p no:cacheprovider --junitxml="$RES/gpu_tests.xml" ;;
    triton_scan) run_step triton_tests 200 "$SRC" branch python3 -m pytest tests/test_selective_scan_triton.py \
        -q -rA -p no:cacheprovider --junitxml="$RES/triton_tests.xml"
      run_step triton_speed 150 "$SRC" branch python3 "$S/scan_speed.py" --out "$RES/scan_speed.json" --skip-cpu \
        --triton ;;
    scan_speed) for kernels in mamba-ssm triton; do   # the miccss step on each scan, baseline beside it
          run_step speed_$kernels 150 "$SRC" branch python3 "$S/model_speed.py" --out "$RES/model_speed_$kernels.json" \
            --shapes amos fetal adni --rows baseline miccss --configs bf16-cl-graph --scan-kernels $kernels
        done ;;
    loss_scan) for kernels in mamba-ssm triton; do   # needs torchio (the pipeline kit)
          run_step loss_$kernels 90 "$SRC" branch python3 "$S/loss_curve.py" --out "$RES/loss_curve_$kernels.json" \
            --device cuda --steps 60 --scan-kernels $kernels
        done ;;
    speed_brats) run_step speed_brats 120 "$SRC" branch python3 "$S/model_speed.py" --out "$RES/model_speed_brats.json" \
        --shapes brats --rows baseline mic miccss --configs bf16-cl-graph ;;   # pipeline_gpu.py's --speed
    pipeline) NNMAMBA_WORKSPACE=${NNMAMBA_WORKSPACE:-/tmp/ws} run_step pipeline_${PIPELINE_OUT:-pipeline} 580 "$SRC" \
        branch python3 "$S/pipeline_gpu.py" --profile gpu-smoke --out "$OUT/${PIPELINE_OUT:-pipeline}" \
        ${STAGES:+--stages $STAGES} ${PIPELINE_ARGS:-} ;;   # outputs outside the checkout, results in $OUT as they come
    loader_tests) run_step loader_tests 200 "$SRC" branch python3 -m pytest tests/test_sampling.py \
        tests/test_array_patches.py tests/test_engine.py -q -rA -p no:cacheprovider --junitxml="$RES/loader_tests.xml" ;;
    scan_ncu) run_step scan_ncu 200 "$SRC" branch ncu --kernel-name "regex:selective_scan_${NCU_PASS:-}" \
        --launch-skip "${NCU_SKIP:-0}" --launch-count "${NCU_COUNT:-12}" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis python3 "$S/model_speed.py" --out "$RES/ncu_speed.json" --shapes amos \
        --rows miccss --configs bf16-cl --steps 1 --repeats 1 ;;
    speed) run_step speed 170 "$SRC" branch python3 "$S/model_speed.py" --out "$RES/model_speed.json" \
        --shapes amos --configs bf16-cl-graph bf16-cl --check-graph ;;
    backbones) run_step backbones 420 "$SRC" branch python3 "$S/model_speed.py" --out "$RES/backbone_speed.json" \
        --configs bf16-cl --steps 5 --repeats 3 ${TASKS:+--tasks $TASKS} ${SHAPES:+--shapes $SHAPES} ;;  # every variant and competitor
    speed_more) run_step speed_more 120 "$SRC" branch python3 "$S/model_speed.py" --out "$RES/model_speed_more.json" \
        --shapes brats adni --configs bf16-cl-graph ;;
    profile) run_step profile 90 "$SRC" branch python3 "$S/model_speed.py" --out "$RES/profile_speed.json" \
        --shapes amos --rows miccss --configs bf16-cl --steps 3 --repeats 1 --profile "$RES" ;;
    host) for mode in none pageable pinned; do
            run_step host_$mode 70 "$SRC" branch python3 "$S/model_speed.py" --out "$RES/model_speed_host_$mode.json" \
              --shapes amos --rows miccss --configs bf16-cl-graph --repeats 2 --host-batches $mode
          done ;;
    speed_main) run_step speed_main 80 "$BASE" main python3 "$BASE/benchmarks/model_speed.py" \
        --out "$RES/model_speed_main.json" --shapes amos --variants baseline miccss ;;   # BASE: before --rows
    inference) run_step inference 60 "$SRC" branch python3 "$S/inference_speed.py" --out "$RES/inference.json" \
        --variants miccss --sw-batch-sizes 2 4 ;;
    scan) run_step scan 60 "$SRC" branch python3 "$S/scan_speed.py" --out "$RES/scan.json" --skip-cpu ;;
    scan_cpu) run_step scan_cpu 90 "$SRC" branch python3 "$S/scan_speed.py" --out "$RES/scan_cpu.json" --skip-gpu ;;
    ddp) for n in 1 2 4; do
           (( n > $(nvidia-smi -L | wc -l) )) && continue
           run_step ddp_$n 80 "$SRC" branch python3 -m torch.distributed.run --standalone --nproc_per_node=$n \
             "$S/ddp_scaling.py" --out "$RES/ddp_scaling.json"
         done ;;
    loader) run_step loader 200 "$SRC" branch python3 "$S/loader_speed.py" --out "$RES/loader_speed.json" \
        --workers 16 8 --transport-only --gpu-step-ms "${GPU_STEP_MS:-36.3}" ;;
    loader_fp32) run_step loader_fp32 150 "$SRC" branch python3 "$S/loader_speed.py" \
        --out "$RES/loader_speed_float32.json" --image-dtype float32 --workers 16 --transport-only \
        --gpu-step-ms "${GPU_STEP_MS:-36.3}" ;;
    loader_breakdown) run_step loader_breakdown 150 "$SRC" branch python3 "$S/loader_breakdown.py" \
        --out "$RES/loader_breakdown.json" --parallel "$(nproc)" ;;
    ray) run_step ray 560 "$SRC" branch python3 "$S/ray_train_scaling.py" --out "$RES/ray_train_scaling.json" \
        --gpus 1 2 4 --deadline-s $(( DEADLINE - $(date +%s) - 120 )) ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done"
