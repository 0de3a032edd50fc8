#!/usr/bin/env bash
# Build container/Dockerfile on this machine, offline, with Debian's podman: what CI does before it runs the image
# (tests/integration/test_container_image.py), and how an air-gapped site builds it without a registry.
#
#   sudo bash container/build-local.sh [TAG]          # default TAG: localhost/hpc-retrain:local
#   sudo bash container/build-local.sh --tools-only   # step 1 only (.ci/run, before anything else uses apt)
#
# Needs root on Debian/Ubuntu. Each step is skipped when its result is already there:
#   1. podman, runc and debootstrap from apt (crun fails on cgroup-v1 hybrid hosts, so podman runs with runc);
#   2. the base image BASE (default localhost/debian-py:bookworm): a debootstrap minbase with python3, imported
#      into podman (about 2 minutes, once per machine); the Dockerfile's default base is the GPU image from Docker
#      Hub, which is not reachable here;
#   3. a wheelhouse: `pip download` of the project's dependencies with container/constraints.txt (plus its build
#      requirements), into WHEELHOUSE (default ~/.cache/hpc-retrain/wheelhouse, outside the repository; pip's
#      own cache makes a second download quick);
#   4. a clean build context in a temporary folder: the files git knows (tracked, or untracked and not ignored),
#      filtered again by .dockerignore, plus the wheelhouse as container/wheelhouse;
#   5. `podman build --network none` with --build-arg BASE and WHEELHOUSE, so pip installs from the wheels only.
# Every podman call lowers the open-file and process limits (runc refuses this host's hard limits otherwise).
#
# Environment: BASE, WHEELHOUSE, PYTHON (the interpreter whose pip downloads; default .venv/bin/python, else
# python3), DEBIAN_MIRROR, KEEP_CONTEXT=1 (print and keep the temporary context).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
tools_only=0
if [ "${1:-}" = --tools-only ]; then tools_only=1; shift; fi
TAG=${1:-localhost/hpc-retrain:local}
BASE=${BASE:-localhost/debian-py:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELHOUSE=${WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpc-retrain/wheelhouse}
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

log() { printf '[build-local %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

# ---------------------------------------------------------------------------------------- 1. the tools
need=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "${need[*]} missing; install them (apt-get install podman runc debootstrap) or run as root"
    command -v apt-get >/dev/null || die "${need[*]} missing and there is no apt-get to install them"
    log "installing ${need[*]} with apt-get"
    # Lock::Timeout: wait for another apt (slurm/local-cluster/start.sh installs Slurm the same way) to finish.
    apt_get=(apt-get -o DPkg::Lock::Timeout=600 -q)
    if ! apt-cache show podman >/dev/null 2>&1; then "${apt_get[@]}" update >&2; fi
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y podman runc debootstrap >&2 \
        || die "apt-get install podman runc debootstrap failed (see above)"
fi
[ "$tools_only" = 0 ] || exit 0

# ---------------------------------------------------------------------------------------- 2. the base
if "${PODMAN[@]}" image exists "$BASE"; then
    log "base $BASE is there"
else
    case $BASE in localhost/*) ;; *) die "base $BASE is not in podman's storage (this script makes only localhost/ bases)";; esac
    [ "$(id -u)" = 0 ] || die "making the base $BASE with debootstrap needs root"
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/hpc-retrain-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    log "making the base $BASE: debootstrap $SUITE from $MIRROR (about 2 minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip "$SUITE" "$rootfs" "$MIRROR" \
        > "$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; die "debootstrap failed (log above)"; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "base $BASE made"
fi

# ---------------------------------------------------------------------------------------- 3. the wheelhouse
# The base's python3 is what the image installs into; the wheels must be for its version.
base_py=$("${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" "$BASE" \
    python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "python3 does not run in $BASE"
host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$base_py" = "$host_py" ] || log "note: $PYTHON is Python $host_py, the base's is $base_py; downloading for $base_py"
build_reqs=$("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))
EOF
)
mkdir -p "$WHEELHOUSE"
reqs=$(mktemp "${TMPDIR:-/tmp}/hpc-retrain-reqs.XXXXXX")
trap 'rm -f "$reqs"' EXIT
# Dependencies as the wheel declares them (pyproject's [project] dependencies, no extras), then the build backend.
"$PYTHON" - "$ROOT/pyproject.toml" > "$reqs" <<'EOF'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
EOF
printf '%s\n' "$build_reqs" >> "$reqs"
# A download that finished for these requirements, constraints and Python leaves a stamp; with it, nothing to do.
stamp="$WHEELHOUSE/.complete-$(cat "$reqs" "$ROOT/container/constraints.txt" <(echo "$base_py") | sha256sum | cut -c1-16)"
if [ -e "$stamp" ]; then
    log "wheelhouse $WHEELHOUSE is there (${stamp##*/})"
else
    log "wheelhouse $WHEELHOUSE: pip download with container/constraints.txt (Python $base_py)"
    # Wheels only, for the base's interpreter and C library (bookworm: glibc 2.36): nothing is compiled in the
    # image (it has no compiler, no network).
    "$PYTHON" -m pip download -q --disable-pip-version-check -d "$WHEELHOUSE" \
        --only-binary=:all: --python-version "$base_py" --implementation cp \
        $(for p in manylinux_2_{17..36} manylinux2014 linux; do printf -- '--platform %s_%s ' "$p" "$(uname -m)"; done) \
        -c "$ROOT/container/constraints.txt" -r "$reqs" >&2 \
        || die "pip download failed (see above); the wheelhouse needs PyPI or a mirror once"
    touch "$stamp"
fi
rm -f "$reqs"
trap - EXIT

# ---------------------------------------------------------------------------------------- 4. the context
ctx=$(mktemp -d "${TMPDIR:-/tmp}/hpc-retrain-context.XXXXXX")
if [ "${KEEP_CONTEXT:-0}" = 1 ]; then log "context kept in $ctx"; else trap 'rm -rf "$ctx"' EXIT; fi
# The files git knows (tracked, or untracked and not ignored: never .venv or outputs), as they are in the working
# tree, under the paths .dockerignore lets in, plus the Dockerfile and .dockerignore (which podman applies again).
list_files() {
    if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$ROOT" ls-files -z --cached --others --exclude-standard
    else
        (cd "$ROOT" && find . -path ./.venv -prune -o -type f -printf '%P\0')
    fi
}
list_files | (cd "$ROOT" && "$PYTHON" -c '
import os, sys
allowed = [ln.strip()[1:].rstrip("/") for ln in open(".dockerignore") if ln.startswith("!")]
allowed += [".dockerignore", "container/Dockerfile"]
for f in sys.stdin.buffer.read().decode().split("\0"):
    if f and os.path.isfile(f) and any(f == a or f.startswith(a + "/") for a in allowed):
        sys.stdout.buffer.write(f.encode() + b"\0")
' | tar --null -T - -c) | tar -C "$ctx" -x
[ ! -e "$ctx/container/wheelhouse" ] || die "container/wheelhouse is in the repository; it must not be (it is made here)"
# Hard links when the wheelhouse is on the same file system: no copy of the ~700 MB of wheels.
cp -al "$WHEELHOUSE" "$ctx/container/wheelhouse" 2>/dev/null \
    || { rm -rf "$ctx/container/wheelhouse"; cp -a "$WHEELHOUSE" "$ctx/container/wheelhouse"; }

# ---------------------------------------------------------------------------------------- 5. the build
log "building $TAG on $BASE (podman --runtime runc, --network none)"
previous=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
# --format docker keeps the HEALTHCHECK (OCI images have none); --layers keeps each step for the next build.
"${PODMAN[@]}" build --network none "${LIMITS[@]}" --format docker --layers \
    --build-arg BASE="$BASE" --build-arg WHEELHOUSE=container/wheelhouse \
    -f "$ctx/container/Dockerfile" -t "$TAG" "$ctx" >&2
built=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$TAG")
# The image this tag named before, with the steps only it used (GBs each time the dependencies change); kept
# when something else still uses it.
if [ -n "$previous" ] && [ "$previous" != "$built" ]; then
    "${PODMAN[@]}" rmi "$previous" >/dev/null 2>&1 && log "removed the previous $TAG (${previous:0:12})" || true
fi
log "built $TAG (${built:0:12})"
echo "$TAG"
