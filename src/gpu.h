/* gpu — the machine's GPUs: what each has, and what our children use on it.
 *
 * NVIDIA devices are read through NVML, loaded with dlopen at run time, so
 * llama-pool neither builds nor packages against it: without the library
 * (or without a device) gpus_open says why, and the daemon runs on host
 * memory alone. Only these NVML symbols are used, so that the stand-in in
 * tests/nvml-standin.c can serve the tests: nvmlInit_v2, nvmlShutdown,
 * nvmlErrorString, nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex_v2,
 * nvmlDeviceGetName, nvmlDeviceGetUUID, nvmlDeviceGetMemoryInfo, and
 * nvmlDeviceGetComputeRunningProcesses_v3 (else _v2, else the first one).
 *
 * gpus_refresh reads every device's memory and its list of compute
 * processes once; gpus_process_memory then answers for any pid from that
 * snapshot without calling NVML, so a pool of thousands of instances costs
 * one NVML pass per refresh, not one per instance.
 *
 * A device whose NVML calls start failing (fallen off the bus, reset) is
 * marked lost with the reason, logged once; it stays lost until the next
 * gpus_open, reports no free memory, and the other devices keep working.
 *
 * The arithmetic (gpu_budget, gpu_room) is pure: no NVML, no state. */
#ifndef LLAMA_POOL_GPU_H
#define LLAMA_POOL_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct config;

/* One device, as of the last gpus_refresh (or gpus_open). */
struct gpu_device {
    unsigned index;           /* NVML's index: CUDA's too under the default
                               * CUDA_DEVICE_ORDER=PCI_BUS_ID ordering */
    char name[96];            /* "NVIDIA H200" */
    char uuid[96];            /* "GPU-…" */
    uint64_t total;           /* bytes */
    uint64_t free;            /* bytes; 0 once lost */
    uint64_t used;            /* bytes, every process's, ours or not */
    bool lost;                /* NVML failed on it: see lost_reason */
    char lost_reason[160];    /* "nvmlDeviceGetMemoryInfo: GPU is lost" */
};

struct gpus;

/* Loads LIBRARY (NULL: CONFIG_DEFAULT_NVML_LIBRARY) with dlopen, initialises NVML
 * and reads every device once. NULL with ERR filled ("cannot load
 * libnvidia-ml.so.1: …", "nvmlInit_v2 failed: …", "NVML sees no device")
 * when there is nothing to use: the caller then runs on host memory and
 * says so once. */
struct gpus *gpus_open(const char *library, char *err, size_t errlen);

/* Devices found at open, lost ones included (their index stays theirs). */
size_t gpus_count(const struct gpus *g);

/* Device I (0 <= I < gpus_count). */
const struct gpu_device *gpus_device(const struct gpus *g, size_t i);

/* Devices not lost. */
size_t gpus_usable(const struct gpus *g);

/* Reads every usable device's memory and compute processes again. A device
 * that fails is marked lost (logged with the reason). Returns how many
 * devices were lost by this call. */
size_t gpus_refresh(struct gpus *g);

/* PID's memory as of the last refresh: fills PER_DEVICE (gpus_count
 * entries; may be NULL) and returns the sum over devices. 0 for a pid NVML
 * did not list (not on a GPU, or NVML cannot see per-process use: under
 * WDDM or in another PID namespace). */
uint64_t gpus_process_memory(const struct gpus *g, pid_t pid, uint64_t *per_device);

/* Shuts NVML down and unloads the library. NULL is fine. */
void gpus_close(struct gpus *g);

/* ---- pure arithmetic ---- */

/* A device's budget for our children, from its TOTAL bytes and [pool]
 * gpu_budget: auto = TOTAL - gpu_reserve (0 when the reserve is larger),
 * N% = that share of TOTAL, SIZE = min(SIZE, TOTAL). */
uint64_t gpu_budget(const struct config *cfg, uint64_t total);

/* What a new instance may take on a device: what is left of BUDGET after
 * CHARGED (what our instances there are charged), but never more than the
 * device's FREE memory now (other programs use GPUs too, and our own
 * children may not have allocated yet: the smaller answer wins). */
uint64_t gpu_room(uint64_t budget, uint64_t charged, uint64_t free);

#endif
