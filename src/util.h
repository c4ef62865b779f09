/* util — small helpers shared by the modules: a growable byte buffer and
 * array, byte sizes for people, UTF-8 checks, a lossy UTF-8 copy, and JSON
 * string escaping.
 *
 * Everything the daemon writes as JSON must be valid UTF-8, but much of what
 * it writes comes from outside: request targets and bodies, a child's log
 * lines, names in pool.conf. These helpers replace each ill-formed sequence
 * with U+FFFD (one per maximal ill-formed subpart, as the Unicode standard
 * and WHATWG's decoder do), so that nothing is dropped and nothing invalid
 * goes out. */
#ifndef LLAMA_POOL_UTIL_H
#define LLAMA_POOL_UTIL_H

#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

/* ---- growing memory ----
 * Out of memory is the caller's to report: these return false and leave
 * what was there untouched. */

/* A growable byte buffer, kept NUL-terminated once anything was added (so
 * DATA is a C string for text). Zero-initialised is empty. Callers read
 * DATA, LEN and CAP, may write bytes in DATA[0..CAP) after a buf_reserve,
 * and change LEN only with buf_set_len (or buf_clear, buf_consume). */
struct buf {
    char *data;
    size_t len, cap;
};

/* Room for N more bytes and a NUL; the first allocation is at least
 * 256 bytes (or MIN given with buf_reserve_min), then it doubles. */
static inline bool buf_reserve_min(struct buf *b, size_t n, size_t min);
static inline bool buf_reserve(struct buf *b, size_t n);
static inline bool buf_append(struct buf *b, const void *data, size_t n);
static inline bool buf_putc(struct buf *b, char c);
bool buf_puts(struct buf *b, const char *s);
bool buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool buf_vprintf(struct buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Drops the first N bytes (N <= len), keeping the rest at the front. */
void buf_consume(struct buf *b, size_t n);
/* Empties it, keeping its memory for reuse. */
static inline void buf_clear(struct buf *b);
/* The length is now N (< CAP, so that a NUL fits after): bytes the caller
 * wrote in the reserved room are kept, or the tail is dropped. */
static inline void buf_set_len(struct buf *b, size_t n);
/* Frees the memory; the buffer is empty and usable again. */
void buf_free(struct buf *b);
/* Hands the bytes to the caller (malloc'd, NUL-terminated; NULL when the
 * buffer never held any) and leaves the buffer empty. */
char *buf_take(struct buf *b);

/* Makes the array *ARRAY (elements of SIZE bytes; ARRAY is the address of
 * the caller's pointer, any pointer type) hold at least NEED elements,
 * doubling *CAP from 16. */
static inline bool util_grow(void *array, size_t *cap, size_t need, size_t size);
bool util_grow_slow(void *array, size_t *cap, size_t need, size_t size);
bool buf_grow(struct buf *b, size_t n, size_t min);

/* The fast paths, inline: these are called per request and per event. */
static inline bool buf_reserve_min(struct buf *b, size_t n, size_t min)
{
    return b->cap - b->len > n || buf_grow(b, n, min);
}

static inline bool buf_reserve(struct buf *b, size_t n)
{
    return b->cap - b->len > n || buf_grow(b, n, 0);
}

static inline bool buf_append(struct buf *b, const void *data, size_t n)
{
    if (!buf_reserve(b, n))
        return false;
    if (n)
        memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = '\0';
    return true;
}

static inline bool buf_putc(struct buf *b, char c)
{
    if (!buf_reserve(b, 1))
        return false;
    b->data[b->len++] = c;
    b->data[b->len] = '\0';
    return true;
}

static inline void buf_set_len(struct buf *b, size_t n)
{
    b->len = n;
    b->data[n] = '\0';
}

static inline void buf_clear(struct buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

static inline bool util_grow(void *array, size_t *cap, size_t need, size_t size)
{
    return need <= *cap || util_grow_slow(array, cap, need, size);
}

/* Frees a NULL-terminated vector of malloc'd strings and the vector (an
 * argv, an environment, a list from pool.conf); NULL is allowed. */
void util_strv_free(char **v);

/* ---- text ---- */

/* BYTES for a person: "512 B", "1.2 GiB", "48 GiB" (binary units; one
 * decimal below 10). Writes to BUF and returns it. The one formatter of
 * sizes in messages, logs and the CLI. */
const char *util_format_bytes(uint64_t bytes, char *buf, size_t len);

/* The length (1 to 4) of the well-formed UTF-8 sequence at S (LEN bytes
 * available), with its code point in *CP when CP is not NULL; 0 when S does
 * not start one (a stray continuation byte, an overlong form, a surrogate,
 * a value past U+10FFFF, or a sequence cut by LEN). */
size_t util_utf8_decode(const char *s, size_t len, uint32_t *cp);

/* The offset of the first byte of S[0..LEN) that is not well-formed UTF-8,
 * or LEN when all of it is. */
size_t util_utf8_check(const char *s, size_t len);

/* Whether the NUL-terminated S is well-formed UTF-8 (NULL is not). */
bool util_utf8_valid(const char *s);

/* A malloc'd NUL-terminated copy of S[0..LEN) in which every ill-formed
 * subpart is replaced by U+FFFD; the length in *OUT_LEN when not NULL.
 * NULL when out of memory. */
char *util_utf8_lossy(const char *s, size_t len, size_t *out_len);

/* Writes S escaped as the inside of a JSON string (no quotes) to DST,
 * like snprintf: at most CAP - 1 bytes and a NUL when CAP > 0, never
 * cutting an escape or a character in two. Returns the length the whole
 * escaped string needs, without the NUL: when it is >= CAP the output was
 * cut. '"' and '\' get a backslash; \b \f \n \r \t their short escapes;
 * other control characters and DEL \u00XX; ill-formed UTF-8 becomes U+FFFD.
 * NULL S writes nothing. */
size_t util_json_escape(char *dst, size_t cap, const char *s);

/* A jansson string for S, which may hold anything: ill-formed UTF-8 is
 * replaced with U+FFFD where json_string() would return NULL (and the field
 * would silently vanish). json_null() for a NULL S; NULL only when out of
 * memory, as for json_string(). */
json_t *util_json_string(const char *s);

/* A malloc'd copy of S fit for a Prometheus label value (between its
 * quotes): '\\', '"' and newline escaped as the text format wants, and
 * ill-formed UTF-8 replaced with U+FFFD. NULL when out of memory. */
char *util_prom_label_escape(const char *s);

struct sockaddr;
/* The port of an IPv4 or IPv6 address, in host order. */
unsigned util_sockaddr_port(const struct sockaddr *sa);

/* A small file (/proc, cgroupfs) into BUF, at most LEN - 1 bytes,
 * NUL-terminated: the bytes read, or -1 with errno set. */
ssize_t util_read_file(const char *path, char *buf, size_t len);

/* Mark every fd above stderr close-on-exec (close_range(2), else one
 * fcntl each): the rule for all of ours, also for the ones libraries
 * open without the flag. Async-signal-safe (a forked child calls it). */
void util_cloexec_all(void);

#endif
