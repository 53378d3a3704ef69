#!/usr/bin/env bash
# Run THERE (the lent GPU machine), from the repo root, after benchmarks/gpu/prepare.sh here:
#   run(command="bash benchmarks/gpu/round.sh", carry=[".whl", ".gpu"], timeout_s=600)
# At most 500 s of steps on one H200 (round 9's took 8 minutes with the install). Each step has its own
# time limit so a hang costs only that step; logs and JSON land in
# $OUT (8 files at most come back), to be copied to benchmarks/results/h200/<round>/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft, datasets; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, datasets.__version__)" || exit 1
S=.gpu/smollm2-arch
L=.gpu/llama1b-arch
B="--model smollm2 --lora-r 0 --device cuda --bf16 --seq-len 256 --warmup 2"
step() {  # step <seconds> <log name> <command...>
    local limit=$1 log=$2
    shift 2
    echo "=== $* (limit ${limit}s)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    echo "=== exit ${PIPESTATUS[0]}" | tee -a "$OUT/$log"
}
# 1. Target 2 at 64 pairs per optimizer step (1B shapes): the anchors of the 4 micro-batches in one loop
#    of 64 rows and, apart, 4 loops of 16; one step of ti_full profiled. perf_hints logs CUDA graphs that
#    torch.compile skipped. (Rounds 8-9 decoded the 64-row loop in float32: speed.py lacked autocast there.
#    Since session 14 speed.py prepares the models as train() does: tidpo's logits stay bf16, TRL's
#    come back as accelerate's float32 copies and its output layer runs outside autocast, as in its runs.)
TORCH_LOGS=perf_hints step 170 l1b_accum4.log python3 benchmarks/speed.py $B --arch-dir $L --batch-size 16 --grad-accum 4 --steps 3 --no-memory --configs dpo,ti_full,ti_full_apart --profile ti_full --json "$OUT/l1b_accum4.json"
# 2. The issue's table on SmolLM2 (full fine-tuning), 10 steps (target 1 sat at 1.27-1.29x in round 9's
#    6 steps, 1.46-1.48x in round 8's), then the 1B shapes at 16 pairs.
step 120 smol_b8.log python3 benchmarks/speed.py $B --arch-dir $S --batch-size 8 --steps 10 --configs dpo,trl_dpo,ti_separate,ti_fused,ti_fused_kl,ti_full --json "$OUT/smol_b8.json"
step 120 l1b_b16.log python3 benchmarks/speed.py $B --arch-dir $L --batch-size 16 --steps 5 --configs dpo,ti_fused,ti_fused_kl,ti_full --json "$OUT/l1b_b16.json"
# 3. The GPU-only tests.
step 90 cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
