/* proxy — relay one client request to a llama-server instance and its
 * answer back. See proxy.h for the contract.
 *
 * Shape of the code, top to bottom:
 *   types: upstream connections (struct upconn), the idle ones kept per
 *          port (struct idle_conns), call stages, calls (struct proxy_call)
 *   header names: hop-by-hop lists, token checks
 *   upstream connections: connect, idle lists (LIFO, bounded, expiring)
 *   stages: call_set_stage, the one way a call moves on
 *   the request: one buffer for the head, one sendmsg for head + body
 *   the response: llhttp callbacks (filter headers, relay body pieces)
 *   ending a call: success, upstream failure (502 / SSE error / cut),
 *          client gone
 *   the public API
 *
 * A call goes through the stages of enum call_stage (connecting, sending,
 * waiting, the response head, relaying or collecting the body); when the
 * message is complete the call ends and its connection goes back to its
 * idle list if both sides allow keep-alive, else it is closed.
 * An idle connection watches for EOF/data (→ closed) and expires
 * after IDLE_TIMEOUT_S, before llama-server's own 5 s keep-alive limit.
 *
 * Reading uses one buffer shared by all calls (the proxy's): every byte
 * read is parsed, and every body byte handed to http_stream_write, before
 * the callback returns, so no call keeps unparsed input. Memory per call is
 * thus bounded by http.c's high-water mark plus one read. */
#define _GNU_SOURCE
#include "proxy.h"

#include "log.h"
#include "timings.h"
#include "util.h"

#include <arpa/inet.h>
#include <errno.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define READ_BUF_SIZE     (64 * 1024)  /* shared by all calls */
#define READS_PER_WAKEUP  4            /* full reads in a row before yielding to the loop */
#define IDLE_PER_PORT     64           /* idle keep-alive connections kept per port */
#define IDLE_TIMEOUT_S    4.0          /* llama-server closes idle connections at 5 s */
#define CONNECT_TIMEOUT_S 5.0
#define MAX_RESP_HEAD     (64 * 1024)  /* upstream header lines we keep */
#define REQ_HEAD_MIN      1024         /* first allocation of a call's request head */
#define RESP_HEAD_MIN     1024         /* first allocation of its kept response headers */
#define WHOLE_MAX         (64 * 1024)  /* Content-Length up to this: answered whole */
#define FREE_CALLS_MAX    256          /* recycled call structs kept */
#define CTYPE_MAX         256
#define SSE_EVENT_MAX     (8 * 1024 * 1024)  /* a limited stream's event, whole */

/* ---------------------------------------------------------------- types */

enum uc_state {
    UC_BUSY, /* owned by a call */
    UC_IDLE, /* in its port's idle list */
};

struct idle_conns;

/* One upstream TCP connection. */
struct upconn {
    struct proxy *p;
    struct idle_conns *idle;   /* its port's idle list (and port number), busy or not */
    int fd;
    enum uc_state state;
    ev_io io;                  /* events follow the owning call's needs; EV_READ when idle */
    ev_timer timer;            /* connect timeout while connecting; expiry while idle */
    struct upconn *prev, *next; /* idle list, most recent first */
    struct proxy_call *call;   /* owner while busy */
};

/* The idle keep-alive connections to one port of 127.0.0.1, or to one
 * other address (proxy_forward_to: addrlen not 0). */
struct idle_conns {
    unsigned port;
    struct sockaddr_storage addr;
    socklen_t addrlen;         /* 0: 127.0.0.1:port */
    struct upconn *head;       /* most recently used first: reuse is LIFO */
    unsigned count;
};

/* How the response head's current header line is handled. */
enum hdr_action {
    HDR_KEEP,  /* passed to the client */
    HDR_DROP,  /* hop-by-hop, framing, or replaced by http.c */
    HDR_CTYPE, /* Content-Type: passed as http_stream_begin's content type */
    HDR_CONN,  /* Connection: dropped, its tokens name more headers to drop */
};

/* Call stages, in order; every change goes through call_set_stage(). Each
 * says what the call waits for and what its connection's watcher and timer
 * do. The upstream may answer before it has read the whole request (an
 * early 413, say): the stage then follows the response, and the rest of the
 * request still goes out (EV_WRITE while call_request_unsent()). */
enum call_stage {
    /* Fresh socket, connect in progress: the watcher waits for writability,
     * the timer is the connect timeout (→ 502). The socket takes the first
     * request bytes → SENDING. */
    CALL_CONNECTING,
    /* Request bytes left: EV_WRITE as long as the socket is full; EV_READ
     * too, the upstream may answer early. All written, or the upstream
     * stopped taking them → WAITING. No timer. */
    CALL_SENDING,
    /* Request sent, no response byte yet: EV_READ, no timer (a queued
     * request waits for a slot as long as it takes). EOF, a reset or a
     * failed write here or in SENDING, on a reused connection → retry once
     * on a fresh one (back to CONNECTING); otherwise 502. */
    CALL_WAITING,
    /* Response bytes came (from here on, nothing is retried) but not the
     * whole head; interim 1xx heads are read and dropped. The head →
     * RELAYING, or COLLECTING for a small body. */
    CALL_HEAD,
    /* The head went out with http_stream_begin; body pieces go to the client
     * as they arrive. EV_READ stops while the client's buffer is above its
     * high-water mark (paused, until on_drain). No timer. */
    CALL_RELAYING,
    /* A body of at most WHOLE_MAX bytes by its Content-Length (or none: 204,
     * 304) is collected and answered whole with http_respond at its end.
     * EV_READ, no timer. */
    CALL_COLLECTING,
    /* proxy_limit.gather: the upstream streams what the client asked as a
     * plain answer; its events go into call->plain and nothing to the
     * client until the end (the answer, whole, with http_respond) or the
     * deadline (the answer so far). EV_READ. */
    CALL_GATHERING,
};

struct proxy_call {
    struct proxy *p;
    struct proxy_call *prev, *next;   /* active calls; next also links the free list */
    struct http_request *req;         /* NULL once the response has ended or the client left */
    unsigned port;
    const struct proxy_upstream *up;  /* proxy_forward_to's, until the head is built; else NULL */
    struct idle_conns *ic;            /* proxy_forward_to: its address's idle list */
    const char *served_by;            /* proxy_forward_to: X-Llama-Pool-Served-By; NULL: none */
    const char *error;                /* what went wrong, for DONE (call_upstream_failed) */
    proxy_done_fn done;
    double sent_at, head_at;          /* ev_now() at proxy_forward, at the upstream's head */
    void *arg;
    struct upconn *uc;
    enum call_stage stage;            /* where the call is: see enum call_stage */
    /* The flags below are not the stage, nor derived from it: each holds
     * a fact the stage cannot tell (the retry budget, how the connection
     * was obtained, write failure alongside any stage, flow control, what
     * the response is, the header being parsed). */

    /* the request */
    struct buf out;                   /* request line and headers */
    size_t sent;                      /* bytes of out + body written */
    bool reused;                      /* this connection came from an idle list */
    bool retried;                     /* the one retry on a fresh connection is spent */
    bool send_failed;                 /* the upstream stopped taking the request: no more
                                       * writes, in whatever stage; it may still answer */

    /* the response */
    llhttp_t parser;
    bool keep_alive;                  /* upstream allows reuse (known at the message's end) */
    bool paused;                      /* RELAYING: client buffer full, upstream not read */
    bool is_sse;                      /* Content-Type text/event-stream */
    bool head_req;                    /* a HEAD request: no response body */
    int status;
    struct buf hdr;                   /* kept header lines "Name: value\r\n", NUL-terminated */
    size_t line_start, value_start;
    enum hdr_action action;
    bool in_field;                    /* HEAD: a header name is coming in */
    bool bad_value;                   /* HEAD: the current value has a control character */
    bool has_accel;                   /* upstream sent X-Accel-Buffering */
    char ctype[CTYPE_MAX];
    size_t ctype_len;
    char conn[CTYPE_MAX];             /* upstream Connection tokens */
    size_t conn_len;
    char tail[2];                     /* last two body bytes relayed (SSE framing) */
    struct timings_scan timings;      /* what the answer says of its prompt */
    bool relayed;                     /* any body byte relayed */
    const char *body;                 /* COLLECTING: the body (body_buf or the read buffer) */
    size_t body_len, body_expect;
    struct buf body_buf;              /* COLLECTING: the body when it came in pieces */
    const char *fail_why;             /* set by a callback that rejects the response */
    bool *ended;                      /* proxy_forward's: set when the call ends inside it */

    /* the time limit (proxy_forward_limited) */
    const char *up_body;              /* what goes upstream: the caller's or the request's */
    size_t up_body_len;
    ev_timer deadline;                /* armed from proxy_forward_limited to the call's end */
    double limit_s;                   /* 0: none */
    enum cutoff_api api;
    bool gather;                      /* a plain answer put back from a stream (GATHERING) */
    bool whole_events;                /* RELAYING a limited stream: whole events only */
    int cut_status;                   /* at the deadline: the status the client got */
    struct buf sse;                   /* the start of an event not yet whole */
    struct cutoff_seen seen;          /* the last event relayed */
    struct cutoff_plain plain;        /* GATHERING: the answer so far */
    char model[160];                  /* proxy_limit.model */
};

struct proxy {
    struct ev_loop *loop;
    llhttp_settings_t settings;
    struct idle_conns **idle;         /* one per port ever used */
    size_t nidle, idle_cap;
    struct idle_conns *last_idle;     /* most requests go to the port of the last one */
    struct proxy_call *calls;         /* active */
    struct proxy_call *free_calls;
    size_t nfree;
    bool hand_back_unanswered;        /* see proxy_hand_back_unanswered() */
    char rbuf[READ_BUF_SIZE];
};

static void call_start(struct proxy_call *call);
static void call_update_io(struct proxy_call *call);

/* --------------------------------------------------------- header names */

static bool name_is(const char *name, size_t len, const char *lit, size_t litlen)
{
    return len == litlen && strncasecmp(name, lit, len) == 0;
}
#define NAME_IS(n, l, lit) name_is((n), (l), lit, sizeof lit - 1)

/* tchar of RFC 9110: what a field name may contain. */
static bool is_tchar(unsigned char ch)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr(extra, ch));
}

static bool valid_name(const char *s, size_t len)
{
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!is_tchar((unsigned char)s[i]))
            return false;
    return true;
}

/* Field values: no control characters except HTAB (no CR/LF smuggling). */
static bool valid_value_char(unsigned char ch)
{
    return ch == '\t' || (ch >= 0x20 && ch != 0x7f);
}

static bool valid_value(const char *s)
{
    for (; *s; s++)
        if (!valid_value_char((unsigned char)*s))
            return false;
    return true;
}

/* Hop-by-hop in both directions (RFC 9110 7.6.1 and the usual extras). */
static bool is_hop_by_hop(const char *n, size_t l)
{
    switch (l) {
    case 2: return NAME_IS(n, l, "TE");
    case 7: return NAME_IS(n, l, "Trailer") || NAME_IS(n, l, "Upgrade");
    case 10: return NAME_IS(n, l, "Connection") || NAME_IS(n, l, "Keep-Alive");
    case 16: return NAME_IS(n, l, "Proxy-Connection");
    case 17: return NAME_IS(n, l, "Transfer-Encoding");
    case 18: return NAME_IS(n, l, "Proxy-Authenticate");
    case 19: return NAME_IS(n, l, "Proxy-Authorization");
    default: return false;
    }
}

/* Access-Control-*: the pool's cors_origins decide (http.c adds its own),
 * not llama-server, which echoes any Origin. */
static bool is_cors(const char *n, size_t l)
{
    static const char prefix[] = "Access-Control-";
    return l >= sizeof prefix - 1 && strncasecmp(n, prefix, sizeof prefix - 1) == 0;
}

/* Step through a comma-separated token list: the next token (trimmed) in
 * *T and *LEN; false at the end. */
static bool next_token(const char **s, const char *end, const char **t, size_t *len)
{
    while (*s < end && (**s == ' ' || **s == '\t' || **s == ','))
        (*s)++;
    if (*s >= end)
        return false;
    *t = *s;
    while (*s < end && **s != ',')
        (*s)++;
    const char *e = *s;
    while (e > *t && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    *len = (size_t)(e - *t);
    return true;
}

/* Does the comma-separated token LIST name NAME? */
static bool token_listed(const char *list, size_t list_len, const char *name, size_t len)
{
    const char *s = list, *t;
    size_t l;
    while (next_token(&s, list + list_len, &t, &l))
        if (l == len && strncasecmp(t, name, len) == 0)
            return true;
    return false;
}

/* Does a Connection value name anything besides keep-alive and close? */
static bool conn_names_headers(const char *list, size_t list_len)
{
    const char *s = list, *t;
    size_t l;
    while (next_token(&s, list + list_len, &t, &l))
        if (l && !NAME_IS(t, l, "keep-alive") && !NAME_IS(t, l, "close"))
            return true;
    return false;
}

/* ------------------------------------------------- upstream connections */

/* The idle list of PORT; made when CREATE (NULL when out of memory). */
static struct idle_conns *idle_find(struct proxy *p, unsigned port, bool create)
{
    if (p->last_idle && p->last_idle->port == port && !p->last_idle->addrlen)
        return p->last_idle;
    for (size_t i = 0; i < p->nidle; i++)
        if (p->idle[i]->port == port && !p->idle[i]->addrlen)
            return p->last_idle = p->idle[i];
    if (!create)
        return NULL;
    if (!util_grow(&p->idle, &p->idle_cap, p->nidle + 1, sizeof *p->idle))
        return NULL;
    struct idle_conns *ic = calloc(1, sizeof *ic);
    if (!ic)
        return NULL;
    ic->port = port;
    p->idle[p->nidle++] = ic;
    return p->last_idle = ic;
}

/* The idle list of address ADDR (another server: proxy_forward_to); NULL
 * when out of memory. Such lists are few (a fallback or two), and kept. */
static struct idle_conns *idle_find_addr(struct proxy *p, const struct sockaddr *addr,
                                         socklen_t len)
{
    if (len == 0 || len > sizeof(struct sockaddr_storage))
        return NULL;
    for (size_t i = 0; i < p->nidle; i++)
        if (p->idle[i]->addrlen == len && memcmp(&p->idle[i]->addr, addr, len) == 0)
            return p->idle[i];
    if (!util_grow(&p->idle, &p->idle_cap, p->nidle + 1, sizeof *p->idle))
        return NULL;
    struct idle_conns *ic = calloc(1, sizeof *ic);
    if (!ic)
        return NULL;
    memcpy(&ic->addr, addr, len);
    ic->addrlen = len;
    ic->port = util_sockaddr_port(addr);
    p->idle[p->nidle++] = ic;
    return ic;
}

static void uc_io_cb(struct ev_loop *loop, ev_io *w, int revents);
static void uc_timer_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* Sets the watcher to EVENTS (0: stopped), touching libev only on change. */
static void uc_watch(struct upconn *uc, int events)
{
    struct ev_loop *loop = uc->p->loop;
    bool active = ev_is_active(&uc->io);
    if (active && (uc->io.events & (EV_READ | EV_WRITE)) == events)
        return;
    if (!active && events == 0)
        return;
    if (active)
        ev_io_stop(loop, &uc->io);
    if (events) {
        ev_io_set(&uc->io, uc->fd, events);
        ev_io_start(loop, &uc->io);
    }
}

static void idle_unlink(struct upconn *uc)
{
    struct idle_conns *ic = uc->idle;
    if (uc->prev)
        uc->prev->next = uc->next;
    else
        ic->head = uc->next;
    if (uc->next)
        uc->next->prev = uc->prev;
    uc->prev = uc->next = NULL;
    ic->count--;
}

static void uc_close(struct upconn *uc)
{
    struct ev_loop *loop = uc->p->loop;
    if (uc->state == UC_IDLE)
        idle_unlink(uc);
    ev_io_stop(loop, &uc->io);
    ev_timer_stop(loop, &uc->timer);
    if (close(uc->fd) < 0)
        log_warn("proxy: upstream port %u: close: %s", uc->idle->port, strerror(errno));
    free(uc);
}

/* A new connection to 127.0.0.1:PORT, connect in progress (or done).
 * NULL with *ERR set when it failed at once. */
static struct upconn *uc_connect(struct proxy *p, struct idle_conns *ic, int *err)
{
    struct upconn *uc = calloc(1, sizeof *uc);
    if (!uc) {
        *err = ENOMEM;
        return NULL;
    }
    int family = ic->addrlen ? ic->addr.ss_family : AF_INET;
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        *err = errno;
        free(uc);
        return NULL;
    }
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        log_warn("proxy: upstream port %u: TCP_NODELAY: %s", ic->port, strerror(errno));
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)ic->port) };
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const struct sockaddr *to = ic->addrlen ? (const struct sockaddr *)&ic->addr
                                            : (const struct sockaddr *)&sin;
    socklen_t tolen = ic->addrlen ? ic->addrlen : sizeof sin;
    int r;
    do
        r = connect(fd, to, tolen);
    while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EINPROGRESS) {
        *err = errno;
        close(fd);
        free(uc);
        return NULL;
    }
    uc->p = p;
    uc->idle = ic;
    uc->fd = fd;
    uc->state = UC_BUSY;
    ev_io_init(&uc->io, uc_io_cb, fd, EV_WRITE);
    ev_init(&uc->timer, uc_timer_cb); /* the connect timeout: call_set_stage arms it */
    uc->io.data = uc->timer.data = uc;
    return uc;
}

/* The most recently used idle connection in IC, or NULL. */
static struct upconn *idle_take(struct idle_conns *ic)
{
    struct upconn *uc = ic->head;
    if (!uc)
        return NULL;
    idle_unlink(uc);
    uc->state = UC_BUSY;
    ev_timer_stop(uc->p->loop, &uc->timer);
    return uc;
}

/* Back to its idle list (or closed when the list is full). */
static void idle_put(struct upconn *uc)
{
    struct idle_conns *ic = uc->idle;
    if (ic->count >= IDLE_PER_PORT) {
        uc_close(uc);
        return;
    }
    uc->call = NULL;
    uc->state = UC_IDLE;
    uc->prev = NULL;
    uc->next = ic->head;
    if (ic->head)
        ic->head->prev = uc;
    ic->head = uc;
    ic->count++;
    uc_watch(uc, EV_READ);
    ev_timer_set(&uc->timer, IDLE_TIMEOUT_S, 0.);
    ev_timer_start(uc->p->loop, &uc->timer);
}

/* An idle connection is readable: EOF, reset, or bytes nobody asked for.
 * Either way it is no longer safe to reuse. */
static void uc_idle_readable(struct upconn *uc)
{
    char b;
    ssize_t n = recv(uc->fd, &b, 1, MSG_PEEK);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    uc_close(uc);
}

/* ---------------------------------------------------------------- stages */

/* The one way a call changes stage. Entering CONNECTING arms the connect
 * timeout on the call's connection; leaving it stops the timeout. */
static void call_set_stage(struct proxy_call *call, enum call_stage stage)
{
    struct ev_loop *loop = call->p->loop;
    struct upconn *uc = call->uc;
    if (stage == CALL_CONNECTING) {
        ev_timer_set(&uc->timer, CONNECT_TIMEOUT_S, 0.);
        ev_timer_start(loop, &uc->timer);
    } else if (call->stage == CALL_CONNECTING) {
        ev_timer_stop(loop, &uc->timer);
    }
    call->stage = stage;
}

/* The response head is in (status known, trailers are not relayed). */
static bool call_head_done(const struct proxy_call *call)
{
    return call->stage >= CALL_RELAYING;
}

static size_t call_total(const struct proxy_call *call)
{
    return call->out.len + call->up_body_len;
}

/* Request bytes are left to write, and the upstream still takes them. */
static bool call_request_unsent(const struct proxy_call *call)
{
    return !call->send_failed && call->sent < call_total(call);
}

/* A reused connection that failed before any response byte was closed by
 * the server as we picked it up: worth one more try on a fresh one. */
static bool call_may_retry(const struct proxy_call *call)
{
    return call->stage < CALL_HEAD && call->reused && !call->retried;
}

/* ----------------------------------------------------------- the request */

/* Unchecked appends: call_build_head made room for the whole head first. */
static char *put(char *o, const char *s, size_t n)
{
    memcpy(o, s, n);
    return o + n;
}
#define PUT_LIT(o, lit) put((o), lit, sizeof lit - 1)

static char *put_uint(char *o, unsigned long long v)
{
    char tmp[24];
    size_t n = 0;
    do
        tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    while (n)
        *o++ = tmp[--n];
    return o;
}

/* The address part of req->peer ("1.2.3.4:5" → "1.2.3.4", "[::1]:5" → "::1"). */
static size_t peer_addr(const char *peer, const char **addr)
{
    if (peer[0] == '[') {
        const char *rb = strchr(peer, ']');
        *addr = peer + 1;
        return rb ? (size_t)(rb - peer - 1) : 0;
    }
    const char *colon = strrchr(peer, ':');
    *addr = peer;
    return colon ? (size_t)(colon - peer) : 0; /* "unix": nothing to add */
}

static bool valid_target(const char *t)
{
    if (!*t)
        return false;
    for (; *t; t++)
        if ((unsigned char)*t <= 0x20 || *t == 0x7f)
            return false;
    return true;
}

/* Credentials the client brought for the pool: with a child key they are
 * replaced by the pool's own for that child, never passed on. */
static bool is_client_credential(const char *n, size_t l)
{
    return NAME_IS(n, l, "Authorization") || NAME_IS(n, l, "X-Api-Key");
}

/* Request line and headers for upstream, in call->out. KEY: the child's
 * API key, sent as "Authorization: Bearer KEY" in place of the client's
 * Authorization and X-Api-Key; NULL: those go as they came. */
static bool call_build_head(struct proxy_call *call, const char *target, const char *key)
{
    const struct http_request *req = call->req;
    const char *host = call->up ? call->up->host : NULL;
    /* Another server never sees the client's keys: they are the pool's. */
    bool drop_cred = key || call->up;
    const char *conn_lists[8];
    size_t nconn = 0;
    bool conn_extra = false, framed = false;
    if (key && !valid_value(key))
        key = NULL;   /* cannot be sent; the child will answer 401 */
    if (host && !valid_value(host))
        host = NULL;  /* config.c refuses such; never let one split the head */
    size_t need = strlen(req->method) + strlen(target) + 128 + (key ? strlen(key) + 32 : 0) +
                  (host ? strlen(host) : 0);
    size_t xff_need = 0;

    for (size_t i = 0; i < req->nheaders; i++) {
        const char *n = req->headers[i].name, *v = req->headers[i].value;
        size_t nl = strlen(n), vl = strlen(v);
        need += nl + vl + 4;
        if (NAME_IS(n, nl, "Connection")) {
            if (nconn < sizeof conn_lists / sizeof *conn_lists)
                conn_lists[nconn++] = v;
            if (conn_names_headers(v, vl))
                conn_extra = true;
        } else if (NAME_IS(n, nl, "X-Forwarded-For")) {
            xff_need += vl + 2;
        } else if (NAME_IS(n, nl, "Content-Length") || NAME_IS(n, nl, "Transfer-Encoding")) {
            framed = true;
        }
    }
    const char *paddr;
    size_t paddr_len = peer_addr(req->peer, &paddr);
    need += xff_need + paddr_len + 64;
    if (!buf_reserve_min(&call->out, need, REQ_HEAD_MIN))
        return false;

    char *o = call->out.data + call->out.len;
    o = put(o, req->method, strlen(req->method));
    *o++ = ' ';
    o = put(o, target, strlen(target));
    if (host) {
        o = PUT_LIT(o, " HTTP/1.1\r\nHost: ");
        o = put(o, host, strlen(host));
    } else {
        o = PUT_LIT(o, " HTTP/1.1\r\nHost: 127.0.0.1:");
        o = put_uint(o, call->port);
    }
    o = PUT_LIT(o, "\r\n");
    for (size_t i = 0; i < req->nheaders; i++) {
        const char *n = req->headers[i].name, *v = req->headers[i].value;
        size_t nl = strlen(n);
        if (!valid_name(n, nl) || !valid_value(v) || is_hop_by_hop(n, nl) ||
            NAME_IS(n, nl, "Host") || NAME_IS(n, nl, "Content-Length") ||
            NAME_IS(n, nl, "X-Forwarded-For") || NAME_IS(n, nl, "Expect") ||
            (drop_cred && is_client_credential(n, nl)))
            continue;
        if (conn_extra) {
            bool listed = false;
            for (size_t k = 0; k < nconn && !listed; k++)
                listed = token_listed(conn_lists[k], strlen(conn_lists[k]), n, nl);
            if (listed)
                continue;
        }
        o = put(o, n, nl);
        o = PUT_LIT(o, ": ");
        o = put(o, v, strlen(v));
        o = PUT_LIT(o, "\r\n");
    }
    /* X-Forwarded-For: what the client brought, then the client itself */
    bool xff_any = false;
    for (size_t i = 0; i < req->nheaders; i++) {
        const char *n = req->headers[i].name, *v = req->headers[i].value;
        if (!NAME_IS(n, strlen(n), "X-Forwarded-For") || !*v || !valid_value(v))
            continue;
        o = xff_any ? PUT_LIT(o, ", ") : PUT_LIT(o, "X-Forwarded-For: ");
        o = put(o, v, strlen(v));
        xff_any = true;
    }
    if (paddr_len) {
        o = xff_any ? PUT_LIT(o, ", ") : PUT_LIT(o, "X-Forwarded-For: ");
        o = put(o, paddr, paddr_len);
        xff_any = true;
    }
    if (xff_any)
        o = PUT_LIT(o, "\r\n");
    if (key) {
        o = PUT_LIT(o, "Authorization: Bearer ");
        o = put(o, key, strlen(key));
        o = PUT_LIT(o, "\r\n");
    }
    if (call->up_body_len > 0 || framed) {
        o = PUT_LIT(o, "Content-Length: ");
        o = put_uint(o, call->up_body_len);
        o = PUT_LIT(o, "\r\n");
    }
    o = PUT_LIT(o, "\r\n");
    buf_set_len(&call->out, (size_t)(o - call->out.data));
    return true;
}

/* ------------------------------------------------------- ending a call */

/* What the time limit kept of the answer: given back at the call's end. */
static void call_limit_free(struct proxy_call *call)
{
    buf_free(&call->sse);
    cutoff_seen_free(&call->seen);
    cutoff_plain_free(&call->plain);
}

static void call_free(struct proxy_call *call)
{
    buf_free(&call->out);
    buf_free(&call->hdr);
    buf_free(&call->body_buf);
    call_limit_free(call);
    free(call);
}

/* Unhooks the call from the request and the proxy, recycles it, then
 * reports OUTCOME. The response has ended (or the client is gone). */
static void call_end(struct proxy_call *call, enum proxy_outcome outcome)
{
    struct proxy *p = call->p;
    proxy_done_fn done = call->done;
    void *arg = call->arg;
    struct proxy_result res = {
        .outcome = outcome,
        .status = call->cut_status ? call->cut_status : call_head_done(call) ? call->status : 0,
        .first_byte = call_head_done(call) ? call->head_at - call->sent_at : -1,
        .cache_n = call->timings.cache_n,
        .prompt_n = call->timings.prompt_n,
        .predicted_n = call->timings.predicted_n,
        .prompt_ms = call->timings.prompt_ms,
        .predicted_ms = call->timings.predicted_ms,
        .error = outcome == PROXY_OK || outcome == PROXY_CLIENT_GONE || outcome == PROXY_TIMEOUT
                     ? NULL : call->error,
    };

    ev_timer_stop(p->loop, &call->deadline);
    call_limit_free(call);

    if (call->ended)
        *call->ended = true;
    if (call->req) {
        http_request_unwatch(call->req);
        call->req = NULL;
    }
    if (call->prev)
        call->prev->next = call->next;
    else
        p->calls = call->next;
    if (call->next)
        call->next->prev = call->prev;
    if (p->nfree < FREE_CALLS_MAX) {
        call->next = p->free_calls;
        p->free_calls = call;
        p->nfree++;
    } else {
        call_free(call);
    }
    done(arg, &res);
}

/* Gives up the connection: back to its idle list if REUSE, else closed. */
static void call_release_uc(struct proxy_call *call, bool reuse)
{
    struct upconn *uc = call->uc;
    if (!uc)
        return;
    call->uc = NULL;
    uc->call = NULL;
    if (reuse)
        idle_put(uc);
    else
        uc_close(uc);
}

static bool call_gathered_respond(struct proxy_call *call, struct http_request *req, bool cut);

static void call_ok(struct proxy_call *call, bool reuse)
{
    struct http_request *req = call->req;
    call_release_uc(call, reuse);
    call->req = NULL;
    http_request_unwatch(req);
    if (call->stage == CALL_COLLECTING) {
        timings_scan_feed(&call->timings, call->body, call->body_len);
        http_respond(req, call->status, call->ctype_len ? call->ctype : NULL,
                     call->hdr.len ? call->hdr.data : NULL, call->body, call->body_len);
    } else if (call->stage == CALL_GATHERING) {
        /* the stream ended by itself: the plain answer, as llama-server writes it */
        call_gathered_respond(call, req, false);
    } else {
        if (call->whole_events && call->sse.len)   /* a last event without its blank line */
            http_stream_write(req, call->sse.data, call->sse.len);
        http_stream_end(req);
    }
    call_end(call, PROXY_OK);
}

/* GATHERING: the plain answer from the events so far (CUT: the limit
 * passed), sent whole. False when it could not be made (out of memory:
 * a 500 went instead). */
static bool call_gathered_respond(struct proxy_call *call, struct http_request *req, bool cut)
{
    struct buf body = { 0 };
    int status;
    if (!cutoff_plain_answer(&call->plain, cut, call->model, (long long)ev_now(call->p->loop),
                             &body, &status)) {
        buf_free(&body);
        http_respond_error(req, 500, "server_error", "proxy: out of memory for the answer");
        call->cut_status = 500;
        return false;
    }
    if (cut)
        call->cut_status = status;
    http_respond(req, status, "application/json; charset=utf-8",
                 call->hdr.len ? call->hdr.data : NULL, body.data, body.len);
    buf_free(&body);
    return true;
}

/* The deadline passed (proxy_limit.seconds after the request went out).
 * The upstream connection is closed at once: llama-server cancels the
 * task and frees its slot when its client goes. The client gets the
 * answer so far: a stream, its last chunk and [DONE]; a gathered plain
 * answer, the text so far; nothing yet from the upstream, 504. */
static void call_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct proxy_call *call = w->data;
    struct http_request *req = call->req;
    (void)loop;
    (void)revents;
    call_release_uc(call, false);
    call->req = NULL;
    http_request_unwatch(req);
    if (call->stage == CALL_GATHERING) {
        call_gathered_respond(call, req, true);
    } else if (call->stage == CALL_RELAYING && call->is_sse) {
        /* whole_events: what is held is the start of an event: dropped */
        struct buf last = { 0 };
        if (cutoff_final_events(&last, call->api, &call->seen, call->model,
                                (long long)ev_now(call->p->loop)))
            http_stream_write(req, last.data, last.len);
        buf_free(&last);
        http_stream_end(req);
    } else if (call->stage == CALL_RELAYING) {
        http_stream_abort(req);          /* not a stream: the cut must show */
    } else {
        call->cut_status = 504;
        http_respond_error(req, 504, "timeout_error",
                           "request_timeout (%g s) passed before the model began to answer",
                           call->limit_s);
    }
    call_end(call, PROXY_TIMEOUT);
}

/* The upstream broke: 502 JSON if nothing was sent to the client yet; an
 * SSE error event and a clean end for event streams; otherwise the client
 * connection is cut so the truncation shows. */
static void call_upstream_failed(struct proxy_call *call, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void call_upstream_failed(struct proxy_call *call, const char *fmt, ...)
{
    struct http_request *req = call->req;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    log_warn("proxy: %s %s: %s", req->method, req->path, msg);
    call->error = msg;                /* for DONE, called below while msg lives */
    call_release_uc(call, false);
    call->req = NULL;
    http_request_unwatch(req);
    if (call->stage < CALL_HEAD && call->p->hand_back_unanswered) {
        call_end(call, PROXY_UPSTREAM_UNANSWERED);
        return;
    }
    if (call->stage != CALL_RELAYING) { /* nothing went to the client yet */
        http_respond_error(req, 502, "server_error", "%s", msg);
        call_end(call, PROXY_UPSTREAM_ERROR);
        return;
    }
    if (call->is_sse) {
        char esc[300], ev[400];
        util_json_escape(esc, sizeof esc, msg);
        /* end a partly relayed event first, so the error stands alone */
        const char *sep = !call->relayed ? ""
                          : call->tail[1] == '\n' ? (call->tail[0] == '\n' ? "" : "\n")
                                                  : "\n\n";
        int n = snprintf(ev, sizeof ev,
                         "%sdata: {\"error\":{\"code\":502,\"message\":\"%s\",\"type\":\"server_error\"}}\n\n",
                         sep, esc);
        if (n > 0)
            http_stream_write(req, ev, (size_t)n < sizeof ev ? (size_t)n : sizeof ev - 1);
        http_stream_end(req);
    } else {
        http_stream_abort(req);
    }
    call_end(call, PROXY_UPSTREAM_CUT);
}

/* req->on_close: the client left. Close upstream at once (llama-server
 * cancels the generation when its socket closes). */
static void call_client_gone(struct http_request *req, void *arg)
{
    struct proxy_call *call = arg;
    (void)req;
    call->req = NULL; /* being torn down by http.c */
    call_release_uc(call, false);
    call_end(call, PROXY_CLIENT_GONE);
}

/* req->on_drain: the client caught up; read upstream again. */
static void call_client_drained(struct http_request *req, void *arg)
{
    struct proxy_call *call = arg;
    (void)req;
    if (call->paused) {
        call->paused = false;
        call_update_io(call);
    }
}

/* A reused connection died before answering: the server closed it as we
 * picked it up. Once, on a fresh connection. */
static void call_retry(struct proxy_call *call)
{
    log_debug("proxy: upstream port %u closed a reused connection; retrying on a new one",
              call->port);
    call_release_uc(call, false);
    call->retried = true;
    call_start(call);
}

/* ---------------------------------------------------------- the response */

/* Appends to the kept header lines; false past MAX_RESP_HEAD (their NUL
 * included) or when out of memory. */
static bool hdr_append(struct proxy_call *call, const char *s, size_t n)
{
    struct buf *h = &call->hdr;
    return h->len + n < MAX_RESP_HEAD && buf_reserve_min(h, n, RESP_HEAD_MIN) &&
           buf_append(h, s, n);
}

static int reject(struct proxy_call *call, const char *why)
{
    call->fail_why = why;
    return HPE_USER;
}

static void head_reset(struct proxy_call *call)
{
    buf_clear(&call->hdr);
    call->ctype_len = 0;
    call->conn_len = 0;
    call->in_field = false;
    call->has_accel = false;
    call->action = HDR_DROP;
}

static int on_message_begin(llhttp_t *lp)
{
    head_reset(lp->data);
    return 0;
}

static int on_header_field(llhttp_t *lp, const char *at, size_t n)
{
    struct proxy_call *call = lp->data;
    if (call_head_done(call))
        return 0; /* trailers are not relayed */
    if (!call->in_field) {
        call->in_field = true;
        call->line_start = call->hdr.len;
    }
    return hdr_append(call, at, n) ? 0 : reject(call, "response header block too large");
}

static int on_header_field_complete(llhttp_t *lp)
{
    struct proxy_call *call = lp->data;
    if (call_head_done(call))
        return 0;
    if (!call->in_field) /* empty name (llhttp rejects those): an empty line */
        call->line_start = call->hdr.len;
    const char *n = call->hdr.data ? call->hdr.data + call->line_start : "";
    size_t l = call->hdr.len - call->line_start;
    call->in_field = false;
    call->bad_value = false;
    if (!valid_name(n, l))
        call->action = HDR_DROP;
    else if (NAME_IS(n, l, "Connection"))
        call->action = HDR_CONN;
    else if (NAME_IS(n, l, "Content-Type"))
        call->action = HDR_CTYPE;
    else if (is_hop_by_hop(n, l) || NAME_IS(n, l, "Content-Length") ||
             NAME_IS(n, l, "Server") || NAME_IS(n, l, "Date") || is_cors(n, l) ||
             (call->served_by && NAME_IS(n, l, "X-Llama-Pool-Served-By")) ||
             (call->gather && NAME_IS(n, l, "X-Accel-Buffering")))
        call->action = HDR_DROP;
    else
        call->action = HDR_KEEP;
    if (call->action == HDR_KEEP && NAME_IS(n, l, "X-Accel-Buffering"))
        call->has_accel = true;
    if (call->action != HDR_KEEP) {
        buf_set_len(&call->hdr, call->line_start);
        if (call->action == HDR_CTYPE)
            call->ctype_len = 0; /* the last one wins */
        else if (call->action == HDR_CONN && call->conn_len && call->conn_len < CTYPE_MAX - 1)
            call->conn[call->conn_len++] = ',';
        return 0;
    }
    if (!hdr_append(call, ": ", 2))
        return reject(call, "response header block too large");
    call->value_start = call->hdr.len;
    return 0;
}

/* Appends AT[0..N) to FIELD, one of the CTYPE_MAX-byte fields holding
 * *LEN bytes (room kept for a NUL); false when it would not fit. */
static bool small_append(char *field, size_t *len, const char *at, size_t n)
{
    if (*len + n >= CTYPE_MAX)
        return false;
    memcpy(field + *len, at, n);
    *len += n;
    return true;
}

static int on_header_value(llhttp_t *lp, const char *at, size_t n)
{
    struct proxy_call *call = lp->data;
    if (call_head_done(call))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!valid_value_char((unsigned char)at[i]))
            call->bad_value = true;
    switch (call->action) {
    case HDR_KEEP:
        return hdr_append(call, at, n) ? 0 : reject(call, "response header block too large");
    case HDR_CTYPE:
        if (!small_append(call->ctype, &call->ctype_len, at, n))
            return reject(call, "Content-Type too long");
        return 0;
    case HDR_CONN:
        if (!small_append(call->conn, &call->conn_len, at, n))
            return reject(call, "Connection header too long");
        return 0;
    case HDR_DROP:
        return 0;
    }
    return 0;
}

static int on_header_value_complete(llhttp_t *lp)
{
    struct proxy_call *call = lp->data;
    struct buf *h = &call->hdr;
    if (call_head_done(call))
        return 0;
    switch (call->action) {
    case HDR_KEEP:
        while (h->len > call->value_start &&
               (h->data[h->len - 1] == ' ' || h->data[h->len - 1] == '\t'))
            h->len--;
        if (call->bad_value)
            h->len = call->line_start;
        else if (!hdr_append(call, "\r\n", 2))
            return reject(call, "response header block too large");
        break;
    case HDR_CTYPE:
        while (call->ctype_len && (call->ctype[call->ctype_len - 1] == ' ' ||
                                   call->ctype[call->ctype_len - 1] == '\t'))
            call->ctype_len--;
        if (call->bad_value)
            call->ctype_len = 0;
        call->ctype[call->ctype_len] = '\0';
        break;
    case HDR_CONN:
    case HDR_DROP:
        break;
    }
    call->action = HDR_DROP;
    return 0;
}

/* Removes the kept lines whose names the upstream's Connection header lists. */
static void head_drop_connection_listed(struct proxy_call *call)
{
    struct buf *h = &call->hdr;
    size_t r = 0, w = 0;
    while (r < h->len) {
        const char *line = h->data + r;
        const char *eol = memchr(line, '\n', h->len - r);
        size_t ll = eol ? (size_t)(eol - line) + 1 : h->len - r;
        const char *colon = memchr(line, ':', ll);
        size_t nl = colon ? (size_t)(colon - line) : 0;
        if (!token_listed(call->conn, call->conn_len, line, nl)) {
            memmove(h->data + w, line, ll);
            w += ll;
        }
        r += ll;
    }
    h->len = w;
}

/* The response head is complete: relay it now (streams), or prepare to
 * collect a small body and answer it whole. */
static int on_headers_complete(llhttp_t *lp)
{
    struct proxy_call *call = lp->data;
    int status = lp->status_code;
    if (status >= 100 && status < 200 && status != 101) {
        head_reset(call); /* 100 Continue and friends: the real answer follows */
        return 0;
    }
    if (status == 101 || lp->upgrade)
        return reject(call, "unexpected protocol upgrade");
    if (call->conn_len && conn_names_headers(call->conn, call->conn_len))
        head_drop_connection_listed(call);
    call->is_sse = call->ctype_len >= 17 && strncasecmp(call->ctype, "text/event-stream", 17) == 0;
    bool gathering = call->gather && call->is_sse && status == 200 && !call->head_req;
    if (call->is_sse && !gathering && !call->has_accel &&
        !hdr_append(call, "X-Accel-Buffering: no\r\n", 23))
        return reject(call, "response header block too large");
    if (call->served_by &&
        !(hdr_append(call, "X-Llama-Pool-Served-By: ", 24) &&
          hdr_append(call, call->served_by, strlen(call->served_by)) && hdr_append(call, "\r\n", 2)))
        return reject(call, "response header block too large");
    if (call->hdr.data)
        call->hdr.data[call->hdr.len] = '\0'; /* after the lines cut above */
    call->head_at = ev_now(call->p->loop);
    call->status = status;
    call->body = NULL;
    call->body_len = 0;
    call->body_expect = 0;
    bool has_length = (lp->flags & F_CONTENT_LENGTH) != 0;
    if (gathering) {
        call_set_stage(call, CALL_GATHERING);
        call->ctype_len = 0;            /* the answer is JSON, not the stream's type */
        cutoff_plain_init(&call->plain, call->api);
        return 0;
    }
    call->whole_events = call->limit_s > 0 && call->is_sse;
    if (!call->head_req && !call->is_sse &&
        (http_status_has_no_body(status) || (has_length && lp->content_length <= WHOLE_MAX))) {
        call_set_stage(call, CALL_COLLECTING);
        call->body_expect = http_status_has_no_body(status) ? 0 : (size_t)lp->content_length;
    } else {
        call_set_stage(call, CALL_RELAYING);
        http_stream_begin(call->req, status, call->ctype_len ? call->ctype : NULL,
                          call->hdr.len ? call->hdr.data : NULL);
    }
    return call->head_req ? 1 : 0;
}

/* A limited stream's body piece: whole events go on (GATHERING: into the
 * plain answer; RELAYING: to the client, the last one remembered for the
 * final chunk), the start of the next one waits in call->sse. */
static int call_take_events(struct proxy_call *call, const char *at, size_t n)
{
    const char *p = at;
    size_t len = n, off = 0, evlen, dlen;
    const char *data;
    if (call->sse.len) {
        if (call->sse.len + n > SSE_EVENT_MAX)
            return reject(call, "a server-sent event over 8 MiB");
        if (!buf_append(&call->sse, at, n))
            return reject(call, "out of memory");
        p = call->sse.data;
        len = call->sse.len;
    }
    while (cutoff_sse_take(p + off, len - off, &evlen, &data, &dlen)) {
        bool ok = !data ||
                  (call->stage == CALL_GATHERING ? cutoff_plain_feed(&call->plain, data, dlen)
                                                 : cutoff_seen_note(&call->seen, data, dlen));
        if (!ok)
            return reject(call, "out of memory");
        off += evlen;
    }
    if (off && call->stage == CALL_RELAYING) {
        call->relayed = true;
        call->tail[0] = call->tail[1] = '\n';   /* whole events: an error event stands alone */
        if (!http_stream_write(call->req, p, off))
            call->paused = true;
    }
    if (p == at) {
        if (off < n && (n - off > SSE_EVENT_MAX || !buf_append(&call->sse, at + off, n - off)))
            return reject(call, "out of memory");
    } else {
        buf_consume(&call->sse, off);
    }
    return 0;
}

static int on_body(llhttp_t *lp, const char *at, size_t n)
{
    struct proxy_call *call = lp->data;
    if (call->stage == CALL_COLLECTING) {
        if (call->body_len == 0 && n == call->body_expect) {
            call->body = at; /* all of it in one read: no copy */
            call->body_len = n;
            return 0;
        }
        struct buf *b = &call->body_buf;
        if (call->body_len + n > call->body_expect)
            return reject(call, "body longer than its Content-Length");
        /* room for all of it at the first piece: one allocation at most */
        if (!buf_reserve_min(b, call->body_expect - b->len, call->body_expect + 1) ||
            !buf_append(b, at, n))
            return reject(call, "out of memory");
        call->body = b->data;
        call->body_len = b->len;
        return 0;
    }
    timings_scan_feed(&call->timings, at, n);
    if (call->stage == CALL_GATHERING || call->whole_events)
        return call_take_events(call, at, n);
    if (call->is_sse) {
        call->relayed = true;
        if (n >= 2) {
            call->tail[0] = at[n - 2];
            call->tail[1] = at[n - 1];
        } else {
            call->tail[0] = call->tail[1];
            call->tail[1] = at[0];
        }
    }
    if (!http_stream_write(call->req, at, n))
        call->paused = true;
    return 0;
}

/* The end of the response: pausing the parser is how call_parse and
 * call_upstream_eof learn it (nothing else pauses it). */
static int on_message_complete(llhttp_t *lp)
{
    struct proxy_call *call = lp->data;
    if (!call_head_done(call))
        return 0; /* an interim 1xx response ended */
    call->keep_alive = llhttp_should_keep_alive(lp);
    return HPE_PAUSED;
}

/* Parses N bytes of the response. Returns false when the call has ended. */
static bool call_parse(struct proxy_call *call, const char *data, size_t n)
{
    llhttp_errno_t err = llhttp_execute(&call->parser, data, n);
    if (err == HPE_OK)
        return true;
    if (err == HPE_PAUSED) { /* the response is complete */
        const char *pos = llhttp_get_error_pos(&call->parser);
        bool extra = pos && pos < data + n; /* bytes after the response: don't trust the connection */
        bool all_sent = call->sent == call_total(call);
        call_ok(call, call->keep_alive && !extra && all_sent && !call->send_failed);
        return false;
    }
    const char *why = call->fail_why;
    if (!why)
        why = llhttp_get_error_reason(&call->parser);
    if (!why || !*why)
        why = llhttp_errno_name(err);
    call_upstream_failed(call, "upstream port %u sent a malformed response: %s", call->port, why);
    return false;
}

/* EOF (ERR 0) or a socket error from upstream. */
static void call_upstream_eof(struct proxy_call *call, int err)
{
    if (call->stage == CALL_CONNECTING) {
        call_upstream_failed(call, "connect to upstream port %u: %s", call->port,
                             strerror(err ? err : ECONNREFUSED));
        return;
    }
    if (call_may_retry(call)) {
        call_retry(call);
        return;
    }
    if (err == 0) {
        llhttp_errno_t e = llhttp_finish(&call->parser);
        if (e == HPE_PAUSED) { /* complete: a body that ends at close */
            call_ok(call, false);
            return;
        }
    }
    const char *how = err ? "reset" : "closed";
    if (call->stage < CALL_HEAD)
        call_upstream_failed(call, "upstream %u %s the connection before answering", call->port, how);
    else if (call->stage == CALL_HEAD)
        call_upstream_failed(call, "upstream %u %s the connection in the response headers",
                             call->port, how);
    else
        call_upstream_failed(call, "upstream %u %s the connection mid-response", call->port, how);
}

/* ----------------------------------------------------- driving the socket */

static void call_update_io(struct proxy_call *call)
{
    int events;
    if (call->stage == CALL_CONNECTING) {
        events = EV_WRITE;
    } else {
        events = call->paused ? 0 : EV_READ;
        if (call_request_unsent(call))
            events |= EV_WRITE;
    }
    uc_watch(call->uc, events);
}

/* Writes what is left of the request. Returns false when the call ended
 * or moved to another connection. */
static bool call_send(struct proxy_call *call)
{
    struct upconn *uc = call->uc;
    size_t total = call_total(call);
    while (call_request_unsent(call)) {
        struct iovec iov[2];
        int cnt = 0;
        if (call->sent < call->out.len) {
            iov[cnt].iov_base = call->out.data + call->sent;
            iov[cnt++].iov_len = call->out.len - call->sent;
            if (call->up_body_len) {
                iov[cnt].iov_base = (char *)call->up_body;
                iov[cnt++].iov_len = call->up_body_len;
            }
        } else {
            iov[cnt].iov_base = (char *)call->up_body + (call->sent - call->out.len);
            iov[cnt++].iov_len = total - call->sent;
        }
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)cnt };
        ssize_t n = sendmsg(uc->fd, &mh, MSG_NOSIGNAL);
        if (n > 0) {
            call->sent += (size_t)n;
            if (call->stage == CALL_CONNECTING)
                call_set_stage(call, CALL_SENDING);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        int err = n < 0 ? errno : EPIPE;
        if (call->stage == CALL_CONNECTING) {
            call_upstream_failed(call, "connect to upstream port %u: %s", call->port, strerror(err));
            return false;
        }
        if (call_may_retry(call)) {
            call_retry(call);
            return false;
        }
        call->send_failed = true; /* the read side sees the end, or an early answer */
    }
    if (call->stage == CALL_SENDING && !call_request_unsent(call))
        call_set_stage(call, CALL_WAITING);
    call_update_io(call);
    return true;
}

static void call_read(struct proxy_call *call)
{
    struct proxy *p = call->p;
    struct upconn *uc = call->uc;
    for (int i = 0; i < READS_PER_WAKEUP; i++) {
        ssize_t n = recv(uc->fd, p->rbuf, sizeof p->rbuf, 0);
        if (n > 0) {
            if (call->stage < CALL_HEAD)
                call_set_stage(call, CALL_HEAD);
            if (!call_parse(call, p->rbuf, (size_t)n))
                return;
            if (call->paused || (size_t)n < sizeof p->rbuf)
                break;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        call_upstream_eof(call, n < 0 ? errno : 0);
        return;
    }
    call_update_io(call);
}

static void uc_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct upconn *uc = w->data;
    (void)loop;
    if (uc->state == UC_IDLE) {
        uc_idle_readable(uc);
        return;
    }
    struct proxy_call *call = uc->call;
    if ((revents & EV_WRITE) && (!call_send(call) || call->uc != uc))
        return;
    if ((revents & EV_READ) && call->stage != CALL_CONNECTING && !call->paused)
        call_read(call);
}

static void uc_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct upconn *uc = w->data;
    (void)loop;
    (void)revents;
    if (uc->state == UC_IDLE) {
        uc_close(uc); /* before the server's own keep-alive limit closes it under us */
        return;
    }
    call_upstream_failed(uc->call, "connect to upstream port %u: timed out after %.0f s",
                         uc->idle->port, CONNECT_TIMEOUT_S);
}

/* Takes an idle connection or opens one, and sends the request. */
static void call_start(struct proxy_call *call)
{
    struct proxy *p = call->p;
    struct idle_conns *ic = call->ic ? call->ic : idle_find(p, call->port, true);
    struct upconn *uc = NULL;
    int err = ENOMEM;

    call->sent = 0;
    call->send_failed = false;
    call->fail_why = NULL;
    llhttp_reset(&call->parser);
    head_reset(call);
    if (ic && !call->retried)
        uc = idle_take(ic);
    call->reused = uc != NULL;
    if (!uc && ic)
        uc = uc_connect(p, ic, &err);
    if (!uc) {
        call_upstream_failed(call, "connect to upstream port %u: %s", call->port, strerror(err));
        return;
    }
    uc->call = call;
    call->uc = uc;
    call_set_stage(call, call->reused ? CALL_SENDING : CALL_CONNECTING);
    call_send(call);
}

/* ------------------------------------------------------------ public API */

struct proxy *proxy_new(struct ev_loop *loop)
{
    struct proxy *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->loop = loop;
    llhttp_settings_init(&p->settings);
    p->settings.on_message_begin = on_message_begin;
    p->settings.on_header_field = on_header_field;
    p->settings.on_header_field_complete = on_header_field_complete;
    p->settings.on_header_value = on_header_value;
    p->settings.on_header_value_complete = on_header_value_complete;
    p->settings.on_headers_complete = on_headers_complete;
    p->settings.on_body = on_body;
    p->settings.on_message_complete = on_message_complete;
    return p;
}

static void idle_close_all(struct idle_conns *ic)
{
    while (ic->head)
        uc_close(ic->head);
}

/* Calls still running are dropped without their DONE: whoever frees the
 * proxy is tearing everything down and owns their arguments. */
void proxy_free(struct proxy *p)
{
    if (!p)
        return;
    while (p->calls) {
        struct proxy_call *call = p->calls;
        p->calls = call->next;
        if (call->req) {
            http_request_unwatch(call->req);
        }
        ev_timer_stop(p->loop, &call->deadline);
        call_release_uc(call, false);
        call_free(call);
    }
    while (p->free_calls) {
        struct proxy_call *call = p->free_calls;
        p->free_calls = call->next;
        call_free(call);
    }
    for (size_t i = 0; i < p->nidle; i++) {
        idle_close_all(p->idle[i]);
        free(p->idle[i]);
    }
    free(p->idle);
    free(p);
}

static struct proxy_call *call_alloc(struct proxy *p)
{
    struct proxy_call *call = p->free_calls;
    if (call) {
        p->free_calls = call->next;
        p->nfree--;
        struct buf out = call->out, hdr = call->hdr, body_buf = call->body_buf;
        memset(call, 0, sizeof *call);
        call->out = out;       /* their memory is kept, emptied */
        call->hdr = hdr;
        call->body_buf = body_buf;
        buf_clear(&call->out);
        buf_clear(&call->hdr);
        buf_clear(&call->body_buf);
    } else {
        call = calloc(1, sizeof *call);
        if (!call)
            return NULL;
    }
    call->p = p;
    timings_scan_init(&call->timings);
    llhttp_init(&call->parser, HTTP_RESPONSE, &p->settings);
    call->parser.data = call;
    return call;
}

struct proxy_call *proxy_forward(struct proxy *p, struct http_request *req, unsigned port,
                                 const char *target, proxy_done_fn done, void *arg)
{
    return proxy_forward_key(p, req, port, NULL, target, done, arg);
}

static struct proxy_call *forward(struct proxy *p, struct http_request *req, unsigned port,
                                  const struct proxy_upstream *up, const char *key,
                                  const char *target, const struct proxy_limit *limit,
                                  proxy_done_fn done, void *arg);

struct proxy_call *proxy_forward_key(struct proxy *p, struct http_request *req, unsigned port,
                                     const char *key, const char *target,
                                     proxy_done_fn done, void *arg)
{
    return forward(p, req, port, NULL, key, target, NULL, done, arg);
}

struct proxy_call *proxy_forward_limited(struct proxy *p, struct http_request *req, unsigned port,
                                         const char *key, const char *target,
                                         const struct proxy_limit *limit,
                                         proxy_done_fn done, void *arg)
{
    return forward(p, req, port, NULL, key, target, limit, done, arg);
}

struct proxy_call *proxy_forward_to(struct proxy *p, struct http_request *req,
                                    const struct proxy_upstream *up, const char *target,
                                    proxy_done_fn done, void *arg)
{
    return forward(p, req, 0, up, up->key, target, NULL, done, arg);
}

/* PORT: a child's on 127.0.0.1; else UP, another server. */
static struct proxy_call *forward(struct proxy *p, struct http_request *req, unsigned port,
                                  const struct proxy_upstream *up, const char *key,
                                  const char *target, const struct proxy_limit *limit,
                                  proxy_done_fn done, void *arg)
{
    if (!target)
        target = req->target;
    struct proxy_call *call = call_alloc(p);
    if (!call) {
        http_request_unwatch(req);
        http_respond_error(req, 502, "server_error", "proxy: out of memory");
        done(arg, &(struct proxy_result){ .outcome = PROXY_UPSTREAM_ERROR, .first_byte = -1,
                                          .cache_n = -1, .prompt_n = -1, .predicted_n = -1,
                                          .prompt_ms = -1, .predicted_ms = -1 });
        return NULL;
    }
    call->req = req;
    call->port = port;
    call->done = done;
    call->up_body = req->body;
    call->up_body_len = req->body_len;
    if (limit) {
        if (limit->body) {
            call->up_body = limit->body;
            call->up_body_len = limit->body_len;
        }
        call->limit_s = limit->seconds;
        call->api = limit->api;
        call->gather = limit->gather;
        snprintf(call->model, sizeof call->model, "%s", limit->model ? limit->model : "");
    }
    if (up) {
        call->up = up;
        call->served_by = up->served_by;   /* the caller's, alive until DONE */
        call->ic = idle_find_addr(p, up->addr, up->addrlen);
        call->port = call->ic ? call->ic->port : 0;
    }
    call->sent_at = ev_now(p->loop);
    call->arg = arg;
    call->head_req = strcmp(req->method, "HEAD") == 0;
    call->next = p->calls;
    if (p->calls)
        p->calls->prev = call;
    p->calls = call;
    http_request_watch(req, call_client_gone, call_client_drained, call);

    if (!valid_target(target)) {
        call->req = NULL;
        http_request_unwatch(req);
        http_respond_error(req, 400, "invalid_request_error",
                           "request target is empty or contains spaces or control characters");
        call_end(call, PROXY_UPSTREAM_ERROR);
        return NULL;
    }
    bool built = call_build_head(call, target, key);
    call->up = NULL;                    /* the caller's struct may go now */
    if (!built || (up && !call->ic)) {
        call_upstream_failed(call, "proxy: out of memory for the request to port %u", call->port);
        return NULL;
    }
    if (call->limit_s > 0) {
        ev_timer_init(&call->deadline, call_deadline_cb, call->limit_s, 0.);
        call->deadline.data = call;
        ev_timer_start(p->loop, &call->deadline);
    }
    bool ended = false; /* the call may end inside (connect refused at once) */
    call->ended = &ended;
    call_start(call);
    if (ended)
        return NULL;
    call->ended = NULL;
    return call;
}

void proxy_hand_back_unanswered(struct proxy *p, bool on)
{
    p->hand_back_unanswered = on;
}

void proxy_forget_port(struct proxy *p, unsigned port)
{
    struct idle_conns *ic = idle_find(p, port, false);
    if (ic)
        idle_close_all(ic);
}
