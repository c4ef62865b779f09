/* Unit tests for config: pool.conf → struct config, and every error shape. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "util.h"

/* The rules the messages end with (config.c's NAME_RULE and ALIAS_RULE). */
#define NAME_RULE "a model name is UTF-8 text without whitespace, control characters or any of " \
                  "/ \\ ? # % \" < > ` { }, and does not start with '.'"
#define ALIAS_RULE "an alias is UTF-8 text without whitespace, control characters, '?', '#' or '%'"
/* What a size and a duration look like (config.c's SIZE_FORM and DURATION_FORM). */
#define SIZE_FORM "a size (a number with an optional K, M, G or T: 512K, 1.5G)"
#define DURATION_FORM "a duration (a number with ms, s, m or h: 250ms, 10s, 30m, 2h)"

/* ------------------------------------------------------------------ */
/* Fixture: a temporary directory holding pool.conf's would-be home and  */
/* an (empty) model file m.gguf.                                         */

struct fx {
    char dir[64];
    char conf[128];   /* DIR/pool.conf: the name errors start with */
    char model[128];  /* DIR/m.gguf */
};

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void rm_rf(const char *dir)
{
    nftw(dir, rm_one, 64, FTW_DEPTH | FTW_PHYS);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof *f);
    strcpy(f->dir, "/tmp/test_config.XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    snprintf(f->conf, sizeof f->conf, "%s/pool.conf", f->dir);
    snprintf(f->model, sizeof f->model, "%s/m.gguf", f->dir);
    write_file(f->model, "");
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    rm_rf(f->dir);
    free(f);
    return 0;
}

static void print_errors(const struct config_errors *e)
{
    for (size_t i = 0; i < e->n; i++)
        print_message("  error: %s\n", e->msgs[i]);
}

/* Load TEXT as DIR/pool.conf; it must be accepted. */
static struct config *load_ok(struct fx *f, const char *text)
{
    struct config_errors e;
    struct config *c = config_load_string(f->conf, text, &e);
    size_t n = e.n;
    print_errors(&e);
    config_errors_free(&e);
    assert_non_null(c);
    assert_int_equal(n, 0);
    return c;
}

/* Load TEXT; it must be rejected with, among its errors, one that starts with
 * "DIR/pool.conf:LINE: " and contains every NULL-terminated fragment. */
static void expect_error(struct fx *f, const char *text, int line, ...)
{
    struct config_errors e;
    struct config *c = config_load_string(f->conf, text, &e);
    if (c)
        config_free(c);
    assert_null(c);
    assert_true(e.n >= 1);

    char prefix[256];
    snprintf(prefix, sizeof prefix, "%s:%d: ", f->conf, line);
    bool found = false;
    for (size_t i = 0; i < e.n && !found; i++) {
        if (strncmp(e.msgs[i], prefix, strlen(prefix)))
            continue;
        bool all = true;
        va_list ap;
        va_start(ap, line);
        for (const char *frag; (frag = va_arg(ap, const char *));)
            if (!strstr(e.msgs[i] + strlen(prefix), frag))
                all = false;
        va_end(ap);
        found = all;
    }
    if (!found) {
        print_message("expected an error at %s with the given words; got:\n", prefix);
        print_errors(&e);
    }
    assert_true(found);
    config_errors_free(&e);
}

/* Load TEXT; it must be rejected with exactly these messages (after the
 * "DIR/pool.conf:" prefix), in this order. */
static void expect_exact(struct fx *f, const char *text, ...)
{
    struct config_errors e;
    struct config *c = config_load_string(f->conf, text, &e);
    if (c)
        config_free(c);
    assert_null(c);

    va_list ap;
    va_start(ap, text);
    size_t i = 0;
    for (const char *want; (want = va_arg(ap, const char *)); i++) {
        char full[1024];
        snprintf(full, sizeof full, "%s:%s", f->conf, want);
        if (i >= e.n || strcmp(e.msgs[i], full)) {
            print_message("message %zu: want %s\n", i, full);
            print_errors(&e);
        }
        assert_true(i < e.n);
        assert_string_equal(e.msgs[i], full);
    }
    va_end(ap);
    if (e.n != i)
        print_errors(&e);
    assert_int_equal(e.n, i);
    config_errors_free(&e);
}

/* TEXT must be refused with exactly MESSAGE (after "DIR/pool.conf:"). */
struct refusal {
    const char *text;
    const char *message;
};

static void expect_refusals(struct fx *f, const struct refusal *r, size_t n)
{
    for (size_t i = 0; i < n; i++)
        expect_exact(f, r[i].text, r[i].message, NULL);
}

#define EXPECT_REFUSALS(f, table) expect_refusals(f, table, sizeof table / sizeof *table)

static const char *join(struct fx *f, const char *name)
{
    static char buf[4][256];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", f->dir, name);
    return buf[k];
}

/* ------------------------------------------------------------------ */
/* Defaults                                                            */

static void test_pool_defaults(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "");
    assert_string_equal(c->file, f->conf);
    assert_string_equal(c->listen, "127.0.0.1:8080");
    assert_string_equal(c->control_socket, "/run/llama-pool/control.sock");
    assert_string_equal(c->llama_server, "llama-server");
    assert_int_equal(c->port_min, 8100);
    assert_int_equal(c->port_max, 8199);
    assert_int_equal(c->budget_kind, CONFIG_BUDGET_AUTO);
    assert_int_equal(c->memory_reserve, 2ULL * 1024 * 1024 * 1024);
    assert_int_equal(c->idle_timeout_ms, 30 * 60 * 1000);
    assert_int_equal(c->start_timeout_ms, 120000);
    assert_int_equal(c->stop_timeout_ms, 10000);
    assert_int_equal(c->health_interval_ms, 10000);
    assert_int_equal(c->max_queue, 256);
    assert_int_equal(c->queue_timeout_ms, 120000);
    assert_int_equal(c->max_restarts, 5);
    assert_int_equal(c->restart_window_ms, 5 * 60 * 1000);
    assert_string_equal(c->log_dir, "/var/log/llama-pool");
    assert_null(c->models_dir);
    assert_non_null(c->default_args);
    assert_int_equal(c->ndefault_args, 0);
    assert_null(c->default_args[0]);
    assert_null(c->default_model);
    assert_non_null(c->api_keys);
    assert_int_equal(c->napi_keys, 0);
    assert_null(c->api_keys[0]);
    assert_null(c->admin_key);
    assert_int_equal(c->max_body, 32ULL * 1024 * 1024);
    assert_int_equal(c->max_header, 64 * 1024);
    assert_int_equal(c->header_timeout_ms, 10000);
    assert_int_equal(c->keepalive_timeout_ms, 60000);
    assert_int_equal(c->max_connections, 4096);
    assert_int_equal(c->body_timeout_ms, 60000);
    assert_int_equal(c->drain_timeout_ms, 10000);      /* unset: stop_timeout */
    assert_non_null(c->cors_origins);
    assert_int_equal(c->ncors_origins, 0);
    assert_null(c->cors_origins[0]);
    assert_string_equal(c->state_dir, "/var/lib/llama-pool");
    assert_int_equal(c->preload_popular, 0);
    assert_false(c->metrics_children);
    assert_int_equal(c->nmodels, 0);
    config_free(c);

    /* an empty [pool] section changes nothing */
    c = load_ok(f, "[pool]\n");
    assert_string_equal(c->listen, "127.0.0.1:8080");
    assert_int_equal(c->max_connections, 4096);
    config_free(c);
}

static void test_model_defaults(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "; models\n[model tiny]\npath = m.gguf\n");
    assert_int_equal(c->nmodels, 1);
    const struct config_model *m = &c->models[0];
    assert_string_equal(m->name, "tiny");
    assert_string_equal(m->path, f->model);       /* relative → config's directory */
    assert_non_null(m->args);
    assert_null(m->args[0]);
    assert_int_equal(m->nargs, 0);
    assert_string_equal(m->args_text, "");
    assert_int_equal(m->instances_min, 0);
    assert_int_equal(m->instances_max, 1);
    assert_int_equal(m->memory_kind, CONFIG_MEMORY_AUTO);
    assert_false(m->pin);
    assert_int_equal(m->idle_timeout_ms, -1);
    assert_non_null(m->aliases);
    assert_null(m->aliases[0]);
    assert_int_equal(m->naliases, 0);
    assert_int_equal(m->nenv, 0);
    assert_false(m->from_models_dir);
    assert_int_equal(m->line, 2);
    config_free(c);
}

/* ------------------------------------------------------------------ */
/* Every key, set                                                      */

static void test_every_pool_key(void **state)
{
    struct fx *f = *state;
    char text[2048];
    mkdir(join(f, "models"), 0755);
    snprintf(text, sizeof text,
             "[pool]\n"
             "listen = [::1]:9090\n"
             "control_socket = run/ctl.sock\n"
             "llama_server = /opt/llama/bin/llama-server\n"
             "port_range = 9100 - 9102\n"
             "memory_budget = 75%%\n"
             "memory_reserve = 512M\n"
             "idle_timeout = 0\n"
             "start_timeout = 1.5m\n"
             "stop_timeout = 250ms\n"
             "health_interval = 2s\n"
             "max_queue = 0\n"
             "queue_timeout = 1h\n"
             "max_restarts = 3\n"
             "restart_window = 90\n"
             "log_dir = ./logs/\n"
             "models_dir = models\n"
             "default_args = -cram 0 --no-webui\n"
             "default_model = tiny-alias\n"
             "api_keys = k1, k2 ,k3\n"
             "admin_key = s3cret\n"
             "max_body = 1.5MiB\n"
             "max_header = 8kb\n"
             "header_timeout = 3s\n"
             "keepalive_timeout = 0\n"
             "max_connections = 10\n"
             "body_timeout = 2m\n"
             "drain_timeout = 30s\n"
             "cors_origins = https://App.Example.com, http://localhost:3000\n"
             "metrics_children = yes\n"
             "[model tiny]\npath = m.gguf\naliases = tiny-alias\n");
    struct config *c = load_ok(f, text);
    assert_string_equal(c->listen, "[::1]:9090");
    assert_string_equal(c->control_socket, join(f, "run/ctl.sock"));
    assert_string_equal(c->llama_server, "/opt/llama/bin/llama-server");
    assert_int_equal(c->port_min, 9100);
    assert_int_equal(c->port_max, 9102);
    assert_int_equal(c->budget_kind, CONFIG_BUDGET_PERCENT);
    assert_int_equal(c->budget_percent, 75);
    assert_int_equal(c->memory_reserve, 512ULL << 20);
    assert_int_equal(c->idle_timeout_ms, 0);
    assert_int_equal(c->start_timeout_ms, 90000);
    assert_int_equal(c->stop_timeout_ms, 250);
    assert_int_equal(c->health_interval_ms, 2000);
    assert_int_equal(c->max_queue, 0);
    assert_int_equal(c->queue_timeout_ms, 3600000);
    assert_int_equal(c->max_restarts, 3);
    assert_int_equal(c->restart_window_ms, 90000);
    assert_string_equal(c->log_dir, join(f, "logs"));
    assert_string_equal(c->models_dir, join(f, "models"));
    assert_int_equal(c->ndefault_args, 3);
    assert_string_equal(c->default_args[0], "-cram");
    assert_string_equal(c->default_args[1], "0");
    assert_string_equal(c->default_args[2], "--no-webui");
    assert_null(c->default_args[3]);
    assert_string_equal(c->default_model, "tiny-alias");
    assert_int_equal(c->napi_keys, 3);
    assert_string_equal(c->api_keys[0], "k1");
    assert_string_equal(c->api_keys[1], "k2");
    assert_string_equal(c->api_keys[2], "k3");
    assert_null(c->api_keys[3]);
    assert_string_equal(c->admin_key, "s3cret");
    assert_int_equal(c->max_body, 1572864);
    assert_int_equal(c->max_header, 8192);
    assert_int_equal(c->header_timeout_ms, 3000);
    assert_int_equal(c->keepalive_timeout_ms, 0);
    assert_int_equal(c->max_connections, 10);
    assert_int_equal(c->body_timeout_ms, 120000);
    assert_int_equal(c->drain_timeout_ms, 30000);
    assert_int_equal(c->ncors_origins, 2);
    assert_string_equal(c->cors_origins[0], "https://app.example.com");   /* as browsers send it */
    assert_string_equal(c->cors_origins[1], "http://localhost:3000");
    assert_null(c->cors_origins[2]);
    assert_true(c->metrics_children);
    config_free(c);

    /* a relative llama_server without '/' is left for PATH lookup; with one
     * it is resolved like the other paths */
    c = load_ok(f, "[pool]\nllama_server = bin/llama-server\n");
    assert_string_equal(c->llama_server, join(f, "bin/llama-server"));
    config_free(c);

    /* empty values that mean "off" */
    c = load_ok(f, "[pool]\nlisten =\nmodels_dir =\ndefault_model =\nadmin_key =\napi_keys =\ndefault_args =\n"
                   "cors_origins =\n");
    assert_null(c->listen);
    assert_null(c->models_dir);
    assert_null(c->default_model);
    assert_null(c->admin_key);
    assert_int_equal(c->napi_keys, 0);
    assert_int_equal(c->ndefault_args, 0);
    assert_int_equal(c->ncors_origins, 0);
    config_free(c);

    c = load_ok(f, "[pool]\nmemory_budget = 48G\n");
    assert_int_equal(c->budget_kind, CONFIG_BUDGET_SIZE);
    assert_int_equal(c->budget_bytes, 48ULL << 30);
    config_free(c);
}

static void test_every_model_key(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f,
        "[model tiny]\n"
        "path = m.gguf\n"
        "args = -c 4096 -np 4 --alias \"tiny model\"\n"
        "instances = 1-3\n"
        "memory = 1.5G\n"
        "pin = yes\n"
        "idle_timeout = 10m\n"
        "aliases = gpt-3.5-turbo, tiny-1b ,org/tiny-1b\n"
        "env = OMP_NUM_THREADS=4 'GREETING=hello world' EMPTY=\n"
        "[model two]\n"
        "path = ./m.gguf\n"
        "instances = 3\n"
        "memory = auto\n"
        "pin = off\n"
        "idle_timeout = 0\n");
    assert_int_equal(c->nmodels, 2);
    const struct config_model *m = &c->models[0];
    assert_string_equal(m->path, f->model);
    assert_int_equal(m->nargs, 6);
    assert_string_equal(m->args[0], "-c");
    assert_string_equal(m->args[1], "4096");
    assert_string_equal(m->args[2], "-np");
    assert_string_equal(m->args[3], "4");
    assert_string_equal(m->args[4], "--alias");
    assert_string_equal(m->args[5], "tiny model");
    assert_null(m->args[6]);
    assert_string_equal(m->args_text, "-c 4096 -np 4 --alias \"tiny model\"");
    assert_int_equal(m->instances_min, 1);
    assert_int_equal(m->instances_max, 3);
    assert_int_equal(m->memory_kind, CONFIG_MEMORY_SIZE);
    assert_int_equal(m->memory_bytes, 1610612736ULL);
    assert_true(m->pin);
    assert_int_equal(m->idle_timeout_ms, 600000);
    assert_int_equal(m->naliases, 3);
    assert_string_equal(m->aliases[0], "gpt-3.5-turbo");
    assert_string_equal(m->aliases[1], "tiny-1b");
    assert_string_equal(m->aliases[2], "org/tiny-1b");
    assert_null(m->aliases[3]);
    assert_int_equal(m->nenv, 3);
    assert_string_equal(m->env[0].name, "OMP_NUM_THREADS");
    assert_string_equal(m->env[0].value, "4");
    assert_string_equal(m->env[1].name, "GREETING");
    assert_string_equal(m->env[1].value, "hello world");
    assert_string_equal(m->env[2].name, "EMPTY");
    assert_string_equal(m->env[2].value, "");

    m = &c->models[1];
    assert_string_equal(m->name, "two");
    assert_string_equal(m->path, f->model);
    assert_int_equal(m->line, 10);
    assert_int_equal(m->instances_min, 0);
    assert_int_equal(m->instances_max, 3);
    assert_int_equal(m->memory_kind, CONFIG_MEMORY_AUTO);
    assert_false(m->pin);
    assert_int_equal(m->idle_timeout_ms, 0);

    assert_ptr_equal(config_find_model(c, "tiny"), &c->models[0]);
    assert_ptr_equal(config_find_model(c, "gpt-3.5-turbo"), &c->models[0]);
    assert_ptr_equal(config_find_model(c, "org/tiny-1b"), &c->models[0]);
    assert_ptr_equal(config_find_model(c, "two"), &c->models[1]);
    assert_null(config_find_model(c, "three"));
    assert_null(config_find_model(c, "TINY"));
    config_free(c);
}

/* Lookups stay right past the table's growth and its collisions: 3,000
 * sections with two aliases each, and 500 files from models_dir. */
static void test_find_model_among_thousands(void **state)
{
    struct fx *f = *state;
    char dir[600];
    snprintf(dir, sizeof dir, "%s/many", f->dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    for (int i = 0; i < 500; i++) {
        char path[700];
        snprintf(path, sizeof path, "%s/file%03d.gguf", dir, i);
        write_file(path, "");
    }
    size_t cap = 3000 * 160 + 256, len = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    len += (size_t)snprintf(text + len, cap - len, "[pool]\nmodels_dir = %s\n", dir);
    for (int i = 0; i < 3000; i++)
        len += (size_t)snprintf(text + len, cap - len,
                                "[model s%d]\npath = %s\naliases = a%d, org/b%d\n", i, f->model, i, i);
    struct config *c = load_ok(f, text);
    free(text);
    assert_int_equal(c->nmodels, 3500);
    for (int i = 0; i < 3000; i++) {
        char name[32];
        const struct config_model *m = &c->models[i];
        snprintf(name, sizeof name, "s%d", i);
        assert_ptr_equal(config_find_model(c, name), m);
        snprintf(name, sizeof name, "a%d", i);
        assert_ptr_equal(config_find_model(c, name), m);
        snprintf(name, sizeof name, "org/b%d", i);
        assert_ptr_equal(config_find_model(c, name), m);
    }
    for (int i = 0; i < 500; i++) {
        char name[32];
        snprintf(name, sizeof name, "file%03d", i);
        const struct config_model *m = config_find_model(c, name);
        assert_non_null(m);
        assert_string_equal(m->name, name);
    }
    assert_null(config_find_model(c, "s3000"));
    assert_null(config_find_model(c, "a"));
    assert_null(config_find_model(c, ""));
    config_free(c);
}

/* ------------------------------------------------------------------ */
/* Value parsers                                                       */

static void test_parse_size(void **state)
{
    (void)state;
    static const struct { const char *s; uint64_t v; } good[] = {
        { "0", 0 }, { "512", 512 }, { "512B", 512 }, { "64K", 65536 }, { "64k", 65536 },
        { "64KB", 65536 }, { "64KiB", 65536 }, { "64kib", 65536 }, { "32M", 33554432 },
        { "2G", 2147483648ULL }, { "1.5G", 1610612736ULL }, { "0.5K", 512 },
        { "1T", 1099511627776ULL }, { "2 G", 2147483648ULL }, { "1.0001K", 1024 },
        { "18446744073709551615", UINT64_MAX },
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        uint64_t v = 12345;
        if (config_parse_size(good[i].s, &v))
            print_message("rejected %s\n", good[i].s);
        assert_int_equal(config_parse_size(good[i].s, &v), 0);
        assert_int_equal(v, good[i].v);
    }
    /* the largest T value that fits: integer part times 2^40, plus the fraction */
    uint64_t v = 0;
    assert_int_equal(config_parse_size("16777215.9999T", &v), 0);
    assert_int_equal(v, (16777215ULL << 40) + (9999ULL << 40) / 10000);
    static const char *const bad[] = {
        "", "-1", "+1", "G", "1X", "1.G", ".5G", "1..5", "1GG", "1iB", "1 G B", "1e3",
        "18446744073709551616", "16777216T", "99999999999999999999T", "1,5G", " 1G",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        uint64_t v = 777;
        if (!config_parse_size(bad[i], &v))
            print_message("accepted %s\n", bad[i]);
        assert_int_equal(config_parse_size(bad[i], &v), -1);
        assert_int_equal(v, 777);
    }
}

static void test_parse_duration(void **state)
{
    (void)state;
    static const struct { const char *s; int64_t ms; } good[] = {
        { "0", 0 }, { "10", 10000 }, { "10s", 10000 }, { "250ms", 250 }, { "30m", 1800000 },
        { "2h", 7200000 }, { "1.5s", 1500 }, { "0.5m", 30000 }, { "1.5h", 5400000 },
        { "10 s", 10000 }, { "10S", 10000 }, { "0.0001s", 1 } /* rounds up, never to 0 */,
        { "1.5", 1500 }, { "9223372036854775807ms", INT64_MAX },
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        int64_t v = -5;
        if (config_parse_duration(good[i].s, &v))
            print_message("rejected %s\n", good[i].s);
        assert_int_equal(config_parse_duration(good[i].s, &v), 0);
        assert_int_equal(v, good[i].ms);
    }
    static const char *const bad[] = {
        "", "-1", "-1s", "s", "10x", "10sec", "1d", "1.s", "ms", "10 m s",
        "9223372036854775808ms", "2562047788016h", "99999999999999999999",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        int64_t v = -5;
        if (!config_parse_duration(bad[i], &v))
            print_message("accepted %s\n", bad[i]);
        assert_int_equal(config_parse_duration(bad[i], &v), -1);
        assert_int_equal(v, -5);
    }
}

static void test_parse_bool(void **state)
{
    (void)state;
    static const char *const yes[] = { "yes", "YES", "true", "True", "on", "1" };
    static const char *const no[] = { "no", "No", "false", "FALSE", "off", "0" };
    for (size_t i = 0; i < 6; i++) {
        bool b = false;
        assert_int_equal(config_parse_bool(yes[i], &b), 0);
        assert_true(b);
        b = true;
        assert_int_equal(config_parse_bool(no[i], &b), 0);
        assert_false(b);
    }
    static const char *const bad[] = { "", "y", "n", "2", "enable", "yes please", "00" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        bool b = true;
        assert_int_equal(config_parse_bool(bad[i], &b), -1);
        assert_true(b);
    }
}

/* ------------------------------------------------------------------ */
/* Bad values: each type, with its message                             */

static void test_bad_pool_values(void **state)
{
    struct fx *f = *state;
    static const struct refusal refused[] = {
        { "[pool]\nmax_body = 12Q\n",
          "2: max_body: \"12Q\" is not " SIZE_FORM },
        { "[pool]\nmax_body = 0\n",
          "2: max_body: must be greater than 0" },
        { "[pool]\nmemory_reserve = 99999999T\n",
          "2: memory_reserve: \"99999999T\" is too large" },
        { "[pool]\nmemory_reserve = -1G\n",
          "2: memory_reserve: \"-1G\" is not " SIZE_FORM },
        { "[pool]\nidle_timeout = 5x\n",
          "2: idle_timeout: \"5x\" is not " DURATION_FORM },
        { "[pool]\nstart_timeout = 0\n",
          "2: start_timeout: must be greater than 0" },
        { "[pool]\nhealth_interval = 0s\n",
          "2: health_interval: must be greater than 0" },
        { "[pool]\nqueue_timeout = 9999999999999999h\n",
          "2: queue_timeout: \"9999999999999999h\" is too large" },
        { "[pool]\nmax_queue = lots\n",
          "2: max_queue: \"lots\" is not a whole number" },
        { "[pool]\nmax_queue = -1\n",
          "2: max_queue: \"-1\" is not a whole number" },
        { "[pool]\nmax_connections = 0\n",
          "2: max_connections: \"0\" is out of range (1 to 10000000)" },
        { "[pool]\nmax_restarts = 99999999999\n",
          "2: max_restarts: \"99999999999\" is out of range (0 to 1000000)" },
        { "[pool]\nport_range = 8100\n",
          "2: port_range: \"8100\" is not FIRST-LAST (e.g. 8100-8199)" },
        { "[pool]\nport_range = 8199-8100\n",
          "2: port_range: \"8199-8100\": need 1 <= FIRST <= LAST <= 65535" },
        { "[pool]\nport_range = 0-10\n",
          "2: port_range: \"0-10\": need 1 <= FIRST <= LAST <= 65535" },
        { "[pool]\nport_range = 9000-70000\n",
          "2: port_range: \"9000-70000\": need 1 <= FIRST <= LAST <= 65535" },
        { "[pool]\nmemory_budget = lots\n",
          "2: memory_budget: \"lots\" is not auto, a size (48G) or a percentage (75%)" },
        { "[pool]\nmemory_budget = 0%\n",
          "2: memory_budget: \"0%\": a percentage must be a whole number from 1% to 100%" },
        { "[pool]\nmemory_budget = 101%\n",
          "2: memory_budget: \"101%\": a percentage must be a whole number from 1% to 100%" },
        { "[pool]\nmemory_budget = 0\n",
          "2: memory_budget: must be greater than 0" },
        { "[pool]\ncontrol_socket =\n",
          "2: control_socket: needs a path" },
        { "[pool]\nllama_server =\n",
          "2: llama_server: needs a program name or path" },
        { "[pool]\nlog_dir =\n",
          "2: log_dir: needs a directory" },
    };
    EXPECT_REFUSALS(f, refused);
    expect_error(f, "[pool]\ncontrol_socket = /tmp/"
                    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock\n",
                 2, "control_socket: ", "is too long for a unix socket", NULL);
}

static void test_listen(void **state)
{
    struct fx *f = *state;
    static const char *const good[] = {
        "127.0.0.1:8080", "0.0.0.0:80", "localhost:65535", "[::]:8080", "[::1]:1", "[fe80::1]:9000",
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        char text[128];
        snprintf(text, sizeof text, "[pool]\nlisten = %s\n", good[i]);
        struct config *c = load_ok(f, text);
        assert_string_equal(c->listen, good[i]);
        config_free(c);
    }

    static const struct refusal refused[] = {
        { "[pool]\nlisten = 8080\n",
          "2: listen: \"8080\" is not HOST:PORT (e.g. 127.0.0.1:8080)" },
        { "[pool]\nlisten = :8080\n",
          "2: listen: \":8080\" is not HOST:PORT (e.g. 127.0.0.1:8080)" },
        { "[pool]\nlisten = ::1:8080\n",
          "2: listen: \"::1:8080\": write an IPv6 address in brackets, [::1]:8080" },
        { "[pool]\nlisten = [::1]8080\n",
          "2: listen: \"[::1]8080\" is not [IPv6]:PORT" },
        { "[pool]\nlisten = [nope]:8080\n",
          "2: listen: \"[nope]:8080\" is not a valid IPv6 address" },
        { "[pool]\nlisten = 127.0.0.1:0\n",
          "2: listen: \"127.0.0.1:0\": the port must be a number from 1 to 65535" },
        { "[pool]\nlisten = 127.0.0.1:65536\n",
          "2: listen: \"127.0.0.1:65536\": the port must be a number from 1 to 65535" },
        { "[pool]\nlisten = 127.0.0.1:http\n",
          "2: listen: \"127.0.0.1:http\": the port must be a number from 1 to 65535" },
        /* the proxy's port must not be one handed to children */
        { "[pool]\nport_range = 8000-8100\n",
          "2: listen port 8080 is inside port_range 8000-8100, which is for the children" },
        { "[pool]\nlisten = 127.0.0.1:8150\n",
          "2: listen port 8150 is inside port_range 8100-8199, which is for the children" },
    };
    EXPECT_REFUSALS(f, refused);
}

static void test_bad_model_values(void **state)
{
    struct fx *f = *state;
    static const struct refusal refused[] = {
        { "[model a]\npath = m.gguf\ninstances = 0\n",
          "3: instances: \"0\": the maximum must be at least 1" },
        { "[model a]\npath = m.gguf\ninstances = 0-0\n",
          "3: instances: \"0-0\": the maximum must be at least 1" },
        { "[model a]\npath = m.gguf\ninstances = 3-1\n",
          "3: instances: \"3-1\": the minimum is larger than the maximum" },
        { "[model a]\npath = m.gguf\ninstances = many\n",
          "3: instances: \"many\" is not N or MIN-MAX (e.g. 2, or 1-3)" },
        { "[model a]\npath = m.gguf\ninstances = 1-\n",
          "3: instances: \"1-\" is not N or MIN-MAX (e.g. 2, or 1-3)" },
        { "[model a]\npath = m.gguf\ninstances = 99999999\n",
          "3: instances: \"99999999\" is too large" },
        { "[model a]\npath = m.gguf\nmemory = lots\n",
          "3: memory: \"lots\" is not " SIZE_FORM },
        { "[model a]\npath = m.gguf\nmemory = 0\n",
          "3: memory: must be greater than 0" },
        { "[model a]\npath = m.gguf\npin = maybe\n",
          "3: pin: \"maybe\" is not yes or no (yes/no, true/false, on/off, 1/0)" },
        { "[model a]\npath = m.gguf\nidle_timeout = -1\n",
          "3: idle_timeout: \"-1\" is not " DURATION_FORM },
        { "[model a]\npath = m.gguf\naliases = ok, not ok\n",
          "3: aliases: invalid alias \"not ok\": it contains whitespace (" ALIAS_RULE ")" },
        { "[model a]\npath = m.gguf\nargs = --alias \"x\n",
          "3: args: unterminated double quote" },
        { "[model a]\npath = m.gguf\nargs = --chat-template \"a ; b\"\n",
          "3: args: unterminated double quote (note: ';' after whitespace starts a comment, even inside quotes)" },
        { "[model a]\npath =\n",
          "2: path: needs the model's .gguf file" },
    };
    EXPECT_REFUSALS(f, refused);
}

static void test_env(void **state)
{
    struct fx *f = *state;
    static const struct refusal refused[] = {
        { "[model a]\npath = m.gguf\nenv = 1BAD=x\n",
          "3: env: \"1BAD=x\" is not NAME=VALUE with NAME made of letters, digits and '_'" },
        { "[model a]\npath = m.gguf\nenv = NOVALUE\n",
          "3: env: \"NOVALUE\" is not NAME=VALUE with NAME made of letters, digits and '_'" },
        { "[model a]\npath = m.gguf\nenv = =x\n",
          "3: env: \"=x\" is not NAME=VALUE with NAME made of letters, digits and '_'" },
        { "[model a]\npath = m.gguf\nenv = A-B=1\n",
          "3: env: \"A-B=1\" is not NAME=VALUE with NAME made of letters, digits and '_'" },
        { "[model a]\npath = m.gguf\nenv = A=1 LLAMA_SERVER_ROUTER_PORT=9000\n",
          "3: env: LLAMA_SERVER_ROUTER_PORT is not allowed: it turns llama-server into a router "
          "child that exits when its stdin closes" },
        { "[model a]\npath = m.gguf\nenv = A=1\n  A=2\n",
          "4: env: A is set twice" },
        { "[model a]\npath = m.gguf\nenv = 'A=1\n",
          "3: env: unterminated single quote" },
    };
    EXPECT_REFUSALS(f, refused);

    struct config *c = load_ok(f, "[model a]\npath = m.gguf\nenv = _X=a=b CUDA_VISIBLE_DEVICES=0,1\n");
    assert_int_equal(c->models[0].nenv, 2);
    assert_string_equal(c->models[0].env[0].name, "_X");
    assert_string_equal(c->models[0].env[0].value, "a=b");
    assert_string_equal(c->models[0].env[1].name, "CUDA_VISIBLE_DEVICES");
    assert_string_equal(c->models[0].env[1].value, "0,1");
    config_free(c);
}

static void test_owned_args_refused(void **state)
{
    struct fx *f = *state;
    static const char *const words[] = { "-m", "--model", "--host", "--port", "--model=x.gguf", "--port=1" };
    static const char *const shown[] = { "-m", "--model", "--host", "--port", "--model", "--port" };
    for (size_t i = 0; i < sizeof words / sizeof *words; i++) {
        char text[256], want[512];
        snprintf(text, sizeof text, "[model a]\npath = m.gguf\nargs = -c 512 %s foo\n", words[i]);
        snprintf(want, sizeof want, "3: args: \"%s\" is not allowed: llama-pool gives every child "
                 "-m PATH --host 127.0.0.1 --port P itself (set the model file with path =)", shown[i]);
        expect_exact(f, text, want, NULL);
        snprintf(text, sizeof text, "[pool]\ndefault_args = %s foo\n", words[i]);
        snprintf(want, sizeof want, "2: default_args: \"%s\" is not allowed: llama-pool gives every child "
                 "-m PATH --host 127.0.0.1 --port P itself (set the model file with path =)", shown[i]);
        expect_exact(f, text, want, NULL);
    }
    /* look-alikes are fine */
    struct config *c = load_ok(f, "[model a]\npath = m.gguf\nargs = -mg 0 --model-draft d.gguf --hostx\n");
    assert_int_equal(c->models[0].nargs, 5);
    config_free(c);
}

/* ------------------------------------------------------------------ */
/* Structure errors                                                    */

static void test_duplicates(void **state)
{
    struct fx *f = *state;
    static const struct refusal refused[] = {
        { "[model a]\npath = m.gguf\n[model b]\npath = m.gguf\n[model a]\npath = m.gguf\n",
          "5: model \"a\" is defined twice (first at line 1)" },
        { "[model a]\npath = m.gguf\naliases = x, y\n[model b]\npath = m.gguf\naliases = z,\n  y\n",
          "7: alias \"y\" of model \"b\" is already an alias of model \"a\" (line 3)" },
        /* an alias equal to another model's name: both lines named, whichever comes first */
        { "[model a]\npath = m.gguf\naliases = b\n[model b]\npath = m.gguf\n",
          "3: alias \"b\" of model \"a\" is already the name of model \"b\" (line 4)" },
        { "[model a]\npath = m.gguf\n[model b]\npath = m.gguf\naliases = a\n",
          "5: alias \"a\" of model \"b\" is already the name of model \"a\" (line 1)" },
        { "[model a]\npath = m.gguf\naliases = a\n",
          "3: alias \"a\" of model \"a\" is the model's own name" },
        { "[model a]\npath = m.gguf\naliases = x, x\n",
          "3: alias \"x\" of model \"a\" is listed twice (first at line 3)" },
        { "[pool]\n[pool]\n",
          "2: [pool] appears twice (first at line 1)" },
        { "[pool]\nmax_queue = 1\nmax_queue = 2\n",
          "3: key \"max_queue\" is repeated in [pool] (first at line 2)" },
        { "[model a]\npath = m.gguf\nargs = -c 1\npin = no\nargs = -c 2\n",
          "5: key \"args\" is repeated in [model a] (first at line 3)" },
    };
    EXPECT_REFUSALS(f, refused);
    /* each message on its own line */
    expect_exact(f, "[pool]\nmax_queue = 1\n[pool]\nmax_queue = 2\n",
                 "3: [pool] appears twice (first at line 1)",
                 "4: key \"max_queue\" is repeated in [pool] (first at line 2)", NULL);
}

static void test_unknown_keys(void **state)
{
    struct fx *f = *state;
    static const struct refusal refused[] = {
        { "[model tiny]\npath = m.gguf\nintances = 2\n",
          "3: unknown key \"intances\" in [model tiny] (did you mean instances?)" },
        { "[model tiny]\npath = m.gguf\nalias = x\n",
          "3: unknown key \"alias\" in [model tiny] (did you mean aliases?)" },
        { "[model tiny]\npath = m.gguf\nPin = yes\n",
          "3: unknown key \"Pin\" in [model tiny] (did you mean pin?)" },
        { "[pool]\nlisen = 1.2.3.4:5\n",
          "2: unknown key \"lisen\" in [pool] (did you mean listen?)" },
        { "[pool]\nmax_bdoy = 1M\n",
          "2: unknown key \"max_bdoy\" in [pool] (did you mean max_body?)" },
        { "[pool]\ncolour = blue\n",
          "2: unknown key \"colour\" in [pool]" },
        { "[pool]\nenv = A=1\n",
          "2: unknown key \"env\" in [pool] (it belongs in a [model NAME] section)" },
        { "[model tiny]\npath = m.gguf\nmax_queue = 3\n",
          "3: unknown key \"max_queue\" in [model tiny] (it belongs in [pool])" },
        /* continuation lines of an unknown key say nothing more */
        { "[model tiny]\npath = m.gguf\nextra = 1\n  2\n  3\n",
          "3: unknown key \"extra\" in [model tiny]" },
    };
    EXPECT_REFUSALS(f, refused);
}

static void test_sections_and_syntax(void **state)
{
    struct fx *f = *state;
    static const struct refusal refused[] = {
        { "[models tiny]\npath = m.gguf\n",
          "1: unknown section [models tiny]: sections are [pool] and [model NAME]" },
        { "[global]\nlisten = x\n",
          "1: unknown section [global]: sections are [pool] and [model NAME]" },
        { "[model]\npath = m.gguf\n",
          "1: [model] needs a name: [model NAME]" },
        { "[model   ]\n",
          "1: [model] needs a name: [model NAME]" },
        { "[model a/b]\npath = m.gguf\n",
          "1: invalid model name \"a/b\": it contains '/' (" NAME_RULE ")" },
        { "[model .hidden]\npath = m.gguf\n",
          "1: invalid model name \".hidden\": it starts with '.' (" NAME_RULE ")" },
        { "[model a b]\npath = m.gguf\n",
          "1: invalid model name \"a b\": it contains whitespace (" NAME_RULE ")" },
        { "listen = 1.2.3.4:80\n[pool]\n",
          "1: key \"listen\" is outside any section: put it under [pool] or [model NAME]" },
        { "[pool\nlisten = 1.2.3.4:80\n",
          "1: section header without ']'" },
        { "[pool]\njust some words\n",
          "2: expected \"key = value\", found \"just some words\"" },
        { "[model a]\n",
          "1: model \"a\" has no path" },
    };
    EXPECT_REFUSALS(f, refused);
    /* sections tolerate spaces and a trailing comment */
    struct config *c = load_ok(f, "[ model  spaced ] ; note\npath = m.gguf\n[ pool ]\n");
    assert_string_equal(c->models[0].name, "spaced");
    config_free(c);
}

static void test_all_errors_collected_in_line_order(void **state)
{
    struct fx *f = *state;
    expect_exact(f,
                 "[pool]\n"
                 "max_body = x\n"               /* 2 */
                 "default_model = ghost\n"      /* 3: found after the parse */
                 "bogus = 1\n"                  /* 4 */
                 "[model a]\n"                  /* 5: no path */
                 "pin = perhaps\n"              /* 6 */
                 "[model b]\n"
                 "path = m.gguf\n"
                 "aliases = a\n",               /* 9 */
                 "2: max_body: \"x\" is not a size (a number with an optional K, M, G or T: 512K, 1.5G)",
                 "3: default_model: \"ghost\" is not the name or alias of any model",
                 "4: unknown key \"bogus\" in [pool]",
                 "5: model \"a\" has no path",
                 "6: pin: \"perhaps\" is not yes or no (yes/no, true/false, on/off, 1/0)",
                 "9: alias \"a\" of model \"b\" is already the name of model \"a\" (line 5)",
                 NULL);
}

static void test_too_many_errors(void **state)
{
    struct fx *f = *state;
    size_t cap = 150 * 16 + 16;
    char *text = malloc(cap), *p = text;
    p += sprintf(p, "[pool]\n");
    for (int i = 0; i < 150; i++)
        p += sprintf(p, "nope%d = 1\n", i);
    struct config_errors e;
    assert_null(config_load_string(f->conf, text, &e));
    assert_int_equal(e.n, 100);
    char want[256];
    snprintf(want, sizeof want, "%s:101: too many errors (51 more not shown)", f->conf);
    assert_string_equal(e.msgs[99], want);
    snprintf(want, sizeof want, "%s:2: unknown key \"nope0\" in [pool]", f->conf);
    assert_string_equal(e.msgs[0], want);
    config_errors_free(&e);
    assert_int_equal(e.n, 0);
    free(text);
}

static void test_default_model(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[pool]\ndefault_model = t\n[model tiny]\npath = m.gguf\naliases = t\n");
    assert_string_equal(c->default_model, "t");
    config_free(c);
    c = load_ok(f, "[pool]\ndefault_model = tiny\n[model tiny]\npath = m.gguf\n");
    assert_string_equal(c->default_model, "tiny");
    config_free(c);
    expect_exact(f, "[pool]\ndefault_model = tinny\n[model tiny]\npath = m.gguf\n",
                 "2: default_model: \"tinny\" is not the name or alias of any model", NULL);
}

/* ------------------------------------------------------------------ */
/* Files                                                               */

static void test_model_file_checks(void **state)
{
    struct fx *f = *state;
    char want[512];
    snprintf(want, sizeof want, "3: model \"x\": path \"%s/missing.gguf\" does not exist", f->dir);
    expect_exact(f, "[model x]\n\npath = missing.gguf\n", want, NULL);
    snprintf(want, sizeof want, "2: model \"x\": path \"/nonexistent/dir/m.gguf\" does not exist");
    expect_exact(f, "[model x]\npath = /nonexistent/dir/m.gguf\n", want, NULL);
    mkdir(join(f, "sub"), 0755);
    snprintf(want, sizeof want, "2: model \"x\": path \"%s/sub\" is not a regular file", f->dir);
    expect_exact(f, "[model x]\npath = sub/\n", want, NULL);
    if (geteuid() != 0) {   /* root reads anything */
        write_file(join(f, "locked.gguf"), "");
        chmod(join(f, "locked.gguf"), 0);
        snprintf(want, sizeof want, "2: model \"x\": path \"%s/locked.gguf\" cannot be read: Permission denied",
                 f->dir);
        expect_exact(f, "[model x]\npath = locked.gguf\n", want, NULL);
    }
    /* absolute paths are kept, tidied */
    char text[256];
    snprintf(text, sizeof text, "[model x]\npath = %s//./m.gguf\n", f->dir);
    struct config *c = load_ok(f, text);
    assert_string_equal(c->models[0].path, f->model);
    config_free(c);
}

static void test_config_load_file(void **state)
{
    struct fx *f = *state;
    struct config_errors e;
    char path[256], want[512];

    snprintf(path, sizeof path, "%s/nope.conf", f->dir);
    assert_null(config_load(path, &e));
    assert_int_equal(e.n, 1);
    snprintf(want, sizeof want, "%s: cannot read: No such file or directory", path);
    assert_string_equal(e.msgs[0], want);
    config_errors_free(&e);

    assert_null(config_load(f->dir, &e));
    assert_int_equal(e.n, 1);
    snprintf(want, sizeof want, "%s: cannot read: Is a directory", f->dir);
    assert_string_equal(e.msgs[0], want);
    config_errors_free(&e);

    snprintf(path, sizeof path, "%s/real.XXXXXX", f->dir);
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "\xEF\xBB\xBF[pool]\r\nmax_queue = 7\r\n[model m]\r\npath = m.gguf ; relative to this file\r\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    struct config *c = config_load(path, &e);
    if (!c)
        print_errors(&e);
    assert_non_null(c);
    assert_int_equal(e.n, 0);
    assert_string_equal(c->file, path);
    assert_int_equal(c->max_queue, 7);
    assert_string_equal(c->models[0].path, f->model);
    assert_int_equal(c->models[0].line, 3);
    config_free(c);

    /* errors from a file name it and the line */
    write_file(path, "[pool]\n\nmax_queue = x\n");
    assert_null(config_load(path, &e));
    assert_int_equal(e.n, 1);
    snprintf(want, sizeof want, "%s:3: max_queue: \"x\" is not a whole number", path);
    assert_string_equal(e.msgs[0], want);
    config_errors_free(&e);
    unlink(path);
}

/* The CLI reads one key, with the daemon's line rules, from any file. */
static void test_peek_finds_a_pool_key_in_a_config_with_errors(void **state)
{
    struct fx *f = *state;
    char *comment = malloc(5001);
    memset(comment, 'c', 5000);
    comment[5000] = '\0';
    char *text = NULL;
    assert_true(asprintf(&text,
                         "; %s\n"                                    /* longer than inih's 200 bytes */
                         "[model x]\ncontrol_socket = not-this.sock\n"  /* [model]: not [pool] */
                         "[ pool ]\n"
                         "bogus = 1\n"
                         "control_socket =\n"                        /* empty: not an answer */
                         "control_socket = run/ctl.sock ; a comment\n"
                         "control_socket = second.sock\n",
                         comment) > 0);
    write_file(f->conf, text);
    char *v = config_peek_pool_key(f->conf, "control_socket");
    assert_string_equal(v, "run/ctl.sock");     /* as written: the CLI resolves it */
    free(v);
    assert_null(config_peek_pool_key(f->conf, "listen"));
    write_file(f->conf, "[pool\ncontrol_socket = a.sock\n");
    assert_null(config_peek_pool_key(f->conf, "control_socket"));
    assert_null(config_peek_pool_key(f->dir, "control_socket"));      /* not a file */
    assert_null(config_peek_pool_key(join(f, "none.conf"), "control_socket"));
    free(text);
    free(comment);
}

/* ------------------------------------------------------------------ */
/* Line syntax (inih's rules): comments, continuations, long lines     */

static void test_comments(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f,
        "# hash comment\n"
        "; semicolon comment\n"
        "[pool]\n"
        "api_keys = a;b, c ; the rest is a comment\n"
        "admin_key = x#y\n"
        "[model m]\n"
        "path = m.gguf\n"
        "args = -c 4096\t; comment after a tab\n");
    assert_int_equal(c->napi_keys, 2);
    assert_string_equal(c->api_keys[0], "a;b");
    assert_string_equal(c->api_keys[1], "c");
    assert_string_equal(c->admin_key, "x#y");
    assert_int_equal(c->models[0].nargs, 2);
    assert_string_equal(c->models[0].args_text, "-c 4096");
    config_free(c);
}

static void test_continuation_lines(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f,
        "[pool]\n"
        "default_args = -cram 0\n"
        "    --no-webui\n"
        "api_keys =\n"
        "    k1,\n"
        "    k2, k3\n"
        "[model m]\n"
        "path = m.gguf\n"
        "args =\n"
        "    -c 4096   ; an inline comment on a continuation line is dropped\n"
        "    ; a comment inside does not end it\n"
        "    --alias 'two words'\n"
        "aliases = a1,\n"
        "  a2\n"
        "env = A=1\n"
        "  B=2 C=3\n"
        "pin = yes\n");
    assert_int_equal(c->ndefault_args, 3);
    assert_string_equal(c->default_args[2], "--no-webui");
    assert_int_equal(c->napi_keys, 3);
    assert_string_equal(c->api_keys[0], "k1");
    assert_string_equal(c->api_keys[2], "k3");
    const struct config_model *m = &c->models[0];
    assert_int_equal(m->nargs, 4);
    assert_string_equal(m->args[0], "-c");
    assert_string_equal(m->args[1], "4096");
    assert_string_equal(m->args[2], "--alias");
    assert_string_equal(m->args[3], "two words");
    assert_string_equal(m->args_text, "-c 4096 --alias 'two words'");
    assert_int_equal(m->naliases, 2);
    assert_string_equal(m->aliases[1], "a2");
    assert_int_equal(m->nenv, 3);
    assert_string_equal(m->env[2].name, "C");
    assert_true(m->pin);
    config_free(c);

    expect_exact(f, "[pool]\nlisten = 127.0.0.1:80\n  81\n",
                 "3: \"listen\" takes one line: this indented line continues its value "
                 "(only args, default_args, aliases, api_keys and env take more lines)", NULL);
    expect_exact(f, "[model m]\npath = m.gguf\n  other.gguf\n",
                 "3: \"path\" takes one line: this indented line continues its value "
                 "(only args, default_args, aliases, api_keys and env take more lines)", NULL);
    /* continuation words are checked like the first line's */
    expect_error(f, "[model m]\npath = m.gguf\nargs = -c 1\n  --port 9\n", 4, "args: \"--port\" is not allowed", NULL);
    /* an indented key right after a section header is a key... */
    c = load_ok(f, "[model m]\n  path = m.gguf\n");
    assert_string_equal(c->models[0].path, f->model);
    config_free(c);
    /* ...but an indented line after a key continues it, as in inih and Python */
    expect_exact(f, "[model m]\n  path = m.gguf\n  pin = yes\n",
                 "3: \"path\" takes one line: this indented line continues its value "
                 "(only args, default_args, aliases, api_keys and env take more lines)", NULL);
}

static char *repeat_words(const char *word, size_t n)
{
    size_t wl = strlen(word);
    char *s = malloc(n * (wl + 1) + 1), *p = s;
    for (size_t i = 0; i < n; i++) {
        memcpy(p, word, wl);
        p += wl;
        *p++ = ' ';
    }
    p[-1] = '\0';
    return s;
}

static void test_long_lines(void **state)
{
    struct fx *f = *state;
    /* 1,000 words of 4 characters: a 5,000-character args line */
    char *words = repeat_words("-xyz", 1000);
    assert_int_equal(strlen(words), 4999);
    char name[101];
    memset(name, 'n', 100);
    name[100] = '\0';
    memcpy(name, "long-", 5);
    char *longval = malloc(3001);
    memset(longval, 'k', 3000);
    longval[3000] = '\0';
    char *comment = repeat_words("blah", 200);

    size_t cap = 40000;
    char *text = malloc(cap);
    snprintf(text, cap,
             "; %s\n"                                 /* 1: a long comment */
             "[pool]\n"                               /* 2 */
             "admin_key = %s;not-a-comment ; a comment\n"  /* 3: 3,000-character value */
             "[model %s]\n"                           /* 4: 100-character section name */
             "path = m.gguf\n"
             "args = %s \"last word\" ; comment\n"    /* 6 */
             "aliases = short,\n"
             "    %s-alias\n"                         /* 8: long continuation */
             "pin = yes\n",
             comment, longval, name, words, longval);
    struct config *c = load_ok(f, text);
    /* inih's rule: ';' starts a comment only after whitespace */
    assert_int_equal(strlen(c->admin_key), 3000 + strlen(";not-a-comment"));
    assert_memory_equal(c->admin_key, longval, 3000);
    assert_string_equal(c->admin_key + 3000, ";not-a-comment");
    assert_int_equal(c->nmodels, 1);
    const struct config_model *m = &c->models[0];
    assert_string_equal(m->name, name);
    assert_int_equal(m->line, 4);
    assert_int_equal(m->nargs, 1001);
    assert_string_equal(m->args[0], "-xyz");
    assert_string_equal(m->args[999], "-xyz");
    assert_string_equal(m->args[1000], "last word");
    assert_null(m->args[1001]);
    assert_int_equal(strlen(m->args_text), 4999 + strlen(" \"last word\""));
    assert_int_equal(m->naliases, 2);
    assert_int_equal(strlen(m->aliases[1]), 3006);
    assert_true(m->pin);
    assert_ptr_equal(config_find_model(c, name), m);
    config_free(c);

    /* errors on long lines keep their line numbers; the value is shortened */
    snprintf(text, cap, "[pool]\nmax_queue = 1\n%s = 1\nlisten = nope\n", longval);
    struct config_errors e;
    assert_null(config_load_string(f->conf, text, &e));
    assert_int_equal(e.n, 2);
    char prefix[256];
    snprintf(prefix, sizeof prefix, "%s:3: unknown key \"kkkkk", f->conf);
    assert_memory_equal(e.msgs[0], prefix, strlen(prefix));
    assert_non_null(strstr(e.msgs[0], "...\" in [pool]"));
    assert_true(strlen(e.msgs[0]) < 300);
    snprintf(prefix, sizeof prefix, "%s:4: listen: ", f->conf);
    assert_memory_equal(e.msgs[1], prefix, strlen(prefix));
    config_errors_free(&e);

    /* a long line with neither '=' nor a section is an error, once */
    snprintf(text, cap, "[pool]\n%s\nmax_queue = 2\n", longval);
    assert_null(config_load_string(f->conf, text, &e));
    assert_int_equal(e.n, 1);
    snprintf(prefix, sizeof prefix, "%s:2: expected \"key = value\"", f->conf);
    assert_memory_equal(e.msgs[0], prefix, strlen(prefix));
    config_errors_free(&e);

    /* a long duplicated section name is reported with its first line */
    snprintf(text, cap, "[model %s]\npath = m.gguf\n[model %s]\npath = m.gguf\n", name, name);
    expect_error(f, text, 3, "is defined twice (first at line 1)", NULL);

    free(text);
    free(words);
    free(longval);
    free(comment);
}

/* ------------------------------------------------------------------ */
/* models_dir                                                          */

static void touch(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    close(fd);
}

static void test_models_dir(void **state)
{
    struct fx *f = *state;
    char d[200], p[300];
    snprintf(d, sizeof d, "%s/models", f->dir);
    assert_int_equal(mkdir(d, 0755), 0);
    static const char *const files[] = {
        "b.gguf", "a.gguf", "big-00001-of-00003.gguf", "big-00002-of-00003.gguf",
        "big-00003-of-00003.gguf", "notes.txt", ".hidden.gguf", "._a.gguf", "Upper.GGUF",
        "over.gguf",
    };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(p, sizeof p, "%s/%s", d, files[i]);
        touch(p);
    }
    snprintf(p, sizeof p, "%s/dir.gguf", d);
    mkdir(p, 0755);                                   /* a directory: skipped */
    snprintf(p, sizeof p, "%s/link.gguf", d);
    assert_int_equal(symlink("a.gguf", p), 0);        /* a link to a file: a model */
    snprintf(p, sizeof p, "%s/broken.gguf", d);
    assert_int_equal(symlink("nothing.gguf", p), 0);  /* a dangling link: skipped */

    struct config *c = load_ok(f,
        "[pool]\n"
        "models_dir = models\n"
        "[model over]\n"             /* overrides the discovered over.gguf */
        "args = -c 8192\n"
        "pin = yes\n"
        "[model own]\n"              /* not in the directory: has its own path */
        "path = m.gguf\n"
        "[model b]\n"                /* in the directory, but with its own path */
        "path = m.gguf\n");
    static const char *const order[] = { "over", "own", "b", "Upper", "a", "big", "link" };
    if (c->nmodels != 7)
        for (size_t i = 0; i < c->nmodels; i++)
            print_message("model %s\n", c->models[i].name);
    assert_int_equal(c->nmodels, 7);
    /* sections in file order, then discovered ones by name (strcmp order) */
    for (size_t i = 0; i < 3; i++)
        assert_string_equal(c->models[i].name, order[i]);
    assert_string_equal(c->models[3].name, "Upper");
    assert_string_equal(c->models[4].name, "a");
    assert_string_equal(c->models[5].name, "big");
    assert_string_equal(c->models[6].name, "link");

    const struct config_model *m = &c->models[0];
    snprintf(p, sizeof p, "%s/over.gguf", d);
    assert_string_equal(m->path, p);
    assert_int_equal(m->nargs, 2);
    assert_true(m->pin);
    assert_false(m->from_models_dir);
    assert_int_equal(m->line, 3);
    assert_string_equal(c->models[1].path, f->model);
    assert_string_equal(c->models[2].path, f->model);   /* b's own path wins */

    m = &c->models[5];
    snprintf(p, sizeof p, "%s/big-00001-of-00003.gguf", d);
    assert_string_equal(m->path, p);                    /* a split model loads from part 1 */
    assert_true(m->from_models_dir);
    assert_int_equal(m->line, 0);
    assert_int_equal(m->instances_min, 0);
    assert_int_equal(m->instances_max, 1);
    assert_int_equal(m->memory_kind, CONFIG_MEMORY_AUTO);
    assert_int_equal(m->idle_timeout_ms, -1);
    assert_false(m->pin);
    assert_int_equal(m->nargs, 0);
    assert_non_null(m->args);
    assert_non_null(m->aliases);
    assert_string_equal(c->models[3].path, join(f, "models/Upper.GGUF"));
    assert_string_equal(c->models[6].path, join(f, "models/link.gguf"));
    config_free(c);

    /* a section that matches no file, and has no path */
    snprintf(p, sizeof p, "%s/models", f->dir);
    expect_exact(f, "[pool]\nmodels_dir = models\n[model ghost]\npin = yes\n",
                 "3: model \"ghost\" has no path, and models_dir has no ghost.gguf", NULL);
    /* an alias that names a discovered model */
    char want[512];
    snprintf(want, sizeof want, "5: alias \"a\" of model \"own\" is already the name of a model found in "
             "models_dir (%s/models/a.gguf, line 2)", f->dir);
    expect_exact(f, "[pool]\nmodels_dir = models\n[model own]\npath = m.gguf\naliases = a\n", want, NULL);
    /* default_model may name a discovered model */
    c = load_ok(f, "[pool]\nmodels_dir = models\ndefault_model = big\n");
    assert_string_equal(c->default_model, "big");
    config_free(c);

    /* two files giving one name */
    snprintf(p, sizeof p, "%s/a-00001-of-00002.gguf", d);
    touch(p);
    expect_exact(f, "[pool]\nmodels_dir = models\n",
                 "2: models_dir: \"a-00001-of-00002.gguf\" and \"a.gguf\" both give the model name \"a\"", NULL);

    snprintf(want, sizeof want, "2: models_dir: cannot open \"%s/nowhere\": No such file or directory", f->dir);
    expect_exact(f, "[pool]\nmodels_dir = nowhere\n", want, NULL);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_models_dir_10000_files(void **state)
{
    struct fx *f = *state;
    char d[200], p[300];
    snprintf(d, sizeof d, "%s/many", f->dir);
    assert_int_equal(mkdir(d, 0755), 0);
    for (int i = 0; i < 10000; i++) {
        snprintf(p, sizeof p, "%s/model-%05d.gguf", d, i);
        touch(p);
    }
    double t0 = now_s();
    struct config *c = load_ok(f, "[pool]\nmodels_dir = many\n[model model-00042]\npin = yes\n");
    double t1 = now_s();
    print_message("loaded 10000 models from models_dir in %.1f ms\n", (t1 - t0) * 1000);
    assert_int_equal(c->nmodels, 10000);
    assert_string_equal(c->models[0].name, "model-00042");
    assert_true(c->models[0].pin);
    assert_string_equal(c->models[1].name, "model-00000");
    assert_string_equal(c->models[42].name, "model-00041");
    assert_string_equal(c->models[43].name, "model-00043");
    assert_string_equal(c->models[9999].name, "model-09999");
    snprintf(p, sizeof p, "%s/model-09999.gguf", d);
    assert_string_equal(c->models[9999].path, p);
    assert_true(c->models[9999].from_models_dir);
    config_free(c);
}

/* ------------------------------------------------------------------ */
/* Strict input: what used to pass quietly and then did harm           */

/* Write LEN bytes of DATA as DIR/pool.conf and load that file. */
static struct config *load_bytes(struct fx *f, const void *data, size_t len, struct config_errors *e)
{
    int fd = open(f->conf, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    close(fd);
    return config_load(f->conf, e);
}

static void test_empty_list_items_are_errors(void **state)
{
    struct fx *f = *state;
    /* "api_keys = ," used to mean no keys at all: authentication off */
    expect_exact(f, "[pool]\napi_keys = ,\n",
                 "2: api_keys: \",\" has an empty item (a ',' with nothing before or after it)", NULL);
    expect_exact(f, "[pool]\napi_keys = a,,b\n",
                 "2: api_keys: \"a,,b\" has an empty item (a ',' with nothing before or after it)", NULL);
    expect_exact(f, "[pool]\napi_keys = a, ,b\n",
                 "2: api_keys: \"a, ,b\" has an empty item (a ',' with nothing before or after it)", NULL);
    expect_exact(f, "[pool]\napi_keys = ,a\n",
                 "2: api_keys: \",a\" has an empty item (a ',' with nothing before or after it)", NULL);
    /* a trailing ',' with nothing after it, at the end of the file or
     * before the next key, section, or a blank line and a key */
    static const char *const trailing[] = {
        "[pool]\napi_keys = a, \n",
        "[pool]\napi_keys = a,\nmax_queue = 3\n",
        "[pool]\napi_keys = a, ; a comment\n[model x]\npath = m.gguf\n",
        "[pool]\napi_keys = a,\n\n; comment\nmax_queue = 3\n",
    };
    for (size_t i = 0; i < sizeof trailing / sizeof *trailing; i++)
        expect_error(f, trailing[i], 2, "api_keys: \"a,\" has an empty item after its last ','",
                     "only when it goes on on the next, indented, line", NULL);
    expect_error(f, "[model x]\npath = m.gguf\naliases = a,b,\n", 3,
                 "aliases: \"a,b,\" has an empty item after its last ','", NULL);
    expect_exact(f, "[model x]\npath = m.gguf\naliases = a,,b\n",
                 "3: aliases: \"a,,b\" has an empty item (a ',' with nothing before or after it)", NULL);
    expect_exact(f, "[pool]\ncors_origins = https://a.example,\n",
                 "2: cors_origins: \"https://a.example,\" has an empty item after its last ',' "
                 "(a list may end a line with ',' only when it goes on on the next, indented, line)", NULL);
    /* two commas across a line break are an empty item too */
    expect_exact(f, "[pool]\napi_keys = a,\n  ,b\n",
                 "3: api_keys: \",b\" has an empty item (a ',' with nothing before or after it)", NULL);

    /* lists over several lines: a ',' may end a line, or begin the next */
    struct config *c = load_ok(f, "[pool]\napi_keys = a,\n  b ,\n\n  ; note\n  c\n    , d\n");
    assert_int_equal(c->napi_keys, 4);
    assert_string_equal(c->api_keys[0], "a");
    assert_string_equal(c->api_keys[3], "d");
    config_free(c);
    /* an empty value is an empty list */
    c = load_ok(f, "[pool]\napi_keys =\n[model x]\npath = m.gguf\naliases =\n");
    assert_int_equal(c->napi_keys, 0);
    assert_int_equal(c->models[0].naliases, 0);
    config_free(c);
}

static void test_nul_byte_is_an_error_naming_its_line(void **state)
{
    struct fx *f = *state;
    static const char text[] = "[pool]\nmax_queue = 3\n[model m]\npath = m.gguf\nargs = -c 1\0 --evil\npin = x\n";
    struct config_errors e;
    struct config *c = load_bytes(f, text, sizeof text - 1, &e);
    if (c)
        print_message("loaded with args \"%s\"\n", c->models[0].args_text);
    assert_null(c);
    char want[512];
    snprintf(want, sizeof want, "%s:5: this line holds a NUL byte (at column 12), which would cut it short", f->conf);
    print_errors(&e);
    assert_int_equal(e.n, 2);
    assert_string_equal(e.msgs[0], want);
    /* the lines after it are still read, with their own numbers */
    snprintf(want, sizeof want, "%s:6: pin: \"x\" is not yes or no (yes/no, true/false, on/off, 1/0)", f->conf);
    assert_string_equal(e.msgs[1], want);
    config_errors_free(&e);

    /* a NUL in a comment, or at the very end, is refused as well */
    static const char end[] = "[pool]\n; note\0\n";
    assert_null(load_bytes(f, end, sizeof end - 1, &e));
    assert_int_equal(e.n, 1);
    assert_non_null(strstr(e.msgs[0], ":2: this line holds a NUL byte (at column 7)"));
    config_errors_free(&e);
}

/* Every message must be valid UTF-8 itself: a refused reload sends them as JSON. */
static void expect_utf8_messages(struct fx *f, const char *text)
{
    struct config_errors e;
    assert_null(config_load_string(f->conf, text, &e));
    assert_true(e.n > 0);
    for (size_t i = 0; i < e.n; i++) {
        size_t len = strlen(e.msgs[i]);
        if (memchr(e.msgs[i], 0xFF, len) || memchr(e.msgs[i], 0xFE, len))
            print_message("raw byte in %s\n", e.msgs[i]);
        assert_int_equal(memchr(e.msgs[i], 0xFF, len), NULL);
        assert_int_equal(memchr(e.msgs[i], 0xFE, len), NULL);
    }
    config_errors_free(&e);
}

static void test_invalid_utf8_is_refused_naming_the_key(void **state)
{
    struct fx *f = *state;
    static const struct refusal refused[] = {
        { "[model caf\xE9]\npath = m.gguf\n",
          "1: invalid model name \"caf\xEF\xBF\xBD\": it is not valid UTF-8 (" NAME_RULE ")" },
        { "[model m]\npath = m.gguf\naliases = ok, gpt\xFF\n",
          "3: aliases: the value is not valid UTF-8 (byte 0xFF at position 8 of the value)" },
        { "[model m]\npath = m.gguf\nargs = -c 1 --alias \xC0\xAF\n",
          "3: args: the value is not valid UTF-8 (byte 0xC0 at position 14 of the value)" },
        { "[model m]\npath = m.gguf\nenv = A=1\n  B=\xED\xA0\x80\n",
          "4: env: the value is not valid UTF-8 (byte 0xED at position 3 of the value)" },
        { "[pool]\nadmin_key = secret\xFE\n",
          "2: admin_key: the value is not valid UTF-8 (byte 0xFE at position 7 of the value)" },
        { "[pool]\ndefault_model = x\xFF\n",
          "2: default_model: the value is not valid UTF-8 (byte 0xFF at position 2 of the value)" },
        /* a path with a bad byte is reported once, not again as "no path" */
        { "[model m]\npath = m\xFF.gguf\n",
          "2: path: the value is not valid UTF-8 (byte 0xFF at position 2 of the value)" },
    };
    EXPECT_REFUSALS(f, refused);
    /* messages stay UTF-8 whatever the file holds */
    expect_utf8_messages(f, "[model a\xFF]\npath = m.gguf\n");
    expect_utf8_messages(f, "[pool]\nmax_queue\xFE = 1\n");
    expect_utf8_messages(f, "[sect\xFF]\n");
    /* UTF-8 itself is welcome, in names, aliases and values */
    struct config *c = load_ok(f, "[model \xD0\xBC\xD0\xBE\xD0\xB4\xD0\xB5\xD0\xBB\xD1\x8C]\npath = m.gguf\n"
                                  "aliases = caf\xC3\xA9, \xF0\x9F\xA6\x99\nargs = --alias \"\xE2\x82\xAC\"\n");
    assert_string_equal(c->models[0].name, "\xD0\xBC\xD0\xBE\xD0\xB4\xD0\xB5\xD0\xBB\xD1\x8C");
    assert_string_equal(c->models[0].aliases[1], "\xF0\x9F\xA6\x99");
    config_free(c);
}

static void test_names_and_aliases_fit_in_urls(void **state)
{
    struct fx *f = *state;
    static const struct { const char *name, *why; bool alias_ok; } bad[] = {
        { "a?b", "it contains '?'", false }, { "a#b", "it contains '#'", false },
        { "50%", "it contains '%'", false }, { "a\tb", "it contains whitespace", false },
        { "a\xC2\xA0" "b", "it contains whitespace", false },          /* no-break space */
        { "a\x01" "b", "it contains a control character", false },
        { "a\x7F" "b", "it contains a control character", false },
        { "a\xC2\x85" "b", "it contains a control character", false }, /* C1 NEL */
        /* what browsers percent-encode in a path, or read as '/': names only */
        { "a/b", "it contains '/'", true }, { "a\\b", "it contains '\\'", true },
        { "a\"b", "it contains '\"'", true }, { "a<b", "it contains '<'", true },
        { "a>b", "it contains '>'", true }, { "a`b", "it contains '`'", true },
        { "a{b", "it contains '{'", true }, { "a}b", "it contains '}'", true },
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char text[256], want[512];
        snprintf(text, sizeof text, "[model %s]\npath = m.gguf\n", bad[i].name);
        snprintf(want, sizeof want, "1: invalid model name \"%s\": %s (%s)", bad[i].name, bad[i].why, NAME_RULE);
        expect_exact(f, text, want, NULL);
        snprintf(text, sizeof text, "[model m]\npath = m.gguf\naliases = ok,%s\n", bad[i].name);
        if (bad[i].alias_ok) {
            struct config *c = load_ok(f, text);
            assert_string_equal(c->models[0].aliases[1], bad[i].name);
            config_free(c);
            continue;
        }
        snprintf(want, sizeof want, "3: aliases: invalid alias \"%s\": %s (%s)", bad[i].name, bad[i].why, ALIAS_RULE);
        expect_exact(f, text, want, NULL);
    }
    /* "org/model" ids are what OpenAI clients send: fine as aliases, and
     * the model's own name still addresses it in URLs */
    struct config *c = load_ok(f, "[model qwen-7b]\npath = m.gguf\naliases = Qwen/Qwen2.5-7B-Instruct, .dot\n"
                                  "[model a+b@c:d~e!]\npath = m.gguf\n");
    assert_ptr_equal(config_find_model(c, "Qwen/Qwen2.5-7B-Instruct"), &c->models[0]);
    assert_string_equal(c->models[1].name, "a+b@c:d~e!");
    config_free(c);
}

/* Run a config_load with stderr captured; returns what was written there. */
static char *load_capturing_stderr(struct fx *f, const char *text, struct config **out)
{
    char path[256];
    snprintf(path, sizeof path, "%s/stderr.txt", f->dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    fflush(stderr);
    int saved = dup(2);
    assert_true(saved >= 0);
    dup2(fd, 2);
    write_file(f->conf, text);
    struct config_errors e;
    *out = config_load(f->conf, &e);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    print_errors(&e);
    config_errors_free(&e);
    char *buf = calloc(1, 65536);
    assert_true(pread(fd, buf, 65535, 0) >= 0);
    close(fd);
    return buf;
}

static void test_models_dir_skips_files_that_are_no_names(void **state)
{
    struct fx *f = *state;
    char d[200], p[300];
    snprintf(d, sizeof d, "%s/models", f->dir);
    assert_int_equal(mkdir(d, 0755), 0);
    static const char *const files[] = {
        "good.gguf", "my model.gguf", "what?.gguf", "100%.gguf", "bad\xFF.gguf", "caf\xC3\xA9.gguf",
    };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(p, sizeof p, "%s/%s", d, files[i]);
        touch(p);
    }
    struct config *c;
    char *err = load_capturing_stderr(f, "[pool]\nmodels_dir = models\n", &c);
    print_message("%s", err);
    assert_non_null(c);
    assert_int_equal(c->nmodels, 2);
    assert_string_equal(c->models[0].name, "caf\xC3\xA9");
    assert_string_equal(c->models[1].name, "good");
    config_free(c);
    /* one warning per skipped file, saying why and what to do */
    char want[512];
    snprintf(want, sizeof want, "%s:2: models_dir: skipping \"my model.gguf\": its name is no model name: "
             "it contains whitespace (%s); rename the file, or give it a [model NAME] section "
             "with path =", f->conf, NAME_RULE);
    assert_non_null(strstr(err, want));
    assert_non_null(strstr(err, "skipping \"what?.gguf\": its name is no model name: it contains '?'"));
    assert_non_null(strstr(err, "skipping \"100%.gguf\": its name is no model name: it contains '%'"));
    assert_non_null(strstr(err, "skipping \"bad\xEF\xBF\xBD.gguf\": its name is no model name: "
                                "it is not valid UTF-8"));
    free(err);

    /* such a file can still be served, through a section of its own */
    c = load_ok(f, "[pool]\nmodels_dir = models\n[model mine]\npath = models/my model.gguf\n");
    assert_int_equal(c->nmodels, 3);
    assert_string_equal(c->models[0].name, "mine");
    config_free(c);
}

static void test_config_file_size_and_kind(void **state)
{
    struct fx *f = *state;
    struct config_errors e;
    char want[512];

    /* "check -c /dev/zero" used to read until memory ran out */
    alarm(10);                       /* a hang fails the test instead of the run */
    assert_null(config_load("/dev/zero", &e));
    assert_int_equal(e.n, 1);
    assert_string_equal(e.msgs[0], "/dev/zero: cannot read: it is a character device, not a regular file");
    config_errors_free(&e);

    /* a FIFO with no writer must not block */
    char fifo[256];
    snprintf(fifo, sizeof fifo, "%s/fifo.conf", f->dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    assert_null(config_load(fifo, &e));
    assert_int_equal(e.n, 1);
    snprintf(want, sizeof want, "%s: cannot read: it is a FIFO, not a regular file", fifo);
    assert_string_equal(e.msgs[0], want);
    config_errors_free(&e);
    alarm(0);

    /* a regular file over the cap is refused before it is read */
    int fd = open(f->conf, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, CONFIG_MAX_BYTES + 1), 0);
    close(fd);
    assert_null(config_load(f->conf, &e));
    assert_int_equal(e.n, 1);
    snprintf(want, sizeof want, "%s: larger than 16777216 bytes (16 MiB): too large for a pool.conf", f->conf);
    assert_string_equal(e.msgs[0], want);
    config_errors_free(&e);

    /* up to the cap is fine: a 16 MiB file of comments */
    char *big = malloc(CONFIG_MAX_BYTES + 2);
    assert_non_null(big);
    for (size_t i = 0; i < CONFIG_MAX_BYTES; i += 64) {
        memset(big + i, 'x', 63);
        big[i] = ';';
        big[i + 63] = '\n';
    }
    memcpy(big, "[pool]\nmax_queue = 9\n;", 22);    /* the first 64-byte line, cut in three */
    struct config *c = load_bytes(f, big, CONFIG_MAX_BYTES, &e);
    print_errors(&e);
    assert_non_null(c);
    assert_int_equal(c->max_queue, 9);
    config_free(c);
    /* and the same text as a string: the cap holds there too */
    big[CONFIG_MAX_BYTES] = ';';
    big[CONFIG_MAX_BYTES + 1] = '\0';
    assert_null(config_load_string(f->conf, big, &e));
    assert_int_equal(e.n, 1);
    assert_string_equal(e.msgs[0], want);
    config_errors_free(&e);
    free(big);
}

static void test_body_and_drain_timeouts(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[pool]\nbody_timeout = 0\nstop_timeout = 3s\n");
    assert_int_equal(c->body_timeout_ms, 0);            /* 0 = no limit */
    assert_int_equal(c->drain_timeout_ms, 3000);        /* follows stop_timeout when unset */
    config_free(c);
    c = load_ok(f, "[pool]\ndrain_timeout = 0\nstop_timeout = 3s\n");
    assert_int_equal(c->drain_timeout_ms, 0);           /* set: kept, even 0 */
    assert_int_equal(c->stop_timeout_ms, 3000);
    config_free(c);
    c = load_ok(f, "[pool]\ndrain_timeout =\nstop_timeout = 4s\n");
    assert_int_equal(c->drain_timeout_ms, 4000);        /* empty: as unset */
    config_free(c);
    c = load_ok(f, "[pool]\ndrain_timeout = 2m\n");
    assert_int_equal(c->drain_timeout_ms, 120000);
    assert_int_equal(c->stop_timeout_ms, 10000);
    config_free(c);
    expect_exact(f, "[pool]\nbody_timeout = soon\n",
                 "2: body_timeout: \"soon\" is not a duration (a number with ms, s, m or h: 250ms, 10s, 30m, 2h)", NULL);
    expect_exact(f, "[pool]\ndrain_timeout = -1\n",
                 "2: drain_timeout: \"-1\" is not a duration (a number with ms, s, m or h: 250ms, 10s, 30m, 2h)", NULL);
}

static void test_cors_origins(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[pool]\ncors_origins = *\n");
    assert_int_equal(c->ncors_origins, 1);
    assert_string_equal(c->cors_origins[0], "*");
    config_free(c);
    c = load_ok(f, "[pool]\ncors_origins = http://[::1]:8080, chrome-extension://abcdef, HTTPS://X.Example:8443\n");
    assert_int_equal(c->ncors_origins, 3);
    assert_string_equal(c->cors_origins[0], "http://[::1]:8080");
    assert_string_equal(c->cors_origins[1], "chrome-extension://abcdef");
    assert_string_equal(c->cors_origins[2], "https://x.example:8443");
    config_free(c);

    static const struct { const char *v, *msg; } bad[] = {
        { "https://app.example.com/", "has a path: an origin is only scheme://host[:port], with no '/' after it" },
        { "https://app.example.com/chat", "has a path: an origin is only scheme://host[:port], with no '/' after it" },
        { "app.example.com", "is not an origin: write scheme://host[:port] (https://app.example.com) or *" },
        { "null", "is not an origin: write scheme://host[:port] (https://app.example.com) or *" },
        { "://x", "is not an origin: write scheme://host[:port] (https://app.example.com) or *" },
        { "https://", "has no host: write scheme://host[:port] (https://app.example.com)" },
        { "https://a.example:0", "has a port that is not a number from 1 to 65535" },
        { "https://a.example:99999", "has a port that is not a number from 1 to 65535" },
        { "https://a.example:", "has a port that is not a number from 1 to 65535" },
        { "https://a.example:443", "names its scheme's default port, which browsers leave out of Origin: "
                                   "write it without the port" },
        { "http://a.example:80", "names its scheme's default port, which browsers leave out of Origin: "
                                 "write it without the port" },
        { "https://user@a.example", "is not an origin: the host may hold letters, digits, '-', '.' and '_' "
                                    "(write an international name in its xn-- form)" },
        { "http://[nope]", "does not hold a valid IPv6 address in its brackets" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char text[256], want[512];
        snprintf(text, sizeof text, "[pool]\ncors_origins = %s\n", bad[i].v);
        snprintf(want, sizeof want, "2: cors_origins: \"%s\" %s", bad[i].v, bad[i].msg);
        expect_exact(f, text, want, NULL);
    }
    expect_exact(f, "[pool]\ncors_origins = *, https://a.example\n",
                 "2: cors_origins: \"*\" already allows every origin: list it alone", NULL);
    expect_exact(f, "[pool]\ncors_origins = https://a.example, *\n",
                 "2: cors_origins: \"*\" already allows every origin: list it alone", NULL);
    /* one line only, like the other single-valued keys */
    expect_error(f, "[pool]\ncors_origins = https://a.example\n  https://b.example\n", 3,
                 "\"cors_origins\" takes one line", NULL);
}

/* ------------------------------------------------------------------ */
/* split_words                                                         */

static void expect_words(const char *s, ...)
{
    char **w = NULL;
    size_t n = 99;
    const char *err = "unset";
    assert_int_equal(config_split_words(s, &w, &n, &err), 0);
    assert_null(err);
    va_list ap;
    va_start(ap, s);
    size_t i = 0;
    for (const char *want; (want = va_arg(ap, const char *)); i++) {
        assert_true(i < n);
        assert_string_equal(w[i], want);
    }
    va_end(ap);
    assert_int_equal(n, i);
    assert_null(w[n]);
    util_strv_free(w);
}

static void test_split_words(void **state)
{
    (void)state;
    expect_words("", NULL);
    expect_words("   \t ", NULL);
    expect_words("a b  c", "a", "b", "c", NULL);
    expect_words("  -c\t4096\n-np 4 ", "-c", "4096", "-np", "4", NULL);
    expect_words("'a b' \"c d\"", "a b", "c d", NULL);
    expect_words("a'b c'd", "ab cd", NULL);
    expect_words("\"\" x ''", "", "x", "", NULL);
    expect_words("a\"\"", "a", NULL);
    expect_words("'it''s'", "its", NULL);
    expect_words("\"it's\"", "it's", NULL);
    expect_words("'say \"hi\"'", "say \"hi\"", NULL);
    expect_words("a\\ b", "a b", NULL);
    expect_words("\\'x\\\"", "'x\"", NULL);
    expect_words("\\\\", "\\", NULL);
    expect_words("'\\n\\'", "\\n\\", NULL);                 /* no escapes in single quotes */
    expect_words("\"\\$ \\` \\\" \\\\ \\n \\a\"", "$ ` \" \\ \\n \\a", NULL);
    expect_words("\"a\\\nb\"", "ab", NULL);                /* backslash-newline inside "" */
    expect_words("a\\\nb", "ab", NULL);                    /* ... and outside */
    expect_words("trail\\", "trail\\", NULL);
    expect_words("$HOME `cmd` * ~ #x", "$HOME", "`cmd`", "*", "~", "#x", NULL);
    expect_words("--json-schema '{\"type\": \"object\"}'", "--json-schema", "{\"type\": \"object\"}", NULL);

    char **w = (char **)1;
    size_t n = 7;
    const char *err = NULL;
    assert_int_equal(config_split_words("a 'b", &w, &n, &err), -1);
    assert_string_equal(err, "unterminated single quote");
    assert_null(w);
    assert_int_equal(n, 0);
    err = NULL;
    assert_int_equal(config_split_words("a \"b\\\"", &w, &n, &err), -1);
    assert_string_equal(err, "unterminated double quote");
    err = NULL;
    assert_int_equal(config_split_words("\"", &w, &n, &err), -1);
    assert_string_equal(err, "unterminated double quote");
}

/* ------------------------------------------------------------------ */
/* Children                                                            */

static void test_child_argv(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f,
        "[pool]\nllama_server = /opt/ls\ndefault_args = -cram 0\n"
        "[model m]\npath = m.gguf\nargs = -c 4096 --alias 'my model' -np 2\n"
        "[model bare]\npath = m.gguf\n"
        "[model own]\npath = m.gguf\nargs = --threads-http=5 -np 2\n"
        "[model env]\npath = m.gguf\nenv = LLAMA_ARG_THREADS_HTTP=7\n"
        "[model many]\npath = m.gguf\nargs = -np 64\n");
    /* 2 slots: 2, 8 hand-off (4 per slot), 2 for /health and /props. */
    char **argv = config_child_argv(c, &c->models[0], 8123);
    const char *want[] = { "/opt/ls", "-m", f->model, "--host", "127.0.0.1", "--port", "8123",
                           "--threads-http", "12",
                           "-cram", "0", "-c", "4096", "--alias", "my model", "-np", "2", NULL };
    for (size_t i = 0; want[i]; i++) {
        assert_non_null(argv[i]);
        assert_string_equal(argv[i], want[i]);
    }
    assert_null(argv[17]);
    util_strv_free(argv);

    /* Without an alias in args, the child is named after the model; without
     * -np it has llama-server's 4 slots: 4 + 16 + 2 threads. */
    argv = config_child_argv(c, &c->models[1], 65535);
    assert_string_equal(argv[6], "65535");
    assert_string_equal(argv[7], "-a");
    assert_string_equal(argv[8], "bare");
    assert_string_equal(argv[9], "--threads-http");
    assert_string_equal(argv[10], "22");
    assert_string_equal(argv[11], "-cram");
    assert_string_equal(argv[12], "0");
    assert_null(argv[13]);
    util_strv_free(argv);

    /* Threads the args or the env give are the child's: none added. */
    bool given;
    for (size_t m = 2; m <= 3; m++) {
        argv = config_child_argv(c, &c->models[m], 1);
        for (size_t i = 0; argv[i]; i++)
            assert_string_not_equal(argv[i], "--threads-http");
        util_strv_free(argv);
    }
    assert_int_equal(config_child_http_threads(c, &c->models[2], &given), 5);
    assert_true(given);
    assert_int_equal(config_child_http_threads(c, &c->models[3], &given), 7);
    assert_true(given);
    /* The hand-off is bounded in all: 64 slots + 32 + 2. */
    assert_int_equal(config_child_http_threads(c, &c->models[4], &given), 98);
    assert_false(given);
    config_free(c);
}

/* The argv word by word: true when it holds WORD. */
static bool argv_has(char *const *argv, const char *word)
{
    for (size_t i = 0; argv[i]; i++)
        if (!strcmp(argv[i], word))
            return true;
    return false;
}

static size_t argv_count(char *const *argv, const char *word)
{
    size_t n = 0;
    for (size_t i = 0; argv[i]; i++)
        n += !strcmp(argv[i], word);
    return n;
}

static void test_metrics_children(void **state)
{
    struct fx *f = *state;
    const char *models =
        "[model plain]\npath = m.gguf\n"
        "[model own]\npath = m.gguf\nargs = -c 256 --metrics\n"
        "[model env]\npath = m.gguf\nenv = LLAMA_ARG_ENDPOINT_METRICS=1\n"
        "[model envoff]\npath = m.gguf\nenv = LLAMA_ARG_ENDPOINT_METRICS=0\n";
    char text[1024];

    /* no (the default): nothing added; a model's own --metrics or env stays */
    snprintf(text, sizeof text, "[pool]\nmetrics_children = no\n%s", models);
    struct config *c = load_ok(f, text);
    assert_false(c->metrics_children);
    bool want_no[] = { false, true, true, false };
    for (size_t i = 0; i < 4; i++) {
        char **argv = config_child_argv(c, &c->models[i], 8100);
        assert_int_equal(argv_count(argv, "--metrics"), i == 1);
        assert_int_equal(config_child_metrics(c, &c->models[i]), want_no[i]);
        util_strv_free(argv);
    }
    config_free(c);

    /* yes: --metrics once, before default_args and args; not again where
     * the args or a true LLAMA_ARG_ENDPOINT_METRICS turn it on already. A
     * false one is overridden: the argv wins over the env in llama-server. */
    snprintf(text, sizeof text, "[pool]\nmetrics_children = on\ndefault_args = -cram 0\n%s", models);
    c = load_ok(f, text);
    assert_true(c->metrics_children);
    char **argv = config_child_argv(c, &c->models[0], 8100);
    assert_string_equal(argv[11], "--metrics");
    assert_string_equal(argv[12], "-cram");
    assert_null(argv[14]);
    util_strv_free(argv);
    size_t want_yes[] = { 1, 1, 0, 1 };
    for (size_t i = 0; i < 4; i++) {
        argv = config_child_argv(c, &c->models[i], 8100);
        assert_int_equal(argv_count(argv, "--metrics"), want_yes[i]);
        assert_true(config_child_metrics(c, &c->models[i]));
        util_strv_free(argv);
    }
    config_free(c);

    /* --metrics in default_args counts for every model */
    c = load_ok(f, "[pool]\nmetrics_children = yes\ndefault_args = --metrics -cram 0\n"
                   "[model plain]\npath = m.gguf\n");
    argv = config_child_argv(c, &c->models[0], 8100);
    assert_int_equal(argv_count(argv, "--metrics"), 1);
    assert_true(argv_has(argv, "-cram"));
    util_strv_free(argv);
    config_free(c);

    /* A reload that changes metrics_children keeps every child (it is
     * not "changed"): running children keep their argv until they restart. */
    struct config *a = load_ok(f, "[pool]\nmetrics_children = no\n[model m]\npath = m.gguf\n");
    struct config *b = load_ok(f, "[pool]\nmetrics_children = yes\n[model m]\npath = m.gguf\n");
    assert_true(config_model_same_child(a, &a->models[0], b, &b->models[0]));
    config_free(a);
    config_free(b);

    static const struct refusal bad[] = {
        { "[pool]\nmetrics_children = sometimes\n",
          "2: metrics_children: \"sometimes\" is not yes or no (yes/no, true/false, on/off, 1/0)" },
        { "[pool]\nmetrics_children =\n",
          "2: metrics_children: \"\" is not yes or no (yes/no, true/false, on/off, 1/0)" },
        { "[model a]\npath = m.gguf\nmetrics_children = yes\n",
          "3: unknown key \"metrics_children\" in [model a] (it belongs in [pool])" },
    };
    EXPECT_REFUSALS(f, bad);
    expect_error(f, "[pool]\nmetric_children = yes\n", 2, "metric_children", "metrics_children", NULL);
}

static void test_same_child(void **state)
{
    struct fx *f = *state;
    write_file(join(f, "other.gguf"), "");
    const char *base =
        "[pool]\ndefault_args = -cram 0\n"
        "[model m]\npath = m.gguf\nargs = -c 4096\nenv = A=1 B=2\n";
    struct config *a = load_ok(f, base);

    /* differences that do not reach the child */
    struct config *b = load_ok(f,
        "[pool]\ndefault_args = -cram 0\nmax_queue = 3\nidle_timeout = 1m\n"
        "[model first]\npath = other.gguf\n"
        "[model m]\npath = ./m.gguf ; same file\nargs = -c   4096\nenv = B=2 A=1\n"
        "instances = 1-4\nmemory = 3G\npin = yes\nidle_timeout = 5m\naliases = x\n");
    assert_true(config_model_same_child(a, &a->models[0], b, &b->models[1]));
    assert_true(config_model_same_child(b, &b->models[1], a, &a->models[0]));
    assert_true(config_model_same_child(a, &a->models[0], a, &a->models[0]));
    config_free(b);

    static const char *const different[] = {
        /* path */
        "[pool]\ndefault_args = -cram 0\n[model m]\npath = other.gguf\nargs = -c 4096\nenv = A=1 B=2\n",
        /* args */
        "[pool]\ndefault_args = -cram 0\n[model m]\npath = m.gguf\nargs = -c 8192\nenv = A=1 B=2\n",
        "[pool]\ndefault_args = -cram 0\n[model m]\npath = m.gguf\nargs = -c 4096 -fa\nenv = A=1 B=2\n",
        /* env */
        "[pool]\ndefault_args = -cram 0\n[model m]\npath = m.gguf\nargs = -c 4096\nenv = A=1 B=3\n",
        "[pool]\ndefault_args = -cram 0\n[model m]\npath = m.gguf\nargs = -c 4096\nenv = A=1\n",
        "[pool]\ndefault_args = -cram 0\n[model m]\npath = m.gguf\nargs = -c 4096\nenv = A=1 C=2\n",
        /* default_args */
        "[pool]\ndefault_args = -cram 1\n[model m]\npath = m.gguf\nargs = -c 4096\nenv = A=1 B=2\n",
        "[model m]\npath = m.gguf\nargs = -c 4096\nenv = A=1 B=2\n",
        /* llama_server */
        ("[pool]\nllama_server = /opt/ls\ndefault_args = -cram 0\n"
         "[model m]\npath = m.gguf\nargs = -c 4096\nenv = A=1 B=2\n"),
    };
    for (size_t i = 0; i < sizeof different / sizeof *different; i++) {
        b = load_ok(f, different[i]);
        if (config_model_same_child(a, &a->models[0], b, &b->models[0]))
            print_message("same child for case %zu\n", i);
        assert_false(config_model_same_child(a, &a->models[0], b, &b->models[0]));
        assert_false(config_model_same_child(b, &b->models[0], a, &a->models[0]));
        config_free(b);
    }
    config_free(a);
}

static void test_errors_free_and_null(void **state)
{
    (void)state;
    struct config_errors e = { 0 };
    config_errors_free(&e);
    config_errors_free(NULL);
    config_free(NULL);
    util_strv_free(NULL);
    /* errs may be NULL: the result alone says it failed */
    assert_null(config_load_string("x.conf", "[nope]\n", NULL));
    assert_null(config_load("/nonexistent/x.conf", NULL));
    assert_null(config_find_model(NULL, "x"));
}

/* ------------------------------------------------------------------ */
/* pool.conf.example                                                   */

static char *read_example(void)
{
    /* meson passes the source root; a direct cc build falls back on __FILE__ */
    char path[4096];
#ifdef SOURCE_ROOT
    snprintf(path, sizeof path, "%s/pool.conf.example", SOURCE_ROOT);
#else
    const char *here = __FILE__;
    const char *cut = strstr(here, "tests/unit/test_config.c");
    snprintf(path, sizeof path, "%.*spool.conf.example", cut ? (int)(cut - here) : 0, here);
#endif
    FILE *fp = fopen(path, "r");
    if (!fp)
        return NULL;
    char *text = calloc(1, 1 << 16);
    size_t n = fread(text, 1, (1 << 16) - 1, fp);
    fclose(fp);
    text[n] = '\0';
    return text;
}

static void test_example_config(void **state)
{
    struct fx *f = *state;
    char *text = read_example();
    if (!text) {
        print_message("pool.conf.example not found from %s\n", __FILE__);
        skip();
    }
    /* as shipped: the [pool] defaults, plus default_args = -cram 0 */
    struct config *c = load_ok(f, text);
    struct config *d = load_ok(f, "");
    assert_string_equal(c->listen, d->listen);
    assert_string_equal(c->control_socket, d->control_socket);
    assert_string_equal(c->llama_server, d->llama_server);
    assert_int_equal(c->port_min, d->port_min);
    assert_int_equal(c->port_max, d->port_max);
    assert_int_equal(c->budget_kind, d->budget_kind);
    assert_int_equal(c->memory_reserve, d->memory_reserve);
    assert_int_equal(c->gpus, d->gpus);
    assert_int_equal(c->gpu_budget_kind, d->gpu_budget_kind);
    assert_int_equal(c->gpu_reserve, d->gpu_reserve);
    assert_int_equal(c->log_max_size, d->log_max_size);
    assert_int_equal(c->log_keep, d->log_keep);
    assert_int_equal(c->idle_timeout_ms, d->idle_timeout_ms);
    assert_int_equal(c->start_timeout_ms, d->start_timeout_ms);
    assert_int_equal(c->stop_timeout_ms, d->stop_timeout_ms);
    assert_int_equal(c->health_interval_ms, d->health_interval_ms);
    assert_int_equal(c->max_queue, d->max_queue);
    assert_int_equal(c->queue_timeout_ms, d->queue_timeout_ms);
    assert_int_equal(c->max_restarts, d->max_restarts);
    assert_int_equal(c->restart_window_ms, d->restart_window_ms);
    assert_string_equal(c->log_dir, d->log_dir);
    assert_string_equal(c->state_dir, d->state_dir);
    assert_int_equal(c->preload_popular, d->preload_popular);
    assert_null(c->models_dir);
    assert_null(c->default_model);
    assert_int_equal(c->napi_keys, 0);
    assert_null(c->admin_key);
    assert_int_equal(c->max_body, d->max_body);
    assert_int_equal(c->max_header, d->max_header);
    assert_int_equal(c->header_timeout_ms, d->header_timeout_ms);
    assert_int_equal(c->keepalive_timeout_ms, d->keepalive_timeout_ms);
    assert_int_equal(c->max_connections, d->max_connections);
    assert_int_equal(c->body_timeout_ms, d->body_timeout_ms);
    assert_int_equal(c->drain_timeout_ms, d->drain_timeout_ms);
    assert_int_equal(c->ncors_origins, 0);
    assert_int_equal(c->metrics_children, d->metrics_children);
    assert_int_equal(c->ndefault_args, 2);
    assert_string_equal(c->default_args[0], "-cram");
    assert_string_equal(c->default_args[1], "0");
    assert_int_equal(c->nmodels, 0);
    config_free(c);
    config_free(d);

    /* its model section, uncommented (one ';' off each line from ";[model"
     * on), with the path pointed at a file that exists */
    char *model = strstr(text, "\n;[model ");
    assert_non_null(model);
    char *out = calloc(1, strlen(text) + 256), *o = out;
    memcpy(o, text, (size_t)(model + 1 - text));
    o += model + 1 - text;
    for (char *line = model + 1; *line;) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) + 1 : strlen(line);
        if (!strncmp(line, ";path = ", 8))
            o += sprintf(o, "path = m.gguf\n");
        else if (line[0] == ';') {
            memcpy(o, line + 1, len - 1);
            o += len - 1;
        } else {
            memcpy(o, line, len);
            o += len;
        }
        line += len;
    }
    c = load_ok(f, out);
    assert_int_equal(c->nmodels, 1);
    const struct config_model *m = &c->models[0];
    assert_string_equal(m->name, "tinyllama");
    assert_string_equal(m->path, f->model);
    assert_int_equal(m->nargs, 6);
    assert_string_equal(m->args[5], "tiny llama");
    assert_int_equal(m->instances_min, 1);
    assert_int_equal(m->instances_max, 3);
    assert_int_equal(m->memory_kind, CONFIG_MEMORY_AUTO);
    assert_false(m->pin);
    assert_int_equal(m->idle_timeout_ms, 600000);
    assert_int_equal(m->naliases, 2);
    assert_int_equal(m->nenv, 1);
    assert_string_equal(m->env[0].name, "OMP_NUM_THREADS");
    config_free(c);
    free(out);
    free(text);
}

/* ------------------------------------------------------------------ */
/* GPU keys (issue #10): gpus, nvml_library, gpu_budget, gpu_reserve,   */
/* and [model] gpu_memory.                                              */

static void test_log_rotation_keys(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[model tiny]\npath = m.gguf\n");
    assert_int_equal(c->log_max_size, 100ULL << 20);
    assert_int_equal(c->log_keep, 3);
    config_free(c);
    c = load_ok(f, "[pool]\nlog_max_size = 0\nlog_keep = 0\n[model tiny]\npath = m.gguf\n");
    assert_int_equal(c->log_max_size, 0);
    assert_int_equal(c->log_keep, 0);
    config_free(c);
    c = load_ok(f, "[pool]\nlog_max_size = 1.5G\nlog_keep = 10\n[model tiny]\npath = m.gguf\n");
    assert_int_equal(c->log_max_size, 3ULL << 29);
    assert_int_equal(c->log_keep, 10);
    config_free(c);
    static const struct refusal bad[] = {
        { "[pool]\nlog_keep = 1001\n[model tiny]\npath = m.gguf\n",
          "2: log_keep: \"1001\" is out of range (0 to 1000)" },
        { "[pool]\nlog_max_size = lots\n[model tiny]\npath = m.gguf\n",
          "2: log_max_size: \"lots\" is not a size (a number with an optional K, M, G or T: 512K, 1.5G)" },
    };
    EXPECT_REFUSALS(f, bad);
}

static void test_routing_keys(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[model a]\npath = m.gguf\n[model b]\npath = m.gguf\nrouting = least_busy\n");
    assert_int_equal(c->routing, CONFIG_ROUTING_AFFINITY);
    assert_int_equal(config_model_routing(c, &c->models[0]), CONFIG_ROUTING_AFFINITY);
    assert_int_equal(config_model_routing(c, &c->models[1]), CONFIG_ROUTING_LEAST_BUSY);
    config_free(c);
    c = load_ok(f, "[pool]\nrouting = LEAST_BUSY\n[model a]\npath = m.gguf\n"
                   "[model b]\npath = m.gguf\nrouting = affinity\n");
    assert_int_equal(config_model_routing(c, &c->models[0]), CONFIG_ROUTING_LEAST_BUSY);
    assert_int_equal(config_model_routing(c, &c->models[1]), CONFIG_ROUTING_AFFINITY);
    assert_int_equal(config_model_affinity_wait_ms(c, &c->models[0]), 0);     /* least_busy: none */
    assert_int_equal(config_model_affinity_wait_ms(c, &c->models[1]), 250);   /* the default */
    config_free(c);
    c = load_ok(f, "[pool]\naffinity_wait = 1s\n[model a]\npath = m.gguf\n"
                   "[model b]\npath = m.gguf\naffinity_wait = 0\n[model c]\npath = m.gguf\naffinity_wait = 80ms\n");
    assert_int_equal(config_model_affinity_wait_ms(c, &c->models[0]), 1000);
    assert_int_equal(config_model_affinity_wait_ms(c, &c->models[1]), 0);
    assert_int_equal(config_model_affinity_wait_ms(c, &c->models[2]), 80);
    config_free(c);
    static const struct refusal bad[] = {
        { "[pool]\naffinity_wait = soon\n[model tiny]\npath = m.gguf\n",
          "2: affinity_wait: \"soon\" is not a duration (a number with ms, s, m or h: 250ms, 10s, 30m, 2h)" },
        { "[pool]\nrouting = sticky\n[model tiny]\npath = m.gguf\n",
          "2: routing: \"sticky\" is not affinity (the instance that holds the prompt's prefix, "
          "else the least busy) or least_busy" },
        { "[model tiny]\npath = m.gguf\nrouting =\n",
          "3: routing: \"\" is not affinity (the instance that holds the prompt's prefix, "
          "else the least busy) or least_busy" },
    };
    EXPECT_REFUSALS(f, bad);
}

static void test_priority_key(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[model a]\npath = m.gguf\n[model b]\npath = m.gguf\npriority = 5\n"
                                  "[model c]\npath = m.gguf\npriority = -1000\n");
    assert_int_equal(c->models[0].priority, 0);
    assert_int_equal(c->models[1].priority, 5);
    assert_int_equal(c->models[2].priority, -1000);
    config_free(c);
    static const struct refusal bad[] = {
        { "[model tiny]\npath = m.gguf\npriority = high\n", "3: priority: \"high\" is not a whole number" },
        { "[model tiny]\npath = m.gguf\npriority = 1001\n", "3: priority: \"1001\" is out of range (-1000 to 1000)" },
        { "[model tiny]\npath = m.gguf\npriority = -1001\n", "3: priority: \"-1001\" is out of range (-1000 to 1000)" },
        { "[model tiny]\npath = m.gguf\npriority = -\n", "3: priority: \"-\" is not a whole number" },
    };
    EXPECT_REFUSALS(f, bad);
}

static void test_eviction_key(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[model a]\npath = m.gguf\n");
    assert_int_equal(c->eviction, CONFIG_EVICTION_LRU);
    config_free(c);
    c = load_ok(f, "[pool]\neviction = COST\n[model a]\npath = m.gguf\n");
    assert_int_equal(c->eviction, CONFIG_EVICTION_COST);
    config_free(c);
    static const struct refusal bad[] = {
        { "[pool]\neviction = lfu\n[model tiny]\npath = m.gguf\n",
          "2: eviction: \"lfu\" is not lru (the model asked least recently goes first) or cost "
          "(the one whose requests x reload time / size is lowest)" },
    };
    EXPECT_REFUSALS(f, bad);
}

static void test_gpu_keys(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[model tiny]\npath = m.gguf\n");
    assert_int_equal(c->gpus, CONFIG_GPUS_AUTO);
    assert_string_equal(c->nvml_library, "libnvidia-ml.so.1");
    assert_string_equal(c->nvml_library, CONFIG_DEFAULT_NVML_LIBRARY);
    assert_int_equal(c->gpu_budget_kind, CONFIG_BUDGET_AUTO);
    assert_int_equal(c->gpu_reserve, 1ULL << 30);
    assert_int_equal(c->models[0].gpu_memory, 0);
    config_free(c);

    c = load_ok(f, "[pool]\ngpus = none\nnvml_library = /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1\n"
                   "gpu_budget = 90%\ngpu_reserve = 2.5G\n"
                   "[model tiny]\npath = m.gguf\ngpu_memory = 3000M\n"
                   "[model cpu]\npath = m.gguf\ngpu_memory = 0\n"
                   "[model est]\npath = m.gguf\ngpu_memory = auto\n");
    assert_int_equal(c->gpus, CONFIG_GPUS_NONE);
    assert_string_equal(c->nvml_library, "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1");
    assert_int_equal(c->gpu_budget_kind, CONFIG_BUDGET_PERCENT);
    assert_int_equal(c->gpu_budget_percent, 90);
    assert_int_equal(c->gpu_reserve, 5ULL << 29);
    assert_int_equal(c->models[0].gpu_memory, 3000ULL << 20);
    assert_int_equal(c->models[1].gpu_memory, 0);
    assert_int_equal(c->models[2].gpu_memory, 0);
    /* memory_budget is its own key: untouched */
    assert_int_equal(c->budget_kind, CONFIG_BUDGET_AUTO);
    config_free(c);

    /* a relative path with '/' is resolved like the others; a bare name is
     * left to the dynamic linker */
    c = load_ok(f, "[pool]\ngpus = AUTO\nnvml_library = lib/libnvml.so\ngpu_budget = 40G\ngpu_reserve = 0\n");
    assert_int_equal(c->gpus, CONFIG_GPUS_AUTO);
    assert_string_equal(c->nvml_library, join(f, "lib/libnvml.so"));
    assert_int_equal(c->gpu_budget_kind, CONFIG_BUDGET_SIZE);
    assert_int_equal(c->gpu_budget_bytes, 40ULL << 30);
    assert_int_equal(c->gpu_reserve, 0);
    config_free(c);
    c = load_ok(f, "[pool]\nnvml_library = libnvml-standin.so\ngpu_budget = auto\n");
    assert_string_equal(c->nvml_library, "libnvml-standin.so");
    assert_int_equal(c->gpu_budget_kind, CONFIG_BUDGET_AUTO);
    config_free(c);

    static const struct refusal refused[] = {
        { "[pool]\ngpus = yes\n",
          "2: gpus: \"yes\" is not auto (use the GPUs NVML finds) or none (host memory only)" },
        { "[pool]\ngpus =\n",
          "2: gpus: \"\" is not auto (use the GPUs NVML finds) or none (host memory only)" },
        { "[pool]\nnvml_library =\n",
          "2: nvml_library: needs a library name or path (libnvidia-ml.so.1)" },
        { "[pool]\ngpu_budget = lots\n",
          "2: gpu_budget: \"lots\" is not auto, a size (48G) or a percentage (75%)" },
        { "[pool]\ngpu_budget = 0%\n",
          "2: gpu_budget: \"0%\": a percentage must be a whole number from 1% to 100%" },
        { "[pool]\ngpu_budget = 101%\n",
          "2: gpu_budget: \"101%\": a percentage must be a whole number from 1% to 100%" },
        { "[pool]\ngpu_budget = 0\n",
          "2: gpu_budget: must be greater than 0" },
        { "[pool]\ngpu_budget = 99999999T\n",
          "2: gpu_budget: \"99999999T\" is too large" },
        { "[pool]\ngpu_reserve = 1 GB please\n",
          "2: gpu_reserve: \"1 GB please\" is not " SIZE_FORM },
        { "[pool]\ngpu_reserve = -1G\n",
          "2: gpu_reserve: \"-1G\" is not " SIZE_FORM },
        { "[model a]\npath = m.gguf\ngpu_memory = lots\n",
          "3: gpu_memory: \"lots\" is not " SIZE_FORM },
        { "[model a]\npath = m.gguf\ngpu_memory = 99999999T\n",
          "3: gpu_memory: \"99999999T\" is too large" },
        { "[pool]\ngpu_memory = 1G\n",
          "2: unknown key \"gpu_memory\" in [pool] (it belongs in a [model NAME] section)" },
        { "[model a]\npath = m.gguf\ngpu_budget = 1G\n",
          "3: unknown key \"gpu_budget\" in [model a] (it belongs in [pool])" },
    };
    EXPECT_REFUSALS(f, refused);
    expect_error(f, "[pool]\ngpu_resrve = 1G\n", 2, "gpu_resrve", "gpu_reserve", NULL);
}

/* ------------------------------------------------------------------ */
/* Usage that lasts (issue #12): state_dir and preload = popular N.     */

static void test_state_dir_and_preload(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[pool]\nstate_dir = state\npreload = popular 3\n");
    assert_string_equal(c->state_dir, join(f, "state"));    /* relative → config's directory */
    assert_int_equal(c->preload_popular, 3);
    config_free(c);
    c = load_ok(f, "[pool]\nstate_dir = /srv/pool-state\npreload = Popular \t 1\n");
    assert_string_equal(c->state_dir, "/srv/pool-state");
    assert_int_equal(c->preload_popular, 1);
    config_free(c);
    /* empty: usage kept in memory only; preload back to none */
    c = load_ok(f, "[pool]\nstate_dir =\npreload =\n");
    assert_null(c->state_dir);
    assert_int_equal(c->preload_popular, 0);
    config_free(c);
    c = load_ok(f, "[pool]\npreload = none\n");
    assert_int_equal(c->preload_popular, 0);
    config_free(c);
    c = load_ok(f, "[pool]\npreload = popular 1000000\n");
    assert_int_equal(c->preload_popular, CONFIG_PRELOAD_MAX);
    config_free(c);

    static const struct refusal bad[] = {
        { "[pool]\npreload = popular\n",
          "2: preload: \"popular\" needs a number of models: popular N" },
        { "[pool]\npreload = popular 0\n",
          "2: preload: \"popular 0\": N is out of range (1 to 1000000)" },
        { "[pool]\npreload = popular 1000001\n",
          "2: preload: \"popular 1000001\": N is out of range (1 to 1000000)" },
        { "[pool]\npreload = popular -2\n",
          "2: preload: \"popular -2\": N is not a whole number" },
        { "[pool]\npreload = popular 2 models\n",
          "2: preload: \"popular 2 models\": N is not a whole number" },
        { "[pool]\npreload = popular2\n",
          "2: preload: \"popular2\" is not none or popular N (start the N most used models at startup)" },
        { "[pool]\npreload = all\n",
          "2: preload: \"all\" is not none or popular N (start the N most used models at startup)" },
    };
    EXPECT_REFUSALS(f, bad);
    expect_error(f, "[pool]\npreloda = popular 1\n", 2, "preloda", "preload", NULL);
    expect_error(f, "[pool]\nstate_dri = /x\n", 2, "state_dri", "state_dir", NULL);
    expect_error(f, "[model tiny]\npath = m.gguf\npreload = popular 1\n", 3, "preload", "[pool]", NULL);
}

/* fallback: [pool]'s for every model, a model's own over it, "fallback ="
 * turning it off for one model, and each fallback_key with its own
 * section's URL (a key made for one host never goes to another). */
static void test_fallback(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[model tiny]\npath = m.gguf\n");
    assert_null(c->fallback);
    assert_false(c->fallback_unknown);
    assert_null(config_model_fallback(c, &c->models[0]));
    config_free(c);

    c = load_ok(f,
        "[pool]\nfallback = http://127.0.0.1:9000/api/\nfallback_key = pk\nfallback_unknown = yes\n"
        "[model a]\npath = m.gguf\n"
        "[model b]\npath = m.gguf\nfallback = http://[::1]:9001\nfallback_key = bk\n"
        "[model c]\npath = m.gguf\nfallback =\n"
        "[model d]\npath = m.gguf\nfallback = http://localhost\n");
    assert_true(c->fallback_unknown);
    const struct config_fallback *fb = config_model_fallback(c, &c->models[0]);
    assert_ptr_equal(fb, c->fallback);
    assert_string_equal(fb->url, "http://127.0.0.1:9000/api/");
    assert_string_equal(fb->host, "127.0.0.1:9000");
    assert_string_equal(fb->prefix, "/api");          /* the target brings its '/' */
    assert_string_equal(fb->key, "pk");
    assert_int_equal(fb->addr.ss_family, AF_INET);
    fb = config_model_fallback(c, &c->models[1]);
    assert_string_equal(fb->host, "[::1]:9001");
    assert_string_equal(fb->prefix, "");
    assert_string_equal(fb->key, "bk");
    assert_int_equal(fb->addr.ss_family, AF_INET6);
    assert_null(config_model_fallback(c, &c->models[2]));
    fb = config_model_fallback(c, &c->models[3]);
    assert_string_equal(fb->host, "localhost");       /* port 80 */
    assert_null(fb->key);                             /* [pool]'s key stays with [pool]'s URL */
    config_free(c);

    expect_error(f, "[pool]\nfallback = https://api.example.com\n", 2,
                 "fallback", "https is not supported", "nginx", NULL);
    expect_error(f, "[pool]\nfallback = ftp://x:1\n", 2, "not an http:// URL", NULL);
    expect_error(f, "[pool]\nfallback = http://:80\n", 2, "no host", NULL);
    expect_error(f, "[pool]\nfallback = http://127.0.0.1:0\n", 2, "port", NULL);
    expect_error(f, "[pool]\nfallback = http://127.0.0.1:99999\n", 2, "port", NULL);
    expect_error(f, "[pool]\nfallback = http://127.0.0.1:8x\n", 2, "port", NULL);
    expect_error(f, "[pool]\nfallback = http://u:p@127.0.0.1:80\n", 2, "credentials", "fallback_key", NULL);
    expect_error(f, "[pool]\nfallback = http://127.0.0.1:80/x?y=1\n", 2, "query", NULL);
    expect_error(f, "[pool]\nfallback = http://[::1:80\n", 2, "']'", NULL);
    expect_error(f, "[pool]\nfallback = http://no-such-host.invalid:80\n", 2, "cannot resolve", NULL);
    expect_error(f, "[pool]\nfallback_key = k\n", 2, "fallback_key", "no fallback", NULL);
    expect_error(f, "[pool]\nfallback = http://127.0.0.1:9000\n"
                    "[model a]\npath = m.gguf\nfallback_key = k\n", 5,
                 "fallback_key", "model \"a\"", "its own", NULL);
    expect_error(f, "[pool]\nfallback_unknown = yes\n", 2, "fallback_unknown", "no fallback", NULL);
    expect_error(f, "[pool]\nfallback_unknown = maybe\n", 2, "fallback_unknown", "yes or no", NULL);
    expect_error(f, "[model a]\npath = m.gguf\nfallback_unknown = yes\n", 3, "fallback_unknown", "[pool]", NULL);
}

/* memory_hard_limit: [pool]'s default (no) for every model, a model's own
 * word over it; a bad value is named with its line. */
static void test_memory_hard_limit(void **state)
{
    struct fx *f = *state;
    struct config *c = load_ok(f, "[model a]\npath = m.gguf\n");
    assert_false(c->memory_hard_limit);
    assert_false(config_memory_hard_limit(c, &c->models[0]));
    config_free(c);
    c = load_ok(f, "[pool]\nmemory_hard_limit = yes\n"
                   "[model a]\npath = m.gguf\n"
                   "[model b]\npath = m.gguf\nmemory_hard_limit = no\n");
    assert_true(config_memory_hard_limit(c, &c->models[0]));
    assert_false(config_memory_hard_limit(c, &c->models[1]));
    config_free(c);
    c = load_ok(f, "[model a]\npath = m.gguf\nmemory_hard_limit = on\n");
    assert_true(config_memory_hard_limit(c, &c->models[0]));
    config_free(c);
    expect_error(f, "[pool]\nmemory_hard_limit = maybe\n", 2,
                 "memory_hard_limit: \"maybe\" is not yes or no", NULL);
    expect_error(f, "[model a]\npath = m.gguf\nmemory_hard_limit = 2G\n", 3,
                 "memory_hard_limit: \"2G\" is not yes or no", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(test_pool_defaults),
        T(test_model_defaults),
        T(test_every_pool_key),
        T(test_every_model_key),
        T(test_fallback),
        T(test_parse_size),
        T(test_parse_duration),
        T(test_parse_bool),
        T(test_bad_pool_values),
        T(test_listen),
        T(test_bad_model_values),
        T(test_env),
        T(test_owned_args_refused),
        T(test_duplicates),
        T(test_unknown_keys),
        T(test_sections_and_syntax),
        T(test_all_errors_collected_in_line_order),
        T(test_too_many_errors),
        T(test_default_model),
        T(test_model_file_checks),
        T(test_config_load_file),
        T(test_peek_finds_a_pool_key_in_a_config_with_errors),
        T(test_comments),
        T(test_continuation_lines),
        T(test_long_lines),
        T(test_models_dir),
        T(test_models_dir_10000_files),
        T(test_empty_list_items_are_errors),
        T(test_nul_byte_is_an_error_naming_its_line),
        T(test_invalid_utf8_is_refused_naming_the_key),
        T(test_names_and_aliases_fit_in_urls),
        T(test_models_dir_skips_files_that_are_no_names),
        T(test_config_file_size_and_kind),
        T(test_body_and_drain_timeouts),
        T(test_cors_origins),
        T(test_split_words),
        T(test_child_argv),
        T(test_metrics_children),
        T(test_same_child),
        T(test_find_model_among_thousands),
        T(test_errors_free_and_null),
        T(test_example_config),
        T(test_routing_keys),
        T(test_eviction_key),
        T(test_priority_key),
        T(test_gpu_keys),
        T(test_log_rotation_keys),
        T(test_state_dir_and_preload),
        T(test_memory_hard_limit),
#undef T
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
