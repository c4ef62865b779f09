/* scheduler — every decision about requests and instances, and no I/O.
 *
 * It is told what happens (a request arrived, finished, or its client left;
 * an instance became ready, gained its slot count, failed or stopped; time
 * passed) and answers with actions (dispatch request R to instance I, start
 * an instance of model M, stop instance I, fail request R with a status and
 * message, wake me at time T). The event loop performs the actions and
 * feeds the results back. Time is given by the caller (seconds, any epoch),
 * so every policy is unit-tested with a fake clock and replayed in
 * benchmarks without processes.
 *
 * Policy (proxy issue):
 *   - A request goes to a ready instance of its model with a free slot
 *     (in_flight < slots), fewest in flight first, the earliest added on ties.
 *   - Otherwise it waits, first come first served per model, in one bounded
 *     queue for all models (max_queue: beyond it the request fails at once
 *     with 429 and Retry-After), for at most queue_timeout (then 504).
 *   - A waiting request for a model with no instance starting asks for one
 *     start; requests arriving meanwhile wait for that same start (one start,
 *     many waiters). While the waiting requests of a model outnumber the
 *     free and coming slots (slots of ready instances not in use, plus the
 *     expected slots of starting ones), and the model is below its max,
 *     another instance is started.
 *   - An instance that fails while starting fails every request waiting for
 *     its model, when no other instance of that model is ready or starting,
 *     with 502 and the instance's last error.
 *   - A failed model (crash loop) fails requests at once with 503.
 * The memory issue adds the budget to "may start" and eviction to actions. */
#ifndef LLAMA_POOL_SCHEDULER_H
#define LLAMA_POOL_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sched;

/* Ids are the caller's: any value but 0. */
typedef uint64_t sched_req_t;
typedef uint64_t sched_inst_t;

struct sched_limits {
    unsigned max_queue;          /* waiting requests, all models together */
    double queue_timeout;        /* seconds a request may wait; 0 = forever */
};

struct sched_model_info {
    unsigned instances_min, instances_max;
    unsigned slots_hint;         /* expected slots of a starting instance (-np, else 4) */
};

enum sched_action_kind {
    SCHED_DISPATCH,   /* send req to inst (the slot is now counted in flight) */
    SCHED_START,      /* start one more instance of model; the caller reports
                       * it with sched_instance_added() before the next event */
    SCHED_STOP,       /* stop inst (memory issue: eviction, idle) */
    SCHED_FAIL,       /* answer req with status and message; req is forgotten */
    SCHED_WAKE,       /* call sched_tick() at time `at` (replaces earlier WAKEs) */
};

struct sched_action {
    enum sched_action_kind kind;
    sched_req_t req;
    sched_inst_t inst;
    size_t model;                /* index given to sched_model_set() */
    int status;                  /* FAIL: 429, 502, 503, 504 */
    double retry_after;          /* FAIL 429/503: seconds, 0 = none */
    const char *message;         /* FAIL: valid until the next sched_* call */
    double at;                   /* WAKE */
};

struct sched *sched_new(const struct sched_limits *limits);
void sched_free(struct sched *s);
void sched_set_limits(struct sched *s, const struct sched_limits *limits);

/* Models are indexed 0..n-1 in config order; set them all after a (re)load.
 * Models beyond the new count are removed: their waiting requests fail (404). */
void sched_models_resize(struct sched *s, size_t n);
void sched_model_set(struct sched *s, size_t model, const char *name,
                     const struct sched_model_info *info);
/* The model is failed (crash loop, with REASON) or usable again (NULL). */
void sched_model_failed(struct sched *s, double now, size_t model, const char *reason);

/* ---- events ---- */
void sched_request(struct sched *s, double now, sched_req_t req, size_t model);
/* A dispatched request finished (its slot is free again). */
void sched_request_done(struct sched *s, double now, sched_req_t req);
/* The client left: a waiting request leaves the queue at once; a dispatched
 * one is treated as done. Unknown ids are ignored. */
void sched_request_gone(struct sched *s, double now, sched_req_t req);

/* An instance exists (after SCHED_START, or one the operator started).
 * It starts in the "starting" state. */
void sched_instance_added(struct sched *s, double now, sched_inst_t inst, size_t model);
/* Ready to serve with SLOTS slots (0 = unknown yet: use the model's hint). */
void sched_instance_ready(struct sched *s, double now, sched_inst_t inst, unsigned slots);
/* Slot count learnt after ready (from /props). */
void sched_instance_slots(struct sched *s, double now, sched_inst_t inst, unsigned slots);
/* Starting again after a crash (backoff): not usable, but coming. */
void sched_instance_starting(struct sched *s, double now, sched_inst_t inst);
/* Failed to start or crashed; ERROR is its last error line. In-flight
 * requests on it are the caller's to fail (their connections broke). */
void sched_instance_failed(struct sched *s, double now, sched_inst_t inst, const char *error);
/* Stopping or stopped: no longer usable; forget it once removed. */
void sched_instance_removed(struct sched *s, double now, sched_inst_t inst);

/* Time passed: expire waiting requests past queue_timeout. */
void sched_tick(struct sched *s, double now);

/* ---- actions ---- */
/* Take the next pending action; false when none. Actions come out in the
 * order the policy decided them. */
bool sched_next_action(struct sched *s, struct sched_action *out);

/* ---- for status and metrics ---- */
size_t sched_waiting(const struct sched *s);                 /* all models */
size_t sched_waiting_model(const struct sched *s, size_t model);
unsigned sched_in_flight(const struct sched *s, sched_inst_t inst);
double sched_last_used(const struct sched *s, sched_inst_t inst);  /* 0 = never */

#endif
