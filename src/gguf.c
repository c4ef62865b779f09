/* gguf — header reader. Layout (llama.cpp ggml/include/gguf.h), all little-endian:
 *
 *   "GGUF" | u32 version | u64 n_tensors | u64 n_kv
 *   n_kv ×      { string key | u32 type | value }
 *   n_tensors × { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset }
 *   padding to general.alignment | tensor data
 *
 * A string is a u64 length and that many bytes; an array a u32 element type,
 * a u64 count and the elements (which may be arrays again). Version 1 used
 * u32 counts and lengths; llama.cpp refuses it and so do we. */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* --- ggml tensor types: block size and bytes per block, from ggml.c's
 * type_traits (sizes of the block_* structs in ggml-common.h). A block size
 * of 0 marks a type removed from llama.cpp: a file using it cannot load. --- */

struct ggml_type_desc {
    const char *name;
    uint16_t blck;
    uint16_t size;
};

static const struct ggml_type_desc ggml_types[] = {
    [0]  = { "F32",      1,   4 },
    [1]  = { "F16",      1,   2 },
    [2]  = { "Q4_0",    32,  18 },
    [3]  = { "Q4_1",    32,  20 },
    [4]  = { "Q4_2",     0,   0 },   /* removed */
    [5]  = { "Q4_3",     0,   0 },   /* removed */
    [6]  = { "Q5_0",    32,  22 },
    [7]  = { "Q5_1",    32,  24 },
    [8]  = { "Q8_0",    32,  34 },
    [9]  = { "Q8_1",    32,  36 },
    [10] = { "Q2_K",   256,  84 },
    [11] = { "Q3_K",   256, 110 },
    [12] = { "Q4_K",   256, 144 },
    [13] = { "Q5_K",   256, 176 },
    [14] = { "Q6_K",   256, 210 },
    [15] = { "Q8_K",   256, 292 },
    [16] = { "IQ2_XXS", 256, 66 },
    [17] = { "IQ2_XS", 256,  74 },
    [18] = { "IQ3_XXS", 256, 98 },
    [19] = { "IQ1_S",  256,  50 },
    [20] = { "IQ4_NL",  32,  18 },
    [21] = { "IQ3_S",  256, 110 },
    [22] = { "IQ2_S",  256,  82 },
    [23] = { "IQ4_XS", 256, 136 },
    [24] = { "I8",       1,   1 },
    [25] = { "I16",      1,   2 },
    [26] = { "I32",      1,   4 },
    [27] = { "I64",      1,   8 },
    [28] = { "F64",      1,   8 },
    [29] = { "IQ1_M",  256,  56 },
    [30] = { "BF16",     1,   2 },
    [31] = { "Q4_0_4_4", 0,   0 },   /* removed */
    [32] = { "Q4_0_4_8", 0,   0 },   /* removed */
    [33] = { "Q4_0_8_8", 0,   0 },   /* removed */
    [34] = { "TQ1_0",  256,  54 },
    [35] = { "TQ2_0",  256,  66 },
    [36] = { "IQ4_NL_4_4", 0, 0 },   /* removed */
    [37] = { "IQ4_NL_4_8", 0, 0 },   /* removed */
    [38] = { "IQ4_NL_8_8", 0, 0 },   /* removed */
    [39] = { "MXFP4",   32,  17 },
    [40] = { "NVFP4",   64,  36 },
    [41] = { "Q1_0",   128,  18 },
    [42] = { "Q2_0",    64,  18 },
};
#define N_GGML_TYPES (sizeof ggml_types / sizeof ggml_types[0])

const char *gguf_ggml_type_name(uint32_t type)
{
    return type < N_GGML_TYPES ? ggml_types[type].name : NULL;
}

int gguf_ggml_type_size(uint32_t type, uint32_t *block_elems, uint32_t *block_bytes)
{
    if (type >= N_GGML_TYPES || ggml_types[type].blck == 0)
        return -1;
    if (block_elems)
        *block_elems = ggml_types[type].blck;
    if (block_bytes)
        *block_bytes = ggml_types[type].size;
    return 0;
}

/* --- GGUF value types --- */

enum {
    T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64,
    T_COUNT
};
static const uint8_t value_size[T_COUNT] = { 1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8 };
static const char *const value_name[T_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool",
    "string", "array", "uint64", "int64", "float64",
};

static const char *type_name(uint32_t t)
{
    return t < T_COUNT ? value_name[t] : "unknown type";
}

static bool is_int_type(uint32_t t)
{
    return t == T_U8 || t == T_I8 || t == T_U16 || t == T_I16 || t == T_U32 || t == T_I32 ||
           t == T_U64 || t == T_I64;
}

static uint64_t le(const uint8_t *b, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = n; i-- > 0;)
        v = v << 8 | b[i];
    return v;
}

/* An integer of type T from its little-endian bytes; false when negative. */
static bool int_value(uint32_t t, const uint8_t *b, uint64_t *v)
{
    uint64_t u = le(b, value_size[t]);
    int64_t s;
    switch (t) {
    case T_I8:  s = (int8_t)u;  break;
    case T_I16: s = (int16_t)u; break;
    case T_I32: s = (int32_t)u; break;
    case T_I64: s = (int64_t)u; break;
    default: *v = u; return true;
    }
    *v = (uint64_t)s;
    return s >= 0;
}

/* --- buffered reader: a window of the file, refilled with pread --- */

#ifndef GGUF_READ_CHUNK            /* the fuzz build shrinks it to stress refills */
#define GGUF_READ_CHUNK (64 * 1024)
#endif

struct reader {
    int fd;                 /* -1: read from mem */
    const uint8_t *mem;
    uint64_t size;          /* of the file */
    uint64_t pos;           /* next byte to read */
    uint8_t *buf;
    uint64_t win_pos;       /* the window holds [win_pos, win_pos + win_len) */
    size_t win_len;
    uint64_t bytes_read;
    int io_errno;           /* set when a read failed */
};

static uint64_t rd_left(const struct reader *r)
{
    return r->size - r->pos;
}

/* 0, -1 when the file ends first, -2 on a read error. */
static int rd_get(struct reader *r, void *dst, size_t n)
{
    if (n > rd_left(r))
        return -1;
    if (r->fd < 0) {
        memcpy(dst, r->mem + r->pos, n);
        r->pos += n;
        return 0;
    }
    uint8_t *out = dst;
    while (n > 0) {
        if (r->pos < r->win_pos || r->pos >= r->win_pos + r->win_len) {
            uint64_t want = rd_left(r) < GGUF_READ_CHUNK ? rd_left(r) : GGUF_READ_CHUNK;
            ssize_t got;
            do
                got = pread(r->fd, r->buf, (size_t)want, (off_t)r->pos);
            while (got < 0 && errno == EINTR);
            if (got <= 0) {
                r->io_errno = got < 0 ? errno : 0;
                return got < 0 ? -2 : -1;     /* 0: the file shrank under us */
            }
            r->win_pos = r->pos;
            r->win_len = (size_t)got;
            r->bytes_read += (uint64_t)got;
        }
        size_t off = (size_t)(r->pos - r->win_pos);
        size_t take = r->win_len - off < n ? r->win_len - off : n;
        memcpy(out, r->buf + off, take);
        out += take;
        r->pos += take;
        n -= take;
    }
    return 0;
}

/* --- parser --- */

enum arch_key { K_LAYERS, K_EMBD, K_HEAD, K_HEAD_KV, K_CTX, K_HEAD_K, K_HEAD_V, K_COUNT };

static const char *const arch_suffix[K_COUNT] = {
    [K_LAYERS]  = ".block_count",
    [K_EMBD]    = ".embedding_length",
    [K_HEAD]    = ".attention.head_count",
    [K_HEAD_KV] = ".attention.head_count_kv",
    [K_CTX]     = ".context_length",
    [K_HEAD_K]  = ".attention.key_length",
    [K_HEAD_V]  = ".attention.value_length",
};

/* A "{prefix}.block_count"-like key, kept until general.architecture says
 * whether the prefix is ours (it usually comes first, but need not). */
struct cand {
    enum arch_key which;
    uint64_t kv;
    char prefix[64];
    bool is_array;
    uint64_t val;
    uint32_t *arr;          /* is_array: n entries */
    uint32_t n;
    char bad[96];           /* why the value is unusable, "" if fine */
};

#define MAX_CANDS 256

struct parser {
    struct reader r;
    struct gguf_info *out;
    char *err;
    size_t errlen;
    char where[160];        /* "kv 3 'general.name'", "tensor 12 'output.weight'" */
    uint64_t kv_arch, kv_name, kv_align;    /* index + 1 of the key, 0 before it */
    struct cand *cand;
    size_t n_cand;
};

__attribute__((format(printf, 2, 3)))
static int fail(struct parser *p, const char *fmt, ...)
{
    if (!p->err || p->errlen == 0)
        return -1;
    size_t n = 0;
    if (p->where[0]) {
        int w = snprintf(p->err, p->errlen, "%s: ", p->where);
        n = w < 0 ? 0 : (size_t)w < p->errlen ? (size_t)w : p->errlen - 1;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err + n, p->errlen - n, fmt, ap);
    va_end(ap);
    return -1;
}

/* A key or tensor name for messages: printable, at most 64 bytes shown. */
static void printable(char *dst, size_t cap, const char *s, uint64_t len)
{
    size_t show = len < 64 ? (size_t)len : 64;
    if (show > cap - 4)
        show = cap - 4;
    size_t j = 0;
    for (size_t i = 0; i < show; i++)
        dst[j++] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
    if (len > show)
        for (int k = 0; k < 3; k++)
            dst[j++] = '.';
    dst[j] = '\0';
}

static int get(struct parser *p, void *dst, size_t n, const char *what)
{
    uint64_t at = p->r.pos;
    int rc = rd_get(&p->r, dst, n);
    if (rc == 0)
        return 0;
    if (rc == -2)
        return fail(p, "%s: read error at byte %" PRIu64 ": %s", what, at, strerror(p->r.io_errno));
    return fail(p, "%s at byte %" PRIu64 " beyond the file end (%" PRIu64 " bytes)", what, at, p->r.size);
}

static int skip(struct parser *p, uint64_t n, const char *what)
{
    if (n > rd_left(&p->r))
        return fail(p, "%s of %" PRIu64 " bytes at byte %" PRIu64 " beyond the file end (%" PRIu64 " bytes)",
                    what, n, p->r.pos, p->r.size);
    p->r.pos += n;
    return 0;
}

static int get_u32(struct parser *p, uint32_t *v, const char *what)
{
    uint8_t b[4];
    if (get(p, b, 4, what))
        return -1;
    *v = (uint32_t)le(b, 4);
    return 0;
}

static int get_u64(struct parser *p, uint64_t *v, const char *what)
{
    uint8_t b[8];
    if (get(p, b, 8, what))
        return -1;
    *v = le(b, 8);
    return 0;
}

/* A string: its length in *len (if given), its first cap-1 bytes in buf
 * (NUL-terminated, if cap > 0); the rest is skipped, never allocated. */
static int get_str(struct parser *p, char *buf, size_t cap, uint64_t *len, const char *what)
{
    uint64_t n;
    if (get_u64(p, &n, what))
        return -1;
    if (n > rd_left(&p->r))
        return fail(p, "%s length %" PRIu64 " beyond the file end (at byte %" PRIu64 " of %" PRIu64 ")",
                    what, n, p->r.pos, p->r.size);
    size_t keep = 0;
    if (cap > 0) {
        keep = n < cap - 1 ? (size_t)n : cap - 1;
        if (get(p, buf, keep, what))
            return -1;
        buf[keep] = '\0';
    }
    p->r.pos += n - keep;
    if (len)
        *len = n;
    return 0;
}

static int skip_value(struct parser *p, uint32_t type, unsigned depth);

/* The N elements of an array whose element type ET has been read. */
static int skip_array_body(struct parser *p, uint32_t et, uint64_t n, unsigned depth)
{
    if (et >= T_COUNT)
        return fail(p, "unknown array element type %" PRIu32, et);
    unsigned min = value_size[et] ? value_size[et] : et == T_STR ? 8 : 12;
    if (n > rd_left(&p->r) / min)
        return fail(p, "array of %" PRIu64 " %s beyond the file end (at byte %" PRIu64 " of %" PRIu64 ")",
                    n, value_name[et], p->r.pos, p->r.size);
    if (value_size[et])
        return skip(p, n * value_size[et], "array");
    for (uint64_t i = 0; i < n; i++)
        if (skip_value(p, et, depth + 1))
            return -1;
    return 0;
}

static int skip_value(struct parser *p, uint32_t type, unsigned depth)
{
    if (type < T_COUNT && value_size[type])
        return skip(p, value_size[type], "value");
    if (type == T_STR)
        return get_str(p, NULL, 0, NULL, "string");
    if (type != T_ARR)
        return fail(p, "unknown value type %" PRIu32, type);
    if (depth >= GGUF_MAX_ARRAY_DEPTH)
        return fail(p, "arrays nested more than %u deep", GGUF_MAX_ARRAY_DEPTH);
    uint32_t et;
    uint64_t n;
    if (get_u32(p, &et, "array type"))
        return -1;
    if (et >= T_COUNT)
        return fail(p, "unknown array element type %" PRIu32, et);
    if (get_u64(p, &n, "array length"))
        return -1;
    return skip_array_body(p, et, n, depth);
}

/* Keep only valid UTF-8 without control characters: others become '?',
 * a sequence cut short at the end is dropped. */
static void utf8_clean(char *s)
{
    unsigned char *in = (unsigned char *)s, *out = in;
    while (*in) {
        unsigned c = *in, len = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
                              : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
        unsigned hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
        unsigned ok = len;
        for (unsigned i = 1; i < len && ok == len; i++) {
            unsigned b = in[i];
            if (b == 0) {                       /* cut short by truncation */
                *out = '\0';
                return;
            }
            if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xbf))
                ok = 0;
        }
        if (len == 1 && (c < 0x20 || c == 0x7f))
            ok = 0;
        if (ok) {
            memmove(out, in, len);
            out += len;
            in += len;
        } else {
            *out++ = '?';
            in++;
        }
    }
    *out = '\0';
}

/* Which arch key KEY is, with its prefix length; -1 if none. */
static int arch_key_of(const char *key, size_t len, size_t *prefix_len)
{
    for (int k = 0; k < K_COUNT; k++) {
        size_t sl = strlen(arch_suffix[k]);
        if (len > sl && len - sl < 64 && !memcmp(key + len - sl, arch_suffix[k], sl)) {
            *prefix_len = len - sl;
            return k;
        }
    }
    return -1;
}

static int read_candidate(struct parser *p, uint64_t kv, uint32_t type, int which,
                          const char *key, size_t prefix_len)
{
    const struct gguf_info *o = p->out;
    if (p->kv_arch && (strlen(o->arch) != prefix_len || memcmp(o->arch, key, prefix_len)))
        return skip_value(p, type, 0);                      /* another architecture's */
    if (p->n_cand == MAX_CANDS)
        return fail(p, "more than %u architecture keys", MAX_CANDS);
    struct cand *c = &p->cand[p->n_cand++];
    memset(c, 0, sizeof *c);
    c->which = (enum arch_key)which;
    c->kv = kv;
    memcpy(c->prefix, key, prefix_len);
    c->prefix[prefix_len] = '\0';

    if (is_int_type(type)) {
        uint8_t b[8];
        if (get(p, b, value_size[type], "value"))
            return -1;
        if (!int_value(type, b, &c->val))
            snprintf(c->bad, sizeof c->bad, "negative value %" PRId64, (int64_t)c->val);
        return 0;
    }
    if (type != T_ARR || (which != K_HEAD && which != K_HEAD_KV)) {
        snprintf(c->bad, sizeof c->bad, "expected an unsigned integer, found %s", type_name(type));
        return skip_value(p, type, 0);
    }

    uint32_t et;
    uint64_t n;
    if (get_u32(p, &et, "array type") || get_u64(p, &n, "array length"))
        return -1;
    if (!is_int_type(et) || n > GGUF_MAX_LAYERS) {
        if (is_int_type(et))
            snprintf(c->bad, sizeof c->bad, "per-layer array of %" PRIu64 " entries, more than %u",
                     n, GGUF_MAX_LAYERS);
        else
            snprintf(c->bad, sizeof c->bad, "expected integers, found an array of %s", type_name(et));
        return skip_array_body(p, et, n, 1);
    }
    if (n > rd_left(&p->r) / value_size[et])
        return fail(p, "array of %" PRIu64 " %s beyond the file end (at byte %" PRIu64 " of %" PRIu64 ")",
                    n, value_name[et], p->r.pos, p->r.size);
    c->is_array = true;
    c->n = (uint32_t)n;
    if (n > 0 && !(c->arr = malloc(n * sizeof *c->arr)))
        return fail(p, "out of memory");
    for (uint32_t i = 0; i < c->n; i++) {
        uint8_t b[8];
        uint64_t v;
        if (get(p, b, value_size[et], "array element"))
            return -1;
        if (!int_value(et, b, &v) || v > UINT32_MAX) {
            if (!c->bad[0])
                snprintf(c->bad, sizeof c->bad, "layer %" PRIu32 ": value out of range", i);
            v = 0;
        }
        c->arr[i] = (uint32_t)v;
    }
    return 0;
}

static int read_kv(struct parser *p, uint64_t i)
{
    struct gguf_info *o = p->out;
    char key[128], shown[80];
    uint64_t klen;

    snprintf(p->where, sizeof p->where, "kv %" PRIu64, i);
    if (get_str(p, key, sizeof key, &klen, "key"))
        return -1;
    if (klen == 0)
        return fail(p, "empty key");
    printable(shown, sizeof shown, key, klen);
    snprintf(p->where, sizeof p->where, "kv %" PRIu64 " '%s'", i, shown);

    uint32_t type;
    if (get_u32(p, &type, "value type"))
        return -1;
    if (type >= T_COUNT)
        return fail(p, "unknown value type %" PRIu32, type);
    if (klen >= sizeof key || memchr(key, '\0', (size_t)klen))
        return skip_value(p, type, 0);                  /* not a key we keep */

    if (!strcmp(key, "general.architecture")) {
        uint64_t len;
        if (p->kv_arch)
            return fail(p, "duplicate key (also kv %" PRIu64 ")", p->kv_arch - 1);
        if (type != T_STR)
            return fail(p, "expected a string, found %s", type_name(type));
        if (get_str(p, o->arch, sizeof o->arch, &len, "string"))
            return -1;
        if (len >= sizeof o->arch)
            return fail(p, "architecture name of %" PRIu64 " bytes, more than %zu", len, sizeof o->arch - 1);
        if (strlen(o->arch) != len)
            return fail(p, "architecture name has a NUL byte");
        for (const char *s = o->arch; *s; s++)
            if (*s <= 0x20 || *s >= 0x7f)
                return fail(p, "architecture name has a byte 0x%02x", (unsigned char)*s);
        if (len == 0)
            return fail(p, "empty architecture name");
        p->kv_arch = i + 1;
        return 0;
    }
    if (!strcmp(key, "general.name")) {
        if (p->kv_name)
            return fail(p, "duplicate key (also kv %" PRIu64 ")", p->kv_name - 1);
        if (type != T_STR)
            return fail(p, "expected a string, found %s", type_name(type));
        if (get_str(p, o->name, sizeof o->name, NULL, "string"))
            return -1;
        utf8_clean(o->name);
        p->kv_name = i + 1;
        return 0;
    }
    if (!strcmp(key, "general.alignment")) {
        uint32_t a;
        if (p->kv_align)
            return fail(p, "duplicate key (also kv %" PRIu64 ")", p->kv_align - 1);
        if (type != T_U32)                       /* llama.cpp asserts uint32 */
            return fail(p, "expected uint32, found %s", type_name(type));
        if (get_u32(p, &a, "value"))
            return -1;
        if (a == 0 || (a & (a - 1)))
            return fail(p, "alignment %" PRIu32 " is not a power of 2", a);
        o->alignment = a;
        p->kv_align = i + 1;
        return 0;
    }
    if (!strcmp(key, "split.count") && is_int_type(type)) {
        uint8_t b[8];
        uint64_t v;
        if (get(p, b, value_size[type], "value"))
            return -1;
        o->split_count = int_value(type, b, &v) && v <= UINT32_MAX ? (uint32_t)v : 0;
        return 0;
    }
    size_t prefix_len;
    int which = arch_key_of(key, (size_t)klen, &prefix_len);
    if (which >= 0)
        return read_candidate(p, i, type, which, key, prefix_len);
    return skip_value(p, type, 0);
}

/* Pick the candidates of general.architecture and check them. */
static int resolve_arch(struct parser *p)
{
    struct gguf_info *o = p->out;
    struct cand *got[K_COUNT] = { 0 };

    for (size_t i = 0; i < p->n_cand; i++) {
        struct cand *c = &p->cand[i];
        if (!p->kv_arch || strcmp(c->prefix, o->arch))
            continue;
        snprintf(p->where, sizeof p->where, "kv %" PRIu64 " '%s%s'", c->kv, c->prefix, arch_suffix[c->which]);
        if (got[c->which])
            return fail(p, "duplicate key (also kv %" PRIu64 ")", got[c->which]->kv);
        if (c->bad[0])
            return fail(p, "%s", c->bad);
        got[c->which] = c;
    }
    uint64_t v[K_COUNT] = { 0 };
    for (int k = 0; k < K_COUNT; k++) {
        struct cand *c = got[k];
        if (!c || c->is_array)
            continue;
        snprintf(p->where, sizeof p->where, "kv %" PRIu64 " '%s%s'", c->kv, c->prefix, arch_suffix[k]);
        if (k == K_LAYERS && c->val > GGUF_MAX_LAYERS)
            return fail(p, "%" PRIu64 " layers, more than %u", c->val, GGUF_MAX_LAYERS);
        if (k != K_CTX && c->val > UINT32_MAX)
            return fail(p, "value %" PRIu64 " out of range", c->val);
        v[k] = c->val;
    }
    o->n_layer = (uint32_t)v[K_LAYERS];
    o->n_embd = (uint32_t)v[K_EMBD];
    o->n_ctx_train = v[K_CTX];
    o->n_embd_head_k = (uint32_t)v[K_HEAD_K];
    o->n_embd_head_v = (uint32_t)v[K_HEAD_V];

    for (int k = K_HEAD; k <= K_HEAD_KV; k++) {
        struct cand *c = got[k];
        if (c && c->is_array && c->n != o->n_layer) {
            snprintf(p->where, sizeof p->where, "kv %" PRIu64 " '%s%s'", c->kv, c->prefix, arch_suffix[k]);
            return fail(p, "%" PRIu32 " per-layer entries for %" PRIu32 " layers", c->n, o->n_layer);
        }
    }
    struct cand *head = got[K_HEAD], *head_kv = got[K_HEAD_KV];
    if (head && head->is_array)
        o->n_head = head->n ? head->arr[0] : 0;        /* llama.cpp's n_head() is layer 0's */
    else
        o->n_head = (uint32_t)v[K_HEAD];

    /* head_count_kv defaults to head_count, per layer when that is */
    struct cand *per_layer = head_kv ? (head_kv->is_array ? head_kv : NULL)
                                     : (head && head->is_array ? head : NULL);
    if (per_layer) {
        o->n_head_kv_layer = per_layer->arr;
        per_layer->arr = NULL;
        o->n_head_kv_max = 0;
        for (uint32_t l = 0; l < o->n_layer; l++)
            if (o->n_head_kv_layer[l] > o->n_head_kv_max)
                o->n_head_kv_max = o->n_head_kv_layer[l];
    } else {
        o->n_head_kv_max = head_kv ? (uint32_t)v[K_HEAD_KV] : o->n_head;
    }
    p->where[0] = '\0';
    return 0;
}

/* The block N of a "blk.N.*" tensor name; -1 for any other name. */
static long block_of(const char *name)
{
    if (strncmp(name, "blk.", 4) != 0)
        return -1;
    const char *s = name + 4;
    long n = 0;
    if (*s < '0' || *s > '9')
        return -1;
    for (; *s >= '0' && *s <= '9'; s++) {
        n = n * 10 + (*s - '0');
        if (n > (long)GGUF_MAX_LAYERS)
            return -1;
    }
    return *s == '.' ? n : -1;
}

static bool starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Count a tensor's PADDED bytes where llama.cpp places it: its block, the
 * input layer or the output layer (llama-model.cpp, load_tensors). ROWS is
 * its ne[1]. */
static void place_tensor(struct gguf_info *o, const char *name, uint64_t padded, uint64_t rows)
{
    long il = block_of(name);
    if (il >= 0) {
        if ((uint64_t)il < o->n_layer)
            o->layer_bytes[il] += padded;
    } else if (strcmp(name, "token_embd.weight") == 0) {
        o->token_embd_bytes += padded;
        if (!o->n_vocab)
            o->n_vocab = rows;
    } else if (starts_with(name, "output.") || starts_with(name, "output_norm.")) {
        o->output_bytes += padded;
        if (strcmp(name, "output.weight") == 0) {
            o->output_tied = 0;
            o->n_vocab = rows;
        }
    }
}

static int read_tensors(struct parser *p)
{
    struct gguf_info *o = p->out;
    uint64_t max_end = 0, max_idx = 0;
    char max_name[80] = "";

    o->output_tied = 1;
    if (o->n_layer && !(o->layer_bytes = calloc(o->n_layer, sizeof *o->layer_bytes)))
        return fail(p, "out of memory");

    for (uint64_t i = 0; i < o->n_tensors; i++) {
        char name[80], shown[80];
        uint64_t nlen;
        snprintf(p->where, sizeof p->where, "tensor %" PRIu64, i);
        if (get_str(p, name, sizeof name, &nlen, "name"))
            return -1;
        printable(shown, sizeof shown, name, nlen);
        snprintf(p->where, sizeof p->where, "tensor %" PRIu64 " '%s'", i, shown);

        uint32_t n_dims, type;
        uint64_t ne[GGUF_MAX_DIMS] = { 1, 1, 1, 1 }, nel = 1;
        if (get_u32(p, &n_dims, "dimension count"))
            return -1;
        if (n_dims > GGUF_MAX_DIMS)
            return fail(p, "%" PRIu32 " dimensions, more than %u", n_dims, GGUF_MAX_DIMS);
        for (uint32_t d = 0; d < n_dims; d++) {
            if (get_u64(p, &ne[d], "dimension"))
                return -1;
            if (ne[d] > INT64_MAX)
                return fail(p, "dimension %" PRIu32 " is negative (%" PRId64 ")", d, (int64_t)ne[d]);
        }
        for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
            if (ne[d] && nel > INT64_MAX / ne[d])
                return fail(p, "dimension overflow (%" PRIu64 " x %" PRIu64 " x %" PRIu64 " x %" PRIu64 ")",
                            ne[0], ne[1], ne[2], ne[3]);
            nel *= ne[d];
        }
        if (get_u32(p, &type, "type"))
            return -1;
        uint32_t blck, bsize;
        if (gguf_ggml_type_size(type, &blck, &bsize)) {
            if (gguf_ggml_type_name(type))
                return fail(p, "ggml type %" PRIu32 " (%s) was removed from llama.cpp", type, gguf_ggml_type_name(type));
            return fail(p, "unknown ggml type %" PRIu32, type);
        }
        if (ne[0] % blck)
            return fail(p, "%" PRIu64 " elements per row, not a multiple of %s's block of %" PRIu32,
                        ne[0], gguf_ggml_type_name(type), blck);
        uint64_t blocks = nel / blck;
        if (blocks > UINT64_MAX / bsize)
            return fail(p, "size overflow");
        uint64_t bytes = blocks * bsize, offset;
        if (get_u64(p, &offset, "data offset"))
            return -1;
        if (offset != o->data_size)             /* llama.cpp requires this layout too */
            return fail(p, "data offset %" PRIu64 ", expected %" PRIu64 " (right after the previous tensor)",
                        offset, o->data_size);
        if (bytes > UINT64_MAX - o->alignment || bytes > UINT64_MAX - o->tensor_bytes)
            return fail(p, "size overflow");
        uint64_t padded = bytes + (o->alignment - bytes % o->alignment) % o->alignment;
        if (padded > UINT64_MAX - o->data_size)
            return fail(p, "size overflow");
        o->tensor_bytes += bytes;
        o->data_size += padded;
        place_tensor(o, name, padded, ne[1]);
        if (offset + bytes > max_end) {
            max_end = offset + bytes;
            max_idx = i;
            memcpy(max_name, shown, sizeof max_name);
        }
    }
    p->where[0] = '\0';

    uint64_t pos = p->r.pos;
    if (o->n_tensors > 0)
        pos += (o->alignment - pos % o->alignment) % o->alignment;
    o->data_offset = pos;
    if (max_end > 0 && (pos > o->file_size || max_end > o->file_size - pos))
        return fail(p, "tensor %" PRIu64 " '%s': data ends %" PRIu64 " bytes into the data section at byte %" PRIu64
                    ", beyond the file end (%" PRIu64 " bytes): truncated file?",
                    max_idx, max_name, max_end, pos, o->file_size);
    return 0;
}

static int parse(struct parser *p)
{
    struct gguf_info *o = p->out;
    uint8_t magic[4];
    uint32_t version;

    o->file_size = p->r.size;
    o->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (get(p, magic, 4, "magic"))
        return -1;
    if (memcmp(magic, "GGUF", 4)) {
        char shown[8];
        printable(shown, sizeof shown, (const char *)magic, 4);
        return fail(p, "not a GGUF file (magic '%.4s')", shown);
    }
    if (get_u32(p, &version, "version"))
        return -1;
    if (version == 1)
        return fail(p, "GGUF version 1 is no longer supported (llama.cpp refuses it too): convert the model again");
    if (version != 0 && (version & 0xffff) == 0)
        return fail(p, "GGUF version 0x%08" PRIx32 ": a big-endian file?", version);
    if (version != 2 && version != 3)
        return fail(p, "unknown GGUF version %" PRIu32 " (2 and 3 are known)", version);
    o->version = version;

    if (get_u64(p, &o->n_tensors, "tensor count") || get_u64(p, &o->n_kv, "kv count"))
        return -1;
    /* each kv takes at least 14 bytes (8 length, 1 key byte, 4 type, 1 value),
       each tensor info 24 (8 length, 4 n_dims, 4 type, 8 offset) */
    if (o->n_tensors > GGUF_MAX_TENSORS)
        return fail(p, "tensor count %" PRIu64 ", more than %u", o->n_tensors, GGUF_MAX_TENSORS);
    if (o->n_kv > GGUF_MAX_KV)
        return fail(p, "kv count %" PRIu64 ", more than %u", o->n_kv, GGUF_MAX_KV);
    if (o->n_kv * 14 + o->n_tensors * 24 > rd_left(&p->r))
        return fail(p, "%" PRIu64 " kv and %" PRIu64 " tensors cannot fit in the %" PRIu64 " bytes left after byte %" PRIu64,
                    o->n_kv, o->n_tensors, rd_left(&p->r), p->r.pos);

    if (!(p->cand = malloc(MAX_CANDS * sizeof *p->cand)))
        return fail(p, "out of memory");
    for (uint64_t i = 0; i < o->n_kv; i++)
        if (read_kv(p, i))
            return -1;
    p->where[0] = '\0';
    if (resolve_arch(p))
        return -1;
    return read_tensors(p);
}

static int run(struct parser *p, struct gguf_info *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    p->out = out;
    p->err = err;
    p->errlen = errlen;
    if (err && errlen)
        err[0] = '\0';
    int rc = parse(p);
    for (size_t i = 0; i < p->n_cand; i++)
        free(p->cand[i].arr);
    free(p->cand);
    out->bytes_read = p->r.bytes_read;
    if (rc) {
        gguf_info_free(out);
        memset(out, 0, sizeof *out);
        if (err && errlen && !err[0])
            snprintf(err, errlen, "unreadable GGUF header");
    }
    return rc;
}

int gguf_read_mem(const void *buf, size_t len, struct gguf_info *out, char *err, size_t errlen)
{
    struct parser p = { .r = { .fd = -1, .mem = buf, .size = len } };
    return run(&p, out, err, errlen);
}

int gguf_read_fd(int fd, struct gguf_info *out, char *err, size_t errlen)
{
    struct stat st;
    memset(out, 0, sizeof *out);
    if (fstat(fd, &st) < 0) {
        if (err && errlen)
            snprintf(err, errlen, "fstat: %s", strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        if (err && errlen)
            snprintf(err, errlen, "not a regular file");
        return -1;
    }
    struct parser p = { .r = { .fd = fd, .size = (uint64_t)st.st_size } };
    if (!(p.r.buf = malloc(GGUF_READ_CHUNK))) {
        if (err && errlen)
            snprintf(err, errlen, "out of memory");
        return -1;
    }
    int rc = run(&p, out, err, errlen);
    free(p.r.buf);
    return rc;
}

int gguf_read(const char *path, struct gguf_info *out, char *err, size_t errlen)
{
    char why[400] = "";
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        if (err && errlen)
            snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    int rc = gguf_read_fd(fd, out, why, sizeof why);
    close(fd);
    if (rc && err && errlen)
        snprintf(err, errlen, "%s: %s", path, why);
    return rc;
}

void gguf_info_free(struct gguf_info *info)
{
    if (!info)
        return;
    free(info->n_head_kv_layer);
    info->n_head_kv_layer = NULL;
    free(info->layer_bytes);
    info->layer_bytes = NULL;
}

static uint64_t sat_mul(uint64_t a, uint64_t b)
{
    return b && a > UINT64_MAX / b ? UINT64_MAX : a * b;
}

static void head_dims(const struct gguf_info *info, uint64_t *k, uint64_t *v)
{
    uint64_t dflt = info->n_head ? info->n_embd / info->n_head : 0;
    *k = info->n_embd_head_k ? info->n_embd_head_k : dflt;
    *v = info->n_embd_head_v ? info->n_embd_head_v : dflt;
}

void gguf_kv_layer_elems(const struct gguf_info *info, uint32_t il, uint64_t *k, uint64_t *v)
{
    *k = *v = 0;
    if (!info || il >= info->n_layer)
        return;
    uint64_t heads = info->n_head_kv_layer ? info->n_head_kv_layer[il] : info->n_head_kv_max;
    head_dims(info, k, v);
    *k *= heads;
    *v *= heads;
}

uint64_t gguf_kv_cache_bytes(const struct gguf_info *info, uint64_t n_ctx)
{
    if (!info || info->n_layer == 0)
        return 0;
    uint64_t k, v;
    head_dims(info, &k, &v);
    uint64_t heads = 0;                         /* KV heads summed over layers: < 2^48 */
    if (info->n_head_kv_layer)
        for (uint32_t l = 0; l < info->n_layer; l++)
            heads += info->n_head_kv_layer[l];
    else
        heads = (uint64_t)info->n_layer * info->n_head_kv_max;
    return sat_mul(sat_mul(sat_mul(heads, k + v), 2), n_ctx);
}
