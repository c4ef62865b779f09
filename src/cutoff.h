/* cutoff — the pure pieces of request_timeout, a generation's time limit.
 *
 * llama-server's own t_max_predict_ms is not a time limit: it stops a
 * generation only when a token with a newline comes after the limit
 * (tools/server/server-context.cpp, b9749), so a model that writes no
 * newline runs on. The pool therefore cuts a generation itself:
 *
 *  - A stream the client asked for is relayed whole event by whole event;
 *    at the limit the proxy adds a last event shaped like the endpoint's
 *    own (cutoff_final_event), "[DONE]" where the endpoint sends one, and
 *    closes the upstream connection (llama-server cancels the task).
 *  - A plain request is sent upstream as a stream (cutoff_body_rewrite)
 *    and its events are put back together (struct cutoff_plain) into the
 *    JSON the endpoint answers a plain request with; at the limit, with
 *    the text so far and finish_reason "length".
 *
 * Nothing here does I/O or reads a clock. */
#ifndef LLAMA_POOL_CUTOFF_H
#define LLAMA_POOL_CUTOFF_H

#include <stdbool.h>
#include <stddef.h>

#include "util.h"

/* The generation endpoints, by the shape of their answers. */
enum cutoff_api {
    CUTOFF_NONE,        /* not a generation: no limit applies */
    CUTOFF_CHAT,        /* /v1/chat/completions, /chat/completions */
    CUTOFF_OAI_CMPL,    /* /v1/completions: OpenAI's text_completion */
    CUTOFF_NATIVE,      /* /completion, /completions, /infill: llama.cpp's own */
};

/* The endpoint PATH (no query) names, CUTOFF_NONE for any other. */
enum cutoff_api cutoff_api_of(const char *path);

/* ---- the request ---- */

/* What the request body asks, as far as the limit cares. */
struct cutoff_request {
    bool object;        /* the body is a JSON object (else: sent as is) */
    bool stream;        /* "stream": true */
    bool has_tmax;      /* it sets t_max_predict_ms itself */
    bool gatherable;    /* plain, and asks nothing a stream cannot give back
                         * whole (logprobs, n_probs, n > 1, return_tokens,
                         * response_fields, post_sampling_probs) */
};
void cutoff_request_read(const char *body, size_t len, struct cutoff_request *out);

/* BODY with members added at its end (the last of a duplicate name is the
 * one llama-server takes): t_max_predict_ms = TMAX_MS when TMAX_MS > 0;
 * when GATHER, "stream":true, "timings_per_token":true (every event then
 * says how many tokens so far) and, for chat, stream_options.include_usage.
 * Malloc'd into *OUT (NUL-terminated, length *OUTLEN); false when BODY is
 * not an object or out of memory. */
bool cutoff_body_rewrite(const char *body, size_t len, enum cutoff_api api, long long tmax_ms,
                         bool gather, char **out, size_t *outlen);

/* ---- JSON as text: values found without parsing (their bytes are kept) ---- */

/* The value of member KEY of the object at S (LEN bytes, whitespace around
 * allowed): *V and *VLEN; false when S is not an object or has no KEY. */
bool cutoff_json_member(const char *s, size_t len, const char *key, const char **v, size_t *vlen);
/* Element I of the array at S. */
bool cutoff_json_element(const char *s, size_t len, size_t i, const char **v, size_t *vlen);

/* ---- server-sent events ---- */

/* The first complete event in P[0..N): true with *EVLEN its length
 * (blank line included) and *DATA, *DLEN its first "data:" line's value
 * (NULL, 0 when it has none: a comment such as ":" pings); false when P
 * holds no complete event yet. */
bool cutoff_sse_take(const char *p, size_t n, size_t *evlen, const char **data, size_t *dlen);

/* ---- what the client gets at the limit ---- */

/* What the events so far say of the answer: its id, created, model and
 * system_fingerprint (chat, text_completion), or id_slot,
 * tokens_evaluated, tokens_predicted and model (native). */
struct cutoff_seen {
    struct buf last;    /* the last data object seen, as sent */
};

/* Remembers DATA (an event's data) when it is a JSON object. False when
 * out of memory. */
bool cutoff_seen_note(struct cutoff_seen *s, const char *data, size_t len);
void cutoff_seen_free(struct cutoff_seen *s);

/* The events that end a stream of API at the limit, appended to OUT:
 * chat: a chat.completion.chunk with delta {} and finish_reason "length",
 * then "data: [DONE]"; text_completion: a chunk with text "" and
 * finish_reason "length", then "[DONE]"; native: the last object with
 * "stop":true and "stop_type":"limit" (native streams have no [DONE]).
 * id, created, model and system_fingerprint come from SEEN, else are
 * made here (MODEL, NOW, a fresh id). False when out of memory. */
bool cutoff_final_events(struct buf *out, enum cutoff_api api, const struct cutoff_seen *seen,
                         const char *model, long long now);

/* ---- a plain answer from a stream ---- */

struct cutoff_plain {
    enum cutoff_api api;
    struct buf content;         /* the text's pieces as JSON string bodies (escaped) */
    struct buf reasoning;       /* chat: reasoning_content, the same way */
    void *tool_calls;           /* chat: json_t array merged from the deltas; NULL: none */
    struct cutoff_seen seen;    /* the last event */
    struct buf final;           /* the event with finish_reason (or "stop":true) */
    struct buf usage;           /* the last "usage" value seen */
    struct buf timings;         /* the last "timings" value seen */
    struct buf error;           /* an error event's data: the answer is that error */
    int error_code;
    bool done;                  /* the final event came */
};

void cutoff_plain_init(struct cutoff_plain *pl, enum cutoff_api api);
void cutoff_plain_free(struct cutoff_plain *pl);
/* One event's data ("[DONE]" and non-JSON data are ignored). False when
 * out of memory. */
bool cutoff_plain_feed(struct cutoff_plain *pl, const char *data, size_t len);
/* The answer, into OUT (cleared first), with *STATUS: 200 and the JSON a
 * plain request gets; when CUT, or the stream never said how it ended, with
 * the text so far and finish_reason "length" (native: "stop_type":"limit").
 * An error event in the stream: that error and its code. MODEL and NOW as
 * for cutoff_final_events. False when out of memory. */
bool cutoff_plain_answer(struct cutoff_plain *pl, bool cut, const char *model, long long now,
                         struct buf *out, int *status);

#endif
