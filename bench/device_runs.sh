#!/usr/bin/env bash
# Device runs, each sized for one 10-minute call on one H200. Run from the
# repository root: `bash bench/device_runs.sh switch` (issue 7) or `bash bench/device_runs.sh throughput` (issue 6).
# Writes JSON under $OUT (default ./device-out). The benchmark models are built on the GPU first (~90 s) unless
# /tmp/vlmux-bench already holds them (a machine kept warm between calls).
# Packages the device image lacks travel as wheels in .whl/ (gitignored; name .whl in the call's carry): the device
# README's `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION`, one version
# of each. `switch` wants fastsafetensors; `quant` bitsandbytes and torchao; `serve` and `stress` fastapi, starlette,
# uvicorn, pydantic, pydantic-core, annotated-types, typing-inspection, opentelemetry-api and openai with jiter,
# distro, sniffio, httpx2, httpcore2, truststore, idna, anyio, h11, typing-extensions (the versions pip list shows here).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MODELS=/tmp/vlmux-bench
# Once per machine: a second install would rewrite /tmp/site under a run still going in the background (load-start).
ls .whl/*.whl >/dev/null 2>&1 && [ ! -e /tmp/site/.installed ] &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    touch /tmp/site/.installed
shapes() {
    python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from shapes import build_shape
for s in ('2b', '7b'): build_shape(Path('$MODELS') / f'qwen2-vl-{s}', s)" 2>&1 | grep -v '^Writing' | tail -2
}
case "${1:-}" in
switch)  # issue 7: pinned spares on a GPU, the switch goals, the memory estimate, a cold-disk load
    timeout 100 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu.py -k "pinned or warm_spare" 2>&1 | tail -3
    shapes
    timeout 140 python3 bench/switch.py --methods vlmux,vlmux_pinned --rounds 6 --out "$OUT/switch.json" 2>&1 | tail -8
    timeout 100 python3 bench/load.py --methods stream,fastsafetensors --cold "$MODELS/qwen2-vl-7b" | tee "$OUT/load-cold.jsonl"
    timeout 130 python3 bench/memory.py --batches 64,256 --out "$OUT/memory.json" 2>&1 | tail -6
    ;;
throughput)  # issue 6: preparing processes against threads (most batches through them), GPU-only, HF's best
    timeout 560 python3 bench/throughput.py --rows hf_static_compile,vlmux_gpu,vlmux_cli:dynamic:p0,vlmux_cli:dynamic \
        --files 4096 --minutes 9 --out "$OUT/throughput-2b.json" 2>&1 | grep -v "Warning\|^W11" | tail -8
    ;;
parent)  # issue 15: GPU tests, then 20 switches by the new parent and by the code before it (OLD: its checkout)
    shapes
    timeout 150 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4
    timeout 150 python3 bench/switch.py --methods vlmux --rounds 10 --out "$OUT/switch-new.json" 2>&1 | tail -3
    PYTHONPATH="$OLD/src:/tmp/site" timeout 150 python3 "$OLD/bench/switch.py" --methods vlmux --rounds 10 \
        --out "$OUT/switch-old.json" 2>&1 | tail -3
    ;;
parent-throughput)  # issue 15: `vlmux caption` rows, the new parent and the code before it, then the GPU tests
    timeout 200 python3 bench/throughput.py --rows vlmux_cli --files 2048 --minutes 3 --out "$OUT/throughput-new.json" \
        2>&1 | grep -v "Warning\|^W11" | tail -4
    PYTHONPATH="$OLD/src:/tmp/site" timeout 200 python3 "$OLD/bench/throughput.py" --rows vlmux_cli --files 2048 \
        --minutes 3 --out "$OUT/throughput-old.json" 2>&1 | grep -v "Warning\|^W11" | tail -4
    timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -6
    ;;
switch-floor)  # issue 20: pool.switch + chat as a user writes it: defaults, prewarm, cold page cache, pinned, hot tier
    shapes
    timeout 420 python3 bench/switch.py --methods pool_switch,pool_switch_prewarm,vlmux_hot --rounds 10 \
        --baseline-rounds 3 --out "$OUT/switch-warm.json" 2>&1 | grep -v "^pool.switch\|^hot" | tail -9
    timeout 200 python3 bench/switch.py --methods pool_switch_prewarm --rounds 10 --cold --out "$OUT/switch-cold.json" \
        2>&1 | tail -3
    timeout 150 python3 bench/switch.py --methods pool_switch_pinned --rounds 10 --out "$OUT/switch-pinned.json" 2>&1 \
        | tail -4
    ;;
quant)  # issue 19: the 7B shape in bf16, bnb 4-bit, torchao int4 and fp8; images/s on the 2B workload, residue after unload
    shapes
    timeout 120 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_engine.py 2>&1 | tail -15  # engine's first check
    timeout 360 python3 bench/quant.py --methods none,4bit,torchao-int4,torchao-fp8 --images 256 --out "$OUT/quant.json" \
        2>&1 | grep -v "Warning\|^W1" | tail -8
    ;;
oom)  # issue 22: a batch that cannot fit (the 7B shape, 256 pictures of 2048x2048 read whole)
    shapes
    timeout 240 python3 bench/oom.py --out "$OUT/oom.json" 2>&1 | grep -v "Warning\|^W1" | tail -14
    ;;
stress)  # issue 22: a batch that cannot fit (OOM, pictures whole), then 200 load / unload cycles of two tiny models
    shapes
    timeout 280 python3 bench/oom.py --out "$OUT/oom.json" 2>&1 | grep -v "Warning\|^W1" | tail -14
    timeout 180 python3 bench/soak.py --tiny --device cuda --cold-workers --cycles 200 --minutes 2.5 --out "$OUT/soak-tiny.json" 2>&1 \
        | grep -v "^W1" | tail -14
    ;;
load)  # issue 22: the server with the 2B / 7B shapes under a budget for one, 2000 requests at 64 (cut at 6 minutes)
    shapes
    timeout $(( ${MINUTES%.*} * 60 + 120 )) python3 bench/serve_load.py --requests 2000 --concurrency 64 --minutes ${MINUTES:-5.5} \
        --out "$OUT/serve-load-2000.json" 2>&1 | grep -v "^Writing" | tail -4
    ;;
soak)  # issue 22: 200 load / unload cycles of the 2B and 7B shapes in one process, the pool's defaults (cut at 6 minutes)
    shapes
    timeout 420 python3 bench/soak.py --models "$MODELS" --cycles 200 --minutes ${MINUTES:-6} --out "$OUT/soak.json" 2>&1 \
        | grep -v "^W1" | tail -24
    ;;
soak-tiny)  # issue 22: 200 load / unload cycles of two tiny models on the GPU in one process, the pool's defaults
    timeout 420 python3 bench/soak.py --tiny --device cuda --cycles 200 --minutes ${MINUTES:-5.5} --out "$OUT/soak-tiny.json" \
        2>&1 | grep -v "^W1" | tail -24
    ;;
load-start)  # issue 22: the `load` run in the background (its own session: it outlives this call), for `wait`
    shapes
    mkdir -p /tmp/bg
    setsid nohup timeout $(( ${MINUTES%.*} * 60 + 240 )) python3 bench/serve_load.py --requests 2000 --concurrency 64 \
        --minutes ${MINUTES:-12} --out /tmp/bg/serve-load-2000.json >/tmp/bg/stdout 2>&1 </dev/null &
    echo "load-start: the load runs in the background, pid $!"
    ;;
soak-start)  # issue 22: 200 cycles of two tiny models on the GPU in the background, a cold worker per load, for `wait`
    mkdir -p /tmp/bg
    setsid nohup timeout 1200 python3 bench/soak.py --tiny --device cuda --cold-workers --cycles 200 --minutes 19 \
        --out /tmp/bg/soak-tiny-200.json >/tmp/bg/stdout 2>&1 </dev/null &
    echo "soak-start: the soak runs in the background, pid $!"
    ;;
wait)  # issue 22: wait up to WAIT seconds for the background run (load-start, soak-start), then bring back its files
    end=$(( SECONDS + ${WAIT:-570} ))
    while pgrep -f "bench/serve_load.py|bench/soak.py" >/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
    pgrep -f "bench/serve_load.py|bench/soak.py" >/dev/null && echo "wait: still running" || echo "wait: finished"
    cp /tmp/bg/* "$OUT"/ 2>/dev/null
    grep -v "^W1\|^Writing" /tmp/bg/stdout | tail -${SHOWN:-8}
    ;;
switch-pinned)  # issue 20: the GPU tests, then pool.switch + chat with the spare pinning the checkpoints, warm and cold
    shapes
    timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4
    timeout 120 python3 bench/switch.py --methods pool_switch_pinned --rounds 10 --out "$OUT/switch-pinned.json" 2>&1 \
        | tail -3
    timeout 190 python3 bench/switch.py --methods pool_switch_pinned --rounds 10 --cold --out "$OUT/switch-pinned-cold.json" \
        2>&1 | tail -3
    ;;
first-request)  # issue 15: the `vlmux caption` row interleaved, this tree (new) against checkouts OLD and BEFORE
    n=0
    for variant in ${ORDER:-new old before}; do
        n=$((n + 1))
        case $variant in new) root=$PWD ;; old) root=$OLD ;; before) root=$BEFORE ;; esac
        PYTHONPATH="$root/src:/tmp/site" timeout 170 python3 "$root/bench/throughput.py" --rows vlmux_cli --files 2048 \
            --minutes 2.6 --out "$OUT/throughput-$n-$variant.json" 2>&1 | grep -v "Warning\|^W11" | tail -1
    done
    ;;
serve)  # issue 18: vlmux serve with the 2B and 7B shapes under a budget for one, 500 mixed requests at 32 at once
    shapes
    timeout 330 python3 bench/serve_load.py --requests 500 --concurrency 32 --share 0.8 --max-tokens 8 --minutes ${MINUTES:-5} \
        --out "$OUT/serve_load.json" 2>&1 | grep -v "^Writing" | tail -4
    ;;
engine)  # issue 17: the engine's GPU test (CUDA graphs, float32 parity), then 2B rows side by side (builds the 2B itself)
    timeout 300 python3 -m pytest -m gpu -q -x -p no:cacheprovider --tb=short tests/test_engine.py 2>&1 | tail -12
    timeout 500 python3 bench/throughput.py --rows hf_script,hf_static_compile,vlmux_gpu:engine,vlmux_cli:engine \
        --files 8192 --minutes 8 --out "$OUT/throughput-engine.json" 2>&1 | grep -v "Warning\|^W1" | tail -8
    ;;
engine-profile)  # issue 17: one engine batch in parts against its floors (vision compiled, as the engine runs it)
    timeout 200 python3 bench/caption_profile.py --steps host,vision,vision_compiled,engine \
        --out "$OUT/caption-profile-engine.json" 2>&1 | grep -v "Warning\|^W1" | tail -4
    ;;
engine-more)  # issue 17: the detailed workload and the 7B command through the engine; refill on real captions
    timeout 120 python3 bench/refill.py --device cuda --images 2048 --batch 256 --out "$OUT/refill.json" 2>&1 | tail -2
    timeout 200 python3 bench/throughput.py --workload detailed --batch 64 --rows vlmux_gpu:engine,vlmux_cli:engine \
        --files 1024 --minutes 3 --out "$OUT/throughput-engine-detailed.json" 2>&1 | grep -v "Warning\|^W1" | tail -3
    timeout 200 python3 bench/throughput.py --shape 7b --batch 128 --rows vlmux_cli:engine --files 2048 --minutes 3 \
        --out "$OUT/throughput-engine-7b.json" 2>&1 | grep -v "Warning\|^W1" | tail -2
    ;;
*)
    echo "usage: bash bench/device_runs.sh switch|throughput|parent|parent-throughput|first-request|switch-floor|serve|quant|oom|stress|load|soak-tiny|load-start|soak-start|wait|soak|engine|engine-profile|engine-more" \
        "(OLD / BEFORE: checkouts to compare)" >&2
    exit 2
    ;;
esac
