#!/usr/bin/env bash
# record.sh - run a fixed mix of jobs on the test cluster and save the raw output
# of the exact command lines fm9g.orchestrator.slurm.commands runs (the argv
# builders there are called, not copied; `scontrol show job`, which only the tests
# run, from tests/helpers/scontrol.py) into tests/slurm/recorded/*.txt.
# tests/slurm/test_parse.py reads those files.  Takes about two minutes, most of
# it waiting for the --time=1 job to reach TIMEOUT.
#
# Jobs: running (a name and comment full of separators), cancelled while
# running, requeued (then completes), timed out, completed, failed (exit 3),
# killed by SIGKILL, a 2-node job in partition small, an array of 4 tasks (odd
# tasks fail), a held job, and pending ones waiting for nodes.
#
#   PYTHON=/path/to/python tests/cluster/record.sh   (default: .venv/bin/python)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
OUT=$REPO/tests/slurm/recorded
WORK=$(mktemp -d /tmp/fm9g-record.XXXXXX)
mkdir -p "$OUT"
cd "$WORK"   # where stray slurm-%j.out files would land
rm -f "$OUT"/*.txt
jobs_started=()
trap '[ ${#jobs_started[@]} -gt 0 ] && scancel "${jobs_started[@]}" 2>/dev/null; rm -rf "$WORK"' EXIT

timeout 10 scontrol ping >/dev/null || { echo "record.sh: cluster not up (tests/cluster/up.sh)" >&2; exit 1; }
"$PY" -c 'import fm9g.orchestrator.slurm.commands' || { echo "record.sh: $PY cannot import fm9g (make install)" >&2; exit 1; }

# capture FILE BUILDER ARGS...: run commands.<BUILDER>_argv(ARGS) and save its
# stdout as FILE; the argv and exit status go to COMMANDS.txt.
capture() {
  "$PY" - "$REPO" "$OUT" "$@" <<'PYTHON'
import subprocess, sys
from datetime import datetime
from fm9g.orchestrator.slurm import commands
sys.path.insert(0, sys.argv.pop(1))  # the repository root: tests.helpers
from tests.helpers import scontrol

out, file, builder, *args = sys.argv[1:]
ids = lambda text: [int(i) for i in text.split(",")]
argv = {
    "sbatch": lambda script: commands.sbatch_argv(script),
    "squeue": lambda text: commands.squeue_argv(ids(text)),
    "sacct": lambda text, since: commands.sacct_argv(ids(text), datetime.fromisoformat(since)),
    "sinfo": commands.sinfo_argv,
    "show_job": lambda job_id: scontrol.show_job_argv(int(job_id)),
    "sdiag": commands.sdiag_argv,
}[builder](*args)
result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
with open(f"{out}/{file}", "w") as stream:
    stream.write(result.stdout)
with open(f"{out}/COMMANDS.txt", "a") as stream:
    shown = " ".join(argv).replace("\x1f", "\\x1f")
    stream.write(f"{file}: exit {result.returncode}: {shown}\n")
    if result.stderr.strip():
        stream.write(f"    stderr: {result.stderr.strip()}\n")
PYTHON
}
# submit VAR SBATCH-ARGS...: submit and store the job id in VAR (not echoed:
# a $(...) subshell would lose the jobs_started entry the cleanup trap needs).
submit() {
  local var=$1 id
  shift
  id=$(sbatch --parsable --open-mode=append --output="$WORK/%j.out" "$@")
  id=${id%%;*}
  jobs_started+=("$id")
  printf -v "$var" '%s' "$id"
}
state() { squeue --noheader --states=all --jobs="$1" --format=%T 2>/dev/null | head -1; }
wait_until() { # wait_until SECONDS CMD...
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "record.sh: timed out waiting for: $*" >&2; exit 1; }
    sleep 1
  done
}
is() { [ "$(state "$1")" = "$2" ]; }
ended() { local s; s=$(state "$1"); [ -n "$s" ] && [[ ! "$s" =~ ^(PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUED)$ ]]; }
since=$(date +%Y-%m-%dT%H:%M:%S)
echo "# Recorded by tests/cluster/record.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ), $(sinfo --version)" > "$OUT/COMMANDS.txt"

# 1. Four long jobs fill the four nodes.  The two that stay long are pinned to
#    node3/node4, so partition small (node[1-2]) frees up once the cancelled and
#    the requeued job are gone.
cat > "$WORK/long.sh" <<'EOF'
#!/bin/bash
#SBATCH --nodes=1
#SBATCH --nodelist=node4
#SBATCH --output=/dev/null
sleep 600
EOF
running=$(capture sbatch_parsable.txt sbatch "$WORK/long.sh" && tr -d '\n' < "$OUT/sbatch_parsable.txt")
running=${running%%;*}
jobs_started+=("$running")
scontrol update JobId="$running" JobName='fm9g|pretrain node 0' Comment='fm9g run=demo|stage=pretrain job=0, attempt=1' >/dev/null
submit timeout_job --nodelist=node3 --time=1 --job-name=fm9g-timeout --wrap 'sleep 600'
submit requeued --job-name=fm9g-requeue --comment='requeue me' \
  --wrap 'echo "run ${SLURM_RESTART_COUNT:-0}"; [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && exit 0; sleep 600'
submit cancelled --job-name=fm9g-cancel --wrap 'sleep 600'
for id in "$running" "$timeout_job" "$requeued" "$cancelled"; do wait_until 30 is "$id" RUNNING; done

# 2. Short jobs queue behind them.
submit array --job-name=fm9g-index --array=0-3 --wrap 'exit $((SLURM_ARRAY_TASK_ID % 2))'
submit held --hold --job-name=fm9g-held --wrap true
submit completed --job-name=fm9g-ok --wrap 'echo ok'
submit failed --job-name=fm9g-fail --wrap 'exit 3'
submit killed --job-name=fm9g-kill --wrap 'kill -9 $$'
submit two_node --job-name=fm9g-two --partition=small --nodes=2 --wrap 'srun hostname'
all="$running,$timeout_job,$requeued,$cancelled,$array,$held,$completed,$failed,$killed,$two_node"
sleep 3   # one scheduler cycle (sched_interval=2) so pending jobs carry their reason
capture squeue_busy.txt squeue "$all"
capture sinfo_busy.txt sinfo
capture scontrol_running.txt show_job "$running"
capture scontrol_array_pending.txt show_job "$array"

# 3. Cancel one running job, requeue another.
scancel "$cancelled"
scontrol requeue "$requeued"
wait_until 15 is "$requeued" PENDING
capture squeue_requeued.txt squeue "$all"
capture scontrol_requeued.txt show_job "$requeued"

# 4. Let the short jobs end.  The time-limited job still runs on node3, the
#    long one on node4; drain node2 for a moment, so that sinfo shows a
#    partition whose nodes are in three different states.
for id in "$requeued" "$cancelled" "$array" "$completed" "$failed" "$killed" "$two_node"; do
  wait_until 120 ended "$id"
done
wait_until 60 bash -c "[ -z \"\$(squeue --noheader --jobs=$array --format=%T | grep -E 'PENDING|RUNNING|COMPLETING')\" ]"
scontrol update NodeName=node2 State=DRAIN Reason=fm9g-record
capture sinfo_mixed.txt sinfo
scontrol update NodeName=node2 State=RESUME

# 5. The --time=1 job reaches TIMEOUT (Slurm checks limits about every 30 s).
wait_until 180 ended "$timeout_job"
capture squeue_ended.txt squeue "$all"
capture scontrol_completed.txt show_job "$completed"
capture scontrol_array.txt show_job "$array"
capture squeue_one.txt squeue "$failed"

# 6. Clean up, then read accounting once it has caught up with the controller.
scancel "$running" "$held"
wait_until 30 ended "$running"
acct_settled() {
  local text
  text=$(sacct --noheader --parsable2 --allocations --jobs="$all" --starttime="$since" --format=State)
  [ -n "$text" ] && ! grep -qE '^(PENDING|RUNNING|COMPLETING|REQUEUED)$' <<<"$text"
}
wait_until 30 acct_settled
capture sacct.txt sacct "$all" "$since"
capture sinfo_idle.txt sinfo
capture sdiag.txt sdiag
echo "recorded $(ls "$OUT"/*.txt | wc -l) files in $OUT; jobs $all"
