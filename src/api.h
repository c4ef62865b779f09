/* api — the routes: /health, /pool/... (control), and what the proxy adds.
 *
 * The control socket serves /pool/... to whoever can open it (file mode
 * 0660); the TCP listener serves /pool/... only with admin_key. */
#ifndef LLAMA_POOL_API_H
#define LLAMA_POOL_API_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "http.h"

struct pool;

struct router;

/* The last line of a `logs?follow=1` stream that an upgrade in place ends:
 * the client may follow again at once (the new image answers). */
#define API_FOLLOW_REPLACED "[llama-pool] the daemon is upgrading in place; follow again"


struct api {
    struct pool *pool;
    struct router *router;
    /* Re-read the config file and apply it; fills *errors_json on failure.
     * Set by main (it owns the config path). */
    int (*reload)(struct api *api, json_t **result);
    /* Replace the daemon's image (upgrade.h); answers REQ itself. */
    void (*upgrade)(struct api *api, struct http_request *req, double timeout);
};

/* What GET /pool/status asks for (docs/http-api.md): every model; one
 * (model=NAME); a page of them (offset=N, limit=M: the models [N, N+M) in
 * config order); or a summary (summary=1: counts by state, and only the
 * models with instances or waiting requests). */
#define API_STATUS_MAX_LIMIT 1000   /* limit= at most */

struct api_status_query {
    bool summary;
    bool paged;                     /* offset= or limit= given */
    size_t offset;                  /* 0 when absent */
    size_t limit;                   /* API_STATUS_MAX_LIMIT when absent */
};

/* Read the values of summary=, offset= and limit= (NULL: absent) of a
 * status request, which also names a MODEL or not. 0, or -1 with ERR
 * saying what is wrong (for a 400). */
int api_status_query(const char *summary, const char *offset, const char *limit, bool model,
                     struct api_status_query *q, char *err, size_t errlen);

/* The http handler for both listeners (arg = struct api *). */
void api_handle(struct http_request *req, void *arg);
/* The http admission hook for both listeners (arg = struct api *): keys
 * and CORS origins are checked as soon as the headers are in. */
int api_admit(const struct http_request *req, void *arg, struct http_admission *out);

#endif
