/* config — pool.conf → struct config, with validation.
 *
 * The lines come from config_ini.c, which splits them by inih's rules
 * itself rather than through inih: Debian's libinih gives its handler no
 * line number and stops seeing a line after 200 bytes, and every error
 * here must say FILE:LINE (config_ini.c's top comment has the whole
 * argument). This file gives the lines their meaning: sections, keys,
 * values and every check on them.
 *
 * Every problem becomes one "FILE:LINE: message" and parsing goes on, so a
 * user sees all of them at once. Cross-checks that need the whole file
 * (duplicate names and aliases, models_dir discovery, default_model) run
 * after the parse, in finish().
 *
 * The rest of the module: config_discover.c lists models_dir's files,
 * config_args.c answers run-time questions about a model's children, and
 * config_internal.h is what the four files share. */
#define _GNU_SOURCE
#include "config.h"
#include "config_internal.h"

#include "log.h"
#include "util.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_REPORTED_ERRORS 100
#define ROUTER_PORT_VAR "LLAMA_SERVER_ROUTER_PORT"

/* ------------------------------------------------------------------ */
/* Memory: config's one out-of-memory policy (config.h).              */

_Noreturn void config_oom(void)
{
    fputs("llama-pool: out of memory while reading the configuration\n", stderr);
    abort();
}

/* MSG (malloc'd), with ill-formed UTF-8 from the file replaced: messages
 * reach JSON (a refused reload) and terminals. */
static char *utf8_clean(char *msg)
{
    if (util_utf8_valid(msg))
        return msg;
    char *fixed = util_utf8_lossy(msg, strlen(msg), NULL);
    if (!fixed)
        config_oom();
    free(msg);
    return fixed;
}

/* Trim surrounding whitespace of [s, s+len) and return a copy. */
static char *trimmed_copy(const char *s, size_t len)
{
    while (len && is_blank(*s)) {
        s++;
        len--;
    }
    while (len && is_blank(s[len - 1]))
        len--;
    return xstrndup(s, len);
}

/* A value quoted for a message, shortened so that a 5,000-character line
 * does not become a 5,000-character error. */
struct shown {
    char buf[96];
};

static const char *show(struct shown *sh, const char *s)
{
    size_t len = strlen(s), max = sizeof sh->buf - 1;
    if (len <= max)
        return s;
    size_t cut = max - 3;
    while (cut > 0 && ((unsigned char)s[cut] & 0xC0) == 0x80)
        cut--;                  /* not inside a UTF-8 character */
    memcpy(sh->buf, s, cut);
    memcpy(sh->buf + cut, "...", 4);
    return sh->buf;
}

/* ------------------------------------------------------------------ */
/* Value parsers                                                       */

enum { PARSE_OK = 0, PARSE_SYNTAX = -1, PARSE_RANGE = -2 };

/* A non-negative decimal number as written: its integer part, and up to
 * 18 fraction digits as FRAC / SCALE (further digits are dropped). */
struct number {
    uint64_t ip, frac, scale;
    const char *unit;          /* what follows it, blanks skipped */
};

/* Reads the number S starts with. PARSE_RANGE: its integer part is too
 * large (N is filled all the same, so that a bad unit still reads as bad
 * syntax). */
static int parse_number(const char *s, struct number *n)
{
    bool range = false, digits = false;
    uint64_t v = 0;
    while (isdigit((unsigned char)*s)) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            range = true;
        else
            v = v * 10 + d;
        digits = true;
        s++;
    }
    uint64_t f = 0, scale = 1;
    if (*s == '.') {
        s++;
        if (!digits || !isdigit((unsigned char)*s))
            return PARSE_SYNTAX;
        while (isdigit((unsigned char)*s)) {
            if (scale < 1000000000000000000ULL) {
                f = f * 10 + (uint64_t)(*s - '0');
                scale *= 10;
            }
            s++;
        }
    }
    if (!digits)
        return PARSE_SYNTAX;
    while (*s == ' ' || *s == '\t')
        s++;
    *n = (struct number){ .ip = v, .frac = f, .scale = scale, .unit = s };
    return range ? PARSE_RANGE : PARSE_OK;
}

/* parse_size_x and parse_duration_x set *OUT on PARSE_OK only. */
static int parse_size_x(const char *s, uint64_t *out)
{
    struct number n;
    int rc = parse_number(s, &n);
    if (rc == PARSE_SYNTAX)
        return rc;
    const char *p = n.unit;
    unsigned shift = 0;
    switch (tolower((unsigned char)*p)) {
    case 'k': shift = 10; p++; break;
    case 'm': shift = 20; p++; break;
    case 'g': shift = 30; p++; break;
    case 't': shift = 40; p++; break;
    default: break;
    }
    if (shift && tolower((unsigned char)p[0]) == 'i' && tolower((unsigned char)p[1]) == 'b')
        p += 2;
    else if (tolower((unsigned char)*p) == 'b')
        p++;
    if (*p)
        return PARSE_SYNTAX;
    if (rc == PARSE_RANGE)
        return rc;
    unsigned __int128 v = ((unsigned __int128)n.ip << shift)
                        + (((unsigned __int128)n.frac << shift) / n.scale);
    if (v > UINT64_MAX)
        return PARSE_RANGE;
    *out = (uint64_t)v;
    return PARSE_OK;
}

int config_parse_size(const char *s, uint64_t *out)
{
    return s && parse_size_x(s, out) == PARSE_OK ? 0 : -1;
}

static int parse_duration_x(const char *s, int64_t *out_ms)
{
    struct number n;
    int rc = parse_number(s, &n);
    if (rc == PARSE_SYNTAX)
        return rc;
    uint64_t unit;
    if (!*n.unit)
        unit = 1000;
    else if (!strcasecmp(n.unit, "ms"))
        unit = 1;
    else if (!strcasecmp(n.unit, "s"))
        unit = 1000;
    else if (!strcasecmp(n.unit, "m"))
        unit = 60 * 1000;
    else if (!strcasecmp(n.unit, "h"))
        unit = 3600 * 1000;
    else
        return PARSE_SYNTAX;
    if (rc == PARSE_RANGE)
        return rc;
    /* A fraction of a millisecond rounds up, so that a non-zero duration
     * never turns into 0 (which often means "never"). */
    unsigned __int128 fr = (unsigned __int128)n.frac * unit;
    unsigned __int128 v = (unsigned __int128)n.ip * unit + (fr + n.scale - 1) / n.scale;
    if (v > INT64_MAX)
        return PARSE_RANGE;
    *out_ms = (int64_t)v;
    return PARSE_OK;
}

int config_parse_duration(const char *s, int64_t *out_ms)
{
    return s && parse_duration_x(s, out_ms) == PARSE_OK ? 0 : -1;
}

int config_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = { "yes", "true", "on", "1" };
    static const char *const no[] = { "no", "false", "off", "0" };
    if (!s)
        return -1;
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) {
        if (!strcasecmp(s, yes[i])) {
            *out = true;
            return 0;
        }
        if (!strcasecmp(s, no[i])) {
            *out = false;
            return 0;
        }
    }
    return -1;
}

/* Decimal digits only, at most MAX. */
static int parse_uint(const char *s, unsigned max, unsigned *out)
{
    if (!isdigit((unsigned char)*s))
        return PARSE_SYNTAX;
    uint64_t v = 0;
    bool range = false;
    for (; *s; s++) {
        if (!isdigit((unsigned char)*s))
            return PARSE_SYNTAX;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v > max)
            range = true, v = max;
    }
    if (range)
        return PARSE_RANGE;
    *out = (unsigned)v;
    return PARSE_OK;
}

/* "A-B" (spaces around '-' allowed), each part an unsigned <= max. */
static int parse_uint_range(const char *s, unsigned max, unsigned *a, unsigned *b)
{
    const char *dash = strchr(s, '-');
    if (!dash)
        return PARSE_SYNTAX;
    char *left = trimmed_copy(s, (size_t)(dash - s));
    char *right = trimmed_copy(dash + 1, strlen(dash + 1));
    int ra = parse_uint(left, max, a);
    int rb = parse_uint(right, max, b);
    free(left);
    free(right);
    if (ra == PARSE_SYNTAX || rb == PARSE_SYNTAX)
        return PARSE_SYNTAX;
    if (ra == PARSE_RANGE || rb == PARSE_RANGE)
        return PARSE_RANGE;
    return PARSE_OK;
}

int config_split_words(const char *s, char ***out, size_t *n, const char **err)
{
    struct strvec words = { 0 };
    size_t len = strlen(s);
    char *w = xcalloc(len + 1, 1);        /* a word is never longer than S */
    size_t wl = 0;
    bool in_word = false;

    *err = NULL;
    for (const char *p = s; *p; p++) {
        char c = *p;
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            if (in_word) {
                w[wl] = '\0';
                strvec_push(&words, xstrndup(w, wl));
                wl = 0;
                in_word = false;
            }
            continue;
        }
        in_word = true;
        if (c == '\\') {
            if (p[1] == '\n') {          /* line continuation: removed */
                p++;
            } else if (p[1]) {
                w[wl++] = *++p;
            } else {
                w[wl++] = '\\';          /* trailing backslash: kept, as sh does */
            }
        } else if (c == '\'') {
            const char *close = strchr(p + 1, '\'');
            if (!close) {
                *err = "unterminated single quote";
                goto fail;
            }
            memcpy(w + wl, p + 1, (size_t)(close - p - 1));
            wl += (size_t)(close - p - 1);
            p = close;
        } else if (c == '"') {
            for (p++;; p++) {
                if (!*p) {
                    *err = "unterminated double quote";
                    goto fail;
                }
                if (*p == '"')
                    break;
                if (*p == '\\' && p[1] && strchr("$`\"\\\n", p[1])) {
                    p++;
                    if (*p != '\n')
                        w[wl++] = *p;
                } else {
                    w[wl++] = *p;
                }
            }
        } else {
            w[wl++] = c;
        }
    }
    if (in_word)
        strvec_push(&words, xstrndup(w, wl));
    free(w);
    *out = strvec_take(&words, n);
    return 0;

fail:
    free(w);
    strvec_free(&words);
    *out = NULL;
    if (n)
        *n = 0;
    return -1;
}

/* ------------------------------------------------------------------ */
/* Paths                                                               */

/* Lexically tidy an absolute path: no "//", no "." components, no trailing
 * slash. ".." is kept: resolving it without the file system would be wrong
 * across symbolic links. */
static char *path_tidy(char *p)
{
    char *r = p, *w = p;
    while (*r) {
        if (*r == '/') {
            while (r[1] == '/')
                r++;
            if (r[1] == '.' && (r[2] == '/' || r[2] == '\0')) {
                r += 2;
                continue;
            }
        }
        *w++ = *r++;
    }
    *w = '\0';
    while (w > p + 1 && w[-1] == '/')
        *--w = '\0';
    if (w == p) {
        p[0] = '/';
        p[1] = '\0';
    }
    return p;
}

/* The absolute directory holding FILE (as named, not following links). */
static char *file_dir(const char *file)
{
    const char *slash = strrchr(file, '/');
    char *dir;
    if (!slash)
        dir = xstrdup(".");
    else if (slash == file)
        dir = xstrdup("/");
    else
        dir = xstrndup(file, (size_t)(slash - file));
    if (dir[0] != '/') {
        char *cwd = getcwd(NULL, 0);   /* NULL: no current directory left, "/" */
        if (!cwd && errno == ENOMEM)
            config_oom();
        char *abs = xasprintf("%s/%s", cwd ? cwd : "/", dir);
        free(cwd);
        free(dir);
        dir = abs;
    }
    return path_tidy(dir);
}

static char *path_resolve(const char *dir, const char *p)
{
    char *r = p[0] == '/' ? xstrdup(p) : xasprintf("%s/%s", dir, p);
    return path_tidy(r);
}

/* ------------------------------------------------------------------ */
/* Name table: model names and aliases, for uniqueness and lookups.    */

enum name_kind { NAME_SECTION, NAME_FOUND, NAME_ALIAS };

struct name_ent {
    const char *key;        /* NULL = empty slot */
    enum name_kind kind;
    const char *model;      /* model the name or alias belongs to */
    const char *file;       /* NAME_FOUND: the file it was found as */
    int line;               /* header or alias line */
    size_t index;           /* NAME_SECTION: index into parser.models */
};

struct name_map {
    struct name_ent *v;
    size_t cap, n;
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static struct name_ent *name_slot(struct name_ent *v, size_t cap, const char *key)
{
    size_t i = (size_t)hash_str(key) & (cap - 1);
    while (v[i].key && strcmp(v[i].key, key))
        i = (i + 1) & (cap - 1);
    return &v[i];
}

static struct name_ent *name_find(const struct name_map *m, const char *key)
{
    if (!m->cap)
        return NULL;
    struct name_ent *e = name_slot(m->v, m->cap, key);
    return e->key ? e : NULL;
}

/* Returns the existing entry for KEY, or adds one (its key set) and sets
 * *added. */
static struct name_ent *name_add(struct name_map *m, const char *key, bool *added)
{
    if ((m->n + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        struct name_ent *v = xcalloc(cap, sizeof *v);
        for (size_t i = 0; i < m->cap; i++)
            if (m->v[i].key)
                *name_slot(v, cap, m->v[i].key) = m->v[i];
        free(m->v);
        m->v = v;
        m->cap = cap;
    }
    struct name_ent *e = name_slot(m->v, m->cap, key);
    *added = !e->key;
    if (!e->key) {
        memset(e, 0, sizeof *e);
        e->key = key;
        m->n++;
    }
    return e;
}

/* ------------------------------------------------------------------ */
/* Keys                                                                */

enum pool_key {
    PK_LISTEN, PK_CONTROL_SOCKET, PK_LLAMA_SERVER, PK_PORT_RANGE,
    PK_MEMORY_BUDGET, PK_MEMORY_RESERVE, PK_IDLE_TIMEOUT, PK_START_TIMEOUT,
    PK_STOP_TIMEOUT, PK_HEALTH_INTERVAL, PK_MAX_QUEUE, PK_QUEUE_TIMEOUT,
    PK_MAX_RESTARTS, PK_RESTART_WINDOW, PK_LOG_DIR, PK_MODELS_DIR,
    PK_DEFAULT_ARGS, PK_DEFAULT_MODEL, PK_API_KEYS, PK_ADMIN_KEY, PK_MAX_BODY,
    PK_MAX_HEADER, PK_HEADER_TIMEOUT, PK_KEEPALIVE_TIMEOUT, PK_MAX_CONNECTIONS,
    PK_BODY_TIMEOUT, PK_DRAIN_TIMEOUT, PK_CORS_ORIGINS, PK_GPUS, PK_NVML_LIBRARY,
    PK_GPU_BUDGET, PK_GPU_RESERVE, PK_LOG_MAX_SIZE, PK_LOG_KEEP, PK_ROUTING,
    PK_AFFINITY_WAIT, PK_STATE_DIR, PK_PRELOAD, PK_METRICS_CHILDREN, PK_EVICTION, PK_FALLBACK,
    PK_FALLBACK_KEY, PK_FALLBACK_UNKNOWN, PK_MEMORY_HARD_LIMIT, PK_REQUEST_TIMEOUT, PK__COUNT
};

static const char *const pool_keys[PK__COUNT] = {
    "listen", "control_socket", "llama_server", "port_range",
    "memory_budget", "memory_reserve", "idle_timeout", "start_timeout",
    "stop_timeout", "health_interval", "max_queue", "queue_timeout",
    "max_restarts", "restart_window", "log_dir", "models_dir",
    "default_args", "default_model", "api_keys", "admin_key", "max_body",
    "max_header", "header_timeout", "keepalive_timeout", "max_connections",
    "body_timeout", "drain_timeout", "cors_origins", "gpus", "nvml_library",
    "gpu_budget", "gpu_reserve", "log_max_size", "log_keep", "routing",
    "affinity_wait", "state_dir", "preload", "metrics_children", "eviction", "fallback",
    "fallback_key", "fallback_unknown", "memory_hard_limit", "request_timeout",
};

enum model_key {
    MK_PATH, MK_ARGS, MK_INSTANCES, MK_MEMORY, MK_PIN, MK_IDLE_TIMEOUT,
    MK_ALIASES, MK_ENV, MK_GPU_MEMORY, MK_ROUTING, MK_AFFINITY_WAIT, MK_PRIORITY, MK_FALLBACK,
    MK_FALLBACK_KEY, MK_MEMORY_HARD_LIMIT, MK_REQUEST_TIMEOUT, MK__COUNT
};

static const char *const model_keys[MK__COUNT] = {
    "path", "args", "instances", "memory", "pin", "idle_timeout", "aliases", "env",
    "gpu_memory", "routing", "affinity_wait", "priority", "fallback", "fallback_key",
    "memory_hard_limit",
    "request_timeout",
};

/* What a section takes: its keys, those of them that take continuation
 * lines, and the other section's keys (for a hint). */
struct section_def {
    const char *const *keys;
    int nkeys;
    uint64_t multiline;        /* bit K: key K takes continuation lines */
    const char *const *other_keys;
    int nother_keys;
    const char *other_hint;    /* when a key is the other section's */
};

_Static_assert(PK__COUNT <= 64 && MK__COUNT <= 64, "multiline is a 64-bit mask");

static const struct section_def pool_section = {
    pool_keys, PK__COUNT, UINT64_C(1) << PK_DEFAULT_ARGS | UINT64_C(1) << PK_API_KEYS,
    model_keys, MK__COUNT, "it belongs in a [model NAME] section",
};

static const struct section_def model_section = {
    model_keys, MK__COUNT, UINT64_C(1) << MK_ARGS | UINT64_C(1) << MK_ALIASES | UINT64_C(1) << MK_ENV,
    pool_keys, PK__COUNT, "it belongs in [pool]",
};

static int key_index(const char *const *keys, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(keys[i], name))
            return i;
    return -1;
}

/* The [pool] keys whose value is a plain number: what kind, and where in
 * struct config it goes (as nginx's conf slots do). The other keys have a
 * case of their own in pool_value. */
struct number_key {
    enum { NK_NONE, NK_SIZE, NK_DURATION, NK_COUNT } type;
    size_t offset;             /* of a uint64_t, int64_t or unsigned field */
    bool positive;             /* NK_SIZE, NK_DURATION: 0 is refused */
    unsigned min, max;         /* NK_COUNT */
};

/* The offset of FIELD, which must be of TYPE (else no _Generic branch). */
#define FIELD_OF(type, field) _Generic(((struct config *)0)->field, type: offsetof(struct config, field))
#define SIZE_KEY(field, positive)     { NK_SIZE, FIELD_OF(uint64_t, field), positive, 0, 0 }
#define DURATION_KEY(field, positive) { NK_DURATION, FIELD_OF(int64_t, field), positive, 0, 0 }
#define COUNT_KEY(field, min, max)    { NK_COUNT, FIELD_OF(unsigned, field), false, min, max }

static const struct number_key pool_numbers[PK__COUNT] = {
    [PK_MEMORY_RESERVE]    = SIZE_KEY(memory_reserve, false),
    [PK_GPU_RESERVE]       = SIZE_KEY(gpu_reserve, false),
    [PK_IDLE_TIMEOUT]      = DURATION_KEY(idle_timeout_ms, false),
    [PK_START_TIMEOUT]     = DURATION_KEY(start_timeout_ms, true),
    [PK_STOP_TIMEOUT]      = DURATION_KEY(stop_timeout_ms, false),
    [PK_HEALTH_INTERVAL]   = DURATION_KEY(health_interval_ms, true),
    [PK_MAX_QUEUE]         = COUNT_KEY(max_queue, 0, 1000000),
    [PK_QUEUE_TIMEOUT]     = DURATION_KEY(queue_timeout_ms, false),
    [PK_MAX_RESTARTS]      = COUNT_KEY(max_restarts, 0, 1000000),
    [PK_RESTART_WINDOW]    = DURATION_KEY(restart_window_ms, true),
    [PK_MAX_BODY]          = SIZE_KEY(max_body, true),
    [PK_MAX_HEADER]        = SIZE_KEY(max_header, true),
    [PK_HEADER_TIMEOUT]    = DURATION_KEY(header_timeout_ms, true),
    [PK_KEEPALIVE_TIMEOUT] = DURATION_KEY(keepalive_timeout_ms, false),
    [PK_MAX_CONNECTIONS]   = COUNT_KEY(max_connections, 1, 10000000),
    [PK_BODY_TIMEOUT]      = DURATION_KEY(body_timeout_ms, false),
    [PK_LOG_MAX_SIZE]      = SIZE_KEY(log_max_size, false),
    [PK_LOG_KEEP]          = COUNT_KEY(log_keep, 0, 1000),
    [PK_AFFINITY_WAIT]     = DURATION_KEY(affinity_wait_ms, false),
    [PK_REQUEST_TIMEOUT]   = DURATION_KEY(request_timeout_ms, false),
};

/* Optimal string alignment distance, case-insensitive, capped at 9. */
static unsigned edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 40 || lb > 40)
        return 9;
    unsigned d[41][41];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = (unsigned)i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = (unsigned)j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            unsigned cost = tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]);
            unsigned v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v)
                v = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < v)
                v = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 2])
                && tolower((unsigned char)a[i - 2]) == tolower((unsigned char)b[j - 1])
                && d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    }
    return d[la][lb] > 9 ? 9 : d[la][lb];
}

/* The known key closest to NAME when it is close enough to be a typo. */
static const char *closest_key(const char *const *keys, int n, const char *name)
{
    const char *best = NULL;
    unsigned best_d = 99;
    for (int i = 0; i < n; i++) {
        unsigned d = edit_distance(name, keys[i]);
        unsigned limit = strlen(keys[i]) >= 6 ? 2 : 1;
        if (d <= limit && d < best_d) {
            best = keys[i];
            best_d = d;
        }
    }
    return best;
}

/* ------------------------------------------------------------------ */
/* Parser state                                                        */

/* A [model NAME] section while it is being read. */
struct pmodel {
    struct config_model model; /* as read so far: path NULL until set; args
                                * and aliases grow below until build_models */
    bool dropped;              /* duplicate or invalid: checked, never used */
    struct strvec args, aliases;
    int *alias_lines;          /* the line of each alias */
    size_t alias_lines_cap;
    size_t env_cap;
    int key_line[MK__COUNT];   /* where each key was set, 0 = not set */
    char *fallback_key;        /* joins its fallback once the section is read */
};

/* What a model without args or aliases points to: one empty text and one
 * empty vector for every such model (thousands, from models_dir), not an
 * allocation each. model_free() leaves them alone. */
static char no_text[] = "";
static char *no_words[] = { NULL };

/* M: a model with NAME and PATH (malloc'd: M owns them now), defined at
 * LINE (0: found in models_dir), every key at its default. */
static void model_init(struct config_model *m, char *name, char *path, int line)
{
    *m = (struct config_model){
        .name = name,
        .path = path,
        .args_text = no_text,
        .instances_min = 0,
        .instances_max = 1,
        .memory_kind = CONFIG_MEMORY_AUTO,
        .idle_timeout_ms = -1,
        .affinity_wait_ms = -1,
        .memory_hard_limit = -1,
        .request_timeout_ms = -1,
        .line = line,
    };
}

static void model_free(struct config_model *m)
{
    free(m->name);
    free(m->path);
    if (m->args != no_words)
        util_strv_free(m->args);
    if (m->args_text != no_text)
        free(m->args_text);
    if (m->aliases != no_words)
        util_strv_free(m->aliases);
    for (size_t j = 0; j < m->nenv; j++) {
        free(m->env[j].name);
        free(m->env[j].value);
    }
    free(m->env);
    config_fallback_free(m->fallback);
}

enum section_kind { SEC_NONE, SEC_POOL, SEC_MODEL, SEC_IGNORE };

struct parse_error {
    int line;
    char *msg;
};

struct parser {
    const char *file;
    char *dir;                 /* absolute directory of the file */

    struct config_ini in;      /* the file's lines; in.lineno is the current one */

    /* what an indented line after a key line does */
    enum {
        CONT_IGNORE,           /* nothing: no key line, or a refused one */
        CONT_REFUSE,           /* an error: the key takes one line */
        CONT_VALUE,            /* adds to key cont_key of the section */
    } cont;
    int cont_key;
    int list_open_line;        /* a list's line ended with ',': 0 = none */
    char *list_open_text;      /* "key: \"value\"" of that line, for the message */

    /* sections */
    enum section_kind sec;
    size_t cur_model;          /* index into models when sec == SEC_MODEL */
    int pool_line;
    int pool_key_line[PK__COUNT];
    char *pool_fallback_key;   /* joins [pool]'s fallback at the end */

    struct config *cfg;
    struct strvec default_args, api_keys, cors_origins;

    struct pmodel *models;
    size_t nmodels, models_cap;
    struct config_found *found;  /* what models_dir offers */
    size_t nfound;
    struct name_map names;

    struct parse_error *errs;
    size_t nerrs, errs_cap;
};

__attribute__((format(printf, 3, 4)))
static void error_at(struct parser *p, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = xvasprintf(fmt, ap);
    va_end(ap);
    if (line < 1)
        line = 1;
    xgrow(&p->errs, &p->errs_cap, p->nerrs + 1, sizeof *p->errs);
    p->errs[p->nerrs].line = line;
    p->errs[p->nerrs].msg = utf8_clean(xasprintf("%s:%d: %s", p->file, line, msg));
    p->nerrs++;
    free(msg);
}

/* ------------------------------------------------------------------ */
/* Sections                                                            */

/* What names and aliases may hold. A name is a URL path segment
 * (/pool/models/NAME/start, /upstream/NAME/...) taken as sent, a JSON
 * string and a log file's name: besides '/', '?', '#' and '%', it holds
 * none of the characters that browsers and URL libraries percent-encode in
 * a path or read as '/' ('"', '<', '>', '`', '{', '}', '\\'). An alias is
 * what clients put in a body's "model" (and /pool/server?model=), where
 * "org/model" ids are common: it may hold '/' and those. Both rules appear
 * in full in the messages. */
#define NAME_RULE "a model name is UTF-8 text without whitespace, control characters or any of " \
                  "/ \\ ? # % \" < > ` { }, and does not start with '.'"
#define ALIAS_RULE "an alias is UTF-8 text without whitespace, control characters, '?', '#' or '%'"

/* Unicode white space beyond ASCII's (which is_blank covers). */
static bool is_unicode_space(uint32_t cp)
{
    return cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028
        || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000 || cp == 0xFEFF;
}

/* Why S cannot be a model name (or, with IS_ALIAS, an alias), or NULL. */
static const char *bad_name_text(const char *s, bool is_alias)
{
    size_t len = strlen(s);
    if (!len)
        return "it is empty";
    if (util_utf8_check(s, len) != len)
        return "it is not valid UTF-8";
    if (!is_alias && s[0] == '.')
        return "it starts with '.'";
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t n = util_utf8_decode(s + i, len - i, &cp);
        if ((cp < 0x80 && is_blank((char)cp)) || is_unicode_space(cp))
            return "it contains whitespace";
        if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F))
            return "it contains a control character";
        switch (cp) {
        case '?': return "it contains '?'";
        case '#': return "it contains '#'";
        case '%': return "it contains '%'";
        case '/': if (!is_alias) return "it contains '/'"; break;
        case '\\': if (!is_alias) return "it contains '\\'"; break;
        case '"': if (!is_alias) return "it contains '\"'"; break;
        case '<': if (!is_alias) return "it contains '<'"; break;
        case '>': if (!is_alias) return "it contains '>'"; break;
        case '`': if (!is_alias) return "it contains '`'"; break;
        case '{': if (!is_alias) return "it contains '{'"; break;
        case '}': if (!is_alias) return "it contains '}'"; break;
        default: break;
        }
        i += n;
    }
    return NULL;
}

static const char *bad_model_name(const char *name)
{
    return bad_name_text(name, false);
}

/* A "[T]" line (T trimmed). */
static void begin_section(struct parser *p, const char *t)
{
    struct shown sh;

    p->cont = CONT_IGNORE;
    if (!strcmp(t, "pool")) {
        if (p->pool_line)
            error_at(p, p->in.lineno, "[pool] appears twice (first at line %d)", p->pool_line);
        else
            p->pool_line = p->in.lineno;
        p->sec = SEC_POOL;
        return;
    }
    if (strncmp(t, "model", 5) || (t[5] && !is_blank(t[5]))) {
        error_at(p, p->in.lineno, "unknown section [%s]: sections are [pool] and [model NAME]",
                 show(&sh, t));
        p->sec = SEC_IGNORE;
        return;
    }
    const char *name = t + 5;
    while (is_blank(*name))
        name++;
    if (!*name) {
        error_at(p, p->in.lineno, "[model] needs a name: [model NAME]");
        p->sec = SEC_IGNORE;
        return;
    }

    xgrow(&p->models, &p->models_cap, p->nmodels + 1, sizeof *p->models);
    struct pmodel *pm = &p->models[p->nmodels];
    *pm = (struct pmodel){ 0 };
    model_init(&pm->model, xstrdup(name), NULL, p->in.lineno);
    p->cur_model = p->nmodels++;
    p->sec = SEC_MODEL;

    const struct config_model *m = &pm->model;
    const char *why = bad_model_name(m->name);
    if (why) {
        error_at(p, p->in.lineno, "invalid model name \"%s\": %s (%s)", show(&sh, m->name), why, NAME_RULE);
        pm->dropped = true;
        return;
    }
    bool added;
    struct name_ent *e = name_add(&p->names, m->name, &added);
    if (!added) {
        error_at(p, p->in.lineno, "model \"%s\" is defined twice (first at line %d)",
                 show(&sh, m->name), e->line);
        pm->dropped = true;
        return;
    }
    e->kind = NAME_SECTION;
    e->model = m->name;
    e->line = m->line;
    e->index = p->cur_model;
}

/* ------------------------------------------------------------------ */
/* Values                                                              */

#define SIZE_FORM "a size (a number with an optional K, M, G or T: 512K, 1.5G)"
#define DURATION_FORM "a duration (a number with ms, s, m or h: 250ms, 10s, 30m, 2h)"

/* Whether V, for which parse_size_x or parse_duration_x (FORM says which)
 * answered RC, may be kept (ZERO_REFUSED: it is 0 and must not be); says
 * why not. */
static bool number_ok(struct parser *p, int line, const char *key, const char *v, int rc,
                      const char *form, bool zero_refused)
{
    struct shown sh;
    if (rc == PARSE_RANGE)
        error_at(p, line, "%s: \"%s\" is too large", key, show(&sh, v));
    else if (rc)
        error_at(p, line, "%s: \"%s\" is not %s", key, show(&sh, v), form);
    else if (zero_refused)
        error_at(p, line, "%s: must be greater than 0", key);
    return !rc && !zero_refused;
}

/* A size into *OUT, which is left alone after an error (POSITIVE: 0 is one). */
static void get_size(struct parser *p, int line, const char *key, const char *v,
                     bool positive, uint64_t *out)
{
    uint64_t x = 0;
    int rc = parse_size_x(v, &x);
    if (number_ok(p, line, key, v, rc, SIZE_FORM, positive && x == 0))
        *out = x;
}

/* A duration, likewise. */
static void get_duration(struct parser *p, int line, const char *key, const char *v,
                         bool positive, int64_t *out)
{
    int64_t x = 0;
    int rc = parse_duration_x(v, &x);
    if (number_ok(p, line, key, v, rc, DURATION_FORM, positive && x == 0))
        *out = x;
}

static bool get_uint(struct parser *p, int line, const char *key, const char *v,
                     unsigned min, unsigned max, unsigned *out)
{
    struct shown sh;
    unsigned x;
    int rc = parse_uint(v, max, &x);
    if (rc == PARSE_SYNTAX) {
        error_at(p, line, "%s: \"%s\" is not a whole number", key, show(&sh, v));
        return false;
    }
    if (rc == PARSE_RANGE || x < min) {
        error_at(p, line, "%s: \"%s\" is out of range (%u to %u)", key, show(&sh, v), min, max);
        return false;
    }
    *out = x;
    return true;
}

static void set_str(char **dst, const char *v)
{
    free(*dst);
    *dst = xstrdup(v);
}

/* llama_server and nvml_library: a name without '/' is kept for a search
 * (PATH, the dynamic linker); a path is resolved against the config's
 * directory. */
static void set_name_or_path(struct parser *p, char **dst, const char *v)
{
    if (strchr(v, '/')) {
        free(*dst);
        *dst = path_resolve(p->dir, v);
    } else {
        set_str(dst, v);
    }
}

/* "host:port" or "[v6]:port"; returns the port, 0 after an error. */
static unsigned check_listen(struct parser *p, int line, const char *v)
{
    struct shown sh;
    const char *colon;
    if (v[0] == '[') {
        const char *close = strchr(v, ']');
        if (!close || close[1] != ':') {
            error_at(p, line, "listen: \"%s\" is not [IPv6]:PORT", show(&sh, v));
            return 0;
        }
        char *host = xstrndup(v + 1, (size_t)(close - v - 1));
        struct in6_addr a6;
        int ok = inet_pton(AF_INET6, host, &a6);
        free(host);
        if (ok != 1) {
            error_at(p, line, "listen: \"%s\" is not a valid IPv6 address", show(&sh, v));
            return 0;
        }
        colon = close + 1;
    } else {
        colon = strrchr(v, ':');
        if (!colon || colon == v) {
            error_at(p, line, "listen: \"%s\" is not HOST:PORT (e.g. 127.0.0.1:8080)", show(&sh, v));
            return 0;
        }
        for (const char *s = v; s < colon; s++) {
            if (*s == ':') {
                error_at(p, line, "listen: \"%s\": write an IPv6 address in brackets, [::1]:8080",
                         show(&sh, v));
                return 0;
            }
            if (is_blank(*s)) {
                error_at(p, line, "listen: \"%s\": the host contains whitespace", show(&sh, v));
                return 0;
            }
        }
    }
    unsigned port;
    int rc = parse_uint(colon + 1, 65535, &port);
    if (rc || port == 0) {
        error_at(p, line, "listen: \"%s\": the port must be a number from 1 to 65535", show(&sh, v));
        return 0;
    }
    return port;
}

/* args and default_args: llama-pool owns -m, --host and --port. */
static void check_args_words(struct parser *p, int line, const char *key, char **words)
{
    static const char *const owned[] = { "-m", "--model", "--host", "--port" };
    for (char **w = words; *w; w++) {
        for (size_t i = 0; i < sizeof owned / sizeof *owned; i++) {
            size_t ol = strlen(owned[i]);
            if (!strcmp(*w, owned[i]) || (owned[i][1] == '-' && !strncmp(*w, owned[i], ol) && (*w)[ol] == '=')) {
                error_at(p, line, "%s: \"%s\" is not allowed: llama-pool gives every child "
                         "-m PATH --host 127.0.0.1 --port P itself (set the model file with path =)",
                         key, owned[i]);
            }
        }
    }
}

/* Split V into words and append them to SV; false after an error. */
static bool add_words(struct parser *p, int line, const char *key, const char *v,
                      struct strvec *sv)
{
    char **words;
    size_t n;
    const char *err;
    if (config_split_words(v, &words, &n, &err)) {
        /* the line was cut at " ;" even inside quotes: say so. */
        bool cut = false;
        for (size_t i = 1; i < p->in.raw_len; i++)
            if (p->in.raw[i] == ';' && is_blank(p->in.raw[i - 1]))
                cut = true;
        error_at(p, line, "%s: %s%s", key, err,
                 cut ? " (note: ';' after whitespace starts a comment, even inside quotes)" : "");
        return false;
    }
    check_args_words(p, line, key, words);
    for (size_t i = 0; i < n; i++)
        strvec_push(sv, words[i]);
    free(words);
    return true;
}

/* Comma lists (api_keys, aliases, cors_origins): what each item must be. */
enum list_kind { LIST_KEYS, LIST_ALIASES, LIST_ORIGINS };

static bool is_default_port(const char *scheme, size_t slen, unsigned port)
{
    return (slen == 4 && !strncmp(scheme, "http", 4) && port == 80)
        || (slen == 5 && !strncmp(scheme, "https", 5) && port == 443);
}

/* An origin as browsers send it in "Origin:": "scheme://host[:port]",
 * lowercased, or "*". Returns the normalized copy, or NULL with *why set. */
static char *origin_normalize(const char *item, const char **why)
{
    if (!strcmp(item, "*"))
        return xstrdup("*");
    const char *sep = strstr(item, "://");
    size_t slen = sep ? (size_t)(sep - item) : 0;
    bool scheme_ok = slen > 0 && isalpha((unsigned char)item[0]);
    for (size_t i = 0; i < slen; i++)
        if (!isalnum((unsigned char)item[i]) && !strchr("+-.", item[i]))
            scheme_ok = false;
    if (!scheme_ok) {
        *why = "is not an origin: write scheme://host[:port] (https://app.example.com) or *";
        return NULL;
    }
    const char *host = sep + 3, *h = host;
    if (*h == '[') {                         /* [IPv6] */
        const char *close = strchr(h, ']');
        if (!close) {
            *why = "has '[' without ']' around its IPv6 address";
            return NULL;
        }
        char *addr = xstrndup(h + 1, (size_t)(close - h - 1));
        struct in6_addr a6;
        int ok = inet_pton(AF_INET6, addr, &a6);
        free(addr);
        if (ok != 1) {
            *why = "does not hold a valid IPv6 address in its brackets";
            return NULL;
        }
        h = close + 1;
    } else {
        while (isalnum((unsigned char)*h) || *h == '-' || *h == '.' || *h == '_')
            h++;
    }
    if (h == host) {
        *why = "has no host: write scheme://host[:port] (https://app.example.com)";
        return NULL;
    }
    if (*h == ':') {
        unsigned port;
        const char *digits = h + 1;
        size_t nd = strspn(digits, "0123456789");
        char *num = xstrndup(digits, nd);
        int rc = parse_uint(num, 65535, &port);
        free(num);
        if (rc || port == 0) {
            *why = "has a port that is not a number from 1 to 65535";
            return NULL;
        }
        if (is_default_port(item, slen, port) && !digits[nd]) {
            *why = "names its scheme's default port, which browsers leave out of Origin: write it without the port";
            return NULL;
        }
        h = digits + nd;
    }
    if (*h == '/' || *h == '?' || *h == '#') {
        *why = "has a path: an origin is only scheme://host[:port], with no '/' after it";
        return NULL;
    }
    if (*h) {
        *why = "is not an origin: the host may hold letters, digits, '-', '.' and '_' "
               "(write an international name in its xn-- form)";
        return NULL;
    }
    char *o = xstrdup(item);
    for (char *c = o; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    return o;
}

/* Checks one non-empty list item; returns what to keep (malloc'd) or NULL
 * after reporting why not. */
static char *list_item(struct parser *p, int line, const char *key, enum list_kind kind,
                       char *item, const struct strvec *sv)
{
    struct shown sh;
    const char *why = NULL;
    switch (kind) {
    case LIST_KEYS:
        for (const char *c = item; *c; c++)
            if (is_blank(*c) || (unsigned char)*c < 0x20 || *c == 0x7f) {
                error_at(p, line, "%s: \"%s\" contains whitespace or a control character",
                         key, show(&sh, item));
                free(item);
                return NULL;
            }
        return item;
    case LIST_ALIASES:
        if ((why = bad_name_text(item, true))) {
            error_at(p, line, "%s: invalid alias \"%s\": %s (%s)", key, show(&sh, item), why, ALIAS_RULE);
            free(item);
            return NULL;
        }
        return item;
    case LIST_ORIGINS: {
        char *o = origin_normalize(item, &why);
        if (!o) {
            error_at(p, line, "%s: \"%s\" %s", key, show(&sh, item), why);
        } else if ((!strcmp(o, "*") && sv->n) || (sv->n && !strcmp(sv->v[0], "*"))) {
            error_at(p, line, "%s: \"*\" already allows every origin: list it alone", key);
            free(o);
            o = NULL;
        }
        free(item);
        return o;
    }
    }
    free(item);
    return NULL;
}

/* No list is open any more (see list_open). */
static void list_forget(struct parser *p)
{
    p->list_open_line = 0;
    free(p->list_open_text);
    p->list_open_text = NULL;
}

/* A list's value ended with ',' on line LINE: fine when the list goes on
 * on an indented line, an empty item otherwise. */
static void list_open(struct parser *p, int line, const char *key, const char *v)
{
    p->list_open_line = line;
    free(p->list_open_text);
    p->list_open_text = xasprintf("%s: \"%s\"", key, v);
}

/* The line after an open list was no continuation of it: report the
 * trailing comma. */
static void list_close(struct parser *p)
{
    if (!p->list_open_line)
        return;
    struct shown sh;
    error_at(p, p->list_open_line, "%s has an empty item after its last ',' "
             "(a list may end a line with ',' only when it goes on on the next, indented, line)",
             show(&sh, p->list_open_text));
    list_forget(p);
}

/* Comma-separated items, trimmed. An empty item is an error (an empty API
 * key would turn authentication off), except that a line of a list that
 * takes several lines may end with ',' or, after a line that did not, begin
 * with one. An empty value is an empty list. */
static void add_list(struct parser *p, int line, const char *key, const char *v,
                     struct strvec *sv, int **lines, size_t *lines_cap, enum list_kind kind)
{
    struct shown sh;
    bool cont = p->in.kind == LINE_CONT;
    bool after_comma = p->list_open_line != 0;
    list_forget(p);
    if (!*v)
        return;

    bool empty_inside = false;
    const char *s = v;
    for (size_t i = 0;; i++) {
        const char *comma = strchr(s, ',');
        size_t len = comma ? (size_t)(comma - s) : strlen(s);
        char *item = trimmed_copy(s, len);
        if (!*item) {
            free(item);
            if (!comma && i > 0)
                list_open(p, line, key, v);          /* trailing ',' */
            else if (!(i == 0 && comma && cont && !after_comma))
                empty_inside = true;                 /* leading ',' is fine on a continuation */
        } else if ((item = list_item(p, line, key, kind, item, sv))) {
            if (lines) {
                xgrow(lines, lines_cap, sv->n + 1, sizeof **lines);
                (*lines)[sv->n] = line;
            }
            strvec_push(sv, item);
        }
        if (!comma)
            break;
        s = comma + 1;
    }
    if (empty_inside) {
        list_forget(p);                              /* one message for the line */
        error_at(p, line, "%s: \"%s\" has an empty item (a ',' with nothing before or after it)",
                 key, show(&sh, v));
    }
}

static bool valid_env_name(const char *s, size_t len)
{
    if (!len || !(isalpha((unsigned char)s[0]) || s[0] == '_'))
        return false;
    for (size_t i = 1; i < len; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '_'))
            return false;
    return true;
}

static void add_env(struct parser *p, int line, struct pmodel *pm, const char *v)
{
    struct config_model *m = &pm->model;
    struct shown sh;
    char **words;
    size_t n;
    const char *err;
    if (config_split_words(v, &words, &n, &err)) {
        error_at(p, line, "env: %s", err);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        char *w = words[i];
        char *eq = strchr(w, '=');
        if (!eq || !valid_env_name(w, (size_t)(eq - w))) {
            error_at(p, line, "env: \"%s\" is not NAME=VALUE with NAME made of letters, digits and '_'",
                     show(&sh, w));
            continue;
        }
        *eq = '\0';
        if (!strcmp(w, ROUTER_PORT_VAR)) {
            error_at(p, line, "env: " ROUTER_PORT_VAR " is not allowed: it turns llama-server "
                     "into a router child that exits when its stdin closes");
            continue;
        }
        bool dup = false;
        for (size_t j = 0; j < m->nenv; j++)
            if (!strcmp(m->env[j].name, w))
                dup = true;
        if (dup) {
            error_at(p, line, "env: %s is set twice", show(&sh, w));
            continue;
        }
        xgrow(&m->env, &pm->env_cap, m->nenv + 1, sizeof *m->env);
        m->env[m->nenv].name = xstrdup(w);
        m->env[m->nenv].value = xstrdup(eq + 1);
        m->nenv++;
    }
    util_strv_free(words);
}

static void append_text(char **text, const char *v)
{
    if (!*v)
        return;
    char *t = **text ? xasprintf("%s %s", *text, v) : xstrdup(v);
    if (*text != no_text)
        free(*text);
    *text = t;
}

/* Check that PATH is a readable regular file. */
static bool check_model_file(struct parser *p, int line, const char *model, const char *path)
{
    struct shown sh, sh2;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT)
            error_at(p, line, "model \"%s\": path \"%s\" does not exist",
                     show(&sh, model), show(&sh2, path));
        else
            error_at(p, line, "model \"%s\": path \"%s\" cannot be read: %s",
                     show(&sh, model), show(&sh2, path), strerror(e));
        return false;
    }
    struct stat st;
    bool ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    close(fd);
    if (!ok)
        error_at(p, line, "model \"%s\": path \"%s\" is not a regular file",
                 show(&sh, model), show(&sh2, path));
    return ok;
}

/* Every value must be UTF-8: names and paths end up in JSON, where
 * anything else is lost. False after reporting where it goes wrong. */
static bool value_is_utf8(struct parser *p, int line, const char *key, const char *v)
{
    size_t len = strlen(v), bad = util_utf8_check(v, len);
    if (bad == len)
        return true;
    error_at(p, line, "%s: the value is not valid UTF-8 (byte 0x%02X at position %zu of the value)",
             key, (unsigned char)v[bad], bad + 1);
    list_forget(p);                 /* the line is refused whole: no list to go on */
    return false;
}

/* routing, in [pool] and in a model: affinity or least_busy. */
static void get_routing(struct parser *p, int line, const char *v, enum config_routing *out)
{
    struct shown sh;
    if (!strcasecmp(v, "affinity"))
        *out = CONFIG_ROUTING_AFFINITY;
    else if (!strcasecmp(v, "least_busy"))
        *out = CONFIG_ROUTING_LEAST_BUSY;
    else
        error_at(p, line, "routing: \"%s\" is not affinity (the instance that holds the prompt's "
                 "prefix, else the least busy) or least_busy", show(&sh, v));
}

/* preload: none (also empty), or popular N with 1 <= N <= CONFIG_PRELOAD_MAX:
 * start one instance each of the N most used models at startup. */
static void get_preload(struct parser *p, int line, const char *v, unsigned *out)
{
    struct shown sh;
    size_t word = strcspn(v, " \t");
    if (!*v || !strcasecmp(v, "none")) {
        *out = 0;
        return;
    }
    if (word != 7 || strncasecmp(v, "popular", 7) != 0) {
        error_at(p, line, "preload: \"%s\" is not none or popular N (start the N most used models "
                 "at startup)", show(&sh, v));
        return;
    }
    const char *n = v + word + strspn(v + word, " \t");
    unsigned x = 0;
    int rc = *n ? parse_uint(n, CONFIG_PRELOAD_MAX, &x) : PARSE_SYNTAX;
    if (!*n)
        error_at(p, line, "preload: \"%s\" needs a number of models: popular N", show(&sh, v));
    else if (rc == PARSE_SYNTAX)
        error_at(p, line, "preload: \"%s\": N is not a whole number", show(&sh, v));
    else if (rc == PARSE_RANGE || x < 1)
        error_at(p, line, "preload: \"%s\": N is out of range (1 to %u)", show(&sh, v),
                 CONFIG_PRELOAD_MAX);
    else
        *out = x;
}

/* memory_budget and gpu_budget: auto, a size > 0, or N% (1-100). The
 * fields are left alone after an error. */
static void get_budget(struct parser *p, int line, const char *key, const char *v,
                       enum config_budget_kind *kind, uint64_t *bytes, unsigned *percent)
{
    struct shown sh;
    size_t len = strlen(v);
    if (!strcasecmp(v, "auto")) {
        *kind = CONFIG_BUDGET_AUTO;
    } else if (len && v[len - 1] == '%') {
        char *num = trimmed_copy(v, len - 1);
        unsigned pct;
        if (parse_uint(num, 1000, &pct) || pct < 1 || pct > 100)
            error_at(p, line, "%s: \"%s\": a percentage must be a whole number from 1%% to 100%%",
                     key, show(&sh, v));
        else {
            *kind = CONFIG_BUDGET_PERCENT;
            *percent = pct;
        }
        free(num);
    } else {
        uint64_t x = 0;
        int rc = parse_size_x(v, &x);
        if (rc == PARSE_SYNTAX)
            error_at(p, line, "%s: \"%s\" is not auto, a size (48G) or a percentage (75%%)",
                     key, show(&sh, v));
        else if (number_ok(p, line, key, v, rc, SIZE_FORM, x == 0)) {
            *kind = CONFIG_BUDGET_SIZE;
            *bytes = x;
        }
    }
}


/* fallback = URL: into *OUT (replacing what an earlier line gave); empty:
 * none. */
static void get_fallback(struct parser *p, int line, const char *v, struct config_fallback **out)
{
    struct shown sh;
    char err[300];
    config_fallback_free(*out);
    *out = NULL;
    if (!*v)
        return;
    struct config_fallback *fb = xcalloc(1, sizeof *fb);
    if (config_parse_fallback(v, fb, err, sizeof err) < 0) {
        error_at(p, line, "fallback: \"%s\": %s", show(&sh, v), err);
        config_fallback_free(fb);
        return;
    }
    *out = fb;
}

/* One value (or continuation) for [pool]. */
static void pool_value(struct parser *p, int k, const char *v)
{
    struct config *c = p->cfg;
    int line = p->in.lineno;
    const char *key = pool_keys[k];
    struct shown sh;

    if (!value_is_utf8(p, line, key, v))
        return;

    const struct number_key *nk = &pool_numbers[k];
    char *field = (char *)c + nk->offset;
    switch (nk->type) {
    case NK_SIZE:
        get_size(p, line, key, v, nk->positive, (uint64_t *)field);
        return;
    case NK_DURATION:
        get_duration(p, line, key, v, nk->positive, (int64_t *)field);
        return;
    case NK_COUNT:
        get_uint(p, line, key, v, nk->min, nk->max, (unsigned *)field);
        return;
    case NK_NONE:
        break;
    }

    switch ((enum pool_key)k) {
    case PK_LISTEN:
        if (!*v) {
            free(c->listen);
            c->listen = NULL;
        } else if (check_listen(p, line, v)) {
            set_str(&c->listen, v);
        }
        break;
    case PK_CONTROL_SOCKET: {
        if (!*v) {
            error_at(p, line, "control_socket: needs a path");
            break;
        }
        char *abs = path_resolve(p->dir, v);
        if (strlen(abs) >= sizeof ((struct sockaddr_un *)0)->sun_path) {
            error_at(p, line, "control_socket: \"%s\" is too long for a unix socket (max %zu bytes)",
                     show(&sh, abs), sizeof ((struct sockaddr_un *)0)->sun_path - 1);
            free(abs);
            break;
        }
        free(c->control_socket);
        c->control_socket = abs;
        break;
    }
    case PK_LLAMA_SERVER:
        if (!*v)
            error_at(p, line, "llama_server: needs a program name or path");
        else
            set_name_or_path(p, &c->llama_server, v);
        break;
    case PK_PORT_RANGE: {
        unsigned a, b;
        int rc = parse_uint_range(v, 65535, &a, &b);
        if (rc == PARSE_SYNTAX)
            error_at(p, line, "port_range: \"%s\" is not FIRST-LAST (e.g. 8100-8199)", show(&sh, v));
        else if (rc == PARSE_RANGE || a < 1 || a > b)
            error_at(p, line, "port_range: \"%s\": need 1 <= FIRST <= LAST <= 65535", show(&sh, v));
        else {
            c->port_min = a;
            c->port_max = b;
        }
        break;
    }
    case PK_MEMORY_BUDGET:
        get_budget(p, line, key, v, &c->budget_kind, &c->budget_bytes, &c->budget_percent);
        break;
    case PK_GPU_BUDGET:
        get_budget(p, line, key, v, &c->gpu_budget_kind, &c->gpu_budget_bytes, &c->gpu_budget_percent);
        break;
    case PK_ROUTING:
        get_routing(p, line, v, &c->routing);
        break;
    case PK_GPUS:
        if (!strcasecmp(v, "auto"))
            c->gpus = CONFIG_GPUS_AUTO;
        else if (!strcasecmp(v, "none"))
            c->gpus = CONFIG_GPUS_NONE;
        else
            error_at(p, line, "gpus: \"%s\" is not auto (use the GPUs NVML finds) or none (host memory only)",
                     show(&sh, v));
        break;
    case PK_NVML_LIBRARY:
        if (!*v)
            error_at(p, line, "nvml_library: needs a library name or path (libnvidia-ml.so.1)");
        else
            set_name_or_path(p, &c->nvml_library, v);
        break;
    case PK_LOG_DIR:
        if (!*v)
            error_at(p, line, "log_dir: needs a directory");
        else {
            free(c->log_dir);
            c->log_dir = path_resolve(p->dir, v);
        }
        break;
    case PK_MODELS_DIR:
        free(c->models_dir);
        c->models_dir = *v ? path_resolve(p->dir, v) : NULL;
        break;
    case PK_STATE_DIR:
        free(c->state_dir);
        c->state_dir = *v ? path_resolve(p->dir, v) : NULL;
        break;
    case PK_PRELOAD:
        get_preload(p, line, v, &c->preload_popular);
        break;
    case PK_DEFAULT_ARGS:
        add_words(p, line, key, v, &p->default_args);
        break;
    case PK_DEFAULT_MODEL:
        free(c->default_model);
        c->default_model = *v ? xstrdup(v) : NULL;
        break;
    case PK_API_KEYS:
        add_list(p, line, key, v, &p->api_keys, NULL, NULL, LIST_KEYS);
        break;
    case PK_ADMIN_KEY:
        free(c->admin_key);
        c->admin_key = *v ? xstrdup(v) : NULL;
        break;
    case PK_DRAIN_TIMEOUT:
        if (!*v)
            c->drain_timeout_ms = -1;   /* empty: follow stop_timeout, as when unset */
        else
            get_duration(p, line, key, v, false, &c->drain_timeout_ms);
        break;
    case PK_CORS_ORIGINS:
        add_list(p, line, key, v, &p->cors_origins, NULL, NULL, LIST_ORIGINS);
        break;
    case PK_EVICTION:
        if (!strcasecmp(v, "lru"))
            c->eviction = CONFIG_EVICTION_LRU;
        else if (!strcasecmp(v, "cost"))
            c->eviction = CONFIG_EVICTION_COST;
        else
            error_at(p, line, "eviction: \"%s\" is not lru (the model asked least recently goes first) "
                     "or cost (the one whose requests x reload time / size is lowest)", show(&sh, v));
        break;
    case PK_METRICS_CHILDREN:
        if (config_parse_bool(v, &c->metrics_children))
            error_at(p, line, "metrics_children: \"%s\" is not yes or no (yes/no, true/false, on/off, 1/0)",
                     show(&sh, v));
        break;
    case PK_FALLBACK:
        get_fallback(p, line, v, &c->fallback);
        break;
    case PK_FALLBACK_KEY:
        free(p->pool_fallback_key);
        p->pool_fallback_key = *v ? xstrdup(v) : NULL;
        break;
    case PK_FALLBACK_UNKNOWN:
        if (config_parse_bool(v, &c->fallback_unknown))
            error_at(p, line, "fallback_unknown: \"%s\" is not yes or no (yes/no, true/false, on/off, 1/0)",
                     show(&sh, v));
        break;
    case PK_MEMORY_HARD_LIMIT:
        if (config_parse_bool(v, &c->memory_hard_limit))
            error_at(p, line, "memory_hard_limit: \"%s\" is not yes or no (yes/no, true/false, on/off, 1/0)",
                     show(&sh, v));
        break;
    default:                    /* a number: read above */
        break;
    }
}

/* One value (or continuation) for a [model]. */
static void model_value(struct parser *p, struct pmodel *pm, int k, const char *v)
{
    struct config_model *m = &pm->model;
    int line = p->in.lineno;
    const char *key = model_keys[k];
    struct shown sh;

    if (!value_is_utf8(p, line, key, v))
        return;

    switch ((enum model_key)k) {
    case MK_PATH:
        if (!*v) {
            error_at(p, line, "path: needs the model's .gguf file");
            break;
        }
        free(m->path);
        m->path = path_resolve(p->dir, v);
        if (!check_model_file(p, line, m->name, m->path)) {
            free(m->path);      /* reported; key_line[MK_PATH] keeps "no path" quiet */
            m->path = NULL;
        }
        break;
    case MK_ARGS:
        add_words(p, line, key, v, &pm->args);
        append_text(&m->args_text, v);
        break;
    case MK_INSTANCES: {
        unsigned a, b;
        int rc;
        if (strchr(v, '-')) {
            rc = parse_uint_range(v, 65535, &a, &b);
        } else {
            a = 0;
            rc = parse_uint(v, 65535, &b);
        }
        if (rc == PARSE_SYNTAX)
            error_at(p, line, "instances: \"%s\" is not N or MIN-MAX (e.g. 2, or 1-3)", show(&sh, v));
        else if (rc == PARSE_RANGE)
            error_at(p, line, "instances: \"%s\" is too large", show(&sh, v));
        else if (b < 1)
            error_at(p, line, "instances: \"%s\": the maximum must be at least 1", show(&sh, v));
        else if (a > b)
            error_at(p, line, "instances: \"%s\": the minimum is larger than the maximum", show(&sh, v));
        else {
            m->instances_min = a;
            m->instances_max = b;
        }
        break;
    }
    case MK_MEMORY: {
        if (!strcasecmp(v, "auto")) {
            m->memory_kind = CONFIG_MEMORY_AUTO;
            break;
        }
        uint64_t x = 0;
        get_size(p, line, key, v, true, &x);
        if (x) {                /* else reported: 0 is refused */
            m->memory_kind = CONFIG_MEMORY_SIZE;
            m->memory_bytes = x;
        }
        break;
    }
    case MK_GPU_MEMORY:
        if (!strcasecmp(v, "auto"))
            m->gpu_memory = 0;
        else
            get_size(p, line, key, v, false, &m->gpu_memory);
        break;
    case MK_ROUTING:
        get_routing(p, line, v, &m->routing);
        break;
    case MK_PIN:
        if (config_parse_bool(v, &m->pin))
            error_at(p, line, "pin: \"%s\" is not yes or no (yes/no, true/false, on/off, 1/0)", show(&sh, v));
        break;
    case MK_MEMORY_HARD_LIMIT: {
        bool on;
        if (config_parse_bool(v, &on))
            error_at(p, line, "memory_hard_limit: \"%s\" is not yes or no (yes/no, true/false, on/off, 1/0)",
                     show(&sh, v));
        else
            m->memory_hard_limit = on;
        break;
    }
    case MK_IDLE_TIMEOUT:
        get_duration(p, line, key, v, false, &m->idle_timeout_ms);
        break;
    case MK_AFFINITY_WAIT:
        get_duration(p, line, key, v, false, &m->affinity_wait_ms);
        break;
    case MK_REQUEST_TIMEOUT:
        get_duration(p, line, key, v, false, &m->request_timeout_ms);
        break;
    case MK_PRIORITY: {
        char *end;
        errno = 0;
        long x = strtol(v, &end, 10);
        if (!*v || *end || end == v || isspace((unsigned char)*v))
            error_at(p, line, "priority: \"%s\" is not a whole number", show(&sh, v));
        else if (errno == ERANGE || x < -CONFIG_PRIORITY_MAX || x > CONFIG_PRIORITY_MAX)
            error_at(p, line, "priority: \"%s\" is out of range (%d to %d)", show(&sh, v),
                     -CONFIG_PRIORITY_MAX, CONFIG_PRIORITY_MAX);
        else
            m->priority = (int)x;
        break;
    }
    case MK_FALLBACK:
        m->fallback_set = true;         /* empty: none for this model, whatever [pool] says */
        get_fallback(p, line, v, &m->fallback);
        break;
    case MK_FALLBACK_KEY:
        free(pm->fallback_key);
        pm->fallback_key = *v ? xstrdup(v) : NULL;
        break;
    case MK_ALIASES:
        add_list(p, line, key, v, &pm->aliases, &pm->alias_lines, &pm->alias_lines_cap, LIST_ALIASES);
        break;
    case MK_ENV:
        add_env(p, line, pm, v);
        break;
    case MK__COUNT:
        break;
    }
}

/* One value (or continuation) for key K of the current section. */
static void section_value(struct parser *p, int k, const char *v)
{
    if (p->sec == SEC_POOL)
        pool_value(p, k, v);
    else
        model_value(p, &p->models[p->cur_model], k, v);
}

/* A "key = value" line. */
static void on_key(struct parser *p, const char *key, const char *v)
{
    struct shown sh, sh2;
    int line = p->in.lineno;

    p->cont = CONT_IGNORE;
    if (p->sec == SEC_IGNORE)
        return;
    if (p->sec == SEC_NONE) {
        error_at(p, line, "key \"%s\" is outside any section: put it under [pool] or [model NAME]",
                 show(&sh, key));
        return;
    }
    bool pool = p->sec == SEC_POOL;
    const struct section_def *sd = pool ? &pool_section : &model_section;
    int *key_line = pool ? p->pool_key_line : p->models[p->cur_model].key_line;
    char where[sizeof sh2.buf + 16];
    if (pool)
        snprintf(where, sizeof where, "[pool]");
    else
        snprintf(where, sizeof where, "[model %s]", show(&sh2, p->models[p->cur_model].model.name));

    int k = key_index(sd->keys, sd->nkeys, key);
    if (k < 0) {
        const char *hint = closest_key(sd->keys, sd->nkeys, key);
        if (hint)
            error_at(p, line, "unknown key \"%s\" in %s (did you mean %s?)", show(&sh, key), where, hint);
        else if (key_index(sd->other_keys, sd->nother_keys, key) >= 0)
            error_at(p, line, "unknown key \"%s\" in %s (%s)", show(&sh, key), where, sd->other_hint);
        else
            error_at(p, line, "unknown key \"%s\" in %s", show(&sh, key), where);
        return;
    }
    if (key_line[k]) {
        error_at(p, line, "key \"%s\" is repeated in %s (first at line %d)", key, where, key_line[k]);
        return;
    }
    key_line[k] = line;
    p->cont = sd->multiline & (UINT64_C(1) << k) ? CONT_VALUE : CONT_REFUSE;
    p->cont_key = k;
    section_value(p, k, v);
}

/* An indented line after the line of KEY: more of its value. */
static void on_continuation(struct parser *p, const char *key, const char *v)
{
    struct shown sh;
    switch (p->cont) {
    case CONT_IGNORE:
        break;
    case CONT_REFUSE:
        error_at(p, p->in.lineno, "\"%s\" takes one line: this indented line continues its value "
                 "(only args, default_args, aliases, api_keys and env take more lines)",
                 show(&sh, key));
        break;
    case CONT_VALUE:
        section_value(p, p->cont_key, v);
        break;
    }
}

/* Every line of the file, in order. */
static void parse_lines(struct parser *p)
{
    struct config_ini *in = &p->in;
    struct shown sh;
    while (config_ini_next(in)) {
        if (in->nul_at) {
            /* "args = -c 1\0 --evil" must not quietly become "-c 1" */
            error_at(p, in->lineno, "this line holds a NUL byte (at column %zu), which would cut it short",
                     in->nul_at);
        }
        switch (in->kind) {
        case LINE_SECTION:
            begin_section(p, in->text);
            break;
        case LINE_BAD_SECTION:
            p->sec = SEC_IGNORE;   /* its keys would only add noise */
            p->cont = CONT_IGNORE;
            error_at(p, in->lineno, "section header without ']'");
            break;
        case LINE_NO_VALUE:
            error_at(p, in->lineno, "expected \"key = value\", found \"%s\"", show(&sh, in->text));
            break;
        case LINE_BLANK:
        case LINE_KEY:
        case LINE_CONT:
            break;
        }
        /* A list whose line ended with ',' goes on only on its own
         * continuation lines. */
        if (p->list_open_line && in->kind != LINE_BLANK
            && !(in->kind == LINE_CONT && p->cont == CONT_VALUE))
            list_close(p);
        if (in->kind == LINE_KEY)
            on_key(p, in->key, in->value);
        else if (in->kind == LINE_CONT)
            on_continuation(p, in->key, in->value);
    }
    list_close(p);                 /* a list's last line ended with ',' */
}

/* ------------------------------------------------------------------ */
/* Whole-file checks                                                   */

/* The models that models_dir offers (config_discover) join the names: a
 * file whose name is no model name is skipped with a warning, two files
 * that give one name are an error, and a [model NAME] section without a
 * path takes the file of its name. */
static void merge_models_dir(struct parser *p)
{
    const char *dir = p->cfg->models_dir;
    int line = p->pool_key_line[PK_MODELS_DIR];
    struct shown sh;

    if (config_discover(dir, &p->found, &p->nfound)) {
        int e = errno;
        error_at(p, line, "models_dir: cannot open \"%s\": %s", show(&sh, dir), strerror(e));
        return;
    }
    for (size_t i = 0; i < p->nfound; i++) {
        struct config_found *f = &p->found[i];
        struct shown sh2;
        const char *why = bad_model_name(f->name);
        if (why) {
            /* One odd file among thousands must not refuse the whole
             * config (nor a reload): skip it, and say so. */
            char *fname = utf8_clean(xstrdup(f->fname));
            log_warn("%s:%d: models_dir: skipping \"%s\": its name is no model name: %s (%s); "
                     "rename the file, or give it a [model NAME] section with path =",
                     p->file, line, show(&sh, fname), why, NAME_RULE);
            free(fname);
            continue;
        }
        bool added;
        struct name_ent *e = name_add(&p->names, f->name, &added);
        if (added) {
            e->kind = NAME_FOUND;
            e->model = f->name;
            e->file = f->path;
            e->line = line;
            f->used = true;
        } else if (e->kind == NAME_FOUND) {
            error_at(p, line, "models_dir: \"%s\" and \"%s\" both give the model name \"%s\"",
                     show(&sh, e->file + strlen(dir) + 1), show(&sh2, f->fname), f->name);
        } else {
            /* a [model NAME] section overrides the discovered model */
            struct pmodel *pm = &p->models[e->index];
            if (!pm->key_line[MK_PATH])
                pm->model.path = xstrdup(f->path);
        }
    }
}

static void check_aliases(struct parser *p)
{
    for (size_t i = 0; i < p->nmodels; i++) {
        struct pmodel *pm = &p->models[i];
        const struct config_model *m = &pm->model;
        if (pm->dropped)
            continue;
        for (size_t j = 0; j < pm->aliases.n; j++) {
            const char *a = pm->aliases.v[j];
            int line = pm->alias_lines[j];
            struct shown sh, sh2;
            bool added;
            struct name_ent *e = name_add(&p->names, a, &added);
            if (added) {
                e->kind = NAME_ALIAS;
                e->model = m->name;
                e->line = line;
                continue;
            }
            if (e->kind == NAME_ALIAS && e->model == m->name)
                error_at(p, line, "alias \"%s\" of model \"%s\" is listed twice (first at line %d)",
                         show(&sh, a), show(&sh2, m->name), e->line);
            else if (e->kind == NAME_ALIAS)
                error_at(p, line, "alias \"%s\" of model \"%s\" is already an alias of model \"%s\" (line %d)",
                         show(&sh, a), show(&sh2, m->name), e->model, e->line);
            else if (e->model == m->name)
                error_at(p, line, "alias \"%s\" of model \"%s\" is the model's own name",
                         show(&sh, a), show(&sh2, m->name));
            else if (e->kind == NAME_SECTION)
                error_at(p, line, "alias \"%s\" of model \"%s\" is already the name of model \"%s\" (line %d)",
                         show(&sh, a), show(&sh2, m->name), e->model, e->line);
            else
                error_at(p, line, "alias \"%s\" of model \"%s\" is already the name of a model "
                         "found in models_dir (%s, line %d)", show(&sh, a), show(&sh2, m->name), e->file, e->line);
        }
    }
}

/* Each fallback_key joins the fallback of its own section: a key made for
 * [pool]'s fallback must not go to another host that a model names. */
static void fallback_keys(struct parser *p)
{
    struct config *c = p->cfg;
    if (p->pool_fallback_key) {
        if (c->fallback)
            c->fallback->key = p->pool_fallback_key;
        else
            error_at(p, p->pool_key_line[PK_FALLBACK_KEY],
                     "fallback_key: [pool] has no fallback for it to go to");
        if (!c->fallback)
            free(p->pool_fallback_key);
        p->pool_fallback_key = NULL;
    }
    for (size_t i = 0; i < p->nmodels; i++) {
        struct pmodel *pm = &p->models[i];
        if (!pm->fallback_key)
            continue;
        if (pm->model.fallback) {
            pm->model.fallback->key = pm->fallback_key;
        } else {
            if (!pm->dropped)
                error_at(p, pm->key_line[MK_FALLBACK_KEY],
                         "fallback_key: model \"%s\" has no fallback of its own for it to go to "
                         "(a model's fallback_key goes with its own fallback line)",
                         pm->model.name);
            free(pm->fallback_key);
        }
        pm->fallback_key = NULL;
    }
    if (c->fallback_unknown && !c->fallback)
        error_at(p, p->pool_key_line[PK_FALLBACK_UNKNOWN],
                 "fallback_unknown = yes: [pool] has no fallback to send those requests to");
}

static void finish(struct parser *p)
{
    struct config *c = p->cfg;
    struct shown sh;

    if (c->models_dir)
        merge_models_dir(p);

    for (size_t i = 0; i < p->nmodels; i++) {
        struct pmodel *pm = &p->models[i];
        const struct config_model *m = &pm->model;
        if (pm->dropped || m->path || pm->key_line[MK_PATH])
            continue;   /* has one, or its path line was already reported */
        if (c->models_dir)
            error_at(p, m->line, "model \"%s\" has no path, and models_dir has no %s.gguf",
                     show(&sh, m->name), show(&sh, m->name));
        else
            error_at(p, m->line, "model \"%s\" has no path", show(&sh, m->name));
    }

    check_aliases(p);
    fallback_keys(p);

    if (c->default_model && !name_find(&p->names, c->default_model))
        error_at(p, p->pool_key_line[PK_DEFAULT_MODEL],
                 "default_model: \"%s\" is not the name or alias of any model", show(&sh, c->default_model));

    if (c->listen) {
        const char *colon = strrchr(c->listen, ':');
        unsigned port = colon ? (unsigned)atoi(colon + 1) : 0;
        if (port >= c->port_min && port <= c->port_max) {
            int line = p->pool_key_line[PK_LISTEN] ? p->pool_key_line[PK_LISTEN]
                                                   : p->pool_key_line[PK_PORT_RANGE];
            error_at(p, line, "listen port %u is inside port_range %u-%u, which is for the children",
                     port, c->port_min, c->port_max);
        }
    }
}

/* Whether F is a model of its own: a name of its own (not a section's,
 * not another file's). */
static bool found_is_model(const struct parser *p, const struct config_found *f)
{
    const struct name_ent *e = f->used ? name_find(&p->names, f->name) : NULL;
    return e && e->kind == NAME_FOUND && e->file == f->path;
}

/* SV's words for a model: the shared empty vector when it has none. */
static char **words_take(struct strvec *sv, size_t *n)
{
    if (!sv->n) {
        strvec_free(sv);
        *n = 0;
        return no_words;
    }
    return strvec_take(sv, n);
}

/* Moves model FROM into cfg (FROM is left empty), with ARGS and ALIASES. */
static void add_model(struct config *c, struct config_model *from,
                      struct strvec *args, struct strvec *aliases)
{
    struct config_model *m = &c->models[c->nmodels++];
    *m = *from;
    *from = (struct config_model){ 0 };
    m->args = words_take(args, &m->nargs);
    m->aliases = words_take(aliases, &m->naliases);
}

/* Move the parsed models into cfg: sections in file order, then the ones
 * found in models_dir by name. */
static void build_models(struct parser *p)
{
    struct config *c = p->cfg;
    size_t n = 0;
    for (size_t i = 0; i < p->nmodels; i++)
        n += !p->models[i].dropped;
    for (size_t i = 0; i < p->nfound; i++)
        n += found_is_model(p, &p->found[i]);
    c->models = xcalloc(n, sizeof *c->models);

    for (size_t i = 0; i < p->nmodels; i++) {
        struct pmodel *pm = &p->models[i];
        if (!pm->dropped)
            add_model(c, &pm->model, &pm->args, &pm->aliases);
    }
    for (size_t i = 0; i < p->nfound; i++) {
        struct config_found *f = &p->found[i];
        if (!found_is_model(p, f))
            continue;
        struct config_model m;
        struct strvec none = { 0 };
        model_init(&m, f->name, f->path, 0);
        f->name = f->path = NULL;
        m.from_models_dir = true;
        add_model(c, &m, &none, &none);
    }
}

/* config->lookup: names and aliases are unique among all of them (the
 * parser refused the config otherwise), so a slot whose model has the
 * name, or the alias, asked for is the one. */
static void lookup_add(struct config *c, const char *key, size_t model)
{
    size_t i = (size_t)hash_str(key) & (c->lookup_cap - 1);
    while (c->lookup[i])
        i = (i + 1) & (c->lookup_cap - 1);
    c->lookup[i] = (uint32_t)model + 1;
}

static void build_lookup(struct config *c)
{
    size_t keys = 0;
    for (size_t i = 0; i < c->nmodels; i++)
        keys += 1 + c->models[i].naliases;
    size_t cap = 16;
    while (cap * 3 < keys * 4)          /* at most 3/4 full */
        cap *= 2;
    c->lookup = xcalloc(cap, sizeof *c->lookup);
    c->lookup_cap = cap;
    for (size_t i = 0; i < c->nmodels; i++) {
        lookup_add(c, c->models[i].name, i);
        for (size_t j = 0; j < c->models[i].naliases; j++)
            lookup_add(c, c->models[i].aliases[j], i);
    }
}

static bool model_is_called(const struct config_model *m, const char *name_or_alias)
{
    if (!strcmp(m->name, name_or_alias))
        return true;
    for (size_t j = 0; j < m->naliases; j++)
        if (!strcmp(m->aliases[j], name_or_alias))
            return true;
    return false;
}

static void set_defaults(struct config *c)
{
    c->listen = xstrdup("127.0.0.1:8080");
    c->control_socket = xstrdup("/run/llama-pool/control.sock");
    c->llama_server = xstrdup("llama-server");
    c->port_min = 8100;
    c->port_max = 8199;
    c->budget_kind = CONFIG_BUDGET_AUTO;
    c->memory_reserve = 2ULL << 30;
    c->gpus = CONFIG_GPUS_AUTO;
    c->routing = CONFIG_ROUTING_AFFINITY;
    c->nvml_library = xstrdup(CONFIG_DEFAULT_NVML_LIBRARY);
    c->gpu_budget_kind = CONFIG_BUDGET_AUTO;
    c->gpu_reserve = 1ULL << 30;
    c->idle_timeout_ms = 30 * 60 * 1000;
    c->affinity_wait_ms = 250;
    c->start_timeout_ms = 120 * 1000;
    c->stop_timeout_ms = 10 * 1000;
    c->health_interval_ms = 10 * 1000;
    c->max_queue = 256;
    c->queue_timeout_ms = 120 * 1000;
    c->max_restarts = 5;
    c->restart_window_ms = 5 * 60 * 1000;
    c->log_dir = xstrdup("/var/log/llama-pool");
    c->log_max_size = 100ULL << 20;
    c->log_keep = 3;
    c->models_dir = NULL;
    c->default_model = NULL;
    c->admin_key = NULL;
    c->max_body = 32ULL << 20;
    c->max_header = 64ULL << 10;
    c->header_timeout_ms = 10 * 1000;
    c->keepalive_timeout_ms = 60 * 1000;
    c->max_connections = 4096;
    c->body_timeout_ms = 60 * 1000;
    c->drain_timeout_ms = -1;           /* unset: stop_timeout, once it is known */
    c->state_dir = xstrdup(CONFIG_DEFAULT_STATE_DIR);
    c->preload_popular = 0;
    c->metrics_children = false;
}

static void parser_free(struct parser *p)
{
    free(p->dir);
    free(p->pool_fallback_key);
    for (size_t i = 0; i < p->nmodels; i++)
        free(p->models[i].fallback_key);
    config_ini_free(&p->in);
    free(p->list_open_text);
    strvec_free(&p->default_args);
    strvec_free(&p->api_keys);
    strvec_free(&p->cors_origins);
    for (size_t i = 0; i < p->nmodels; i++) {
        struct pmodel *pm = &p->models[i];
        model_free(&pm->model);
        strvec_free(&pm->args);
        strvec_free(&pm->aliases);
        free(pm->alias_lines);
    }
    free(p->models);
    config_found_free(p->found, p->nfound);
    free(p->names.v);
    for (size_t i = 0; i < p->nerrs; i++)
        free(p->errs[i].msg);
    free(p->errs);
}

struct sorted_err {
    int line;
    size_t pos;
    char *msg;
};

static int cmp_err(const void *a, const void *b)
{
    const struct sorted_err *x = a, *y = b;
    if (x->line != y->line)
        return x->line < y->line ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

/* Hand the errors over in line order (found order within a line), at most
 * MAX_REPORTED_ERRORS of them. */
static void give_errors(struct parser *p, struct config_errors *errs)
{
    size_t n = p->nerrs;
    struct sorted_err *t = xcalloc(n, sizeof *t);
    for (size_t i = 0; i < n; i++) {
        t[i].line = p->errs[i].line;
        t[i].pos = i;
        t[i].msg = p->errs[i].msg;
    }
    qsort(t, n, sizeof *t, cmp_err);
    size_t keep = n > MAX_REPORTED_ERRORS ? MAX_REPORTED_ERRORS - 1 : n;
    if (errs) {
        errs->msgs = xcalloc(keep + (n > keep), sizeof *errs->msgs);
        for (size_t i = 0; i < keep; i++) {
            errs->msgs[i] = t[i].msg;
            t[i].msg = NULL;
        }
        if (n > keep)
            errs->msgs[keep] = xasprintf("%s:%d: too many errors (%zu more not shown)",
                                         p->file, t[keep].line, n - keep);
        errs->n = keep + (n > keep);
    }
    for (size_t i = 0; i < n; i++)
        free(t[i].msg);
    free(t);
    free(p->errs);
    p->errs = NULL;
    p->nerrs = 0;
}

static void single_error(struct config_errors *errs, char *msg)
{
    msg = utf8_clean(msg);
    if (!errs) {
        free(msg);
        return;
    }
    errs->msgs = xcalloc(1, sizeof *errs->msgs);
    errs->msgs[0] = msg;
    errs->n = 1;
}

/* TEXT holds LEN bytes (NUL bytes among them, maybe), at most
 * CONFIG_MAX_BYTES. */
static struct config *load(const char *name, const char *text, size_t len,
                           struct config_errors *errs)
{
    struct parser p = { 0 };
    p.file = name;
    p.dir = file_dir(name);
    p.in.src = text;
    p.in.len = len;
    p.cfg = xcalloc(1, sizeof *p.cfg);
    p.cfg->file = xstrdup(name);
    set_defaults(p.cfg);

    parse_lines(&p);
    finish(&p);

    if (p.nerrs) {
        give_errors(&p, errs);
        parser_free(&p);
        config_free(p.cfg);
        return NULL;
    }
    struct config *c = p.cfg;
    c->default_args = strvec_take(&p.default_args, &c->ndefault_args);
    c->api_keys = strvec_take(&p.api_keys, &c->napi_keys);
    c->cors_origins = strvec_take(&p.cors_origins, &c->ncors_origins);
    if (c->drain_timeout_ms < 0)
        c->drain_timeout_ms = c->stop_timeout_ms;
    build_models(&p);
    build_lookup(c);
    parser_free(&p);
    return c;
}

/* ------------------------------------------------------------------ */
/* Public API                                                          */

static const char *file_kind(mode_t mode)
{
    if (S_ISDIR(mode))
        return "a directory";
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISCHR(mode))
        return "a character device";
    if (S_ISBLK(mode))
        return "a block device";
    if (S_ISSOCK(mode))
        return "a socket";
    return "not a plain file";
}

static char *too_large(const char *name)
{
    return xasprintf("%s: larger than %d bytes (%d MiB): too large for a pool.conf",
                     name, CONFIG_MAX_BYTES, CONFIG_MAX_BYTES >> 20);
}

static char *cannot_read(const char *path, int e)
{
    return xasprintf("%s: cannot read: %s", path, strerror(e));
}

/* Reads FD (PATH) to its end into TEXT. NULL on success, else the message. */
static char *read_open_file(int fd, const char *path, struct buf *text)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return cannot_read(path, errno);
    if (S_ISDIR(st.st_mode))
        return cannot_read(path, EISDIR);
    if (!S_ISREG(st.st_mode))
        return xasprintf("%s: cannot read: it is %s, not a regular file", path, file_kind(st.st_mode));
    if (st.st_size > CONFIG_MAX_BYTES)
        return too_large(path);
    xbuf_reserve(text, (size_t)st.st_size);
    /* The size may change while we read (or be 0, as in /proc): read
     * until the end, but stop once past the limit. */
    for (;;) {
        char chunk[16384];
        ssize_t r = read(fd, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return cannot_read(path, errno);
        if (r == 0)
            return NULL;
        if ((size_t)r > CONFIG_MAX_BYTES - text->len)
            return too_large(path);
        xbuf_append(text, chunk, (size_t)r);
    }
}

/* The whole of PATH, a regular file of at most CONFIG_MAX_BYTES, in TEXT
 * (empty on entry). NULL on success, else the message (TEXT freed).
 * O_NONBLOCK: opening a FIFO must not wait for a writer. */
static char *read_config_file(const char *path, struct buf *text)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0)
        return cannot_read(path, errno);
    char *err = read_open_file(fd, path, text);
    close(fd);
    if (err)
        buf_free(text);
    return err;
}

struct config *config_load(const char *path, struct config_errors *errs)
{
    if (errs) {
        errs->msgs = NULL;
        errs->n = 0;
    }
    struct buf text = { 0 };
    char *err = read_config_file(path, &text);
    if (err) {
        single_error(errs, err);
        return NULL;
    }
    struct config *c = load(path, text.data ? text.data : "", text.len, errs);
    buf_free(&text);
    return c;
}

struct config *config_load_string(const char *name, const char *text,
                                  struct config_errors *errs)
{
    if (errs) {
        errs->msgs = NULL;
        errs->n = 0;
    }
    size_t len = text ? strlen(text) : 0;
    if (len > CONFIG_MAX_BYTES) {
        single_error(errs, too_large(name));
        return NULL;
    }
    return load(name, text ? text : "", len, errs);
}

char *config_peek_pool_key(const char *path, const char *key)
{
    struct buf text = { 0 };
    char *err = read_config_file(path, &text);
    if (err) {
        free(err);
        return NULL;
    }
    struct config_ini in = { .src = text.data, .len = text.len };
    bool in_pool = false;
    char *value = NULL;
    while (!value && config_ini_next(&in)) {
        if (in.kind == LINE_SECTION || in.kind == LINE_BAD_SECTION)
            in_pool = in.kind == LINE_SECTION && !strcmp(in.text, "pool");
        else if (in.kind == LINE_KEY && in_pool && !strcmp(in.key, key) && *in.value)
            value = xstrdup(in.value);
    }
    config_ini_free(&in);
    buf_free(&text);
    return value;
}

void config_free(struct config *cfg)
{
    if (!cfg)
        return;
    free(cfg->file);
    free(cfg->listen);
    free(cfg->control_socket);
    free(cfg->llama_server);
    free(cfg->nvml_library);
    free(cfg->log_dir);
    free(cfg->models_dir);
    free(cfg->state_dir);
    util_strv_free(cfg->default_args);
    free(cfg->default_model);
    util_strv_free(cfg->api_keys);
    util_strv_free(cfg->cors_origins);
    free(cfg->admin_key);
    config_fallback_free(cfg->fallback);
    for (size_t i = 0; i < cfg->nmodels; i++)
        model_free(&cfg->models[i]);
    free(cfg->models);
    free(cfg->lookup);
    free(cfg);
}

void config_errors_free(struct config_errors *errs)
{
    if (!errs)
        return;
    for (size_t i = 0; i < errs->n; i++)
        free(errs->msgs[i]);
    free(errs->msgs);
    errs->msgs = NULL;
    errs->n = 0;
}

const struct config_model *config_find_model(const struct config *cfg,
                                             const char *name_or_alias)
{
    if (!cfg || !name_or_alias)
        return NULL;
    if (cfg->lookup_cap) {
        size_t mask = cfg->lookup_cap - 1;
        for (size_t i = (size_t)hash_str(name_or_alias) & mask; cfg->lookup[i]; i = (i + 1) & mask) {
            const struct config_model *m = &cfg->models[cfg->lookup[i] - 1];
            if (model_is_called(m, name_or_alias))
                return m;
        }
        return NULL;
    }
    for (size_t i = 0; i < cfg->nmodels; i++)
        if (!strcmp(cfg->models[i].name, name_or_alias))
            return &cfg->models[i];
    for (size_t i = 0; i < cfg->nmodels; i++)
        for (size_t j = 0; j < cfg->models[i].naliases; j++)
            if (!strcmp(cfg->models[i].aliases[j], name_or_alias))
                return &cfg->models[i];
    return NULL;
}

/* ------------------------------------------------------------------ */
/* fallback                                                            */

void config_fallback_free(struct config_fallback *fb)
{
    if (!fb)
        return;
    free(fb->url);
    free(fb->host);
    free(fb->prefix);
    free(fb->key);
    free(fb);
}

int config_parse_fallback(const char *url, struct config_fallback *fb, char *err, size_t errlen)
{
    static const char scheme[] = "http://";
    if (strncasecmp(url, "https://", 8) == 0) {
        snprintf(err, errlen, "https is not supported: llama-pool relays plain HTTP only; "
                              "put a local relay in front (nginx, see docs/nginx.md) and name it "
                              "here as http://");
        return -1;
    }
    if (strncasecmp(url, scheme, sizeof scheme - 1) != 0) {
        snprintf(err, errlen, "not an http:// URL (the form is http://HOST:PORT[/PREFIX])");
        return -1;
    }
    for (const char *c = url; *c; c++)
        if ((unsigned char)*c <= ' ' || *c == 0x7f || *c == '?' || *c == '#') {
            snprintf(err, errlen, "a fallback URL has no spaces, control characters, query or "
                                  "fragment (the form is http://HOST:PORT[/PREFIX])");
            return -1;
        }
    const char *auth = url + sizeof scheme - 1;
    size_t alen = strcspn(auth, "/");
    const char *path = auth + alen;
    if (memchr(auth, '@', alen)) {
        snprintf(err, errlen, "credentials in the URL are not supported (fallback_key sets the key)");
        return -1;
    }
    /* HOST, [V6] or HOST:PORT, [V6]:PORT */
    const char *host = auth, *port = NULL;
    size_t hlen;
    if (alen && *auth == '[') {
        const char *close = memchr(auth, ']', alen);
        if (!close) {
            snprintf(err, errlen, "an IPv6 address in brackets lacks its ']'");
            return -1;
        }
        host = auth + 1;
        hlen = (size_t)(close - host);
        if (close + 1 < auth + alen) {
            if (close[1] != ':') {
                snprintf(err, errlen, "after ']' comes :PORT or the path");
                return -1;
            }
            port = close + 2;
        }
    } else {
        const char *colon = memchr(auth, ':', alen);
        hlen = colon ? (size_t)(colon - auth) : alen;
        port = colon ? colon + 1 : NULL;
    }
    if (hlen == 0) {
        snprintf(err, errlen, "no host (the form is http://HOST:PORT[/PREFIX])");
        return -1;
    }
    char portbuf[8] = "80";       /* http's own when none is given */
    if (port) {
        size_t plen = (size_t)(auth + alen - port);
        unsigned long n = 0;
        bool digits = plen > 0 && plen < 6 && strspn(port, "0123456789") >= plen;
        if (digits)
            n = strtoul(port, NULL, 10);
        if (!digits || n == 0 || n > 65535) {
            snprintf(err, errlen, "the port is not a number from 1 to 65535");
            return -1;
        }
        snprintf(portbuf, sizeof portbuf, "%lu", n);
    }
    char *hostname = xstrndup(host, hlen);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICSERV }, *res = NULL;
    int rc = getaddrinfo(hostname, portbuf, &hints, &res);
    if (rc != 0 || !res) {
        snprintf(err, errlen, "cannot resolve \"%s\": %s", hostname,
                 rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        free(hostname);
        if (res)
            freeaddrinfo(res);
        return -1;
    }
    free(hostname);
    memcpy(&fb->addr, res->ai_addr, res->ai_addrlen);
    fb->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    size_t plen = strlen(path);
    while (plen && path[plen - 1] == '/')
        plen--;                         /* the target brings its own '/' */
    fb->url = xstrdup(url);
    fb->host = xstrndup(auth, alen);
    fb->prefix = xstrndup(path, plen);
    return 0;
}

const struct config_fallback *config_model_fallback(const struct config *cfg,
                                                    const struct config_model *m)
{
    if (m && m->fallback_set)
        return m->fallback;
    return cfg->fallback;
}
