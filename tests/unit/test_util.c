/* Unit tests for util: UTF-8 checks, lossy copies, JSON escaping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#define FFFD "\xEF\xBF\xBD"

/* ------------------------------------------------------------------ */
/* Decoding and checking                                               */

static void test_decode_gives_length_and_code_point(void **state)
{
    (void)state;
    static const struct { const char *s; size_t len; uint32_t cp; } good[] = {
        { "A", 1, 0x41 }, { "\x7F", 1, 0x7F },
        { "\xC2\x80", 2, 0x80 }, { "\xDF\xBF", 2, 0x7FF },
        { "\xE0\xA0\x80", 3, 0x800 }, { "\xED\x9F\xBF", 3, 0xD7FF },
        { "\xEE\x80\x80", 3, 0xE000 }, { "\xEF\xBF\xBD", 3, 0xFFFD },
        { "\xF0\x90\x80\x80", 4, 0x10000 }, { "\xF4\x8F\xBF\xBF", 4, 0x10FFFF },
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        uint32_t cp = 0;
        assert_int_equal(util_utf8_decode(good[i].s, strlen(good[i].s), &cp), good[i].len);
        assert_int_equal(cp, good[i].cp);
    }
    static const char *const bad[] = {
        "\x80",                 /* stray continuation byte */
        "\xC0\xAF",             /* overlong '/' */
        "\xC1\xBF",             /* overlong */
        "\xE0\x80\xAF",         /* overlong */
        "\xED\xA0\x80",         /* surrogate D800 */
        "\xF0\x80\x80\xAF",     /* overlong */
        "\xF4\x90\x80\x80",     /* past U+10FFFF */
        "\xF5\x80\x80\x80", "\xFE", "\xFF",
        "\xC3", "\xE2\x82",     /* cut short */
        "\xC3\x28",             /* continuation missing */
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(util_utf8_decode(bad[i], strlen(bad[i]), NULL), 0);
    /* LEN bounds the sequence even when more bytes follow */
    assert_int_equal(util_utf8_decode("\xE2\x82\xAC", 2, NULL), 0);
    assert_int_equal(util_utf8_decode("", 0, NULL), 0);
}

static void test_check_finds_the_first_bad_byte(void **state)
{
    (void)state;
    assert_int_equal(util_utf8_check("", 0), 0);
    assert_int_equal(util_utf8_check("plain ascii", 11), 11);
    assert_int_equal(util_utf8_check("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\xA6\x99", 14), 14);
    assert_int_equal(util_utf8_check("abc\xFF" "def", 7), 3);
    assert_int_equal(util_utf8_check("ok\xC3", 3), 2);            /* cut at the end */
    assert_int_equal(util_utf8_check("\xED\xBF\xBF", 3), 0);      /* surrogate DFFF */
    /* an embedded NUL is a character like any other: LEN counts */
    assert_int_equal(util_utf8_check("a\0b", 3), 3);

    assert_true(util_utf8_valid(""));
    assert_true(util_utf8_valid("\xD0\xBC\xD0\xBE\xD0\xB4\xD0\xB5\xD0\xBB\xD1\x8C"));   /* модель */
    assert_false(util_utf8_valid("\xFF"));
    assert_false(util_utf8_valid("model-\xC0\xAF"));
    assert_false(util_utf8_valid(NULL));
}

/* ------------------------------------------------------------------ */
/* Lossy copies                                                        */

static void expect_lossy(const char *in, size_t len, const char *want)
{
    size_t out_len = 12345;
    char *out = util_utf8_lossy(in, len, &out_len);
    assert_non_null(out);
    assert_string_equal(out, want);
    assert_int_equal(out_len, strlen(want));
    assert_true(util_utf8_valid(out));
    free(out);
}

static void test_lossy_replaces_each_maximal_bad_subpart_once(void **state)
{
    (void)state;
    expect_lossy("", 0, "");
    expect_lossy("fine \xE2\x82\xAC", 8, "fine \xE2\x82\xAC");
    expect_lossy("\xFF", 1, FFFD);
    expect_lossy("a\xFF\xFE" "b", 4, "a" FFFD FFFD "b");
    /* a cut sequence is one subpart; the byte that cut it starts anew */
    expect_lossy("\xE2\x82" "x", 3, FFFD "x");
    expect_lossy("\xF0\x9F\xA6", 3, FFFD);
    expect_lossy("\xE2\x82\xE2\x82\xAC", 5, FFFD "\xE2\x82\xAC");
    /* overlongs and surrogates: every byte on its own (as Python and WHATWG do) */
    expect_lossy("\xC0\xAF", 2, FFFD FFFD);
    expect_lossy("\xED\xA0\x80", 3, FFFD FFFD FFFD);
    expect_lossy("\xF4\x90\x80\x80", 4, FFFD FFFD FFFD FFFD);
    /* LEN, not the NUL, ends the input */
    expect_lossy("ab\xFF" "cd", 3, "ab" FFFD);
}

/* ------------------------------------------------------------------ */
/* JSON                                                                */

/* Escape S into a buffer of the needed size; check it against WANT and
 * that jansson reads "S" back as valid JSON. */
static void expect_escape(const char *s, const char *want)
{
    size_t need = util_json_escape(NULL, 0, s);
    assert_int_equal(need, strlen(want));
    char *buf = malloc(need + 1);
    assert_non_null(buf);
    assert_int_equal(util_json_escape(buf, need + 1, s), need);
    assert_string_equal(buf, want);

    char *doc = malloc(need + 3);
    assert_non_null(doc);
    doc[0] = '"';
    memcpy(doc + 1, buf, need);
    doc[need + 1] = '"';
    doc[need + 2] = '\0';
    json_error_t err;
    json_t *j = json_loads(doc, JSON_DECODE_ANY, &err);
    if (!j)
        print_message("jansson refused %s: %s\n", doc, err.text);
    assert_non_null(j);
    assert_true(json_is_string(j));
    json_decref(j);
    free(doc);
    free(buf);
}

static void test_json_escape_makes_valid_json(void **state)
{
    (void)state;
    expect_escape("", "");
    expect_escape("model \"x\" not found", "model \\\"x\\\" not found");
    expect_escape("C:\\path", "C:\\\\path");
    expect_escape("line one\nline two\r\n", "line one\\nline two\\r\\n");
    expect_escape("\t\b\f", "\\t\\b\\f");
    expect_escape("\x01\x1f\x7f", "\\u0001\\u001f\\u007f");
    expect_escape("/pool/status", "/pool/status");         /* '/' needs no escape */
    expect_escape("caf\xC3\xA9", "caf\xC3\xA9");             /* UTF-8 passes as is */
    expect_escape("model \"\xFF\" not found", "model \\\"" FFFD "\\\" not found");
    expect_escape("\xE2\x82", FFFD);
    expect_escape(NULL, "");
}

static void test_json_escape_cuts_only_between_characters(void **state)
{
    (void)state;
    char buf[8];
    /* "a\"" needs 3 bytes; with room for 2 the escape is left out whole */
    memset(buf, 'X', sizeof buf);
    assert_int_equal(util_json_escape(buf, 3, "a\"b"), 4);
    assert_string_equal(buf, "a");
    /* a 3-byte character does not fit in 2 bytes of room */
    assert_int_equal(util_json_escape(buf, 3, "\xE2\x82\xAC"), 3);
    assert_string_equal(buf, "");
    /* \u0001 needs 6 bytes */
    assert_int_equal(util_json_escape(buf, 6, "\x01"), 6);
    assert_string_equal(buf, "");
    assert_int_equal(util_json_escape(buf, 7, "\x01"), 6);
    assert_string_equal(buf, "\\u0001");
    /* nothing after the first character that did not fit */
    assert_int_equal(util_json_escape(buf, 4, "ab\"c"), 5);
    assert_string_equal(buf, "ab");
    /* CAP 0 writes nothing at all */
    buf[0] = 'X';
    assert_int_equal(util_json_escape(buf, 0, "abc"), 3);
    assert_int_equal(buf[0], 'X');
}

static void test_json_string_keeps_what_json_string_drops(void **state)
{
    (void)state;
    /* the bug: jansson refuses invalid UTF-8, and the field vanishes */
    assert_null(json_string("\xFF"));

    json_t *j = util_json_string("\xFF" "x");
    assert_non_null(j);
    assert_string_equal(json_string_value(j), FFFD "x");
    json_decref(j);

    j = util_json_string("tiny\xC3\xA9");
    assert_string_equal(json_string_value(j), "tiny\xC3\xA9");
    json_decref(j);

    j = util_json_string(NULL);
    assert_true(json_is_null(j));
    json_decref(j);

    /* what it builds always dumps as valid JSON */
    json_t *o = json_object();
    json_object_set_new(o, "message", util_json_string("model \"\xFF\xFE\" not found\n"));
    char *s = json_dumps(o, JSON_COMPACT);
    assert_non_null(s);
    assert_string_equal(s, "{\"message\":\"model \\\"" FFFD FFFD "\\\" not found\\n\"}");
    assert_true(util_utf8_valid(s));
    free(s);
    json_decref(o);
}

/* ------------------------------------------------------------------ */
/* Prometheus                                                          */

static void expect_label(const char *in, const char *want)
{
    char *out = util_prom_label_escape(in);
    assert_non_null(out);
    assert_string_equal(out, want);
    free(out);
}

static void test_prom_label_escape(void **state)
{
    (void)state;
    expect_label("tiny", "tiny");
    expect_label("tiny#1", "tiny#1");
    expect_label("a\"b", "a\\\"b");
    expect_label("c:\\m", "c:\\\\m");
    expect_label("two\nlines", "two\\nlines");
    expect_label("caf\xC3\xA9", "caf\xC3\xA9");
    expect_label("bad\xFF", "bad" FFFD);
    expect_label("", "");
}

static void test_buf_grows_and_stays_a_c_string(void **state)
{
    (void)state;
    struct buf b = { 0 };
    assert_true(buf_puts(&b, "abc"));
    assert_int_equal(b.len, 3);
    assert_string_equal(b.data, "abc");
    assert_true(b.cap >= 256);                  /* the first allocation */
    char big[1000];
    memset(big, 'x', sizeof big);
    assert_true(buf_append(&b, big, sizeof big));
    assert_int_equal(b.len, 1003);
    assert_true(b.cap > b.len);                 /* room for the NUL */
    assert_int_equal(b.data[b.len], '\0');
    /* printf that does not fit where it is formatted first. */
    size_t before = b.cap - b.len;
    assert_true(buf_printf(&b, "%0*d", (int)before + 10, 7));
    assert_int_equal(b.len, 1003 + before + 10);
    assert_int_equal(b.data[b.len - 1], '7');
    buf_consume(&b, 1003);
    assert_int_equal(b.len, before + 10);
    assert_int_equal(b.data[0], '0');
    char *t = buf_take(&b);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    free(t);
    assert_true(buf_reserve_min(&b, 1, 4096));
    assert_int_equal(b.cap, 4096);
    buf_free(&b);
    assert_null(b.data);
}

static void test_grow_doubles_and_keeps_the_elements(void **state)
{
    (void)state;
    int *v = NULL;
    size_t cap = 0;
    assert_true(util_grow(&v, &cap, 1, sizeof *v));
    assert_int_equal(cap, 16);
    for (int i = 0; i < 16; i++)
        v[i] = i;
    assert_true(util_grow(&v, &cap, 17, sizeof *v));
    assert_int_equal(cap, 32);
    assert_int_equal(v[15], 15);
    assert_true(util_grow(&v, &cap, 5, sizeof *v));   /* enough already */
    assert_int_equal(cap, 32);
    assert_false(util_grow(&v, &cap, SIZE_MAX / 2, sizeof *v));  /* too large: kept */
    assert_int_equal(cap, 32);
    assert_int_equal(v[15], 15);
    free(v);
}

static void test_format_bytes_is_the_one_for_people(void **state)
{
    (void)state;
    char b[32];
    assert_string_equal(util_format_bytes(0, b, sizeof b), "0 B");
    assert_string_equal(util_format_bytes(1023, b, sizeof b), "1023 B");
    assert_string_equal(util_format_bytes(1536, b, sizeof b), "1.5 KiB");
    assert_string_equal(util_format_bytes(12ull << 30, b, sizeof b), "12 GiB");
    assert_string_equal(util_format_bytes((12ull << 30) / 10, b, sizeof b), "1.2 GiB");
    assert_string_equal(util_format_bytes(3ull << 50, b, sizeof b), "3.0 PiB");
}

static void test_strv_free_takes_null_and_vectors(void **state)
{
    (void)state;
    util_strv_free(NULL);
    char **v = calloc(3, sizeof *v);
    assert_non_null(v);
    v[0] = strdup("a");
    v[1] = strdup("b");
    util_strv_free(v);                          /* ASan: nothing leaks */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_gives_length_and_code_point),
        cmocka_unit_test(test_check_finds_the_first_bad_byte),
        cmocka_unit_test(test_lossy_replaces_each_maximal_bad_subpart_once),
        cmocka_unit_test(test_json_escape_makes_valid_json),
        cmocka_unit_test(test_json_escape_cuts_only_between_characters),
        cmocka_unit_test(test_json_string_keeps_what_json_string_drops),
        cmocka_unit_test(test_prom_label_escape),
        cmocka_unit_test(test_buf_grows_and_stays_a_c_string),
        cmocka_unit_test(test_grow_doubles_and_keeps_the_elements),
        cmocka_unit_test(test_format_bytes_is_the_one_for_people),
        cmocka_unit_test(test_strv_free_takes_null_and_vectors),
    };
    return cmocka_run_group_tests_name("util", tests, NULL, NULL);
}
