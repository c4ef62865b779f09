/* http — HTTP/1.1 server on libev + llhttp.
 *
 * One module owns client connections: accepting (TCP or UNIX socket),
 * parsing with llhttp (Content-Length and chunked bodies), limits
 * (header bytes → 431, body bytes → 413, slow headers → 408, idle
 * keep-alive, open connections), keep-alive and pipelining (requests on one
 * connection are handed to the handler one at a time and answered in order),
 * and writing responses, whole or streamed, with bounded buffering.
 *
 * The handler is called once per complete request (body read in full). It
 * must eventually answer with http_respond*() or http_stream_begin() …
 * http_stream_end(), now or later from another event; until then the
 * connection reads no further requests. If the client goes away first,
 * the request's on_close callback fires and the request must not be used
 * after it returns. */
#ifndef LLAMA_POOL_HTTP_H
#define LLAMA_POOL_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <ev.h>

struct http_server;
struct http_conn;

struct http_limits {
    uint64_t max_header;          /* bytes of request line + headers; 431 past it */
    uint64_t max_body;            /* bytes of body; 413 past it */
    int64_t header_timeout_ms;    /* time to receive a full header block; 408 */
    int64_t body_timeout_ms;      /* time to receive the whole body after the headers;
                                   * 408 (0: only a stall of header_timeout_ms is one) */
    int64_t keepalive_timeout_ms; /* idle time between requests before close */
    unsigned max_connections;     /* past it, the oldest connection that has shown no
                                   * key makes room; with none, accepts wait */
};

struct http_header {
    char *name;   /* as received */
    char *value;
};

struct http_request {
    struct http_conn *conn;
    const char *method;       /* "GET", "POST", … */
    char *target;             /* raw request target: "/v1/models?x=1" */
    char *path;               /* target up to '?', not decoded */
    char *query;              /* after '?', or "" */
    struct http_header *headers;
    size_t nheaders;
    char *body;               /* NUL-terminated for convenience; may be NULL when empty */
    size_t body_len;
    int http_minor;           /* 1.0 or 1.1 */
    bool keep_alive;          /* client wants the connection kept */
    bool is_unix;             /* arrived over the UNIX control socket */
    bool cors;                /* echo its Origin header in Access-Control-Allow-Origin
                               * (the admission hook's verdict) */
    char peer[64];            /* "127.0.0.1:54321" or "unix" */
    double started;           /* ev_now() when the request line arrived */

    /* Set with http_request_watch(): called if the client disconnects (or
     * the connection is torn down) before the response has ended. */
    void (*on_close)(struct http_request *req, void *arg);
    /* Set with http_request_watch(): called when buffered output drops
     * below the low-water mark after http_stream_write reported
     * back-pressure. */
    void (*on_drain)(struct http_request *req, void *arg);
    void *arg;
};

/* Whoever answers REQ from now on: ON_CLOSE and ON_DRAIN (either may be
 * NULL) with ARG. Replaces what was set before. */
void http_request_watch(struct http_request *req,
                        void (*on_close)(struct http_request *req, void *arg),
                        void (*on_drain)(struct http_request *req, void *arg), void *arg);
/* Nobody is called any more (the answer is being handed on, or is done). */
void http_request_unwatch(struct http_request *req);

typedef void (*http_handler_fn)(struct http_request *req, void *arg);

/* What an admission hook decided besides its status (all false/NULL
 * when it is called). */
struct http_admission {
    bool trusted;             /* showed a valid key: from then on its connection
                               * is never the one closed to make room at
                               * max_connections */
    bool cors;                /* its Origin may read the answer (req->cors) */
    const char *msg;          /* with a refusal: a static message */
};

/* Admission, called once a request's header block is in and before any
 * byte of its body is read (the body is not there yet: body is NULL).
 * Return 0 to read the body and hand the request to the handler, or an
 * HTTP status to answer at once with OUT->msg (the status text without
 * one) and close the connection without reading the body. */
typedef int (*http_admit_fn)(const struct http_request *req, void *arg,
                             struct http_admission *out);

/* Listen on ADDR: "host:port" (IPv4 or [IPv6]) or an absolute path for a
 * UNIX socket (an existing stale socket file is replaced; the socket is
 * created 0660). Returns NULL and fills ERR on failure. */
struct http_server *http_server_listen(struct ev_loop *loop, const char *addr,
                                       const struct http_limits *limits,
                                       http_handler_fn handler, void *arg,
                                       char *err, size_t errlen);
/* ---- handing the daemon over to a new image of itself (upgrade.c) ----
 * Serve on an inherited listening socket FD, bound to ADDR (for messages;
 * a UNIX path is unlinked at free, as by http_server_listen). */
struct http_server *http_server_adopt(struct ev_loop *loop, int fd, const char *addr,
                                      const struct http_limits *limits,
                                      http_handler_fn handler, void *arg,
                                      char *err, size_t errlen);
/* Take over FD, a client connection idle between two requests (TRUSTED:
 * one of its requests showed a key). 0, or -1 (FD is not a socket). */
int http_server_adopt_conn(struct http_server *srv, int fd, bool trusted);
/* HOLD: accept nothing, and a connection between requests stops reading
 * (its next request waits in the kernel); requests under way go on and
 * their connections are held once they end. false: as before. */
void http_server_hold(struct http_server *srv, bool hold);
/* Connections not ready to change hands (a request in any stage, bytes
 * not yet parsed or sent), EXCEPT's not counted. */
size_t http_server_busy(const struct http_server *srv, const struct http_request *except);
/* The listening socket (-1 after shutdown), and the sockets of connections
 * ready to change hands: up to MAX into FDS, with TRUSTED; how many. */
int http_server_fd(const struct http_server *srv);
size_t http_server_idle_fds(const struct http_server *srv, int *fds, bool *trusted, size_t max);
/* The socket REQ arrived on while it is being answered, else -1. */
int http_request_fd(const struct http_request *req);

/* Install an admission hook (same ARG as the handler); NULL: admit all, trusted. */
void http_server_set_admit(struct http_server *srv, http_admit_fn admit);
/* Apply new limits (after a reload); open connections keep their timers. */
void http_server_set_limits(struct http_server *srv, const struct http_limits *limits);
/* Stop accepting, close idle connections; busy ones finish their response. */
void http_server_shutdown(struct http_server *srv);
/* Close everything now and free (unlinks a UNIX socket it created). */
void http_server_free(struct http_server *srv);
size_t http_server_connections(const struct http_server *srv);
/* The bound TCP port (useful after listening on port 0); 0 for UNIX. */
unsigned http_server_port(const struct http_server *srv);

/* ---- reading a request ---- */
const char *http_header_get(const struct http_request *req, const char *name); /* case-insensitive */
/* N bytes of a path segment, %XX-decoded ('+' stays '+'), malloc'd; NULL if out of memory. */
char *http_path_decode(const char *s, size_t n);
/* Value of query parameter NAME, percent-decoded into a malloc'd string; NULL if absent. */
char *http_query_get(const struct http_request *req, const char *name);

/* ---- answering ---- */
/* Whole response. EXTRA_HEADERS: NULL or "Name: value\r\n…" lines. */
void http_respond(struct http_request *req, int status, const char *content_type,
                  const char *extra_headers, const char *body, size_t len);
/* Error in OpenAI's shape: {"error":{"message":M,"type":T,"code":STATUS}}.
 * TYPE NULL picks the usual one for STATUS. */
void http_respond_error(struct http_request *req, int status, const char *type,
                        const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* The same with EXTRA_HEADERS ("Retry-After: 1\r\n"), or NULL. */
void http_respond_error_headers(struct http_request *req, int status, const char *type,
                                const char *extra_headers, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Streamed response: chunked on HTTP/1.1, close-delimited on 1.0. */
void http_stream_begin(struct http_request *req, int status, const char *content_type,
                       const char *extra_headers);
/* Queue bytes. Returns true while buffered output is below the high-water
 * mark, false when the caller should pause its source until on_drain. Data
 * is never dropped. */
bool http_stream_write(struct http_request *req, const void *data, size_t len);
size_t http_stream_buffered(const struct http_request *req);
void http_stream_end(struct http_request *req);
/* Ends a streamed response without its proper end (no terminating chunk)
 * and closes the connection once queued bytes are sent, so the client sees
 * a cut response rather than a complete one (the proxy's upstream broke). */
void http_stream_abort(struct http_request *req);

/* Reason phrase for a status code ("Not Found"). */
const char *http_status_text(int status);
/* The usual OpenAI error type for a status ("invalid_request_error", …). */
const char *http_error_type(int status);
/* Whether a response with STATUS never has a body (1xx, 204, 304: RFC 9110
 * 6.4.1), whatever its headers say. */
bool http_status_has_no_body(int status);

#endif
