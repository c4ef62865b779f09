/* notify — tell systemd how we are (sd_notify), when run under it.
 *
 * Without libsystemd, or outside systemd (no $NOTIFY_SOCKET), every call is
 * a no-op. The watchdog ping is armed from $WATCHDOG_USEC at half its period. */
#ifndef LLAMA_POOL_NOTIFY_H
#define LLAMA_POOL_NOTIFY_H

#include <ev.h>

void notify_init(struct ev_loop *loop);
void notify_ready(const char *status);
void notify_status(const char *status);
void notify_reloading(void);
void notify_stopping(void);
void notify_stop(void);

#endif
