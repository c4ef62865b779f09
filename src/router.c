#define _GNU_SOURCE
#include "router.h"

#include "affinity.h"
#include "cutoff.h"
#include "events.h"
#include "gpu.h"
#include "log.h"
#include "memory.h"
#include "pool.h"
#include "proxy.h"
#include "scheduler.h"
#include "util.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct router {
    struct ev_loop *loop;
    struct pool *pool;
    struct sched *sched;
    struct proxy *proxy;
    ev_timer wake;
    ev_timer sample;            /* PSS of every instance, MemAvailable */
    /* Every request from arrival to its end (walked at shutdown and when an
     * instance goes; found by its address, the scheduler's id for it). */
    struct rreq *reqs;
    struct fbcall *fbcalls;     /* requests relaying to a fallback */
    /* The scheduler's model index → model: a pool model's index, which
     * the pool never reuses (a model removed by a reload leaves NULL). */
    struct pool_model **slots;
    size_t nslots;
    struct gpus *gpus;          /* NULL: no GPU (or gpus = none): host memory only */
    char *gpus_library;         /* what gpus was opened with */
    bool gpus_all_lost;         /* said once */
    bool closing;               /* shutting down: nothing new is queued */
    double retry_after;         /* for 503s while closing: seconds */
};

/* One proxied request, from arrival to its response's end. */
struct rreq {
    struct rreq *prev, *next;
    struct router *r;
    struct http_request *req;
    struct pool_model *model;
    struct instance *inst;      /* once dispatched */
    char *target;               /* upstream target, NULL = as received */
    struct affinity_key *key;   /* its prompt (prefix affinity), NULL = none */
    struct sched_prefix prefix; /* the scheduler's view of key */
    bool dispatched;
    bool resent;                /* sent again after an instance dropped it unanswered */
    double t0;                  /* arrival */
    double sent;                /* its (last) dispatch; 0: never */
    double limit;               /* request_timeout at its dispatch, s; 0: none */
    char *body;                 /* the body sent upstream in place of the client's
                                 * (request_timeout's rewrite); NULL: the client's */
    char method[8], path[64];   /* for its record (the request is gone by its end) */
};

static void router_run(struct router *r);

/* ---------- bookkeeping ---------- */

/* The scheduler's ids are our objects' addresses: a request's while it
 * lives (the scheduler forgets it before it is freed), an instance's while
 * the pool keeps it (it is removed from the scheduler once stopped, before
 * the pool frees it). An address can come back for a new request, so no
 * action may outlive its request: every entry point below ends with
 * router_run(), which takes every action before control returns to the
 * loop, and a request ends (done, gone) only after its DISPATCH was taken
 * or while it waits (no DISPATCH pending for it). */
static sched_req_t req_id(const struct rreq *q)
{
    return (sched_req_t)(uintptr_t)q;
}

static struct rreq *req_of(sched_req_t id)
{
    return (struct rreq *)(uintptr_t)id;
}

static sched_inst_t inst_id(const struct instance *inst)
{
    return (sched_inst_t)(uintptr_t)inst;
}

static struct instance *inst_of(sched_inst_t id)
{
    return (struct instance *)(uintptr_t)id;
}

static void rreq_free(struct rreq *q)
{
    struct router *r = q->r;
    if (q->prev)
        q->prev->next = q->next;
    else
        r->reqs = q->next;
    if (q->next)
        q->next->prev = q->prev;
    free(q->target);
    free(q->body);
    free(q->key);
    free(q);
}

/* The prompt's key as the scheduler takes it, or NULL. */
static const struct sched_prefix *rreq_prefix(const struct rreq *q)
{
    return q->key ? &q->prefix : NULL;
}

/* Tell the scheduler what it needs of M. The memory estimate is read from
 * the GGUF header the first time a model is used (WITH_ESTIMATE), not for
 * thousands of models at startup. */
_Static_assert(MEMORY_MAX_DEVICES == SCHED_MAX_DEVICES, "one device numbering");
_Static_assert(ROUTER_DEVICE_SPLIT == SCHED_DEVICE_SPLIT, "one way to say split");
_Static_assert(ROUTER_MAX_DEVICES == SCHED_MAX_DEVICES, "one device limit");

/* M's GPU memory for the scheduler: on the one device the pool places it
 * on, on the device its args choose, or, split over several by its args,
 * its share on each (into SPLIT, which INFO then points to). gpu_memory
 * replaces the estimate; for a split, in the estimate's proportions. */
static void model_vram(const struct router *r, const struct pool_model *m,
                       const struct memory_estimate *e, struct sched_model_info *info,
                       uint64_t split[SCHED_MAX_DEVICES])
{
    if (!r->gpus || !(info->vram = m->cfg->gpu_memory ? m->cfg->gpu_memory : e->vram_total))
        return;
    if (!m->gpu_fixed)
        return;
    uint64_t shares[SCHED_MAX_DEVICES] = { 0 };
    unsigned ndev = e->ndev;
    memcpy(shares, e->vram, sizeof shares);
    struct memory_placement pl;
    char err[256];
    if (!e->vram_total && memory_gpu_placement(r->pool->cfg, m->cfg, r->pool->ndev, &pl, err,
                                               sizeof err) == 0) {
        /* No estimate from the header (gpu_memory alone): the devices its
         * args name, in their -ts shares. */
        float prev = 0;
        for (unsigned k = 0; k < pl.n_dev && pl.dev[k] < SCHED_MAX_DEVICES; k++) {
            shares[pl.dev[k]] = (uint64_t)((pl.split[k] - prev) * 1e6f);
            prev = pl.split[k];
            if (pl.dev[k] + 1 > ndev)
                ndev = pl.dev[k] + 1;
        }
    }
    uint64_t total = 0;
    unsigned used = 0, first = 0;
    for (unsigned d = ndev; d-- > 0; )
        if (shares[d]) {
            used++;
            first = d;
            total += shares[d];
        }
    if (used <= 1) {
        info->vram_fixed = true;
        info->vram_device = first;
        return;
    }
    for (unsigned d = 0; d < SCHED_MAX_DEVICES; d++)
        split[d] = shares[d];
    if (m->cfg->gpu_memory)
        for (unsigned d = 0; d < SCHED_MAX_DEVICES; d++)
            split[d] = (uint64_t)((long double)shares[d] * m->cfg->gpu_memory / total);
    info->vram_split = split;
}

static void model_info(struct router *r, struct pool_model *m, bool with_estimate)
{
    const struct config *cfg = r->pool->cfg;
    int64_t idle = m->cfg->idle_timeout_ms >= 0 ? m->cfg->idle_timeout_ms : cfg->idle_timeout_ms;
    uint64_t split[SCHED_MAX_DEVICES];
    bool given;
    unsigned threads = config_child_http_threads(cfg, m->cfg, &given);
    struct sched_model_info info = {
        .instances_min = m->cfg->instances_min,
        .instances_max = m->cfg->instances_max,
        .slots_hint = m->np_hint,
        .http_conns = threads > 2 ? threads - 2 : 1,     /* /health and /props need theirs */
        .pinned = m->cfg->pin,
        .priority = m->cfg->priority,
        .idle_timeout = (double)idle / 1000.0,
        .affinity_wait = (double)config_model_affinity_wait_ms(cfg, m->cfg) / 1000.0,
    };
    if (with_estimate || m->est_known) {
        const struct memory_estimate *e = pool_model_estimate(m);
        info.mem_weights = e->weights;
        info.mem_more = e->more;
        info.file_id = e->file_id;
        model_vram(r, m, e, &info, split);
    }
    sched_model_set(r->sched, m->index, m->cfg->name, &info);
}

/* Whether M has its index in the scheduler (a live model of the pool). */
static bool model_known(const struct router *r, const struct pool_model *m)
{
    return m->index < r->nslots && r->slots[m->index] == m;
}

/* Room for the scheduler indices below N; false when out of memory. */
static bool slots_reserve(struct router *r, size_t n)
{
    if (n <= r->nslots)
        return true;
    struct pool_model **v = realloc(r->slots, n * sizeof *v);
    if (!v)
        return false;
    memset(v + r->nslots, 0, (n - r->nslots) * sizeof *v);
    r->slots = v;
    r->nslots = n;
    sched_models_resize(r->sched, n);
    return true;
}

/* M's index in the scheduler, made known there the first time; SIZE_MAX
 * when out of memory. */
static size_t model_slot(struct router *r, struct pool_model *m)
{
    if (model_known(r, m))
        return m->index;
    if (!slots_reserve(r, m->index + 1))
        return SIZE_MAX;
    r->slots[m->index] = m;
    model_info(r, m, false);
    return m->index;
}

static double now_of(struct router *r)
{
    return ev_now(r->loop);
}

/* ---------- performing the scheduler's actions ---------- */

static void rreq_gone(struct http_request *req, void *arg);
static void refuse_closing(struct router *r, struct http_request *req, struct pool_model *m);

/* The request's slot on its instance is free again; a draining instance
 * whose last request this was may now be stopped. */
/* Q's slot is free again. Only an answer that came whole is "done" for the
 * scheduler, whose turnaround (how long the model's requests take, the
 * hand-off's measure) must not learn from a client that left early or an
 * instance that failed at once. */
static void release_slot(struct router *r, struct rreq *q, bool answered)
{
    if (answered)
        sched_request_done(r->sched, now_of(r), req_id(q));
    else
        sched_request_gone(r->sched, now_of(r), req_id(q));
    if (q->inst && sched_in_flight(r->sched, inst_id(q->inst)) == 0)
        instance_drained(q->inst);
}

/* The instance closed or reset the connection before a byte of its answer
 * (it was being stopped, or died, as the request went out): the client has
 * seen nothing, so the request goes back to the scheduler once, as a new
 * arrival, and reaches another instance. A second time it is a 502. */
static bool resend(struct router *r, struct rreq *q)
{
    if (q->resent || !q->model || r->closing || !model_known(r, q->model))
        return false;
    log_info("%s: %s %s: the instance dropped it unanswered; sending it again",
             q->inst ? q->inst->id : q->model->cfg->name, q->req->method, q->req->path);
    q->resent = true;
    q->dispatched = false;
    q->inst = NULL;
    http_request_watch(q->req, rreq_gone, NULL, q);
    sched_request_prefix(r->sched, now_of(r), req_id(q), q->model->index, rreq_prefix(q));
    return true;
}

/* Q ended with STATUS (RES: how its proxy call went, NULL if it had none):
 * a record for GET /pool/events. */
static void note_end(struct router *r, const struct rreq *q, int status, const struct proxy_result *res)
{
    struct events *ev = r->pool->events;
    if (!ev)
        return;
    double now = now_of(r);
    struct events_request e = {
        .status = status, .duration = now - q->t0,
        .queued = q->sent > 0 ? q->sent - q->t0 : now - q->t0,
        .first_byte = res ? res->first_byte : -1,
        .timeout = res && res->outcome == PROXY_TIMEOUT,
        .prompt_tokens = -1, .cached_tokens = -1, .generated_tokens = -1, .tokens_per_s = -1,
    };
    log_stamp(e.time);
    e.time[LOG_STAMP_LEN] = '\0';
    snprintf(e.model, sizeof e.model, "%s", q->model ? q->model->cfg->name : "");
    if (q->inst && q->sent > 0)
        snprintf(e.instance, sizeof e.instance, "%s", q->inst->id);
    memcpy(e.method, q->method, sizeof e.method);
    memcpy(e.path, q->path, sizeof e.path);
    if (res && res->prompt_n >= 0) {
        e.cached_tokens = res->cache_n > 0 ? res->cache_n : 0;
        e.prompt_tokens = res->prompt_n + e.cached_tokens;
    }
    if (res && res->predicted_n >= 0) {
        e.generated_tokens = res->predicted_n;
        if (res->predicted_ms > 0)
            e.tokens_per_s = (double)res->predicted_n * 1000.0 / res->predicted_ms;
    }
    events_request(ev, &e);
}

static void call_done(void *arg, const struct proxy_result *res)
{
    struct rreq *q = arg;
    struct router *r = q->r;
    enum proxy_outcome outcome = res->outcome;
    int status = res->status;
    if (outcome == PROXY_UPSTREAM_UNANSWERED && q->inst && q->inst->state == INSTANCE_READY) {
        /* Dead, or dying, and not known to be yet: none of its slots is
         * used until it answers /health again (or its exit shows). */
        sched_instance_suspect(r->sched, now_of(r), inst_id(q->inst));
        instance_check(q->inst);
    }
    release_slot(r, q, outcome == PROXY_OK);
    if (outcome == PROXY_UPSTREAM_UNANSWERED) {
        if (resend(r, q)) {
            router_run(r);
            return;
        }
        http_respond_error(q->req, 502, "server_error",
                           "%s: the instance closed the connection before answering%s",
                           q->model ? q->model->cfg->name : "model",
                           q->resent ? ", twice" : "");
        status = 502;
    }
    /* A client that left is a 499 whatever the upstream had begun to send. */
    if (outcome == PROXY_CLIENT_GONE)
        status = 499;
    else if (!status)
        status = 502;
    if (outcome == PROXY_TIMEOUT)
        log_info("%s: %s %s: cut at request_timeout (%g s) after %.3f s on %s: %s",
                 q->model ? q->model->cfg->name : "model", q->method, q->path, q->limit,
                 now_of(r) - q->sent, q->inst ? q->inst->id : "its instance",
                 status == 504 ? "504, it had not begun to answer"
                               : "the client got the answer so far, finish_reason \"length\"");
    if (q->model && outcome == PROXY_TIMEOUT) {
        metrics_count_timeout(&q->model->stats);
    } else if (q->model) {
        metrics_count_status(&q->model->stats, status);
        if (status == 200 && res->cache_n >= 0)
            metrics_count_prompt(&q->model->stats, (uint64_t)res->cache_n,
                                 res->prompt_n > 0 ? (uint64_t)res->prompt_n : 0);
    }
    metrics_observe(&r->pool->stats.duration, now_of(r) - q->t0);
    if (res->first_byte >= 0)
        metrics_observe(&r->pool->stats.first_byte, res->first_byte);
    note_end(r, q, status, res);
    if (q->model)
        usage_count_request(r->pool->usage, q->model->cfg->name, now_of(r), res->cache_n,
                            res->prompt_n, res->predicted_n);
    rreq_free(q);
    router_run(r);
}

/* The endpoint Q goes to upstream (its target's path, for /upstream/M/…). */
static enum cutoff_api rreq_api(const struct rreq *q)
{
    const char *t = q->target ? q->target : q->req->path;
    char path[64];
    size_t n = strcspn(t, "?");
    if (n >= sizeof path)
        return CUTOFF_NONE;
    memcpy(path, t, n);
    path[n] = '\0';
    return cutoff_api_of(path);
}

/* request_timeout for Q, read now (a reload applies to the requests sent
 * after it): false when none applies (no limit, not a POST to a generation
 * endpoint, a body that is not a JSON object). A plain request gets
 * t_max_predict_ms when it sets none (llama-server's own, soft limit: it
 * stops only at a newline past it), and, unless it asks what a stream
 * cannot give back (logprobs and the like), goes upstream as a stream to
 * be put back together (proxy_limit.gather). */
static bool rreq_limit(struct router *r, struct rreq *q, struct proxy_limit *limit)
{
    int64_t ms = q->model ? config_model_request_timeout_ms(r->pool->cfg, q->model->cfg) : 0;
    enum cutoff_api api = rreq_api(q);
    free(q->body);
    q->body = NULL;
    q->limit = 0;
    if (ms <= 0 || api == CUTOFF_NONE || strcmp(q->req->method, "POST") != 0)
        return false;
    struct cutoff_request cr;
    cutoff_request_read(q->req->body, q->req->body_len, &cr);
    if (!cr.object)
        return false;
    *limit = (struct proxy_limit){
        .seconds = (double)ms / 1000.0, .api = api, .gather = cr.gatherable,
        .model = q->model->cfg->name,
    };
    size_t len = 0;
    if (!cr.stream &&
        !cutoff_body_rewrite(q->req->body, q->req->body_len, api, cr.has_tmax ? 0 : (long long)ms,
                             cr.gatherable, &q->body, &len)) {
        log_warn("%s: %s %s: out of memory for request_timeout's rewrite: sent with no limit",
                 q->model->cfg->name, q->req->method, q->req->path);
        return false;
    }
    limit->body = q->body;
    limit->body_len = len;
    q->limit = limit->seconds;
    return true;
}

static void do_dispatch(struct router *r, struct rreq *q, struct instance *inst)
{
    q->dispatched = true;
    q->inst = inst;
    q->sent = now_of(r);
    if (q->model)
        metrics_count_queue_wait(&q->model->stats, now_of(r) - q->t0);
    http_request_unwatch(q->req);     /* the proxy watches the client from here */
    struct proxy_limit limit;
    proxy_forward_limited(r->proxy, q->req, inst->port, inst->api_key, q->target,
                          rreq_limit(r, q, &limit) ? &limit : NULL, call_done, q);
}

/* ---------- fallback (router.h) ---------- */

/* One request relaying to a fallback: what its 502 needs, should the
 * fallback not answer (the config may be reloaded meanwhile: copies). */
struct fbcall {
    struct fbcall *prev, *next;
    struct router *r;
    struct http_request *req;
    char *url;                  /* the fallback's, as configured */
    char *model;                /* as the request named it */
    const char *why;            /* why not here, a literal */
};

static void fbcall_free(struct fbcall *f)
{
    struct router *r = f->r;
    if (f->prev)
        f->prev->next = f->next;
    else
        r->fbcalls = f->next;
    if (f->next)
        f->next->prev = f->prev;
    free(f->url);
    free(f->model);
    free(f);
}

static void fallback_done(void *arg, const struct proxy_result *res)
{
    struct fbcall *f = arg;
    if (res->outcome == PROXY_UPSTREAM_UNANSWERED)
        http_respond_error(f->req, 502, "server_error",
                           "%s: not served here (%s), and the fallback %s did not answer: %s",
                           f->model, f->why, f->url, res->error ? res->error : "connection closed");
    fbcall_free(f);
}

/* Relay REQ (for model NAME, not served here because WHY) to FB. */
static void fallback_send(struct router *r, struct http_request *req, const struct config_fallback *fb,
                          const char *name, const char *why)
{
    struct fbcall *f = calloc(1, sizeof *f);
    char *target = NULL;
    if (!f || !(f->url = strdup(fb->url)) || !(f->model = strdup(name)) ||
        asprintf(&target, "%s%s", fb->prefix, req->target) < 0) {
        if (f) {
            free(f->url);
            free(f->model);
        }
        free(f);
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    log_info("%s: %s %s: not served here (%s): sent to the fallback %s", name, req->method,
             req->path, why, fb->url);
    f->r = r;
    f->req = req;
    f->why = why;
    f->next = r->fbcalls;
    if (r->fbcalls)
        r->fbcalls->prev = f;
    r->fbcalls = f;
    struct proxy_upstream up = {
        .addr = (const struct sockaddr *)&fb->addr, .addrlen = fb->addrlen,
        .host = fb->host, .key = fb->key, .served_by = "fallback",
    };
    proxy_forward_to(r->proxy, req, &up, target, fallback_done, f);
    free(target);
}

void router_fallback_unknown(struct router *r, struct http_request *req, const char *name)
{
    const struct config_fallback *fb = r->pool->cfg->fallback;
    if (!fb) {
        http_respond_error(req, 404, "not_found_error", "model \"%s\" not found", name);
        return;
    }
    metrics_count_fallback_unknown(&r->pool->stats);
    fallback_send(r, req, fb, name, "not configured here");
}

/* Whether the scheduler's FAIL of Q (status A) goes to a fallback, and why
 * (*WHY for the count; the literal returned for the log and the 502).
 * The status says which refusal it was: 429 is only ever "queue full",
 * 502 only a failed start, 503 a failed model when the pool says so, and
 * otherwise no room that could ever be made (the estimate is above the
 * budget or every device's). NULL: answered here as before. */
static const char *fallback_reason(const struct rreq *q, const struct sched_action *a,
                                   enum metrics_fallback *why)
{
    if (!q->model || q->target || q->model->retired)
        return NULL;            /* /upstream/M/…: a path of this pool's */
    switch (a->status) {
    case 429:
        *why = METRICS_FALLBACK_QUEUE_FULL;
        return "queue full";
    case 502:
        *why = METRICS_FALLBACK_START_FAILED;
        return "its start failed";
    case 503:
        if (q->model->failed) {
            *why = METRICS_FALLBACK_FAILED;
            return "the model is failed";
        }
        *why = METRICS_FALLBACK_NEVER_FITS;
        return "it does not fit the memory budget";
    default:
        return NULL;            /* 504: waited queue_timeout already; 404: removed */
    }
}

static void do_fail(struct router *r, struct rreq *q, const struct sched_action *a)
{
    enum metrics_fallback why;
    const char *reason = fallback_reason(q, a, &why);
    const struct config_fallback *fb = reason ? config_model_fallback(r->pool->cfg, q->model->cfg)
                                              : NULL;
    if (fb) {
        struct http_request *req = q->req;
        char *name = strdup(q->model->cfg->name);
        metrics_count_fallback(&q->model->stats, why);
        http_request_unwatch(req);
        rreq_free(q);
        if (name)
            fallback_send(r, req, fb, name, reason);
        else
            http_respond_error(req, 500, NULL, "out of memory");
        free(name);
        return;
    }
    if (q->model)
        metrics_count_status(&q->model->stats, a->status);
    note_end(r, q, a->status, NULL);
    char extra[64] = "";
    if (a->retry_after > 0)
        snprintf(extra, sizeof extra, "Retry-After: %.0f\r\n", a->retry_after);
    http_request_unwatch(q->req);
    http_respond_error_headers(q->req, a->status, NULL, extra[0] ? extra : NULL, "%s",
                               a->message ? a->message : "request failed");
    rreq_free(q);
}

/* CUDA_VISIBLE_DEVICES for an instance of M on DEVICE: the GPU's UUID; "-1"
 * to keep a model that needs no GPU off them (a CUDA build would otherwise
 * make a context on GPU 0 that nobody charges); "" where M's args or env
 * choose, or there is no GPU. */
static void visible_for(const struct router *r, const struct pool_model *m, int device,
                        char *buf, size_t len)
{
    const struct gpu_device *g = r->gpus && device >= 0 ? gpus_device(r->gpus, (size_t)device) : NULL;
    if (g)
        snprintf(buf, len, "%s", g->uuid);
    else
        snprintf(buf, len, "%s", r->gpus && !m->gpu_fixed && device < 0 ? "-1" : "");
}

static void do_start(struct router *r, size_t slot, int device)
{
    if (slot >= r->nslots || !r->slots[slot])
        return;
    struct pool_model *m = r->slots[slot];
    char visible[100];
    visible_for(r, m, device, visible, sizeof visible);
    struct instance *inst = pool_model_add(m, device, visible);
    if (!inst) {
        /* At max already (one is waiting out its backoff, or stopping):
         * the waiters wait for it, or for queue_timeout. */
        log_debug("%s: no further instance can be added now", m->cfg->name);
        return;
    }
    /* pool_changed() has told the scheduler (sched_instance_added). */
    log_info("%s: started on demand (%zu waiting)", inst->id,
             sched_waiting_model(r->sched, slot));
}

static void wake_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct router *r = w->data;
    sched_tick(r->sched, now_of(r));
    router_run(r);
}

static void router_run(struct router *r)
{
    struct sched_action a;
    while (sched_next_action(r->sched, &a)) {
        struct rreq *q = a.req ? req_of(a.req) : NULL;
        switch (a.kind) {
        case SCHED_DISPATCH:
            if (q && q->model && a.affinity >= 0)
                metrics_count_affinity(&q->model->stats, a.affinity > 0);
            if (q)
                do_dispatch(r, q, inst_of(a.inst));
            break;
        case SCHED_FAIL:
            if (q)
                do_fail(r, q, &a);
            break;
        case SCHED_START:
            do_start(r, a.model, a.device);
            break;
        case SCHED_STOP: {
            struct instance *inst = inst_of(a.inst);
            struct pool_model *m = inst->owner;
            char used[32];
            metrics_count_eviction(&m->stats, a.reason == SCHED_STOP_IDLE ? METRICS_EVICT_IDLE
                                                                          : METRICS_EVICT_LRU);
            int dev = sched_instance_device(r->sched, a.inst);
            char gpu[48] = "";
            if (dev >= 0)
                snprintf(gpu, sizeof gpu, ", on GPU %d", dev);
            log_info("%s: stopping it (%s; %s charged%s)", inst->id,
                     a.reason == SCHED_STOP_IDLE ? "idle_timeout passed"
                     : r->pool->cfg->eviction == CONFIG_EVICTION_COST ? "lowest requests x reload time / size, room needed"
                     : "least recently used, room needed",
                     util_format_bytes(sched_charge(r->sched, a.inst), used, sizeof used), gpu);
            if (events_wanted(r->pool->events))
                events_publish(r->pool->events, "evict",
                               json_pack("{s:s,s:s,s:s,s:I}", "model", m->cfg->name, "instance", inst->id,
                                         "reason", a.reason == SCHED_STOP_IDLE ? "idle" : "lru",
                                         "charged", (json_int_t)sched_charge(r->sched, a.inst)));
            instance_stop(inst);
            break;
        }
        case SCHED_WAKE:
            ev_timer_stop(r->loop, &r->wake);
            ev_timer_set(&r->wake, a.at > now_of(r) ? a.at - now_of(r) : 0, 0.);
            ev_timer_start(r->loop, &r->wake);
            break;
        }
    }
}

/* ---------- events from the pool ---------- */

static void pool_changed(struct instance *inst, enum instance_state old, void *arg)
{
    struct router *r = arg;
    struct pool_model *m = inst->owner;
    sched_inst_t id = inst_id(inst);
    double now = now_of(r);
    size_t slot = model_slot(r, m);
    if (slot == SIZE_MAX)
        return;

    bool known = sched_instance_known(r->sched, id);
    if (!known)
        model_info(r, m, true);         /* the scheduler charges the estimate from the start */
    switch (inst->state) {
    case INSTANCE_STARTING:
        if (!known)
            sched_instance_added_on(r->sched, now, id, slot, inst->device);
        else if (old != INSTANCE_STARTING)
            sched_instance_starting(r->sched, now, id);
        break;
    case INSTANCE_READY:
        if (!known)
            sched_instance_added_on(r->sched, now, id, slot, inst->device);
        if (old != INSTANCE_READY)
            sched_instance_ready(r->sched, now, id, inst->slots);
        else
            sched_instance_slots(r->sched, now, id, inst->slots);
        break;
    case INSTANCE_BACKOFF:
    case INSTANCE_FAILED:
        /* Every start attempt is reported as STARTING first, even one whose
         * spawn failed: its waiters hear of this failure, not an older one. */
        if (!known)
            sched_instance_added_on(r->sched, now, id, slot, inst->device);
        sched_instance_failed(r->sched, now, id, inst->last_error ? inst->last_error : "failed");
        /* In backoff it comes back by itself: capacity on its way. */
        if (inst->state == INSTANCE_BACKOFF && !m->failed)
            sched_instance_starting(r->sched, now, id);
        if (m->failed)
            sched_model_failed(r->sched, now, slot, m->last_error);
        break;
    case INSTANCE_STOPPING:
    case INSTANCE_STOPPED:
        /* An instance holds its memory until it has exited: whoever stops
         * it, it stays charged (and gets no requests) until STOPPED. One
         * the scheduler stopped itself is already stopping there. */
        if (known && inst->state == INSTANCE_STOPPED)
            sched_instance_removed(r->sched, now, id);
        else if (known)
            sched_instance_stopping(r->sched, now, id);
        proxy_forget_port(r->proxy, inst->port);
        break;
    }
    /* The pool frees stopped instances soon; requests still relaying from
     * this one (their upstream is closing) must not point at it then. */
    if (inst->state == INSTANCE_STOPPED || inst->state == INSTANCE_BACKOFF ||
        inst->state == INSTANCE_FAILED)
        for (struct rreq *q = r->reqs; q; q = q->next)
            if (q->inst == inst)
                q->inst = NULL;
    if (!m->failed && old == INSTANCE_FAILED)
        sched_model_failed(r->sched, now, slot, NULL);
    router_run(r);
}

/* An operator's start or a preload: the device the scheduler would choose. */
static int pool_place(struct pool_model *m, char *visible, size_t len, void *arg)
{
    struct router *r = arg;
    int device = -1;
    if (r->gpus && model_slot(r, m) != SIZE_MAX) {
        if (!m->est_known)
            model_info(r, m, true);
        device = sched_place(r->sched, m->index);
    }
    visible_for(r, m, device, visible, len);
    return device;
}

static unsigned pool_in_flight(const struct instance *inst, void *arg)
{
    const struct router *r = arg;
    return sched_in_flight(r->sched, inst_id(inst));
}

/* ---------- requests ---------- */

static void rreq_gone(struct http_request *req, void *arg)
{
    (void)req;
    struct rreq *q = arg;
    struct router *r = q->r;
    if (q->model)                 /* left while queued */
        metrics_count_status(&q->model->stats, 499);
    note_end(r, q, 499, NULL);
    sched_request_gone(r->sched, now_of(r), req_id(q));
    rreq_free(q);
    router_run(r);
}

void router_forward(struct router *r, struct http_request *req, struct pool_model *m,
                    const char *target, struct affinity_key *key)
{
    if (r->closing) {
        free(key);
        refuse_closing(r, req, m);
        return;
    }
    size_t slot = model_slot(r, m);
    struct rreq *q = calloc(1, sizeof *q);
    if (!q || slot == SIZE_MAX || (target && !(q->target = strdup(target)))) {
        free(q);
        free(key);
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    if (key) {
        q->key = key;
        q->prefix = (struct sched_prefix){ .session = key->session, .n = key->nblocks,
                                           .block = key->block };
    }
    q->r = r;
    q->req = req;
    q->model = m;
    q->t0 = now_of(r);
    snprintf(q->method, sizeof q->method, "%s", req->method);
    snprintf(q->path, sizeof q->path, "%s", req->path);
    q->next = r->reqs;
    if (r->reqs)
        r->reqs->prev = q;
    r->reqs = q;
    http_request_watch(req, rreq_gone, NULL, q);
    if (m->failed)
        sched_model_failed(r->sched, now_of(r), slot, m->last_error);
    if (!m->est_known)
        model_info(r, m, true);
    sched_request_prefix(r->sched, now_of(r), req_id(q), slot, rreq_prefix(q));
    router_run(r);
}

static void refuse_closing(struct router *r, struct http_request *req, struct pool_model *m)
{
    char extra[64];
    snprintf(extra, sizeof extra, "Retry-After: %.0f\r\n", r->retry_after);
    if (m)
        metrics_count_status(&m->stats, 503);
    http_respond_error_headers(req, 503, "unavailable_error", extra,
                               "llama-pool is shutting down; try again shortly");
}

void router_shutdown(struct router *r, double retry_after)
{
    r->closing = true;
    r->retry_after = retry_after > 1 ? retry_after : 1;
    size_t n = 0;
    for (struct rreq *q = r->reqs, *next; q; q = next) {
        next = q->next;
        if (q->dispatched)
            continue;
        sched_request_gone(r->sched, now_of(r), req_id(q));
        http_request_unwatch(q->req);
        refuse_closing(r, q->req, q->model);
        rreq_free(q);
        n++;
    }
    if (n)
        log_info("shutting down: answered %zu queued request%s 503", n, n == 1 ? "" : "s");
    router_run(r);
}

/* ---------- /pool/server ---------- */

struct server_wait {
    struct pool_observer obs;
    struct http_request *req;
    struct router *r;
    ev_timer timeout;
};

/* The ready instance of M to name to a caller who talks to it directly:
 * the one the scheduler would dispatch to (or the least busy). */
static struct instance *server_pick(struct router *r, const struct pool_model *m)
{
    if (!model_known(r, m))
        return NULL;
    sched_inst_t id = sched_pick_ready(r->sched, m->index);
    return id ? inst_of(id) : NULL;
}

/* A Host header fit to be put in a URL: a name or address and a port. */
static bool host_usable(const char *h)
{
    size_t n = strlen(h);
    if (n == 0 || n > 255)
        return false;
    return strspn(h, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]") == n;
}

/* How the pool itself is reached: the Host the request came with over
 * TCP, else the configured listen address, a wildcard made loopback
 * (0.0.0.0 → 127.0.0.1, [::] → [::1]). NULL when there is no TCP
 * listener at all. Malloc'd. */
static char *pool_address(const struct http_request *req, const struct config *cfg)
{
    const char *host = req->is_unix ? NULL : http_header_get(req, "Host");
    if (host && host_usable(host))
        return strdup(host);
    const char *listen = cfg->listen;
    if (!listen || !*listen)
        return NULL;
    char *addr = NULL;
    if (strncmp(listen, "0.0.0.0:", 8) == 0) {
        if (asprintf(&addr, "127.0.0.1:%s", listen + 8) < 0)
            addr = NULL;
    } else if (strncmp(listen, "[::]:", 5) == 0) {
        if (asprintf(&addr, "[::1]:%s", listen + 5) < 0)
            addr = NULL;
    } else {
        addr = strdup(listen);
    }
    return addr;
}

/* {"model","port","api_key","url","instance"}: the child's port and the key
 * it requires (the caller is an admin: admin_key over TCP, or the control
 * socket), and a URL through the pool (/upstream/M, with the pool's keys
 * and queue) that old code can use as the child's base URL. */
static void answer_server(struct router *r, struct http_request *req, struct pool_model *m,
                          struct instance *inst)
{
    char *addr = pool_address(req, r->pool->cfg);
    char *url = NULL;
    if (addr && asprintf(&url, "http://%s/upstream/%s", addr, m->cfg->name) < 0)
        url = NULL;
    free(addr);
    json_t *o = json_pack("{s:s,s:i,s:s?,s:o,s:s}", "model", m->cfg->name, "port", (int)inst->port,
                          "api_key", inst->api_key,
                          "url", url ? json_string(url) : json_null(), "instance", inst->id);
    free(url);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s) {
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    http_respond(req, 200, "application/json", NULL, s, strlen(s));
    free(s);
}

/* Stop waiting: off the pool's observers, the timer and the request.
 * Returns the request, to be answered after: an answer frees it. */
static struct http_request *server_wait_end(struct server_wait *w)
{
    struct http_request *req = w->req;
    pool_unobserve(&w->obs);
    ev_timer_stop(w->r->loop, &w->timeout);
    http_request_unwatch(req);
    free(w);
    return req;
}

static void server_wait_event(struct pool_observer *obs, const struct pool_event *ev)
{
    struct server_wait *w = (struct server_wait *)obs;
    if (ev->kind == POOL_EV_GONE) {
        http_respond_error(server_wait_end(w), 404, "not_found_error", "model removed by a reload");
        return;
    }
    if (ev->kind != POOL_EV_STATE)
        return;
    struct router *r = w->r;
    struct instance *inst = server_pick(r, ev->model);
    if (inst) {
        answer_server(r, server_wait_end(w), ev->model, inst);
    } else if (ev->inst->state == INSTANCE_BACKOFF || ev->inst->state == INSTANCE_FAILED) {
        http_respond_error(server_wait_end(w), 502, "server_error", "%s: failed to start: %s",
                           ev->model->cfg->name,
                           ev->inst->last_error ? ev->inst->last_error : "unknown error");
    }
}

static void server_wait_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop; (void)revents;
    struct server_wait *w = t->data;
    const char *name = w->obs.model ? w->obs.model->cfg->name : "model";
    http_respond_error(server_wait_end(w), 504, "timeout_error", "%s: not ready within queue_timeout",
                       name);
}

static void server_wait_gone(struct http_request *req, void *arg)
{
    (void)req;
    (void)server_wait_end(arg);
}

void router_server(struct router *r, struct http_request *req, struct pool_model *m)
{
    struct instance *inst = server_pick(r, m);
    if (inst) {
        answer_server(r, req, m, inst);
        return;
    }
    if (m->failed) {
        http_respond_error(req, 503, "unavailable_error", "%s", m->last_error ? m->last_error : "model failed");
        return;
    }
    char err[512];
    if (pool_model_start(m, 1, err, sizeof err) < 0) {
        http_respond_error(req, 502, "server_error", "%s: failed to start: %s", m->cfg->name, err);
        return;
    }
    struct server_wait *w = calloc(1, sizeof *w);
    if (!w) {
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    w->req = req;
    w->r = r;
    w->obs.fn = server_wait_event;
    pool_observe(m, &w->obs);
    http_request_watch(req, server_wait_gone, NULL, w);
    double limit = (double)r->pool->cfg->queue_timeout_ms / 1000.0;
    ev_timer_init(&w->timeout, server_wait_timeout, limit > 0 ? limit : 1e9, 0.);
    w->timeout.data = w;
    ev_timer_start(r->loop, &w->timeout);
}

/* ---------- lifecycle ---------- */

static void router_limits(struct router *r, struct sched_limits *l)
{
    l->max_queue = r->pool->cfg->max_queue;
    l->queue_timeout = (double)r->pool->cfg->queue_timeout_ms / 1000.0;
    l->budget = pool_budget(r->pool, NULL);
    l->eviction = r->pool->cfg->eviction == CONFIG_EVICTION_COST ? SCHED_EVICT_COST : SCHED_EVICT_LRU;
}

/* ---------- GPUs ---------- */

/* The devices' budgets for the scheduler (a lost device gets none), and
 * the estimates made again for their number. */
static void devices_update(struct router *r)
{
    size_t n = r->gpus ? gpus_count(r->gpus) : 0;
    uint64_t budgets[SCHED_MAX_DEVICES];
    if (n > SCHED_MAX_DEVICES)
        n = SCHED_MAX_DEVICES;
    if (n && !gpus_usable(r->gpus)) {
        /* Every GPU is gone: host memory only, as on a machine without one
         * (children run on the CPU, CUDA_VISIBLE_DEVICES=-1). */
        if (!r->gpus_all_lost)
            log_warn("every GPU is lost: host memory only from now on");
        r->gpus_all_lost = true;
        n = 0;
    }
    for (size_t d = 0; d < n; d++) {
        const struct gpu_device *g = gpus_device(r->gpus, d);
        budgets[d] = g->lost ? 0 : gpu_budget(r->pool->cfg, g->total);
    }
    sched_devices_set(r->sched, now_of(r), n, budgets);
    bool *had = r->pool->nmodels ? calloc(r->pool->nmodels, sizeof *had) : NULL;
    for (size_t i = 0; had && i < r->pool->nmodels; i++)
        had[i] = r->pool->models[i]->est_known;
    pool_set_devices(r->pool, (unsigned)n);
    for (size_t i = 0; had && i < r->pool->nmodels; i++)
        if (had[i] && model_known(r, r->pool->models[i]))
            model_info(r, r->pool->models[i], true);
    free(had);
}

/* Open NVML when pool.conf wants GPUs (again when nvml_library changed),
 * close it when it does not; then the budgets. */
static void devices_open(struct router *r)
{
    const struct config *cfg = r->pool->cfg;
    bool want = cfg->gpus == CONFIG_GPUS_AUTO;
    const char *lib = cfg->nvml_library ? cfg->nvml_library : CONFIG_DEFAULT_NVML_LIBRARY;
    if (!(r->gpus && want && r->gpus_library && strcmp(r->gpus_library, lib) == 0)) {
        gpus_close(r->gpus);
        r->gpus = NULL;
        free(r->gpus_library);
        r->gpus_library = NULL;
        if (want) {
            char err[256];
            if ((r->gpus = gpus_open(lib, err, sizeof err)))
                r->gpus_library = strdup(lib);
            else
                log_info("no GPU in use (%s): host memory only", err);
        }
        for (size_t d = 0; r->gpus && d < gpus_count(r->gpus); d++) {
            const struct gpu_device *g = gpus_device(r->gpus, d);
            char total[32], budget[32];
            log_info("GPU %u: %s %s, %s, budget %s", g->index, g->name, g->uuid,
                     util_format_bytes(g->total, total, sizeof total),
                     util_format_bytes(gpu_budget(cfg, g->total), budget, sizeof budget));
        }
    }
    devices_update(r);
}

/* Every 2 s: each device's free memory and each instance's use of it. */
static void devices_sample(struct router *r, double now)
{
    if (!r->gpus)
        return;
    if (gpus_refresh(r->gpus))
        devices_update(r);              /* a device was lost: no budget there now */
    for (size_t d = 0; d < gpus_count(r->gpus) && d < SCHED_MAX_DEVICES; d++) {
        const struct gpu_device *g = gpus_device(r->gpus, d);
        if (!g->lost)
            sched_device_free(r->sched, now, d, g->free);
    }
}

/* Every 2 s: each instance's PSS (its charge from then on) and the
 * machine's MemAvailable, for the scheduler's start decisions. */
#define SAMPLE_INTERVAL_S 2.0

static void sample_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct router *r = w->data;
    double now = now_of(r);
    devices_sample(r, now);
    for (size_t i = 0; i < r->pool->nmodels; i++) {
        struct pool_model *m = r->pool->models[i];
        for (size_t j = 0; j < m->ninst; j++) {
            struct instance *inst = m->inst[j];
            if (inst->pid <= 0 || !sched_instance_known(r->sched, inst_id(inst)))
                continue;
            uint64_t pss = instance_measure(inst);
            if (pss && inst->state == INSTANCE_READY)
                sched_instance_memory(r->sched, now, inst_id(inst), pss);
            uint64_t vram = r->gpus ? gpus_process_memory(r->gpus, inst->pid, NULL) : 0;
            if (vram)
                sched_instance_vram(r->sched, now, inst_id(inst), vram);
        }
    }
    struct memory_info mi;
    if (memory_read_info(NULL, &mi) == 0)
        sched_set_available(r->sched, now, mi.mem_available);
    router_run(r);
}

/* An operator's start or a preload: the scheduler's memory rules. */
static int pool_admit(struct pool_model *m, unsigned n, char *err, size_t errlen, void *arg)
{
    struct router *r = arg;
    size_t slot = model_slot(r, m);
    if (slot == SIZE_MAX)
        return 0;
    if (!m->est_known)
        model_info(r, m, true);     /* the scheduler plans with it from now on too */
    return sched_admit(r->sched, slot, n, err, errlen);
}

static const struct pool_listener router_listener = {
    .changed = pool_changed,
    .admit = pool_admit,
    .in_flight = pool_in_flight,
    .place = pool_place,
};

struct router *router_new(struct ev_loop *loop, struct pool *pool)
{
    struct router *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    struct sched_limits l;
    r->loop = loop;
    r->pool = pool;
    router_limits(r, &l);
    r->sched = sched_new(&l);
    r->proxy = proxy_new(loop);
    if (!r->sched || !r->proxy) {
        router_free(r);
        return NULL;
    }
    proxy_hand_back_unanswered(r->proxy, true);   /* resend() */
    ev_timer_init(&r->wake, wake_cb, 0., 0.);
    r->wake.data = r;
    ev_timer_init(&r->sample, sample_cb, SAMPLE_INTERVAL_S, SAMPLE_INTERVAL_S);
    r->sample.data = r;
    ev_timer_start(loop, &r->sample);
    ev_unref(loop);             /* sampling alone does not keep the loop running */
    pool_listen(pool, &router_listener, r);
    router_reload(r);
    return r;
}

void router_reload(struct router *r)
{
    struct sched_limits l;
    router_limits(r, &l);
    sched_set_limits(r->sched, &l);
    devices_open(r);
    /* Forget slots of models that are gone (the reload retired them: the
     * pool frees them only later, once stopped); give new models one, all
     * in one resize (indices grow with each model made). */
    for (size_t i = 0; i < r->nslots; i++) {
        struct pool_model *m = r->slots[i];
        if (m && m->retired) {
            r->slots[i] = NULL;
            /* The pool frees a removed model once its instances stop. */
            for (struct rreq *q = r->reqs; q; q = q->next)
                if (q->model == m)
                    q->model = NULL;
            sched_model_failed(r->sched, now_of(r), i, "model removed by a reload");
        }
    }
    size_t top = 0;
    for (size_t j = 0; j < r->pool->nmodels; j++)
        if (r->pool->models[j]->index >= top)
            top = r->pool->models[j]->index + 1;
    (void)slots_reserve(r, top);        /* else model_slot() tries each alone */
    for (size_t j = 0; j < r->pool->nmodels; j++) {
        struct pool_model *m = r->pool->models[j];
        bool known = model_known(r, m);
        if (model_slot(r, m) != SIZE_MAX && known)
            model_info(r, m, false);    /* model_slot() told a new one */
    }
    router_run(r);
}

void router_free(struct router *r)
{
    if (!r)
        return;
    if (r->pool && r->pool->listener_arg == r)
        pool_listen(r->pool, NULL, NULL);
    ev_timer_stop(r->loop, &r->wake);
    if (ev_is_active(&r->sample)) {
        ev_ref(r->loop);
        ev_timer_stop(r->loop, &r->sample);
    }
    while (r->fbcalls)
        fbcall_free(r->fbcalls);        /* proxy_free drops their calls */
    while (r->reqs) {
        struct rreq *q = r->reqs;
        if (!q->dispatched)
            http_request_unwatch(q->req);
        rreq_free(q);
    }
    proxy_free(r->proxy);
    gpus_close(r->gpus);
    free(r->gpus_library);
    sched_free(r->sched);
    free(r->slots);
    free(r);
}

size_t router_waiting(const struct router *r)
{
    return sched_waiting(r->sched);
}

size_t router_waiting_model(const struct router *r, const struct pool_model *m)
{
    return model_known(r, m) ? sched_waiting_model(r->sched, m->index) : 0;
}

void router_instance_view(const struct router *r, const struct instance *inst,
                          struct router_inst_view *v)
{
    sched_inst_t id = inst_id(inst);
    v->charge = sched_charge(r->sched, id);
    v->device = sched_instance_device(r->sched, id);
    v->devices = 0;
    for (size_t d = 0; d < router_devices(r) && d < SCHED_MAX_DEVICES; d++)
        if (sched_instance_vram_on(r->sched, id, d))
            v->devices |= 1u << d;
    v->vram = r->gpus && inst->pid > 0 ? gpus_process_memory(r->gpus, inst->pid, NULL) : 0;
    v->in_flight = sched_in_flight(r->sched, id);
    v->last_used = sched_last_used(r->sched, id);
    if (!v->last_used)
        v->last_used = inst->ready_at;      /* not used since it became ready */
}

uint64_t router_used(const struct router *r)
{
    return sched_used(r->sched);
}

size_t router_devices(const struct router *r)
{
    return r->gpus ? gpus_count(r->gpus) : 0;
}

bool router_device_view(const struct router *r, size_t d, struct router_dev_view *v)
{
    if (!r->gpus || d >= gpus_count(r->gpus))
        return false;
    const struct gpu_device *g = gpus_device(r->gpus, d);
    v->gpu = g;
    v->budget = g->lost ? 0 : gpu_budget(r->pool->cfg, g->total);
    v->used = sched_device_used(r->sched, d);
    v->measured = 0;
    for (size_t i = 0; i < r->pool->nmodels; i++) {
        const struct pool_model *m = r->pool->models[i];
        for (size_t j = 0; j < m->ninst; j++) {
            uint64_t per[MEMORY_MAX_DEVICES] = { 0 };
            if (m->inst[j]->pid > 0 && gpus_count(r->gpus) <= MEMORY_MAX_DEVICES &&
                gpus_process_memory(r->gpus, m->inst[j]->pid, per))
                v->measured += per[d];
        }
    }
    return true;
}
