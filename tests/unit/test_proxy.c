/* test_proxy — the reverse proxy between a real http server and a scripted
 * upstream, over real sockets.
 *
 * Three parties per scenario: the loop (http server + proxy) runs in the
 * test's thread; the upstream is a raw-socket server in a second thread,
 * scripted byte by byte, so each edge case (a reset just as a connection is
 * reused, a stream cut mid-event) is exact; the client is a raw socket in a
 * third thread. Every wait is bounded (poll, SO_RCVTIMEO, sem_timedwait);
 * the threads record the first failed check and the test thread asserts
 * after joining them (cmocka is not thread-safe; testlib.h). Upstream and
 * client synchronise through semaphores when order matters ("the first
 * event reached the client before the second was sent"). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "http.h"
#include "log.h"
#include "proxy.h"
#include "testlib.h"

#define IO_TIMEOUT_MS 2000
#define RUN_TIMEOUT_S 10.0

/* ------------------------------------------------------------ fixture */

/* What cli_ask, the one-request client, sends and expects back. */
struct ask {
    const char *path, *body;   /* POSTed; default /v1/chat/completions, {} */
    int timeout_ms;            /* default IO_TIMEOUT_MS */
    int status;
    bool cut;                  /* the answer ends with the connection, incomplete */
    const char *body_is;       /* the whole body, unless NULL */
    const char *body_has[3];
    const char *content_type;
    const char *once;          /* a header that must come exactly once */
};

struct fx {
    struct tl_loop tl;
    struct http_server *srv;
    struct proxy *proxy;
    unsigned srv_port;
    int up_lfd;                /* the scripted upstream's listener (blocking) */
    unsigned up_port;
    unsigned target_port;      /* where requests go: up_port unless a test says */
    int spare_fd[2];           /* sockets a test keeps open until teardown */
    ev_check sample_w;
    int expect_done;

    /* loop side: what the handler and DONE saw */
    int nreq, ndone;
    enum proxy_outcome outcome[8];
    int status[8];
    double first_byte[8];
    long cache_n[8];
    struct http_request *live; /* the request being proxied */
    size_t max_buffered;       /* largest client-side backlog seen */
    void (*after_done)(struct fx *);

    /* between the threads */
    sem_t to_up, to_cli;
    struct ask ask;
    char want[512];            /* a body_is made up at run time */

    /* the client's observations */
    double cli_elapsed;        /* cli_ask: from sending to the whole answer */

    /* upstream's observations */
    int accepts;
    char up_req[4][4096];
    int up_nreq;
    size_t up_sent;
    double up_elapsed;
};

static struct fx *fx_of(void **state) { return *state; }

/* ----------------------------------------------------- loop side */

static void on_done(void *arg, const struct proxy_result *res)
{
    struct fx *fx = arg;
    fx->outcome[fx->ndone & 7] = res->outcome;
    fx->status[fx->ndone & 7] = res->status;
    fx->first_byte[fx->ndone & 7] = res->first_byte;
    fx->cache_n[fx->ndone & 7] = res->cache_n;
    fx->ndone++;
    fx->live = NULL;
    if (fx->after_done)
        fx->after_done(fx);
}

static void handler(struct http_request *req, void *arg)
{
    struct fx *fx = arg;
    fx->nreq++;
    fx->live = req;
    proxy_forward(fx->proxy, req, fx->target_port, NULL, on_done, fx);
}

static bool calls_done(struct fx *fx) { return fx->ndone >= fx->expect_done; }

static void sample_cb(struct ev_loop *loop, ev_check *w, int revents)
{
    struct fx *fx = w->data;
    (void)loop;
    (void)revents;
    if (fx->live) {
        size_t b = http_stream_buffered(fx->live);
        if (b > fx->max_buffered)
            fx->max_buffered = b;
    }
}

static int listen_local(int backlog, unsigned *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in sin = { .sin_family = AF_INET };
    socklen_t sl = sizeof sin;
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(fd, backlog) < 0 ||
        getsockname(fd, (struct sockaddr *)&sin, &sl) < 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(sin.sin_port);
    return fd;
}

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof *fx);
    if (!fx)
        return -1;
    log_init(LOG_ERROR);
    if (tl_init(&fx->tl, fx) < 0)
        return -1;
    struct http_limits lim = tl_limits();
    char err[256] = "";
    fx->srv = http_server_listen(fx->tl.loop, "127.0.0.1:0", &lim, handler, fx, err, sizeof err);
    if (!fx->srv) {
        fprintf(stderr, "listen: %s\n", err);
        return -1;
    }
    fx->srv_port = http_server_port(fx->srv);
    fx->proxy = proxy_new(fx->tl.loop);
    fx->up_lfd = listen_local(16, &fx->up_port);
    if (!fx->proxy || fx->up_lfd < 0)
        return -1;
    fx->target_port = fx->up_port;
    fx->spare_fd[0] = fx->spare_fd[1] = -1;
    sem_init(&fx->to_up, 0, 0);
    sem_init(&fx->to_cli, 0, 0);
    ev_check_init(&fx->sample_w, sample_cb);
    fx->sample_w.data = fx;
    ev_check_start(fx->tl.loop, &fx->sample_w);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    http_server_free(fx->srv); /* calls still open end as CLIENT_GONE */
    proxy_free(fx->proxy);
    close(fx->up_lfd);
    for (int i = 0; i < 2; i++)
        if (fx->spare_fd[i] >= 0)
            close(fx->spare_fd[i]);
    ev_check_stop(fx->tl.loop, &fx->sample_w);
    tl_destroy(&fx->tl);
    sem_destroy(&fx->to_up);
    sem_destroy(&fx->to_cli);
    free(fx);
    return 0;
}

/* Runs the loop until both scripts have finished and DONE has been called
 * EXPECT_DONE times (bounded), then joins the threads and asserts. */
static void fx_run_for(struct fx *fx, tl_party_fn client, tl_party_fn upstream, int expect_done,
                       double seconds)
{
    fx->expect_done = expect_done;
    if (!tl_run(&fx->tl, client, upstream, calls_done, seconds))
        fail_msg("scenario did not finish within %.0f s (done %d of %d)", seconds, fx->ndone,
                 expect_done);
}

static void fx_run(struct fx *fx, tl_party_fn client, tl_party_fn upstream, int expect_done)
{
    fx_run_for(fx, client, upstream, expect_done, RUN_TIMEOUT_S);
}

/* ------------------------------------------------------ socket helpers */

/* One HTTP/1.1 chunk. */
static bool send_chunk(int fd, const char *s)
{
    char size[32];
    snprintf(size, sizeof size, "%zx\r\n", strlen(s));
    return send_str(fd, size) && send_str(fd, s) && send_str(fd, "\r\n");
}

/* Closes with a reset instead of a FIN. */
static void close_reset(int fd)
{
    struct linger lg = { 1, 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* Waits for the peer to close FD (EOF or reset) within MS. */
static bool wait_eof(int fd, int ms)
{
    double end = now_s() + ms / 1000.0;
    char buf[4096];
    for (;;) {
        int left = (int)((end - now_s()) * 1000);
        if (left <= 0)
            return false;
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        int n = poll(&pfd, 1, left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno == ECONNRESET))
            return true;
        if (r < 0 && errno != EAGAIN && errno != EINTR)
            return false;
    }
}

/* ------------------------------------------------------------ upstream */

static int up_accept(struct fx *fx, int ms)
{
    struct pollfd pfd = { .fd = fx->up_lfd, .events = POLLIN };
    int n;
    do
        n = poll(&pfd, 1, ms);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return -1;
    int fd = accept4(fx->up_lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return -1;
    set_timeouts(fd, IO_TIMEOUT_MS);
    fx->accepts++;
    return fd;
}

/* True if a connection waits to be accepted right now. */
static bool up_pending(struct fx *fx)
{
    struct pollfd pfd = { .fd = fx->up_lfd, .events = POLLIN };
    return poll(&pfd, 1, 0) > 0;
}

static size_t content_length_of(const char *head)
{
    for (const char *s = head; (s = strchr(s, '\n')) != NULL;) {
        s++;
        if (strncasecmp(s, "Content-Length:", 15) == 0)
            return (size_t)strtoul(s + 15, NULL, 10);
    }
    return 0;
}

/* Reads one request (head + Content-Length body) into fx->up_req[]. Returns
 * its index, or -1 on EOF, reset or timeout. */
static int up_read_request(struct fx *fx, int fd)
{
    if (fx->up_nreq >= 4)
        return -1;
    char *buf = fx->up_req[fx->up_nreq];
    size_t cap = sizeof fx->up_req[0] - 1, len = 0, want = 0;
    char *eoh = NULL;
    for (;;) {
        if (eoh && len >= want)
            break;
        if (len == cap)
            return -1;
        ssize_t n = recv(fd, buf + len, cap - len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        len += (size_t)n;
        buf[len] = '\0';
        if (!eoh && (eoh = strstr(buf, "\r\n\r\n")) != NULL)
            want = (size_t)(eoh + 4 - buf) + content_length_of(buf);
    }
    return fx->up_nreq++;
}

/* Accepts the first connection and reads the first request from it: the
 * connection, or -1. */
static int up_first(struct fx *fx)
{
    int fd = up_accept(fx, IO_TIMEOUT_MS);
    if (fd >= 0 && up_read_request(fx, fd) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Waits up to MS for the proxy to close FD (timed in fx->up_elapsed),
 * then closes it; whether the proxy did. */
static bool up_await_close(struct fx *fx, int fd, int ms)
{
    double t0 = now_s();
    bool eof = wait_eof(fd, ms);
    fx->up_elapsed = now_s() - t0;
    close(fd);
    return eof;
}

static const char *up_body(const char *req)
{
    const char *b = strstr(req, "\r\n\r\n");
    return b ? b + 4 : "";
}

/* ------------------------------------------------------------- client */

/* A client connection to the server under test, ready for cc_expect. */
static bool cli_open(struct fx *fx, struct cconn *cc, int timeout_ms, int rcvbuf)
{
    int fd = tl_connect(fx->srv_port, timeout_ms, rcvbuf);
    if (fd >= 0)
        cc_init(cc, fd);
    return fd >= 0;
}

static void cli_close(struct cconn *cc, struct cresp *r)
{
    cresp_free(r);
    close(cc->fd);
}

static bool post(int fd, const char *path, const char *body)
{
    char head[512];
    snprintf(head, sizeof head,
             "POST %s HTTP/1.1\r\nHost: pool\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\n\r\n",
             path, strlen(body));
    return send_str(fd, head) && send_str(fd, body);
}

/* POSTs BODY to PATH; its answer is to be read into R. */
static bool cli_post_start(struct cconn *cc, struct cresp *r, const char *path, const char *body)
{
    cc_expect(cc, r, false);
    return post(cc->fd, path, body);
}

/* POSTs BODY to PATH and reads the answer into R: whole, or as much as
 * came before the server closed. */
static bool cli_post(struct cconn *cc, struct cresp *r, const char *path, const char *body)
{
    return cli_post_start(cc, r, path, body) && cc_read_response(cc);
}

/* R is complete, with STATUS and, unless NULL, exactly BODY. */
static bool answered(const struct cresp *r, int status, const char *body)
{
    return r->done && r->status == status && (!body || (r->body && strcmp(r->body, body) == 0));
}

/* One request, its answer checked against fx->ask; the upstream learns
 * through to_up that the client has it. */
static void cli_ask(struct fx *fx)
{
    const struct ask *a = &fx->ask;
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, a->timeout_ms ? a->timeout_ms : IO_TIMEOUT_MS, 0));
    double t0 = now_s();
    bool ok = cli_post(&cc, &r, a->path ? a->path : "/v1/chat/completions", a->body ? a->body : "{}");
    fx->cli_elapsed = now_s() - t0;
    sem_post(&fx->to_up);
    CHECK(ok);
    CHECK(a->cut ? cc.eof && !r.done : r.done);
    CHECK(r.status == a->status);
    CHECK(!a->body_is || (r.body && strcmp(r.body, a->body_is) == 0));
    for (int i = 0; i < 3 && a->body_has[i]; i++)
        CHECK(body_has(&r, a->body_has[i]));
    CHECK(!a->content_type || header_is(&r, "Content-Type", a->content_type));
    CHECK(!a->once || header_count(&r, a->once) == 1);
    cli_close(&cc, &r);
}

/* The event the proxy ends a cut stream with, after BEFORE, in fx->want. */
static const char *sse_error_after(struct fx *fx, const char *before)
{
    snprintf(fx->want, sizeof fx->want,
             "%sdata: {\"error\":{\"code\":502,\"message\":\"upstream %u closed the "
             "connection mid-response\",\"type\":\"server_error\"}}\n\n",
             before, fx->up_port);
    return fx->want;
}

/* Headers of a JSON answer with a Content-Length. */
static bool up_send_json(int fd, int status, const char *body)
{
    char head[512];
    snprintf(head, sizeof head,
             "HTTP/1.1 %d X\r\nServer: llama.cpp\r\nContent-Type: application/json; charset=utf-8\r\n"
             "Content-Length: %zu\r\nKeep-Alive: timeout=5, max=100\r\n\r\n",
             status, strlen(body));
    return send_str(fd, head) && send_str(fd, body);
}

static const char SSE_HEAD[] =
    "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
    "Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    "Keep-Alive: timeout=5, max=100\r\n\r\n";

/* ============================================================= tests */

/* ---- a plain JSON answer: status, headers, byte-identical body ---- */

static const char JSON_BODY[] =
    "{\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\" tok0 \\\"q\\\" \\u00e9\"}}],\"created\":0,\"model\":\"tiny\","
    "\"timings\":{\"cache_n\":17,\"prompt_n\":3}}";

static void up_json(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    char head[512];
    snprintf(head, sizeof head,
             "HTTP/1.1 201 Created\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
             "Content-Type: application/json; charset=utf-8\r\nX-Custom: a  b\r\n"
             "Content-Length: %zu\r\nKeep-Alive: timeout=5, max=100\r\n\r\n",
             sizeof JSON_BODY - 1);
    CHECK(send_str(fd, head));
    CHECK(send_str(fd, JSON_BODY));
    CHECK(wait_sem(&fx->to_up, 2)); /* the client has it */
    close(fd);
}

static void cli_json(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    CHECK(cli_post(&cc, &r, "/v1/chat/completions", "{\"messages\":[]}"));
    sem_post(&fx->to_up);
    CHECK(r.done);
    CHECK(r.status == 201);
    CHECK(r.body_len == sizeof JSON_BODY - 1 && memcmp(r.body, JSON_BODY, r.body_len) == 0);
    CHECK(header_is(&r, "Content-Type", "application/json; charset=utf-8"));
    CHECK(header_is(&r, "X-Custom", "a  b"));
    /* llama-server's own CORS answer is dropped: cors_origins decides. */
    CHECK(header_count(&r, "Access-Control-Allow-Origin") == 0);
    CHECK(header_count(&r, "Server") == 1 && header_is(&r, "Server", "llama-pool"));
    CHECK(header_count(&r, "Content-Length") == 1 && atoi(cresp_header(&r, "Content-Length")) ==
                                                         (int)sizeof JSON_BODY - 1);
    CHECK(header_count(&r, "Keep-Alive") == 0);
    cli_close(&cc, &r);
}


static void test_json_answer_relayed_byte_identical(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_json, up_json, 1);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    assert_int_equal(fx->status[0], 201);      /* up_json answers 201 Created */
    assert_true(fx->first_byte[0] >= 0 && fx->first_byte[0] < 10);
    assert_int_equal(fx->cache_n[0], 17);      /* its timings, read as it passed */
    assert_int_equal(fx->accepts, 1);
    assert_true(strncmp(fx->up_req[0], "POST /v1/chat/completions HTTP/1.1\r\n", 36) == 0);
    assert_string_equal(up_body(fx->up_req[0]), "{\"messages\":[]}");
}

/* ---- bodies too big to answer whole, and chunked ones: streamed intact ---- */

#define BIG_LEN 300000

static void up_big_and_chunked(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    char *big = malloc(BIG_LEN);
    CHECK(big);
    for (size_t i = 0; i < BIG_LEN; i++)
        big[i] = pattern_byte(i);
    char head[256];
    snprintf(head, sizeof head,
             "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n",
             BIG_LEN);
    bool ok = send_str(fd, head) && send_all(fd, big, BIG_LEN);
    free(big);
    CHECK(ok);
    CHECK(up_read_request(fx, fd) == 1); /* same connection */
    CHECK(send_str(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n"));
    CHECK(send_chunk(fd, "[1,") && send_chunk(fd, "2,") && send_chunk(fd, "3]"));
    CHECK(send_str(fd, "0\r\n\r\n"));
    CHECK(wait_sem(&fx->to_up, 2));
    close(fd);
}

static void cli_big_and_chunked(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    CHECK(cli_post_start(&cc, &r, "/completion", "{}"));
    r.counting = true; /* before any byte of the body is read */
    CHECK(cc_read_response(&cc));
    CHECK(r.done && r.status == 200);
    CHECK(r.body_len == BIG_LEN && r.pattern_errors == 0);
    CHECK(cli_post(&cc, &r, "/completion", "{}"));
    sem_post(&fx->to_up);
    CHECK(answered(&r, 200, "[1,2,3]"));
    CHECK(header_is(&r, "Content-Type", "application/json"));
    cli_close(&cc, &r);
}

static void test_large_and_chunked_bodies_relayed_intact(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_big_and_chunked, up_big_and_chunked, 2);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    assert_int_equal(fx->outcome[1], PROXY_OK);
    assert_int_equal(fx->accepts, 1);
}

/* ---- SSE: each event reaches the client before the next is sent ---- */

static const char *const EVENTS[3] = {
    "data: {\"i\":0,\"delta\":{\"role\":\"assistant\"}}\n\n",
    "data: {\"i\":1,\"delta\":{\"content\":\" tok0\"},\"timings\":{\"cache_n\":5,\"prompt_n\":2}}\n\n",
    "data: [DONE]\n\n",
};

static void up_sse_lockstep(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, SSE_HEAD));
    for (int i = 0; i < 3; i++) {
        CHECK(send_chunk(fd, EVENTS[i]));
        CHECK(wait_sem(&fx->to_up, 2)); /* the client got event i: only then the next */
    }
    CHECK(send_str(fd, "0\r\n\r\n"));
    CHECK(wait_sem(&fx->to_up, 2));
    close(fd);
}

static void cli_sse_lockstep(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    CHECK(cli_post_start(&cc, &r, "/v1/chat/completions", "{\"stream\":true}"));
    for (int i = 0; i < 3; i++) {
        CHECK(cc_read_until(&cc, body_has, EVENTS[i]));
        CHECK(body_has(&r, EVENTS[i]));
        CHECK(!r.done);
        sem_post(&fx->to_up);
    }
    CHECK(cc_read_response(&cc));
    sem_post(&fx->to_up);
    char all[512];
    snprintf(all, sizeof all, "%s%s%s", EVENTS[0], EVENTS[1], EVENTS[2]);
    CHECK(answered(&r, 200, all));
    CHECK(header_is(&r, "Content-Type", "text/event-stream"));
    CHECK(header_count(&r, "X-Accel-Buffering") == 1 && header_is(&r, "X-Accel-Buffering", "no"));
    CHECK(header_is(&r, "Transfer-Encoding", "chunked"));
    cli_close(&cc, &r);
}

static void test_sse_relayed_event_by_event(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_sse_lockstep, up_sse_lockstep, 1);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    assert_int_equal(fx->cache_n[0], 5);
}

static void up_sse_with_accel(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n"
                       "X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"));
    CHECK(send_chunk(fd, EVENTS[2]) && send_str(fd, "0\r\n\r\n"));
    CHECK(wait_sem(&fx->to_up, 2));
    close(fd);
}

static void test_sse_accel_header_not_duplicated(void **state)
{
    struct fx *fx = fx_of(state);
    fx->ask = (struct ask){ .body = "{\"stream\":true}", .status = 200, .body_is = EVENTS[2],
                            .once = "X-Accel-Buffering" };
    fx_run(fx, cli_ask, up_sse_with_accel, 1);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    assert_int_equal(fx->cache_n[0], -1);      /* no timings in it */
}

/* ---- keep-alive: two requests (two clients) share one upstream connection ---- */

static void up_two_on_one(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(up_send_json(fd, 200, "{\"n\":0}"));
    CHECK(up_read_request(fx, fd) == 1); /* times out if the proxy opened another */
    CHECK(up_send_json(fd, 200, "{\"n\":1}"));
    CHECK(wait_sem(&fx->to_up, 2));
    CHECK(!up_pending(fx));
    close(fd);
}

static void cli_two_clients(struct fx *fx)
{
    for (int i = 0; i < 2; i++) {
        struct cconn cc;
        struct cresp r = { 0 };
        char want[16];
        CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
        CHECK(cli_post(&cc, &r, "/v1/completions", "{}"));
        snprintf(want, sizeof want, "{\"n\":%d}", i);
        CHECK(answered(&r, 200, want));
        cli_close(&cc, &r);
    }
    sem_post(&fx->to_up);
}

static void test_keepalive_connection_reused(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_two_clients, up_two_on_one, 2);
    assert_int_equal(fx->ndone, 2);
    assert_int_equal(fx->outcome[1], PROXY_OK);
    assert_int_equal(fx->accepts, 1);
}

/* ---- a reused connection the server closes as we send: one transparent retry ---- */

static bool stale_reset;

static void up_stale(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(up_send_json(fd, 200, "{\"n\":0}"));
    CHECK(up_read_request(fx, fd) == 1); /* arrives on the kept connection ... */
    if (stale_reset)
        close_reset(fd);                 /* ... which dies unanswered */
    else
        close(fd);
    fd = up_accept(fx, IO_TIMEOUT_MS);
    CHECK(fd >= 0);
    CHECK(up_read_request(fx, fd) == 2);
    CHECK(strcmp(fx->up_req[1], fx->up_req[2]) == 0); /* the same request again */
    CHECK(up_send_json(fd, 200, "{\"n\":1}"));
    CHECK(wait_sem(&fx->to_up, 2));
    close(fd);
}

static void cli_two_requests(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    for (int i = 0; i < 2; i++) {
        char body[32], want[32];
        snprintf(body, sizeof body, "{\"a\":%d}", i);
        snprintf(want, sizeof want, "{\"n\":%d}", i);
        CHECK(cli_post(&cc, &r, "/v1/chat/completions", body));
        CHECK(answered(&r, 200, want));
    }
    sem_post(&fx->to_up);
    cli_close(&cc, &r);
}

static void test_stale_reused_connection_closed_is_retried(void **state)
{
    struct fx *fx = fx_of(state);
    stale_reset = false;
    fx_run(fx, cli_two_requests, up_stale, 2);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    assert_int_equal(fx->outcome[1], PROXY_OK);
    assert_int_equal(fx->accepts, 2);
}

static void test_stale_reused_connection_reset_is_retried(void **state)
{
    struct fx *fx = fx_of(state);
    stale_reset = true;
    fx_run(fx, cli_two_requests, up_stale, 2);
    assert_int_equal(fx->outcome[1], PROXY_OK);
    assert_int_equal(fx->accepts, 2);
}

/* ---- no retry once the upstream has said anything ---- */

static void up_reused_then_partial(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(up_send_json(fd, 200, "{\"n\":0}"));
    CHECK(up_read_request(fx, fd) == 1);
    CHECK(send_str(fd, "HTTP/1.1 200 OK\r\nContent-"));
    close(fd);
    CHECK(wait_sem(&fx->to_up, 2)); /* the client has its answer: a retry would be queued by now */
    CHECK(!up_pending(fx));
}

static void cli_ok_then_502(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    CHECK(cli_post(&cc, &r, "/v1/completions", "{}"));
    CHECK(r.done && r.status == 200);
    CHECK(cli_post(&cc, &r, "/v1/completions", "{}"));
    sem_post(&fx->to_up);
    CHECK(r.done && r.status == 502);
    CHECK(body_has(&r, "in the response headers"));
    cli_close(&cc, &r);
}

static void test_reused_connection_cut_after_first_byte_not_retried(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_ok_then_502, up_reused_then_partial, 2);
    assert_int_equal(fx->outcome[1], PROXY_UPSTREAM_ERROR);
    assert_int_equal(fx->accepts, 1);
}

/* ---- upstream closes before answering: 502 in OpenAI's shape, no retry ---- */

static void up_close_unanswered(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    close(fd);
    CHECK(wait_sem(&fx->to_up, 2));
    CHECK(!up_pending(fx)); /* a fresh connection is never retried */
}

static void test_upstream_closes_before_answering_gives_502(void **state)
{
    struct fx *fx = fx_of(state);
    fx->ask = (struct ask){ .status = 502, .content_type = "application/json",
                            .body_has = { "{\"error\":{\"message\":\"upstream ",
                                          " closed the connection before answering\"",
                                          "\"type\":\"server_error\",\"code\":502}}" } };
    fx_run(fx, cli_ask, up_close_unanswered, 1);
    assert_int_equal(fx->outcome[0], PROXY_UPSTREAM_ERROR);
    assert_int_equal(fx->accepts, 1);
}

/* ---- upstream dies mid-stream: an SSE error event, then a proper end ---- */

static const char PARTIAL[] = "data: {\"i\":1,\"delta\":";

static void up_sse_dies(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, SSE_HEAD));
    CHECK(send_chunk(fd, EVENTS[0]));
    CHECK(send_chunk(fd, PARTIAL));
    close(fd);
}

static void test_upstream_dies_mid_stream_sends_sse_error(void **state)
{
    struct fx *fx = fx_of(state);
    char before[256];
    snprintf(before, sizeof before, "%s%s\n\n", EVENTS[0], PARTIAL);
    /* the stream ends properly, with the error as its last event */
    fx->ask = (struct ask){ .body = "{\"stream\":true}", .status = 200,
                            .body_is = sse_error_after(fx, before) };
    fx_run(fx, cli_ask, up_sse_dies, 1);
    assert_int_equal(fx->outcome[0], PROXY_UPSTREAM_CUT);
}

static void up_sse_dies_at_once(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, SSE_HEAD));
    close(fd);
}

static void test_upstream_dies_before_first_event_sends_only_the_error(void **state)
{
    struct fx *fx = fx_of(state);
    fx->ask = (struct ask){ .body = "{\"stream\":true}", .status = 200,
                            .body_is = sse_error_after(fx, "") };
    fx_run(fx, cli_ask, up_sse_dies_at_once, 1);
    assert_int_equal(fx->outcome[0], PROXY_UPSTREAM_CUT);
}

/* ---- a non-SSE body cut mid-way stays visibly cut ---- */

static void up_json_dies(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n"));
    CHECK(send_chunk(fd, "{\"a\":"));
    close(fd);
}

static void test_upstream_dies_mid_body_cuts_client(void **state)
{
    struct fx *fx = fx_of(state);
    /* closed without the last chunk */
    fx->ask = (struct ask){ .path = "/v1/embeddings", .status = 200, .cut = true, .body_is = "{\"a\":" };
    fx_run(fx, cli_ask, up_json_dies, 1);
    assert_int_equal(fx->outcome[0], PROXY_UPSTREAM_CUT);
}

static void up_whole_dies(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       "Content-Length: 100\r\n\r\n{\"a\":"));
    close(fd);
    CHECK(wait_sem(&fx->to_up, 2));
}

static void test_small_answer_cut_before_relay_gives_502(void **state)
{
    struct fx *fx = fx_of(state);
    fx->ask = (struct ask){ .path = "/v1/embeddings", .status = 502, .body_has = { "mid-response" } };
    fx_run(fx, cli_ask, up_whole_dies, 1);
    assert_int_equal(fx->outcome[0], PROXY_UPSTREAM_ERROR);
}

/* ---- the client leaves mid-stream: upstream sees EOF at once ---- */

static void up_sse_watch_eof(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, SSE_HEAD));
    CHECK(send_chunk(fd, EVENTS[0]));
    CHECK(up_await_close(fx, fd, 1000));
}

static void cli_leave_mid_stream(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    CHECK(cli_post_start(&cc, &r, "/v1/chat/completions", "{\"stream\":true}"));
    CHECK(cc_read_until(&cc, body_has, EVENTS[0]));
    CHECK(body_has(&r, EVENTS[0]));
    close(cc.fd);
    cresp_free(&r);
}

static void test_client_disconnect_closes_upstream(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_leave_mid_stream, up_sse_watch_eof, 1);
    assert_int_equal(fx->outcome[0], PROXY_CLIENT_GONE);
    assert_true(fx->up_elapsed < 0.5);
}

/* ---- back-pressure: a client that does not read stops upstream reads ---- */

#define BP_TOTAL (96u << 20) /* above any kernel buffering (tcp_rmem max 32 MiB + tcp_wmem max) */
#define BP_CHUNK 65536

static void up_flood(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    int sndbuf = 64 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    char head[256], *buf = malloc(BP_CHUNK);
    CHECK(buf);
    snprintf(head, sizeof head,
             "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %u\r\n\r\n",
             BP_TOTAL);
    if (!send_str(fd, head)) {
        free(buf);
        CHECK(!"send head");
    }
    size_t sent = 0;
    bool stalled = false;
    while (sent < BP_TOTAL) {
        size_t n = BP_TOTAL - sent < BP_CHUNK ? BP_TOTAL - sent : BP_CHUNK;
        for (size_t i = 0; i < n; i++)
            buf[i] = pattern_byte(sent + i);
        size_t off = 0;
        while (off < n) {
            ssize_t w = send(fd, buf + off, n - off, MSG_NOSIGNAL | (stalled ? 0 : MSG_DONTWAIT));
            if (w > 0) {
                off += (size_t)w;
                continue;
            }
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !stalled) {
                struct pollfd pfd = { .fd = fd, .events = POLLOUT };
                if (poll(&pfd, 1, 500) == 0) { /* nobody reads: the proxy paused */
                    stalled = true;
                    fx->up_sent = sent + off;
                    sem_post(&fx->to_cli);
                }
                continue;
            }
            free(buf);
            CHECK(!"send failed");
        }
        sent += n;
    }
    free(buf);
    CHECK(stalled);
    CHECK(wait_sem(&fx->to_up, 10));
    close(fd);
}

static void cli_slow_reader(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, 5000, 16 * 1024));
    CHECK(cli_post_start(&cc, &r, "/completion", "{}"));
    r.counting = true; /* before any byte of the body is read */
    CHECK(cc_read_until(&cc, got_status, NULL));
    CHECK(r.status == 200);
    bool stalled = wait_sem(&fx->to_cli, 10); /* not reading until the upstream is stuck */
    CHECK(cc_read_response(&cc));
    sem_post(&fx->to_up);
    close(cc.fd);
    CHECK(stalled);
    CHECK(r.done && r.body_len == BP_TOTAL && r.pattern_errors == 0);
}

static void test_backpressure_pauses_upstream_reads(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run_for(fx, cli_slow_reader, up_flood, 1, 30);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    /* the upstream got stuck long before the end: the proxy stopped reading */
    assert_true(fx->up_sent < BP_TOTAL / 2);
    /* the proxy's own buffer: high-water mark + one read + chunk framing */
    assert_true(fx->max_buffered <= 256 * 1024 + 64 * 1024 + 64);
}

/* ---- hop-by-hop headers dropped both ways, Host rewritten, XFF appended ---- */

static void up_check_headers(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Resp-Hop\r\nX-Resp-Hop: 1\r\n"
                       "Keep-Alive: timeout=5\r\nServer: llama.cpp\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
                       "Trailer: X-T\r\nUpgrade: foo\r\nProxy-Authenticate: Basic\r\n"
                       "Bad Name: y\r\nX-Kept: yes\r\nContent-Type: text/plain\r\n"
                       "Content-Length: 2\r\n\r\nok"));
    CHECK(wait_sem(&fx->to_up, 2));
    close(fd);
}

static void cli_hop_headers(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    cc_expect(&cc, &r, false);
    CHECK(send_str(cc.fd, "POST /v1/x?y=1 HTTP/1.1\r\nHost: example.com\r\n"
                       "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
                       "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
                       "TE: trailers\r\nUpgrade: h2c\r\nBad Name: x\r\n"
                       "Authorization: Bearer k\r\nX-Forwarded-For: 10.0.0.1\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n"
                       "3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"));
    CHECK(cc_read_response(&cc));
    sem_post(&fx->to_up);
    CHECK(answered(&r, 200, "ok"));
    CHECK(header_count(&r, "X-Resp-Hop") == 0);
    CHECK(header_count(&r, "Keep-Alive") == 0);
    CHECK(header_count(&r, "Trailer") == 0);
    CHECK(header_count(&r, "Upgrade") == 0);
    CHECK(header_count(&r, "Proxy-Authenticate") == 0);
    CHECK(header_count(&r, "Bad Name") == 0);
    CHECK(header_count(&r, "Server") == 1 && header_is(&r, "Server", "llama-pool"));
    CHECK(header_count(&r, "Date") == 1 && !strstr(cresp_header(&r, "Date"), "1970"));
    CHECK(header_count(&r, "Connection") == 1 && header_is(&r, "Connection", "keep-alive"));
    CHECK(header_count(&r, "Content-Type") == 1 && header_is(&r, "Content-Type", "text/plain"));
    CHECK(header_is(&r, "X-Kept", "yes"));
    cli_close(&cc, &r);
}

static bool has_line(const char *head, const char *line)
{
    char want[256];
    snprintf(want, sizeof want, "\r\n%s\r\n", line);
    return strstr(head, want) != NULL;
}

static bool has_name(const char *head, const char *name)
{
    char want[128];
    snprintf(want, sizeof want, "\r\n%s:", name);
    return strcasestr(head, want) != NULL;
}

static void test_hop_by_hop_dropped_and_host_rewritten(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_hop_headers, up_check_headers, 1);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    const char *h = fx->up_req[0];
    char host[64];
    snprintf(host, sizeof host, "Host: 127.0.0.1:%u", fx->up_port);
    assert_true(strncmp(h, "POST /v1/x?y=1 HTTP/1.1\r\n", 25) == 0);
    assert_true(has_line(h, host));
    assert_null(strstr(h, "example.com"));
    assert_false(has_name(h, "Connection"));
    assert_false(has_name(h, "X-Hop"));
    assert_false(has_name(h, "Keep-Alive"));
    assert_false(has_name(h, "Proxy-Connection"));
    assert_false(has_name(h, "Proxy-Authorization"));
    assert_false(has_name(h, "TE"));
    assert_false(has_name(h, "Upgrade"));
    assert_false(has_name(h, "Transfer-Encoding"));
    assert_null(strstr(h, "Bad Name"));
    assert_true(has_line(h, "Authorization: Bearer k"));
    assert_true(has_line(h, "X-Forwarded-For: 10.0.0.1, 127.0.0.1"));
    assert_true(has_line(h, "Content-Length: 5"));
    assert_string_equal(up_body(h), "hello");
}

/* ---- HEAD: no body expected, the connection stays usable ---- */

static void up_head_then_get(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(strncmp(fx->up_req[0], "HEAD /health HTTP/1.1\r\n", 23) == 0);
    CHECK(send_str(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"));
    CHECK(up_read_request(fx, fd) == 1);
    CHECK(up_send_json(fd, 200, "{\"status\":\"ok\"}"));
    CHECK(wait_sem(&fx->to_up, 2));
    close(fd);
}

static void cli_head_then_get(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    cc_expect(&cc, &r, true);
    CHECK(send_str(cc.fd, "HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"));
    CHECK(cc_read_response(&cc));
    CHECK(r.done && r.status == 200 && r.body_len == 0);
    cc_expect(&cc, &r, false);
    CHECK(send_str(cc.fd, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
    CHECK(cc_read_response(&cc));
    sem_post(&fx->to_up);
    CHECK(answered(&r, 200, "{\"status\":\"ok\"}"));
    cli_close(&cc, &r);
}

static void test_head_answer_has_no_body(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_head_then_get, up_head_then_get, 2);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    assert_int_equal(fx->outcome[1], PROXY_OK);
    assert_int_equal(fx->accepts, 1);
}

/* ---- nobody listening: 502 at once ---- */

static void test_connect_refused_gives_502(void **state)
{
    struct fx *fx = fx_of(state);
    unsigned port;
    int lfd = listen_local(1, &port);
    assert_true(lfd >= 0);
    close(lfd); /* a port nobody listens on */
    fx->target_port = port;
    fx->ask = (struct ask){ .status = 502,
                            .body_has = { "connect to upstream port", "refused", "\"code\":502" } };
    fx_run(fx, cli_ask, NULL, 1);
    assert_int_equal(fx->outcome[0], PROXY_UPSTREAM_ERROR);
    assert_int_equal(fx->status[0], 0);       /* no status line ever came */
    assert_true(fx->first_byte[0] == -1);
}

/* ---- a listener that never completes the handshake: 502 after 5 s ---- */

static void test_connect_timeout_gives_502(void **state)
{
    struct fx *fx = fx_of(state);
    unsigned port;
    /* backlog 0 holds one connection; SYNs past it are dropped */
    fx->spare_fd[0] = listen_local(0, &port);
    assert_true(fx->spare_fd[0] >= 0);
    fx->spare_fd[1] = tl_connect(port, IO_TIMEOUT_MS, 0);
    assert_true(fx->spare_fd[1] >= 0);
    fx->target_port = port;
    fx->ask = (struct ask){ .timeout_ms = 8000, .status = 502, .body_has = { "timed out" } };
    fx_run_for(fx, cli_ask, NULL, 1, 15);
    assert_int_equal(fx->outcome[0], PROXY_UPSTREAM_ERROR);
    assert_true(fx->cli_elapsed > 4.5 && fx->cli_elapsed < 6.5);
}

/* ---- idle pooled connections close before llama-server's 5 s ---- */

static void up_watch_idle(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(up_send_json(fd, 200, "{}"));
    CHECK(up_await_close(fx, fd, 6000));
}

static void test_idle_connection_closed_before_server_timeout(void **state)
{
    struct fx *fx = fx_of(state);
    fx->ask = (struct ask){ .status = 200 };
    fx_run(fx, cli_ask, up_watch_idle, 1);
    assert_int_equal(fx->outcome[0], PROXY_OK);
    assert_true(fx->up_elapsed > 3.5 && fx->up_elapsed < 4.9);
}

/* ---- an idle connection the server closes is dropped at once, unused ---- */

static void up_half_close_idle(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(up_send_json(fd, 200, "{\"n\":0}"));
    shutdown(fd, SHUT_WR); /* the server's keep-alive limit, seen from the proxy */
    CHECK(up_await_close(fx, fd, 1000)); /* the proxy closes its end, having sent nothing */
    sem_post(&fx->to_cli);
    fd = up_accept(fx, IO_TIMEOUT_MS);
    CHECK(fd >= 0);
    CHECK(up_read_request(fx, fd) == 1);
    CHECK(up_send_json(fd, 200, "{\"n\":1}"));
    CHECK(wait_sem(&fx->to_up, 2));
    close(fd);
}

static void cli_two_with_pause(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(cli_open(fx, &cc, IO_TIMEOUT_MS, 0));
    CHECK(cli_post(&cc, &r, "/v1/completions", "{}"));
    CHECK(r.done && r.status == 200);
    bool go = wait_sem(&fx->to_cli, 3);
    CHECK(cli_post(&cc, &r, "/v1/completions", "{}"));
    sem_post(&fx->to_up);
    CHECK(go);
    CHECK(answered(&r, 200, "{\"n\":1}"));
    cli_close(&cc, &r);
}

static void test_idle_connection_closed_by_server_is_dropped(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_two_with_pause, up_half_close_idle, 2);
    assert_int_equal(fx->outcome[1], PROXY_OK);
    assert_int_equal(fx->accepts, 2);
}

/* ---- proxy_forget_port closes that port's idle connections ---- */

static void forget_after_done(struct fx *fx)
{
    proxy_forget_port(fx->proxy, fx->target_port);
}

static void up_expect_close(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    CHECK(up_send_json(fd, 200, "{}"));
    CHECK(up_await_close(fx, fd, 1000));
}

static void test_forget_port_closes_idle_connections(void **state)
{
    struct fx *fx = fx_of(state);
    fx->after_done = forget_after_done;
    fx->ask = (struct ask){ .status = 200 };
    fx_run(fx, cli_ask, up_expect_close, 1);
    assert_int_equal(fx->outcome[0], PROXY_OK);
}

/* ---- proxy_free with a call in flight: upstream closed, DONE not called ---- */

/* The proxy let go of the live request without DONE: it is the fixture's
 * again until its client leaves, and sample_cb must not read it after. */
static void on_live_close(struct http_request *req, void *arg)
{
    struct fx *fx = arg;
    if (fx->live == req)
        fx->live = NULL;
}

static void free_proxy(struct fx *fx)
{
    proxy_free(fx->proxy);
    fx->proxy = NULL;
    if (fx->live)
        http_request_watch(fx->live, on_live_close, NULL, fx);
}

static void up_then_free(struct fx *fx)
{
    int fd = up_first(fx);
    CHECK(fd >= 0);
    fx->tl.act = free_proxy;
    tl_ask(&fx->tl);
    bool closed = up_await_close(fx, fd, 1000);
    sem_post(&fx->to_cli);
    CHECK(closed);
}

static void cli_wait_then_leave(struct fx *fx)
{
    int fd = tl_connect(fx->srv_port, IO_TIMEOUT_MS, 0);
    CHECK(fd >= 0);
    CHECK(post(fd, "/v1/chat/completions", "{}"));
    bool ok = wait_sem(&fx->to_cli, 3);
    close(fd);
    CHECK(ok);
}

static void test_free_with_call_in_flight(void **state)
{
    struct fx *fx = fx_of(state);
    fx_run(fx, cli_wait_then_leave, up_then_free, 0);
    http_server_free(fx->srv); /* the held request closes: its on_close must be unhooked */
    fx->srv = NULL;
    assert_null(fx->proxy);
    assert_int_equal(fx->ndone, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_json_answer_relayed_byte_identical, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_and_chunked_bodies_relayed_intact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sse_relayed_event_by_event, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sse_accel_header_not_duplicated, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keepalive_connection_reused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stale_reused_connection_closed_is_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stale_reused_connection_reset_is_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reused_connection_cut_after_first_byte_not_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upstream_closes_before_answering_gives_502, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upstream_dies_mid_stream_sends_sse_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upstream_dies_before_first_event_sends_only_the_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upstream_dies_mid_body_cuts_client, setup, teardown),
        cmocka_unit_test_setup_teardown(test_small_answer_cut_before_relay_gives_502, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_disconnect_closes_upstream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backpressure_pauses_upstream_reads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hop_by_hop_dropped_and_host_rewritten, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_answer_has_no_body, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_refused_gives_502, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_timeout_gives_502, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_connection_closed_before_server_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_connection_closed_by_server_is_dropped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forget_port_closes_idle_connections, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_with_call_in_flight, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
