/* scheduler — every decision about requests and instances, and no I/O.
 * The policy is stated in scheduler.h; this file is its only reader.
 *
 * Layout of the state (all of it in struct sched, nothing global):
 *   - requests live in one array of records, reused through a free list and
 *     found by id through an open-addressing hash (id → index). A waiting
 *     request sits on two intrusive FIFOs: its model's (who is served next)
 *     and the global one by arrival (who times out next: queue_timeout is
 *     one value for all, so the global head always has the earliest
 *     deadline). A dispatched request sits on its instance's in-flight list
 *     instead, through the same links as the model FIFO.
 *   - instances live the same way (array, free list, id hash); each model
 *     keeps the indices of its instances in the order they were added.
 *   - actions wait in a ring buffer; a FAIL's message is owned by its entry
 *     and freed on the next sched_next_action(), so it outlives the call
 *     that took it.
 *   - memory (limits.budget > 0): charges are not kept as running sums but
 *     added up from the instances when a decision needs them, so that no
 *     event can leave a stale total behind. mem_plan() runs at the end of
 *     every event and is the only place that starts instances or evicts
 *     for memory; with budget 0 it does nothing and consider_starts()
 *     starts as before.
 * Every operation is O(1) or O(instances of one model), except those that
 * by nature touch every waiter of a model (a failed start, a failed model),
 * and, with a budget or an idle_timeout, the end of every event, which looks
 * at every active model (waiting, running or starting) and every instance:
 * tens of them, however many models are configured.
 *
 * Choices the header leaves open:
 *   - Fresh needs no state of its own. An instance that became ready while
 *     its model had waiters is fresh while any of those still waits; then
 *     its model has a waiting request, which already rules it out. Once
 *     they are all dispatched, those on it are in flight (ruled out too)
 *     until done, and the batch is served. Every event drains waiters
 *     before mem_plan() looks for instances to evict, so an instance is
 *     never evicted between becoming ready and taking its batch.
 *   - Order among models waiting for memory: by their oldest waiting
 *     request (a global arrival sequence, so equal clocks keep their order).
 *     Only the first of them that does not fit (the head) may evict; every
 *     model that does not fit reserves its estimate, and a later model
 *     starts only if it fits beside all the reservations before it.
 *   - A model whose estimate exceeds the budget fails its waiters (503)
 *     only when it has no instance ready or coming; otherwise it just does
 *     not scale up.
 *   - Shared weights: an instance of a shared file is charged the weights
 *     only if no other live instance of that file exists when it is added.
 *     When an instance goes while another of its file lives, only its
 *     private part (at most mem_more) is freed: the rest passes to that
 *     survivor's charge until its next measurement. Eviction never picks
 *     an instance of the file of the model it makes room for (that would
 *     only move the weights' charge).
 *   - A measurement while starting can only raise the charge (the load is
 *     partial); from ready on, the latest measurement is the charge.
 *   - Available memory: the reported value is lowered by the estimate of
 *     every instance added since, raised by what every instance removed or
 *     failed since frees, until the next report replaces it. */
#include "scheduler.h"
#include "util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NIL UINT32_MAX
#define DEV_SPLIT (-2)          /* inst.dev of an instance split over devices */
#define DEFAULT_SLOTS 4         /* llama-server's own -np default */
/* Hand-off (see handoff()): for models whose requests take at most
 * HANDOFF_MAX_S, requests queued inside an instance beyond its slots, about
 * HANDOFF_AHEAD_S of its work, one to HANDOFF_PER_SLOT per slot, within the
 * connections its HTTP threads serve at once (info.http_conns). */
#define HANDOFF_MAX_S 0.5
#define HANDOFF_AHEAD_S 0.05
#define HANDOFF_PER_SLOT 4

/* ---------- id → index: open addressing, linear probing ---------- */

struct idmap {
    uint64_t *keys;             /* 0 = empty (ids are never 0) */
    uint32_t *vals;
    size_t cap;                 /* a power of two, or 0 */
    size_t n;
};

static size_t idmap_home(uint64_t k, size_t cap)
{
    k ^= k >> 33;               /* murmur3's finalizer */
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return (size_t)k & (cap - 1);
}

static uint32_t idmap_get(const struct idmap *m, uint64_t key)
{
    if (!m->cap || !key)
        return NIL;
    for (size_t i = idmap_home(key, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == key)
            return m->vals[i];
        if (!m->keys[i])
            return NIL;
    }
}

static void idmap_insert(struct idmap *m, uint64_t key, uint32_t val)
{
    size_t i = idmap_home(key, m->cap);
    while (m->keys[i])
        i = (i + 1) & (m->cap - 1);
    m->keys[i] = key;
    m->vals[i] = val;
    m->n++;
}

/* KEY must not be in the map yet. */
static bool idmap_put(struct idmap *m, uint64_t key, uint32_t val)
{
    if ((m->n + 1) * 2 > m->cap) {              /* keep the load under 1/2 */
        size_t cap = m->cap ? m->cap * 2 : 64;
        uint64_t *keys = calloc(cap, sizeof *keys);
        uint32_t *vals = malloc(cap * sizeof *vals);
        if (!keys || !vals) {
            free(keys);
            free(vals);
            return false;
        }
        struct idmap old = *m;
        *m = (struct idmap){ .keys = keys, .vals = vals, .cap = cap };
        for (size_t i = 0; i < old.cap; i++)
            if (old.keys[i])
                idmap_insert(m, old.keys[i], old.vals[i]);
        free(old.keys);
        free(old.vals);
    }
    idmap_insert(m, key, val);
    return true;
}

/* Deletion by backward shift: no tombstones, lookups stay short. */
static void idmap_del(struct idmap *m, uint64_t key)
{
    if (!m->cap || !key)
        return;
    size_t mask = m->cap - 1, i = idmap_home(key, m->cap);
    while (m->keys[i] != key) {
        if (!m->keys[i])
            return;
        i = (i + 1) & mask;
    }
    for (size_t j = i;;) {
        j = (j + 1) & mask;
        if (!m->keys[j])
            break;
        size_t k = idmap_home(m->keys[j], m->cap);
        /* The entry at j may fill the hole at i unless its home lies
         * cyclically in (i, j]. */
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        m->keys[i] = m->keys[j];
        m->vals[i] = m->vals[j];
        i = j;
    }
    m->keys[i] = 0;
    m->n--;
}

static void idmap_free(struct idmap *m)
{
    free(m->keys);
    free(m->vals);
    *m = (struct idmap){ 0 };
}

/* ---------- records ---------- */

/* A request known to the scheduler: waiting (inst == NIL) or dispatched. */
struct req {
    uint64_t id;
    size_t model;
    uint32_t inst;              /* NIL while waiting */
    uint32_t prev, next;        /* model FIFO while waiting, the instance's
                                 * in-flight list once dispatched; next also
                                 * links the free list */
    uint32_t gprev, gnext;      /* global FIFO by arrival, while waiting */
    double arrival;
    double sent;                /* when it was dispatched */
    uint64_t seq;               /* arrival order across all models */
    const struct sched_prefix *prefix;  /* the caller's; NULL = none */
    uint64_t pref[2];           /* the instances that held its prompt's longest
                                 * known part when it came (0: none) */
    double hold_until;          /* it may wait for them until then (0: not) */
    signed char affinity;       /* its DISPATCH's affinity (see sched_action) */
};

enum inst_state {
    INST_STARTING,              /* coming: counts its expected slots */
    INST_READY,                 /* serving: in_flight < slots means free */
    INST_FAILED,                /* not usable and not coming (backoff, gave up) */
};

struct inst {
    uint64_t id;
    size_t model;
    enum inst_state state;
    unsigned slots;             /* 0 = not known yet */
    unsigned in_flight;
    double last_used;
    uint32_t flight;            /* head of its dispatched requests */
    uint32_t next_free;
    bool stop_req;              /* a STOP was emitted: not usable, still charged */
    bool suspect;               /* dropped a request unanswered: not usable
                                 * until its next ready/slots/state event */
    bool chosen;                /* scratch of make_room(): picked for eviction */
    double added_at, ready_at;
    uint64_t estimate;          /* charge until measured */
    uint64_t measured;          /* 0 = not yet */
    uint64_t extra;             /* shared weights inherited from a sibling that went */
    int dev;                    /* the GPU it is charged on, -1: none */
    uint64_t vram_meas;         /* measured VRAM there, 0 = not yet */
    uint32_t aff_live;          /* affinity entries that name it first: none
                                 * means no prompt it holds is remembered */
};

struct model {
    char *name;
    struct sched_model_info info;
    char *failed;               /* reason, NULL = usable */
    uint32_t head, tail;        /* waiting requests, first come first */
    size_t waiting;
    uint32_t *inst;             /* its instances, in the order added */
    size_t ninst, capinst;
    unsigned start_queued;      /* START actions not yet taken */
    unsigned start_out;         /* taken, awaiting sched_instance_added() */
    signed char *pdev;          /* the devices of those starts, oldest first (-1: none) */
    uint64_t *split;            /* VRAM on each device when its args split it, else NULL */
    size_t npdev, cappdev;
    double last_asked;          /* arrival of its latest request; 0 = never */
    double turnaround;          /* recent dispatch-to-done time, an average
                                 * (see handoff()); 0 = none done yet */
    double hold_at;             /* the earliest end of a waiter's affinity
                                 * hold, as drain_waiters() last saw; 0 = none */
    /* eviction = cost (GreedyDual-Size-Frequency) */
    uint64_t hits;              /* requests since it was last loaded */
    double load_s;              /* its last load, added to ready */
    bool load_known;            /* load_s was measured */
    double gd_h;                /* its H: clock + hits x reload cost / size */
    bool active;                /* on the active list (see struct sched) */
};

struct entry {
    struct sched_action a;
    char *own;                  /* the message, when it was allocated */
};

struct sched {
    struct sched_limits limits;

    struct model *models;
    size_t nmodels;
    /* Models with waiting requests, instances or starts asked: the only
     * ones the per-event passes (memory, idleness) look at, so that a pool
     * of thousands of models costs what its few dozen live ones cost.
     * Room for every model is kept, so joining never allocates; a model
     * leaves in event_end() once it has none of the three. */
    size_t *active;
    size_t nactive;

    struct req *reqs;
    size_t nreqs, capreqs;
    uint32_t req_free;
    struct idmap req_map;
    uint32_t ghead, gtail;      /* every waiting request, by arrival */
    size_t waiting;

    struct inst *insts;
    size_t ninsts, capinsts;
    uint32_t inst_free;
    struct idmap inst_map;

    struct entry *q;            /* ring of pending actions */
    size_t qhead, qlen, qcap;   /* qcap: a power of two, or 0 */
    char *taken_msg;            /* message of the last action taken */

    size_t ndev;                /* GPUs (sched_devices_set); 0 = host only */
    struct sdev {
        uint64_t budget;
        uint64_t free;          /* as the driver said, minus starts since */
        bool free_known;
    } dev[SCHED_MAX_DEVICES];

    size_t *out;                /* models with start_out > 0 */
    size_t nout, capout;

    double now;                 /* the time of the latest event */
    double gd_clock;            /* eviction = cost: the H of the last evicted */
    struct aff_entry *aff;      /* prefix affinity: SCHED_AFFINITY_ENTRIES, or NULL */
    uint64_t aff_clock;         /* its recency stamps */
    bool wake_armed;            /* a WAKE at wake_at is the caller's timer */
    double wake_at;

    uint64_t seq;               /* last arrival sequence given */
    uint64_t avail;             /* machine's available memory, as estimated */
    bool avail_known;
    size_t nidle;               /* models with an idle_timeout: none, no idle pass */
    size_t *order;              /* scratch of mem_plan(): models by claim, then oldest waiter */
    size_t caporder;
    uint32_t *cand;             /* scratch of choose_lru(): eviction candidates, LRU first */
    size_t ncand;
    size_t capcand;
};

static unsigned model_hint(const struct model *m)
{
    return m->info.slots_hint ? m->info.slots_hint : DEFAULT_SLOTS;
}

static void activate(struct sched *s, size_t model)
{
    struct model *m = &s->models[model];
    if (!m->active) {
        m->active = true;
        s->active[s->nactive++] = model;
    }
}

static bool model_busy(const struct model *m)
{
    return m->waiting || m->ninst || m->start_queued || m->start_out;
}

static void active_prune(struct sched *s)
{
    size_t n = 0;
    for (size_t k = 0; k < s->nactive; k++) {
        struct model *m = &s->models[s->active[k]];
        if (model_busy(m))
            s->active[n++] = s->active[k];
        else
            m->active = false;
    }
    s->nactive = n;
}

/* ---------- actions ---------- */

static bool push(struct sched *s, const struct sched_action *a, char *own)
{
    if (s->qlen == s->qcap) {
        size_t cap = s->qcap ? s->qcap * 2 : 64;
        struct entry *q = malloc(cap * sizeof *q);
        if (!q) {
            free(own);
            return false;
        }
        for (size_t i = 0; i < s->qlen; i++)
            q[i] = s->q[(s->qhead + i) & (s->qcap - 1)];
        free(s->q);
        s->q = q;
        s->qcap = cap;
        s->qhead = 0;
    }
    struct entry *e = &s->q[(s->qhead + s->qlen++) & (s->qcap - 1)];
    e->a = *a;
    e->own = own;
    return true;
}

static void emit_dispatch(struct sched *s, const struct req *r, const struct inst *in)
{
    push(s, &(struct sched_action){ .kind = SCHED_DISPATCH, .req = r->id, .inst = in->id,
                                    .model = r->model, .affinity = r->affinity }, NULL);
}

/* Drops the I-th of M's pending start devices. */
static void pdev_drop(struct model *m, size_t i)
{
    memmove(m->pdev + i, m->pdev + i + 1, m->npdev - i - 1);
    m->npdev--;
}

static void emit_start(struct sched *s, size_t model, int device)
{
    struct model *m = &s->models[model];
    if (!util_grow(&m->pdev, &m->cappdev, m->npdev + 1, sizeof *m->pdev))
        return;
    if (push(s, &(struct sched_action){ .kind = SCHED_START, .model = model, .device = device },
             NULL)) {
        m->pdev[m->npdev++] = (signed char)device;
        m->start_queued++;
        activate(s, model);
    }
}

/* MSG is a literal; OWN, when not NULL, an allocated message that wins. */
static void emit_fail(struct sched *s, sched_req_t req, size_t model, int status,
                      double retry_after, const char *msg, char *own)
{
    push(s, &(struct sched_action){ .kind = SCHED_FAIL, .req = req, .model = model,
                                    .status = status, .retry_after = retry_after,
                                    .message = own ? own : msg }, own);
}

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    int n = vsnprintf(NULL, 0, f, ap);
    va_end(ap);
    if (n < 0)
        return NULL;
    char *p = malloc((size_t)n + 1);
    if (!p)
        return NULL;
    va_start(ap, f);
    vsnprintf(p, (size_t)n + 1, f, ap);
    va_end(ap);
    return p;
}

static char *dup_str(const char *str)
{
    return str ? strdup(str) : NULL;
}

bool sched_next_action(struct sched *s, struct sched_action *out)
{
    free(s->taken_msg);
    s->taken_msg = NULL;
    if (!s->qlen)
        return false;
    struct entry *e = &s->q[s->qhead];
    s->qhead = (s->qhead + 1) & (s->qcap - 1);
    s->qlen--;
    *out = e->a;
    s->taken_msg = e->own;
    if (out->kind == SCHED_START && out->model < s->nmodels) {
        struct model *m = &s->models[out->model];
        if (m->start_queued)
            m->start_queued--;
        /* The caller now owes sched_instance_added() before its next event. */
        if (!m->start_out++ && util_grow(&s->out, &s->capout, s->nout + 1, sizeof *s->out))
            s->out[s->nout++] = out->model;
    }
    return true;
}

/* Every event but sched_instance_added(): a START taken and not reported
 * by now did not happen (the caller could not add an instance); forget it,
 * so that waiting requests may ask again instead of waiting for nothing. */
static void event_begin(struct sched *s)
{
    for (size_t i = 0; i < s->nout; i++)
        if (s->out[i] < s->nmodels) {
            struct model *m = &s->models[s->out[i]];
            while (m->start_out && m->npdev) {     /* the taken ones are the oldest */
                pdev_drop(m, 0);
                m->start_out--;
            }
            m->start_out = 0;
        }
    s->nout = 0;
}

static bool idle_next(const struct sched *s, double *at);

/* The caller's one timer follows the earliest deadline (a queue timeout,
 * the end of an affinity hold or an idle stop); none when there is none. */
static void wake_update(struct sched *s)
{
    bool have = false;
    double at = 0;
    if (s->ghead != NIL && s->limits.queue_timeout > 0) {
        at = s->reqs[s->ghead].arrival + s->limits.queue_timeout;
        have = true;
    }
    for (size_t k = 0; k < s->nactive; k++) {
        const struct model *m = &s->models[s->active[k]];
        if (m->waiting && m->hold_at > 0 && (!have || m->hold_at < at)) {
            at = m->hold_at;
            have = true;
        }
    }
    double idle = 0;
    if (idle_next(s, &idle) && (!have || idle < at)) {
        at = idle;
        have = true;
    }
    if (!have) {
        s->wake_armed = false;
        return;
    }
    if (s->wake_armed && s->wake_at == at)
        return;
    if (push(s, &(struct sched_action){ .kind = SCHED_WAKE, .at = at }, NULL)) {
        s->wake_armed = true;
        s->wake_at = at;
    }
}

/* ---------- requests ---------- */

static uint32_t req_new(struct sched *s, sched_req_t id, size_t model)
{
    uint32_t ri = s->req_free;
    if (ri != NIL) {
        s->req_free = s->reqs[ri].next;
    } else {
        if (s->nreqs >= NIL || !util_grow(&s->reqs, &s->capreqs, s->nreqs + 1, sizeof *s->reqs))
            return NIL;
        ri = (uint32_t)s->nreqs++;
    }
    if (!idmap_put(&s->req_map, id, ri)) {
        s->reqs[ri].next = s->req_free;
        s->req_free = ri;
        return NIL;
    }
    s->reqs[ri] = (struct req){ .id = id, .model = model, .inst = NIL, .prev = NIL, .next = NIL,
                                .gprev = NIL, .gnext = NIL, .affinity = -1 };
    return ri;
}

static void req_forget(struct sched *s, uint32_t ri)
{
    idmap_del(&s->req_map, s->reqs[ri].id);
    s->reqs[ri].id = 0;
    s->reqs[ri].next = s->req_free;
    s->req_free = ri;
}

static void wait_push(struct sched *s, uint32_t ri, double now)
{
    struct req *r = &s->reqs[ri];
    struct model *m = &s->models[r->model];
    r->arrival = now;
    r->seq = ++s->seq;
    activate(s, r->model);
    r->prev = m->tail;
    r->next = NIL;
    if (m->tail != NIL)
        s->reqs[m->tail].next = ri;
    else
        m->head = ri;
    m->tail = ri;
    m->waiting++;
    r->gprev = s->gtail;
    r->gnext = NIL;
    if (s->gtail != NIL)
        s->reqs[s->gtail].gnext = ri;
    else
        s->ghead = ri;
    s->gtail = ri;
    s->waiting++;
}

static void wait_unlink(struct sched *s, uint32_t ri)
{
    struct req *r = &s->reqs[ri];
    struct model *m = &s->models[r->model];
    if (r->prev != NIL)
        s->reqs[r->prev].next = r->next;
    else
        m->head = r->next;
    if (r->next != NIL)
        s->reqs[r->next].prev = r->prev;
    else
        m->tail = r->prev;
    m->waiting--;
    if (r->gprev != NIL)
        s->reqs[r->gprev].gnext = r->gnext;
    else
        s->ghead = r->gnext;
    if (r->gnext != NIL)
        s->reqs[r->gnext].gprev = r->gprev;
    else
        s->gtail = r->gprev;
    s->waiting--;
    r->prev = r->next = r->gprev = r->gnext = NIL;
}

static void flight_link(struct sched *s, uint32_t ri, uint32_t ii)
{
    struct req *r = &s->reqs[ri];
    struct inst *in = &s->insts[ii];
    r->inst = ii;
    r->prev = NIL;
    r->next = in->flight;
    if (in->flight != NIL)
        s->reqs[in->flight].prev = ri;
    in->flight = ri;
    in->in_flight++;
}

static void flight_unlink(struct sched *s, uint32_t ri)
{
    struct req *r = &s->reqs[ri];
    struct inst *in = &s->insts[r->inst];
    if (r->prev != NIL)
        s->reqs[r->prev].next = r->next;
    else
        in->flight = r->next;
    if (r->next != NIL)
        s->reqs[r->next].prev = r->prev;
    in->in_flight--;
    r->inst = NIL;
    r->prev = r->next = NIL;
}

/* Fail every waiting request of MODEL with a copy of MSG each. */
static void fail_waiters(struct sched *s, size_t model, int status, const char *msg)
{
    struct model *m = &s->models[model];
    while (m->head != NIL) {
        uint32_t ri = m->head;
        sched_req_t id = s->reqs[ri].id;
        wait_unlink(s, ri);
        req_forget(s, ri);
        char *own = dup_str(msg);
        emit_fail(s, id, model, status, 0, own ? own : "request failed", own);
    }
}

/* ---------- instances ---------- */

static uint32_t inst_new(struct sched *s, sched_inst_t id, size_t model)
{
    struct model *m = &s->models[model];
    if (!util_grow(&m->inst, &m->capinst, m->ninst + 1, sizeof *m->inst))
        return NIL;
    uint32_t ii = s->inst_free;
    if (ii != NIL) {
        s->inst_free = s->insts[ii].next_free;
    } else {
        if (s->ninsts >= NIL || !util_grow(&s->insts, &s->capinsts, s->ninsts + 1, sizeof *s->insts))
            return NIL;
        ii = (uint32_t)s->ninsts++;
    }
    if (!idmap_put(&s->inst_map, id, ii)) {
        s->insts[ii].next_free = s->inst_free;
        s->inst_free = ii;
        return NIL;
    }
    s->insts[ii] = (struct inst){ .id = id, .model = model, .state = INST_STARTING,
                                  .flight = NIL, .next_free = NIL, .dev = -1 };
    m->inst[m->ninst++] = ii;
    activate(s, model);
    return ii;
}

static void inst_charge_end(struct sched *s, uint32_t ii);

/* Its dispatched requests are the caller's to answer: forget them. */
static void inst_drop_flight(struct sched *s, uint32_t ii)
{
    struct inst *in = &s->insts[ii];
    while (in->flight != NIL) {
        uint32_t ri = in->flight;
        flight_unlink(s, ri);
        req_forget(s, ri);
    }
}

static void aff_drop(struct sched *s, uint64_t id);

static void inst_forget(struct sched *s, uint32_t ii)
{
    struct inst *in = &s->insts[ii];
    struct model *m = &s->models[in->model];
    if (in->state == INST_READY)
        aff_drop(s, in->id);
    inst_charge_end(s, ii);
    inst_drop_flight(s, ii);
    for (size_t i = 0; i < m->ninst; i++)
        if (m->inst[i] == ii) {
            memmove(&m->inst[i], &m->inst[i + 1], (m->ninst - i - 1) * sizeof *m->inst);
            m->ninst--;
            break;
        }
    idmap_del(&s->inst_map, in->id);
    in->id = 0;
    in->next_free = s->inst_free;
    s->inst_free = ii;
}

/* Whether IN takes requests: ready, not being stopped, not suspect. */
static bool inst_serves(const struct inst *in)
{
    return in->state == INST_READY && !in->stop_req && !in->suspect;
}

/* ... and has a slot free for one now. */
static bool inst_free(const struct inst *in)
{
    return inst_serves(in) && in->in_flight < in->slots;
}

/* What a request needs of an instance: a free slot, or (handoff()) a
 * place in the llama-server's own queue. */
enum room_kind { ROOM_SLOT, ROOM_HANDOFF };

static unsigned handoff_most(const struct model *m, const struct inst *in);

static bool inst_room(const struct model *m, const struct inst *in, enum room_kind k)
{
    if (k == ROOM_SLOT)
        return inst_free(in);
    return inst_serves(in) && in->slots && in->in_flight < handoff_most(m, in);
}

/* The instance with room K and the fewest in flight; the earliest added on
 * ties. */
static uint32_t pick(const struct sched *s, const struct model *m, enum room_kind k)
{
    uint32_t best = NIL;
    for (size_t i = 0; i < m->ninst; i++) {
        const struct inst *in = &s->insts[m->inst[i]];
        if (inst_room(m, in, k) && (best == NIL || in->in_flight < s->insts[best].in_flight))
            best = m->inst[i];
    }
    return best;
}

/* An instance of MODEL that serves, by id; NIL if none (gone, stopping,
 * another model's). */
static uint32_t serving(const struct sched *s, size_t model, uint64_t id)
{
    uint32_t ii = id ? idmap_get(&s->inst_map, id) : NIL;
    return ii != NIL && s->insts[ii].model == model && inst_serves(&s->insts[ii]) ? ii : NIL;
}

/* A prompt this short (in 256-byte blocks, about 64 tokens each) costs
 * little to process again: it does not wait for its busy instance while
 * another is idle. */
#define AFF_SHORT_BLOCKS 4

/* Whether R, whose instance is busy, goes elsewhere at once all the same:
 * its prompt is short and another instance is idle. */
static bool aff_hold_pointless(const struct sched *s, const struct model *m, const struct req *r)
{
    if (r->prefix->n > AFF_SHORT_BLOCKS)
        return false;
    for (size_t i = 0; i < m->ninst; i++) {
        const struct inst *in = &s->insts[m->inst[i]];
        if (inst_free(in) && !in->in_flight)
            return true;
    }
    return false;
}

/* Where request R goes now, needing room K: to an instance that holds its
 * prompt if one has room (*HIT); else, while its hold lasts and such an
 * instance serves, nowhere yet (*HOLD: it waits for that one); else the
 * least busy with room. NIL: nowhere now. */
static uint32_t choose(const struct sched *s, double now, const struct req *r, enum room_kind k,
                       bool *hit, bool *hold)
{
    const struct model *m = &s->models[r->model];
    bool busy = false;
    *hit = *hold = false;
    for (int j = 0; j < 2; j++) {
        uint32_t ii = serving(s, r->model, r->pref[j]);
        if (ii == NIL)
            continue;
        if (inst_room(m, &s->insts[ii], k)) {
            *hit = true;
            return ii;
        }
        busy = true;
    }
    if (busy && now < r->hold_until && !aff_hold_pointless(s, m, r)) {
        *hold = true;
        return NIL;
    }
    return pick(s, m, k);
}

static void aff_record(struct sched *s, size_t model, const struct sched_prefix *p, uint64_t inst);

static void dispatch(struct sched *s, double now, uint32_t ri, uint32_t ii, bool hit)
{
    struct req *r = &s->reqs[ri];
    r->sent = now;
    r->affinity = r->prefix ? hit : -1;
    if (r->prefix)
        aff_record(s, r->model, r->prefix, s->insts[ii].id);
    flight_link(s, ri, ii);
    s->insts[ii].last_used = now;
    emit_dispatch(s, r, &s->insts[ii]);
}

/* Send the model's waiters where choose() says, first come first, while
 * any instance has room K; a waiter that holds out for its own instance
 * keeps its place, and the earliest end of those holds is noted for the
 * timer (ROOM_SLOT passes, which every settle() makes). */
static void serve_waiters(struct sched *s, double now, size_t model, enum room_kind k)
{
    struct model *m = &s->models[model];
    if (k == ROOM_SLOT)
        m->hold_at = 0;
    for (uint32_t ri = m->head, next; ri != NIL; ri = next) {
        struct req *r = &s->reqs[ri];
        next = r->next;
        bool hit, hold;
        uint32_t ii = choose(s, now, r, k, &hit, &hold);
        if (hold) {
            if (k == ROOM_SLOT && (!m->hold_at || r->hold_until < m->hold_at))
                m->hold_at = r->hold_until;
            continue;
        }
        if (ii == NIL)
            break;
        wait_unlink(s, ri);
        dispatch(s, now, ri, ii, hit);
    }
}

static void drain_waiters(struct sched *s, double now, size_t model)
{
    serve_waiters(s, now, model, ROOM_SLOT);
}

/* How many instances to start: while the waiters outnumber free and coming
 * slots and the model is below its max. Never for a failed model, never for
 * nobody. An instance being stopped still counts toward the max (the pool
 * holds it until it is gone) but gives no slot. */
static size_t starts_wanted(const struct sched *s, const struct model *m)
{
    if (m->failed || !m->waiting)
        return 0;
    unsigned hint = model_hint(m);
    size_t free_slots = 0, coming = 0, count = 0, n = 0;
    for (size_t i = 0; i < m->ninst; i++) {
        const struct inst *in = &s->insts[m->inst[i]];
        if (in->stop_req) {
            count += in->state != INST_FAILED;
        } else if (in->state == INST_READY && in->suspect) {
            coming += in->slots;        /* it answers again, or its crash shows */
            count++;
        } else if (in->state == INST_READY) {
            free_slots += in->slots > in->in_flight ? in->slots - in->in_flight : 0;
            count++;
        } else if (in->state == INST_STARTING) {
            coming += in->slots ? in->slots : hint;
            count++;
        }
    }
    size_t pending = (size_t)m->start_queued + m->start_out;
    coming += pending * hint;
    count += pending;
    while (m->waiting > free_slots + coming && count < m->info.instances_max) {
        n++;
        coming += hint;
        count++;
    }
    return n;
}

/* Without a budget or devices, starts are the model's own affair; with
 * either, mem_plan() decides them for all models at the end of the event. */
static void consider_starts(struct sched *s, size_t model)
{
    if (s->limits.budget || s->ndev)
        return;
    for (size_t n = starts_wanted(s, &s->models[model]); n; n--)
        emit_start(s, model, -1);
}

static void settle(struct sched *s, double now, size_t model)
{
    drain_waiters(s, now, model);
    consider_starts(s, model);
}

static bool has_coming_or_ready(const struct sched *s, const struct model *m)
{
    if (m->start_queued || m->start_out)
        return true;
    for (size_t i = 0; i < m->ninst; i++)
        if (s->insts[m->inst[i]].state != INST_FAILED && !s->insts[m->inst[i]].stop_req)
            return true;
    return false;
}

/* ---------- prefix affinity ---------- */

/* One table for all models: what prompt (a block's chained hash, or a
 * conversation's name) was last sent to which instance, and to which one
 * before it when that was another (a system prompt that every conversation
 * shares is then known on two). 4-way sets, the least recently used of a
 * set replaced. Entries of an instance that stops, fails or restarts are
 * dropped (aff_drop): its KV cache is gone, and its id may be reused. */
#define AFF_WAYS 4
#define AFF_SETS (SCHED_AFFINITY_ENTRIES / AFF_WAYS)

struct aff_entry {
    uint64_t key;               /* 0 = empty */
    uint64_t inst;              /* the instance's id */
    uint64_t inst2;             /* the one before, when another; 0 = none */
    uint64_t used;              /* s->aff_clock when last set */
};

/* KEY of MODEL as the table's key (never 0) and its set. */
static uint64_t aff_key(size_t model, uint64_t key, size_t *set)
{
    uint64_t k = key ^ ((uint64_t)(model + 1) * 0x9E3779B97F4A7C15ULL);
    k = k ? k : 1;
    *set = (size_t)((k * 0xff51afd7ed558ccdULL) >> 32) % AFF_SETS;
    return k;
}

static const struct aff_entry *aff_find(const struct sched *s, size_t model, uint64_t key)
{
    size_t set;
    uint64_t k = aff_key(model, key, &set);
    const struct aff_entry *e = &s->aff[set * AFF_WAYS];
    for (size_t w = 0; w < AFF_WAYS; w++)
        if (e[w].key == k)
            return &e[w];
    return NULL;
}

/* Entries name instance ID first DELTA more (see inst.aff_live). */
static void aff_live_add(struct sched *s, uint64_t id, int delta)
{
    uint32_t ii = id ? idmap_get(&s->inst_map, id) : NIL;
    if (ii != NIL)
        s->insts[ii].aff_live += (uint32_t)delta;
}

static void aff_set(struct sched *s, size_t model, uint64_t key, uint64_t inst)
{
    size_t set;
    uint64_t k = aff_key(model, key, &set);
    struct aff_entry *e = &s->aff[set * AFF_WAYS], *victim = &e[0];
    for (size_t w = 0; w < AFF_WAYS; w++) {
        if (e[w].key == k) {
            if (e[w].inst != inst) {
                aff_live_add(s, e[w].inst, -1);
                aff_live_add(s, inst, 1);
                e[w].inst2 = e[w].inst;
                e[w].inst = inst;
            }
            e[w].used = ++s->aff_clock;
            return;
        }
        if (e[w].used < victim->used)
            victim = &e[w];
    }
    if (victim->key)
        aff_live_add(s, victim->inst, -1);
    aff_live_add(s, inst, 1);
    *victim = (struct aff_entry){ .key = k, .inst = inst, .used = ++s->aff_clock };
}

/* Instance ID's KV cache is gone: no entry names it any more. */
static void aff_drop(struct sched *s, uint64_t id)
{
    if (!s->aff || !id)
        return;
    for (size_t i = 0; i < SCHED_AFFINITY_ENTRIES; i++) {
        struct aff_entry *e = &s->aff[i];
        if (e->inst2 == id)
            e->inst2 = 0;
        if (e->key && e->inst == id) {
            e->inst = e->inst2;
            e->inst2 = 0;
            aff_live_add(s, e->inst, 1);
            if (!e->inst)
                *e = (struct aff_entry){ 0 };
        }
    }
    uint32_t ii = idmap_get(&s->inst_map, id);
    if (ii != NIL)
        s->insts[ii].aff_live = 0;
}

/* P was sent to INST. Its conversation and, of its blocks, the last and
 * those at 1, 2, 4, 8 ... blocks: enough for the next turn (which begins
 * with the whole of this prompt) and for other prompts that share a
 * leading part of it (a system prompt), a few entries a request. */
static void aff_record(struct sched *s, size_t model, const struct sched_prefix *p, uint64_t inst)
{
    if (!s->aff && !(s->aff = calloc(SCHED_AFFINITY_ENTRIES, sizeof *s->aff)))
        return;                 /* no affinity, no harm */
    if (p->session)
        aff_set(s, model, p->session, inst);
    for (unsigned len = 1; len < p->n; len *= 2)
        aff_set(s, model, p->block[len - 1], inst);
    if (p->n)
        aff_set(s, model, p->block[p->n - 1], inst);
}

/* The instances of MODEL that hold the longest known part of P, up to two,
 * the latest first (PREF, 0: none): the one its conversation went to, else
 * those sent the longest leading part of its prompt. Only serving ones. */
static void aff_prefer(const struct sched *s, size_t model, const struct sched_prefix *p, uint64_t pref[2])
{
    pref[0] = pref[1] = 0;
    if (!s->aff)
        return;
    const struct aff_entry *e;
    if (p->session && (e = aff_find(s, model, p->session)) && serving(s, model, e->inst) != NIL) {
        pref[0] = e->inst;
        return;
    }
    for (unsigned i = p->n; i-- > 0;) {
        if (!(e = aff_find(s, model, p->block[i])))
            continue;
        bool a = serving(s, model, e->inst) != NIL, b = serving(s, model, e->inst2) != NIL;
        if (a || b) {
            pref[0] = a ? e->inst : e->inst2;
            pref[1] = a && b ? e->inst2 : 0;
            return;
        }
    }
}

/* Hand-off. When every slot of a model is taken and requests wait, the
 * pool's own queue would leave each slot idle from the moment llama-server
 * ends a request until the next one has come through the pool and been
 * parsed, templated and tokenized by llama-server: on short requests, a
 * large share of the slot's time. So each ready instance also holds
 * requests beyond its slots, which llama-server queues itself and starts
 * the moment a slot frees, while the pool refills them: about
 * HANDOFF_AHEAD_S of work (slots x HANDOFF_AHEAD_S / turnaround), at least
 * one per slot (llama-server decodes its slots in one batch, so requests
 * sent together end together, and each slot needs its successor), at most
 * HANDOFF_PER_SLOT per slot, and never more than its HTTP threads serve at
 * once (llama-server leaves a connection beyond them waiting, for up to
 * seconds, behind the others' keep-alive). A handed-off request so waits inside
 * llama-server about HANDOFF_AHEAD_S, or one turnaround when that is longer;
 * the rest wait in the pool's queue, first come first served, with its
 * timeout and its bound.
 *
 * Only when it cannot cost the request much: the model's requests are short
 * (its turnaround, an average of recent dispatch-to-done times, is at most
 * HANDOFF_MAX_S: a handed-off request waits at most about one of them for
 * its slot), and no instance of the model is starting or asked for (a new
 * instance would serve the waiters sooner than a busy one). */
static bool handoff_ok(const struct sched *s, const struct model *m)
{
    if (!m->waiting || m->failed || m->turnaround <= 0 || m->turnaround > HANDOFF_MAX_S ||
        m->start_queued || m->start_out)
        return false;
    for (size_t i = 0; i < m->ninst; i++) {
        const struct inst *in = &s->insts[m->inst[i]];
        if (in->state == INST_STARTING || (in->suspect && !in->stop_req))
            return false;       /* coming: a suspect one answers again, or its crash shows */
    }
    return true;
}

/* How many requests beyond SLOTS an instance of M holds. */
static unsigned handoff_depth(const struct model *m, unsigned slots)
{
    double want = (double)slots * HANDOFF_AHEAD_S / m->turnaround + 0.5;
    unsigned most = slots * HANDOFF_PER_SLOT;
    return want < slots ? slots : want > most ? most : (unsigned)want;
}

/* The most requests IN, of M, holds at once: its slots and its hand-off,
 * within its HTTP threads. */
static unsigned handoff_most(const struct model *m, const struct inst *in)
{
    unsigned most = in->slots + handoff_depth(m, in->slots);
    return m->info.http_conns && most > m->info.http_conns ? m->info.http_conns : most;
}

static void handoff(struct sched *s, double now, size_t model)
{
    if (handoff_ok(s, &s->models[model]))
        serve_waiters(s, now, model, ROOM_HANDOFF);
}

/* A dispatched request ended with its answer after D seconds. */
static void turnaround_note(struct model *m, double d)
{
    if (d < 1e-6)
        d = 1e-6;               /* 0 means none known */
    m->turnaround = m->turnaround > 0 ? 0.75 * m->turnaround + 0.25 * d : d;
}

/* ---------- memory ---------- */

static uint64_t sat_add(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static uint64_t sat_mul(uint64_t a, uint64_t b)
{
    return b && a > UINT64_MAX / b ? UINT64_MAX : a * b;
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* Charged: added and not failed (stopping ones still count). */
static bool inst_counts(const struct inst *in)
{
    return in->id && in->state != INST_FAILED;
}

static uint64_t inst_charge(const struct inst *in)
{
    if (!inst_counts(in))
        return 0;
    uint64_t base = in->state == INST_READY && in->measured ? in->measured
                  : in->measured > in->estimate ? in->measured : in->estimate;
    return sat_add(base, in->extra);
}

static uint64_t inst_file(const struct sched *s, const struct inst *in)
{
    return s->models[in->model].info.file_id;
}

/* Its part that no sibling shares: at most what every instance adds. */
static uint64_t inst_private(const struct sched *s, const struct inst *in)
{
    return min_u64(inst_charge(in), s->models[in->model].info.mem_more);
}

/* A charged instance other than SKIP maps FILE (never for file 0). */
static bool file_live(const struct sched *s, uint64_t file, size_t skip)
{
    if (!file)
        return false;
    for (size_t i = 0; i < s->ninsts; i++)
        if (i != skip && inst_counts(&s->insts[i]) && inst_file(s, &s->insts[i]) == file)
            return true;
    return false;
}

static unsigned model_pending(const struct model *m)
{
    return m->start_queued + m->start_out;
}

/* One of the first BEFORE active models has FILE and a START asked and not
 * yet added. */
static bool file_pending(const struct sched *s, uint64_t file, size_t before)
{
    for (size_t k = 0; k < before && k < s->nactive; k++) {
        const struct model *m = &s->models[s->active[k]];
        if (model_pending(m) && m->info.file_id == file)
            return true;
    }
    return false;
}

/* What the STARTs asked and not yet added will be charged. */
static uint64_t pending_charge(const struct sched *s)
{
    uint64_t sum = 0;
    for (size_t k = 0; k < s->nactive; k++) {
        const struct model *m = &s->models[s->active[k]];
        unsigned p = model_pending(m);
        if (!p)
            continue;
        uint64_t f = m->info.file_id;
        sum = sat_add(sum, sat_mul(p, m->info.mem_more));
        if (!f)
            sum = sat_add(sum, sat_mul(p, m->info.mem_weights));
        else if (!file_live(s, f, SIZE_MAX) && !file_pending(s, f, k))
            sum = sat_add(sum, m->info.mem_weights);
    }
    return sum;
}

/* What one more instance of MODEL would be charged, besides those pending. */
static uint64_t start_estimate(const struct sched *s, size_t model)
{
    const struct model *m = &s->models[model];
    uint64_t f = m->info.file_id;
    bool shared = f && (file_live(s, f, SIZE_MAX) || file_pending(s, f, s->nactive));
    return sat_add(m->info.mem_more, shared ? 0 : m->info.mem_weights);
}

static uint64_t mem_used(const struct sched *s)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < s->ninsts; i++)
        sum = sat_add(sum, inst_charge(&s->insts[i]));
    return sum;
}

/* ---------- GPU memory ---------- */

/* MODEL needs a device (and there are devices to place it on). */
static bool model_gpu(const struct sched *s, size_t model)
{
    return s->ndev && (s->models[model].info.vram || s->models[model].split);
}

/* What one instance of MODEL needs on device D, beside whatever device it
 * is placed on: its split share there; 0 for a model not split. */
static uint64_t split_on(const struct sched *s, size_t model, size_t d)
{
    const uint64_t *sp = s->models[model].split;
    return sp && d < SCHED_MAX_DEVICES ? sp[d] : 0;
}

/* May one of MODEL's instances go on device D? */
static bool dev_allowed(const struct sched *s, size_t model, size_t d)
{
    const struct sched_model_info *i = &s->models[model].info;
    return !i->vram_fixed || i->vram_device == d;
}

/* What IN is charged on device D: on its one device, its vram, or its
 * measured use once higher; split over devices, its share there (the
 * estimate: NVML's per-process figure is not split by device here). */
static uint64_t inst_on(const struct sched *s, const struct inst *in, size_t d)
{
    if (!inst_counts(in) || d >= s->ndev)
        return 0;
    if (in->dev == DEV_SPLIT)
        return split_on(s, in->model, d);
    if (in->dev != (int)d)
        return 0;
    uint64_t est = s->models[in->model].info.vram;
    return in->vram_meas > est ? in->vram_meas : est;
}

static uint64_t dev_used(const struct sched *s, size_t d)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < s->ninsts; i++)
        sum = sat_add(sum, inst_on(s, &s->insts[i], d));
    return sum;
}

/* The device free-memory estimate follows our starts and ends: DIR +1 when
 * IN starts being charged, -1 when it stops. */
static void dev_free_track(struct sched *s, const struct inst *in, int dir)
{
    for (size_t d = 0; d < s->ndev; d++) {
        struct sdev *v = &s->dev[d];
        uint64_t c = inst_on(s, in, d);
        if (!c || !v->free_known)
            continue;
        v->free = dir > 0 ? v->free - min_u64(v->free, c) : sat_add(v->free, c);
    }
}

/* What the STARTs asked for D and not yet added will be charged there. */
static uint64_t dev_pending(const struct sched *s, size_t d)
{
    uint64_t sum = 0;
    for (size_t k = 0; k < s->nactive; k++) {
        const struct model *m = &s->models[s->active[k]];
        for (size_t j = 0; j < m->npdev; j++)
            if (m->split)
                sum = sat_add(sum, m->split[d]);
            else if (m->pdev[j] == (int)d)
                sum = sat_add(sum, m->info.vram);
    }
    return sum;
}

/* What the instances on D being stopped (and those chosen) free once gone. */
static uint64_t dev_freed(const struct sched *s, size_t d)
{
    uint64_t freed = 0;
    for (size_t i = 0; i < s->ninsts; i++) {
        const struct inst *x = &s->insts[i];
        if (x->stop_req || x->chosen)
            freed = sat_add(freed, inst_on(s, x, d));
    }
    return freed;
}

/* NEED more bytes fit on D beside USED (charged there) and PENDING (starts
 * under way and reservations), once FREED is freed: within its budget, and
 * within the device's free memory when known. */
static bool dev_fits(const struct sched *s, size_t d, uint64_t need, uint64_t used,
                     uint64_t pending, uint64_t freed)
{
    const struct sdev *v = &s->dev[d];
    uint64_t after = used - min_u64(used, freed);
    return sat_add(sat_add(after, pending), need) <= v->budget &&
           (!v->free_known || sat_add(pending, need) <= sat_add(v->free, freed));
}

/* dev_fits with what is charged and pending on D now, plus RESERVED. */
static bool dev_room(const struct sched *s, size_t d, uint64_t need, uint64_t reserved,
                     uint64_t freed)
{
    return dev_fits(s, d, need, dev_used(s, d), sat_add(dev_pending(s, d), reserved), freed);
}

/* The device for one more instance of MODEL: among those it may use where
 * it fits beside RESERVED, the one with the most budget left (the lowest
 * index on ties); -1 when none has room. */
static int place(const struct sched *s, size_t model, const uint64_t *reserved)
{
    uint64_t need = s->models[model].info.vram, best_left = 0;
    int best = -1;
    for (size_t d = 0; d < s->ndev; d++) {
        if (!dev_allowed(s, model, d))
            continue;
        uint64_t used = dev_used(s, d), pending = sat_add(dev_pending(s, d), reserved[d]);
        if (!dev_fits(s, d, need, used, pending, 0))
            continue;
        uint64_t taken = sat_add(used, pending);
        uint64_t left = s->dev[d].budget - min_u64(s->dev[d].budget, taken);
        if (best < 0 || left > best_left) {
            best = (int)d;
            best_left = left;
        }
    }
    return best;
}

/* The largest budget among the devices MODEL may use. */
static uint64_t dev_largest(const struct sched *s, size_t model)
{
    uint64_t most = 0;
    for (size_t d = 0; d < s->ndev; d++)
        if (dev_allowed(s, model, d) && s->dev[d].budget > most)
            most = s->dev[d].budget;
    return most;
}

/* A split MODEL fits beside RESERVED: room for its share on every device
 * it uses. */
static bool split_fits(const struct sched *s, size_t model, const uint64_t *reserved)
{
    for (size_t d = 0; d < s->ndev; d++) {
        uint64_t need = split_on(s, model, d);
        if (need && !dev_room(s, d, need, reserved[d], 0))
            return false;
    }
    return true;
}

/* The first device whose budget a split MODEL's share exceeds; -1: none. */
static int split_too_big(const struct sched *s, size_t model)
{
    for (size_t d = 0; d < SCHED_MAX_DEVICES; d++) {
        uint64_t need = split_on(s, model, d);
        if (need && (d >= s->ndev || need > s->dev[d].budget))
            return (int)d;
    }
    return -1;
}

/* The instance starts being charged: its estimate, weights included unless
 * another live instance maps the same file. */
static void inst_charge_start(struct sched *s, uint32_t ii)
{
    struct inst *in = &s->insts[ii];
    const struct model *m = &s->models[in->model];
    in->estimate = sat_add(m->info.mem_more,
                           file_live(s, m->info.file_id, ii) ? 0 : m->info.mem_weights);
    in->measured = in->extra = 0;
    in->vram_meas = 0;
    if (s->avail_known)
        s->avail -= min_u64(s->avail, in->estimate);
    dev_free_track(s, in, +1);
}

/* The instance stops being charged (failed, removed): what it frees goes
 * back to the available estimate; the shared part of its charge, when a
 * sibling of its file lives on, passes to that sibling. */
static void inst_charge_end(struct sched *s, uint32_t ii)
{
    struct inst *x = &s->insts[ii];
    if (!inst_counts(x))
        return;
    uint64_t charge = inst_charge(x), freed = charge, f = inst_file(s, x);
    if (f) {
        size_t heir = SIZE_MAX;
        for (size_t i = 0; i < s->ninsts; i++) {
            const struct inst *y = &s->insts[i];
            if (i == ii || !inst_counts(y) || inst_file(s, y) != f)
                continue;
            if (heir == SIZE_MAX || (s->insts[heir].stop_req && !y->stop_req))
                heir = i;
        }
        if (heir != SIZE_MAX) {
            freed = inst_private(s, x);
            s->insts[heir].extra = sat_add(s->insts[heir].extra, charge - freed);
        }
    }
    if (s->avail_known)
        s->avail = sat_add(s->avail, freed);
    dev_free_track(s, x, -1);
    x->measured = x->extra = 0;
    x->vram_meas = 0;
}

/* A charged sibling of the instance at XI (same file) that is neither
 * stopping nor chosen: it keeps the shared pages mapped. */
static bool keeps_sibling(const struct sched *s, size_t xi)
{
    uint64_t f = inst_file(s, &s->insts[xi]);
    if (!f)
        return false;
    for (size_t i = 0; i < s->ninsts; i++) {
        const struct inst *y = &s->insts[i];
        if (i != xi && inst_counts(y) && !y->stop_req && !y->chosen && inst_file(s, y) == f)
            return true;
    }
    return false;
}

/* What the instances being stopped (and those chosen) free once removed. */
static uint64_t freed_by_stops(const struct sched *s)
{
    uint64_t freed = 0;
    for (size_t i = 0; i < s->ninsts; i++) {
        const struct inst *x = &s->insts[i];
        if (inst_counts(x) && (x->stop_req || x->chosen))
            freed = sat_add(freed, keeps_sibling(s, i) ? inst_private(s, x) : inst_charge(x));
    }
    return freed;
}

/* NEED more bytes fit with USED and PENDING charged, once FREED is freed. */
static bool room_ok(const struct sched *s, uint64_t need, uint64_t used, uint64_t pending,
                    uint64_t freed)
{
    uint64_t after = used - min_u64(used, freed);
    return sat_add(sat_add(after, pending), need) <= s->limits.budget &&
           (!s->avail_known || sat_add(pending, need) <= sat_add(s->avail, freed));
}

/* eviction = cost. What reloading M costs: its last load time, else its
 * size at GDSF_GIB_PER_S (a first guess for a local disk), at least
 * GDSF_MIN_COST_S; per byte of it, as the GreedyDual-Size family wants. */
#define GDSF_GIB_PER_S 1.0
#define GDSF_MIN_COST_S 0.1

static double gdsf_h(const struct sched *s, const struct model *m)
{
    double size = (double)m->info.mem_weights + (double)m->info.mem_more;
    if (size < 1048576.0)
        size = 1048576.0;
    double cost = m->load_known ? m->load_s : size / (GDSF_GIB_PER_S * 1073741824.0);
    if (cost < GDSF_MIN_COST_S)
        cost = GDSF_MIN_COST_S;
    return s->gd_clock + (double)m->hits * cost / (size / 1073741824.0);
}

/* A request for M: one more hit, and its H made again from today's clock. */
static void gdsf_hit(struct sched *s, struct model *m)
{
    m->hits++;
    m->gd_h = gdsf_h(s, m);
}

static size_t alive_count(const struct sched *s, const struct model *m);

static void stop_inst(struct sched *s, uint32_t ii, enum sched_stop_reason reason)
{
    struct inst *in = &s->insts[ii];
    if (reason == SCHED_STOP_LRU && s->limits.eviction == SCHED_EVICT_COST) {
        struct model *m = &s->models[in->model];
        if (m->gd_h > s->gd_clock)
            s->gd_clock = m->gd_h;      /* the others age by what it was worth */
        if (alive_count(s, m) <= 1)
            m->hits = 0;                /* out of memory: it counts afresh when back */
    }
    in->stop_req = true;
    push(s, &(struct sched_action){ .kind = SCHED_STOP, .inst = in->id, .model = in->model,
                                    .reason = reason }, NULL);
}

/* Ready or starting, and not on its way out. */
static size_t alive_count(const struct sched *s, const struct model *m)
{
    size_t n = 0;
    for (size_t i = 0; i < m->ninst; i++) {
        const struct inst *in = &s->insts[m->inst[i]];
        n += (in->state == INST_READY || in->state == INST_STARTING) && !in->stop_req &&
             !in->chosen;
    }
    return n;
}

/* May be stopped to make room for a model with FILE (0 = unique): idle,
 * nothing waiting for its model (which also covers "fresh", see the top),
 * not pinned; the instances_min rule is checked as candidates are chosen. */
static bool evictable(const struct sched *s, const struct inst *in, uint64_t file)
{
    if (!in->id || in->state != INST_READY || in->stop_req || in->chosen || in->in_flight)
        return false;
    const struct model *m = &s->models[in->model];
    return !m->waiting && !m->info.pinned &&
           !(file && m->info.file_id == file);
}

/* A lower priority first, whatever the rest. With eviction = cost, across
 * models: the lowest H first (gdsf_h). Else,
 * and on ties, least recently used first: by the arrival of its model's
 * latest request (demand, not the time a slow load let it serve), never
 * asked ones by the time they were added; within a model, one whose cached prompts are cold
 * (no affinity entry names it: nobody's next turn would be sent there)
 * before one whose are not, then the instance used least lately. */
static bool lru_before(const struct sched *s, const struct inst *a, const struct inst *b)
{
    int pa = s->models[a->model].info.priority, pb = s->models[b->model].info.priority;
    if (pa != pb)
        return pa < pb;
    if (s->limits.eviction == SCHED_EVICT_COST && a->model != b->model) {
        double ha = s->models[a->model].gd_h, hb = s->models[b->model].gd_h;
        if (ha != hb)
            return ha < hb;
    }
    double ma = s->models[a->model].last_asked, mb = s->models[b->model].last_asked;
    double ka = ma ? ma : a->added_at, kb = mb ? mb : b->added_at;
    if (ka != kb)
        return ka < kb;
    if (!a->aff_live != !b->aff_live)
        return !a->aff_live;
    ka = a->last_used ? a->last_used : a->added_at;
    kb = b->last_used ? b->last_used : b->added_at;
    return ka < kb || (ka == kb && a->added_at < b->added_at);
}

/* What an eviction makes room for: one more instance of MODEL, charged
 * NEED on the host (DEV < 0, beside USED and PENDING) or on GPU DEV (beside
 * PENDING reserved there). */
struct room {
    size_t model;
    int dev;
    uint64_t need, used, pending;
};

static bool room_made(const struct sched *s, const struct room *r)
{
    if (r->dev < 0)
        return room_ok(s, r->need, r->used, r->pending, freed_by_stops(s));
    return dev_room(s, (size_t)r->dev, r->need, r->pending, dev_freed(s, (size_t)r->dev));
}

/* May IN be stopped to make R? Idle by evictable()'s rules; for a device,
 * one on it (of another model: VRAM is not shared, so a sibling frees
 * nothing that is not needed again). */
static bool stoppable_for(const struct sched *s, const struct inst *in, const struct room *r)
{
    if (r->dev < 0)
        return evictable(s, in, s->models[r->model].info.file_id);
    return inst_on(s, in, (size_t)r->dev) && in->model != r->model && evictable(s, in, 0);
}

/* Choose (mark) instances that may be stopped for R, least recently used
 * first and keeping every model's instances_min, until R is made; the
 * number chosen, or SIZE_MAX when even all of them would not do (nothing
 * is left chosen then). *NEWEST: the most recently used of those chosen. */
static size_t choose_lru(struct sched *s, const struct room *r, uint32_t *newest)
{
    size_t n = 0;
    s->ncand = 0;
    for (size_t i = 0; i < s->ninsts; i++) {
        if (!stoppable_for(s, &s->insts[i], r))
            continue;
        if (!util_grow(&s->cand, &s->capcand, n + 1, sizeof *s->cand))
            return SIZE_MAX;
        size_t k = n++;                 /* insertion sort: a handful of candidates */
        while (k && lru_before(s, &s->insts[i], &s->insts[s->cand[k - 1]])) {
            s->cand[k] = s->cand[k - 1];
            k--;
        }
        s->cand[k] = (uint32_t)i;
    }
    s->ncand = n;
    size_t chosen = 0;
    bool ok = false;
    for (size_t k = 0; k < n && !ok; k++) {
        struct inst *in = &s->insts[s->cand[k]];
        const struct model *m = &s->models[in->model];
        if (alive_count(s, m) <= m->info.instances_min)
            continue;                   /* its model keeps its minimum */
        in->chosen = true;
        chosen++;
        *newest = s->cand[k];
        ok = room_made(s, r);
    }
    if (!ok) {
        for (size_t k = 0; k < n; k++)
            s->insts[s->cand[k]].chosen = false;
        return SIZE_MAX;
    }
    return chosen;
}

/* Stops the instances choose_lru() chose, least recently used first; STOP
 * false: only unmarks them. */
static void stop_chosen(struct sched *s, bool stop)
{
    for (size_t k = 0; k < s->ncand; k++) {
        struct inst *in = &s->insts[s->cand[k]];
        if (!in->chosen)
            continue;
        in->chosen = false;
        if (stop)
            stop_inst(s, s->cand[k], SCHED_STOP_LRU);
    }
}

/* Stop idle instances, least recently used first, until one more instance
 * of MODEL (charged EST) fits once they are gone; none if even all of them
 * would not do. Instances already being stopped are counted as freed. */
static void make_room(struct sched *s, size_t model, uint64_t est, uint64_t used, uint64_t pending)
{
    struct room r = { .model = model, .dev = -1, .need = est, .used = used, .pending = pending };
    uint32_t newest;
    if (!room_made(s, &r))              /* else the stops under way are enough: wait */
        stop_chosen(s, choose_lru(s, &r, &newest) != SIZE_MAX);
}

struct sbuf {
    char b[768];
    size_t n;
};

static void sb_add(struct sbuf *sb, const char *f, ...) __attribute__((format(printf, 2, 3)));
static void sb_add(struct sbuf *sb, const char *f, ...)
{
    if (sb->n >= sizeof sb->b - 1)
        return;
    va_list ap;
    va_start(ap, f);
    int k = vsnprintf(sb->b + sb->n, sizeof sb->b - sb->n, f, ap);
    va_end(ap);
    if (k > 0)
        sb->n = min_u64(sb->n + (size_t)k, sizeof sb->b - 1);
}

/* MODEL can never fit: its waiters fail with the numbers and who uses what. */
static void fail_too_big(struct sched *s, size_t model, uint64_t est, uint64_t used)
{
    enum { LIST = 8 };
    struct sbuf sb = { .n = 0 };
    char need[32], budget[32], inuse[32], one[32];
    util_format_bytes(est, need, sizeof need);
    util_format_bytes(s->limits.budget, budget, sizeof budget);
    util_format_bytes(used, inuse, sizeof inuse);
    const char *name = s->models[model].name;
    sb_add(&sb, "%s needs %s; the budget is %s (in use %s", name ? name : "model", need, budget,
           inuse);
    size_t listed = 0;
    for (size_t j = 0; j < s->nactive && listed <= LIST; j++) {
        const struct model *m = &s->models[s->active[j]];
        for (size_t i = 0; i < m->ninst && listed <= LIST; i++) {
            uint64_t c = inst_charge(&s->insts[m->inst[i]]);
            if (!c)
                continue;
            if (listed++ == LIST) {
                sb_add(&sb, ", …");
                break;
            }
            util_format_bytes(c, one, sizeof one);
            sb_add(&sb, "%s%s#%zu %s", listed > 1 ? ", " : ": ", m->name ? m->name : "?", i + 1,
                   one);
        }
    }
    sb_add(&sb, ")");
    fail_waiters(s, model, 503, sb.b);
}

/* No device has room for one more instance of MODEL: stop idle instances
 * on the device where the fewest stops make room (on ties, the device
 * whose chosen instances were used least lately), least recently used first. Returns that device, or the one that
 * stops under way already free enough (nothing more is stopped), or -1
 * when no device can be freed enough now. */
static int make_room_dev(struct sched *s, size_t model, const uint64_t *reserved)
{
    struct room r = { .model = model, .need = s->models[model].info.vram };
    for (size_t d = 0; d < s->ndev; d++) {
        r.dev = (int)d;
        r.pending = reserved[d];
        if (dev_allowed(s, model, d) && room_made(s, &r))
            return (int)d;              /* the stops under way are enough: wait */
    }
    int best = -1;
    size_t fewest = SIZE_MAX;
    uint32_t best_newest = NIL, newest = NIL;
    for (size_t d = 0; d < s->ndev; d++) {
        if (!dev_allowed(s, model, d))
            continue;
        r.dev = (int)d;
        r.pending = reserved[d];
        size_t k = choose_lru(s, &r, &newest);
        stop_chosen(s, false);
        if (k == SIZE_MAX)
            continue;
        if (k < fewest || (k == fewest && lru_before(s, &s->insts[newest], &s->insts[best_newest]))) {
            fewest = k;
            best = (int)d;
            best_newest = newest;
        }
    }
    if (best < 0)
        return -1;
    r.dev = best;
    r.pending = reserved[best];
    if (choose_lru(s, &r, &newest) == SIZE_MAX)
        return -1;
    stop_chosen(s, true);
    return best;
}

/* MODEL's VRAM is more than any device it may use has: its waiters fail
 * with the numbers. */
static void fail_too_big_vram(struct sched *s, size_t model, uint64_t vram, uint64_t largest)
{
    char need[32], most[32];
    util_format_bytes(vram, need, sizeof need);
    util_format_bytes(largest, most, sizeof most);
    const char *name = s->models[model].name;
    char *msg = fmt("%s needs %s of GPU memory; the largest device budget is %s "
                    "(raise gpu_budget, or offload fewer layers with -ngl)",
                    name ? name : "model", need, most);
    fail_waiters(s, model, 503, msg ? msg : "does not fit on any GPU");
    free(msg);
}

/* No room for one more instance of a split MODEL: on each device short of
 * its share, idle instances are chosen least recently used first; they
 * are stopped only if every device can be freed enough. */
static void make_room_split(struct sched *s, size_t model, const uint64_t *reserved)
{
    struct room r = { .model = model };
    bool ok = true;
    uint32_t newest;
    for (size_t d = 0; d < s->ndev && ok; d++) {
        r.dev = (int)d;
        r.need = split_on(s, model, d);
        r.pending = reserved[d];
        if (r.need && !room_made(s, &r))
            ok = choose_lru(s, &r, &newest) != SIZE_MAX;
    }
    for (size_t i = 0; i < s->ninsts; i++)
        if (s->insts[i].chosen) {
            s->insts[i].chosen = false;
            if (ok)
                stop_inst(s, (uint32_t)i, SCHED_STOP_LRU);
        }
}

static void fail_split_too_big(struct sched *s, size_t model, size_t d)
{
    char need[32], budget[32];
    util_format_bytes(split_on(s, model, d), need, sizeof need);
    util_format_bytes(d < s->ndev ? s->dev[d].budget : 0, budget, sizeof budget);
    const char *name = s->models[model].name;
    char *msg = fmt("%s needs %s of GPU memory on GPU %zu; its budget is %s "
                    "(raise gpu_budget, or change the split with -ts or -ngl)",
                    name ? name : "model", need, d, budget);
    fail_waiters(s, model, 503, msg ? msg : "does not fit on its GPUs");
    free(msg);
}

/* With a budget, the one place that starts instances and evicts for memory;
 * it runs at the end of every event. Models that want a start are taken by
 * their oldest waiting request: each starts if it fits beside what the
 * older ones that do not fit have reserved; the oldest that does not fit is
 * the only one made room for. */
/* A model's waiters' claim on memory: its priority, one level more for
 * each SCHED_PRIORITY_AGE_S its oldest waiter has waited (none starves). */
static double claim(const struct sched *s, size_t model)
{
    const struct model *m = &s->models[model];
    double waited = s->now - s->reqs[m->head].arrival;
    return m->info.priority + floor((waited > 0 ? waited : 0) / SCHED_PRIORITY_AGE_S);
}

/* Whether model A's waiters go before B's when memory is short: the
 * higher claim, then the older waiter. */
static bool waiter_before(const struct sched *s, size_t a, size_t b)
{
    double ca = claim(s, a), cb = claim(s, b);
    if (ca != cb)
        return ca > cb;
    return s->reqs[s->models[a].head].seq < s->reqs[s->models[b].head].seq;
}

static void mem_plan(struct sched *s)
{
    uint64_t budget = s->limits.budget;
    if ((!budget && !s->ndev) || !s->waiting)
        return;
    for (;;) {
        size_t n = 0;
        for (size_t j = 0; j < s->nactive; j++) {
            size_t i = s->active[j];
            if (!starts_wanted(s, &s->models[i]))
                continue;
            if (!util_grow(&s->order, &s->caporder, n + 1, sizeof *s->order))
                return;
            size_t k = n++;
            while (k && waiter_before(s, i, s->order[k - 1])) {
                s->order[k] = s->order[k - 1];
                k--;
            }
            s->order[k] = i;
        }
        if (!n)
            return;
        uint64_t used = mem_used(s), pending = pending_charge(s), reserved = 0;
        uint64_t vreserved[SCHED_MAX_DEVICES] = { 0 };
        bool acted = false, head = true, vhead = true;
        for (size_t k = 0; k < n && !acted; k++) {
            size_t model = s->order[k];
            uint64_t est = start_estimate(s, model);
            if (budget && est > budget) {
                if (!has_coming_or_ready(s, &s->models[model])) {
                    fail_too_big(s, model, est, used);
                    acted = true;
                }
                continue;               /* else it serves with what it has */
            }
            int dev = -1;
            if (model_gpu(s, model) && s->models[model].split) {
                int big = split_too_big(s, model);
                if (big >= 0) {
                    if (!has_coming_or_ready(s, &s->models[model])) {
                        fail_split_too_big(s, model, (size_t)big);
                        acted = true;
                    }
                    continue;
                }
                if (!split_fits(s, model, vreserved)) {
                    if (vhead)
                        make_room_split(s, model, vreserved);
                    vhead = false;
                    for (size_t d = 0; d < s->ndev; d++)
                        vreserved[d] = sat_add(vreserved[d], split_on(s, model, d));
                    continue;
                }
            } else if (model_gpu(s, model)) {
                uint64_t vram = s->models[model].info.vram, largest = dev_largest(s, model);
                if (vram > largest) {
                    if (!has_coming_or_ready(s, &s->models[model])) {
                        fail_too_big_vram(s, model, vram, largest);
                        acted = true;
                    }
                    continue;
                }
                if ((dev = place(s, model, vreserved)) < 0) {
                    /* The oldest waiter that does not fit is made room for;
                     * newer ones keep off the device that frees for it. */
                    int freeing = vhead ? make_room_dev(s, model, vreserved) : -1;
                    vhead = false;
                    if (freeing >= 0)
                        vreserved[freeing] = sat_add(vreserved[freeing], vram);
                    continue;
                }
            }
            if (!budget || room_ok(s, sat_add(reserved, est), used, pending, 0)) {
                emit_start(s, model, dev);
                acted = true;           /* the numbers changed: look again */
            } else {
                if (head)
                    make_room(s, model, est, used, pending);
                head = false;
                reserved = sat_add(reserved, est);
            }
        }
        if (!acted)
            return;
    }
}

/* ---------- starts asked by others ---------- */

int sched_admit(const struct sched *s, size_t model, unsigned n, char *err, size_t errlen)
{
    uint64_t budget = s->limits.budget;
    if (!n || model >= s->nmodels)
        return 0;
    if (model_gpu(s, model)) {
        /* The N placed one after another, each beside those before it. */
        const struct model *m = &s->models[model];
        uint64_t reserved[SCHED_MAX_DEVICES] = { 0 };
        for (unsigned k = 0; k < n; k++) {
            if (m->split) {
                if (split_too_big(s, model) >= 0 || !split_fits(s, model, reserved)) {
                    snprintf(err, errlen, "%s is split over GPUs and one of them has not its share "
                             "left for %u more (stop a model, or raise gpu_budget)",
                             m->name ? m->name : "model", n);
                    return -1;
                }
                for (size_t d = 0; d < s->ndev && d < SCHED_MAX_DEVICES; d++)
                    reserved[d] = sat_add(reserved[d], split_on(s, model, d));
                continue;
            }
            int d = place(s, model, reserved);
            if (d < 0 || d >= SCHED_MAX_DEVICES) {
                char a[32];
                snprintf(err, errlen, "%s needs %s of GPU memory%s; no device has that much left "
                         "(stop a model, or raise gpu_budget)", m->name ? m->name : "model",
                         util_format_bytes(m->info.vram, a, sizeof a),
                         n > 1 ? " per instance" : "");
                return -1;
            }
            reserved[d] = sat_add(reserved[d], m->info.vram);
        }
    }
    if (!budget)
        return 0;
    /* The first pays for the weights unless they are mapped already (or
     * about to be); the others share them. */
    const struct model *m = &s->models[model];
    uint64_t need = sat_add(start_estimate(s, model), sat_mul(n - 1, m->info.mem_more));
    uint64_t used = mem_used(s), pending = pending_charge(s);
    if (room_ok(s, need, used, pending, 0))
        return 0;
    char a[32], b[32], c[32];
    util_format_bytes(need, a, sizeof a);
    util_format_bytes(sat_add(used, pending), b, sizeof b);
    util_format_bytes(budget, c, sizeof c);
    if (sat_add(sat_add(used, pending), need) <= budget) {
        char d[32];
        snprintf(err, errlen, "%s needs %s more; the machine has only %s available (MemAvailable)",
                 m->name ? m->name : "model", a, util_format_bytes(s->avail, d, sizeof d));
        return -1;
    }
    snprintf(err, errlen, "%s needs %s more; %s of the %s budget is in use (stop a model, or raise memory_budget)",
             m->name ? m->name : "model", a, b, c);
    return -1;
}

int sched_place(const struct sched *s, size_t model)
{
    if (model >= s->nmodels || !model_gpu(s, model) || s->models[model].split)
        return -1;
    uint64_t none[SCHED_MAX_DEVICES] = { 0 };
    return place(s, model, none);
}

sched_inst_t sched_pick_ready(const struct sched *s, size_t model)
{
    if (model >= s->nmodels)
        return 0;
    const struct model *m = &s->models[model];
    uint32_t best = pick(s, m, ROOM_SLOT);      /* a free slot, fewest in flight */
    if (best == NIL)                    /* every slot busy: the least busy (it queues) */
        for (size_t i = 0; i < m->ninst; i++) {
            const struct inst *in = &s->insts[m->inst[i]];
            if (inst_serves(in) && (best == NIL || in->in_flight < s->insts[best].in_flight))
                best = m->inst[i];
        }
    return best != NIL ? s->insts[best].id : 0;
}

/* ---------- idleness ---------- */

static bool idle_model(const struct model *m)
{
    return m->info.idle_timeout > 0 && !m->info.pinned && !m->waiting;
}

static bool idle_inst(const struct inst *in)
{
    return in->state == INST_READY && !in->stop_req && !in->in_flight;
}

static double idle_deadline(const struct inst *in, double timeout)
{
    return (in->last_used > in->ready_at ? in->last_used : in->ready_at) + timeout;
}

/* The earliest deadline of an instance that sched_tick() would stop then. */
static bool idle_next(const struct sched *s, double *at)
{
    bool have = false;
    if (!s->nidle)
        return false;
    for (size_t k = 0; k < s->nactive; k++) {
        const struct model *m = &s->models[s->active[k]];
        if (!idle_model(m))
            continue;
        size_t alive = 0;               /* alive_count() and the deadline in one pass */
        bool mhave = false;
        double mat = 0;
        for (size_t i = 0; i < m->ninst; i++) {
            const struct inst *in = &s->insts[m->inst[i]];
            if (in->stop_req || (in->state != INST_READY && in->state != INST_STARTING))
                continue;
            alive++;
            if (in->state != INST_READY || in->in_flight)
                continue;
            double d = idle_deadline(in, m->info.idle_timeout);
            if (!mhave || d < mat)
                mat = d;
            mhave = true;
        }
        if (mhave && alive > m->info.instances_min && (!have || mat < *at)) {
            *at = mat;
            have = true;
        }
    }
    return have;
}

/* Stop instances idle past their deadline, while their model stays above
 * its minimum: those whose cached prompts are cold (see lru_before) first,
 * then the longest idle. */
static void idle_stops(struct sched *s, double now)
{
    if (!s->nidle)
        return;
    for (size_t k = 0; k < s->nactive; k++) {
        struct model *m = &s->models[s->active[k]];
        if (!idle_model(m))
            continue;
        for (size_t alive = alive_count(s, m); alive > m->info.instances_min; alive--) {
            uint32_t best = NIL;
            double best_d = 0;
            for (size_t i = 0; i < m->ninst; i++) {
                const struct inst *in = &s->insts[m->inst[i]];
                double d = idle_deadline(in, m->info.idle_timeout);
                if (!idle_inst(in) || d > now)
                    continue;
                const struct inst *bi = best != NIL ? &s->insts[best] : NULL;
                if (!bi || (!in->aff_live != !bi->aff_live ? !in->aff_live : d < best_d)) {
                    best = m->inst[i];
                    best_d = d;
                }
            }
            if (best == NIL)
                break;
            stop_inst(s, best, SCHED_STOP_IDLE);
        }
    }
}

/* Every event ends here: starts and evictions for memory, hand-offs for
 * models that get no start, then the timer. */
static void event_end(struct sched *s, double now)
{
    s->now = now;
    active_prune(s);
    mem_plan(s);
    for (size_t k = 0; k < s->nactive; k++)
        handoff(s, now, s->active[k]);
    wake_update(s);
}

/* ---------- lifecycle and configuration ---------- */

struct sched *sched_new(const struct sched_limits *limits)
{
    struct sched *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->limits = *limits;
    s->req_free = s->inst_free = NIL;
    s->ghead = s->gtail = NIL;
    return s;
}

static void model_clear(struct sched *s, size_t model)
{
    struct model *m = &s->models[model];
    s->nidle -= m->info.idle_timeout > 0;
    while (m->ninst)
        inst_forget(s, m->inst[m->ninst - 1]);
    free(m->inst);
    free(m->pdev);
    free(m->split);
    free(m->name);
    free(m->failed);
    *m = (struct model){ .head = NIL, .tail = NIL };
}

void sched_free(struct sched *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nmodels; i++) {
        free(s->models[i].inst);
        free(s->models[i].pdev);
        free(s->models[i].split);
        free(s->models[i].name);
        free(s->models[i].failed);
    }
    free(s->models);
    free(s->aff);
    free(s->reqs);
    free(s->insts);
    idmap_free(&s->req_map);
    idmap_free(&s->inst_map);
    for (size_t i = 0; i < s->qlen; i++)
        free(s->q[(s->qhead + i) & (s->qcap - 1)].own);
    free(s->q);
    free(s->taken_msg);
    free(s->out);
    free(s->order);
    free(s->cand);
    free(s->active);
    free(s);
}

void sched_set_limits(struct sched *s, const struct sched_limits *limits)
{
    bool had_budget = s->limits.budget > 0;
    s->limits = *limits;
    if (had_budget && !s->limits.budget)    /* no longer held back by memory */
        for (size_t i = 0; i < s->nmodels; i++)
            consider_starts(s, i);
    event_end(s, s->now);   /* a new queue_timeout moves every deadline */
}

void sched_models_resize(struct sched *s, size_t n)
{
    for (size_t i = n; i < s->nmodels; i++) {
        fail_waiters(s, i, 404, "model removed by reload");
        model_clear(s, i);
    }
    if (n > s->nmodels) {
        struct model *v = realloc(s->models, n * sizeof *v);
        if (!v)
            return;
        s->models = v;
        size_t *a = realloc(s->active, n * sizeof *a);
        if (!a)
            return;                     /* the old count stands: still consistent */
        s->active = a;
        for (size_t i = s->nmodels; i < n; i++)
            v[i] = (struct model){ .head = NIL, .tail = NIL };
    } else if (n == 0) {
        free(s->models);
        s->models = NULL;
    } else if (n < s->nmodels) {
        struct model *v = realloc(s->models, n * sizeof *v);
        if (v)
            s->models = v;
    }
    s->nmodels = n;
    size_t kept = 0;                    /* removed models leave the active list */
    for (size_t k = 0; k < s->nactive; k++)
        if (s->active[k] < n)
            s->active[kept++] = s->active[k];
    s->nactive = kept;
    event_end(s, s->now);
}

void sched_model_set(struct sched *s, size_t model, const char *name,
                     const struct sched_model_info *info)
{
    if (model >= s->nmodels)
        return;
    struct model *m = &s->models[model];
    char *copy = dup_str(name ? name : "");
    if (copy) {
        free(m->name);
        m->name = copy;
    }
    s->nidle -= m->info.idle_timeout > 0;
    s->nidle += info->idle_timeout > 0;
    m->info = *info;
    m->info.vram_split = NULL;          /* the caller's; ours is m->split */
    if (info->vram_split) {
        if (!m->split)
            m->split = calloc(SCHED_MAX_DEVICES, sizeof *m->split);
        if (m->split)
            memcpy(m->split, info->vram_split, SCHED_MAX_DEVICES * sizeof *m->split);
    } else {
        free(m->split);
        m->split = NULL;
    }
    consider_starts(s, model);  /* a higher max or a smaller hint may call for more */
    event_end(s, s->now);       /* ... or a smaller estimate; a new idle_timeout */
}

void sched_model_failed(struct sched *s, double now, size_t model, const char *reason)
{
    (void)now;
    event_begin(s);
    if (model < s->nmodels) {
        struct model *m = &s->models[model];
        free(m->failed);
        m->failed = NULL;
        if (reason) {
            m->failed = dup_str(reason);
            fail_waiters(s, model, 503, m->failed ? m->failed : "model failed");
            if (!m->failed)
                m->failed = dup_str("model failed");   /* never "usable" by accident */
        }
    }
    event_end(s, now);
}

/* ---------- events ---------- */

void sched_request(struct sched *s, double now, sched_req_t req, size_t model)
{
    sched_request_prefix(s, now, req, model, NULL);
}

void sched_request_prefix(struct sched *s, double now, sched_req_t req, size_t model,
                          const struct sched_prefix *prefix)
{
    event_begin(s);
    if (!req) {
        /* ids are never 0 */
    } else if (model >= s->nmodels) {
        emit_fail(s, req, model, 404, 0, "unknown model", NULL);
    } else if (idmap_get(&s->req_map, req) != NIL) {
        /* already known: the caller's mistake; the first one stands */
    } else if (s->models[model].failed) {
        char *own = dup_str(s->models[model].failed);
        emit_fail(s, req, model, 503, 0, "model failed", own);
    } else {
        struct model *m = &s->models[model];
        m->last_asked = now;
        gdsf_hit(s, m);
        struct req probe = { .model = model, .prefix = prefix };
        if (prefix) {
            aff_prefer(s, model, prefix, probe.pref);
            if (m->info.affinity_wait > 0)
                probe.hold_until = now + m->info.affinity_wait;
        }
        bool hit = false, hold = false;
        uint32_t ii = m->head == NIL ? choose(s, now, &probe, ROOM_SLOT, &hit, &hold) : NIL;
        if (ii == NIL && s->waiting >= s->limits.max_queue) {
            emit_fail(s, req, model, 429, 1, "queue full", fmt("queue full (%zu waiting)", s->waiting));
        } else {
            uint32_t ri = req_new(s, req, model);
            if (ri != NIL) {
                struct req *r = &s->reqs[ri];
                r->prefix = prefix;
                r->pref[0] = probe.pref[0];
                r->pref[1] = probe.pref[1];
                r->hold_until = probe.hold_until;
            }
            if (ri == NIL) {
                emit_fail(s, req, model, 503, 1, "out of memory", NULL);
            } else if (ii != NIL) {
                dispatch(s, now, ri, ii, hit);
            } else {
                wait_push(s, ri, now);
                settle(s, now, model);
            }
        }
    }
    event_end(s, now);
}

/* Done or gone: a waiting request leaves the queue without an answer, a
 * dispatched one frees its slot for the next waiter. */
static void request_end(struct sched *s, double now, sched_req_t req, bool answered)
{
    event_begin(s);
    uint32_t ri = idmap_get(&s->req_map, req);
    if (ri != NIL) {
        struct req *r = &s->reqs[ri];
        if (r->inst == NIL) {
            wait_unlink(s, ri);
            req_forget(s, ri);
        } else {
            uint32_t ii = r->inst;
            if (answered)
                turnaround_note(&s->models[r->model], now - r->sent);
            flight_unlink(s, ri);
            req_forget(s, ri);
            s->insts[ii].last_used = now;
            settle(s, now, s->insts[ii].model);
        }
    }
    event_end(s, now);
}

void sched_request_done(struct sched *s, double now, sched_req_t req)
{
    request_end(s, now, req, true);
}

void sched_request_gone(struct sched *s, double now, sched_req_t req)
{
    request_end(s, now, req, false);
}

void sched_instance_added(struct sched *s, double now, sched_inst_t inst, size_t model)
{
    int dev = -1;
    if (model < s->nmodels && s->models[model].info.vram_fixed)
        dev = (int)s->models[model].info.vram_device;
    sched_instance_added_on(s, now, inst, model, dev);
}

void sched_instance_added_on(struct sched *s, double now, sched_inst_t inst, size_t model,
                             int device)
{
    if (!inst || model >= s->nmodels)
        return;
    uint32_t old = idmap_get(&s->inst_map, inst);
    if (old != NIL) {                   /* the id was reused: the old one is gone */
        size_t was = s->insts[old].model;
        inst_forget(s, old);
        if (was != model)
            settle(s, now, was);
    }
    struct model *m = &s->models[model];
    uint32_t ii = inst_new(s, inst, model);
    if (ii != NIL) {
        struct inst *in = &s->insts[ii];
        in->added_at = now;
        if (m->split && s->ndev)
            in->dev = DEV_SPLIT;
        else if (device >= 0 && (size_t)device < s->ndev && m->info.vram)
            in->dev = device;
        inst_charge_start(s, ii);
        if (m->start_out) {
            m->start_out--;             /* the START we asked for */
            size_t k = 0;               /* and its device, no longer pending */
            while (k < m->npdev && m->pdev[k] != device)
                k++;
            if (k == m->npdev)
                k = 0;                  /* not where we asked: the oldest goes */
            if (m->npdev)
                pdev_drop(m, k);
        }
    }
    settle(s, now, model);
    event_end(s, now);
}

void sched_instance_ready(struct sched *s, double now, sched_inst_t inst, unsigned slots)
{
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL) {
        struct inst *in = &s->insts[ii];
        if (in->state == INST_FAILED) {
            in->state = INST_READY;
            inst_charge_start(s, ii);
        } else if (in->state == INST_STARTING) {
            s->models[in->model].load_s = now - in->added_at;
            s->models[in->model].load_known = true;
            /* What was measured while loading was partial: at most a floor. */
            if (in->measured > in->estimate)
                in->estimate = in->measured;
            in->measured = 0;
        }
        in->state = INST_READY;
        in->ready_at = now;
        in->suspect = false;
        if (slots)
            in->slots = slots;
        else if (!in->slots)
            in->slots = model_hint(&s->models[in->model]);
        settle(s, now, in->model);
    }
    event_end(s, now);
}

void sched_instance_slots(struct sched *s, double now, sched_inst_t inst, unsigned slots)
{
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL && (slots || s->insts[ii].suspect)) {
        if (slots)
            s->insts[ii].slots = slots;
        s->insts[ii].suspect = false;   /* it answered again */
        settle(s, now, s->insts[ii].model);
    }
    event_end(s, now);
}

void sched_instance_suspect(struct sched *s, double now, sched_inst_t inst)
{
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL && s->insts[ii].state == INST_READY) {
        s->insts[ii].suspect = true;
        settle(s, now, s->insts[ii].model);
    }
    event_end(s, now);
}

void sched_instance_starting(struct sched *s, double now, sched_inst_t inst)
{
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL) {
        inst_drop_flight(s, ii);
        if (s->insts[ii].state == INST_READY)
            aff_drop(s, inst);          /* a restart: its cache is gone */
        bool was_failed = s->insts[ii].state == INST_FAILED;
        s->insts[ii].state = INST_STARTING;
        s->insts[ii].stop_req = false;  /* a stop that became a restart */
        s->insts[ii].suspect = false;
        if (was_failed)                 /* coming back: charged again */
            inst_charge_start(s, ii);
        settle(s, now, s->insts[ii].model);
    }
    event_end(s, now);
}

void sched_instance_failed(struct sched *s, double now, sched_inst_t inst, const char *error)
{
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL) {
        struct inst *in = &s->insts[ii];
        size_t model = in->model;
        struct model *m = &s->models[model];
        bool was_starting = in->state == INST_STARTING;
        if (in->state == INST_READY)
            aff_drop(s, inst);
        inst_drop_flight(s, ii);
        inst_charge_end(s, ii);
        in->state = INST_FAILED;
        in->suspect = false;
        if (was_starting && m->waiting && !has_coming_or_ready(s, m)) {
            /* Nothing else will serve them: they share the failed start's fate. */
            char *msg = fmt("%s: failed to start: %s", m->name ? m->name : "model",
                            error && *error ? error : "unknown error");
            fail_waiters(s, model, 502, msg ? msg : "failed to start");
            free(msg);
        } else {
            settle(s, now, model);
        }
    }
    event_end(s, now);
}

void sched_instance_stopping(struct sched *s, double now, sched_inst_t inst)
{
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL && !s->insts[ii].stop_req) {
        s->insts[ii].stop_req = true;
        settle(s, now, s->insts[ii].model);
    }
    event_end(s, now);
}

void sched_instance_removed(struct sched *s, double now, sched_inst_t inst)
{
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL) {
        size_t model = s->insts[ii].model;
        inst_forget(s, ii);
        settle(s, now, model);
    }
    event_end(s, now);
}

static void fmt_seconds(char *buf, size_t len, double t)
{
    int n = snprintf(buf, len, "%.1f", t);
    if (n >= 2 && (size_t)n < len && buf[n - 2] == '.' && buf[n - 1] == '0')
        buf[n - 2] = '\0';      /* "120", "0.5" */
}

void sched_tick(struct sched *s, double now)
{
    event_begin(s);
    double limit = s->limits.queue_timeout;
    while (limit > 0 && s->ghead != NIL && s->reqs[s->ghead].arrival + limit <= now) {
        uint32_t ri = s->ghead;
        struct req *r = &s->reqs[ri];
        sched_req_t id = r->id;
        size_t model = r->model;
        char waited[32];
        fmt_seconds(waited, sizeof waited, now - r->arrival);
        wait_unlink(s, ri);
        req_forget(s, ri);
        const char *name = s->models[model].name;
        emit_fail(s, id, model, 504, 0, "waited too long in the queue",
                  fmt("waited %s s in the queue for %s", waited, name ? name : "the model"));
    }
    for (size_t k = 0; k < s->nactive; k++) {
        const struct model *m = &s->models[s->active[k]];
        if (m->waiting && m->hold_at > 0 && m->hold_at <= now)
            settle(s, now, s->active[k]);       /* holds ended: serve them */
    }
    idle_stops(s, now);
    s->wake_armed = false;      /* the caller's timer has fired: arm it again */
    event_end(s, now);
}

/* ---------- status ---------- */

size_t sched_waiting(const struct sched *s)
{
    return s->waiting;
}

size_t sched_waiting_model(const struct sched *s, size_t model)
{
    return model < s->nmodels ? s->models[model].waiting : 0;
}

bool sched_instance_known(const struct sched *s, sched_inst_t inst)
{
    return idmap_get(&s->inst_map, inst) != NIL;
}

unsigned sched_in_flight(const struct sched *s, sched_inst_t inst)
{
    uint32_t ii = idmap_get(&s->inst_map, inst);
    return ii != NIL ? s->insts[ii].in_flight : 0;
}

double sched_last_used(const struct sched *s, sched_inst_t inst)
{
    uint32_t ii = idmap_get(&s->inst_map, inst);
    return ii != NIL ? s->insts[ii].last_used : 0;
}

void sched_instance_memory(struct sched *s, double now, sched_inst_t inst, uint64_t bytes)
{
    (void)now;
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL && inst_counts(&s->insts[ii])) {
        struct inst *in = &s->insts[ii];
        if (in->state == INST_READY) {
            in->measured = bytes;       /* PSS: shared pages already split */
            in->extra = 0;
        } else if (bytes > in->measured) {
            in->measured = bytes;       /* loading: can only raise the charge */
        }
    }
    event_end(s, now);
}

void sched_devices_set(struct sched *s, double now, size_t n, const uint64_t *budgets)
{
    (void)now;
    event_begin(s);
    if (n > SCHED_MAX_DEVICES)
        n = SCHED_MAX_DEVICES;
    for (size_t d = 0; d < n; d++)
        s->dev[d].budget = budgets[d];
    for (size_t d = n; d < s->ndev; d++)
        s->dev[d] = (struct sdev){ 0 };
    s->ndev = n;
    event_end(s, now);
}

void sched_device_free(struct sched *s, double now, size_t dev, uint64_t bytes)
{
    (void)now;
    if (dev >= s->ndev)
        return;
    event_begin(s);
    s->dev[dev].free = bytes;
    s->dev[dev].free_known = bytes > 0;
    event_end(s, now);
}

void sched_instance_vram(struct sched *s, double now, sched_inst_t inst, uint64_t bytes)
{
    (void)now;
    event_begin(s);
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii != NIL)
        s->insts[ii].vram_meas = bytes;
    event_end(s, now);
}

uint64_t sched_device_used(const struct sched *s, size_t dev)
{
    return dev < s->ndev ? dev_used(s, dev) : 0;
}

uint64_t sched_instance_vram_on(const struct sched *s, sched_inst_t inst, size_t dev)
{
    uint32_t ii = idmap_get(&s->inst_map, inst);
    return ii != NIL ? inst_on(s, &s->insts[ii], dev) : 0;
}

int sched_instance_device(const struct sched *s, sched_inst_t inst)
{
    uint32_t ii = idmap_get(&s->inst_map, inst);
    if (ii == NIL)
        return -1;
    int d = s->insts[ii].dev;
    return d == DEV_SPLIT ? SCHED_DEVICE_SPLIT : d >= 0 && (size_t)d < s->ndev ? d : -1;
}

void sched_set_available(struct sched *s, double now, uint64_t bytes)
{
    (void)now;
    event_begin(s);
    s->avail = bytes;
    s->avail_known = bytes > 0;
    event_end(s, now);
}

uint64_t sched_charge(const struct sched *s, sched_inst_t inst)
{
    uint32_t ii = idmap_get(&s->inst_map, inst);
    return ii != NIL ? inst_charge(&s->insts[ii]) : 0;
}

uint64_t sched_used(const struct sched *s)
{
    return mem_used(s);
}
