#!/usr/bin/env bash
# The GPU check of issue 7, as one script: the CUDA runs that failed (1b and 7b random Llamas, fedmomentum and fedit,
# bf16 base, 3 rounds × 4 clients × 8 local steps), the aggregation benchmark (per-layer vs batched) and the training
# throughput benchmark, then the CUDA-only tests. Every stage writes its output to $OUT (or runs/gpu-check) as soon as
# it ends, so a run cut short still returns what it finished; `summary.txt` collects the headline numbers.
#
# On the CPU machine, once (fills .device/ with the wheels and tokenizer the GPU machine lacks, plus pytest):
#     bash benchmarks/gpu_check.sh --prepare
# On the GPU machine (the device tool: carry [".device"], timeout 600, one command at most 10 minutes), in the
# repository root, two calls back to back (the machine is given back after a short idle time):
#     bash benchmarks/gpu_check.sh env aggregation run-1b throughput-1b tests     # about 4-5 minutes
#     bash benchmarks/gpu_check.sh run-7b throughput-7b                           # about 6-7 minutes
# With no stage named, every stage runs in this order: env aggregation run-1b throughput-1b tests run-7b throughput-7b
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${FEDMOMENTUM_GPU_KIT:-/work/shared/gpu}  # the shared GPU kit: prepare.sh, setup.sh, make_model.py

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  # the kit's prepare.sh writes .device/ at the top of a plain git checkout (it edits .git/info/exclude, which a
  # worktree does not have): run it in a scratch repository with this checkout's Python, then move .device/ here
  scratch=$(mktemp -d)
  git -C "$scratch" init -q
  (cd "$scratch" && PATH="$OLDPWD/.venv/bin:$PATH" bash "$KIT/prepare.sh") || { rm -rf "$scratch"; exit 1; }
  rm -rf .device && mv "$scratch/.device" .device && rm -rf "$scratch"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d .device/whl \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==25.0
  du -sh .device
  exit 0
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(env aggregation run-1b throughput-1b tests run-7b throughput-7b)
[[ -f .device/setup.sh ]] || { echo "no .device/: run 'bash benchmarks/gpu_check.sh --prepare' here first" >&2; exit 2; }
# shellcheck disable=SC1091
source .device/setup.sh > "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 2; }
export FEDMOMENTUM_TOKENIZER=$PWD/.device/tok OUT SUMMARY="$OUT/summary.txt"
note() { echo "$*" | tee -a "$SUMMARY"; }

# one stage: its name, a time limit in seconds, and the command (a function of this script or a program); its
# output goes to $OUT/<name>.txt
stage() {
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" bash -c '"$@"' stage "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  note "[$name] exit $rc after $((SECONDS - started)) s"
  return $rc
}

# the issue's command on a random Llama of a shape: method, model folder; keeps the records, drops the weights
cli_run() {
  local method=$1 model=$2 run=/tmp/gpu-check-run
  rm -rf "$run"
  fedmomentum run --model "$model" --device cuda --set dtype=bfloat16 --method "$method" --rounds 3 --clients 4 \
    --clients-per-round 4 --local-steps 8 --out "$run" || return $?
  local tag
  tag=$(basename "$model")-$method
  cp "$run/metrics.jsonl" "$OUT/$tag-metrics.jsonl"
  cp "$run/summary.json" "$OUT/$tag-summary.json"
  du -sh "$run"/* 2>/dev/null | tee "$OUT/$tag-files.txt"
  python3 - "$run/metrics.jsonl" <<'PY' | tee -a "$SUMMARY"
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
ok = all(math.isfinite(r["eval_loss"]) for r in rows) and all(math.isfinite(r["train_loss"]) for r in rows[1:])
print(f"  {'finite' if ok else 'NOT FINITE'}: eval_loss " + " ".join(f"{r['eval_loss']:.4f}" for r in rows)
      + " | round_seconds " + " ".join(f"{r['round_seconds']:.1f}" for r in rows[1:])
      + " | aggregation_seconds " + " ".join(f"{r['aggregation_seconds']:.3f}" for r in rows[1:]))
PY
  rm -rf "$run"
}

make_model() {  # shape, folder (a bf16 random Llama saved with the SmolLM2 tokenizer)
  [[ -f "$2/config.json" ]] || python3 .device/make_model.py "$2" "$1"
}
throughput() {  # shape, seconds: client-training tokens/s, peak memory and the round split in bf16
  stage "throughput-$1" "$2" python3 benchmarks/train_throughput.py --shape "$1" --device cuda --dtype bfloat16 \
    --rounds 2 --local-steps 8 --tokenizer .device/tok --json "$OUT/throughput-$1.json"
  tail -4 "$OUT/throughput-$1.txt" | sed 's/^/  /' | tee -a "$SUMMARY"
}
export -f note cli_run make_model fedmomentum

for s in "${STAGES[@]}"; do
  case $s in
    env)
      stage env-gpu 60 bash -c "nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'"
      note "$(head -1 "$OUT/env.txt")" ;;
    aggregation)
      stage aggregation 180 python3 benchmarks/aggregation.py --device cuda --dense-layers 1 --repeats 5
      grep -E "batched|per layer|speed-up|max allocated" "$OUT/aggregation.txt" | sed 's/^/  /' | tee -a "$SUMMARY" ;;
    run-1b)
      stage make-1b 180 make_model 1b /tmp/m1b
      stage run-1b-fedmomentum 240 cli_run fedmomentum /tmp/m1b
      stage run-1b-fedit 240 cli_run fedit /tmp/m1b ;;
    throughput-1b) throughput 1b 240 ;;
    run-7b)
      rm -rf /tmp/m1b
      stage make-7b 300 make_model 7b /tmp/m7b
      stage run-7b-fedmomentum 420 cli_run fedmomentum /tmp/m7b
      stage run-7b-fedit 420 cli_run fedit /tmp/m7b ;;
    throughput-7b) throughput 7b 300 ;;
    tests)
      stage tests 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
      tail -2 "$OUT/tests.txt" | sed 's/^/  /' | tee -a "$SUMMARY" ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
