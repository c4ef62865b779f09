/* port — hands out TCP ports from port_range to children.
 *
 * A port is given only if no instance of ours holds it and a bind() test on
 * 127.0.0.1 succeeds right now. Allocation rotates through the range so a
 * port just released (perhaps still in TIME_WAIT, perhaps still held by a
 * dying child) is the last to be reused. */
#ifndef LLAMA_POOL_PORT_H
#define LLAMA_POOL_PORT_H

#include <stdbool.h>
#include <stdint.h>

typedef bool (*port_probe_fn)(unsigned port, void *arg);

struct port_pool {
    unsigned min, max;
    unsigned next;            /* where the next search begins */
    uint8_t held[65536 / 8];  /* ports our instances hold */
    port_probe_fn probe;      /* default: port_bind_free */
    void *probe_arg;
};

void port_pool_init(struct port_pool *p, unsigned min, unsigned max);
/* Change the range (reload); held ports stay held. */
void port_pool_set_range(struct port_pool *p, unsigned min, unsigned max);
/* Returns a free port, or 0 when every port of the range is held or busy. */
unsigned port_alloc(struct port_pool *p);
void port_release(struct port_pool *p, unsigned port);
/* Mark PORT held: a child adopted at an upgrade runs on it (in the range
 * or not: a reload may have moved the range since). */
void port_hold(struct port_pool *p, unsigned port);
bool port_is_held(const struct port_pool *p, unsigned port);

/* True if 127.0.0.1:PORT can be bound now (SO_REUSEADDR, like llama-server). */
bool port_bind_free(unsigned port, void *arg);

#endif
