#!/usr/bin/env bash
# One device call: GPU correctness tests and/or benchmarks; results under $OUT.
# Expects python/fastserve/_core.abi3.so (an abi3 build made on the dev machine), .whl/ with
# the wheels the GPU image lacks (msgspec, gguf, prometheus_client), and for the baselines
# .base/ (python/ and bench/ of the build before the change, its own _core.abi3.so inside).
#   bash bench/gpu_run.sh STAGE...   stages: tests quant-tests sampler-kernels kv-fp8 quant-bench quant-e2e qwen32b-awq
#                                    crash throughput penalties structured
set -uo pipefail
export PYTHONPATH=$PWD/python:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FASTSERVE_GIT_COMMIT=${FASTSERVE_GIT_COMMIT:-unknown} NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# The bench configs need the real tokenizers: the test assets, unpacked once.
tok=$(python3 -c "import tiny_models; print(tiny_models.SHARED_MODELS)")
for m in llama3-8b:llama3-tokenizer qwen3-0.6b:qwen3-tokenizer qwen2.5-32b:qwen3-tokenizer; do
  for d in bench/configs/${m%%:*}*/; do cp "$tok/${m#*:}"/* "$d"; done
done
[ -f "$OUT/device.json" ] || python3 bench/device_info.py > "$OUT/device.json"
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name().lower(); print(next((g for g in ('h100', 'h200', 'a100', 'l40s') if g in n), 'gpu'))")
tp="python3 bench/throughput.py --info $OUT/device.json --quiet"
L8=bench/configs/llama3-8b
run() { echo "== $*"; "$@" 2>&1 | tail -n ${TAIL:-12}; }
for stage in "$@"; do
  case $stage in
  tests)
    TAIL=25 run timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_engine.py tests/test_kernels.py \
      tests/test_staging.py tests/test_sampler.py tests/test_step_limits.py tests/test_models.py \
      tests/test_models_opt_neox.py tests/test_tensor_parallel_world_size_one.py --tb=line ;;
  quant-tests)
    TAIL=20 run timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=line tests/test_quant_kernels.py ;;
  sampler-kernels)
    TAIL=8 run timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_sampler.py \
      tests/test_kernels.py -k "penalt or sampler or bitmask" ;;
  kv-fp8)
    # kv_cache_dtype fp8: the kernels at real sizes, then decode at 16k context against bf16.
    TAIL=6 run timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_kernels.py -k fp8_kv
    TAIL=6 run timeout 420 python3 bench/kv_cache_decode.py --model $L8 --context 16000 --batch 16 \
      --info "$OUT/device.json" --out "$OUT/kv-cache-decode-llama3-8b-$gpu.json" ;;
  quant-bench)
    TAIL=90 run timeout 330 python3 bench/quant_kernels.py --out "$OUT/quant-kernels-$gpu.json" ${QUANT_BENCH_ARGS:-} ;;
  quant-e2e)
    # Llama-3-8B shape, random weights in each format's real layout, against bf16 in the same
    # lease: batch-1 decode (128 in / 256 out) and offline 1000 x 512/256.
    for q in ${QUANT_E2E_FORMATS:-none awq fp8}; do
      qa=(); [ "$q" = none ] || qa=(--quantization "$q")
      run timeout 150 $tp --model $L8 --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 \
        --backends fastserve "${qa[@]}" --out "$OUT/quant-e2e-batch1-$q-$gpu.json"
    done
    for q in ${QUANT_E2E_OFFLINE:-none fp8}; do
      qa=(); [ "$q" = none ] || qa=(--quantization "$q")
      run timeout 200 $tp --model $L8 --num-prompts 1000 --input-len 512 --output-len 256 --backends fastserve \
        "${qa[@]}" --out "$OUT/quant-e2e-1000x512x256-$q-$gpu.json"
    done ;;
  qwen32b-awq)
    # Qwen2.5-32B-Instruct-AWQ's own config (its quantization_config included), random weights
    # in the AWQ GEMM layout, fp16 as the checkpoint: it must load on one GPU; 256 x 512/256.
    run timeout 400 $tp --model bench/configs/qwen2.5-32b-awq --dtype float16 --num-prompts 256 --input-len 512 \
      --output-len 256 --backends fastserve --out "$OUT/throughput-qwen2.5-32b-awq-256x512x256-$gpu.json" ;;
  crash)
    TAIL=12 run timeout 500 python3 bench/crash_matrix.py --model $L8 --info "$OUT/device.json" \
      --out "$OUT/crash-matrix-$gpu.json" --log "$OUT/crash-server.log" ;;
  throughput)
    # Today's build and the build before the change, same workload, same lease.
    run $tp --model $L8 --num-prompts 1000 --input-len 512 --output-len 256 --backends fastserve \
      --out "$OUT/throughput-llama3-8b-1000x512x256-$gpu.json"
    echo "== baseline build"
    PYTHONPATH=$PWD/.base/python:$PWD/tests:/tmp/site python3 .base/bench/throughput.py --info "$OUT/device.json" --quiet \
      --model $L8 --num-prompts 1000 --input-len 512 --output-len 256 --backends fastserve \
      --out "$OUT/throughput-llama3-8b-1000x512x256-base-$gpu.json" 2>&1 | tail -n 4 ;;
  penalties)
    # Plain and penalized 1000 x 512/256 in one engine, this build and the one before the change:
    # the plain figures compare the builds, the penalized ones give the cost of penalties.
    run timeout 280 python3 bench/penalties.py --model $L8 --label new --info "$OUT/device.json" \
      --out "$OUT/penalties-llama3-8b-$gpu.json"
    PYTHONPATH=$PWD/.base/python:$PWD/tests:/tmp/site TAIL=3 run timeout 280 python3 bench/penalties.py --model $L8 \
      --label base --info "$OUT/device.json" --out "$OUT/penalties-llama3-8b-base-$gpu.json" ;;
  structured)
    # xgrammar and jsonschema from wheels carried in .whl-structured/ (the box has no
    # internet; pip takes what is missing, torch/transformers/triton stay as installed).
    python3 -m pip install -q --no-index --find-links .whl-structured xgrammar jsonschema 2>&1 | tail -n 3
    TAIL=30 run timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_structured_outputs.py --tb=line
    TAIL=6 run timeout 300 python3 bench/structured_outputs.py --model $L8 --num-prompts 256 --input-len 256 \
      --output-len 256 --info "$OUT/device.json" --out "$OUT/structured-outputs-llama3-8b-$gpu.json" ;;
  *) echo "unknown stage $stage" ;;
  esac
done
