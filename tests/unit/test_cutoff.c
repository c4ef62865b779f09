/* request_timeout's pure pieces: events, JSON values as text, the body
 * rewrite, the last chunk at the limit, a plain answer put back. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "cutoff.h"

static void generation_endpoints_are_known_by_path(void **state)
{
    (void)state;
    assert_int_equal(cutoff_api_of("/v1/chat/completions"), CUTOFF_CHAT);
    assert_int_equal(cutoff_api_of("/chat/completions"), CUTOFF_CHAT);
    assert_int_equal(cutoff_api_of("/v1/completions"), CUTOFF_OAI_CMPL);
    assert_int_equal(cutoff_api_of("/completion"), CUTOFF_NATIVE);
    assert_int_equal(cutoff_api_of("/completions"), CUTOFF_NATIVE);
    assert_int_equal(cutoff_api_of("/infill"), CUTOFF_NATIVE);
    assert_int_equal(cutoff_api_of("/v1/embeddings"), CUTOFF_NONE);
    assert_int_equal(cutoff_api_of("/tokenize"), CUTOFF_NONE);
}

static void a_member_is_found_as_written_nested_strings_skipped(void **state)
{
    (void)state;
    const char *o = "{ \"a\" : \"x}\\\"y\", \"b\":{\"c\":[1,{\"d\":2}]}, \"n\":1.50 ,\"s\":null}";
    const char *v;
    size_t vl;
    assert_true(cutoff_json_member(o, strlen(o), "n", &v, &vl));
    assert_int_equal(vl, 4);
    assert_memory_equal(v, "1.50", 4);
    assert_true(cutoff_json_member(o, strlen(o), "b", &v, &vl));
    assert_int_equal(vl, strlen("{\"c\":[1,{\"d\":2}]}"));
    const char *c, *e;
    size_t cl, el;
    assert_true(cutoff_json_member(v, vl, "c", &c, &cl));
    assert_true(cutoff_json_element(c, cl, 1, &e, &el));
    assert_memory_equal(e, "{\"d\":2}", el);
    assert_false(cutoff_json_element(c, cl, 2, &e, &el));
    assert_false(cutoff_json_member(o, strlen(o), "d", &v, &vl));     /* not at the top */
    assert_false(cutoff_json_member("[1]", 3, "a", &v, &vl));
    assert_false(cutoff_json_member("{\"a\":\"unterminated", 18, "a", &v, &vl));
}

static void events_are_taken_whole_and_only_whole(void **state)
{
    (void)state;
    const char *s = "data: {\"a\":1}\n\n:\n\ndata:[DONE]\r\n\r\ndata: {\"b\"";
    size_t n = strlen(s), off = 0, evlen, dlen;
    const char *d;
    assert_true(cutoff_sse_take(s, n, &evlen, &d, &dlen));
    assert_int_equal(evlen, 15);
    assert_memory_equal(d, "{\"a\":1}", dlen);
    off += evlen;
    assert_true(cutoff_sse_take(s + off, n - off, &evlen, &d, &dlen));   /* a ping */
    assert_null(d);
    off += evlen;
    assert_true(cutoff_sse_take(s + off, n - off, &evlen, &d, &dlen));
    assert_memory_equal(d, "[DONE]", dlen);
    off += evlen;
    assert_false(cutoff_sse_take(s + off, n - off, &evlen, &d, &dlen));  /* the start of one */
}

static void the_body_gets_members_at_its_end_where_they_win(void **state)
{
    (void)state;
    char *out;
    size_t len;
    const char *b = "{\"stream\":false,\"max_tokens\":9}  \n";
    assert_true(cutoff_body_rewrite(b, strlen(b), CUTOFF_CHAT, 1500, true, &out, &len));
    assert_string_equal(out, "{\"stream\":false,\"max_tokens\":9,\"t_max_predict_ms\":1500,"
                             "\"stream\":true,\"timings_per_token\":true,"
                             "\"stream_options\":{\"include_usage\":true}}  \n");
    assert_int_equal(len, strlen(out));
    free(out);
    assert_true(cutoff_body_rewrite("{ }", 3, CUTOFF_NATIVE, 20, false, &out, &len));
    assert_string_equal(out, "{ \"t_max_predict_ms\":20}");
    free(out);
    assert_false(cutoff_body_rewrite("[1]", 3, CUTOFF_NATIVE, 20, false, &out, &len));
}

static void what_a_request_asks_is_read(void **state)
{
    (void)state;
    struct cutoff_request r;
    const char *plain = "{\"messages\":[],\"t_max_predict_ms\":5}";
    cutoff_request_read(plain, strlen(plain), &r);
    assert_true(r.object && r.has_tmax && r.gatherable && !r.stream);
    const char *probs = "{\"prompt\":\"x\",\"n_probs\":3}";
    cutoff_request_read(probs, strlen(probs), &r);
    assert_true(r.object && !r.gatherable);
    const char *stream = "{\"prompt\":\"x\",\"stream\":true}";
    cutoff_request_read(stream, strlen(stream), &r);
    assert_true(r.stream && !r.gatherable);
    cutoff_request_read("nope", 4, &r);
    assert_false(r.object);
}

static void the_last_chat_chunk_copies_the_stream_s_id(void **state)
{
    (void)state;
    struct cutoff_seen seen = { 0 };
    const char *ev = "{\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"hi\"}}],"
                     "\"created\":17,\"id\":\"chatcmpl-X\",\"model\":\"m\",\"system_fingerprint\":\"b1\","
                     "\"object\":\"chat.completion.chunk\"}";
    assert_true(cutoff_seen_note(&seen, ev, strlen(ev)));
    struct buf out = { 0 };
    assert_true(cutoff_final_events(&out, CUTOFF_CHAT, &seen, "other", 99));
    assert_string_equal(out.data,
        "data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],\"created\":17,"
        "\"id\":\"chatcmpl-X\",\"model\":\"m\",\"system_fingerprint\":\"b1\","
        "\"object\":\"chat.completion.chunk\"}\n\ndata: [DONE]\n\n");
    buf_free(&out);
    cutoff_seen_free(&seen);

    /* nothing seen: made up, still valid JSON, and a native one has no [DONE] */
    struct cutoff_seen none = { 0 };
    assert_true(cutoff_final_events(&out, CUTOFF_NATIVE, &none, "tiny", 5));
    assert_null(strstr(out.data, "[DONE]"));
    json_t *j = json_loads(out.data + 6, 0, NULL);
    assert_non_null(j);
    assert_true(json_is_true(json_object_get(j, "stop")));
    assert_string_equal(json_string_value(json_object_get(j, "stop_type")), "limit");
    assert_string_equal(json_string_value(json_object_get(j, "model")), "tiny");
    json_decref(j);
    buf_free(&out);
}

static void feed_all(struct cutoff_plain *pl, const char *const *evs)
{
    for (size_t i = 0; evs[i]; i++)
        assert_true(cutoff_plain_feed(pl, evs[i], strlen(evs[i])));
}

/* A chat stream as llama-server b9749 sends it with include_usage. */
static const char *const chat_stream[] = {
    "{\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],"
    "\"created\":7,\"id\":\"chatcmpl-A\",\"model\":\"m\",\"system_fingerprint\":\"b1\",\"object\":\"chat.completion.chunk\"}",
    "{\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"a\\n\\\"b\"}}],"
    "\"created\":7,\"id\":\"chatcmpl-A\",\"model\":\"m\",\"system_fingerprint\":\"b1\",\"object\":\"chat.completion.chunk\","
    "\"timings\":{\"cache_n\":2,\"prompt_n\":3,\"predicted_n\":1}}",
    "{\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\" é\"}}],"
    "\"created\":7,\"id\":\"chatcmpl-A\",\"model\":\"m\",\"system_fingerprint\":\"b1\",\"object\":\"chat.completion.chunk\","
    "\"timings\":{\"cache_n\":2,\"prompt_n\":3,\"predicted_n\":2}}",
    NULL,
};

static const char *const chat_end[] = {
    "{\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}],"
    "\"created\":7,\"id\":\"chatcmpl-A\",\"model\":\"m\",\"system_fingerprint\":\"b1\",\"object\":\"chat.completion.chunk\"}",
    "{\"choices\":[],\"created\":7,\"id\":\"chatcmpl-A\",\"model\":\"m\",\"system_fingerprint\":\"b1\","
    "\"object\":\"chat.completion.chunk\",\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":5,\"total_tokens\":7,"
    "\"prompt_tokens_details\":{\"cached_tokens\":2}},\"timings\":{\"cache_n\":2,\"prompt_n\":3,\"predicted_n\":2,\"predicted_ms\":1.50}}",
    "[DONE]",
    NULL,
};

/* The plain answer put back from the events of A, then B (NULL: none):
 * its text (malloc'd) and *STATUS. */
static char *gathered(enum cutoff_api api, const char *const *a, const char *const *b, bool cut,
                      const char *model, long long now, int *status)
{
    struct cutoff_plain pl;
    struct buf out = { 0 };
    cutoff_plain_init(&pl, api);
    feed_all(&pl, a);
    if (b)
        feed_all(&pl, b);
    assert_true(cutoff_plain_answer(&pl, cut, model, now, &out, status));
    cutoff_plain_free(&pl);
    return out.data;
}

static void a_chat_stream_becomes_the_plain_answer_llama_server_writes(void **state)
{
    (void)state;
    int status;
    char *text = gathered(CUTOFF_CHAT, chat_stream, chat_end, false, "x", 0, &status);
    assert_int_equal(status, 200);
    assert_string_equal(text,
        "{\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"message\":{\"role\":\"assistant\","
        "\"content\":\"a\\n\\\"b é\"}}],\"created\":7,\"model\":\"m\",\"system_fingerprint\":\"b1\","
        "\"object\":\"chat.completion\",\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":5,"
        "\"total_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":2}},\"id\":\"chatcmpl-A\","
        "\"timings\":{\"cache_n\":2,\"prompt_n\":3,\"predicted_n\":2,\"predicted_ms\":1.50}}");
    free(text);
}

static void a_chat_stream_cut_gives_the_text_so_far_and_length(void **state)
{
    (void)state;
    int status;
    char *text = gathered(CUTOFF_CHAT, chat_stream, NULL, true, "x", 0, &status);
    json_t *j = json_loads(text, 0, NULL);
    assert_non_null(j);
    json_t *c = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(c, "finish_reason")), "length");
    assert_string_equal(json_string_value(json_object_get(json_object_get(c, "message"), "content")),
                        "a\n\"b é");
    json_t *u = json_object_get(j, "usage");   /* from the last timings */
    assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")), 2);
    assert_int_equal(json_integer_value(json_object_get(u, "prompt_tokens")), 5);
    assert_string_equal(json_string_value(json_object_get(j, "id")), "chatcmpl-A");
    json_decref(j);
    free(text);
}

static void tool_call_deltas_are_merged(void **state)
{
    (void)state;
    static const char *const evs[] = {
        "{\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,"
        "\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\"}}]}}]}",
        "{\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,"
        "\"function\":{\"arguments\":\"\\\":1}\"}}]}}]}",
        "{\"choices\":[{\"finish_reason\":\"tool_calls\",\"index\":0,\"delta\":{}}]}",
        NULL,
    };
    int status;
    char *text = gathered(CUTOFF_CHAT, evs, NULL, false, "m", 1, &status);
    json_t *j = json_loads(text, 0, NULL);
    assert_non_null(j);
    json_t *c = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(c, "finish_reason")), "tool_calls");
    json_t *tc = json_array_get(json_object_get(json_object_get(c, "message"), "tool_calls"), 0);
    assert_string_equal(json_string_value(json_object_get(tc, "id")), "c1");
    json_t *fn = json_object_get(tc, "function");
    assert_string_equal(json_string_value(json_object_get(fn, "name")), "f");
    assert_string_equal(json_string_value(json_object_get(fn, "arguments")), "{\"a\":1}");
    json_decref(j);
    free(text);
}

static void a_native_stream_s_last_object_gets_the_text_and_stream_false(void **state)
{
    (void)state;
    static const char *const evs[] = {
        "{\"index\":0,\"content\":\" x\",\"tokens\":[],\"stop\":false,\"id_slot\":-1,\"tokens_predicted\":1,\"tokens_evaluated\":2}",
        "{\"index\":0,\"content\":\"\",\"tokens\":[],\"id_slot\":0,\"stop\":true,\"model\":\"m\",\"tokens_predicted\":1,"
        "\"generation_settings\":{\"n_predict\":1,\"stream\":true},\"prompt\":\"p\",\"stop_type\":\"limit\"}",
        NULL,
    };
    int status;
    char *text = gathered(CUTOFF_NATIVE, evs, NULL, false, "m", 1, &status);
    assert_string_equal(text,
        "{\"index\":0,\"content\":\" x\",\"tokens\":[],\"id_slot\":0,\"stop\":true,\"model\":\"m\",\"tokens_predicted\":1,"
        "\"generation_settings\":{\"n_predict\":1,\"stream\":false},\"prompt\":\"p\",\"stop_type\":\"limit\"}");
    free(text);
}

static void an_error_event_is_the_answer_with_its_code(void **state)
{
    (void)state;
    static const char *const evs[] = {
        "{\"index\":0,\"content\":\" x\",\"stop\":false}",
        "{\"error\":{\"code\":400,\"message\":\"no\",\"type\":\"invalid_request_error\"}}",
        NULL,
    };
    int status;
    char *text = gathered(CUTOFF_NATIVE, evs, NULL, true, "m", 1, &status);
    assert_int_equal(status, 400);
    assert_string_equal(text, "{\"error\":{\"code\":400,\"message\":\"no\",\"type\":\"invalid_request_error\"}}");
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(generation_endpoints_are_known_by_path),
        cmocka_unit_test(a_member_is_found_as_written_nested_strings_skipped),
        cmocka_unit_test(events_are_taken_whole_and_only_whole),
        cmocka_unit_test(the_body_gets_members_at_its_end_where_they_win),
        cmocka_unit_test(what_a_request_asks_is_read),
        cmocka_unit_test(the_last_chat_chunk_copies_the_stream_s_id),
        cmocka_unit_test(a_chat_stream_becomes_the_plain_answer_llama_server_writes),
        cmocka_unit_test(a_chat_stream_cut_gives_the_text_so_far_and_length),
        cmocka_unit_test(tool_call_deltas_are_merged),
        cmocka_unit_test(a_native_stream_s_last_object_gets_the_text_and_stream_false),
        cmocka_unit_test(an_error_event_is_the_answer_with_its_code),
    };
    return cmocka_run_group_tests_name("cutoff", tests, NULL, NULL);
}
