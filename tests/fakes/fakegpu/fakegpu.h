/* The named fake GPU driver: state shared by the fake libcuda, the fake libnvidia-ml and the fake
 * cuda-checkpoint CLI. Everything lives in files under $FAKEGPU_STATE_DIR so that several processes
 * (hookd, the CLI, the tests) see one "node"; README.md describes the formats.
 *
 * Every function here is reentrant: hookd calls the fake from many threads at once, exactly as it
 * calls the real driver. Read-modify-write of a process's state happens under an flock on
 * $FAKEGPU_STATE_DIR/.lock; waiting (stalls, delays) happens outside it.
 */
#ifndef FAKEGPU_H
#define FAKEGPU_H

#include <stddef.h>

#define FG_MAX_GPUS 16
#define FG_UUID_LEN 96
#define FG_NAME_LEN 96
#define FG_ID_LEN 128
#define FG_PATH_LEN 4096

/* CUresult values the fake returns (cuda.h). */
enum {
    FG_CUDA_SUCCESS = 0,
    FG_CUDA_ERROR_INVALID_VALUE = 1,
    FG_CUDA_ERROR_OUT_OF_MEMORY = 2,
    FG_CUDA_ERROR_NOT_INITIALIZED = 3,
    FG_CUDA_ERROR_NO_DEVICE = 100,
    FG_CUDA_ERROR_INVALID_DEVICE = 101,
    FG_CUDA_ERROR_OPERATING_SYSTEM = 304,
    FG_CUDA_ERROR_ILLEGAL_STATE = 401,
    FG_CUDA_ERROR_NOT_FOUND = 500,
    FG_CUDA_ERROR_NOT_PERMITTED = 800,
    FG_CUDA_ERROR_NOT_SUPPORTED = 801,
    FG_CUDA_ERROR_TIMEOUT = 909,
    FG_CUDA_ERROR_UNKNOWN = 999,
};

/* CUprocessState values. */
enum { FG_RUNNING = 0, FG_LOCKED = 1, FG_CHECKPOINTED = 2, FG_FAILED = 3 };

struct fg_gpu {
    unsigned index;
    char uuid[FG_UUID_LEN];
    char name[FG_NAME_LEN];
    unsigned long long total;
    unsigned minor;
};

/* What /proc/<pid>/environ says about a process. */
struct fg_env {
    char id[FG_ID_LEN];
    char gpu[FG_UUID_LEN];
    unsigned long long vram;
};

/* The driver's view of one CUDA process, keyed by FAKEGPU_PROC (survives a CRIU restore). */
struct fg_state {
    int state;
    char gpu[FG_UUID_LEN];         /* the GPU it runs on (or ran on, when checkpointed) */
    char gpu_name[FG_NAME_LEN];    /* model of that GPU, recorded at checkpoint: a remap must match it */
    unsigned long long vram;
    int poisoned;                  /* a restore failed for lack of VRAM: later restores fail (issue 44) */
    int last_pid;
};

enum { FG_FAULT_NONE = 0, FG_FAULT_FAIL, FG_FAULT_BREAK, FG_FAULT_STALL, FG_FAULT_BUSY, FG_FAULT_DELAY };

struct fg_fault {
    int kind;
    int ms;
    int error;                     /* CUresult for fail/break */
};

/* One call being recorded into events.log. */
struct fg_call {
    const char *op;
    int pid;
    long long start_ns;
    int frozen;
    int stopped;
    int alive;
    char proc[FG_ID_LEN];
    char gpu[FG_UUID_LEN];
    int pairs;
};

const char *fg_state_dir(void);
int fg_path(char *out, size_t n, const char *name);
int fg_load_gpus(struct fg_gpu *gpus, int max);
const struct fg_gpu *fg_find_gpu(const struct fg_gpu *gpus, int n, const char *uuid);
void fg_driver_version(char *out, size_t n);

int fg_alive(int pid);
int fg_frozen(int pid);
int fg_stopped(int pid);
/* 0: a CUDA process (env filled); -1: no such process; -2: alive, but not a CUDA process. */
int fg_read_env(int pid, struct fg_env *env);

int fg_lock(void);
void fg_unlock(int fd);
void fg_load_state(const struct fg_env *env, struct fg_state *st);
int fg_save_state(const char *id, const struct fg_state *st);
/* VRAM held on `gpu` by live RUNNING/LOCKED processes, leaving out the one with id `skip`. */
unsigned long long fg_used_on(const char *gpu, const char *skip);

typedef void (*fg_visit_fn)(int pid, const struct fg_env *env, const struct fg_state *st, void *arg);
void fg_each_process(fg_visit_fn fn, void *arg);

void fg_fault_for(const char *op, const char *proc, int pid, int pairs, struct fg_fault *out);

long long fg_now_ns(void);
void fg_sleep_ms(int ms);
void fg_call_begin(struct fg_call *call, const char *op, int pid);
void fg_call_end(const struct fg_call *call, int result, int state_after);

const char *fg_error_name(int code);
const char *fg_error_string(int code);
const char *fg_state_name(int state);
int fg_error_by_name(const char *name);

int fg_uuid_parse(const char *text, unsigned char out[16]);
void fg_uuid_format(const unsigned char in[16], char *out, size_t n);

/* The checkpoint API itself (fakecuda.c): the library exports and the CLI both call these. */
struct fg_pair {
    unsigned char old_uuid[16];
    unsigned char new_uuid[16];
};
int fg_get_state(int pid, int *state);
int fg_get_restore_tid(int pid, int *tid);
int fg_do_lock(int pid, unsigned timeout_ms);
int fg_do_checkpoint(int pid);
int fg_do_restore(int pid, const struct fg_pair *pairs, unsigned count);
int fg_do_unlock(int pid);

#endif
