/* util — small helpers: growable buffers and arrays, byte sizes, UTF-8
 * checks, lossy UTF-8 copies, JSON escaping. */
#define _GNU_SOURCE
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---------- growing memory ---------- */

/* The slow path of buf_reserve_min: allocate or double. */
bool buf_grow(struct buf *b, size_t n, size_t min)
{
    if (b->cap - b->len > n)
        return true;
    if (n > SIZE_MAX / 2 - b->len)
        return false;
    size_t cap = b->cap ? b->cap : (min ? min : 256);
    while (cap - b->len <= n)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d)
        return false;
    b->data = d;
    b->cap = cap;
    return true;
}

bool buf_puts(struct buf *b, const char *s)
{
    return buf_append(b, s, strlen(s));
}

bool buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    bool ok = buf_vprintf(b, fmt, ap);
    va_end(ap);
    return ok;
}

bool buf_vprintf(struct buf *b, const char *fmt, va_list ap)
{
    /* Formatted once where it fits (the common case), twice otherwise. */
    for (int pass = 0; pass < 2; pass++) {
        size_t room = b->cap - b->len;
        va_list aq;
        va_copy(aq, ap);
        int n = vsnprintf(room ? b->data + b->len : NULL, room, fmt, aq);
        va_end(aq);
        if (n < 0)
            return false;
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return true;
        }
        if (!buf_reserve(b, (size_t)n))
            return false;
    }
    return false;
}

void buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->data, b->data + n, b->len - n);
        b->len -= n;
    }
    if (b->data)
        b->data[b->len] = '\0';
}

void buf_free(struct buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

char *buf_take(struct buf *b)
{
    char *d = b->data;
    b->data = NULL;
    b->len = b->cap = 0;
    return d;
}

bool util_grow_slow(void *array, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return true;
    size_t n = *cap ? *cap : 16;
    while (n < need)
        n *= 2;
    if (n > SIZE_MAX / size)
        return false;
    void *p;
    memcpy(&p, array, sizeof p);
    void *v = realloc(p, n * size);
    if (!v)
        return false;
    memcpy(array, &v, sizeof v);
    *cap = n;
    return true;
}

void util_strv_free(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

/* ---------- text ---------- */

const char *util_format_bytes(uint64_t bytes, char *buf, size_t len)
{
    static const char *const unit[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
    double v = (double)bytes;
    unsigned u = 0;
    while (v >= 1024 && u < 6) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", bytes);
    else
        snprintf(buf, len, v < 10 ? "%.1f %s" : "%.0f %s", v, unit[u]);
    return buf;
}

/* U+FFFD REPLACEMENT CHARACTER, in UTF-8. */
static const char utf8_replacement[] = "\xEF\xBF\xBD";
#define UTF8_REPLACEMENT_LEN 3

/* One step of a UTF-8 decoder over U[0..LEN), LEN > 0. Returns the length of
 * the well-formed sequence at U (its code point in *CP), or minus the length
 * of the maximal ill-formed subpart there (at least 1): the bytes that could
 * still have begun a well-formed sequence, all replaced by one U+FFFD. */
static long utf8_step(const unsigned char *u, size_t len, uint32_t *cp)
{
    unsigned char b = u[0];
    unsigned char lo = 0x80, hi = 0xBF;   /* allowed range of the second byte */
    size_t need;
    uint32_t c;

    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    if (b >= 0xC2 && b <= 0xDF) {
        need = 2;
        c = b & 0x1F;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        c = b & 0x0F;
        if (b == 0xE0)
            lo = 0xA0;                    /* no overlong forms */
        else if (b == 0xED)
            hi = 0x9F;                    /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        c = b & 0x07;
        if (b == 0xF0)
            lo = 0x90;                    /* no overlong forms */
        else if (b == 0xF4)
            hi = 0x8F;                    /* nothing past U+10FFFF */
    } else {
        return -1;                        /* 80..C1, F5..FF never start one */
    }
    for (size_t i = 1; i < need; i++) {
        unsigned char min = i == 1 ? lo : 0x80, max = i == 1 ? hi : 0xBF;
        if (i >= len || u[i] < min || u[i] > max)
            return -(long)i;
        c = (c << 6) | (u[i] & 0x3F);
    }
    *cp = c;
    return (long)need;
}

size_t util_utf8_decode(const char *s, size_t len, uint32_t *cp)
{
    uint32_t c;
    if (!s || !len)
        return 0;
    long n = utf8_step((const unsigned char *)s, len, &c);
    if (n <= 0)
        return 0;
    if (cp)
        *cp = c;
    return (size_t)n;
}

size_t util_utf8_check(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        if (u[i] < 0x80) {                /* the common case, without a call */
            i++;
            continue;
        }
        uint32_t cp;
        long n = utf8_step(u + i, len - i, &cp);
        if (n <= 0)
            return i;
        i += (size_t)n;
    }
    return len;
}

bool util_utf8_valid(const char *s)
{
    if (!s)
        return false;
    size_t len = strlen(s);
    return util_utf8_check(s, len) == len;
}

char *util_utf8_lossy(const char *s, size_t len, size_t *out_len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t need = 0;
    uint32_t cp;

    for (size_t i = 0; i < len;) {
        long n = utf8_step(u + i, len - i, &cp);
        need += n > 0 ? (size_t)n : UTF8_REPLACEMENT_LEN;
        i += (size_t)(n > 0 ? n : -n);
    }
    char *out = malloc(need + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        long n = utf8_step(u + i, len - i, &cp);
        if (n > 0) {
            memcpy(out + o, s + i, (size_t)n);
            o += (size_t)n;
            i += (size_t)n;
        } else {
            memcpy(out + o, utf8_replacement, UTF8_REPLACEMENT_LEN);
            o += UTF8_REPLACEMENT_LEN;
            i += (size_t)-n;
        }
    }
    out[o] = '\0';
    if (out_len)
        *out_len = o;
    return out;
}

/* The JSON form of the character at U (LEN bytes left) in BUF (at least 6
 * bytes); its length in *OUT; returns how many input bytes it took. */
static size_t json_escape_one(const unsigned char *u, size_t len, char *buf, size_t *out)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char ch = u[0];
    const char *shortesc = NULL;

    switch (ch) {
    case '"':  shortesc = "\\\""; break;
    case '\\': shortesc = "\\\\"; break;
    case '\b': shortesc = "\\b"; break;
    case '\f': shortesc = "\\f"; break;
    case '\n': shortesc = "\\n"; break;
    case '\r': shortesc = "\\r"; break;
    case '\t': shortesc = "\\t"; break;
    default: break;
    }
    if (shortesc) {
        memcpy(buf, shortesc, 2);
        *out = 2;
        return 1;
    }
    if (ch < 0x20 || ch == 0x7f) {
        memcpy(buf, "\\u00", 4);
        buf[4] = hex[ch >> 4];
        buf[5] = hex[ch & 15];
        *out = 6;
        return 1;
    }
    uint32_t cp;
    long n = utf8_step(u, len, &cp);
    if (n > 0) {
        memcpy(buf, u, (size_t)n);
        *out = (size_t)n;
        return (size_t)n;
    }
    memcpy(buf, utf8_replacement, UTF8_REPLACEMENT_LEN);
    *out = UTF8_REPLACEMENT_LEN;
    return (size_t)-n;
}

size_t util_json_escape(char *dst, size_t cap, const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t len = s ? strlen(s) : 0;
    size_t need = 0;          /* the whole escaped length */
    size_t written = 0;       /* what fitted in DST */
    bool cut = false;

    for (size_t i = 0; i < len;) {
        char buf[6];
        size_t n;
        i += json_escape_one(u + i, len - i, buf, &n);
        if (!cut && cap && written + n <= cap - 1) {
            memcpy(dst + written, buf, n);
            written += n;
        } else {
            cut = true;       /* nothing after a character that did not fit */
        }
        need += n;
    }
    if (cap)
        dst[written] = '\0';
    return need;
}

json_t *util_json_string(const char *s)
{
    if (!s)
        return json_null();
    size_t len = strlen(s);
    if (util_utf8_check(s, len) == len)
        return json_string_nocheck(s);
    char *fixed = util_utf8_lossy(s, len, NULL);
    if (!fixed)
        return NULL;
    json_t *j = json_string_nocheck(fixed);
    free(fixed);
    return j;
}

char *util_prom_label_escape(const char *s)
{
    size_t len;
    char *text = util_utf8_lossy(s, strlen(s), &len);
    char *esc = text ? malloc(2 * len + 1) : NULL;
    if (!esc) {
        free(text);
        return NULL;
    }
    char *e = esc;
    for (const char *c = text; *c; c++) {
        if (*c == '\\' || *c == '"' || *c == '\n')
            *e++ = '\\';
        *e++ = *c == '\n' ? 'n' : *c;
    }
    *e = '\0';
    free(text);
    return esc;
}

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

void util_cloexec_all(void)
{
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) == 0)
        return;
    struct rlimit rl;
    long max = 65536;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)max)
        max = (long)rl.rlim_cur;
    for (long fd = 3; fd < max; fd++)
        (void)fcntl((int)fd, F_SETFD, FD_CLOEXEC);
}

ssize_t util_read_file(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t n = 0;
    while (n + 1 < len) {
        ssize_t r = read(fd, buf + n, len - 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = '\0';
    return (ssize_t)n;
}

unsigned util_sockaddr_port(const struct sockaddr *sa)
{
    return sa->sa_family == AF_INET6 ? ntohs(((const struct sockaddr_in6 *)sa)->sin6_port)
                                     : ntohs(((const struct sockaddr_in *)sa)->sin_port);
}
