/* config_internal — what config.c, config_discover.c and config_args.c
 * share, and nothing else includes: memory helpers that follow config's
 * one out-of-memory policy (config.h: say so and abort), a growable
 * NULL-terminated string vector, and models_dir discovery. */
#ifndef LLAMA_POOL_CONFIG_INTERNAL_H
#define LLAMA_POOL_CONFIG_INTERNAL_H

#include "util.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- memory: every allocation in config goes through these ---- */

/* Prints "out of memory while reading the configuration" and aborts. */
_Noreturn void config_oom(void);

static inline void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        config_oom();
    return p;
}

static inline char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (!d)
        config_oom();
    return d;
}

static inline char *xstrndup(const char *s, size_t n)
{
    char *d = strndup(s, n);
    if (!d)
        config_oom();
    return d;
}

__attribute__((format(printf, 1, 0)))
static inline char *xvasprintf(const char *fmt, va_list ap)
{
    char *s;
    if (vasprintf(&s, fmt, ap) < 0)
        config_oom();
    return s;
}

__attribute__((format(printf, 1, 2)))
static inline char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = xvasprintf(fmt, ap);
    va_end(ap);
    return s;
}

/* util_grow: *ARRAY holds at least NEED elements of SIZE bytes. */
static inline void xgrow(void *array, size_t *cap, size_t need, size_t size)
{
    if (!util_grow(array, cap, need, size))
        config_oom();
}

/* buf_reserve: room for N more bytes in B. */
static inline void xbuf_reserve(struct buf *b, size_t n)
{
    if (!buf_reserve(b, n))
        config_oom();
}

/* buf_append: N more bytes at the end of B. */
static inline void xbuf_append(struct buf *b, const void *data, size_t n)
{
    if (!buf_append(b, data, n))
        config_oom();
}

/* ---- text ---- */

/* Whitespace as pool.conf's lines know it (isspace: " \t\n\v\f\r"). */
static inline bool is_blank(char c)
{
    return isspace((unsigned char)c);
}

/* ---- a growable NULL-terminated vector of strings ---- */

struct strvec {
    char **v;          /* NULL, or NULL-terminated */
    size_t n, cap;
};

/* Appends S (malloc'd; the vector owns it from now on). */
static inline void strvec_push(struct strvec *sv, char *s)
{
    xgrow(&sv->v, &sv->cap, sv->n + 2, sizeof *sv->v);
    sv->v[sv->n++] = s;
    sv->v[sv->n] = NULL;
}

/* Hands the vector over, always a valid NULL-terminated array (free with
 * util_strv_free), its length in *N when N is not NULL; SV is empty after. */
static inline char **strvec_take(struct strvec *sv, size_t *n)
{
    char **v = sv->v ? sv->v : xcalloc(1, sizeof *v);
    if (n)
        *n = sv->n;
    *sv = (struct strvec){ 0 };
    return v;
}

static inline void strvec_free(struct strvec *sv)
{
    util_strv_free(sv->v);
    *sv = (struct strvec){ 0 };
}

/* ---- pool.conf's lines (config_ini.c, which says why not inih) ---- */

enum config_line_kind {
    LINE_BLANK,        /* empty, a comment, or holding a NUL byte */
    LINE_SECTION,      /* "[TEXT]" (TEXT trimmed) */
    LINE_BAD_SECTION,  /* '[' without ']' */
    LINE_KEY,          /* "KEY = VALUE" */
    LINE_CONT,         /* an indented line after a key line: more VALUE for KEY */
    LINE_NO_VALUE,     /* TEXT, with neither '=' nor ':' */
};

/* Reads SRC (LEN bytes, NUL bytes maybe) a line at a time: zero-initialise,
 * set src and len, call config_ini_next until it returns false, then
 * config_ini_free. */
struct config_ini {
    const char *src;
    size_t len, off;

    /* the current line */
    int lineno;                /* from 1 */
    const char *raw;           /* as written: RAW_LEN bytes, its '\n' included */
    size_t raw_len;
    size_t nul_at;             /* 1 + column of its first NUL byte; 0 = none */
    enum config_line_kind kind;
    const char *key, *value, *text;  /* its parts, as KIND says */

    struct buf cut;            /* a copy of the line, cut into its parts */
    char *prev_key;            /* the last key line's key, until a section
                                * header; NULL = none */
};

/* Moves to the next line; false at the end. */
bool config_ini_next(struct config_ini *ls);
void config_ini_free(struct config_ini *ls);

/* ---- models_dir discovery (config_discover.c) ---- */

/* A model file found under models_dir. */
struct config_found {
    char *name;            /* the model name: the file name without ".gguf"
                            * (and without a split model's "-00001-of-0000N") */
    char *path;            /* DIR/FILE */
    const char *fname;     /* FILE: points into path */
    bool used;             /* became a model (or a section's path) */
};

/* Every *.gguf regular file in DIR (symbolic links followed; names
 * starting with '.' skipped), a split model by its first part only, sorted
 * by model name then file name. 0 with the list in *FOUND (*N entries; free
 * with config_found_free), or -1 with errno set when DIR cannot be opened. */
int config_discover(const char *dir, struct config_found **found, size_t *n);

void config_found_free(struct config_found *found, size_t n);

#endif
