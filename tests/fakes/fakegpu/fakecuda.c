/* The fake libcuda.so.1: cuInit, versions, error names, the cuDevice* calls Kybernate uses and the
 * process checkpoint API, with the real driver's transitions and error codes (measured on driver
 * 580.159.04, see README.md). State lives in $FAKEGPU_STATE_DIR, keyed by FAKEGPU_PROC. */
#define _GNU_SOURCE
#include "fakegpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FG_EXPORT __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef struct {
    char bytes[16];
} CUuuid;
typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    unsigned long long reserved1[7];
} CUcheckpointLockArgs;
typedef struct {
    unsigned long long reserved[8];
} CUcheckpointCheckpointArgs;
typedef struct {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;
typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    unsigned long long reserved1;
} CUcheckpointRestoreArgs;
typedef struct {
    unsigned long long reserved[8];
} CUcheckpointUnlockArgs;

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "lock args are 64 bytes");
_Static_assert(sizeof(CUcheckpointCheckpointArgs) == 64, "checkpoint args are 64 bytes");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "restore args are 64 bytes");
_Static_assert(sizeof(CUcheckpointUnlockArgs) == 64, "unlock args are 64 bytes");
_Static_assert(sizeof(CUcheckpointGpuPair) == 32, "a gpu pair is two 16-byte uuids");

static int initialized;

static int zeroed(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

static int hang_limit_ms(void) {
    const char *v = getenv("FAKEGPU_HANG_LIMIT_MS");
    return v && *v ? atoi(v) : 60000;
}

/* The driver reaches a process through the process itself: while the target is stopped or its
 * cgroup frozen, every call blocks (timeoutMs does not bound it) and goes on once it runs again.
 * FAKEGPU_HANG_LIMIT_MS caps the wait so a broken test cannot hang forever; the real driver has no cap. */
static int wait_for_target(int pid, int stall_ms) {
    long long start = fg_now_ns();
    int limit = hang_limit_ms();
    for (;;) {
        long long waited_ms = (fg_now_ns() - start) / 1000000;
        if (waited_ms >= stall_ms && !fg_frozen(pid) && !fg_stopped(pid)) return FG_CUDA_SUCCESS;
        if (!fg_alive(pid)) return FG_CUDA_ERROR_OPERATING_SYSTEM;
        if (limit > 0 && waited_ms >= limit) return FG_CUDA_ERROR_TIMEOUT;
        fg_sleep_ms(2);
    }
}

/* Start of every checkpoint call: who is the target, and what the faults file says about it.
 * Returns 0 to go on, else the CUresult to return (already recorded in events.log). */
static int enter_pairs(struct fg_call *call, const char *op, int pid, int pairs, struct fg_env *env,
                       struct fg_fault *fault) {
    fg_call_begin(call, op, pid);
    if (pairs >= 0) call->pairs = pairs; /* a `pairs` fault fails the call below: its event still says how many */
    if (!initialized) {
        fg_call_end(call, FG_CUDA_ERROR_NOT_INITIALIZED, -1);
        return FG_CUDA_ERROR_NOT_INITIALIZED;
    }
    int found = fg_read_env(pid, env);
    if (found == -1) { /* measured: no such pid -> OPERATING_SYSTEM */
        fg_call_end(call, FG_CUDA_ERROR_OPERATING_SYSTEM, -1);
        return FG_CUDA_ERROR_OPERATING_SYSTEM;
    }
    if (found == -2) { /* measured: a live process without CUDA -> NOT_INITIALIZED */
        fg_call_end(call, FG_CUDA_ERROR_NOT_INITIALIZED, -1);
        return FG_CUDA_ERROR_NOT_INITIALIZED;
    }
    snprintf(call->proc, sizeof call->proc, "%s", env->id);
    fg_fault_for(op, env->id, pid, pairs, fault);
    int stall = fault->kind == FG_FAULT_STALL ? fault->ms : 0;
    int rc = wait_for_target(pid, stall);
    if (rc != FG_CUDA_SUCCESS) {
        fg_call_end(call, rc, -1);
        return rc;
    }
    if (fault->kind == FG_FAULT_DELAY) fg_sleep_ms(fault->ms);
    if (fault->kind == FG_FAULT_FAIL || fault->kind == FG_FAULT_BREAK) {
        int fd = fg_lock();
        struct fg_state st;
        fg_load_state(env, &st);
        if (fault->kind == FG_FAULT_BREAK) {
            st.state = FG_FAILED;
            fg_save_state(env->id, &st);
        }
        fg_unlock(fd);
        fg_call_end(call, fault->error, st.state);
        return fault->error;
    }
    return 0;
}

static int enter(struct fg_call *call, const char *op, int pid, struct fg_env *env, struct fg_fault *fault) {
    return enter_pairs(call, op, pid, -1, env, fault);
}

/* Move a process from `from` to `to` under the state lock; ILLEGAL_STATE otherwise (measured). */
static int transition(struct fg_call *call, const struct fg_env *env, int pid, int from, int to) {
    int fd = fg_lock();
    struct fg_state st;
    fg_load_state(env, &st);
    int rc = FG_CUDA_ERROR_ILLEGAL_STATE;
    if (st.state == from) {
        if (to == FG_CHECKPOINTED) {
            struct fg_gpu gpus[FG_MAX_GPUS];
            int n = fg_load_gpus(gpus, FG_MAX_GPUS);
            const struct fg_gpu *g = fg_find_gpu(gpus, n > 0 ? n : 0, st.gpu);
            snprintf(st.gpu_name, sizeof st.gpu_name, "%s", g ? g->name : "");
        }
        st.state = to;
        st.last_pid = pid;
        rc = fg_save_state(env->id, &st) == 0 ? FG_CUDA_SUCCESS : FG_CUDA_ERROR_OPERATING_SYSTEM;
    }
    fg_unlock(fd);
    snprintf(call->gpu, sizeof call->gpu, "%s", st.gpu);
    fg_call_end(call, rc, st.state);
    return rc;
}

int fg_get_state(int pid, int *state) {
    struct fg_call call;
    struct fg_env env;
    struct fg_fault fault;
    int rc = enter(&call, "get_state", pid, &env, &fault);
    if (rc) return rc;
    if (!state) {
        fg_call_end(&call, FG_CUDA_ERROR_INVALID_VALUE, -1);
        return FG_CUDA_ERROR_INVALID_VALUE;
    }
    struct fg_state st;
    fg_load_state(&env, &st);
    *state = st.state;
    snprintf(call.gpu, sizeof call.gpu, "%s", st.gpu);
    fg_call_end(&call, FG_CUDA_SUCCESS, st.state);
    return FG_CUDA_SUCCESS;
}

int fg_get_restore_tid(int pid, int *tid) {
    struct fg_call call;
    struct fg_env env;
    struct fg_fault fault;
    int rc = enter(&call, "restore_tid", pid, &env, &fault);
    if (rc) return rc;
    struct fg_state st;
    fg_load_state(&env, &st);
    if (!tid) rc = FG_CUDA_ERROR_INVALID_VALUE;
    else *tid = pid; /* the real driver names a helper thread of the process; the fake has none */
    fg_call_end(&call, rc, st.state);
    return rc;
}

int fg_do_lock(int pid, unsigned timeout_ms) {
    struct fg_call call;
    struct fg_env env;
    struct fg_fault fault;
    int rc = enter(&call, "lock", pid, &env, &fault);
    if (rc) return rc;
    struct fg_state st;
    fg_load_state(&env, &st);
    if (st.state != FG_RUNNING) {
        fg_call_end(&call, FG_CUDA_ERROR_ILLEGAL_STATE, st.state);
        return FG_CUDA_ERROR_ILLEGAL_STATE;
    }
    if (fault.kind == FG_FAULT_BUSY) {
        /* Submitted GPU work that takes `ms` to drain: the lock waits for it, up to timeoutMs (0: forever),
         * and a timed-out lock leaves the process RUNNING. */
        if (timeout_ms > 0 && (unsigned)fault.ms > timeout_ms) {
            fg_sleep_ms((int)timeout_ms);
            fg_call_end(&call, FG_CUDA_ERROR_TIMEOUT, FG_RUNNING);
            return FG_CUDA_ERROR_TIMEOUT;
        }
        fg_sleep_ms(fault.ms);
    }
    return transition(&call, &env, pid, FG_RUNNING, FG_LOCKED);
}

int fg_do_checkpoint(int pid) {
    struct fg_call call;
    struct fg_env env;
    struct fg_fault fault;
    int rc = enter(&call, "checkpoint", pid, &env, &fault);
    if (rc) return rc;
    return transition(&call, &env, pid, FG_LOCKED, FG_CHECKPOINTED);
}

int fg_do_unlock(int pid) {
    struct fg_call call;
    struct fg_env env;
    struct fg_fault fault;
    int rc = enter(&call, "unlock", pid, &env, &fault);
    if (rc) return rc;
    return transition(&call, &env, pid, FG_LOCKED, FG_RUNNING);
}

int fg_do_restore(int pid, const struct fg_pair *pairs, unsigned count) {
    struct fg_call call;
    struct fg_env env;
    struct fg_fault fault;
    int rc = enter_pairs(&call, "restore", pid, (int)count, &env, &fault);
    if (rc) return rc;

    int fd = fg_lock();
    struct fg_state st;
    fg_load_state(&env, &st);
    snprintf(call.gpu, sizeof call.gpu, "%s", st.gpu);
    if (st.state != FG_CHECKPOINTED) {
        rc = FG_CUDA_ERROR_ILLEGAL_STATE;
    } else if (st.poisoned) {
        rc = FG_CUDA_ERROR_OPERATING_SYSTEM; /* measured: every restore after an out-of-memory one */
    } else {
        char target[FG_UUID_LEN];
        snprintf(target, sizeof target, "%s", st.gpu);
        if (count > 0) {
            /* Pairs must name the GPU the process was checkpointed on (measured: INVALID_VALUE). */
            unsigned char had[16];
            int matched = 0;
            if (fg_uuid_parse(st.gpu, had) == 0)
                for (unsigned i = 0; i < count && !matched; i++)
                    if (memcmp(pairs[i].old_uuid, had, 16) == 0) {
                        fg_uuid_format(pairs[i].new_uuid, target, sizeof target);
                        matched = 1;
                    }
            if (!matched) rc = FG_CUDA_ERROR_INVALID_VALUE;
        }
        struct fg_gpu gpus[FG_MAX_GPUS];
        int n = fg_load_gpus(gpus, FG_MAX_GPUS);
        const struct fg_gpu *g = rc ? NULL : fg_find_gpu(gpus, n > 0 ? n : 0, target);
        if (!rc && !g) rc = FG_CUDA_ERROR_INVALID_VALUE; /* measured for an unknown pair target */
        if (!rc && st.gpu_name[0] && strcmp(st.gpu_name, g->name) != 0) rc = FG_CUDA_ERROR_INVALID_VALUE;
        if (!rc) {
            unsigned long long used = fg_used_on(g->uuid, env.id);
            unsigned long long free_bytes = g->total > used ? g->total - used : 0;
            snprintf(call.gpu, sizeof call.gpu, "%s", g->uuid);
            if (st.vram > free_bytes) {
                rc = FG_CUDA_ERROR_OUT_OF_MEMORY; /* and the process is stuck from now on (issue 44) */
                st.poisoned = 1;
            } else {
                snprintf(st.gpu, sizeof st.gpu, "%s", g->uuid);
                st.state = FG_LOCKED;
                st.last_pid = pid;
            }
            fg_save_state(env.id, &st);
        }
    }
    fg_unlock(fd);
    fg_call_end(&call, rc, st.state);
    return rc;
}

/* ---- the exported driver API ------------------------------------------------------------------ */

FG_EXPORT CUresult cuInit(unsigned int flags) {
    if (flags != 0) return FG_CUDA_ERROR_INVALID_VALUE;
    struct fg_gpu gpus[FG_MAX_GPUS];
    if (!fg_state_dir() || fg_load_gpus(gpus, FG_MAX_GPUS) <= 0) return FG_CUDA_ERROR_NO_DEVICE;
    __atomic_store_n(&initialized, 1, __ATOMIC_SEQ_CST);
    return FG_CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDriverGetVersion(int *version) {
    if (!version) return FG_CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return FG_CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGetErrorName(CUresult error, const char **out) {
    if (!out) return FG_CUDA_ERROR_INVALID_VALUE;
    *out = fg_error_name(error);
    return *out ? FG_CUDA_SUCCESS : FG_CUDA_ERROR_INVALID_VALUE;
}

FG_EXPORT CUresult cuGetErrorString(CUresult error, const char **out) {
    if (!out) return FG_CUDA_ERROR_INVALID_VALUE;
    *out = fg_error_string(error);
    return *out ? FG_CUDA_SUCCESS : FG_CUDA_ERROR_INVALID_VALUE;
}

FG_EXPORT CUresult cuDeviceGetCount(int *count) {
    if (!initialized) return FG_CUDA_ERROR_NOT_INITIALIZED;
    if (!count) return FG_CUDA_ERROR_INVALID_VALUE;
    struct fg_gpu gpus[FG_MAX_GPUS];
    int n = fg_load_gpus(gpus, FG_MAX_GPUS);
    *count = n > 0 ? n : 0;
    return FG_CUDA_SUCCESS;
}

static const struct fg_gpu *device(CUdevice dev, struct fg_gpu *gpus) {
    int n = fg_load_gpus(gpus, FG_MAX_GPUS);
    return (dev >= 0 && dev < n) ? &gpus[dev] : NULL;
}

FG_EXPORT CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    if (!initialized) return FG_CUDA_ERROR_NOT_INITIALIZED;
    struct fg_gpu gpus[FG_MAX_GPUS];
    if (!dev) return FG_CUDA_ERROR_INVALID_VALUE;
    if (!device(ordinal, gpus)) return FG_CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return FG_CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) {
    if (!initialized) return FG_CUDA_ERROR_NOT_INITIALIZED;
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g = device(dev, gpus);
    if (!uuid) return FG_CUDA_ERROR_INVALID_VALUE;
    if (!g) return FG_CUDA_ERROR_INVALID_DEVICE;
    unsigned char b[16];
    if (fg_uuid_parse(g->uuid, b) != 0) return FG_CUDA_ERROR_INVALID_DEVICE;
    memcpy(uuid->bytes, b, 16);
    return FG_CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { return cuDeviceGetUuid_v2(uuid, dev); }

FG_EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    if (!initialized) return FG_CUDA_ERROR_NOT_INITIALIZED;
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g = device(dev, gpus);
    if (!name || len <= 0) return FG_CUDA_ERROR_INVALID_VALUE;
    if (!g) return FG_CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "%s", g->name);
    return FG_CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    if (!initialized) return FG_CUDA_ERROR_NOT_INITIALIZED;
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g = device(dev, gpus);
    if (!bytes) return FG_CUDA_ERROR_INVALID_VALUE;
    if (!g) return FG_CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)g->total;
    return FG_CUDA_SUCCESS;
}

FG_EXPORT CUresult cuCheckpointProcessGetState(int pid, int *state) { return fg_get_state(pid, state); }

FG_EXPORT CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) { return fg_get_restore_tid(pid, tid); }

FG_EXPORT CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    if (args && (args->reserved0 || !zeroed(args->reserved1, sizeof args->reserved1)))
        return FG_CUDA_ERROR_INVALID_VALUE; /* reserved fields must be zero */
    return fg_do_lock(pid, args ? args->timeoutMs : 0);
}

FG_EXPORT CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args) {
    if (args && !zeroed(args, sizeof *args)) return FG_CUDA_ERROR_INVALID_VALUE;
    return fg_do_checkpoint(pid);
}

FG_EXPORT CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args) {
    if (!args) return fg_do_restore(pid, NULL, 0);
    if (!zeroed(args->reserved, sizeof args->reserved) || args->reserved1) return FG_CUDA_ERROR_INVALID_VALUE;
    if (args->gpuPairsCount > 0 && !args->gpuPairs) return FG_CUDA_ERROR_INVALID_VALUE;
    struct fg_pair *pairs = NULL;
    if (args->gpuPairsCount > 0) {
        pairs = calloc(args->gpuPairsCount, sizeof *pairs);
        if (!pairs) return FG_CUDA_ERROR_OUT_OF_MEMORY;
        for (unsigned i = 0; i < args->gpuPairsCount; i++) {
            memcpy(pairs[i].old_uuid, args->gpuPairs[i].oldUuid.bytes, 16);
            memcpy(pairs[i].new_uuid, args->gpuPairs[i].newUuid.bytes, 16);
        }
    }
    int rc = fg_do_restore(pid, pairs, args->gpuPairsCount);
    free(pairs);
    return rc;
}

FG_EXPORT CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args) {
    if (args && !zeroed(args, sizeof *args)) return FG_CUDA_ERROR_INVALID_VALUE;
    return fg_do_unlock(pid);
}
