#!/usr/bin/env bash
# up.sh - bring up fm9g-launch's test cluster: a real Slurm 22.05 cluster with
# N compute nodes on this one machine.  Installs the Debian packages it needs,
# then starts what is not running yet.  Safe to run again at any time: a daemon
# whose recorded PID is alive is left alone, a changed slurm.conf is pushed
# with "scontrol reconfigure".
#
#   host (login node + controller)  munged, mariadbd (socket only), slurmdbd,
#                                   slurmctld; bridge $BRIDGE at $NET.1/24
#   nodeK, K = 1..NODES             own network namespace fm9g-nodeK and UTS
#                                   namespace (hostname nodeK), address
#                                   $NET.(10+K), one slurmd
#   partitions                      debug = all nodes (default), small = node[1-2]
#
# The mount namespace is shared, so /tmp, /work and $HOME are the cluster's
# "shared filesystem", as on a real cluster.
#
# Knobs (environment):
#   NODES=4                       compute nodes, 2..40
#   FM9G_CLUSTER_STATE=/var/lib/fm9g-testcluster   pids, logs, spool, database
#   FM9G_CLUSTER_NET=10.79.0      /24 prefix for the bridge and the nodes
#   FM9G_CLUSTER_TIMEOUT=90       seconds allowed for each readiness wait
#   CRED_EXPIRE=10                see the AuthInfo comment below
set -euo pipefail
# Never write "cmd | grep -q" here: grep -q exits at the first match, cmd may
# then die of SIGPIPE, and pipefail turns a match into a failure.

NODES=${NODES:-4}
STATE=${FM9G_CLUSTER_STATE:-/var/lib/fm9g-testcluster}
NET=${FM9G_CLUSTER_NET:-10.79.0}
TIMEOUT=${FM9G_CLUSTER_TIMEOUT:-90}
CRED_EXPIRE=${CRED_EXPIRE:-10}
SMALL_NODES=2
BRIDGE=fm9gbr0
CLUSTER=fm9gtest
CONTROLLER=$(hostname -s)
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
# slurmdbd's MySQL plugin has no socket setting: StorageHost=localhost makes
# libmariadb use its compiled-in socket path, so mariadbd must listen there.
DB_SOCKET=/run/mysqld/mysqld.sock
HOSTS_BEGIN="# BEGIN fm9g-testcluster"
HOSTS_END="# END fm9g-testcluster"

started_ns=$(date +%s%N)
say() {
  local ms=$(( ($(date +%s%N) - started_ns) / 1000000 ))
  printf '[up %3d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"
}
die() { echo "up.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and creates namespaces)"
[[ "$NODES" =~ ^[0-9]+$ ]] && [ "$NODES" -ge "$SMALL_NODES" ] && [ "$NODES" -le 40 ] \
  || die "NODES must be $SMALL_NODES..40 (got '$NODES')"

# alive NAME PROGRAM: the PID recorded for NAME is running PROGRAM.  Checking
# /proc/PID/exe guards against a recycled PID belonging to someone else.
alive() {
  local file="$STATE/pids/$1.pid" pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ -d "/proc/$pid" ] && [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *"$2"* ]]
}

# Both this cluster and /work/shared/slurm-sandbox own /etc/slurm/slurm.conf
# and the munge/mariadb sockets, so only one of them can run at a time.
OTHER=/var/lib/slurm-sandbox/pids
if [ -d "$OTHER" ]; then
  for f in "$OTHER"/*.pid; do
    [ -s "$f" ] && [ -d "/proc/$(cat "$f")" ] \
      && die "the slurm-sandbox cluster is running ($f); use it, or stop it with its own down.sh first"
  done
fi

mkdir -p "$STATE/pids" "$STATE/log"
for f in "$STATE"/pids/slurmd-node*.pid; do
  [ -e "$f" ] || continue
  k=${f##*/slurmd-node}; k=${k%.pid}
  if [ "$k" -gt "$NODES" ] && alive "slurmd-node$k" slurmd; then
    die "node$k is running but NODES=$NODES; shrinking needs down.sh first"
  fi
done
echo "$NODES" > "$STATE/nodes"
echo "$NET" > "$STATE/net"

# ------------------------------------------------------------------ packages
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2 util-linux)
missing=()
for p in "${PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # Debian maintainer scripts start services through invoke-rc.d; with no
  # systemd they fall back to /etc/init.d and would start daemons we do not
  # track.  A policy-rc.d that exits 101 forbids that; add one only if absent.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # A fresh CI image has no package lists; refresh only when the install
  # cannot find something.
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE/log/apt.log" 2>&1; then
    apt-get update -q >>"$STATE/log/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$STATE/log/apt.log" 2>&1 \
      || { [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; tail -20 "$STATE/log/apt.log" >&2; die "apt-get install failed (log: $STATE/log/apt.log)"; }
  fi
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  say "packages installed"
fi

# ------------------------------------------------------------------ helpers
# launch NAME LOG CMD...: run CMD in its own session (so it outlives this
# script and our terminal) and record its PID as $STATE/pids/NAME.pid.
launch() {
  local name=$1 logfile=$2 i
  shift 2
  rm -f "$STATE/pids/$name.pid"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$STATE/pids/$name.pid" "$@" \
    >>"$logfile" 2>&1 </dev/null &
  for i in $(seq 50); do [ -s "$STATE/pids/$name.pid" ] && return 0; sleep 0.1; done
  die "$name did not record its PID"
}
# await WHAT NAME|- CMD...: retry CMD until it succeeds.  Gives up early, with
# the log tail, if the process recorded as NAME has died meanwhile.
await() {
  local what=$1 name=$2 deadline=$(( $(date +%s) + TIMEOUT ))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$name" != - ] && ! kill -0 "$(cat "$STATE/pids/$name.pid" 2>/dev/null)" 2>/dev/null; then
      tail -n 15 "$STATE/log/$name".* >&2 || true
      die "$name exited while waiting for $what"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die "gave up waiting for $what after ${TIMEOUT}s"
    sleep 0.3
  done
}

# ------------------------------------------------------------------ network
ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
[[ "$(ip addr show dev "$BRIDGE")" == *"inet $NET.1/24 "* ]] || ip addr add "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
# If the bridge is ever missing (after down.sh, or half-way through up.sh),
# packets for the cluster subnet must not leave through the default route.
# The bridge's connected route wins while it exists (lower metric).
[[ "$(ip route show)" == *"unreachable $NET.0/24 "* ]] || ip route add unreachable "$NET.0/24" metric 4000
for k in $(seq "$NODES"); do
  ns=fm9g-node$k
  veth=fm9gv-node$k
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  ip link show "$veth" >/dev/null 2>&1 || ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  [[ "$(ip -n "$ns" addr show dev eth0)" == *"inet $NET.$((10 + k))/24 "* ]] \
    || ip -n "$ns" addr add "$NET.$((10 + k))/24" dev eth0
  ip -n "$ns" link set eth0 up
done

# Node names must resolve everywhere (torchrun hands out MASTER_ADDR=nodeK).
# The namespaces share /etc, so one marked block serves host and nodes.  The
# file is rewritten in place because it may be a bind mount.
# One writer at a time: two up.sh rewriting it together (a test repairing crashed nodes
# while another brings the cluster up) once left it without its localhost lines.  The
# lock lives in a subshell: a daemon started later must not inherit (and hold) it.
mkdir -p "$STATE"
(
  flock 9
  {
    sed "/^$HOSTS_BEGIN\$/,/^$HOSTS_END\$/d" /etc/hosts
    echo "$HOSTS_BEGIN"
    for k in $(seq "$NODES"); do echo "$NET.$((10 + k)) node$k"; done
    echo "$HOSTS_END"
  } > "$STATE/hosts.new"
  cmp -s "$STATE/hosts.new" /etc/hosts || cat "$STATE/hosts.new" > /etc/hosts
) 9>"$STATE/hosts.lock"
say "network: $BRIDGE $NET.1/24, node1..node$NODES at $NET.11..$NET.$((10 + NODES))"

# ------------------------------------------------------------------ slurm.conf
install -d -o slurm -g slurm "$STATE/slurmctld" "$STATE/run"
install -d "$STATE/slurmd"
# Every node claims the machine's real topology (from slurmd -C); without it
# slurmd logs "Node reconfigured socket/core boundaries".  The nodes share the
# real cores, so CPUs are oversubscribed, which is fine for tests.
TOPOLOGY=$(slurmd -C 2>/dev/null | head -1 | grep -o 'CPUs=.*ThreadsPerCore=[0-9]*' || echo "CPUs=$(nproc)")
{
  cat <<EOF
# Written by fm9g-launch tests/cluster/up.sh; edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$CONTROLLER($NET.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may not start again before cred_expire+1 s (Reason=BeginTime);
# Slurm's default of 120 s would make every requeue test wait two minutes.
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
# No cgroups: the nodes are namespaces on one kernel.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
# The default 60 s main / 30 s backfill intervals leave requeued jobs pending
# long after their BeginTime.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The gpu type is known, but no node has any: a GPU request must be refused
# (by our preflight first, by sbatch otherwise).
GresTypes=gpu
ReturnToService=2
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
# Short, so node-failure tests see NODE_FAIL within half a minute.
SlurmdTimeout=20
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
JobCompType=jobcomp/none
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NET.1
AccountingStoragePort=6819
# sacct's Comment column is empty unless slurmctld stores it (22.05 flag).
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
EOF
  for k in $(seq "$NODES"); do
    echo "NodeName=node$k NodeHostname=node$k NodeAddr=$NET.$((10 + k)) $TOPOLOGY RealMemory=2048 State=UNKNOWN"
  done
  # OverSubscribe=EXCLUSIVE: with CR_Core two one-CPU jobs would share a node,
  # but every fm9g job is one whole node.
  echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE"
  echo "PartitionName=small Nodes=node[1-$SMALL_NODES] Default=NO MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE"
} > "$STATE/slurm.conf.new"
conf_changed=0
if ! cmp -s "$STATE/slurm.conf.new" "$SLURM_CONF"; then
  install -D -m 0644 "$STATE/slurm.conf.new" "$SLURM_CONF"
  conf_changed=1
fi

# ------------------------------------------------------------------ munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
fi
if ! alive munged munged; then
  launch munged "$STATE/log/munged.out" \
    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
  await "munge credentials" munged bash -c 'munge -n | unmunge'
  say "munged pid $(cat "$STATE/pids/munged.pid")"
fi

# ------------------------------------------------------------------ accounting
# The pid file must sit in a directory mysql can write ("Errcode: 13").
install -d -o mysql -g mysql /run/mysqld
if [ ! -d "$STATE/mysql/mysql" ]; then
  install -d -o mysql -g mysql "$STATE/mysql"
  mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
    --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed (log: $STATE/log/mariadb-install.log)"
fi
if ! alive mariadb mariadbd; then
  # --no-defaults: ignore /etc/mysql so a system MariaDB's settings (and its
  # TCP port) never leak in; the socket is the only way in.
  launch mariadb "$STATE/log/mariadb.log" /usr/sbin/mariadbd --no-defaults --user=mysql \
    --datadir="$STATE/mysql" --socket="$DB_SOCKET" --skip-networking \
    --pid-file=/run/mysqld/fm9g-testcluster.pid --innodb-buffer-pool-size=64M \
    --innodb-lock-wait-timeout=900 --max-allowed-packet=16M
  await "mariadb" mariadb mariadb --no-defaults -S "$DB_SOCKET" -uroot -e 'select 1'
  say "mariadb pid $(cat "$STATE/pids/mariadb.pid")"
fi
mariadb --no-defaults -S "$DB_SOCKET" -uroot <<'SQL'
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'fm9gtest';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
cat > "$STATE/slurmdbd.conf.new" <<EOF
# Written by fm9g-launch tests/cluster/up.sh; edits are overwritten.
AuthType=auth/munge
DbdHost=$CONTROLLER
DbdPort=6819
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=fm9gtest
StorageLoc=slurm_acct_db
EOF
# slurmdbd refuses a config readable by others (it holds the DB password).
install -m 0600 -o slurm -g slurm "$STATE/slurmdbd.conf.new" "$DBD_CONF"
if ! alive slurmdbd slurmdbd; then
  launch slurmdbd "$STATE/log/slurmdbd.out" /usr/sbin/slurmdbd -D
  await "slurmdbd" slurmdbd sacctmgr --noheader list cluster
  say "slurmdbd pid $(cat "$STATE/pids/slurmdbd.pid")"
fi
# slurmctld registers with slurmdbd only if the cluster exists there.
[[ $'\n'"$(sacctmgr --noheader --parsable2 list cluster format=cluster)"$'\n' == *$'\n'"$CLUSTER"$'\n'* ]] \
  || sacctmgr --immediate add cluster "$CLUSTER" >/dev/null

# ------------------------------------------------------------------ slurmctld
if ! alive slurmctld slurmctld; then
  launch slurmctld "$STATE/log/slurmctld.out" /usr/sbin/slurmctld -D
  await "slurmctld" slurmctld scontrol ping
  say "slurmctld pid $(cat "$STATE/pids/slurmctld.pid")"
elif [ "$conf_changed" = 1 ]; then
  scontrol reconfigure
  say "slurm.conf changed: reconfigured"
fi

# ------------------------------------------------------------------ slurmd x N
for k in $(seq "$NODES"); do
  node=node$k
  install -d -m 0755 "$STATE/slurmd/$node"
  if ! alive "slurmd-$node" slurmd; then
    # nsenter --net, not "ip netns exec": the latter also makes a mount
    # namespace with a fresh /sys, and slurmd 22.05 then dies with "No
    # filesystem mounted on /sys/fs/cgroup" even with proctrack/linuxproc.
    # unshare --uts gives the node (and every job it forks) its own hostname.
    launch "slurmd-$node" "$STATE/log/slurmd-$node.out" \
      nsenter --net="/run/netns/fm9g-$node" unshare --uts -- \
      sh -c "hostname $node && exec /usr/sbin/slurmd -D -N $node"
    say "slurmd $node pid $(cat "$STATE/pids/slurmd-$node.pid")"
  fi
done
# Ready = every node has registered and responds.  Busy nodes count as ready,
# so running up.sh again while jobs run returns at once.  A trailing "*" in
# %T marks a node that does not respond.
nodes_ready() {
  local states
  states=$(sinfo --noheader --Node --partition=debug --format=%T) || return 1
  [ "$(echo "$states" | wc -l)" = "$NODES" ] || return 1
  ! grep -qvE '^(idle|allocated|mixed|completing)$' <<<"$states"
}
await "all nodes to register" - nodes_ready
say "cluster up: $(sinfo --noheader --format='%P=%D' | tr '\n' ' ')"
