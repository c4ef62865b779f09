/* log — one line per event on stderr: "LEVEL message".
 *
 * Under systemd (JOURNAL_STREAM set) lines carry a <N> syslog priority
 * prefix and no timestamp (journald adds its own); otherwise each line
 * starts with an ISO-8601 UTC timestamp. Messages name the model and
 * instance they are about: "tiny#1: ready on port 8100 after 0.21 s". */
#ifndef LLAMA_POOL_LOG_H
#define LLAMA_POOL_LOG_H

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

void log_init(enum log_level min);

#define LOG_STAMP_LEN 24   /* "2026-11-30T03:52:45.123Z" */
/* The time now as above into BUF (LOG_STAMP_LEN bytes, no NUL): the date
 * part is formatted once a second, so a line costs a clock read and a
 * few stores (children's output lines are stamped this way). */
void log_stamp(char *buf);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
