#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian 12 / Ubuntu machine: system packages (QEMU,
# busybox-static, Chromium, a Python with venv), a Debian guest kernel unpacked into
# .cache/guest-kernel (never installed as the host kernel), and the project's virtualenv in
# .venv with memvisor and its development tools. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "setup: system packages need root (run as root or install sudo)" >&2; exit 1
    fi
fi

APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio zstd python3 python3-venv
              python3.11 chromium chromium-driver ca-certificates
              gcc libc6-dev)  # gcc: the TCG counting plugin (memvisor.introspect.tcgcount)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "system packages present"
fi

# Guest kernel: the Debian kernel package, unpacked (not installed) into .cache/guest-kernel.
KDIR="$ROOT/.cache/guest-kernel"
if [ ! -f "$KDIR/.complete" ]; then
    log "fetching the Debian guest kernel"
    [ -n "$(apt-cache policy linux-image-amd64 | awk '/Candidate/ {print $2}')" ] || $SUDO apt-get update -qq
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$kpkg" ] || { echo "setup: cannot find the package behind linux-image-amd64" >&2; exit 1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download "$kpkg" >/dev/null)
    rm -rf "$KDIR"; mkdir -p "$KDIR"
    dpkg-deb -x "$tmp"/*.deb "$KDIR/root"
    rm -rf "$tmp"
    echo "$kpkg" > "$KDIR/package"
    touch "$KDIR/.complete"
    log "guest kernel $kpkg unpacked into $KDIR"
else
    log "guest kernel present: $(cat "$KDIR/package")"
fi

# Python: the project's virtualenv (Python >= 3.11).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in python3.11 python3; do
        if command -v "$c" >/dev/null && "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PY=$c; break
        fi
    done
fi
[ -n "$PY" ] || { echo "setup: no Python >= 3.11 with venv found" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.memvisor-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing memvisor and its tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
else
    log ".venv up to date"
fi
log "done"
