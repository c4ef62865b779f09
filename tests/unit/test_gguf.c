/* GGUF header reader: files built here by a small writer, read back field
 * by field; broken and hostile files give -1 and a message, never a crash
 * (run under ASan/UBSan). With GGUF_SEED_DIR set, every file built here,
 * good or broken, is also written there (seeds for scripts/fuzz-gguf). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf.h"

enum { U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 };
enum { GT_F32 = 0, GT_F16 = 1, GT_Q4_0 = 2, GT_Q8_0 = 8, GT_Q4_K = 12, GT_Q6_K = 14,
       GT_IQ2_XXS = 16, GT_I8 = 24, GT_F64 = 28, GT_BF16 = 30, GT_TQ1_0 = 34, GT_MXFP4 = 39 };

/* --- a GGUF writer --- */

struct w {
    uint8_t *b;
    size_t len, cap;
    uint64_t n_kv, n_tensors;
    uint32_t align;
    uint64_t data;          /* bytes of tensor data so far, each tensor padded */
};

static void put(struct w *w, const void *p, size_t n)
{
    if (w->len + n > w->cap) {
        w->cap = (w->len + n) * 2;
        w->b = realloc(w->b, w->cap);
        assert_non_null(w->b);
    }
    memcpy(w->b + w->len, p, n);
    w->len += n;
}

static void le_put(struct w *w, uint64_t v, unsigned n)
{
    uint8_t b[8];
    for (unsigned i = 0; i < n; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put(w, b, n);
}

static void u8(struct w *w, uint8_t v)   { le_put(w, v, 1); }
static void u16(struct w *w, uint16_t v) { le_put(w, v, 2); }
static void u32(struct w *w, uint32_t v) { le_put(w, v, 4); }
static void u64(struct w *w, uint64_t v) { le_put(w, v, 8); }
static void f32(struct w *w, float f)    { uint32_t v; memcpy(&v, &f, 4); u32(w, v); }
static void f64(struct w *w, double f)   { uint64_t v; memcpy(&v, &f, 8); u64(w, v); }
static void str(struct w *w, const char *s) { u64(w, strlen(s)); put(w, s, strlen(s)); }

static void w_begin(struct w *w, uint32_t version)
{
    memset(w, 0, sizeof *w);
    w->align = 32;
    put(w, "GGUF", 4);
    u32(w, version);
    u64(w, 0);              /* counts, patched by w_end */
    u64(w, 0);
}

/* A key and its type; the caller writes the value. */
static void kv(struct w *w, const char *key, uint32_t type)
{
    str(w, key);
    u32(w, type);
    w->n_kv++;
}

static void kv_u32(struct w *w, const char *key, uint32_t v) { kv(w, key, U32); u32(w, v); }
static void kv_str(struct w *w, const char *key, const char *v) { kv(w, key, STR); str(w, v); }

static void kv_u32_array(struct w *w, const char *key, const uint32_t *v, unsigned n)
{
    kv(w, key, ARR);
    u32(w, U32);
    u64(w, n);
    for (unsigned i = 0; i < n; i++)
        u32(w, v[i]);
}

static void kv_align(struct w *w, uint32_t a)
{
    kv_u32(w, "general.alignment", a);
    w->align = a;
}

/* A tensor info whose data (BYTES, as this test computes them) follows the
 * previous tensor's, padded to the alignment. */
static void tensor(struct w *w, const char *name, uint32_t type, uint64_t bytes,
                   unsigned n_dims, const uint64_t *ne)
{
    str(w, name);
    u32(w, n_dims);
    for (unsigned d = 0; d < n_dims; d++)
        u64(w, ne[d]);
    u32(w, type);
    u64(w, w->data);
    w->data += (bytes + w->align - 1) / w->align * w->align;
    w->n_tensors++;
}

static void save_seed(const struct w *w)
{
    static unsigned seq;
    const char *dir = getenv("GGUF_SEED_DIR");
    if (!dir)
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s/test-%03u-%d.gguf", dir, seq++, (int)getpid());
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(w->b, 1, w->len, f);
        fclose(f);
    }
}

/* Patch the counts, pad to the data section, append zeroed tensor data;
 * returns the data offset. */
static uint64_t w_end(struct w *w)
{
    for (unsigned i = 0; i < 8; i++) {
        w->b[8 + i] = (uint8_t)(w->n_tensors >> (8 * i));
        w->b[16 + i] = (uint8_t)(w->n_kv >> (8 * i));
    }
    if (w->n_tensors)
        while (w->len % w->align)
            u8(w, 0);
    uint64_t off = w->len;
    for (uint64_t i = 0; i < w->data; i++)
        u8(w, 0);
    save_seed(w);
    return off;
}

/* Read W from memory into *g; assert success. */
static void read_ok(const struct w *w, struct gguf_info *g)
{
    char err[512] = "";
    int rc = gguf_read_mem(w->b, w->len, g, err, sizeof err);
    if (rc)
        fail_msg("gguf_read_mem: %s", err);
    assert_int_equal(g->file_size, w->len);
}

/* Read W from memory; assert failure with a message containing WANT. */
static void read_fails(const struct w *w, const char *want)
{
    struct gguf_info g;
    char err[512] = "";
    uint8_t *copy = malloc(w->len ? w->len : 1);     /* exact size: ASan sees any overread */
    memcpy(copy, w->b, w->len);
    int rc = gguf_read_mem(copy, w->len, &g, err, sizeof err);
    free(copy);
    if (rc != -1)
        fail_msg("expected an error containing \"%s\", the read succeeded", want);
    if (!strstr(err, want))
        fail_msg("expected an error containing \"%s\", got \"%s\"", want, err);
    assert_null(g.n_head_kv_layer);
    assert_null(g.layer_bytes);
}

/* A llama-like model: every value type, arrays of each, nested arrays,
 * the arch keys, a few tensors. */
static void build_model(struct w *w, uint32_t version)
{
    w_begin(w, version);
    kv_str(w, "general.architecture", "llama");
    kv_str(w, "general.name", "Tiny Llama 1.1B");
    kv(w, "t.u8", U8);    u8(w, 200);
    kv(w, "t.i8", I8);    u8(w, 0x80);
    kv(w, "t.u16", U16);  u16(w, 65535);
    kv(w, "t.i16", I16);  u16(w, 0x8000);
    kv(w, "t.u32", U32);  u32(w, 4000000000u);
    kv(w, "t.i32", I32);  u32(w, 0xffffffffu);
    kv(w, "t.f32", F32);  f32(w, 1.5f);
    kv(w, "t.bool", BOOL); u8(w, 1);
    kv(w, "t.str", STR);  str(w, "hello");
    kv(w, "t.u64", U64);  u64(w, UINT64_MAX);
    kv(w, "t.i64", I64);  u64(w, (uint64_t)INT64_MIN);
    kv(w, "t.f64", F64);  f64(w, 2.25);
    /* arrays of every element type, three elements each */
    static const struct { const char *key; uint32_t type; unsigned size; } arrays[] = {
        { "a.u8", U8, 1 }, { "a.i8", I8, 1 }, { "a.u16", U16, 2 }, { "a.i16", I16, 2 },
        { "a.u32", U32, 4 }, { "a.i32", I32, 4 }, { "a.f32", F32, 4 }, { "a.bool", BOOL, 1 },
        { "a.u64", U64, 8 }, { "a.i64", I64, 8 }, { "a.f64", F64, 8 },
    };
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) {
        kv(w, arrays[i].key, ARR);
        u32(w, arrays[i].type);
        u64(w, 3);
        for (unsigned e = 0; e < 3; e++)
            le_put(w, e + 1, arrays[i].size);
    }
    kv(w, "tokenizer.ggml.tokens", ARR);        /* strings */
    u32(w, STR);
    u64(w, 4);
    str(w, "<s>"); str(w, "</s>"); str(w, ""); str(w, "hello");
    kv(w, "a.empty", ARR);                      /* empty array */
    u32(w, U32);
    u64(w, 0);
    kv(w, "a.nested.strings", ARR);             /* [["a","bc"],[],["def"]] */
    u32(w, ARR);
    u64(w, 3);
    u32(w, STR); u64(w, 2); str(w, "a"); str(w, "bc");
    u32(w, STR); u64(w, 0);
    u32(w, STR); u64(w, 1); str(w, "def");
    kv(w, "a.nested.deep", ARR);                /* [[[1,2]],[[3]]] of uint16 */
    u32(w, ARR);
    u64(w, 2);
    u32(w, ARR); u64(w, 1); u32(w, U16); u64(w, 2); u16(w, 1); u16(w, 2);
    u32(w, ARR); u64(w, 1); u32(w, U16); u64(w, 1); u16(w, 3);
    kv_u32(w, "llama.block_count", 4);
    kv_u32(w, "llama.embedding_length", 256);
    kv_u32(w, "llama.attention.head_count", 8);
    kv_u32(w, "llama.attention.head_count_kv", 2);
    kv(w, "llama.context_length", U64);
    u64(w, 131072);
    kv_u32(w, "other.block_count", 99);          /* another architecture's: ignored */
    kv(w, "other.context_length", STR);
    str(w, "not ours, so its type does not matter");
    tensor(w, "token_embd.weight", GT_Q4_K, 256 * 10 / 256 * 144, 2, (uint64_t[]){ 256, 10 });
    tensor(w, "output_norm.weight", GT_F32, 256 * 4, 1, (uint64_t[]){ 256 });
    tensor(w, "blk.0.attn_q.weight", GT_Q8_0, 256 * 256 / 32 * 34, 2, (uint64_t[]){ 256, 256 });
}

/* --- reading well-formed files --- */

static void reads_model_keys_and_skips_every_value_type(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    build_model(&w, 3);
    uint64_t data_offset = w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(g.version, 3);
    assert_string_equal(g.arch, "llama");
    assert_string_equal(g.name, "Tiny Llama 1.1B");
    assert_int_equal(g.n_kv, w.n_kv);
    assert_int_equal(g.n_tensors, 3);
    assert_int_equal(g.n_layer, 4);
    assert_int_equal(g.n_embd, 256);
    assert_int_equal(g.n_head, 8);
    assert_int_equal(g.n_head_kv_max, 2);
    assert_null(g.n_head_kv_layer);
    assert_int_equal(g.n_embd_head_k, 0);
    assert_int_equal(g.n_embd_head_v, 0);
    assert_int_equal(g.n_ctx_train, 131072);
    assert_int_equal(g.alignment, 32);
    assert_int_equal(g.split_count, 0);
    uint64_t bytes = 10 * 144 + 256 * 4 + 256 * 8 * 34;
    assert_int_equal(g.tensor_bytes, bytes);
    assert_int_equal(g.data_size, w.data);
    assert_int_equal(g.data_offset, data_offset);
    assert_int_equal(g.data_offset % 32, 0);
    /* where llama.cpp places the data: blocks, input and output layers */
    assert_non_null(g.layer_bytes);
    assert_int_equal(g.layer_bytes[0], 256 * 8 * 34);
    assert_int_equal(g.layer_bytes[1] + g.layer_bytes[2] + g.layer_bytes[3], 0);
    assert_int_equal(g.token_embd_bytes, 10 * 144);
    assert_int_equal(g.output_bytes, 256 * 4);     /* output_norm; no output.weight: */
    assert_int_equal(g.output_tied, 1);             /* token_embd serves as the output */
    assert_int_equal(g.n_vocab, 10);
    gguf_info_free(&g);
    assert_null(g.layer_bytes);
    free(w.b);
}

static void version_2_reads_like_version_3(void **state)
{
    (void)state;
    struct w w2, w3;
    struct gguf_info g2, g3;
    build_model(&w2, 2);
    w_end(&w2);
    build_model(&w3, 3);
    w_end(&w3);
    read_ok(&w2, &g2);
    read_ok(&w3, &g3);
    assert_int_equal(g2.version, 2);
    g2.version = 3;
    assert_memory_equal(g2.layer_bytes, g3.layer_bytes, g3.n_layer * sizeof *g3.layer_bytes);
    gguf_info_free(&g2);
    gguf_info_free(&g3);
    assert_memory_equal(&g2, &g3, sizeof g2);     /* no pointers left: head_count_kv is scalar */
    free(w2.b);
    free(w3.b);
}

static void version_1_is_refused_clearly(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 1);
    w_end(&w);
    read_fails(&w, "GGUF version 1 is no longer supported");
    free(w.b);
}

static void empty_header_reads_with_no_architecture(void **state)
{
    (void)state;
    static const uint8_t stub[24] = "GGUF\3";       /* what scripts use as a fake model */
    struct gguf_info g;
    char err[256];
    assert_int_equal(gguf_read_mem(stub, sizeof stub, &g, err, sizeof err), 0);
    assert_string_equal(g.arch, "");
    assert_int_equal(g.n_layer, 0);
    assert_int_equal(g.tensor_bytes, 0);
    assert_int_equal(g.data_offset, 24);
    assert_int_equal(gguf_kv_cache_bytes(&g, 4096), 0);
}

static void head_count_kv_per_layer_array_is_kept(void **state)
{
    (void)state;
    static const uint32_t kvh[5] = { 2, 0, 4, 2, 1 };
    struct w w;
    struct gguf_info g;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "hybrid");
    kv_u32(&w, "hybrid.block_count", 5);
    kv_u32(&w, "hybrid.embedding_length", 512);
    kv_u32(&w, "hybrid.attention.head_count", 8);
    kv(&w, "hybrid.attention.head_count_kv", ARR);  /* int32 elements this time */
    u32(&w, I32);
    u64(&w, 5);
    for (int i = 0; i < 5; i++)
        u32(&w, kvh[i]);
    w_end(&w);
    read_ok(&w, &g);
    assert_non_null(g.n_head_kv_layer);
    assert_memory_equal(g.n_head_kv_layer, kvh, sizeof kvh);
    assert_int_equal(g.n_head_kv_max, 4);
    assert_int_equal(g.n_head, 8);
    gguf_info_free(&g);
    assert_null(g.n_head_kv_layer);
    free(w.b);
}

static void per_layer_head_count_is_the_head_count_kv_default(void **state)
{
    (void)state;
    static const uint32_t heads[3] = { 12, 16, 20 };      /* OpenELM style */
    struct w w;
    struct gguf_info g;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "openelm");
    kv_u32(&w, "openelm.block_count", 3);
    kv_u32_array(&w, "openelm.attention.head_count", heads, 3);
    kv_u32(&w, "openelm.attention.key_length", 64);
    kv_u32(&w, "openelm.attention.value_length", 64);
    w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(g.n_head, 12);                      /* layer 0's, as llama.cpp */
    assert_non_null(g.n_head_kv_layer);
    assert_memory_equal(g.n_head_kv_layer, heads, sizeof heads);
    assert_int_equal(g.n_head_kv_max, 20);
    assert_int_equal(g.n_embd_head_k, 64);
    assert_int_equal(g.n_embd_head_v, 64);
    gguf_info_free(&g);
    free(w.b);
}

static void head_count_kv_defaults_to_head_count(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "gpt2");
    kv_u32(&w, "gpt2.block_count", 12);
    kv_u32(&w, "gpt2.attention.head_count", 12);
    w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(g.n_head_kv_max, 12);
    assert_null(g.n_head_kv_layer);
    gguf_info_free(&g);
    free(w.b);
}

static void per_layer_array_must_have_one_entry_per_layer(void **state)
{
    (void)state;
    static const uint32_t kvh[3] = { 2, 2, 2 };
    struct w w;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "llama");
    kv_u32(&w, "llama.block_count", 4);
    kv_u32_array(&w, "llama.attention.head_count_kv", kvh, 3);
    w_end(&w);
    read_fails(&w, "kv 2 'llama.attention.head_count_kv': 3 per-layer entries for 4 layers");
    free(w.b);
}

static void arch_keys_before_general_architecture_are_kept(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    w_begin(&w, 3);
    kv_u32(&w, "qwen2.block_count", 24);
    kv_u32(&w, "llama.block_count", 99);
    kv(&w, "llama.attention.head_count", STR);     /* wrong type, but not ours */
    str(&w, "x");
    kv_u32(&w, "qwen2.attention.head_count", 14);
    kv_str(&w, "general.architecture", "qwen2");
    kv_u32(&w, "qwen2.attention.head_count_kv", 2);
    kv_u32(&w, "qwen2.embedding_length", 896);
    kv_u32(&w, "qwen2.context_length", 32768);
    w_end(&w);
    read_ok(&w, &g);
    assert_string_equal(g.arch, "qwen2");
    assert_int_equal(g.n_layer, 24);
    assert_int_equal(g.n_head, 14);
    assert_int_equal(g.n_head_kv_max, 2);
    assert_int_equal(g.n_embd, 896);
    assert_int_equal(g.n_ctx_train, 32768);
    gguf_info_free(&g);
    free(w.b);
}

static void arch_key_of_the_wrong_type_is_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "llama");
    kv(&w, "llama.block_count", F32);
    f32(&w, 4.0f);
    w_end(&w);
    read_fails(&w, "kv 1 'llama.block_count': expected an unsigned integer, found float32");
    free(w.b);

    w_begin(&w, 3);
    kv(&w, "llama.context_length", I32);
    u32(&w, (uint32_t)-5);
    kv_str(&w, "general.architecture", "llama");
    w_end(&w);
    read_fails(&w, "kv 0 'llama.context_length': negative value -5");
    free(w.b);
}

static void duplicate_keys_are_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "llama");
    kv_u32(&w, "llama.block_count", 4);
    kv_u32(&w, "llama.block_count", 5);
    w_end(&w);
    read_fails(&w, "kv 2 'llama.block_count': duplicate key (also kv 1)");
    free(w.b);

    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "llama");
    kv_str(&w, "general.architecture", "qwen2");
    w_end(&w);
    read_fails(&w, "kv 1 'general.architecture': duplicate key (also kv 0)");
    free(w.b);
}

static void alignment_key_moves_the_data_offset(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "llama");
    kv_align(&w, 256);
    tensor(&w, "a", GT_F32, 4 * 3, 1, (uint64_t[]){ 3 });
    tensor(&w, "b", GT_F16, 2 * 5, 1, (uint64_t[]){ 5 });
    uint64_t off = w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(g.alignment, 256);
    assert_int_equal(g.data_offset, off);
    assert_int_equal(g.data_offset, 256);
    assert_int_equal(g.tensor_bytes, 12 + 10);
    assert_int_equal(g.data_size, 512);                  /* each padded to 256 */
    free(w.b);
}

static void alignment_must_be_a_uint32_power_of_two(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    kv_u32(&w, "general.alignment", 48);
    w_end(&w);
    read_fails(&w, "kv 0 'general.alignment': alignment 48 is not a power of 2");
    free(w.b);

    w_begin(&w, 3);
    kv_u32(&w, "general.alignment", 0);
    w_end(&w);
    read_fails(&w, "alignment 0 is not a power of 2");
    free(w.b);

    w_begin(&w, 3);
    kv(&w, "general.alignment", U64);
    u64(&w, 64);
    w_end(&w);
    read_fails(&w, "kv 0 'general.alignment': expected uint32, found uint64");
    free(w.b);
}

/* Data is counted where llama.cpp places it: "blk.N." by block (N below
 * block_count), token_embd on the input layer, output and output_norm on
 * the output layer; names that only look alike count nowhere. */
static void tensor_data_is_placed_by_layer(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "llama");
    kv_u32(&w, "llama.block_count", 2);
    tensor(&w, "token_embd.weight", GT_F16, 64 * 100 * 2, 2, (uint64_t[]){ 64, 100 });
    tensor(&w, "blk.0.attn_q.weight", GT_F32, 64 * 4, 1, (uint64_t[]){ 64 });
    tensor(&w, "blk.1.attn_q.weight", GT_F32, 64 * 4, 1, (uint64_t[]){ 64 });
    tensor(&w, "blk.1.ffn_up.weight", GT_F32, 8 * 4, 1, (uint64_t[]){ 8 });   /* padded to 32 */
    tensor(&w, "blk.2.attn_q.weight", GT_F32, 64 * 4, 1, (uint64_t[]){ 64 });   /* beyond block_count */
    tensor(&w, "blk.x.attn_q.weight", GT_F32, 64 * 4, 1, (uint64_t[]){ 64 });
    tensor(&w, "blk.3", GT_F32, 64 * 4, 1, (uint64_t[]){ 64 });
    tensor(&w, "output_norm.weight", GT_F32, 64 * 4, 1, (uint64_t[]){ 64 });
    tensor(&w, "output.weight", GT_F16, 64 * 99 * 2, 2, (uint64_t[]){ 64, 99 });
    tensor(&w, "outputs.weight", GT_F32, 64 * 4, 1, (uint64_t[]){ 64 });
    w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(g.layer_bytes[0], 256);
    assert_int_equal(g.layer_bytes[1], 256 + 32);
    assert_int_equal(g.token_embd_bytes, 64 * 100 * 2);
    assert_int_equal(g.output_bytes, 256 + 64 * 99 * 2);
    assert_int_equal(g.output_tied, 0);
    assert_int_equal(g.n_vocab, 99);                /* output.weight's rows win */
    gguf_info_free(&g);
    free(w.b);
}

static void tensor_bytes_follow_each_ggml_type(void **state)
{
    (void)state;
    static const struct {
        uint32_t type;
        unsigned n_dims;
        uint64_t ne[4];
        uint64_t bytes;
    } cases[] = {
        { GT_F32,     2, { 64, 3 },        64 * 3 * 4 },
        { GT_F16,     2, { 64, 3 },        64 * 3 * 2 },
        { GT_BF16,    1, { 10 },           20 },
        { GT_Q4_0,    2, { 64, 2 },        4 * 18 },
        { GT_Q8_0,    2, { 32, 5 },        5 * 34 },
        { GT_Q4_K,    2, { 256, 3 },       3 * 144 },
        { GT_Q6_K,    1, { 512 },          2 * 210 },
        { GT_IQ2_XXS, 2, { 256, 2 },       2 * 66 },
        { GT_MXFP4,   1, { 64 },           2 * 17 },
        { GT_TQ1_0,   1, { 256 },          54 },
        { GT_I8,      3, { 7, 3, 2 },      42 },
        { GT_F64,     4, { 3, 1, 1, 2 },   48 },
        { GT_F32,     2, { 0, 5 },         0 },                 /* empty tensor */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct w w;
        struct gguf_info g;
        w_begin(&w, 3);
        tensor(&w, "t", cases[i].type, cases[i].bytes, cases[i].n_dims, cases[i].ne);
        w_end(&w);
        read_ok(&w, &g);
        if (g.tensor_bytes != cases[i].bytes)
            fail_msg("type %s: %" PRIu64 " bytes, expected %" PRIu64,
                     gguf_ggml_type_name(cases[i].type), g.tensor_bytes, cases[i].bytes);
        free(w.b);
    }
    uint32_t blck, size;
    assert_int_equal(gguf_ggml_type_size(15, &blck, &size), 0);     /* Q8_K */
    assert_int_equal(blck, 256);
    assert_int_equal(size, 292);
    assert_int_equal(gguf_ggml_type_size(31, &blck, &size), -1);    /* Q4_0_4_4: removed */
    assert_string_equal(gguf_ggml_type_name(31), "Q4_0_4_4");
    assert_null(gguf_ggml_type_name(1000));
}

static void name_is_cleaned_to_utf8_and_truncated(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    char longname[300];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    memcpy(longname + 126, "\xc3\xa9", 2);            /* é cut by the 127-byte limit */
    w_begin(&w, 3);
    kv_str(&w, "general.name", longname);
    w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(strlen(g.name), 126);
    free(w.b);

    w_begin(&w, 3);
    kv_str(&w, "general.name", "Caf\xc3\xa9 \xff\xfe bad\x01\xed\xa0\x80 end");
    w_end(&w);
    read_ok(&w, &g);
    assert_string_equal(g.name, "Caf\xc3\xa9 ?? bad???? end");
    free(w.b);
}

static void split_count_is_kept(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    w_begin(&w, 3);
    kv(&w, "split.no", U16);
    u16(&w, 0);
    kv(&w, "split.count", U16);
    u16(&w, 3);
    w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(g.split_count, 3);
    free(w.b);
}

/* --- the KV cache estimate --- */

static void kv_cache_bytes_match_the_formula(void **state)
{
    (void)state;
    struct w w;
    struct gguf_info g;
    build_model(&w, 3);
    w_end(&w);
    read_ok(&w, &g);
    /* 2 × n_layer × n_ctx × n_head_kv × (n_embd / n_head) × 2 bytes */
    assert_int_equal(gguf_kv_cache_bytes(&g, 1024), 2ull * 4 * 1024 * 2 * (256 / 8) * 2);
    assert_int_equal(gguf_kv_cache_bytes(&g, 0), 0);
    assert_int_equal(gguf_kv_cache_bytes(&g, UINT64_MAX), UINT64_MAX);   /* saturates */
    gguf_info_free(&g);
    free(w.b);

    static const uint32_t kvh[5] = { 2, 0, 4, 2, 1 };
    w_begin(&w, 3);
    kv_str(&w, "general.architecture", "hybrid");
    kv_u32(&w, "hybrid.block_count", 5);
    kv_u32(&w, "hybrid.embedding_length", 512);
    kv_u32(&w, "hybrid.attention.head_count", 8);
    kv_u32_array(&w, "hybrid.attention.head_count_kv", kvh, 5);
    w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(gguf_kv_cache_bytes(&g, 100), 100ull * (2 + 0 + 4 + 2 + 1) * (64 + 64) * 2);
    gguf_info_free(&g);
    free(w.b);

    w_begin(&w, 3);                                     /* Gemma style: head dim given */
    kv_str(&w, "general.architecture", "gemma");
    kv_u32(&w, "gemma.block_count", 18);
    kv_u32(&w, "gemma.embedding_length", 2048);
    kv_u32(&w, "gemma.attention.head_count", 8);
    kv_u32(&w, "gemma.attention.head_count_kv", 1);
    kv_u32(&w, "gemma.attention.key_length", 256);
    kv_u32(&w, "gemma.attention.value_length", 256);
    w_end(&w);
    read_ok(&w, &g);
    assert_int_equal(gguf_kv_cache_bytes(&g, 8192), 8192ull * 18 * 1 * (256 + 256) * 2);
    gguf_info_free(&g);
    free(w.b);
}

/* --- broken and hostile files --- */

static void every_truncation_of_a_valid_file_fails_cleanly(void **state)
{
    (void)state;
    struct w w;
    build_model(&w, 3);
    w_end(&w);
    char path[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    assert_int_equal(write(fd, w.b, w.len), (ssize_t)w.len);
    for (size_t len = 0; len < w.len; len++) {
        struct gguf_info g;
        char err[512] = "";
        uint8_t *copy = malloc(len ? len : 1);
        memcpy(copy, w.b, len);
        int rc = gguf_read_mem(copy, len, &g, err, sizeof err);
        free(copy);
        if (rc != -1 || !err[0])
            fail_msg("truncated to %zu bytes: rc %d, message \"%s\"", len, rc, err);
        assert_int_equal(ftruncate(fd, (off_t)len), 0);
        err[0] = '\0';
        rc = gguf_read_fd(fd, &g, err, sizeof err);
        if (rc != -1 || !err[0])
            fail_msg("file truncated to %zu bytes: rc %d, message \"%s\"", len, rc, err);
    }
    close(fd);
    free(w.b);
}

static void wrong_magic_is_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    memcpy(w.b, "GGML", 4);
    read_fails(&w, "not a GGUF file (magic 'GGML')");
    memcpy(w.b, "\0\x01GG", 4);
    read_fails(&w, "not a GGUF file (magic '??GG')");
    free(w.b);
}

static void bad_versions_are_refused(void **state)
{
    (void)state;
    static const struct { uint32_t v; const char *msg; } cases[] = {
        { 0, "unknown GGUF version 0" },
        { 4, "unknown GGUF version 4" },
        { 0x03000000, "a big-endian file?" },
        { 0xffffffff, "unknown GGUF version 4294967295" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct w w;
        w_begin(&w, cases[i].v);
        w_end(&w);
        read_fails(&w, cases[i].msg);
        free(w.b);
    }
}

static void absurd_counts_are_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    w_end(&w);
    memset(w.b + 16, 0xff, 8);                        /* n_kv = 2^64 - 1 */
    read_fails(&w, "kv count 18446744073709551615, more than 1000000");
    memset(w.b + 16, 0, 8);
    memset(w.b + 8, 0xff, 8);
    read_fails(&w, "tensor count 18446744073709551615, more than 1000000");
    memset(w.b + 8, 0, 8);
    w.b[16] = 100;                                    /* 100 kv in 0 bytes */
    read_fails(&w, "100 kv and 0 tensors cannot fit");
    free(w.b);
}

static void huge_string_length_is_refused_without_allocating(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    kv(&w, "general.name", STR);
    u64(&w, 0xffffffffu);
    put(&w, "abc", 3);
    w_end(&w);
    read_fails(&w, "kv 0 'general.name': string length 4294967295 beyond the file end");
    free(w.b);

    w_begin(&w, 3);                                   /* a key this time */
    u64(&w, UINT64_MAX);
    put(&w, "general.name....", 16);
    w.n_kv++;
    w_end(&w);
    read_fails(&w, "kv 0: key length 18446744073709551615 beyond the file end");
    free(w.b);

    w_begin(&w, 3);                                   /* inside an array of strings */
    kv(&w, "tokenizer.ggml.tokens", ARR);
    u32(&w, STR);
    u64(&w, 2);
    str(&w, "a");
    u64(&w, 1u << 30);
    w_end(&w);
    read_fails(&w, "kv 0 'tokenizer.ggml.tokens': string length 1073741824 beyond the file end");
    free(w.b);
}

static void huge_arrays_are_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    kv(&w, "a", ARR);
    u32(&w, U64);
    u64(&w, UINT64_MAX / 4);                          /* × 8 bytes would overflow */
    w_end(&w);
    read_fails(&w, "kv 0 'a': array of 4611686018427387903 uint64 beyond the file end");
    free(w.b);

    w_begin(&w, 3);
    kv(&w, "a", ARR);
    u32(&w, ARR);
    u64(&w, 1000000);
    w_end(&w);
    read_fails(&w, "array of 1000000 array beyond the file end");
    free(w.b);

    w_begin(&w, 3);                                   /* per-layer: over the layer cap */
    kv_str(&w, "general.architecture", "llama");
    kv(&w, "llama.attention.head_count_kv", ARR);
    u32(&w, U8);
    u64(&w, 70000);
    for (int i = 0; i < 70000; i++)
        u8(&w, 1);
    w_end(&w);
    read_fails(&w, "per-layer array of 70000 entries, more than 65536");
    free(w.b);
}

static void deeply_nested_arrays_are_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    kv(&w, "deep", ARR);
    for (int i = 0; i < 100; i++) {
        u32(&w, ARR);
        u64(&w, 1);
    }
    w_end(&w);
    read_fails(&w, "kv 0 'deep': arrays nested more than 8 deep");
    free(w.b);
}

static void unknown_value_types_are_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    kv(&w, "x", 13);
    u32(&w, 0);
    w_end(&w);
    read_fails(&w, "kv 0 'x': unknown value type 13");
    free(w.b);

    w_begin(&w, 3);
    kv(&w, "x", ARR);
    u32(&w, 0xdeadbeef);
    u64(&w, 0);
    w_end(&w);
    read_fails(&w, "kv 0 'x': unknown array element type 3735928559");
    free(w.b);

    w_begin(&w, 3);
    kv(&w, "", U8);
    u8(&w, 0);
    u8(&w, 0);
    w_end(&w);
    read_fails(&w, "kv 0: empty key");
    free(w.b);
}

static void unknown_tensor_types_are_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    tensor(&w, "a", GT_F32, 4, 1, (uint64_t[]){ 1 });
    tensor(&w, "blk.0.ffn_up.weight", 99, 0, 1, (uint64_t[]){ 1 });
    w_end(&w);
    read_fails(&w, "tensor 1 'blk.0.ffn_up.weight': unknown ggml type 99");
    free(w.b);

    w_begin(&w, 3);
    tensor(&w, "a", 32, 0, 1, (uint64_t[]){ 32 });
    w_end(&w);
    read_fails(&w, "tensor 0 'a': ggml type 32 (Q4_0_4_8) was removed from llama.cpp");
    free(w.b);

    w_begin(&w, 3);
    tensor(&w, "a", GT_Q4_K, 0, 2, (uint64_t[]){ 100, 2 });
    w_end(&w);
    read_fails(&w, "tensor 0 'a': 100 elements per row, not a multiple of Q4_K's block of 256");
    free(w.b);
}

static void bad_dimensions_are_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    tensor(&w, "big", GT_F32, 0, 3, (uint64_t[]){ 1ull << 32, 1ull << 20, 1ull << 12 });
    w_end(&w);
    read_fails(&w, "tensor 0 'big': dimension overflow (4294967296 x 1048576 x 4096 x 1)");
    free(w.b);

    w_begin(&w, 3);                                   /* elements fit, bytes do not */
    tensor(&w, "big", GT_F64, 0, 2, (uint64_t[]){ 1ull << 31, 1ull << 31 });
    w_end(&w);
    read_fails(&w, "tensor 0 'big': size overflow");
    free(w.b);

    w_begin(&w, 3);
    tensor(&w, "t", GT_F32, 0, 5, (uint64_t[]){ 1, 1, 1, 1, 1 });
    w_end(&w);
    read_fails(&w, "tensor 0 't': 5 dimensions, more than 4");
    free(w.b);

    w_begin(&w, 3);
    tensor(&w, "t", GT_F32, 0, 2, (uint64_t[]){ 4, (uint64_t)-1 });
    w_end(&w);
    read_fails(&w, "tensor 0 't': dimension 1 is negative (-1)");
    free(w.b);
}

static void tensor_data_beyond_the_file_end_is_refused(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    tensor(&w, "a", GT_F32, 1024, 1, (uint64_t[]){ 256 });
    tensor(&w, "output.weight", GT_F32, 1024, 1, (uint64_t[]){ 256 });
    w_end(&w);
    w.len -= 1;                                       /* a download cut one byte short */
    read_fails(&w, "tensor 1 'output.weight': data ends 2048 bytes into the data section");
    free(w.b);

    w_begin(&w, 3);
    tensor(&w, "a", GT_F32, 4, 1, (uint64_t[]){ 1 });
    size_t offset_field = w.len - 8;
    w_end(&w);
    memset(w.b + offset_field, 0xff, 8);              /* 2^64 - 1 */
    read_fails(&w, "tensor 0 'a': data offset 18446744073709551615, expected 0");
    free(w.b);

    w_begin(&w, 3);                                   /* overlapping tensors */
    tensor(&w, "a", GT_F32, 64, 1, (uint64_t[]){ 16 });
    tensor(&w, "b", GT_F32, 64, 1, (uint64_t[]){ 16 });
    w.data = 64;
    memset(w.b + w.len - 8, 0, 8);                    /* b at offset 0 too */
    w_end(&w);
    read_fails(&w, "tensor 1 'b': data offset 0, expected 64");
    free(w.b);
}

/* --- files on disk --- */

static int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* A header over several read windows (a long template, a big vocabulary),
 * then 1 GiB of sparse tensor data that is never read. */
static void reads_a_big_header_and_never_the_tensor_data(void **state)
{
    (void)state;
    struct w w;
    w_begin(&w, 3);
    char *tmpl = malloc(200000);
    memset(tmpl, 'T', 199999);
    tmpl[199999] = '\0';
    kv_str(&w, "tokenizer.chat_template", tmpl);
    free(tmpl);
    kv(&w, "tokenizer.ggml.tokens", ARR);
    u32(&w, STR);
    u64(&w, 30000);
    for (int i = 0; i < 30000; i++) {
        char tok[32];
        snprintf(tok, sizeof tok, "token-%d", i);
        str(&w, tok);
    }
    kv_str(&w, "general.architecture", "llama");
    kv_str(&w, "general.name", "big header");
    kv_u32(&w, "llama.block_count", 32);
    tensor(&w, "token_embd.weight", GT_F16, 1ull << 30, 2, (uint64_t[]){ 1ull << 14, 1ull << 15 });
    uint64_t data = w.data;
    w.data = 0;                                       /* write no data: make it sparse */
    uint64_t off = w_end(&w);

    char path[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, w.b, w.len), (ssize_t)w.len);
    assert_int_equal(ftruncate(fd, (off_t)(off + data)), 0);
    close(fd);

    int fds = count_fds();
    struct gguf_info g, m;
    char err[512] = "";
    if (gguf_read(path, &g, err, sizeof err))
        fail_msg("%s", err);
    assert_int_equal(count_fds(), fds);               /* closed its file */
    assert_string_equal(g.arch, "llama");
    assert_string_equal(g.name, "big header");
    assert_int_equal(g.n_layer, 32);
    assert_int_equal(g.tensor_bytes, 1ull << 30);
    assert_int_equal(g.data_offset, off);
    assert_int_equal(g.file_size, off + data);
    assert_true(g.bytes_read < off + 64 * 1024);      /* the header and at most one window more */

    /* the same bytes from memory read alike */
    w.len = (size_t)off;
    assert_int_equal(gguf_read_mem(w.b, w.len, &m, err, sizeof err), -1);   /* no data there */
    assert_non_null(strstr(err, "truncated file?"));
    gguf_info_free(&g);
    unlink(path);
    free(w.b);
}

static void unreadable_paths_name_the_file(void **state)
{
    (void)state;
    struct gguf_info g;
    char err[512];
    assert_int_equal(gguf_read("/nonexistent/m.gguf", &g, err, sizeof err), -1);
    assert_string_equal(err, "/nonexistent/m.gguf: No such file or directory");
    assert_int_equal(gguf_read("/tmp", &g, err, sizeof err), -1);
    assert_string_equal(err, "/tmp: not a regular file");

    char path[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "GGUF\3\0\0\0", 8), 8);
    close(fd);
    assert_int_equal(gguf_read(path, &g, err, sizeof err), -1);
    char want[256];
    snprintf(want, sizeof want, "%s: tensor count at byte 8 beyond the file end (8 bytes)", path);
    assert_string_equal(err, want);
    assert_int_equal(gguf_read(path, &g, NULL, 0), -1);   /* no message buffer: fine */
    char tiny[8];
    assert_int_equal(gguf_read(path, &g, tiny, sizeof tiny), -1);
    assert_int_equal(strlen(tiny), 7);                    /* truncated, terminated */
    unlink(path);
}

static const char *tiny_model_path(void)
{
    const char *env = getenv("LLAMA_POOL_TEST_MODEL");
    if (env)
        return env;
#ifdef SOURCE_ROOT
    return SOURCE_ROOT "/../shared/models/tiny-a.gguf";
#else
    return "../shared/models/tiny-a.gguf";
#endif
}

static void reads_the_shared_tiny_model(void **state)
{
    (void)state;
    const char *path = tiny_model_path();
    if (access(path, R_OK) != 0) {
        print_message("%s missing: skipped\n", path);
        skip();
    }
    struct gguf_info g;
    char err[512];
    if (gguf_read(path, &g, err, sizeof err))
        fail_msg("%s", err);
    print_message("%s: GGUF v%u arch=%s name=\"%s\" layers=%u embd=%u heads=%u kv_heads=%u "
                  "ctx=%" PRIu64 " tensors=%" PRIu64 " tensor_bytes=%" PRIu64 " data_offset=%" PRIu64
                  " file=%" PRIu64 " read=%" PRIu64 " kv_cache(4096)=%" PRIu64 "\n",
                  path, g.version, g.arch, g.name, g.n_layer, g.n_embd, g.n_head, g.n_head_kv_max,
                  g.n_ctx_train, g.n_tensors, g.tensor_bytes, g.data_offset, g.file_size,
                  g.bytes_read, gguf_kv_cache_bytes(&g, 4096));
    assert_true(g.arch[0]);
    assert_true(g.n_layer > 0);
    assert_true(g.tensor_bytes > 0);
    assert_true(g.data_offset + g.tensor_bytes <= g.file_size);
    assert_true(g.bytes_read < g.file_size || g.file_size < 2 * 64 * 1024);
    gguf_info_free(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(reads_model_keys_and_skips_every_value_type),
        cmocka_unit_test(version_2_reads_like_version_3),
        cmocka_unit_test(version_1_is_refused_clearly),
        cmocka_unit_test(empty_header_reads_with_no_architecture),
        cmocka_unit_test(head_count_kv_per_layer_array_is_kept),
        cmocka_unit_test(per_layer_head_count_is_the_head_count_kv_default),
        cmocka_unit_test(head_count_kv_defaults_to_head_count),
        cmocka_unit_test(per_layer_array_must_have_one_entry_per_layer),
        cmocka_unit_test(arch_keys_before_general_architecture_are_kept),
        cmocka_unit_test(arch_key_of_the_wrong_type_is_refused),
        cmocka_unit_test(duplicate_keys_are_refused),
        cmocka_unit_test(alignment_key_moves_the_data_offset),
        cmocka_unit_test(alignment_must_be_a_uint32_power_of_two),
        cmocka_unit_test(tensor_data_is_placed_by_layer),
        cmocka_unit_test(tensor_bytes_follow_each_ggml_type),
        cmocka_unit_test(name_is_cleaned_to_utf8_and_truncated),
        cmocka_unit_test(split_count_is_kept),
        cmocka_unit_test(kv_cache_bytes_match_the_formula),
        cmocka_unit_test(every_truncation_of_a_valid_file_fails_cleanly),
        cmocka_unit_test(wrong_magic_is_refused),
        cmocka_unit_test(bad_versions_are_refused),
        cmocka_unit_test(absurd_counts_are_refused),
        cmocka_unit_test(huge_string_length_is_refused_without_allocating),
        cmocka_unit_test(huge_arrays_are_refused),
        cmocka_unit_test(deeply_nested_arrays_are_refused),
        cmocka_unit_test(unknown_value_types_are_refused),
        cmocka_unit_test(unknown_tensor_types_are_refused),
        cmocka_unit_test(bad_dimensions_are_refused),
        cmocka_unit_test(tensor_data_beyond_the_file_end_is_refused),
        cmocka_unit_test(reads_a_big_header_and_never_the_tensor_data),
        cmocka_unit_test(unreadable_paths_name_the_file),
        cmocka_unit_test(reads_the_shared_tiny_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
