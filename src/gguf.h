/* gguf — read the header of a GGUF model file, never its tensor data.
 *
 * Reads magic, version (2 and 3; 1 is refused, as llama.cpp does), every
 * key/value pair (keeping the few a memory estimate needs, skipping the rest
 * by seeking), and every tensor info, to compute the size of the tensor data
 * and where it starts. Reads go through a buffered pread window, so only
 * header bytes are read, however large the file.
 *
 * A truncated, malformed or hostile file gives -1 and a message that says
 * what and where ("tensor 12 'blk.0.attn_q.weight': dimension overflow",
 * "kv 3 'general.name': string length 4294967295 beyond the file end"),
 * never a crash or an allocation beyond a small bound: counts are capped
 * (GGUF_MAX_KV, GGUF_MAX_TENSORS, GGUF_MAX_LAYERS), and every length is
 * checked against the bytes left in the file before it is used. Tensor
 * infos must follow llama.cpp's layout (each offset right after the previous
 * tensor, padded to the alignment) and their data must fit in the file, so
 * a truncated download is refused here rather than when llama-server loads.
 *
 * Model parameters come from "{general.architecture}.*" keys; a file
 * without general.architecture reads fine with them all 0. */
#ifndef LLAMA_POOL_GGUF_H
#define LLAMA_POOL_GGUF_H

#include <stddef.h>
#include <stdint.h>

#define GGUF_MAX_KV          1000000u
#define GGUF_MAX_TENSORS     1000000u
#define GGUF_MAX_LAYERS      65536u   /* block_count and per-layer arrays */
#define GGUF_MAX_DIMS        4u
#define GGUF_MAX_ARRAY_DEPTH 8u       /* arrays of arrays of ... */
#define GGUF_DEFAULT_ALIGNMENT 32u

struct gguf_info {
    unsigned version;            /* 2 or 3 */
    char arch[64];               /* general.architecture, "" when absent */
    char name[128];              /* general.name, valid UTF-8, truncated to fit; "" when absent */
    uint64_t n_tensors, n_kv;

    /* {arch}.* keys, 0 when absent */
    uint32_t n_layer;            /* block_count */
    uint32_t n_embd;             /* embedding_length */
    uint32_t n_head;             /* attention.head_count (layer 0's when per-layer) */
    uint32_t n_head_kv_max;      /* attention.head_count_kv; defaults to head_count as in llama.cpp */
    uint32_t *n_head_kv_layer;   /* n_layer entries when head_count_kv (or head_count) is
                                    a per-layer array, else NULL; owned, see gguf_info_free */
    uint32_t n_embd_head_k;      /* attention.key_length, 0 when absent (then n_embd / n_head) */
    uint32_t n_embd_head_v;      /* attention.value_length, 0 when absent (then n_embd / n_head) */
    uint64_t n_ctx_train;        /* context_length */

    uint32_t alignment;          /* general.alignment, default 32 */
    uint32_t split_count;        /* split.count: this file is one part of that many, 0 if not split */

    /* Where the data lies, by llama.cpp's placement of layers (padded bytes,
       this file only): "blk.N.*" by block, the input layer, the output layer. */
    uint64_t *layer_bytes;       /* n_layer entries ("blk.N.*", N < n_layer), NULL when
                                    n_layer is 0; owned, see gguf_info_free */
    uint64_t token_embd_bytes;   /* "token_embd.weight": the input layer, kept on the CPU */
    uint64_t output_bytes;       /* "output.*" and "output_norm.*": the output layer */
    int output_tied;             /* 1 when there is no "output.weight": llama.cpp then loads
                                    token_embd.weight a second time as the output */
    uint64_t n_vocab;            /* rows of output.weight, else of token_embd.weight; 0 if neither */

    uint64_t tensor_bytes;       /* sum of every tensor's bytes in this file */
    uint64_t data_size;          /* data section: each tensor padded to alignment (llama.cpp's size) */
    uint64_t data_offset;        /* where the data section starts */
    uint64_t file_size;
    uint64_t bytes_read;         /* bytes actually read from the file (header only) */
};

/* Read PATH's header into *out. 0 on success; -1 with "PATH: why" in err
 * (which may be NULL) and *out zeroed. The file is opened close-on-exec. */
int gguf_read(const char *path, struct gguf_info *out, char *err, size_t errlen);

/* The same from an open regular file (read with pread; the offset is not moved). */
int gguf_read_fd(int fd, struct gguf_info *out, char *err, size_t errlen);

/* The same from LEN bytes in memory, taken as the whole file (tests, fuzzing). */
int gguf_read_mem(const void *buf, size_t len, struct gguf_info *out, char *err, size_t errlen);

/* Frees what gguf_read* allocated; *info stays readable (no per-layer arrays). */
void gguf_info_free(struct gguf_info *info);

/* Bytes of an f16 K and V cache for n_ctx tokens:
 *   n_ctx × Σ over layers of n_head_kv(layer) × (head_dim_k + head_dim_v) × 2,
 * head_dim from attention.key_length/value_length, else n_embd / n_head —
 * that is 2 × n_layer × n_ctx × n_head_kv × (n_embd / n_head) × 2 for a plain
 * model. Per-layer head counts are used when present. Saturates at UINT64_MAX;
 * 0 when the header lacks what it needs. */
uint64_t gguf_kv_cache_bytes(const struct gguf_info *info, uint64_t n_ctx);

/* K and V elements per KV cell of layer IL: n_head_kv(IL) × head_dim_k and
 * n_head_kv(IL) × head_dim_v (0 when the header lacks what it needs). */
void gguf_kv_layer_elems(const struct gguf_info *info, uint32_t il, uint64_t *k, uint64_t *v);

/* ggml tensor type: its name ("Q4_K", also for removed ones), NULL when unknown. */
const char *gguf_ggml_type_name(uint32_t type);

/* ggml tensor type: elements per block and bytes per block; -1 when unknown
 * or removed from llama.cpp (Q4_2, Q4_0_4_4, ...). */
int gguf_ggml_type_size(uint32_t type, uint32_t *block_elems, uint32_t *block_bytes);

#endif
