#!/usr/bin/env bash
# Start a one-node Slurm cluster on loopback (this machine is the controller and the only compute node),
# with real job accounting (slurmdbd + a private MariaDB) so `sacct` works as on a production cluster.
#
#   sudo slurm/local-cluster/start.sh          # prints the state folder on stdout when the node is idle
#   sudo slurm/local-cluster/stop.sh
#
# Environment:
#   HPC_RETRAIN_SLURM_STATE       state folder (spool, state, pids, logs, database)  [/tmp/hpc-retrain-slurm]
#   HPC_RETRAIN_SLURM_ACCOUNTING  slurmdbd (default) or none (no slurmdbd/MariaDB; `sacct` then fails)
#   HPC_RETRAIN_SLURM_DB_PORT     loopback port of the private MariaDB                [13306]
#
# Only daemons this script starts are recorded in $STATE/pids; stop.sh stops exactly those.
set -euo pipefail

STATE="${HPC_RETRAIN_SLURM_STATE:-/tmp/hpc-retrain-slurm}"
ACCOUNTING="${HPC_RETRAIN_SLURM_ACCOUNTING:-slurmdbd}"
DB_PORT="${HPC_RETRAIN_SLURM_DB_PORT:-13306}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PIDS="$STATE/pids"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
# Files carrying this line are ours to overwrite; anything else in /etc/slurm belongs to someone else.
MARK="# Written by hpc_retrain slurm/local-cluster/start.sh; stop.sh removes it."

log() { echo "start.sh: $*" >&2; }
die() { echo "start.sh: error: $*" >&2; exit 1; }

added_policy=0 started=0
on_exit() {
    local rc=$?
    ((added_policy)) && rm -f /usr/sbin/policy-rc.d
    # A half-started cluster is worse than none: stop what this run started, keep the logs.
    if ((rc != 0 && started)); then
        log "stopping what this run started (logs stay in $STATE/log)"
        HPC_RETRAIN_SLURM_STATE="$STATE" "$HERE/stop.sh" >&2 || true
    fi
}
trap on_exit EXIT

case "$ACCOUNTING" in slurmdbd|none) ;; *) die "HPC_RETRAIN_SLURM_ACCOUNTING must be slurmdbd or none, not '$ACCOUNTING'" ;; esac
[[ $(id -u) -eq 0 ]] || die "run as root: it installs packages, writes /etc/slurm and starts the Slurm daemons"
[[ "$STATE" == /* ]] || die "HPC_RETRAIN_SLURM_STATE must be an absolute path, not '$STATE'"

# A pid file holds "PID NAME": the name guards against signalling an unrelated process that reused the PID.
ours_alive() {
    local f="$PIDS/$1.pid" pid name
    [[ -f "$f" ]] || return 1
    read -r pid name <"$f" || return 1
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}
record() {  # record NAME PID
    echo "$2 $1" >"$PIDS/$1.pid"
    started=1
}
pid_from_file() {  # pid_from_file FILE SECONDS: wait for a daemon's own pid file and print its PID
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        if [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; then cat "$1"; return 0; fi
        sleep 0.1
    done
    return 1
}
node_state() { timeout 5 sinfo -h -o %T 2>/dev/null | head -n1 || true; }
wanted() {  # daemons a complete cluster of this mode consists of, among those this script starts
    echo slurmctld slurmd
    [[ "$ACCOUNTING" == slurmdbd ]] && echo slurmdbd mariadbd
    return 0
}

# --- already running? ---------------------------------------------------------------------------------
mkdir -p "$PIDS"
all=1 any=0
for d in $(wanted); do
    if ours_alive "$d"; then any=1; else all=0; fi
done
if ((all)) && [[ "$(node_state)" =~ ^(idle|mixed|allocated) ]]; then
    log "already running (state $STATE, node $(node_state))"
    echo "$STATE"
    exit 0
fi
if ((any)) || compgen -G "$PIDS/*.pid" >/dev/null; then
    log "a previous start is only partly running; stopping it first"
    HPC_RETRAIN_SLURM_STATE="$STATE" "$HERE/stop.sh" >&2
    mkdir -p "$PIDS"
fi
for f in "$CONF" "$DBD_CONF"; do
    if [[ -e "$f" ]] && ! grep -qxF "$MARK" "$f"; then
        die "$f exists and was not written by this script; move it away (it may be a real cluster's config)"
    fi
done
for d in slurmctld slurmd slurmdbd; do
    if pgrep -x "$d" >/dev/null; then
        die "a $d not started by this script is running (PID $(pgrep -x "$d" | tr '\n' ' ')); stop it first, it would hold the Slurm ports"
    fi
done

# --- packages -----------------------------------------------------------------------------------------
t0=$SECONDS
need=()
for pair in slurmctld:slurm-wlm slurmd:slurm-wlm sinfo:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [[ "$ACCOUNTING" == slurmdbd ]]; then
    for pair in slurmdbd:slurmdbd mariadbd:mariadb-server mariadb-install-db:mariadb-server mariadb:mariadb-client; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
    done
fi
if ((${#need[@]})); then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    log "installing ${need[*]} with apt-get"
    # Package scripts would otherwise start munge/slurm/mariadb as system services on a systemd machine,
    # daemons we would then not own. policy-rc.d is Debian's switch for that; leave an existing one alone.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && added_policy=1
    fi
    for p in "${need[@]}"; do
        if ! apt-cache show "$p" >/dev/null 2>&1; then
            log "package lists do not know $p; running apt-get update"
            apt-get update -q >&2
            break
        fi
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2 \
        || die "apt-get install ${need[*]} failed (see above)"
    if ((added_policy)); then rm -f /usr/sbin/policy-rc.d; added_policy=0; fi
    log "packages installed in $((SECONDS - t0)) s"
fi

mkdir -p "$STATE"/{ctld,slurmd,run,log}
HOST="$(hostname -s)"

# --- munge --------------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "using the munged already running"
else
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    rm -f /run/munge/munged.pid
    # --force: a socket left by a munged that died would otherwise block the start.
    runuser -u munge -- /usr/sbin/munged --force \
        || die "munged did not start; see /var/log/munge/munged.log"
    pid="$(pid_from_file /run/munge/munged.pid 10)" || die "munged wrote no pid file; see /var/log/munge/munged.log"
    record munged "$pid"
    munge -n | unmunge >/dev/null || die "munged runs but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
fi

# --- accounting: private MariaDB + slurmdbd -----------------------------------------------------------
write_conf() {  # write_conf FILE MODE: stdin -> FILE, refusing to overwrite a file someone else wrote
    local file="$1" mode="$2"
    if [[ -e "$file" ]] && ! grep -qxF "$MARK" "$file"; then
        die "$file exists and was not written by this script; move it away (it may be a real cluster's config)"
    fi
    { echo "$MARK"; cat; } >"$file.tmp"
    chmod "$mode" "$file.tmp"
    mv "$file.tmp" "$file"
}

if [[ "$ACCOUNTING" == slurmdbd ]]; then
    DB="$STATE/mariadb"
    SOCK="$DB/mariadb.sock"
    mkdir -p "$DB"
    chown mysql:mysql "$DB"
    if [[ ! -d "$DB/data/mysql" ]]; then
        log "initialising the accounting database in $DB/data"
        rm -rf "$DB/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" --auth-root-authentication-method=socket \
            --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
    fi
    if ss -Hltn "sport = :$DB_PORT" 2>/dev/null | grep -q .; then
        die "port $DB_PORT on loopback is taken; set HPC_RETRAIN_SLURM_DB_PORT to a free one"
    fi
    # --no-defaults: the system's /etc/mysql config (socket in /run/mysqld, port 3306) is for a system server.
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$SOCK" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DB/mariadbd.pid" \
        --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=64M --skip-log-bin \
        </dev/null >/dev/null 2>&1 &
    record mariadbd $!
    for ((i = 0; i < 300; i++)); do
        mariadb-admin --no-defaults --socket="$SOCK" -u root ping >/dev/null 2>&1 && break
        ours_alive mariadbd || die "mariadbd exited at start; see $STATE/log/mariadb.log"
        sleep 0.1
    done
    mariadb-admin --no-defaults --socket="$SOCK" -u root ping >/dev/null 2>&1 \
        || die "mariadbd did not answer within 30 s; see $STATE/log/mariadb.log"
    [[ -s "$DB/slurm.pass" ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DB/slurm.pass")
    PASS="$(cat "$DB/slurm.pass")"
    mariadb --no-defaults --socket="$SOCK" -u root <<SQL || die "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
    write_conf "$DBD_CONF" 600 <<EOF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$PASS
StorageLoc=slurm_acct_db
EOF
    rm -f "$STATE/run/slurmdbd.pid"
    slurmdbd || die "slurmdbd did not start; see $STATE/log/slurmdbd.log"
    pid="$(pid_from_file "$STATE/run/slurmdbd.pid" 30)" || die "slurmdbd wrote no pid file; see $STATE/log/slurmdbd.log"
    record slurmdbd "$pid"
    ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# --- slurm.conf ---------------------------------------------------------------------------------------
CPUS="$(nproc)"
MEM=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 2048))
((MEM > 512)) || die "this machine has too little memory for a Slurm node (${MEM} MiB after keeping 2 GiB back)"
write_conf "$CONF" 644 <<EOF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# Schedule on every submission and backfill every second: tests wait on jobs, there is no load to protect.
SchedulerParameters=bf_interval=1,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default every job would be given the whole node's memory and jobs would run one at a time.
DefMemPerCPU=$((MEM / CPUS))
ReturnToService=2
# Finished jobs leave slurmctld's memory quickly; sacct keeps their record.
MinJobAge=10
KillWait=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
$ACCT
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

if [[ "$ACCOUNTING" == slurmdbd ]]; then
    # Register the cluster before slurmctld starts so its first jobs are recorded.
    for ((i = 0; i < 100; i++)); do
        timeout 5 sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1 && break
        sleep 0.2
    done
    if ! timeout 5 sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx local; then
        timeout 10 sacctmgr -i add cluster local >&2 || die "sacctmgr could not register the cluster; see $STATE/log/slurmdbd.log"
    fi
fi

# --- slurmctld + slurmd -------------------------------------------------------------------------------
rm -f "$STATE/run/slurmctld.pid" "$STATE/run/slurmd.pid"
slurmctld -i || die "slurmctld did not start; see $STATE/log/slurmctld.log"
pid="$(pid_from_file "$STATE/run/slurmctld.pid" 30)" || die "slurmctld wrote no pid file; see $STATE/log/slurmctld.log"
record slurmctld "$pid"
slurmd || die "slurmd did not start; see $STATE/log/slurmd.log"
pid="$(pid_from_file "$STATE/run/slurmd.pid" 30)" || die "slurmd wrote no pid file; see $STATE/log/slurmd.log"
record slurmd "$pid"

for ((i = 0; i < 120; i++)); do
    s="$(node_state)"
    [[ "$s" == idle ]] && break
    sleep 0.5
done
[[ "$s" == idle ]] || die "node is '${s:-unreachable}' after 60 s, not idle; see $STATE/log/slurmctld.log and slurmd.log"
log "cluster up in $((SECONDS - t0)) s: node $HOST idle, partition debug, accounting $ACCOUNTING"
echo "$STATE"
