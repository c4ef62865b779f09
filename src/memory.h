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

#include <stdint.h>
#include <sys/types.h>

struct config;

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

/* PSS of PID in bytes from /proc/PID/smaps_rollup; 0 when unreadable. */
uint64_t memory_pss(pid_t pid);

/* "1.2 GiB", "640 MiB", … into BUF. */
const char *memory_format(uint64_t bytes, char *buf, unsigned len);

#endif
