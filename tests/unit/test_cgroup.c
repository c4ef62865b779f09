/* cgroup: the pure parts (what /proc says, memory.events, the limit, the
 * names), then a fake tree in a temp dir: what the daemon writes there. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cgroup.h"
#include "spawn.h"

#define MIB (UINT64_C(1) << 20)

/* ---------- /proc/self/cgroup ---------- */

static void the_v2_line_gives_our_cgroup(void **state)
{
    (void)state;
    char path[256];
    assert_int_equal(cgroup_parse_self("0::/system.slice/llama-pool.service\n", path, sizeof path), 0);
    assert_string_equal(path, "/system.slice/llama-pool.service");
    /* A hybrid host: v1 lines first, the v2 line last. */
    const char *hybrid = "9:name=systemd:/\n4:memory:/process_api/aea6\n1:cpu:/\n0::/\n";
    assert_int_equal(cgroup_parse_self(hybrid, path, sizeof path), 0);
    assert_string_equal(path, "/");
}

static void no_v2_line_means_cgroup_v1_only(void **state)
{
    (void)state;
    char path[256];
    assert_int_equal(cgroup_parse_self("4:memory:/x\n1:cpu:/\n", path, sizeof path), -1);
    assert_int_equal(cgroup_parse_self("", path, sizeof path), -1);
    /* Too long for the buffer: refused, not cut. */
    char small[8];
    assert_int_equal(cgroup_parse_self("0::/system.slice/x.service\n", small, sizeof small), -1);
}

/* ---------- /proc/self/mountinfo ---------- */

static void a_mountinfo_line_is_split_into_its_fields(void **state)
{
    (void)state;
    struct cgroup_mount m;
    assert_int_equal(cgroup_parse_mountinfo_line(
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate", &m), 0);
    assert_string_equal(m.root, "/");
    assert_string_equal(m.point, "/sys/fs/cgroup/unified");
    assert_string_equal(m.fstype, "cgroup2");
    assert_string_equal(m.options, "rw,nsdelegate");
    /* Octal escapes: a space in a mount point is \040. */
    assert_int_equal(cgroup_parse_mountinfo_line(
        "50 31 0:40 /a /mnt/my\\040cgroups rw - cgroup2 none rw", &m), 0);
    assert_string_equal(m.point, "/mnt/my cgroups");
    assert_string_equal(m.root, "/a");
    assert_int_equal(cgroup_parse_mountinfo_line("41 31 0:38 / /x rw", &m), -1);   /* no " - " */
    assert_int_equal(cgroup_parse_mountinfo_line("", &m), -1);
}

static const char *const HYBRID =
    "23 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

static const char *const UNIFIED =
    "23 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
    "30 23 0:27 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";

static void the_cgroup2_mount_is_found_unified_or_hybrid(void **state)
{
    (void)state;
    char dir[512];
    bool v1_memory;
    assert_int_equal(cgroup_find_dir(UNIFIED, "/system.slice/llama-pool.service", dir, sizeof dir, &v1_memory), 0);
    assert_string_equal(dir, "/sys/fs/cgroup/system.slice/llama-pool.service");
    assert_false(v1_memory);
    assert_int_equal(cgroup_find_dir(HYBRID, "/system.slice/llama-pool.service", dir, sizeof dir, &v1_memory), 0);
    assert_string_equal(dir, "/sys/fs/cgroup/unified/system.slice/llama-pool.service");
    assert_true(v1_memory);
    /* The root cgroup is the mount point itself. */
    assert_int_equal(cgroup_find_dir(UNIFIED, "/", dir, sizeof dir, &v1_memory), 0);
    assert_string_equal(dir, "/sys/fs/cgroup");
}

static void a_mount_of_a_subtree_is_joined_below_its_root(void **state)
{
    (void)state;
    char dir[512];
    bool v1;
    const char *sub = "60 23 0:27 /system.slice /mnt/cg rw - cgroup2 cgroup2 rw\n";
    assert_int_equal(cgroup_find_dir(sub, "/system.slice/llama-pool.service", dir, sizeof dir, &v1), 0);
    assert_string_equal(dir, "/mnt/cg/llama-pool.service");
    /* Not below that root: no mount holds it. */
    assert_int_equal(cgroup_find_dir(sub, "/user.slice/x", dir, sizeof dir, &v1), -1);
    assert_int_equal(cgroup_find_dir(sub, "/system.slicex", dir, sizeof dir, &v1), -1);
    /* cgroup v1 only: none. */
    assert_int_equal(cgroup_find_dir(HYBRID + 0, "/x", dir, sizeof dir, &v1), 0);  /* unified is there */
    const char *v1only = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
    assert_int_equal(cgroup_find_dir(v1only, "/x", dir, sizeof dir, &v1), -1);
    assert_true(v1);
}

static void controllers_are_whole_words(void **state)
{
    (void)state;
    assert_true(cgroup_has_controller("cpuset cpu io memory hugetlb pids\n", "memory"));
    assert_true(cgroup_has_controller("cpuset cpu io memory hugetlb pids\n", "pids"));
    assert_false(cgroup_has_controller("hugetlb\n", "memory"));
    assert_false(cgroup_has_controller("memoryx", "memory"));
    assert_false(cgroup_has_controller("", "memory"));
}

/* ---------- memory.events ---------- */

static void memory_events_are_read_by_key(void **state)
{
    (void)state;
    struct cgroup_memory_events ev;
    cgroup_parse_memory_events("low 0\nhigh 3\nmax 17\noom 2\noom_kill 1\noom_group_kill 1\n", &ev);
    assert_int_equal(ev.high, 3);
    assert_int_equal(ev.max, 17);
    assert_int_equal(ev.oom, 2);
    assert_int_equal(ev.oom_kill, 1);
    assert_int_equal(ev.oom_group_kill, 1);
    /* Older kernels lack oom_group_kill; "oom" is not "oom_kill". */
    cgroup_parse_memory_events("oom 4\noom_kill 0\n", &ev);
    assert_int_equal(ev.oom, 4);
    assert_int_equal(ev.oom_kill, 0);
    assert_int_equal(ev.oom_group_kill, 0);
    /* A test writes just the one line, without a newline. */
    cgroup_parse_memory_events("oom_kill 1", &ev);
    assert_int_equal(ev.oom_kill, 1);
    cgroup_parse_memory_events("", &ev);
    assert_int_equal(ev.oom_kill, 0);
}

/* ---------- the limit ---------- */

static void the_limit_is_the_charge_plus_a_tenth_256_mib_at_least(void **state)
{
    (void)state;
    assert_int_equal(cgroup_memory_limit(0), 0);                         /* no charge: no limit */
    assert_int_equal(cgroup_memory_limit(100 * MIB), 356 * MIB);         /* the minimum margin */
    assert_int_equal(cgroup_memory_limit(2560 * MIB), 2816 * MIB);       /* a tenth = 256 MiB */
    assert_int_equal(cgroup_memory_limit(20480 * MIB), 22528 * MIB);     /* a tenth: 2 GiB */
    assert_int_equal(cgroup_memory_limit(UINT64_MAX - 1), UINT64_MAX);   /* no wrap */
}

/* ---------- names ---------- */

static void names_are_escaped_and_distinct(void **state)
{
    (void)state;
    char a[CGROUP_NAME_MAX], b[CGROUP_NAME_MAX];
    assert_int_equal(cgroup_child_name("tinyllama", 1, a, sizeof a), 0);
    assert_string_equal(a, "tinyllama-1");
    assert_int_equal(cgroup_child_name("qwen2.5-7b_q4", 12, a, sizeof a), 0);
    assert_string_equal(a, "qwen2.5-7b_q4-12");
    /* '/' would be a path, '%' the escape itself, a space and a byte
     * outside ASCII are written %XX; a leading '.' too (no hidden names,
     * no "." or ".."). */
    assert_int_equal(cgroup_child_name("a/b c%", 1, a, sizeof a), 0);
    assert_string_equal(a, "a%2Fb%20c%25-1");
    assert_int_equal(cgroup_child_name("..", 2, a, sizeof a), 0);
    assert_string_equal(a, "%2E.-2");
    assert_int_equal(cgroup_child_name("caf\xc3\xa9", 1, a, sizeof a), 0);
    assert_string_equal(a, "caf%C3%A9-1");
    /* "a b" and "a_b" would collide if spaces became '_'. */
    assert_int_equal(cgroup_child_name("a b", 1, a, sizeof a), 0);
    assert_int_equal(cgroup_child_name("a_b", 1, b, sizeof b), 0);
    assert_string_not_equal(a, b);
    /* "m-1"#1 and "m"#11 differ: the number is after the last '-'. */
    assert_int_equal(cgroup_child_name("m-1", 1, a, sizeof a), 0);
    assert_int_equal(cgroup_child_name("m", 11, b, sizeof b), 0);
    assert_string_not_equal(a, b);
}

static void a_name_too_long_is_refused(void **state)
{
    (void)state;
    char name[CGROUP_NAME_MAX], model[300];
    memset(model, 'x', 250);
    model[250] = '\0';
    assert_int_equal(cgroup_child_name(model, 1, name, sizeof name), 0);
    assert_int_equal(strlen(name), 252);
    memset(model, ' ', 100);          /* 300 bytes escaped */
    model[100] = '\0';
    assert_int_equal(cgroup_child_name(model, 1, name, sizeof name), -1);
    assert_int_equal(cgroup_child_name("tiny", 1, name, 6), -1);   /* "tiny-1" needs 7 */
}

/* ---------- a fake tree ---------- */

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static char *read_file(const char *dir, const char *name)
{
    static char buf[256];
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static void rm_tree(const char *dir)
{
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* Moves this test process into DIR/supervisor (a plain file there), as
 * the daemon does: harmless in a fake tree. */
static void a_fake_tree_gets_the_writes_a_real_one_would(void **state)
{
    (void)state;
    char tmpl[] = "/tmp/cgroup-test-XXXXXX";
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    write_file(dir, "cgroup.controllers", "cpu memory pids\n");

    struct cgroup_tree t;
    cgroup_tree_open(&t, dir);
    assert_true(t.enabled);
    assert_true(t.fake);
    assert_true(t.pids);
    char pid[32], sub[1100];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    assert_string_equal(read_file(dir, "supervisor/cgroup.procs"), pid);
    assert_string_equal(read_file(dir, "cgroup.subtree_control"), "+memory +pids");

    /* A child: its directory, memory.max, and its pid written by itself. */
    struct cgroup_child c = { 0 };
    char err[512];
    int fd = cgroup_child_prepare(&t, &c, "tiny", 1, 356 * MIB, err, sizeof err);
    assert_true(fd >= 0);
    assert_string_equal(c.name, "tiny-1");
    snprintf(sub, sizeof sub, "%s/tiny-1", dir);
    assert_string_equal(read_file(sub, "memory.max"), "373293056");
    assert_string_equal(read_file(sub, "memory.oom.group"), "1");
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    char *argv[] = { "/bin/sh", "-c", "exec sleep 30", NULL };
    char *envp[] = { NULL };
    pid_t child = spawn_child(argv[0], argv, envp, p[1], fd, err, sizeof err);
    close(fd);
    close(p[1]);
    assert_true(child > 0);
    snprintf(pid, sizeof pid, "%d", (int)child);
    assert_string_equal(read_file(sub, "cgroup.procs"), pid);

    /* An OOM kill, as the kernel would tell it. */
    write_file(sub, "memory.events", "oom 1\noom_kill 1\n");
    write_file(sub, "memory.peak", "400556032\n");
    assert_int_equal(cgroup_child_kill(&t, &c, err, sizeof err), 0);
    assert_string_equal(read_file(sub, "cgroup.kill"), "1");
    kill(child, SIGKILL);            /* a fake cgroup.kill kills nothing */
    int status;
    assert_int_equal(waitpid(child, &status, 0), child);
    close(p[0]);
    assert_true(cgroup_child_exited(&t, &c, status));
    assert_int_equal(c.oom_at, 400556032);

    /* The same exit read again is not a second OOM kill; a plain SIGKILL
     * or an exit is never one. */
    assert_false(cgroup_child_exited(&t, &c, status));
    write_file(sub, "memory.events", "oom_kill 2\n");
    assert_false(cgroup_child_exited(&t, &c, 0));

    /* A fake directory holds files: it stays, and is forgotten. */
    assert_int_equal(cgroup_child_remove(&t, &c, err, sizeof err), 0);
    assert_string_equal(c.name, "");
    rm_tree(dir);
}

static void a_fake_tree_without_memory_is_not_used(void **state)
{
    (void)state;
    char tmpl[] = "/tmp/cgroup-test-XXXXXX";
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    write_file(dir, "cgroup.controllers", "hugetlb\n");
    struct cgroup_tree t;
    cgroup_tree_open(&t, dir);
    assert_false(t.enabled);
    assert_non_null(strstr(t.reason, "has no memory in its cgroup.controllers"));
    rm_tree(dir);
}

static void a_failure_to_join_is_reported(void **state)
{
    (void)state;
    /* cgroup.procs open read-only: the child's write fails with EBADF. */
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int p[2];
    char err[256] = "";
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    char *argv[] = { "/bin/true", NULL };
    char *envp[] = { NULL };
    pid_t pid = spawn_child(argv[0], argv, envp, p[1], fd, err, sizeof err);
    assert_int_equal(pid, SPAWN_CGROUP_FAILED);     /* not exec's failure: worth a retry */
    assert_int_equal(errno, EBADF);
    assert_non_null(strstr(err, "joining its cgroup"));
    close(fd);
    close(p[0]);
    close(p[1]);
    while (waitpid(-1, NULL, 0) > 0) { }
}

static void a_daemon_already_in_its_leaf_takes_the_leafs_parent(void **state)
{
    (void)state;
    char path[64] = "/system.slice/llama-pool.service/supervisor";
    char dir[128] = "/sys/fs/cgroup/system.slice/llama-pool.service/supervisor";
    assert_true(cgroup_strip_leaf(path, dir));
    assert_string_equal(path, "/system.slice/llama-pool.service");
    assert_string_equal(dir, "/sys/fs/cgroup/system.slice/llama-pool.service");
    /* Not in a leaf: unchanged. */
    assert_false(cgroup_strip_leaf(path, dir));
    assert_string_equal(path, "/system.slice/llama-pool.service");
    /* A cgroup named "supervisor" at the top is not a leaf of ours. */
    char top[32] = "/supervisor", topdir[64] = "/sys/fs/cgroup/supervisor";
    assert_false(cgroup_strip_leaf(top, topdir));
    char other[64] = "/user.slice/supervisor2", otherdir[64] = "/sys/fs/cgroup/user.slice/supervisor2";
    assert_false(cgroup_strip_leaf(other, otherdir));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(the_v2_line_gives_our_cgroup),
        cmocka_unit_test(a_daemon_already_in_its_leaf_takes_the_leafs_parent),
        cmocka_unit_test(no_v2_line_means_cgroup_v1_only),
        cmocka_unit_test(a_mountinfo_line_is_split_into_its_fields),
        cmocka_unit_test(the_cgroup2_mount_is_found_unified_or_hybrid),
        cmocka_unit_test(a_mount_of_a_subtree_is_joined_below_its_root),
        cmocka_unit_test(controllers_are_whole_words),
        cmocka_unit_test(memory_events_are_read_by_key),
        cmocka_unit_test(the_limit_is_the_charge_plus_a_tenth_256_mib_at_least),
        cmocka_unit_test(names_are_escaped_and_distinct),
        cmocka_unit_test(a_name_too_long_is_refused),
        cmocka_unit_test(a_fake_tree_gets_the_writes_a_real_one_would),
        cmocka_unit_test(a_fake_tree_without_memory_is_not_used),
        cmocka_unit_test(a_failure_to_join_is_reported),
    };
    return cmocka_run_group_tests_name("cgroup", tests, NULL, NULL);
}
