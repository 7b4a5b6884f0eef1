#!/bin/bash
# Kybernate GPU end-to-end run. Runs ON the GPU machine, from the repository root, as root:
#   PYTHONUNBUFFERED=1 bash tests/gpu/on_gpu.sh [options] 2>&1 | tee $OUT/run.log
# (through the device tool: carry [".carry"]; build it first here with tests/gpu/build_carry.sh).
#
# It probes the machine, unpacks .carry (containerd 1.6.20, its runc shim, ctr, runc, CRIU + libs,
# busybox, wheels), installs the wheels with pip --no-index --target, starts a private containerd
# (own root/state/sockets under $KYB_BASE), imports a skeleton image whose container gets the host's
# /usr, /etc, python + torch dirs and driver libraries as read-only bind mounts plus the
# /dev/nvidia* devices, and runs the scenarios of tests/gpu/scenario.py. Results go to $OUT
# (at most 8 files: probe.txt, results.json, summary.txt, logs.tgz, + the caller's run.log).
#
# Options:
#   --runtime runc|kybernate   runc: stock runc shim, GPU steps done by scenario.py through ctypes.
#                              kybernate: our shim + kybernate-hookd do the GPU steps inside ctr's calls.
#   --scenario LIST            comma-separated: driver-floor exit-restore leave-running pause-resume
#                              export-import remap programs remap2 ddp pair
#                              (default: driver-floor,exit-restore,pause-resume,leave-running);
#                              `s3` alone: the S3 tier's throughput vs boto3's plain copies (no containerd; carry
#                              .carry-s3; KYB_S3_MIB (4096), KYB_S3_RUNS (3), KYB_S3_SWEEP (16,32), KYB_CARRY_S3)
#   --vram-gib N               VRAM the workload fills (default 2.6)
#   --cycles N                 driver-floor cycles (default 3)
#   --own-netns                give the container its own network namespace (default: host network,
#                              so CRIU needs neither `ip` nor `iptables-save` on the host)
#   --no-gpu                   plumbing test on a CPU machine: workload without torch, no driver steps
#   --probe-only               only write probe.txt
#   --timeout S                wall-clock limit for scenario.py (default 420)
#   --keep                     leave containerd running and $KYB_BASE in place at the end
# Environment: OUT (results dir, default /tmp/kyb-gpu-out), KYB_BASE (work dir, default /tmp/kyb-gpu),
#   KYB_CARRY (default <repo>/.carry), KYB_CRIU_CONF (text written to /etc/criu/runc.conf if set),
#   KYB_STEP_TIMEOUT (seconds for one ctr checkpoint/restore/export/import, default 180),
#   KYB_SCENARIO_ARGS (more scenario.py options, e.g. "--programs train-fork,compile"),
#   KYB_HOOKD_ARGS (more kybernate-hookd flags, e.g. "--standby ..."; `--scenario standby` runs
#   tests/gpu/standby_scenario.py instead of scenario.py).
set -uo pipefail

RUNTIME=runc
SCENARIOS=driver-floor,exit-restore,pause-resume,leave-running
VRAM=2.6
CYCLES=3
NO_GPU=0
PROBE_ONLY=0
KEEP=0
OWN_NETNS=0
TIMEOUT=420
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=$2; shift 2 ;;
        --scenario|--scenarios) SCENARIOS=$2; shift 2 ;;
        --vram-gib) VRAM=$2; shift 2 ;;
        --cycles) CYCLES=$2; shift 2 ;;
        --no-gpu) NO_GPU=1; shift ;;
        --probe-only) PROBE_ONLY=1; shift ;;
        --own-netns) OWN_NETNS=1; shift ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
case "$RUNTIME" in runc|kybernate) ;; *) echo "--runtime must be runc or kybernate" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-/tmp/kyb-gpu-out}
BASE=${KYB_BASE:-/tmp/kyb-gpu}
CARRY=${KYB_CARRY:-$REPO/.carry}
NS=kybgpu
IMAGE=docker.io/kybernate/gpu-skeleton:latest
ADDR=$BASE/containerd.sock
# The checkpoint store (docs/store.md): the shim (containerd's environment), hookd and the CLI share it.
export KYBERNATE_STORE=${KYBERNATE_STORE:-$BASE/store}
export PYTHONUNBUFFERED=1
PY=${KYB_PY:-$(command -v python3)}
mkdir -p "$OUT"
T_START=$(date +%s.%N)
say() { echo "[on_gpu $(date +%H:%M:%S)] $*"; }
elapsed() { python3 -c "import time; print(round(time.time() - $T_START, 1))"; }

# ------------------------------------------------------------------------------------------------
# 1. probe: what this machine has (facts for docs/gpu-probe.md)
# ------------------------------------------------------------------------------------------------
probe() {
    local c
    sec() { echo; echo "### $*"; }
    echo "# probe $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    sec uname; uname -a
    sec os-release; grep -E '^(PRETTY_NAME|VERSION_ID)=' /etc/os-release
    sec cpu/mem; nproc; free -m; cat /sys/kernel/mm/transparent_hugepage/enabled 2>&1
    sec disk; df -hT / /tmp /run /var 2>&1 | sort -u
    sec nvidia-smi; nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total,memory.used,persistence_mode --format=csv 2>&1
    nvidia-smi 2>&1 | sed -n '1,12p'
    sec devices; ls -la /dev/nvidia* 2>&1; ls /dev/nvidia-caps 2>&1
    sec driver dir; ls -la /usr/local/nvidia 2>&1; ls /usr/local/nvidia/lib64 2>&1 | grep -E 'libcuda|libnvidia-ml' | head
    grep -E ' /usr/local/nvidia | /usr | /opt | /etc ' /proc/self/mountinfo
    sec python; echo "python3=$PY -> $(readlink -f "$PY")"
    timeout 120 "$PY" - <<'EOF' 2>&1
import sys, time
t = time.time()
import torch
print("sys.version", sys.version.replace("\n", " "))
print("sys.prefix", sys.prefix, "base_prefix", sys.base_prefix, "executable", sys.executable)
print("torch", torch.__version__, torch.__file__, "cuda", torch.version.cuda, "import_s", round(time.time() - t, 2))
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("grpc", "google.protobuf", "pynvml", "pyroute2"):
    try:
        mod = __import__(m, fromlist=["x"])
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", "?"))
    except Exception as e:
        print(m, "MISSING", e)
EOF
    sec env; env | grep -E '^(PATH|LD_LIBRARY_PATH|CUDA|NVIDIA|NCCL|TORCH|NVSHMEM|PYTHON)' | sort
    sec root links; ls -ld /bin /sbin /lib /lib64 /lib32 /libx32 2>&1
    sec cgroup; stat -fc %T /sys/fs/cgroup; cat /proc/self/cgroup; ls /sys/fs/cgroup | head -30
    cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null
    sec run writable; grep -E ' /run | /tmp ' /proc/self/mountinfo
    if mkdir -p /run/containerd/s 2>&1 && touch /run/containerd/.kyb-probe 2>&1; then
        echo "/run writable"; rm -f /run/containerd/.kyb-probe
    else echo "/run NOT writable"; fi
    sec tools; for c in ip iptables-save nft tar xz systemctl runc containerd criu cuda-checkpoint; do
        printf '%-16s %s\n' "$c" "$(command -v $c || echo -)"; done
    sec kernel config
    if [ -r /proc/config.gz ]; then
        zcat /proc/config.gz | grep -E '^CONFIG_(CHECKPOINT_RESTORE|MEM_SOFT_DIRTY|USERFAULTFD|NF_TABLES|OVERLAY_FS|CGROUP_FREEZER|TIME_NS|NAMESPACES)='
    else
        ls /boot 2>&1 | head -3
    fi
    sec mountinfo; cat /proc/self/mountinfo
}

say "probe -> $OUT/probe.txt"
probe >"$OUT/probe.txt" 2>&1
grep -A3 -E '^### (uname|nvidia-smi|python|cgroup|run writable)$' "$OUT/probe.txt" | head -40
[ "$PROBE_ONLY" = 1 ] && exit 0

# ------------------------------------------------------------------------------------------------
# the s3 scenario (issue 11): the store's S3 transfers vs boto3's plain copies against one S3 server
# (rclone serve s3 on 127.0.0.1, objects on this machine's disk) in the same run. No containerd, no GPU;
# its own carry: .carry-s3 (tests/gpu/build_carry.sh --s3), carried as [".carry-s3"].
# ------------------------------------------------------------------------------------------------
if [ "$SCENARIOS" = s3 ]; then
    CARRY_S3=${KYB_CARRY_S3:-$REPO/.carry-s3}
    for f in rclone.xz wheels kybernate; do
        [ -e "$CARRY_S3/$f" ] || { say "MISSING $CARRY_S3/$f (run tests/gpu/build_carry.sh --s3)"; exit 1; }
    done
    rm -rf "$BASE"; mkdir -p "$BASE/site" "$BASE/bin"
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --target "$BASE/site" \
        "$CARRY_S3"/wheels/*.whl "$CARRY_S3"/kybernate/kybernate-*.whl 2>&1 | tail -3
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$CARRY_S3/rclone.xz" "$BASE/bin/rclone" && chmod +x "$BASE/bin/rclone"
    {
        echo; echo "### s3 scenario"; "$BASE/bin/rclone" version | head -1
        PYTHONPATH=$BASE/site "$PY" -c 'import boto3, s3transfer; print("boto3", boto3.__version__, "s3transfer", s3transfer.__version__)'
        df -hT "$BASE"; echo "sequential write, 4 GiB, fsync'd:"
        dd if=/dev/zero of="$BASE/dd" bs=4M count=1024 conv=fsync 2>&1 | tail -1; rm -f "$BASE/dd"
    } >>"$OUT/probe.txt" 2>&1
    sed -n '/^### s3 scenario/,$p' "$OUT/probe.txt"
    say "s3: ${KYB_S3_MIB:-4096} MiB, ${KYB_S3_RUNS:-3} rounds, scratch on $BASE (setup done at +$(elapsed)s)"
    # KYB_S3_SWEEP: more store rows with other numbers of parts in flight per file (default 16,32).
    timeout --signal=TERM --kill-after=10 "$TIMEOUT" \
        env PYTHONPATH="$BASE/site" KYB_RCLONE="$BASE/bin/rclone" "$PY" "$REPO/tests/bench/bench_store.py" --s3 \
        --mib "${KYB_S3_MIB:-4096}" --runs "${KYB_S3_RUNS:-3}" --dir "$BASE" \
        --s3-part-concurrency "${KYB_S3_SWEEP-16,32}" --json "$OUT/results.json" 2>&1 | tee "$OUT/summary.txt"
    RC=${PIPESTATUS[0]}
    rm -rf "$BASE"
    say "done rc=$RC, wall $(elapsed)s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    exit "$RC"
fi

# ------------------------------------------------------------------------------------------------
# 2. unpack the carry, install the wheels
# ------------------------------------------------------------------------------------------------
cleanup_old() {
    if [ -f "$BASE/containerd.pid" ]; then
        kill "$(cat "$BASE/containerd.pid")" 2>/dev/null; sleep 1
    fi
    # runc state of our namespace from an earlier run on this machine
    rm -rf "/run/containerd/runc/$NS" 2>/dev/null
    umount -R "$BASE/root" 2>/dev/null
    rm -rf "$BASE"
}
cleanup_old
mkdir -p "$BASE"/{carry,bin,root,state,tmp,out,logs,site,criu-work}
for t in containerd-1.6.20 runc criu; do
    if [ ! -f "$CARRY/$t.tar.xz" ]; then say "MISSING $CARRY/$t.tar.xz (run tests/gpu/build_carry.sh)"; exit 1; fi
    mkdir -p "$BASE/carry/$t"
    if command -v xz >/dev/null; then
        tar -C "$BASE/carry/$t" -xJf "$CARRY/$t.tar.xz"
    else  # no xz binary: python's lzma
        "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$CARRY/$t.tar.xz" "$BASE/carry/$t"
    fi || { say "unpack $t failed"; exit 1; }
done
for b in containerd containerd-shim-runc-v2 ctr; do ln -s "$BASE/carry/containerd-1.6.20/bin/$b" "$BASE/bin/$b"; done
cat >"$BASE/bin/runc" <<EOF
#!/bin/sh
LD_LIBRARY_PATH=$BASE/carry/runc/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $BASE/carry/runc/bin/runc "\$@"
EOF
cat >"$BASE/bin/criu" <<EOF
#!/bin/sh
LD_LIBRARY_PATH=$BASE/carry/criu/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $BASE/carry/criu/bin/criu "\$@"
EOF
chmod +x "$BASE/bin/runc" "$BASE/bin/criu"
cp "$CARRY/busybox" "$BASE/bin/busybox" 2>/dev/null
# pip compiles the bytecode at install (no --no-compile): this image sets PYTHONDONTWRITEBYTECODE=1, so without it
# every python process (the `kybernate` CLI, every shim, hookd) compiled every module of grpc, protobuf and
# kybernate at every start (the CLI's process: 0.39 s -> 0.22 s on the CPU machine, docs/benchmarks.md).
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$BASE/site" \
        "$CARRY"/wheels/*.whl 2>&1 | tail -3
fi
if [ -n "${KYB_CRIU_CONF:-}" ]; then mkdir -p /etc/criu && printf '%s\n' "$KYB_CRIU_CONF" >/etc/criu/runc.conf; fi
{
    echo; echo "### carried tools"
    "$BASE/bin/containerd" --version; "$BASE/bin/ctr" --version; "$BASE/bin/runc" --version
    "$BASE/bin/criu" --version; echo "criu check:"; "$BASE/bin/criu" check 2>&1 | tail -5
    echo "wheels in $BASE/site:"; ls "$BASE/site" | grep -iE 'dist-info$'
    PYTHONPATH=$BASE/site "$PY" -c 'import grpc, google.protobuf, pynvml, pyroute2; print("site imports ok", grpc.__version__, google.protobuf.__version__)' 2>&1
} >>"$OUT/probe.txt" 2>&1
sed -n '/^### carried tools/,$p' "$OUT/probe.txt"
say "setup done at +$(elapsed)s"

# ------------------------------------------------------------------------------------------------
# 3. private containerd 1.6.20 (config v2)
# ------------------------------------------------------------------------------------------------
# cgroups: runc needs a mounted hierarchy; mount cgroup2 only where nothing is mounted at all.
if [ -z "$(ls -A /sys/fs/cgroup 2>/dev/null)" ]; then
    say "no cgroup fs mounted: mounting cgroup2"; mount -t cgroup2 none /sys/fs/cgroup
fi
# The 1.6 shim puts its socket in /run/containerd/s and runc its state in /run/containerd/runc.
if ! mkdir -p /run/containerd/s /run/containerd/fifo 2>/dev/null; then
    say "/run not writable: tmpfs on /run/containerd"; mkdir -p /run/containerd 2>/dev/null
    mount -t tmpfs -o mode=0711 tmpfs /run/containerd && mkdir -p /run/containerd/s /run/containerd/fifo
fi

cat >"$BASE/config.toml" <<EOF
version = 2
root = "$BASE/root"
state = "$BASE/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "$ADDR"
[ttrpc]
  address = "$ADDR.ttrpc"
[debug]
  address = "$BASE/debug.sock"
  level = "debug"
[metrics]
  address = ""

# ctr needs no runtime entry: --runtime io.containerd.kybernate.v1 makes containerd exec
# containerd-shim-kybernate-v1 from its PATH ($BASE/bin comes first).
EOF

CTRD_PATH="$BASE/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
kybernate_setup() {
    # The kybernate runtime: our wheel into $BASE/site, the shim binary on containerd's PATH (a wrapper
    # running it with this machine's python), and kybernate-hookd on its default socket.
    local whl
    whl=$(ls "$CARRY"/kybernate/kybernate-*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] || { say "no kybernate wheel in $CARRY/kybernate (run tests/gpu/build_carry.sh)"; return 3; }
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$BASE/site" "$whl" \
        || return 3
    cat >"$BASE/bin/containerd-shim-kybernate-v1" <<SHIM
#!/bin/sh
PYTHONPATH=$BASE/site exec $PY -c 'import sys; from kybernate.shim.cli import main; sys.exit(main())' "\$@"
SHIM
    chmod +x "$BASE/bin/containerd-shim-kybernate-v1"
    "$BASE/bin/containerd-shim-kybernate-v1" -v || return 3
    # The pass lane (shim/native/passlane.c), built here as the installer builds it on a node; the pod daemons
    # find it through KYBERNATE_PASSLANE in containerd's environment. Without a compiler they serve in Python.
    PASSLANE=""
    if command -v cc >/dev/null && cc -O2 -shared -fPIC -pthread -o "$BASE/kybernate-passlane.so" \
            "$BASE/site/kybernate/shim/native/passlane.c"; then
        PASSLANE="$BASE/kybernate-passlane.so"
        say "pass lane built: $PASSLANE"
    else
        say "no pass lane (no cc, or it did not build): pod daemons pass every call through Python"
    fi
    mkdir -p /run/kybernate
    # hookd owns the checkpoint store (docs/store.md): it reaches our private containerd and writes $BASE/store,
    # which the shims read too (KYBERNATE_STORE in containerd's environment below).
    PYTHONPATH=$BASE/site setsid "$PY" -m kybernate.hooks.hookd.daemon --socket /run/kybernate/hookd.sock \
        --libcuda "${KYB_LIBCUDA:-/usr/local/nvidia/lib64/libcuda.so.1}" --metrics-address 127.0.0.1:9464 --log-level info \
        --containerd-address "$ADDR" --store-root "$KYBERNATE_STORE" --store-registry "$BASE/registry.db" \
        ${KYB_HOOKD_ARGS:-} >"$BASE/hookd.log" 2>&1 </dev/null &
    echo $! >"$BASE/hookd.pid"
    for _ in $(seq 1 100); do
        [ -S /run/kybernate/hookd.sock ] && break
        sleep 0.1
    done
    [ -S /run/kybernate/hookd.sock ] || { say "hookd did not come up:"; tail -20 "$BASE/hookd.log"; return 3; }
    say "kybernate-hookd up (pid $(cat "$BASE/hookd.pid")) after $(elapsed)s"
    return 0
}
if [ "$RUNTIME" = kybernate ]; then
    kybernate_setup || { echo '{"error": "kybernate runtime setup failed"}' >"$OUT/results.json"; exit 3; }
fi

say "starting containerd (root $BASE/root, state $BASE/state, socket $ADDR)"
env -i PATH="$CTRD_PATH" HOME=/root XDG_RUNTIME_DIR="$BASE/tmp" TMPDIR="$BASE/tmp" \
    KYBERNATE_STORE="$KYBERNATE_STORE" KYBERNATE_REGISTRY="$BASE/registry.db" \
    KYBERNATE_PASSLANE="${PASSLANE:-off}" \
    "$BASE/bin/containerd" --config "$BASE/config.toml" >"$BASE/containerd.log" 2>&1 &
echo $! >"$BASE/containerd.pid"
CTR=("$BASE/bin/ctr" --address "$ADDR" --namespace "$NS")
CTRD_UP=0
for _ in $(seq 1 100); do
    if "${CTR[@]}" version >/dev/null 2>&1; then CTRD_UP=1; break; fi
    sleep 0.2
done
SNAP=overlayfs
if [ "$CTRD_UP" = 1 ]; then
    "${CTR[@]}" version | sed 's/^/  /'
    if ! "${CTR[@]}" plugins ls | grep -E 'io.containerd.snapshotter.v1 +overlayfs .* ok' >/dev/null; then
        SNAP=native
    fi
    say "snapshotter: $SNAP"
    "${CTR[@]}" plugins ls | grep -E 'snapshotter|runtime' >>"$OUT/probe.txt"

    # --------------------------------------------------------------------------------------------
    # 4. the skeleton image (no registry: OCI layout tar imported locally)
    # --------------------------------------------------------------------------------------------
    "$PY" "$REPO/tests/gpu/mkimage.py" --out "$BASE/image.tar" --name "$IMAGE" --busybox "$BASE/bin/busybox" \
        >"$BASE/image.json" && cat "$BASE/image.json"
    if ! "${CTR[@]}" images import --snapshotter "$SNAP" "$BASE/image.tar" 2>&1; then
        say "image import failed"; CTRD_UP=0
    fi
    "${CTR[@]}" images ls
else
    say "containerd did not come up:"; tail -30 "$BASE/containerd.log"
fi
say "containerd ready=$CTRD_UP at +$(elapsed)s"

# ------------------------------------------------------------------------------------------------
# 5. scenarios
# ------------------------------------------------------------------------------------------------
if [ "$CTRD_UP" != 1 ]; then
    # Without containerd only the driver floor can be measured.
    SCENARIOS=$(echo "$SCENARIOS" | tr , '\n' | grep -x driver-floor | paste -sd, -)
fi
EXTRA=()
[ "$NO_GPU" = 1 ] && EXTRA+=(--no-gpu)
[ "$OWN_NETNS" = 1 ] && EXTRA+=(--own-netns)
# More scenario.py options, e.g. KYB_SCENARIO_ARGS="--programs train-fork,compile --program-steps 300".
read -r -a MORE <<<"${KYB_SCENARIO_ARGS:-}"
EXTRA+=("${MORE[@]}")
RC=0
if [ -n "$SCENARIOS" ]; then
    say "scenarios: $SCENARIOS (runtime $RUNTIME, vram ${VRAM} GiB)"
    timeout --signal=TERM --kill-after=10 "$TIMEOUT" \
        env PYTHONPATH="$BASE/site" "$PY" "$REPO/tests/gpu/$([ "$SCENARIOS" = standby ] && echo standby_scenario.py || echo scenario.py)" \
        --ctr "$BASE/bin/ctr" --address "$ADDR" --namespace "$NS" --image "$IMAGE" --snapshotter "$SNAP" \
        --base "$BASE" --state "$BASE/state" --runtime "$RUNTIME" --scenario "$SCENARIOS" \
        --vram-gib "$VRAM" --cycles "$CYCLES" --step-timeout "${KYB_STEP_TIMEOUT:-180}" \
        --results "$OUT/results.json" --store "$BASE/store" "${EXTRA[@]}" \
        2>&1 | tee "$BASE/scenario.log"
    RC=${PIPESTATUS[0]}
    sed -n '/^==== summary/,$p' "$BASE/scenario.log" >"$OUT/summary.txt"
fi
say "scenarios rc=$RC at +$(elapsed)s"

# ------------------------------------------------------------------------------------------------
# 6. teardown + logs
# ------------------------------------------------------------------------------------------------
if [ "$CTRD_UP" = 1 ] && [ "$KEEP" != 1 ]; then
    for t in $("${CTR[@]}" task ls -q 2>/dev/null); do "${CTR[@]}" task kill -s SIGKILL "$t" 2>/dev/null; done
    sleep 0.5
    for t in $("${CTR[@]}" task ls -q 2>/dev/null); do "${CTR[@]}" task delete "$t" 2>/dev/null; done
    for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do "${CTR[@]}" containers delete "$c" 2>/dev/null; done
fi
if [ "$KEEP" != 1 ]; then
    kill "$(cat "$BASE/containerd.pid")" 2>/dev/null
    [ -f "$BASE/hookd.pid" ] && kill "$(cat "$BASE/hookd.pid")" 2>/dev/null
    sleep 0.5
fi
# Whether the pod daemons served through the pass lane, and how many calls it took without Python.
grep -o 'lane=[A-Za-z]*\|lane_calls=[0-9]*' "$BASE/containerd.log" 2>/dev/null | sort | uniq -c >"$OUT/lane.txt" || true
(cd "$BASE" && tar -czf "$OUT/logs.tgz" --ignore-failed-read containerd.log hookd.log config.toml image.json scenario.log \
    logs out 2>/dev/null)
say "done rc=$RC, wall $(elapsed)s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ "$KEEP" != 1 ]; then
    umount -R "$BASE/root" 2>/dev/null
    rm -rf "$BASE/root" "$BASE/tmp"  # checkpoint images can be GBs
fi
exit "$RC"
