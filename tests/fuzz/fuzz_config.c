/* libFuzzer target for pool.conf parsing (built and run by scripts/fuzz).
 *
 * Each input is a pool.conf text given to config_load_string(). The parse
 * must either succeed or fail with at least one message, each naming the
 * file; every accepted config is walked through the functions the daemon
 * calls on it (child argv, lookups by name and alias, flag queries, reload
 * comparison), and everything is freed, errors too (LeakSanitizer checks).
 * The same text, written to pool.conf, goes through the CLI's reader
 * (config_peek_pool_key), which must agree with the parser: an accepted
 * config that sets no control_socket has the default one.
 *
 * Relative paths resolve against the config's directory, a temporary one
 * that holds a few
 * model files (m.gguf, a split model's first part, a non-GGUF file), so
 * `path = m.gguf` and `models_dir = .` find something. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "util.h"

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "fuzz_config: check failed: %s (%s:%d)\n", #cond,\
                    __FILE__, __LINE__);                                     \
            abort();                                                         \
        }                                                                    \
    } while (0)

static char dir[128];
static char conf_name[160];

static void write_file(const char *name, const char *bytes, size_t n)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f);
    CHECK(fwrite(bytes, 1, n, f) == n);
    CHECK(fclose(f) == 0);
}

static void remove_dir(void)
{
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "fuzz_config: could not remove %s\n", dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *tmp = getenv("FUZZ_TMPDIR");
    int n = snprintf(dir, sizeof dir, "%s/llama-pool-fuzz-config.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    CHECK(n > 0 && (size_t)n < sizeof dir);
    CHECK(mkdtemp(dir));
    atexit(remove_dir);
    snprintf(conf_name, sizeof conf_name, "%s/pool.conf", dir);
    write_file("m.gguf", "GGUF\3\0\0\0", 8);
    write_file("big-00001-of-00002.gguf", "GGUF\3\0\0\0", 8);
    write_file("big-00002-of-00002.gguf", "GGUF\3\0\0\0", 8);
    write_file("notes.txt", "not a model\n", 12);
    return 0;
}

static void check_errors(const struct config_errors *errs)
{
    CHECK(errs->n > 0 && errs->msgs);
    for (size_t i = 0; i < errs->n; i++) {
        CHECK(errs->msgs[i]);
        CHECK(strncmp(errs->msgs[i], conf_name, strlen(conf_name)) == 0);
    }
}

static void walk_model(const struct config *cfg, const struct config_model *m, unsigned port)
{
    CHECK(m->name && m->name[0] && m->path);
    CHECK(m->instances_min <= m->instances_max);
    CHECK(config_find_model(cfg, m->name) == m);
    for (size_t j = 0; j < m->naliases; j++)
        CHECK(config_find_model(cfg, m->aliases[j]) != NULL);
    char **argv = config_child_argv(cfg, m, port);
    CHECK(argv && argv[0]);
    size_t n = 0;
    while (argv[n])
        n++;
    CHECK(n >= 3);                /* llama_server -m PATH … */
    util_strv_free(argv);
    (void)config_child_arg(cfg, m, "-c", "--ctx-size");
    (void)config_child_arg(cfg, m, "-np", "--parallel");
    (void)config_child_arg(cfg, m, "-a", "--alias");
    (void)config_child_switch(cfg, m, "--mmap", "--mmap", "--no-mmap", "--no-mmap");
    (void)config_child_switch(cfg, m, "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified");
    CHECK(config_model_same_child(cfg, m, cfg, m));
}

static void walk_config(const struct config *cfg)
{
    CHECK(cfg->control_socket && cfg->llama_server);
    CHECK(cfg->port_min <= cfg->port_max);
    for (size_t i = 0; i < cfg->nmodels; i++)
        walk_model(cfg, &cfg->models[i], cfg->port_min);
    if (cfg->nmodels > 1)
        (void)config_model_same_child(cfg, &cfg->models[0], cfg, &cfg->models[1]);
    if (cfg->default_model)
        (void)config_find_model(cfg, cfg->default_model);
    (void)config_find_model(cfg, "");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    CHECK(text);
    memcpy(text, data, size);
    text[size] = '\0';            /* the string API stops at the first NUL */

    write_file("pool.conf", text, strlen(text));
    char *sock = config_peek_pool_key(conf_name, "control_socket");

    struct config_errors errs = { 0 };
    struct config *cfg = config_load_string(conf_name, text, &errs);
    if (cfg) {
        CHECK(errs.n == 0);
        CHECK(sock || strcmp(cfg->control_socket, "/run/llama-pool/control.sock") == 0);
        walk_config(cfg);
        config_free(cfg);
    } else {
        check_errors(&errs);
    }
    config_errors_free(&errs);
    free(sock);
    free(text);
    return 0;
}
