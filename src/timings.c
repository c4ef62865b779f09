/* timings — see timings.h. */
#define _GNU_SOURCE             /* memmem */
#include "timings.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* The keys looked for, and where their values go. */
static const struct key {
    const char *text;           /* with its quotes */
    size_t len;
    bool count;                 /* a whole number (long), else a double */
    size_t off;
} keys[] = {
#define K(name, count, field) { "\"" name "\"", sizeof name + 1, count, offsetof(struct timings_scan, field) }
    K("cache_n", true, cache_n),
    K("prompt_n", true, prompt_n),
    K("prompt_ms", false, prompt_ms),
    K("predicted_n", true, predicted_n),
    K("predicted_ms", false, predicted_ms),
#undef K
};

void timings_scan_init(struct timings_scan *t)
{
    t->cache_n = t->prompt_n = t->predicted_n = -1;
    t->prompt_ms = t->predicted_ms = -1;
    t->in_timings = false;
    t->nheld = 0;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static bool in_number(char c)
{
    return (c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-';
}

/* What follows a key at P (before END): 1 and *V for a number (one that
 * ends before END, non-negative, of at most 31 characters), 0 for anything
 * else, -1 when END cuts it. */
static int number_after(const char *p, const char *end, double *v)
{
    while (p < end && is_space(*p))
        p++;
    if (p == end)
        return -1;
    if (*p != ':')
        return 0;
    for (p++; p < end && is_space(*p); p++)
        ;
    const char *start = p;
    while (p < end && in_number(*p))
        p++;
    if (p == end)
        return -1;
    size_t len = (size_t)(p - start);
    if (!len || len > 31 || *start < '0' || *start > '9')
        return 0;
    char text[32], *stop;
    memcpy(text, start, len);
    text[len] = '\0';
    *v = strtod(text, &stop);
    return *stop == '\0' ? 1 : 0;
}

/* The keys are looked for only from the "timings" key on: until it comes
 * (the last event of a stream, the end of a whole answer) a piece costs
 * one memmem. */
static void scan(struct timings_scan *t, const char *buf, size_t n)
{
    static const char timings[] = "\"timings\"";
    const char *end = buf + n, *from = buf;
    if (!t->in_timings) {
        if (!(from = memmem(buf, n, timings, sizeof timings - 1)))
            return;
        t->in_timings = true;
    }
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        const char *p = from, *hit;
        double v;
        while (p < end && (hit = memmem(p, (size_t)(end - p), keys[k].text, keys[k].len))) {
            if (number_after(hit + keys[k].len, end, &v) == 1) {
                char *field = (char *)t + keys[k].off;
                if (!keys[k].count)
                    memcpy(field, &v, sizeof v);
                else if (v < 1e15) {
                    long n = (long)v;
                    memcpy(field, &n, sizeof n);
                }
            }
            p = hit + 1;
        }
    }
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
