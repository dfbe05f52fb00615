/*
 * sink: the plaintext server behind the benchmark's TLS terminator (haproxy in server mode).
 *
 * One thread, epoll, non-blocking sockets. Each listener is given as
 *
 *     --listen HOST:PORT[,mdx][,relay=HOST:PORT]
 *
 * mdx    answer the AlloyDB metadata exchange first (protocol.md section 4.2): read one
 *        uint32_be length + body, write the OK response 00 00 00 02 08 01 in one write.
 * relay  after the optional exchange, connect to HOST:PORT (PostgreSQL) and splice both ways.
 *
 * Without relay, the connection then sends a 9-byte command header: one byte + uint64_be N.
 *
 *   'E' echo everything back (N ignored)
 *   'D' discard: read and count; once N bytes arrived, answer the 8-byte count (uint64_be)
 *       and keep discarding
 *   'S' source: send N bytes, then keep the connection open until the client closes
 *   'P' ping: answer one byte 'p' and read the next header (the load generator uses it to
 *       have the whole chain connected and handshaken before its clock starts)
 *
 * A slow reader never makes the sink buffer without bound: echo stops reading while its
 * buffer is not flushed. Build: gcc -O2 -o sink sink.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAX_LISTENERS 16
#define MAX_EVENTS 512

enum state { ST_MDX, ST_HEADER, ST_ECHO, ST_DISCARD, ST_SOURCE, ST_RELAY_CONNECTING, ST_RELAY };

struct listener;
struct conn;

/* An epoll registration: either a listener or one side of a connection. */
struct ref {
    int kind; /* 0 listener, 1 client side, 2 relay backend side */
    void *ptr;
};

struct listener {
    int fd;
    int mdx;
    int relay;
    struct sockaddr_in relay_addr;
    struct ref ref;
};

struct conn {
    int fd;
    int bfd; /* relay backend, -1 otherwise */
    enum state st;
    struct ref ref, bref;
    /* Inbound bytes waiting (header, MDX, echo data, relay client->backend). */
    unsigned char *in;
    size_t in_len, in_off;
    /* Relay backend->client bytes waiting. */
    unsigned char *out;
    size_t out_len, out_off;
    uint64_t n;     /* command parameter */
    uint64_t count; /* discard: bytes counted; source: bytes sent */
    int acked, dead;
    int client_eof, backend_eof;
    struct listener *l;
    size_t mdx_need;
    /* Queued small reply (MDX answer, discard ack). */
    unsigned char reply[16];
    size_t reply_len, reply_off;
};

static int ep;
static unsigned char source_buf[BUF];
static const unsigned char MDX_OK[6] = {0, 0, 0, 2, 0x08, 0x01};

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int parse_addr(const char *s, struct sockaddr_in *a) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

static void ep_set(int fd, struct ref *r, uint32_t events, int add) {
    struct epoll_event ev = {.events = events, .data.ptr = r};
    if (epoll_ctl(ep, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev) < 0) die("epoll_ctl");
}

/* Closing is deferred: later events of the same epoll batch may still point at c. */
static struct conn *graveyard[2 * MAX_EVENTS];
static int ngrave;

static void conn_close(struct conn *c) {
    if (c->dead) return;
    c->dead = 1;
    if (c->fd >= 0) close(c->fd);
    if (c->bfd >= 0) close(c->bfd);
    c->fd = c->bfd = -1;
    graveyard[ngrave++] = c;
}

static void bury(void) {
    for (int i = 0; i < ngrave; i++) {
        free(graveyard[i]->in);
        free(graveyard[i]->out);
        free(graveyard[i]);
    }
    ngrave = 0;
}

/* Flush the queued reply; returns 1 when empty, 0 when blocked, -1 on error. */
static int flush_reply(struct conn *c) {
    while (c->reply_off < c->reply_len) {
        ssize_t w = send(c->fd, c->reply + c->reply_off, c->reply_len - c->reply_off, MSG_NOSIGNAL);
        if (w < 0) return (errno == EAGAIN) ? 0 : -1;
        c->reply_off += (size_t)w;
    }
    c->reply_len = c->reply_off = 0;
    return 1;
}

static void update_client_events(struct conn *c);

static int start_relay(struct conn *c, struct listener *l) {
    c->bfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->bfd < 0) return -1;
    int one = 1;
    setsockopt(c->bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->out = malloc(BUF);
    if (!c->out) return -1;
    if (connect(c->bfd, (struct sockaddr *)&l->relay_addr, sizeof l->relay_addr) < 0 &&
        errno != EINPROGRESS)
        return -1;
    c->st = ST_RELAY_CONNECTING;
    c->bref.kind = 2;
    c->bref.ptr = c;
    ep_set(c->bfd, &c->bref, EPOLLOUT, 1);
    return 0;
}

/* Consume what is in c->in according to the state. Returns -1 to close. */
static int process_input(struct conn *c, struct listener *l) {
    for (;;) {
        size_t avail = c->in_len - c->in_off;
        if (c->st == ST_MDX) {
            if (avail < 4) return 0;
            if (!c->mdx_need) {
                const unsigned char *p = c->in + c->in_off;
                uint32_t len = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                               ((uint32_t)p[2] << 8) | p[3];
                if (len > 16384) return -1;
                c->mdx_need = 4 + len;
            }
            if (avail < c->mdx_need) return 0;
            c->in_off += c->mdx_need;
            memcpy(c->reply + c->reply_len, MDX_OK, sizeof MDX_OK);
            c->reply_len += sizeof MDX_OK;
            if (flush_reply(c) < 0) return -1;
            if (l->relay) {
                if (start_relay(c, l) < 0) return -1;
                return 0;
            }
            c->st = ST_HEADER;
            continue;
        }
        if (c->st == ST_HEADER) {
            if (avail < 9) return 0;
            const unsigned char *p = c->in + c->in_off;
            uint64_t n = 0;
            for (int i = 1; i < 9; i++) n = (n << 8) | p[i];
            c->n = n;
            c->count = 0;
            c->in_off += 9;
            if (c->reply_len + 8 > sizeof c->reply) return 0; /* flush the last reply first */
            if (p[0] == 'P') {
                c->reply[c->reply_len++] = 'p';
                if (flush_reply(c) < 0) return -1;
                continue;
            }
            if (p[0] == 'E') c->st = ST_ECHO;
            else if (p[0] == 'D') c->st = ST_DISCARD;
            else if (p[0] == 'S') c->st = ST_SOURCE;
            else return -1;
            continue;
        }
        if (c->st == ST_DISCARD) {
            c->count += avail;
            c->in_off = c->in_len = 0;
            if (!c->acked && c->count >= c->n) {
                c->acked = 1;
                uint64_t v = c->count;
                for (int i = 7; i >= 0; i--) {
                    c->reply[c->reply_len + (size_t)i] = (unsigned char)(v & 0xff);
                    v >>= 8;
                }
                c->reply_len += 8;
                if (flush_reply(c) < 0) return -1;
            }
            return 0;
        }
        if (c->st == ST_ECHO) {
            while (c->in_off < c->in_len) {
                ssize_t w = send(c->fd, c->in + c->in_off, c->in_len - c->in_off, MSG_NOSIGNAL);
                if (w < 0) {
                    if (errno == EAGAIN) return 0;
                    return -1;
                }
                c->in_off += (size_t)w;
            }
            c->in_off = c->in_len = 0;
            return 0;
        }
        if (c->st == ST_SOURCE) {
            c->in_off = c->in_len = 0; /* ignore anything the client sends */
            while (c->count < c->n) {
                uint64_t left = c->n - c->count;
                size_t chunk = left < BUF ? (size_t)left : BUF;
                ssize_t w = send(c->fd, source_buf, chunk, MSG_NOSIGNAL);
                if (w < 0) {
                    if (errno == EAGAIN) return 0;
                    return -1;
                }
                c->count += (uint64_t)w;
            }
            return 0;
        }
        return 0; /* relay states: data waits in c->in for the backend */
    }
}

/* Does the client side want EPOLLIN / EPOLLOUT right now? */
static void update_client_events(struct conn *c) {
    uint32_t ev = 0;
    int pending_in = c->in_len > c->in_off;
    switch (c->st) {
    case ST_MDX:
    case ST_HEADER:
    case ST_DISCARD:
        ev = EPOLLIN;
        break;
    case ST_ECHO:
        ev = pending_in ? EPOLLOUT : EPOLLIN;
        break;
    case ST_SOURCE:
        ev = EPOLLIN | (c->count < c->n ? EPOLLOUT : 0);
        break;
    case ST_RELAY_CONNECTING:
        ev = 0;
        break;
    case ST_RELAY:
        ev = (!pending_in && !c->client_eof) ? EPOLLIN : 0;
        if (c->out_len > c->out_off) ev |= EPOLLOUT;
        break;
    }
    if (c->reply_len > c->reply_off) ev |= EPOLLOUT;
    ep_set(c->fd, &c->ref, ev, 0);
}

static void update_backend_events(struct conn *c) {
    uint32_t ev = 0;
    if (c->st == ST_RELAY_CONNECTING) ev = EPOLLOUT;
    else {
        if (c->out_len == c->out_off && !c->backend_eof) ev |= EPOLLIN;
        if (c->in_len > c->in_off) ev |= EPOLLOUT;
    }
    ep_set(c->bfd, &c->bref, ev, 0);
}

/* Relay: move what can move without blocking. Returns -1 to close. */
static int relay_pump(struct conn *c) {
    if (c->reply_len > c->reply_off) {
        int f = flush_reply(c); /* the MDX answer goes out before any PostgreSQL byte */
        if (f < 0) return -1;
        if (f == 0) return 0;
    }
    if (c->in_off == c->in_len) c->in_off = c->in_len = 0; /* e.g. right after the MDX */
    for (int progress = 1; progress;) {
        progress = 0;
        /* client -> backend */
        if (c->in_len > c->in_off) {
            ssize_t w = send(c->bfd, c->in + c->in_off, c->in_len - c->in_off, MSG_NOSIGNAL);
            if (w > 0) {
                c->in_off += (size_t)w;
                progress = 1;
                if (c->in_off == c->in_len) c->in_off = c->in_len = 0;
            } else if (w < 0 && errno != EAGAIN) return -1;
        }
        if (c->in_len == 0 && !c->client_eof) {
            ssize_t r = recv(c->fd, c->in, BUF, 0);
            if (r > 0) {
                c->in_len = (size_t)r;
                progress = 1;
            } else if (r == 0) {
                c->client_eof = 1;
                shutdown(c->bfd, SHUT_WR);
            } else if (errno != EAGAIN) return -1;
        }
        /* backend -> client */
        if (c->out_len > c->out_off) {
            ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
            if (w > 0) {
                c->out_off += (size_t)w;
                progress = 1;
                if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
            } else if (w < 0 && errno != EAGAIN) return -1;
        }
        if (c->out_len == 0 && !c->backend_eof) {
            ssize_t r = recv(c->bfd, c->out, BUF, 0);
            if (r > 0) {
                c->out_len = (size_t)r;
                progress = 1;
            } else if (r == 0) {
                c->backend_eof = 1;
                shutdown(c->fd, SHUT_WR);
            } else if (errno != EAGAIN) return -1;
        }
    }
    if (c->client_eof && c->backend_eof && c->in_len == 0 && c->out_len == 0) return -1;
    return 0;
}

static void on_accept(struct listener *l) {
    for (int i = 0; i < 256; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                perror("sink: accept");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        c->bfd = -1;
        c->in = malloc(BUF);
        if (!c->in) die("malloc");
        c->ref.kind = 1;
        c->ref.ptr = c;
        c->l = l;
        if (l->mdx) c->st = ST_MDX;
        else if (l->relay) {
            c->st = ST_HEADER; /* placeholder; start_relay sets the real state */
            ep_set(fd, &c->ref, 0, 1);
            if (start_relay(c, l) < 0) {
                /* not in any pending event yet: free at once */
                close(fd);
                if (c->bfd >= 0) close(c->bfd);
                free(c->in);
                free(c->out);
                free(c);
            }
            continue;
        } else c->st = ST_HEADER;
        ep_set(fd, &c->ref, EPOLLIN, 1);
    }
}

int main(int argc, char **argv) {
    struct listener ls[MAX_LISTENERS];
    int nl = 0;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    for (size_t i = 0; i < BUF; i++) source_buf[i] = (unsigned char)(i * 131 + 7);
    ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") != 0 || i + 1 >= argc || nl >= MAX_LISTENERS) {
            fprintf(stderr, "usage: sink --listen HOST:PORT[,mdx][,relay=HOST:PORT]...\n");
            return 2;
        }
        char spec[256];
        snprintf(spec, sizeof spec, "%s", argv[++i]);
        struct listener *l = &ls[nl];
        memset(l, 0, sizeof *l);
        char *save = NULL;
        char *tok = strtok_r(spec, ",", &save);
        struct sockaddr_in a;
        if (!tok || parse_addr(tok, &a) < 0) {
            fprintf(stderr, "sink: bad address %s\n", argv[i]);
            return 2;
        }
        while ((tok = strtok_r(NULL, ",", &save))) {
            if (strcmp(tok, "mdx") == 0) l->mdx = 1;
            else if (strncmp(tok, "relay=", 6) == 0) {
                l->relay = 1;
                if (parse_addr(tok + 6, &l->relay_addr) < 0) {
                    fprintf(stderr, "sink: bad relay address %s\n", tok + 6);
                    return 2;
                }
            } else {
                fprintf(stderr, "sink: unknown option %s\n", tok);
                return 2;
            }
        }
        l->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l->fd, (struct sockaddr *)&a, sizeof a) < 0) die("sink: bind");
        if (listen(l->fd, 4096) < 0) die("sink: listen");
        l->ref.kind = 0;
        l->ref.ptr = l;
        ep_set(l->fd, &l->ref, EPOLLIN, 1);
        nl++;
    }
    if (!nl) {
        fprintf(stderr, "usage: sink --listen HOST:PORT[,mdx][,relay=HOST:PORT]...\n");
        return 2;
    }
    printf("sink ready\n");
    fflush(stdout);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct ref *r = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (r->kind == 0) {
                on_accept((struct listener *)r->ptr);
                continue;
            }
            struct conn *c = r->ptr;
            int bad = 0;
            if (c->dead) continue;
            if (c->st == ST_RELAY_CONNECTING) {
                if (r->kind == 2) {
                    int err = 0;
                    socklen_t len = sizeof err;
                    getsockopt(c->bfd, SOL_SOCKET, SO_ERROR, &err, &len);
                    if (err) bad = 1;
                    else {
                        c->st = ST_RELAY;
                        ep_set(c->fd, &c->ref, 0, 0);
                    }
                } else {
                    /* client side while the backend connects: flush the MDX answer only */
                    if (e & (EPOLLERR | EPOLLHUP)) bad = 1;
                    else if (flush_reply(c) < 0) bad = 1;
                    else ep_set(c->fd, &c->ref, c->reply_len > c->reply_off ? EPOLLOUT : 0, 0);
                    if (bad) conn_close(c);
                    continue;
                }
                if (!bad) {
                    bad = relay_pump(c) < 0;
                }
                if (!bad) {
                    update_client_events(c);
                    update_backend_events(c);
                }
            } else if (c->st == ST_RELAY) {
                bad = relay_pump(c) < 0;
                if (!bad) {
                    update_client_events(c);
                    update_backend_events(c);
                }
            } else {
                struct listener *l = c->l;
                if (e & (EPOLLERR)) bad = 1;
                if (!bad && c->reply_len > c->reply_off && flush_reply(c) < 0) bad = 1;
                if (!bad && (e & EPOLLOUT)) bad = process_input(c, l) < 0;
                if (!bad && (e & (EPOLLIN | EPOLLHUP))) {
                    /* read only when nothing is pending (echo backpressure) */
                    if (c->in_off == c->in_len) c->in_off = c->in_len = 0;
                    size_t room = BUF - c->in_len;
                    if (room > 0) {
                        ssize_t rr = recv(c->fd, c->in + c->in_len, room, 0);
                        if (rr == 0) bad = 1;
                        else if (rr < 0) bad = errno != EAGAIN;
                        else {
                            c->in_len += (size_t)rr;
                            bad = process_input(c, l) < 0;
                        }
                    }
                }
                if (!bad && c->st != ST_RELAY_CONNECTING) update_client_events(c);
            }
            if (bad) conn_close(c);
        }
        bury();
    }
}
