#!/usr/bin/env bash
# One device call: GPU correctness tests, then the throughput benchmarks; results under $OUT.
# Expects python/fastserve/_core.abi3.so (built here as an abi3 wheel) and .devcarry/ with the
# tokenizers carried along. Usage: bash bench/gpu_run.sh [tests|bench|llama|all|structured]
# (llama: the tests and the two Llama-3-8B benchmarks)
set -uo pipefail
what=${1:-all}
export PYTHONPATH=$PWD/python:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FASTSERVE_GIT_COMMIT=${FASTSERVE_GIT_COMMIT:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
export FASTSERVE_SHARED_MODELS=$PWD/.devcarry
for m in llama3-8b:llama3-tokenizer qwen3-0.6b:qwen3-tokenizer; do
  cp .devcarry/${m#*:}/* bench/configs/${m%%:*}/
done
python3 bench/device_info.py > "$OUT/device.json"
# Result files are named for the GPU (h100, h200, ...) so one card's results never replace another's.
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name().lower(); print(next((g for g in ('h100', 'h200', 'a100', 'l40s') if g in n), 'gpu'))")
if [ "$what" = structured ]; then
  # Structured outputs: xgrammar and jsonschema from wheels carried in .whl-structured/ (the box
  # has no internet; pip takes what is missing, torch/transformers/triton stay as installed).
  python3 -m pip install -q --no-index --find-links .whl-structured xgrammar==0.2.8 jsonschema 2>&1 | tail -n 3
  timeout 500 python3 -m pytest -q -p no:cacheprovider tests/test_structured_outputs.py -s 2>&1 | tail -n 30
  python3 bench/structured_outputs.py --model bench/configs/llama3-8b --num-prompts 256 --input-len 256 \
      --output-len 256 --info "$OUT/device.json" --out "$OUT/structured-outputs-llama3-8b-$gpu.json" 2>&1 | tail -n 6
  exit 0
fi
if [ "$what" != bench ]; then
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py tests/test_staging.py \
      tests/test_sampler.py tests/test_step_outputs.py -s 2>&1 | tail -n 30
fi
if [ "$what" != tests ]; then
  tp="python3 bench/throughput.py --info $OUT/device.json --quiet"
  $tp --model bench/configs/llama3-8b --num-prompts 1 --input-len 128 --output-len 256 --backends fastserve \
      --max-num-seqs 256 --out "$OUT/throughput-llama3-8b-batch1-$gpu.json" 2>&1 | tail -n 3
  $tp --model bench/configs/llama3-8b --num-prompts 1000 --input-len 512 --output-len 256 --backends fastserve,hf \
      --hf-max-prompts 256 --out "$OUT/throughput-llama3-8b-1000x512x256-$gpu.json" 2>&1 | tail -n 3
  if [ "$what" != llama ]; then
    $tp --model bench/configs/qwen3-0.6b --num-prompts 256 --random-range 100 1024 --backends fastserve \
        --out "$OUT/throughput-qwen3-0.6b-random-$gpu.json" 2>&1 | tail -n 3
  fi
fi
