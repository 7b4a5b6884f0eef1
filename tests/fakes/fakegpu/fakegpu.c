/* Shared machinery of the fake GPU driver: the node's GPUs, process identity, per-process state,
 * cgroup freezer detection, fault injection and the event log. See fakegpu.h and README.md. */
#define _GNU_SOURCE
#include "fakegpu.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- paths and GPUs -------------------------------------------------------------------------- */

const char *fg_state_dir(void) {
    const char *dir = getenv("FAKEGPU_STATE_DIR");
    return (dir && *dir) ? dir : NULL;
}

int fg_path(char *out, size_t n, const char *name) {
    const char *dir = fg_state_dir();
    if (!dir) return -1;
    int len = snprintf(out, n, "%s/%s", dir, name);
    return (len < 0 || (size_t)len >= n) ? -1 : 0;
}

static char *trim(char *s) {
    while (*s && isspace((unsigned char)*s)) s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1])) *--end = 0;
    return s;
}

static void copy(char *dst, size_t n, const char *src) {
    snprintf(dst, n, "%s", src ? src : "");
}

/* gpus.txt: one GPU per line, tab-separated: uuid, name, total bytes, minor. '#' starts a comment. */
int fg_load_gpus(struct fg_gpu *gpus, int max) {
    char path[FG_PATH_LEN], line[1024];
    if (fg_path(path, sizeof path, "gpus.txt") != 0) return -1;
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        char *s = trim(line);
        if (!*s || *s == '#') continue;
        char *fields[4] = {0};
        int k = 0;
        char *save = NULL;
        for (char *tok = strtok_r(s, "\t", &save); tok && k < 4; tok = strtok_r(NULL, "\t", &save))
            fields[k++] = trim(tok);
        if (k < 3) continue;
        struct fg_gpu *g = &gpus[n];
        g->index = (unsigned)n;
        copy(g->uuid, sizeof g->uuid, fields[0]);
        copy(g->name, sizeof g->name, fields[1]);
        g->total = strtoull(fields[2], NULL, 10);
        g->minor = k > 3 ? (unsigned)strtoul(fields[3], NULL, 10) : (unsigned)n;
        n++;
    }
    fclose(f);
    return n;
}

const struct fg_gpu *fg_find_gpu(const struct fg_gpu *gpus, int n, const char *uuid) {
    unsigned char want[16], have[16];
    if (fg_uuid_parse(uuid, want) != 0) return NULL;
    for (int i = 0; i < n; i++)
        if (fg_uuid_parse(gpus[i].uuid, have) == 0 && memcmp(want, have, 16) == 0) return &gpus[i];
    return NULL;
}

void fg_driver_version(char *out, size_t n) {
    char path[FG_PATH_LEN], line[128];
    copy(out, n, "580.159.04");
    if (fg_path(path, sizeof path, "driver_version") != 0) return;
    FILE *f = fopen(path, "re");
    if (!f) return;
    if (fgets(line, sizeof line, f) && *trim(line)) copy(out, n, trim(line));
    fclose(f);
}

/* ---- processes ------------------------------------------------------------------------------- */

static int read_file(const char *path, char *buf, size_t n) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t got = 0;
    while (got < n - 1) {
        ssize_t r = read(fd, buf + got, n - 1 - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    buf[got] = 0;
    return (int)got;
}

/* State letter and parent pid from /proc/<pid>/stat ("pid (comm) S ppid ..."). */
static int proc_stat(int pid, char *state, int *ppid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    if (read_file(path, buf, sizeof buf) <= 0) return -1;
    char *end = strrchr(buf, ')');
    if (!end || sscanf(end + 1, " %c %d", state, ppid) != 2) return -1;
    return 0;
}

int fg_alive(int pid) {
    char state;
    int ppid;
    if (pid <= 0 || proc_stat(pid, &state, &ppid) != 0) return 0;
    return state != 'Z' && state != 'X';
}

/* Stopped by a signal (T) or by a tracer such as CRIU (t). */
int fg_stopped(int pid) {
    char state;
    int ppid;
    if (proc_stat(pid, &state, &ppid) != 0) return 0;
    return state == 'T' || state == 't';
}

static int file_has(const char *path, const char *needle) {
    char buf[4096];
    if (read_file(path, buf, sizeof buf) < 0) return 0;
    return strstr(buf, needle) != NULL;
}

/* Mount point of the v1 hierarchy carrying `controller`, or of cgroup2 when controller is NULL. */
static int cgroup_mount(const char *controller, char *out, size_t n) {
    FILE *f = fopen("/proc/self/mounts", "re");
    if (!f) return -1;
    char line[2048];
    int found = -1;
    while (found != 0 && fgets(line, sizeof line, f)) {
        char dev[256], dir[1024], type[64], opts[1024];
        if (sscanf(line, "%255s %1023s %63s %1023s", dev, dir, type, opts) != 4) continue;
        if (controller == NULL && strcmp(type, "cgroup2") == 0) {
            copy(out, n, dir);
            found = 0;
        } else if (controller && strcmp(type, "cgroup") == 0) {
            char *save = NULL;
            for (char *o = strtok_r(opts, ",", &save); o; o = strtok_r(NULL, ",", &save))
                if (strcmp(o, controller) == 0) {
                    copy(out, n, dir);
                    found = 0;
                }
        }
    }
    fclose(f);
    return found;
}

/* 1 when the process's cgroup is frozen (v1 freezer FROZEN/FREEZING, or v2 cgroup.freeze / frozen). */
int fg_frozen(int pid) {
    char path[FG_PATH_LEN], buf[8192];
    snprintf(path, sizeof path, "/proc/%d/cgroup", pid);
    if (read_file(path, buf, sizeof buf) <= 0) return 0;
    int frozen = 0;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line && !frozen; line = strtok_r(NULL, "\n", &save)) {
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2) continue;
        *c1 = 0;
        *c2 = 0;
        const char *controllers = c1 + 1, *cg = c2 + 1;
        char mnt[1024], file[FG_PATH_LEN];
        if (strcmp(line, "0") == 0 && *controllers == 0) {
            if (cgroup_mount(NULL, mnt, sizeof mnt) != 0) continue;
            snprintf(file, sizeof file, "%s%s/cgroup.freeze", mnt, cg);
            if (file_has(file, "1")) frozen = 1;
            snprintf(file, sizeof file, "%s%s/cgroup.events", mnt, cg);
            if (file_has(file, "frozen 1")) frozen = 1;
        } else if (strstr(controllers, "freezer")) {
            if (cgroup_mount("freezer", mnt, sizeof mnt) != 0) continue;
            snprintf(file, sizeof file, "%s%s/freezer.state", mnt, cg);
            if (file_has(file, "FROZEN") || file_has(file, "FREEZING")) frozen = 1;
        }
    }
    return frozen;
}

static int env_value(const char *env, size_t len, const char *key, char *out, size_t n) {
    size_t klen = strlen(key);
    for (size_t i = 0; i < len; i += strlen(env + i) + 1)
        if (strncmp(env + i, key, klen) == 0 && env[i + klen] == '=') {
            copy(out, n, env + i + klen + 1);
            return 0;
        }
    return -1;
}

static int read_environ(int pid, char *buf, size_t n) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/environ", pid);
    return read_file(path, buf, n);
}

static int valid_id(const char *id) {
    if (!*id || *id == '.') return 0;
    for (const char *p = id; *p; p++)
        if (!(isalnum((unsigned char)*p) || *p == '-' || *p == '_' || *p == '.')) return 0;
    return 1;
}

int fg_read_env(int pid, struct fg_env *env) {
    static const size_t cap = 256 * 1024;
    if (!fg_alive(pid)) return -1;
    char *buf = malloc(cap);
    if (!buf) return -1;
    int len = read_environ(pid, buf, cap);
    int rc = -2;
    char vram[64] = "0";
    memset(env, 0, sizeof *env);
    if (len > 0 && env_value(buf, (size_t)len, "FAKEGPU_PROC", env->id, sizeof env->id) == 0 && valid_id(env->id)) {
        env_value(buf, (size_t)len, "FAKEGPU_GPU", env->gpu, sizeof env->gpu);
        env_value(buf, (size_t)len, "FAKEGPU_VRAM", vram, sizeof vram);
        env->vram = strtoull(vram, NULL, 10);
        rc = 0;
        /* Several fake nodes may share one machine (parallel tests): a process that names its node
         * (FAKEGPU_STATE_DIR in its environment) belongs to that node only. */
        char node[FG_PATH_LEN];
        const char *mine = fg_state_dir();
        if (mine && env_value(buf, (size_t)len, "FAKEGPU_STATE_DIR", node, sizeof node) == 0 && strcmp(node, mine) != 0)
            rc = -2;
        /* A CUDA context does not survive fork: a child that merely inherited the variable from its
         * parent is not the CUDA process (so `sh -c 'sleep 1; ...'` style wrappers stay unambiguous). */
        char state, parent_id[FG_ID_LEN];
        int ppid;
        if (proc_stat(pid, &state, &ppid) == 0 && ppid > 0) {
            int plen = read_environ(ppid, buf, cap);
            if (plen > 0 && env_value(buf, (size_t)plen, "FAKEGPU_PROC", parent_id, sizeof parent_id) == 0 &&
                strcmp(parent_id, env->id) == 0)
                rc = -2;
        }
    }
    free(buf);
    return rc;
}

/* ---- per-process state ------------------------------------------------------------------------ */

int fg_lock(void) {
    char path[FG_PATH_LEN];
    if (fg_path(path, sizeof path, ".lock") != 0) return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    while (flock(fd, LOCK_EX) != 0 && errno == EINTR) {
    }
    return fd;
}

void fg_unlock(int fd) {
    if (fd >= 0) close(fd); /* closing the last descriptor drops the flock */
}

static int state_path(const char *id, char *out, size_t n) {
    char name[FG_ID_LEN + 16];
    snprintf(name, sizeof name, "procs/%s", id);
    return fg_path(out, n, name);
}

void fg_load_state(const struct fg_env *env, struct fg_state *st) {
    memset(st, 0, sizeof *st);
    st->state = FG_RUNNING;
    copy(st->gpu, sizeof st->gpu, env->gpu);
    st->vram = env->vram;
    char path[FG_PATH_LEN], line[512];
    if (state_path(env->id, path, sizeof path) != 0) return;
    FILE *f = fopen(path, "re");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        char *key = trim(line), *value = trim(eq + 1);
        if (strcmp(key, "state") == 0) {
            for (int s = FG_RUNNING; s <= FG_FAILED; s++)
                if (strcmp(value, fg_state_name(s)) == 0) st->state = s;
        } else if (strcmp(key, "gpu") == 0) {
            copy(st->gpu, sizeof st->gpu, value);
        } else if (strcmp(key, "gpu_name") == 0) {
            copy(st->gpu_name, sizeof st->gpu_name, value);
        } else if (strcmp(key, "vram") == 0) {
            st->vram = strtoull(value, NULL, 10);
        } else if (strcmp(key, "poisoned") == 0) {
            st->poisoned = atoi(value);
        } else if (strcmp(key, "last_pid") == 0) {
            st->last_pid = atoi(value);
        }
    }
    fclose(f);
}

int fg_save_state(const char *id, const struct fg_state *st) {
    char dir[FG_PATH_LEN], path[FG_PATH_LEN], tmp[FG_PATH_LEN + 8];
    if (fg_path(dir, sizeof dir, "procs") != 0 || state_path(id, path, sizeof path) != 0) return -1;
    mkdir(dir, 0755);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "we");
    if (!f) return -1;
    fprintf(f, "state=%s\ngpu=%s\ngpu_name=%s\nvram=%llu\npoisoned=%d\nlast_pid=%d\n", fg_state_name(st->state),
            st->gpu, st->gpu_name, st->vram, st->poisoned, st->last_pid);
    if (fclose(f) != 0) return -1;
    return rename(tmp, path); /* readers never see a half-written file */
}

struct seen {
    char (*ids)[FG_ID_LEN];
    int n, cap;
};

static int seen_add(struct seen *s, const char *id) {
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->ids[i], id) == 0) return 0;
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 64;
        void *grown = realloc(s->ids, (size_t)cap * FG_ID_LEN);
        if (!grown) return 0;
        s->ids = grown;
        s->cap = cap;
    }
    copy(s->ids[s->n++], FG_ID_LEN, id);
    return 1;
}

void fg_each_process(fg_visit_fn fn, void *arg) {
    DIR *d = opendir("/proc");
    if (!d) return;
    struct seen seen = {0};
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        int pid = atoi(e->d_name);
        struct fg_env env;
        if (fg_read_env(pid, &env) != 0 || !seen_add(&seen, env.id)) continue;
        struct fg_state st;
        fg_load_state(&env, &st);
        fn(pid, &env, &st, arg);
    }
    free(seen.ids);
    closedir(d);
}

struct used_arg {
    const char *gpu, *skip;
    unsigned long long sum;
};

static void add_used(int pid, const struct fg_env *env, const struct fg_state *st, void *arg) {
    (void)pid;
    struct used_arg *u = arg;
    unsigned char a[16], b[16];
    if (u->skip && strcmp(env->id, u->skip) == 0) return;
    if (st->state != FG_RUNNING && st->state != FG_LOCKED) return; /* checkpointed: VRAM released */
    if (fg_uuid_parse(st->gpu, a) == 0 && fg_uuid_parse(u->gpu, b) == 0 && memcmp(a, b, 16) == 0) u->sum += st->vram;
}

unsigned long long fg_used_on(const char *gpu, const char *skip) {
    struct used_arg u = {gpu, skip, 0};
    fg_each_process(add_used, &u);
    return u.sum;
}

/* ---- faults ----------------------------------------------------------------------------------- */

/* faults: `<op|*> <fail|break [CUDA_ERROR_X] | stall|busy|delay <ms>> [proc=<id>] [pid=<n>] [pairs]`; first match
 * wins. `pairs`: only a restore that passes GPU pairs (`pairs` > 0; -1 for the other calls), as driver 580 refuses
 * any pairs with CUDA_ERROR_INVALID_VALUE. */
void fg_fault_for(const char *op, const char *proc, int pid, int pairs, struct fg_fault *out) {
    memset(out, 0, sizeof *out);
    char path[FG_PATH_LEN], line[512];
    if (fg_path(path, sizeof path, "faults") != 0) return;
    FILE *f = fopen(path, "re");
    if (!f) return;
    while (out->kind == FG_FAULT_NONE && fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char *words[8];
        int n = 0;
        char *save = NULL;
        for (char *w = strtok_r(line, " \t\r\n", &save); w && n < 8; w = strtok_r(NULL, " \t\r\n", &save)) words[n++] = w;
        if (n < 2 || (strcmp(words[0], op) != 0 && strcmp(words[0], "*") != 0)) continue;
        struct fg_fault fault = {0};
        int match = 1;
        for (int i = 2; i < n; i++) {
            if (strncmp(words[i], "proc=", 5) == 0) {
                if (!proc || strcmp(words[i] + 5, proc) != 0) match = 0;
            } else if (strncmp(words[i], "pid=", 4) == 0) {
                if (atoi(words[i] + 4) != pid) match = 0;
            } else if (strcmp(words[i], "pairs") == 0) {
                if (pairs <= 0) match = 0;
            } else if (isdigit((unsigned char)words[i][0])) {
                fault.ms = atoi(words[i]);
            } else if (fg_error_by_name(words[i]) >= 0) {
                fault.error = fg_error_by_name(words[i]);
            }
        }
        if (!match) continue;
        if (strcmp(words[1], "fail") == 0) fault.kind = FG_FAULT_FAIL;
        else if (strcmp(words[1], "break") == 0) fault.kind = FG_FAULT_BREAK;
        else if (strcmp(words[1], "stall") == 0) fault.kind = FG_FAULT_STALL;
        else if (strcmp(words[1], "busy") == 0) fault.kind = FG_FAULT_BUSY;
        else if (strcmp(words[1], "delay") == 0) fault.kind = FG_FAULT_DELAY;
        if ((fault.kind == FG_FAULT_FAIL || fault.kind == FG_FAULT_BREAK) && fault.error == 0)
            fault.error = FG_CUDA_ERROR_UNKNOWN;
        *out = fault;
    }
    fclose(f);
}

/* ---- events ----------------------------------------------------------------------------------- */

long long fg_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void fg_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

void fg_call_begin(struct fg_call *call, const char *op, int pid) {
    memset(call, 0, sizeof *call);
    call->op = op;
    call->pid = pid;
    call->start_ns = fg_now_ns();
    call->alive = fg_alive(pid);
    call->frozen = call->alive ? fg_frozen(pid) : 0;
    call->stopped = call->alive ? fg_stopped(pid) : 0;
    call->pairs = -1;
}

/* One line per call, appended with a single write(2) so concurrent callers never interleave. */
void fg_call_end(const struct fg_call *call, int result, int state_after) {
    char path[FG_PATH_LEN], line[1024];
    if (fg_path(path, sizeof path, "events.log") != 0) return;
    int len = snprintf(line, sizeof line,
                       "ns=%lld op=%s pid=%d proc=%s result=%s frozen=%d alive=%d stopped=%d start_ns=%lld state=%s "
                       "gpu=%s pairs=%d caller=%d\n",
                       fg_now_ns(), call->op, call->pid, call->proc[0] ? call->proc : "-", fg_error_name(result),
                       call->frozen, call->alive, call->stopped, call->start_ns, state_after >= 0 ? fg_state_name(state_after) : "-",
                       call->gpu[0] ? call->gpu : "-", call->pairs, (int)getpid());
    if (len <= 0 || (size_t)len >= sizeof line) return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t w = write(fd, line, (size_t)len);
    (void)w;
    close(fd);
}

/* ---- names ------------------------------------------------------------------------------------ */

static const struct {
    int code;
    const char *name;
    const char *text; /* cuGetErrorString of driver 580.159.04, quoted by the cuda-checkpoint CLI */
} ERRORS[] = {
    {FG_CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {FG_CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {FG_CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {FG_CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {FG_CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {FG_CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {FG_CUDA_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {FG_CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {FG_CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {FG_CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {FG_CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {FG_CUDA_ERROR_TIMEOUT, "CUDA_ERROR_TIMEOUT", "wait operation timed out"},
    {FG_CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

#define N_ERRORS (sizeof ERRORS / sizeof ERRORS[0])

const char *fg_error_name(int code) {
    for (size_t i = 0; i < N_ERRORS; i++)
        if (ERRORS[i].code == code) return ERRORS[i].name;
    return NULL;
}

const char *fg_error_string(int code) {
    for (size_t i = 0; i < N_ERRORS; i++)
        if (ERRORS[i].code == code) return ERRORS[i].text;
    return NULL;
}

int fg_error_by_name(const char *name) {
    for (size_t i = 0; i < N_ERRORS; i++)
        if (strcmp(ERRORS[i].name, name) == 0) return ERRORS[i].code;
    return -1;
}

const char *fg_state_name(int state) {
    switch (state) {
    case FG_RUNNING: return "RUNNING";
    case FG_LOCKED: return "LOCKED";
    case FG_CHECKPOINTED: return "CHECKPOINTED";
    case FG_FAILED: return "FAILED";
    default: return "?";
    }
}

/* ---- UUIDs: "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" <-> 16 bytes ----------------------------- */

int fg_uuid_parse(const char *text, unsigned char out[16]) {
    if (!text) return -1;
    if (strncmp(text, "GPU-", 4) == 0) text += 4;
    int nibbles = 0;
    for (const char *p = text; *p; p++) {
        if (*p == '-') continue;
        if (!isxdigit((unsigned char)*p) || nibbles >= 32) return -1;
        int v = isdigit((unsigned char)*p) ? *p - '0' : tolower((unsigned char)*p) - 'a' + 10;
        if (nibbles % 2 == 0) out[nibbles / 2] = (unsigned char)(v << 4);
        else out[nibbles / 2] |= (unsigned char)v;
        nibbles++;
    }
    return nibbles == 32 ? 0 : -1;
}

void fg_uuid_format(const unsigned char b[16], char *out, size_t n) {
    snprintf(out, n, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
             b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}
