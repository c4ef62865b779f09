/* backoff — when to restart a crashed instance, and when to give up.
 *
 * Pure arithmetic on times given by the caller (seconds, any epoch), so the
 * policy is unit-tested without processes or clocks:
 *   - the delay before restart doubles per consecutive crash, from 1 s up to
 *     60 s, and resets once an instance has stayed up for a healthy minute;
 *   - more than max_restarts crashes within restart_window means the model is
 *     crash-looping and is marked failed. */
#ifndef LLAMA_POOL_BACKOFF_H
#define LLAMA_POOL_BACKOFF_H

#include <stdbool.h>
#include <stddef.h>

#define BACKOFF_INITIAL_S 1.0
#define BACKOFF_MAX_S     60.0
#define BACKOFF_RESET_S   60.0   /* healthy uptime that forgives past crashes */
#define CRASH_LOG_MAX     64

struct backoff {
    unsigned streak;        /* consecutive crashes not yet forgiven */
};

/* A crash happened after UPTIME seconds of being ready (0 if it never got
 * ready). Returns the delay before the next start. */
double backoff_on_crash(struct backoff *b, double uptime_s);
/* Forget the streak (an explicit start or restart by the operator). */
void backoff_reset(struct backoff *b);

/* Recent crash times of one model. */
struct crash_log {
    double t[CRASH_LOG_MAX];
    size_t n;
};

/* Record a crash at NOW; drop those older than WINDOW. Returns true when
 * more than MAX crashes now lie within the window: the model is failed. */
bool crash_log_add(struct crash_log *c, double now, double window_s, unsigned max);
size_t crash_log_count(const struct crash_log *c, double now, double window_s);
void crash_log_clear(struct crash_log *c);

#endif
