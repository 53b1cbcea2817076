#!/usr/bin/env bash
# The GPU checks, one script, one log:  bash experiments/gpu_check.sh [--dry_run] [LOG]
#
# On one H100/H200 (under 8 minutes): the GPU tests (cuDNN attention = XLA attention, bf16 step close
# to float32), bench_nanogpt.py --shape=gpu (GPT-2 124M, side by side with nanoGPT), the chunked-loss
# memory benchmark at V = 262,144, the time-to-loss benchmark with nanoGPT on the GPU, and the sampler
# against transformers' generate (bench_sampling.py --shape=gpu).
# --dry_run runs the same steps on CPU at a tiny size (tests/test_gpu_check.py runs it in the suite);
# steps that need PyTorch and a nanoGPT checkout (NANOGPT=DIR, default /tmp/nanogpt) say so and are
# skipped where those are missing.
#
# On the lent GPU machine, python3 has jax, flax, optax, orbax and torch; grain and ml_collections
# travel as wheels in .whl/ (see docs/benchmarks.md, "GPU check"), and nanoGPT in .nanogpt/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
if [ "${1:-}" = "--dry_run" ]; then DRY=1; shift; fi
LOG="${1:-gpu_check.log}"
NANOGPT="${NANOGPT:-/tmp/nanogpt}"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$LOG"
status=0
step() {  # step NAME CMD...: run, log, and remember a failure (the other steps still run)
  local name="$1"; shift
  echo "=== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
}
have_nanogpt() { [ -f "$NANOGPT/train.py" ] && "$PY" -c "import torch" 2>/dev/null; }
have_transformers() { "$PY" -c "import torch, transformers" 2>/dev/null; }
skip() { echo "=== $1: skipped ($2)" | tee -a "$LOG"; }

echo "gpu_check $( [ $DRY = 1 ] && echo '--dry_run ' )on $(hostname), $(date -u +%Y-%m-%dT%H:%MZ), python $PY" | tee -a "$LOG"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
step gpu_tests "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
if [ $DRY = 1 ]; then
  step chunked_loss_memory "$PY" experiments/bench_loss.py --vocab=4096 --tokens=512 --dim=64 --chunks=32,8 \
    --time_vocab=1024 --time_tokens=256 --time_dim=64 --repeats=2
  skip bench_nanogpt "a GPU shape; the dry run has no GPU"
  step time_to_loss "$PY" experiments/bench_time_to_loss.py --workdir=/tmp/gpu_check_dry_ttl --rows=char_fast \
    --target_loss=4.0 --seeds=1 --max_chars=60000 --cpu_devices=0 --lmo=train.steps=20 --lmo=eval.every_steps=10 \
    --lmo=checkpoint.every_steps=10 --lmo=optimizer.warmup_steps=2 --lmo=train.batch_size=8
  if have_transformers; then
    step bench_sampling "$PY" experiments/bench_sampling.py --rounds=1 --batches=1,2 --new_tokens=8
  else
    skip bench_sampling "no torch or transformers (pip install -e '.[bench]')"
  fi
else
  step chunked_loss_memory "$PY" experiments/bench_loss.py --vocab=262144 --tokens=16384 --dim=768 --time_vocab=131072 \
    --time_tokens=8192 --time_dim=768
  if have_nanogpt; then
    step bench_nanogpt "$PY" experiments/bench_nanogpt.py --shape=gpu --nanogpt_path="$NANOGPT" --rounds=3 --steps=10
    step time_to_loss "$PY" experiments/bench_time_to_loss.py --workdir=/tmp/gpu_check_ttl --nanogpt_path="$NANOGPT" \
      --nanogpt_device=cuda --cpu_devices=0 --seeds=1
  else
    skip bench_nanogpt "no nanoGPT train.py under NANOGPT=$NANOGPT or no torch"
    skip time_to_loss "no nanoGPT train.py under NANOGPT=$NANOGPT or no torch"
  fi
  if have_transformers; then
    step bench_sampling "$PY" experiments/bench_sampling.py --shape=gpu --rounds=3 --batches=1,32,128
  else
    skip bench_sampling "no torch or transformers (pip install -e '.[bench]')"
  fi
fi
echo "gpu_check: $( [ $status = 0 ] && echo 'all steps passed' || echo 'a step FAILED' ) (log: $LOG)" | tee -a "$LOG"
exit $status
