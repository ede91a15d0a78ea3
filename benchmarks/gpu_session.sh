#!/usr/bin/env bash
# Everything owed on a GPU, in parts that each fit one 10-minute device call (prepared on the CPU; see
# benchmarks/RESULTS.md for where each figure goes). Run from the repository root, one part (or a few) per call:
#
#   bash benchmarks/gpu_session.sh tests             # the GPU tests
#   bash benchmarks/gpu_session.sh kernels           # bench_logprobs --stats, bench_linear, bench_qlearning
#   bash benchmarks/gpu_session.sh sweeps            # bench_logprobs --sweep, bench_linear --sweep (launch configs)
#   bash benchmarks/gpu_session.sh e2e               # e2e gpt2-small (lengths 128/64/256) and llama-1b
#   bash benchmarks/gpu_session.sh memory            # the largest batch of each peer, gpt2-small (length 256)
#   bash benchmarks/gpu_session.sh memory-llama      # the same for llama-1b
#   bash benchmarks/gpu_session.sh ab                # fdpg alone without the fused decode norms, then draw (against e2e's)
#
# A machine is handed back 30 s after a call, so each part first installs fdpg (with the CUDA extension, ~40 s)
# unless a warm machine already has it (`setup` does only that). Each part writes <part>.log (and JSON where the
# tool has it) under $OUT (default ./gpu-out). All commands of one invocation share one deadline, BUDGET seconds
# (default 570) from its start, so that the call ends inside the device's 600 s with what finished in its log; each
# command also has its own limit, so that a slow one leaves the others their turn.
#
# The GPU machine has no registry. Peers travel as wheels in .whl/ (git-ignored: pass carry [".whl", ".peers"]),
# fetched here with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets dill multiprocess
# and NAVER disco as source in .peers/disco (a copy of disco-src/disco; Python 3.12 has no `imp`: comment out its
# unused `import imp` in disco/utils/__init__.py). Both are picked up below when present.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export FDPG_CUDA_ARCHS=${FDPG_CUDA_ARCHS:-90}   # H100/H200: sm_90 only (the build takes ~20 s)
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fdpg-peers .whl/*.whl \
    && export PYTHONPATH=/tmp/fdpg-peers${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .peers ] && export PYTHONPATH=$PWD/.peers${PYTHONPATH:+:$PYTHONPATH}

DEADLINE=$((SECONDS + ${BUDGET:-570}))

run() {  # run <seconds> <log> <command...>: one command, its time limit (cut to the deadline), its output appended
  local limit=$1 log=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then echo "[skipped, the call's deadline is near: $*]" | tee -a "$log"; return 124; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "\$ $*  [limit $limit s]" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "[rc $rc, $((SECONDS - t0)) s]" | tee -a "$log"
  return $rc
}

part_setup() {  # install fdpg with the CUDA extension (without it where the build fails: the Triton kernels remain)
  local log=$OUT/setup.log
  { date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv;
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__)"; } >>"$log" 2>&1
  FDPG_BUILD_CUDA=1 run 240 "$log" $PY -m pip install -e . --no-deps --no-build-isolation \
    || FDPG_BUILD_CUDA=0 run 120 "$log" $PY -m pip install -e . --no-deps --no-build-isolation
  run 60 "$log" $PY -c "import fdpg._cuda as c; print('cuda extension:', c.available(), c.load_error() or '')"
  touch /tmp/fdpg-setup-done
}

ensure_setup() {  # a warm machine keeps the install (with or without the extension); a fresh one needs it
  [ -e /tmp/fdpg-setup-done ] && $PY -c "import fdpg.kernels" >/dev/null 2>&1 || part_setup
}

part_tests() {
  local log=$OUT/tests.log
  run 480 "$log" $PY -m pytest -q -m gpu -p no:cacheprovider -n 8 --timeout 200 -rfE
  tail -3 "$log"
}

part_kernels() {
  local log=$OUT/kernels.log
  run 150 "$log" $PY benchmarks/bench_logprobs.py --stats
  run 220 "$log" $PY benchmarks/bench_linear.py
  run 150 "$log" $PY benchmarks/bench_qlearning.py --json "$OUT/qlearning.json"
}

part_sweeps() {
  local log=$OUT/sweeps.log
  run 200 "$log" $PY benchmarks/bench_logprobs.py --sweep
  run 330 "$log" $PY benchmarks/bench_linear.py --sweep
}

part_e2e() {  # the most wanted first: a run cut by the deadline loses the last
  local log=$OUT/e2e.log
  for L in 128 64; do
    run 110 "$log" $PY benchmarks/e2e.py --config gpt2-small --length "$L" --steps 10 --json "$OUT/e2e-gpt2-$L.json" \
      ${E2E_PEERS:+--peers "$E2E_PEERS"}
  done
  run 150 "$log" $PY benchmarks/e2e.py --config llama-1b --steps 5 --json "$OUT/e2e-llama-1b.json"
  run 200 "$log" $PY benchmarks/e2e.py --config gpt2-small --length 256 --steps 10 --json "$OUT/e2e-gpt2-256.json" \
    ${E2E_PEERS:+--peers "$E2E_PEERS"}
}

part_memory() {  # each peer in its own command: a search cut short keeps the other's row
  local log=$OUT/memory.log
  run 250 "$log" $PY benchmarks/e2e.py --config gpt2-small --length 256 --max-batch --batch 64 --peers fdpg
  run 250 "$log" $PY benchmarks/e2e.py --config gpt2-small --length 256 --max-batch --batch 64 --peers straightforward
}

part_memory-llama() {
  local log=$OUT/memory-llama.log
  run 250 "$log" $PY benchmarks/e2e.py --config llama-1b --max-batch --peers fdpg
  run 250 "$log" $PY benchmarks/e2e.py --config llama-1b --max-batch --peers straightforward
}

part_ab() {  # decoding without the fused add+norm kernels (FDPG_FUSED_NORMS=off), then without the fused draw
  # (FDPG_FUSED_DRAW=off): compare with part e2e's fdpg rows
  local log=$OUT/ab.log
  FDPG_FUSED_NORMS=off run 150 "$log" $PY benchmarks/e2e.py --config gpt2-small --length 128 --steps 10 --peers fdpg
  FDPG_FUSED_NORMS=off run 150 "$log" $PY benchmarks/e2e.py --config llama-1b --steps 5 --peers fdpg
  FDPG_FUSED_DRAW=off run 150 "$log" $PY benchmarks/e2e.py --config gpt2-small --length 128 --steps 10 --peers fdpg
  FDPG_FUSED_DRAW=off run 150 "$log" $PY benchmarks/e2e.py --config llama-1b --steps 5 --peers fdpg
}

[ $# -gt 0 ] || { sed -n '2,18p' "$0"; exit 2; }
for p in "$@"; do
  case $p in
    setup) part_setup ;;
    tests|kernels|sweeps|e2e|memory|memory-llama|ab) ensure_setup; "part_$p" ;;
    *) echo "unknown part: $p (expected setup, tests, kernels, sweeps, e2e, memory, memory-llama, ab)"; exit 2 ;;
  esac
done
