/* events — GET /pool/events: what happens in the pool, live, as
 * Server-Sent Events ("event: TYPE", "data: JSON", a blank line).
 *
 * Types: "instance" (an instance changed state), "evict" (the scheduler
 * stopped one: lru or idle), "request" (a request ended: model, instance,
 * status, times, tokens), "reload". A new subscriber first gets the last
 * EVENTS_RECENT requests, as "request" events, so that a page or `llama-pool
 * monit` has something to show at once; then ": ping" comments every
 * EVENTS_PING_S seconds keep proxies from closing a quiet stream.
 *
 * Nobody waits for a subscriber: what it has not read stays in its
 * connection's buffer, and one that lets EVENTS_MAX_BUFFERED pile up is
 * dropped (its stream cut, a warning logged). A request's record costs a
 * copy into a ring whether anyone listens or not; JSON is made only for
 * subscribers. */
#ifndef LLAMA_POOL_EVENTS_H
#define LLAMA_POOL_EVENTS_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "http.h"
#include "log.h"

#define EVENTS_RECENT 100
#define EVENTS_MAX_BUFFERED (512u << 10)
#define EVENTS_PING_S 15.0

struct events;

/* A request that ended. Numbers are -1 where unknown (not dispatched, no
 * timings in the answer). */
struct events_request {
    char time[LOG_STAMP_LEN + 1];   /* its end, as log lines are stamped (log_stamp) */
    char model[160];
    char instance[160];         /* "" when never dispatched */
    char method[8];
    char path[64];
    int status;                 /* 499: the client left */
    bool timeout;               /* cut at request_timeout (status: what the client got) */
    double duration;            /* arrival to the end of the answer, s */
    double queued;              /* arrival to dispatch, s */
    double first_byte;          /* dispatch to the instance's response head, s */
    long prompt_tokens;         /* all of the prompt: cached + processed */
    long cached_tokens;
    long generated_tokens;
    double tokens_per_s;        /* generated tokens a second of generation */
};

struct events *events_new(struct ev_loop *loop);
/* Cuts every stream (the daemon is going away) and frees. */
void events_free(struct events *ev);

/* Answers REQ with the event stream; it ends when the client leaves, the
 * pool shuts down (events_end_all) or it falls too far behind. */
void events_subscribe(struct events *ev, struct http_request *req);
/* Ends every stream properly (a shutdown begins). */
void events_end_all(struct events *ev);
/* Whether anyone listens (producers may skip building DATA). */
bool events_wanted(const struct events *ev);
/* Sends DATA (taken) as an event of TYPE to every subscriber. */
void events_publish(struct events *ev, const char *type, json_t *data);
/* Records a request that ended, and sends it. */
void events_request(struct events *ev, const struct events_request *r);
/* R as the JSON of its event (also for tests). */
json_t *events_request_json(const struct events_request *r);

#endif
