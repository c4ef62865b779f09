#include "memory.h"

#include "config.h"
#include "gguf.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int read_meminfo(const char *root, struct memory_info *out)
{
    char path[512];
    snprintf(path, sizeof path, "%s/proc/meminfo", root);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        unsigned long long kb;
        if (sscanf(line, "MemTotal: %llu kB", &kb) == 1)
            out->mem_total = kb * 1024;
        else if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            out->mem_available = kb * 1024;
    }
    fclose(f);
    return out->mem_total ? 0 : -1;
}

/* Parse one number from FILE ("max" = unlimited → 0). */
static uint64_t read_limit_file(const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    char buf[64] = "";
    uint64_t v = 0;
    if (fgets(buf, sizeof buf, f) && strncmp(buf, "max", 3) != 0)
        v = strtoull(buf, NULL, 10);
    fclose(f);
    /* cgroup v1 reports "no limit" as a huge page-rounded number. */
    if (v >= (UINT64_C(1) << 62))
        v = 0;
    return v;
}

static uint64_t read_cgroup_limit(const char *root)
{
    char path[1024], line[1024];
    snprintf(path, sizeof path, "%s/proc/self/cgroup", root);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    uint64_t limit = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        /* v2: "0::/system.slice/x.service"; v1: "4:memory:/user.slice" */
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2)
            continue;
        const char *cg = c2 + 1;
        uint64_t v = 0;
        if (c2 == c1 + 1 && line[0] == '0') {
            snprintf(path, sizeof path, "%s/sys/fs/cgroup%s/memory.max", root, cg);
            v = read_limit_file(path);
        } else if (strstr(c1, "memory")) {
            snprintf(path, sizeof path, "%s/sys/fs/cgroup/memory%s/memory.limit_in_bytes", root, cg);
            v = read_limit_file(path);
        }
        if (v && (!limit || v < limit))
            limit = v;
    }
    fclose(f);
    return limit;
}

int memory_read_info(const char *root, struct memory_info *out)
{
    memset(out, 0, sizeof *out);
    if (read_meminfo(root ? root : "", out) < 0)
        return -1;
    out->cgroup_limit = read_cgroup_limit(root ? root : "");
    return 0;
}

uint64_t memory_budget(const struct config *cfg, const struct memory_info *info)
{
    uint64_t total = info->mem_total;
    if (info->cgroup_limit && info->cgroup_limit < total)
        total = info->cgroup_limit;
    switch (cfg->budget_kind) {
    case CONFIG_BUDGET_SIZE:
        return cfg->budget_bytes;
    case CONFIG_BUDGET_PERCENT:
        return total / 100 * cfg->budget_percent;
    case CONFIG_BUDGET_AUTO:
    default:
        return total > cfg->memory_reserve ? total - cfg->memory_reserve : 0;
    }
}

uint64_t memory_pss(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    uint64_t pss = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long long kb;
        if (sscanf(line, "Pss: %llu kB", &kb) == 1) {
            pss = kb * 1024;
            break;
        }
    }
    fclose(f);
    return pss;
}

#define MIB (UINT64_C(1) << 20)

static uint64_t pad256(uint64_t n)
{
    return (n + 255) / 256 * 256;
}

uint64_t memory_kv_cells(uint64_t n_ctx, long n_parallel, int unified)
{
    if (n_parallel <= 0) {              /* auto: 4 slots in one unified cache */
        n_parallel = 4;
        if (unified < 0)
            unified = 1;
    }
    n_ctx = pad256(n_ctx);
    if (unified > 0)
        return n_ctx;
    uint64_t per_slot = pad256(n_ctx / (uint64_t)n_parallel);
    if (per_slot == 0)
        per_slot = 256;
    return per_slot * (uint64_t)n_parallel;
}

/* KV cells and streams for the child's -c, -np, -kvu: a unified cache is
 * one stream, else one per slot (llama.cpp sizes attention per stream). */
static uint64_t child_kv_cells(const struct config *cfg, const struct config_model *m,
                               const struct gguf_info *g, uint64_t *streams)
{
    const char *c = config_child_arg(cfg, m, "-c", "--ctx-size");
    uint64_t n_ctx = c ? strtoull(c, NULL, 10) : 0;
    if (n_ctx == 0)
        n_ctx = g->n_ctx_train ? g->n_ctx_train : 4096;
    const char *np = config_child_arg(cfg, m, "-np", "--parallel");
    long n_parallel = np ? strtol(np, NULL, 10) : -1;
    int unified = config_child_switch(cfg, m, "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified");
    if (streams)
        *streams = n_parallel <= 0 ? (unified == 0 ? 4 : 1) : unified > 0 ? 1 : (uint64_t)n_parallel;
    return memory_kv_cells(n_ctx, n_parallel, unified);
}

/* The host estimate of today: everything on the CPU. */
static void estimate_host(const struct config *cfg, const struct config_model *m,
                          const struct gguf_info *g, struct memory_estimate *out)
{
    /* Weights: a split model's other parts are about as large as this one. */
    out->weights = g->data_size * (g->split_count > 1 ? g->split_count : 1);

    /* KV cache for the context the child really gets: -c N, or the model's
     * own context when -c is absent or 0, shared by its -np slots. */
    uint64_t n_ctx = child_kv_cells(cfg, m, g, NULL);
    out->n_ctx = n_ctx;
    out->kv = gguf_kv_cache_bytes(g, n_ctx);

    /* Compute buffers and the process's own anonymous memory: llama.cpp
     * sizes compute buffers for one ubatch (512 tokens): activations grow
     * with n_embd, attention scores with heads × context. 16 MiB of base,
     * 8 floats per embedding dimension and one float per head and context
     * position (up to 4096), per ubatch token. Errs on the high side:
     * tiny-a (n_embd 64) measures 10-15 MiB anonymous against 19-51 MiB
     * here; a 7B model's ~300 MiB compute buffer at -c 4096 against 351.
     * Measured PSS replaces the estimate once an instance runs. */
    uint64_t ctx_scores = n_ctx < 4096 ? n_ctx : 4096;
    out->compute = 16 * MIB + (uint64_t)512 * 4 * (8 * (uint64_t)g->n_embd + (uint64_t)g->n_head * ctx_scores);

    /* The host prompt cache is 8192 MiB per process unless -cram says otherwise. */
    const char *cram = config_child_arg(cfg, m, "-cram", "--cache-ram");
    long long cram_mib = cram ? strtoll(cram, NULL, 10) : 8192;
    if (cram_mib < 0)               /* -1: no limit; count the default at least */
        cram_mib = 8192;
    out->cram = (uint64_t)cram_mib * MIB;

    out->more = out->kv + out->compute + out->cram;
}

int memory_estimate_model(const struct config *cfg, const struct config_model *m,
                          struct memory_estimate *out, char *err, size_t errlen)
{
    return memory_estimate_devices(cfg, m, 0, out, err, errlen);
}

/* ---- GPU devices ---- */

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* The value of the last of NAMES (each also as NAME=VALUE) in the child's
 * args, default_args first; NULL when absent. -ngl has three names, more
 * than config_child_arg takes. */
static const char *last_arg(const struct config *cfg, const struct config_model *m,
                            const char *const *names)
{
    const char *found = NULL;
    char *const *lists[2] = { cfg->default_args, m->args };
    size_t counts[2] = { cfg->ndefault_args, m->nargs };
    for (int l = 0; l < 2; l++)
        for (size_t i = 0; i < counts[l]; i++)
            for (const char *const *n = names; *n; n++) {
                size_t len = strlen(*n);
                if (!strcmp(lists[l][i], *n) && i + 1 < counts[l])
                    found = lists[l][i + 1];
                else if (!strncmp(lists[l][i], *n, len) && lists[l][i][len] == '=')
                    found = lists[l][i] + len + 1;
            }
    return found;
}

/* -ngl N|auto|all: N, or UINT64_MAX for every layer and the output. auto
 * (the default, -1) lets llama-server's --fit choose from the free memory;
 * a supervisor that places models itself counts it as all (common/arg.cpp:
 * "either an exact number, 'auto', or 'all' (default: auto)"). */
static int parse_ngl(const char *v, uint64_t *out, char *err, size_t errlen)
{
    *out = UINT64_MAX;
    if (!v || !strcmp(v, "auto") || !strcmp(v, "all"))
        return 0;
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (end == v || *end || errno)
        return fail(err, errlen, "-ngl %s: not a number, auto or all", v);
    if (n >= 0)
        *out = (uint64_t)n;
    return 0;
}

/* --device NAME[,NAME]: slots from the names' trailing digits (CUDA1 → 1). */
static int parse_devices(const char *v, unsigned n_devices, struct memory_placement *p,
                         char *err, size_t errlen)
{
    if (!strcmp(v, "none"))
        return 0;
    const char *s = v;
    while (*s) {
        size_t len = strcspn(s, ",");
        size_t d = len;
        while (d > 0 && s[d - 1] >= '0' && s[d - 1] <= '9')
            d--;
        if (d == len || len - d > 3)
            return fail(err, errlen, "--device %s: '%.*s' is not a device name like CUDA0", v, (int)len, s);
        unsigned slot = (unsigned)strtoul(s + d, NULL, 10);
        if (slot >= n_devices)
            return fail(err, errlen, "--device %s: device %u, but there are %u", v, slot, n_devices);
        if (p->n_dev == MEMORY_MAX_DEVICES)
            return fail(err, errlen, "--device %s: more than %d devices", v, MEMORY_MAX_DEVICES);
        p->dev[p->n_dev++] = slot;
        s += len;
        if (*s == ',')
            s++;
    }
    if (p->n_dev == 0)
        return fail(err, errlen, "--device '%s': no device named", v);
    return 0;
}

/* -ts A,B,...: shares per device in --device order (',' or '/' between),
 * made cumulative and normalized as llama.cpp's load_tensors does. */
static int parse_split(const char *v, struct memory_placement *p, char *err, size_t errlen)
{
    float share[MEMORY_MAX_DEVICES] = { 0 };
    unsigned n = 0;
    const char *s = v;
    while (v && *s) {
        if (n == p->n_dev)
            return fail(err, errlen, "-ts %s: more shares than the %u devices", v, p->n_dev);
        char *end;
        errno = 0;
        share[n] = strtof(s, &end);
        if (end == s || errno || share[n] < 0 || (*end && *end != ',' && *end != '/'))
            return fail(err, errlen, "-ts %s: not a list of proportions like 3,1", v);
        n++;
        s = *end ? end + 1 : end;
    }
    float sum = 0;
    for (unsigned i = 0; i < p->n_dev; i++)
        sum += share[i];
    for (unsigned i = 0; i < p->n_dev; i++) {
        float cum = 0;
        for (unsigned j = 0; j <= i; j++)
            cum += sum > 0 ? share[j] : 1;
        p->split[i] = cum / (sum > 0 ? sum : (float)p->n_dev);
    }
    if (p->n_dev)
        p->split[p->n_dev - 1] = 1.0f;
    return 0;
}

int memory_gpu_placement(const struct config *cfg, const struct config_model *m,
                         unsigned n_devices, struct memory_placement *out,
                         char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (n_devices == 0 || n_devices > MEMORY_MAX_DEVICES)
        return fail(err, errlen, "%u devices: 1 to %d are known", n_devices, MEMORY_MAX_DEVICES);
    static const char *const ngl_names[] = { "-ngl", "--gpu-layers", "--n-gpu-layers", NULL };
    if (parse_ngl(last_arg(cfg, m, ngl_names), &out->ngl, err, errlen))
        return -1;
    out->kv_offload = config_child_switch(cfg, m, "-nkvo", "--no-kv-offload", "-kvo", "--kv-offload") != 1;

    const char *dev = config_child_arg(cfg, m, "-dev", "--device");
    if (dev) {
        if (parse_devices(dev, n_devices, out, err, errlen))
            return -1;
    } else {
        for (unsigned i = 0; i < n_devices; i++)
            out->dev[out->n_dev++] = i;
    }
    if (parse_split(config_child_arg(cfg, m, "-ts", "--tensor-split"), out, err, errlen))
        return -1;

    const char *sm = config_child_arg(cfg, m, "-sm", "--split-mode");
    if (!sm || !strcmp(sm, "layer"))
        out->mode = MEMORY_SPLIT_LAYER;
    else if (!strcmp(sm, "row") || !strcmp(sm, "tensor"))
        out->mode = MEMORY_SPLIT_ROW;
    else if (!strcmp(sm, "none"))
        out->mode = MEMORY_SPLIT_NONE;
    else
        return fail(err, errlen, "-sm %s: not layer, row, tensor or none", sm);

    const char *mg = config_child_arg(cfg, m, "-mg", "--main-gpu");
    if (mg) {
        char *end;
        long v = strtol(mg, &end, 10);
        if (end == mg || *end || v < 0 || (out->n_dev && (unsigned long)v >= out->n_dev))
            return fail(err, errlen, "-mg %s: not one of the %u devices", mg, out->n_dev);
        out->main = (unsigned)v;
    }
    return 0;
}

/* Bytes per 32 cache elements of a -ctk/-ctv type (ggml's block sizes);
 * 0 when unknown. */
static unsigned cache_type_bytes32(const char *type)
{
    static const struct { const char *name; unsigned bytes32; } types[] = {
        { "f32", 128 }, { "f16", 64 }, { "bf16", 64 }, { "q8_0", 34 }, { "q4_0", 18 },
        { "q4_1", 20 }, { "iq4_nl", 18 }, { "q5_0", 22 }, { "q5_1", 24 },
    };
    if (!type)
        return 64;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (!strcmp(type, types[i].name))
            return types[i].bytes32;
    return 0;
}

/* The position in P->dev of the device llama.cpp gives layer IL, counting
 * the output layer as IL = n_layer, or -1 for the CPU (llama-model.cpp,
 * load_tensors: i_gpu_start = max(n_layer - n_gpu_layers, 0), act_gpu_layers
 * = min(n_gpu_layers, n_layer + 1); layer il is on the CPU when il <
 * i_gpu_start or il - i_gpu_start >= act_gpu_layers, else on
 * upper_bound(splits, (il - i_gpu_start) / act_gpu_layers); the input layer
 * (token_embd) is always on the CPU; dev_output = the device of layer n_layer). */
static int layer_device(const struct memory_placement *p, uint64_t n_layer, uint64_t il)
{
    uint64_t ngl = p->ngl;
    uint64_t start = ngl < n_layer ? n_layer - ngl : 0;
    uint64_t act = ngl < n_layer + 1 ? ngl : n_layer + 1;
    if (p->n_dev == 0 || il < start || il - start >= act)
        return -1;
    if (p->mode != MEMORY_SPLIT_LAYER)
        return (int)p->main;
    float at = (float)(il - start) / (float)act;
    unsigned d = 0;
    while (d + 1 < p->n_dev && p->split[d] <= at)
        d++;
    return (int)d;
}

/* Add BYTES of weights on position D; row split spreads them by -ts. */
static void add_weights(const struct memory_placement *p, int d, uint64_t bytes, uint64_t *on)
{
    if (p->mode != MEMORY_SPLIT_ROW) {
        on[d] += bytes;
        return;
    }
    float prev = 0;
    for (unsigned i = 0; i < p->n_dev; i++) {
        on[i] += (uint64_t)((double)bytes * (double)(p->split[i] - prev) + 0.5);
        prev = p->split[i];
    }
}

static int estimate_vram(const struct config *cfg, const struct config_model *m, unsigned n_devices,
                         const struct gguf_info *g, struct memory_estimate *out,
                         char *err, size_t errlen)
{
    struct memory_placement p;
    if (memory_gpu_placement(cfg, m, n_devices, &p, err, errlen))
        return -1;
    if (p.n_dev == 0 || p.ngl == 0 || g->n_layer == 0)
        return 0;                   /* nothing offloaded: the host estimate stands */
    if (p.mode == MEMORY_SPLIT_NONE) {
        p.dev[0] = p.dev[p.main];   /* llama.cpp keeps the main device only */
        p.n_dev = 1;
        p.main = 0;
    }

    const char *ctk = config_child_arg(cfg, m, "-ctk", "--cache-type-k");
    const char *ctv = config_child_arg(cfg, m, "-ctv", "--cache-type-v");
    unsigned k32 = cache_type_bytes32(ctk), v32 = cache_type_bytes32(ctv);
    if (!k32 || !v32)
        return fail(err, errlen, "cache type %s: not one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1",
                    k32 ? ctv : ctk);

    uint64_t streams;
    uint64_t cells = child_kv_cells(cfg, m, g, &streams);
    uint64_t split = g->split_count > 1 ? g->split_count : 1;
    /* Per block: this file's own data; a split model's other parts are not
     * read, so its blocks are taken as equal shares of the whole. */
    uint64_t rest = g->data_size * split - g->token_embd_bytes - g->output_bytes;
    uint64_t weights[MEMORY_MAX_DEVICES] = { 0 }, kv[MEMORY_MAX_DEVICES] = { 0 };
    uint64_t gpu_weights = 0, host_kv = 0;
    bool used[MEMORY_MAX_DEVICES] = { false };

    for (uint64_t il = 0; il <= g->n_layer; il++) {
        int d = layer_device(&p, g->n_layer, il);
        uint64_t w, kv_bytes = 0;
        if (il == g->n_layer) {
            w = g->output_bytes;
            if (d >= 0 && g->output_tied)           /* token_embd loaded again: not moved */
                add_weights(&p, d, g->token_embd_bytes, weights);
        } else {
            w = split > 1 ? rest / g->n_layer : g->layer_bytes[il];
            uint64_t ke, ve;
            gguf_kv_layer_elems(g, (uint32_t)il, &ke, &ve);
            kv_bytes = cells * (ke * k32 + ve * v32) / 32;
        }
        if (d < 0) {
            host_kv += kv_bytes;
            continue;
        }
        add_weights(&p, d, w, weights);
        gpu_weights += w;
        used[d] = true;
        if (!p.kv_offload)
            host_kv += kv_bytes;
        else
            kv[p.mode == MEMORY_SPLIT_LAYER ? d : (int)p.main] += kv_bytes;
        if (il == g->n_layer)
            out->output_on_gpu = true;
        else
            out->n_gpu_layers++;
    }

    /* Compute buffers, measured on an H200 (docs/memory.md, GPU): one
     * ubatch of f32 activations (8 n_embd), logits (n_vocab) and, without
     * flash attention, K·Q scores and their softmax per stream. */
    const char *ub = config_child_arg(cfg, m, "-ub", "--ubatch-size");
    const char *b = config_child_arg(cfg, m, "-b", "--batch-size");
    uint64_t n_ub = ub ? strtoull(ub, NULL, 10) : 512, n_b = b ? strtoull(b, NULL, 10) : 2048;
    if (n_b && n_b < n_ub)
        n_ub = n_b;
    if (n_ub == 0)
        n_ub = 512;
    const char *fa = config_child_arg(cfg, m, "-fa", "--flash-attn");
    bool flash = fa && (!strcmp(fa, "on") || !strcmp(fa, "1") || !strcmp(fa, "true"));
    uint64_t scores = flash ? 0 : 2 * (uint64_t)g->n_head * (cells / streams);
    uint64_t compute = n_ub * 4 * (g->n_vocab + 8 * (uint64_t)g->n_embd + scores);

    for (unsigned i = 0; i < p.n_dev; i++) {
        unsigned slot = p.dev[i];
        uint64_t c = used[i] || weights[i] || kv[i] ? compute : 0;
        out->vram[slot] += weights[i] + kv[i] + c + MEMORY_GPU_FIXED;
        out->vram_weights += weights[i];
        out->vram_kv += kv[i];
        out->vram_compute += c;
        out->vram_fixed += MEMORY_GPU_FIXED;
        if (slot + 1 > out->ndev)
            out->ndev = slot + 1;
    }
    for (unsigned d = 0; d < out->ndev; d++)
        out->vram_total += out->vram[d];

    /* The host keeps the rest: token_embd, the CPU blocks and their KV. */
    if (!out->fixed) {
        out->weights -= gpu_weights < out->weights ? gpu_weights : out->weights;
        out->kv = host_kv;
        if (out->n_gpu_layers == g->n_layer && out->output_on_gpu)
            out->compute = 16 * MIB;    /* the CPU only looks up token embeddings */
        out->more = out->kv + out->compute + out->cram + MEMORY_GPU_HOST;
    }
    return 0;
}

int memory_estimate_devices(const struct config *cfg, const struct config_model *m,
                            unsigned n_devices, struct memory_estimate *out,
                            char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    struct stat st;
    if (stat(m->path, &st) == 0)
        out->file_id = ((uint64_t)st.st_dev << 40) ^ (uint64_t)st.st_ino;
    if (m->memory_kind == CONFIG_MEMORY_SIZE) {
        out->fixed = true;
        out->more = m->memory_bytes;
        if (n_devices == 0)
            return 0;
    }
    struct gguf_info g;
    if (gguf_read(m->path, &g, err, errlen) < 0)
        return -1;
    if (!out->fixed)
        estimate_host(cfg, m, &g, out);
    int rc = n_devices ? estimate_vram(cfg, m, n_devices, &g, out, err, errlen) : 0;
    gguf_info_free(&g);
    return rc;
}
