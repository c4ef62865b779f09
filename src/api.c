#define _GNU_SOURCE
#include "api.h"

#include "build_config.h"

#include "affinity.h"
#include "child_metrics.h"
#include "config.h"
#include "events.h"
#include "gpu.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "router.h"
#include "usage.h"
#include "util.h"

#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <strings.h>
#include <time.h>

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
    /* List the known names so the caller can see a typo; out of memory
     * cuts the list, never the answer. */
    struct buf list = { 0 };
    bool ok = true;
    for (size_t i = 0; i < p->nmodels && ok; i++) {
        if (i == 50) {                      /* thousands of models: cut */
            ok = buf_printf(&list, ", … (%zu more)", p->nmodels - 50);
            break;
        }
        ok = buf_printf(&list, "%s%s", i ? ", " : "", p->models[i]->cfg->name);
    }
    http_respond_error(req, 404, "not_found_error", "model \"%s\" not found; known models: %s",
                       name, list.len ? list.data : "(none)");
    buf_free(&list);
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

/* ---------- status JSON: the pool's state and the scheduler's view ---------- */

static json_t *instance_json(const struct api *api, const struct instance *inst)
{
    double now = ev_now(api->pool->loop);
    struct router_inst_view v;
    router_instance_view(api->router, inst, &v);
    json_t *o = json_object();
    json_object_set_new(o, "id", util_json_string(inst->id));
    json_object_set_new(o, "state", json_string(instance_state_name(inst->state)));
    json_object_set_new(o, "pid", inst->pid > 0 ? json_integer(inst->pid) : json_null());
    json_object_set_new(o, "port", inst->port ? json_integer(inst->port) : json_null());
    json_object_set_new(o, "uptime_s", json_real(inst->pid > 0 ? now - inst->spawned_at : 0));
    json_object_set_new(o, "restarts", json_integer(inst->restarts));
    json_object_set_new(o, "memory", json_integer((json_int_t)inst->pss));
    /* Its cgroup (cgroup.h): memory.current beside PSS, memory.max. */
    bool cg = inst->pid > 0 && inst->cgroup.name[0];
    json_object_set_new(o, "cgroup", cg ? util_json_string(inst->cgroup.name) : json_null());
    json_object_set_new(o, "cgroup_memory", cg ? json_integer((json_int_t)inst->cgroup.current) : json_null());
    json_object_set_new(o, "memory_max", cg && inst->cgroup.limit ? json_integer((json_int_t)inst->cgroup.limit)
                                                                 : json_null());
    json_object_set_new(o, "oom_kills", json_integer(inst->oom_kills));
    json_object_set_new(o, "charge", json_integer((json_int_t)v.charge));
    json_object_set_new(o, "slots", json_integer(inst->slots));
    json_object_set_new(o, "in_flight", json_integer(v.in_flight));
    json_t *device = v.device >= 0 ? json_integer(v.device) : json_null();
    if (v.device == ROUTER_DEVICE_SPLIT) {       /* the devices its args split it over */
        json_decref(device);
        device = json_array();
        for (unsigned d = 0; d < ROUTER_MAX_DEVICES; d++)
            if (v.devices & (1u << d))
                json_array_append_new(device, json_integer(d));
    }
    json_object_set_new(o, "device", device);
    json_object_set_new(o, "vram", json_integer((json_int_t)v.vram));
    json_object_set_new(o, "last_used_s_ago", v.last_used > 0 ? json_real(now - v.last_used) : json_null());
    json_object_set_new(o, "last_error", inst->last_error ? util_json_string(inst->last_error) : json_null());
    if (inst->state == INSTANCE_BACKOFF)
        json_object_set_new(o, "next_start_s", json_real(inst->next_start_at > now ? inst->next_start_at - now : 0));
    return o;
}

static json_t *model_json(const struct api *api, const struct pool_model *m)
{
    json_t *o = json_object();
    json_t *aliases = json_array();
    for (size_t i = 0; i < m->cfg->naliases; i++)
        json_array_append_new(aliases, util_json_string(m->cfg->aliases[i]));
    json_object_set_new(o, "name", util_json_string(m->cfg->name));
    json_object_set_new(o, "aliases", aliases);
    json_object_set_new(o, "state", json_string(pool_model_state_name(pool_model_state(m))));
    json_object_set_new(o, "pinned", json_boolean(m->cfg->pin));
    json_object_set_new(o, "priority", json_integer(m->cfg->priority));
    json_object_set_new(o, "path", util_json_string(m->cfg->path));
    json_object_set_new(o, "instances_min", json_integer(m->cfg->instances_min));
    json_object_set_new(o, "instances_max", json_integer(m->cfg->instances_max));
    json_object_set_new(o, "memory_estimate",
                        json_integer(m->est_known ? (json_int_t)(m->est->weights + m->est->more) : 0));
    uint64_t vram = !router_devices(api->router) ? 0 : m->cfg->gpu_memory ? m->cfg->gpu_memory
                    : m->est_known ? m->est->vram_total : 0;
    json_object_set_new(o, "vram_estimate", json_integer((json_int_t)vram));
    json_object_set_new(o, "waiting", json_integer((json_int_t)router_waiting_model(api->router, m)));
    const char *err = pool_model_error(m);
    json_object_set_new(o, "last_error", err ? util_json_string(err) : json_null());
    json_t *insts = json_array();
    for (size_t i = 0; i < m->ninst; i++)
        json_array_append_new(insts, instance_json(api, m->inst[i]));
    json_object_set_new(o, "instances", insts);
    return o;
}

/* ---------- GET /pool/status ---------- */

/* *N from TEXT, a whole number (digits only: no sign, no space) of at
 * most MAX; false when it is none. */
static bool whole_number(const char *text, size_t max, size_t *n)
{
    if (!*text || strspn(text, "0123456789") != strlen(text))
        return false;
    errno = 0;
    unsigned long long v = strtoull(text, NULL, 10);
    if (errno == ERANGE || v > max)
        return false;
    *n = (size_t)v;
    return true;
}

int api_status_query(const char *summary, const char *offset, const char *limit, bool model,
                     struct api_status_query *q, char *err, size_t errlen)
{
    *q = (struct api_status_query){ .limit = API_STATUS_MAX_LIMIT };
    if (summary && *summary && config_parse_bool(summary, &q->summary) < 0) {
        snprintf(err, errlen, "summary must be 1 or 0, not \"%.40s\"", summary);
        return -1;
    }
    if (summary && !*summary)           /* ?summary alone, as ?wait and ?follow */
        q->summary = true;
    if (offset && !whole_number(offset, SIZE_MAX, &q->offset)) {
        snprintf(err, errlen, "offset must be a whole number (0 or more), not \"%.40s\"", offset);
        return -1;
    }
    if (limit && (!whole_number(limit, API_STATUS_MAX_LIMIT, &q->limit) || q->limit == 0)) {
        snprintf(err, errlen, "limit must be a whole number from 1 to %d, not \"%.40s\"",
                 API_STATUS_MAX_LIMIT, limit);
        return -1;
    }
    q->paged = offset || limit;
    if (model && (q->summary || q->paged)) {
        snprintf(err, errlen, "model= names one model: it takes no summary, offset or limit");
        return -1;
    }
    if (q->summary && q->paged) {
        snprintf(err, errlen, "summary=1 lists only the models with instances: it takes no offset or "
                 "limit (page the full status instead)");
        return -1;
    }
    return 0;
}

/* Every model by its state, and every instance by its public state (an
 * instance waiting to restart counts as starting, as it shows). */
static json_t *status_counts(const struct pool *p)
{
    size_t models[POOL_MODEL_STATES] = { 0 };
    size_t insts[INSTANCE_FAILED + 1] = { 0 };
    for (size_t i = 0; i < p->nmodels; i++) {
        const struct pool_model *m = p->models[i];
        models[pool_model_state(m)]++;
        for (size_t j = 0; j < m->ninst; j++)
            insts[m->inst[j]->state]++;
    }
    json_t *by_model = json_object(), *by_inst = json_object();
    for (int s = 0; s < POOL_MODEL_STATES; s++)
        json_object_set_new(by_model, pool_model_state_name((enum pool_model_state)s),
                            json_integer((json_int_t)models[s]));
    for (int s = 0; s <= INSTANCE_FAILED; s++) {
        const char *name = instance_state_name((enum instance_state)s);
        json_int_t before = json_integer_value(json_object_get(by_inst, name));
        json_object_set_new(by_inst, name, json_integer(before + (json_int_t)insts[s]));
    }
    return json_pack("{s:o,s:o}", "models", by_model, "instances", by_inst);
}

/* What every status has besides "models": memory, devices, queue, uptime,
 * the config file and the number of models configured. */
static json_t *status_head(const struct api *api)
{
    const struct pool *p = api->pool;
    uint64_t avail;
    uint64_t budget = pool_budget(p, &avail);
    json_t *root = json_object();
    json_t *mem = json_object();
    json_object_set_new(mem, "budget", json_integer((json_int_t)budget));
    json_object_set_new(mem, "reserve", json_integer((json_int_t)p->cfg->memory_reserve));
    json_object_set_new(mem, "used", json_integer((json_int_t)router_used(api->router)));
    json_object_set_new(mem, "measured", json_integer((json_int_t)pool_measured(p)));
    json_object_set_new(mem, "available", json_integer((json_int_t)avail));
    bool cgroups = p->cgroups && p->cgroups->enabled;
    if (cgroups)
        json_object_set_new(mem, "cgroup_measured", json_integer((json_int_t)pool_cgroup_measured(p)));
    json_object_set_new(root, "memory", mem);
    json_t *cg = json_object();
    json_object_set_new(cg, "enabled", json_boolean(cgroups));
    json_object_set_new(cg, "path", cgroups ? util_json_string(p->cgroups->dir) : json_null());
    json_object_set_new(cg, "reason", cgroups || !p->cgroups ? json_null() : util_json_string(p->cgroups->reason));
    json_object_set_new(root, "cgroup", cg);
    json_t *devices = json_array();
    struct router_dev_view dv;
    for (size_t d = 0; router_device_view(api->router, d, &dv); d++) {
        json_t *o = json_pack("{s:i,s:o,s:o,s:I,s:I,s:I,s:I,s:I,s:b}",
                              "index", (int)dv.gpu->index, "name", util_json_string(dv.gpu->name),
                              "uuid", util_json_string(dv.gpu->uuid),
                              "total", (json_int_t)dv.gpu->total, "budget", (json_int_t)dv.budget,
                              "used", (json_int_t)dv.used, "measured", (json_int_t)dv.measured,
                              "free", (json_int_t)dv.gpu->free, "lost", dv.gpu->lost);
        if (o)
            json_array_append_new(devices, o);
    }
    json_object_set_new(root, "devices", devices);
    json_t *queue = json_object();
    json_object_set_new(queue, "waiting", json_integer((json_int_t)router_waiting(api->router)));
    json_object_set_new(queue, "max", json_integer(p->cfg->max_queue));
    json_object_set_new(root, "queue", queue);
    json_object_set_new(root, "uptime_s", json_real(ev_now(p->loop) - p->started_at));
    json_object_set_new(root, "pid", json_integer(getpid()));
    json_object_set_new(root, "version", json_string(LLAMA_POOL_VERSION));
    json_object_set_new(root, "upgrades", json_integer(p->upgrades));
    json_object_set_new(root, "config", util_json_string(p->cfg->file ? p->cfg->file : ""));
    json_object_set_new(root, "total", json_integer((json_int_t)p->nmodels));
    return root;
}

static int append_to_buf(const char *data, size_t n, void *arg)
{
    return buf_append(arg, data, n) ? 0 : -1;
}

/* OBJ (taken) as compact JSON at the end of OUT. */
static bool buf_put_json(struct buf *out, json_t *obj)
{
    bool ok = obj && json_dump_callback(obj, append_to_buf, out, JSON_COMPACT) == 0;
    json_decref(obj);
    return ok;
}

/* Whether a summary lists M: it has instances (in any state) or requests
 * waiting for one. */
static bool summary_lists(const struct api *api, const struct pool_model *m)
{
    return m->ninst > 0 || router_waiting_model(api->router, m) > 0;
}

/* The status that Q asks for (ONLY: the one model named). The document is
 * written a model at a time after its head, whose closing brace becomes
 * ,"models":[…]}: ten thousand models as one jansson tree took ten times
 * the size of their text, and malloc kept it after. */
static void respond_status(struct http_request *req, const struct api *api,
                           const struct api_status_query *q, struct pool_model *only)
{
    const struct pool *p = api->pool;
    json_t *head = status_head(api);
    if (q->summary) {
        json_object_set_new(head, "summary", json_true());
        json_object_set_new(head, "counts", status_counts(p));
    }
    if (q->paged) {
        json_object_set_new(head, "offset", json_integer((json_int_t)q->offset));
        json_object_set_new(head, "limit", json_integer((json_int_t)q->limit));
    }
    struct buf out = { 0 };
    bool ok = buf_put_json(&out, head) && out.len >= 2 && out.data[out.len - 1] == '}';
    if (ok) {
        buf_set_len(&out, out.len - 1);
        ok = buf_puts(&out, out.data[out.len - 1] == '{' ? "\"models\":[" : ",\"models\":[");
    }
    size_t from = 0, to = p->nmodels, listed = 0;
    if (q->paged) {
        from = q->offset < p->nmodels ? q->offset : p->nmodels;
        to = from + (q->limit < p->nmodels - from ? q->limit : p->nmodels - from);
    }
    for (size_t i = from; ok && i < to; i++) {
        struct pool_model *m = p->models[i];
        if ((only && m != only) || (q->summary && !summary_lists(api, m)))
            continue;
        ok = (!listed++ || buf_putc(&out, ',')) && buf_put_json(&out, model_json(api, m));
    }
    ok = ok && buf_puts(&out, "]}\n");
    if (ok)
        http_respond(req, 200, "application/json", NULL, out.data, out.len);
    else
        http_respond_error(req, 500, NULL, "out of memory");
    buf_free(&out);
}

/* ---------- waiting for a model: start?wait=1, stop?wait=1, logs?follow=1 ---------- */

enum wait_goal { WAIT_READY, WAIT_STOPPED, WAIT_FOLLOW };

struct waiter {
    struct pool_observer obs;
    const struct api *api;
    struct http_request *req;
    enum wait_goal goal;
    unsigned target;            /* WAIT_READY: instances that must be ready */
    bool done;
    bool *finished;             /* set when the waiter ends, if not NULL */
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
    if (w->finished)
        *w->finished = true;
    http_request_unwatch(w->req);
    http_stream_end(w->req);
    waiter_free(w);
}

static json_t *event_json(const char *event, struct pool_model *m)
{
    json_t *o = json_object();
    json_object_set_new(o, "event", json_string(event));
    json_object_set_new(o, "model", util_json_string(m->cfg->name));
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
        json_array_append_new(a, util_json_string(logring_last(&inst->tail, i)));
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
            json_object_set_new(o, "instance", util_json_string(ev->inst->id));
            json_object_set_new(o, "error", util_json_string(ev->inst->last_error ? ev->inst->last_error
                                                                             : "stopped while starting"));
            json_object_set_new(o, "log", tail_json(ev->inst, 20));
            stream_json(w->req, o);
            waiter_finish(w);
            return;
        }
        if (pool_model_count(m, INSTANCE_READY) >= w->target) {
            json_t *o = event_json("ready", m);
            json_object_set_new(o, "status", model_json(w->api, m));
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
        if (w->goal == WAIT_FOLLOW) {
            static const char gone[] = "[llama-pool] the model was removed by a reload\n";
            http_stream_write(w->req, gone, sizeof gone - 1);
        } else {
            json_t *o = event_json("failed", ev->model);
            json_object_set_new(o, "error", json_string("the model was removed by a reload"));
            stream_json(w->req, o);
        }
        waiter_finish(w);
        return;
    }
    if (ev->kind == POOL_EV_REPLACED || ev->kind == POOL_EV_CLOSING) {
        if (w->goal == WAIT_FOLLOW) {
            static const char replaced[] = API_FOLLOW_REPLACED "\n";
            static const char closing[] = "[llama-pool] the daemon is stopping\n";
            if (ev->kind == POOL_EV_REPLACED)
                http_stream_write(w->req, replaced, sizeof replaced - 1);
            else
                http_stream_write(w->req, closing, sizeof closing - 1);
            waiter_finish(w);
        }
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
            json_object_set_new(o, "instance", util_json_string(ev->inst->id));
            json_object_set_new(o, "line", util_json_string(ev->line));
            stream_json(w->req, o);
        }
        return;
    }
    if (w->goal != WAIT_FOLLOW) {
        json_t *o = event_json("state", ev->model);
        json_object_set_new(o, "instance", util_json_string(ev->inst->id));
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

enum model_op { OP_START, OP_STOP, OP_RESTART };

/* Perform OP on M; with WAIT, stream its progress as NDJSON until GOAL.
 * The stream begins and the waiter subscribes before the operation, so the
 * first events (the spawn itself) are seen too. */
static void model_op(struct http_request *req, const struct api *api, struct pool_model *m,
                     enum model_op op, unsigned n, bool wait)
{
    static const char *const names[] = { "start", "stop", "restart" };
    char err[512] = "";
    int rc = 0;
    struct waiter *w = NULL;
    bool finished = false;

    log_info("%s: %s requested%s", m->cfg->name, names[op], op == OP_START && n > 1 ? " (several instances)" : "");
    if (wait) {
        if (!(w = calloc(1, sizeof *w))) {
            http_respond_error(req, 500, NULL, "out of memory");
            return;
        }
        w->api = api;
        w->req = req;
        w->goal = op == OP_STOP ? WAIT_STOPPED : WAIT_READY;
        w->target = op == OP_START && n ? n : 1;
        w->obs.fn = waiter_event;
        w->obs.arg = w;
        w->finished = &finished;
        http_stream_begin(req, 200, "application/x-ndjson", "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
        pool_observe(m, &w->obs);
        http_request_watch(req, waiter_gone, NULL, w);
    }
    switch (op) {
    case OP_START:   rc = pool_model_start(m, n, err, sizeof err); break;
    case OP_STOP:    pool_model_stop(m); break;
    case OP_RESTART: pool_model_restart(m); break;
    }
    if (!wait) {
        if (rc < 0)
            http_respond_error(req, 502, "server_error", "%s: failed to start: %s", m->cfg->name, err);
        else
            respond_json(req, 202, model_json(api, m));
        return;
    }
    if (finished)               /* the events already told the whole story */
        return;
    w->finished = NULL;
    if (rc < 0) {
        json_t *o = event_json("failed", m);
        json_object_set_new(o, "error", util_json_string(err));
        stream_json(req, o);
        waiter_finish(w);
        return;
    }
    waiter_check(w, NULL);
}

/* ---------- routes ---------- */

static void route_status(struct http_request *req, const struct api *api)
{
    struct pool *p = api->pool;
    char *name = http_query_get(req, "model");
    char *summary = http_query_get(req, "summary");
    char *offset = http_query_get(req, "offset");
    char *limit = http_query_get(req, "limit");
    struct api_status_query q;
    char err[256];
    struct pool_model *only = NULL;
    if (api_status_query(summary, offset, limit, name && *name, &q, err, sizeof err) < 0)
        http_respond_error(req, 400, "invalid_request_error", "%s", err);
    else if (name && *name && !(only = pool_find(p, name)))
        respond_unknown_model(req, p, name);
    else
        respond_status(req, api, &q, only);
    free(name);
    free(summary);
    free(offset);
    free(limit);
}

static void route_model_action(struct http_request *req, const struct api *api,
                               struct pool_model *m, const char *action)
{
    bool bad = false;
    bool wait = query_flag(req, "wait");

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
        w->api = api;
        w->req = req;
        w->goal = WAIT_FOLLOW;
        w->obs.fn = waiter_event;
        pool_observe(m, &w->obs);
        http_request_watch(req, waiter_gone, NULL, w);
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
        if ((unsigned long)n > m->cfg->instances_max) {
            http_respond_error(req, 409, "invalid_request_error",
                               "model \"%s\" allows at most %u instance%s (instances = %u-%u)",
                               m->cfg->name, m->cfg->instances_max, m->cfg->instances_max == 1 ? "" : "s",
                               m->cfg->instances_min, m->cfg->instances_max);
            return;
        }
        model_op(req, api, m, OP_START, (unsigned)n, wait);
    } else if (strcmp(action, "stop") == 0) {
        model_op(req, api, m, OP_STOP, 0, wait);
    } else if (strcmp(action, "restart") == 0) {
        model_op(req, api, m, OP_RESTART, 0, wait);
    } else {
        http_respond_error(req, 404, "not_found_error", "unknown action \"%s\"", action);
    }
}

/* ---------- GET /pool/usage ---------- */

/* Unix seconds T as ISO-8601 UTC ("2026-01-01T00:00:00Z"); null for 0 (never). */
static json_t *iso_time(int64_t t)
{
    char buf[32];
    struct tm tm;
    time_t tt = (time_t)t;
    if (t <= 0 || !gmtime_r(&tt, &tm) || !strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm))
        return json_null();
    return json_string(buf);
}

/* The usage counts, most used first: the configured models' (all=1: every
 * record kept, models removed from pool.conf too, marked "configured":
 * false). */
static void route_usage(struct http_request *req, const struct api *api)
{
    struct pool *p = api->pool;
    if (strcmp(req->method, "GET") != 0) {
        http_respond_error(req, 405, "invalid_request_error", "use GET for /pool/usage");
        return;
    }
    bool all = query_flag(req, "all");
    size_t n;
    const struct usage_record **v = usage_ranked(p->usage, &n);
    if (!v && usage_size(p->usage)) {
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    json_t *models = json_array();
    size_t elsewhere = 0;           /* records of models not in pool.conf now */
    for (size_t i = 0; i < n; i++) {
        const struct usage_record *r = v[i];
        bool configured = pool_find_named(p, r->name) != NULL;
        elsewhere += !configured;
        if (!configured && !all)
            continue;
        json_t *o = json_object();
        json_object_set_new(o, "name", util_json_string(r->name));
        json_object_set_new(o, "configured", json_boolean(configured));
        json_object_set_new(o, "requests", json_integer((json_int_t)r->requests));
        json_object_set_new(o, "prompt_tokens", json_integer((json_int_t)r->prompt_tokens));
        json_object_set_new(o, "generated_tokens", json_integer((json_int_t)r->generated_tokens));
        json_object_set_new(o, "loads", json_integer((json_int_t)r->loads));
        json_object_set_new(o, "load_seconds", json_real(r->load_seconds));
        json_object_set_new(o, "last_used", iso_time(r->last_used));
        json_object_set_new(o, "last_used_unix", r->last_used > 0 ? json_integer(r->last_used) : json_null());
        json_object_set_new(o, "last_loaded", iso_time(r->last_loaded));
        json_object_set_new(o, "last_loaded_unix",
                            r->last_loaded > 0 ? json_integer(r->last_loaded) : json_null());
        json_array_append_new(models, o);
    }
    free(v);
    const char *path = usage_path(p->usage);
    respond_json(req, 200, json_pack("{s:o,s:o,s:I}", "state_file", path ? util_json_string(path) : json_null(),
                                     "models", models, "not_configured", (json_int_t)elsewhere));
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

/* POST /pool/upgrade[?timeout=S]: answered by the new image, or with why not. */
static void route_upgrade(struct http_request *req, struct api *api)
{
    if (strcmp(req->method, "POST") != 0) {
        http_respond_error(req, 405, NULL, "use POST for upgrade");
        return;
    }
    double timeout = 0;
    char *t = http_query_get(req, "timeout");
    if (t) {
        char *end;
        timeout = strtod(t, &end);
        bool bad = !*t || *end || !(timeout > 0 && timeout <= 86400);
        free(t);
        if (bad) {
            http_respond_error(req, 400, NULL, "timeout: seconds from 1 to 86400 expected");
            return;
        }
    }
    if (!api->upgrade) {
        http_respond_error(req, 501, NULL, "this daemon cannot upgrade");
        return;
    }
    api->upgrade(api, req, timeout);
}

/* The page (src/web/index.html, embedded by the build). */
extern const unsigned char web_index_html[];
extern const size_t web_index_html_len;

/* GET / and /ui/: the page. It holds no data: what it shows comes from
 * /pool/status and /pool/events, with the admin key over TCP. */
static void route_page(struct http_request *req)
{
    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0) {
        http_respond_error(req, 405, NULL, "use GET for the page");
        return;
    }
    if (strcmp(req->path, "/ui") == 0) {    /* its links are relative to /ui/ */
        http_respond(req, 301, "text/plain", "Location: ui/\r\n", "ui/\n", 4);
        return;
    }
    http_respond(req, 200, "text/html; charset=utf-8",
                 "Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n"
                 "X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n"
                 "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; "
                 "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                 "base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n",
                 (const char *)web_index_html, web_index_html_len);
}

static void route_events(struct http_request *req, struct api *api)
{
    if (strcmp(req->method, "GET") != 0) {
        http_respond_error(req, 405, NULL, "use GET for events");
        return;
    }
    if (!api->pool->events) {
        http_respond_error(req, 503, NULL, "events are not available (out of memory at startup)");
        return;
    }
    events_subscribe(api->pool->events, req);
}

/* The key a client presents: "Authorization: Bearer K" or "X-Api-Key: K". */
static const char *presented_key(const struct http_request *req)
{
    const char *auth = http_header_get(req, "Authorization");
    if (auth && strncasecmp(auth, "Bearer ", 7) == 0)
        return auth + 7;
    return http_header_get(req, "X-Api-Key");
}

/* POST paths routed by the body's "model". */
static const char *const model_paths[] = {
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank",
    "/completion", "/infill", "/embedding", "/tokenize", "/detokenize",
    NULL,
};

/* ---------- who may ask what: keys and origins, before the body ---------- */

/* Equal strings, in time that depends on GIVEN's length only: how much of
 * a guess matches a key is not measurable. */
static bool key_equal(const char *given, const char *key)
{
    size_t glen = strlen(given), klen = strlen(key);
    unsigned char diff = glen != klen;
    if (klen == 0)
        return false;
    for (size_t i = 0; i < glen; i++)
        diff |= (unsigned char)(given[i] ^ key[i % klen]);
    return diff == 0;
}

/* Any of KEYS, each compared in full. */
static bool key_in(const char *given, char *const *keys, size_t n)
{
    bool found = false;
    for (size_t i = 0; given && i < n; i++)
        found |= key_equal(given, keys[i]);
    return found;
}

static bool origin_allowed(const struct config *cfg, const char *origin)
{
    if (!origin || !*origin)
        return false;
    for (size_t i = 0; i < cfg->ncors_origins; i++)
        if (strcmp(cfg->cors_origins[i], "*") == 0 || strcasecmp(cfg->cors_origins[i], origin) == 0)
            return true;
    return false;
}

enum access { ACCESS_PUBLIC, ACCESS_API, ACCESS_ADMIN };

/* What a path needs: the model routes and /upstream an api key, /pool/ the
 * admin key over TCP; /health, /metrics and unknown paths nothing. */
static enum access path_access(const char *path)
{
    for (size_t i = 0; model_paths[i]; i++)
        if (strcmp(path, model_paths[i]) == 0)
            return ACCESS_API;
    if (strcmp(path, "/v1/models") == 0 || strcmp(path, "/models") == 0 ||
        (strncmp(path, "/upstream/", 10) == 0 && path[10]))
        return ACCESS_API;
    if (strncmp(path, "/pool/", 6) == 0)
        return ACCESS_ADMIN;
    return ACCESS_PUBLIC;
}

int api_admit(const struct http_request *req, void *arg, struct http_admission *out)
{
    struct api *api = arg;
    const struct config *cfg = api->pool->cfg;
    if (req->is_unix) {  /* the control socket: whoever may open it */
        out->trusted = true;
        return 0;
    }
    out->cors = origin_allowed(cfg, http_header_get(req, "Origin"));
    const char *given = presented_key(req);
    bool admin_set = cfg->admin_key && *cfg->admin_key;
    bool api_ok = cfg->napi_keys == 0 || key_in(given, cfg->api_keys, cfg->napi_keys);
    bool admin_ok = admin_set && given && key_equal(given, cfg->admin_key);
    out->trusted = api_ok || admin_ok;
    if (strcmp(req->method, "OPTIONS") == 0)  /* a CORS preflight carries no key */
        return 0;
    switch (path_access(req->path)) {
    case ACCESS_API:
        if (api_ok)
            return 0;
        out->msg = "Invalid API Key";
        return 401;
    case ACCESS_ADMIN:
        if (!admin_set) {
            out->msg = "the control API is served on the control socket only; set admin_key in pool.conf to allow it over TCP";
            return 403;
        }
        if (admin_ok)
            return 0;
        out->msg = "Invalid API Key";
        return 401;
    case ACCESS_PUBLIC:
        break;
    }
    return 0;
}

/* OPTIONS: a CORS preflight gets the methods and headers a browser client
 * may use when its Origin is in cors_origins (api_admit set req->cors, and
 * http adds Access-Control-Allow-Origin); any other OPTIONS only Allow. */
static void respond_preflight(struct http_request *req)
{
    static const char allow[] = "Allow: GET, POST, OPTIONS\r\n";
    static const char cors[] =
        "Allow: GET, POST, OPTIONS\r\n"
        "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
        "Access-Control-Allow-Headers: Authorization, Content-Type, X-Api-Key\r\n"
        "Access-Control-Max-Age: 86400\r\n";
    http_respond(req, 204, NULL, req->cors ? cors : allow, NULL, 0);
}

/* ---------- the OpenAI side ---------- */


static void route_model_request(struct http_request *req, struct api *api)
{
    struct pool *p = api->pool;
    if (strcmp(req->method, "POST") != 0) {
        http_respond_error(req, 405, "invalid_request_error", "%s takes POST", req->path);
        return;
    }
    json_error_t jerr;
    json_t *body = req->body_len ? json_loadb(req->body, req->body_len, 0, &jerr) : NULL;
    if (!json_is_object(body)) {
        if (!req->body_len)
            http_respond_error(req, 400, "invalid_request_error", "the request has no JSON body");
        else if (!body)
            http_respond_error(req, 400, "invalid_request_error", "invalid JSON at line %d column %d: %s",
                               jerr.line, jerr.column, jerr.text);
        else
            http_respond_error(req, 400, "invalid_request_error", "the body must be a JSON object");
        json_decref(body);
        return;
    }
    json_t *mv = json_object_get(body, "model");
    const char *name = json_string_value(mv);
    if (mv && !name) {
        json_decref(body);
        http_respond_error(req, 400, "invalid_request_error", "\"model\" must be a string");
        return;
    }
    if (!name || !*name)
        name = p->cfg->default_model;
    if (!name) {
        json_decref(body);
        http_respond_error(req, 400, "invalid_request_error",
                           "the request names no \"model\" and pool.conf sets no default_model");
        return;
    }
    struct pool_model *m = pool_find(p, name);
    if (!m) {
        /* Another server may have it (router.h: fallback). */
        if (p->cfg->fallback_unknown && p->cfg->fallback)
            router_fallback_unknown(api->router, req, name);
        else
            respond_unknown_model(req, p, name);
        json_decref(body);
        return;
    }
    /* Its prompt, for the instance that may hold it (a miss costs nothing
     * but the hashing, so an allocation that fails is simply no key). */
    struct affinity_key *key = NULL;
    if (config_model_routing(p->cfg, m->cfg) == CONFIG_ROUTING_AFFINITY &&
        (key = malloc(sizeof *key)) &&
        !affinity_key_make(body, http_header_get(req, "X-Session-Id"), key)) {
        free(key);
        key = NULL;
    }
    json_decref(body);
    router_forward(api->router, req, m, NULL, key);
}

/* ANY /upstream/{model}/{path}: passthrough to one instance of the model. */
static void route_upstream(struct http_request *req, struct api *api)
{
    const char *rest = req->target + strlen("/upstream/");
    size_t len = strcspn(rest, "/?");
    char *name = http_path_decode(rest, len);
    struct pool_model *m = name ? pool_find(api->pool, name) : NULL;
    if (!m) {
        respond_unknown_model(req, api->pool, name ? name : "");
        free(name);
        return;
    }
    free(name);
    const char *target = rest + len;
    char *t = NULL;
    if (*target != '/' && asprintf(&t, "/%s", target) < 0)
        t = NULL;
    router_forward(api->router, req, m, t ? t : target, NULL);
    free(t);
}

static void route_models(struct http_request *req, struct pool *p)
{
    json_t *data = json_array();
    for (size_t i = 0; i < p->nmodels; i++) {
        struct pool_model *m = p->models[i];
        enum pool_model_state st = pool_model_state(m);
        const char *status = st == POOL_MODEL_READY ? "ready"
                           : st == POOL_MODEL_STARTING ? "loading"
                           : st == POOL_MODEL_FAILED ? "failed" : "unloaded";
        json_t *aliases = json_array();
        for (size_t j = 0; j < m->cfg->naliases; j++)
            json_array_append_new(aliases, util_json_string(m->cfg->aliases[j]));
        json_array_append_new(data, json_pack("{s:s,s:s,s:I,s:s,s:s,s:o}", "id", m->cfg->name,
                                              "object", "model", "created", (json_int_t)p->started_at,
                                              "owned_by", "llama-pool", "status", status,
                                              "aliases", aliases));
    }
    respond_json(req, 200, json_pack("{s:s,s:o}", "object", "list", "data", data));
}

static void route_server(struct http_request *req, struct api *api)
{
    char *name = http_query_get(req, "model");
    if (!name || !*name) {
        free(name);
        http_respond_error(req, 400, "invalid_request_error", "use /pool/server?model=NAME");
        return;
    }
    struct pool_model *m = pool_find(api->pool, name);
    if (!m)
        respond_unknown_model(req, api->pool, name);
    else
        router_server(api->router, req, m);
    free(name);
}

/* ---------- /metrics: the pool's, then (metrics_children) the children's ---------- */

/* The pool's metrics, then the N CHILDREN's merged, as the answer. */
static void respond_metrics(struct http_request *req, struct api *api,
                            const struct child_metrics_text *children, size_t n)
{
    size_t len = 0;
    char *text = metrics_render(api->pool, api->router, &len);
    struct buf out = { .data = text, .len = len, .cap = len + 1 };
    if (text && n && !child_metrics_merge(children, n, &out)) {
        buf_free(&out);
        text = NULL;
    }
    if (!text)
        http_respond_error(req, 500, NULL, "out of memory");
    else
        http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, out.data, out.len);
    buf_free(&out);
}

/* A /metrics answer waiting for the children's. */
struct metrics_wait {
    struct api *api;
    struct http_request *req;
    struct child_metrics_scrape *scrape;
};

static void metrics_scraped(void *arg, const struct child_metrics_text *r, size_t n)
{
    struct metrics_wait *w = arg;
    /* Counted before the render, so that this answer shows them. The
     * model is found again by name: a reload may have freed the one the
     * scrape began with. */
    for (size_t i = 0; i < n; i++) {
        struct pool_model *m = r[i].text ? NULL : pool_find(w->api->pool, r[i].model);
        if (m)
            metrics_count_child_scrape_failed(&m->stats);
    }
    http_request_unwatch(w->req);
    respond_metrics(w->req, w->api, r, n);
    free(w);
}

static void metrics_client_gone(struct http_request *req, void *arg)
{
    (void)req;
    struct metrics_wait *w = arg;
    child_metrics_cancel(w->scrape);
    free(w);
}

/* Every ready child that serves /metrics (it started with --metrics:
 * metrics_children turned on by a reload reaches the others when they
 * restart), scraped straight on its port: the router and the scheduler
 * never see it, so it is no use of the instance (last_used and the idle
 * timer stay as they were). The answer waits for the scrape, at most
 * CHILD_METRICS_TIMEOUT. */
static void route_metrics(struct http_request *req, struct api *api)
{
    struct pool *p = api->pool;
    if (!p->cfg->metrics_children) {
        respond_metrics(req, api, NULL, 0);
        return;
    }
    size_t n = 0;
    for (size_t i = 0; i < p->nmodels; i++)
        for (size_t j = 0; j < p->models[i]->ninst; j++) {
            const struct instance *in = p->models[i]->inst[j];
            n += in->state == INSTANCE_READY && in->metrics;
        }
    struct child_metrics_target *t = calloc(n ? n : 1, sizeof *t);
    struct metrics_wait *w = calloc(1, sizeof *w);
    if (!t || !w) {
        free(t);
        free(w);
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    size_t k = 0;
    for (size_t i = 0; i < p->nmodels; i++)
        for (size_t j = 0; j < p->models[i]->ninst; j++) {
            const struct instance *in = p->models[i]->inst[j];
            if (in->state == INSTANCE_READY && in->metrics)
                t[k++] = (struct child_metrics_target){ p->models[i]->cfg->name, in->id, in->port, in->api_key };
        }
    *w = (struct metrics_wait){ .api = api, .req = req };
    w->scrape = child_metrics_scrape(p->loop, p->health, t, n, CHILD_METRICS_TIMEOUT, metrics_scraped, w);
    free(t);
    if (!w->scrape) {
        free(w);
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    http_request_watch(req, metrics_client_gone, NULL, w);
}

void api_handle(struct http_request *req, void *arg)
{
    struct api *api = arg;
    struct pool *p = api->pool;
    const char *path = req->path;

    if (strcmp(req->method, "OPTIONS") == 0) {
        respond_preflight(req);
        return;
    }
    if (strcmp(path, "/health") == 0) {
        respond_json(req, 200, json_pack("{s:s}", "status", "ok"));
        return;
    }
    for (size_t i = 0; model_paths[i]; i++)
        if (strcmp(path, model_paths[i]) == 0) {
            route_model_request(req, api);
            return;
        }
    if (strcmp(path, "/metrics") == 0) {
        route_metrics(req, api);
        return;
    }
    if (strcmp(path, "/v1/models") == 0 || strcmp(path, "/models") == 0) {
        route_models(req, p);
        return;
    }
    if (strcmp(path, "/") == 0 || strcmp(path, "/ui") == 0 || strcmp(path, "/ui/") == 0) {
        route_page(req);
        return;
    }
    if (strncmp(path, "/upstream/", 10) == 0 && path[10]) {
        route_upstream(req, api);
        return;
    }
    if (strncmp(path, "/pool/", 6) != 0) {
        http_respond_error(req, 404, "not_found_error", "File Not Found: %s", path);
        return;
    }
    if (strcmp(path, "/pool/server") == 0) {
        route_server(req, api);
        return;
    }
    if (strcmp(path, "/pool/status") == 0) {
        route_status(req, api);
        return;
    }
    if (strcmp(path, "/pool/reload") == 0) {
        route_reload(req, api);
        return;
    }
    if (strcmp(path, "/pool/upgrade") == 0) {
        route_upgrade(req, api);
        return;
    }
    if (strcmp(path, "/pool/events") == 0) {
        route_events(req, api);
        return;
    }
    if (strcmp(path, "/pool/usage") == 0) {
        route_usage(req, api);
        return;
    }
    if (strncmp(path, "/pool/models/", 13) == 0) {
        const char *name = path + 13;
        const char *slash = strchr(name, '/');
        if (slash && slash != name && slash[1] && !strchr(slash + 1, '/')) {
            char *model = http_path_decode(name, (size_t)(slash - name));
            struct pool_model *m = model ? pool_find(p, model) : NULL;
            if (!m)
                respond_unknown_model(req, p, model ? model : "");
            else
                route_model_action(req, api, m, slash + 1);
            free(model);
            return;
        }
    }
    http_respond_error(req, 404, "not_found_error", "File Not Found");
}
