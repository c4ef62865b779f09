#include "notify.h"

#include "build_config.h"
#include "log.h"

#include <stdio.h>
#include <string.h>

#if HAVE_LIBSYSTEMD
#include <systemd/sd-daemon.h>

static ev_timer watchdog;
static struct ev_loop *wd_loop;

static void watchdog_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)w; (void)revents;
    sd_notify(0, "WATCHDOG=1");
}

void notify_init(struct ev_loop *loop)
{
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
        double period = (double)usec / 1e6 / 2;
        wd_loop = loop;
        ev_timer_init(&watchdog, watchdog_cb, period, period);
        ev_timer_start(loop, &watchdog);
        ev_unref(loop);   /* the watchdog alone does not keep the loop alive */
        log_info("systemd watchdog: pinging every %.1f s", period);
    }
}

void notify_ready(const char *status)
{
    char buf[512];
    snprintf(buf, sizeof buf, "READY=1\nSTATUS=%s", status);
    sd_notify(0, buf);
}

void notify_status(const char *status)
{
    char buf[512];
    snprintf(buf, sizeof buf, "STATUS=%s", status);
    sd_notify(0, buf);
}

void notify_reloading(void)
{
    sd_notify(0, "RELOADING=1");
}

void notify_stopping(void)
{
    sd_notify(0, "STOPPING=1\nSTATUS=stopping instances");
}

void notify_stop(void)
{
    if (wd_loop && ev_is_active(&watchdog)) {
        ev_ref(wd_loop);
        ev_timer_stop(wd_loop, &watchdog);
    }
}
#else
void notify_init(struct ev_loop *loop) { (void)loop; }
void notify_ready(const char *status) { (void)status; }
void notify_status(const char *status) { (void)status; }
void notify_reloading(void) { }
void notify_stopping(void) { }
void notify_stop(void) { }
#endif
