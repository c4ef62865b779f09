/* Budget arithmetic from fake /proc and /sys trees, and the estimate's
 * reading of the child's arguments. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "memory.h"
#include "util.h"

#define GIB (UINT64_C(1) << 30)
#define MIB (UINT64_C(1) << 20)

static char root[256];

static void put(const char *rel, const char *text)
{
    char path[512], dir[512];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    snprintf(dir, sizeof dir, "%s", path);
    for (char *p = dir + strlen(root) + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            mkdir(dir, 0755);
            *p = '/';
        }
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    snprintf(root, sizeof root, "/tmp/llama-pool-test-memory.XXXXXX");
    assert_non_null(mkdtemp(root));
    put("proc/meminfo", "MemTotal:       33554432 kB\nMemFree: 1 kB\nMemAvailable:   16777216 kB\n");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    return system(cmd) == 0 ? 0 : -1;
}

static struct config *cfg_of(const char *text)
{
    struct config_errors e = { 0 };
    struct config *c = config_load_string("t.conf", text, &e);
    if (!c)
        for (size_t i = 0; i < e.n; i++)
            print_error("%s\n", e.msgs[i]);
    config_errors_free(&e);
    assert_non_null(c);
    return c;
}

static void auto_budget_is_memtotal_minus_reserve_without_cgroup(void **state)
{
    (void)state;
    put("proc/self/cgroup", "0::/\n");
    put("sys/fs/cgroup/memory.max", "max\n");
    struct memory_info mi;
    assert_int_equal(memory_read_info(root, &mi), 0);
    assert_true(mi.mem_total == 32 * GIB);
    assert_true(mi.mem_available == 16 * GIB);
    assert_true(mi.cgroup_limit == 0);
    struct config *c = cfg_of("[pool]\nmemory_reserve = 2G\n");
    assert_true(memory_budget(c, &mi) == 30 * GIB);
    config_free(c);
}

static void auto_budget_takes_a_smaller_cgroup_v2_limit(void **state)
{
    (void)state;
    put("proc/self/cgroup", "0::/system.slice/llama-pool.service\n");
    put("sys/fs/cgroup/system.slice/llama-pool.service/memory.max", "8589934592\n");
    struct memory_info mi;
    assert_int_equal(memory_read_info(root, &mi), 0);
    assert_true(mi.cgroup_limit == 8 * GIB);
    struct config *c = cfg_of("[pool]\nmemory_reserve = 1G\n");
    assert_true(memory_budget(c, &mi) == 7 * GIB);
    config_free(c);
}

static void auto_budget_reads_a_cgroup_v1_limit(void **state)
{
    (void)state;
    put("proc/self/cgroup", "12:memory:/mygroup\n3:cpu:/\n");
    put("sys/fs/cgroup/memory/mygroup/memory.limit_in_bytes", "4294967296\n");
    struct memory_info mi;
    assert_int_equal(memory_read_info(root, &mi), 0);
    assert_true(mi.cgroup_limit == 4 * GIB);
    /* v1's "no limit" is a huge page-rounded number: ignored */
    put("sys/fs/cgroup/memory/mygroup/memory.limit_in_bytes", "9223372036854771712\n");
    assert_int_equal(memory_read_info(root, &mi), 0);
    assert_true(mi.cgroup_limit == 0);
}

static void size_and_percent_budgets(void **state)
{
    (void)state;
    put("proc/self/cgroup", "0::/\n");
    put("sys/fs/cgroup/memory.max", "max\n");
    struct memory_info mi;
    assert_int_equal(memory_read_info(root, &mi), 0);
    struct config *c = cfg_of("[pool]\nmemory_budget = 48G\n");
    assert_true(memory_budget(c, &mi) == 48 * GIB);
    config_free(c);
    c = cfg_of("[pool]\nmemory_budget = 75%\n");
    assert_true(memory_budget(c, &mi) == 32 * GIB / 100 * 75);
    config_free(c);
    /* a reserve larger than the machine leaves nothing, not a wrap-around */
    c = cfg_of("[pool]\nmemory_reserve = 64G\n");
    assert_true(memory_budget(c, &mi) == 0);
    config_free(c);
}

static void missing_meminfo_is_an_error(void **state)
{
    (void)state;
    struct memory_info mi;
    assert_int_equal(memory_read_info("/nonexistent-root", &mi), -1);
}

/* A valid empty GGUF (no architecture): weights and KV are 0, the rest
 * comes from the arguments the child will get. */
static void estimate_reads_cram_from_the_childs_arguments(void **state)
{
    (void)state;
    char model[300], text[1024];
    snprintf(model, sizeof model, "%s/m.gguf", root);
    FILE *f = fopen(model, "wb");
    assert_non_null(f);
    static const unsigned char stub[24] = { 'G', 'G', 'U', 'F', 3 };
    fwrite(stub, 1, sizeof stub, f);
    fclose(f);

    snprintf(text, sizeof text, "[model a]\npath = %s\n", model);
    struct config *c = cfg_of(text);
    struct memory_estimate e;
    char err[256];
    assert_int_equal(memory_estimate_model(c, &c->models[0], &e, err, sizeof err), 0);
    assert_true(e.cram == 8192 * MIB);          /* llama-server's default */
    assert_true(e.weights == 0 && e.kv == 0);
    assert_true(e.more == e.kv + e.compute + e.cram);
    config_free(c);

    snprintf(text, sizeof text, "[pool]\ndefault_args = -cram 0\n[model a]\npath = %s\n", model);
    c = cfg_of(text);
    assert_int_equal(memory_estimate_model(c, &c->models[0], &e, err, sizeof err), 0);
    assert_true(e.cram == 0);
    config_free(c);

    /* the model's own args come after default_args: the last one wins */
    snprintf(text, sizeof text, "[pool]\ndefault_args = -cram 0\n[model a]\npath = %s\nargs = --cache-ram 512\n", model);
    c = cfg_of(text);
    assert_int_equal(memory_estimate_model(c, &c->models[0], &e, err, sizeof err), 0);
    assert_true(e.cram == 512 * MIB);
    config_free(c);

    /* the KV cache covers the cells llama.cpp allocates: -c and -np */
    static const struct { const char *args; uint64_t cells; } kv[] = {
        { "", 4096 },                       /* no context in the file: 4096 */
        { "-c 2048", 2048 },                /* -np auto: 4 slots, unified */
        { "-c 1000", 1024 },                /* rounded up to 256 */
        { "-c 256 -np 2", 512 },            /* 128 per slot, rounded to 256 each */
        { "-c 2048 -np 4", 2048 },
        { "-c 1000 -np 3", 1536 },          /* as real llama-server logs it */
        { "-c 256 -np 2 -kvu", 256 },       /* unified: one cache for all slots */
        { "--ctx-size=3000 --parallel 3", 3072 },
        { "-c 256 -np 2 -kvu -no-kvu", 512 },   /* the last switch wins */
    };
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++) {
        snprintf(text, sizeof text, "[model a]\npath = %s\nargs = %s\n", model, kv[i].args);
        c = cfg_of(text);
        assert_int_equal(memory_estimate_model(c, &c->models[0], &e, err, sizeof err), 0);
        if (e.n_ctx != kv[i].cells)
            fail_msg("args '%s': %llu cells, expected %llu", kv[i].args,
                     (unsigned long long)e.n_ctx, (unsigned long long)kv[i].cells);
        config_free(c);
    }

    /* memory = SIZE overrides everything */
    snprintf(text, sizeof text, "[model a]\npath = %s\nmemory = 3G\n", model);
    c = cfg_of(text);
    assert_int_equal(memory_estimate_model(c, &c->models[0], &e, err, sizeof err), 0);
    assert_true(e.fixed && e.more == 3 * GIB && e.weights == 0);
    config_free(c);
}

static void estimate_of_a_broken_file_is_an_error(void **state)
{
    (void)state;
    char model[300], text[1024];
    snprintf(model, sizeof model, "%s/bad.gguf", root);
    FILE *f = fopen(model, "wb");
    assert_non_null(f);
    fputs("not a gguf", f);
    fclose(f);
    snprintf(text, sizeof text, "[model a]\npath = %s\n", model);
    struct config *c = cfg_of(text);
    struct memory_estimate e;
    char err[256] = "";
    assert_int_equal(memory_estimate_model(c, &c->models[0], &e, err, sizeof err), -1);
    assert_non_null(strstr(err, "bad.gguf"));
    config_free(c);
}

static void format_bytes_is_human(void **state)
{
    (void)state;
    char b[32];
    assert_string_equal(util_format_bytes(512, b, sizeof b), "512 B");
    assert_string_equal(util_format_bytes(1536 * MIB, b, sizeof b), "1.5 GiB");
    assert_string_equal(util_format_bytes(48 * GIB, b, sizeof b), "48 GiB");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(auto_budget_is_memtotal_minus_reserve_without_cgroup),
        cmocka_unit_test(auto_budget_takes_a_smaller_cgroup_v2_limit),
        cmocka_unit_test(auto_budget_reads_a_cgroup_v1_limit),
        cmocka_unit_test(size_and_percent_budgets),
        cmocka_unit_test(missing_meminfo_is_an_error),
        cmocka_unit_test(estimate_reads_cram_from_the_childs_arguments),
        cmocka_unit_test(estimate_of_a_broken_file_is_an_error),
        cmocka_unit_test(format_bytes_is_human),
    };
    return cmocka_run_group_tests_name("memory", tests, setup, teardown);
}
