/* affinity — prompt keys for prefix-affinity routing (see affinity.h). */
#include "affinity.h"

#include <string.h>
#include <xxhash.h>

/* The prompt's bytes as they come, gathered into blocks. */
struct blocks {
    struct affinity_key *k;
    char block[AFFINITY_BLOCK];
    size_t fill;
};

/* Bytes of the serialized prompt; -1 (which stops jansson's dump) once
 * every block the key holds is hashed. */
static int blocks_add(const char *data, size_t n, void *arg)
{
    struct blocks *b = arg;
    struct affinity_key *k = b->k;
    while (n && k->nblocks < AFFINITY_MAX_BLOCKS) {
        size_t take = AFFINITY_BLOCK - b->fill;
        if (take > n)
            take = n;
        memcpy(b->block + b->fill, data, take);
        b->fill += take;
        data += take;
        n -= take;
        if (b->fill == AFFINITY_BLOCK) {
            uint64_t prev = k->nblocks ? k->block[k->nblocks - 1] : 0;
            k->block[k->nblocks++] = XXH3_64bits_withSeed(b->block, AFFINITY_BLOCK, prev);
            b->fill = 0;
        }
    }
    return k->nblocks < AFFINITY_MAX_BLOCKS ? 0 : -1;
}

static uint64_t name_hash(const char *s, size_t n)
{
    uint64_t h = XXH3_64bits(s, n);
    return h ? h : 1;           /* 0 means none */
}

bool affinity_key_make(const json_t *body, const char *session, struct affinity_key *k)
{
    k->session = 0;
    k->nblocks = 0;
    struct blocks b = { .k = k };
    const json_t *messages = json_object_get(body, "messages");
    const json_t *prompt = json_object_get(body, "prompt");
    if (json_is_array(messages)) {
        size_t i;
        const json_t *m;
        json_array_foreach(messages, i, m) {
            if (json_dump_callback(m, blocks_add, &b, JSON_COMPACT | JSON_ENCODE_ANY) < 0)
                break;          /* every block is hashed */
        }
    } else if (json_is_string(prompt)) {
        blocks_add(json_string_value(prompt), json_string_length(prompt), &b);
    } else if (prompt) {
        json_dump_callback(prompt, blocks_add, &b, JSON_COMPACT | JSON_ENCODE_ANY);
    }
    const json_t *user = json_object_get(body, "user");
    if (session && *session)
        k->session = name_hash(session, strlen(session));
    else if (json_is_string(user) && json_string_length(user))
        k->session = name_hash(json_string_value(user), json_string_length(user));
    return k->nblocks > 0 || k->session != 0;
}

unsigned affinity_common(const struct affinity_key *a, const struct affinity_key *b)
{
    unsigned n = a->nblocks < b->nblocks ? a->nblocks : b->nblocks;
    unsigned i = 0;
    while (i < n && a->block[i] == b->block[i])
        i++;
    return i;
}
