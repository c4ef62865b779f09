/* libFuzzer target for the GGUF header reader (built and run by scripts/fuzz-gguf).
 *
 * Each input is read twice: from memory, and from a memfd through the
 * buffered pread reader (built with a tiny GGUF_READ_CHUNK so that window
 * refills happen on small inputs). Both must agree, a failure must carry a
 * message, and a success must satisfy the invariants below; anything else
 * aborts, which libFuzzer reports as a crash. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gguf.h"

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "fuzz_gguf: check failed: %s\n", #cond);         \
            abort();                                                         \
        }                                                                    \
    } while (0)

static void check_info(const struct gguf_info *g, size_t size)
{
    CHECK(g->version == 2 || g->version == 3);
    CHECK(memchr(g->arch, '\0', sizeof g->arch));
    CHECK(memchr(g->name, '\0', sizeof g->name));
    CHECK(g->file_size == size);
    CHECK(g->alignment && !(g->alignment & (g->alignment - 1)));
    CHECK(g->tensor_bytes <= g->data_size);
    CHECK(g->n_tensors <= GGUF_MAX_TENSORS && g->n_kv <= GGUF_MAX_KV);
    CHECK(g->n_layer <= GGUF_MAX_LAYERS);
    if (g->tensor_bytes)
        CHECK(g->data_offset + g->tensor_bytes <= size);
    if (g->n_head_kv_layer) {
        uint32_t max = 0;
        for (uint32_t l = 0; l < g->n_layer; l++)
            max = g->n_head_kv_layer[l] > max ? g->n_head_kv_layer[l] : max;
        CHECK(max == g->n_head_kv_max);
    }
    (void)gguf_kv_cache_bytes(g, 0);
    (void)gguf_kv_cache_bytes(g, 4096);
    (void)gguf_kv_cache_bytes(g, UINT64_MAX);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd = -1;
    struct gguf_info m, f;
    char err_m[256], err_f[256];

    int rc_m = gguf_read_mem(data, size, &m, err_m, sizeof err_m);
    CHECK(rc_m == 0 || rc_m == -1);
    if (rc_m)
        CHECK(err_m[0]);
    else
        check_info(&m, size);

    if (fd < 0)
        CHECK((fd = memfd_create("fuzz_gguf", MFD_CLOEXEC)) >= 0);
    CHECK(ftruncate(fd, 0) == 0);
    CHECK(size == 0 || pwrite(fd, data, size, 0) == (ssize_t)size);
    int rc_f = gguf_read_fd(fd, &f, err_f, sizeof err_f);
    CHECK(rc_f == rc_m);
    CHECK(!strcmp(err_f, err_m));
    if (rc_m == 0) {
        CHECK(f.bytes_read <= size);
        CHECK(!!f.n_head_kv_layer == !!m.n_head_kv_layer);
        if (m.n_head_kv_layer)
            CHECK(!memcmp(f.n_head_kv_layer, m.n_head_kv_layer, m.n_layer * sizeof *m.n_head_kv_layer));
        CHECK(!!f.layer_bytes == !!m.layer_bytes);
        if (m.layer_bytes)
            CHECK(!memcmp(f.layer_bytes, m.layer_bytes, m.n_layer * sizeof *m.layer_bytes));
        uint32_t *own = f.n_head_kv_layer;
        uint64_t *own_bytes = f.layer_bytes;
        f.bytes_read = m.bytes_read;
        f.n_head_kv_layer = m.n_head_kv_layer;
        f.layer_bytes = m.layer_bytes;
        CHECK(!memcmp(&f, &m, sizeof f));
        f.n_head_kv_layer = own;
        f.layer_bytes = own_bytes;
    }
    gguf_info_free(&m);
    gguf_info_free(&f);
    return 0;
}
