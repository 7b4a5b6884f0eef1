/* A fake CUDA program that forks workers after "CUDA init", like a PyTorch training loop whose
 * DataLoader uses fork workers. Built static so that it runs in the busybox test image.
 *
 *   fakegpu-forker WORKERS [DIR]
 *
 * "CUDA init": opens /dev/nvidiactl and /dev/nvidia0 O_RDWR|O_CLOEXEC (as libcuda does) and maps
 * two pages of /dev/nvidia0 MAP_SHARED. In the tests those paths are regular files bind-mounted
 * over /dev inside the container: the fake cannot create a real NVIDIA character device. Being a
 * fake CUDA process is the environment's doing (FAKEGPU_PROC, README.md); the forked workers inherit
 * the variable from a parent with the same id, so the fake driver answers "not a CUDA process" for
 * them, as the real driver does for a forked child.
 *
 * Then it forks WORKERS workers and never touches the device again from them. Each worker i appends
 * "k f(k)" to DIR/w<i> ten times a second (k = 0, 1, 2, ...; f is a checksum of k computed the slow
 * way, so a worker restored with broken memory shows); the parent appends k to DIR/count and writes
 * k into its device mapping (it "uses the GPU"). DIR defaults to "/".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static unsigned long long checksum(unsigned long long k) {
    unsigned long long h = 1469598103934665603ULL;
    for (unsigned long long i = 0; i <= k % 1000; i++) h = (h ^ (k + i)) * 1099511628211ULL;
    return h;
}

static void append(const char *path, const char *line) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t w = write(fd, line, strlen(line));
    (void)w;
    close(fd);
}

static void tick(void) {
    struct timespec ts = {0, 100 * 1000 * 1000};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

int main(int argc, char **argv) {
    int workers = argc > 1 ? atoi(argv[1]) : 2;
    const char *dir = argc > 2 ? argv[2] : "";
    int ctl = open("/dev/nvidiactl", O_RDWR | O_CLOEXEC);
    int dev = open("/dev/nvidia0", O_RDWR | O_CLOEXEC);
    if (ctl < 0 || dev < 0) {
        perror("fakegpu-forker: open /dev/nvidiactl, /dev/nvidia0");
        return 1;
    }
    long page = sysconf(_SC_PAGESIZE);
    volatile unsigned long long *mapped = mmap(NULL, 2 * (size_t)page, PROT_READ | PROT_WRITE, MAP_SHARED, dev, 0);
    if (mapped == MAP_FAILED) {
        perror("fakegpu-forker: mmap /dev/nvidia0");
        return 1;
    }
    char path[4096], line[128];
    for (int i = 0; i < workers; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fakegpu-forker: fork");
            return 1;
        }
        if (pid == 0) {
            snprintf(path, sizeof path, "%s/w%d", dir, i);
            for (unsigned long long k = 0;; k++) {
                snprintf(line, sizeof line, "%llu %llu\n", k, checksum(k));
                append(path, line);
                tick();
            }
        }
    }
    snprintf(path, sizeof path, "%s/count", dir);
    for (unsigned long long k = 0;; k++) {
        mapped[0] = k;
        snprintf(line, sizeof line, "%llu\n", k);
        append(path, line);
        tick();
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
    }
}
