#!/usr/bin/env bash
# Stop the one-node cluster that start.sh started: cancel its jobs, then stop exactly the daemons recorded
# in $STATE/pids (never a daemon this script did not start), waiting until each has exited.
set -euo pipefail

STATE="${HPC_RETRAIN_SLURM_STATE:-/tmp/hpc-retrain-slurm}"
PIDS="$STATE/pids"

log() { echo "stop.sh: $*" >&2; }

is_ours() {  # is_ours NAME -> prints PID when the recorded process still runs under the recorded name
    local f="$PIDS/$1.pid" pid name
    [[ -f "$f" ]] || return 1
    read -r pid name <"$f" || return 1
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
    echo "$pid"
}

stop_one() {  # stop_one NAME: SIGTERM, wait up to 30 s, then SIGKILL
    local name="$1" pid i
    if pid="$(is_ours "$name")"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (PID $pid) ignored SIGTERM for 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        log "stopped $name (PID $pid)"
    fi
    rm -f "$PIDS/$name.pid"
}

remove_conf() {
    # Without a config, Slurm commands fail at once instead of retrying a dead controller for seconds, so
    # tests skip fast. Only files start.sh wrote (they carry its mark) go, and only while no Slurm daemon
    # runs (one started with another state folder still needs them).
    local mark="# Written by hpc_retrain slurm/local-cluster/start.sh; stop.sh removes it." f
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || pgrep -x slurmdbd >/dev/null; then
        return 0
    fi
    for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
        if [[ -f "$f" ]] && grep -qxF "$mark" "$f"; then rm -f "$f"; fi
    done
}

if [[ ! -d "$PIDS" ]] || ! compgen -G "$PIDS/*.pid" >/dev/null; then
    log "nothing recorded in $PIDS; nothing to stop"
    remove_conf
    exit 0
fi

# Jobs first, while slurmctld is still up: a running job's slurmstepd outlives slurmd and would be left
# behind otherwise.
if is_ours slurmctld >/dev/null && is_ours slurmd >/dev/null; then
    ids="$(timeout 10 squeue -h -o %A 2>/dev/null || true)"
    if [[ -n "$ids" ]]; then
        log "cancelling jobs: $(echo "$ids" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        timeout 10 scancel $ids 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do
            [[ -z "$(timeout 5 squeue -h -t R,CG,PD -o %A 2>/dev/null || true)" ]] && ! pgrep -x slurmstepd >/dev/null && break
            sleep 0.1
        done
    fi
fi

# Reverse order of start: slurmd, slurmctld (flushes job records to slurmdbd), slurmdbd, the database, munge.
for name in slurmd slurmctld slurmdbd mariadbd munged; do
    stop_one "$name"
done
rm -f "$PIDS"/*.pid
remove_conf

left="$(pgrep -a slurmstepd || true)"
[[ -z "$left" ]] || log "warning: slurmstepd processes are still running: $left"
log "stopped (state kept in $STATE)"
