/* router — OpenAI requests to instances.
 *
 * The event-loop side of the scheduler: it tells the scheduler what happens
 * (a request for model M arrived, finished or was abandoned; an instance
 * started, became ready, failed, went away) and performs what the scheduler
 * decides (start an instance through the pool, relay a request through the
 * proxy, answer an error, arm the queue timer). */
#ifndef LLAMA_POOL_ROUTER_H
#define LLAMA_POOL_ROUTER_H

#include <ev.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>

#include "http.h"

struct pool;
struct pool_model;
struct router;

struct router *router_new(struct ev_loop *loop, struct pool *pool);
void router_free(struct router *r);
/* After pool_reload(): new models get scheduler slots, limits change. */
void router_reload(struct router *r);

/* Relay REQ to an instance of M (starting one, or queueing, as needed).
 * TARGET: the upstream request target, NULL for req->target. KEY (taken,
 * freed with the request; NULL: none): its prompt, for prefix affinity. */
struct affinity_key;
void router_forward(struct router *r, struct http_request *req, struct pool_model *m,
                    const char *target, struct affinity_key *key);
/* Fallback (config.h, struct config_fallback): a request for a configured
 * model that the scheduler answers 429 (queue full), 503 (can never fit
 * the budget, or the model is failed: a crash loop) or 502 (the start it
 * waited for failed) goes to the model's fallback instead, when it has one;
 * a 504 (queue_timeout) does not: its client has waited the whole timeout
 * already. Requests through /upstream/M/… never go (their path is this
 * pool's). The request goes as received, prefix + target, body as is, the
 * client's keys replaced by fallback_key; the answer is relayed as it
 * comes (streams too) with "X-Llama-Pool-Served-By: fallback". A fallback
 * that does not answer: 502 naming it and why the request was not served
 * here. One log line per use; llama_pool_fallback_total counts them. */

/* A request for NAME, a model not configured here: to [pool]'s fallback
 * (the caller checked fallback_unknown and that there is one). */
void router_fallback_unknown(struct router *r, struct http_request *req, const char *name);

/* GET /pool/server?model=M: make sure M runs, answer {"model","port","url",
 * "api_key","instance"}: url goes through the pool (/upstream/M), api_key
 * is the child's own, for code that talks to the port directly. */
void router_server(struct router *r, struct http_request *req, struct pool_model *m);

/* The daemon is stopping: queued requests, and any that arrive from now
 * on, are answered 503 with Retry-After (seconds); dispatched ones finish
 * while their instances drain. */
void router_shutdown(struct router *r, double retry_after);

/* ---- for status and metrics: what the scheduler knows ---- */
size_t router_waiting(const struct router *r);
size_t router_waiting_model(const struct router *r, const struct pool_model *m);

struct instance;
#define ROUTER_DEVICE_SPLIT (-2)
struct router_inst_view {
    uint64_t charge;        /* bytes charged against the budget now */
    unsigned in_flight;     /* requests being answered by it */
    double last_used;       /* ev_now of its last dispatch or request end, else
                             * of its ready; 0 when neither */
    int device;             /* the GPU it is charged on, -1: none,
                             * ROUTER_DEVICE_SPLIT: several (its args split it) */
    uint64_t vram;          /* its measured GPU memory (all devices), 0: none seen */
    unsigned devices;       /* bit D: charged on device D */
};
void router_instance_view(const struct router *r, const struct instance *inst,
                          struct router_inst_view *v);
uint64_t router_used(const struct router *r);     /* bytes charged, all instances */

/* GPUs in use (0: host memory only) and what is known of device D; at
 * most ROUTER_MAX_DEVICES are placed on (the scheduler's limit). */
#define ROUTER_MAX_DEVICES 16
struct gpu_device;
struct router_dev_view {
    const struct gpu_device *gpu;   /* index, name, uuid, total, free, lost */
    uint64_t budget;        /* for our instances (0 when lost) */
    uint64_t used;          /* charged by the scheduler */
    uint64_t measured;      /* what our instances hold there, by NVML */
};
size_t router_devices(const struct router *r);
bool router_device_view(const struct router *r, size_t d, struct router_dev_view *v);

#endif
