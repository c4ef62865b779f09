#define _GNU_SOURCE
#include "pool.h"

#include "build_config.h"

#include "events.h"
#include "health.h"
#include "log.h"
#include "memory.h"
#include "notify.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MODEL_LOG_LINES 1000
#define MODEL_LOGBUF_MAX (256 * 1024)   /* buffered log bytes before an early write */

/* ---------- model log ---------- */

/* The file of M's log has reached log_max_size: NAME.log becomes
 * NAME.log.1, .1 becomes .2 … up to log_keep (the oldest goes); with
 * log_keep = 0 it is removed. The next line opens a new NAME.log. */
static void model_log_rotate(struct pool_model *m)
{
    const struct config *cfg = m->pool->cfg;
    char base[4096], from[4200], to[4200];
    close(m->log_fd);
    m->log_fd = -1;
    snprintf(base, sizeof base, "%s/%s.log", cfg->log_dir, m->cfg->name);
    int rc = 0;
    if (cfg->log_keep == 0) {
        rc = unlink(base);
    } else {
        for (unsigned k = cfg->log_keep; k > 1; k--) {
            snprintf(from, sizeof from, "%s.%u", base, k - 1);
            snprintf(to, sizeof to, "%s.%u", base, k);
            if (rename(from, to) < 0 && errno != ENOENT)
                rc = -1;
        }
        snprintf(to, sizeof to, "%s.1", base);
        if (rename(base, to) < 0)
            rc = -1;
    }
    char size[32];
    if (rc < 0)
        log_warn("%s: cannot rotate %s: %s", m->cfg->name, base, strerror(errno));
    else
        log_info("%s: log rotated at %s (%u kept)", m->cfg->name,
                 util_format_bytes(m->log_size, size, sizeof size), cfg->log_keep);
    m->log_size = 0;
}

/* Write the model's buffered log lines: one write per model per loop
 * iteration, however many lines its children printed meanwhile. */
static void model_log_flush(struct pool_model *m)
{
    if (m->logbuf.len && m->log_fd >= 0) {
        size_t off = 0;
        while (off < m->logbuf.len) {
            ssize_t w = write(m->log_fd, m->logbuf.data + off, m->logbuf.len - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                break;          /* disk full: the memory tail still has them */
            off += (size_t)w;
        }
        m->log_size += off;
        uint64_t max = m->pool->cfg->log_max_size;
        if (max && m->log_size >= max)
            model_log_rotate(m);
    }
    buf_clear(&m->logbuf);
}

static void model_log_close(struct pool_model *m)
{
    model_log_flush(m);
    if (m->log_fd >= 0)
        close(m->log_fd);
    m->log_fd = -1;
}

static void flush_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop; (void)revents;
    pool_flush_logs(w->data);
}

void pool_flush_logs(struct pool *p)
{
    while (p->dirty) {
        struct pool_model *m = p->dirty;
        p->dirty = m->next_dirty;
        m->dirty = false;
        model_log_flush(m);
    }
}

static void model_log_append(struct pool_model *m, const char *line, size_t n)
{
    if (m->logbuf.len + n > MODEL_LOGBUF_MAX)  /* bounded: write what we have now */
        model_log_flush(m);
    if (!buf_reserve_min(&m->logbuf, n, 4096) || !buf_append(&m->logbuf, line, n))
        return;                         /* the memory tail still has it */
    if (!m->dirty) {
        m->dirty = true;
        m->next_dirty = m->pool->dirty;
        m->pool->dirty = m;
    }
}

static void model_log_open(struct pool_model *m)
{
    const char *dir = m->pool->cfg->log_dir;
    char path[4096];
    if (m->log_fd >= 0 || !dir || !*dir)
        return;
    snprintf(path, sizeof path, "%s/%s.log", dir, m->cfg->name);
    m->log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    struct stat st;
    m->log_size = m->log_fd >= 0 && fstat(m->log_fd, &st) == 0 ? (uint64_t)st.st_size : 0;
    if (m->log_fd < 0) {
        static int warned;
        if (!warned++)
            log_warn("cannot write model logs in %s: %s (kept in memory only)", dir, strerror(errno));
    }
}

/* Tell every observer of M about EV; an observer may unsubscribe itself. */
static void model_notify(struct pool_model *m, const struct pool_event *ev)
{
    for (struct pool_observer *o = m->observers.next, *next; o != &m->observers; o = next) {
        next = o->next;
        o->fn(o, ev);
    }
}

/* The model is going away: every observer hears it once, unsubscribed first. */
static void model_notify_gone(struct pool_model *m)
{
    struct pool_event ev = { .kind = POOL_EV_GONE, .model = m };
    while (m->observers.next != &m->observers) {
        struct pool_observer *o = m->observers.next;
        pool_unobserve(o);
        o->fn(o, &ev);
    }
}

/* Add a line to the model's log: file, memory tail, followers. */
static void model_log(struct pool_model *m, struct instance *inst, const char *tag,
                      const char *text, size_t len)
{
    /* "STAMP ID TAG TEXT": assembled with stores, not printf (a line of a
     * child's output is the commonest event the daemon has). */
    char line[LOG_STAMP_LEN + 1 + sizeof inst->id + 16 + 4096 + 2];
    const char *id = inst ? inst->id : m->cfg->name;
    size_t idlen = strnlen(id, sizeof inst->id), taglen = strlen(tag), n = 0;
    if (len > 4096)
        len = 4096;
    if (taglen > 16)
        taglen = 16;
    log_stamp(line);
    n = LOG_STAMP_LEN;
    line[n++] = ' ';
    memcpy(line + n, id, idlen);
    n += idlen;
    memcpy(line + n, tag, taglen);
    n += taglen;
    line[n++] = ' ';
    memcpy(line + n, text, len);
    n += len;
    line[n] = '\0';

    if (!m->log.lines && logring_init(&m->log, MODEL_LOG_LINES) < 0)
        return;
    logring_push(&m->log, line, n);
    model_log_open(m);
    if (m->log_fd >= 0) {
        line[n] = '\n';
        model_log_append(m, line, n + 1);
        line[n] = '\0';
    }
    struct pool_event ev = { .kind = POOL_EV_LOG, .model = m, .inst = inst,
                             .line = logring_last(&m->log, 0) };
    model_notify(m, &ev);
}

/* ---------- instance callbacks ---------- */

static void gc_soon(struct pool *p)
{
    if (!ev_is_active(&p->gc) && !ev_is_pending(&p->gc)) {
        ev_timer_set(&p->gc, 0., 0.);
        ev_timer_start(p->loop, &p->gc);
    }
}

static void update_systemd_status(struct pool *p)
{
    char buf[256];
    if (p->shutting_down)
        return;                 /* keep "stopping instances" */
    pool_summary(p, buf, sizeof buf);
    notify_status(buf);
}

/* An instance's change for GET /pool/events. */
static json_t *instance_event_json(const struct instance *inst, enum instance_state old)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    const struct pool_model *m = inst->owner;
    json_object_set_new(o, "model", util_json_string(m->cfg->name));
    json_object_set_new(o, "instance", util_json_string(inst->id));
    json_object_set_new(o, "state", json_string(instance_state_name(inst->state)));
    json_object_set_new(o, "old", json_string(instance_state_name(old)));
    if (inst->pid > 0)
        json_object_set_new(o, "pid", json_integer(inst->pid));
    if (inst->port)
        json_object_set_new(o, "port", json_integer(inst->port));
    if (inst->device >= 0)
        json_object_set_new(o, "device", json_integer(inst->device));
    json_object_set_new(o, "restarts", json_integer(inst->restarts));
    if (inst->state == INSTANCE_STOPPING) {
        static const char *const why[] = {
            [INSTANCE_STOP_ASKED] = "asked",                /* stop, restart, eviction, reload, shutdown */
            [INSTANCE_STOP_START_TIMEOUT] = "start_timeout",
            [INSTANCE_STOP_UNHEALTHY] = "unhealthy",
        };
        json_object_set_new(o, "reason", json_string(why[inst->stop_reason]));
    }
    if ((inst->state == INSTANCE_BACKOFF || inst->state == INSTANCE_FAILED) && inst->last_error)
        json_object_set_new(o, "error", util_json_string(inst->last_error));
    if ((inst->state == INSTANCE_BACKOFF || inst->state == INSTANCE_FAILED) && inst->cgroup.oom_killed) {
        json_object_set_new(o, "oom_kill", json_true());
        json_object_set_new(o, "oom_at", json_integer((json_int_t)inst->cgroup.oom_at));
    }
    return o;
}

static void inst_changed(struct instance *inst, enum instance_state old, void *arg)
{
    struct pool *p = arg;
    struct pool_model *m = inst->owner;
    struct pool_event ev = { .kind = POOL_EV_STATE, .model = m, .inst = inst, .old = old };
    if (inst->state == INSTANCE_STARTING && inst->pid > 0)  /* not a spawn that failed */
        metrics_count_start(&m->stats);
    if (inst->state == INSTANCE_READY && old == INSTANCE_STARTING) {
        metrics_count_load(&m->stats, inst->ready_at - inst->spawned_at);
        usage_count_load(p->usage, m->cfg->name, ev_now(p->loop), inst->ready_at - inst->spawned_at);
    }
    /* The listener first: observers (a /pool/server wait) ask it what
     * the change means, e.g. which ready instance to name. */
    if (p->listener)
        p->listener->changed(inst, old, p->listener_arg);
    model_notify(m, &ev);
    if (events_wanted(p->events))
        events_publish(p->events, "instance", instance_event_json(inst, old));
    if (inst->state == INSTANCE_STOPPED || m->retired || p->shutting_down)
        gc_soon(p);
    update_systemd_status(p);
}

static void inst_updated(struct instance *inst, void *arg)
{
    struct pool *p = arg;
    if (p->listener)
        p->listener->changed(inst, inst->state, p->listener_arg);
}

static unsigned inst_in_flight(const struct instance *inst, void *arg)
{
    struct pool *p = arg;
    return p->listener ? p->listener->in_flight(inst, p->listener_arg) : 0;
}

static void inst_output(struct instance *inst, const char *line, size_t len, void *arg)
{
    (void)arg;
    model_log(inst->owner, inst, ":", line, len);
}

static void inst_event(struct instance *inst, int level, const char *msg, void *arg)
{
    (void)arg;
    log_msg((enum log_level)level, "%s: %s", inst->id, msg);
    model_log(inst->owner, inst, ": [llama-pool]", msg, strlen(msg));
}

static bool inst_crashed(struct instance *inst, void *arg)
{
    struct pool *p = arg;
    struct pool_model *m = inst->owner;
    double now = ev_now(p->loop);
    double window = (double)p->cfg->restart_window_ms / 1000.0;
    if (p->shutting_down || m->retired)
        return true;            /* no restarts while going away */
    metrics_count_eviction(&m->stats, METRICS_EVICT_CRASH);
    if (!m->crashes && !(m->crashes = calloc(1, sizeof *m->crashes))) {
        log_error("%s: out of memory: its crash is not counted", m->cfg->name);
        return false;
    }
    if (!crash_log_add(m->crashes, now, window, p->cfg->max_restarts))
        return false;
    char msg[1200];
    size_t crashes = crash_log_count(m->crashes, now, window);
    snprintf(msg, sizeof msg, "%s (crashed %zu time%s within %.0f s; marked failed until start or reload)",
             inst->last_error ? inst->last_error : "crashed", crashes, crashes == 1 ? "" : "s", window);
    free(m->last_error);
    m->last_error = strdup(msg);
    m->failed = true;
    log_error("%s: %s", m->cfg->name, msg);
    model_log(m, NULL, ": [llama-pool]", msg, strlen(msg));
    return true;
}

/* memory.max for INST's next child, with memory_hard_limit: its model's
 * host estimate in full (weights + KV, buffers, prompt cache; or memory =
 * SIZE) plus cgroup_memory_limit's margin. The weights count in every
 * instance's limit although the budget charges them once per file: the
 * page cache of an mmap'd file is charged to the cgroup that first
 * touches a page, whichever instance of the file that is. */
static uint64_t inst_memory_limit(struct instance *inst, void *arg)
{
    struct pool *p = arg;
    struct pool_model *m = inst->owner;
    if (!config_memory_hard_limit(p->cfg, m->cfg))
        return 0;
    const struct memory_estimate *e = pool_model_estimate(m);
    return cgroup_memory_limit(e->weights + e->more);
}

static const struct instance_ops pool_instance_ops = {
    .changed = inst_changed,
    .output = inst_output,
    .event = inst_event,
    .crashed = inst_crashed,
    .updated = inst_updated,
    .in_flight = inst_in_flight,
    .memory_limit = inst_memory_limit,
};

/* ---------- models ---------- */

static struct pool_model *model_new(struct pool *p, const struct config_model *cm)
{
    struct pool_model *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->pool = p;
    m->index = p->models_made++;
    m->cfg = cm;
    m->np_hint = config_child_slots(m->pool->cfg, cm);
    m->gpu_fixed = config_child_gpus_fixed(m->pool->cfg, cm);
    m->log_fd = -1;
    m->observers.next = m->observers.prev = &m->observers;
    return m;
}

static void model_free(struct pool_model *m)
{
    model_notify_gone(m);
    for (size_t i = 0; i < m->ninst; i++)
        instance_free(m->inst[i]);
    free(m->inst);
    logring_free(&m->log);
    model_log_close(m);
    for (struct pool_model **pp = &m->pool->dirty; *pp; pp = &(*pp)->next_dirty)
        if (*pp == m) {
            *pp = m->next_dirty;
            break;
        }
    buf_free(&m->logbuf);
    free(m->crashes);
    metrics_stats_free(&m->stats);
    free(m->est);
    free(m->est_error);
    free(m->last_error);
    free(m);
}

static void model_forget_crashes(struct pool_model *m)
{
    free(m->crashes);
    m->crashes = NULL;
}

static unsigned model_active(const struct pool_model *m)
{
    unsigned n = 0;
    for (size_t i = 0; i < m->ninst; i++) {
        enum instance_state s = m->inst[i]->state;
        if (s == INSTANCE_STARTING || s == INSTANCE_READY || s == INSTANCE_BACKOFF)
            n++;
    }
    return n;
}

/* A new instance NO of M, STOPPED, at the end of its list. */
static struct instance *model_insert(struct pool_model *m, unsigned no)
{
    struct instance **v = realloc(m->inst, (m->ninst + 1) * sizeof *v);
    if (!v)
        return NULL;
    m->inst = v;
    struct instance *inst = instance_new(&m->pool->world, m->cfg, no, m);
    if (!inst)
        return NULL;
    m->inst[m->ninst++] = inst;
    return inst;
}

static struct instance *model_add_instance(struct pool_model *m)
{
    /* The lowest free number: tiny#1 again after tiny#1 was stopped. */
    unsigned no = 1;
    for (bool taken = true; taken; ) {
        taken = false;
        for (size_t i = 0; i < m->ninst; i++)
            if (m->inst[i]->no == no) {
                taken = true;
                no++;
                break;
            }
    }
    return model_insert(m, no);
}

size_t pool_model_count(const struct pool_model *m, enum instance_state s)
{
    size_t n = 0;
    for (size_t i = 0; i < m->ninst; i++)
        n += m->inst[i]->state == s;
    return n;
}

enum pool_model_state pool_model_state(const struct pool_model *m)
{
    if (m->failed)
        return POOL_MODEL_FAILED;
    if (pool_model_count(m, INSTANCE_READY))
        return POOL_MODEL_READY;
    if (pool_model_count(m, INSTANCE_STARTING) || pool_model_count(m, INSTANCE_BACKOFF))
        return POOL_MODEL_STARTING;
    if (pool_model_count(m, INSTANCE_STOPPING))
        return POOL_MODEL_STOPPING;
    if (pool_model_count(m, INSTANCE_FAILED))
        return POOL_MODEL_FAILED;
    return POOL_MODEL_STOPPED;
}

const char *pool_model_state_name(enum pool_model_state s)
{
    switch (s) {
    case POOL_MODEL_STOPPED:  return "stopped";
    case POOL_MODEL_STARTING: return "starting";
    case POOL_MODEL_READY:    return "ready";
    case POOL_MODEL_STOPPING: return "stopping";
    case POOL_MODEL_FAILED:   return "failed";
    }
    return "unknown";
}

/* An operator's start or a preload: the listener says where it goes. */
static void place_instance(struct instance *inst)
{
    struct pool_model *m = inst->owner;
    struct pool *p = m->pool;
    char visible[100] = "";
    int device = p->listener && p->listener->place
                 ? p->listener->place(m, visible, sizeof visible, p->listener_arg) : -1;
    instance_place(inst, device, visible);
}

int pool_model_start(struct pool_model *m, unsigned n, char *err, size_t errlen)
{
    unsigned max = m->cfg->instances_max;
    if (n == 0)
        n = 1;
    if (n > max) {
        snprintf(err, errlen, "model \"%s\" allows at most %u instance%s (instances = %u-%u)",
                 m->cfg->name, max, max == 1 ? "" : "s", m->cfg->instances_min, max);
        return -1;
    }
    if (m->pool->shutting_down) {
        snprintf(err, errlen, "llama-pool is shutting down");
        return -1;
    }
    unsigned more = n > model_active(m) ? n - model_active(m) : 0;
    struct pool *p = m->pool;
    if (more && p->listener && p->listener->admit(m, more, err, errlen, p->listener_arg) < 0)
        return -1;
    /* An operator's start forgets past crashes. */
    m->failed = false;
    model_forget_crashes(m);
    /* Failed instances are started again first, then new ones are added. */
    for (size_t i = 0; i < m->ninst && model_active(m) < n; i++) {
        struct instance *inst = m->inst[i];
        enum instance_state s = inst->state;
        if (s != INSTANCE_FAILED && s != INSTANCE_STOPPED && s != INSTANCE_STOPPING)
            continue;
        place_instance(inst);
        instance_start(inst);
        if (inst->state == INSTANCE_FAILED) {   /* cannot be spawned: adding more would not help */
            snprintf(err, errlen, "%s: %s", inst->id, inst->last_error ? inst->last_error : "cannot start");
            return -2;
        }
    }
    while (model_active(m) < n) {
        struct instance *inst = model_add_instance(m);
        if (!inst) {
            snprintf(err, errlen, "out of memory");
            return -2;
        }
        place_instance(inst);
        instance_start(inst);
        /* It could not even be spawned (no llama-server binary): adding
         * more would fail the same way. */
        if (inst->state == INSTANCE_FAILED) {
            snprintf(err, errlen, "%s: %s", inst->id, inst->last_error ? inst->last_error : "cannot start");
            return -2;
        }
    }
    /* A start also revives an instance waiting in backoff. */
    for (size_t i = 0; i < m->ninst; i++)
        if (m->inst[i]->state == INSTANCE_BACKOFF)
            instance_start(m->inst[i]);
    return 0;
}

struct instance *pool_model_add(struct pool_model *m, int device, const char *visible)
{
    /* A failed model (a crash loop) starts again only by an operator's
     * start or a reload: not for a request that was waiting when it failed. */
    if (m->pool->shutting_down || m->retired || m->failed || model_active(m) >= m->cfg->instances_max)
        return NULL;
    /* A stopped or failed instance is reused before a new one is made. */
    struct instance *inst = NULL;
    for (size_t i = 0; i < m->ninst && !inst; i++) {
        enum instance_state s = m->inst[i]->state;
        if (s == INSTANCE_STOPPED || s == INSTANCE_FAILED)
            inst = m->inst[i];
    }
    if (!inst && !(inst = model_add_instance(m)))
        return NULL;
    instance_place(inst, device, visible);
    instance_start(inst);
    return inst;
}

void pool_use_cgroups(struct pool *p, const struct cgroup_tree *t)
{
    p->cgroups = t;
    p->world.cgroups = t;
}

void pool_set_devices(struct pool *p, unsigned n)
{
    if (n == p->ndev)
        return;
    p->ndev = n;
    for (size_t i = 0; i < p->nmodels; i++)
        p->models[i]->est_known = false;    /* made again for the devices */
}

void pool_model_stop(struct pool_model *m)
{
    for (size_t i = 0; i < m->ninst; i++)
        instance_stop(m->inst[i]);
    m->failed = false;
    model_forget_crashes(m);
    gc_soon(m->pool);
}

void pool_model_restart(struct pool_model *m)
{
    if (m->failed) {
        m->failed = false;
        model_forget_crashes(m);
    }
    if (model_active(m) == 0) {
        char err[256];
        (void)pool_model_start(m, 1, err, sizeof err);
        return;
    }
    for (size_t i = 0; i < m->ninst; i++)
        instance_restart(m->inst[i]);
}

/* ---------- garbage collection of stopped instances ---------- */

static void model_collect(struct pool_model *m)
{
    size_t keep = 0;
    for (size_t i = 0; i < m->ninst; i++) {
        struct instance *inst = m->inst[i];
        if (inst->state == INSTANCE_STOPPED && !inst->restart_after_stop)
            instance_free(inst);
        else
            m->inst[keep++] = inst;
    }
    m->ninst = keep;
    if (keep == 0)
        model_log_close(m);     /* thousands of idle models hold no fds */
}

/* Every model with instances: the configured ones, then those a reload
 * retired that are still stopping. FN returns true to stop early; so does
 * each_instance. */
static bool each_instance(const struct pool *p, bool (*fn)(struct instance *inst))
{
    for (size_t i = 0; i < p->nmodels; i++)
        for (size_t j = 0; j < p->models[i]->ninst; j++)
            if (fn(p->models[i]->inst[j]))
                return true;
    for (size_t i = 0; i < p->nretired; i++)
        for (size_t j = 0; j < p->retired[i]->ninst; j++)
            if (fn(p->retired[i]->inst[j]))
                return true;
    return false;
}

static bool has_process(struct instance *inst)
{
    return instance_has_process(inst);
}

bool pool_has_processes(const struct pool *p)
{
    return each_instance(p, has_process);
}

static void gc_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct pool *p = w->data;
    for (size_t i = 0; i < p->nmodels; i++)
        model_collect(p->models[i]);
    size_t keep = 0;
    for (size_t i = 0; i < p->nretired; i++) {
        struct pool_model *m = p->retired[i];
        model_collect(m);
        if (m->ninst == 0)
            model_free(m);
        else
            p->retired[keep++] = m;
    }
    p->nretired = keep;
    if (keep == 0 && p->nold_cfgs) {
        for (size_t i = 0; i < p->nold_cfgs; i++)
            config_free(p->old_cfgs[i]);
        p->nold_cfgs = 0;
        /* A config is thousands of small blocks (two strings and more per
         * model) spread over the heap among the new config's: free, they
         * are holes malloc keeps resident. Give their pages back. */
        malloc_trim(0);
    }
    if (p->shutting_down && !pool_has_processes(p) && p->on_stopped) {
        void (*done)(struct pool *, void *) = p->on_stopped;
        p->on_stopped = NULL;
        done(p, p->stopped_arg);
    }
}

/* ---------- lifecycle ---------- */

void pool_listen(struct pool *p, const struct pool_listener *l, void *arg)
{
    p->listener = l;
    p->listener_arg = l ? arg : NULL;
}

void pool_preload(struct pool *p)
{
    for (size_t i = 0; i < p->nmodels; i++) {
        struct pool_model *m = p->models[i];
        if (m->cfg->instances_min == 0 || model_active(m) >= m->cfg->instances_min)
            continue;
        char err[256];
        if (pool_model_start(m, m->cfg->instances_min, err, sizeof err) < 0)
            log_error("%s: cannot preload: %s", m->cfg->name, err);
    }
}

struct pool_model *pool_find_named(struct pool *p, const char *name)
{
    struct pool_model *m = pool_find(p, name);
    return m && strcmp(m->cfg->name, name) == 0 ? m : NULL;
}

void pool_preload_popular(struct pool *p)
{
    unsigned want = p->cfg->preload_popular;
    if (!want)
        return;
    size_t n;
    const struct usage_record **top = usage_ranked(p->usage, &n);
    if (!top && usage_size(p->usage)) {
        log_error("preload = popular %u: out of memory; nothing preloaded for it", want);
        return;
    }
    unsigned rank = 0;
    /* The N most used models still configured; one never asked for (only
     * loaded, by its MIN) is not used, and the ranking puts those last. */
    for (size_t i = 0; i < n && rank < want && top[i]->requests; i++) {
        struct pool_model *m = pool_find_named(p, top[i]->name);
        if (!m)
            continue;           /* removed from pool.conf: its record waits for it */
        rank++;
        unsigned long long requests = (unsigned long long)top[i]->requests;
        if (model_active(m) > 0) {
            log_debug("%s: running already (the #%u most used, %llu requests)", m->cfg->name, rank,
                      requests);
            continue;
        }
        char err[512];
        int rc = pool_model_start(m, 1, err, sizeof err);
        if (rc == -1)           /* not admitted: the others keep their place */
            log_info("%s: not preloaded (the #%u most used, %llu requests): %s", m->cfg->name, rank,
                     requests, err);
        else if (rc < 0)
            log_error("%s: cannot preload: %s", m->cfg->name, err);
        else
            log_info("%s: preloaded, the #%u most used model (%llu requests)", m->cfg->name, rank,
                     requests);
    }
    free(top);
    if (!rank)
        log_info("preload = popular %u: no configured model has been used yet; nothing to preload", want);
}

void pool_usage_save(struct pool *p)
{
    char msg[1024];
    if (usage_save(p->usage, ev_now(p->loop), msg, sizeof msg) < 0)
        log_warn("%s", msg);
}

static void usage_save_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    pool_usage_save(w->data);
}

/* The usage counts from state_dir (a warning when they cannot be kept
 * there: counting goes on in memory), and their save timer. */
static void usage_start(struct pool *p)
{
    char msg[1024];
    const char *dir = p->cfg->state_dir;
    if (!dir) {
        log_info("state_dir is empty: usage is counted in memory only");
    } else {
        switch (usage_open(p->usage, dir, ev_now(p->loop), msg, sizeof msg)) {
        case USAGE_OPEN_LOADED:
        case USAGE_OPEN_NEW:
            log_info("%s", msg);
            break;
        case USAGE_OPEN_SET_ASIDE:
        case USAGE_OPEN_MEMORY_ONLY:
            log_warn("%s", msg);
            break;
        }
    }
    ev_timer_init(&p->usage_save, usage_save_cb, USAGE_SAVE_INTERVAL_S, USAGE_SAVE_INTERVAL_S);
    p->usage_save.data = p;
    ev_timer_start(p->loop, &p->usage_save);
    ev_unref(p->loop);          /* the saver alone does not keep the loop running */
}

struct pool *pool_new(struct ev_loop *loop, struct config *cfg)
{
    struct pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->loop = loop;
    p->cfg = cfg;
    p->started_at = ev_now(loop);
    p->health = health_new(loop);
    p->events = events_new(loop);   /* none: the pool runs without it */
    p->models = calloc(cfg->nmodels ? cfg->nmodels : 1, sizeof *p->models);
    p->usage = usage_new();
    if (!p->health || !p->models || !p->usage)
        goto fail;
    port_pool_init(&p->ports, cfg->port_min, cfg->port_max);
    p->world = (struct instance_world){ .loop = loop, .health = p->health, .ports = &p->ports,
                                        .cfg = cfg, .ops = &pool_instance_ops, .arg = p };
    ev_timer_init(&p->gc, gc_cb, 0., 0.);
    p->gc.data = p;
    ev_prepare_init(&p->flush, flush_cb);
    p->flush.data = p;
    ev_prepare_start(loop, &p->flush);
    ev_unref(loop);             /* the flusher alone does not keep the loop running */
    for (size_t i = 0; i < cfg->nmodels; i++) {
        if (!(p->models[i] = model_new(p, &cfg->models[i])))
            goto fail;
        p->nmodels++;
    }
    if (cfg->log_dir && *cfg->log_dir && mkdir(cfg->log_dir, 0750) < 0 && errno != EEXIST)
        log_warn("cannot create log_dir %s: %s", cfg->log_dir, strerror(errno));
    usage_start(p);
    return p;
fail:
    pool_free(p);
    return NULL;
}

void pool_free(struct pool *p)
{
    if (!p)
        return;
    events_free(p->events);
    for (size_t i = 0; i < p->nmodels; i++)
        model_free(p->models[i]);
    for (size_t i = 0; i < p->nretired; i++)
        model_free(p->retired[i]);
    free(p->models);
    free(p->retired);
    if (p->loop) {
        ev_timer_stop(p->loop, &p->gc);
        if (ev_is_active(&p->flush)) {
            ev_ref(p->loop);
            ev_prepare_stop(p->loop, &p->flush);
        }
        if (ev_is_active(&p->usage_save)) {
            ev_ref(p->loop);
            ev_timer_stop(p->loop, &p->usage_save);
        }
    }
    usage_free(p->usage);
    health_free(p->health);
    for (size_t i = 0; i < p->nold_cfgs; i++)
        config_free(p->old_cfgs[i]);
    free(p->old_cfgs);
    config_free(p->cfg);
    free(p);
}

const struct memory_estimate *pool_model_estimate(struct pool_model *m)
{
    if (m->est_known)
        return m->est;
    if (!m->est && !(m->est = malloc(sizeof *m->est))) {
        /* Charged nothing this once; the next use tries again. */
        static const struct memory_estimate none;
        log_error("%s: out of memory for its memory estimate", m->cfg->name);
        return &none;
    }
    struct memory_estimate *e = m->est;
    char err[512];
    free(m->est_error);
    m->est_error = NULL;
    /* A child the pool places sees one GPU (CUDA_VISIBLE_DEVICES);
     * one whose args choose sees them all. */
    unsigned ndev = m->pool->ndev ? (m->gpu_fixed ? m->pool->ndev : 1) : 0;
    if (memory_estimate_devices(m->pool->cfg, m->cfg, ndev, e, err, sizeof err) < 0) {
        /* Unreadable header: charge the file size; measurement corrects it. */
        struct stat st;
        m->est_error = strdup(err);
        memset(e, 0, sizeof *e);
        if (stat(m->cfg->path, &st) == 0)
            e->weights = (uint64_t)st.st_size;
        /* On GPUs, unless its args keep it off them: the whole file and
         * a CUDA context on its (first) device, rather than nothing and
         * a child pushed onto the CPU. */
        struct memory_placement pl;
        char perr[256];
        if (ndev && memory_gpu_placement(m->pool->cfg, m->cfg, ndev, &pl, perr, sizeof perr) == 0 &&
            pl.ngl != 0 && pl.n_dev > 0 && pl.dev[0] < MEMORY_MAX_DEVICES) {
            e->vram[pl.dev[0]] = e->vram_total = e->weights + MEMORY_GPU_FIXED;
            e->ndev = pl.dev[0] + 1;
        }
        log_warn("%s: no memory estimate from its header (%s); charging its file size", m->cfg->name, err);
    }
    m->est_known = true;
    return e;
}

/* The index of CM's model among the pool's (CM from p->cfg), or SIZE_MAX. */
static size_t model_index(const struct pool *p, const struct config_model *cm)
{
    size_t at = (size_t)(cm - p->cfg->models);  /* models are made in config order */
    if (at < p->nmodels && p->models[at]->cfg == cm)
        return at;
    for (size_t i = 0; i < p->nmodels; i++)
        if (p->models[i]->cfg == cm)
            return i;
    return SIZE_MAX;
}

struct pool_model *pool_find(struct pool *p, const char *name)
{
    const struct config_model *cm = config_find_model(p->cfg, name);
    size_t i = cm ? model_index(p, cm) : SIZE_MAX;
    return i != SIZE_MAX ? p->models[i] : NULL;
}

/* KIND (a model-less event: the daemon closing or being replaced) to
 * every model's observers. */
static void notify_every_model(struct pool *p, enum pool_event_kind kind)
{
    struct pool_event ev = { .kind = kind };
    for (size_t i = 0; i < p->nmodels; i++) {
        ev.model = p->models[i];
        model_notify(p->models[i], &ev);
    }
}

static bool stop_one(struct instance *inst)
{
    instance_stop(inst);
    return false;
}

void pool_shutdown(struct pool *p, void (*on_stopped)(struct pool *p, void *arg), void *arg)
{
    p->shutting_down = true;
    /* Endless streams would hold their connections open until the last
     * moment: events, and logs -f. */
    events_end_all(p->events);
    notify_every_model(p, POOL_EV_CLOSING);
    p->on_stopped = on_stopped;
    p->stopped_arg = arg;
    each_instance(p, stop_one);
    gc_soon(p);
}

static bool kill_one(struct instance *inst)
{
    instance_kill(inst);
    return false;
}

void pool_kill_all(struct pool *p)
{
    each_instance(p, kill_one);
}

void pool_end_streams(struct pool *p)
{
    /* Told first, so that a subscriber knows to come back. */
    if (events_wanted(p->events))
        events_publish(p->events, "upgrade", json_pack("{s:s}", "from", LLAMA_POOL_VERSION));
    events_end_all(p->events);
    notify_every_model(p, POOL_EV_REPLACED);
}

struct instance *pool_model_adopt(struct pool_model *m, unsigned no, const struct instance_adoption *a)
{
    for (size_t i = 0; i < m->ninst; i++)
        if (m->inst[i]->no == no)
            return NULL;
    struct instance *inst = model_insert(m, no);
    if (inst)
        instance_adopt(inst, a);
    return inst;
}

/* ---------- reload ---------- */

static void model_rebind(struct pool_model *m, const struct config_model *cm)
{
    m->cfg = cm;
    m->est_known = false;           /* args, path or memory may have changed */
    m->np_hint = config_child_slots(m->pool->cfg, cm);
    m->gpu_fixed = config_child_gpus_fixed(m->pool->cfg, cm);
    for (size_t i = 0; i < m->ninst; i++)
        instance_rebind(m->inst[i], cm);
}

/* Stop the highest-numbered instances beyond the model's max. */
static void model_trim(struct pool_model *m)
{
    while (model_active(m) > m->cfg->instances_max) {
        struct instance *last = NULL;
        for (size_t j = 0; j < m->ninst; j++) {
            enum instance_state s = m->inst[j]->state;
            if ((s == INSTANCE_STARTING || s == INSTANCE_READY || s == INSTANCE_BACKOFF) &&
                (!last || m->inst[j]->no > last->no))
                last = m->inst[j];
        }
        instance_stop(last);
    }
}

/* Decide everything first, swap the model list in, and only then act:
 * stopping and restarting call back into the pool, which must by then see
 * a consistent list. */
void pool_reload(struct pool *p, struct config *cfg, json_t *summary)
{
    json_t *added = json_array(), *removed = json_array(), *changed = json_array();
    size_t unchanged = 0, n = cfg->nmodels;
    struct config *old = p->cfg;
    struct pool_model **models = calloc(n ? n : 1, sizeof *models);
    bool *restart = calloc(n ? n : 1, sizeof *restart);
    bool *kept = calloc(p->nmodels ? p->nmodels : 1, sizeof *kept);
    struct config **olds = realloc(p->old_cfgs, (p->nold_cfgs + 1) * sizeof *olds);
    if (olds)
        p->old_cfgs = olds;
    struct pool_model **retired = realloc(p->retired, (p->nretired + p->nmodels + 1) * sizeof *retired);
    if (retired)
        p->retired = retired;
    if (!models || !restart || !kept || !olds || !retired)
        goto oom;

    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const struct config_model *cm = &cfg->models[i];
        struct pool_model *m = NULL;
        const struct config_model *was = config_find_model(old, cm->name);  /* or an alias */
        size_t j = was && strcmp(was->name, cm->name) == 0 ? model_index(p, was) : SIZE_MAX;
        if (j != SIZE_MAX && !kept[j]) {
            m = p->models[j];
            kept[j] = true;
        }
        if (m) {
            restart[k] = !config_model_same_child(old, m->cfg, cfg, cm);
            if (restart[k])
                json_array_append_new(changed, util_json_string(cm->name));
            else
                unchanged++;
            model_rebind(m, cm);
            m->failed = false;
            model_forget_crashes(m);
            model_log_close(m);             /* log_dir may have moved */
        } else if ((m = model_new(p, cm))) {
            json_array_append_new(added, util_json_string(cm->name));
        } else {
            goto oom;
        }
        models[k++] = m;
    }

    /* Swap: from here on the pool is consistent with the new config. */
    p->cfg = cfg;
    p->world.cfg = cfg;
    p->old_cfgs[p->nold_cfgs++] = old;
    port_pool_set_range(&p->ports, cfg->port_min, cfg->port_max);
    struct pool_model **gone = p->models;
    size_t ngone = p->nmodels;
    p->models = models;
    p->nmodels = k;
    for (size_t i = 0; i < k; i++) {        /* default_args may have changed too */
        models[i]->np_hint = config_child_slots(cfg, models[i]->cfg);
        models[i]->gpu_fixed = config_child_gpus_fixed(cfg, models[i]->cfg);
    }
    if (cfg->log_dir && *cfg->log_dir && mkdir(cfg->log_dir, 0750) < 0 && errno != EEXIST)
        log_warn("cannot create log_dir %s: %s", cfg->log_dir, strerror(errno));

    for (size_t j = 0; j < ngone; j++) {
        if (kept[j])
            continue;
        struct pool_model *m = gone[j];
        json_array_append_new(removed, util_json_string(m->cfg->name));
        m->retired = true;
        p->retired[p->nretired++] = m;
        model_notify_gone(m);
        for (size_t i = 0; i < m->ninst; i++)
            instance_stop(m->inst[i]);
    }
    free(gone);
    for (size_t i = 0; i < p->nmodels; i++) {
        struct pool_model *m = p->models[i];
        if (restart[i])
            for (size_t j = 0; j < m->ninst; j++)
                if (instance_has_process(m->inst[j]) || m->inst[j]->state == INSTANCE_BACKOFF) {
                    metrics_count_eviction(&m->stats, METRICS_EVICT_RELOAD);
                    instance_restart(m->inst[j]);
                }
        model_trim(m);
    }
    free(restart);
    free(kept);

    pool_preload(p);
    gc_soon(p);
    json_object_set_new(summary, "added", added);
    json_object_set_new(summary, "removed", removed);
    json_object_set_new(summary, "changed", changed);
    json_object_set_new(summary, "unchanged", json_integer((json_int_t)unchanged));
    return;

oom:
    /* Nothing was swapped in yet: undo the rebinding, drop the new models. */
    for (size_t i = 0; models && i < n && models[i]; i++) {
        bool existing = false;
        for (size_t j = 0; j < p->nmodels; j++) {
            if (p->models[j] != models[i])
                continue;
            existing = true;
            for (size_t c = 0; c < old->nmodels; c++)
                if (strcmp(old->models[c].name, models[i]->cfg->name) == 0)
                    model_rebind(models[i], &old->models[c]);
        }
        if (!existing)
            model_free(models[i]);
    }
    free(models);
    free(restart);
    free(kept);
    json_decref(added);
    json_decref(removed);
    json_decref(changed);
    config_free(cfg);
    json_object_set_new(summary, "error", json_string("out of memory; the previous config is kept"));
}

/* ---------- observers ---------- */

void pool_observe(struct pool_model *m, struct pool_observer *obs)
{
    obs->model = m;
    obs->next = &m->observers;
    obs->prev = m->observers.prev;
    m->observers.prev->next = obs;
    m->observers.prev = obs;
}

void pool_unobserve(struct pool_observer *obs)
{
    if (!obs->next)
        return;
    obs->prev->next = obs->next;
    obs->next->prev = obs->prev;
    obs->next = obs->prev = NULL;
}

/* ---------- status ---------- */

const char *pool_model_error(const struct pool_model *m)
{
    if (m->failed)
        return m->last_error;
    for (size_t i = 0; i < m->ninst; i++)
        if (m->inst[i]->state == INSTANCE_FAILED)
            return m->inst[i]->last_error;
    return NULL;
}

uint64_t pool_cgroup_measured(const struct pool *p)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < p->nmodels; i++)
        for (size_t j = 0; j < p->models[i]->ninst; j++)
            if (p->models[i]->inst[j]->pid > 0)
                sum += p->models[i]->inst[j]->cgroup.current;
    return sum;
}

uint64_t pool_measured(const struct pool *p)
{
    uint64_t used = 0;
    for (size_t i = 0; i < p->nmodels; i++)
        for (size_t j = 0; j < p->models[i]->ninst; j++)
            used += p->models[i]->inst[j]->pss;
    return used;
}

uint64_t pool_budget(const struct pool *p, uint64_t *available)
{
    struct memory_info mi;
    if (memory_read_info(NULL, &mi) < 0) {
        if (available)
            *available = 0;
        return 0;
    }
    if (available)
        *available = mi.mem_available;
    return memory_budget(p->cfg, &mi);
}

void pool_summary(struct pool *p, char *buf, size_t len)
{
    size_t ready = 0, starting = 0;
    for (size_t i = 0; i < p->nmodels; i++) {
        ready += pool_model_count(p->models[i], INSTANCE_READY);
        starting += pool_model_count(p->models[i], INSTANCE_STARTING);
    }
    char used[32], budget[32];
    util_format_bytes(pool_measured(p), used, sizeof used);
    util_format_bytes(pool_budget(p, NULL), budget, sizeof budget);
    snprintf(len ? buf : NULL, len, "%zu instance%s ready, %zu starting, %s of %s",
             ready, ready == 1 ? "" : "s", starting, used, budget);
}
