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

/* ---- GPU: the anchors measured on an H200 (shared/llama-server.md, "On a GPU") ---- */

static void le(FILE *f, uint64_t v, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        fputc((int)((v >> (8 * i)) & 0xff), f);
}

static void gstr(FILE *f, const char *s)
{
    le(f, strlen(s), 8);
    fputs(s, f);
}

struct shape { uint32_t n_layer, n_embd, n_ff, n_head, n_vocab; };

/* One tensor info: NAME, f16 (or f32 for 1-D norms) of NE0 × NE1, at *OFF. */
static void tinfo(FILE *f, const char *name, uint64_t ne0, uint64_t ne1, uint64_t *off)
{
    gstr(f, name);
    unsigned f32 = ne1 == 1;
    le(f, f32 ? 1 : 2, 4);
    le(f, ne0, 8);
    if (!f32)
        le(f, ne1, 8);
    le(f, f32 ? 0 : 1, 4);                  /* ggml type: F32 0, F16 1 */
    le(f, *off, 8);
    uint64_t bytes = ne0 * ne1 * (f32 ? 4 : 2);
    *off += (bytes + 31) / 32 * 32;
}

/* A llama GGUF of shape S written as convert_hf_to_gguf orders it
 * (token_embd, blocks, output_norm, output); the data is a hole (sparse). */
static void write_llama(const char *path, const struct shape *s)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs("GGUF", f);
    le(f, 3, 4);
    le(f, 3 + 9 * (uint64_t)s->n_layer, 8);
    le(f, 7, 8);
    gstr(f, "general.architecture"); le(f, 8, 4); gstr(f, "llama");
    static const char *const keys[] = { "llama.block_count", "llama.embedding_length",
        "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv" };
    const uint32_t vals[] = { s->n_layer, s->n_embd, s->n_ff, s->n_head, s->n_head };
    for (int i = 0; i < 5; i++) {
        gstr(f, keys[i]);
        le(f, 4, 4);                        /* uint32 */
        le(f, vals[i], 4);
    }
    gstr(f, "llama.context_length"); le(f, 4, 4); le(f, 4096, 4);
    uint64_t off = 0;
    char name[64];
    tinfo(f, "token_embd.weight", s->n_embd, s->n_vocab, &off);
    static const char *const blk[] = { "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                       "ffn_norm", "ffn_gate", "ffn_up", "ffn_down" };
    for (uint32_t l = 0; l < s->n_layer; l++)
        for (int t = 0; t < 9; t++) {
            snprintf(name, sizeof name, "blk.%u.%s.weight", l, blk[t]);
            uint64_t ne1 = t == 0 || t == 5 ? 1 : t < 5 ? s->n_embd : t < 8 ? s->n_ff : s->n_embd;
            tinfo(f, name, t == 8 ? s->n_ff : s->n_embd, ne1, &off);
        }
    tinfo(f, "output_norm.weight", s->n_embd, 1, &off);
    tinfo(f, "output.weight", s->n_embd, s->n_vocab, &off);
    long pos = ftell(f);
    assert_true(pos > 0);
    uint64_t data = ((uint64_t)pos + 31) / 32 * 32;
    assert_int_equal(fflush(f), 0);
    assert_int_equal(ftruncate(fileno(f), (off_t)(data + off)), 0);
    fclose(f);
}

static const struct shape big = { 16, 2048, 5504, 16, 32000 };     /* a 1794 MiB file */
static const struct shape small = { 4, 256, 688, 4, 32000 };       /* a 37 MiB file */

static struct config *model_cfg(const char *path, const char *args)
{
    char text[1024];
    snprintf(text, sizeof text, "[pool]\ndefault_args = -cram 0\n[model a]\npath = %s\nargs = %s\n", path, args);
    return cfg_of(text);
}

static void estimate_on(const char *path, const char *args, unsigned n_devices, struct memory_estimate *e)
{
    struct config *c = model_cfg(path, args);
    char err[256] = "";
    if (memory_estimate_devices(c, &c->models[0], n_devices, e, err, sizeof err))
        fail_msg("args '%s': %s", args, err);
    config_free(c);
}

/* Estimate against measured, on one H200 (-cram 0, flash attention off):
 *
 * | file     | args                     | VRAM est | measured | over  | host est | host PSS |
 * |----------|--------------------------|----------|----------|-------|----------|----------|
 * | 37 MiB   | -ngl 99 -c 4096 -np 4    |  760 MiB |  714 MiB | +6.5% |  456 MiB |  443 MiB |
 * | 1794 MiB | -ngl 99 -c 4096 -np 4    | 2980 MiB | 2834 MiB | +5.1% |  565 MiB |  466 MiB |
 * | 1794 MiB | -ngl 99 -c 32768 -np 4   | 7012 MiB | 6777 MiB | +3.5% |          |          |
 * | 1794 MiB | -ngl 8 -c 4096 -np 4     | 1827 MiB | 1721 MiB | +6.1% | 1878 MiB | 1754 MiB |
 *
 * (the test prints the same rows). An estimate may be high by 30 %, never low. */
static void vram_estimate_covers_the_h200_anchors(void **state)
{
    (void)state;
    char bigp[300], smallp[300];
    snprintf(bigp, sizeof bigp, "%s/big.gguf", root);
    snprintf(smallp, sizeof smallp, "%s/small.gguf", root);
    write_llama(bigp, &big);
    write_llama(smallp, &small);
    static const struct {
        int big;
        const char *args;
        uint64_t vram_mib, host_mib;        /* measured; host 0: not measured */
    } anchors[] = {
        { 0, "-ngl 99 -c 4096 -np 4", 714, 443 },
        { 1, "-ngl 99 -c 4096 -np 4", 2834, 466 },
        { 1, "-ngl 99 -c 32768 -np 4", 6777, 0 },
        { 1, "-ngl 8 -c 4096 -np 4", 1721, 1754 },
    };
    for (size_t i = 0; i < sizeof anchors / sizeof anchors[0]; i++) {
        struct memory_estimate e;
        estimate_on(anchors[i].big ? bigp : smallp, anchors[i].args, 1, &e);
        double vram = (double)e.vram_total / MIB, host = (double)(e.weights + e.more) / MIB;
        double over = vram / (double)anchors[i].vram_mib - 1;
        print_message("%-8s %-24s VRAM %6.0f MiB (weights %.0f, KV %.0f, compute %.0f, fixed %.0f)"
                      " measured %5llu MiB %+5.1f%%; host %5.0f MiB measured %llu\n",
                      anchors[i].big ? "1794 MiB" : "37 MiB", anchors[i].args, vram,
                      (double)e.vram_weights / MIB, (double)e.vram_kv / MIB,
                      (double)e.vram_compute / MIB, (double)e.vram_fixed / MIB,
                      (unsigned long long)anchors[i].vram_mib, over * 100,
                      host, (unsigned long long)anchors[i].host_mib);
        assert_true(e.ndev == 1 && e.vram[0] == e.vram_total);
        assert_true(e.vram_total == e.vram_weights + e.vram_kv + e.vram_compute + e.vram_fixed);
        if (over < 0 || over > 0.30)
            fail_msg("'%s': %.0f MiB estimated, %llu measured", anchors[i].args, vram,
                     (unsigned long long)anchors[i].vram_mib);
        if (anchors[i].host_mib) {
            double hover = host / (double)anchors[i].host_mib - 1;
            if (hover < 0 || hover > 0.30)
                fail_msg("'%s': host %.0f MiB estimated, %llu measured", anchors[i].args, host,
                         (unsigned long long)anchors[i].host_mib);
        }
    }

    /* Instances do not share VRAM; the estimate is per instance. Without
     * devices, or with -ngl 0 or --device none, nothing moves: today's host
     * estimate, VRAM 0. */
    struct memory_estimate host_only, e;
    estimate_on(bigp, "-c 4096 -np 4", 0, &host_only);
    assert_true(host_only.vram_total == 0 && host_only.weights == 1881415680);
    static const char *const none[] = { "-c 4096 -np 4 -ngl 0", "-c 4096 -np 4 --device none" };
    for (size_t i = 0; i < 2; i++) {
        estimate_on(bigp, none[i], 1, &e);
        assert_true(e.vram_total == 0 && e.ndev == 0);
        assert_true(e.weights == host_only.weights && e.more == host_only.more);
    }
    /* the same with an -ngl the host-only daemon ignores */
    estimate_on(bigp, "-c 4096 -np 4 -ngl 99", 0, &e);
    assert_true(e.weights == host_only.weights && e.more == host_only.more && e.vram_total == 0);

    /* full offload: the host keeps token_embd only */
    estimate_on(bigp, "-ngl all -c 4096 -np 4", 1, &e);
    assert_true(e.n_gpu_layers == 16 && e.output_on_gpu);
    assert_true(e.weights == 2048 * 32000 * 2 && e.kv == 0);
    /* -ngl 16: every block, but the output layer (llama.cpp's layer 16) stays */
    estimate_on(bigp, "-ngl 16 -c 4096 -np 4", 1, &e);
    assert_true(e.n_gpu_layers == 16 && !e.output_on_gpu);
    /* quantized caches and flash attention shrink the KV and compute */
    struct memory_estimate q;
    estimate_on(bigp, "-ngl 99 -c 4096 -np 4 -ctk q8_0 -ctv q4_0 -fa on", 1, &q);
    assert_true(q.vram_kv == (uint64_t)512 * MIB * (34 + 18) / 128);
    assert_true(q.vram_compute < e.vram_compute);
    /* -nkvo keeps the KV on the host */
    estimate_on(bigp, "-ngl 99 -c 4096 -np 4 -nkvo", 1, &q);
    assert_true(q.vram_kv == 0 && q.kv == 512 * MIB);
}

/* -ngl forms, --device, -ts shares, -sm, -mg as llama.cpp reads them. */
static void gpu_placement_reads_the_childs_arguments(void **state)
{
    (void)state;
    char path[300];
    snprintf(path, sizeof path, "%s/big.gguf", root);
    static const struct { const char *args; uint64_t ngl; } ngl[] = {
        { "", UINT64_MAX }, { "-ngl auto", UINT64_MAX }, { "-ngl all", UINT64_MAX },
        { "-ngl -1", UINT64_MAX }, { "-ngl 0", 0 }, { "--gpu-layers 12", 12 },
        { "--n-gpu-layers=7", 7 }, { "-ngl 3 --n-gpu-layers 5", 5 }, { "--n-gpu-layers 5 -ngl 3", 3 },
    };
    struct memory_placement p;
    char err[256];
    for (size_t i = 0; i < sizeof ngl / sizeof ngl[0]; i++) {
        struct config *c = model_cfg(path, ngl[i].args);
        assert_int_equal(memory_gpu_placement(c, &c->models[0], 2, &p, err, sizeof err), 0);
        if (p.ngl != ngl[i].ngl)
            fail_msg("'%s': ngl %llu", ngl[i].args, (unsigned long long)p.ngl);
        assert_true(p.n_dev == 2 && p.dev[0] == 0 && p.dev[1] == 1 && p.kv_offload);
        config_free(c);
    }

    struct config *c = model_cfg(path, "--device CUDA3,CUDA1 -ts 3,1 -mg 1");
    assert_int_equal(memory_gpu_placement(c, &c->models[0], 4, &p, err, sizeof err), 0);
    assert_true(p.n_dev == 2 && p.dev[0] == 3 && p.dev[1] == 1 && p.main == 1);
    assert_true(p.split[0] == 0.75f && p.split[1] == 1.0f && p.mode == MEMORY_SPLIT_LAYER);
    config_free(c);

    static const char *const bad[] = { "--device CUDA2", "--device GPU", "-ts 1,1,1", "-ts a,b",
                                       "-mg 2", "-sm rows", "-ngl many" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        c = model_cfg(path, bad[i]);
        err[0] = '\0';
        if (memory_gpu_placement(c, &c->models[0], 2, &p, err, sizeof err) != -1 || !err[0])
            fail_msg("'%s' was taken", bad[i]);
        config_free(c);
    }

    /* A split by layers: -ts 3,1 puts 13 of 17 (16 blocks + output) on the
     * first device, as upper_bound(splits, il / 17) does; the fixed cost
     * and the compute buffers are on both. */
    struct memory_estimate e, one;
    estimate_on(path, "-ngl 99 -c 4096 -np 4 -ts 3,1 --device CUDA1,CUDA0", 2, &e);
    estimate_on(path, "-ngl 99 -c 4096 -np 4", 1, &one);
    assert_true(e.ndev == 2 && e.vram[1] > e.vram[0] && e.vram[0] > MEMORY_GPU_FIXED);
    assert_true(e.vram_kv == one.vram_kv && e.vram_weights == one.vram_weights);
    assert_true(e.vram_total == one.vram_total + MEMORY_GPU_FIXED + one.vram_compute);
    uint64_t layer = 101203968, kv_layer = 32 * MIB;
    assert_true(e.vram[1] - e.vram[0] == 10 * (layer + kv_layer) - 131080192);  /* 13 - 3 blocks - output */
    /* -sm none: all on the main device */
    estimate_on(path, "-ngl 99 -c 4096 -np 4 -sm none -mg 1", 2, &e);
    assert_true(e.ndev == 2 && e.vram[0] == 0 && e.vram[1] == one.vram_total);
    /* -sm row: weights by -ts, KV on the main device */
    estimate_on(path, "-ngl 99 -c 4096 -np 4 -sm row -ts 1,1", 2, &e);
    assert_true(e.vram[0] - e.vram[1] == one.vram_kv);
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
        cmocka_unit_test(vram_estimate_covers_the_h200_anchors),
        cmocka_unit_test(gpu_placement_reads_the_childs_arguments),
        cmocka_unit_test(format_bytes_is_human),
    };
    return cmocka_run_group_tests_name("memory", tests, setup, teardown);
}
