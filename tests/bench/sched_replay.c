/* sched-replay — replay a simulated trace through the real scheduler.
 *
 * A fake clock and a fake pool: no processes, no sockets. One trace (Zipf
 * model popularity, Poisson arrivals, exponential service times) is replayed
 * under three policies:
 *   (a) llama-pool's scheduler (src/scheduler.c) with a memory budget;
 *   (b) a count-based LRU like llama-server's router --models-max K: at most
 *       K models loaded, the least recently requested one is unloaded when
 *       another is needed, busy or not (requests on it are killed);
 *   (c) one model at a time (llama-swap style): a request for another model
 *       waits for the loaded one's requests to finish, then swaps it.
 * Then a scale run: many models registered, many requests, replay time only.
 *
 *   sched-replay [--seed N] [--models N] [--requests N] [--rate R] [--zipf S]
 *                [--fit K] [--scale-models N] [--scale-requests N] [--no-scale]
 */
#include "scheduler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define GIB (1024.0 * 1024.0 * 1024.0)
#define SLOTS 4
#define UNLOAD_DELAY (no_times ? 0.0 : 0.5)  /* STOP → removed (a): SIGTERM, exit, reaped */
#define CLIENT_TIMEOUT 120.0    /* (a) queue_timeout; (b)/(c) the client gives up */

/* ---------- random numbers ---------- */

static uint64_t rng_state;
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rng_unit(void)   /* (0,1) */
{
    return ((rng_next() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double rng_exp(double mean) { return -mean * log(rng_unit()); }
static double rng_normal(void)  /* Box-Muller */
{
    return sqrt(-2.0 * log(rng_unit())) * cos(2.0 * M_PI * rng_unit());
}

static double now_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------- the trace ---------- */

/* How models are sized: uniform 14-22 GiB, load 5-20 s by size (the
 * default), or lognormal (--sizes lognormal: median 8 GB, sigma 0.9,
 * clipped to 0.7-70 GB, GB = 1e9 bytes; load 1 s + 4 GB/s), where counting
 * models and counting bytes part ways. --no-times: loads and services take
 * no time (a pure cache: only hits and bytes count). */
static bool sizes_lognormal, no_times;

struct trace {
    size_t nmodels, nreq;
    double *est;        /* bytes per model (weights + KV) */
    double *load;       /* seconds to load */
    double *at;         /* arrival */
    double *service;    /* seconds on a slot */
    uint32_t *model;
};

static void trace_make(struct trace *t, size_t nmodels, size_t nreq, double rate, double zipf)
{
    t->nmodels = nmodels;
    t->nreq = nreq;
    t->est = malloc(nmodels * sizeof *t->est);
    t->load = malloc(nmodels * sizeof *t->load);
    t->at = malloc(nreq * sizeof *t->at);
    t->service = malloc(nreq * sizeof *t->service);
    t->model = malloc(nreq * sizeof *t->model);
    double *cdf = malloc(nmodels * sizeof *cdf);
    double sum = 0;
    for (size_t i = 0; i < nmodels; i++) {
        if (sizes_lognormal) {
            double gb = exp(log(8.0) + 0.9 * rng_normal());
            gb = gb < 0.7 ? 0.7 : gb > 70.0 ? 70.0 : gb;
            t->est[i] = gb * 1e9;
            t->load[i] = no_times ? 0 : 1.0 + gb / 4.0;
        } else {
            double gib = 14.0 + 8.0 * rng_unit();            /* 14–22 GiB */
            t->est[i] = gib * GIB;
            t->load[i] = no_times ? 0 : 5.0 + 15.0 * (gib - 14.0) / 8.0;    /* 5–20 s, by size */
        }
        sum += pow((double)(i + 1), -zipf);
        cdf[i] = sum;
    }
    /* Popularity rank is independent of size: rank i is model i. */
    double clock = 0;
    for (size_t r = 0; r < nreq; r++) {
        clock += rng_exp(1.0 / rate);
        t->at[r] = clock;
        t->service[r] = no_times ? 0 : rng_exp(2.0);
        double u = rng_unit() * sum;
        size_t lo = 0, hi = nmodels - 1;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (cdf[mid] < u)
                lo = mid + 1;
            else
                hi = mid;
        }
        t->model[r] = (uint32_t)lo;
    }
    free(cdf);
}

/* ---------- event queue: a binary heap on (time, sequence) ---------- */

enum ev_kind { EV_ARRIVE, EV_READY, EV_REMOVED, EV_DONE, EV_WAKE, EV_TIMEOUT, EV_UNLOADED };

struct ev {
    double t;
    uint64_t seq;
    uint64_t a, b;
    int kind;
};

struct heap {
    struct ev *v;
    size_t n, cap;
    uint64_t seq;
};

static bool ev_less(const struct ev *x, const struct ev *y)
{
    return x->t < y->t || (x->t == y->t && x->seq < y->seq);
}

static void heap_push(struct heap *h, double t, int kind, uint64_t a, uint64_t b)
{
    if (h->n == h->cap) {
        h->cap = h->cap ? h->cap * 2 : 1024;
        h->v = realloc(h->v, h->cap * sizeof *h->v);
        if (!h->v)
            abort();
    }
    struct ev e = { t, h->seq++, a, b, kind };
    size_t i = h->n++;
    while (i) {
        size_t p = (i - 1) / 2;
        if (!ev_less(&e, &h->v[p]))
            break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = e;
}

static bool heap_pop(struct heap *h, struct ev *out)
{
    if (!h->n)
        return false;
    *out = h->v[0];
    struct ev last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n)
            break;
        if (c + 1 < h->n && ev_less(&h->v[c + 1], &h->v[c]))
            c++;
        if (!ev_less(&h->v[c], &last))
            break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n)
        h->v[i] = last;
    return true;
}

/* ---------- results ---------- */

struct result {
    const char *name;
    size_t served, hits, loads, evictions, killed, timed_out, rejected, failed_other;
    double *waits;
    size_t nwaits;
    double mean_wait, p99_wait, max_wait;
    double wall, sim_end;
    size_t max_loaded;
    double area, prev;          /* ∫ loaded dt, for the time average */
    double bytes_loaded;        /* (a): the sizes of the instances started */
    double live_bytes, max_live_bytes;  /* (a): started and not yet removed */
    size_t overruns;            /* (a): starts that took live_bytes past the budget */
};

static void note_loaded(struct result *r, double now, size_t loaded)
{
    r->area += loaded * (now - r->prev);
    r->prev = now;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void result_finish(struct result *r)
{
    double sum = 0;
    for (size_t i = 0; i < r->nwaits; i++)
        sum += r->waits[i];
    r->mean_wait = r->nwaits ? sum / r->nwaits : 0;
    qsort(r->waits, r->nwaits, sizeof *r->waits, cmp_double);
    r->p99_wait = r->nwaits ? r->waits[(size_t)((r->nwaits - 1) * 0.99)] : 0;
    r->max_wait = r->nwaits ? r->waits[r->nwaits - 1] : 0;
    free(r->waits);
    r->waits = NULL;
}

static void note_dispatch(struct result *r, double wait, bool hit)
{
    r->waits[r->nwaits++] = wait;
    r->served++;
    r->hits += hit;
}

/* ---------- the replay loop, common to the three policies ---------- */

/* Before the first event: room for every wait, the first arrival queued.
 * Returns the wall clock the replay is timed from. */
static double replay_begin(const struct trace *t, struct result *res, struct heap *h)
{
    res->waits = malloc(t->nreq * sizeof *res->waits);
    double w0 = now_wall();
    if (t->nreq)
        heap_push(h, t->at[0], EV_ARRIVE, 0, 0);
    return w0;
}

/* An EV_ARRIVE: the index of the request that arrived (*NEXT counts
 * them), the one after it queued. Arrivals are queued one at a time so
 * that the heap holds only what is pending. */
static size_t replay_arrive(const struct trace *t, struct heap *h, size_t *next)
{
    size_t r = (*next)++;
    if (*next < t->nreq)
        heap_push(h, t->at[*next], EV_ARRIVE, 0, 0);
    return r;
}

/* After the last event: the wall time taken and the wait statistics. */
static void replay_end(struct result *res, double w0)
{
    res->wall = now_wall() - w0;
    result_finish(res);
}

/* ---------- (a) llama-pool's scheduler ---------- */

enum { I_NONE, I_STARTING, I_READY, I_STOPPING };

struct pool_sim {
    const struct trace *t;
    struct sched *s;
    struct heap h;
    struct result *res;
    uint8_t *ready_at_arrival;
    uint8_t *istate;            /* by instance id */
    uint32_t *imodel;
    size_t ninst, capinst;
    uint32_t *model_ready;      /* ready instances per model */
    double wake_at;
    size_t live, max_live;
    unsigned trace_left;        /* print this many actions (--trace) */
    uint64_t budget;
};

static void pool_actions(struct pool_sim *p, double now)
{
    struct sched_action a;
    while (sched_next_action(p->s, &a)) {
        if (p->trace_left) {
            p->trace_left--;
            fprintf(stderr, "  t=%9.3f %s req=%llu inst=%llu model=%zu status=%d at=%.3f\n", now,
                    (const char *[]){"DISPATCH", "START", "STOP", "FAIL", "WAKE"}[a.kind],
                    (unsigned long long)a.req, (unsigned long long)a.inst, a.model, a.status, a.at);
        }
        switch (a.kind) {
        case SCHED_DISPATCH: {
            size_t r = a.req - 1;
            note_dispatch(p->res, now - p->t->at[r], p->ready_at_arrival[r]);
            heap_push(&p->h, now + p->t->service[r], EV_DONE, a.req, 0);
            break;
        }
        case SCHED_START: {
            if (p->ninst + 1 >= p->capinst) {
                p->capinst = p->capinst ? p->capinst * 2 : 1024;
                p->istate = realloc(p->istate, p->capinst);
                p->imodel = realloc(p->imodel, p->capinst * sizeof *p->imodel);
            }
            sched_inst_t id = ++p->ninst;
            p->istate[id] = I_STARTING;
            p->imodel[id] = (uint32_t)a.model;
            p->res->loads++;
            p->res->bytes_loaded += p->t->est[a.model];
            p->res->live_bytes += p->t->est[a.model];
            if (p->res->live_bytes > p->res->max_live_bytes)
                p->res->max_live_bytes = p->res->live_bytes;
            if (p->budget && p->res->live_bytes > (double)p->budget * (1 + 1e-9))
                p->res->overruns++;
            if (++p->live > p->max_live)
                p->max_live = p->live;
            sched_instance_added(p->s, now, id, a.model);
            heap_push(&p->h, now + p->t->load[a.model], EV_READY, id, 0);
            break;
        }
        case SCHED_STOP:
            if (p->istate[a.inst] == I_READY)
                p->model_ready[p->imodel[a.inst]]--;
            p->istate[a.inst] = I_STOPPING;
            p->res->evictions += a.reason == SCHED_STOP_LRU;
            heap_push(&p->h, now + UNLOAD_DELAY, EV_REMOVED, a.inst, 0);
            break;
        case SCHED_FAIL:
            if (a.status == 504)
                p->res->timed_out++;
            else if (a.status == 429)
                p->res->rejected++;
            else
                p->res->failed_other++;
            break;
        case SCHED_WAKE:
            p->wake_at = a.at;
            heap_push(&p->h, a.at, EV_WAKE, 0, 0);
            break;
        }
    }
}

static void run_pool(const struct trace *t, struct result *res, uint64_t budget, unsigned trace_n,
                     enum sched_eviction eviction)
{
    struct sched_limits lim = { .max_queue = 256, .queue_timeout = CLIENT_TIMEOUT, .budget = budget,
                                .eviction = eviction };
    struct pool_sim p = { .t = t, .res = res, .trace_left = trace_n, .budget = budget };
    p.s = sched_new(&lim);
    sched_models_resize(p.s, t->nmodels);
    char name[32];
    for (size_t i = 0; i < t->nmodels; i++) {
        struct sched_model_info info = {
            .instances_min = 0, .instances_max = 1, .slots_hint = SLOTS,
            .mem_weights = (uint64_t)(sizes_lognormal ? 0.85 * t->est[i] : t->est[i] - 2 * GIB),
            .mem_more = (uint64_t)(sizes_lognormal ? 0.15 * t->est[i] : 2 * GIB),
            .idle_timeout = 0,
        };
        snprintf(name, sizeof name, "m%zu", i);
        sched_model_set(p.s, i, name, &info);
    }
    p.ready_at_arrival = calloc(t->nreq, 1);
    p.model_ready = calloc(t->nmodels, sizeof *p.model_ready);
    double w0 = replay_begin(t, res, &p.h);
    size_t next = 0;
    struct ev e;
    while (heap_pop(&p.h, &e)) {
        double now = e.t;
        note_loaded(res, now, p.live);
        switch (e.kind) {
        case EV_ARRIVE: {
            size_t r = replay_arrive(t, &p.h, &next);
            p.ready_at_arrival[r] = p.model_ready[t->model[r]] > 0;
            sched_request(p.s, now, r + 1, t->model[r]);
            break;
        }
        case EV_READY:
            p.istate[e.a] = I_READY;
            p.model_ready[p.imodel[e.a]]++;
            sched_instance_ready(p.s, now, e.a, SLOTS);
            pool_actions(&p, now);
            sched_instance_memory(p.s, now, e.a, (uint64_t)t->est[p.imodel[e.a]]);
            break;
        case EV_DONE:
            sched_request_done(p.s, now, e.a);
            break;
        case EV_REMOVED:
            p.istate[e.a] = I_NONE;
            p.live--;
            res->live_bytes -= t->est[p.imodel[e.a]];
            sched_instance_removed(p.s, now, e.a);
            break;
        case EV_WAKE:
            if (now != p.wake_at)
                continue;       /* replaced by a later WAKE */
            sched_tick(p.s, now);
            break;
        }
        pool_actions(&p, now);
        res->sim_end = now;
    }
    res->max_loaded = p.max_live;
    replay_end(res, w0);
    sched_free(p.s);
    free(p.h.v);
    free(p.ready_at_arrival);
    free(p.model_ready);
    free(p.istate);
    free(p.imodel);
}

/* ---------- (b) count-based LRU (llama-server router --models-max K) ---------- */

enum { R_QUEUED = 1, R_FLIGHT, R_DONE, R_KILLED, R_TIMEOUT };

struct fifo {                   /* per-model queue of request indices, linked by next[] */
    int64_t head, tail;
};

static double lru_mem_max, lru_over_time;     /* (b) against (a)'s budget */

static void run_lru(const struct trace *t, struct result *res, size_t K, double budget)
{
    double mem = 0, mprev = 0;
    size_t nm = t->nmodels;
    uint8_t *state = calloc(nm, 1);         /* 0 unloaded, 1 loading, 2 ready */
    double *last = calloc(nm, sizeof *last);
    uint32_t *gen = calloc(nm, sizeof *gen), *flight = calloc(nm, sizeof *flight);
    struct fifo *q = malloc(nm * sizeof *q);
    for (size_t i = 0; i < nm; i++)
        q[i].head = q[i].tail = -1;
    int64_t *nx = malloc(t->nreq * sizeof *nx);
    uint8_t *rs = calloc(t->nreq, 1), *hit = calloc(t->nreq, 1);
    uint32_t *rgen = malloc(t->nreq * sizeof *rgen);
    struct heap h = { 0 };
    size_t loaded = 0, next = 0, killed_flight = 0;
    double w0 = replay_begin(t, res, &h);
    struct ev e;
    while (heap_pop(&h, &e)) {
        double now = e.t;
        size_t m = SIZE_MAX;
        note_loaded(res, now, loaded);
        if (mem > budget)
            lru_over_time += now - mprev;
        mprev = now;
        switch (e.kind) {
        case EV_ARRIVE: {
            size_t r = replay_arrive(t, &h, &next);
            m = t->model[r];
            last[m] = now;
            hit[r] = state[m] == 2;
            if (!state[m]) {
                if (loaded >= K) {              /* evict the LRU, busy or not */
                    size_t v = SIZE_MAX;
                    for (size_t i = 0; i < nm; i++)
                        if (state[i] && i != m && (v == SIZE_MAX || last[i] < last[v]))
                            v = i;
                    res->killed += flight[v];
                    killed_flight += flight[v];
                    for (int64_t k = q[v].head; k >= 0; k = nx[k])
                        if (rs[k] == R_QUEUED) {
                            rs[k] = R_KILLED;
                            res->killed++;
                        }
                    q[v].head = q[v].tail = -1;
                    flight[v] = 0;
                    state[v] = 0;
                    mem -= t->est[v];
                    gen[v]++;
                    loaded--;
                    res->evictions++;
                }
                state[m] = 1;
                mem += t->est[m];
                if (mem > lru_mem_max)
                    lru_mem_max = mem;
                loaded++;
                if (loaded > res->max_loaded)
                    res->max_loaded = loaded;
                res->loads++;
                heap_push(&h, now + t->load[m], EV_READY, m, gen[m]);
            }
            rs[r] = R_QUEUED;
            nx[r] = -1;
            if (q[m].tail >= 0)
                nx[q[m].tail] = (int64_t)r;
            else
                q[m].head = (int64_t)r;
            q[m].tail = (int64_t)r;
            heap_push(&h, now + CLIENT_TIMEOUT, EV_TIMEOUT, r, 0);
            break;
        }
        case EV_READY:
            if (e.b != gen[e.a])
                continue;
            state[e.a] = 2;
            m = e.a;
            break;
        case EV_DONE:
            if (rs[e.a] != R_FLIGHT || rgen[e.a] != gen[t->model[e.a]])
                continue;                       /* killed by an eviction */
            rs[e.a] = R_DONE;
            m = t->model[e.a];
            flight[m]--;
            break;
        case EV_TIMEOUT:
            if (rs[e.a] == R_QUEUED) {          /* lazily dropped from its queue */
                rs[e.a] = R_TIMEOUT;
                res->timed_out++;
            }
            continue;
        }
        if (m != SIZE_MAX && state[m] == 2) {
            while (q[m].head >= 0 && flight[m] < SLOTS) {
                int64_t r = q[m].head;
                q[m].head = nx[r];
                if (q[m].head < 0)
                    q[m].tail = -1;
                if (rs[r] != R_QUEUED)
                    continue;
                rs[r] = R_FLIGHT;
                rgen[r] = gen[m];
                flight[m]++;
                note_dispatch(res, now - t->at[r], hit[r]);
                heap_push(&h, now + t->service[r], EV_DONE, (uint64_t)r, 0);
            }
        }
        res->sim_end = now;
    }
    /* A request killed in flight was counted as served when dispatched. */
    res->served -= killed_flight;
    replay_end(res, w0);
    free(state); free(last); free(gen); free(flight); free(q); free(nx); free(rs); free(hit);
    free(rgen); free(h.v);
}

/* ---------- (c) one model at a time (llama-swap style) ---------- */

static void run_swap(const struct trace *t, struct result *res)
{
    enum { S_NONE, S_LOADING, S_READY, S_DRAINING, S_UNLOADING } st = S_NONE;
    size_t cur = 0, flight = 0, head = 0, arrived = 0;
    uint8_t *rs = calloc(t->nreq, 1), *hit = calloc(t->nreq, 1);
    res->max_loaded = 1;
    struct heap h = { 0 };
    double w0 = replay_begin(t, res, &h);
    struct ev e;
    while (heap_pop(&h, &e)) {
        double now = e.t;
        switch (e.kind) {
        case EV_ARRIVE: {
            size_t r = replay_arrive(t, &h, &arrived);
            hit[r] = st == S_READY && cur == t->model[r];
            rs[r] = R_QUEUED;
            heap_push(&h, now + CLIENT_TIMEOUT, EV_TIMEOUT, r, 0);
            break;
        }
        case EV_READY:
            st = S_READY;
            break;
        case EV_DONE:
            flight--;
            break;
        case EV_UNLOADED:
            st = S_NONE;
            break;
        case EV_TIMEOUT:
            if (rs[e.a] == R_QUEUED) {
                rs[e.a] = R_TIMEOUT;
                res->timed_out++;
            }
            break;
        }
        /* One global FIFO: the head decides what is loaded. */
        for (;;) {
            while (head < arrived && rs[head] != R_QUEUED)
                head++;
            if (head >= arrived)
                break;
            size_t m = t->model[head];
            if (st == S_READY && m == cur && flight < SLOTS) {
                rs[head] = R_FLIGHT;
                flight++;
                note_dispatch(res, now - t->at[head], hit[head]);
                heap_push(&h, now + t->service[head], EV_DONE, head, 0);
                continue;
            }
            if (st == S_READY && m != cur)
                st = S_DRAINING;
            if (st == S_DRAINING && flight == 0) {
                st = S_UNLOADING;
                heap_push(&h, now + UNLOAD_DELAY, EV_UNLOADED, 0, 0);
            }
            if (st == S_NONE) {
                cur = m;
                st = S_LOADING;
                res->loads++;
                res->evictions += res->loads > 1;
                heap_push(&h, now + t->load[m], EV_READY, 0, 0);
            }
            break;
        }
        res->sim_end = now;
    }
    replay_end(res, w0);
    free(rs); free(hit); free(h.v);
}

/* ---------- output ---------- */

static void print_table(struct result *r, size_t n, size_t nreq)
{
    printf("%-34s %9s %7s %8s %8s %8s %8s %9s %9s %9s %8s\n", "policy", "served", "hit%",
           "loads", "evicted", "killed", "t/o+429", "wait mean", "wait p99", "wait max", "replay");
    for (size_t i = 0; i < n; i++)
        printf("%-34s %9zu %6.1f%% %8zu %8zu %8zu %8zu %8.2fs %8.2fs %8.1fs %7.3fs\n", r[i].name,
               r[i].served, 100.0 * r[i].hits / nreq, r[i].loads, r[i].evictions, r[i].killed,
               r[i].timed_out + r[i].rejected + r[i].failed_other, r[i].mean_wait, r[i].p99_wait,
               r[i].max_wait, r[i].wall);
    printf("\nratios, llama-pool : other\n");
    for (size_t i = 1; i < n; i++) {
        printf("  vs %-30s served %.2fx  hits %.2fx  loads %.2fx  mean wait %.2fx  p99 wait %.2fx\n",
               r[i].name, (double)r[0].served / (r[i].served ? r[i].served : 1),
               (double)r[0].hits / (r[i].hits ? r[i].hits : 1),
               (double)r[0].loads / (r[i].loads ? r[i].loads : 1),
               r[0].mean_wait / (r[i].mean_wait > 0 ? r[i].mean_wait : 1e-9),
               r[0].p99_wait / (r[i].p99_wait > 0 ? r[i].p99_wait : 1e-9));
    }
}

static double budget_gb = 492;

/* --sizes lognormal: llama-pool's scheduler with eviction = lru and = cost
 * on the same trace, and a count LRU of as many models as always fit (the
 * budget over the largest size) for reference. */
static int run_sizes(const struct trace *t, double zipf, double rate, uint64_t seed)
{
    double sum = 0, biggest = 0;
    for (size_t i = 0; i < t->nmodels; i++) {
        sum += t->est[i];
        if (t->est[i] > biggest)
            biggest = t->est[i];
    }
    uint64_t budget = (uint64_t)(budget_gb * 1e9);
    size_t safe = (size_t)(budget / biggest);
    printf("trace: %zu models, lognormal sizes (median 8 GB, sigma 0.9, 0.7-70 GB; mean %.1f GB, all %.0f GB),\n"
           "       %zu requests, Zipf s=%.2f (popularity independent of size), Poisson %.2f req/s,\n"
           "       %s, seed %llu; budget %.0f GB\n\n",
           t->nmodels, sum / t->nmodels / 1e9, sum / 1e9, t->nreq, zipf, rate,
           no_times ? "no load or service times (a pure cache)" : "load 1 s + 4 GB/s, service exp(mean 2 s)",
           (unsigned long long)seed, budget_gb);
    struct result r[3] = { { .name = "llama-pool, eviction = lru" },
                           { .name = "llama-pool, eviction = cost" },
                           { .name = "count LRU" } };
    char cname[48];
    snprintf(cname, sizeof cname, "count LRU of %zu (always fits)", safe);
    r[2].name = cname;
    run_pool(t, &r[0], budget, 0, SCHED_EVICT_LRU);
    run_pool(t, &r[1], budget, 0, SCHED_EVICT_COST);
    run_lru(t, &r[2], safe, (double)budget);
    printf("%-34s %9s %7s %8s %10s %9s %9s %9s %9s\n", "policy", "served", "hit%", "loads", "GB loaded",
           "overruns", "t/o+429", "wait mean", "wait p99");
    for (int i = 0; i < 3; i++)
        printf("%-34s %9zu %6.1f%% %8zu %10.0f %9s %9zu %8.2fs %8.2fs\n", r[i].name, r[i].served,
               100.0 * r[i].hits / t->nreq, r[i].loads, i < 2 ? r[i].bytes_loaded / 1e9 : NAN,
               i < 2 ? (r[i].overruns ? "YES" : "0") : "-",
               r[i].timed_out + r[i].rejected + r[i].failed_other, r[i].mean_wait, r[i].p99_wait);
    printf("\ncost / lru: hits %.3fx, GB loaded %.3fx; most GB loaded at once: lru %.0f, cost %.0f (budget %.0f)\n",
           (double)r[1].hits / (r[0].hits ? r[0].hits : 1), r[1].bytes_loaded / r[0].bytes_loaded,
           r[0].max_live_bytes / 1e9, r[1].max_live_bytes / 1e9, budget_gb);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t seed = 1;
    size_t nmodels = 1000, nreq = 200000, fit = 27, scale_models = 10000, scale_req = 1000000;
    double rate = 2.0, zipf = 1.1;
    bool scale = true;
    unsigned trace_n = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--no-scale")) { scale = false; continue; }
        if (!v) { fprintf(stderr, "%s: needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--models")) nmodels = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--requests")) nreq = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--zipf")) zipf = atof(v);
        else if (!strcmp(a, "--fit")) fit = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--scale-models")) scale_models = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--scale-requests")) scale_req = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--trace")) trace_n = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--sizes") && !strcmp(v, "lognormal")) sizes_lognormal = true;
        else if (!strcmp(a, "--sizes") && !strcmp(v, "uniform")) sizes_lognormal = false;
        else if (!strcmp(a, "--times")) no_times = !strcmp(v, "no");
        else if (!strcmp(a, "--budget-gb")) budget_gb = atof(v);
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
    }
    rng_state = seed;
    struct trace t;
    trace_make(&t, nmodels, nreq, rate, zipf);
    if (sizes_lognormal)
        return run_sizes(&t, zipf, rate, seed);
    double mean_est = 0, top = 0, hsum = 0;
    for (size_t i = 0; i < nmodels; i++) {
        mean_est += t.est[i] / nmodels;
        hsum += pow((double)(i + 1), -zipf);
        if (i < fit)
            top += pow((double)(i + 1), -zipf);
    }
    uint64_t budget = (uint64_t)(fit * mean_est);
    printf("trace: %zu models (14-22 GiB, mean %.1f GiB; load 5-20 s by size), %zu requests,\n"
           "       Poisson %.2f req/s (%.0f s simulated), Zipf s=%.2f (top %zu models: %.1f%% of requests),\n"
           "       service exp(mean 2 s), %d slots/instance, seed %llu\n"
           "budget: %.0f GiB (%zu models of mean size); client timeout %.0f s (a: queue_timeout, max_queue 256)\n\n",
           nmodels, mean_est / GIB, nreq, rate, t.at[nreq - 1], zipf, fit, 100 * top / hsum, SLOTS,
           (unsigned long long)seed, budget / GIB, fit, CLIENT_TIMEOUT);

    struct result r[3] = { { .name = "(a) llama-pool, memory budget" },
                           { .name = "(b) count LRU, --models-max" },
                           { .name = "(c) one at a time (swap)" } };
    char bname[40];
    snprintf(bname, sizeof bname, "(b) count LRU, --models-max %zu", fit);
    r[1].name = bname;
    run_pool(&t, &r[0], budget, trace_n, SCHED_EVICT_LRU);
    run_lru(&t, &r[1], fit, (double)budget);
    run_swap(&t, &r[2]);
    print_table(r, 3, nreq);
    printf("\ninstances loaded or loading: most at once (a) %zu (incl. stopping), (b) %zu, (c) %zu;"
           " time average (a) %.1f, (b) %.1f\n",
           r[0].max_loaded, r[1].max_loaded, r[2].max_loaded, r[0].area / r[0].prev, r[1].area / r[1].prev);
    printf("(b) ignores memory: at most %.0f GiB loaded (budget %.0f GiB), over the budget %.1f%% of the time\n",
           lru_mem_max / GIB, budget / GIB, 100 * lru_over_time / r[1].sim_end);
    printf("hit = dispatched, and its model had a ready instance when the request arrived\n");

    if (scale) {
        struct trace s;
        trace_make(&s, scale_models, scale_req, rate, zipf);
        double me = 0;
        for (size_t i = 0; i < scale_models; i++)
            me += s.est[i] / scale_models;
        struct result sr = { .name = "scale" };
        double w0 = now_wall();
        run_pool(&s, &sr, (uint64_t)(fit * me), 0, SCHED_EVICT_LRU);
        double total = now_wall() - w0;
        printf("\nscale: %zu models registered, %zu requests through llama-pool's scheduler "
               "(budget %zu models):\n  replay %.3f s (%.2f us/request); served %zu, hit %.1f%%, "
               "loads %zu, timed out %zu, 429 %zu\n",
               scale_models, scale_req, fit, total, 1e6 * total / scale_req, sr.served,
               100.0 * sr.hits / scale_req, sr.loads, sr.timed_out, sr.rejected);
    }
    return 0;
}
