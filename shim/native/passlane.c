/*
 * The pod daemon's pass-through below Python (docs/architecture.md, "the pass lane").
 *
 * A call the pod daemon only passes on to its runc shim child (State, Pids, a plain Start, ...) costs two
 * reads and two writes; done in Python they cost ~0.3-0.5 ms of the daemon's CPU each time, on a container's
 * start path that is CPU-bound (docs/benchmarks.md). The lane sits between containerd and the Python server:
 * it owns each accepted containerd connection and gives Python one end of a socketpair instead. Every frame
 * it does not take goes to Python as it came; the requests it takes go to the runc shim over a connection of
 * the lane's own, and their answers come back without Python waking up.
 *
 * The runc shim's own events come the same way (it publishes to our socket, shim/events.py): the lane passes
 * each Forward on to containerd's events service over a connection of its own, while Python would only
 * forward it (no task hibernating or waking).
 *
 * What it takes is decided by Python and mirrored here (shim/passlane.py): the lane is open only while no
 * task of the shim is hibernated; it answers Connect for a task whose init pid Python registered, while no
 * task has GPU state; it passes a Start for an exec, or for a task Python marked plain; and it passes every
 * task method Python does not intercept. A request with flags, an even stream id, a deadline already past,
 * over 64 KiB, of another service, or anything it cannot read goes to Python, which answers it exactly as
 * before. A taken call's deadline is the lane's: past it, it answers DEADLINE_EXCEEDED and drops the late
 * answer, as Python's pass-through does (an event's deadline is EVENT_TIMEOUT_S unless it carries one, as
 * Python's). Once an upstream connection ends, its calls go to Python, which dials again where it would.
 *
 * Threads and blocking I/O, no event loop: per containerd connection one thread reads containerd and one
 * reads Python's answers; one thread reads each upstream. Writes to a socket are whole frames under that
 * socket's mutex, with a send timeout: a peer that stops reading for WRITE_TIMEOUT_S loses its connection.
 * Nothing here calls into Python; Python calls in through ctypes (the functions marked API below).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define HEADER_LEN 10
#define TYPE_REQUEST 1
#define TYPE_RESPONSE 2
#define MAX_MESSAGE (4u << 20)          /* ttrpc's cap on a frame's body */
#define MAX_TAKEN_BODY (64u << 10)      /* a request the lane reads whole; larger ones stream to Python */
#define MAX_IN_FLIGHT 256               /* taken calls awaiting the runc shim, per connection */
#define MAX_TASKS 4096                  /* registered tasks; beyond, Python answers */
#define MAX_ID 256
#define WRITE_TIMEOUT_S 30
#define UNAVAILABLE 14
#define DEADLINE_EXCEEDED 4
#define EVENT_TIMEOUT_S 5 /* shim/events.py FORWARD_TIMEOUT_S */

/* The node installer compiles its mark and the source's digest in: an unchanged source is not rebuilt. */
#ifndef KYB_BUILD_ID
#define KYB_BUILD_ID "dev"
#endif
const char kyb_lane_build_id[] = KYB_BUILD_ID;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static const char TASK_V2[] = "containerd.task.v2.Task";
static const char TASK_V3[] = "containerd.task.v3.Task";
static const char EVENTS[] = "containerd.services.events.ttrpc.v1.Events";

/* Task methods Python's handlers intercept (shim/service.py TaskService._intercepted): not passed blindly. */
static const char *const INTERCEPTED[] = {"Create", "Start", "Pause", "Resume", "Checkpoint", "Kill",
                                          "Delete", "Wait", "Connect", "Shutdown", NULL};

struct conn;

struct pending {
    uint32_t up_sid, sid; /* the stream id upstream, and containerd's (or the child's, for an event) */
    uint64_t deadline_ns; /* CLOCK_MONOTONIC; 0: none */
    struct conn *conn;
    struct pending *next;
};

struct task {
    char id[MAX_ID + 1];
    int pid;   /* 0: unknown */
    int plain; /* its Start only forwards */
    struct task *next;
};

/* A ttrpc server the lane calls: the runc shim, or containerd's events service. */
struct upstream {
    struct lane *lane;
    int fd;                /* -1: none */
    int wake_fd;           /* an eventfd: a call with a deadline is pending, the reader recomputes its wait */
    pthread_mutex_t write; /* writes to fd, and the ids they carry */
    int alive;             /* under lane->mu */
    uint32_t next_sid;
    struct pending *pending;
    const char *gone;      /* the status message for calls pending when it closes */
};

struct lane {
    pthread_mutex_t mu; /* everything below but the fds */
    struct upstream child, events;
    int closed;
    int open;          /* no task hibernated */
    int connect_local; /* no task with GPU state */
    int events_open;   /* no task hibernating or waking: events pass untouched */
    char child_service[64];
    struct task *tasks;
    int task_count;
    struct conn *conns;
    int refs; /* the caller's, each upstream reader, each connection */
    uint64_t taken;
};

struct conn {
    struct lane *lane;
    int cfd, pfd;
    pthread_mutex_t write; /* writes to cfd */
    int refs;              /* its two threads and its pending calls; under lane->mu */
    int in_flight;
    struct conn *next;
};

/* ---- I/O ------------------------------------------------------------------------------------- */

static int read_full(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n == 0) return -1;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* n bytes from one socket to the other, through a small buffer. */
static int relay(int from, int to, size_t n) {
    unsigned char buf[8192];
    while (n > 0) {
        size_t k = n < sizeof buf ? n : sizeof buf;
        if (read_full(from, buf, k) < 0 || write_full(to, buf, k) < 0) return -1;
        n -= k;
    }
    return 0;
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void header(unsigned char *h, uint32_t len, uint32_t sid, unsigned char type, unsigned char flags) {
    put_be32(h, len);
    put_be32(h + 4, sid);
    h[8] = type;
    h[9] = flags;
}

/* Blocking reads and writes (a socket from asyncio comes non-blocking), writes with a time limit. */
static void blocking_with_send_timeout(int fd) {
    struct timeval tv = {.tv_sec = WRITE_TIMEOUT_S};
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && (flags & O_NONBLOCK)) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* A frame to containerd, whole, between any other writer's frames; a failed write ends the connection. */
static void to_containerd(struct conn *c, const unsigned char *h, const unsigned char *body, size_t len) {
    pthread_mutex_lock(&c->write);
    if (write_full(c->cfd, h, HEADER_LEN) < 0 || write_full(c->cfd, body, len) < 0) shutdown(c->cfd, SHUT_RDWR);
    pthread_mutex_unlock(&c->write);
}

/* ---- protobuf, the little the lane reads ------------------------------------------------------- */

static int varint(const unsigned char **p, const unsigned char *end, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        unsigned char b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

static size_t put_varint(unsigned char *p, uint64_t v) {
    size_t n = 0;
    while (v > 0x7f) {
        p[n++] = (unsigned char)(v & 0x7f) | 0x80;
        v >>= 7;
    }
    p[n++] = (unsigned char)v;
    return n;
}

struct bytes { const unsigned char *p; size_t len; };

/* The length-delimited fields 1..3 of a message (the last of each wins, as protobuf reads them) and the
 * varint field 4; -1 for anything malformed or of a wire type this does not read. */
static int fields(const unsigned char *p, size_t len, struct bytes out[4], uint64_t *varint4) {
    const unsigned char *end = p + len;
    memset(out, 0, 4 * sizeof *out);
    *varint4 = 0;
    while (p < end) {
        uint64_t key, v;
        if (varint(&p, end, &key) < 0) return -1;
        uint64_t num = key >> 3;
        switch (key & 7) {
        case 0:
            if (varint(&p, end, &v) < 0) return -1;
            if (num == 4) *varint4 = v;
            break;
        case 2:
            if (varint(&p, end, &v) < 0 || v > (uint64_t)(end - p)) return -1;
            if (num >= 1 && num <= 3) out[num] = (struct bytes){p, (size_t)v};
            p += v;
            break;
        case 1:
            if (end - p < 8) return -1;
            p += 8;
            break;
        case 5:
            if (end - p < 4) return -1;
            p += 4;
            break;
        default:
            return -1;
        }
    }
    return 0;
}

static int equals(struct bytes b, const char *s) {
    size_t n = strlen(s);
    return b.len == n && memcmp(b.p, s, n) == 0;
}

/* ---- the tables Python keeps current --------------------------------------------------------- */

static struct task *find_task(struct lane *l, const unsigned char *id, size_t len) {
    for (struct task *t = l->tasks; t; t = t->next)
        if (strlen(t->id) == len && memcmp(t->id, id, len) == 0) return t;
    return NULL;
}

/* ---- routing ---------------------------------------------------------------------------------- */

enum route { TO_PYTHON, TO_CHILD, TO_EVENTS, ANSWERED };

static int intercepted(struct bytes method) {
    for (const char *const *m = INTERCEPTED; *m; m++)
        if (equals(method, *m)) return 1;
    return 0;
}

/* Connect answered as the runc shim would: its shim pid (ours, as Python answers) and the task's pid. */
static void answer_connect(struct conn *c, uint32_t sid, int task_pid) {
    unsigned char msg[32], body[48], h[HEADER_LEN];
    size_t n = 0;
    msg[n++] = 0x08;
    n += put_varint(msg + n, (uint64_t)getpid());
    msg[n++] = 0x10;
    n += put_varint(msg + n, (uint64_t)task_pid);
    size_t b = 0;
    body[b++] = 0x0a; /* an empty status: OK, as every ttrpc server writes it */
    body[b++] = 0x00;
    body[b++] = 0x12;
    b += put_varint(body + b, n);
    memcpy(body + b, msg, n);
    b += n;
    header(h, (uint32_t)b, sid, TYPE_RESPONSE, 0);
    to_containerd(c, h, body, b);
}

/* What to do with a whole request frame of containerd's; decided under the lane's lock. */
static enum route route(struct lane *l, struct conn *c, const unsigned char *body, size_t len, int *connect_pid,
                        int *rename, uint64_t *timeout) {
    struct bytes f[4], inner[4];
    uint64_t ignored;
    if (l->closed || c->in_flight >= MAX_IN_FLIGHT) return TO_PYTHON;
    /* timeout_nano is an int64: negative (past before it started) is Python's to answer */
    if (fields(body, len, f, timeout) < 0 || (int64_t)*timeout < 0) return TO_PYTHON;
    if (equals(f[1], EVENTS)) {
        if (!l->events_open || !l->events.alive || !equals(f[2], "Forward")) return TO_PYTHON;
        if (!*timeout) *timeout = EVENT_TIMEOUT_S * 1000000000ull;
        return TO_EVENTS;
    }
    if (!l->open || !l->child.alive) return TO_PYTHON;
    if (!equals(f[1], TASK_V2) && !equals(f[1], TASK_V3)) return TO_PYTHON;
    *rename = !equals(f[1], l->child_service);
    if (!intercepted(f[2])) return TO_CHILD;
    int is_start = equals(f[2], "Start"), is_connect = equals(f[2], "Connect");
    if (!is_start && !is_connect) return TO_PYTHON;
    /* StartRequest and ConnectRequest: id is field 1, an exec's id field 2. */
    if (fields(f[3].p, f[3].len, inner, &ignored) < 0 || inner[1].len > MAX_ID) return TO_PYTHON;
    struct task *t = find_task(l, inner[1].p, inner[1].len);
    if (is_start) return inner[2].len > 0 || (t && t->plain) ? TO_CHILD : TO_PYTHON;
    if (l->connect_local && t && t->pid > 0) {
        *connect_pid = t->pid;
        return ANSWERED;
    }
    return TO_PYTHON;
}

static void release_conn(struct conn *c);

/* A taken request on its way upstream; to the runc shim renamed, if need be, to the task API it serves. */
static int forward(struct upstream *up, struct conn *c, uint32_t sid, const unsigned char *body, size_t len,
                   int rename, uint64_t timeout) {
    struct lane *l = up->lane;
    struct pending *p = malloc(sizeof *p);
    if (!p) return -1;
    unsigned char h[HEADER_LEN], tail[80];
    size_t tail_len = 0;
    if (rename) { /* a second service field: the last one read wins */
        size_t n = strlen(l->child_service);
        tail[tail_len++] = 0x0a;
        tail_len += put_varint(tail + tail_len, n);
        memcpy(tail + tail_len, l->child_service, n);
        tail_len += n;
    }
    /* The id is taken under the write lock: the runc shim's ttrpc server wants each request's id above the
     * last one it read (it answers a lower one INVALID_ARGUMENT), so ids go out in the order they are given. */
    pthread_mutex_lock(&up->write);
    pthread_mutex_lock(&l->mu);
    p->up_sid = up->next_sid;
    up->next_sid += 2; /* 2^31 calls on one connection: far beyond a pod's life */
    p->sid = sid;
    p->deadline_ns = timeout ? now_ns() + (timeout < (1ull << 62) ? timeout : (1ull << 62)) : 0;
    p->conn = c;
    p->next = up->pending;
    up->pending = p;
    c->refs++;
    c->in_flight++;
    l->taken++;
    uint32_t up_sid = p->up_sid; /* p is the upstream reader's once unlocked (a deadline may end it) */
    pthread_mutex_unlock(&l->mu);
    if (timeout) {
        uint64_t one = 1;
        (void)!write(up->wake_fd, &one, sizeof one);
    }
    header(h, (uint32_t)(len + tail_len), up_sid, TYPE_REQUEST, 0);
    int failed = write_full(up->fd, h, HEADER_LEN) < 0 || write_full(up->fd, body, len) < 0 ||
                 write_full(up->fd, tail, tail_len) < 0;
    pthread_mutex_unlock(&up->write);
    if (failed) shutdown(up->fd, SHUT_RDWR); /* its reader answers what is pending */
    return 0;
}

/* ---- threads ---------------------------------------------------------------------------------- */

static void lane_unref(struct lane *l);
void kyb_lane_close(void *lane);

/* A frame that is not taken goes to Python as it came: the header, then its body streamed through. */
static int stream_to_python(struct conn *c, const unsigned char *h, const unsigned char *have, size_t have_len,
                            size_t rest) {
    if (write_full(c->pfd, h, HEADER_LEN) < 0) return -1;
    if (have_len && write_full(c->pfd, have, have_len) < 0) return -1;
    return relay(c->cfd, c->pfd, rest);
}

static void *from_containerd(void *arg) {
    struct conn *c = arg;
    struct lane *l = c->lane;
    unsigned char h[HEADER_LEN];
    unsigned char *body = malloc(MAX_TAKEN_BODY);
    while (body && read_full(c->cfd, h, HEADER_LEN) == 0) {
        uint32_t len = be32(h), sid = be32(h + 4);
        /* Not a unary request on a client stream (odd ids), or too large to read whole: Python's. */
        if (h[8] != TYPE_REQUEST || h[9] != 0 || len > MAX_TAKEN_BODY || !(sid & 1)) {
            if (stream_to_python(c, h, NULL, 0, len) < 0) break;
            continue;
        }
        if (read_full(c->cfd, body, len) < 0) break;
        int pid = 0, rename = 0;
        uint64_t timeout = 0;
        pthread_mutex_lock(&l->mu);
        enum route r = route(l, c, body, len, &pid, &rename, &timeout);
        if (r == ANSWERED) l->taken++;
        pthread_mutex_unlock(&l->mu);
        if (r == ANSWERED) {
            answer_connect(c, sid, pid);
            continue;
        }
        if (r == TO_CHILD && forward(&l->child, c, sid, body, len, rename, timeout) == 0) continue;
        if (r == TO_EVENTS && forward(&l->events, c, sid, body, len, 0, timeout) == 0) continue;
        if (stream_to_python(c, h, body, len, 0) < 0) break;
    }
    free(body);
    /* containerd is gone (or Python is): Python sees its end close; the other thread sees Python close. */
    shutdown(c->pfd, SHUT_WR);
    shutdown(c->cfd, SHUT_RD);
    release_conn(c);
    return NULL;
}

static void *from_python(void *arg) {
    struct conn *c = arg;
    unsigned char h[HEADER_LEN];
    while (read_full(c->pfd, h, HEADER_LEN) == 0) {
        uint32_t len = be32(h);
        if (len > MAX_MESSAGE + 1024) break; /* Python never writes that: the stream is broken */
        /* The frame whole under the write lock, so that the lane's answers land between frames. */
        pthread_mutex_lock(&c->write);
        int failed = write_full(c->cfd, h, HEADER_LEN) < 0 || relay(c->pfd, c->cfd, len) < 0;
        pthread_mutex_unlock(&c->write);
        if (failed) break;
    }
    shutdown(c->cfd, SHUT_RDWR); /* Python closed the connection: so does containerd's side */
    shutdown(c->pfd, SHUT_RDWR);
    release_conn(c);
    return NULL;
}

/* A status answer, as Python writes one: Response{status{code, message}}, no payload. */
static void answer_status(struct conn *c, uint32_t sid, int code, const char *msg) {
    unsigned char status[80], body[96], h[HEADER_LEN];
    size_t s = 0, b = 0, n = strlen(msg);
    status[s++] = 0x08;
    status[s++] = (unsigned char)code;
    status[s++] = 0x12;
    status[s++] = (unsigned char)n;
    memcpy(status + s, msg, n);
    s += n;
    body[b++] = 0x0a;
    body[b++] = (unsigned char)s;
    memcpy(body + b, status, s);
    b += s;
    header(h, (uint32_t)b, sid, TYPE_RESPONSE, 0);
    to_containerd(c, h, body, b);
}

static void end_pending(struct pending *p) {
    struct conn *c = p->conn;
    pthread_mutex_lock(&c->lane->mu);
    c->in_flight--;
    pthread_mutex_unlock(&c->lane->mu);
    release_conn(c);
    free(p);
}

/* Calls whose deadline passed: answered DEADLINE_EXCEEDED; the wait until the next one (ms, -1: none). */
static int expire(struct upstream *up) {
    struct lane *l = up->lane;
    uint64_t now = now_ns(), next = 0;
    struct pending *expired = NULL;
    pthread_mutex_lock(&l->mu);
    for (struct pending **pp = &up->pending; *pp;) {
        struct pending *p = *pp;
        if (p->deadline_ns && p->deadline_ns <= now) {
            *pp = p->next;
            p->next = expired;
            expired = p;
            continue;
        }
        if (p->deadline_ns && (!next || p->deadline_ns < next)) next = p->deadline_ns;
        pp = &p->next;
    }
    pthread_mutex_unlock(&l->mu);
    while (expired) {
        struct pending *p = expired;
        expired = p->next;
        answer_status(p->conn, p->sid, DEADLINE_EXCEEDED, "deadline exceeded");
        end_pending(p);
    }
    if (!next) return -1;
    uint64_t ms = (next - now + 999999) / 1000000;
    return ms > 60000 ? 60000 : (int)ms;
}

static void *from_upstream(void *arg) {
    struct upstream *up = arg;
    struct lane *l = up->lane;
    unsigned char h[HEADER_LEN], *body = malloc(MAX_MESSAGE);
    while (body) {
        struct pollfd fds[2] = {{.fd = up->fd, .events = POLLIN}, {.fd = up->wake_fd, .events = POLLIN}};
        if (poll(fds, 2, expire(up)) < 0 && errno != EINTR) break;
        if (fds[1].revents & POLLIN) {
            uint64_t n;
            (void)!read(up->wake_fd, &n, sizeof n);
        }
        if (!fds[0].revents) continue;
        if (read_full(up->fd, h, HEADER_LEN) < 0) break;
        uint32_t len = be32(h), sid = be32(h + 4);
        if (len > MAX_MESSAGE || read_full(up->fd, body, len) < 0) break;
        if (h[8] != TYPE_RESPONSE) continue; /* the lane only asks */
        pthread_mutex_lock(&l->mu);
        struct pending **pp = &up->pending, *p = NULL;
        for (; *pp; pp = &(*pp)->next)
            if ((*pp)->up_sid == sid) {
                p = *pp;
                *pp = p->next;
                break;
            }
        pthread_mutex_unlock(&l->mu);
        if (!p) continue; /* late: its deadline was answered already */
        header(h, len, p->sid, TYPE_RESPONSE, h[9]);
        to_containerd(p->conn, h, body, len);
        end_pending(p);
    }
    free(body);
    pthread_mutex_lock(&l->mu);
    up->alive = 0; /* from here its calls go to Python, whose own connection says what happened */
    struct pending *p = up->pending;
    up->pending = NULL;
    pthread_mutex_unlock(&l->mu);
    while (p) {
        struct pending *next = p->next;
        answer_status(p->conn, p->sid, UNAVAILABLE, up->gone);
        end_pending(p);
        p = next;
    }
    lane_unref(l);
    return NULL;
}

static void release_conn(struct conn *c) {
    struct lane *l = c->lane;
    pthread_mutex_lock(&l->mu);
    int last = --c->refs == 0;
    if (last) {
        for (struct conn **cc = &l->conns; *cc; cc = &(*cc)->next)
            if (*cc == c) {
                *cc = c->next;
                break;
            }
    }
    pthread_mutex_unlock(&l->mu);
    if (last) {
        close(c->cfd);
        close(c->pfd);
        pthread_mutex_destroy(&c->write);
        free(c);
        lane_unref(l);
    }
}

static void lane_unref(struct lane *l) {
    pthread_mutex_lock(&l->mu);
    int last = --l->refs == 0;
    pthread_mutex_unlock(&l->mu);
    if (!last) return;
    for (struct upstream *up = &l->child; up; up = up == &l->child ? &l->events : NULL) {
        if (up->fd >= 0) close(up->fd);
        if (up->wake_fd >= 0) close(up->wake_fd);
        pthread_mutex_destroy(&up->write);
    }
    while (l->tasks) {
        struct task *t = l->tasks;
        l->tasks = t->next;
        free(t);
    }
    pthread_mutex_destroy(&l->mu);
    free(l);
}

static int spawn(void *(*fn)(void *), void *arg) {
    pthread_t t;
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 << 10);
    /* Signals stay with Python's thread (its handlers run there). */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&t, &attr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return err;
}

/* ---- API (shim/passlane.py) ------------------------------------------------------------------- */

static void upstream_init(struct lane *l, struct upstream *up, const char *gone) {
    up->lane = l;
    up->fd = up->wake_fd = -1;
    up->gone = gone;
    up->next_sid = 1;
    pthread_mutex_init(&up->write, NULL);
}

/* The upstream over a connected socket (the lane's from here; -1: none), with its reader running. */
static int upstream_start(struct upstream *up, int fd) {
    up->fd = fd;
    if (fd < 0) return 0;
    up->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (up->wake_fd < 0) return errno;
    blocking_with_send_timeout(fd);
    up->lane->refs++;
    int err = spawn(from_upstream, up);
    if (err) {
        up->lane->refs--;
        return err;
    }
    up->alive = 1;
    return 0;
}

/* A lane over connected sockets to the runc shim, which serves child_service, and to containerd's events
 * service (events_fd, or -1: none). The lane owns both fds from this call on, whatever it returns; NULL with
 * errno set if it could not start (it has closed them, or will as its threads end). */
void *kyb_lane_new(int child_fd, const char *child_service, int events_fd) {
    struct lane *l = calloc(1, sizeof *l);
    if (!l || strlen(child_service) >= sizeof l->child_service) {
        int err = l ? EINVAL : ENOMEM;
        free(l);
        close(child_fd);
        if (events_fd >= 0) close(events_fd);
        errno = err;
        return NULL;
    }
    pthread_mutex_init(&l->mu, NULL);
    l->open = l->connect_local = l->events_open = 1;
    l->refs = 1; /* the caller's, until kyb_lane_close */
    strcpy(l->child_service, child_service);
    upstream_init(l, &l->child, "the runc shim closed its connection");
    upstream_init(l, &l->events, "containerd closed the events connection");
    int err = upstream_start(&l->child, child_fd);
    if (err) {
        l->events.fd = events_fd; /* closed with the lane */
    } else {
        err = upstream_start(&l->events, events_fd);
    }
    if (err) {
        kyb_lane_close(l); /* a reader that started ends; the last reference closes the fds */
        errno = err;
        return NULL;
    }
    return l;
}

/* Takes an accepted containerd connection; returns the socket Python serves instead, or -1 with errno
 * (the connection is then still the caller's). */
int kyb_lane_adopt(void *lane, int cfd) {
    struct lane *l = lane;
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) return -1;
    struct conn *c = calloc(1, sizeof *c);
    if (!c) goto fail;
    pthread_mutex_init(&c->write, NULL);
    c->lane = l;
    c->cfd = cfd;
    c->pfd = pair[0];
    c->refs = 2;
    blocking_with_send_timeout(cfd);
    blocking_with_send_timeout(pair[0]);
    pthread_mutex_lock(&l->mu);
    if (l->closed) {
        pthread_mutex_unlock(&l->mu);
        errno = ESHUTDOWN;
        goto fail;
    }
    l->refs++;
    c->next = l->conns;
    l->conns = c;
    pthread_mutex_unlock(&l->mu);
    int err = spawn(from_containerd, c);
    if (err) {
        /* Nothing read yet: undo as if never adopted. */
        pthread_mutex_lock(&l->mu);
        l->conns = c->next;
        l->refs--;
        pthread_mutex_unlock(&l->mu);
        errno = err;
        goto fail;
    }
    if ((err = spawn(from_python, c))) {
        /* The reader runs: end the connection through it; Python gets a closed socket. */
        pthread_mutex_lock(&l->mu);
        c->refs--;
        pthread_mutex_unlock(&l->mu);
        shutdown(cfd, SHUT_RDWR);
        return pair[1];
    }
    return pair[1];
fail:
    if (c) {
        pthread_mutex_destroy(&c->write);
        free(c);
    }
    close(pair[0]);
    close(pair[1]);
    return -1;
}

/* open: no task hibernated (else every task call goes to Python); connect_local: no task with GPU state;
 * events_open: no task hibernating or waking (else every event goes to Python, which may drop it). */
void kyb_lane_gate(void *lane, int open, int connect_local, int events_open) {
    struct lane *l = lane;
    pthread_mutex_lock(&l->mu);
    l->open = open;
    l->connect_local = connect_local;
    l->events_open = events_open;
    pthread_mutex_unlock(&l->mu);
}

/* A task's init pid (0: not known) and whether its Start only forwards; both 0 forgets it.
 * -1 for an id too long or too many tasks: Python then answers that task's calls. */
int kyb_lane_task(void *lane, const char *id, int pid, int plain) {
    struct lane *l = lane;
    size_t len = strlen(id);
    if (len > MAX_ID) return -1;
    int rc = 0;
    pthread_mutex_lock(&l->mu);
    struct task **tt = &l->tasks, *t = NULL;
    for (; *tt; tt = &(*tt)->next)
        if (strcmp((*tt)->id, id) == 0) {
            t = *tt;
            break;
        }
    if (!pid && !plain) {
        if (t) {
            *tt = t->next;
            free(t);
            l->task_count--;
        }
    } else if (!t && (l->task_count >= MAX_TASKS || !(t = calloc(1, sizeof *t)))) {
        rc = -1;
    } else {
        if (!t->id[0]) {
            memcpy(t->id, id, len + 1);
            t->next = l->tasks;
            l->tasks = t;
            l->task_count++;
        }
        t->pid = pid;
        t->plain = plain;
    }
    pthread_mutex_unlock(&l->mu);
    return rc;
}

/* Calls the lane answered or passed on, for tests and the daemon's log. */
uint64_t kyb_lane_taken(void *lane) {
    struct lane *l = lane;
    pthread_mutex_lock(&l->mu);
    uint64_t n = l->taken;
    pthread_mutex_unlock(&l->mu);
    return n;
}

/* No more connections; the ones open and the runc shim's are ended; the memory goes with the last thread. */
void kyb_lane_close(void *lane) {
    struct lane *l = lane;
    pthread_mutex_lock(&l->mu);
    l->closed = 1;
    for (struct conn *c = l->conns; c; c = c->next) {
        shutdown(c->cfd, SHUT_RDWR);
        shutdown(c->pfd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&l->mu);
    for (struct upstream *up = &l->child; up; up = up == &l->child ? &l->events : NULL)
        if (up->fd >= 0) shutdown(up->fd, SHUT_RDWR);
    lane_unref(l);
}
