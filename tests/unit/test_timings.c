/* Reading timings.cache_n and prompt_n from answers as they pass. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "timings.h"

/* A streamed answer's last events, as llama-server b9749 sends them. */
static const char stream[] =
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\" \\\"cache_n\\\":7\"}}],"
    "\"object\":\"chat.completion.chunk\"}\n\n"
    "data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],\"object\":\"chat.completion.chunk\","
    "\"usage\":{\"completion_tokens\":4,\"prompt_tokens\":1530,\"total_tokens\":1534},"
    "\"timings\":{\"cache_n\":1498,\"prompt_n\":32,\"prompt_ms\":61.2,\"prompt_per_token_ms\":1.9,"
    "\"prompt_per_second\":522.8,\"predicted_n\":4,\"predicted_ms\":40.1}}\n\n"
    "data: [DONE]\n\n";

static void feed_in_pieces(struct timings_scan *t, const char *s, size_t n, size_t piece)
{
    for (size_t i = 0; i < n; i += piece)
        timings_scan_feed(t, s + i, n - i < piece ? n - i : piece);
}

static void the_final_timings_are_read_however_the_answer_is_cut(void **state)
{
    (void)state;
    size_t n = strlen(stream);
    for (size_t piece = 1; piece <= n; piece++) {
        struct timings_scan t;
        timings_scan_init(&t);
        feed_in_pieces(&t, stream, n, piece);
        if (t.cache_n != 1498 || t.prompt_n != 32 || t.predicted_n != 4 || t.prompt_ms != 61.2 ||
            t.predicted_ms != 40.1)
            fail_msg("pieces of %zu: cache_n %ld, prompt_n %ld, predicted_n %ld, prompt_ms %g, predicted_ms %g",
                     piece, t.cache_n, t.prompt_n, t.predicted_n, t.prompt_ms, t.predicted_ms);
    }
    /* Cut in two at every place. */
    for (size_t cut = 0; cut <= n; cut++) {
        struct timings_scan t;
        timings_scan_init(&t);
        timings_scan_feed(&t, stream, cut);
        timings_scan_feed(&t, stream + cut, n - cut);
        if (t.cache_n != 1498 || t.prompt_n != 32 || t.predicted_n != 4 || t.predicted_ms != 40.1)
            fail_msg("cut at %zu: cache_n %ld, prompt_n %ld, predicted_n %ld, predicted_ms %g",
                     cut, t.cache_n, t.prompt_n, t.predicted_n, t.predicted_ms);
    }
}

static void spaces_and_a_whole_answer_and_the_last_value_wins(void **state)
{
    (void)state;
    struct timings_scan t;
    timings_scan_init(&t);
    const char *a = "{\"timings\": {\"cache_n\" :  12, \"prompt_n\":\n3}}";
    timings_scan_feed(&t, a, strlen(a));
    assert_int_equal(t.cache_n, 12);
    assert_int_equal(t.prompt_n, 3);
    const char *b = "{\"timings\":{\"cache_n\":0,\"prompt_n\":40}}";
    timings_scan_feed(&t, b, strlen(b));
    assert_int_equal(t.cache_n, 0);
    assert_int_equal(t.prompt_n, 40);
}

static void text_that_only_looks_like_it_is_not_read(void **state)
{
    (void)state;
    static const char *const none[] = {
        "{\"timings\":{\"content\":\"\\\"cache_n\\\":5\"}}",       /* inside a string */
        "{\"timings\":{\"cache_n_total\":5,\"xprompt_n\":6}}",   /* other keys */
        "{\"timings\":{\"cache_n\":\"5\",\"prompt_n\":null}}",   /* not numbers */
        "{\"timings\":{\"cache_n\":12345678901234567890123456789012}}",   /* not a count */
        "{\"timings\":{\"cache_n\":-5,\"prompt_ms\":1.2.3}}",      /* not what llama-server sends */
        "{\"timings\":{\"cache_n\":12",                         /* cut: maybe more digits */
        "{\"cache_n\":5,\"prompt_n\":3}",                       /* not in timings */
        "{\"content\":\"\\\"timings\\\":{\\\"cache_n\\\":5\"}",   /* timings in a string */
        "",
    };
    for (size_t i = 0; i < sizeof none / sizeof *none; i++) {
        struct timings_scan t;
        timings_scan_init(&t);
        timings_scan_feed(&t, none[i], strlen(none[i]));
        if (t.cache_n != -1 || t.prompt_n != -1 || t.prompt_ms != -1)
            fail_msg("%s: cache_n %ld, prompt_n %ld", none[i], t.cache_n, t.prompt_n);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(the_final_timings_are_read_however_the_answer_is_cut),
        cmocka_unit_test(spaces_and_a_whole_answer_and_the_last_value_wins),
        cmocka_unit_test(text_that_only_looks_like_it_is_not_read),
    };
    return cmocka_run_group_tests_name("timings", tests, NULL, NULL);
}
