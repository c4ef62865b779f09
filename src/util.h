/* util — small text helpers shared by the modules: UTF-8 checks, a lossy
 * UTF-8 copy, and JSON string escaping.
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
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

#endif
