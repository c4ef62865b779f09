#define _GNU_SOURCE
#include "health.h"

#include "log.h"
#include "util.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct health {
    struct ev_loop *loop;
    CURLM *multi;
    ev_timer timer;            /* curl's own timeout */
    int running;
};

struct health_probe {
    struct health *h;
    CURL *easy;
    health_cb cb;
    void *arg;
    struct buf body;           /* at most HEALTH_BODY_MAX bytes kept */
    struct curl_slist *headers; /* Authorization, or NULL */
    char err[CURL_ERROR_SIZE];
};

/* One per socket curl tells us about. */
struct health_sock {
    ev_io io;
    struct health *h;
    curl_socket_t fd;
};

static void probe_free(struct health_probe *p)
{
    curl_slist_free_all(p->headers);
    buf_free(&p->body);
    free(p);
}

static void health_check_done(struct health *h)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(h->multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        struct health_probe *p = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&p);
        long status = 0;
        if (msg->data.result == CURLE_OK)
            curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
        else if (!p->err[0])
            snprintf(p->err, sizeof p->err, "%s", curl_easy_strerror(msg->data.result));
        curl_multi_remove_handle(h->multi, p->easy);
        curl_easy_cleanup(p->easy);
        p->easy = NULL;
        p->cb(p->arg, status, p->body.data ? p->body.data : "", p->body.len, status ? NULL : p->err);
        probe_free(p);
    }
}

static void health_socket_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    struct health_sock *s = (struct health_sock *)w;
    struct health *h = s->h;     /* s may be freed inside socket_action */
    int action = (revents & EV_READ ? CURL_CSELECT_IN : 0) |
                 (revents & EV_WRITE ? CURL_CSELECT_OUT : 0);
    curl_multi_socket_action(h->multi, s->fd, action, &h->running);
    health_check_done(h);
}

static void health_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct health *h = w->data;
    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &h->running);
    health_check_done(h);
}

/* CURLMOPT_SOCKETFUNCTION: curl says which events it wants on a socket. */
static int health_sock_fn(CURL *easy, curl_socket_t fd, int what, void *userp, void *sockp)
{
    (void)easy;
    struct health *h = userp;
    struct health_sock *s = sockp;

    if (what == CURL_POLL_REMOVE) {
        if (s) {
            ev_io_stop(h->loop, &s->io);
            free(s);
            curl_multi_assign(h->multi, fd, NULL);
        }
        return 0;
    }
    int events = (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s)
            return -1;
        s->h = h;
        s->fd = fd;
        curl_multi_assign(h->multi, fd, s);
    } else {
        ev_io_stop(h->loop, &s->io);
    }
    ev_io_init(&s->io, health_socket_cb, fd, events);
    ev_io_start(h->loop, &s->io);
    return 0;
}

/* CURLMOPT_TIMERFUNCTION. Note: milliseconds to seconds as a double; the
 * integer division in curl's evhiperfifo example would turn 999 ms into 0. */
static int health_timer_fn(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    struct health *h = userp;
    ev_timer_stop(h->loop, &h->timer);
    if (timeout_ms >= 0) {
        ev_timer_set(&h->timer, (double)timeout_ms / 1000.0, 0.);
        ev_timer_start(h->loop, &h->timer);
    }
    return 0;
}

/* Every fd of ours is close-on-exec, curl's sockets included. */
static int health_sockopt_fn(void *userp, curl_socket_t fd, curlsocktype purpose)
{
    (void)userp; (void)purpose;
    int flags = fcntl(fd, F_GETFD);
    if (flags >= 0)
        (void)fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
    return CURL_SOCKOPT_OK;
}

static size_t health_write_fn(char *data, size_t size, size_t nmemb, void *userp)
{
    struct health_probe *p = userp;
    size_t n = size * nmemb;
    size_t room = HEALTH_BODY_MAX - p->body.len;
    size_t take = n < room ? n : room;
    if (take && !buf_append(&p->body, data, take))
        return 0;               /* aborts the transfer with CURLE_WRITE_ERROR */
    return n;
}

struct health *health_new(struct ev_loop *loop)
{
    struct health *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->loop = loop;
    h->multi = curl_multi_init();
    /* Its wake-up socketpair is made without close-on-exec (libcurl 7.88). */
    util_cloexec_all();
    if (!h->multi) {
        free(h);
        return NULL;
    }
    ev_timer_init(&h->timer, health_timer_cb, 0., 0.);
    h->timer.data = h;
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, health_sock_fn);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, health_timer_fn);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_MAXCONNECTS, 256L);
    return h;
}

void health_free(struct health *h)
{
    if (!h)
        return;
    ev_timer_stop(h->loop, &h->timer);
    curl_multi_cleanup(h->multi);   /* probes must have been cancelled */
    free(h);
}

/* "Authorization: Bearer KEY" as a curl header list; NULL with errno set. */
static struct curl_slist *bearer_header(const char *key)
{
    if (strpbrk(key, "\r\n")) {
        errno = EINVAL;
        return NULL;
    }
    char *line;
    if (asprintf(&line, "Authorization: Bearer %s", key) < 0) {
        errno = ENOMEM;
        return NULL;
    }
    struct curl_slist *list = curl_slist_append(NULL, line);   /* copies LINE */
    free(line);
    if (!list)
        errno = ENOMEM;
    return list;
}

struct health_probe *health_get_key(struct health *h, const char *url, long timeout_ms,
                                    const char *key, health_cb cb, void *arg)
{
    struct health_probe *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->h = h;
    p->cb = cb;
    p->arg = arg;
    if (key && !(p->headers = bearer_header(key))) {
        free(p);
        return NULL;
    }
    p->easy = curl_easy_init();
    if (!p->easy) {
        probe_free(p);
        return NULL;
    }
    curl_easy_setopt(p->easy, CURLOPT_URL, url);
    curl_easy_setopt(p->easy, CURLOPT_PRIVATE, p);
    curl_easy_setopt(p->easy, CURLOPT_WRITEFUNCTION, health_write_fn);
    curl_easy_setopt(p->easy, CURLOPT_WRITEDATA, p);
    curl_easy_setopt(p->easy, CURLOPT_ERRORBUFFER, p->err);
    curl_easy_setopt(p->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(p->easy, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(p->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(p->easy, CURLOPT_SOCKOPTFUNCTION, health_sockopt_fn);
    curl_easy_setopt(p->easy, CURLOPT_PROXY, "");        /* never an http_proxy */
    curl_easy_setopt(p->easy, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(p->easy, CURLOPT_USERAGENT, "llama-pool");
    if (p->headers)
        curl_easy_setopt(p->easy, CURLOPT_HTTPHEADER, p->headers);
    if (curl_multi_add_handle(h->multi, p->easy) != CURLM_OK) {
        curl_easy_cleanup(p->easy);
        probe_free(p);
        return NULL;
    }
    return p;
}

struct health_probe *health_get(struct health *h, const char *url, long timeout_ms,
                                health_cb cb, void *arg)
{
    return health_get_key(h, url, timeout_ms, NULL, cb, arg);
}

void health_cancel(struct health_probe *p)
{
    if (!p)
        return;
    curl_multi_remove_handle(p->h->multi, p->easy);
    curl_easy_cleanup(p->easy);
    probe_free(p);
}
