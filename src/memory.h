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

/* What one instance of a model is expected to cost. */
struct memory_estimate {
    uint64_t weights;       /* the GGUF's tensor data: mmap'd, shared per file */
    uint64_t kv;            /* f16 KV cache for the child's context */
    uint64_t compute;       /* allowance for compute buffers */
    uint64_t cram;          /* llama-server's host prompt cache (-cram, 8192 MiB default) */
    uint64_t more;          /* kv + compute + cram: what every instance adds */
    uint64_t file_id;       /* device and inode of the file: equal ids share weights */
    uint64_t n_ctx;         /* KV cells the child allocates (memory_kv_cells) */
    bool fixed;             /* memory = SIZE in pool.conf: `more` is that size */
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

/* PSS of PID in bytes from /proc/PID/smaps_rollup; 0 when unreadable. */
uint64_t memory_pss(pid_t pid);

#endif
