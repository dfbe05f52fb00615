/*
 * loadgen: the benchmark's load generator. Speaks the sink's command protocol (see sink.c),
 * either in plain TCP (to the sink itself, or to a proxy) or in TLS 1.3 with a client
 * certificate straight to the upstream terminator ("direct TLS": no proxy hop), optionally
 * with the AlloyDB metadata exchange.
 *
 *   loadgen MODE --host H --port P [options]
 *
 * Modes (one JSON object per line on stdout):
 *   up        --conns C --bytes N   C connections upload N bytes in total; MB/s (10^6 B)
 *   down      --conns C --bytes N   the same, downloading
 *   pingpong  --conns C --size S --duration T [--count K]   closed-loop echo of S-byte
 *             messages; round trips/s and latency percentiles
 *   connrate  --conns C --duration T [--count K]   C threads each loop: connect, one S-byte
 *             echo, close; connections/s and latency percentiles (connect to answer)
 *   hold      --conns N             open N connections with one S-byte echo each, print
 *             {"ready":...}, wait for a line (or EOF) on stdin, close them all
 *
 * TLS options: --tls --ca FILE --cert FILE --key FILE [--mdx]
 * Every blocking call has a socket timeout (--io-timeout, default 30 s) and every loop is
 * bounded by count and time. Threads with blocking sockets: simple, and on loopback the
 * proxies are the bottleneck, which the plain-TCP row shows.
 *
 * Build: gcc -O2 -pthread -o loadgen loadgen.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536
#define MAX_THREADS 256

struct cfg {
    const char *mode, *host;
    int port;
    int tls, mdx;
    const char *ca, *cert, *key;
    int conns;
    uint64_t bytes;
    int size;
    double duration;
    uint64_t count;
    int io_timeout;
    int threads; /* hold: opener threads */
} C = {.port = 0, .conns = 1, .size = 100, .duration = 5, .io_timeout = 30, .threads = 16};

static SSL_CTX *ctx;
static struct sockaddr_in addr;

struct conn {
    int fd;
    SSL *ssl;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void conn_close(struct conn *c) {
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

/* Write all of buf; 0 on success. */
static int cwrite(struct conn *c, const void *buf, size_t n) {
    const unsigned char *p = buf;
    while (n > 0) {
        ssize_t w;
        if (c->ssl) {
            size_t written = 0;
            if (SSL_write_ex(c->ssl, p, n, &written) <= 0) return -1;
            w = (ssize_t)written;
        } else {
            w = send(c->fd, p, n, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read up to n bytes; returns bytes read, 0 on EOF, -1 on error. */
static ssize_t cread_some(struct conn *c, void *buf, size_t n) {
    if (c->ssl) {
        size_t got = 0;
        int r = SSL_read_ex(c->ssl, buf, n, &got);
        if (r <= 0) {
            int e = SSL_get_error(c->ssl, r);
            return e == SSL_ERROR_ZERO_RETURN ? 0 : -1;
        }
        return (ssize_t)got;
    }
    for (;;) {
        ssize_t r = recv(c->fd, buf, n, 0);
        if (r < 0 && errno == EINTR) continue;
        return r;
    }
}

static int cread_full(struct conn *c, void *buf, size_t n) {
    unsigned char *p = buf;
    while (n > 0) {
        ssize_t r = cread_some(c, p, n);
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int send_header(struct conn *c, char cmd, uint64_t n) {
    unsigned char h[9];
    h[0] = (unsigned char)cmd;
    for (int i = 8; i >= 1; i--) {
        h[i] = (unsigned char)(n & 0xff);
        n >>= 8;
    }
    return cwrite(c, h, sizeof h);
}

/* connect (+ TLS handshake + metadata exchange); 0 on success */
static int conn_open(struct conn *c) {
    c->ssl = NULL;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = C.io_timeout, .tv_usec = 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        conn_close(c);
        return -1;
    }
    if (!C.tls) return 0;
    c->ssl = SSL_new(ctx);
    SSL_set_fd(c->ssl, c->fd);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), C.host);
    if (SSL_connect(c->ssl) != 1) {
        ERR_print_errors_fp(stderr);
        conn_close(c);
        return -1;
    }
    if (C.mdx) {
        /* user_agent "loadgen", auth_type DB_NATIVE, oauth2_token "x" */
        static const unsigned char req[] = {0, 0, 0, 14, 0x0a, 7, 'l', 'o', 'a', 'd', 'g', 'e',
                                            'n', 0x10, 1, 0x1a, 1, 'x'};
        unsigned char resp[64];
        if (cwrite(c, req, sizeof req) < 0 || cread_full(c, resp, 4) < 0) goto fail;
        uint32_t len = ((uint32_t)resp[0] << 24) | ((uint32_t)resp[1] << 16) |
                       ((uint32_t)resp[2] << 8) | resp[3];
        if (len > sizeof resp || cread_full(c, resp, len) < 0) goto fail;
        if (len < 2 || resp[0] != 0x08 || resp[1] != 0x01) goto fail;
    }
    return 0;
fail:
    conn_close(c);
    return -1;
}

/* Connect and make sure the whole chain is up: 'P' -> 'p'. */
static int conn_open_ready(struct conn *c) {
    if (conn_open(c) < 0) return -1;
    unsigned char b;
    if (send_header(c, 'P', 0) < 0 || cread_full(c, &b, 1) < 0 || b != 'p') {
        conn_close(c);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
static pthread_barrier_t barrier;
static double t_start;

struct worker {
    pthread_t th;
    int idx;
    uint64_t bytes;  /* bulk: bytes to move; done: moved */
    double t_begin, t_end;
    int error;
    uint32_t *lat;   /* latencies in ns */
    uint64_t nlat, cap;
    struct conn conn;
    uint64_t done;
};

static void *bulk_thread(void *arg) {
    struct worker *w = arg;
    static __thread unsigned char buf[CHUNK];
    int up = strcmp(C.mode, "up") == 0;
    if (up)
        for (size_t i = 0; i < CHUNK; i++) buf[i] = (unsigned char)(i * 7);
    int ok = conn_open_ready(&w->conn) == 0;
    if (!ok) w->error = 1;
    pthread_barrier_wait(&barrier);
    w->t_begin = now();
    if (!ok) return NULL;
    double deadline = w->t_begin + C.duration;
    if (up) {
        if (send_header(&w->conn, 'D', w->bytes) < 0) goto err;
        uint64_t left = w->bytes;
        while (left > 0) {
            size_t n = left < CHUNK ? (size_t)left : CHUNK;
            if (cwrite(&w->conn, buf, n) < 0) goto err;
            left -= n;
            w->done += n;
            if ((w->done & ((1u << 24) - 1)) < CHUNK && now() > deadline) goto err;
        }
        unsigned char ack[8];
        if (cread_full(&w->conn, ack, 8) < 0) goto err;
    } else {
        if (send_header(&w->conn, 'S', w->bytes) < 0) goto err;
        while (w->done < w->bytes) {
            uint64_t left = w->bytes - w->done;
            ssize_t r = cread_some(&w->conn, buf, left < CHUNK ? (size_t)left : CHUNK);
            if (r <= 0) goto err;
            w->done += (uint64_t)r;
            if ((w->done & ((1u << 24) - 1)) < CHUNK && now() > deadline) goto err;
        }
    }
    w->t_end = now();
    conn_close(&w->conn);
    return NULL;
err:
    w->t_end = now();
    w->error = 1;
    conn_close(&w->conn);
    return NULL;
}

static void push_lat(struct worker *w, double seconds) {
    if (w->nlat < w->cap) {
        double ns = seconds * 1e9;
        w->lat[w->nlat++] = ns > 4e9 ? 4000000000u : (uint32_t)ns;
    }
}

static void *pingpong_thread(void *arg) {
    struct worker *w = arg;
    unsigned char msg[4096], back[4096];
    memset(msg, 'x', sizeof msg);
    int ok = conn_open_ready(&w->conn) == 0 && send_header(&w->conn, 'E', 0) == 0;
    for (int i = 0; ok && i < 10; i++) /* warm-up */
        ok = cwrite(&w->conn, msg, (size_t)C.size) == 0 &&
             cread_full(&w->conn, back, (size_t)C.size) == 0;
    if (!ok) w->error = 1;
    pthread_barrier_wait(&barrier);
    w->t_begin = now();
    if (!ok) return NULL;
    double deadline = w->t_begin + C.duration;
    for (uint64_t i = 0; i < w->cap; i++) {
        double t0 = now();
        if (t0 > deadline) break;
        if (cwrite(&w->conn, msg, (size_t)C.size) < 0 ||
            cread_full(&w->conn, back, (size_t)C.size) < 0) {
            w->error = 1;
            break;
        }
        push_lat(w, now() - t0);
    }
    w->t_end = now();
    conn_close(&w->conn);
    return NULL;
}

static void *connrate_thread(void *arg) {
    struct worker *w = arg;
    unsigned char msg[4096 + 9], back[4096];
    memset(msg, 'x', sizeof msg);
    msg[0] = 'E';
    memset(msg + 1, 0, 8);
    pthread_barrier_wait(&barrier);
    w->t_begin = now();
    double deadline = w->t_begin + C.duration;
    for (uint64_t i = 0; i < w->cap; i++) {
        double t0 = now();
        if (t0 > deadline) break;
        struct conn c;
        if (conn_open(&c) < 0) {
            w->error++;
            if (w->error > 100) break;
            continue;
        }
        if (cwrite(&c, msg, (size_t)C.size + 9) < 0 || cread_full(&c, back, (size_t)C.size) < 0) {
            w->error++;
            conn_close(&c);
            if (w->error > 100) break;
            continue;
        }
        conn_close(&c);
        push_lat(w, now() - t0);
    }
    w->t_end = now();
    return NULL;
}

static struct conn *held;
static int hold_next;
static pthread_mutex_t hold_mu = PTHREAD_MUTEX_INITIALIZER;
static int hold_failed;

static void *hold_thread(void *arg) {
    (void)arg;
    unsigned char msg[4096 + 9], back[4096];
    memset(msg, 'x', sizeof msg);
    msg[0] = 'E';
    memset(msg + 1, 0, 8);
    double deadline = t_start + C.duration;
    for (;;) {
        pthread_mutex_lock(&hold_mu);
        int i = hold_next < C.conns ? hold_next++ : -1;
        pthread_mutex_unlock(&hold_mu);
        if (i < 0 || now() > deadline) return NULL;
        struct conn *c = &held[i];
        if (conn_open(c) < 0) goto fail;
        if (cwrite(c, msg, (size_t)C.size + 9) < 0 || cread_full(c, back, (size_t)C.size) < 0) {
            conn_close(c);
            goto fail;
        }
        continue;
    fail:
        c->fd = -1;
        pthread_mutex_lock(&hold_mu);
        hold_failed++;
        int give_up = hold_failed > 50;
        pthread_mutex_unlock(&hold_mu);
        if (give_up) return NULL;
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double pct(uint32_t *v, uint64_t n, double p) {
    if (!n) return -1;
    uint64_t i = (uint64_t)(p * (double)(n - 1) + 0.5);
    return v[i] / 1000.0;
}

static void print_latencies(struct worker *ws, int n, double seconds, const char *rate_name) {
    uint64_t total = 0;
    int errors = 0;
    for (int i = 0; i < n; i++) {
        total += ws[i].nlat;
        errors += ws[i].error;
    }
    uint32_t *all = malloc((total ? total : 1) * sizeof *all);
    uint64_t k = 0;
    double sum = 0;
    for (int i = 0; i < n; i++)
        for (uint64_t j = 0; j < ws[i].nlat; j++) {
            all[k++] = ws[i].lat[j];
            sum += ws[i].lat[j];
        }
    qsort(all, total, sizeof *all, cmp_u32);
    printf("{\"mode\":\"%s\",\"conns\":%d,\"count\":%llu,\"seconds\":%.6f,\"%s\":%.3f,"
           "\"mean_us\":%.3f,\"p50_us\":%.3f,\"p99_us\":%.3f,\"p999_us\":%.3f,\"max_us\":%.3f,"
           "\"errors\":%d}\n",
           C.mode, C.conns, (unsigned long long)total, seconds, rate_name,
           seconds > 0 ? (double)total / seconds : 0.0, total ? sum / (double)total / 1000.0 : -1,
           pct(all, total, 0.50), pct(all, total, 0.99), pct(all, total, 0.999),
           pct(all, total, 1.0), errors);
    free(all);
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen up|down|pingpong|connrate|hold --host H --port P [--conns N]"
                    " [--bytes N] [--size S] [--duration T] [--count K] [--threads K]"
                    " [--io-timeout S] [--tls --ca F --cert F --key F [--mdx]]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    C.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--tls")) C.tls = 1;
        else if (!strcmp(a, "--mdx")) C.mdx = 1;
        else if (!v) usage();
        else if (!strcmp(a, "--host")) C.host = v, i++;
        else if (!strcmp(a, "--port")) C.port = atoi(v), i++;
        else if (!strcmp(a, "--ca")) C.ca = v, i++;
        else if (!strcmp(a, "--cert")) C.cert = v, i++;
        else if (!strcmp(a, "--key")) C.key = v, i++;
        else if (!strcmp(a, "--conns")) C.conns = atoi(v), i++;
        else if (!strcmp(a, "--bytes")) C.bytes = strtoull(v, NULL, 10), i++;
        else if (!strcmp(a, "--size")) C.size = atoi(v), i++;
        else if (!strcmp(a, "--duration")) C.duration = atof(v), i++;
        else if (!strcmp(a, "--count")) C.count = strtoull(v, NULL, 10), i++;
        else if (!strcmp(a, "--threads")) C.threads = atoi(v), i++;
        else if (!strcmp(a, "--io-timeout")) C.io_timeout = atoi(v), i++;
        else usage();
    }
    if (!C.host || !C.port || C.conns < 1 || C.size < 1 || C.size > 4096) usage();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)C.port);
    if (inet_pton(AF_INET, C.host, &addr.sin_addr) != 1) usage();
    if (C.tls) {
        ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        if (!C.ca || !C.cert || !C.key || SSL_CTX_load_verify_locations(ctx, C.ca, NULL) != 1 ||
            SSL_CTX_use_certificate_chain_file(ctx, C.cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, C.key, SSL_FILETYPE_PEM) != 1) {
            ERR_print_errors_fp(stderr);
            fprintf(stderr, "loadgen: TLS setup failed\n");
            return 1;
        }
    }

    if (!strcmp(C.mode, "hold")) {
        held = calloc((size_t)C.conns, sizeof *held);
        for (int i = 0; i < C.conns; i++) held[i].fd = -1;
        int nt = C.threads < 1 ? 1 : (C.threads > MAX_THREADS ? MAX_THREADS : C.threads);
        pthread_t th[MAX_THREADS];
        if (C.duration < 1) C.duration = 600;
        t_start = now();
        for (int i = 0; i < nt; i++) pthread_create(&th[i], NULL, hold_thread, NULL);
        for (int i = 0; i < nt; i++) pthread_join(th[i], NULL);
        int open_ = 0;
        for (int i = 0; i < C.conns; i++) open_ += held[i].fd >= 0;
        printf("{\"mode\":\"hold\",\"ready\":%d,\"failed\":%d,\"seconds\":%.6f}\n", open_,
               hold_failed, now() - t_start);
        fflush(stdout);
        char line[64];
        if (!fgets(line, sizeof line, stdin)) { /* EOF: close too */
        }
        for (int i = 0; i < C.conns; i++) conn_close(&held[i]);
        return 0;
    }

    int n = C.conns;
    if (n > MAX_THREADS) n = MAX_THREADS;
    struct worker *ws = calloc((size_t)n, sizeof *ws);
    void *(*fn)(void *) = NULL;
    int bulk = !strcmp(C.mode, "up") || !strcmp(C.mode, "down");
    if (bulk) fn = bulk_thread;
    else if (!strcmp(C.mode, "pingpong")) fn = pingpong_thread;
    else if (!strcmp(C.mode, "connrate")) fn = connrate_thread;
    else usage();
    if (bulk && C.duration < 1) C.duration = 600;
    pthread_barrier_init(&barrier, NULL, (unsigned)n + 1);
    for (int i = 0; i < n; i++) {
        ws[i].idx = i;
        ws[i].bytes = C.bytes / (uint64_t)n;
        ws[i].conn.fd = -1;
        if (!bulk) {
            ws[i].cap = C.count ? (C.count + (uint64_t)n - 1) / (uint64_t)n : 2000000;
            ws[i].lat = malloc(ws[i].cap * sizeof(uint32_t));
        }
        pthread_create(&ws[i].th, NULL, fn, &ws[i]);
    }
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < n; i++) pthread_join(ws[i].th, NULL);
    double t_end = 0, t_begin = 0;
    for (int i = 0; i < n; i++) {
        if (ws[i].t_end > t_end) t_end = ws[i].t_end;
        if (ws[i].t_begin > 0 && (t_begin == 0 || ws[i].t_begin < t_begin)) t_begin = ws[i].t_begin;
    }
    double seconds = t_end > t_begin ? t_end - t_begin : 0;
    if (bulk) {
        uint64_t moved = 0;
        int errors = 0;
        for (int i = 0; i < n; i++) {
            moved += ws[i].done;
            errors += ws[i].error;
        }
        printf("{\"mode\":\"%s\",\"conns\":%d,\"bytes\":%llu,\"seconds\":%.6f,\"mbps\":%.3f,"
               "\"errors\":%d}\n",
               C.mode, n, (unsigned long long)moved, seconds,
               seconds > 0 ? (double)moved / seconds / 1e6 : 0.0, errors);
    } else {
        print_latencies(ws, n, seconds, !strcmp(C.mode, "connrate") ? "cps" : "rps");
    }
    return 0;
}
