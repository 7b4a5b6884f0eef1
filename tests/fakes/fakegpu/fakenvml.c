/* The fake libnvidia-ml.so.1: the NVML functions nvidia-ml-py resolves for GPU inventory, memory and
 * compute processes. Used memory on a GPU is the VRAM of the live RUNNING/LOCKED fake CUDA processes
 * on it (a checkpointed process holds none, and is not listed: measured with nvidia-smi). */
#define _GNU_SOURCE
#include "fakegpu.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define FG_EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
typedef struct fg_nvml_device *nvmlDevice_t; /* opaque: index + 1 */

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

static int refcount;

FG_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    struct fg_gpu gpus[FG_MAX_GPUS];
    if (!fg_state_dir() || fg_load_gpus(gpus, FG_MAX_GPUS) < 0) return NVML_ERROR_DRIVER_NOT_LOADED;
    __atomic_add_fetch(&refcount, 1, __ATOMIC_SEQ_CST);
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
FG_EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

FG_EXPORT nvmlReturn_t nvmlShutdown(void) {
    if (__atomic_load_n(&refcount, __ATOMIC_SEQ_CST) <= 0) return NVML_ERROR_UNINITIALIZED;
    __atomic_sub_fetch(&refcount, 1, __ATOMIC_SEQ_CST);
    return NVML_SUCCESS;
}

FG_EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

static int ready(void) { return __atomic_load_n(&refcount, __ATOMIC_SEQ_CST) > 0; }

static int put(char *out, unsigned int len, const char *value) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(out, len, "%s", value);
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int len) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    char v[80];
    fg_driver_version(v, sizeof v);
    return put(version, len, v);
}

FG_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    *version = 13000;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    struct fg_gpu gpus[FG_MAX_GPUS];
    int n = fg_load_gpus(gpus, FG_MAX_GPUS);
    *count = n > 0 ? (unsigned)n : 0;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

FG_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    struct fg_gpu gpus[FG_MAX_GPUS];
    int n = fg_load_gpus(gpus, FG_MAX_GPUS);
    if (!device || (int)index >= n) return NVML_ERROR_INVALID_ARGUMENT;
    *device = (nvmlDevice_t)(uintptr_t)(index + 1);
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    struct fg_gpu gpus[FG_MAX_GPUS];
    int n = fg_load_gpus(gpus, FG_MAX_GPUS);
    const struct fg_gpu *g = fg_find_gpu(gpus, n > 0 ? n : 0, uuid);
    if (!g) return NVML_ERROR_NOT_FOUND;
    *device = (nvmlDevice_t)(uintptr_t)(g->index + 1);
    return NVML_SUCCESS;
}

/* The GPU behind a handle, read fresh from gpus.txt (tests may rewrite it between calls). */
static int lookup(nvmlDevice_t device, struct fg_gpu *gpus, const struct fg_gpu **out) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    int n = fg_load_gpus(gpus, FG_MAX_GPUS);
    uintptr_t i = (uintptr_t)device;
    if (i == 0 || (int)(i - 1) >= n) return NVML_ERROR_INVALID_ARGUMENT;
    *out = &gpus[i - 1];
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int len) {
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g;
    int rc = lookup(device, gpus, &g);
    return rc ? rc : put(uuid, len, g->uuid);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int len) {
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g;
    int rc = lookup(device, gpus, &g);
    return rc ? rc : put(name, len, g->name);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g;
    int rc = lookup(device, gpus, &g);
    if (rc) return rc;
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = g->index;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor) {
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g;
    int rc = lookup(device, gpus, &g);
    if (rc) return rc;
    if (!minor) return NVML_ERROR_INVALID_ARGUMENT;
    *minor = g->minor;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g;
    int rc = lookup(device, gpus, &g);
    if (rc) return rc;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used = fg_used_on(g->uuid, NULL);
    memory->total = g->total;
    memory->used = used < g->total ? used : g->total;
    memory->free = g->total - memory->used;
    return NVML_SUCCESS;
}

struct collect {
    const char *gpu;
    nvmlProcessInfo_t *infos;
    unsigned int cap, n;
};

static void collect_process(int pid, const struct fg_env *env, const struct fg_state *st, void *arg) {
    (void)env;
    struct collect *c = arg;
    unsigned char a[16], b[16];
    if (st->state != FG_RUNNING && st->state != FG_LOCKED) return;
    if (fg_uuid_parse(st->gpu, a) != 0 || fg_uuid_parse(c->gpu, b) != 0 || memcmp(a, b, 16) != 0) return;
    if (c->infos && c->n < c->cap) {
        c->infos[c->n].pid = (unsigned)pid;
        c->infos[c->n].usedGpuMemory = st->vram;
        c->infos[c->n].gpuInstanceId = 0xFFFFFFFFu; /* not a MIG instance */
        c->infos[c->n].computeInstanceId = 0xFFFFFFFFu;
    }
    c->n++;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                               nvmlProcessInfo_t *infos) {
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g;
    int rc = lookup(device, gpus, &g);
    if (rc) return rc;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    struct collect c = {g->uuid, infos, infos ? *count : 0, 0};
    fg_each_process(collect_process, &c);
    if (c.n > c.cap) {
        *count = c.n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    *count = c.n;
    return NVML_SUCCESS;
}

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

/* The utilisation tests give a process: $FAKEGPU_STATE_DIR/util/<id> holds a percent (0..100); absent: 0. */
static unsigned read_util(const char *id) {
    char name[FG_ID_LEN + 8], path[FG_PATH_LEN];
    snprintf(name, sizeof name, "util/%s", id);
    if (fg_path(path, sizeof path, name) != 0) return 0;
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    unsigned v = 0;
    if (fscanf(f, "%u", &v) != 1) v = 0;
    fclose(f);
    return v > 100 ? 100 : v;
}

struct util_collect {
    const char *gpu;
    nvmlProcessUtilizationSample_t *out;
    unsigned int cap, n;
    unsigned long long now_us;
};

static void collect_util(int pid, const struct fg_env *env, const struct fg_state *st, void *arg) {
    struct util_collect *c = arg;
    unsigned char a[16], b[16];
    /* The real driver samples the processes with a context on the GPU: a checkpointed one has none. */
    if (st->state != FG_RUNNING) return;
    if (fg_uuid_parse(st->gpu, a) != 0 || fg_uuid_parse(c->gpu, b) != 0 || memcmp(a, b, 16) != 0) return;
    if (c->out && c->n < c->cap) {
        unsigned u = read_util(env->id);
        c->out[c->n].pid = (unsigned)pid;
        c->out[c->n].timeStamp = c->now_us;
        c->out[c->n].smUtil = u;
        c->out[c->n].memUtil = u;
        c->out[c->n].encUtil = 0;
        c->out[c->n].decUtil = 0;
    }
    c->n++;
}

/* Per-process utilisation samples since lastSeenTimeStamp (microseconds). Like the real one: NULL samples
 * answer INSUFFICIENT_SIZE with the count; no process with a sample answers NOT_FOUND. One sample per RUNNING
 * process, stamped now, with the percent from util/<id>. */
FG_EXPORT nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device, nvmlProcessUtilizationSample_t *samples,
                                                       unsigned int *count, unsigned long long lastSeenTimeStamp) {
    (void)lastSeenTimeStamp;
    struct fg_gpu gpus[FG_MAX_GPUS];
    const struct fg_gpu *g;
    int rc = lookup(device, gpus, &g);
    if (rc) return rc;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    struct util_collect c = {g->uuid, samples, samples ? *count : 0, 0, (unsigned long long)(fg_now_ns() / 1000)};
    fg_each_process(collect_util, &c);
    if (c.n == 0) return NVML_ERROR_NOT_FOUND;
    if (!samples || c.n > c.cap) {
        *count = c.n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    *count = c.n;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                                               nvmlProcessInfo_t *infos) {
    return nvmlDeviceGetComputeRunningProcesses_v3(device, count, infos);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *count,
                                                            nvmlProcessInfo_t *infos) {
    return nvmlDeviceGetComputeRunningProcesses_v3(device, count, infos);
}
