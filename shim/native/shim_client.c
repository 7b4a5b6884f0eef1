/*
 * containerd-shim-kybernate-v1, the native client: what containerd runs for every shim command.
 *
 * A Python interpreter start costs 10-200 ms per command on a busy node, and containerd runs the shim
 * binary twice per container (`start`, then `delete` after the task is gone), both on the critical path
 * of a pod's start and stop. This program answers the two common cases itself and hands everything else
 * on, unchanged:
 *
 *   start of a container whose pod already has our shim daemon (every container after the sandbox):
 *       the daemon's socket answers, so write bundle/address and print that address. Nothing is forked.
 *   delete whose pod daemon still answers, or left nothing behind (no socket, no live child):
 *       nothing of ours to clean up, so exec the runc shim's own `delete` (what runc's delete costs).
 *   anything else (the first start of a pod, -info, -v, a delete after a killed daemon, input this
 *   program does not fully understand): the resident kybernate-shimd, over the same request as
 *   shim/client.py sends (protocol 1: argv, cwd, environment, fds 0-2); when no resident listens,
 *   exec the Python launcher beside this binary (`<this binary>.py`), which logs the fallback once.
 *
 * The Python code (shim/cli.py, shim/manager.py) is the reference: every rule here mirrors it (group id
 * from the spec's annotations, the socket name, the group state file), and whatever this program cannot
 * decide exactly (a spec it cannot parse, a non-string label) goes to the Python path, which then
 * answers as it always did. Standard C and POSIX only; built by `make venv` and the installer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define SOCKET_DIR "/run/containerd/s"
#define DEFAULT_STATE_DIR "/run/kybernate/shims"
#define DEFAULT_RESIDENT "/run/kybernate-shimd/shimd.sock"
#define RUNC_SHIM "containerd-shim-runc-v2"
#define MAX_SPEC (16 << 20)     /* a config.json larger than this goes to the Python path */
#define MAX_LABEL 4096          /* longest group label handled here */
#define MAX_REQUEST (1 << 20)   /* shim/client.py MAX_REQUEST */
#define ANSWER_TIMEOUT_S 60     /* shim/client.py ANSWER_TIMEOUT_S */
#define MAX_DEPTH 128

enum { HANDLED_NOT = -1 };

#ifndef KYB_BUILD_ID
#define KYB_BUILD_ID "make venv"
#endif
/* Who built this binary: the installer knows its own files by this (packaging/installer/install.py). */
__attribute__((used)) static const char build_id[] = "built by " KYB_BUILD_ID;

static double t0;
/* Why this program handed a start or delete on (shown in the phases line): one word. */
static const char *handed_on = "";

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

/* ---- the command line, as shim/cli.py parse_args reads it ----------------------------------------- */

struct args {
    const char *namespace, *address, *publish_binary, *id, *bundle, *action;
    int debug, version, info;
};

static int is_value_flag(const char *n, size_t len) {
    static const char *names[] = {"namespace", "address", "publish-binary", "id", "bundle", "socket", "debug-socket"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strlen(names[i]) == len && !memcmp(names[i], n, len)) return 1;
    return 0;
}

/* 0 on success; -1 when the command line is one the Python path must answer (it says what is wrong). */
static int parse_args(int argc, char **argv, struct args *a) {
    memset(a, 0, sizeof *a);
    a->namespace = a->address = a->publish_binary = a->id = a->bundle = a->action = "";
    int i = 1;
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (arg[0] != '-' || !strcmp(arg, "-") || !strcmp(arg, "--")) break;
        const char *name = arg;
        while (*name == '-') name++;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        if (is_value_flag(name, len)) {
            const char *value;
            if (eq) value = eq + 1;
            else if (i + 1 < argc) value = argv[++i];
            else return -1;
#define SET(flag, field) if (len == strlen(flag) && !memcmp(name, flag, len)) a->field = value
            SET("namespace", namespace); SET("address", address); SET("publish-binary", publish_binary);
            SET("id", id); SET("bundle", bundle);
#undef SET
        } else {
            int on = !(eq && (!strcasecmp(eq + 1, "false") || !strcmp(eq + 1, "0")));
            if (len == 5 && !memcmp(name, "debug", 5)) a->debug = on;
            else if (len == 1 && name[0] == 'v') a->version = on;
            else if (len == 4 && !memcmp(name, "info", 4)) a->info = on;
            else return -1;
        }
    }
    if (i < argc && !strcmp(argv[i], "--")) i++;
    if (argc - i > 1) return -1;
    if (i < argc) a->action = argv[i];
    return 0;
}

/* ---- SHA-256 (FIPS 180-4), for the socket name ---------------------------------------------------- */

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 | (uint32_t)p[4 * t + 2] << 8 | p[4 * t + 3];
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = ROR(w[t - 15], 7) ^ ROR(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = ROR(w[t - 2], 17) ^ ROR(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 64; t++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[t] + w[t];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static void sha256_hex(const unsigned char *data, size_t len, char out[65]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t i = 0;
    for (; len - i >= 64; i += 64) sha256_block(h, data + i);
    unsigned char tail[128] = {0};
    size_t rest = len - i;
    memcpy(tail, data + i, rest);
    tail[rest] = 0x80;
    size_t blocks = rest + 9 > 64 ? 2 : 1;
    uint64_t bits = (uint64_t)len * 8;
    for (int b = 0; b < 8; b++) tail[blocks * 64 - 1 - b] = (unsigned char)(bits >> (8 * b));
    for (size_t b = 0; b < blocks; b++) sha256_block(h, tail + 64 * b);
    for (int j = 0; j < 8; j++) snprintf(out + 8 * j, 9, "%08x", h[j]);
}

/* ---- the group id from config.json, as manager.group_id reads it ---------------------------------- */

/* A strict JSON reader that only keeps what group_id needs: the string values of the two labels in the
 * LAST top-level "annotations" object (json.load keeps the last of duplicate keys). Anything it does not
 * accept makes the caller use the Python path, which then answers exactly as before. */
struct json {
    const unsigned char *p, *end;
    int depth;
};

static void skip_ws(struct json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int hex4(const unsigned char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    *out = v;
    return 0;
}

/* Reads a string at j->p (at its opening quote). Decoded into out (cap bytes, NUL-terminated) when out is
 * given; *fits is 0 when it did not fit (then out holds no usable value). -1 on malformed JSON and on
 * what this reader declines to decode (NUL, lone surrogates). */
static int read_string(struct json *j, char *out, size_t cap, int *fits) {
    size_t n = 0;
    int ok = 1;
    if (j->p >= j->end || *j->p != '"') return -1;
    j->p++;
    for (;;) {
        if (j->p >= j->end) return -1;
        unsigned c = *j->p++;
        unsigned char buf[4];
        size_t blen = 1;
        if (c == '"') break;
        if (c < 0x20) return -1;
        if (c == '\\') {
            if (j->p >= j->end) return -1;
            unsigned e = *j->p++;
            switch (e) {
            case '"': case '\\': case '/': buf[0] = (unsigned char)e; break;
            case 'b': buf[0] = '\b'; break;
            case 'f': buf[0] = '\f'; break;
            case 'n': buf[0] = '\n'; break;
            case 'r': buf[0] = '\r'; break;
            case 't': buf[0] = '\t'; break;
            case 'u': {
                unsigned cp, lo;
                if (j->end - j->p < 4 || hex4(j->p, &cp)) return -1;
                j->p += 4;
                if (cp >= 0xdc00 && cp <= 0xdfff) return -1;
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u' || hex4(j->p + 2, &lo)) return -1;
                    if (lo < 0xdc00 || lo > 0xdfff) return -1;
                    j->p += 6;
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                }
                if (cp == 0) return -1;
                if (cp < 0x80) buf[0] = (unsigned char)cp;
                else if (cp < 0x800) { buf[0] = 0xc0 | cp >> 6; buf[1] = 0x80 | (cp & 0x3f); blen = 2; }
                else if (cp < 0x10000) {
                    buf[0] = 0xe0 | cp >> 12; buf[1] = 0x80 | (cp >> 6 & 0x3f); buf[2] = 0x80 | (cp & 0x3f); blen = 3;
                } else {
                    buf[0] = 0xf0 | cp >> 18; buf[1] = 0x80 | (cp >> 12 & 0x3f);
                    buf[2] = 0x80 | (cp >> 6 & 0x3f); buf[3] = 0x80 | (cp & 0x3f); blen = 4;
                }
                break;
            }
            default: return -1;
            }
        } else {
            buf[0] = (unsigned char)c;
        }
        if (out) {
            if (n + blen < cap) memcpy(out + n, buf, blen), n += blen;
            else ok = 0;
        }
    }
    if (out) out[ok ? n : 0] = '\0';
    if (fits) *fits = ok;
    return 0;
}

static int skip_value(struct json *j);

static int skip_container(struct json *j, unsigned char close, int keyed) {
    if (++j->depth > MAX_DEPTH) return -1;
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == close) { j->p++; j->depth--; return 0; }
    for (;;) {
        skip_ws(j);
        if (keyed) {
            if (read_string(j, NULL, 0, NULL)) return -1;
            skip_ws(j);
            if (j->p >= j->end || *j->p++ != ':') return -1;
        }
        if (skip_value(j)) return -1;
        skip_ws(j);
        if (j->p >= j->end) return -1;
        unsigned char c = *j->p++;
        if (c == close) break;
        if (c != ',') return -1;
    }
    j->depth--;
    return 0;
}

static int skip_literal(struct json *j, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n)) return -1;
    j->p += n;
    return 0;
}

static int skip_number(struct json *j) {
    const unsigned char *start = j->p;
    if (j->p < j->end && *j->p == '-') j->p++;
    if (j->p >= j->end || *j->p < '0' || *j->p > '9') return -1;
    if (*j->p == '0') j->p++;
    else while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (j->p >= j->end || *j->p < '0' || *j->p > '9') return -1;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (j->p >= j->end || *j->p < '0' || *j->p > '9') return -1;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    }
    return j->p > start ? 0 : -1;
}

static int skip_value(struct json *j) {
    skip_ws(j);
    if (j->p >= j->end) return -1;
    switch (*j->p) {
    case '{': return skip_container(j, '}', 1);
    case '[': return skip_container(j, ']', 0);
    case '"': return read_string(j, NULL, 0, NULL);
    case 't': return skip_literal(j, "true");
    case 'f': return skip_literal(j, "false");
    case 'n': return skip_literal(j, "null");
    default: return skip_number(j);  /* NaN/Infinity, which json.load also takes, go to the Python path */
    }
}

/* Valid UTF-8 throughout (json.load decodes the whole file first), no BOM. */
static int utf8_valid(const unsigned char *p, size_t n) {
    if (n >= 3 && p[0] == 0xef && p[1] == 0xbb && p[2] == 0xbf) return 0;
    for (size_t i = 0; i < n;) {
        unsigned c = p[i];
        size_t more;
        uint32_t cp, min;
        if (c < 0x80) { i++; continue; }
        else if ((c & 0xe0) == 0xc0) { more = 1; cp = c & 0x1f; min = 0x80; }
        else if ((c & 0xf0) == 0xe0) { more = 2; cp = c & 0x0f; min = 0x800; }
        else if ((c & 0xf8) == 0xf0) { more = 3; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (n - i <= more) return 0;
        for (size_t k = 1; k <= more; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (p[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += more + 1;
    }
    return 1;
}

static const char *const LABELS[2] = {"io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id"};

/* The group label values of the last top-level annotations object ("" when absent); 0 on success. */
static int spec_labels(const unsigned char *data, size_t n, char labels[2][MAX_LABEL]) {
    struct json j = {data, data + n, 0};
    char key[64];
    int fits;
    if (!utf8_valid(data, n)) return -1;
    skip_ws(&j);
    if (j.p >= j.end || *j.p != '{') return -1;  /* not an object: StartError in Python */
    j.p++;
    labels[0][0] = labels[1][0] = '\0';
    skip_ws(&j);
    if (j.p < j.end && *j.p == '}') j.p++;
    else for (;;) {
        skip_ws(&j);
        if (read_string(&j, key, sizeof key, &fits)) return -1;
        skip_ws(&j);
        if (j.p >= j.end || *j.p++ != ':') return -1;
        skip_ws(&j);
        if (fits && !strcmp(key, "annotations")) {
            labels[0][0] = labels[1][0] = '\0';  /* a later "annotations" replaces an earlier one */
            if (j.p < j.end && *j.p == '{') {
                j.p++;
                skip_ws(&j);
                if (j.p < j.end && *j.p == '}') j.p++;
                else for (;;) {
                    skip_ws(&j);
                    if (read_string(&j, key, sizeof key, &fits)) return -1;
                    skip_ws(&j);
                    if (j.p >= j.end || *j.p++ != ':') return -1;
                    skip_ws(&j);
                    int which = !fits ? -1 : !strcmp(key, LABELS[0]) ? 0 : !strcmp(key, LABELS[1]) ? 1 : -1;
                    if (which >= 0) {
                        int vfits;
                        if (j.p >= j.end || *j.p != '"') return -1;  /* Python would str() it: not here */
                        if (read_string(&j, labels[which], MAX_LABEL, &vfits) || !vfits) return -1;
                    } else if (skip_value(&j)) {
                        return -1;
                    }
                    skip_ws(&j);
                    if (j.p >= j.end) return -1;
                    unsigned char c = *j.p++;
                    if (c == '}') break;
                    if (c != ',') return -1;
                }
            } else if (skip_value(&j)) {
                return -1;
            }
        } else if (skip_value(&j)) {
            return -1;
        }
        skip_ws(&j);
        if (j.p >= j.end) return -1;
        unsigned char c = *j.p++;
        if (c == '}') break;
        if (c != ',') return -1;
    }
    skip_ws(&j);
    return j.p == j.end ? 0 : -1;  /* trailing data: json.load refuses it */
}

/* The string value of a top-level key of a JSON object (the last one, as json.load keeps); 0 if found. */
static int json_top_string(const unsigned char *data, size_t n, const char *want, char *out, size_t cap) {
    struct json j = {data, data + n, 0};
    char key[64];
    int fits, found = -1;
    if (!utf8_valid(data, n)) return -1;
    skip_ws(&j);
    if (j.p >= j.end || *j.p++ != '{') return -1;
    skip_ws(&j);
    if (j.p < j.end && *j.p == '}') return -1;
    for (;;) {
        skip_ws(&j);
        if (read_string(&j, key, sizeof key, &fits)) return -1;
        skip_ws(&j);
        if (j.p >= j.end || *j.p++ != ':') return -1;
        skip_ws(&j);
        if (fits && !strcmp(key, want) && j.p < j.end && *j.p == '"') {
            int vfits;
            if (read_string(&j, out, cap, &vfits) || !vfits) return -1;
            found = 0;
        } else if (skip_value(&j)) {
            return -1;
        }
        skip_ws(&j);
        if (j.p >= j.end) return -1;
        unsigned char c = *j.p++;
        if (c == '}') break;
        if (c != ',') return -1;
    }
    return found;
}

static char *read_file(const char *path, size_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    struct stat st;
    char *buf = NULL;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= MAX_SPEC && (buf = malloc(st.st_size + 1))) {
        size_t got = 0;
        ssize_t r;
        while (got < (size_t)st.st_size && (r = read(fd, buf + got, st.st_size - got)) > 0) got += r;
        if (got != (size_t)st.st_size) { free(buf); buf = NULL; }
        else *size = got;
    }
    close(fd);
    return buf;
}

/* socket path of our daemon for this container's group (manager.socket_address); 0 on success. */
static int group_socket(const struct args *a, const char *bundle, char path[PATH_MAX], char hex[65]) {
    char spec_path[PATH_MAX];
    size_t n;
    if (snprintf(spec_path, sizeof spec_path, "%s/config.json", bundle) >= (int)sizeof spec_path) return -1;
    char *spec = read_file(spec_path, &n);
    if (!spec) return -1;
    static char labels[2][MAX_LABEL];
    int bad = spec_labels((unsigned char *)spec, n, labels);
    free(spec);
    if (bad) return -1;
    const char *group = labels[0][0] ? labels[0] : labels[1][0] ? labels[1] : a->id;
    size_t len = strlen(a->address) + strlen(a->namespace) + strlen(group) + 16;
    char *input = malloc(len);
    if (!input) return -1;
    snprintf(input, len, "%s/%s/%s/kybernate", a->address, a->namespace, group);
    sha256_hex((unsigned char *)input, strlen(input), hex);
    free(input);
    snprintf(path, PATH_MAX, "%s/%s", SOCKET_DIR, hex);
    return 0;
}

/* ---- small helpers -------------------------------------------------------------------------------- */

static int unix_connect(const char *path, int timeout_s) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) return -1;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct timeval tv = {.tv_sec = timeout_s};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);  /* bounds connect() on a full backlog */
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Does our daemon answer on its socket? A connect alone is not proof: a killed daemon's listener can
 * outlive its connections by milliseconds (the kernel releases the sockets of an exiting process in no set
 * order), and containerd runs `delete` as soon as its connection drops. So ask: one ttrpc request for a
 * service no daemon serves (frame: length, stream 1, type request; body: service, method), which a live
 * daemon answers at once with UNIMPLEMENTED and a dead one never does. */
static int daemon_answers(const char *path) {
    static const char body[] = "\x0a\x0ekybernate.ping\x12\x04Ping";
    unsigned char frame[10 + sizeof body - 1] = {0, 0, 0, sizeof body - 1, 0, 0, 0, 1, 1, 0};
    memcpy(frame + 10, body, sizeof body - 1);
    int fd = unix_connect(path, 1);
    if (fd < 0) return 0;
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    unsigned char head[10];
    size_t got = 0;
    if (send(fd, frame, sizeof frame, MSG_NOSIGNAL) == (ssize_t)sizeof frame) {
        while (got < sizeof head) {
            ssize_t r = recv(fd, head + got, sizeof head - got, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += (size_t)r;
        }
    }
    close(fd);
    return got == sizeof head && head[7] == 1 && head[8] == 2;  /* a response on stream 1 */
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One phases line into the shim's log, as shim/phases.py writes it (containerd copies it into its own). */
static void emit_phases(const char *bundle, const char *action, const char *id, const char *marks) {
    char path[PATH_MAX], line[1024], stamp[32];
    if (snprintf(path, sizeof path, "%s/log", bundle) >= (int)sizeof path) return;
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return;  /* no reader (containerd closed it) or no fifo */
    time_t t = time(NULL);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", gmtime(&t));
    int n = snprintf(line, sizeof line,
                     "time=%sZ level=info logger=kybernate.shim.phases msg=phases runtime=io.containerd.kybernate.v1 "
                     "action=%s id=%s client=native %s total=%.1f\n", stamp, action, id, marks, now_ms() - t0);
    if (n > 0 && (size_t)n < sizeof line) (void)!write(fd, line, (size_t)n);
    close(fd);
}

/* ---- start: join the pod's daemon ----------------------------------------------------------------- */

/* Is the pod's daemon alive, with its socket? It holds an exclusive flock on <state dir>/<hex>.alive for as
 * long as it lives (manager.hold_alive_lock). Asking the kernel keeps the check off the daemon: connecting
 * to it cost the daemon an accept and a connection while containerd waited (docs/benchmarks.md). */
static int daemon_alive(const char *hex, const char *socket_path) {
    char path[PATH_MAX];
    const char *dir = getenv("KYBERNATE_SHIM_STATE_DIR");
    if (snprintf(path, sizeof path, "%s/%s.alive", dir && *dir ? dir : DEFAULT_STATE_DIR, hex) >= (int)sizeof path)
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    int held = flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
    close(fd);  /* drops the shared lock when we got it: nobody held the daemon's */
    struct stat st;
    return held && stat(socket_path, &st) == 0 && S_ISSOCK(st.st_mode);
}

static int start_join(const struct args *a, const char *bundle) {
    char path[PATH_MAX], hex[65], address[PATH_MAX + 8], marks[64];
    if (group_socket(a, bundle, path, hex)) return handed_on = "spec", HANDLED_NOT;
    double spec_ms = now_ms() - t0;
    /* The pod's first container, or its daemon is gone: the Python path starts one (through the resident). */
    if (!daemon_alive(hex, path)) return handed_on = "new_daemon", HANDLED_NOT;
    /* The runtime options containerd writes to stdin are unread, as the runc shim leaves them when it
     * joins a group (containerd ignores the broken pipe): waiting for them costs the scheduler's time. */
    snprintf(address, sizeof address, "unix://%s", path);
    char tmp[PATH_MAX], final[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s/.address.kybernate", bundle);
    snprintf(final, sizeof final, "%s/address", bundle);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write_all(fd, address, strlen(address)) || close(fd) || rename(tmp, final)) {
        fprintf(stderr, "containerd-shim-kybernate-v1 start: cannot write %s: %s\n", final, strerror(errno));
        return 1;
    }
    if (write_all(1, address, strlen(address))) return 1;
    snprintf(marks, sizeof marks, "spec=%.1f joined=%.1f", spec_ms, now_ms() - t0);
    emit_phases(bundle, "start", a->id, marks);
    return 0;
}

/* ---- delete: the runc shim's delete, when nothing of ours is left to clean up ---------------------- */

static int find_runc_shim(char out[PATH_MAX]) {
    const char *configured = getenv("KYBERNATE_RUNC_SHIM");
    if (configured && *configured) {
        snprintf(out, PATH_MAX, "%s", configured);
        return 0;
    }
    const char *p = getenv("PATH");
    while (p && *p) {
        const char *colon = strchr(p, ':');
        size_t len = colon ? (size_t)(colon - p) : strlen(p);
        if (len && snprintf(out, PATH_MAX, "%.*s/%s", (int)len, p, RUNC_SHIM) < PATH_MAX && access(out, X_OK) == 0)
            return 0;
        p = colon ? colon + 1 : NULL;
    }
    return -1;  /* the Python path says how to fix it */
}

static size_t put_varint(unsigned char *out, uint64_t v) {
    size_t n = 0;
    do {
        out[n] = (unsigned char)(v & 0x7f);
        v >>= 7;
        if (v) out[n] |= 0x80;
        n++;
    } while (v);
    return n;
}

/* The runc shim's answer to `delete` for a task that is gone: task.DeleteResponse {pid = 1 (its init pid,
 * from init.pid), exit_status = 2 (128 + SIGKILL), exited_at = 3 (now)}, protobuf on stdout. containerd
 * publishes no events from it for a task it deleted already; it only needs a well-formed answer. */
static int write_delete_response(const char *bundle) {
    char path[PATH_MAX], text[32] = {0};
    unsigned char ts[24], msg[64];
    uint64_t pid = 0;
    snprintf(path, sizeof path, "%s/init.pid", bundle);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, text, sizeof text - 1) > 0) pid = strtoull(text, NULL, 10);
        close(fd);
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    size_t t = 0, n = 0;
    ts[t++] = 0x08;
    t += put_varint(ts + t, (uint64_t)now.tv_sec);
    ts[t++] = 0x10;
    t += put_varint(ts + t, (uint64_t)now.tv_nsec);
    if (pid) {
        msg[n++] = 0x08;
        n += put_varint(msg + n, pid);
    }
    msg[n++] = 0x10;
    n += put_varint(msg + n, 128 + 9);
    msg[n++] = 0x1a;
    msg[n++] = (unsigned char)t;
    memcpy(msg + n, ts, t);
    n += t;
    return write_all(1, (const char *)msg, n) ? 1 : 0;
}

static int delete_direct(const struct args *a, const char *bundle) {
    char path[PATH_MAX], hex[65], runc[PATH_MAX], state[PATH_MAX], marks[64];
    struct stat st;
    if (group_socket(a, bundle, path, hex)) return handed_on = "spec", HANDLED_NOT;
    if (find_runc_shim(runc)) return handed_on = "no_runc_shim", HANDLED_NOT;
    const char *daemon = "answers";
    if (!daemon_answers(path)) {
        daemon = "gone";
        /* Our daemon is gone or going. manager.stop_orphaned_child has work only if a runc shim it started
         * may still run: its socket is left (a killed daemon), or its group state names a child that still
         * listens. Both are the Python path's job. The common case: the runc shim exited after containerd's
         * Shutdown and removed our socket on its way out (it removes the socket named in bundle/address,
         * which is ours), before our daemon noticed and removed the group state. */
        const char *dir = getenv("KYBERNATE_SHIM_STATE_DIR");
        snprintf(state, sizeof state, "%s/%s.json", dir && *dir ? dir : DEFAULT_STATE_DIR, hex);
        if (lstat(path, &st) == 0) return handed_on = "stale_socket", HANDLED_NOT;
        size_t n;
        char *text = read_file(state, &n);
        if (text) {
            static char child_address[PATH_MAX];
            int unreadable = json_top_string((unsigned char *)text, n, "child_address", child_address,
                                             sizeof child_address);
            free(text);
            if (unreadable || strncmp(child_address, "unix://", 7)) return handed_on = "group_state", HANDLED_NOT;
            int child = unix_connect(child_address + 7, 1);
            if (child >= 0) {
                close(child);
                return handed_on = "orphan", HANDLED_NOT;
            }
            unlink(state);  /* as stop_orphaned_child does: the record of a child that is gone */
            daemon = "gone_child_gone";
        } else if (errno != ENOENT) {
            return handed_on = "group_state", HANDLED_NOT;
        }
    }
    /* The runc shim already deleted this task through our daemon (runc delete, rootfs unmounted: the
     * daemon marked the bundle, shim/service.py DELETED_MARK), so its `delete` would only repeat that
     * cleanup. Answer as it does, from the same files, without running it. */
    char mark[PATH_MAX];
    snprintf(mark, sizeof mark, "%s/.kybernate-task-deleted", bundle);
    if (lstat(mark, &st) == 0) {
        snprintf(marks, sizeof marks, "daemon=%s runc_delete=skipped", daemon);
        emit_phases(bundle, "delete", a->id, marks);
        return write_delete_response(bundle);
    }
    /* The flags in the order manager's ShimArgs.child_flags writes them. */
    const char *child[16];
    int n = 0;
    child[n++] = runc;
    child[n++] = "-namespace"; child[n++] = a->namespace;
    child[n++] = "-address"; child[n++] = a->address;
    if (*a->publish_binary) { child[n++] = "-publish-binary"; child[n++] = a->publish_binary; }
    child[n++] = "-id"; child[n++] = a->id;
    if (*a->bundle) { child[n++] = "-bundle"; child[n++] = a->bundle; }
    if (a->debug) child[n++] = "-debug";
    child[n++] = "delete";
    child[n] = NULL;
    if (chdir(bundle)) return handed_on = "bundle", HANDLED_NOT;
    snprintf(marks, sizeof marks, "daemon=%s orphans=%.1f", daemon, now_ms() - t0);
    emit_phases(".", "delete", a->id, marks);
    /* The runc shim prints its DeleteResponse on our stdout and exits with its own status. */
    execv(runc, (char *const *)child);
    fprintf(stderr, "containerd-shim-kybernate-v1 delete: cannot run %s: %s\n", runc, strerror(errno));
    return 1;
}

/* ---- everything else: the resident, else the Python launcher -------------------------------------- */

static int append_field(char **buf, size_t *len, size_t *cap, const char *data, size_t n) {
    char head[32];
    int h = snprintf(head, sizeof head, "%zu:", n);
    if (*len + (size_t)h + n + 1 > MAX_REQUEST) return -1;
    if (*len + (size_t)h + n + 1 > *cap) {
        size_t want = (*len + h + n + 1) * 2;
        char *grown = realloc(*buf, want);
        if (!grown) return -1;
        *buf = grown;
        *cap = want;
    }
    memcpy(*buf + *len, head, (size_t)h);
    memcpy(*buf + *len + h, data, n);
    (*buf)[*len + h + n] = ',';
    *len += (size_t)h + n + 1;
    return 0;
}

/* The worker's exit status; -2 when no resident listens (nothing happened then). */
static int ask_resident(int argc, char **argv) {
    const char *sock = getenv("KYBERNATE_RESIDENT_SOCKET");
    if (!sock || !*sock) sock = DEFAULT_RESIDENT;
    if (!strcmp(sock, "off")) return -2;
    int fd = unix_connect(sock, 5);
    if (fd < 0) return -2;
    char cwd[PATH_MAX], count[16];
    if (!getcwd(cwd, sizeof cwd)) cwd[0] = '\0';
    size_t cap = 8192, len = 8;
    char *buf = malloc(cap);
    int bad = !buf;
    snprintf(count, sizeof count, "%d", argc);
    bad = bad || append_field(&buf, &len, &cap, "1", 1) || append_field(&buf, &len, &cap, cwd, strlen(cwd))
          || append_field(&buf, &len, &cap, count, strlen(count));
    for (int i = 0; !bad && i < argc; i++) bad = append_field(&buf, &len, &cap, argv[i], strlen(argv[i]));
    for (char **e = environ; !bad && *e; e++)
        if (strchr(*e, '=')) bad = append_field(&buf, &len, &cap, *e, strlen(*e));
    if (bad) {
        free(buf);
        close(fd);
        fprintf(stderr, "containerd-shim-kybernate-v1: request for kybernate-shimd is over %d bytes\n", MAX_REQUEST);
        return 1;
    }
    uint64_t body = len - 8;
    for (int i = 0; i < 8; i++) buf[i] = (char)(body >> (56 - 8 * i));
    /* stdin, stdout and stderr ride on the first message: the worker answers containerd directly. */
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ssize_t sent;
    do sent = sendmsg(fd, &msg, MSG_NOSIGNAL); while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        /* Connected but refused at once (the resident is stopping): like no resident at all. */
        free(buf);
        close(fd);
        return -2;
    }
    int failed = 0;
    for (size_t off = (size_t)sent; off < len && !failed;) {
        ssize_t w = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) failed = 1;
        else off += (size_t)w;
    }
    free(buf);
    struct timeval tv = {.tv_sec = ANSWER_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char answer[32];
    size_t got = 0;
    while (!failed && got < sizeof answer - 1 && (got == 0 || answer[got - 1] != '\n')) {
        ssize_t r = recv(fd, answer + got, sizeof answer - 1 - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (failed || got == 0 || answer[got - 1] != '\n') {
        /* What the worker did is unknown: say so rather than run the command twice. */
        fprintf(stderr, "containerd-shim-kybernate-v1: the kybernate-shimd worker died before answering\n");
        return 1;
    }
    answer[got] = '\0';
    return atoi(answer);
}

static void run_python(char **argv) {
    char self[PATH_MAX], launcher[PATH_MAX + 4];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        fprintf(stderr, "containerd-shim-kybernate-v1: cannot find its own path: %s\n", strerror(errno));
        exit(1);
    }
    self[n] = '\0';
    snprintf(launcher, sizeof launcher, "%s.py", self);
    execv(launcher, argv);
    fprintf(stderr, "containerd-shim-kybernate-v1: kybernate-shimd is not running and %s cannot run: %s; "
                    "reinstall Kybernate\n", launcher, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    struct args a;
    t0 = now_ms();
    if (parse_args(argc, argv, &a) == 0 && !a.version && !a.info && *a.namespace) {
        char cwd[PATH_MAX];
        const char *bundle = *a.bundle ? a.bundle : getcwd(cwd, sizeof cwd);
        int code = HANDLED_NOT;
        if (bundle && !strcmp(a.action, "start")) code = start_join(&a, bundle);
        else if (bundle && !strcmp(a.action, "delete")) code = delete_direct(&a, bundle);
        if (code != HANDLED_NOT) return code;
        if (bundle && *handed_on) {
            char marks[64];
            snprintf(marks, sizeof marks, "handed_on=%s", handed_on);
            emit_phases(bundle, a.action, a.id, marks);
        }
    }
    int status = ask_resident(argc, argv);
    if (status != -2) return status;
    run_python(argv);
    return 1;
}
