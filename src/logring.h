/* logring — the last N log lines of a model, in memory.
 *
 * Lines are copied in; the oldest is dropped when full. Each line carries a
 * sequence number so a follower can ask for "everything after #k". */
#ifndef LLAMA_POOL_LOGRING_H
#define LLAMA_POOL_LOGRING_H

#include <stddef.h>
#include <stdint.h>

struct logring {
    char **lines;
    size_t cap;       /* slots */
    size_t n;         /* lines held */
    size_t head;      /* index of the oldest */
    uint64_t seq;     /* sequence number of the next line pushed */
};

int logring_init(struct logring *r, size_t cap);
void logring_free(struct logring *r);
void logring_push(struct logring *r, const char *line, size_t len);
/* The I-th newest line held (0 = newest), or NULL. */
const char *logring_last(const struct logring *r, size_t i);
size_t logring_count(const struct logring *r);

#endif
