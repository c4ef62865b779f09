/* config_args — what a loaded config says about a model's children, asked
 * at run time: the child's argv (instance), the value of one of its flags
 * (pool, memory, instance), and whether two definitions run the same child
 * (reload). */
#define _GNU_SOURCE
#include "config.h"
#include "config_internal.h"

static const char *env_value(const struct config_model *m, const char *name)
{
    for (size_t i = 0; i < m->nenv; i++)
        if (strcmp(m->env[i].name, name) == 0)
            return m->env[i].value;
    return NULL;
}

static bool word_in(char *const *v, size_t n, const char *word)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], word) == 0)
            return true;
    return false;
}

/* Whether M's own args or env turn llama-server's /metrics on: --metrics
 * (it has no "off" form) in default_args or args, or
 * LLAMA_ARG_ENDPOINT_METRICS with a value llama-server takes as true (its
 * is_truthy: on, enabled, true, 1; anything else leaves it off). */
static bool child_metrics_given(const struct config *cfg, const struct config_model *m)
{
    static const char *const truthy[] = { "on", "enabled", "true", "1" };
    if (word_in(cfg->default_args, cfg->ndefault_args, "--metrics") ||
        word_in(m->args, m->nargs, "--metrics"))
        return true;
    const char *env = env_value(m, "LLAMA_ARG_ENDPOINT_METRICS");
    for (size_t i = 0; env && i < sizeof truthy / sizeof *truthy; i++)
        if (strcmp(env, truthy[i]) == 0)
            return true;
    return false;
}

bool config_memory_hard_limit(const struct config *cfg, const struct config_model *m)
{
    return m->memory_hard_limit >= 0 ? m->memory_hard_limit == 1 : cfg->memory_hard_limit;
}

bool config_child_metrics(const struct config *cfg, const struct config_model *m)
{
    return cfg->metrics_children || child_metrics_given(cfg, m);
}

char **config_child_argv(const struct config *cfg,
                         const struct config_model *m, unsigned port)
{
    struct strvec v = { 0 };
    strvec_push(&v, xstrdup(cfg->llama_server));
    strvec_push(&v, xstrdup("-m"));
    strvec_push(&v, xstrdup(m->path));
    strvec_push(&v, xstrdup("--host"));
    strvec_push(&v, xstrdup("127.0.0.1"));
    strvec_push(&v, xstrdup("--port"));
    strvec_push(&v, xasprintf("%u", port));
    /* Answers name the model as configured, not its GGUF path (the child's
     * id is its first alias, else the -m string), unless args give one. */
    if (!config_child_arg(cfg, m, "-a", "--alias")) {
        strvec_push(&v, xstrdup("-a"));
        strvec_push(&v, xstrdup(m->name));
    }
    bool given;
    unsigned threads = config_child_http_threads(cfg, m, &given);
    if (!given) {
        strvec_push(&v, xstrdup("--threads-http"));
        strvec_push(&v, xasprintf("%u", threads));
    }
    /* metrics_children: the pool scrapes the child's /metrics, which
     * llama-server serves only with --metrics (else 501). */
    if (cfg->metrics_children && !child_metrics_given(cfg, m))
        strvec_push(&v, xstrdup("--metrics"));
    for (size_t i = 0; i < cfg->ndefault_args; i++)
        strvec_push(&v, xstrdup(cfg->default_args[i]));
    for (size_t i = 0; i < m->nargs; i++)
        strvec_push(&v, xstrdup(m->args[i]));
    return strvec_take(&v, NULL);
}

/* The value of FLAG (or LONGFLAG, also as --long=VALUE) last given in V
 * (N words), or FOUND when none is. */
static const char *arg_in(char *const *v, size_t n, const char *flag, const char *longflag,
                          const char *found)
{
    size_t ll = longflag ? strlen(longflag) : 0;
    for (size_t i = 0; i < n; i++) {
        if ((strcmp(v[i], flag) == 0 || (longflag && strcmp(v[i], longflag) == 0)) && i + 1 < n)
            found = v[++i];
        else if (longflag && strncmp(v[i], longflag, ll) == 0 && v[i][ll] == '=')
            found = v[i] + ll + 1;
    }
    return found;
}

const char *config_child_arg(const struct config *cfg, const struct config_model *m,
                             const char *flag, const char *longflag)
{
    const char *v = arg_in(cfg->default_args, cfg->ndefault_args, flag, longflag, NULL);
    return arg_in(m->args, m->nargs, flag, longflag, v);
}

unsigned config_child_slots(const struct config *cfg, const struct config_model *m)
{
    const char *v = config_child_arg(cfg, m, "-np", "--parallel");
    long n = v ? strtol(v, NULL, 10) : 0;
    return n > 0 ? (unsigned)n : 4;
}

unsigned config_child_http_threads(const struct config *cfg, const struct config_model *m,
                                   bool *given)
{
    /* llama-server takes an argument over its environment variable. */
    const char *v = config_child_arg(cfg, m, "--threads-http", "--threads-http");
    if (!v)
        v = env_value(m, "LLAMA_ARG_THREADS_HTTP");
    long n = v ? strtol(v, NULL, 10) : 0;
    *given = n > 0;
    if (n > 0)
        return n > 100000 ? 100000 : (unsigned)n;
    unsigned slots = config_child_slots(cfg, m);
    if (slots > 100000)
        slots = 100000;
    unsigned handoff = slots * 4 < CONFIG_HANDOFF_MAX ? slots * 4 : CONFIG_HANDOFF_MAX;
    return slots + handoff + 2;
}

bool config_child_gpus_fixed(const struct config *cfg, const struct config_model *m)
{
    static const char *const opts[][2] = {
        { "-dev", "--device" }, { "-ts", "--tensor-split" }, { "-sm", "--split-mode" },
        { "-mg", "--main-gpu" },
    };
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++)
        if (config_child_arg(cfg, m, opts[i][0], opts[i][1]))
            return true;
    return env_value(m, "CUDA_VISIBLE_DEVICES") != NULL;
}

/* 1 or 0 for the switch last given in V (N words), or FOUND when none is. */
static int switch_in(char *const *v, size_t n, const char *on, const char *onlong,
                     const char *off, const char *offlong, int found)
{
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(v[i], on) || !strcmp(v[i], onlong))
            found = 1;
        else if (!strcmp(v[i], off) || !strcmp(v[i], offlong))
            found = 0;
    }
    return found;
}

int config_child_switch(const struct config *cfg, const struct config_model *m,
                        const char *on, const char *onlong, const char *off, const char *offlong)
{
    int v = switch_in(cfg->default_args, cfg->ndefault_args, on, onlong, off, offlong, -1);
    return switch_in(m->args, m->nargs, on, onlong, off, offlong, v);
}

static bool str_eq(const char *a, const char *b)
{
    if (!a || !b)
        return a == b;
    return !strcmp(a, b);
}

static bool words_eq(char *const *a, size_t na, char *const *b, size_t nb)
{
    if (na != nb)
        return false;
    for (size_t i = 0; i < na; i++)
        if (strcmp(a[i], b[i]))
            return false;
    return true;
}

/* Whether B sets NAME to VALUE (names are unique within a model). */
static bool env_has(const struct config_model *b, const struct config_env *e)
{
    for (size_t j = 0; j < b->nenv; j++)
        if (!strcmp(e->name, b->env[j].name))
            return !strcmp(e->value, b->env[j].value);
    return false;
}

bool config_model_same_child(const struct config *a, const struct config_model *ma,
                             const struct config *b, const struct config_model *mb)
{
    if (!str_eq(a->llama_server, b->llama_server) || !str_eq(ma->path, mb->path))
        return false;
    if (!words_eq(a->default_args, a->ndefault_args, b->default_args, b->ndefault_args))
        return false;
    if (!words_eq(ma->args, ma->nargs, mb->args, mb->nargs))
        return false;
    /* env: names are unique within a model, so compare as sets */
    if (ma->nenv != mb->nenv)
        return false;
    for (size_t i = 0; i < ma->nenv; i++)
        if (!env_has(mb, &ma->env[i]))
            return false;
    return true;
}

enum config_routing config_model_routing(const struct config *cfg, const struct config_model *m)
{
    return m->routing != CONFIG_ROUTING_INHERIT ? m->routing : cfg->routing;
}

int64_t config_model_affinity_wait_ms(const struct config *cfg, const struct config_model *m)
{
    if (config_model_routing(cfg, m) != CONFIG_ROUTING_AFFINITY)
        return 0;
    return m->affinity_wait_ms >= 0 ? m->affinity_wait_ms : cfg->affinity_wait_ms;
}

int64_t config_model_request_timeout_ms(const struct config *cfg, const struct config_model *m)
{
    return m->request_timeout_ms >= 0 ? m->request_timeout_ms : cfg->request_timeout_ms;
}
