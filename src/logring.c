#include "logring.h"

#include <stdlib.h>
#include <string.h>

int logring_init(struct logring *r, size_t cap)
{
    memset(r, 0, sizeof *r);
    r->lines = calloc(cap ? cap : 1, sizeof *r->lines);
    if (!r->lines)
        return -1;
    r->cap = cap ? cap : 1;
    return 0;
}

void logring_free(struct logring *r)
{
    if (!r->lines)
        return;
    for (size_t i = 0; i < r->cap; i++)
        free(r->lines[i]);
    free(r->lines);
    memset(r, 0, sizeof *r);
}

void logring_push(struct logring *r, const char *line, size_t len)
{
    char *copy = malloc(len + 1);
    if (!copy)
        return;                       /* a lost log line, not a lost daemon */
    memcpy(copy, line, len);
    copy[len] = '\0';
    size_t slot;
    if (r->n < r->cap) {
        slot = (r->head + r->n) % r->cap;
        r->n++;
    } else {
        slot = r->head;
        free(r->lines[slot]);
        r->head = (r->head + 1) % r->cap;
    }
    r->lines[slot] = copy;
    r->seq++;
}

const char *logring_last(const struct logring *r, size_t i)
{
    if (i >= r->n)
        return NULL;
    return r->lines[(r->head + r->n - 1 - i) % r->cap];
}

size_t logring_count(const struct logring *r)
{
    return r->n;
}
