#!/usr/bin/env bash
# Run HERE (the CPU machine, after ./scripts/setup.sh), from the repo root, before a GPU round: the GPU
# machine has no network, an older transformers and no trl/datasets/peft of our versions, and the
# embedded model is too large to travel. This writes two git-ignored folders to `carry`:
#   .whl/  wheels of the pinned Python packages the GPU image lacks (installed there into /tmp/site)
#   .gpu/  random-weight architectures: SmolLM2-135M's config + tokenizer, Llama-3.2-1B's shapes
# Then, with the device tool: run(command="bash benchmarks/gpu/round.sh", carry=[".whl", ".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
PKGS="transformers==5.24.0 tokenizers==0.23.3 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1
multiprocess==0.70.19 fsspec==2026.9.0 gguf==0.19.0 vaderSentiment==3.3.2"
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $PKGS
MODEL=${TIDPO_SMOLLM2_DIR:-$HOME/.cache/tidpo/models/SmolLM2-135M-Instruct.Q4_1}
if [ ! -f "$MODEL/config.json" ]; then
    echo "no converted SmolLM2 folder at $MODEL: run ./scripts/setup.sh first (or set TIDPO_SMOLLM2_DIR)" >&2
    exit 1
fi
rm -rf .gpu && mkdir -p .gpu/smollm2-arch .gpu/llama1b-arch
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
    cp "$MODEL/$f" .gpu/smollm2-arch/
done
cp .gpu/smollm2-arch/tokenizer* .gpu/smollm2-arch/chat_template.jinja .gpu/llama1b-arch/
cp benchmarks/arch/llama-3.2-1b-shapes/config.json .gpu/llama1b-arch/
du -sh .whl .gpu
