#include "port.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

void port_pool_init(struct port_pool *p, unsigned min, unsigned max)
{
    memset(p, 0, sizeof *p);
    p->probe = port_bind_free;
    port_pool_set_range(p, min, max);
}

void port_pool_set_range(struct port_pool *p, unsigned min, unsigned max)
{
    p->min = min;
    p->max = max;
    if (p->next < min || p->next > max)
        p->next = min;
}

bool port_is_held(const struct port_pool *p, unsigned port)
{
    return port < 65536 && (p->held[port / 8] >> (port % 8)) & 1;
}

static void port_set_held(struct port_pool *p, unsigned port, bool on)
{
    if (port >= 65536)
        return;
    if (on)
        p->held[port / 8] |= (uint8_t)(1u << (port % 8));
    else
        p->held[port / 8] &= (uint8_t)~(1u << (port % 8));
}

unsigned port_alloc(struct port_pool *p)
{
    unsigned span = p->max - p->min + 1;
    for (unsigned i = 0; i < span; i++) {
        unsigned port = p->next;
        p->next = port == p->max ? p->min : port + 1;
        if (port_is_held(p, port))
            continue;
        if (!p->probe(port, p->probe_arg))
            continue;
        port_set_held(p, port, true);
        return port;
    }
    return 0;
}

void port_hold(struct port_pool *p, unsigned port)
{
    port_set_held(p, port, true);
}

void port_release(struct port_pool *p, unsigned port)
{
    port_set_held(p, port, false);
}

bool port_bind_free(unsigned port, void *arg)
{
    (void)arg;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    int one = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool ok = bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(fd);
    return ok;
}
