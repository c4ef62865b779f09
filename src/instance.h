/* instance — one llama-server child: spawn, readiness, liveness, logs,
 * stop, crash and restart. Its whole life is one state machine, in
 * instance_step() in instance.c:
 *
 *   STOPPED  --start-->  STARTING  --/health 200-->  READY
 *   STARTING --exit: port taken--> STARTING (next port, not a crash)
 *   STARTING --exit / start_timeout--> BACKOFF, or FAILED when crash-looping
 *   READY    --exit, or /health failing 3 times--> BACKOFF (or FAILED)
 *   BACKOFF  --timer (1 s doubling to 60 s)--> STARTING
 *   STARTING/READY --stop--> STOPPING --exit--> STOPPED
 *   READY with requests in flight --stop--> STOPPING, draining: SIGTERM
 *     when the last ends (instance_drained) or at drain_timeout
 *   STOPPING --stop_timeout--> SIGKILL to the group (and cgroup.kill), still STOPPING
 *
 * With cgroups (world->cgroups enabled, see cgroup.h), each child runs in
 * a cgroup named after the instance, made before its spawn and removed
 * after its exit (retried while it is still populated); an exit by the OOM
 * killer is said so ("killed by the OOM killer at 612 MiB") wherever the
 * exit is told.
 *
 * The owner (the pool) supplies the configuration and is told about every
 * state change, log line and crash through struct instance_ops. Every
 * field below is written by instance.c alone; the others read them. */
#ifndef LLAMA_POOL_INSTANCE_H
#define LLAMA_POOL_INSTANCE_H

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "backoff.h"
#include "cgroup.h"
#include "logring.h"

struct health;
struct health_probe;
struct port_pool;
struct config;
struct config_model;

enum instance_state {
    INSTANCE_STOPPED,   /* no process */
    INSTANCE_STARTING,  /* process up, /health not yet 200 */
    INSTANCE_READY,     /* answering; liveness probed every health_interval */
    INSTANCE_STOPPING,  /* SIGTERM sent to the group; SIGKILL at stop_timeout */
    INSTANCE_BACKOFF,   /* crashed; restarts when the backoff timer fires */
    INSTANCE_FAILED,    /* gave up: crash loop, or cannot be started at all */
};

struct instance;

struct instance_ops {
    /* The state changed (from OLD to inst->state). */
    void (*changed)(struct instance *inst, enum instance_state old, void *arg);
    /* A line of the child's stdout/stderr (no newline). */
    void (*output)(struct instance *inst, const char *line, size_t len, void *arg);
    /* An event about this instance worth logging (also for the model log);
     * LEVEL is a log.h level. */
    void (*event)(struct instance *inst, int level, const char *msg, void *arg);
    /* The child crashed (or was restarted for failing health). Returns true
     * when the model is now crash-looping and the instance must not come back. */
    bool (*crashed)(struct instance *inst, void *arg);
    /* Something other than the state changed (slots learnt from /props). */
    void (*updated)(struct instance *inst, void *arg);
    /* Requests in flight on it now (a stop drains them first); the
     * instance does not count them, the owner's router does. */
    unsigned (*in_flight)(const struct instance *inst, void *arg);
    /* memory.max for its next child's cgroup, in bytes; 0: none ("max").
     * Asked at each spawn, only when cgroups are in use. */
    uint64_t (*memory_limit)(struct instance *inst, void *arg);
};

/* Why a STOPPING instance is stopping: asked to, or stopped by the state
 * machine itself (its exit is then a crash, with this as the reason). */
enum instance_stop_reason {
    INSTANCE_STOP_ASKED,          /* stop, restart, eviction, shutdown */
    INSTANCE_STOP_START_TIMEOUT,  /* no progress within start_timeout */
    INSTANCE_STOP_UNHEALTHY,      /* /health failed LIVENESS_FAILURES times */
};

/* What an instance needs from the daemon; shared by all instances. */
struct instance_world {
    struct ev_loop *loop;
    struct health *health;
    struct port_pool *ports;
    const struct config *cfg;     /* updated by the pool on reload */
    const struct cgroup_tree *cgroups;  /* NULL or not enabled: no cgroup per child */
    const struct instance_ops *ops;
    void *arg;
};

struct instance {
    char id[160];                 /* "tinyllama#1" */
    unsigned no;                  /* the 1 of #1 */
    const struct config_model *model;  /* instance_rebind() on reload */
    struct instance_world *world;
    void *owner;                  /* the pool's per-model data */

    enum instance_state state;
    pid_t pid;
    unsigned port;
    double spawned_at;            /* ev_now of the last spawn */
    double ready_at;
    double next_start_at;         /* when BACKOFF ends */
    unsigned restarts;            /* automatic restarts so far (↺) */
    unsigned port_retries;        /* consecutive "port taken" respawns */
    unsigned health_failures;     /* consecutive liveness failures */
    unsigned slots;               /* /props total_slots; 0 until known */
    int device;                   /* the GPU it is placed on (instance_place), -1: none */
    char visible[100];            /* its CUDA_VISIBLE_DEVICES: a GPU's UUID, "-1"
                                   * (no GPU), or "" (the daemon's own) */
    char *api_key;                /* the child's API key (ours, or the operator's
                                   * --api-key / LLAMA_API_KEY); kept from its
                                   * spawn until the next one. Sent by the proxy
                                   * and with /props; never in argv or logs */
    bool metrics;                 /* its child serves /metrics (config_child_metrics
                                   * at its spawn: a reload that changes
                                   * metrics_children reaches it at its next start) */
    uint64_t pss;                 /* bytes, measured */
    struct cgroup_child cgroup;   /* its child's cgroup; name "" when none */
    unsigned oom_kills;           /* exits by the OOM killer so far */
    int exit_status;              /* last wait status, -1 if none */
    char *last_error;             /* why it last failed, or NULL */
    bool restart_after_stop;      /* a restart was asked while stopping */
    enum instance_stop_reason stop_reason;  /* while STOPPING */
    bool draining;                /* STOPPING, no SIGTERM yet: in-flight requests end first */
    bool recheck;                 /* instance_check(): report the next /health 200 */
    bool answered;                /* the child has answered HTTP since spawn */
    struct backoff backoff;
    struct logring tail;          /* last lines of this child's output */

    /* I/O */
    int out_fd;
    ev_io out_w;
    ev_timer out_later;           /* reading resumes (a ready child's output is batched) */
    char linebuf[4096];
    size_t linelen;
    ev_child child_w;
    ev_timer deadline;            /* start_timeout / stop_timeout / backoff */
    ev_timer poll;                /* next /health probe */
    ev_timer cgroup_retry;        /* its cgroup is still populated: rmdir again */
    unsigned cgroup_retries;
    struct health_probe *probe;
    struct health_probe *props_probe;
    bool reprobe;                 /* a sign of progress arrived mid-probe */
};

struct instance *instance_new(struct instance_world *w, const struct config_model *m,
                              unsigned no, void *owner);
/* Free an instance that is STOPPED, BACKOFF or FAILED (no process). */
void instance_free(struct instance *inst);

void instance_start(struct instance *inst);   /* operator or on-demand start */
/* Graceful: a ready instance drains its in-flight requests (drain_timeout
 * at most), then SIGTERM, then SIGKILL after stop_timeout. */
void instance_stop(struct instance *inst);
void instance_restart(struct instance *inst);
/* A request's connection to it broke before any answer: probe /health
 * now; a 200 is reported through ops->updated, a failure takes the usual
 * way (restart after LIVENESS_FAILURES, or the exit is seen). */
void instance_check(struct instance *inst);
/* Its in-flight count (ops->in_flight) reached 0: a draining instance
 * gets its SIGTERM now. */
void instance_drained(struct instance *inst);
/* Measure its PSS now (/proc/PID/smaps_rollup) into inst->pss, and its
 * cgroup's memory.current into inst->cgroup.current; returns the PSS, 0
 * without a process. A failed read keeps the last value. */
uint64_t instance_measure(struct instance *inst);
/* Where its next spawn runs: on GPU DEVICE (-1: none) with
 * CUDA_VISIBLE_DEVICES=VISIBLE (NULL or "": left as the daemon's). */
void instance_place(struct instance *inst, int device, const char *visible);
/* Its model's config after a reload that kept it running (same child). */
void instance_rebind(struct instance *inst, const struct config_model *m);
/* A child the previous image of the daemon started (an upgrade): already
 * our child (same pid), loaded or loading, with its output pipe. */
struct instance_adoption {
    pid_t pid;
    unsigned port;
    int out_fd;                   /* -1: none */
    char *api_key;                /* taken */
    enum instance_state state;    /* STARTING, READY or STOPPING */
    double spawned_at, ready_at;
    unsigned restarts, slots;
    bool metrics;
    int device;
    const char *visible;
};
/* Take it over: INST (STOPPED, fresh from instance_new) becomes A->state
 * at once, its owner told as for any change; a ready one is probed now,
 * a starting one keeps what is left of start_timeout, a stopping one gets
 * stop_timeout more. */
void instance_adopt(struct instance *inst, const struct instance_adoption *a);
/* SIGKILL the group (and its cgroup) now (supervisor shutting down after
 * stop_timeout). */
void instance_kill(struct instance *inst);

bool instance_has_process(const struct instance *inst);
const char *instance_state_name(enum instance_state s);   /* public names */
/* "exited with status 1", "killed by signal 9 (Killed)" */
void instance_describe_status(int status, char *buf, size_t len);
/* How its last child ended: instance_describe_status, or "killed by the
 * OOM killer at 612 MiB (memory.max 600 MiB)" when its cgroup says so. */
void instance_describe_exit(const struct instance *inst, char *buf, size_t len);

#endif
