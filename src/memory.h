/* memory — what the machine has and what a child uses.
 *
 * The budget: memory_budget = auto is the smaller of MemTotal and the
 * cgroup's limit (v2 memory.max, v1 memory.limit_in_bytes) minus
 * memory_reserve; N% takes that share of the same total; a size is taken as
 * is. A child's use is its PSS from /proc/PID/smaps_rollup: mmap'd model
 * weights shared between instances of one file are split between them, not
 * counted twice as RSS would. */
#ifndef LLAMA_POOL_MEMORY_H
#define LLAMA_POOL_MEMORY_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

struct config;
struct config_model;

struct memory_info {
    uint64_t mem_total;       /* /proc/meminfo MemTotal */
    uint64_t mem_available;   /* /proc/meminfo MemAvailable */
    uint64_t cgroup_limit;    /* 0 when unlimited or unknown */
};

/* Read /proc/meminfo and our cgroup's limit. ROOT is "" normally; tests pass
 * a directory holding fake proc/ and sys/ trees. Returns 0 or -1. */
int memory_read_info(const char *root, struct memory_info *out);

/* The budget in bytes for CFG on a machine described by INFO. */
uint64_t memory_budget(const struct config *cfg, const struct memory_info *info);

#define MEMORY_MAX_DEVICES 16

/* What one instance of a model is expected to cost. With devices (see
 * memory_estimate_devices), the host fields hold what stays on the CPU and
 * vram[] what each device holds; without, vram[] is all 0. */
struct memory_estimate {
    uint64_t weights;       /* the GGUF's tensor data: mmap'd, shared per file */
    uint64_t kv;            /* f16 KV cache for the child's context */
    uint64_t compute;       /* allowance for compute buffers */
    uint64_t cram;          /* llama-server's host prompt cache (-cram, 8192 MiB default) */
    uint64_t more;          /* kv + compute + cram: what every instance adds */
    uint64_t file_id;       /* device and inode of the file: equal ids share weights */
    uint64_t n_ctx;         /* KV cells the child allocates (memory_kv_cells) */
    bool fixed;             /* memory = SIZE in pool.conf: `more` is that size */

    /* On GPU devices (memory_estimate_devices with n_devices > 0). VRAM is
     * per instance: instances of one file do not share it. */
    uint32_t n_gpu_layers;  /* blocks offloaded, 0..n_layer */
    bool output_on_gpu;     /* the output layer too (-ngl > n_layer) */
    unsigned ndev;          /* vram[] slots in use: the highest device used + 1 */
    uint64_t vram[MEMORY_MAX_DEVICES];  /* bytes per device slot */
    uint64_t vram_total;    /* sum of vram[] */
    uint64_t vram_weights, vram_kv, vram_compute, vram_fixed;  /* vram_total by term */
};

/* How the child's args place a model on devices, as llama.cpp does
 * (memory_gpu_placement). */
enum memory_split { MEMORY_SPLIT_LAYER, MEMORY_SPLIT_ROW, MEMORY_SPLIT_NONE };

struct memory_placement {
    uint64_t ngl;           /* -ngl as asked: auto, all and negative values give UINT64_MAX */
    unsigned n_dev;         /* devices the child uses, in its --device order; 0: none */
    unsigned dev[MEMORY_MAX_DEVICES];     /* their slots (CUDA1 is slot 1) */
    float split[MEMORY_MAX_DEVICES];      /* cumulative -ts shares, the last 1 */
    enum memory_split mode; /* -sm layer (default), row (also "tensor"), none */
    unsigned main;          /* -mg: the position in dev[] of the main device */
    bool kv_offload;        /* KV with its layer (default), or all on the host (-nkvo) */
};

/* KV cells llama.cpp allocates for context N_CTX and N_PARALLEL slots
 * (<= 0: auto, 4 slots in a unified cache) with UNIFIED 1 (-kvu), 0
 * (-no-kvu) or -1 (not given): the context rounded up to 256; without a
 * unified cache each slot's share is rounded up to 256 too, so -c 256
 * -np 2 allocates 512. */
uint64_t memory_kv_cells(uint64_t n_ctx, long n_parallel, int unified);

/* Estimate an instance of M from its GGUF header and its argv (-c, -np,
 * -cram, as the child would get them). memory = SIZE overrides. 0, or -1
 * with ERR filled (unreadable or malformed file). */
int memory_estimate_model(const struct config *cfg, const struct config_model *m,
                          struct memory_estimate *out, char *err, size_t errlen);

/* Read the child's -ngl (--gpu-layers, --n-gpu-layers), --device, -ts,
 * -sm, -mg and -nkvo for a machine with N_DEVICES devices (1..16): no
 * --device means all of them; no -ts (or all zero) means equal shares (real
 * llama-server shares by free memory: placement passes --device). 0, or -1
 * with ERR filled (a device llama-server would refuse, a bad -ts or -mg). */
int memory_gpu_placement(const struct config *cfg, const struct config_model *m,
                         unsigned n_devices, struct memory_placement *out,
                         char *err, size_t errlen);

/* memory_estimate_model on a machine with N_DEVICES GPU devices (at most
 * MEMORY_MAX_DEVICES); 0 devices is memory_estimate_model itself, host only.
 * With -ngl 0 or --device none nothing is offloaded and the estimate is the
 * host-only one. Otherwise, on each device d the child uses:
 *
 *   vram[d] = weights of the blocks placed on d (+ the output layer on the
 *             device of layer n_layer when -ngl > n_layer; a tied output is
 *             token_embd loaded again)
 *           + KV of those blocks: cells × (K elems × ctk bytes + V elems × ctv bytes)
 *           + compute: ubatch × 4 × (n_vocab + 8 n_embd + 2 n_head × cells per
 *             stream), the last term only without -fa on, on d if it holds a layer
 *           + MEMORY_GPU_FIXED per device for the CUDA context and cuBLAS.
 *
 * and on the host: weights = the file less what went to the devices
 * (token_embd always stays), KV of the CPU blocks (all with -nkvo), the
 * compute allowance (16 MiB when every layer and the output are offloaded), cram, and
 * MEMORY_GPU_HOST for the CUDA runtime in the process. memory = SIZE keeps
 * the host estimate fixed; the VRAM part is still read from the header. */
int memory_estimate_devices(const struct config *cfg, const struct config_model *m,
                            unsigned n_devices, struct memory_estimate *out,
                            char *err, size_t errlen);

#define MEMORY_GPU_FIXED (UINT64_C(640) << 20)  /* per device: a 37 MiB model took 714 MiB */
#define MEMORY_GPU_HOST  (UINT64_C(424) << 20)  /* host side of a CUDA process: 443 MiB PSS for 37 MiB */

/* PSS of PID in bytes from /proc/PID/smaps_rollup; 0 when unreadable. */
uint64_t memory_pss(pid_t pid);

#endif
