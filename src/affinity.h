/* affinity — a request's prompt as a key that tells which instance may
 * already hold it (prefix-affinity routing).
 *
 * llama-server keeps each slot's prompt in its KV cache and reuses the
 * common prefix of the next request. A conversation's next turn begins with
 * the whole of the previous turn's prompt, so the prompt, serialized, is
 * cut into blocks of AFFINITY_BLOCK bytes, and each full block is hashed
 * together with every block before it: block[i] stands for bytes
 * [0, (i + 1) * AFFINITY_BLOCK). Two prompts share their first k hashes
 * exactly when they share their first k blocks (hash collisions aside), and
 * a longer history still matches the blocks of the earlier turn. A partial
 * last block is not hashed: the next turn does not repeat it as it was.
 *
 * Serialized: for a chat, each of `messages` as compact JSON, one after the
 * other, as sent; for a completion, the `prompt` string (compact JSON when
 * it is not a string). Only the first AFFINITY_MAX_BLOCKS blocks count.
 *
 * A client may also name its conversation: the X-Session-Id header, else
 * the body's OpenAI `user` field; `session` is then that name's hash. */
#ifndef LLAMA_POOL_AFFINITY_H
#define LLAMA_POOL_AFFINITY_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#define AFFINITY_BLOCK 256
#define AFFINITY_MAX_BLOCKS 256     /* 64 KiB of prompt; beyond it, no finer match */

struct affinity_key {
    uint64_t session;               /* the client's conversation name, hashed; 0 = none */
    unsigned nblocks;               /* full blocks of the prompt hashed */
    uint64_t block[AFFINITY_MAX_BLOCKS];
};

/* K from BODY, a request's JSON object, and SESSION, the X-Session-Id
 * header's value (NULL when absent). False when there is nothing to key
 * on: no prompt of a full block and no session. */
bool affinity_key_make(const json_t *body, const char *session, struct affinity_key *k);

/* How many leading blocks A and B share. */
unsigned affinity_common(const struct affinity_key *a, const struct affinity_key *b);

#endif
