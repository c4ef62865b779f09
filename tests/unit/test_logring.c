#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "logring.h"

static void keeps_the_newest_lines(void **state)
{
    (void)state;
    struct logring r;
    assert_int_equal(logring_init(&r, 3), 0);
    char buf[16];
    for (int i = 0; i < 5; i++) {
        int n = snprintf(buf, sizeof buf, "line %d", i);
        logring_push(&r, buf, (size_t)n);
    }
    assert_int_equal(logring_count(&r), 3);
    assert_string_equal(logring_last(&r, 0), "line 4");
    assert_string_equal(logring_last(&r, 2), "line 2");
    assert_null(logring_last(&r, 3));
    assert_int_equal(r.seq, 5);
    logring_free(&r);
}

static void copies_exactly_len_bytes(void **state)
{
    (void)state;
    struct logring r;
    assert_int_equal(logring_init(&r, 2), 0);
    logring_push(&r, "abcdef", 3);
    assert_string_equal(logring_last(&r, 0), "abc");
    logring_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(keeps_the_newest_lines),
        cmocka_unit_test(copies_exactly_len_bytes),
    };
    return cmocka_run_group_tests_name("logring", tests, NULL, NULL);
}
