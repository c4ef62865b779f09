/* proxy — relay one client request to a llama-server instance and its
 * answer back, as it arrives.
 *
 * Keeps idle keep-alive connections to each instance port and reuses them.
 * Forwards method, target, headers (hop-by-hop ones dropped, Host
 * rewritten, Content-Length set) and body; relays status, headers and body
 * piece by piece (each upstream body piece becomes one chunk to the client
 * at once: every SSE event leaves without waiting for more), with
 * back-pressure both ways: a slow client pauses reads from upstream.
 * A client that leaves closes the upstream connection at once, so
 * llama-server cancels the generation. */
#ifndef LLAMA_POOL_PROXY_H
#define LLAMA_POOL_PROXY_H

#include <ev.h>
#include <stdbool.h>
#include <sys/socket.h>

#include "cutoff.h"
#include "http.h"

struct proxy;
struct proxy_call;

enum proxy_outcome {
    PROXY_OK,             /* the whole response was relayed */
    PROXY_UPSTREAM_ERROR, /* connect failed or upstream broke before the
                           * status line: the client got 502 JSON */
    PROXY_UPSTREAM_CUT,   /* upstream broke mid-response: the client got an
                           * SSE error event (streams) or a cut response */
    PROXY_CLIENT_GONE,    /* the client left; upstream closed */
    PROXY_UPSTREAM_UNANSWERED, /* with proxy_hand_back_unanswered() only: connect
                           * failed, or upstream closed or reset before any
                           * response byte; the client got NOTHING and its
                           * request is the caller's again (to retry or answer) */
    PROXY_TIMEOUT,        /* proxy_forward_limited: its time limit passed; the
                           * upstream connection was closed (llama-server
                           * cancels the task) and the client got the answer
                           * so far (struct proxy_limit), or 504 when the
                           * upstream had not begun to answer */
};

/* How a call ended, for its DONE. */
struct proxy_result {
    enum proxy_outcome outcome;
    int status;                  /* the upstream's HTTP status, 0 if none arrived */
    double first_byte;           /* seconds from proxy_forward() to the upstream's
                                  * response head, -1 if none arrived */
    /* The answer's timings (timings.h), -1 where none was seen: prompt
     * tokens from the KV cache and processed, tokens generated, and the
     * milliseconds of each part. */
    long cache_n, prompt_n, predicted_n;
    double prompt_ms, predicted_ms;
    const char *error;           /* UPSTREAM_ERROR, _CUT, _UNANSWERED: what went
                                  * wrong, valid during DONE; else NULL */
};

/* Called once per call, after the client's response has ended (or the
 * client is gone). The call is freed after it returns. */
typedef void (*proxy_done_fn)(void *arg, const struct proxy_result *res);

struct proxy *proxy_new(struct ev_loop *loop);
void proxy_free(struct proxy *p);

/* Relay REQ to 127.0.0.1:PORT. TARGET is the request target to send
 * upstream (NULL: req->target as received). The proxy takes over req's
 * on_close/on_drain until DONE is called. Never fails synchronously: a
 * connection error answers 502 and calls DONE (possibly before returning). */
struct proxy_call *proxy_forward(struct proxy *p, struct http_request *req, unsigned port,
                                 const char *target, proxy_done_fn done, void *arg);
/* The same for a child that requires API key KEY (NULL: as proxy_forward):
 * the upstream request carries "Authorization: Bearer KEY", and the
 * client's own Authorization and X-Api-Key (the pool's key) are dropped. */
struct proxy_call *proxy_forward_key(struct proxy *p, struct http_request *req, unsigned port,
                                     const char *key, const char *target,
                                     proxy_done_fn done, void *arg);

/* A generation's time limit (request_timeout; cutoff.h). The caller's
 * strings and body stay alive until DONE. */
struct proxy_limit {
    double seconds;       /* from proxy_forward_limited (> 0) */
    enum cutoff_api api;  /* the endpoint: the shape of the last chunk */
    bool gather;          /* the client asked a plain answer, BODY asks the
                           * upstream for a stream: its events are put back
                           * together into the plain answer (at the limit,
                           * with the text so far and finish_reason "length") */
    const char *body;     /* sent in place of the request's body; NULL: its own */
    size_t body_len;
    const char *model;    /* the model's name, for an answer that must make one up */
};

/* proxy_forward_key with LIMIT: a stream is relayed whole events at a
 * time, and at LIMIT->seconds it ends with a last chunk of the endpoint's
 * shape with finish_reason "length" (native: "stop_type":"limit") and
 * "data: [DONE]" where the endpoint sends it; a gathered plain answer ends
 * with the text so far. Before the upstream's response head: 504. The
 * result's outcome is then PROXY_TIMEOUT. LIMIT NULL: no limit, as
 * proxy_forward_key. */
struct proxy_call *proxy_forward_limited(struct proxy *p, struct http_request *req, unsigned port,
                                         const char *key, const char *target,
                                         const struct proxy_limit *limit,
                                         proxy_done_fn done, void *arg);

/* An upstream other than a local child: another server, such as a
 * fallback (config.h, struct config_fallback). */
struct proxy_upstream {
    const struct sockaddr *addr;  /* where to connect */
    socklen_t addrlen;
    const char *host;             /* the Host header to send: "HOST:PORT" */
    const char *key;              /* "Authorization: Bearer KEY"; NULL: none */
    const char *served_by;        /* the value of X-Llama-Pool-Served-By added to
                                   * the client's answer (any the upstream sent is
                                   * dropped); NULL: none added */
};
/* Relay REQ to UP as proxy_forward_key does to a child, with TARGET as
 * given. The client's Authorization and X-Api-Key are dropped always (they
 * are the pool's keys, for the pool alone); UP's key goes in their place.
 * Idle connections are kept per address as per port. Outcomes and DONE as
 * proxy_forward's; PROXY_UPSTREAM_UNANSWERED only with
 * proxy_hand_back_unanswered, and then res->error says why. */
struct proxy_call *proxy_forward_to(struct proxy *p, struct http_request *req,
                                    const struct proxy_upstream *up, const char *target,
                                    proxy_done_fn done, void *arg);

/* ON: a call whose upstream fails before sending a byte of its answer
 * (the child was stopping or died as the request went out) does not answer
 * 502 but ends with PROXY_UPSTREAM_UNANSWERED, so that the caller can send
 * the request to another instance. Off by default. */
void proxy_hand_back_unanswered(struct proxy *p, bool on);

/* Close idle connections to PORT (the instance is going away). */
void proxy_forget_port(struct proxy *p, unsigned port);

#endif
