#include "backoff.h"

#include <string.h>

double backoff_on_crash(struct backoff *b, double uptime_s)
{
    if (uptime_s >= BACKOFF_RESET_S)
        b->streak = 0;
    double d = BACKOFF_INITIAL_S;
    for (unsigned i = 0; i < b->streak && d < BACKOFF_MAX_S; i++)
        d *= 2;
    if (d > BACKOFF_MAX_S)
        d = BACKOFF_MAX_S;
    b->streak++;
    return d;
}

void backoff_reset(struct backoff *b)
{
    b->streak = 0;
}

static void crash_log_expire(struct crash_log *c, double now, double window_s)
{
    size_t keep = 0;
    for (size_t i = 0; i < c->n; i++)
        if (now - c->t[i] <= window_s)
            c->t[keep++] = c->t[i];
    c->n = keep;
}

bool crash_log_add(struct crash_log *c, double now, double window_s, unsigned max)
{
    crash_log_expire(c, now, window_s);
    if (c->n == CRASH_LOG_MAX) {            /* keep the newest */
        memmove(c->t, c->t + 1, (c->n - 1) * sizeof c->t[0]);
        c->n--;
    }
    c->t[c->n++] = now;
    return c->n > max;
}

size_t crash_log_count(const struct crash_log *c, double now, double window_s)
{
    size_t k = 0;
    for (size_t i = 0; i < c->n; i++)
        if (now - c->t[i] <= window_s)
            k++;
    return k;
}

void crash_log_clear(struct crash_log *c)
{
    c->n = 0;
}
