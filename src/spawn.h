/* spawn — start a child program safely.
 *
 * No shell: argv is exec'd directly. The child gets a new session (its own
 * process group, so the whole group can be signalled), PR_SET_PDEATHSIG so
 * it dies with the supervisor even after a SIGKILL (with the getppid() race
 * closed), stdin from /dev/null, stdout and stderr into the given pipe, every
 * other fd closed, default signal dispositions and an empty signal mask.
 * A failure after fork (joining the cgroup, setsid, exec) is reported
 * through a close-on-exec pipe: the parent reads the step and the child's
 * errno, or EOF when exec succeeded.
 *
 * Why the child joins its cgroup itself rather than clone3(CLONE_INTO_CGROUP):
 * glibc has no clone3 wrapper to fork with, a raw clone3 leaves glibc's
 * per-process state (its cached pid, atfork handlers) unmaintained, and
 * a write to cgroup.procs works on every cgroup v2 kernel and in the tests'
 * fake tree. The cost is a window of a few system calls, before exec, in
 * the daemon's cgroup. */
#ifndef LLAMA_POOL_SPAWN_H
#define LLAMA_POOL_SPAWN_H

#include <stddef.h>
#include <sys/types.h>

/* Start PATH with ARGV and ENVP; the child's stdout and stderr go to OUT_FD.
 * With CGROUP_FD >= 0 (a cgroup.procs open for writing, see cgroup.h), the
 * child first joins that cgroup by writing its pid there, before anything
 * else it does. Returns the pid, or -1 with ERR filled ("exec
 * /x/llama-server: No such file or directory"), or SPAWN_CGROUP_FAILED
 * (-2) with ERR filled ("joining its cgroup …") when the child could not
 * join its cgroup: exec was not tried, and another attempt may succeed. */
#define SPAWN_CGROUP_FAILED (-2)
pid_t spawn_child(const char *path, char *const argv[], char *const envp[],
                  int out_fd, int cgroup_fd, char *err, size_t errlen);
/* The same with IN_FD as its stdin (-1: /dev/null). */
pid_t spawn_child_in(const char *path, char *const argv[], char *const envp[],
                     int in_fd, int out_fd, int cgroup_fd, char *err, size_t errlen);

/* Find NAME like execvp would, in the supervisor's PATH. A NAME with a '/'
 * is taken as is. Returns a malloc'd path to an executable file, or NULL
 * (errno set). */
char *spawn_resolve(const char *name);

/* A clean environment for a child: from ours only PATH, HOME, USER, LOGNAME,
 * LANG, LANGUAGE, LC_*, TZ, TMPDIR, LD_LIBRARY_PATH and the accelerator
 * selectors (CUDA_*, HIP_*, ROCR_*, GGML_*, …); never
 * LLAMA_SERVER_ROUTER_PORT, and never our own LLAMA_API_KEY (a child's key
 * is the pool's choice, in EXTRA); then EXTRA ("NAME=VALUE" strings,
 * NULL-terminated or n entries), which override. Malloc'd, free with
 * util_strv_free. */
char **spawn_clean_env(char *const extra[], size_t nextra);

/* True if NAME=… from our environment may pass to a child. */
int spawn_env_allowed(const char *entry);

/* ---- the child's API key ----
 * Each child requires a key (llama-server's --api-key, which it also reads
 * from LLAMA_API_KEY) so that only the pool can talk to it. The key goes
 * through the environment, never argv: /proc/PID/cmdline is world-readable,
 * /proc/PID/environ only to the child's owner. */

#define SPAWN_KEY_BYTES 32                      /* from getrandom(2) */
#define SPAWN_KEY_LEN   (2 * SPAWN_KEY_BYTES)   /* hex digits */

/* Fill OUT (at least SPAWN_KEY_LEN + 1 bytes) with a fresh random key in
 * lowercase hex. Returns 0, or -1 with errno set (getrandom failed). */
int spawn_random_key(char *out, size_t outlen);

/* The first key of a llama.cpp key list ("k1,k2", as --api-key and
 * LLAMA_API_KEY take it: comma-separated, "double quotes" protect commas,
 * empty entries skipped) that can be sent in an HTTP header: no spaces or
 * control characters. Malloc'd, or NULL when there is none (errno EINVAL)
 * or on ENOMEM. */
char *spawn_first_key(const char *list);

#endif
