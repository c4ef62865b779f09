/* test_http — the HTTP server driven over real sockets.
 *
 * The server runs on an ev loop in the test's thread; each scenario's
 * client runs in a second thread with blocking sockets whose every wait is
 * bounded (SO_RCVTIMEO), and reports back through the fixture. The client
 * never calls cmocka (not thread-safe): it records the first failed check
 * (CHECK, testlib.h), and the test thread asserts after joining it.
 * Responses are parsed on the client side with llhttp in response mode,
 * and their raw bytes are kept for exact framing checks. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "log.h"
#include "testlib.h"

#define CLIENT_TIMEOUT_MS 2000
#define RUN_TIMEOUT_S     10.0

/* ------------------------------------------------------------ fixture */

struct fx;
typedef void (*on_req_fn)(struct fx *, struct http_request *);

struct fx {
    struct tl_loop tl;
    struct http_server *srv;
    struct http_limits lim;
    char addr[256];
    char dir[64];              /* temp dir for UNIX sockets */

    /* server side: what the handler saw and did */
    on_req_fn on_req;
    int nreq;
    char seen[16][160];
    struct http_conn *conn_of[16];
    int outstanding, max_outstanding;
    size_t max_conns;
    int closes, drains;
    struct http_request *held;
    ev_timer later_w;          /* answers fx->held later */
    char host[64], peer[64], path[128], query[128];
    int minor;
    bool keep_alive, is_unix;
    size_t written, blocked_buffered, buffered_at_drain;
    int nblocked;
    sem_t got_req, blocked;
    int keep_fd;               /* client socket left open past the client thread */

    /* client side results */
    int status[8];
    char body[8][512];
    char note[8][512];
    bool flag[8];
    double elapsed[8];
    size_t recv_len;
};

static struct fx *fx_of(void **state) { return *state; }

/* ---------------------------------------------------------- the handler */

static void reply(struct fx *fx, struct http_request *req, int status, const char *body)
{
    fx->outstanding--;
    http_respond(req, status, "text/plain", NULL, body, strlen(body));
}

/* Default: echo "METHOD path|query|body". */
static void on_req_echo(struct fx *fx, struct http_request *req)
{
    char body[600];
    snprintf(body, sizeof body, "%s %s|%s|%.*s", req->method, req->path, req->query,
             (int)(req->body_len > 400 ? 400 : req->body_len), req->body ? req->body : "");
    reply(fx, req, 200, body);
}

static void handler(struct http_request *req, void *arg)
{
    struct fx *fx = arg;
    int i = fx->nreq < 16 ? fx->nreq : 15;
    snprintf(fx->seen[i], sizeof fx->seen[i], "%s %s", req->method, req->target);
    fx->conn_of[i] = req->conn;
    fx->nreq++;
    const char *host = http_header_get(req, "host");
    snprintf(fx->host, sizeof fx->host, "%s", host ? host : "");
    snprintf(fx->peer, sizeof fx->peer, "%s", req->peer);
    snprintf(fx->path, sizeof fx->path, "%s", req->path);
    snprintf(fx->query, sizeof fx->query, "%s", req->query);
    fx->minor = req->http_minor;
    fx->keep_alive = req->keep_alive;
    fx->is_unix = req->is_unix;
    size_t nc = http_server_connections(fx->srv);
    if (nc > fx->max_conns)
        fx->max_conns = nc;
    fx->outstanding++;
    if (fx->outstanding > fx->max_outstanding)
        fx->max_outstanding = fx->outstanding;
    (fx->on_req ? fx->on_req : on_req_echo)(fx, req);
}

static void on_close_count(struct http_request *req, void *arg)
{
    struct fx *fx = arg;
    (void)req;
    fx->closes++;
    fx->outstanding--;
    fx->held = NULL;
}

/* Holds the request; the client learns through got_req. */
static void on_req_hold(struct fx *fx, struct http_request *req)
{
    http_request_watch(req, on_close_count, NULL, fx);
    fx->held = req;
    sem_post(&fx->got_req);
}

static void later_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct fx *fx = w->data;
    (void)loop;
    (void)revents;
    if (fx->held) {
        struct http_request *req = fx->held;
        fx->held = NULL;
        on_req_echo(fx, req);
    }
}

static void answer_later(struct fx *fx, struct http_request *req, double seconds)
{
    fx->held = req;
    ev_timer_set(&fx->later_w, seconds, 0.);
    ev_timer_start(fx->tl.loop, &fx->later_w);
}

/* ------------------------------------------------------------ running */

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof *fx);
    if (!fx)
        return -1;
    if (tl_init(&fx->tl, fx) < 0)
        return -1;
    fx->lim = tl_limits();
    sem_init(&fx->got_req, 0, 0);
    sem_init(&fx->blocked, 0, 0);
    ev_init(&fx->later_w, later_cb);
    fx->later_w.data = fx;
    fx->keep_fd = -1;
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    http_server_free(fx->srv);
    if (fx->keep_fd >= 0)
        close(fx->keep_fd);
    ev_timer_stop(fx->tl.loop, &fx->later_w);
    tl_destroy(&fx->tl);
    sem_destroy(&fx->got_req);
    sem_destroy(&fx->blocked);
    if (fx->dir[0]) {
        char path[128];
        snprintf(path, sizeof path, "%s/sock", fx->dir);
        unlink(path);
        snprintf(path, sizeof path, "%s/file", fx->dir);
        unlink(path);
        rmdir(fx->dir);
    }
    free(fx);
    return 0;
}

static void fx_listen(struct fx *fx, const char *addr)
{
    char err[256] = "";
    fx->srv = http_server_listen(fx->tl.loop, addr, &fx->lim, handler, fx, err, sizeof err);
    if (!fx->srv)
        fail_msg("listen %s: %s", addr, err);
    if (addr[0] == '/')
        snprintf(fx->addr, sizeof fx->addr, "%s", addr);
    else
        snprintf(fx->addr, sizeof fx->addr, "%u", http_server_port(fx->srv));
}

/* Runs the loop until the client thread is done (bounded), then joins it. */
static void fx_run(struct fx *fx, tl_party_fn client)
{
    if (!tl_run(&fx->tl, client, NULL, NULL, RUN_TIMEOUT_S))
        fail_msg("scenario did not finish within %.0f s", RUN_TIMEOUT_S);
}

/* Runs the loop until COND holds; false if it did not within SECONDS. */
static bool fx_wait(struct fx *fx, tl_cond_fn cond, double seconds)
{
    return tl_wait(&fx->tl, cond, seconds);
}

/* ------------------------------------------------------------- client */

static int cli_tcp_opts(struct fx *fx, int rcvbuf)
{
    return tl_connect((unsigned)atoi(fx->addr), CLIENT_TIMEOUT_MS, rcvbuf);
}

static int cli_tcp(struct fx *fx) { return cli_tcp_opts(fx, 0); }

static int cli_unix(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    if (fd < 0)
        return -1;
    set_timeouts(fd, CLIENT_TIMEOUT_MS);
    if (strlen(path) >= sizeof sun.sun_path) {
        close(fd);
        return -1;
    }
    memcpy(sun.sun_path, path, strlen(path) + 1);
    if (connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends REQ on a fresh connection and reads one response. */
/* A TCP connection to the server under test, ready to read. */
static bool cli_open(struct fx *fx, struct cconn *cc)
{
    int fd = cli_tcp(fx);
    if (fd >= 0)
        cc_init(cc, fd);
    return fd >= 0;
}

/* Sends REQ (unless NULL: it was sent) on CC and reads one whole response
 * into R. */
static bool ask(struct cconn *cc, const char *req, struct cresp *r)
{
    return (!req || send_str(cc->fd, req)) && cc_read(cc, r, false);
}

/* Sends REQ on a fresh connection and reads one response. */
static bool one_shot(struct fx *fx, const char *req, struct cconn *cc, struct cresp *r)
{
    return cli_open(fx, cc) && ask(cc, req, r);
}

/* Keeps R's status and body in slot I, then frees R. */
static void keep(struct fx *fx, int i, struct cresp *r)
{
    fx->status[i] = r->status;
    snprintf(fx->body[i], sizeof fx->body[i], "%s", r->body ? r->body : "");
    cresp_free(r);
}

/* ask(), its answer kept in slot I. */
static bool ask_keep(struct fx *fx, struct cconn *cc, int i, const char *req)
{
    struct cresp r = { 0 };
    bool ok = ask(cc, req, &r);
    if (ok)
        keep(fx, i, &r);
    cresp_free(&r);
    return ok;
}

/* REQ on a fresh connection, closed after; its answer kept in slot I. */
static bool fresh_keep(struct fx *fx, int i, const char *req)
{
    struct cconn cc;
    if (!cli_open(fx, &cc))
        return false;
    bool ok = ask_keep(fx, &cc, i, req);
    close(cc.fd);
    return ok;
}

/* REQ on a fresh connection: its status in slot I; flag[F]: the answer
 * says Connection: close; flag[F + 1]: the server then closes. */
static bool answered_then_closed(struct fx *fx, const char *req, int i, int f)
{
    struct cconn cc;
    struct cresp r = { 0 };
    if (!one_shot(fx, req, &cc, &r)) {
        cresp_free(&r);
        return false;
    }
    fx->flag[f] = header_is_ci(&r, "Connection", "close");
    fx->flag[f + 1] = cc_expect_eof(&cc);
    keep(fx, i, &r);
    close(cc.fd);
    return true;
}

/* ------------------------------------------------------------- tests */

/* GET / 200 --------------------------------------------------------- */

static void client_simple_get(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(one_shot(fx, "GET /hello?x=1&y=2 HTTP/1.1\r\nHost: example\r\nUser-Agent: t\r\n\r\n", &cc, &r));
    const char *h;
    fx->flag[0] = (h = cresp_header(&r, "Content-Length")) && atoi(h) == (int)r.body_len;
    fx->flag[1] = header_is(&r, "Content-Type", "text/plain");
    fx->flag[2] = header_is_ci(&r, "Connection", "keep-alive");
    fx->flag[3] = header_is(&r, "Server", "llama-pool");
    fx->flag[4] = (h = cresp_header(&r, "Date")) && strstr(h, " GMT") != NULL;
    fx->flag[5] = strncmp(r.raw, "HTTP/1.1 200 OK\r\n", 17) == 0;
    fx->flag[6] = cresp_header(&r, "Transfer-Encoding") == NULL;
    keep(fx, 0, &r);
    close(cc.fd);
}

static void test_get_200_with_headers(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    assert_int_not_equal(http_server_port(fx->srv), 0);
    fx_run(fx, client_simple_get);
    assert_int_equal(fx->status[0], 200);
    assert_string_equal(fx->body[0], "GET /hello|x=1&y=2|");
    for (int i = 0; i <= 6; i++) {
        if (!fx->flag[i])
            fail_msg("response header check %d failed", i);
    }
    assert_string_equal(fx->seen[0], "GET /hello?x=1&y=2");
    assert_string_equal(fx->host, "example");
    assert_string_equal(fx->path, "/hello");
    assert_string_equal(fx->query, "x=1&y=2");
    assert_int_equal(fx->minor, 1);
    assert_true(fx->keep_alive);
    assert_false(fx->is_unix);
    assert_true(strncmp(fx->peer, "127.0.0.1:", 10) == 0);
}

/* Keep-alive ---------------------------------------------------------- */

static void client_keepalive(struct fx *fx)
{
    struct cconn cc;
    CHECK(cli_open(fx, &cc));
    CHECK(ask_keep(fx, &cc, 0, "GET /one HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(ask_keep(fx, &cc, 1, "GET /two HTTP/1.1\r\nHost: a\r\n\r\n"));
    close(cc.fd);
}

static void test_keepalive_two_sequential_requests(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_keepalive);
    assert_int_equal(fx->status[0], 200);
    assert_int_equal(fx->status[1], 200);
    assert_string_equal(fx->body[0], "GET /one||");
    assert_string_equal(fx->body[1], "GET /two||");
    assert_int_equal(fx->nreq, 2);
    assert_ptr_equal(fx->conn_of[0], fx->conn_of[1]); /* one connection */
}

/* Pipelining -------------------------------------------------------- */

/* Paths containing "slow" are answered 30 ms later from a timer. */
static void on_req_some_later(struct fx *fx, struct http_request *req)
{
    if (strstr(req->path, "slow"))
        answer_later(fx, req, 0.03);
    else
        on_req_echo(fx, req);
}

static void client_pipelined(struct fx *fx)
{
    struct cconn cc;
    CHECK(cli_open(fx, &cc));
    CHECK(send_str(cc.fd, "GET /slow1 HTTP/1.1\r\nHost: a\r\n\r\n"
                          "POST /fast2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                          "GET /slow3 HTTP/1.1\r\nHost: a\r\n\r\n"));
    for (int i = 0; i < 3; i++)
        CHECK(ask_keep(fx, &cc, i, NULL));
    close(cc.fd);
}

static void test_pipelined_requests_answered_in_order(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_some_later;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_pipelined);
    assert_int_equal(fx->nreq, 3);
    assert_int_equal(fx->max_outstanding, 1); /* one at a time */
    assert_string_equal(fx->body[0], "GET /slow1||");
    assert_string_equal(fx->body[1], "POST /fast2||abc");
    assert_string_equal(fx->body[2], "GET /slow3||");
}

/* The loop answers the held request 50 ms after the client asks, leaving
 * time for the client's next request to arrive while it is held. */
static void act_answer_held_soon(struct fx *fx)
{
    if (fx->held)
        answer_later(fx, fx->held, 0.05);
}

static void client_next_request_while_held(struct fx *fx)
{
    struct cconn cc;
    CHECK(cli_open(fx, &cc));
    CHECK(send_str(cc.fd, "GET /first HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(wait_sem(&fx->got_req, 2.0));
    CHECK(send_str(cc.fd, "GET /second HTTP/1.1\r\nHost: a\r\n\r\n"));
    tl_ask(&fx->tl);
    for (int i = 0; i < 2; i++)
        CHECK(ask_keep(fx, &cc, i, NULL));
    close(cc.fd);
}

static void on_req_hold_first(struct fx *fx, struct http_request *req)
{
    if (strcmp(req->path, "/first") == 0)
        on_req_hold(fx, req);
    else
        on_req_echo(fx, req);
}

static void test_next_request_while_held_is_not_a_disconnect(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_hold_first;
    fx->tl.act = act_answer_held_soon;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_next_request_while_held);
    assert_int_equal(fx->closes, 0);
    assert_string_equal(fx->body[0], "GET /first||");
    assert_string_equal(fx->body[1], "GET /second||");
}

/* Bodies ------------------------------------------------------------ */

static void client_bodies(struct fx *fx)
{
    struct cconn cc;
    CHECK(cli_open(fx, &cc));
    /* Content-Length, sent in pieces that split a header name and the body */
    CHECK(send_str(cc.fd, "POST /cl HTTP/1.1\r\nHost: a\r\nCont"));
    CHECK(send_str(cc.fd, "ent-Length: 11\r\n\r\nhello"));
    CHECK(ask_keep(fx, &cc, 0, " world"));
    /* chunked, with a chunk extension and a trailer */
    CHECK(send_str(cc.fd, "POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                          "5;ext=1\r\nhello\r\n6\r\n world\r\n"));
    CHECK(ask_keep(fx, &cc, 1, "0\r\nX-Trailer: t\r\n\r\n"));
    close(cc.fd);
}

static void test_content_length_and_chunked_bodies(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_bodies);
    assert_int_equal(fx->status[0], 200);
    assert_string_equal(fx->body[0], "POST /cl||hello world");
    assert_int_equal(fx->status[1], 200);
    assert_string_equal(fx->body[1], "POST /chunked||hello world");
}

static void client_expect_continue(struct fx *fx)
{
    struct cconn cc;
    CHECK(cli_open(fx, &cc));
    /* the interim response, before any body is sent */
    CHECK(ask_keep(fx, &cc, 0,
                   "POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"));
    CHECK(ask_keep(fx, &cc, 1, "data"));
    close(cc.fd);
}

static void test_expect_100_continue(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_expect_continue);
    assert_int_equal(fx->status[0], 100);
    assert_int_equal(fx->status[1], 200);
    assert_string_equal(fx->body[1], "POST /up||data");
}

/* Upgrades are not supported: the request is answered, then the
 * connection closes instead of switching protocols. */
static void client_upgrade(struct fx *fx)
{
    CHECK(answered_then_closed(
        fx, "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 0, 0));
}

static void test_upgrade_request_answered_then_closed(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_upgrade);
    assert_int_equal(fx->status[0], 200);
    assert_true(fx->flag[0]);
    assert_true(fx->flag[1]);
}

/* HTTP/1.0 and HEAD ------------------------------------------------- */

static void client_http10(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    /* plain 1.0: answered, then closed */
    CHECK(answered_then_closed(fx, "GET /old HTTP/1.0\r\n\r\n", 0, 0));
    /* 1.0 asking for keep-alive: kept */
    CHECK(one_shot(fx, "GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &cc, &r));
    fx->flag[2] = header_is_ci(&r, "Connection", "keep-alive");
    keep(fx, 1, &r);
    CHECK(ask_keep(fx, &cc, 2, "GET /ka2 HTTP/1.0\r\n\r\n"));
    fx->flag[3] = cc_expect_eof(&cc);
    close(cc.fd);
    /* 1.1 with Connection: close */
    CHECK(answered_then_closed(fx, "GET /bye HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 3, 4));
}

static void test_http10_closes_after_response(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_http10);
    for (int i = 0; i < 4; i++)
        assert_int_equal(fx->status[i], 200);
    assert_true(fx->flag[0]); /* Connection: close */
    assert_true(fx->flag[1]); /* then EOF */
    assert_true(fx->flag[2]); /* 1.0 keep-alive honoured */
    assert_true(fx->flag[3]); /* second 1.0 request without keep-alive: closed */
    assert_true(fx->flag[4]);
    assert_true(fx->flag[5]);
}

static void client_head(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    const char *h;
    CHECK(cli_open(fx, &cc));
    CHECK(send_str(cc.fd, "HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /g HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(cc_read(&cc, &r, true));
    fx->flag[0] = (h = cresp_header(&r, "Content-Length")) && atoi(h) == (int)strlen("HEAD /h||");
    fx->flag[1] = r.body_len == 0;
    keep(fx, 0, &r);
    CHECK(ask_keep(fx, &cc, 1, NULL)); /* would misparse if HEAD had sent a body */
    close(cc.fd);
}

static void test_head_has_length_but_no_body(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_head);
    assert_int_equal(fx->status[0], 200);
    assert_true(fx->flag[0]);
    assert_true(fx->flag[1]);
    assert_int_equal(fx->status[1], 200);
    assert_string_equal(fx->body[1], "GET /g||");
}

/* Errors and limits ------------------------------------------------- */

/* Sends REQ (in pieces split at '|'), reads one response into slot I,
 * records whether the server then closed. */
static void error_case(struct fx *fx, int i, const char *req)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(one_shot(fx, req, &cc, &r));
    const char *h = cresp_header(&r, "Content-Type");
    snprintf(fx->note[i], sizeof fx->note[i], "%s", h ? h : "");
    fx->flag[i] = cc_expect_eof(&cc);
    keep(fx, i, &r);
    close(cc.fd);
}

static void client_malformed(struct fx *fx)
{
    error_case(fx, 0, "GET / HTTP/1.1 trailing-garbage\r\nHost: a\r\n\r\n");
    error_case(fx, 1, "GET / HTTP/1.1\r\nBad\x01Header: x\r\n\r\n");
    error_case(fx, 2, "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
    error_case(fx, 3, "G@T / HTTP/1.1\r\n\r\n");
    error_case(fx, 4, "GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n");
    error_case(fx, 5, "GET / HTTP/2.0\r\n\r\n");
}

static void test_malformed_request_gets_400_json(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_malformed);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(fx->status[i], 400);
        assert_string_equal(fx->note[i], "application/json");
        assert_true(strncmp(fx->body[i], "{\"error\":{\"message\":\"malformed HTTP request: ", 44) == 0);
        assert_non_null(strstr(fx->body[i], "\",\"type\":\"invalid_request_error\",\"code\":400}}"));
        assert_true(fx->flag[i]); /* closed after */
    }
    assert_non_null(strstr(fx->body[0], "Expected CRLF after version"));
    assert_int_equal(fx->status[5], 505);
    assert_true(fx->flag[5]);
    assert_int_equal(fx->nreq, 0);
}

/* A header block of exactly N bytes ("GET / HTTP/1.1\r\nX: xxx…\r\n\r\n"). */
static char *header_block(size_t n)
{
    const char *pre = "GET / HTTP/1.1\r\nX: ";
    const char *post = "\r\n\r\n";
    size_t fixed = strlen(pre) + strlen(post);
    char *s = malloc(n + 1);
    assert_non_null(s);
    assert_true(n > fixed);
    strcpy(s, pre);
    memset(s + strlen(pre), 'x', n - fixed);
    strcpy(s + n - strlen(post), post);
    return s;
}

static char *g_exact, *g_over;

static void client_header_limit(struct fx *fx)
{
    CHECK(fresh_keep(fx, 0, g_exact));
    error_case(fx, 1, g_over);
}

static void test_oversized_header_gets_431(void **state)
{
    struct fx *fx = fx_of(state);
    fx->lim.max_header = 256;
    fx_listen(fx, "127.0.0.1:0");
    g_exact = header_block(256);
    g_over = header_block(257);
    fx_run(fx, client_header_limit);
    free(g_exact);
    free(g_over);
    assert_int_equal(fx->status[0], 200); /* exactly at the limit */
    assert_int_equal(fx->status[1], 431);
    assert_string_equal(fx->note[1], "application/json");
    assert_non_null(strstr(fx->body[1], "\"code\":431"));
    assert_true(fx->flag[1]);
    assert_int_equal(fx->nreq, 1);
}

static void client_body_limit(struct fx *fx)
{
    CHECK(fresh_keep(fx, 0, "POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 16\r\n\r\n0123456789abcdef"));
    /* refused from the length alone: no body sent */
    error_case(fx, 1, "POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 17\r\n\r\n");
    /* chunked: 10 + 7 bytes */
    error_case(fx, 2, "POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "a\r\n0123456789\r\n7\r\n0123456\r\n0\r\n\r\n");
}

static void test_oversized_body_gets_413(void **state)
{
    struct fx *fx = fx_of(state);
    fx->lim.max_body = 16;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_body_limit);
    assert_int_equal(fx->status[0], 200);
    assert_int_equal(fx->status[1], 413);
    assert_int_equal(fx->status[2], 413);
    assert_true(fx->flag[1]);
    assert_true(fx->flag[2]);
    assert_non_null(strstr(fx->body[1], "request body exceeds 16 bytes"));
    assert_non_null(strstr(fx->body[2], "request body exceeds 16 bytes"));
    assert_int_equal(fx->nreq, 1);
}

static void client_slow_headers(struct fx *fx)
{
    double t0 = now_s();
    error_case(fx, 0, "GET / HTTP/1.1\r\nHost: a\r\n"); /* never finishes its headers */
    fx->elapsed[0] = now_s() - t0;
    t0 = now_s();
    error_case(fx, 1, ""); /* sends nothing at all */
    fx->elapsed[1] = now_s() - t0;
}

static void test_slow_headers_get_408(void **state)
{
    struct fx *fx = fx_of(state);
    fx->lim.header_timeout_ms = 100;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_slow_headers);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(fx->status[i], 408);
        assert_true(fx->flag[i]);
        assert_true(fx->elapsed[i] >= 0.09);
        assert_true(fx->elapsed[i] < 1.5);
    }
}

static void client_idle(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(one_shot(fx, "GET / HTTP/1.1\r\nHost: a\r\n\r\n", &cc, &r));
    keep(fx, 0, &r);
    double t0 = now_s();
    fx->flag[0] = cc_expect_eof(&cc); /* silently: no bytes before EOF */
    fx->elapsed[0] = now_s() - t0;
    close(cc.fd);
}

static void test_idle_keepalive_connection_closes(void **state)
{
    struct fx *fx = fx_of(state);
    fx->lim.keepalive_timeout_ms = 100;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_idle);
    assert_int_equal(fx->status[0], 200);
    assert_true(fx->flag[0]);
    assert_true(fx->elapsed[0] >= 0.05);
    assert_true(fx->elapsed[0] < 1.5);
}

/* Streaming --------------------------------------------------------- */

static void on_req_stream(struct fx *fx, struct http_request *req)
{
    fx->outstanding--;
    http_stream_begin(req, 200, "text/event-stream", "Cache-Control: no-cache\r\n");
    http_stream_write(req, "data: 1\n\n", 9);
    http_stream_write(req, "", 0); /* must not end the stream */
    http_stream_write(req, "data: hello\n\n", 13);
    http_stream_end(req);
}

static const char *after_head(const char *raw)
{
    const char *p = strstr(raw, "\r\n\r\n");
    return p ? p + 4 : "";
}

static void client_stream(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(one_shot(fx, "GET /events HTTP/1.1\r\nHost: a\r\n\r\n", &cc, &r));
    fx->status[0] = r.status;
    snprintf(fx->body[0], sizeof fx->body[0], "%s", after_head(r.raw)); /* raw framing */
    fx->flag[0] = header_is(&r, "Transfer-Encoding", "chunked");
    fx->flag[1] = cresp_header(&r, "Content-Length") == NULL;
    fx->flag[2] = header_is(&r, "Cache-Control", "no-cache");
    cresp_free(&r);
    /* still usable afterwards */
    CHECK(ask_keep(fx, &cc, 1, "GET /again HTTP/1.1\r\nHost: a\r\n\r\n"));
    close(cc.fd);
    /* HTTP/1.0: raw bytes, closed at the end */
    CHECK(one_shot(fx, "GET /events HTTP/1.0\r\n\r\n", &cc, &r));
    fx->status[2] = r.status;
    snprintf(fx->body[2], sizeof fx->body[2], "%s", after_head(r.raw));
    fx->flag[3] = header_is_ci(&r, "Connection", "close");
    fx->flag[4] = cc.eof;
    cresp_free(&r);
    close(cc.fd);
}

static void on_req_stream_events(struct fx *fx, struct http_request *req)
{
    if (strcmp(req->path, "/events") == 0)
        on_req_stream(fx, req);
    else
        on_req_echo(fx, req);
}

static void test_streamed_response_chunked_framing(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_stream_events;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_stream);
    assert_int_equal(fx->status[0], 200);
    assert_string_equal(fx->body[0], "9\r\ndata: 1\n\n\r\nd\r\ndata: hello\n\n\r\n0\r\n\r\n");
    assert_true(fx->flag[0]);
    assert_true(fx->flag[1]);
    assert_true(fx->flag[2]);
    assert_int_equal(fx->status[1], 200);
    assert_int_equal(fx->status[2], 200);
    assert_string_equal(fx->body[2], "data: 1\n\ndata: hello\n\n");
    assert_true(fx->flag[3]);
    assert_true(fx->flag[4]);
}

/* Disconnects ------------------------------------------------------- */

static bool one_close(struct fx *fx) { return fx->closes >= 1; }

static void client_disconnect_while_held(struct fx *fx)
{
    int fd = cli_tcp(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, "GET /wait HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(wait_sem(&fx->got_req, 2.0));
    close(fd);
}

static void test_client_disconnect_calls_on_close(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_hold;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_disconnect_while_held);
    assert_true(fx_wait(fx, one_close, 2.0));
    assert_int_equal(fx->closes, 1);
    assert_null(fx->held);
}

static void on_req_stream_and_hold(struct fx *fx, struct http_request *req)
{
    http_request_watch(req, on_close_count, NULL, fx);
    fx->held = req;
    http_stream_begin(req, 200, "text/event-stream", NULL);
    http_stream_write(req, "data: 1\n\n", 9);
    sem_post(&fx->got_req);
}

static void client_disconnect_while_streaming(struct fx *fx)
{
    char buf[512];
    size_t got = 0;
    int fd = cli_tcp(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, "POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"));
    CHECK(wait_sem(&fx->got_req, 2.0));
    while (!memmem(buf, got, "data: 1", 7)) { /* the first event arrives */
        ssize_t n = recv(fd, buf + got, sizeof buf - got - 1, 0);
        CHECK(n > 0);
        got += (size_t)n;
    }
    close(fd);
}

static void test_client_disconnect_during_stream_calls_on_close(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_stream_and_hold;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_disconnect_while_streaming);
    assert_true(fx_wait(fx, one_close, 2.0));
    assert_int_equal(fx->closes, 1);
    assert_null(fx->held);
}

/* The client pipelines more than the server buffers while its first
 * request is held, then hangs up: reading is paused, yet the hang-up is
 * noticed. */
static void client_flood_then_hang_up(struct fx *fx)
{
    static char junk[96 * 1024]; /* more than the server buffers, less than the kernel holds */
    int fd = cli_tcp(fx);
    CHECK(fd >= 0);
    CHECK(send_str(fd, "GET /wait HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(wait_sem(&fx->got_req, 2.0));
    static const char one[] = "GET /xyzw HTTP/1.1\r\nHost: ab\r\n\r\n"; /* 32 bytes */
    for (size_t i = 0; i + sizeof one - 1 <= sizeof junk; i += sizeof one - 1)
        memcpy(junk + i, one, sizeof one - 1);
    CHECK(send_all(fd, junk, sizeof junk - sizeof junk % 32));
    close(fd);
}

static void test_hang_up_noticed_while_reading_is_paused(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_hold;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_flood_then_hang_up);
    assert_true(fx_wait(fx, one_close, 3.0));
    assert_int_equal(fx->nreq, 1); /* the pipelined ones were never handed out */
    assert_int_equal(http_server_connections(fx->srv), 0);
}

/* EMFILE ------------------------------------------------------------ */

static bool never(struct fx *fx) { (void)fx; return false; }
static bool one_request(struct fx *fx) { return fx->nreq >= 1; }

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_emfile_pauses_accepting_without_spinning(void **state)
{
    struct fx *fx = fx_of(state);
    struct rlimit old, low;
    int spare[64], nspare = 0;
    char buf[512];

    fx_listen(fx, "127.0.0.1:0");
    int c = cli_tcp(fx); /* waits in the backlog */
    assert_true(c >= 0);
    assert_true(send_str(c, "GET /late HTTP/1.1\r\nHost: a\r\n\r\n"));

    /* use up every descriptor */
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = (rlim_t)c + 32;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
    for (int d; nspare < 64 && (d = dup(c)) >= 0;)
        spare[nspare++] = d;
    assert_int_equal(errno, EMFILE);

    double cpu0 = cpu_s();
    fx_wait(fx, never, 0.3);
    double cpu = cpu_s() - cpu0;

    for (int i = 0; i < nspare; i++)
        close(spare[i]);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
    assert_int_equal(fx->nreq, 0);
    assert_true(cpu < 0.1); /* a spinning accept loop would burn ~0.3 s */

    /* descriptors are back: the waiting client is served */
    assert_true(fx_wait(fx, one_request, 2.0));
    ssize_t n = recv(c, buf, sizeof buf - 1, 0);
    assert_true(n > 0);
    buf[n] = '\0';
    assert_true(strncmp(buf, "HTTP/1.1 200 OK\r\n", 17) == 0);
    close(c);
}

/* Back-pressure ----------------------------------------------------- */

static void flood(struct fx *fx, struct http_request *req)
{
    static char chunk[16384];
    memset(chunk, 'x', sizeof chunk);
    while (fx->written < 256u * 1024 * 1024) {
        fx->written += sizeof chunk;
        if (!http_stream_write(req, chunk, sizeof chunk)) {
            fx->nblocked++;
            if (fx->nblocked == 1) {
                fx->blocked_buffered = http_stream_buffered(req);
                sem_post(&fx->blocked);
            }
            return;
        }
    }
    http_stream_end(req); /* never reported back-pressure: the test fails on nblocked */
}

static void on_drain_flood(struct http_request *req, void *arg)
{
    struct fx *fx = arg;
    fx->drains++;
    if (fx->drains == 1)
        fx->buffered_at_drain = http_stream_buffered(req);
    if (fx->drains < 2) {
        flood(fx, req);
    } else {
        fx->written += 3;
        http_stream_write(req, "end", 3);
        http_stream_end(req);
        fx->outstanding--;
    }
}

static void on_req_flood(struct fx *fx, struct http_request *req)
{
    http_request_watch(req, on_close_count, on_drain_flood, fx);
    http_stream_begin(req, 200, "application/octet-stream", NULL);
    flood(fx, req);
}

static void client_slow_reader(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    int fd = cli_tcp_opts(fx, 8192);
    CHECK(fd >= 0);
    cc_init(&cc, fd);
    CHECK(send_str(fd, "GET /flood HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(wait_sem(&fx->blocked, 5.0)); /* writer saw back-pressure before we read */
    CHECK(ask(&cc, NULL, &r));
    fx->recv_len = r.body_len;
    bool all_x = r.body_len >= 3 && memcmp(r.body + r.body_len - 3, "end", 3) == 0;
    for (size_t i = 0; all_x && i + 3 < r.body_len; i++)
        all_x = r.body[i] == 'x';
    fx->flag[0] = all_x;
    keep(fx, 0, &r);
    close(fd);
}

static void test_backpressure_then_on_drain(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_flood;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_slow_reader);
    assert_int_equal(fx->status[0], 200);
    assert_true(fx->flag[0]);
    assert_true(fx->nblocked >= 2);            /* once at first, once after the first drain */
    assert_int_equal(fx->drains, 2);
    assert_true(fx->blocked_buffered >= 256 * 1024);
    assert_true(fx->buffered_at_drain < 64 * 1024);
    assert_int_equal(fx->recv_len, fx->written); /* nothing dropped */
    assert_true(fx->recv_len > 2 * 256 * 1024);
    assert_int_equal(fx->closes, 0);
}

/* Connection limit -------------------------------------------------- */

static void client_max_connections(struct fx *fx)
{
    struct cconn a, b;
    struct cresp r = { 0 };
    CHECK(one_shot(fx, "GET /a HTTP/1.1\r\nHost: a\r\n\r\n", &a, &r));
    keep(fx, 0, &r);
    CHECK(cli_open(fx, &b)); /* completes in the kernel's backlog */
    CHECK(send_str(b.fd, "GET /b HTTP/1.1\r\nHost: a\r\n\r\n"));
    set_timeouts(b.fd, 300);
    char c;
    ssize_t n = recv(b.fd, &c, 1, MSG_PEEK);
    fx->flag[0] = n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK); /* not served yet */
    set_timeouts(b.fd, CLIENT_TIMEOUT_MS);
    close(a.fd); /* frees the slot */
    CHECK(ask_keep(fx, &b, 1, NULL));
    close(b.fd);
}

static void test_max_connections_defers_accept(void **state)
{
    struct fx *fx = fx_of(state);
    fx->lim.max_connections = 1;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_max_connections);
    assert_int_equal(fx->status[0], 200);
    assert_true(fx->flag[0]);
    assert_int_equal(fx->status[1], 200);
    assert_string_equal(fx->body[1], "GET /b||");
    assert_int_equal(fx->max_conns, 1);
}

/* Admission before the body (keys), and what it protects ---------------- */

/* Admits requests carrying "X-Key: good" (trusted) and any GET /public;
 * refuses the rest with 401 before their body. Allows CORS for
 * Origin: https://ok.example. */
static int admit_key(const struct http_request *req, void *arg, struct http_admission *out)
{
    struct fx *fx = arg;
    const char *key = http_header_get(req, "X-Key");
    const char *origin = http_header_get(req, "Origin");
    fx->flag[7] = req->body == NULL && req->body_len == 0;   /* nothing of the body yet */
    out->cors = origin && strcmp(origin, "https://ok.example") == 0;
    out->trusted = key && strcmp(key, "good") == 0;
    if (out->trusted || strcmp(req->path, "/public") == 0)
        return 0;
    out->msg = "Invalid API Key";
    return 401;
}

static void client_refused_before_body(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    /* Announces 30 MB and sends none of it: the answer comes anyway. */
    CHECK(one_shot(fx, "POST /v1/x HTTP/1.1\r\nHost: a\r\nOrigin: https://ok.example\r\n"
                       "Content-Length: 30000000\r\n\r\n", &cc, &r));
    fx->flag[0] = header_is_ci(&r, "Connection", "close");
    fx->flag[1] = header_is(&r, "Access-Control-Allow-Origin", "https://ok.example");
    keep(fx, 0, &r);
    CHECK(cc_expect_eof(&cc));
    close(cc.fd);
    /* The same with the key: read, handled, answered, kept open. */
    CHECK(one_shot(fx, "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-Key: good\r\nContent-Length: 3\r\n\r\nabc",
                   &cc, &r));
    fx->flag[2] = cresp_header(&r, "Access-Control-Allow-Origin") == NULL;
    keep(fx, 1, &r);
    close(cc.fd);
}

static void test_admission_refuses_before_the_body(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    http_server_set_admit(fx->srv, admit_key);
    fx_run(fx, client_refused_before_body);
    assert_int_equal(fx->status[0], 401);
    assert_non_null(strstr(fx->body[0], "\"message\":\"Invalid API Key\""));
    assert_non_null(strstr(fx->body[0], "\"type\":\"authentication_error\""));
    assert_true(fx->flag[0]);
    assert_true(fx->flag[1]);
    assert_int_equal(fx->status[1], 200);
    assert_string_equal(fx->body[1], "POST /v1/x||abc");
    assert_true(fx->flag[2]);
    assert_true(fx->flag[7]);
    assert_int_equal(fx->nreq, 1);          /* the refused one never reached the handler */
}

static void client_keyless_make_room(struct fx *fx)
{
    int hogs[3];
    struct cconn cc;
    /* A keyed keep-alive connection first. */
    CHECK(cli_open(fx, &cc));
    CHECK(ask_keep(fx, &cc, 0, "GET /k HTTP/1.1\r\nHost: a\r\nX-Key: good\r\n\r\n"));
    /* Then keyless ones that never finish their headers, more than fit. */
    for (int i = 0; i < 3; i++) {
        hogs[i] = cli_tcp(fx);
        CHECK(hogs[i] >= 0);
        CHECK(send_str(hogs[i], "GET /public HTTP/1.1\r\n"));
    }
    /* A new keyed client gets in at once: an old keyless one makes room. */
    CHECK(fresh_keep(fx, 1, "GET /n HTTP/1.1\r\nHost: a\r\nX-Key: good\r\n\r\n"));
    /* The first keyed connection is still there. */
    CHECK(ask_keep(fx, &cc, 2, "GET /k2 HTTP/1.1\r\nHost: a\r\nX-Key: good\r\n\r\n"));
    close(cc.fd);
    /* The oldest keyless connection was closed. */
    struct cconn h0;
    cc_init(&h0, hogs[0]);
    fx->flag[0] = cc_expect_eof(&h0);
    for (int i = 0; i < 3; i++)
        close(hogs[i]);
}

static void test_keyless_connections_make_room_at_max_connections(void **state)
{
    struct fx *fx = fx_of(state);
    fx->lim.max_connections = 3;
    fx->lim.header_timeout_ms = 60000;
    fx_listen(fx, "127.0.0.1:0");
    http_server_set_admit(fx->srv, admit_key);
    fx_run(fx, client_keyless_make_room);
    assert_int_equal(fx->status[0], 200);
    assert_int_equal(fx->status[1], 200);
    assert_int_equal(fx->status[2], 200);
    assert_true(fx->flag[0]);
}

static void client_slow_body(struct fx *fx)
{
    struct cconn cc;
    CHECK(cli_open(fx, &cc));
    double t0 = now_s();
    CHECK(send_str(cc.fd, "POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n"));
    /* A byte every 50 ms: each would restart a stall timer. */
    for (int i = 0; i < 12; i++) {
        if (!send_str(cc.fd, "x"))
            break;
        usleep(50 * 1000);
    }
    CHECK(ask_keep(fx, &cc, 0, NULL));
    fx->elapsed[0] = now_s() - t0;
    close(cc.fd);
}

static void test_body_timeout_is_for_the_whole_body(void **state)
{
    struct fx *fx = fx_of(state);
    fx->lim.header_timeout_ms = 5000;
    fx->lim.body_timeout_ms = 300;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_slow_body);
    assert_int_equal(fx->status[0], 408);
    assert_non_null(strstr(fx->body[0], "request body"));
    assert_true(fx->elapsed[0] < 2.0);
    assert_int_equal(fx->nreq, 0);
}

/* Request-target forms and header folding ----------------------------- */

static void client_absolute_form(struct fx *fx)
{
    static const char *reqs[] = {
        "GET http://example.com:8080/v1/models?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "GET https://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "GET HTTP://h?q=2 HTTP/1.1\r\nHost: h\r\n\r\n",
    };
    for (int i = 0; i < 3; i++)
        CHECK(fresh_keep(fx, i, reqs[i]));
}

static void test_absolute_form_target_becomes_origin_form(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_absolute_form);
    assert_int_equal(fx->status[0], 200);
    assert_string_equal(fx->body[0], "GET /v1/models|x=1|");
    assert_string_equal(fx->seen[0], "GET /v1/models?x=1");
    assert_string_equal(fx->body[1], "GET /||");
    assert_string_equal(fx->body[2], "GET /|q=2|");
}

/* A fresh connection: FIRST, 50 ms later SECOND, the answer kept in slot I. */
static bool split_keep(struct fx *fx, int i, const char *first, const char *second)
{
    struct cconn cc;
    if (!cli_open(fx, &cc))
        return false;
    bool ok = send_str(cc.fd, first);
    usleep(50 * 1000);
    ok = ok && ask_keep(fx, &cc, i, second);
    close(cc.fd);
    return ok;
}

static void client_obs_fold(struct fx *fx)
{
    CHECK(fresh_keep(fx, 0, "GET /f HTTP/1.1\r\nHost: a\r\nX-A: one\r\n two\r\n\r\n"));
    /* Split across writes: the fold is seen across reads too. */
    CHECK(split_keep(fx, 1, "GET /f HTTP/1.1\r\nHost: a\r\nX-A: one\r\n", "\ttwo\r\n\r\n"));
    /* A value split across writes without a fold is fine. */
    CHECK(split_keep(fx, 2, "GET /f HTTP/1.1\r\nHost: a\r\nX-A: one", " two\r\n\r\n"));
}

static void test_obs_fold_is_rejected(void **state)
{
    struct fx *fx = fx_of(state);
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_obs_fold);
    assert_int_equal(fx->status[0], 400);
    assert_non_null(strstr(fx->body[0], "folding"));
    assert_int_equal(fx->status[1], 400);
    assert_int_equal(fx->status[2], 200);
    assert_int_equal(fx->nreq, 1);
}

/* Shutdown and free ------------------------------------------------- */

static void act_shutdown(struct fx *fx)
{
    http_server_shutdown(fx->srv);
    if (fx->held)
        answer_later(fx, fx->held, 0.05);
}

static void client_shutdown(struct fx *fx)
{
    struct cconn idle, busy;
    struct cresp r = { 0 };
    CHECK(one_shot(fx, "GET /idle HTTP/1.1\r\nHost: a\r\n\r\n", &idle, &r));
    cresp_free(&r);
    CHECK(cli_open(fx, &busy));
    CHECK(send_str(busy.fd, "GET /first HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(wait_sem(&fx->got_req, 2.0));
    tl_ask(&fx->tl);
    fx->flag[0] = cc_expect_eof(&idle);          /* idle: closed */
    CHECK(ask(&busy, NULL, &r));                 /* busy: finishes */
    fx->flag[1] = header_is_ci(&r, "Connection", "close");
    fx->flag[2] = cc_expect_eof(&busy);
    keep(fx, 1, &r);
    fx->flag[3] = cli_tcp(fx) < 0;               /* no longer accepting */
    close(idle.fd);
    close(busy.fd);
}

static void test_shutdown_closes_idle_and_finishes_busy(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_hold_first;
    fx->tl.act = act_shutdown;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_shutdown);
    assert_true(fx->flag[0]);
    assert_int_equal(fx->status[1], 200);
    assert_true(fx->flag[1]);
    assert_true(fx->flag[2]);
    assert_true(fx->flag[3]);
    assert_int_equal(fx->closes, 0);
}

static void client_hold_and_stay(struct fx *fx)
{
    int fd = cli_tcp(fx);
    CHECK(fd >= 0);
    fx->keep_fd = fd; /* stays open: on_close must come from http_server_free */
    CHECK(send_str(fd, "GET /wait HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(wait_sem(&fx->got_req, 2.0));
}

static void test_server_free_calls_on_close(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_hold;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_hold_and_stay);
    assert_int_equal(fx->closes, 0);
    assert_int_equal(http_server_connections(fx->srv), 1);
    http_server_free(fx->srv);
    fx->srv = NULL;
    assert_int_equal(fx->closes, 1);
}

/* UNIX socket ------------------------------------------------------- */

static char g_sock[100];

static void client_unix(struct fx *fx)
{
    struct cconn cc;
    int fd = cli_unix(g_sock);
    CHECK(fd >= 0);
    cc_init(&cc, fd);
    CHECK(ask_keep(fx, &cc, 0, "GET /pool/status HTTP/1.1\r\nHost: localhost\r\n\r\n"));
    close(fd);
}

static void test_unix_socket_listen_and_request(void **state)
{
    struct fx *fx = fx_of(state);
    struct stat st;
    char err[256];

    snprintf(fx->dir, sizeof fx->dir, "/tmp/test_http.XXXXXX");
    assert_non_null(mkdtemp(fx->dir));
    snprintf(g_sock, sizeof g_sock, "%s/sock", fx->dir);

    /* a stale socket file: bound, never listened on, its owner gone */
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    memcpy(sun.sun_path, g_sock, strlen(g_sock) + 1);
    assert_int_equal(bind(s, (struct sockaddr *)&sun, sizeof sun), 0);
    close(s);

    fx_listen(fx, g_sock);
    assert_int_equal(http_server_port(fx->srv), 0);
    assert_int_equal(stat(g_sock, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0660);

    /* a second server on the live socket is refused */
    assert_null(http_server_listen(fx->tl.loop, g_sock, &fx->lim, handler, fx, err, sizeof err));
    assert_non_null(strstr(err, "another process"));
    /* a regular file is never replaced */
    char file[128];
    snprintf(file, sizeof file, "%s/file", fx->dir);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fclose(f);
    assert_null(http_server_listen(fx->tl.loop, file, &fx->lim, handler, fx, err, sizeof err));
    assert_non_null(strstr(err, "not a socket"));

    fx_run(fx, client_unix);
    assert_int_equal(fx->status[0], 200);
    assert_string_equal(fx->body[0], "GET /pool/status||");
    assert_true(fx->is_unix);
    assert_string_equal(fx->peer, "unix");

    http_server_free(fx->srv);
    fx->srv = NULL;
    assert_int_equal(stat(g_sock, &st), -1); /* unlinked */
}

/* Pure functions ---------------------------------------------------- */

static void test_query_get_decodes(void **state)
{
    (void)state;
    struct http_request req = { 0 };
    char *v;
    req.query = "a=1&b=hello+world&c=%41%42%zz%4&d&e=&%6Bey=v%20w%2B&a=2&model=tiny%2Fq4";

    v = http_query_get(&req, "a");
    assert_string_equal(v, "1"); /* the first one */
    free(v);
    v = http_query_get(&req, "b");
    assert_string_equal(v, "hello world");
    free(v);
    v = http_query_get(&req, "c");
    assert_string_equal(v, "AB%zz%4"); /* bad escapes stay literal */
    free(v);
    v = http_query_get(&req, "d");
    assert_string_equal(v, "");
    free(v);
    v = http_query_get(&req, "e");
    assert_string_equal(v, "");
    free(v);
    v = http_query_get(&req, "key"); /* the name is decoded too */
    assert_string_equal(v, "v w+");
    free(v);
    v = http_query_get(&req, "model");
    assert_string_equal(v, "tiny/q4");
    free(v);
    assert_null(http_query_get(&req, "missing"));
    assert_null(http_query_get(&req, "mode"));
    req.query = "";
    assert_null(http_query_get(&req, "a"));
}

static void test_status_and_error_type_tables(void **state)
{
    (void)state;
    assert_string_equal(http_status_text(404), "Not Found");
    assert_string_equal(http_status_text(431), "Request Header Fields Too Large");
    assert_string_equal(http_status_text(503), "Service Unavailable");
    assert_string_equal(http_error_type(400), "invalid_request_error");
    assert_string_equal(http_error_type(401), "authentication_error");
    assert_string_equal(http_error_type(404), "not_found_error");
    assert_string_equal(http_error_type(503), "unavailable_error");
    assert_string_equal(http_error_type(502), "server_error");
}

static void on_req_error(struct fx *fx, struct http_request *req)
{
    fx->outstanding--;
    http_respond_error(req, 404, NULL, "model \"%s\" not found\n\\%s", "ti\"ny", "\x01");
}

static void client_error_json(struct fx *fx)
{
    struct cconn cc;
    struct cresp r = { 0 };
    CHECK(one_shot(fx, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n", &cc, &r));
    fx->flag[0] = header_is(&r, "Content-Type", "application/json");
    keep(fx, 0, &r);
    close(cc.fd);
}

static void test_respond_error_escapes_json(void **state)
{
    struct fx *fx = fx_of(state);
    fx->on_req = on_req_error;
    fx_listen(fx, "127.0.0.1:0");
    fx_run(fx, client_error_json);
    assert_int_equal(fx->status[0], 404);
    assert_true(fx->flag[0]);
    assert_string_equal(fx->body[0],
                        "{\"error\":{\"message\":\"model \\\"ti\\\"ny\\\" not found\\n\\\\\\u0001\","
                        "\"type\":\"not_found_error\",\"code\":404}}");
}

static void test_listen_rejects_bad_addresses(void **state)
{
    struct fx *fx = fx_of(state);
    char err[256];
    const char *bad[] = { "nonsense", "127.0.0.1:99999", "::1:80", "127.0.0.1:", "[::1]80",
                          "relative/path" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        assert_null(http_server_listen(fx->tl.loop, bad[i], &fx->lim, handler, fx, err, sizeof err));
        assert_non_null(strstr(err, bad[i]));
    }
    /* IPv6 loopback, if this host has it */
    struct http_server *s6 = http_server_listen(fx->tl.loop, "[::1]:0", &fx->lim, handler, fx, err, sizeof err);
    if (s6) {
        assert_int_not_equal(http_server_port(s6), 0);
        http_server_free(s6);
    }
    /* a port in use */
    fx_listen(fx, "127.0.0.1:0");
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", http_server_port(fx->srv));
    assert_null(http_server_listen(fx->tl.loop, addr, &fx->lim, handler, fx, err, sizeof err));
    assert_non_null(strstr(err, "bind"));
}

int main(void)
{
    log_init(LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_get_200_with_headers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keepalive_two_sequential_requests, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pipelined_requests_answered_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_next_request_while_held_is_not_a_disconnect, setup, teardown),
        cmocka_unit_test_setup_teardown(test_content_length_and_chunked_bodies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expect_100_continue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_http10_closes_after_response, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upgrade_request_answered_then_closed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_has_length_but_no_body, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_request_gets_400_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_oversized_header_gets_431, setup, teardown),
        cmocka_unit_test_setup_teardown(test_oversized_body_gets_413, setup, teardown),
        cmocka_unit_test_setup_teardown(test_slow_headers_get_408, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_keepalive_connection_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_streamed_response_chunked_framing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_disconnect_calls_on_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_disconnect_during_stream_calls_on_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hang_up_noticed_while_reading_is_paused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_emfile_pauses_accepting_without_spinning, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backpressure_then_on_drain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_connections_defers_accept, setup, teardown),
        cmocka_unit_test_setup_teardown(test_admission_refuses_before_the_body, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keyless_connections_make_room_at_max_connections, setup, teardown),
        cmocka_unit_test_setup_teardown(test_body_timeout_is_for_the_whole_body, setup, teardown),
        cmocka_unit_test_setup_teardown(test_absolute_form_target_becomes_origin_form, setup, teardown),
        cmocka_unit_test_setup_teardown(test_obs_fold_is_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shutdown_closes_idle_and_finishes_busy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_free_calls_on_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unix_socket_listen_and_request, setup, teardown),
        cmocka_unit_test(test_query_get_decodes),
        cmocka_unit_test(test_status_and_error_type_tables),
        cmocka_unit_test_setup_teardown(test_respond_error_escapes_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_listen_rejects_bad_addresses, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
