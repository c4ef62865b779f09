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
 * Policy:
 *   - A request goes to a ready instance of its model with a free slot
 *     (in_flight < slots), fewest in flight first, the earliest added on ties.
 *   - Otherwise it waits, first come first served per model, in one bounded
 *     queue for all models (max_queue: beyond it the request fails at once
 *     with 429 and Retry-After), for at most queue_timeout (then 504).
 *   - Hand-off: while a model's requests wait, every slot is taken, its
 *     requests are short (recent dispatch-to-done average <= 0.5 s) and no
 *     instance of it is starting, asked for or suspect, each ready instance
 *     takes requests beyond its slots, queued inside llama-server (about
 *     50 ms of its work, 1 to 4 per slot), so that no slot idles between
 *     one request's end and the next one's arrival.
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
 *
 * Memory (when limits.budget > 0):
 *   - Each instance is charged its estimate while starting, its measured
 *     memory (sched_instance_memory) once known. A model's estimate comes in
 *     two parts: `mem_more` for any instance, plus `mem_weights` only when no
 *     other live instance maps the same file (file_id): mmap'd weights are
 *     shared between instances of one file.
 *   - A start is allowed only if used + its estimate <= budget and its
 *     estimate <= the machine's available memory (sched_set_available).
 *   - If it does not fit, idle instances are stopped (SCHED_STOP, reason
 *     LRU) least recently used first until it would: idle = ready, nothing
 *     in flight, no request waiting for its model, not pinned, not one of the
 *     model's `instances_min`, and not fresh (an instance started for
 *     waiting requests first serves the requests that were waiting when it
 *     became ready). Recency is demand: the arrival of the model's latest
 *     request (a model that waited long for its load is not made young by
 *     serving late), then, among one model's instances, the one whose last
 *     request ended first. Stopping instances still count until removed; the
 *     start happens once enough memory is free. Nothing is ever started
 *     that would pass the budget.
 *   - If it can never fit (its estimate alone > budget), its requests fail
 *     at once with 503 and the numbers: needed, budget, in use, by whom.
 *   - Which waiting model starts next when memory frees: the one whose
 *     oldest waiting request is oldest (no thrash: A's batch is served, then
 *     B's, and nobody waits behind more than one swap in a row).
 *   - Idle: a ready instance with nothing in flight and nothing waiting for
 *     its model for idle_timeout seconds is stopped (reason IDLE) unless
 *     pinned or the model would go below instances_min. One WAKE covers
 *     queue timeouts and idle deadlines: the earliest of them. */
#ifndef LLAMA_POOL_SCHEDULER_H
#define LLAMA_POOL_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sched;

/* GPUs the scheduler places instances on (sched_devices_set). */
#define SCHED_MAX_DEVICES 16

/* Ids are the caller's: any value but 0. */
typedef uint64_t sched_req_t;
typedef uint64_t sched_inst_t;

/* Which idle instance goes first when room is needed (the candidates and
 * the safety rules are the same for both). */
enum sched_eviction {
    SCHED_EVICT_LRU,             /* its model asked least recently */
    SCHED_EVICT_COST,            /* GreedyDual-Size-Frequency: the lowest
                                  * H = clock + requests x reload cost / size,
                                  * the clock rising to each evicted H */
};

struct sched_limits {
    unsigned max_queue;          /* waiting requests, all models together */
    double queue_timeout;        /* seconds a request may wait; 0 = forever */
    uint64_t budget;             /* bytes the instances may use; 0 = no memory limit */
    enum sched_eviction eviction;
};

struct sched_model_info {
    unsigned instances_min, instances_max;
    unsigned slots_hint;         /* expected slots of a starting instance (-np, else 4) */
    unsigned http_conns;         /* requests an instance takes at once without one
                                  * waiting for an HTTP thread: the hand-off stays
                                  * within it (0 = no bound) */
    uint64_t mem_weights;        /* bytes of the file's weights (shared per file_id) */
    uint64_t mem_more;           /* bytes every instance adds: KV cache, buffers */
    uint64_t file_id;            /* instances of models with equal ids share weights; 0 = unique */
    bool pinned;                 /* never stopped for memory or idleness */
    int priority;                /* higher: stopped for memory after lower ones,
                                  * whatever their recency, and started first
                                  * when waiters compete for memory (a waiter
                                  * gains one level each SCHED_PRIORITY_AGE_S) */
    double idle_timeout;         /* seconds; 0 = never stopped for idleness */
    double affinity_wait;        /* seconds a request with a prompt waits for
                                  * the busy instance that holds it (see
                                  * sched_request_prefix); 0 = not at all */
    /* GPU memory of one instance, on one device (0 = CPU only; ignored
     * while no device is set). Instances of one file do not share it. */
    uint64_t vram;
    bool vram_fixed;             /* its args fix the device (vram_device); else
                                  * the scheduler places it (SCHED_START's device) */
    unsigned vram_device;
    /* Its args split it over devices: bytes on each (SCHED_MAX_DEVICES
     * entries, copied); vram and vram_fixed are then unused. NULL: not split. */
    const uint64_t *vram_split;
};

enum sched_stop_reason {
    SCHED_STOP_LRU,              /* make room for another start */
    SCHED_STOP_IDLE,             /* idle_timeout passed */
};

enum sched_action_kind {
    SCHED_DISPATCH,   /* send req to inst (the slot is now counted in flight) */
    SCHED_START,      /* start one more instance of model; the caller reports
                       * it with sched_instance_added() before the next event */
    SCHED_STOP,       /* stop inst for `reason`; it counts until sched_instance_removed */
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
    enum sched_stop_reason reason;   /* STOP */
    int affinity;                /* DISPATCH of a request with a prompt
                                  * (sched_request_prefix): 1 it went to the
                                  * instance that holds it, 0 it did not (none
                                  * known, or none with a free slot); -1: no prompt */
    int device;                  /* START: the device to put it on (the caller
                                  * reports it to sched_instance_added_on); -1:
                                  * none chosen (CPU only, fixed by its args,
                                  * or no devices) */
};

#define SCHED_PRIORITY_AGE_S 30.0

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

/* A request's prompt, for prefix affinity (affinity.h makes it): chained
 * hashes of its first N blocks, and the client's conversation name hashed
 * (0: none). The caller keeps it alive and unchanged until the request is
 * done or gone. */
struct sched_prefix {
    uint64_t session;
    unsigned n;
    const uint64_t *block;
};

/* ---- events ---- */
void sched_request(struct sched *s, double now, sched_req_t req, size_t model);
/* The same, with its prompt (NULL: none). It goes to an instance that
 * holds the longest known part of its prompt (the one its conversation
 * went to, else the one or two sent the longest leading part) if that has
 * a free slot. If that one is busy, the request waits for it up to the
 * model's affinity_wait, unless its prompt is short (4 blocks, 1 KiB) and
 * another instance is idle; then, or when none holds it, it goes as any
 * other (fewest in flight). Others behind a waiting one are served past it.
 * What is sent where is remembered in one table for all models
 * (SCHED_AFFINITY_ENTRIES of 32 bytes, 1 MiB, 4-way, least recently used
 * out, made on first use); an instance that stops, fails or restarts is
 * forgotten there. */
#define SCHED_AFFINITY_ENTRIES 32768
void sched_request_prefix(struct sched *s, double now, sched_req_t req, size_t model,
                          const struct sched_prefix *prefix);
/* A dispatched request finished (its slot is free again). */
void sched_request_done(struct sched *s, double now, sched_req_t req);
/* The client left: a waiting request leaves the queue at once; a dispatched
 * one is treated as done. Unknown ids are ignored. */
void sched_request_gone(struct sched *s, double now, sched_req_t req);

/* An instance exists (after SCHED_START, or one the operator started).
 * It starts in the "starting" state. */
void sched_instance_added(struct sched *s, double now, sched_inst_t inst, size_t model);
/* The same, placed on DEVICE (the START's, or the model's fixed one; -1:
 * none). Its VRAM is charged there from now on. */
void sched_instance_added_on(struct sched *s, double now, sched_inst_t inst, size_t model,
                             int device);
/* Ready to serve with SLOTS slots (0 = unknown yet: use the model's hint). */
void sched_instance_ready(struct sched *s, double now, sched_inst_t inst, unsigned slots);
/* Slot count learnt after ready (from /props). */
void sched_instance_slots(struct sched *s, double now, sched_inst_t inst, unsigned slots);
/* It closed or reset a dispatched request's connection before answering
 * (dead, or dying, and not yet known to be): not usable until the next
 * sched_instance_ready/slots/starting/failed about it, so that the
 * request, sent again, goes elsewhere. */
void sched_instance_suspect(struct sched *s, double now, sched_inst_t inst);
/* Starting again after a crash (backoff): not usable, but coming. */
void sched_instance_starting(struct sched *s, double now, sched_inst_t inst);
/* Failed to start or crashed; ERROR is its last error line. In-flight
 * requests on it are the caller's to fail (their connections broke). */
void sched_instance_failed(struct sched *s, double now, sched_inst_t inst, const char *error);
/* Being stopped by someone else (an operator, a reload, a failed health
 * check): no longer usable, but charged until sched_instance_removed(),
 * since its memory is only free once it has exited. A later
 * sched_instance_starting() (the stop became a restart) makes it usable.
 * An instance the scheduler stopped itself (SCHED_STOP) is stopping
 * already and stays as it is. */
void sched_instance_stopping(struct sched *s, double now, sched_inst_t inst);
/* Gone (exited): forget it and its charge. */
void sched_instance_removed(struct sched *s, double now, sched_inst_t inst);

/* Measured memory of an instance (PSS), replacing its estimate. */
void sched_instance_memory(struct sched *s, double now, sched_inst_t inst, uint64_t bytes);
/* The machine's available memory now (MemAvailable); 0 = unknown (no check). */
void sched_set_available(struct sched *s, double now, uint64_t bytes);

/* ---- GPUs ----
 * N devices (0 = none: host memory only, as without a GPU), each with the
 * bytes its instances may use. Rules, beside the host's:
 *   - An instance of a model with vram > 0 needs room on one device: its
 *     fixed one, else the device with the most free budget where it fits
 *     (its budget, and the device's free memory when known, counting the
 *     starts under way). One split over devices (vram_split) needs its
 *     share on each of them; room is made on each that is short, or none.
 *   - If none has room, idle instances on one device are stopped, least
 *     recently used first, with the host's rules (never busy, pinned, one
 *     of instances_min, or fresh; the oldest waiting model first): the
 *     device where the fewest stops free enough.
 *   - A device is charged each instance's vram while starting, and its
 *     measured use once higher (sched_instance_vram). Nothing starts that
 *     would pass a device's budget; a model whose vram exceeds every
 *     device's budget fails its requests with 503 and the numbers. */
void sched_devices_set(struct sched *s, double now, size_t n, const uint64_t *budgets);
/* A device's free memory as the driver reports it (other programs use
 * GPUs too); 0 = unknown. */
void sched_device_free(struct sched *s, double now, size_t dev, uint64_t bytes);
/* Measured VRAM of an instance on its device. */
void sched_instance_vram(struct sched *s, double now, sched_inst_t inst, uint64_t bytes);

/* Time passed: expire waiting requests past queue_timeout, stop instances
 * idle past idle_timeout. */
void sched_tick(struct sched *s, double now);

/* ---- actions ---- */
/* Take the next pending action; false when none. Actions come out in the
 * order the policy decided them. */
bool sched_next_action(struct sched *s, struct sched_action *out);

/* ---- starts asked by others (an operator, preloads, /pool/server) ---- */
/* Would N more instances of MODEL fit in the budget now, counted as the
 * scheduler counts its own starts (weights shared per file, starts under
 * way, the machine's available memory)? 0, or -1 with ERR saying why (the
 * numbers, in util_format_bytes units). With devices, one of them must have
 * room for one more (sched_place). Nothing is stopped to make room: which
 * model goes for an operator's start is the operator's call. */
int sched_admit(const struct sched *s, size_t model, unsigned n, char *err, size_t errlen);
/* The ready instance of MODEL that a caller who talks to it directly
 * should use: one with a free slot, fewest in flight (as dispatch picks);
 * else the least busy ready one. 0 when none is ready. */
sched_inst_t sched_pick_ready(const struct sched *s, size_t model);
/* The device one more instance of MODEL would go on now (for a start the
 * scheduler did not ask for: report it with sched_instance_added_on); -1
 * when it needs none, or none has room. */
int sched_place(const struct sched *s, size_t model);

/* ---- for status and metrics ---- */
/* Whether INST was added and not yet removed. */
bool sched_instance_known(const struct sched *s, sched_inst_t inst);
size_t sched_waiting(const struct sched *s);                 /* all models */
size_t sched_waiting_model(const struct sched *s, size_t model);
unsigned sched_in_flight(const struct sched *s, sched_inst_t inst);
double sched_last_used(const struct sched *s, sched_inst_t inst);  /* 0 = never */
uint64_t sched_charge(const struct sched *s, sched_inst_t inst);   /* bytes charged now */
uint64_t sched_used(const struct sched *s);                         /* all instances */
uint64_t sched_device_used(const struct sched *s, size_t dev);      /* charged on DEV */
#define SCHED_DEVICE_SPLIT (-2)
/* The device INST is charged on; SCHED_DEVICE_SPLIT: several (its model's
 * vram_split); -1: none. */
int sched_instance_device(const struct sched *s, sched_inst_t inst);
/* What INST is charged on device DEV (bytes). */
uint64_t sched_instance_vram_on(const struct sched *s, sched_inst_t inst, size_t dev);

#endif
