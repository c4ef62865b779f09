#include "memory.h"

#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

const char *memory_format(uint64_t bytes, char *buf, unsigned len)
{
    static const char *const unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
    double v = (double)bytes;
    unsigned u = 0;
    while (v >= 1024 && u < 4) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", bytes);
    else
        snprintf(buf, len, v < 10 ? "%.1f %s" : "%.0f %s", v, unit[u]);
    return buf;
}
