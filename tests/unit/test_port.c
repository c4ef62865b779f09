/* Port allocation: within the range, skipping held and busy ports,
 * rotating so a released port is reused last. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "port.h"

static bool busy[65536];

static bool fake_probe(unsigned port, void *arg)
{
    (void)arg;
    return !busy[port];
}

static void setup_pool(struct port_pool *p, unsigned min, unsigned max)
{
    memset(busy, 0, sizeof busy);
    port_pool_init(p, min, max);
    p->probe = fake_probe;
}

static void allocates_in_order_within_range(void **state)
{
    (void)state;
    struct port_pool p;
    setup_pool(&p, 8100, 8102);
    assert_int_equal(port_alloc(&p), 8100);
    assert_int_equal(port_alloc(&p), 8101);
    assert_int_equal(port_alloc(&p), 8102);
    assert_int_equal(port_alloc(&p), 0);          /* all held */
}

static void skips_ports_busy_elsewhere(void **state)
{
    (void)state;
    struct port_pool p;
    setup_pool(&p, 8100, 8103);
    busy[8100] = busy[8101] = true;
    assert_int_equal(port_alloc(&p), 8102);
    busy[8103] = true;
    assert_int_equal(port_alloc(&p), 0);
}

static void released_port_is_reused_last(void **state)
{
    (void)state;
    struct port_pool p;
    setup_pool(&p, 8100, 8102);
    unsigned a = port_alloc(&p);
    port_release(&p, a);
    assert_false(port_is_held(&p, a));
    assert_int_equal(port_alloc(&p), 8101);
    assert_int_equal(port_alloc(&p), 8102);
    assert_int_equal(port_alloc(&p), 8100);       /* wrapped round to it */
}

static void range_change_keeps_held_ports(void **state)
{
    (void)state;
    struct port_pool p;
    setup_pool(&p, 8100, 8101);
    assert_int_equal(port_alloc(&p), 8100);
    port_pool_set_range(&p, 9000, 9001);
    assert_true(port_is_held(&p, 8100));
    assert_int_equal(port_alloc(&p), 9000);
}

static void bind_probe_sees_a_listening_socket(void **state)
{
    (void)state;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = { .sin_family = AF_INET };
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(fd, 1), 0);
    socklen_t len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &len);
    unsigned port = ntohs(sa.sin_port);
    assert_false(port_bind_free(port, NULL));

    struct port_pool p;
    port_pool_init(&p, port, port);
    assert_int_equal(port_alloc(&p), 0);
    close(fd);
    assert_true(port_bind_free(port, NULL));
    assert_int_equal(port_alloc(&p), port);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(allocates_in_order_within_range),
        cmocka_unit_test(skips_ports_busy_elsewhere),
        cmocka_unit_test(released_port_is_reused_last),
        cmocka_unit_test(range_change_keeps_held_ports),
        cmocka_unit_test(bind_probe_sees_a_listening_socket),
    };
    return cmocka_run_group_tests_name("port", tests, NULL, NULL);
}
