/* nvml-standin — a stand-in for NVIDIA's libnvidia-ml.so.1, for tests on
 * machines without a GPU. It exports exactly the symbols src/gpu.c uses,
 * with NVML's signatures and return codes, and makes its devices up from
 * the environment (read again at each nvmlInit_v2):
 *
 *   NVML_STANDIN_DEVICES  "NAME:MIB;NAME:MIB": one device per item, its name
 *                         and total memory in MiB ("NVIDIA H200:143771").
 *                         Unset or empty: no device (nvmlDeviceGetCount_v2
 *                         answers 0).
 *   NVML_STANDIN_BASE_MB  "MIB;MIB": memory used on each device by programs
 *                         that are not ours (default 0).
 *   NVML_STANDIN_FAIL     "init": nvmlInit_v2 answers NVML_ERROR_DRIVER_NOT_LOADED.
 *                         "processes": the process lists answer
 *                         NVML_ERROR_NOT_SUPPORTED (as in some containers).
 *   NVML_STANDIN_LOST     a file holding device indexes (any separators);
 *                         read at every call: a device listed there answers
 *                         NVML_ERROR_GPU_IS_LOST from then on, so a test can
 *                         make a device fall off the bus while it runs.
 *   NVML_STANDIN_DIR      a directory of per-process use: a file named PID
 *                         holding "DEVICE_INDEX BYTES" lines, written by the
 *                         fake llama-server (tests/fake-llama-server.md).
 *                         A file whose pid is gone (or a zombie) is skipped,
 *                         as NVML forgets a process at its exit. Read at
 *                         every call: no caching, so a test sees changes at
 *                         once.
 *
 * A device's used memory is its base plus its processes' bytes, and free is
 * total minus used (0 when that is negative). Libc only; no state but what
 * nvmlInit_v2 parsed. */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

/* The layouts gpu.c's top comment describes. */
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_v2_t;

#define MAX_DEVICES 64
#define MAX_PROCS 4096

struct standin_device {
    char name[96];
    unsigned long long total, base;
};
typedef struct standin_device *nvmlDevice_t;

static struct standin_device devices[MAX_DEVICES];
static unsigned ndevices;
static int inits;               /* nvmlInit_v2 minus nvmlShutdown */
static int fail_processes;

/* ------------------------------------------------------------------ */

static unsigned long long mib_list_item(const char *list, unsigned k)
{
    for (unsigned i = 0; list && *list; i++) {
        if (i == k)
            return strtoull(list, NULL, 10) << 20;
        const char *semi = strchr(list, ';');
        if (!semi)
            break;
        list = semi + 1;
    }
    return 0;
}

static void parse_devices(void)
{
    ndevices = 0;
    const char *s = getenv("NVML_STANDIN_DEVICES");
    const char *base = getenv("NVML_STANDIN_BASE_MB");
    while (s && *s && ndevices < MAX_DEVICES) {
        const char *end = strchr(s, ';');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        const char *colon = memrchr(s, ':', len);
        if (colon) {
            struct standin_device *d = &devices[ndevices];
            size_t nl = (size_t)(colon - s);
            if (nl >= sizeof d->name)
                nl = sizeof d->name - 1;
            memcpy(d->name, s, nl);
            d->name[nl] = '\0';
            d->total = strtoull(colon + 1, NULL, 10) << 20;
            d->base = mib_list_item(base, ndevices);
            ndevices++;
        }
        s = end ? end + 1 : s + len;
    }
}

/* Whether device K is listed in the NVML_STANDIN_LOST file. */
static int is_lost(unsigned k)
{
    const char *path = getenv("NVML_STANDIN_LOST");
    FILE *f = path && *path ? fopen(path, "re") : NULL;
    if (!f)
        return 0;
    int lost = 0;
    char word[32];
    int c, n = 0;
    do {
        c = fgetc(f);
        if (c != EOF && isdigit(c) && n < (int)sizeof word - 1) {
            word[n++] = (char)c;
        } else if (n) {
            word[n] = '\0';
            if (strtoul(word, NULL, 10) == k)
                lost = 1;
            n = 0;
        }
    } while (c != EOF);
    fclose(f);
    return lost;
}

/* Whether PID runs (a zombie does not: its memory is gone). */
static int pid_alive(pid_t pid)
{
    if (pid <= 0 || (kill(pid, 0) < 0 && errno != EPERM))
        return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *paren = strrchr(buf, ')');
    return !(paren && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X'));
}

struct proc_use {
    unsigned pid;
    unsigned long long bytes;
};

/* The processes on device K from NVML_STANDIN_DIR, at most MAX; returns how
 * many (more than MAX when some did not fit). */
static unsigned read_processes(unsigned k, struct proc_use *out, unsigned max)
{
    const char *dir = getenv("NVML_STANDIN_DIR");
    DIR *d = dir && *dir ? opendir(dir) : NULL;
    if (!d)
        return 0;
    unsigned n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        unsigned long pid = strtoul(e->d_name, &end, 10);
        if (!isdigit((unsigned char)e->d_name[0]) || *end || !pid_alive((pid_t)pid))
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "re");
        if (!f)
            continue;
        unsigned long long bytes = 0, b;
        unsigned dev;
        int found = 0;
        while (fscanf(f, "%u %llu", &dev, &b) == 2)
            if (dev == k) {
                bytes += b;
                found = 1;
            }
        fclose(f);
        if (!found)
            continue;
        if (n < max)
            out[n] = (struct proc_use){ (unsigned)pid, bytes };
        n++;
    }
    closedir(d);
    return n;
}

/* Checks handle H (NVML up, a device of ours, not lost); its index in *K. */
static nvmlReturn_t check(nvmlDevice_t h, unsigned *k)
{
    if (!inits)
        return NVML_ERROR_UNINITIALIZED;
    if (!h || h < devices || h >= devices + ndevices)
        return NVML_ERROR_INVALID_ARGUMENT;
    *k = (unsigned)(h - devices);
    return is_lost(*k) ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS;
}

/* ------------------------------------------------------------------ */
/* The exported NVML functions                                         */

EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    const char *fail = getenv("NVML_STANDIN_FAIL");
    if (fail && !strcmp(fail, "init"))
        return NVML_ERROR_DRIVER_NOT_LOADED;
    fail_processes = fail && !strcmp(fail, "processes");
    if (!inits++)
        parse_devices();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    if (!inits)
        return NVML_ERROR_UNINITIALIZED;
    inits--;
    return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t rc)
{
    switch (rc) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    if (!inits)
        return NVML_ERROR_UNINITIALIZED;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = ndevices;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    if (!inits)
        return NVML_ERROR_UNINITIALIZED;
    if (index >= ndevices || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (is_lost(index))
        return NVML_ERROR_GPU_IS_LOST;
    *device = &devices[index];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_text(const char *s, char *out, unsigned length)
{
    if (!out)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, s, strlen(s) + 1);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    unsigned k;
    nvmlReturn_t rc = check(device, &k);
    return rc ? rc : copy_text(devices[k].name, name, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    unsigned k;
    nvmlReturn_t rc = check(device, &k);
    if (rc)
        return rc;
    char text[64];
    snprintf(text, sizeof text, "GPU-5a4d0000-0000-4000-8000-%012u", k);
    return copy_text(text, uuid, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    unsigned k;
    nvmlReturn_t rc = check(device, &k);
    if (rc)
        return rc;
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    static struct proc_use procs[MAX_PROCS];
    unsigned n = read_processes(k, procs, MAX_PROCS);
    unsigned long long used = devices[k].base;
    for (unsigned i = 0; i < n && i < MAX_PROCS; i++)
        used += procs[i].bytes;
    memory->total = devices[k].total;
    memory->used = used;
    memory->free = used < devices[k].total ? devices[k].total - used : 0;
    return NVML_SUCCESS;
}

/* The three process calls: entries of SIZE bytes, pid and usedGpuMemory at
 * the same offsets in each layout. NVML's rule: when *COUNT is too small,
 * set it to what is needed and answer INSUFFICIENT_SIZE. */
static nvmlReturn_t processes(nvmlDevice_t device, unsigned *count, void *infos, size_t size)
{
    unsigned k;
    nvmlReturn_t rc = check(device, &k);
    if (rc)
        return rc;
    if (fail_processes)
        return NVML_ERROR_NOT_SUPPORTED;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    static struct proc_use procs[MAX_PROCS];
    unsigned n = read_processes(k, procs, MAX_PROCS);
    if (n > MAX_PROCS)
        return NVML_ERROR_UNKNOWN;
    if (*count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n && !infos)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned i = 0; i < n; i++) {
        nvmlProcessInfo_v2_t e = {
            .pid = procs[i].pid,
            .usedGpuMemory = procs[i].bytes,
            .gpuInstanceId = 0xFFFFFFFFu,
            .computeInstanceId = 0xFFFFFFFFu,
        };
        memcpy((char *)infos + i * size, &e, size);
    }
    *count = n;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                            nvmlProcessInfo_v2_t *infos)
{
    return processes(device, count, infos, sizeof *infos);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                                            nvmlProcessInfo_v2_t *infos)
{
    return processes(device, count, infos, sizeof *infos);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *count,
                                                         nvmlProcessInfo_v1_t *infos)
{
    return processes(device, count, infos, sizeof *infos);
}
