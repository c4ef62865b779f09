/* Restart policy: delays double from 1 s to 60 s, a healthy minute forgives,
 * more than max_restarts crashes in the window fails the model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "backoff.h"

static void delays_double_from_one_second_to_sixty(void **state)
{
    (void)state;
    struct backoff b = { 0 };
    const double want[] = { 1, 2, 4, 8, 16, 32, 60, 60, 60 };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        assert_true(backoff_on_crash(&b, 0) == want[i]);
}

static void a_healthy_minute_resets_the_delay(void **state)
{
    (void)state;
    struct backoff b = { 0 };
    backoff_on_crash(&b, 0);
    backoff_on_crash(&b, 5);
    assert_true(backoff_on_crash(&b, 59.9) == 4);
    assert_true(backoff_on_crash(&b, 60) == 1);   /* up a whole minute: forgiven */
    assert_true(backoff_on_crash(&b, 0) == 2);
}

static void operator_start_resets_the_delay(void **state)
{
    (void)state;
    struct backoff b = { 0 };
    backoff_on_crash(&b, 0);
    backoff_on_crash(&b, 0);
    backoff_reset(&b);
    assert_true(backoff_on_crash(&b, 0) == 1);
}

static void more_than_max_crashes_in_window_fails(void **state)
{
    (void)state;
    struct crash_log c = { 0 };
    /* max_restarts = 3 within 300 s: the 4th crash fails the model. */
    assert_false(crash_log_add(&c, 0, 300, 3));
    assert_false(crash_log_add(&c, 10, 300, 3));
    assert_false(crash_log_add(&c, 20, 300, 3));
    assert_true(crash_log_add(&c, 30, 300, 3));
    assert_int_equal(crash_log_count(&c, 30, 300), 4);
}

static void old_crashes_leave_the_window(void **state)
{
    (void)state;
    struct crash_log c = { 0 };
    assert_false(crash_log_add(&c, 0, 300, 2));
    assert_false(crash_log_add(&c, 100, 300, 2));
    /* The crash at t=0 is more than 300 s old at t=301. */
    assert_false(crash_log_add(&c, 301, 300, 2));
    assert_int_equal(crash_log_count(&c, 301, 300), 2);
    assert_true(crash_log_add(&c, 302, 300, 2));
}

static void crash_log_is_bounded(void **state)
{
    (void)state;
    struct crash_log c = { 0 };
    for (int i = 0; i < 1000; i++)
        crash_log_add(&c, i, 1e9, 1000000);
    assert_int_equal(c.n, CRASH_LOG_MAX);
    assert_true(c.t[CRASH_LOG_MAX - 1] == 999);
    crash_log_clear(&c);
    assert_int_equal(crash_log_count(&c, 1000, 1e9), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(delays_double_from_one_second_to_sixty),
        cmocka_unit_test(a_healthy_minute_resets_the_delay),
        cmocka_unit_test(operator_start_resets_the_delay),
        cmocka_unit_test(more_than_max_crashes_in_window_fails),
        cmocka_unit_test(old_crashes_leave_the_window),
        cmocka_unit_test(crash_log_is_bounded),
    };
    return cmocka_run_group_tests_name("backoff", tests, NULL, NULL);
}
