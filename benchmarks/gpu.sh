#!/usr/bin/env bash
# Everything a GPU machine should check and measure, in one go (a lent GPU is short on time):
# the training, generation and trainer benchmarks on CUDA, the tokenizer benchmark, then the CUDA
# tests (about 8 min on an H200: 154 + 135 + 91 s of benchmarks, 90 s of tests, plus bench_tokenize,
# never run on a GPU yet: it compiles the DALL-E-size encoder twice). Outputs go to OUT_DIR
# (default benchmarks/results/gpu): env.txt, test_cuda.log, and per benchmark its .json and .log
# plus latest.md/latest.json.
#   bash benchmarks/gpu.sh [OUT_DIR]        (PYTHON=... picks the interpreter; default python3)
set -u
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/env.txt"
timeout "${BENCH_TIMEOUT:-450}" $py -m benchmarks.run --only bench_model,bench_generate,bench_trainer --out "$out" --timeout 300 \
    -- --device cuda --nominal-peak-tflops 989 --compile tiny,base --rounds 5
# the dVAE encoder: ours in fp32/fp16/bf16, compiled or not, vs the dall-e package's Encoder (needs
# `pip install --no-deps dall-e==0.1`), code agreement with fp32, GPU-hours for 1T tokens
timeout "${TOK_TIMEOUT:-300}" $py -m benchmarks.bench_tokenize --device cuda --out "$out" 2>&1 | tee "$out/bench_tokenize.log"
timeout "${TEST_TIMEOUT:-140}" $py -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
