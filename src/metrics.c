#define _GNU_SOURCE
#include "metrics.h"

#include "gpu.h"
#include "memory.h"
#include "pool.h"
#include "router.h"
#include "util.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double metrics_bucket_le[METRICS_BUCKETS] = {
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800,
};

/* S's counters, made at its first count; NULL when out of memory. */
static struct model_counts *counts(struct model_stats *s)
{
    if (!s->c)
        s->c = calloc(1, sizeof *s->c);
    return s->c;
}

void metrics_stats_free(struct model_stats *s)
{
    free(s->c);
    s->c = NULL;
}

void metrics_count_status(struct model_stats *s, int code)
{
    struct model_counts *c = counts(s);
    if (!c)
        return;
    for (size_t i = 0; i < METRICS_STATUS_SLOTS; i++) {
        if (c->status[i].code == code || c->status[i].code == 0) {
            c->status[i].code = code;
            c->status[i].n++;
            return;
        }
    }
    /* More distinct codes than slots: lump them into the last one. */
    c->status[METRICS_STATUS_SLOTS - 1].n++;
}

void metrics_count_timeout(struct model_stats *s)
{
    struct model_counts *c = counts(s);
    if (c)
        c->timeouts++;
}

void metrics_count_start(struct model_stats *s)
{
    struct model_counts *c = counts(s);
    if (c)
        c->starts++;
}

void metrics_count_load(struct model_stats *s, double seconds)
{
    struct model_counts *c = counts(s);
    if (!c)
        return;
    c->loads++;
    c->load_seconds += seconds;
}

void metrics_count_eviction(struct model_stats *s, enum metrics_eviction why)
{
    struct model_counts *c = counts(s);
    if (!c)
        return;
    switch (why) {
    case METRICS_EVICT_LRU:    c->lru_stops++; break;
    case METRICS_EVICT_IDLE:   c->idle_stops++; break;
    case METRICS_EVICT_RELOAD: c->reload_stops++; break;
    case METRICS_EVICT_CRASH:  c->crashes++; break;
    }
}

const char *metrics_fallback_name(enum metrics_fallback why)
{
    static const char *const names[METRICS_FALLBACK_REASONS] = {
        "never_fits", "queue_full", "failed", "start_failed",
    };
    return (unsigned)why < METRICS_FALLBACK_REASONS ? names[why] : "?";
}

void metrics_count_fallback(struct model_stats *s, enum metrics_fallback why)
{
    struct model_counts *c = counts(s);
    if (c && (unsigned)why < METRICS_FALLBACK_REASONS)
        c->fallbacks[why]++;
}

void metrics_count_fallback_unknown(struct pool_stats *s)
{
    s->fallback_unknown++;
}

void metrics_count_queue_wait(struct model_stats *s, double seconds)
{
    struct model_counts *c = counts(s);
    if (!c)
        return;
    c->queue_waits++;
    c->queue_wait_seconds += seconds;
}

void metrics_count_affinity(struct model_stats *s, bool hit)
{
    struct model_counts *c = counts(s);
    if (!c)
        return;
    if (hit)
        c->affinity_hits++;
    else
        c->affinity_misses++;
}

void metrics_count_prompt(struct model_stats *s, uint64_t cached, uint64_t processed)
{
    struct model_counts *c = counts(s);
    if (!c)
        return;
    c->prompt_cached += cached;
    c->prompt_processed += processed;
}

void metrics_count_child_scrape_failed(struct model_stats *s)
{
    struct model_counts *c = counts(s);
    if (c)
        c->child_scrapes_failed++;
}

void metrics_observe(struct metrics_hist *s, double seconds)
{
    for (size_t i = 0; i < METRICS_BUCKETS; i++)
        if (seconds <= metrics_bucket_le[i]) {
            s->bucket[i]++;
            break;
        }
    s->sum += seconds;
    s->count++;
}

/* The text being rendered; on allocation failure it stops growing and
 * the render returns NULL. It also keeps the label values it had to
 * escape (see label), freed with it. */
struct out {
    struct buf text;
    bool failed;
    char **escaped;
    size_t nescaped, escaped_cap;
};

static void emit(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void emit(struct out *o, const char *fmt, ...)
{
    if (o->failed)
        return;
    va_list ap;
    va_start(ap, fmt);
    o->failed = !buf_vprintf(&o->text, fmt, ap);
    va_end(ap);
}

/* S as a label value (between the quotes). Names in pool.conf are checked
 * there, but a scrape must never be what breaks: anything else is escaped
 * into a copy that O keeps until the render ends. S itself when it needs
 * nothing. */
static const char *label(struct out *o, const char *s)
{
    size_t len = strlen(s);
    if (util_utf8_check(s, len) == len && !strpbrk(s, "\\\"\n"))
        return s;
    char *esc = o->failed ? NULL : util_prom_label_escape(s);
    if (esc && !util_grow(&o->escaped, &o->escaped_cap, o->nescaped + 1, sizeof *o->escaped)) {
        free(esc);
        esc = NULL;
    }
    if (!esc) {
        o->failed = true;
        return "";
    }
    o->escaped[o->nescaped++] = esc;
    return esc;
}

static void out_release_escaped(struct out *o)
{
    for (size_t i = 0; i < o->nescaped; i++)
        free(o->escaped[i]);
    free(o->escaped);
    o->escaped = NULL;
    o->nescaped = o->escaped_cap = 0;
}

static void family(struct out *o, const char *name, const char *type, const char *help)
{
    emit(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void histogram(struct out *o, const char *name, const char *help, const struct metrics_hist *h)
{
    family(o, name, "histogram", help);
    uint64_t cum = 0;
    for (size_t i = 0; i < METRICS_BUCKETS; i++) {
        cum += h->bucket[i];
        emit(o, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, metrics_bucket_le[i], cum);
    }
    emit(o, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, h->count);
    emit(o, "%s_sum %.6f\n", name, h->sum);
    emit(o, "%s_count %" PRIu64 "\n", name, h->count);
}

/* The per-instance gauges, one family each. */
enum inst_gauge { GAUGE_MEMORY, GAUGE_CHARGED, GAUGE_IN_FLIGHT, GAUGE_SLOTS, GAUGE_VRAM };
static const struct { const char *name, *help; } inst_gauges[] = {
    [GAUGE_MEMORY] = { "llama_pool_instance_memory_bytes", "measured PSS of each instance" },
    [GAUGE_CHARGED] = { "llama_pool_instance_charged_bytes",
                        "what each instance is charged against the budget (estimate while starting, then PSS)" },
    [GAUGE_IN_FLIGHT] = { "llama_pool_instance_in_flight", "requests being answered by each instance" },
    [GAUGE_SLOTS] = { "llama_pool_instance_slots", "slots of each instance (its /props total_slots)" },
    [GAUGE_VRAM] = { "llama_pool_instance_vram_bytes", "GPU memory each instance holds, as NVML reports it" },
};

static uint64_t inst_gauge_value(const struct router *r, const struct instance *in, enum inst_gauge g)
{
    struct router_inst_view v;
    switch (g) {
    case GAUGE_MEMORY:    return in->pss;
    case GAUGE_SLOTS:     return in->slots;
    case GAUGE_CHARGED:   router_instance_view(r, in, &v); return v.charge;
    case GAUGE_IN_FLIGHT: router_instance_view(r, in, &v); return v.in_flight;
    case GAUGE_VRAM:      router_instance_view(r, in, &v); return v.vram;
    }
    return 0;
}

/* M's counters to read: zeros before its first count. */
static const struct model_counts *counts_of(const struct pool_model *m)
{
    static const struct model_counts none;
    return m->stats.c ? m->stats.c : &none;
}

/* A summary by model from the double at SUM_OFF and the count at
 * COUNT_OFF of each model's counters. */
static void model_summary(struct out *o, const struct pool *p, const char *name, const char *help,
                          size_t sum_off, size_t count_off)
{
    family(o, name, "summary", help);
    for (size_t i = 0; i < p->nmodels; i++) {
        const char *s = (const char *)counts_of(p->models[i]);
        double sum;
        uint64_t count;
        memcpy(&sum, s + sum_off, sizeof sum);
        memcpy(&count, s + count_off, sizeof count);
        const char *n = label(o, p->models[i]->cfg->name);
        emit(o, "%s_sum{model=\"%s\"} %.6f\n", name, n, sum);
        emit(o, "%s_count{model=\"%s\"} %" PRIu64 "\n", name, n, count);
    }
}

/* A counter family of two values per model, told apart by label KEY (A or
 * B: the uint64_t counts at A_OFF and B_OFF); only the models that have
 * counted either. */
static void model_pair(struct out *o, const struct pool *p, const char *name, const char *help,
                       const char *key, const char *a, size_t a_off, const char *b, size_t b_off)
{
    family(o, name, "counter", help);
    for (size_t i = 0; i < p->nmodels; i++) {
        const char *s = (const char *)counts_of(p->models[i]);
        uint64_t va, vb;
        memcpy(&va, s + a_off, sizeof va);
        memcpy(&vb, s + b_off, sizeof vb);
        if (!va && !vb)
            continue;
        const char *n = label(o, p->models[i]->cfg->name);
        emit(o, "%s{model=\"%s\",%s=\"%s\"} %" PRIu64 "\n", name, n, key, a, va);
        emit(o, "%s{model=\"%s\",%s=\"%s\"} %" PRIu64 "\n", name, n, key, b, vb);
    }
}

char *metrics_render(struct pool *p, const struct router *r, size_t *len)
{
    struct out o = { 0 };
    o.failed = !buf_reserve_min(&o.text, 0, 16384);
    static const char *const states[] = { "stopped", "starting", "ready", "stopping", "backoff", "failed" };
    uint64_t available;
    uint64_t budget = pool_budget(p, &available);
    uint64_t measured = pool_measured(p);

    family(&o, "llama_pool_instance_state", "gauge", "1 for the state each instance is in");
    for (size_t i = 0; i < p->nmodels; i++) {
        struct pool_model *m = p->models[i];
        const char *mn = label(&o, m->cfg->name);
        for (size_t j = 0; j < m->ninst; j++)
            for (size_t s = 0; s < sizeof states / sizeof states[0]; s++)
                emit(&o, "llama_pool_instance_state{model=\"%s\",instance=\"%s\",state=\"%s\"} %d\n",
                     mn, label(&o, m->inst[j]->id), states[s], (int)m->inst[j]->state == (int)s);
    }
    for (size_t g = 0; g < sizeof inst_gauges / sizeof inst_gauges[0]; g++) {
        family(&o, inst_gauges[g].name, "gauge", inst_gauges[g].help);
        for (size_t i = 0; i < p->nmodels; i++) {
            const char *mn = label(&o, p->models[i]->cfg->name);
            for (size_t j = 0; j < p->models[i]->ninst; j++) {
                const struct instance *in = p->models[i]->inst[j];
                emit(&o, "%s{model=\"%s\",instance=\"%s\"} %" PRIu64 "\n", inst_gauges[g].name,
                     mn, label(&o, in->id), inst_gauge_value(r, in, (enum inst_gauge)g));
            }
        }
    }

    /* With a cgroup per child (cgroup.h): memory.current beside PSS. */
    if (p->cgroups && p->cgroups->enabled) {
        family(&o, "llama_pool_instance_cgroup_memory_bytes", "gauge",
               "memory.current of each instance's cgroup (the page cache it brought in counted, "
               "the weights it touched first included)");
        for (size_t i = 0; i < p->nmodels; i++) {
            const char *mn = label(&o, p->models[i]->cfg->name);
            for (size_t j = 0; j < p->models[i]->ninst; j++) {
                const struct instance *in = p->models[i]->inst[j];
                if (in->pid > 0 && in->cgroup.name[0])
                    emit(&o, "llama_pool_instance_cgroup_memory_bytes{model=\"%s\",instance=\"%s\"} %" PRIu64 "\n",
                         mn, label(&o, in->id), in->cgroup.current);
            }
        }
        family(&o, "llama_pool_memory_cgroup_bytes", "gauge", "sum of the instances' cgroup memory.current");
        emit(&o, "llama_pool_memory_cgroup_bytes %" PRIu64 "\n", pool_cgroup_measured(p));
    }

    family(&o, "llama_pool_memory_budget_bytes", "gauge", "memory the instances may use together");
    emit(&o, "llama_pool_memory_budget_bytes %" PRIu64 "\n", budget);
    family(&o, "llama_pool_memory_used_bytes", "gauge",
           "what the instances are charged against the budget (estimate while starting, then PSS)");
    emit(&o, "llama_pool_memory_used_bytes %" PRIu64 "\n", router_used(r));
    family(&o, "llama_pool_memory_measured_bytes", "gauge", "sum of the instances' measured PSS");
    emit(&o, "llama_pool_memory_measured_bytes %" PRIu64 "\n", measured);
    family(&o, "llama_pool_memory_available_bytes", "gauge", "MemAvailable of the machine");
    emit(&o, "llama_pool_memory_available_bytes %" PRIu64 "\n", available);

    static const struct { const char *name, *help; } dev_gauges[] = {
        { "llama_pool_gpu_total_bytes", "memory of each GPU" },
        { "llama_pool_gpu_budget_bytes", "what our instances may use on each GPU (0 when lost)" },
        { "llama_pool_gpu_used_bytes", "what our instances are charged on each GPU" },
        { "llama_pool_gpu_measured_bytes", "what our instances hold on each GPU, as NVML reports it" },
        { "llama_pool_gpu_free_bytes", "free memory of each GPU (every program's use counted)" },
    };
    /* Each device's view once (its measured use walks every instance),
     * then a family per gauge. */
    struct router_dev_view views[ROUTER_MAX_DEVICES];
    size_t ndev = 0;
    while (ndev < ROUTER_MAX_DEVICES && router_device_view(r, ndev, &views[ndev]))
        ndev++;
    for (size_t g = 0; ndev && g < sizeof dev_gauges / sizeof dev_gauges[0]; g++) {
        family(&o, dev_gauges[g].name, "gauge", dev_gauges[g].help);
        for (size_t d = 0; d < ndev; d++) {
            const struct router_dev_view *dv = &views[d];
            uint64_t v[] = { dv->gpu->total, dv->budget, dv->used, dv->measured, dv->gpu->free };
            emit(&o, "%s{device=\"%u\",name=\"%s\"} %" PRIu64 "\n", dev_gauges[g].name,
                 dv->gpu->index, label(&o, dv->gpu->name), v[g]);
        }
    }

    family(&o, "llama_pool_queue_waiting", "gauge", "requests waiting for a slot, by model");
    for (size_t i = 0; i < p->nmodels; i++)
        emit(&o, "llama_pool_queue_waiting{model=\"%s\"} %zu\n", label(&o, p->models[i]->cfg->name),
             router_waiting_model(r, p->models[i]));
    family(&o, "llama_pool_queue_max", "gauge", "max_queue");
    emit(&o, "llama_pool_queue_max %u\n", p->cfg->max_queue);

    family(&o, "llama_pool_starts_total", "counter", "instance spawns, by model");
    for (size_t i = 0; i < p->nmodels; i++)
        emit(&o, "llama_pool_starts_total{model=\"%s\"} %" PRIu64 "\n", label(&o, p->models[i]->cfg->name),
             counts_of(p->models[i])->starts);
    model_summary(&o, p, "llama_pool_load_seconds", "time from spawn to ready, by model",
                  offsetof(struct model_counts, load_seconds), offsetof(struct model_counts, loads));
    family(&o, "llama_pool_evictions_total", "counter",
           "instances that stopped other than by an operator, by model and reason");
    for (size_t i = 0; i < p->nmodels; i++) {
        const struct model_counts *s = counts_of(p->models[i]);
        const char *n = label(&o, p->models[i]->cfg->name);
        emit(&o, "llama_pool_evictions_total{model=\"%s\",reason=\"lru\"} %" PRIu64 "\n", n, s->lru_stops);
        emit(&o, "llama_pool_evictions_total{model=\"%s\",reason=\"idle\"} %" PRIu64 "\n", n, s->idle_stops);
        emit(&o, "llama_pool_evictions_total{model=\"%s\",reason=\"reload\"} %" PRIu64 "\n", n, s->reload_stops);
        emit(&o, "llama_pool_evictions_total{model=\"%s\",reason=\"crash\"} %" PRIu64 "\n", n, s->crashes);
    }
    model_pair(&o, p, "llama_pool_affinity_total",
               "requests with a prompt (routing = affinity) by model: hit, sent to an instance that "
               "holds it; miss, sent elsewhere (none known, or that one stayed busy past affinity_wait)",
               "result", "hit", offsetof(struct model_counts, affinity_hits),
               "miss", offsetof(struct model_counts, affinity_misses));
    model_pair(&o, p, "llama_pool_prompt_tokens_total",
               "prompt tokens of the answers by model, as llama-server's timings say: cache, taken "
               "from its KV cache (cache_n); processed, evaluated (prompt_n)",
               "source", "cache", offsetof(struct model_counts, prompt_cached),
               "processed", offsetof(struct model_counts, prompt_processed));
    model_summary(&o, p, "llama_pool_queue_wait_seconds", "time from arrival to dispatch, by model",
                  offsetof(struct model_counts, queue_wait_seconds),
                  offsetof(struct model_counts, queue_waits));
    family(&o, "llama_pool_requests_total", "counter",
           "answered requests by model and HTTP status (499: the client left first; "
           "timeout: cut at request_timeout)");
    for (size_t i = 0; i < p->nmodels; i++) {
        const struct model_counts *s = counts_of(p->models[i]);
        for (size_t k = 0; k < METRICS_STATUS_SLOTS && s->status[k].n; k++)
            emit(&o, "llama_pool_requests_total{model=\"%s\",status=\"%d\"} %" PRIu64 "\n",
                 label(&o, p->models[i]->cfg->name), s->status[k].code, s->status[k].n);
        if (s->timeouts)
            emit(&o, "llama_pool_requests_total{model=\"%s\",status=\"timeout\"} %" PRIu64 "\n",
                 label(&o, p->models[i]->cfg->name), s->timeouts);
    }
    /* Only the models that used it (and "unknown" when it may be used): a
     * fallback is for the exception, not a series per configured model. */
    family(&o, "llama_pool_fallback_total", "counter",
           "requests sent to the fallback, by model and reason: never_fits, queue_full, failed "
           "(crash loop), start_failed; unknown (model=\"\"): a model not configured here");
    for (size_t i = 0; i < p->nmodels; i++) {
        const struct model_counts *s = counts_of(p->models[i]);
        for (unsigned k = 0; k < METRICS_FALLBACK_REASONS; k++)
            if (s->fallbacks[k])
                emit(&o, "llama_pool_fallback_total{model=\"%s\",reason=\"%s\"} %" PRIu64 "\n",
                     label(&o, p->models[i]->cfg->name), metrics_fallback_name(k), s->fallbacks[k]);
    }
    if ((p->cfg->fallback && p->cfg->fallback_unknown) || p->stats.fallback_unknown)
        emit(&o, "llama_pool_fallback_total{model=\"\",reason=\"unknown\"} %" PRIu64 "\n",
             p->stats.fallback_unknown);
    if (p->cfg->metrics_children) {
        /* Every model that ran since the daemon started, so that the first
         * failure is an increase from 0, not a new series. */
        family(&o, "llama_pool_child_scrape_errors_total", "counter",
               "children of each model skipped by a /metrics scrape: no answer within the "
               "scrape's timeout, an error, or a status other than 200");
        for (size_t i = 0; i < p->nmodels; i++)
            if (p->models[i]->stats.c)
                emit(&o, "llama_pool_child_scrape_errors_total{model=\"%s\"} %" PRIu64 "\n",
                     label(&o, p->models[i]->cfg->name), p->models[i]->stats.c->child_scrapes_failed);
    }
    histogram(&o, "llama_pool_request_duration_seconds",
              "time from a request's arrival to the end of its answer, through the proxy",
              &p->stats.duration);
    histogram(&o, "llama_pool_upstream_first_byte_seconds",
              "time from dispatch to the instance's response head: the proxy's connect and "
              "send, and the instance's prompt processing",
              &p->stats.first_byte);

    out_release_escaped(&o);
    if (o.failed) {
        buf_free(&o.text);
        return NULL;
    }
    *len = o.text.len;
    return buf_take(&o.text);
}
