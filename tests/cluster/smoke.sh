#!/usr/bin/env bash
# smoke.sh - check that the test cluster behaves like the real Slurm cluster
# fm9g-launch is written against: distinct nodes with their own hostnames and
# addresses, accounting, requeue, partitions, no GPUs, sdiag statistics.
# Prints one line per check and "N passed, N failed"; exits 1 on any failure.
# Needs no root (jobs run as the calling user).
set -uo pipefail
NODES=$(cat "${FM9G_CLUSTER_STATE:-/var/lib/fm9g-testcluster}/nodes" 2>/dev/null || echo 4)
NET=$(cat "${FM9G_CLUSTER_STATE:-/var/lib/fm9g-testcluster}/net" 2>/dev/null || echo 10.79.0)
WORK=$(mktemp -d /tmp/fm9g-smoke.XXXXXX)
passed=0
failed=0
submitted=()
cleanup() { [ ${#submitted[@]} -gt 0 ] && scancel "${submitted[@]}" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

ok() { echo "ok   - $*"; passed=$((passed + 1)); }
not_ok() { echo "FAIL - $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what"; fi; }
# within SECONDS CMD...: retry CMD until it succeeds or SECONDS pass
within() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$deadline" ] || return 1; sleep 0.5; done
}
# submit SBATCH-ARGS...: print the job id.  With --wait, sbatch exits with the
# job's exit code, so success is judged by the id it printed, not its status.
submit() {
  local id
  id=$(sbatch --parsable "$@")
  id=${id%%;*}
  [[ "$id" =~ ^[0-9]+$ ]] || return 1
  submitted+=("$id")
  echo "$id"
}
queue_state() { [ "$(squeue --noheader --jobs="$1" --format=%T 2>/dev/null)" = "$2" ]; }
acct_field() { sacct --noheader --parsable2 --allocations --jobs="$1" --format="$2" 2>/dev/null; }
acct_is() { [ "$(acct_field "$1" State,ExitCode)" = "$2" ]; }

if ! timeout 10 scontrol ping >/dev/null 2>&1; then
  echo "FAIL - scontrol ping: the cluster is not up (run tests/cluster/up.sh as root)"
  exit 1
fi

# --- nodes and partitions
check "sinfo: $NODES nodes, all idle" test "$(sinfo --noheader --Node --partition=debug --format=%T | sort | uniq -c | xargs)" = "$NODES idle"
check "partitions: debug* with $NODES nodes, small with 2" \
  test "$(sinfo --noheader --format='%P=%D' | sort | xargs)" = "debug*=$NODES small=2"
check "no node has gres (no GPUs)" test "$(sinfo --noheader --format=%G | sort -u)" = "(null)"

# --- a batch job: own hostname and address on its node, srun step, accounting
jid=$(submit --wait --nodes=1 --output="$WORK/%j.out" \
  --wrap 'echo "$(hostname) $(hostname -I | xargs) $SLURMD_NODENAME"; srun hostname')
read -r host addr nodename < <(head -1 "$WORK/$jid.out")
k=${host#node}
check "job $jid ran on $host with address $addr" test "$host" = "$nodename" -a "$addr" = "$NET.$((10 + k))"
check "srun step ran on the same node" test "$(sed -n 2p "$WORK/$jid.out")" = "$host"
check "sacct: COMPLETED 0:0" within 15 acct_is "$jid" "COMPLETED|0:0"
jid=$(submit --wait --nodes=1 --output=/dev/null --wrap 'exit 3')
check "sacct: a job exiting 3 is FAILED 3:0" within 15 acct_is "$jid" "FAILED|3:0"

# --- squeue, scontrol, requeue, scancel
jid=$(submit --nodes=1 --open-mode=append --output="$WORK/%j.out" --wrap 'echo start; sleep 300')
check "squeue: job $jid RUNNING" within 20 queue_state "$jid" RUNNING
check "scontrol show job: BatchHost=node" bash -c "scontrol show job -o $jid | grep -q 'BatchHost=node'"
scontrol requeue "$jid"
# A requeued job waits cred_expire+1 s (Reason=BeginTime) before it may run.
check "requeue: PENDING with Restarts=1" within 10 bash -c \
  "[ \"\$(squeue --noheader --jobs=$jid --format=%T)\" = PENDING ] && scontrol show job -o $jid | grep -q Restarts=1"
check "requeued job RUNNING again" within 45 queue_state "$jid" RUNNING
check "--open-mode=append kept the first run's output" within 10 bash -c "[ \$(grep -c start $WORK/$jid.out) = 2 ]"
scancel "$jid"
check "scancel: sacct says CANCELLED" within 20 bash -c "acct_field() { sacct --noheader --parsable2 --allocations --jobs=$jid --format=State; }; acct_field | grep -q '^CANCELLED'"

# --- exclusive nodes, partitions, multi-node
a=$(submit --nodes=1 --output=/dev/null --wrap 'sleep 60')
b=$(submit --nodes=1 --output=/dev/null --wrap 'sleep 60')
within 20 bash -c "[ \$(squeue --noheader --jobs=$a,$b --states=RUNNING | wc -l) = 2 ]"
na=$(squeue --noheader --jobs="$a" --format=%N)
nb=$(squeue --noheader --jobs="$b" --format=%N)
check "two one-node jobs on two nodes ($na, $nb)" test -n "$na" -a -n "$nb" -a "$na" != "$nb"
scancel "$a" "$b"
jid=$(submit --wait --partition=small --nodes=2 --output="$WORK/%j.out" --wrap 'srun hostname | sort | xargs')
check "2-node job in partition small ran on node1 node2" test "$(cat "$WORK/$jid.out")" = "node1 node2"
# Slurm 22.05 ACCEPTS a job asking for more nodes than its partition has; it
# then pends forever with Reason=PartitionNodeLimit.  That is why
# fm9g.orchestrator.slurm.preflight checks the size before submitting.
jid=$(submit --partition=small --nodes=3 --output=/dev/null --wrap true)
check "3 nodes in partition small: accepted, pends with PartitionNodeLimit" within 10 bash -c \
  "[ \"\$(squeue --noheader --jobs=$jid --format='%T %r')\" = 'PENDING PartitionNodeLimit' ]"
scancel "$jid"
check "sbatch refuses a GPU request" bash -c "! sbatch --parsable --gpus-per-node=1 --wrap true 2>/dev/null"

# --- controller statistics (the benchmarks read per-user RPC counts)
check "sdiag: RPC statistics by user list $(id -un)" bash -c \
  "sdiag | sed -n '/^Remote Procedure Call statistics by user/,/^\$/p' | grep -q '^[[:space:]]*$(id -un) '"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
