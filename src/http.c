/* http — HTTP/1.1 server on libev + llhttp. See http.h for the contract.
 *
 * Shape of the code, top to bottom:
 *   buffers and small helpers
 *   requests (struct req: the public struct plus its storage)
 *   llhttp callbacks (fill the request, enforce header/body limits)
 *   connections: the state machine, reading, parsing, writing, closing
 *   the public answering API (http_respond*, http_stream_*)
 *   listening and accepting
 *   reading helpers (headers, query) and status tables
 *
 * Reentrancy rule: the public API never frees a connection. Anything that
 * must happen "after" (close, parse the next pipelined request) runs from
 * a libev callback — directly, or via the connection's zero-delay `defer`
 * timer — so a handler never sees its connection vanish under it. */
#define _GNU_SOURCE
#include "http.h"

#include "log.h"
#include "util.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <llhttp.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define IN_BUF_SIZE    (64 * 1024)  /* per connection, allocated only while bytes wait */
#define OUT_BUF_MIN    (16 * 1024)  /* first allocation of queued output */
#define ARENA_MIN      512          /* first allocation of a request's arena */
#define BODY_MIN       4096         /* first allocation of a body without Content-Length */
#define BODY_PRESIZE   (1024 * 1024) /* a Content-Length body is allocated up to this at once */
#define OUT_HIGH       (256 * 1024) /* http_stream_write reports back-pressure above this */
#define OUT_LOW        (64 * 1024)  /* on_drain below this; the next request is parsed below this */
#define LISTEN_BACKLOG 511
#define ACCEPT_BATCH   64           /* accepts per wake-up, to stay fair to open connections */
#define ACCEPT_PAUSE_S 0.1          /* pause after EMFILE, ENFILE, ENOBUFS, ENOMEM */
#define LINGER_S       2.0          /* reading leftovers after an error response before close */
#define SEND_TIMEOUT_S 60.0         /* output pending and no write progress: the client is gone */
#define PEER_CHECK_S   1.0          /* poll for hang-up while reading is paused on a full buffer */

/* ---------------------------------------------------------------- types */

/* Connection states. Each says what the connection waits for and what
 * moves it on; the timer (c->timer) means something different in each. */
enum conn_state {
    /* Keep-alive, between requests: waits for the first byte of the next
     * request (→ READING) or keepalive_timeout_ms without one (→ closed
     * silently). Pipelined bytes already buffered wait here until queued
     * output is below OUT_LOW. */
    CONN_IDLE,
    /* Receiving a request. Timer: the header block must be complete within
     * header_timeout_ms of the first byte (or of accept), and the body must
     * keep arriving (each read restarts it): else 408. A complete request
     * → HANDLING; a bad one → an error response and CLOSING. */
    CONN_READING,
    /* The handler holds the request; parsing is paused. Reading continues
     * only to buffer pipelined bytes (up to IN_BUF_SIZE) and to notice EOF
     * or reset (→ on_close, closed). The end of the response → IDLE, or
     * CLOSING when the connection is not kept alive. */
    CONN_HANDLING,
    /* The last response is queued: waits for output to drain, then closes,
     * or after an error response half-closes and goes to LINGER. */
    CONN_CLOSING,
    /* Our side is shut down; reads and discards what the client still sends
     * (so our response is not lost to a reset) until EOF or LINGER_S. */
    CONN_LINGER,
};

/* Queued output: pending bytes are b.data[off..b.len). Sending advances
 * OFF; the bytes move to the front only when room is needed (see
 * outbuf_reserve), never once per send. */
struct outbuf {
    struct buf b;
    size_t off;
};

/* Offsets of a header's name and value in its request's arena. */
struct header_off {
    size_t name, value;
};

/* A request while it is read and handled: the public struct plus storage. */
struct req {
    struct http_request pub;   /* first: handlers get &pub */
    struct buf arena;          /* target\0 path\0 query\0 then name\0value\0 per header */
    size_t path_off, query_off;
    struct header_off *hoff;   /* one per header, into arena */
    size_t npairs, pairs_cap;
    size_t name_off;           /* header field being received; SIZE_MAX until it starts */
    size_t value_off;          /* its value; SIZE_MAX until the value starts */
    bool url_done;
    struct buf body;           /* pub.body and pub.body_len point at it once complete */
};

struct http_conn {
    struct http_server *srv;
    struct http_conn *prev, *next;
    int fd;
    enum conn_state state;
    ev_io rio, wio;
    ev_timer timer;            /* the state's timeout: see enum conn_state */
    ev_timer wtimer;           /* SEND_TIMEOUT_S without write progress */
    ev_timer peer_w;           /* hang-up poll while reading is paused */
    ev_timer defer;            /* zero delay: run the connection from the loop */
    llhttp_t parser;
    char *in;                  /* unparsed bytes are in[in_off..in_len) */
    size_t in_off, in_len;
    struct outbuf out;
    struct req *req;           /* being read, or held by the handler */
    uint64_t hdr_bytes;        /* bytes of the current header block so far */
    uint64_t trailer_bytes;
    bool headers_done;
    int fail_status;           /* set by a callback that rejects the request */
    char fail_msg[128];        /* its reason (llhttp keeps only the pointer) */
    bool in_run;               /* conn_parse is on the stack */
    bool dead;                 /* socket unusable or must close now: teardown pending */
    bool linger;               /* after the last write, half-close and drain input */
    bool resp_started;         /* status line sent (stream begun) */
    bool resp_head;            /* HEAD request: no body bytes */
    bool resp_nobody;          /* stream without body (HEAD, 204, 304) */
    bool resp_chunked;
    bool resp_close;           /* close after this response */
    bool want_drain;           /* http_stream_write returned false */
    bool trusted;              /* a request on it showed a valid key */
    const char *exec_data;     /* what llhttp_execute is parsing now */
    char last_fed;             /* the last byte fed to llhttp before it */
    char peer[64];
};

struct http_server {
    struct ev_loop *loop;
    struct http_limits limits;
    http_handler_fn handler;
    http_admit_fn admit;       /* NULL: every request is admitted, trusted */
    void *arg;
    llhttp_settings_t settings;
    int fd;                    /* listener; -1 after shutdown */
    ev_io accept_w;
    ev_timer accept_pause_w;   /* running while accepting rests after EMFILE etc. */
    bool accept_paused;
    bool accept_error_logged;  /* one log line per run of accept errors */
    bool shutting_down;
    bool held;                 /* http_server_hold(): no accepts, idle connections not read */
    bool is_unix;
    unsigned long evicted;     /* keyless connections closed since the last log line */
    double evict_logged;       /* ev_now() of that line */
    char *unix_path;           /* unlinked at free if it is still our socket */
    dev_t unix_dev;
    ino_t unix_ino;
    unsigned port;
    struct http_conn *conns;
    size_t nconns;
    time_t date_sec;
    char date[64];             /* "Date: …\r\n" for date_sec */
};

static void conn_run(struct http_conn *c);
static void conn_fail(struct http_conn *c, int status, const char *msg);
static void conn_send(struct http_conn *c, struct iovec *iov, int iovcnt);
static void srv_update_accept(struct http_server *srv);

/* -------------------------------------------------------------- helpers */

static size_t in_pending(const struct http_conn *c) { return c->in_len - c->in_off; }
static size_t out_pending(const struct http_conn *c) { return c->out.b.len - c->out.off; }

/* Room for N more bytes: the sent bytes before OFF are dropped first when
 * the buffer is too full to take N. */
static bool outbuf_reserve(struct outbuf *o, size_t n)
{
    if (o->b.cap - o->b.len <= n && o->off > 0) {
        buf_consume(&o->b, o->off);
        o->off = 0;
    }
    return buf_reserve_min(&o->b, n, OUT_BUF_MIN);
}

static bool outbuf_append(struct outbuf *o, const void *data, size_t n)
{
    return outbuf_reserve(o, n) && buf_append(&o->b, data, n);
}

static void outbuf_release(struct outbuf *o)
{
    buf_free(&o->b);
    o->off = 0;
}

/* Arms the state timer; SECONDS <= 0 means no timeout. */
static void conn_arm(struct http_conn *c, double seconds)
{
    ev_timer_stop(c->srv->loop, &c->timer);
    if (seconds > 0) {
        ev_timer_set(&c->timer, seconds, 0.);
        ev_timer_start(c->srv->loop, &c->timer);
    }
}

static double ms_to_s(int64_t ms) { return ms > 0 ? (double)ms / 1000.0 : 0.0; }

/* Runs the connection from the loop soon (never from inside an API call). */
static void conn_schedule(struct http_conn *c)
{
    if (!ev_is_active(&c->defer))
        ev_timer_start(c->srv->loop, &c->defer);
}

static void conn_mark_dead(struct http_conn *c)
{
    c->dead = true;
    conn_schedule(c);
}

/* Appends a JSON string body (without quotes) for S to O: util's escaper,
 * so that control characters and ill-formed UTF-8 (a request's bytes echoed
 * in a message) never make invalid JSON. */
static bool json_escape_append(struct outbuf *o, const char *s)
{
    size_t n = util_json_escape(NULL, 0, s);
    if (!outbuf_reserve(o, n))
        return false;
    util_json_escape(o->b.data + o->b.len, n + 1, s);
    buf_set_len(&o->b, o->b.len + n);
    return true;
}

/* {"error":{"message":MSG,"type":TYPE,"code":STATUS}} into O. */
static bool error_json(struct outbuf *o, int status, const char *type, const char *msg)
{
    char tail[96];
    int n = snprintf(tail, sizeof tail, "\",\"type\":\"%s\",\"code\":%d}}",
                     type ? type : http_error_type(status), status);
    if (n < 0 || (size_t)n >= sizeof tail)
        return false;
    return outbuf_append(o, "{\"error\":{\"message\":\"", 21) &&
           json_escape_append(o, msg) && outbuf_append(o, tail, (size_t)n);
}

static void format_peer(char *out, size_t len, const struct sockaddr *sa)
{
    char host[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        snprintf(out, len, "%s:%u", host, ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        snprintf(out, len, "[%s]:%u", host, ntohs(in6->sin6_port));
    } else {
        snprintf(out, len, "unix");
    }
}

/* "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n", recomputed once a second. */
static const char *srv_date(struct http_server *srv)
{
    static const char days[7][4] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" };
    static const char months[12][4] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                        "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
    time_t now = (time_t)ev_now(srv->loop);
    if (now != srv->date_sec || !srv->date[0]) {
        struct tm tm;
        if (!gmtime_r(&now, &tm))
            return "";
        snprintf(srv->date, sizeof srv->date, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                 days[tm.tm_wday % 7], tm.tm_mday, months[tm.tm_mon % 12],
                 tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        srv->date_sec = now;
    }
    return srv->date;
}

/* "Access-Control-Allow-Origin: ORIGIN\r\nVary: Origin\r\n" when the
 * admission hook allowed REQ's Origin, else "". */
static void cors_header(const struct http_request *req, char *out, size_t len)
{
    const char *origin = req && req->cors ? http_header_get(req, "Origin") : NULL;
    int n = origin ? snprintf(out, len, "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n", origin)
                   : -1;
    if (n < 0 || (size_t)n >= len)
        out[0] = '\0';
}

/* ------------------------------------------------------------- requests */

static struct req *req_new(struct http_conn *c)
{
    struct req *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->pub.conn = c;
    r->pub.is_unix = c->srv->is_unix;
    snprintf(r->pub.peer, sizeof r->pub.peer, "%s", c->peer);
    r->pub.started = ev_now(c->srv->loop);
    r->pub.method = "";
    r->name_off = r->value_off = SIZE_MAX;
    return r;
}

static void req_free(struct req *r)
{
    if (!r)
        return;
    buf_free(&r->arena);
    free(r->hoff);
    free(r->pub.headers);
    buf_free(&r->body);
    free(r);
}

/* Makes room for N more bytes plus a NUL. */
static bool arena_reserve(struct req *r, size_t n)
{
    return buf_reserve_min(&r->arena, n, ARENA_MIN);
}

static bool arena_append(struct req *r, const char *s, size_t n)
{
    return arena_reserve(r, n) && buf_append(&r->arena, s, n);
}

static bool req_push_header(struct req *r, size_t name_off, size_t value_off)
{
    if (!util_grow(&r->hoff, &r->pairs_cap, r->npairs + 1, sizeof *r->hoff))
        return false;
    r->hoff[r->npairs].name = name_off;
    r->hoff[r->npairs].value = value_off;
    r->npairs++;
    return true;
}

/* The arena stops growing at the end of the header block (trailers are not
 * kept), so pointers into it are taken once, here. */
static bool req_finish_head(struct req *r, llhttp_t *p)
{
    if (!r->url_done) { /* no target: keep the pointers valid anyway */
        if (!arena_reserve(r, 3) || !buf_putc(&r->arena, '\0') || !buf_putc(&r->arena, '\0') ||
            !buf_putc(&r->arena, '\0'))
            return false;
        r->path_off = 1;
        r->query_off = 2;
        r->url_done = true;
    }
    r->pub.target = r->arena.data;
    r->pub.path = r->arena.data + r->path_off;
    r->pub.query = r->arena.data + r->query_off;
    r->pub.method = llhttp_method_name((llhttp_method_t)p->method);
    r->pub.http_minor = p->http_minor;
    if (r->npairs) {
        r->pub.headers = calloc(r->npairs, sizeof *r->pub.headers);
        if (!r->pub.headers)
            return false;
    }
    for (size_t i = 0; i < r->npairs; i++) {
        r->pub.headers[i].name = r->arena.data + r->hoff[i].name;
        r->pub.headers[i].value = r->arena.data + r->hoff[i].value;
    }
    r->pub.nheaders = r->npairs;
    return true;
}

static bool req_body_append(struct req *r, const char *at, size_t n)
{
    return buf_reserve_min(&r->body, n, BODY_MIN) && buf_append(&r->body, at, n);
}

/* ---------------------------------------------------- llhttp callbacks */

/* Rejects the request from inside a callback with STATUS. */
static int parse_reject(llhttp_t *p, int status, const char *msg)
{
    struct http_conn *c = p->data;
    c->fail_status = status;
    snprintf(c->fail_msg, sizeof c->fail_msg, "%s", msg);
    llhttp_set_error_reason(p, c->fail_msg);
    return HPE_USER;
}

static int reject_oom(llhttp_t *p)
{
    return parse_reject(p, 500, "out of memory");
}

static int on_message_begin(llhttp_t *p)
{
    struct http_conn *c = p->data;
    req_free(c->req);
    c->req = req_new(c);
    c->headers_done = false;
    c->trailer_bytes = 0;
    return c->req ? 0 : reject_oom(p);
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    struct http_conn *c = p->data;
    return arena_append(c->req, at, n) ? 0 : reject_oom(p);
}

/* Length of the "scheme://authority" that starts an absolute-form target
 * ("http://host:8080/v1/models?x"), or 0 for any other form. */
static size_t absolute_form_prefix(const char *t, size_t n)
{
    size_t i = 0;
    if (n == 0 || !isalpha((unsigned char)t[0]))
        return 0;
    while (i < n && (isalnum((unsigned char)t[i]) || t[i] == '+' || t[i] == '-' || t[i] == '.'))
        i++;
    if (n - i < 3 || memcmp(t + i, "://", 3) != 0)
        return 0;
    for (i += 3; i < n && t[i] != '/' && t[i] != '?' && t[i] != '#'; i++)
        ;
    return i;
}

/* RFC 9112 3.2.2: a server accepts a target in absolute form, and the
 * request is then the one its origin form names ("/v1/models?x"): keep
 * only that, so routing and forwarding see one form. */
static bool req_origin_form(struct req *r)
{
    struct buf *a = &r->arena;
    size_t skip = absolute_form_prefix(a->data, a->len);
    if (!skip)
        return true;
    size_t rest = a->len - skip;
    bool slash = rest > 0 && a->data[skip] == '/';
    if (!slash && !arena_reserve(r, 1))
        return false;
    memmove(a->data + !slash, a->data + skip, rest);
    if (!slash)
        a->data[0] = '/';
    buf_set_len(a, rest + !slash);
    return true;
}

/* The target is complete: store "target\0path\0query\0". */
static int on_url_complete(llhttp_t *p)
{
    struct http_conn *c = p->data;
    struct req *r = c->req;
    struct buf *a = &r->arena;
    if (!req_origin_form(r))
        return reject_oom(p);
    size_t tlen = a->len;
    /* room for target\0 + path\0 + query\0 = 2 * tlen + 3 at most */
    if (!arena_reserve(r, 1) || !buf_putc(&r->arena, '\0') || !arena_reserve(r, tlen + 2))
        return reject_oom(p);
    const char *q = memchr(a->data, '?', tlen);
    size_t plen = q ? (size_t)(q - a->data) : tlen;
    size_t qlen = q ? tlen - plen - 1 : 0;
    r->path_off = a->len;
    memcpy(a->data + a->len, a->data, plen);
    buf_set_len(a, a->len + plen);
    buf_set_len(a, a->len + 1);                 /* keep the NUL that ends the path */
    r->query_off = a->len;
    memcpy(a->data + a->len, a->data + plen + 1, qlen);
    buf_set_len(a, a->len + qlen);
    buf_set_len(a, a->len + 1);
    r->url_done = true;
    return 0;
}

/* Trailer fields are not kept, only counted against max_header. */
static int count_trailer(llhttp_t *p, size_t n)
{
    struct http_conn *c = p->data;
    uint64_t max = c->srv->limits.max_header;
    c->trailer_bytes += n;
    if (max && c->trailer_bytes > max)
        return parse_reject(p, 431, "request trailers too large");
    return 0;
}

/* Bytes of a header name or value into the arena, *START set to where it
 * begins (SIZE_MAX: not begun); a trailer's are only counted. */
static int header_bytes(llhttp_t *p, size_t *start, const char *at, size_t n)
{
    struct http_conn *c = p->data;
    if (c->headers_done)
        return count_trailer(p, n);
    if (*start == SIZE_MAX)
        *start = c->req->arena.len;
    return arena_append(c->req, at, n) ? 0 : reject_oom(p);
}

/* The end of a header name or value that began at *START (SIZE_MAX: it is
 * empty and begins here): a value's trailing blanks go (TRIM), a NUL ends
 * it. Nothing for a trailer's. */
static int header_end(llhttp_t *p, size_t *start, bool trim)
{
    struct http_conn *c = p->data;
    struct buf *a = &c->req->arena;
    if (c->headers_done)
        return 0;
    if (*start == SIZE_MAX)
        *start = a->len;
    while (trim && a->len > *start && (a->data[a->len - 1] == ' ' || a->data[a->len - 1] == '\t'))
        buf_set_len(a, a->len - 1);
    return arena_reserve(c->req, 1) && buf_putc(a, '\0') ? 0 : reject_oom(p);
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    struct http_conn *c = p->data;
    return header_bytes(p, &c->req->name_off, at, n);
}

static int on_header_field_complete(llhttp_t *p)
{
    struct http_conn *c = p->data;
    return header_end(p, &c->req->name_off, false); /* empty names: llhttp rejects them */
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    struct http_conn *c = p->data;
    /* llhttp joins an obs-fold line (CRLF then SP or HT) to the value; a
     * value's bytes that follow a line feed are one. RFC 9112 5.2 lets a
     * server reject it, and proxies that read it differently make it a
     * smuggling risk. */
    char prev = at > c->exec_data ? at[-1] : c->last_fed;
    if (prev == '\n')
        return parse_reject(p, 400, "obsolete line folding in a header field is not accepted");
    return header_bytes(p, &c->req->value_off, at, n);
}

static int on_header_value_complete(llhttp_t *p)
{
    struct http_conn *c = p->data;
    struct req *r = c->req;
    int err = header_end(p, &r->value_off, true);
    if (err || c->headers_done)
        return err;
    if (!req_push_header(r, r->name_off, r->value_off))
        return reject_oom(p);
    r->name_off = r->value_off = SIZE_MAX;
    return 0;
}

/* The admission hook, before the body: 0, or the llhttp error that makes
 * conn_parse_error answer the hook's status and close. */
static int conn_admit(struct http_conn *c)
{
    struct http_request *req = &c->req->pub;
    struct http_admission out = { 0 };
    if (!c->srv->admit) {
        c->trusted = true;
        return 0;
    }
    int status = c->srv->admit(req, c->srv->arg, &out);
    if (out.trusted)
        c->trusted = true;
    req->cors = out.cors;
    if (status == 0)
        return 0;
    return parse_reject(&c->parser, status, out.msg ? out.msg : http_status_text(status));
}

static bool expects_continue(const struct http_request *req)
{
    const char *e = http_header_get(req, "Expect");
    return e && strcasecmp(e, "100-continue") == 0;
}

/* Header block complete: check the version and body size, prepare the
 * body, answer "Expect: 100-continue", switch the timer to the body. */
static int on_headers_complete(llhttp_t *p)
{
    struct http_conn *c = p->data;
    struct req *r = c->req;
    uint64_t max_body = c->srv->limits.max_body;
    char msg[96];

    if (!req_finish_head(r, p))
        return reject_oom(p);
    c->headers_done = true;
    if (p->http_major != 1)
        return parse_reject(p, 505, "only HTTP/1.0 and HTTP/1.1 are supported");
    int denied = conn_admit(c);
    if (denied)
        return denied;
    bool has_length = (p->flags & F_CONTENT_LENGTH) != 0;
    if (has_length && max_body && p->content_length > max_body) {
        snprintf(msg, sizeof msg, "request body exceeds %llu bytes", (unsigned long long)max_body);
        return parse_reject(p, 413, msg);
    }
    if (has_length && p->content_length > 0) {
        size_t pre = p->content_length < BODY_PRESIZE ? (size_t)p->content_length : BODY_PRESIZE;
        if (!buf_reserve_min(&r->body, pre, pre + 1))
            return reject_oom(p);
    }
    bool has_body = (has_length && p->content_length > 0) || (p->flags & F_CHUNKED);
    if (has_body && p->http_minor >= 1 && expects_continue(&r->pub)) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        struct iovec iov = { (void *)cont, sizeof cont - 1 };
        conn_send(c, &iov, 1);
    }
    /* Now the body's limit: all of it within body_timeout, or without
     * one, no stall longer than header_timeout (conn_read re-arms). */
    int64_t body_ms = c->srv->limits.body_timeout_ms;
    conn_arm(c, ms_to_s(body_ms > 0 ? body_ms : c->srv->limits.header_timeout_ms));
    return 0;
}

static int body_over_limit(llhttp_t *p, uint64_t more)
{
    struct http_conn *c = p->data;
    uint64_t max = c->srv->limits.max_body;
    size_t len = c->req->body.len;
    if (max && (len > max || more > max - len)) {
        char msg[96];
        snprintf(msg, sizeof msg, "request body exceeds %llu bytes", (unsigned long long)max);
        return parse_reject(p, 413, msg);
    }
    return 0;
}

/* Chunked bodies: refuse a chunk that would pass max_body before reading it. */
static int on_chunk_header(llhttp_t *p)
{
    return body_over_limit(p, p->content_length) ? -1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct http_conn *c = p->data;
    if (body_over_limit(p, n))
        return HPE_USER;
    return req_body_append(c->req, at, n) ? 0 : reject_oom(p);
}

/* A whole request: pause so that it is handled before the next one is parsed. */
static int on_message_complete(llhttp_t *p)
{
    struct http_conn *c = p->data;
    struct req *r = c->req;
    r->pub.body = r->body.data;
    r->pub.body_len = r->body.len;
    r->pub.keep_alive = llhttp_should_keep_alive(p) && !p->upgrade;
    return HPE_PAUSED;
}

static void settings_init(llhttp_settings_t *s)
{
    llhttp_settings_init(s);
    s->on_message_begin = on_message_begin;
    s->on_url = on_url;
    s->on_url_complete = on_url_complete;
    s->on_header_field = on_header_field;
    s->on_header_field_complete = on_header_field_complete;
    s->on_header_value = on_header_value;
    s->on_header_value_complete = on_header_value_complete;
    s->on_headers_complete = on_headers_complete;
    s->on_chunk_header = on_chunk_header;
    s->on_body = on_body;
    s->on_message_complete = on_message_complete;
}

/* ---------------------------------------------------------- connections */

static void conn_enter_idle(struct http_conn *c)
{
    c->state = CONN_IDLE;
    conn_arm(c, ms_to_s(c->srv->limits.keepalive_timeout_ms));
}

static void conn_enter_reading(struct http_conn *c)
{
    c->state = CONN_READING;
    conn_arm(c, ms_to_s(c->srv->limits.header_timeout_ms));
}

static void conn_enter_closing(struct http_conn *c)
{
    c->state = CONN_CLOSING;
    conn_arm(c, 0);
}

/* Idle for shutdown purposes: no request in any stage. */
static bool conn_is_idle(const struct http_conn *c)
{
    return c->state == CONN_IDLE ||
           (c->state == CONN_READING && !c->req && !in_pending(c));
}

/* Nothing of a request on it anywhere in this process: no request, no
 * unparsed bytes, no output queued. Its socket can change hands. */
static bool conn_handover_ready(const struct http_conn *c)
{
    return !c->dead && !c->req && !in_pending(c) && !out_pending(c) &&
           (c->state == CONN_IDLE || c->state == CONN_READING);
}

static void in_release(struct http_conn *c)
{
    free(c->in);
    c->in = NULL;
    c->in_off = c->in_len = 0;
}

/* Hands a complete request to the handler; it may answer before returning. */
static void conn_dispatch(struct http_conn *c)
{
    struct req *r = c->req;
    c->hdr_bytes = 0;
    c->headers_done = false;
    c->fail_status = 0;
    c->state = CONN_HANDLING;
    conn_arm(c, 0);
    c->resp_started = false;
    c->resp_close = false;
    c->resp_nobody = false;
    c->resp_chunked = false;
    c->want_drain = false;
    c->resp_head = strcmp(r->pub.method, "HEAD") == 0;
    c->srv->handler(&r->pub, c->srv->arg);
}

/* The response is fully queued: free the request, then keep the connection
 * (IDLE; conn_parse takes any buffered next request) or close it. */
static void conn_end_response(struct http_conn *c)
{
    struct req *r = c->req;
    bool keep = r->pub.keep_alive && !c->resp_close && !c->srv->shutting_down;
    c->req = NULL;
    c->want_drain = false;
    c->resp_started = false;
    req_free(r);
    if (keep) {
        conn_enter_idle(c);
    } else {
        c->linger = in_pending(c) > 0; /* unread input would turn our close into a reset */
        conn_enter_closing(c);
    }
    if (!c->in_run)
        conn_schedule(c);
}

static void conn_parse_error(struct http_conn *c, llhttp_errno_t err)
{
    char msg[256];
    const char *why = llhttp_get_error_reason(&c->parser);
    if (!why || !*why)
        why = llhttp_errno_name(err);
    if (c->fail_status) { /* our own rejection; llhttp may replace the reason */
        conn_fail(c, c->fail_status, c->fail_msg);
        return;
    }
    snprintf(msg, sizeof msg, "malformed HTTP request: %s", why);
    conn_fail(c, 400, msg);
}

/* Feeds buffered bytes to llhttp once. While the header block is
 * incomplete, at most the bytes left under max_header are fed, so the limit
 * is exact. Returns false when parsing must stop (error response queued). */
static bool conn_execute(struct http_conn *c)
{
    uint64_t max = c->srv->limits.max_header;
    const char *data = c->in + c->in_off;
    size_t n = in_pending(c);
    bool in_head = !c->headers_done;

    if (in_head && max && n > max - c->hdr_bytes)
        n = (size_t)(max - c->hdr_bytes);
    c->exec_data = data;
    llhttp_errno_t err = llhttp_execute(&c->parser, data, n);
    c->exec_data = NULL;
    size_t used = n;
    if (err == HPE_PAUSED)
        used = (size_t)(llhttp_get_error_pos(&c->parser) - data);
    if (used > 0)
        c->last_fed = data[used - 1];
    c->in_off += used;
    if (in_head)
        c->hdr_bytes += used;

    if (err == HPE_PAUSED) {
        llhttp_resume(&c->parser);
        conn_dispatch(c);
        return true;
    }
    if (err != HPE_OK) {
        conn_parse_error(c, err);
        return false;
    }
    if (!c->headers_done && max && c->hdr_bytes >= max) {
        char msg[96];
        snprintf(msg, sizeof msg, "request header block exceeds %llu bytes",
                 (unsigned long long)max);
        conn_fail(c, 431, msg);
        return false;
    }
    return true;
}

/* Parses buffered input and dispatches requests, one at a time, until input
 * runs out, a request is outstanding, or queued output must drain first. */
static void conn_parse(struct http_conn *c)
{
    while (!c->dead && in_pending(c)) {
        if (c->state == CONN_IDLE) {
            if (out_pending(c) >= OUT_LOW)
                break;
            conn_enter_reading(c);
        }
        if (c->state != CONN_READING || !conn_execute(c))
            break;
    }
    if (c->in && !in_pending(c))
        in_release(c);
}

/* Queues an error response for a request the handler never saw, then closes. */
static void conn_fail(struct http_conn *c, int status, const char *msg)
{
    struct outbuf body = { 0 };
    char head[1536], cors[1024];

    log_info("http: %s: %d %s", c->peer, status, msg);
    cors_header(c->req ? &c->req->pub : NULL, cors, sizeof cors);
    req_free(c->req);
    c->req = NULL;
    c->resp_close = true;
    if (!error_json(&body, status, NULL, msg))
        buf_clear(&body.b);
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nServer: llama-pool\r\n%s"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n"
                     "%sConnection: close\r\n\r\n",
                     status, http_status_text(status), srv_date(c->srv), body.b.len, cors);
    if (n < 0 || (size_t)n >= sizeof head)
        n = 0;
    struct iovec iov[2] = { { head, (size_t)n }, { body.b.data, body.b.len } };
    conn_send(c, iov, body.b.len ? 2 : 1);
    outbuf_release(&body);
    c->linger = true;
    conn_enter_closing(c);
}

/* Reads once into the input buffer. EOF or reset during a request held by
 * the handler is a disconnect (on_close); otherwise queued output is
 * flushed before closing. */
static void conn_read(struct http_conn *c)
{
    if (!c->in) {
        c->in = malloc(IN_BUF_SIZE);
        if (!c->in) {
            log_warn("http: %s: out of memory for the input buffer", c->peer);
            c->dead = true;
            return;
        }
        c->in_off = c->in_len = 0;
    }
    if (c->in_off > 0 && c->in_len == IN_BUF_SIZE) {
        memmove(c->in, c->in + c->in_off, in_pending(c));
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    size_t room = IN_BUF_SIZE - c->in_len;
    if (room == 0)
        return;
    ssize_t n;
    do
        n = recv(c->fd, c->in + c->in_len, room, 0);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        c->in_len += (size_t)n;
        if (c->state == CONN_READING && c->headers_done && c->srv->limits.body_timeout_ms <= 0)
            conn_arm(c, ms_to_s(c->srv->limits.header_timeout_ms)); /* body progress */
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (n < 0 && errno != ECONNRESET && errno != EPIPE && errno != ETIMEDOUT)
        log_warn("http: %s: recv: %s", c->peer, strerror(errno));
    if (c->state == CONN_HANDLING || n < 0) {
        c->dead = true; /* teardown calls on_close if a request is held */
        return;
    }
    /* EOF between requests or mid-request: flush what is queued, then close */
    req_free(c->req);
    c->req = NULL;
    in_release(c);
    c->linger = false;
    conn_enter_closing(c);
}

/* LINGER: discard input until EOF (bounded per wake-up). */
static void conn_read_discard(struct http_conn *c)
{
    char buf[4096];
    for (int i = 0; i < 16; i++) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        c->dead = true; /* EOF or error: done lingering */
        return;
    }
}

/* Writes queued output until the socket stops taking it. */
static void conn_flush(struct http_conn *c)
{
    struct ev_loop *loop = c->srv->loop;
    bool progress = false;
    while (out_pending(c) && !c->dead) {
        ssize_t n = send(c->fd, c->out.b.data + c->out.off, out_pending(c), MSG_NOSIGNAL);
        if (n > 0) {
            c->out.off += (size_t)n;
            progress = true;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            if (errno != EPIPE && errno != ECONNRESET)
                log_warn("http: %s: send: %s", c->peer, strerror(errno));
            c->dead = true;
        }
    }
    if (!out_pending(c) || c->dead) {
        outbuf_release(&c->out);
        ev_io_stop(loop, &c->wio);
        ev_timer_stop(loop, &c->wtimer);
    } else if (progress) {
        ev_timer_again(loop, &c->wtimer);
    }
}

/* Sends IOV now if nothing is queued ahead of it; queues what the socket
 * does not take. Never blocks, never frees the connection. */
static void conn_send(struct http_conn *c, struct iovec *iov, int iovcnt)
{
    size_t total = 0, sent = 0;
    if (c->dead)
        return;
    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    if (total == 0)
        return;
    if (!out_pending(c)) {
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)iovcnt };
        ssize_t n;
        do
            n = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            if (errno != EPIPE && errno != ECONNRESET)
                log_warn("http: %s: sendmsg: %s", c->peer, strerror(errno));
            conn_mark_dead(c);
            return;
        }
        sent = n > 0 ? (size_t)n : 0;
    }
    if (sent == total)
        return;
    for (int i = 0; i < iovcnt; i++) {
        size_t len = iov[i].iov_len;
        if (sent >= len) {
            sent -= len;
            continue;
        }
        if (!outbuf_append(&c->out, (char *)iov[i].iov_base + sent, len - sent)) {
            log_warn("http: %s: out of memory for output", c->peer);
            conn_mark_dead(c);
            return;
        }
        sent = 0;
    }
    ev_io_start(c->srv->loop, &c->wio);
    if (!ev_is_active(&c->wtimer))
        ev_timer_again(c->srv->loop, &c->wtimer);
}

/* Closes now. A request still held by the handler gets on_close first. */
static void conn_close(struct http_conn *c)
{
    struct http_server *srv = c->srv;
    struct ev_loop *loop = srv->loop;
    struct req *r = c->req;

    ev_io_stop(loop, &c->rio);
    ev_io_stop(loop, &c->wio);
    ev_timer_stop(loop, &c->timer);
    ev_timer_stop(loop, &c->wtimer);
    ev_timer_stop(loop, &c->peer_w);
    ev_timer_stop(loop, &c->defer);
    c->dead = true;
    c->req = NULL; /* the API ignores the request from here on */
    if (r && c->state == CONN_HANDLING && r->pub.on_close)
        r->pub.on_close(&r->pub, r->pub.arg);
    req_free(r);
    if (close(c->fd) < 0)
        log_warn("http: %s: close: %s", c->peer, strerror(errno));
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv->nconns--;
    free(c->in);
    outbuf_release(&c->out);
    free(c);
    srv_update_accept(srv);
}

/* After output has drained from an error response: half-close, read the
 * rest. Returns false when the connection should simply close. */
static bool conn_start_linger(struct http_conn *c)
{
    in_release(c);
    if (shutdown(c->fd, SHUT_WR) < 0)
        return false;
    c->state = CONN_LINGER;
    conn_arm(c, LINGER_S);
    return true;
}

/* Watchers follow the state: read unless CLOSING or the input buffer is
 * full; while a held request cannot read, poll for hang-up instead. */
static void conn_update_io(struct http_conn *c)
{
    struct ev_loop *loop = c->srv->loop;
    bool full = c->in && c->in_off == 0 && c->in_len == IN_BUF_SIZE;
    bool want_read = c->state == CONN_LINGER || (c->state != CONN_CLOSING && !full);

    if (c->srv->held && conn_handover_ready(c)) {
        /* Its next request stays in the kernel for whoever takes the socket. */
        ev_io_stop(loop, &c->rio);
        ev_timer_stop(loop, &c->timer);
        ev_timer_stop(loop, &c->peer_w);
        return;
    }

    if (want_read)
        ev_io_start(loop, &c->rio);
    else
        ev_io_stop(loop, &c->rio);
    if (c->state == CONN_HANDLING && !want_read) {
        if (!ev_is_active(&c->peer_w))
            ev_timer_again(loop, &c->peer_w);
    } else {
        ev_timer_stop(loop, &c->peer_w);
    }
}

/* Called last by every libev callback: close, or set watchers. */
static void conn_settle(struct http_conn *c)
{
    if (c->dead) {
        conn_close(c);
        return;
    }
    if (c->srv->shutting_down && conn_is_idle(c))
        conn_enter_closing(c);
    if (c->state == CONN_CLOSING && !out_pending(c)) {
        if (!c->linger || !conn_start_linger(c)) {
            conn_close(c);
            return;
        }
    }
    conn_update_io(c);
}

/* The only way in from libev: parse what is buffered, then settle. */
static void conn_run(struct http_conn *c)
{
    c->in_run = true;
    if (!c->dead)
        conn_parse(c);
    c->in_run = false;
    conn_settle(c);
}

static void conn_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct http_conn *c = w->data;
    (void)loop;
    (void)revents;
    if (c->state == CONN_LINGER)
        conn_read_discard(c);
    else
        conn_read(c);
    conn_run(c);
}

static void conn_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct http_conn *c = w->data;
    (void)loop;
    (void)revents;
    conn_flush(c);
    if (!c->dead && c->want_drain && out_pending(c) < OUT_LOW && c->req) {
        struct http_request *req = &c->req->pub;
        c->want_drain = false;
        if (req->on_drain)
            req->on_drain(req, req->arg);
    }
    conn_run(c);
}

static void conn_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct http_conn *c = w->data;
    (void)loop;
    (void)revents;
    switch (c->state) {
    case CONN_IDLE:
        if (out_pending(c) || in_pending(c))
            conn_arm(c, ms_to_s(c->srv->limits.keepalive_timeout_ms)); /* still busy */
        else
            conn_enter_closing(c);
        break;
    case CONN_READING:
        conn_fail(c, 408, c->headers_done ? "timed out reading the request body"
                                          : "timed out reading the request headers");
        break;
    case CONN_CLOSING:
    case CONN_LINGER:
        c->dead = true;
        break;
    case CONN_HANDLING:
        break;
    }
    conn_run(c);
}

static void conn_send_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct http_conn *c = w->data;
    (void)loop;
    (void)revents;
    log_info("http: %s: no write progress for %.0f s, closing", c->peer, SEND_TIMEOUT_S);
    c->dead = true;
    conn_run(c);
}

/* Reading is paused on a full buffer while the handler holds a request:
 * ask the kernel whether the peer hung up. */
static void conn_peer_check_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct http_conn *c = w->data;
    (void)loop;
    (void)revents;
    short events = POLLIN;
#ifdef POLLRDHUP
    events |= POLLRDHUP;
#endif
    struct pollfd pfd = { .fd = c->fd, .events = events };
    int n = poll(&pfd, 1, 0);
    if (n < 0 && errno != EINTR)
        log_warn("http: %s: poll: %s", c->peer, strerror(errno));
    short gone = POLLHUP | POLLERR;
#ifdef POLLRDHUP
    gone |= POLLRDHUP;
#endif
    if (n > 0 && (pfd.revents & gone))
        c->dead = true;
    conn_run(c);
}

static void conn_defer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    conn_run(w->data);
}

static struct http_conn *conn_new(struct http_server *srv, int fd, const struct sockaddr *sa)
{
    struct http_conn *c = calloc(1, sizeof *c);
    if (!c) {
        log_warn("http: out of memory for a connection");
        if (close(fd) < 0)
            log_warn("http: close: %s", strerror(errno));
        return NULL;
    }
    c->srv = srv;
    c->fd = fd;
    format_peer(c->peer, sizeof c->peer, sa);
    if (sa->sa_family == AF_INET || sa->sa_family == AF_INET6) {
        int one = 1;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
            log_warn("http: %s: TCP_NODELAY: %s", c->peer, strerror(errno));
    }
    llhttp_init(&c->parser, HTTP_REQUEST, &srv->settings);
    c->parser.data = c;
    ev_io_init(&c->rio, conn_read_cb, fd, EV_READ);
    ev_io_init(&c->wio, conn_write_cb, fd, EV_WRITE);
    ev_init(&c->timer, conn_timer_cb);
    ev_init(&c->wtimer, conn_send_timeout_cb);
    c->wtimer.repeat = SEND_TIMEOUT_S;
    ev_init(&c->peer_w, conn_peer_check_cb);
    c->peer_w.repeat = PEER_CHECK_S;
    ev_timer_init(&c->defer, conn_defer_cb, 0., 0.);
    c->rio.data = c->wio.data = c->timer.data = c->wtimer.data = c->peer_w.data = c->defer.data = c;

    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->nconns++;

    conn_enter_reading(c); /* the header timeout runs from accept */
    ev_io_start(srv->loop, &c->rio);
    return c;
}

/* ------------------------------------------------------------ answering */

/* The connection behind REQ, or NULL if REQ is no longer answerable. */
static struct http_conn *req_conn(const struct http_request *req)
{
    struct http_conn *c = req ? req->conn : NULL;
    if (!c || !c->req || &c->req->pub != req || c->state != CONN_HANDLING)
        return NULL;
    return c;
}

/* Status line and headers, then BODY (may be NULL). FRAMING is the
 * Content-Length or Transfer-Encoding line, or "". EXTRA must not carry
 * framing or Connection headers: this module owns those. */
static void conn_send_head(struct http_conn *c, int status, const char *ctype,
                           const char *extra, const char *framing,
                           const char *body, size_t len)
{
    char stackbuf[1024], cors[1024];
    const char *date = srv_date(c->srv);
    cors_header(c->req ? &c->req->pub : NULL, cors, sizeof cors);
    size_t need = 200 + strlen(date) + strlen(framing) + strlen(cors) +
                  (ctype ? strlen(ctype) : 0) + (extra ? strlen(extra) : 0);
    char *head = need <= sizeof stackbuf ? stackbuf : malloc(need);
    if (!head) {
        log_warn("http: %s: out of memory for response headers", c->peer);
        conn_mark_dead(c);
        return;
    }
    int n = snprintf(head, need,
                     "HTTP/1.1 %d %s\r\nServer: llama-pool\r\n%s%s%s%s%s%sConnection: %s\r\n%s\r\n",
                     status, http_status_text(status), date,
                     ctype ? "Content-Type: " : "", ctype ? ctype : "", ctype ? "\r\n" : "",
                     framing, cors, c->resp_close ? "close" : "keep-alive", extra ? extra : "");
    if (n < 0 || (size_t)n >= need) {
        log_warn("http: %s: response headers too long", c->peer);
        conn_mark_dead(c);
    } else {
        struct iovec iov[2] = { { head, (size_t)n }, { (void *)body, len } };
        conn_send(c, iov, body && len ? 2 : 1);
    }
    if (head != stackbuf)
        free(head);
}

void http_respond(struct http_request *req, int status, const char *content_type,
                  const char *extra_headers, const char *body, size_t len)
{
    struct http_conn *c = req_conn(req);
    char framing[48] = "";
    if (!c)
        return;
    if (c->resp_started) {
        log_error("http: %s %s: http_respond after http_stream_begin", req->method, req->path);
        return;
    }
    c->resp_close = !req->keep_alive || c->srv->shutting_down;
    bool nobody = http_status_has_no_body(status);
    if (!nobody)
        snprintf(framing, sizeof framing, "Content-Length: %zu\r\n", len);
    bool send_body = !nobody && !c->resp_head;
    conn_send_head(c, status, content_type, extra_headers, framing,
                   send_body ? body : NULL, send_body ? len : 0);
    conn_end_response(c);
}

static void respond_error_v(struct http_request *req, int status, const char *type,
                            const char *extra_headers, const char *fmt, va_list ap)
{
    struct outbuf body = { 0 };
    char stackmsg[512];
    char *msg = stackmsg;
    va_list again;

    if (!req_conn(req))
        return;
    va_copy(again, ap);
    int n = vsnprintf(stackmsg, sizeof stackmsg, fmt, ap);
    if (n < 0) {
        stackmsg[0] = '\0';
    } else if ((size_t)n >= sizeof stackmsg) {
        msg = malloc((size_t)n + 1);
        if (msg)
            vsnprintf(msg, (size_t)n + 1, fmt, again);
        else
            msg = stackmsg; /* truncated is better than nothing */
    }
    va_end(again);
    if (!error_json(&body, status, type, msg))
        buf_clear(&body.b);
    http_respond(req, status, "application/json", extra_headers, body.b.data, body.b.len);
    outbuf_release(&body);
    if (msg != stackmsg)
        free(msg);
}

void http_respond_error(struct http_request *req, int status, const char *type,
                        const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    respond_error_v(req, status, type, NULL, fmt, ap);
    va_end(ap);
}

void http_respond_error_headers(struct http_request *req, int status, const char *type,
                                const char *extra_headers, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    respond_error_v(req, status, type, extra_headers, fmt, ap);
    va_end(ap);
}

void http_stream_begin(struct http_request *req, int status, const char *content_type,
                       const char *extra_headers)
{
    struct http_conn *c = req_conn(req);
    const char *framing = "";
    if (!c)
        return;
    if (c->resp_started) {
        log_error("http: %s %s: http_stream_begin twice", req->method, req->path);
        return;
    }
    c->resp_started = true;
    c->resp_nobody = c->resp_head || http_status_has_no_body(status);
    c->resp_close = !req->keep_alive || c->srv->shutting_down;
    if (!http_status_has_no_body(status)) {
        if (req->http_minor >= 1) {
            c->resp_chunked = true;
            framing = "Transfer-Encoding: chunked\r\n";
        } else if (!c->resp_nobody) {
            c->resp_close = true; /* HTTP/1.0: the body ends at close */
        }
    }
    conn_send_head(c, status, content_type, extra_headers, framing, NULL, 0);
}

bool http_stream_write(struct http_request *req, const void *data, size_t len)
{
    struct http_conn *c = req_conn(req);
    if (!c || !c->resp_started || c->dead)
        return false;
    if (len > 0 && !c->resp_nobody) {
        if (c->resp_chunked) {
            char size[24];
            int n = snprintf(size, sizeof size, "%zx\r\n", len);
            struct iovec iov[3] = { { size, (size_t)n }, { (void *)data, len }, { "\r\n", 2 } };
            conn_send(c, iov, 3);
        } else {
            struct iovec iov = { (void *)data, len };
            conn_send(c, &iov, 1);
        }
    }
    if (c->dead || out_pending(c) >= OUT_HIGH) {
        c->want_drain = true;
        return false;
    }
    return true;
}

size_t http_stream_buffered(const struct http_request *req)
{
    const struct http_conn *c = req_conn(req);
    return c ? out_pending(c) : 0;
}

void http_stream_end(struct http_request *req)
{
    struct http_conn *c = req_conn(req);
    if (!c)
        return;
    if (!c->resp_started) {
        log_error("http: %s %s: http_stream_end without http_stream_begin", req->method, req->path);
        return;
    }
    if (c->resp_chunked && !c->resp_nobody) {
        struct iovec iov = { "0\r\n\r\n", 5 };
        conn_send(c, &iov, 1);
    }
    conn_end_response(c);
}

void http_stream_abort(struct http_request *req)
{
    struct http_conn *c = req_conn(req);
    if (!c)
        return;
    c->resp_close = true;
    conn_end_response(c);
}

/* ------------------------------------------------- listening, accepting */

/* With an admission hook, the oldest connection that has shown no valid
 * key and holds no request being handled; NULL when there is none. Such
 * a connection is at most reading a header block (header_timeout bounds
 * it), between requests, or closing: at max_connections it makes room, so
 * clients without a key cannot keep out clients with one. */
static struct http_conn *srv_evictable(struct http_server *srv)
{
    struct http_conn *oldest = NULL;
    if (!srv->admit)
        return NULL;
    for (struct http_conn *c = srv->conns; c; c = c->next) /* newest first */
        if (!c->trusted && !c->dead && c->state != CONN_HANDLING)
            oldest = c;
    return oldest;
}

static void srv_evict(struct http_server *srv, struct http_conn *victim)
{
    double now = ev_now(srv->loop);
    srv->evicted++;
    if (now - srv->evict_logged >= 10.0) {
        log_warn("http: max_connections (%u) reached: closed %lu connection(s) that showed no key "
                 "to make room (the latest from %s)",
                 srv->limits.max_connections, srv->evicted, victim->peer);
        srv->evict_logged = now;
        srv->evicted = 0;
    }
    conn_close(victim);
}

static void srv_update_accept(struct http_server *srv)
{
    unsigned max = srv->limits.max_connections;
    bool want = srv->fd >= 0 && !srv->shutting_down && !srv->accept_paused && !srv->held &&
                (max == 0 || srv->nconns < max || srv_evictable(srv));
    if (want)
        ev_io_start(srv->loop, &srv->accept_w);
    else
        ev_io_stop(srv->loop, &srv->accept_w);
}

/* Returns true if accepting may go on at once. */
static bool srv_accept_error(struct http_server *srv, int err)
{
    switch (err) {
    case EINTR:
    case ECONNABORTED:
    case EPROTO:
    case ENETDOWN:
    case ENOPROTOOPT:
    case EHOSTDOWN:
#ifdef ENONET
    case ENONET:
#endif
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
        return true; /* that one connection failed */
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
        return false;
    default: /* EMFILE, ENFILE, ENOBUFS, ENOMEM, or worse: rest, don't spin */
        if (!srv->accept_error_logged)
            log_warn("http: accept: %s; pausing new connections (%zu open)",
                     strerror(err), srv->nconns);
        srv->accept_error_logged = true;
        srv->accept_paused = true;
        ev_timer_set(&srv->accept_pause_w, ACCEPT_PAUSE_S, 0.);
        ev_timer_start(srv->loop, &srv->accept_pause_w);
        srv_update_accept(srv);
        return false;
    }
}

static void srv_accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct http_server *srv = w->data;
    unsigned max = srv->limits.max_connections;
    (void)loop;
    (void)revents;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        struct http_conn *victim = NULL;   /* makes room at max_connections */
        if (max && srv->nconns >= max && !(victim = srv_evictable(srv)))
            break;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(srv->fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (!srv_accept_error(srv, errno))
                break;
            continue;
        }
        srv->accept_error_logged = false;
        if (srv->is_unix || sl == 0)
            ss.ss_family = AF_UNIX;
        conn_new(srv, fd, (struct sockaddr *)&ss);
        if (victim && srv->nconns > max)
            srv_evict(srv, victim);
    }
    srv_update_accept(srv);
}

static void srv_accept_pause_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct http_server *srv = w->data;
    (void)loop;
    (void)revents;
    srv->accept_paused = false;
    srv_update_accept(srv);
}

/* "host:port", "[v6]:port", ":port" or "*:port" → HOST ("" = any), PORT. */
static bool split_host_port(const char *addr, char *host, size_t hostlen,
                            char *port, size_t portlen)
{
    const char *colon;
    size_t hlen;
    if (addr[0] == '[') {
        const char *rb = strchr(addr, ']');
        if (!rb || rb[1] != ':')
            return false;
        hlen = (size_t)(rb - addr - 1);
        if (hlen >= hostlen)
            return false;
        memcpy(host, addr + 1, hlen);
        colon = rb + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon || memchr(addr, ':', (size_t)(colon - addr)))
            return false; /* none, or a bare IPv6 address */
        hlen = (size_t)(colon - addr);
        if (hlen >= hostlen)
            return false;
        memcpy(host, addr, hlen);
    }
    host[hlen] = '\0';
    if (strcmp(host, "*") == 0)
        host[0] = '\0';
    const char *p = colon + 1;
    size_t plen = strlen(p);
    if (plen == 0 || plen >= portlen || strspn(p, "0123456789") != plen || atol(p) > 65535)
        return false;
    memcpy(port, p, plen + 1);
    return true;
}

static int listen_tcp(struct http_server *srv, const char *addr, char *err, size_t errlen)
{
    char host[256], port[8];
    struct addrinfo hints = { 0 }, *res, *ai;
    int fd = -1, gai, saved = 0;
    const char *what = "socket";

    if (!split_host_port(addr, host, sizeof host, port, sizeof port)) {
        snprintf(err, errlen, "listen %s: expected host:port, [ipv6]:port or an absolute socket path", addr);
        return -1;
    }
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "listen %s: %s", addr, gai_strerror(gai));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        int one = 1;
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) {
            what = "socket";
        } else if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
            what = "SO_REUSEADDR";
        } else if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            what = "bind";
        } else if (listen(fd, LISTEN_BACKLOG) < 0) {
            what = "listen";
        } else {
            break;
        }
        saved = errno;
        if (fd >= 0)
            close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        snprintf(err, errlen, "listen %s: %s: %s", addr, what, strerror(saved));
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        snprintf(err, errlen, "listen %s: getsockname: %s", addr, strerror(errno));
        close(fd);
        return -1;
    }
    srv->port = util_sockaddr_port((struct sockaddr *)&ss);
    return fd;
}

/* An existing socket file is stale if nobody accepts on it. */
static bool unix_socket_in_use(const struct sockaddr_un *sun)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return false;
    int r = connect(fd, (const struct sockaddr *)sun, sizeof *sun);
    bool in_use = r == 0 || errno == EAGAIN || errno == EINPROGRESS;
    close(fd);
    return in_use;
}

static int listen_unix(struct http_server *srv, const char *path, char *err, size_t errlen)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    struct stat st;
    int fd;

    if (strlen(path) >= sizeof sun.sun_path) {
        snprintf(err, errlen, "listen %s: socket path longer than %zu bytes", path,
                 sizeof sun.sun_path - 1);
        return -1;
    }
    memcpy(sun.sun_path, path, strlen(path) + 1);
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            snprintf(err, errlen, "listen %s: exists and is not a socket", path);
            return -1;
        }
        if (unix_socket_in_use(&sun)) {
            snprintf(err, errlen, "listen %s: another process is listening there", path);
            return -1;
        }
        if (unlink(path) < 0 && errno != ENOENT) {
            snprintf(err, errlen, "listen %s: removing stale socket: %s", path, strerror(errno));
            return -1;
        }
    } else if (errno != ENOENT) {
        snprintf(err, errlen, "listen %s: %s", path, strerror(errno));
        return -1;
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "listen %s: socket: %s", path, strerror(errno));
        return -1;
    }
    const char *what = NULL;
    if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0)
        what = "bind";
    else if (chmod(path, 0660) < 0)
        what = "chmod";
    else if (listen(fd, LISTEN_BACKLOG) < 0)
        what = "listen";
    else if (stat(path, &st) < 0)
        what = "stat";
    if (what) {
        snprintf(err, errlen, "listen %s: %s: %s", path, what, strerror(errno));
        if (strcmp(what, "bind") != 0)
            unlink(path);
        close(fd);
        return -1;
    }
    srv->unix_path = strdup(path);
    if (!srv->unix_path) {
        snprintf(err, errlen, "listen %s: out of memory", path);
        unlink(path);
        close(fd);
        return -1;
    }
    srv->unix_dev = st.st_dev;
    srv->unix_ino = st.st_ino;
    srv->is_unix = true;
    return fd;
}

static struct http_server *srv_new(struct ev_loop *loop, const struct http_limits *limits,
                                   http_handler_fn handler, void *arg)
{
    struct http_server *srv = calloc(1, sizeof *srv);
    if (!srv)
        return NULL;
    srv->loop = loop;
    srv->limits = *limits;
    srv->handler = handler;
    srv->arg = arg;
    srv->fd = -1;
    settings_init(&srv->settings);
    return srv;
}

static void srv_start(struct http_server *srv)
{
    ev_io_init(&srv->accept_w, srv_accept_cb, srv->fd, EV_READ);
    srv->accept_w.data = srv;
    ev_init(&srv->accept_pause_w, srv_accept_pause_cb);
    srv->accept_pause_w.data = srv;
    srv_update_accept(srv);
}

struct http_server *http_server_listen(struct ev_loop *loop, const char *addr,
                                       const struct http_limits *limits,
                                       http_handler_fn handler, void *arg,
                                       char *err, size_t errlen)
{
    struct http_server *srv = srv_new(loop, limits, handler, arg);
    if (!srv) {
        snprintf(err, errlen, "listen %s: out of memory", addr);
        return NULL;
    }
    srv->fd = addr[0] == '/' ? listen_unix(srv, addr, err, errlen)
                             : listen_tcp(srv, addr, err, errlen);
    if (srv->fd < 0) {
        free(srv);
        return NULL;
    }
    srv_start(srv);
    return srv;
}

struct http_server *http_server_adopt(struct ev_loop *loop, int fd, const char *addr,
                                      const struct http_limits *limits,
                                      http_handler_fn handler, void *arg,
                                      char *err, size_t errlen)
{
    int listening = 0;
    socklen_t len = sizeof listening;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        snprintf(err, errlen, "listen %s: inherited fd %d: %s", addr, fd, strerror(errno));
        return NULL;
    }
    if (!listening) {
        snprintf(err, errlen, "listen %s: inherited fd %d is not a listening socket", addr, fd);
        return NULL;
    }
    bool is_unix = ss.ss_family == AF_UNIX;
    if (is_unix != (addr[0] == '/')) {
        snprintf(err, errlen, "listen %s: inherited fd %d is a %s socket", addr, fd,
                 is_unix ? "UNIX" : "TCP");
        return NULL;
    }
    struct http_server *srv = srv_new(loop, limits, handler, arg);
    if (!srv || (is_unix && !(srv->unix_path = strdup(addr)))) {
        free(srv);
        snprintf(err, errlen, "listen %s: out of memory", addr);
        return NULL;
    }
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    srv->fd = fd;
    srv->is_unix = is_unix;
    struct stat st;
    if (is_unix && stat(addr, &st) == 0) {     /* the file we unlink at free */
        srv->unix_dev = st.st_dev;
        srv->unix_ino = st.st_ino;
    }
    if (!is_unix)
        srv->port = util_sockaddr_port((struct sockaddr *)&ss);
    srv_start(srv);
    return srv;
}

int http_server_adopt_conn(struct http_server *srv, int fd, bool trusted)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    memset(&ss, 0, sizeof ss);
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0)
        return -1;
    if (srv->is_unix || sl == 0)
        ss.ss_family = AF_UNIX;
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct http_conn *c = conn_new(srv, fd, (struct sockaddr *)&ss);
    if (!c)
        return -1;
    c->trusted = trusted;
    conn_enter_idle(c);         /* between two requests, as it was handed over */
    srv_update_accept(srv);
    return 0;
}

void http_server_hold(struct http_server *srv, bool hold)
{
    if (srv->held == hold)
        return;
    srv->held = hold;
    for (struct http_conn *c = srv->conns; c; c = c->next) {
        if (!hold && conn_handover_ready(c)) {   /* their timers run again, from now */
            if (c->state == CONN_IDLE)
                conn_enter_idle(c);
            else
                conn_enter_reading(c);
        }
        conn_update_io(c);
    }
    srv_update_accept(srv);
}

size_t http_server_busy(const struct http_server *srv, const struct http_request *except)
{
    size_t n = 0;
    for (const struct http_conn *c = srv->conns; c; c = c->next)
        if (!conn_handover_ready(c) && !(except && except->conn == c))
            n++;
    return n;
}

int http_server_fd(const struct http_server *srv)
{
    return srv->fd;
}

size_t http_server_idle_fds(const struct http_server *srv, int *fds, bool *trusted, size_t max)
{
    size_t n = 0;
    for (const struct http_conn *c = srv->conns; c && n < max; c = c->next)
        if (conn_handover_ready(c)) {
            fds[n] = c->fd;
            trusted[n] = c->trusted;
            n++;
        }
    return n;
}

int http_request_fd(const struct http_request *req)
{
    struct http_conn *c = req_conn(req);
    return c ? c->fd : -1;
}

void http_request_watch(struct http_request *req,
                        void (*on_close)(struct http_request *req, void *arg),
                        void (*on_drain)(struct http_request *req, void *arg), void *arg)
{
    req->on_close = on_close;
    req->on_drain = on_drain;
    req->arg = arg;
}

void http_request_unwatch(struct http_request *req)
{
    req->on_close = NULL;
    req->on_drain = NULL;
}

void http_server_set_admit(struct http_server *srv, http_admit_fn admit)
{
    srv->admit = admit;
}

void http_server_set_limits(struct http_server *srv, const struct http_limits *limits)
{
    srv->limits = *limits;
    srv_update_accept(srv);
}

static void srv_close_listener(struct http_server *srv)
{
    ev_io_stop(srv->loop, &srv->accept_w);
    ev_timer_stop(srv->loop, &srv->accept_pause_w);
    if (srv->fd >= 0 && close(srv->fd) < 0)
        log_warn("http: close listener: %s", strerror(errno));
    srv->fd = -1;
}

void http_server_shutdown(struct http_server *srv)
{
    srv->shutting_down = true;
    srv_close_listener(srv);
    /* Idle connections close from the loop (this may run inside a handler);
     * busy ones close after their response (conn_end_response). */
    for (struct http_conn *c = srv->conns; c; c = c->next)
        conn_schedule(c);
}

/* Not from inside a handler or callback of this server: it frees the
 * connection that callback runs on. */
void http_server_free(struct http_server *srv)
{
    struct stat st;
    if (!srv)
        return;
    srv->shutting_down = true;
    srv_close_listener(srv);
    while (srv->conns)
        conn_close(srv->conns);
    if (srv->unix_path && stat(srv->unix_path, &st) == 0 &&
        st.st_dev == srv->unix_dev && st.st_ino == srv->unix_ino &&
        unlink(srv->unix_path) < 0)
        log_warn("http: unlink %s: %s", srv->unix_path, strerror(errno));
    free(srv->unix_path);
    free(srv);
}

size_t http_server_connections(const struct http_server *srv)
{
    return srv->nconns;
}

unsigned http_server_port(const struct http_server *srv)
{
    return srv->is_unix ? 0 : srv->port;
}

/* ------------------------------------------------------ reading helpers */

const char *http_header_get(const struct http_request *req, const char *name)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    return NULL;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Percent-decodes S[0..N) ('+' is a space; a bad escape stays literal). */
/* %XX decoded; '+' is a space in a query (PLUS_SPACE), itself in a path. */
static char *pct_decode(const char *s, size_t n, bool plus_space)
{
    char *out = malloc(n + 1), *o = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        int hi, lo;
        if (s[i] == '+' && plus_space) {
            *o++ = ' ';
        } else if (s[i] == '%' && i + 2 < n &&
                   (hi = hexval(s[i + 1])) >= 0 && (lo = hexval(s[i + 2])) >= 0) {
            *o++ = (char)(hi << 4 | lo);
            i += 2;
        } else {
            *o++ = s[i];
        }
    }
    *o = '\0';
    return out;
}

char *http_path_decode(const char *s, size_t n)
{
    return pct_decode(s, n, false);
}

char *http_query_get(const struct http_request *req, const char *name)
{
    const char *q = req->query;
    if (!q || !name)
        return NULL;
    while (*q) {
        size_t len = strcspn(q, "&");
        const char *eq = memchr(q, '=', len);
        size_t klen = eq ? (size_t)(eq - q) : len;
        char *key = pct_decode(q, klen, true);
        if (!key)
            return NULL;
        bool match = strcmp(key, name) == 0;
        free(key);
        if (match)
            return eq ? pct_decode(eq + 1, len - klen - 1, true) : pct_decode("", 0, true);
        q += len;
        if (*q == '&')
            q++;
    }
    return NULL;
}

/* ------------------------------------------------------- status tables */

const char *http_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    default:
        if (status >= 200 && status < 300) return "OK";
        if (status >= 400 && status < 500) return "Bad Request";
        if (status >= 500 && status < 600) return "Internal Server Error";
        return "Unknown";
    }
}

bool http_status_has_no_body(int status)
{
    return (status >= 100 && status < 200) || status == 204 || status == 304;
}

/* The error types llama.cpp's server uses, so clients see familiar values. */
const char *http_error_type(int status)
{
    switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 408: return "timeout_error";
    case 429: return "rate_limit_error";
    case 504: return "timeout_error";
    case 501: return "not_supported_error";
    case 503: return "unavailable_error";
    default:
        return status >= 500 ? "server_error" : "invalid_request_error";
    }
}
