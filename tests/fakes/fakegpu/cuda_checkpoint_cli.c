/* A fake `cuda-checkpoint` built on the fake driver: the flags, outputs, messages and exit codes of
 * the real utility of driver 580.159.04 (see README.md), for kybernate-hookd's binary backend. */
#define _GNU_SOURCE
#include "fakegpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cuInit(unsigned int flags);

static const char HELP[] =
    "CUDA checkpoint and restore utility (Kybernate fake).\n"
    "Version %s. Fake driver for tests.\n\n"
    "Operations:\n"
    "--get-state --pid <pid>\n"
    "--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>] [--device-map <uuids>]\n"
    "--toggle --pid <pid>\n"
    "--get-restore-tid --pid <pid>\n\n"
    "Options:\n"
    "--pid|-p <pid>\n"
    "--timeout|-t <timeout>\n"
    "--device-map|-d <deviceUuids>   oldUuid1=newUuid1,oldUuid2=newUuid2,...\n"
    "--help|-h\n";

static int usage(const char *why) {
    fprintf(stderr, "%s\n", why);
    return 1;
}

static int failed(const char *action, int pid, int rc) {
    fprintf(stderr, "Could not %s on process ID %d: \"%s\"\n", action, pid, fg_error_string(rc));
    return 1;
}

/* "old=new,old=new" -> pairs; -1 on a malformed map. */
static int parse_map(const char *text, struct fg_pair **out, unsigned *count) {
    char *copy = strdup(text), *save = NULL;
    unsigned n = 0, cap = 8;
    struct fg_pair *pairs = calloc(cap, sizeof *pairs);
    int rc = copy && pairs ? 0 : -1;
    for (char *item = rc ? NULL : strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        if (!eq) {
            rc = -1;
            break;
        }
        *eq = 0;
        if (n == cap) {
            cap *= 2;
            struct fg_pair *grown = realloc(pairs, cap * sizeof *pairs);
            if (!grown) {
                rc = -1;
                break;
            }
            pairs = grown;
        }
        if (fg_uuid_parse(item, pairs[n].old_uuid) != 0 || fg_uuid_parse(eq + 1, pairs[n].new_uuid) != 0) {
            rc = -1;
            break;
        }
        n++;
    }
    free(copy);
    if (rc != 0) {
        free(pairs);
        return -1;
    }
    *out = pairs;
    *count = n;
    return 0;
}

int main(int argc, char **argv) {
    const char *op = NULL, *action = NULL, *map = NULL;
    int pid = -1;
    unsigned timeout_ms = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            char version[80];
            fg_driver_version(version, sizeof version);
            printf(HELP, version);
            return 0;
        } else if (!strcmp(a, "--get-state") || !strcmp(a, "--toggle") || !strcmp(a, "--get-restore-tid")) {
            op = a;
        } else if (!strcmp(a, "--action") && next) {
            op = a;
            action = argv[++i];
        } else if ((!strcmp(a, "--pid") || !strcmp(a, "-p")) && next) {
            pid = atoi(argv[++i]);
        } else if ((!strcmp(a, "--timeout") || !strcmp(a, "-t")) && next) {
            timeout_ms = (unsigned)strtoul(argv[++i], NULL, 10);
        } else if ((!strcmp(a, "--device-map") || !strcmp(a, "-d")) && next) {
            map = argv[++i];
        } else {
            return usage("Unknown or incomplete option; see --help");
        }
    }
    if (!op || pid <= 0) return usage("An operation and --pid are required; see --help");

    int rc = cuInit(0);
    if (rc != 0) {
        fprintf(stderr, "Error initializing CUDA: \"%s\"\n", fg_error_string(rc));
        return 1;
    }

    if (!strcmp(op, "--get-state")) {
        int state = -1;
        rc = fg_get_state(pid, &state);
        if (rc != 0) {
            fprintf(stderr, "Error getting process state for process ID %d: \"%s\"\n", pid, fg_error_string(rc));
            return 1;
        }
        const char *name = fg_state_name(state);
        for (const char *c = name; *c; c++) putchar(*c >= 'A' && *c <= 'Z' ? *c - 'A' + 'a' : *c);
        putchar('\n');
        return 0;
    }
    if (!strcmp(op, "--get-restore-tid")) {
        int tid = 0;
        rc = fg_get_restore_tid(pid, &tid);
        if (rc != 0) return failed("get restore thread ID", pid, rc);
        printf("%d\n", tid);
        return 0;
    }
    if (!strcmp(op, "--toggle")) {
        int state = -1;
        rc = fg_get_state(pid, &state);
        if (rc == 0 && state == FG_RUNNING) {
            if ((rc = fg_do_lock(pid, 0)) != 0) return failed("lock", pid, rc);
            if ((rc = fg_do_checkpoint(pid)) != 0) return failed("checkpoint", pid, rc);
        } else if (rc == 0 && state == FG_CHECKPOINTED) {
            if ((rc = fg_do_restore(pid, NULL, 0)) != 0) return failed("restore", pid, rc);
            if ((rc = fg_do_unlock(pid)) != 0) return failed("unlock", pid, rc);
        } else {
            return failed("toggle", pid, rc ? rc : 401);
        }
        return 0;
    }
    if (!strcmp(action, "lock")) {
        rc = fg_do_lock(pid, timeout_ms);
    } else if (!strcmp(action, "checkpoint")) {
        rc = fg_do_checkpoint(pid);
    } else if (!strcmp(action, "unlock")) {
        rc = fg_do_unlock(pid);
    } else if (!strcmp(action, "restore")) {
        struct fg_pair *pairs = NULL;
        unsigned count = 0;
        if (map && parse_map(map, &pairs, &count) != 0) return failed("restore", pid, 1);
        rc = fg_do_restore(pid, pairs, count);
        free(pairs);
    } else {
        return usage("Unknown action; see --help");
    }
    return rc ? failed(action, pid, rc) : 0;
}
