/* api — the routes: /health, /pool/... (control), and what the proxy adds.
 *
 * The control socket serves /pool/... to whoever can open it (file mode
 * 0660); the TCP listener serves /pool/... only with admin_key. */
#ifndef LLAMA_POOL_API_H
#define LLAMA_POOL_API_H

#include <jansson.h>

#include "http.h"

struct pool;

struct router;

struct api {
    struct pool *pool;
    struct router *router;
    /* Re-read the config file and apply it; fills *errors_json on failure.
     * Set by main (it owns the config path). */
    int (*reload)(struct api *api, json_t **result);
};

/* The http handler for both listeners (arg = struct api *). */
void api_handle(struct http_request *req, void *arg);
/* The http admission hook for both listeners (arg = struct api *): keys
 * and CORS origins are checked as soon as the headers are in. */
int api_admit(const struct http_request *req, void *arg, struct http_admission *out);

#endif
