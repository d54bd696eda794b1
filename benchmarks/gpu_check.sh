#!/usr/bin/env bash
# The one-shot device check (issue 17): what to run first on a GPU machine.
#
#   bash benchmarks/gpu_check.sh [--dry] [--out DIR] [--budget SECONDS]
#
# On one GPU, within --budget seconds (default 570: a ten-minute lease with room to copy
# the report back), it runs, in order, and writes every figure and failure to DIR/report.md:
#   1. environment   python, torch, CUDA, the GPU, flash-attn's real probe, bmtrain, vllm
#   2. gpu tests     pytest -m gpu over tests/model and tests/gpu (what one GPU can run)
#   3. mfu           benchmarks/gpu_mfu.py on the 2.4b, bf16, flash-attn when it works
#   4. train torch   benchmarks/gpu_train_check.py: 20 steps straight + resumed, torch backend
#   5. train bmtrain the same with model.backend: bmtrain, when bmtrain imports
#   6. vllm          tests/inference/test_vllm.py (offline generate + the OpenAI server), when vllm imports
# It installs nothing: a GPU machine without network cannot fetch, and building flash-attn or
# bmtrain takes longer than the lease.  Use a python that has them (PYTHON=..., default
# .venv/bin/python, else python3); `make gpu-train-env` builds one.  A step whose package is
# missing is reported as skipped with the reason.
#
# Dry mode (--dry, and automatically when torch sees no CUDA): every GPU step is reported as
# "skipped: no CUDA" (or "skipped: --dry") after running its CPU side for real (collecting the
# gpu tests, one gpu_mfu step of the tiny model, a 2-step train + resume on gloo), so the
# script is known to work end to end before it first meets a GPU.  Exit status: 0 when every step
# that ran passed, 1 otherwise; the report is complete either way.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY=0
OUT="benchmarks/out/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
BUDGET=570
while (($#)); do
    case "$1" in
        --dry) DRY=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
REPORT="$OUT/report.md"
DETAILS="$OUT/.details.md"  # failure excerpts, appended below the table at the end
: >"$REPORT"
: >"$DETAILS"
FAILED=0

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }
# has MODULE: the module imports in $PYTHON
has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

if [[ "$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" != 1 ]]; then
    SKIP="skipped: no CUDA"
    DRY=1
elif ((DRY)); then
    SKIP="skipped: --dry"
fi

# run NAME TIMEOUT CMD...: one step with its own log and time limit; a line in the report.
run() {
    local name="$1" limit="$2" started rc
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 20)); then
        say "| $name | skipped: the ${BUDGET} s budget is spent | | |"
        return 0
    fi
    ((limit > left)) && limit=$left
    started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - started)) result
    case $rc in
        0) result="ok" ;;
        124 | 137) result="FAILED: timed out after ${limit} s"; FAILED=1 ;;
        *) result="FAILED: exit $rc"; FAILED=1 ;;
    esac
    say "| $name | $result | $took | $(figure "$name" | tr '|' '/') |"
    if ((rc != 0)); then
        { echo; echo "### $name: last lines of $name.log"; echo; echo '```';
          tail -n 25 "$OUT/$name.log"; echo '```'; } >>"$DETAILS"
    fi
    return 0
}

# figure NAME: the one-line figure a step produced (from its JSON or its pytest summary).
figure() {
    case "$1" in
        gpu-tests* | vllm* | dry-*tests*) grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran|tests? collected' "$OUT/$1.log" | tail -n 1 | tr -d '=' ;;
        dry-mfu) tail -n 1 "$OUT/dry-mfu.log" ;;
        mfu) [[ -s "$OUT/mfu.json" ]] && "$PYTHON" -c 'import json,sys; f=json.load(open(sys.argv[1])); print("MFU %s, %.1f TFLOP/s, %.0f tokens/s, step %.0f ms, peak %.1f GiB, %s, checkpointing=%s, flash probe: %s" % (("%.3f" % f["mfu"]) if f["mfu"] else "n/a", f["tflops"], f["tokens_per_s"], f["step_ms"], f["peak_memory_gib"], f["attention"], f["checkpointing"], f["flash_probe"]))' "$OUT/mfu.json" ;;
        train-* | dry-train-*) [[ -s "$OUT/$1.json" ]] && "$PYTHON" -c 'import json,sys; f=json.load(open(sys.argv[1])); print("%s on %s: loss %.3f -> %.3f in %d steps, %.0f tokens/s, resume max abs loss diff %.2g; %s" % (f["backend"], f["device"], f["first_loss"], f["last_loss"], f["steps"], f["tokens_per_s_median"], f["resume_max_abs_loss_diff"], f["setup"]))' "$OUT/$1.json" ;;
        environment) tr '\n' ';' <"$OUT/environment.log" | cut -c1-400 ;;
        *) ;;
    esac
}

# The environment probe, as a file so that `timeout` can run it like any other step.
cat >"$OUT/environment.py" <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, nccl {torch.cuda.nccl.version()}")
from fm9g.model.attention import probe_flash
print(f"flash-attn: {probe_flash() or 'works (import + a varlen call)'}")
for name in ("bmtrain", "vllm"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not usable ({type(exc).__name__}: {str(exc)[:120]})")
EOF

say "# GPU device check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say ""
say "Commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PYTHON, budget ${BUDGET} s$( ((DRY)) && echo ", dry mode (${SKIP#skipped: })")."
say ""
say "| step | result | seconds | figure |"
say "|---|---|---|---|"
run environment 60 "$PYTHON" "$OUT/environment.py"

if ((DRY)); then
    # The CPU side of each GPU step, for real; the GPU side is reported as skipped.
    run dry-gpu-tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/model tests/gpu tests/inference
    run dry-mfu 120 "$PYTHON" benchmarks/gpu_mfu.py --dry
    run dry-train-torch 240 "$PYTHON" benchmarks/gpu_train_check.py --backend torch --steps 2 --device cpu \
        --out "$OUT/dry-train" --json "$OUT/dry-train-torch.json"
    for step in gpu-tests mfu train-torch train-bmtrain vllm; do
        say "| $step | $SKIP | | |"
    done
else
    run gpu-tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider -rfE -m gpu tests/model tests/gpu
    run mfu 150 "$PYTHON" benchmarks/gpu_mfu.py --config 2.4b --steps 5 --json "$OUT/mfu.json"
    run train-torch 150 "$PYTHON" benchmarks/gpu_train_check.py --backend torch --steps 20 \
        --out "$OUT/train" --json "$OUT/train-torch.json"
    if has bmtrain; then
        run train-bmtrain 150 "$PYTHON" benchmarks/gpu_train_check.py --backend bmtrain --steps 20 \
            --out "$OUT/train" --json "$OUT/train-bmtrain.json" --tolerance 1e-3
    else
        say "| train-bmtrain | skipped: bmtrain does not import (make gpu-train-env builds it) | | |"
    fi
    if has vllm; then
        run vllm 240 "$PYTHON" -m pytest -q -p no:cacheprovider -rfE -m gpu tests/inference/test_vllm.py
    else
        say "| vllm | skipped: vllm does not import (make gpu-serve-env builds it) | | |"
    fi
fi

cat "$DETAILS" >>"$REPORT"
rm -f "$DETAILS"
say ""
say "Total ${SECONDS} s; $( ((FAILED)) && echo 'some steps FAILED: see the details above and the logs' || echo 'every step that ran passed'). Logs: $OUT/"
exit "$FAILED"
