/* Prompt keys for prefix-affinity routing: what two requests share. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "affinity.h"

static json_t *parse(const char *text)
{
    json_error_t err;
    json_t *j = json_loads(text, 0, &err);
    if (!j)
        fail_msg("bad test JSON: %s", err.text);
    return j;
}

static struct affinity_key *key_of(json_t *body, const char *session)
{
    struct affinity_key *k = malloc(sizeof *k);
    assert_non_null(k);
    affinity_key_make(body, session, k);
    return k;
}

/* A chat whose system prompt is SYSTEM_LEN bytes of FILL, then TURNS
 * exchanges (user, assistant), then one more user message. */
static json_t *chat_of(char fill, size_t system_len, int turns)
{
    char *system = malloc(system_len + 1);
    assert_non_null(system);
    memset(system, fill, system_len);
    system[system_len] = '\0';
    json_t *msgs = json_array();
    json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "system", "content", system));
    for (int t = 0; t < turns; t++) {
        char q[64], a[64];
        snprintf(q, sizeof q, "question %d", t);
        snprintf(a, sizeof a, "answer %d, at some length", t);
        json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content", q));
        json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "assistant", "content", a));
    }
    json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content", "and now?"));
    free(system);
    return json_pack("{s:s,s:o}", "model", "m", "messages", msgs);
}

static json_t *chat(size_t system_len, int turns)
{
    return chat_of('x', system_len, turns);
}

static void the_next_turn_shares_every_full_block_of_the_last(void **state)
{
    (void)state;
    json_t *t1 = chat(1500, 0), *t2 = chat(1500, 1), *t3 = chat(1500, 2);
    struct affinity_key *a = key_of(t1, NULL), *b = key_of(t2, NULL), *c = key_of(t3, NULL);
    /* Turn 1's serialized messages: its full blocks, all of them shared. */
    char *s1 = json_dumps(json_object_get(t1, "messages"), JSON_COMPACT);
    size_t len1 = strlen(s1) - 2;       /* less the array's brackets ... */
    len1 -= json_array_size(json_object_get(t1, "messages")) - 1;   /* ... and commas */
    free(s1);
    assert_int_equal(a->nblocks, len1 / AFFINITY_BLOCK);
    assert_true(a->nblocks >= 5);
    assert_int_equal(affinity_common(a, b), a->nblocks);
    assert_int_equal(affinity_common(b, c), b->nblocks);
    assert_true(c->nblocks >= b->nblocks && b->nblocks >= a->nblocks);
    assert_int_equal(a->session, 0);
    free(a);
    free(b);
    free(c);
    json_decref(t1);
    json_decref(t2);
    json_decref(t3);
}

static void different_system_prompts_share_nothing(void **state)
{
    (void)state;
    json_t *x = chat(1500, 1);
    json_t *y = chat_of('y', 1500, 1);  /* another system prompt, as long */
    json_t *z = chat(1501, 1);          /* one byte longer: its first 5 blocks alike */
    struct affinity_key *a = key_of(x, NULL), *b = key_of(y, NULL), *d = key_of(z, NULL);
    assert_true(a->nblocks > 0);
    assert_int_equal(affinity_common(a, b), 0);
    assert_int_equal(affinity_common(a, d), (28 + 1500) / AFFINITY_BLOCK);   /* {"role":"system","content":" is 28 */
    free(d);
    json_decref(z);
    /* The same body twice: the same key. */
    struct affinity_key *c = key_of(x, NULL);
    assert_int_equal(affinity_common(a, c), a->nblocks);
    assert_memory_equal(a->block, c->block, a->nblocks * sizeof a->block[0]);
    free(a);
    free(b);
    free(c);
    json_decref(x);
    json_decref(y);
}

static void a_completion_prompt_is_keyed_by_its_text(void **state)
{
    (void)state;
    char text[1200];
    memset(text, 'p', sizeof text - 1);
    text[sizeof text - 1] = '\0';
    json_t *p1 = json_pack("{s:s}", "prompt", text);
    text[700] = 'q';                    /* differs in the third block */
    json_t *p2 = json_pack("{s:s}", "prompt", text);
    struct affinity_key *a = key_of(p1, NULL), *b = key_of(p2, NULL);
    assert_int_equal(a->nblocks, 1199 / AFFINITY_BLOCK);
    assert_int_equal(affinity_common(a, b), 700 / AFFINITY_BLOCK);
    /* A prompt of token ids is keyed by its JSON. */
    json_t *ids = parse("{\"prompt\":[1,2,3]}");
    struct affinity_key *c = key_of(ids, NULL);
    assert_int_equal(c->nblocks, 0);    /* shorter than a block */
    free(a);
    free(b);
    free(c);
    json_decref(p1);
    json_decref(p2);
    json_decref(ids);
}

static void a_long_prompt_is_keyed_by_its_first_blocks(void **state)
{
    (void)state;
    size_t n = (size_t)AFFINITY_BLOCK * (AFFINITY_MAX_BLOCKS + 10);
    char *text = malloc(n + 1);
    assert_non_null(text);
    memset(text, 'z', n);
    text[n] = '\0';
    json_t *p = json_pack("{s:s}", "prompt", text);
    struct affinity_key *a = key_of(p, NULL);
    assert_int_equal(a->nblocks, AFFINITY_MAX_BLOCKS);
    json_decref(p);
    /* Messages too: the dump stops once every block is hashed. */
    json_t *c = chat(n, 3);
    struct affinity_key *b = key_of(c, NULL);
    assert_int_equal(b->nblocks, AFFINITY_MAX_BLOCKS);
    free(a);
    free(b);
    free(text);
    json_decref(c);
}

static void a_session_comes_from_the_header_else_the_user_field(void **state)
{
    (void)state;
    json_t *body = parse("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"user\":\"alice\"}");
    struct affinity_key k, other;
    assert_true(affinity_key_make(body, NULL, &k));     /* no full block, but a session */
    assert_int_equal(k.nblocks, 0);
    assert_int_not_equal(k.session, 0);
    assert_true(affinity_key_make(body, "conversation-7", &other));
    assert_int_not_equal(other.session, 0);
    assert_int_not_equal(other.session, k.session);   /* the header wins */
    struct affinity_key again;
    assert_true(affinity_key_make(body, "conversation-7", &again));
    assert_int_equal(again.session, other.session);
    json_decref(body);

    /* Nothing to key on: no prompt of a block, no session. */
    json_t *bare = parse("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"user\":\"\"}");
    assert_false(affinity_key_make(bare, NULL, &k));
    assert_false(affinity_key_make(bare, "", &k));
    json_decref(bare);
    json_t *none = parse("{\"model\":\"m\"}");
    assert_false(affinity_key_make(none, NULL, &k));
    json_decref(none);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(the_next_turn_shares_every_full_block_of_the_last),
        cmocka_unit_test(different_system_prompts_share_nothing),
        cmocka_unit_test(a_completion_prompt_is_keyed_by_its_text),
        cmocka_unit_test(a_long_prompt_is_keyed_by_its_first_blocks),
        cmocka_unit_test(a_session_comes_from_the_header_else_the_user_field),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
