#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static enum log_level min_level = LOG_INFO;
static int journal;

void log_stamp(char *buf)
{
    static time_t cached_sec = -1;
    static char cached[20];             /* "2026-11-30T03:52:45" */
    struct timeval tv;
    gettimeofday(&tv, NULL);
    if (tv.tv_sec != cached_sec) {
        struct tm tm;
        gmtime_r(&tv.tv_sec, &tm);
        if (strftime(cached, sizeof cached, "%Y-%m-%dT%H:%M:%S", &tm) != 19)
            memcpy(cached, "0000-00-00T00:00:00", 19);
        cached_sec = tv.tv_sec;
    }
    unsigned ms = (unsigned)(tv.tv_usec / 1000);
    memcpy(buf, cached, 19);
    buf[19] = '.';
    buf[20] = (char)('0' + ms / 100);
    buf[21] = (char)('0' + ms / 10 % 10);
    buf[22] = (char)('0' + ms % 10);
    buf[23] = 'Z';
}

void log_init(enum log_level min)
{
    min_level = min;
    journal = getenv("JOURNAL_STREAM") != NULL;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    static const char *const names[] = { "debug", "info", "warn", "error" };
    static const int prio[] = { 7, 6, 4, 3 };
    char line[4096];
    size_t n = 0;

    if (level < min_level)
        return;
    if (journal) {
        n = (size_t)snprintf(line, sizeof line, "<%d>", prio[level]);
    } else {
        log_stamp(line);
        n = LOG_STAMP_LEN;
        n += (size_t)snprintf(line + n, sizeof line - n, " %s ", names[level]);
    }
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - n, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    n += (size_t)m;
    if (n > sizeof line - 2)
        n = sizeof line - 2;
    /* One event, one line: a newline inside a message would split it. */
    for (size_t i = 0; i < n; i++)
        if (line[i] == '\n' || line[i] == '\r')
            line[i] = ' ';
    line[n++] = '\n';
    fwrite(line, 1, n, stderr);
    fflush(stderr);
}
