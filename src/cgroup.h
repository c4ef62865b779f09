/* cgroup — a cgroup v2 of its own for each child, when ours is delegated.
 *
 * Under the daemon's own cgroup D (systemd's llama-pool.service with
 * Delegate=yes, or the cgroup a root daemon was started in):
 *
 *   D/                    memory (and pids) enabled in cgroup.subtree_control
 *   D/supervisor/         the daemon itself: cgroup v2 puts processes in
 *                         leaves only, once D hands controllers down
 *   D/<model>-<n>/        instance <model>#<n>: memory.max (and memory.swap.max 0
 *                         with a limit), memory.oom.group 1
 *
 * A child's directory is named after its instance (cgroup_child_name): it
 * is found again from the id alone. cgroup_tree_open() decides once, at
 * startup, whether this can be done, and says why not when it cannot
 * (cgroup v1 or a hybrid host, no memory controller, not writable, the
 * root cgroup, other processes beside us in D); the children then share
 * the daemon's cgroup and stops use the process group alone.
 *
 * A child joins its cgroup itself, after fork and before exec, by writing
 * its pid into an fd the parent opened (cgroup_child_prepare; spawn.h).
 * Stops stay SIGTERM to the process group; the final kill also writes
 * cgroup.kill, which reaches every process of the child, even one it forked
 * into another session. An exit by SIGKILL with memory.events oom_kill
 * higher than when the child started is an OOM kill, reported as "killed
 * by the OOM killer at N MiB" (memory.peak, else the highest memory.current
 * seen). memory.current is read beside PSS: it counts the page cache the
 * child brought in (the model's weights it touched first) and kernel
 * memory, which PSS does not.
 *
 * Tests point LLAMA_POOL_CGROUP_ROOT at a directory of plain files
 * standing in for D: the same writes happen, files are created as needed,
 * and cgroup.kill kills nothing there (the process group is signalled
 * too, always). */
#ifndef LLAMA_POOL_CGROUP_H
#define LLAMA_POOL_CGROUP_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CGROUP_LEAF "supervisor"      /* D/supervisor: the daemon's own leaf */
#define CGROUP_NAME_MAX 256           /* a directory name, NUL included */
#define CGROUP_ROOT_ENV "LLAMA_POOL_CGROUP_ROOT"

struct cgroup_tree {
    bool enabled;
    bool fake;                   /* LLAMA_POOL_CGROUP_ROOT: plain files (tests) */
    bool pids;                   /* the pids controller is enabled too */
    char dir[PATH_MAX];          /* D as a directory: /sys/fs/cgroup/system.slice/llama-pool.service */
    char path[PATH_MAX];         /* D as /proc/self/cgroup names it (the directory when fake) */
    char reason[512];            /* !enabled: why not */
};

/* One instance's cgroup, for one child at a time. */
struct cgroup_child {
    char name[CGROUP_NAME_MAX];  /* "tinyllama-1"; "" when the child has none */
    uint64_t limit;              /* memory.max written; 0: "max" */
    uint64_t oom_kills_before;   /* memory.events oom_kill when the child started */
    uint64_t current;            /* memory.current, last read; 0 before */
    uint64_t highest;            /* the highest memory.current read */
    bool oom_killed;             /* the last child's exit was an OOM kill */
    uint64_t oom_at;             /* bytes in use then (memory.peak, else highest) */
    bool lingering;              /* its directory is still there (rmdir: EBUSY) */
};

/* Decide whether children get cgroups: with FAKE_ROOT (tests; NULL or ""
 * for the real thing) that directory stands for D. Fills T; T->enabled
 * false with T->reason saying why. Moves the daemon into D/supervisor and
 * enables the controllers when it can. */
void cgroup_tree_open(struct cgroup_tree *t, const char *fake_root);

/* Prepare C for a child of instance MODEL#NO: create its directory (or
 * reuse one left over), write memory.max (LIMIT bytes, 0: max),
 * memory.swap.max (0 with a limit, else max; skipped where the kernel has
 * no swap accounting) and memory.oom.group, note memory.events oom_kill. Returns an fd open for
 * writing on its cgroup.procs, for spawn_child (close it after), or -1
 * with ERR filled. */
int cgroup_child_prepare(const struct cgroup_tree *t, struct cgroup_child *c, const char *model,
                         unsigned no, uint64_t limit, char *err, size_t errlen);

/* A child of a previous image of the daemon (an upgrade in place), of
 * instance MODEL#NO: C set from its cgroup as it is (its memory.max, its
 * oom_kill count so far). false, C's name "", when it has none. */
bool cgroup_child_adopt(const struct cgroup_tree *t, struct cgroup_child *c, const char *model, unsigned no);

/* Read memory.current into C->current (and C->highest); returns it, 0
 * when unreadable (the last value is kept). */
uint64_t cgroup_child_measure(const struct cgroup_tree *t, struct cgroup_child *c);

/* The child exited with wait STATUS: was it an OOM kill? Sets
 * C->oom_killed and C->oom_at; returns C->oom_killed. */
bool cgroup_child_exited(const struct cgroup_tree *t, struct cgroup_child *c, int status);

/* SIGKILL every process in C: cgroup.kill (Linux 5.14), else each pid of
 * cgroup.procs. 0, or -1 with ERR filled. */
int cgroup_child_kill(const struct cgroup_tree *t, const struct cgroup_child *c, char *err, size_t errlen);

/* Remove C's directory once the child is gone: 0 removed (or nothing to
 * remove; C->name is then ""), 1 still populated (try again later,
 * C->lingering set), -1 with ERR filled. A fake tree's directory, holding
 * plain files, stays for the test to read (0). */
int cgroup_child_remove(const struct cgroup_tree *t, struct cgroup_child *c, char *err, size_t errlen);

/* ---- pure parts, exposed for unit tests ---- */

/* PATH (as /proc/self/cgroup names it) and DIR (the same as a directory)
 * end in our leaf, CGROUP_LEAF: cut both back to its parent, D, and
 * return true. An upgrade in place re-execs the daemon already there. */
bool cgroup_strip_leaf(char *path, char *dir);

/* The cgroup v2 path ("0::PATH") in the text of /proc/self/cgroup. 0, or
 * -1 when there is none (cgroup v1 only). */
int cgroup_parse_self(const char *text, char *path, size_t len);

/* One line of /proc/self/mountinfo: its mount root, mount point (octal
 * escapes decoded), filesystem type and super options. 0, or -1 when the
 * line is malformed. */
struct cgroup_mount {
    char root[PATH_MAX];
    char point[PATH_MAX];
    char fstype[64];
    char options[512];
};
int cgroup_parse_mountinfo_line(const char *line, struct cgroup_mount *out);

/* Where cgroup v2 PATH is, from the text of /proc/self/mountinfo: the
 * cgroup2 mount point joined with PATH (less the mount's root). *V1_MEMORY
 * says whether a cgroup v1 hierarchy holds the memory controller (a hybrid
 * host). 0, or -1 when there is no cgroup2 mount that holds PATH. */
int cgroup_find_dir(const char *mountinfo, const char *path, char *dir, size_t len, bool *v1_memory);

/* Whether NAME is a word of a cgroup.controllers text ("cpu memory pids"). */
bool cgroup_has_controller(const char *controllers, const char *name);

/* The counters of a memory.events text; absent keys are 0. */
struct cgroup_memory_events {
    uint64_t low, high, max, oom, oom_kill, oom_group_kill;
};
void cgroup_parse_memory_events(const char *text, struct cgroup_memory_events *out);

/* memory.max for an instance charged CHARGE bytes: the charge plus a
 * margin of a tenth of it, CGROUP_MARGIN_MIN at least (allocator slack,
 * threads' stacks, the page cache of logs). 0 stays 0 (no limit). */
#define CGROUP_MARGIN_MIN (UINT64_C(256) << 20)
uint64_t cgroup_memory_limit(uint64_t charge);

/* The directory name of instance MODEL#NO: MODEL with every byte outside
 * [A-Za-z0-9_.-] (and a leading '.') written %XX, then "-NO":
 * "tinyllama-1", "my%20model-2". Distinct instances get distinct names.
 * 0, or -1 when it does not fit in LEN (or CGROUP_NAME_MAX). */
int cgroup_child_name(const char *model, unsigned no, char *out, size_t len);

#endif
