/* Unit tests for gpu: NVML through dlopen, over the stand-in library
 * tests/nvml-standin.c (meson passes its path in NVML_STANDIN_LIBRARY),
 * and the budget arithmetic. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "gpu.h"

#define MIB (1ULL << 20)
#define H200_MIB 143771ULL

struct fx {
    char dir[64];        /* NVML_STANDIN_DIR */
    char lost[96];       /* NVML_STANDIN_LOST */
    const char *lib;
};

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    f->lib = getenv("NVML_STANDIN_LIBRARY");
    if (!f->lib) {
        fprintf(stderr, "NVML_STANDIN_LIBRARY is not set: run through meson test\n");
        free(f);
        return -1;
    }
    strcpy(f->dir, "/tmp/test_gpu.XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    snprintf(f->lost, sizeof f->lost, "%s.lost", f->dir);
    setenv("NVML_STANDIN_DIR", f->dir, 1);
    setenv("NVML_STANDIN_LOST", f->lost, 1);
    setenv("NVML_STANDIN_DEVICES", "NVIDIA H200:143771;NVIDIA H100 80GB HBM3:81559", 1);
    unsetenv("NVML_STANDIN_BASE_MB");
    unsetenv("NVML_STANDIN_FAIL");
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    remove(f->lost);
    free(f);
    return 0;
}

/* Writes the stand-in's file for PID: TEXT is "DEVICE BYTES" lines. */
static void write_use(struct fx *f, pid_t pid, const char *text)
{
    char path[128];
    snprintf(path, sizeof path, "%s/%d", f->dir, (int)pid);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    assert_int_equal(fclose(fp), 0);
}

static void remove_use(struct fx *f, pid_t pid)
{
    char path[128];
    snprintf(path, sizeof path, "%s/%d", f->dir, (int)pid);
    assert_int_equal(unlink(path), 0);
}

/* A child that waits until killed. */
static pid_t sleeper(void)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        for (;;)
            pause();
    }
    return pid;
}

static void reap(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

static struct gpus *open_ok(struct fx *f)
{
    char err[256] = "";
    struct gpus *g = gpus_open(f->lib, err, sizeof err);
    if (!g)
        print_message("gpus_open: %s\n", err);
    assert_non_null(g);
    return g;
}

/* gpus_open must fail with an error containing WANT. */
static void open_fails(const char *lib, const char *want)
{
    char err[256] = "";
    struct gpus *g = gpus_open(lib, err, sizeof err);
    assert_null(g);
    if (!strstr(err, want))
        print_message("error: %s\nwanted: %s\n", err, want);
    assert_non_null(strstr(err, want));
}

/* ------------------------------------------------------------------ */

static void test_devices(void **state)
{
    struct fx *f = *state;
    setenv("NVML_STANDIN_BASE_MB", "500;0", 1);
    struct gpus *g = open_ok(f);
    assert_int_equal(gpus_count(g), 2);
    assert_int_equal(gpus_usable(g), 2);

    const struct gpu_device *d0 = gpus_device(g, 0), *d1 = gpus_device(g, 1);
    assert_int_equal(d0->index, 0);
    assert_int_equal(d1->index, 1);
    assert_string_equal(d0->name, "NVIDIA H200");
    assert_string_equal(d1->name, "NVIDIA H100 80GB HBM3");
    assert_true(!strncmp(d0->uuid, "GPU-", 4));
    assert_string_not_equal(d0->uuid, d1->uuid);
    assert_int_equal(d0->total, H200_MIB * MIB);
    assert_int_equal(d0->used, 500 * MIB);
    assert_int_equal(d0->free, (H200_MIB - 500) * MIB);
    assert_int_equal(d1->total, 81559 * MIB);
    assert_int_equal(d1->used, 0);
    assert_int_equal(d1->free, d1->total);
    assert_false(d0->lost);
    assert_null(gpus_device(g, 2));
    gpus_close(g);
}

static void test_process_memory(void **state)
{
    struct fx *f = *state;
    pid_t child = sleeper();
    write_use(f, getpid(), "0 1000\n1 2000\n");
    write_use(f, child, "0 300\n");
    struct gpus *g = open_ok(f);

    uint64_t per[2] = { 9, 9 };
    assert_int_equal(gpus_process_memory(g, getpid(), per), 3000);
    assert_int_equal(per[0], 1000);
    assert_int_equal(per[1], 2000);
    assert_int_equal(gpus_process_memory(g, child, per), 300);
    assert_int_equal(per[0], 300);
    assert_int_equal(per[1], 0);
    assert_int_equal(gpus_process_memory(g, child, NULL), 300);
    assert_int_equal(gpus_process_memory(g, 999999999, per), 0);
    assert_int_equal(per[0] + per[1], 0);
    assert_int_equal(gpus_device(g, 0)->used, 1300);
    assert_int_equal(gpus_device(g, 1)->used, 2000);

    /* Nothing changes until the next refresh: one NVML pass per refresh. */
    write_use(f, child, "0 700\n");
    assert_int_equal(gpus_process_memory(g, child, NULL), 300);
    assert_int_equal(gpus_refresh(g), 0);
    assert_int_equal(gpus_process_memory(g, child, NULL), 700);
    assert_int_equal(gpus_device(g, 0)->used, 1700);

    /* A process that ended is gone from the lists, its file or not. */
    reap(child);
    gpus_refresh(g);
    assert_int_equal(gpus_process_memory(g, child, NULL), 0);
    assert_int_equal(gpus_device(g, 0)->used, 1000);
    remove_use(f, getpid());
    gpus_refresh(g);
    assert_int_equal(gpus_process_memory(g, getpid(), NULL), 0);
    assert_int_equal(gpus_device(g, 1)->free, gpus_device(g, 1)->total);
    gpus_close(g);
}

/* More processes than the first buffer holds: NVML's "insufficient size"
 * answer makes gpu.c grow it and ask again. */
static void test_many_processes(void **state)
{
    struct fx *f = *state;
    enum { N = 150 };
    pid_t kids[N];
    for (int i = 0; i < N; i++) {
        kids[i] = sleeper();
        char text[64];
        snprintf(text, sizeof text, "%d %d\n", i % 2, (i + 1) * 1024);
        write_use(f, kids[i], text);
    }
    struct gpus *g = open_ok(f);
    uint64_t sum[2] = { 0, 0 };
    for (int i = 0; i < N; i++) {
        uint64_t per[2];
        assert_int_equal(gpus_process_memory(g, kids[i], per), (uint64_t)(i + 1) * 1024);
        sum[0] += per[0];
        sum[1] += per[1];
    }
    assert_int_equal(gpus_device(g, 0)->used, sum[0]);
    assert_int_equal(gpus_device(g, 1)->used, sum[1]);
    gpus_close(g);
    for (int i = 0; i < N; i++)
        reap(kids[i]);
}

static void test_lost_device(void **state)
{
    struct fx *f = *state;
    write_use(f, getpid(), "0 1000\n1 2000\n");
    struct gpus *g = open_ok(f);
    assert_int_equal(gpus_process_memory(g, getpid(), NULL), 3000);

    FILE *fp = fopen(f->lost, "w");
    assert_non_null(fp);
    fputs("1\n", fp);
    fclose(fp);
    assert_int_equal(gpus_refresh(g), 1);
    const struct gpu_device *d1 = gpus_device(g, 1);
    assert_true(d1->lost);
    assert_int_equal(d1->free, 0);
    assert_string_equal(d1->lost_reason, "nvmlDeviceGetMemoryInfo: GPU is lost");
    assert_int_equal(gpus_usable(g), 1);
    assert_int_equal(gpus_count(g), 2);

    /* The other device goes on; the lost one is not asked again. */
    write_use(f, getpid(), "0 4000\n1 2000\n");
    assert_int_equal(gpus_refresh(g), 0);
    uint64_t per[2];
    assert_int_equal(gpus_process_memory(g, getpid(), per), 4000);
    assert_int_equal(per[1], 0);
    assert_false(gpus_device(g, 0)->lost);
    assert_int_equal(gpus_device(g, 0)->used, 4000);
    gpus_close(g);

    /* Lost from the start: device 0 only. Every device lost: no GPUs. */
    g = open_ok(f);
    assert_int_equal(gpus_usable(g), 1);
    assert_true(gpus_device(g, 1)->lost);
    assert_string_equal(gpus_device(g, 1)->name, "unknown");
    assert_string_equal(gpus_device(g, 1)->lost_reason, "nvmlDeviceGetHandleByIndex_v2: GPU is lost");
    assert_false(gpus_device(g, 0)->lost);
    gpus_close(g);
    fp = fopen(f->lost, "w");
    assert_non_null(fp);
    fputs("0 1\n", fp);
    fclose(fp);
    open_fails(f->lib, "sees 2 devices, and every one failed (device 0: nvmlDeviceGetHandleByIndex_v2: GPU is lost)");
}

static void test_no_library_no_device_no_driver(void **state)
{
    struct fx *f = *state;
    open_fails("/nonexistent/libnvidia-ml.so.1", "cannot load /nonexistent/libnvidia-ml.so.1: ");
    open_fails("libm.so.6", "libm.so.6 has no nvmlInit_v2: not a usable NVML");

    unsetenv("NVML_STANDIN_DEVICES");
    open_fails(f->lib, "sees no device");
    setenv("NVML_STANDIN_DEVICES", "", 1);
    open_fails(f->lib, "sees no device");

    setenv("NVML_STANDIN_DEVICES", "NVIDIA H200:143771", 1);
    setenv("NVML_STANDIN_FAIL", "init", 1);
    open_fails(f->lib, "nvmlInit_v2 failed: Driver Not Loaded");
    unsetenv("NVML_STANDIN_FAIL");

    /* NULL answers everywhere for "no GPUs". */
    assert_int_equal(gpus_count(NULL), 0);
    assert_int_equal(gpus_usable(NULL), 0);
    assert_null(gpus_device(NULL, 0));
    assert_int_equal(gpus_refresh(NULL), 0);
    assert_int_equal(gpus_process_memory(NULL, getpid(), NULL), 0);
    gpus_close(NULL);
}

/* A driver that cannot list processes still gives device memory. */
static void test_process_lists_not_supported(void **state)
{
    struct fx *f = *state;
    setenv("NVML_STANDIN_FAIL", "processes", 1);
    write_use(f, getpid(), "0 1000\n");
    struct gpus *g = open_ok(f);
    assert_int_equal(gpus_usable(g), 2);
    assert_int_equal(gpus_device(g, 0)->used, 1000);
    assert_int_equal(gpus_process_memory(g, getpid(), NULL), 0);
    assert_int_equal(gpus_refresh(g), 0);
    assert_false(gpus_device(g, 0)->lost);
    gpus_close(g);
}

/* The fake llama-server writes its use for the stand-in: -ngl 99 on
 * --device CUDA1 puts FAKE_VRAM_MB on NVML device 1 while it runs, and the
 * file goes at its exit. */
static void test_fake_server_reports_vram(void **state)
{
    struct fx *f = *state;
    const char *fake = getenv("FAKE_LLAMA_SERVER");
    assert_non_null(fake);
    char model[128];
    snprintf(model, sizeof model, "%s/m.gguf", f->dir);
    FILE *fp = fopen(model, "w");
    assert_non_null(fp);
    fputs("GGUF\x03", fp);
    fclose(fp);

    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("FAKE_VRAM_MB", "1234", 1);
        setenv("FAKE_LOAD_MS", "0", 1);
        char log[128];
        snprintf(log, sizeof log, "%s/log", getenv("NVML_STANDIN_DIR"));
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, STDERR_FILENO);
        execl(fake, fake, "-m", model, "--port", "0", "-ngl", "99", "--device", "CUDA1", (char *)NULL);
        _exit(127);
    }
    char path[128];
    snprintf(path, sizeof path, "%s/%d", f->dir, (int)pid);
    for (int i = 0; i < 500 && access(path, F_OK) != 0; i++)
        usleep(10000);
    assert_int_equal(access(path, F_OK), 0);

    /* The fake handles SIGTERM once loaded, as llama-server does: wait for that. */
    char logpath[128];
    snprintf(logpath, sizeof logpath, "%s/log", f->dir);
    bool ready = false;
    for (int i = 0; i < 500 && !ready; i++) {
        char buf[8192] = "";
        FILE *lf = fopen(logpath, "r");
        if (lf) {
            buf[fread(buf, 1, sizeof buf - 1, lf)] = '\0';
            fclose(lf);
        }
        ready = strstr(buf, "listening on") != NULL;
        if (!ready)
            usleep(10000);
    }
    assert_true(ready);

    struct gpus *g = open_ok(f);
    uint64_t per[2];
    assert_int_equal(gpus_process_memory(g, pid, per), 1234 * MIB);
    assert_int_equal(per[0], 0);
    assert_int_equal(per[1], 1234 * MIB);
    assert_int_equal(gpus_device(g, 1)->used, 1234 * MIB);

    kill(pid, SIGTERM);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_not_equal(access(path, F_OK), 0);            /* removed at exit */
    gpus_refresh(g);
    assert_int_equal(gpus_process_memory(g, pid, NULL), 0);
    assert_int_equal(gpus_device(g, 1)->free, gpus_device(g, 1)->total);
    gpus_close(g);
}

/* ------------------------------------------------------------------ */
/* Arithmetic                                                          */

static void test_budget(void **state)
{
    (void)state;
    const uint64_t total = H200_MIB * MIB;
    struct config c = { .gpu_budget_kind = CONFIG_BUDGET_AUTO, .gpu_reserve = 1ULL << 30 };
    assert_int_equal(gpu_budget(&c, total), total - (1ULL << 30));
    c.gpu_reserve = 0;
    assert_int_equal(gpu_budget(&c, total), total);
    c.gpu_reserve = total + 1;                      /* reserve larger than the device */
    assert_int_equal(gpu_budget(&c, total), 0);

    c.gpu_budget_kind = CONFIG_BUDGET_SIZE;         /* the reserve does not apply */
    c.gpu_budget_bytes = 40ULL << 30;
    assert_int_equal(gpu_budget(&c, total), 40ULL << 30);
    c.gpu_budget_bytes = total * 2;                 /* never more than the device */
    assert_int_equal(gpu_budget(&c, total), total);

    c.gpu_budget_kind = CONFIG_BUDGET_PERCENT;
    c.gpu_budget_percent = 100;
    assert_int_equal(gpu_budget(&c, total), total);
    c.gpu_budget_percent = 50;
    assert_int_equal(gpu_budget(&c, 1001), 500);
    assert_int_equal(gpu_budget(&c, total), total / 2);
    c.gpu_budget_percent = 90;
    assert_int_equal(gpu_budget(&c, UINT64_MAX), 16602069666338596453ULL);  /* exact, no overflow */
    assert_int_equal(gpu_budget(&c, 0), 0);
}

static void test_room(void **state)
{
    (void)state;
    assert_int_equal(gpu_room(100, 30, 1000), 70);   /* the budget binds */
    assert_int_equal(gpu_room(100, 30, 50), 50);     /* another program holds memory */
    assert_int_equal(gpu_room(100, 100, 50), 0);
    assert_int_equal(gpu_room(100, 150, 50), 0);     /* over-charged: no room, no wrap */
    assert_int_equal(gpu_room(100, 0, 0), 0);        /* a lost device reports no free memory */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(test_devices),
        T(test_process_memory),
        T(test_many_processes),
        T(test_lost_device),
        T(test_no_library_no_device_no_driver),
        T(test_process_lists_not_supported),
        T(test_fake_server_reports_vram),
        T(test_budget),
        T(test_room),
#undef T
    };
    return cmocka_run_group_tests_name("gpu", tests, NULL, NULL);
}
