/* libFuzzer target for the HTTP request path (built and run by scripts/fuzz).
 *
 * The real server (src/http.c) listens on a UNIX socket and on 127.0.0.1,
 * each twice: once with a handler of ours that calls the whole request API
 * (headers, query, whole/streamed/aborted/deferred answers, back-pressure),
 * once with the daemon's own api_handle over a real pool and router built
 * from a small config (routing, keys, the model lookup in JSON bodies,
 * /pool/…, /metrics, reload). No model fits the memory budget, so requests
 * that reach the scheduler are answered 503 and no child should be spawned
 * (llama_server is /bin/true in case one is). Servers, pool and loop live
 * across inputs.
 *
 * Input: byte 0 = flags, bytes 1-2 = where to split the rest into up to
 * three writes, the rest = bytes sent on one connection.
 *   flags bits 0-1  number of writes (0 and 1: one, 2: two, 3: three)
 *   flags bit  2    half-close (shutdown SHUT_WR) after the last write
 *   flags bits 4-5  server: 0 ours/UNIX, 1 ours/TCP, 2 api/UNIX, 3 api/TCP
 *   flags bits 3,6,7 all set: wait for the server's timeouts (408,
 *                   keep-alive close) before closing (slow, so rare)
 * Between writes the loop runs until the server is quiet, so requests are
 * parsed in pieces. After the last write the client reads until the server
 * is quiet, closes, and the loop runs until the server has dropped the
 * connection.
 *
 * Checks (abort = a crash for libFuzzer):
 *   - request invariants in our handler (target/path/query, body NUL, headers);
 *   - every byte the server sends parses as HTTP/1.1 responses (llhttp in
 *     response mode, HEAD answers without a body), complete unless our
 *     handler aborted a stream or the client half-closed;
 *   - our handler's requests all get a response unless we half-closed;
 *   - the server closes its side within a few seconds of the client's close;
 *   - no model is ever started (none fits the budget);
 *   - every complete application/json body parses (jansson also rejects
 *     invalid UTF-8); FUZZ_HTTP_JSON=0 turns this check off.
 * Set FUZZ_HTTP_VERBOSE=1 for the daemon's log lines and the answers on
 * stderr. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <curl/curl.h>
#include <ev.h>

#include "api.h"
#include "config.h"
#include "http.h"
#include "log.h"
#include "pool.h"
#include "router.h"

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "fuzz_http: check failed: %s (%s:%d)\n", #cond,  \
                    __FILE__, __LINE__);                                     \
            abort();                                                         \
        }                                                                    \
    } while (0)

#define QUIET_PUMPS     8          /* loop turns without I/O that count as "quiet" */
#define MAX_PUMPS       20000      /* bound on busy loop turns per phase */
#define CLOSE_BOUND_S   5.0        /* the server must drop a closed client by then */
#define WAIT_S          0.03       /* F_WAIT: time given to the server's timers */
#define RESP_CAP        (2u << 20) /* response bytes kept for checking */
#define BIG_STREAM      (320 * 1024)
#define MAX_METHODS     512

enum { SRV_RAW_UNIX, SRV_RAW_TCP, SRV_API_UNIX, SRV_API_TCP, SRV_COUNT };

/* The pool's configs: A at start, B and an invalid one for /pool/reload.
 * A and B start alike: a budget no model fits, in the fuzz directory
 * (conf_fill fills in llama_server and the directory). */
#define CONF_POOL_HEAD                      \
    "[pool]\n"                              \
    "llama_server = %s\n"                   \
    "memory_budget = 1M\n"                  \
    "memory_reserve = 0\n"                  \
    "log_dir = %s/logs\n"                   \
    "control_socket = %s/control.sock\n"

static const char conf_a[] =
    CONF_POOL_HEAD
    "api_keys = key-one, key-two\n"
    "admin_key = admin-key\n"
    "default_model = tiny\n"
    "max_queue = 4\n"
    "queue_timeout = 50ms\n"
    "\n"
    "[model tiny]\n"
    "path = %s/m.gguf\n"
    "memory = 1G\n"
    "aliases = gpt-3.5-turbo, t\n"
    "instances = 0-2\n"
    "\n"
    "[model small]\n"
    "path = %s/m.gguf\n"
    "memory = 2G\n"
    "args = -c 512\n";

static const char conf_b[] =
    CONF_POOL_HEAD
    "api_keys = key-one\n"
    "\n"
    "[model tiny]\n"
    "path = %s/m.gguf\n"
    "memory = 1G\n"
    "args = -c 1024\n"
    "\n"
    "[model other]\n"
    "path = %s/m.gguf\n"
    "memory = 3G\n"
    "aliases = o\n";

static const char conf_bad[] = "[pool]\nmemory_budget = lots\n[model]\n";

struct fuzz {
    struct ev_loop *loop;
    char dir[80];
    char conf_name[96];
    char *conf_text[2];             /* A, B with the directory filled in */
    struct http_server *srv[SRV_COUNT];
    char unix_path[2][108];         /* raw, api */
    unsigned port[2];               /* raw, api */
    struct pool *pool;
    struct router *router;
    struct api api;
    ev_timer guard;                 /* wakes blocking loop turns */
    bool reloaded;                  /* this input changed the pool's config */
    size_t reload_pick;             /* which config /pool/reload applies */
    /* What this input's requests were, for the response check. */
    bool is_head[MAX_METHODS];
    size_t nreqs;
    size_t answered;                /* our handler's requests that got an answer */
    bool aborted;                   /* our handler aborted a stream */
    bool check_json;
    bool verbose;                   /* FUZZ_HTTP_VERBOSE: log lines and answers */
};

static struct fuzz F;

/* ------------------------------------------------------------ our handler */

/* A deferred answer: streamed in pieces from a zero timer, or whole. */
struct later {
    ev_timer t;
    struct http_request *req;
    int mode;
    size_t step;
};

enum mode {
    M_WHOLE, M_ERROR, M_STREAM, M_STREAM_LATER, M_WHOLE_LATER, M_ABORT,
    M_NO_BODY, M_ERROR_HEADERS, M_BIG, M_COUNT
};

static void check_request(const struct http_request *req)
{
    CHECK(req->method && req->method[0]);
    CHECK(req->target && req->path && req->query);
    /* origin-form: the path starts the target; absolute-form: it is inside it */
    size_t plen = strlen(req->path), qlen = strlen(req->query), tlen = strlen(req->target);
    if (req->target[0] == '/')
        CHECK(strncmp(req->target, req->path, plen) == 0);
    else
        CHECK(strstr(req->target, req->path) != NULL);
    if (qlen)
        CHECK(tlen > qlen && req->target[tlen - qlen - 1] == '?' &&
              strcmp(req->target + tlen - qlen, req->query) == 0);
    if (req->body_len)
        CHECK(req->body && req->body[req->body_len] == '\0');
    CHECK(req->http_minor == 0 || req->http_minor == 1);
    for (size_t i = 0; i < req->nheaders; i++) {
        CHECK(req->headers[i].name && req->headers[i].value);
        CHECK(http_header_get(req, req->headers[i].name) != NULL);
    }
}

static void free_query(struct http_request *req, const char *name)
{
    char *v = http_query_get(req, name);
    if (v)
        CHECK(strlen(v) <= strlen(req->query));
    free(v);
}

/* Reads every header and query accessor once. */
static void exercise_accessors(struct http_request *req)
{
    static const char *const names[] = { "Host", "Content-Type", "content-length",
                                         "Transfer-Encoding", "Expect", "Connection",
                                         "Authorization", "X-Api-Key", "Origin" };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        (void)http_header_get(req, names[i]);
    free_query(req, "model");
    free_query(req, "a");
    free_query(req, "");
    size_t klen = strcspn(req->query, "=&");
    char *key = strndup(req->query, klen);
    CHECK(key);
    free_query(req, key);
    free(key);
}

static int pick_status(const struct http_request *req)
{
    static const int statuses[] = { 200, 201, 204, 304, 400, 401, 404, 408, 413,
                                    429, 431, 499, 500, 502, 503, 504, 599, 999 };
    unsigned b = req->body_len ? (unsigned char)req->body[0] : 0;
    int s = statuses[b % (sizeof statuses / sizeof *statuses)];
    (void)http_status_text(s);
    (void)http_error_type(s);
    return s;
}

static void later_free(struct later *l)
{
    ev_timer_stop(F.loop, &l->t);
    free(l);
}

static void later_gone(struct http_request *req, void *arg)
{
    (void)req;
    later_free(arg);
}

/* Ends an answer of ours: the request is freed by http after this. */
static void answered(struct http_request *req)
{
    http_request_unwatch(req);
    F.answered++;
}

static void big_fill(struct later *l)
{
    static char piece[32 * 1024];
    while (l->step < BIG_STREAM) {
        memset(piece, 'a' + (int)(l->step / sizeof piece) % 26, sizeof piece);
        l->step += sizeof piece;
        if (!http_stream_write(l->req, piece, sizeof piece))
            return;               /* on_drain resumes */
    }
    answered(l->req);
    http_stream_end(l->req);
    later_free(l);
}

static void big_drain(struct http_request *req, void *arg)
{
    (void)req;
    big_fill(arg);
}

static void later_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct later *l = w->data;
    struct http_request *req = l->req;
    if (l->mode == M_WHOLE_LATER) {
        answered(req);
        http_respond(req, 200, "text/plain", NULL, req->body, req->body_len);
        later_free(l);
        return;
    }
    if (l->step < 3) {            /* M_STREAM_LATER: three pieces, one per turn */
        size_t third = req->body_len / 3, off = l->step * third;
        size_t n = l->step == 2 ? req->body_len - off : third;
        (void)http_stream_write(req, n ? req->body + off : "x", n ? n : 1);
        l->step++;
        ev_timer_start(F.loop, &l->t);
        return;
    }
    answered(req);
    http_stream_end(req);
    later_free(l);
}

static void start_later(struct http_request *req, int mode)
{
    struct later *l = calloc(1, sizeof *l);
    CHECK(l);
    l->req = req;
    l->mode = mode;
    ev_timer_init(&l->t, later_cb, 0., 0.);
    l->t.data = l;
    http_request_watch(req, later_gone, mode == M_BIG ? big_drain : NULL, l);
    if (mode == M_BIG) {
        http_stream_begin(req, 200, "application/octet-stream", NULL);
        big_fill(l);
        return;
    }
    if (mode == M_STREAM_LATER)
        http_stream_begin(req, 200, "text/event-stream", "Cache-Control: no-cache\r\n");
    ev_timer_start(F.loop, &l->t);
}

static void stream_now(struct http_request *req, bool abort_it)
{
    http_stream_begin(req, pick_status(req), "text/plain", "X-Fuzz: stream\r\n");
    size_t half = req->body_len / 2;
    (void)http_stream_write(req, req->body, half);
    (void)http_stream_write(req, req->body ? req->body + half : NULL, req->body_len - half);
    (void)http_stream_write(req, "", 0);
    (void)http_stream_buffered(req);
    answered(req);
    if (abort_it) {
        F.aborted = true;
        http_stream_abort(req);
    } else {
        http_stream_end(req);
    }
}

static void note_method(const struct http_request *req)
{
    if (F.nreqs < MAX_METHODS)
        F.is_head[F.nreqs] = strcmp(req->method, "HEAD") == 0;
    F.nreqs++;
}

static void raw_handle(struct http_request *req, void *arg)
{
    (void)arg;
    note_method(req);
    check_request(req);
    exercise_accessors(req);
    size_t plen = strlen(req->path);
    int mode = (plen ? (unsigned char)req->path[plen - 1] : 0) % M_COUNT;
    switch (mode) {
    case M_WHOLE:
        answered(req);
        http_respond(req, 200, "text/plain", "X-Fuzz: 1\r\n", req->body, req->body_len);
        break;
    case M_ERROR:
        answered(req);
        /* header values may hold any byte but CR, LF and NUL: the JSON must stay valid */
        http_respond_error(req, pick_status(req), NULL, "fuzz: %s %s %s", req->method, req->target,
                           req->nheaders ? req->headers[0].value : "");
        break;
    case M_STREAM:
        stream_now(req, false);
        break;
    case M_ABORT:
        stream_now(req, true);
        break;
    case M_NO_BODY:
        answered(req);
        http_respond(req, req->body_len & 1 ? 304 : 204, NULL, NULL, req->body, req->body_len);
        break;
    case M_ERROR_HEADERS:
        answered(req);
        http_respond_error_headers(req, 503, "unavailable_error", "Retry-After: 1\r\n",
                                   "busy: %s", req->path);
        break;
    default:                      /* M_STREAM_LATER, M_WHOLE_LATER, M_BIG */
        start_later(req, mode);
        break;
    }
}

static void api_wrap(struct http_request *req, void *arg)
{
    note_method(req);
    api_handle(req, arg);
}

/* ------------------------------------------------------ pool and servers */

/* The children's binary: /bin/true exits at once, so a start that slips
 * past the budget costs a fork, not a stack (FUZZ_HTTP_LLAMA_SERVER
 * overrides it; a path that does not exist makes starts fail in the spawn). */
static const char *llama_server(void)
{
    const char *v = getenv("FUZZ_HTTP_LLAMA_SERVER");
    return v && *v ? v : "/bin/true";
}

static char *conf_fill(const char *fmt)
{
    char *s = NULL;
    CHECK(asprintf(&s, fmt, llama_server(), F.dir, F.dir, F.dir, F.dir) > 0);
    return s;
}

static struct config *load_conf(const char *text)
{
    struct config_errors errs = { 0 };
    struct config *cfg = config_load_string(F.conf_name, text, &errs);
    if (!cfg && text != conf_bad) {
        for (size_t i = 0; i < errs.n; i++)
            fprintf(stderr, "fuzz_http: %s\n", errs.msgs[i]);
        CHECK(!"the fuzz target's own config is refused");
    }
    config_errors_free(&errs);
    return cfg;
}

/* /pool/reload: B, back to A, or a config with errors, in turn. */
static int fuzz_reload(struct api *api, json_t **result)
{
    static const char *const picks[] = { "B", "A", "bad" };
    size_t pick = F.reload_pick++ % 3;
    struct config *cfg = load_conf(pick == 2 ? conf_bad : F.conf_text[pick]);
    if (!cfg) {
        *result = json_pack("{s:{s:s,s:s,s:i}}", "error", "message", "reload refused",
                            "type", "invalid_request_error", "code", 400);
        return -1;
    }
    json_t *summary = json_object();
    pool_reload(api->pool, cfg, summary);
    router_reload(api->router);
    json_object_set_new(summary, "fuzz_config", json_string(picks[pick]));
    *result = summary;
    F.reloaded = true;
    return 0;
}

static void guard_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
}

static struct http_server *listen_on(const char *addr, http_handler_fn fn, void *arg, bool api)
{
    struct http_limits lim = {
        .max_header = 8 * 1024,
        .max_body = 32 * 1024,
        .header_timeout_ms = 10,
        .body_timeout_ms = 10,
        .keepalive_timeout_ms = 10,
        .max_connections = 8,
    };
    char err[256];
    struct http_server *s = http_server_listen(F.loop, addr, &lim, fn, arg, err, sizeof err);
    if (!s)
        fprintf(stderr, "fuzz_http: listen %s: %s\n", addr, err);
    CHECK(s);
    if (api)
        http_server_set_admit(s, api_admit);   /* keys before bodies, as main.c does */
    return s;
}

static void make_model_file(void)
{
    char path[160];
    snprintf(path, sizeof path, "%s/m.gguf", F.dir);
    FILE *f = fopen(path, "wb");
    CHECK(f);
    CHECK(fwrite("GGUF\3\0\0\0", 1, 8, f) == 8);
    CHECK(fclose(f) == 0);
}

static void remove_dir(void)
{
    static const char *const files[] = { "raw.sock", "api.sock", "m.gguf" };
    char path[160];
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(path, sizeof path, "%s/%s", F.dir, files[i]);
        (void)unlink(path);
    }
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", F.dir);
    if (system(cmd) != 0)
        fprintf(stderr, "fuzz_http: could not remove %s\n", F.dir);
}

static void setup_pool(void)
{
    F.conf_text[0] = conf_fill(conf_a);
    F.conf_text[1] = conf_fill(conf_b);
    struct config *cfg = load_conf(F.conf_text[0]);
    F.pool = pool_new(F.loop, cfg);
    CHECK(F.pool);
    F.router = router_new(F.loop, F.pool);
    CHECK(F.router);
    F.api = (struct api){ .pool = F.pool, .router = F.router, .reload = fuzz_reload };
    pool_preload(F.pool);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    F.verbose = getenv("FUZZ_HTTP_VERBOSE") && strcmp(getenv("FUZZ_HTTP_VERBOSE"), "0") != 0;
    log_init(F.verbose ? LOG_DEBUG : (enum log_level)(LOG_ERROR + 1));
    F.check_json = !getenv("FUZZ_HTTP_JSON") || strcmp(getenv("FUZZ_HTTP_JSON"), "0") != 0;
    CHECK(curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK);
    const char *tmp = getenv("FUZZ_TMPDIR");
    int n = snprintf(F.dir, sizeof F.dir, "%s/llama-pool-fuzz-http.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    CHECK(n > 0 && (size_t)n < sizeof F.dir);   /* UNIX socket paths must stay short */
    CHECK(mkdtemp(F.dir));
    atexit(remove_dir);
    snprintf(F.conf_name, sizeof F.conf_name, "%s/pool.conf", F.dir);
    make_model_file();
    F.loop = ev_default_loop(EVFLAG_AUTO);   /* the pool's ev_child needs the default loop */
    CHECK(F.loop);
    ev_timer_init(&F.guard, guard_cb, WAIT_S / 3, 0.);
    setup_pool();

    snprintf(F.unix_path[0], sizeof F.unix_path[0], "%s/raw.sock", F.dir);
    snprintf(F.unix_path[1], sizeof F.unix_path[1], "%s/api.sock", F.dir);
    F.srv[SRV_RAW_UNIX] = listen_on(F.unix_path[0], raw_handle, NULL, false);
    F.srv[SRV_RAW_TCP] = listen_on("127.0.0.1:0", raw_handle, NULL, false);
    F.srv[SRV_API_UNIX] = listen_on(F.unix_path[1], api_wrap, &F.api, true);
    F.srv[SRV_API_TCP] = listen_on("127.0.0.1:0", api_wrap, &F.api, true);
    F.port[0] = http_server_port(F.srv[SRV_RAW_TCP]);
    F.port[1] = http_server_port(F.srv[SRV_API_TCP]);
    CHECK(F.port[0] && F.port[1]);
    return 0;
}

/* ----------------------------------------------------------------- client */

struct client {
    int fd;
    int which;
    bool eof;                     /* the server closed (or reset) its side */
    char *resp;
    size_t len;
    bool truncated;               /* more than RESP_CAP came back */
};

static int client_connect(int which)
{
    int fd;
    if (which == SRV_RAW_UNIX || which == SRV_API_UNIX) {
        struct sockaddr_un sun = { .sun_family = AF_UNIX };
        snprintf(sun.sun_path, sizeof sun.sun_path, "%s", F.unix_path[which == SRV_API_UNIX]);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(fd >= 0);
        CHECK(connect(fd, (struct sockaddr *)&sun, sizeof sun) == 0);
    } else {
        struct sockaddr_in in = { .sin_family = AF_INET };
        in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        in.sin_port = htons((uint16_t)F.port[which == SRV_API_TCP]);
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(fd >= 0);
        CHECK(connect(fd, (struct sockaddr *)&in, sizeof in) == 0);
        /* Close with a reset: no TIME_WAIT per input. */
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        CHECK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
    }
    CHECK(fcntl(fd, F_SETFL, O_NONBLOCK) == 0);
    return fd;
}

/* Reads what the server sent; returns the number of bytes. */
static size_t client_read(struct client *cl)
{
    char buf[64 * 1024];
    size_t got = 0;
    while (!cl->eof) {
        ssize_t n = recv(cl->fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0) {
            cl->eof = true;       /* EOF, or a reset after the server's close */
            break;
        }
        got += (size_t)n;
        if (cl->len + (size_t)n > RESP_CAP) {
            cl->truncated = true;
            continue;
        }
        char *r = realloc(cl->resp, cl->len + (size_t)n);
        CHECK(r);
        cl->resp = r;
        memcpy(cl->resp + cl->len, buf, (size_t)n);
        cl->len += (size_t)n;
    }
    return got;
}

/* One loop turn without blocking, then read. Returns the bytes read. */
static size_t pump(struct client *cl)
{
    ev_run(F.loop, EVRUN_NOWAIT);
    return client_read(cl);
}

/* Runs until nothing has moved for QUIET_PUMPS turns. */
static void settle(struct client *cl)
{
    for (int quiet = 0, i = 0; quiet < QUIET_PUMPS && i < MAX_PUMPS; i++)
        quiet = pump(cl) ? 0 : quiet + 1;
}

static void client_write(struct client *cl, const uint8_t *data, size_t n)
{
    if (n == 0)
        return;
    for (int i = 0; n > 0 && !cl->eof && i < MAX_PUMPS; i++) {
        ssize_t w = send(cl->fd, data, n, MSG_NOSIGNAL);
        if (w > 0) {
            data += w;
            n -= (size_t)w;
        } else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            return;               /* the server closed: the rest is not wanted */
        }
        (void)pump(cl);
    }
    settle(cl);
}

/* Blocking loop turns until the server closes or SECONDS pass. */
static void wait_for(struct client *cl, double seconds, bool until_closed)
{
    double end = ev_time() + seconds;
    while (ev_time() < end) {
        if (until_closed ? http_server_connections(F.srv[cl->which]) == 0 : cl->eof)
            return;
        ev_timer_start(F.loop, &F.guard);
        ev_run(F.loop, EVRUN_ONCE);
        ev_timer_stop(F.loop, &F.guard);
        (void)client_read(cl);
    }
}

static void client_close(struct client *cl)
{
    struct http_server *srv = F.srv[cl->which];
    CHECK(close(cl->fd) == 0);
    cl->fd = -1;
    for (int i = 0; i < MAX_PUMPS && http_server_connections(srv) > 0; i++)
        ev_run(F.loop, EVRUN_NOWAIT);
    if (http_server_connections(srv) > 0)
        wait_for(cl, CLOSE_BOUND_S, true);
    if (http_server_connections(srv) > 0)
        fprintf(stderr, "fuzz_http: the server kept a connection %.0f s after the client closed it\n",
                CLOSE_BOUND_S);
    CHECK(http_server_connections(srv) == 0);
}

/* ------------------------------------------------------- response check */

struct resp_check {
    size_t next;                  /* index into F.is_head for the next final answer */
    size_t finals;                /* final (non-1xx) answers whose head arrived */
    bool json;                    /* Content-Type is application/json */
    bool in_ctype;
    char *body;
    size_t body_len;
};

static int rc_header_field(llhttp_t *p, const char *at, size_t n)
{
    struct resp_check *rc = p->data;
    rc->in_ctype = n == 12 && strncasecmp(at, "Content-Type", 12) == 0;
    return 0;
}

static int rc_header_value(llhttp_t *p, const char *at, size_t n)
{
    struct resp_check *rc = p->data;
    if (rc->in_ctype)
        rc->json = n >= 16 && strncasecmp(at, "application/json", 16) == 0;
    return 0;
}

/* 1 tells llhttp that this answer has no body (a HEAD's). */
static int rc_headers_complete(llhttp_t *p)
{
    struct resp_check *rc = p->data;
    if (p->status_code < 200)
        return 0;
    rc->finals++;
    size_t i = rc->next++;
    return i < F.nreqs && i < MAX_METHODS && F.is_head[i] ? 1 : 0;
}

static int rc_body(llhttp_t *p, const char *at, size_t n)
{
    struct resp_check *rc = p->data;
    if (!rc->json)
        return 0;
    char *b = realloc(rc->body, rc->body_len + n + 1);
    CHECK(b);
    rc->body = b;
    memcpy(rc->body + rc->body_len, at, n);
    rc->body_len += n;
    return 0;
}

static int rc_message_complete(llhttp_t *p)
{
    struct resp_check *rc = p->data;
    if (F.check_json && rc->json && p->status_code >= 200 && rc->body_len) {
        json_error_t err;
        json_t *j = json_loadb(rc->body, rc->body_len, 0, &err);
        if (!j)
            fprintf(stderr, "fuzz_http: invalid JSON from the server: %s: %.*s\n", err.text,
                    (int)(rc->body_len < 300 ? rc->body_len : 300), rc->body);
        CHECK(j);
        json_decref(j);
    }
    rc->json = false;
    free(rc->body);
    rc->body = NULL;
    rc->body_len = 0;
    return 0;
}

static void check_responses(const struct client *cl, bool half_closed)
{
    if (cl->truncated)
        return;
    llhttp_settings_t s;
    llhttp_settings_init(&s);
    s.on_header_field = rc_header_field;
    s.on_header_value = rc_header_value;
    s.on_headers_complete = rc_headers_complete;
    s.on_body = rc_body;
    s.on_message_complete = rc_message_complete;
    struct resp_check rc = { 0 };
    llhttp_t p;
    llhttp_init(&p, HTTP_RESPONSE, &s);
    p.data = &rc;
    llhttp_errno_t err = cl->len ? llhttp_execute(&p, cl->resp, cl->len) : HPE_OK;
    if (err == HPE_OK)
        err = llhttp_finish(&p);
    bool cut_ok = F.aborted || half_closed || !cl->eof;
    if (err != HPE_OK && !(err == HPE_INVALID_EOF_STATE && cut_ok)) {
        fprintf(stderr, "fuzz_http: bad response bytes (%s: %s) in %zu bytes:\n%.*s\n",
                llhttp_errno_name(err), llhttp_get_error_reason(&p), cl->len,
                (int)(cl->len < 2000 ? cl->len : 2000), cl->resp);
        CHECK(!"the server's output is not valid HTTP/1.1");
    }
    free(rc.body);
    if (!half_closed && (cl->which == SRV_RAW_UNIX || cl->which == SRV_RAW_TCP)) {
        if (F.answered != F.nreqs)
            fprintf(stderr, "fuzz_http: %zu requests handled, %zu answered\n", F.nreqs, F.answered);
        CHECK(F.answered == F.nreqs);
        CHECK(rc.finals >= F.nreqs);
    }
}

/* No model fits the budget: a spawn means the scheduler or an operator
 * path let one start past it. */
static void check_no_start(void)
{
    for (size_t i = 0; i < F.pool->nmodels; i++) {
        const struct pool_model *m = F.pool->models[i];
        uint64_t starts = m->stats.c ? m->stats.c->starts : 0;   /* no counters: never counted */
        if (starts)
            fprintf(stderr, "fuzz_http: model %s was started %llu times past its memory budget\n",
                    m->cfg->name, (unsigned long long)starts);
        CHECK(starts == 0);
    }
}

/* ------------------------------------------------------------------- main */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3)
        return 0;
    unsigned flags = data[0];
    size_t len = size - 3;
    const uint8_t *msg = data + 3;
    size_t cut[4] = { 0, (size_t)data[1] * len / 256, (size_t)data[2] * len / 256, len };
    if (cut[1] > cut[2]) {
        size_t t = cut[1];
        cut[1] = cut[2];
        cut[2] = t;
    }
    unsigned writes = (flags & 3) < 2 ? 1 : flags & 3;
    if (writes == 1)
        cut[1] = cut[2] = len;
    else if (writes == 2)
        cut[2] = cut[1];
    bool half_close = flags & 4;
    bool wait = (flags & 0xc8) == 0xc8;

    static unsigned long runs;
    if (F.verbose)
        fprintf(stderr, "fuzz_http: input %lu, flags %02x, %zu bytes\n", ++runs, flags, len);
    F.nreqs = F.answered = 0;
    F.aborted = false;
    struct client cl = { .which = (flags >> 4) & 3, .fd = -1 };
    cl.fd = client_connect(cl.which);
    for (int i = 0; i < 3; i++)
        client_write(&cl, msg + cut[i], cut[i + 1] - cut[i]);
    if (half_close && !cl.eof)
        (void)shutdown(cl.fd, SHUT_WR);
    settle(&cl);
    if (wait)
        wait_for(&cl, WAIT_S, false);
    client_close(&cl);
    if (F.verbose)
        fprintf(stderr, "fuzz_http: %zu bytes back:\n%.*s\n", cl.len, (int)(cl.len < 4096 ? cl.len : 4096),
                cl.resp ? cl.resp : "");
    check_responses(&cl, half_close);
    check_no_start();
    free(cl.resp);

    if (F.reloaded) {             /* the next input starts from config A again */
        F.reload_pick = 1;
        json_t *r = NULL;
        (void)fuzz_reload(&F.api, &r);
        json_decref(r);
        F.reloaded = false;
        F.reload_pick = 0;
    }
    return 0;
}
