/* timings — what a llama-server answer says of its work, read as the
 * answer passes through the proxy: from its "timings" object, cache_n
 * (prompt tokens it took from its KV cache), prompt_n (prompt tokens it
 * processed) and prompt_ms, predicted_n (tokens it generated) and
 * predicted_ms. The relay stays byte for byte: this only looks, and keeps
 * a few bytes of one piece for a key or number cut by the next.
 *
 * A key is matched as its JSON form, quotes included ("cache_n"), then
 * spaces, a colon, spaces and a number, after the "timings" key; text
 * inside a JSON string cannot match (its quotes are escaped). The last value seen wins: the final
 * event of a stream, or the one timings object of a whole answer. */
#ifndef LLAMA_POOL_TIMINGS_H
#define LLAMA_POOL_TIMINGS_H

#include <stdbool.h>
#include <stddef.h>

#define TIMINGS_HELD 48         /* bytes kept: a key, spaces and a number fit */

struct timings_scan {
    /* The last value seen; -1: none. */
    long cache_n, prompt_n, predicted_n;
    double prompt_ms, predicted_ms;
    bool in_timings;            /* the "timings" key has come */
    size_t nheld;
    char held[TIMINGS_HELD];    /* the end of what came so far */
};

void timings_scan_init(struct timings_scan *t);
/* The next N bytes of the answer's body. */
void timings_scan_feed(struct timings_scan *t, const char *data, size_t n);

#endif
