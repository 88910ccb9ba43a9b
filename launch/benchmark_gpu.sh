#!/usr/bin/env bash
# Measures the audio ViT-B recipe on one accelerator and appends the rows to BENCHMARKS.md.
#
#   launch/benchmark_gpu.sh                      # every run below, in this order
#   launch/benchmark_gpu.sh encoder tokenizer    # only the runs named
#
# Runs: attention (forward + backward of each attention variant and cuDNN padding at the
# recipe's shapes, batch 128, printed only; about a minute), encoder, encoder_reuse (stored
# tokenizer codes), encoder_xla_window (XLA's form of the Swin decoder's window attention
# instead of the Pallas kernel a GPU takes by default), tokenizer, joint,
# encoder_bf16_residual and tokenizer_bf16_residual (with model.residual_stream_dtype=compute:
# bf16 between the ViT blocks), encoder_remat_dots and tokenizer_remat_dots (with
# model.remat=dots, which `bridle_jax.aot` found to free 16-21 GiB at batch 256, so that
# BATCHES=512 fits an H100), encoder_cublas and tokenizer_cublas (matmuls as cuBLAS calls,
# model.gpu_matmuls=cublas, which lets XLA fold bias adds into them),
# encoder_gelu_tanh and tokenizer_gelu_tanh (the same with model.gelu=tanh, whose GELU
# XLA folds into the fc1 matmul too), encoder_fast, tokenizer_fast and joint_fast (all of
# these at once: cuBLAS matmuls, tanh GELU, bf16 residual stream), encoder_merging and
# tokenizer_merging (with XLA's merging of matmuls that share an input, which the steps
# switch off on a GPU; it applies below about 40 samples per device, so time these against
# the plain runs at e.g. BATCHES=32); each a sweep over $BATCHES in the config's dtype, bf16;
# profile (a trace of 3 encoder and 3 tokenizer steps at the last batch size of $BATCHES,
# whose compiled steps a sweep before it leaves in the cache, and the device time per op,
# in $SCRATCH/profile/<phase>), input (the host pipeline on 10 s clips written to
# $SCRATCH/clips10) and precision (bf16 against float32 on the demo, in $SCRATCH). Each
# batch size of a ViT-B phase spends about two minutes compiling on an H100-class GPU:
# name a few runs per call where a call's time is short. Compiled programs are cached in
# $SCRATCH/jax_cache (unless JAX_COMPILATION_CACHE_DIR names another directory), and JAX
# keeps XLA's autotuning results there too, so a rerun starts faster and later runs of a
# call compile faster (on an H200 the encoder and tokenizer steps at batch 256 took 176
# and 129 s to compile and time, then the same steps with the bf16 stream 75 and 50 s;
# the joint phase's two steps took over 140 s). A run that fails is reported and the
# others still run; the exit status says whether any failed. Set BENCHMARKS_FILE to write
# elsewhere than ./BENCHMARKS.md, CONFIG to time another config than configs/audio.py
# (configs/audio.py:demo runs on a laptop), BATCHES to sweep other batch sizes than
# 128,256 (e.g. BATCHES=256 halves the compiling), PYTHON to use another interpreter than
# python3, and TIME_LIMIT to bound the whole script in seconds (for a job with a
# deadline): each run may take the time left, and a run that would start with less than
# MIN_RUN_S (default 90) left is skipped and named.
set -uo pipefail
PYTHON="${PYTHON:-python3}"
CONFIG="${CONFIG:-configs/audio.py}"
SCRATCH="${SCRATCH:-/tmp/bridle_benchmark}"
BENCHMARKS_FILE="${BENCHMARKS_FILE:-BENCHMARKS.md}"
BATCHES="${BATCHES:-128,256}"
TIME_LIMIT="${TIME_LIMIT:-}"
MIN_RUN_S="${MIN_RUN_S:-90}"
for name in TIME_LIMIT MIN_RUN_S; do
  if [[ -n "${!name}" && ! "${!name}" =~ ^[0-9]+$ ]]; then
    echo "$name must be a whole number of seconds, got '${!name}'" >&2
    exit 2
  fi
done
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$SCRATCH/jax_cache}"
# Each run owns the accelerator: let XLA take 92 % of its memory, not the default 75 %
# (on an 80 GB H100 that decides whether the joint phase fits at batch 256).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
RUNS=("$@")
if [[ ${#RUNS[@]} -eq 0 ]]; then
  RUNS=(attention encoder encoder_reuse encoder_xla_window tokenizer joint
        encoder_bf16_residual tokenizer_bf16_residual encoder_remat_dots tokenizer_remat_dots
        encoder_cublas tokenizer_cublas encoder_gelu_tanh tokenizer_gelu_tanh
        encoder_fast tokenizer_fast joint_fast encoder_merging tokenizer_merging profile input
        precision)
fi

seconds_left() { echo $((TIME_LIMIT - SECONDS)); }

# The interpreter, stopped when TIME_LIMIT runs out.
py() {
  if [[ -n "$TIME_LIMIT" ]]; then
    local left
    left=$(seconds_left)
    timeout "$((left > 0 ? left : 1))" "$PYTHON" "$@"
  else
    "$PYTHON" "$@"
  fi
}

bench() {
  py -m bridle_jax.benchmark --config="$CONFIG" --write \
    --benchmarks_file="$BENCHMARKS_FILE" "$@"
}

# sweep PHASE [FLAG...]: the phase at each of $BATCHES.
sweep() {
  local phase=$1
  shift
  bench --phase="$phase" --batch="$BATCHES" "$@"
}

# sweep_with XLA_FLAG PHASE [FLAG...]: the same with one more XLA flag.
sweep_with() {
  local xla_flag=$1
  shift
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$xla_flag" sweep "$@"
}

# Matmuls as cuBLAS calls, into which XLA folds bias adds and the tanh GELU.
CUBLAS=--config.model.gpu_matmuls=cublas

run() {
  local phase="${1%%_*}"
  case "$1" in
    encoder | tokenizer | joint) sweep "$1" ;;
    encoder_reuse) sweep encoder --config.encoder_phase.reuse_codes=True \
        --config.data.roll_mag_aug=False ;;
    encoder_xla_window) sweep encoder --config.model.decoder.attention_impl=xla ;;
    encoder_bf16_residual | tokenizer_bf16_residual)
      sweep "$phase" --config.model.residual_stream_dtype=compute ;;
    encoder_remat_dots | tokenizer_remat_dots) sweep "$phase" --config.model.remat=dots ;;
    encoder_cublas | tokenizer_cublas) sweep "$phase" "$CUBLAS" ;;
    encoder_gelu_tanh | tokenizer_gelu_tanh) sweep "$phase" "$CUBLAS" --config.model.gelu=tanh ;;
    encoder_fast | tokenizer_fast | joint_fast) sweep "$phase" "$CUBLAS" --config.model.gelu=tanh \
        --config.model.residual_stream_dtype=compute ;;
    encoder_merging | tokenizer_merging)
      sweep_with --xla_gpu_dot_merger_threshold_mb=32 "$phase" ;;
    attention) py -m bridle_jax.benchmark_attention --config="$CONFIG" --batch=128 ;;
    profile)
      for phase in encoder tokenizer; do
        py -m bridle_jax.profile_step --config="$CONFIG" --phase="$phase" \
          --batch="${BATCHES##*,}" \
          --out_dir="$SCRATCH/profile/$phase" || return 1
      done ;;
    input)
      py -m bridle_jax.data.demo --out_dir="$SCRATCH/clips10" --clips_per_class=20 \
          --clip_seconds=10 &&
        bench --input --batch=64,128 --steps=30 --config.data.demo_dir= \
          --config.data.manifest="$SCRATCH/clips10/train.json" \
          --config.data.label_csv="$SCRATCH/clips10/class_labels_indices.csv" ;;
    precision)
      rm -rf "$SCRATCH/precision"
      py -m bridle_jax.precision_check --config=configs/audio.py:demo \
        --workdir="$SCRATCH/precision" ;;
    *) echo "unknown run '$1'" >&2; return 2 ;;
  esac
}

# Fail in seconds, not after the first sweeps, when a dependency is missing.
modules="bridle_jax.benchmark, bridle_jax.benchmark_attention, bridle_jax.profile_step"
modules+=", bridle_jax.precision_check"
"$PYTHON" -c "import $modules, bridle_jax.data.demo" || {
  echo "bridle_jax does not import with $PYTHON: install its requirements" \
    "(pip install -e . or the packages named above)" >&2
  exit 2
}

failed=()
skipped=()
for name in "${RUNS[@]}"; do
  if [[ -n "$TIME_LIMIT" && $(seconds_left) -lt $MIN_RUN_S ]]; then
    echo "=== $name skipped: $(seconds_left) s of TIME_LIMIT left"
    skipped+=("$name")
    continue
  fi
  echo "=== $name"
  run "$name" || failed+=("$name")
done
if [[ ${#skipped[@]} -gt 0 ]]; then
  echo "skipped: ${skipped[*]}" >&2
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed: ${failed[*]}" >&2
fi
if [[ ${#failed[@]} -gt 0 || ${#skipped[@]} -gt 0 ]]; then
  exit 1
fi
