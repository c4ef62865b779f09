/* events — see events.h. */
#include "events.h"

#include "log.h"
#include "util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct sub {
    struct sub *prev, *next;
    struct events *ev;
    struct http_request *req;
};

struct events {
    struct ev_loop *loop;
    struct sub *subs;
    size_t nsubs;
    ev_timer ping;
    struct events_request recent[EVENTS_RECENT];    /* a ring */
    size_t nrecent, head;       /* head: the oldest */
};

static void ping_cb(struct ev_loop *loop, ev_timer *w, int revents);

struct events *events_new(struct ev_loop *loop)
{
    struct events *ev = calloc(1, sizeof *ev);
    if (!ev)
        return NULL;
    ev->loop = loop;
    ev_timer_init(&ev->ping, ping_cb, EVENTS_PING_S, EVENTS_PING_S);
    ev->ping.data = ev;
    return ev;
}

static void sub_unlink(struct sub *s)
{
    struct events *ev = s->ev;
    if (s->prev)
        s->prev->next = s->next;
    else
        ev->subs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (--ev->nsubs == 0)
        ev_timer_stop(ev->loop, &ev->ping);
    free(s);
}

static void sub_gone(struct http_request *req, void *arg)
{
    (void)req;
    sub_unlink(arg);
}

/* Ends S's stream: properly (CUT false) or cut short. */
static void sub_end(struct sub *s, bool cut)
{
    struct http_request *req = s->req;
    http_request_unwatch(req);
    sub_unlink(s);
    if (cut)
        http_stream_abort(req);
    else
        http_stream_end(req);
}

void events_end_all(struct events *ev)
{
    while (ev && ev->subs)
        sub_end(ev->subs, false);
}

void events_free(struct events *ev)
{
    if (!ev)
        return;
    events_end_all(ev);
    ev_timer_stop(ev->loop, &ev->ping);
    free(ev);
}

bool events_wanted(const struct events *ev)
{
    return ev && ev->subs;
}

/* Queues FRAME for S; a subscriber that has fallen too far behind is cut
 * (false). */
static bool sub_send(struct sub *s, const char *frame, size_t len)
{
    if (http_stream_buffered(s->req) + len > EVENTS_MAX_BUFFERED) {
        log_warn("events: a subscriber that read nothing of the last %zu KiB was dropped",
                 http_stream_buffered(s->req) / 1024);
        sub_end(s, true);
        return false;
    }
    (void)http_stream_write(s->req, frame, len);   /* bounded above, not by pausing */
    return true;
}

/* "event: TYPE\ndata: JSON\n\n" for DATA (taken); NULL when out of memory. */
static char *frame_of(const char *type, json_t *data, size_t *len)
{
    char *json = json_dumps(data, JSON_COMPACT | JSON_REAL_PRECISION(6));
    json_decref(data);
    if (!json)
        return NULL;
    struct buf b = { 0 };
    bool ok = buf_printf(&b, "event: %s\ndata: %s\n\n", type, json);
    free(json);
    if (!ok) {
        buf_free(&b);
        return NULL;
    }
    *len = b.len;
    return b.data;
}

void events_publish(struct events *ev, const char *type, json_t *data)
{
    if (!data)
        return;
    if (!events_wanted(ev)) {
        json_decref(data);
        return;
    }
    size_t len;
    char *frame = frame_of(type, data, &len);
    if (!frame)
        return;
    for (struct sub *s = ev->subs, *next; s; s = next) {
        next = s->next;
        sub_send(s, frame, len);
    }
    free(frame);
}

static void set_number(json_t *o, const char *key, double v, int digits)
{
    if (v < 0 || !isfinite(v))
        return;
    double scale = pow(10, digits);
    json_object_set_new(o, key, json_real(round(v * scale) / scale));
}

static void set_count(json_t *o, const char *key, long v)
{
    if (v >= 0)
        json_object_set_new(o, key, json_integer(v));
}

json_t *events_request_json(const struct events_request *r)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "time", json_string(r->time));
    json_object_set_new(o, "model", util_json_string(r->model));
    if (r->instance[0])
        json_object_set_new(o, "instance", util_json_string(r->instance));
    json_object_set_new(o, "method", util_json_string(r->method));
    json_object_set_new(o, "path", util_json_string(r->path));
    json_object_set_new(o, "status", json_integer(r->status));
    if (r->timeout)
        json_object_set_new(o, "outcome", json_string("timeout"));
    set_number(o, "duration", r->duration, 4);
    set_number(o, "queued", r->queued, 4);
    set_number(o, "first_byte", r->first_byte, 4);
    set_count(o, "prompt_tokens", r->prompt_tokens);
    set_count(o, "cached_tokens", r->cached_tokens);
    set_count(o, "generated_tokens", r->generated_tokens);
    set_number(o, "tokens_per_s", r->tokens_per_s, 2);
    return o;
}

void events_request(struct events *ev, const struct events_request *r)
{
    if (!ev)
        return;
    size_t at = (ev->head + ev->nrecent) % EVENTS_RECENT;
    if (ev->nrecent == EVENTS_RECENT)
        ev->head = (ev->head + 1) % EVENTS_RECENT;
    else
        ev->nrecent++;
    ev->recent[at] = *r;
    if (events_wanted(ev))
        events_publish(ev, "request", events_request_json(r));
}

static void ping_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct events *ev = w->data;
    static const char ping[] = ": ping\n\n";
    for (struct sub *s = ev->subs, *next; s; s = next) {
        next = s->next;
        sub_send(s, ping, sizeof ping - 1);
    }
}

void events_subscribe(struct events *ev, struct http_request *req)
{
    struct sub *s = calloc(1, sizeof *s);
    if (!s) {
        http_respond_error(req, 503, NULL, "out of memory");
        return;
    }
    s->ev = ev;
    s->req = req;
    s->next = ev->subs;
    if (ev->subs)
        ev->subs->prev = s;
    ev->subs = s;
    if (ev->nsubs++ == 0)
        ev_timer_again(ev->loop, &ev->ping);
    http_request_watch(req, sub_gone, NULL, s);
    http_stream_begin(req, 200, "text/event-stream",
                      "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
    /* What it missed: the last requests, oldest first. */
    static const char hello[] = ": llama-pool events\n\n";
    if (!sub_send(s, hello, sizeof hello - 1))
        return;
    for (size_t i = 0; i < ev->nrecent; i++) {
        size_t len;
        char *frame = frame_of("request", events_request_json(&ev->recent[(ev->head + i) % EVENTS_RECENT]),
                               &len);
        bool ok = !frame || sub_send(s, frame, len);
        free(frame);
        if (!ok)
            return;
    }
}
