/* Spawning: exec failure reported through the pipe, no fd leaks, a new
 * process group, a clean environment. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "spawn.h"
#include "util.h"

/* Run ARGV with a pipe for output; return what it printed. */
static char *run(char *const argv[], char *const envp[], int *status)
{
    int p[2];
    char err[256];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    pid_t pid = spawn_child(argv[0], argv, envp, p[1], -1, err, sizeof err);
    close(p[1]);
    assert_true(pid > 0);
    static char out[65536];
    size_t len = 0;
    ssize_t r;
    while ((r = read(p[0], out + len, sizeof out - 1 - len)) > 0)
        len += (size_t)r;
    out[len] = '\0';
    close(p[0]);
    assert_int_equal(waitpid(pid, status, 0), pid);
    return out;
}

static void exec_failure_is_reported_with_errno(void **state)
{
    (void)state;
    char err[256] = "";
    char *argv[] = { "/nonexistent/llama-server", NULL };
    char *envp[] = { NULL };
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    pid_t pid = spawn_child(argv[0], argv, envp, p[1], -1, err, sizeof err);
    assert_int_equal(pid, -1);
    assert_int_equal(errno, ENOENT);
    assert_non_null(strstr(err, "exec /nonexistent/llama-server: No such file or directory"));
    close(p[0]);
    close(p[1]);
    while (waitpid(-1, NULL, 0) > 0) { }
}

static void child_gets_only_std_fds(void **state)
{
    (void)state;
    /* An fd without CLOEXEC in the parent must still not reach the child. */
    int leak = open("/dev/null", O_RDONLY);
    assert_true(leak > 2);
    char *argv[] = { "/bin/sh", "-c", "ls /proc/self/fd", NULL };
    char *envp[] = { "PATH=/bin:/usr/bin", NULL };
    int status;
    char *out = run(argv, envp, &status);
    close(leak);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* 0 1 2 and the fd ls itself opens to read the directory. */
    int n = 0;
    for (char *tok = strtok(out, "\n"); tok; tok = strtok(NULL, "\n"))
        n++;
    assert_int_equal(n, 4);
}

/* Fields of /proc/PID/stat after the command name (which may hold spaces
 * and parentheses, so parse from the last ')'): state, ppid, pgrp, session. */
static void stat_ids(const char *stat, int *pid, int *pgrp, int *sid)
{
    char state;
    int ppid;
    assert_int_equal(sscanf(stat, "%d", pid), 1);
    const char *rest = strrchr(stat, ')');
    assert_non_null(rest);
    assert_int_equal(sscanf(rest + 1, " %c %d %d %d", &state, &ppid, pgrp, sid), 4);
}

static void child_leads_its_own_session(void **state)
{
    (void)state;
    /* The child itself (cat, exec'd by spawn_child) reads its own stat. */
    char *argv[] = { "/bin/cat", "/proc/self/stat", NULL };
    char *envp[] = { "PATH=/bin:/usr/bin", NULL };
    int status;
    char *out = run(argv, envp, &status);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    int pid = 0, pgrp = -1, sid = -1;
    stat_ids(out, &pid, &pgrp, &sid);
    assert_true(pid > 0);
    assert_int_equal(sid, pid);
    assert_int_equal(pgrp, pid);
    assert_int_not_equal(sid, getsid(0));
}

static void clean_env_drops_router_port_and_strangers(void **state)
{
    (void)state;
    setenv("LLAMA_SERVER_ROUTER_PORT", "9999", 1);
    setenv("SECRET_TOKEN", "x", 1);
    setenv("CUDA_VISIBLE_DEVICES", "0", 1);
    setenv("LANG", "C.UTF-8", 1);
    char *extra[] = { "OMP_NUM_THREADS=4", "LANG=fr_FR.UTF-8", "LLAMA_SERVER_ROUTER_PORT=1", NULL };
    char **env = spawn_clean_env(extra, 3);
    assert_non_null(env);
    bool cuda = false, omp = false, lang_fr = false;
    for (char **e = env; *e; e++) {
        assert_null(strstr(*e, "LLAMA_SERVER_ROUTER_PORT"));
        assert_null(strstr(*e, "SECRET_TOKEN"));
        assert_string_not_equal(*e, "LANG=C.UTF-8");
        cuda |= strcmp(*e, "CUDA_VISIBLE_DEVICES=0") == 0;
        omp |= strcmp(*e, "OMP_NUM_THREADS=4") == 0;
        lang_fr |= strcmp(*e, "LANG=fr_FR.UTF-8") == 0;
    }
    assert_true(cuda && omp && lang_fr);
    util_strv_free(env);
}

static void resolve_finds_programs_in_path(void **state)
{
    (void)state;
    setenv("PATH", "/nonexistent:/bin:/usr/bin", 1);
    char *p = spawn_resolve("sh");
    assert_non_null(p);
    assert_int_equal(access(p, X_OK), 0);
    free(p);
    assert_null(spawn_resolve("no-such-program-llama-pool"));
    assert_int_equal(errno, ENOENT);
    p = spawn_resolve("/bin/sh");
    assert_string_equal(p, "/bin/sh");
    free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(exec_failure_is_reported_with_errno),
        cmocka_unit_test(child_gets_only_std_fds),
        cmocka_unit_test(child_leads_its_own_session),
        cmocka_unit_test(clean_env_drops_router_port_and_strangers),
        cmocka_unit_test(resolve_finds_programs_in_path),
    };
    return cmocka_run_group_tests_name("spawn", tests, NULL, NULL);
}
