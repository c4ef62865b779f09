#define _GNU_SOURCE
#include "api.h"

#include "config.h"
#include "log.h"
#include "pool.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---------- helpers ---------- */

static void respond_json(struct http_request *req, int status, json_t *body)
{
    char *s = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (!s) {
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    size_t n = strlen(s);
    s[n] = '\n';   /* json_dumps leaves room for the NUL: reuse it */
    http_respond(req, status, "application/json", NULL, s, n + 1);
    free(s);
}

static bool stream_json(struct http_request *req, json_t *obj)
{
    char *s = json_dumps(obj, JSON_COMPACT);
    json_decref(obj);
    if (!s)
        return false;
    size_t n = strlen(s);
    s[n] = '\n';
    bool ok = http_stream_write(req, s, n + 1);
    free(s);
    return ok;
}

static void respond_unknown_model(struct http_request *req, struct pool *p, const char *name)
{
    /* List the known names so the caller can see a typo. */
    size_t cap = 256, len = 0;
    char *list = malloc(cap);
    if (!list) {
        http_respond_error(req, 404, "not_found_error", "model \"%s\" not found", name);
        return;
    }
    list[0] = '\0';
    for (size_t i = 0; i < p->nmodels; i++) {
        const char *n = p->models[i]->cfg->name;
        size_t need = len + strlen(n) + 3;
        if (i == 50) {                      /* thousands of models: cut */
            char more[64];
            int k = snprintf(more, sizeof more, ", … (%zu more)", p->nmodels - 50);
            need = len + (size_t)k + 1;
            if (need > cap && !(list = realloc(list, cap = need)))
                break;
            memcpy(list + len, more, (size_t)k + 1);
            break;
        }
        if (need > cap) {
            char *l = realloc(list, cap = need * 2);
            if (!l)
                break;
            list = l;
        }
        len += (size_t)sprintf(list + len, "%s%s", i ? ", " : "", n);
    }
    http_respond_error(req, 404, "not_found_error", "model \"%s\" not found; known models: %s",
                       name, list && *list ? list : "(none)");
    free(list);
}

static bool query_flag(struct http_request *req, const char *name)
{
    char *v = http_query_get(req, name);
    bool on = v && (!*v || strcmp(v, "1") == 0 || strcasecmp(v, "true") == 0 || strcasecmp(v, "yes") == 0);
    free(v);
    return on;
}

static long query_long(struct http_request *req, const char *name, long dflt, bool *bad)
{
    char *v = http_query_get(req, name);
    if (!v)
        return dflt;
    char *end;
    long n = strtol(v, &end, 10);
    if (!*v || *end || n < 0)
        *bad = true;
    free(v);
    return n;
}

/* ---------- waiting for a model: start?wait=1, stop?wait=1, logs?follow=1 ---------- */

enum wait_goal { WAIT_READY, WAIT_STOPPED, WAIT_FOLLOW };

struct waiter {
    struct pool_observer obs;
    struct http_request *req;
    enum wait_goal goal;
    unsigned target;            /* WAIT_READY: instances that must be ready */
    bool done;
};

static void waiter_free(struct waiter *w)
{
    pool_unobserve(&w->obs);
    free(w);
}

static void waiter_finish(struct waiter *w)
{
    if (w->done)
        return;
    w->done = true;
    w->req->on_close = NULL;
    w->req->on_drain = NULL;
    http_stream_end(w->req);
    waiter_free(w);
}

static json_t *event_json(const char *event, struct pool_model *m)
{
    json_t *o = json_object();
    json_object_set_new(o, "event", json_string(event));
    json_object_set_new(o, "model", json_string(m->cfg->name));
    return o;
}

/* The last log lines of an instance, for a failed start. */
static json_t *tail_json(const struct instance *inst, size_t n)
{
    json_t *a = json_array();
    size_t have = logring_count(&inst->tail);
    if (n > have)
        n = have;
    for (size_t i = n; i-- > 0; )
        json_array_append_new(a, json_string(logring_last(&inst->tail, i)));
    return a;
}

static void waiter_check(struct waiter *w, const struct pool_event *ev)
{
    struct pool_model *m = w->obs.model;
    if (w->goal == WAIT_READY) {
        /* A crash (straight from starting, or after a start_timeout stop)
         * lands in BACKOFF or FAILED; an operator's stop in STOPPED. */
        if (ev && ev->kind == POOL_EV_STATE &&
            (ev->inst->state == INSTANCE_BACKOFF || ev->inst->state == INSTANCE_FAILED ||
             (ev->inst->state == INSTANCE_STOPPED && !ev->inst->restart_after_stop))) {
            json_t *o = event_json("failed", m);
            json_object_set_new(o, "instance", json_string(ev->inst->id));
            json_object_set_new(o, "error", json_string(ev->inst->last_error ? ev->inst->last_error
                                                                             : "stopped while starting"));
            json_object_set_new(o, "log", tail_json(ev->inst, 20));
            stream_json(w->req, o);
            waiter_finish(w);
            return;
        }
        if (pool_model_count(m, INSTANCE_READY) >= w->target) {
            json_t *o = event_json("ready", m);
            json_object_set_new(o, "status", pool_model_json(m));
            stream_json(w->req, o);
            waiter_finish(w);
        }
    } else if (w->goal == WAIT_STOPPED) {
        bool any = false;
        for (size_t i = 0; i < m->ninst; i++)
            any |= instance_has_process(m->inst[i]);
        if (!any) {
            stream_json(w->req, event_json("stopped", m));
            waiter_finish(w);
        }
    }
}

static void waiter_event(struct pool_observer *obs, const struct pool_event *ev)
{
    struct waiter *w = (struct waiter *)obs;
    if (ev->kind == POOL_EV_GONE) {
        json_t *o = event_json("failed", ev->model);
        json_object_set_new(o, "error", json_string("the model was removed by a reload"));
        stream_json(w->req, o);
        w->obs.next = w->obs.prev = NULL;    /* already unlinked by the pool */
        waiter_finish(w);
        return;
    }
    if (ev->kind == POOL_EV_LOG) {
        if (w->goal == WAIT_FOLLOW) {
            size_t n = strlen(ev->line);
            char *line = malloc(n + 1);
            if (line) {
                memcpy(line, ev->line, n);
                line[n] = '\n';
                /* A follower that cannot keep up loses no lines: http buffers. */
                (void)http_stream_write(w->req, line, n + 1);
                free(line);
            }
        } else if (w->goal == WAIT_READY && ev->inst) {
            json_t *o = event_json("log", ev->model);
            json_object_set_new(o, "instance", json_string(ev->inst->id));
            json_object_set_new(o, "line", json_string(ev->line));
            stream_json(w->req, o);
        }
        return;
    }
    if (w->goal != WAIT_FOLLOW) {
        json_t *o = event_json("state", ev->model);
        json_object_set_new(o, "instance", json_string(ev->inst->id));
        json_object_set_new(o, "state", json_string(instance_state_name(ev->inst->state)));
        if (ev->inst->pid > 0)
            json_object_set_new(o, "pid", json_integer(ev->inst->pid));
        if (ev->inst->port)
            json_object_set_new(o, "port", json_integer(ev->inst->port));
        stream_json(w->req, o);
    }
    waiter_check(w, ev);
}

static void waiter_gone(struct http_request *req, void *arg)
{
    (void)req;
    waiter_free(arg);
}

static void wait_on(struct http_request *req, struct pool_model *m, enum wait_goal goal,
                    unsigned target, const char *content_type)
{
    struct waiter *w = calloc(1, sizeof *w);
    if (!w) {
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    w->req = req;
    w->goal = goal;
    w->target = target;
    w->obs.fn = waiter_event;
    w->obs.arg = w;
    pool_observe(m, &w->obs);
    req->on_close = waiter_gone;
    req->arg = w;
    http_stream_begin(req, 200, content_type, "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
    waiter_check(w, NULL);
}

/* ---------- routes ---------- */

static void route_status(struct http_request *req, struct pool *p)
{
    char *name = http_query_get(req, "model");
    struct pool_model *only = NULL;
    if (name && *name && !(only = pool_find(p, name))) {
        respond_unknown_model(req, p, name);
        free(name);
        return;
    }
    free(name);
    respond_json(req, 200, pool_status_json(p, only));
}

static void route_model_action(struct http_request *req, struct pool_model *m,
                               const char *action)
{
    bool bad = false;
    bool wait = query_flag(req, "wait");
    char err[512];

    if (strcmp(action, "logs") == 0) {
        if (strcmp(req->method, "GET") != 0) {
            http_respond_error(req, 405, NULL, "use GET for logs");
            return;
        }
        long lines = query_long(req, "lines", 50, &bad);
        if (bad) {
            http_respond_error(req, 400, NULL, "lines must be a whole number");
            return;
        }
        size_t have = m->log.lines ? logring_count(&m->log) : 0;
        size_t n = (size_t)lines < have ? (size_t)lines : have;
        bool follow = query_flag(req, "follow");
        http_stream_begin(req, 200, "text/plain; charset=utf-8",
                          follow ? "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n" : NULL);
        for (size_t i = n; i-- > 0; ) {
            const char *l = logring_last(&m->log, i);
            http_stream_write(req, l, strlen(l));
            http_stream_write(req, "\n", 1);
        }
        if (!follow) {
            http_stream_end(req);
            return;
        }
        struct waiter *w = calloc(1, sizeof *w);
        if (!w) {
            http_stream_end(req);
            return;
        }
        w->req = req;
        w->goal = WAIT_FOLLOW;
        w->obs.fn = waiter_event;
        pool_observe(m, &w->obs);
        req->on_close = waiter_gone;
        req->arg = w;
        return;
    }

    if (strcmp(req->method, "POST") != 0) {
        http_respond_error(req, 405, NULL, "use POST for %s", action);
        return;
    }
    if (strcmp(action, "start") == 0) {
        long n = query_long(req, "instances", 0, &bad);
        if (bad) {
            http_respond_error(req, 400, NULL, "instances must be a whole number");
            return;
        }
        if (pool_model_start(m, (unsigned)n, err, sizeof err) < 0) {
            http_respond_error(req, 409, "invalid_request_error", "%s", err);
            return;
        }
        log_info("%s: start requested (%ld instance%s)", m->cfg->name, n ? n : 1, n > 1 ? "s" : "");
        if (wait)
            wait_on(req, m, WAIT_READY, n ? (unsigned)n : 1, "application/x-ndjson");
        else
            respond_json(req, 202, pool_model_json(m));
    } else if (strcmp(action, "stop") == 0) {
        log_info("%s: stop requested", m->cfg->name);
        pool_model_stop(m);
        if (wait)
            wait_on(req, m, WAIT_STOPPED, 0, "application/x-ndjson");
        else
            respond_json(req, 202, pool_model_json(m));
    } else if (strcmp(action, "restart") == 0) {
        log_info("%s: restart requested", m->cfg->name);
        pool_model_restart(m);
        if (wait)
            wait_on(req, m, WAIT_READY, 1, "application/x-ndjson");
        else
            respond_json(req, 202, pool_model_json(m));
    } else {
        http_respond_error(req, 404, "not_found_error", "unknown action \"%s\"", action);
    }
}

static void route_reload(struct http_request *req, struct api *api)
{
    if (strcmp(req->method, "POST") != 0) {
        http_respond_error(req, 405, NULL, "use POST for reload");
        return;
    }
    json_t *result = NULL;
    int rc = api->reload(api, &result);
    respond_json(req, rc == 0 ? 200 : 400, result);
}

static bool admin_allowed(struct http_request *req, struct pool *p)
{
    if (req->is_unix)
        return true;
    const char *key = p->cfg->admin_key;
    if (!key || !*key) {
        http_respond_error(req, 403, "permission_error",
                           "the control API is served on the control socket only; set admin_key in pool.conf to allow it over TCP");
        return false;
    }
    const char *auth = http_header_get(req, "Authorization");
    const char *xkey = http_header_get(req, "X-Api-Key");
    if ((auth && strncasecmp(auth, "Bearer ", 7) == 0 && strcmp(auth + 7, key) == 0) ||
        (xkey && strcmp(xkey, key) == 0))
        return true;
    http_respond_error(req, 401, "authentication_error", "Invalid API Key");
    return false;
}

void api_handle(struct http_request *req, void *arg)
{
    struct api *api = arg;
    struct pool *p = api->pool;
    const char *path = req->path;

    if (strcmp(path, "/health") == 0) {
        respond_json(req, 200, json_pack("{s:s}", "status", "ok"));
        return;
    }
    if (strncmp(path, "/pool/", 6) != 0) {
        http_respond_error(req, 404, "not_found_error", "File Not Found");
        return;
    }
    if (!admin_allowed(req, p))
        return;
    if (strcmp(path, "/pool/status") == 0) {
        route_status(req, p);
        return;
    }
    if (strcmp(path, "/pool/reload") == 0) {
        route_reload(req, api);
        return;
    }
    if (strncmp(path, "/pool/models/", 13) == 0) {
        const char *name = path + 13;
        const char *slash = strchr(name, '/');
        if (slash && slash != name && slash[1] && !strchr(slash + 1, '/')) {
            char *model = strndup(name, (size_t)(slash - name));
            struct pool_model *m = model ? pool_find(p, model) : NULL;
            if (!m)
                respond_unknown_model(req, p, model ? model : "");
            else
                route_model_action(req, m, slash + 1);
            free(model);
            return;
        }
    }
    http_respond_error(req, 404, "not_found_error", "File Not Found");
}
