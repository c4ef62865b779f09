/* metrics — GET /metrics in Prometheus text format (names llama_pool_*).
 *
 * The counters live where their subject lives (struct model_stats in each
 * pool model, struct pool_stats in the pool) and are written only through
 * the metrics_count_*() and metrics_observe() functions below, by whoever
 * sees the event (the pool: starts, loads, crashes, reloads; the router:
 * requests, queue waits, evictions). metrics_render() reads them, and the
 * gauges from the pool and the router, at scrape time. */
#ifndef LLAMA_POOL_METRICS_H
#define LLAMA_POOL_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define METRICS_STATUS_SLOTS 12
#define METRICS_BUCKETS 13
#define METRICS_FALLBACK_REASONS 4    /* enum metrics_fallback */

/* Per model: the counters, allocated at the first count, so that each of
 * thousands of models that never ran costs a pointer (read as zeros). */
struct model_counts {
    uint64_t starts;              /* spawns, on demand, by an operator or after a crash */
    uint64_t loads;               /* starts that became ready */
    double load_seconds;          /* sum of spawn → ready */
    uint64_t crashes;             /* evictions with reason "crash" */
    uint64_t reload_stops;        /* evictions with reason "reload" */
    uint64_t lru_stops;           /* evictions with reason "lru" */
    uint64_t idle_stops;          /* evictions with reason "idle" */
    uint64_t affinity_hits;       /* requests with a prompt sent where it is held */
    uint64_t affinity_misses;     /* ... and sent elsewhere (none known, or busy) */
    uint64_t prompt_cached;       /* prompt tokens its answers took from the KV cache */
    uint64_t prompt_processed;    /* ... and processed (timings.cache_n, prompt_n) */
    uint64_t child_scrapes_failed;/* its children skipped by a /metrics scrape
                                   * (metrics_children: slow, failed, not 200) */
    uint64_t queue_waits;         /* requests that were dispatched */
    double queue_wait_seconds;    /* their time from arrival to dispatch */
    struct { int code; uint64_t n; } status[METRICS_STATUS_SLOTS];  /* answers by status */
    uint64_t timeouts;            /* requests cut at request_timeout */
    uint64_t fallbacks[METRICS_FALLBACK_REASONS];                 /* requests sent to the fallback, by enum metrics_fallback */
};

struct model_stats {
    struct model_counts *c;       /* NULL until the first count */
};

/* A histogram of seconds on metrics_bucket_le. */
struct metrics_hist {
    uint64_t bucket[METRICS_BUCKETS];   /* cumulative at render time, raw here */
    double sum;
    uint64_t count;
};

/* Pool-wide request timings. */
struct pool_stats {
    struct metrics_hist duration;       /* arrival → end of the answer */
    struct metrics_hist first_byte;     /* dispatch → the instance's response head */
    uint64_t fallback_unknown;          /* requests for a model not configured here,
                                         * sent to the fallback (fallback_unknown) */
};

extern const double metrics_bucket_le[METRICS_BUCKETS];

/* Why an instance stopped other than by an operator (evictions_total). */
enum metrics_eviction {
    METRICS_EVICT_LRU,
    METRICS_EVICT_IDLE,
    METRICS_EVICT_RELOAD,
    METRICS_EVICT_CRASH,
};

/* Why a request went to the fallback (llama_pool_fallback_total's reason). */
enum metrics_fallback {
    METRICS_FALLBACK_NEVER_FITS,   /* its memory is more than the budget (503) */
    METRICS_FALLBACK_QUEUE_FULL,   /* max_queue waiting already (429) */
    METRICS_FALLBACK_FAILED,       /* the model is failed: a crash loop (503) */
    METRICS_FALLBACK_START_FAILED, /* the start it waited for failed (502) */
};
/* The reason's label value: "never_fits", "queue_full", "failed", "start_failed". */
const char *metrics_fallback_name(enum metrics_fallback why);

/* A count that finds no memory for the model's counters is lost (and
 * only that one: the next tries again). */
void metrics_count_status(struct model_stats *s, int code);
/* A request cut at request_timeout: requests_total's status "timeout" (its
 * own outcome, not counted under the status the client got). */
void metrics_count_timeout(struct model_stats *s);
void metrics_count_start(struct model_stats *s);
void metrics_count_load(struct model_stats *s, double seconds);
void metrics_count_eviction(struct model_stats *s, enum metrics_eviction why);
void metrics_count_queue_wait(struct model_stats *s, double seconds);
void metrics_count_affinity(struct model_stats *s, bool hit);
void metrics_count_prompt(struct model_stats *s, uint64_t cached, uint64_t processed);
void metrics_count_child_scrape_failed(struct model_stats *s);
void metrics_count_fallback(struct model_stats *s, enum metrics_fallback why);
void metrics_count_fallback_unknown(struct pool_stats *s);
void metrics_observe(struct metrics_hist *h, double seconds);
void metrics_stats_free(struct model_stats *s);

struct pool;
struct router;
/* Render every metric of the pool's own (the children's are
 * child_metrics.h's); returns a malloc'd NUL-terminated text, *len set. */
char *metrics_render(struct pool *p, const struct router *r, size_t *len);

#endif
