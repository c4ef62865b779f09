/* gpu — NVIDIA devices through a dlopen'd NVML (gpu.h).
 *
 * NVML's types are declared here rather than taken from nvml.h, which is
 * not on a build machine without the CUDA toolkit. Only what is used:
 *
 *   nvmlReturn_t       an int; 0 is success, 7 "insufficient size".
 *   nvmlDevice_t       an opaque pointer.
 *   nvmlMemory_t       { total, free, used }, unsigned long long each, in
 *                      that order (not total, used, free).
 *   nvmlProcessInfo_v1_t  { pid, usedGpuMemory }: 16 bytes (4 of padding
 *                      after pid), filled by the unversioned
 *                      nvmlDeviceGetComputeRunningProcesses.
 *   nvmlProcessInfo_v2_t  v1 + { gpuInstanceId, computeInstanceId }: 24
 *                      bytes, filled by both _v2 and _v3. nvml.h names it
 *                      nvmlProcessInfo_t for _v3. One header (CUDA 12.2's,
 *                      also in DCGM's copy) added a fifth field,
 *                      usedGpuCcProtectedMemory, to nvmlProcessInfo_t; the
 *                      drivers did not follow, later headers took it out
 *                      again, and it lives in nvmlProcessDetail_v1_t (used
 *                      by nvmlDeviceGetRunningProcessDetailList) instead.
 *                      Reading _v3's answer with a 32-byte stride would
 *                      misread every entry after the first.
 *   Checked with the search tool (find_string "nvmlProcessInfo_v2_t",
 *   "usedGpuCcProtectedMemory"): NVIDIA's nvidia-ml-py (pynvml.py:
 *   "c_nvmlProcessInfo_v3_t = c_nvmlProcessInfo_v2_t", and
 *   c_nvmlProcessDetail_v1_t with the fifth field), the cuda-python
 *   bindings' nvml.h extract (nvmlProcessInfo_t = four fields), and a
 *   monitor's comment that the fifth field "is present in DCGM's nvml.h
 *   but not the latest driver nvml.h".
 *
 * usedGpuMemory may be NVML_VALUE_NOT_AVAILABLE (all ones, under Windows
 * WDDM): counted as 0 here. */
#define _GNU_SOURCE
#include "gpu.h"

#include "config.h"
#include "log.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvml_return;
typedef struct nvml_device_st *nvml_device;

#define NVML_SUCCESS 0
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_VALUE_NOT_AVAILABLE (~0ULL)

struct nvml_memory {                 /* nvmlMemory_t */
    unsigned long long total, free, used;
};

struct nvml_process_v1 {             /* nvmlProcessInfo_v1_t */
    unsigned int pid;
    unsigned long long usedGpuMemory;
};

struct nvml_process_v2 {             /* nvmlProcessInfo_v2_t, and _v3's nvmlProcessInfo_t */
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
};

_Static_assert(sizeof(struct nvml_memory) == 24, "nvmlMemory_t is 24 bytes");
_Static_assert(sizeof(struct nvml_process_v1) == 16, "nvmlProcessInfo_v1_t is 16 bytes");
_Static_assert(sizeof(struct nvml_process_v2) == 24, "nvmlProcessInfo_v2_t is 24 bytes");

/* One entry of the per-process snapshot. */
struct gpu_proc {
    pid_t pid;
    unsigned device;                 /* index into gpus.dev */
    uint64_t bytes;
};

struct gpus {
    void *lib;
    nvml_return (*init)(void);
    nvml_return (*shutdown)(void);
    const char *(*error_string)(nvml_return);
    nvml_return (*count)(unsigned *);
    nvml_return (*handle)(unsigned, nvml_device *);
    nvml_return (*name)(nvml_device, char *, unsigned);
    nvml_return (*uuid)(nvml_device, char *, unsigned);
    nvml_return (*memory)(nvml_device, struct nvml_memory *);
    nvml_return (*processes)(nvml_device, unsigned *, void *);
    size_t proc_stride;              /* bytes per entry the processes call writes */
    const char *proc_symbol;         /* its name, for messages */

    struct gpu_device *dev;
    nvml_device *handles;
    bool *no_proc_list;              /* per device: NVML cannot list its processes */
    size_t ndev;

    struct gpu_proc *procs;          /* sorted by pid, then device */
    size_t nprocs, procs_cap;
    unsigned char *raw;              /* the processes call's answer */
    size_t raw_cap;                  /* in entries */
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static const char *nvml_error(const struct gpus *g, nvml_return rc)
{
    const char *s = g->error_string ? g->error_string(rc) : NULL;
    return s && *s ? s : "unknown NVML error";
}

/* ------------------------------------------------------------------ */
/* Pure arithmetic                                                     */

uint64_t gpu_budget(const struct config *cfg, uint64_t total)
{
    switch (cfg->gpu_budget_kind) {
    case CONFIG_BUDGET_SIZE:
        return cfg->gpu_budget_bytes < total ? cfg->gpu_budget_bytes : total;
    case CONFIG_BUDGET_PERCENT:
        return total / 100 * cfg->gpu_budget_percent + total % 100 * cfg->gpu_budget_percent / 100;
    case CONFIG_BUDGET_AUTO:
    default:
        return total > cfg->gpu_reserve ? total - cfg->gpu_reserve : 0;
    }
}

uint64_t gpu_room(uint64_t budget, uint64_t charged, uint64_t free)
{
    uint64_t left = budget > charged ? budget - charged : 0;
    return left < free ? left : free;
}

/* ------------------------------------------------------------------ */
/* Loading                                                             */

/* The address of SYMBOL in the library, or NULL. */
static void *sym(struct gpus *g, const char *symbol)
{
    return dlsym(g->lib, symbol);
}

/* Resolves every symbol; false with ERR filled when one is missing. */
static bool resolve(struct gpus *g, const char *library, char *err, size_t errlen)
{
    static const char *const required[] = {
        "nvmlInit_v2", "nvmlShutdown", "nvmlErrorString", "nvmlDeviceGetCount_v2",
        "nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetName", "nvmlDeviceGetUUID",
        "nvmlDeviceGetMemoryInfo",
    };
    void *p[sizeof required / sizeof *required];
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        if (!(p[i] = sym(g, required[i]))) {
            set_err(err, errlen, "%s has no %s: not a usable NVML", library, required[i]);
            return false;
        }
    }
    /* dlsym's void * becomes a function pointer by copying its bytes, as
     * POSIX requires to work; a cast would draw -Wpedantic's complaint. */
    memcpy(&g->init, &p[0], sizeof g->init);
    memcpy(&g->shutdown, &p[1], sizeof g->shutdown);
    memcpy(&g->error_string, &p[2], sizeof g->error_string);
    memcpy(&g->count, &p[3], sizeof g->count);
    memcpy(&g->handle, &p[4], sizeof g->handle);
    memcpy(&g->name, &p[5], sizeof g->name);
    memcpy(&g->uuid, &p[6], sizeof g->uuid);
    memcpy(&g->memory, &p[7], sizeof g->memory);

    static const struct {
        const char *symbol;
        size_t stride;
    } procs[] = {
        { "nvmlDeviceGetComputeRunningProcesses_v3", sizeof(struct nvml_process_v2) },
        { "nvmlDeviceGetComputeRunningProcesses_v2", sizeof(struct nvml_process_v2) },
        { "nvmlDeviceGetComputeRunningProcesses", sizeof(struct nvml_process_v1) },
    };
    for (size_t i = 0; i < sizeof procs / sizeof *procs && !g->processes; i++) {
        void *f = sym(g, procs[i].symbol);
        if (f) {
            memcpy(&g->processes, &f, sizeof g->processes);
            g->proc_stride = procs[i].stride;
            g->proc_symbol = procs[i].symbol;
        }
    }
    if (!g->processes) {
        set_err(err, errlen, "%s has no nvmlDeviceGetComputeRunningProcesses: not a usable NVML", library);
        return false;
    }
    return true;
}

static void lose(struct gpus *g, size_t i, const char *call, nvml_return rc);

/* Reads device I's handle, name and UUID; a failure marks it lost. */
static void open_device(struct gpus *g, unsigned i)
{
    struct gpu_device *d = &g->dev[i];
    d->index = i;
    snprintf(d->name, sizeof d->name, "unknown");
    nvml_return rc = g->handle(i, &g->handles[i]);
    if (rc != NVML_SUCCESS) {
        lose(g, i, "nvmlDeviceGetHandleByIndex_v2", rc);
        return;
    }
    if ((rc = g->name(g->handles[i], d->name, sizeof d->name)) != NVML_SUCCESS) {
        snprintf(d->name, sizeof d->name, "unknown");
        lose(g, i, "nvmlDeviceGetName", rc);
        return;
    }
    if ((rc = g->uuid(g->handles[i], d->uuid, sizeof d->uuid)) != NVML_SUCCESS) {
        d->uuid[0] = '\0';
        lose(g, i, "nvmlDeviceGetUUID", rc);
        return;
    }
    d->name[sizeof d->name - 1] = '\0';
    d->uuid[sizeof d->uuid - 1] = '\0';
}

struct gpus *gpus_open(const char *library, char *err, size_t errlen)
{
    if (!library || !*library)
        library = CONFIG_DEFAULT_NVML_LIBRARY;
    struct gpus *g = calloc(1, sizeof *g);
    if (!g) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    g->lib = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!g->lib) {
        const char *why = dlerror();
        set_err(err, errlen, "cannot load %s: %s", library, why ? why : "dlopen failed");
        free(g);
        return NULL;
    }
    if (!resolve(g, library, err, errlen)) {
        dlclose(g->lib);
        free(g);
        return NULL;
    }
    nvml_return rc = g->init();
    if (rc != NVML_SUCCESS) {
        set_err(err, errlen, "nvmlInit_v2 failed: %s", nvml_error(g, rc));
        dlclose(g->lib);
        free(g);
        return NULL;
    }

    unsigned n = 0;
    if ((rc = g->count(&n)) != NVML_SUCCESS) {
        set_err(err, errlen, "nvmlDeviceGetCount_v2 failed: %s", nvml_error(g, rc));
        goto fail;
    }
    if (n == 0) {
        set_err(err, errlen, "NVML (%s) sees no device", library);
        goto fail;
    }
    g->ndev = n;
    g->dev = calloc(n, sizeof *g->dev);
    g->handles = calloc(n, sizeof *g->handles);
    g->no_proc_list = calloc(n, sizeof *g->no_proc_list);
    if (!g->dev || !g->handles || !g->no_proc_list) {
        set_err(err, errlen, "out of memory");
        goto fail;
    }
    for (unsigned i = 0; i < n; i++)
        open_device(g, i);
    gpus_refresh(g);
    if (!gpus_usable(g)) {
        set_err(err, errlen, "NVML (%s) sees %u device%s, and every one failed (device 0: %s)",
                library, n, n == 1 ? "" : "s", g->dev[0].lost_reason);
        goto fail;
    }
    return g;

fail:
    gpus_close(g);
    return NULL;
}

size_t gpus_count(const struct gpus *g)
{
    return g ? g->ndev : 0;
}

const struct gpu_device *gpus_device(const struct gpus *g, size_t i)
{
    return g && i < g->ndev ? &g->dev[i] : NULL;
}

size_t gpus_usable(const struct gpus *g)
{
    size_t n = 0;
    for (size_t i = 0; g && i < g->ndev; i++)
        n += !g->dev[i].lost;
    return n;
}

/* ------------------------------------------------------------------ */
/* Refresh                                                             */

/* Marks device I lost because CALL answered RC. */
static void lose(struct gpus *g, size_t i, const char *call, nvml_return rc)
{
    struct gpu_device *d = &g->dev[i];
    d->lost = true;
    d->free = 0;
    snprintf(d->lost_reason, sizeof d->lost_reason, "%s: %s", call, nvml_error(g, rc));
    log_warn("GPU %u (%s, %s) is lost: %s; not placing anything on it any more",
             d->index, d->name, d->uuid, d->lost_reason);
}

/* Room for N raw process entries. */
static bool raw_reserve(struct gpus *g, size_t n)
{
    if (n <= g->raw_cap)
        return true;
    size_t cap = g->raw_cap ? g->raw_cap : 64;
    while (cap < n)
        cap *= 2;
    unsigned char *r = realloc(g->raw, cap * g->proc_stride);
    if (!r)
        return false;
    g->raw = r;
    g->raw_cap = cap;
    return true;
}

static bool procs_push(struct gpus *g, pid_t pid, unsigned device, uint64_t bytes)
{
    if (g->nprocs == g->procs_cap) {
        size_t cap = g->procs_cap ? g->procs_cap * 2 : 64;
        struct gpu_proc *p = realloc(g->procs, cap * sizeof *p);
        if (!p)
            return false;
        g->procs = p;
        g->procs_cap = cap;
    }
    g->procs[g->nprocs++] = (struct gpu_proc){ .pid = pid, .device = device, .bytes = bytes };
    return true;
}

/* Reads device I's compute processes into g->procs. NVML_SUCCESS, or the
 * error that ended it. The list may grow between asking its size and
 * reading it: then ask again, a few times. */
static nvml_return read_processes(struct gpus *g, size_t i)
{
    unsigned n = 0;
    nvml_return rc = NVML_ERROR_INSUFFICIENT_SIZE;
    for (int tries = 0; tries < 8 && rc == NVML_ERROR_INSUFFICIENT_SIZE; tries++) {
        if (!raw_reserve(g, (size_t)n + 8)) {
            log_warn("GPU %u: out of memory reading its processes", g->dev[i].index);
            return NVML_SUCCESS;     /* no list this time; not the device's fault */
        }
        n = (unsigned)g->raw_cap;
        rc = g->processes(g->handles[i], &n, g->raw);
    }
    if (rc != NVML_SUCCESS)
        return rc;
    for (unsigned k = 0; k < n; k++) {
        const unsigned char *e = g->raw + (size_t)k * g->proc_stride;
        unsigned pid;
        unsigned long long used;
        /* pid and usedGpuMemory sit at the same offsets in v1 and v2. */
        memcpy(&pid, e + offsetof(struct nvml_process_v2, pid), sizeof pid);
        memcpy(&used, e + offsetof(struct nvml_process_v2, usedGpuMemory), sizeof used);
        if (used == NVML_VALUE_NOT_AVAILABLE)
            used = 0;
        if (!procs_push(g, (pid_t)pid, (unsigned)i, used)) {
            log_warn("GPU %u: out of memory reading its processes", g->dev[i].index);
            break;
        }
    }
    return NVML_SUCCESS;
}

static int cmp_proc(const void *a, const void *b)
{
    const struct gpu_proc *x = a, *y = b;
    if (x->pid != y->pid)
        return x->pid < y->pid ? -1 : 1;
    return x->device < y->device ? -1 : x->device > y->device;
}

size_t gpus_refresh(struct gpus *g)
{
    if (!g)
        return 0;
    size_t lost = 0;
    g->nprocs = 0;
    for (size_t i = 0; i < g->ndev; i++) {
        struct gpu_device *d = &g->dev[i];
        if (d->lost)
            continue;
        struct nvml_memory mem;
        nvml_return rc = g->memory(g->handles[i], &mem);
        if (rc != NVML_SUCCESS) {
            lose(g, i, "nvmlDeviceGetMemoryInfo", rc);
            lost++;
            continue;
        }
        d->total = mem.total;
        d->free = mem.free;
        d->used = mem.used;
        if (g->no_proc_list[i])
            continue;
        size_t before = g->nprocs;
        rc = read_processes(g, i);
        if (rc == NVML_ERROR_NOT_SUPPORTED) {
            g->no_proc_list[i] = true;
            g->nprocs = before;
            log_warn("GPU %u (%s): %s: %s; its instances' VRAM cannot be measured, only estimated",
                     d->index, d->name, g->proc_symbol, nvml_error(g, rc));
        } else if (rc != NVML_SUCCESS) {
            g->nprocs = before;
            lose(g, i, g->proc_symbol, rc);
            lost++;
        }
    }
    if (g->nprocs > 1)
        qsort(g->procs, g->nprocs, sizeof *g->procs, cmp_proc);
    return lost;
}

uint64_t gpus_process_memory(const struct gpus *g, pid_t pid, uint64_t *per_device)
{
    if (per_device)
        for (size_t i = 0; g && i < g->ndev; i++)
            per_device[i] = 0;
    if (!g || !g->nprocs)
        return 0;
    /* the first entry of PID */
    size_t lo = 0, hi = g->nprocs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (g->procs[mid].pid < pid)
            lo = mid + 1;
        else
            hi = mid;
    }
    uint64_t sum = 0;
    for (size_t k = lo; k < g->nprocs && g->procs[k].pid == pid; k++) {
        sum += g->procs[k].bytes;
        if (per_device)
            per_device[g->procs[k].device] += g->procs[k].bytes;
    }
    return sum;
}

void gpus_close(struct gpus *g)
{
    if (!g)
        return;
    if (g->lib) {
        if (g->shutdown)
            g->shutdown();
        dlclose(g->lib);
    }
    free(g->dev);
    free(g->handles);
    free(g->no_proc_list);
    free(g->procs);
    free(g->raw);
    free(g);
}
