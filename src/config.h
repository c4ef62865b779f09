/* config — pool.conf → structs, with validation.
 *
 * A config is parsed whole and either accepted or rejected with every error
 * found, each as "FILE:LINE: message". Nothing here touches the running pool:
 * the daemon parses into a fresh struct config and swaps it in on success.
 *
 * Out of memory: every function here prints "llama-pool: out of memory
 * while reading the configuration" and aborts; none returns NULL or an
 * error for want of memory. A config is a few kilobytes and a child's argv
 * a few hundred bytes: a process that cannot allocate them cannot
 * supervise anything either, and a check after each of the parser's
 * hundreds of allocations would be its least-tested code. Inside the
 * module, config_internal.h's x* helpers are the only way to allocate. */
#ifndef LLAMA_POOL_CONFIG_H
#define LLAMA_POOL_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define CONFIG_DEFAULT_PATH "/etc/llama-pool/pool.conf"

/* [pool] nvml_library when unset: the driver's NVML, found by the dynamic linker. */
#define CONFIG_DEFAULT_NVML_LIBRARY "libnvidia-ml.so.1"

/* A pool.conf larger than this is refused, not read ("check -c /dev/zero"
 * must end). Only regular files are read: a FIFO or a device is refused. */
#define CONFIG_MAX_BYTES (16 * 1024 * 1024)

/* [pool] state_dir when unset: systemd's StateDirectory=llama-pool. */
#define CONFIG_DEFAULT_STATE_DIR "/var/lib/llama-pool"
/* preload = popular N: N at most. */
#define CONFIG_PRELOAD_MAX 1000000

/* One environment assignment for a model's children. */
struct config_env {
    char *name;
    char *value;
};

/* How much memory to charge for a model. */
enum config_memory_kind {
    CONFIG_MEMORY_AUTO,   /* estimate from the GGUF header */
    CONFIG_MEMORY_SIZE,   /* bytes given */
};

/* memory_budget and gpu_budget. For gpu_budget the total is the device's
 * memory and the reserve gpu_reserve (gpu.h, gpu_budget). */
enum config_budget_kind {
    CONFIG_BUDGET_AUTO,    /* min(MemTotal, cgroup limit) - memory_reserve */
    CONFIG_BUDGET_SIZE,    /* bytes */
    CONFIG_BUDGET_PERCENT, /* percent of min(MemTotal, cgroup limit) */
};

/* [pool] gpus: look for GPUs through NVML, or not. */
enum config_gpus {
    CONFIG_GPUS_AUTO,      /* NVML when it loads and sees a device; else host only */
    CONFIG_GPUS_NONE,      /* host memory only, NVML never loaded */
};

/* routing: how a model's requests choose among its ready instances. */
enum config_routing {
    CONFIG_ROUTING_INHERIT,    /* a model's default: [pool] routing */
    CONFIG_ROUTING_AFFINITY,   /* the one that holds the prompt's prefix, else least busy */
    CONFIG_ROUTING_LEAST_BUSY, /* fewest requests in flight */
};

#define CONFIG_PRIORITY_MAX 1000

/* eviction: which idle instance goes first when a start needs room. */
enum config_eviction {
    CONFIG_EVICTION_LRU,       /* the model asked least recently (the default) */
    CONFIG_EVICTION_COST,      /* GreedyDual-Size-Frequency (see scheduler.h) */
};

/* fallback = http://HOST:PORT[/PREFIX] (and fallback_key): where a request
 * goes that cannot be served here (api.h, router.h say when). Only plain
 * http: the pool relays bytes, it does not speak TLS (put a local relay
 * such as nginx in front of an https one). HOST is resolved when pool.conf
 * is read (start, reload, check): a name that does not resolve is an error
 * then, not a 502 later. */
struct config_fallback {
    char *url;                 /* as written, for logs and messages */
    char *host;                /* the Host header: "HOST:PORT" as written */
    char *prefix;              /* "" or "/PATH" (no trailing '/'), put before the target */
    char *key;                 /* fallback_key: sent as "Authorization: Bearer KEY"; NULL: none */
    struct sockaddr_storage addr;   /* HOST:PORT resolved */
    socklen_t addrlen;
};

struct config_model {
    char *name;            /* section name, or file stem under models_dir */
    char *path;            /* GGUF path, absolute or relative to the config */
    char **args;           /* extra llama-server argv words (NULL-terminated) */
    size_t nargs;
    char *args_text;       /* the args line as written, for comparisons/logs */
    unsigned instances_min;/* "instances = N" means 0-N: on demand, up to N */
    unsigned instances_max;
    enum config_memory_kind memory_kind;
    uint64_t memory_bytes; /* when memory_kind == CONFIG_MEMORY_SIZE */
    uint64_t gpu_memory;   /* gpu_memory = SIZE: VRAM per instance; 0 = estimate */
    bool pin;
    enum config_routing routing;
    int64_t idle_timeout_ms; /* -1 = inherit [pool] idle_timeout; 0 = never */
    int64_t affinity_wait_ms;/* -1 = inherit [pool] affinity_wait */
    int64_t request_timeout_ms;/* -1 = inherit [pool] request_timeout; 0 = none */
    int priority;          /* -CONFIG_PRIORITY_MAX … CONFIG_PRIORITY_MAX; 0 = default */
    int memory_hard_limit; /* -1 = inherit [pool] memory_hard_limit; 0 no; 1 yes */
    char **aliases;        /* NULL-terminated */
    size_t naliases;
    struct config_env *env;
    size_t nenv;
    /* fallback: NULL with fallback_set false: [pool]'s; NULL with
     * fallback_set ("fallback =" empty): none for this model. */
    struct config_fallback *fallback;
    bool fallback_set;
    bool from_models_dir;  /* true when discovered, not written as a section */
    int line;              /* line of its [model …] header, 0 for models_dir */
};

struct config {
    char *file;                 /* path the config was read from */

    /* [pool] */
    char *listen;               /* "host:port"; NULL or "" = no TCP listener */
    char *control_socket;
    char *llama_server;
    unsigned port_min, port_max;
    enum config_budget_kind budget_kind;
    uint64_t budget_bytes;      /* for CONFIG_BUDGET_SIZE */
    unsigned budget_percent;    /* for CONFIG_BUDGET_PERCENT, 1..100 */
    uint64_t memory_reserve;
    enum config_gpus gpus;
    enum config_routing routing;  /* affinity or least_busy */
    char *nvml_library;         /* dlopen'd as given: a name or a path */
    enum config_budget_kind gpu_budget_kind;   /* per device */
    uint64_t gpu_budget_bytes;  /* for CONFIG_BUDGET_SIZE */
    unsigned gpu_budget_percent;/* for CONFIG_BUDGET_PERCENT, 1..100 */
    uint64_t gpu_reserve;       /* per device, subtracted with gpu_budget = auto */
    int64_t idle_timeout_ms;    /* 0 = never */
    int64_t affinity_wait_ms;   /* how long a request waits for the busy
                                 * instance that holds its prompt; 0 = never */
    int64_t request_timeout_ms; /* a generation's time limit from when it is sent
                                 * upstream (queue time not counted); 0 = none */
    int64_t start_timeout_ms;
    int64_t stop_timeout_ms;
    int64_t health_interval_ms;
    unsigned max_queue;
    int64_t queue_timeout_ms;
    unsigned max_restarts;
    int64_t restart_window_ms;
    char *log_dir;
    uint64_t log_max_size;      /* a model log is rotated past this; 0 = never */
    unsigned log_keep;          /* rotated files kept: NAME.log.1 … NAME.log.N */
    char *models_dir;           /* NULL when unset */
    char **default_args;        /* NULL-terminated */
    size_t ndefault_args;
    char *default_model;        /* NULL when unset */
    char **api_keys;            /* NULL-terminated, possibly empty */
    size_t napi_keys;
    char *admin_key;            /* NULL when unset */
    uint64_t max_body;
    uint64_t max_header;
    int64_t header_timeout_ms;
    int64_t keepalive_timeout_ms;
    unsigned max_connections;
    int64_t body_timeout_ms;    /* whole body within this after the headers; 0 = none */
    int64_t drain_timeout_ms;   /* a stopping instance's in-flight grace; never -1
                                 * after a load: unset takes stop_timeout */
    char **cors_origins;        /* NULL-terminated, possibly empty: "*" alone, or
                                 * "scheme://host[:port]" each (lowercase) */
    size_t ncors_origins;
    char *state_dir;            /* where usage.json is kept; NULL: nowhere (state_dir =) */
    unsigned preload_popular;   /* preload = popular N: N; 0: preload = none */
    enum config_eviction eviction;  /* which idle instance a memory start stops first */
    bool metrics_children;      /* children run with --metrics, and /metrics
                                 * adds their llamacpp:* series */
    struct config_fallback *fallback;   /* NULL: none */
    bool fallback_unknown;      /* a model not configured here goes to fallback */
    bool memory_hard_limit;     /* a child's cgroup gets memory.max (cgroup.h);
                                 * a model's own key overrides */

    struct config_model *models;
    size_t nmodels;

    /* Every name and alias → its model, for config_find_model: open
     * addressing on the name's hash, model index + 1 per slot (0: empty). */
    uint32_t *lookup;
    size_t lookup_cap;          /* a power of two; 0: none (a config made by hand) */
};

/* Errors collected while parsing: each one "FILE:LINE: message". */
struct config_errors {
    char **msgs;
    size_t n;
};

/* Parse and validate PATH. Returns a config, or NULL with errs filled
 * (at least one message). The caller frees both. */
struct config *config_load(const char *path, struct config_errors *errs);

/* Same, from a string (for tests); NAME is used in messages. */
struct config *config_load_string(const char *name, const char *text,
                                  struct config_errors *errs);

/* The value of KEY in [pool] of the file at PATH, as written (a relative
 * path is not resolved), read with the daemon's line rules but for that
 * key alone, so that a config with errors elsewhere still answers: the CLI
 * finds control_socket this way. The first non-empty one counts. NULL when
 * the file cannot be read or sets no such value; else malloc'd. */
char *config_peek_pool_key(const char *path, const char *key);

void config_free(struct config *cfg);
void config_errors_free(struct config_errors *errs);

/* Find a model by name or alias; NULL if none. Constant time for a
 * loaded config, whatever the number of models. */
const struct config_model *config_find_model(const struct config *cfg,
                                             const char *name_or_alias);

/* The full argv for one child of MODEL on PORT: llama_server, -m PATH,
 * --host 127.0.0.1, --port P, -a NAME (unless the args give -a/--alias),
 * --threads-http N (unless the args or env give it: see
 * config_child_http_threads), --metrics (with metrics_children, unless the
 * args or env turn it on already), default_args, then the model's args.
 * NULL-terminated, malloc'd (free with util_strv_free). */
char **config_child_argv(const struct config *cfg,
                         const struct config_model *m, unsigned port);

/* The value the child will see for FLAG (or LONGFLAG, also as --long=VALUE):
 * the last one among default_args then the model's args, as llama-server
 * takes the last. NULL when absent. Points into the config. */
const char *config_child_arg(const struct config *cfg, const struct config_model *m,
                             const char *flag, const char *longflag);

/* Whether a child of M gets memory.max in its cgroup: the model's
 * memory_hard_limit, else [pool]'s (default no). */
bool config_memory_hard_limit(const struct config *cfg, const struct config_model *m);

/* Whether a child of M serves /metrics: metrics_children, or --metrics in
 * default_args or its args, or LLAMA_ARG_ENDPOINT_METRICS=on|enabled|true|1
 * in its env (llama-server's own truthy values). */
bool config_child_metrics(const struct config *cfg, const struct config_model *m);

/* Slots a child of M will have: its -np/--parallel, else llama-server's
 * automatic 4. The real count comes from /props once it is ready. */
unsigned config_child_slots(const struct config *cfg, const struct config_model *m);

/* M's fallback: its own, else [pool]'s; NULL when it has none. */
const struct config_fallback *config_model_fallback(const struct config *cfg,
                                                    const struct config_model *m);

/* Parse URL ("http://HOST:PORT[/PREFIX]") into FB, resolving HOST. 0, or
 * -1 with ERR saying what is wrong. FB's strings are malloc'd (free with
 * config_fallback_free); key is left alone. */
int config_parse_fallback(const char *url, struct config_fallback *fb, char *err, size_t errlen);
void config_fallback_free(struct config_fallback *fb);

/* M's routing: its own, else [pool]'s. */
enum config_routing config_model_routing(const struct config *cfg, const struct config_model *m);
/* M's affinity_wait in ms: its own, else [pool]'s; 0 when its routing is least_busy. */
int64_t config_model_affinity_wait_ms(const struct config *cfg, const struct config_model *m);
/* M's request_timeout in ms: its own, else [pool]'s; 0: no limit. */
int64_t config_model_request_timeout_ms(const struct config *cfg, const struct config_model *m);

/* The HTTP threads a child of M has: llama-server serves each connection
 * on one of them, and a connection beyond them waits (measured with b9749:
 * p99 from 15 ms to 450 ms at one connection too many). Its args'
 * --threads-http or its env's LLAMA_ARG_THREADS_HTTP when given; else what
 * the pool gives it: its slots (-np, else 4), the scheduler's hand-off (up
 * to 4 requests per slot, CONFIG_HANDOFF_MAX in all) and 2 for the pool's
 * own: /health, and /props (once, at ready) or a /metrics scrape.
 * *GIVEN says which. */
#define CONFIG_HANDOFF_MAX 32
unsigned config_child_http_threads(const struct config *cfg, const struct config_model *m,
                                   bool *given);

/* Whether M's args (or env) choose its GPUs themselves (--device, -ts,
 * -sm, -mg, or CUDA_VISIBLE_DEVICES in its env): the pool then leaves
 * CUDA_VISIBLE_DEVICES alone and charges the devices they name. */
bool config_child_gpus_fixed(const struct config *cfg, const struct config_model *m);

/* Whether the child will have a boolean switch on: 1 when ON or ONLONG
 * comes last among default_args then the model's args, 0 when OFF or
 * OFFLONG does, -1 when none of them is given. */
int config_child_switch(const struct config *cfg, const struct config_model *m,
                        const char *on, const char *onlong, const char *off, const char *offlong);

/* True when two model definitions would run the same child (path, args,
 * env, and the pool-wide argv parts they inherit are equal). Used by reload
 * to keep unchanged instances running. */
bool config_model_same_child(const struct config *a, const struct config_model *ma,
                             const struct config *b, const struct config_model *mb);

/* ---- value parsers, exposed for unit tests and the CLI ---- */

/* "512", "1.5G", "64K" (powers of 1024). 0 on success, -1 on bad input. */
int config_parse_size(const char *s, uint64_t *out);
/* "250ms", "10s", "30m", "2h", plain number = seconds. */
int config_parse_duration(const char *s, int64_t *out_ms);
/* "yes/no/true/false/on/off/1/0". */
int config_parse_bool(const char *s, bool *out);

/* Split S like a POSIX shell splits words (single and double quotes,
 * backslash escapes; no expansion of any kind). On success returns 0 and a
 * NULL-terminated malloc'd vector in *out (free with util_strv_free).
 * On error returns -1 and points *err at a static message. */
int config_split_words(const char *s, char ***out, size_t *n, const char **err);

#endif
