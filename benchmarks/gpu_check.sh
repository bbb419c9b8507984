#!/usr/bin/env bash
# The whole GPU check in one command, for a bare lent H100/H200 (its own python3, torch,
# triton; no internet), run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # OUT=folder for the results (default gpu_check_out/)
#     GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # no GPU: checks every stage's command line
#
# Stages: install, gpu_tests, bench_loss, bench_train, train_bf16. Each runs under its own
# `timeout` and writes its full output to $OUT/<stage>.log; $OUT/summary.md gets one row
# per stage (status, exit code, seconds, timed out), the card and the key result lines,
# rewritten after every stage so that even a run killed from outside leaves one. At most 8
# files land in $OUT, because the device tool brings back no more. Exits 0 once the
# summary is written, whatever the stages did: the summary is the result.
#
# Knobs: GPU_CHECK_PYTHON (default python3), GPU_CHECK_TOTAL_S (whole-run budget, default
# 450 s; each stage may overrun its budget by 15 s), GPU_CHECK_BUDGET_<stage> (one stage's budget), GPU_CHECK_COMPILE_BUDGET_S
# (torch.compile warm-up cap inside each benchmark), GPU_CHECK_SITE (where .whl/ wheels
# go, default /tmp/site), GPU_CHECK_FAIL_STAGE=<stage> / GPU_CHECK_HANG_STAGE=<stage> (dry
# run only: make that stage fail / hang until its timeout, to test that the later stages
# and the summary still happen).

# No `set -e`: a failed or timed-out stage must not stop the later stages or the summary.
set -u -o pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$ROOT" || exit 1

PY=${GPU_CHECK_PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
SITE=${GPU_CHECK_SITE:-/tmp/site}
COMPILE_BUDGET_S=${GPU_CHECK_COMPILE_BUDGET_S:-45}
STAGES=(install gpu_tests bench_loss bench_train train_bf16)
declare -A BUDGET=([install]=120 [gpu_tests]=110 [bench_loss]=100 [bench_train]=100 [train_bf16]=40)
# Key result lines copied from each stage's log into the summary (extended regexes).
declare -A KEY=(
  [install]='^(backends on cuda|torch |liger|orc_fast: building|install: |dry:|missing tool)'
  [gpu_tests]='^(FAILED|ERROR) |(passed|failed|errors?|skipped|deselected|no tests ran|collected)[ ,].* in [0-9.]+s|KeyboardInterrupt|^dry:'
  [bench_loss]='^GPU: |^\| S[0-9]|(passed|failed|errors?|skipped|no tests ran|collected)[ ,].* in [0-9.]+s|KeyboardInterrupt|^dry:'
  [bench_train]='^\| cuda|^skipped on|^data batch|(passed|failed|errors?|skipped|no tests ran|collected)[ ,].* in [0-9.]+s|KeyboardInterrupt|^dry:'
  [train_bf16]='^(train |skip:|dry:)'
)

card_slug() {  # the card's name as the benchmarks spell it in file names (NVIDIA_H200)
  local name
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  [[ -n $name ]] || name=no_gpu
  sed -E 's/[^A-Za-z0-9]+/_/g; s/^_+|_+$//g' <<<"$name"
}

note() { echo "$*" >>"$WORK/note_$STAGE"; echo "$*"; }

# pytest with the same arguments in both modes; the dry run only collects, which parses
# every option and -k/-m expression and imports every module the real run would.
run_pytest() {
  if [[ $DRY == 1 ]]; then
    "$PY" -m pytest "$@" --co
    local rc=$?
    # 5: nothing collected (without CUDA the benchmarks skip at import): arguments were fine.
    if [[ $rc == 5 ]]; then echo "dry: nothing to collect without a GPU; arguments parsed"; rc=0; fi
    [[ $rc == 0 ]] && echo "dry: pytest $* collected fine"
    return $rc
  fi
  "$PY" -m pytest "$@"
}

stage_install() {
  if [[ -d /usr/local/cuda ]]; then
    # nvcc on the PATH may be a wrapper from which torch guesses the wrong CUDA home.
    export CUDA_HOME=/usr/local/cuda
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
  # Only the card's own architecture: half the nvcc time of setup.py's default 8.0;9.0.
  [[ -n $cap ]] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
  local pip=("$PY" -m pip install --no-deps --no-build-isolation -v -e .)
  local wheels=()
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  local wheel_pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
                   --target "$SITE" "${wheels[@]}")
  if [[ $DRY == 1 ]]; then
    local rc=0 tool
    for tool in timeout nproc sed grep find date readlink "$PY"; do
      command -v "$tool" >/dev/null || { echo "missing tool: $tool"; rc=1; }
    done
    command -v nvidia-smi >/dev/null || echo "dry: nvidia-smi not here (needed only on the GPU machine)"
    "$PY" -m pip --version || rc=1
    "$PY" -c "import setuptools, torch, pytest, pytest_benchmark" || rc=1
    [[ -f setup.py ]] || { echo "no setup.py in $PWD"; rc=1; }
    echo "dry: would run: ${pip[*]} (CUDA_HOME=${CUDA_HOME:-unset})"
    if (( ${#wheels[@]} )); then echo "dry: would run: ${wheel_pip[*]}"; else echo "dry: no .whl/ wheels"; fi
    return $rc
  fi
  ORC_FAST_REQUIRE_EXTENSION=1 "${pip[@]}"
  local rc=$?
  if [[ $rc != 0 ]]; then
    # Keep the triton rows and the CPU extension measurable when the CUDA build breaks.
    note "install: the CUDA build failed (exit $rc); installed again without CUDA"
    ORC_FAST_NO_CUDA=1 "${pip[@]}"
  fi
  if (( ${#wheels[@]} )); then
    "${wheel_pip[@]}" || { rc=$?; note "install: the .whl/ wheels failed to install"; }
  fi
  "$PY" -c "import torch, orc_fast; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print('backends on cuda:', orc_fast.available_backends('cuda'))" || rc=1
  "$PY" -c "import liger_kernel; print('liger-kernel', getattr(liger_kernel, '__version__', 'importable'))" 2>/dev/null \
    || echo "liger-kernel not importable: no Liger rows"
  return $rc
}

stage_gpu_tests() {
  # TRITON_INTERPRET=0: the real Triton compiler (conftest would choose the interpreter otherwise).
  TRITON_INTERPRET=0 run_pytest -m gpu tests -q -p no:cacheprovider -rfEs --durations=10
}

stage_bench_loss() {
  "$PY" -m py_compile benchmarks/bench_loss_gpu.py benchmarks/loss_cases.py benchmarks/conftest.py || return
  TRITON_INTERPRET=0 ORC_FAST_BENCH_COMPILE_BUDGET_S=$COMPILE_BUDGET_S PYTHONUNBUFFERED=1 \
    run_pytest benchmarks/bench_loss_gpu.py --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds
  local rc=$? table
  # The benchmark writes into benchmarks/results/; bring its table back too.
  for table in $(find benchmarks/results -name 'gpu_loss_*.md' -newer "$WORK/stamp" 2>/dev/null); do
    cp "$table" "$OUT/"
  done
  return $rc
}

stage_bench_train() {
  "$PY" -m py_compile benchmarks/bench_train.py || return
  TRITON_INTERPRET=0 ORC_FAST_BENCH_WARMUP_BUDGET_S=$COMPILE_BUDGET_S \
    ORC_FAST_BENCH_TABLE="$OUT/train_throughput_$(card_slug)_resnet32.md" \
    run_pytest benchmarks/bench_train.py --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds \
    -k "cuda and (resnet32 or data_batch)"
}

stage_train_bf16() {
  local help
  help=$("$PY" -m orc_fast.train --help) || { echo "orc_fast.train --help failed"; return 1; }
  local run=("$PY" -m orc_fast.train --device cuda --arch resnet32 --num-nets 4 --batch-size 128 --epochs 3
             --eval-every 3 --progress off)
  if ! grep -q -- '--precision' <<<"$help"; then
    if [[ $DRY == 1 ]]; then
      note "dry: the trainer has no --precision: the real run skips this stage"
    else
      note "skip: the trainer has no --precision"
      touch "$WORK/skipped_$STAGE"
    fi
    return 0
  fi
  if [[ $DRY == 1 ]]; then
    echo "dry: would run: ${run[*]} --precision fp32|bf16 --out ..."
    return 0
  fi
  # The trainer's own loop on the bundled digits set: bf16 beside fp32 (the default is
  # auto, bf16 on this GPU), same command otherwise (not comparable with bench_train's rows).
  local rc=0 precision
  for precision in fp32 bf16; do
    "${run[@]}" --precision "$precision" --out "$WORK/train_$precision" || rc=$?
    "$PY" - "$WORK/train_$precision/metrics.json" "$precision" <<'EOF' || rc=1
import json, sys
epochs = json.load(open(sys.argv[1]))["epochs"]
print(f"train {sys.argv[2]}: 4 x resnet32, batch 128, digits, images/s per epoch:",
      ", ".join(f"{e.get('images_per_s', float('nan')):.0f}" for e in epochs))
EOF
  done
  return $rc
}

if [[ ${1:-} == --stage ]]; then  # one stage, run by the loop below under `timeout`
  STAGE=$2
  if [[ $DRY == 1 && ${GPU_CHECK_FAIL_STAGE:-} == "$STAGE" ]]; then
    echo "GPU_CHECK_FAIL_STAGE=$STAGE: failing this stage on purpose"
    exit 3
  fi
  if [[ $DRY == 1 && ${GPU_CHECK_HANG_STAGE:-} == "$STAGE" ]]; then
    echo "GPU_CHECK_HANG_STAGE=$STAGE: hanging until the stage's timeout"
    exec sleep 600
  fi
  "stage_$STAGE"
  exit $?
fi

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "cannot create OUT=$OUT" >&2; exit 1; }
WORK=$(mktemp -d)  # notes and stamps live here, not in $OUT, to keep within its 8 files
touch "$WORK/stamp"
export OUT WORK PY DRY SITE COMPILE_BUDGET_S
if [[ $DRY != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
[[ $DRY == 1 ]] && { bash -n "$SELF" || { echo "bash -n $SELF failed" >&2; exit 1; }; }

STARTED=$(date +%s)
DEADLINE=$((STARTED + ${GPU_CHECK_TOTAL_S:-450}))
CARD=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
[[ -n $CARD ]] || CARD="no nvidia-smi answer (no GPU here)"
declare -A STATUS=() RC=() SECS=() TIMED=() USED=()
CURRENT=""

write_summary() {
  local s tmp="$OUT/summary.md.tmp"
  {
    echo "# gpu_check $([[ $DRY == 1 ]] && echo "(dry run)")"
    echo
    echo "- card: $CARD"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), started $(date -d "@$STARTED" '+%Y-%m-%d %H:%M:%S' 2>/dev/null), $(( $(date +%s) - STARTED )) s so far"
    echo
    echo "| stage | status | exit | seconds | timed out | budget s | note |"
    echo "| --- | --- | ---: | ---: | --- | ---: | --- |"
    for s in "${STAGES[@]}"; do
      local note_text=""
      [[ -f $WORK/note_$s ]] && note_text=$(tr '\n' ' ' <"$WORK/note_$s" | sed 's/|/\//g; s/ *$//')
      echo "| $s | ${STATUS[$s]:-not run} | ${RC[$s]:-} | ${SECS[$s]:-} | ${TIMED[$s]:-} | ${USED[$s]:-} | $note_text |"
    done
    for s in "${STAGES[@]}"; do
      [[ -f $OUT/$s.log ]] || continue
      echo
      echo "## $s ($s.log)"
      echo
      grep -E "${KEY[$s]}" "$OUT/$s.log" | head -n 60
      echo "last line: $(tail -n 1 "$OUT/$s.log")"
    done
    local count
    count=$(find "$OUT" -type f ! -name summary.md.tmp | wc -l)
    if (( count > 8 )); then echo; echo "warning: $count files in OUT; the device tool brings back 8"; fi
  } >"$tmp" 2>/dev/null
  mv -f "$tmp" "$OUT/summary.md"
}

CHILD=""
INTERRUPTED=0
on_signal() {
  INTERRUPTED=1
  [[ -n $CHILD ]] && kill -INT "$CHILD" 2>/dev/null  # timeout passes it on to the stage
}
trap on_signal INT TERM
trap 'write_summary' EXIT

for s in "${STAGES[@]}"; do
  if (( INTERRUPTED )); then STATUS[$s]="not run (interrupted)"; continue; fi
  budget_var=GPU_CHECK_BUDGET_$s
  budget=${!budget_var:-${BUDGET[$s]}}
  left=$((DEADLINE - $(date +%s)))
  (( budget > left )) && budget=$left
  if (( left < 10 )); then
    STATUS[$s]="skipped (whole-run budget spent)"
    write_summary
    continue
  fi
  CURRENT=$s
  USED[$s]=$budget
  start=$(date +%s)
  # In the background so that a signal to this script is handled at once (wait returns);
  # SIGINT first, so pytest prints its summary, then SIGKILL 15 s later (a loaded machine
  # can take seconds to unwind torch and exit).
  STAGE=$s PYTHONUNBUFFERED=1 timeout -s INT -k 15 "$budget" bash "$SELF" --stage "$s" >"$OUT/$s.log" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; rc=$?; done  # a signal cut the first wait short
  CHILD=""
  SECS[$s]=$(( $(date +%s) - start ))
  RC[$s]=$rc
  TIMED[$s]=no
  if [[ $rc == 124 || $rc == 137 ]]; then
    TIMED[$s]=yes
    STATUS[$s]=timeout
  elif [[ $rc != 0 ]]; then
    STATUS[$s]=failed
  elif [[ -f $WORK/skipped_$s ]]; then
    STATUS[$s]=skipped
  else
    STATUS[$s]=ok
  fi
  (( INTERRUPTED )) && STATUS[$s]="${STATUS[$s]} (interrupted)"
  write_summary
  echo "gpu_check: $s ${STATUS[$s]} (exit $rc, ${SECS[$s]} s)"
done

write_summary
trap - EXIT
rm -rf "$WORK"
cat "$OUT/summary.md"
exit 0
