/* loadgen: a small epoll load client for mcpresd's JSON-RPC socket.
 *
 * Why C: a Python asyncio client spends more CPU per request than the daemon does, and on a 2-core machine
 * it takes that CPU from the daemon it measures (a no-op Python echo server tops out near 9,000 pairs/s under
 * the Python client). This client costs a few microseconds per request, so the figures are the daemon's.
 *
 * Usage: loadgen SOCKET CLIENTS SECONDS [RESOURCE] [MAX_PAIRS]
 * Each client keeps one persistent connection and loops: allocate 1 of RESOURCE (default "slots"), read the
 * reply, release that id, read the reply. Prints one JSON object: pairs, seconds, pairs_per_s, and allocate
 * latency p50/p99/max in ms (from writing the request to reading the whole reply). Exits 1 on any error reply.
 *
 * Build: cc -O2 -o loadgen loadgen.c   (bench/bench_foundation.py builds it when a C compiler is there)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { ALLOCATING, RELEASING };

typedef struct {
    int fd;
    int phase;
    double sent_at;
    char buf[65536];
    size_t len;
    char id[64];
} conn_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static char alloc_line[512];

static int send_all(int fd, const char *data, size_t n) {
    while (n) {
        ssize_t w = write(fd, data, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { usleep(50); continue; }
            return -1;
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_request(conn_t *c) {
    char line[256];
    c->sent_at = now();
    if (c->phase == ALLOCATING) return send_all(c->fd, alloc_line, strlen(alloc_line));
    int n = snprintf(line, sizeof line,
                     "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"release\",\"params\":{\"id\":\"%s\"}}\n", c->id);
    return send_all(c->fd, line, (size_t)n);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKET CLIENTS SECONDS [RESOURCE] [MAX_PAIRS]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    int clients = atoi(argv[2]);
    double seconds = atof(argv[3]);
    const char *resource = argc > 4 ? argv[4] : "slots";
    long max_pairs = argc > 5 ? atol(argv[5]) : 5000000;
    snprintf(alloc_line, sizeof alloc_line,
             "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"allocate\",\"params\":{\"resources\":"
             "[{\"resource\":\"%s\",\"amount\":1}]}}\n", resource);

    conn_t *conns = calloc((size_t)clients, sizeof *conns);
    size_t cap = 1 << 20, count = 0;
    double *lat = malloc(cap * sizeof *lat);
    int ep = epoll_create1(0);
    for (int i = 0; i < clients; i++) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            perror("connect");
            return 1;
        }
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    double start = now(), until = start + seconds;
    long pairs = 0;
    for (int i = 0; i < clients; i++)
        if (send_request(&conns[i]) < 0) { perror("write"); return 1; }
    int active = clients;
    struct epoll_event events[256];
    while (active > 0) {
        int n = epoll_wait(ep, events, 256, 1000);
        if (n < 0 && errno == EINTR) continue;
        if (n == 0 && now() > until + 30) { fprintf(stderr, "no reply for 30 s\n"); return 1; }
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                fprintf(stderr, "connection closed by the daemon\n");
                return 1;
            }
            c->len += (size_t)r;
            c->buf[c->len] = 0;
            char *nl = memchr(c->buf, '\n', c->len);
            if (!nl) continue;
            *nl = 0;
            double t = now();
            if (c->phase == ALLOCATING) {
                char *at = strstr(c->buf, "\"result\":{\"id\":\"");
                if (!at) { fprintf(stderr, "allocate failed: %.300s\n", c->buf); return 1; }
                at += 16;
                char *end = strchr(at, '"');
                size_t idlen = (size_t)(end - at);
                if (!end || idlen >= sizeof c->id) { fprintf(stderr, "bad reply\n"); return 1; }
                memcpy(c->id, at, idlen);
                c->id[idlen] = 0;
                if (count == cap) { cap *= 2; lat = realloc(lat, cap * sizeof *lat); }
                lat[count++] = t - c->sent_at;
                c->phase = RELEASING;
            } else {
                if (!strstr(c->buf, "\"result\"")) { fprintf(stderr, "release failed: %.300s\n", c->buf); return 1; }
                pairs++;
                c->phase = ALLOCATING;
            }
            size_t rest = c->len - (size_t)(nl + 1 - c->buf);
            memmove(c->buf, nl + 1, rest);
            c->len = rest;
            if (c->phase == ALLOCATING && (t >= until || pairs >= max_pairs)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                active--;
                continue;
            }
            if (send_request(c) < 0) { perror("write"); return 1; }
        }
    }
    double elapsed = now() - start;
    qsort(lat, count, sizeof *lat, cmp);
    printf("{\"clients\":%d,\"pairs\":%ld,\"seconds\":%.3f,\"pairs_per_s\":%.1f,"
           "\"p50_ms\":%.4f,\"p90_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f,\"max_ms\":%.4f}\n",
           clients, pairs, elapsed, pairs / elapsed, count ? lat[count / 2] * 1e3 : 0.0,
           count ? lat[(size_t)(count * 0.90)] * 1e3 : 0.0, count ? lat[(size_t)(count * 0.99)] * 1e3 : 0.0,
           count ? lat[(size_t)(count * 0.999)] * 1e3 : 0.0, count ? lat[count - 1] * 1e3 : 0.0);
    return 0;
}
