/* health — HTTP GETs to children, through libcurl's multi interface driven
 * by the libev loop (no threads, no blocking).
 *
 * Used for readiness (/health polled every few ms while a child starts),
 * liveness (/health every health_interval once ready) and /props (which
 * needs the child's API key: health_get_key). Connections
 * to a child are kept alive and reused by curl's connection cache. */
#ifndef LLAMA_POOL_HEALTH_H
#define LLAMA_POOL_HEALTH_H

#include <ev.h>
#include <stddef.h>

struct health;
struct health_probe;

/* A longer body is cut to this many bytes. */
#define HEALTH_BODY_MAX (64 * 1024)

/* STATUS is the HTTP status, or 0 when no response came (ERR says why:
 * "Connection refused", "Operation timed out after 1000 milliseconds…").
 * BODY is the response body (NUL-terminated, at most HEALTH_BODY_MAX bytes
 * kept). The probe is freed after the callback returns. */
typedef void (*health_cb)(void *arg, long status, const char *body, size_t len,
                          const char *err);

struct health *health_new(struct ev_loop *loop);
void health_free(struct health *h);

/* GET URL with TIMEOUT_MS; CB is called exactly once unless cancelled.
 * NULL when the probe could not be set up (out of memory). */
struct health_probe *health_get(struct health *h, const char *url, long timeout_ms,
                                health_cb cb, void *arg);
/* The same with "Authorization: Bearer KEY" (KEY NULL: none), for a
 * child's paths that its API key guards (/props; /health stays public).
 * KEY is copied; a KEY with CR or LF is refused (NULL, errno EINVAL). */
struct health_probe *health_get_key(struct health *h, const char *url, long timeout_ms,
                                    const char *key, health_cb cb, void *arg);
/* Abort a probe in flight; its callback is not called. */
void health_cancel(struct health_probe *p);

#endif
