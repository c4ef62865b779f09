/* testlib — see testlib.h. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "testlib.h"

/* ------------------------------------------------------------ the loop */

static void wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents; /* cond_cb, before the next turn, sees what changed */
}

static void act_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    struct tl_loop *tl = w->data;
    (void)loop;
    (void)revents;
    if (tl->act)
        tl->act(tl->fx);
}

static void guard_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct tl_loop *tl = w->data;
    (void)revents;
    tl->guard_fired = true;
    ev_break(loop, EVBREAK_ALL);
}

static bool settled(struct tl_loop *tl)
{
    return atomic_load(&tl->parties_done) >= tl->nparties && (!tl->cond || tl->cond(tl->fx));
}

static void cond_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    struct tl_loop *tl = w->data;
    (void)revents;
    if (settled(tl))
        ev_break(loop, EVBREAK_ALL);
}

int tl_init(struct tl_loop *tl, struct fx *fx)
{
    memset(tl, 0, sizeof *tl);
    tl->fx = fx;
    tl->loop = ev_loop_new(EVFLAG_AUTO);
    if (!tl->loop)
        return -1;
    pthread_mutex_init(&tl->mu, NULL);
    ev_async_init(&tl->wake_w, wake_cb);
    ev_async_init(&tl->act_w, act_cb);
    tl->act_w.data = tl;
    ev_async_start(tl->loop, &tl->wake_w);
    ev_async_start(tl->loop, &tl->act_w);
    ev_init(&tl->guard_w, guard_cb);
    tl->guard_w.data = tl;
    ev_prepare_init(&tl->cond_w, cond_cb);
    tl->cond_w.data = tl;
    return 0;
}

void tl_destroy(struct tl_loop *tl)
{
    ev_async_stop(tl->loop, &tl->wake_w);
    ev_async_stop(tl->loop, &tl->act_w);
    ev_loop_destroy(tl->loop);
    pthread_mutex_destroy(&tl->mu);
}

void tl_fail(struct tl_loop *tl, const char *file, int line, const char *what)
{
    const char *base = strrchr(file, '/');
    pthread_mutex_lock(&tl->mu);
    if (!tl->fail[0])
        snprintf(tl->fail, sizeof tl->fail, "%s:%d: check failed: %s", base ? base + 1 : file,
                 line, what);
    pthread_mutex_unlock(&tl->mu);
}

void tl_ask(struct tl_loop *tl) { ev_async_send(tl->loop, &tl->act_w); }

bool tl_wait(struct tl_loop *tl, tl_cond_fn cond, double seconds)
{
    tl->cond = cond;
    if (settled(tl))
        return true;
    tl->guard_fired = false;
    ev_timer_set(&tl->guard_w, seconds, 0.);
    ev_timer_start(tl->loop, &tl->guard_w);
    ev_prepare_start(tl->loop, &tl->cond_w);
    ev_run(tl->loop, 0);
    ev_prepare_stop(tl->loop, &tl->cond_w);
    ev_timer_stop(tl->loop, &tl->guard_w);
    return settled(tl);
}

static void *party_main(void *arg)
{
    struct tl_party *p = arg;
    p->fn(p->tl->fx);
    atomic_fetch_add(&p->tl->parties_done, 1);
    ev_async_send(p->tl->loop, &p->tl->wake_w);
    return NULL;
}

bool tl_run(struct tl_loop *tl, tl_party_fn a, tl_party_fn b, tl_cond_fn cond, double seconds)
{
    tl_party_fn fns[TL_MAX_PARTIES] = { a, b };
    atomic_store(&tl->parties_done, 0);
    tl->nparties = 0;
    for (int i = 0; i < TL_MAX_PARTIES; i++) {
        if (!fns[i])
            continue;
        struct tl_party *p = &tl->party[tl->nparties++];
        p->tl = tl;
        p->fn = fns[i];
        assert_int_equal(pthread_create(&p->th, NULL, party_main, p), 0);
    }
    bool ok = tl_wait(tl, cond, seconds);
    for (int i = 0; i < tl->nparties; i++)
        pthread_join(tl->party[i].th, NULL);
    tl->nparties = 0;
    tl->cond = NULL;
    /* A failed check is the cause; a timeout is often only its echo. */
    if (tl->fail[0])
        fail_msg("%s", tl->fail);
    return ok;
}

/* ------------------------------------------------------------- helpers */

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

bool wait_sem(sem_t *s, double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long ns = ts.tv_nsec + (long)((seconds - (long)seconds) * 1e9);
    ts.tv_sec += (time_t)seconds + ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    while (sem_timedwait(s, &ts) < 0)
        if (errno != EINTR)
            return false;
    return true;
}

struct http_limits tl_limits(void)
{
    return (struct http_limits){
        .max_header = 64 * 1024,
        .max_body = 1024 * 1024,
        .header_timeout_ms = 5000,
        .keepalive_timeout_ms = 5000,
        .max_connections = 64,
    };
}

/* ------------------------------------------------------------- sockets */

void set_timeouts(int fd, int ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

int tl_connect(unsigned port, int timeout_ms, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    set_timeouts(fd, timeout_ms);
    if (rcvbuf)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

bool send_all(int fd, const void *data, size_t n)
{
    const char *s = data;
    while (n) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        s += w;
        n -= (size_t)w;
    }
    return true;
}

bool send_str(int fd, const char *s) { return send_all(fd, s, strlen(s)); }

/* -------------------------------------------------------------- client */

char pattern_byte(size_t i) { return (char)('a' + i % 26); }

/* Appends N bytes and a NUL; false if memory runs out (never cmocka here:
 * this runs in a party's thread). */
static bool grow_append(char **buf, size_t *len, size_t *cap, const char *at, size_t n)
{
    if (*cap - *len < n + 1) {
        size_t c = *cap ? *cap : 1024;
        while (c - *len < n + 1)
            c *= 2;
        char *b = realloc(*buf, c);
        if (!b)
            return false;
        *buf = b;
        *cap = c;
    }
    memcpy(*buf + *len, at, n);
    *len += n;
    (*buf)[*len] = '\0';
    return true;
}

static void strncat_piece(char *dst, size_t cap, const char *at, size_t n)
{
    size_t l = strlen(dst);
    if (l + n >= cap)
        n = cap - l - 1;
    memcpy(dst + l, at, n);
    dst[l + n] = '\0';
}

static int c_on_header_field(llhttp_t *p, const char *at, size_t n)
{
    struct cconn *cc = p->data;
    if (cc->r->nh < 32)
        strncat_piece(cc->r->hn[cc->r->nh], sizeof cc->r->hn[0], at, n);
    return 0;
}

static int c_on_header_value(llhttp_t *p, const char *at, size_t n)
{
    struct cconn *cc = p->data;
    if (cc->r->nh < 32)
        strncat_piece(cc->r->hv[cc->r->nh], sizeof cc->r->hv[0], at, n);
    return 0;
}

static int c_on_header_value_complete(llhttp_t *p)
{
    struct cconn *cc = p->data;
    if (cc->r->nh < 32)
        cc->r->nh++;
    return 0;
}

static int c_on_headers_complete(llhttp_t *p)
{
    struct cconn *cc = p->data;
    cc->r->status = p->status_code;
    return cc->head ? 1 : 0;
}

static int c_on_body(llhttp_t *p, const char *at, size_t n)
{
    struct cconn *cc = p->data;
    struct cresp *r = cc->r;
    if (r->counting) {
        for (size_t i = 0; i < n; i++)
            if (at[i] != pattern_byte(r->body_len + i))
                r->pattern_errors++;
        r->body_len += n;
        return 0;
    }
    return grow_append(&r->body, &r->body_len, &r->body_cap, at, n) ? 0 : -1;
}

static int c_on_message_complete(llhttp_t *p)
{
    struct cconn *cc = p->data;
    cc->r->done = true;
    return HPE_PAUSED;
}

void cc_init(struct cconn *cc, int fd)
{
    memset(cc, 0, sizeof *cc);
    cc->fd = fd;
    llhttp_settings_init(&cc->s);
    cc->s.on_header_field = c_on_header_field;
    cc->s.on_header_value = c_on_header_value;
    cc->s.on_header_value_complete = c_on_header_value_complete;
    cc->s.on_headers_complete = c_on_headers_complete;
    cc->s.on_body = c_on_body;
    cc->s.on_message_complete = c_on_message_complete;
}

void cresp_free(struct cresp *r)
{
    free(r->body);
    free(r->raw);
    memset(r, 0, sizeof *r);
}

void cc_expect(struct cconn *cc, struct cresp *r, bool head)
{
    cresp_free(r);
    cc->r = r;
    cc->head = head;
    /* A parser of its own for each response: what came before (a
     * Connection: close, a HEAD) does not colour how this one is read. */
    llhttp_init(&cc->p, HTTP_RESPONSE, &cc->s);
    cc->p.data = cc;
}

bool cc_read_until(struct cconn *cc, bool (*stop)(struct cresp *, const void *), const void *arg)
{
    struct cresp *r = cc->r;
    for (;;) {
        if (cc->off < cc->len && !r->done) {
            const char *data = cc->buf + cc->off;
            size_t n = cc->len - cc->off, used = n;
            llhttp_errno_t e = llhttp_execute(&cc->p, data, n);
            if (e == HPE_PAUSED)
                used = (size_t)(llhttp_get_error_pos(&cc->p) - data);
            else if (e != HPE_OK)
                return false;
            if (!r->counting && !grow_append(&r->raw, &r->raw_len, &r->raw_cap, data, used))
                return false;
            cc->off += used;
        }
        if (cc->off == cc->len)
            cc->off = cc->len = 0;
        if (r->done || cc->eof || (stop && stop(r, arg)))
            return true;
        ssize_t n = recv(cc->fd, cc->buf + cc->len, sizeof cc->buf - cc->len, 0);
        if (n > 0) {
            cc->len += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0) {
            cc->eof = true;
            llhttp_finish(&cc->p); /* a body that ends at EOF completes here */
            return true;
        }
        if (errno == ECONNRESET) {
            cc->eof = true;
            return true;
        }
        return false; /* a timeout is not the peer closing */
    }
}

bool cc_read_response(struct cconn *cc) { return cc_read_until(cc, NULL, NULL); }

bool cc_read(struct cconn *cc, struct cresp *r, bool head)
{
    cc_expect(cc, r, head);
    return cc_read_response(cc) && r->done;
}

bool cc_expect_eof(struct cconn *cc)
{
    if (cc->eof)
        return cc->len == cc->off;
    if (cc->len > cc->off)
        return false;
    char b[256];
    ssize_t n;
    do
        n = recv(cc->fd, b, sizeof b, 0);
    while (n < 0 && errno == EINTR);
    if (n == 0)
        cc->eof = true;
    return n == 0 || (n < 0 && errno == ECONNRESET);
}

const char *cresp_header(const struct cresp *r, const char *name)
{
    for (int i = 0; i < r->nh; i++)
        if (strcasecmp(r->hn[i], name) == 0)
            return r->hv[i];
    return NULL;
}

int header_count(const struct cresp *r, const char *name)
{
    int n = 0;
    for (int i = 0; i < r->nh; i++)
        n += strcasecmp(r->hn[i], name) == 0;
    return n;
}

bool header_is(const struct cresp *r, const char *name, const char *value)
{
    const char *h = cresp_header(r, name);
    return h && strcmp(h, value) == 0;
}

bool header_is_ci(const struct cresp *r, const char *name, const char *value)
{
    const char *h = cresp_header(r, name);
    return h && strcasecmp(h, value) == 0;
}

bool body_has(struct cresp *r, const void *needle)
{
    return r->body && strstr(r->body, needle) != NULL;
}

bool got_status(struct cresp *r, const void *arg)
{
    (void)arg;
    return r->status != 0;
}
