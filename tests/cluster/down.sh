#!/usr/bin/env bash
# down.sh - stop the test cluster that up.sh started.  It signals only the
# PIDs up.sh recorded (after checking each still runs the program it recorded)
# and whatever still lives inside the node namespaces up.sh made (job
# processes outlive a killed slurmd).  Packages, configs, logs and the
# accounting database are kept, so the next up.sh is quick.
#
#   PURGE=1 ./down.sh     also delete $FM9G_CLUSTER_STATE (queue + accounting)
set -uo pipefail

STATE=${FM9G_CLUSTER_STATE:-/var/lib/fm9g-testcluster}
BRIDGE=fm9gbr0
HOSTS_BEGIN="# BEGIN fm9g-testcluster"
HOSTS_END="# END fm9g-testcluster"
NODES=$(cat "$STATE/nodes" 2>/dev/null || echo 0)
[ "$(id -u)" = 0 ] || { echo "down.sh: run as root" >&2; exit 1; }
[ -d "$STATE" ] || { echo "down.sh: no $STATE, nothing to stop"; exit 0; }

# recorded_pid NAME PROGRAM: print NAME's recorded PID if it still runs PROGRAM
recorded_pid() {
  local file="$STATE/pids/$1.pid" pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ -d "/proc/$pid" ] && [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *"$2"* ]] && echo "$pid"
}
# terminate SECONDS PID...: SIGTERM, wait up to SECONDS, then SIGKILL the rest
terminate() {
  local seconds=$1 i p left=()
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  for i in $(seq $((seconds * 5))); do
    left=()
    for p in "$@"; do [ -d "/proc/$p" ] && left+=("$p"); done
    [ ${#left[@]} -eq 0 ] && return 0
    sleep 0.2
  done
  echo "down.sh: SIGKILL ${left[*]}" >&2
  kill -KILL "${left[@]}" 2>/dev/null
  sleep 0.2
}
# stop SECONDS NAME:PROGRAM...: stop these recorded daemons together
stop() {
  local seconds=$1 spec name program pid pids=() names=()
  shift
  for spec in "$@"; do
    name=${spec%%:*}; program=${spec#*:}
    if pid=$(recorded_pid "$name" "$program"); then pids+=("$pid"); names+=("$name[$pid]"); fi
    rm -f "$STATE/pids/$name.pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  terminate "$seconds" "${pids[@]}"
  echo "stopped ${names[*]}"
}

# 1. Cancel our jobs while the controller still runs, so slurmstepd ends the
#    job processes the normal way.  Bounded: a sick controller must not hang us.
if recorded_pid slurmctld slurmctld >/dev/null && timeout 5 scontrol ping >/dev/null 2>&1; then
  jobs=$(timeout 10 squeue --noheader --format=%A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    echo "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 30); do
      [ -z "$(timeout 5 squeue --noheader --format=%A 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

# 2. The controller and the node daemons, then anything left in the node
#    namespaces: ip netns pids lists only processes in our namespaces.
specs=(slurmctld:slurmctld)
for k in $(seq "$NODES"); do specs+=("slurmd-node$k:slurmd"); done
stop 15 "${specs[@]}"
for k in $(seq "$NODES"); do
  [ -e "/run/netns/fm9g-node$k" ] || continue
  leftover=$(ip netns pids "fm9g-node$k" 2>/dev/null | tr '\n' ' ')
  if [ -n "${leftover// }" ]; then
    echo "node$k: leftover pids $leftover"
    # shellcheck disable=SC2086
    terminate 5 $leftover
  fi
done

# 3. Accounting (slurmdbd before its database), then munge.
stop 15 slurmdbd:slurmdbd
stop 30 mariadb:mariadbd munged:munged

# 4. Network.  Deleting a namespace deletes its veth end; the bridge goes
#    last.  The "unreachable" route stays on purpose: a client still pointed
#    at the cluster subnet must get an error, not a packet on the default route.
for k in $(seq "$NODES"); do
  ip link del "fm9gv-node$k" 2>/dev/null
  ip netns del "fm9g-node$k" 2>/dev/null
done
ip link del "$BRIDGE" 2>/dev/null
if grep -qx "$HOSTS_BEGIN" /etc/hosts; then
  sed "/^$HOSTS_BEGIN\$/,/^$HOSTS_END\$/d" /etc/hosts > "$STATE/hosts.new" \
    && cat "$STATE/hosts.new" > /etc/hosts
fi
[ "${PURGE:-0}" = 1 ] && rm -rf "$STATE"
echo "cluster down"
