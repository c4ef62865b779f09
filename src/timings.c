/* timings — see timings.h. */
#define _GNU_SOURCE             /* memmem */
#include "timings.h"

#include <string.h>

void timings_scan_init(struct timings_scan *t)
{
    t->cache_n = t->prompt_n = -1;
    t->nheld = 0;
}

/* What follows a key at P (before END): 1 and *V for a whole number (one
 * that ends before END), 0 for anything else, -1 when END cuts it. */
static int number_after(const char *p, const char *end, long *v)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'))
        p++;
    if (p == end)
        return -1;
    if (*p != ':')
        return 0;
    for (p++; p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'); p++)
        ;
    long n = 0;
    int digits = 0;
    for (; p < end && *p >= '0' && *p <= '9'; p++) {
        if (++digits > 18)
            return 0;           /* not a token count */
        n = n * 10 + (*p - '0');
    }
    if (p == end)
        return -1;
    if (!digits)
        return 0;
    *v = n;
    return 1;
}

static void scan_key(const char *buf, size_t n, const char *key, size_t klen, long *out)
{
    const char *end = buf + n, *p = buf, *hit;
    long v;
    while (p < end && (hit = memmem(p, (size_t)(end - p), key, klen))) {
        if (number_after(hit + klen, end, &v) == 1)
            *out = v;
        p = hit + 1;
    }
}

static void scan(struct timings_scan *t, const char *buf, size_t n)
{
    static const char cache[] = "\"cache_n\"", prompt[] = "\"prompt_n\"";
    scan_key(buf, n, cache, sizeof cache - 1, &t->cache_n);
    scan_key(buf, n, prompt, sizeof prompt - 1, &t->prompt_n);
}

void timings_scan_feed(struct timings_scan *t, const char *data, size_t n)
{
    if (!n)
        return;
    if (t->nheld) {             /* a key or number cut between the pieces */
        char both[2 * TIMINGS_HELD];
        size_t k = n < TIMINGS_HELD ? n : TIMINGS_HELD;
        memcpy(both, t->held, t->nheld);
        memcpy(both + t->nheld, data, k);
        scan(t, both, t->nheld + k);
    }
    scan(t, data, n);           /* last: its values are the latest */
    size_t keep = TIMINGS_HELD - 1;
    if (n >= keep) {
        memcpy(t->held, data + n - keep, keep);
        t->nheld = keep;
    } else {
        size_t old = t->nheld < keep - n ? t->nheld : keep - n;
        memmove(t->held, t->held + t->nheld - old, old);
        memcpy(t->held + old, data, n);
        t->nheld = old + n;
    }
}
