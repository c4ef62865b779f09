/* pool — the supervisor: every configured model and its instances.
 *
 * Owns the models (from the config), creates and frees their instances,
 * writes each model's log (file in log_dir + an in-memory tail), counts
 * crashes per model to spot crash loops, applies reloads (keeping instances
 * whose model did not change), preloads models with a minimum, and shuts
 * everything down in parallel. One listener (the router) hears of every
 * instance change first and answers the questions only it can (may these
 * start? how many requests are in flight?); interested parties (a CLI
 * waiting for a start, a `logs -f`, a /pool/server wait) subscribe to a
 * model's events as observers and hear them after it.
 *
 * The pool writes the fields of its own structs; the instances' fields are
 * instance.c's (the pool reads them), the counters in `stats` are written
 * through metrics_count_*(), and those in `usage` (counts kept across
 * restarts, in state_dir) through usage_count_*(), by whoever sees the
 * event: the pool counts loads, the router requests. The pool reads the
 * state file at startup, writes it every USAGE_SAVE_INTERVAL_S when it
 * changed, and preloads the most used models (preload = popular N). */
#ifndef LLAMA_POOL_POOL_H
#define LLAMA_POOL_POOL_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>

#include "backoff.h"
#include "cgroup.h"
#include "config.h"
#include "instance.h"
#include "logring.h"
#include "memory.h"
#include "metrics.h"
#include "port.h"
#include "usage.h"
#include "util.h"

struct events;
struct health;
struct pool;
struct pool_model;

enum pool_event_kind {
    POOL_EV_STATE,     /* an instance changed state */
    POOL_EV_LOG,       /* a line was added to the model's log */
    POOL_EV_GONE,      /* the model was removed by a reload */
    POOL_EV_REPLACED,  /* the daemon is about to be replaced (upgrade): an
                        * endless stream (logs -f) ends now */
    POOL_EV_CLOSING,   /* the daemon is shutting down: the same, for good */
};

struct pool_event {
    enum pool_event_kind kind;
    struct pool_model *model;
    struct instance *inst;          /* STATE; LOG when from a child */
    enum instance_state old;        /* STATE */
    const char *line;               /* LOG: formatted line, no newline */
};

/* The one listener (see the top). */
struct pool_listener {
    /* An instance changed state (from OLD), or learnt something else (OLD
     * is then its state: slots from /props, /health answering again). */
    void (*changed)(struct instance *inst, enum instance_state old, void *arg);
    /* May N more instances of M start (an operator's start, a preload)? 0,
     * or -1 with ERR filled. On-demand starts are the listener's own. */
    int (*admit)(struct pool_model *m, unsigned n, char *err, size_t errlen, void *arg);
    /* Requests in flight on INST now (a stop drains them first). */
    unsigned (*in_flight)(const struct instance *inst, void *arg);
    /* Where one more instance of M goes (an operator's start, a preload):
     * a GPU index with its CUDA_VISIBLE_DEVICES value in VISIBLE, or -1
     * (VISIBLE "": as the daemon's, or "-1": kept off the GPUs). */
    int (*place)(struct pool_model *m, char *visible, size_t len, void *arg);
};

/* Embedded in the observer's own struct: FN and ARG are the observer's to
 * set before pool_observe(); the rest is the pool's. An observer is
 * unlinked before it hears POOL_EV_GONE. */
struct pool_observer {
    struct pool_observer *prev, *next;
    void (*fn)(struct pool_observer *obs, const struct pool_event *ev);
    void *arg;
    struct pool_model *model;
};

/* Thousands of models may be configured and few run: what only a model
 * that ran needs (crash times, counters, its estimate, a log) is
 * allocated when it first does. */
struct pool_model {
    struct pool *pool;
    const struct config_model *cfg;
    struct instance **inst;
    size_t ninst;
    bool failed;                    /* crash loop: no restarts until start/reload */
    char *last_error;
    struct crash_log *crashes;      /* since the last start or reload; NULL: none */
    struct logring log;             /* allocated on first line */
    int log_fd;                     /* opened on first line, -1 otherwise */
    uint64_t log_size;              /* bytes in the file at log_fd */
    struct buf logbuf;              /* lines not yet written to log_fd */
    struct pool_model *next_dirty;  /* on pool->dirty while logbuf holds lines */
    bool dirty;
    struct pool_observer observers; /* list head */
    bool retired;                   /* removed by reload; freed once stopped */
    size_t index;                   /* the n-th model made since start, never reused:
                                     * a key for it that outlives reloads */
    struct model_stats stats;       /* counters for /metrics */
    struct memory_estimate *est;    /* valid when est_known (pool_model_estimate) */
    bool est_known;
    char *est_error;                /* why the estimate failed, or NULL */
    unsigned np_hint;               /* -np/--parallel in its args, else 4 */
    bool gpu_fixed;                 /* its args or env choose its GPUs (--device,
                                     * -ts, -sm, -mg, CUDA_VISIBLE_DEVICES) */
};

struct pool {
    struct ev_loop *loop;
    struct config *cfg;
    struct config **old_cfgs;       /* kept while retired models use them */
    size_t nold_cfgs;
    struct health *health;
    struct port_pool ports;
    struct instance_world world;
    struct pool_model **models;
    size_t nmodels;
    struct pool_model **retired;
    size_t nretired;
    ev_timer gc;                    /* frees stopped instances, outside callbacks */
    ev_prepare flush;               /* writes buffered log lines before the loop sleeps */
    struct pool_model *dirty;       /* models with buffered log lines */
    bool shutting_down;
    void (*on_stopped)(struct pool *p, void *arg);   /* shutdown finished */
    void *stopped_arg;
    const struct pool_listener *listener;   /* pool_listen() */
    void *listener_arg;
    size_t models_made;             /* the next pool_model's index */
    unsigned ndev;                  /* GPUs the estimates are made for (pool_set_devices) */
    double started_at;              /* the first image's start (kept by upgrades) */
    unsigned upgrades;              /* upgrades in place since then */
    struct pool_stats stats;        /* request durations for /metrics */
    struct events *events;          /* GET /pool/events; NULL when out of memory */
    struct usage *usage;            /* per-model counts kept across restarts */
    const struct cgroup_tree *cgroups;  /* pool_use_cgroups; NULL: never told */
    ev_timer usage_save;            /* writes them when they changed */
};

struct pool *pool_new(struct ev_loop *loop, struct config *cfg);
/* Set (or, with NULL, clear) the one listener. */
void pool_listen(struct pool *p, const struct pool_listener *l, void *arg);
/* Start the instances_min of every model, in config order (at startup,
 * once the router is listening to the pool; reload does it itself). */
void pool_preload(struct pool *p);
/* preload = popular N: one instance each of the N most used models
 * (usage.h's ranking) that are still configured, after pool_preload, at
 * startup: those already running are left alone, and one the listener
 * does not admit (it does not fit) is skipped with a line saying why. */
void pool_preload_popular(struct pool *p);
/* Write the usage counts now if they changed (at exit). */
void pool_usage_save(struct pool *p);
void pool_free(struct pool *p);

struct pool_model *pool_find(struct pool *p, const char *name_or_alias);
/* The model named NAME, aliases not counted (usage is kept by name). */
struct pool_model *pool_find_named(struct pool *p, const char *name);

/* Make sure at least N instances (1 when N is 0; at most the model's max)
 * are starting or ready. Clears a crash-loop failure. Returns 0; -1 when
 * the request is invalid (N above max, shutting down); -2 when an instance
 * could not be started at all (no llama-server binary…). ERR says why. */
int pool_model_start(struct pool_model *m, unsigned n, char *err, size_t errlen);
/* Start one more instance (on demand) on GPU DEVICE with CUDA_VISIBLE_DEVICES
 * VISIBLE (-1 and NULL: none, see instance_place); NULL when at max, the
 * model is failed (crash loop), or out of memory. */
struct instance *pool_model_add(struct pool_model *m, int device, const char *visible);
/* The daemon's cgroup tree (cgroup.h, kept by the caller while the pool
 * lives): when T is enabled, children get a cgroup each from the next
 * spawn on; either way status shows it. */
void pool_use_cgroups(struct pool *p, const struct cgroup_tree *t);
/* The machine has N GPUs (0: none): estimates are made again for them. */
void pool_set_devices(struct pool *p, unsigned n);
void pool_model_stop(struct pool_model *m);
void pool_model_restart(struct pool_model *m);

/* Apply a new config (already validated). Fills SUMMARY with what changed.
 * Takes ownership of CFG. */
void pool_reload(struct pool *p, struct config *cfg, json_t *summary);

/* Stop every instance in parallel; calls ON_STOPPED(P, ARG) when none is left. */
void pool_shutdown(struct pool *p, void (*on_stopped)(struct pool *p, void *arg), void *arg);
bool pool_has_processes(const struct pool *p);
/* SIGKILL every child now. */
void pool_kill_all(struct pool *p);
/* The daemon is about to be replaced by a new image of itself (upgrade):
 * end every endless stream (events, logs -f) properly. */
void pool_end_streams(struct pool *p);
/* Write every model's buffered log lines now (before an exec). */
void pool_flush_logs(struct pool *p);
/* Instance NO of M, a child of the previous image (an upgrade): see
 * instance_adopt(). NULL when M already has an instance NO, or out of memory. */
struct instance *pool_model_adopt(struct pool_model *m, unsigned no, const struct instance_adoption *a);

/* State of a model: failed by a crash loop, else the best of its
 * instances' (one ready makes it ready; one starting or waiting to
 * restart, starting), else stopped. */
enum pool_model_state {
    POOL_MODEL_STOPPED,     /* no instance, or only stopped ones */
    POOL_MODEL_STARTING,
    POOL_MODEL_READY,
    POOL_MODEL_STOPPING,
    POOL_MODEL_FAILED,
};
#define POOL_MODEL_STATES 5
enum pool_model_state pool_model_state(const struct pool_model *m);
/* As a word: stopped, starting, ready, stopping, failed. */
const char *pool_model_state_name(enum pool_model_state s);
size_t pool_model_count(const struct pool_model *m, enum instance_state s);

/* The memory budget now (pool.conf and the machine), and MemAvailable into
 * *AVAILABLE when not NULL; 0 when /proc/meminfo cannot be read. */
uint64_t pool_budget(const struct pool *p, uint64_t *available);
/* The instances' measured PSS, summed. */
uint64_t pool_measured(const struct pool *p);
/* Their cgroups' memory.current, summed (0 without cgroups). */
uint64_t pool_cgroup_measured(const struct pool *p);

/* The error that best says why M is not running: its crash-loop reason
 * when failed, else a failed instance's last error; NULL when none. */
const char *pool_model_error(const struct pool_model *m);
/* "3 instances ready, 1.2 GiB of 48 GiB" */
void pool_summary(struct pool *p, char *buf, size_t len);

/* The memory estimate of one instance of M, read from its GGUF header the
 * first time it is needed (not at startup: thousands of headers). */
const struct memory_estimate *pool_model_estimate(struct pool_model *m);

void pool_observe(struct pool_model *m, struct pool_observer *obs);
void pool_unobserve(struct pool_observer *obs);

#endif
