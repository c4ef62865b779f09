#include "memory.h"

#include "config.h"
#include "gguf.h"

#include <inttypes.h>
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

int memory_estimate_model(const struct config *cfg, const struct config_model *m,
                          struct memory_estimate *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    struct stat st;
    if (stat(m->path, &st) == 0)
        out->file_id = ((uint64_t)st.st_dev << 40) ^ (uint64_t)st.st_ino;
    if (m->memory_kind == CONFIG_MEMORY_SIZE) {
        out->fixed = true;
        out->more = m->memory_bytes;
        return 0;
    }
    struct gguf_info g;
    if (gguf_read(m->path, &g, err, errlen) < 0)
        return -1;

    /* Weights: a split model's other parts are about as large as this one. */
    out->weights = g.data_size * (g.split_count > 1 ? g.split_count : 1);

    /* KV cache for the context the child really gets: -c N, or the model's
     * own context when -c is absent or 0, shared by its -np slots. */
    const char *c = config_child_arg(cfg, m, "-c", "--ctx-size");
    uint64_t n_ctx = c ? strtoull(c, NULL, 10) : 0;
    if (n_ctx == 0)
        n_ctx = g.n_ctx_train ? g.n_ctx_train : 4096;
    const char *np = config_child_arg(cfg, m, "-np", "--parallel");
    n_ctx = memory_kv_cells(n_ctx, np ? strtol(np, NULL, 10) : -1,
                            config_child_switch(cfg, m, "-kvu", "--kv-unified",
                                                "-no-kvu", "--no-kv-unified"));
    out->n_ctx = n_ctx;
    out->kv = gguf_kv_cache_bytes(&g, n_ctx);

    /* Compute buffers and the process's own anonymous memory: llama.cpp
     * sizes compute buffers for one ubatch (512 tokens): activations grow
     * with n_embd, attention scores with heads × context. 16 MiB of base,
     * 8 floats per embedding dimension and one float per head and context
     * position (up to 4096), per ubatch token. Errs on the high side:
     * tiny-a (n_embd 64) measures 10-15 MiB anonymous against 19-51 MiB
     * here; a 7B model's ~300 MiB compute buffer at -c 4096 against 351.
     * Measured PSS replaces the estimate once an instance runs. */
    uint64_t ctx_scores = n_ctx < 4096 ? n_ctx : 4096;
    out->compute = 16 * MIB + (uint64_t)512 * 4 * (8 * (uint64_t)g.n_embd + (uint64_t)g.n_head * ctx_scores);

    /* The host prompt cache is 8192 MiB per process unless -cram says otherwise. */
    const char *cram = config_child_arg(cfg, m, "-cram", "--cache-ram");
    long long cram_mib = cram ? strtoll(cram, NULL, 10) : 8192;
    if (cram_mib < 0)               /* -1: no limit; count the default at least */
        cram_mib = 8192;
    out->cram = (uint64_t)cram_mib * MIB;

    out->more = out->kv + out->compute + out->cram;
    gguf_info_free(&g);
    return 0;
}
