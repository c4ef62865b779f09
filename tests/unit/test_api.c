/* What GET /pool/status asks for: summary=, offset= and limit= read from
 * the query, and the values and combinations refused with a 400. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "api.h"

static char err[256];

/* Q from the three values (NULL: absent) and whether model= was given. */
static int parse(const char *summary, const char *offset, const char *limit, bool model,
                 struct api_status_query *q)
{
    err[0] = '\0';
    return api_status_query(summary, offset, limit, model, q, err, sizeof err);
}

static void no_parameters_ask_for_every_model(void **state)
{
    (void)state;
    struct api_status_query q;
    assert_int_equal(parse(NULL, NULL, NULL, false, &q), 0);
    assert_false(q.summary);
    assert_false(q.paged);
    assert_int_equal(q.offset, 0);
    assert_int_equal(q.limit, API_STATUS_MAX_LIMIT);
    assert_int_equal(parse(NULL, NULL, NULL, true, &q), 0);     /* model=NAME alone */
}

static void summary_is_a_switch_like_wait_and_follow(void **state)
{
    (void)state;
    struct api_status_query q;
    const char *on[] = { "1", "true", "yes", "" };
    for (size_t i = 0; i < sizeof on / sizeof on[0]; i++) {
        assert_int_equal(parse(on[i], NULL, NULL, false, &q), 0);
        assert_true(q.summary);
        assert_false(q.paged);
    }
    assert_int_equal(parse("0", NULL, NULL, false, &q), 0);
    assert_false(q.summary);
    assert_int_equal(parse("no", "5", NULL, false, &q), 0);     /* summary=0 pages fine */
    assert_true(q.paged);
    assert_int_equal(parse("maybe", NULL, NULL, false, &q), -1);
    assert_non_null(strstr(err, "summary must be 1 or 0"));
}

static void offset_and_limit_give_a_page_either_alone(void **state)
{
    (void)state;
    struct api_status_query q;
    assert_int_equal(parse(NULL, "200", "100", false, &q), 0);
    assert_true(q.paged);
    assert_int_equal(q.offset, 200);
    assert_int_equal(q.limit, 100);
    assert_int_equal(parse(NULL, "7", NULL, false, &q), 0);     /* limit defaults to the most */
    assert_true(q.paged);
    assert_int_equal(q.offset, 7);
    assert_int_equal(q.limit, API_STATUS_MAX_LIMIT);
    assert_int_equal(parse(NULL, NULL, "1", false, &q), 0);     /* offset defaults to 0 */
    assert_true(q.paged);
    assert_int_equal(q.offset, 0);
    assert_int_equal(q.limit, 1);
    /* Past the last model is a page too (empty, with the total). */
    assert_int_equal(parse(NULL, "18446744073709551615", "1000", false, &q), 0);
    assert_true(q.offset == SIZE_MAX);
}

static void bad_numbers_are_refused_with_what_was_sent(void **state)
{
    (void)state;
    struct api_status_query q;
    const char *bad_offsets[] = { "", "-1", "+1", " 1", "1 ", "1x", "0x10", "1.5", "abc",
                                  "18446744073709551616" /* SIZE_MAX + 1 */ };
    for (size_t i = 0; i < sizeof bad_offsets / sizeof bad_offsets[0]; i++) {
        assert_int_equal(parse(NULL, bad_offsets[i], NULL, false, &q), -1);
        assert_non_null(strstr(err, "offset must be a whole number"));
    }
    const char *bad_limits[] = { "0", "1001", "-5", "", "ten", "99999999999999999999999" };
    for (size_t i = 0; i < sizeof bad_limits / sizeof bad_limits[0]; i++) {
        assert_int_equal(parse(NULL, NULL, bad_limits[i], false, &q), -1);
        assert_non_null(strstr(err, "limit must be a whole number from 1 to 1000"));
    }
    assert_int_equal(parse(NULL, "abc", NULL, false, &q), -1);
    assert_non_null(strstr(err, "\"abc\""));
}

static void a_summary_or_one_model_is_not_paged(void **state)
{
    (void)state;
    struct api_status_query q;
    assert_int_equal(parse("1", "0", NULL, false, &q), -1);
    assert_non_null(strstr(err, "takes no offset or limit"));
    assert_int_equal(parse("1", NULL, "10", false, &q), -1);
    assert_int_equal(parse(NULL, "0", "10", true, &q), -1);
    assert_non_null(strstr(err, "model= names one model"));
    assert_int_equal(parse("1", NULL, NULL, true, &q), -1);
    assert_non_null(strstr(err, "model= names one model"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(no_parameters_ask_for_every_model),
        cmocka_unit_test(summary_is_a_switch_like_wait_and_follow),
        cmocka_unit_test(offset_and_limit_give_a_page_either_alone),
        cmocka_unit_test(bad_numbers_are_refused_with_what_was_sent),
        cmocka_unit_test(a_summary_or_one_model_is_not_paged),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
