#define _GNU_SOURCE
#include "spawn.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

extern char **environ;

/* What the child reports through the error pipe: the step that failed
 * and its errno. Nothing comes when exec succeeds. */
enum spawn_step { SPAWN_STEP_SETUP, SPAWN_STEP_CGROUP, SPAWN_STEP_EXEC };
struct spawn_failure {
    int step;
    int err;
};

/* After fork, before exec: only async-signal-safe calls from here on. */
static void child_fail(int errfd, enum spawn_step step, int err)
{
    struct spawn_failure f = { .step = step, .err = err };
    ssize_t r;
    do {
        r = write(errfd, &f, sizeof f);
    } while (r < 0 && errno == EINTR);
    _exit(127);
}

/* Join the cgroup whose cgroup.procs is open at FD: write our pid in
 * decimal (formatted by hand: no stdio after fork). */
static void child_join_cgroup(int fd, int errfd)
{
    char buf[24];
    size_t n = sizeof buf;
    unsigned long v = (unsigned long)getpid();
    do {
        buf[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    ssize_t r;
    do {
        r = write(fd, buf + n, sizeof buf - n);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        child_fail(errfd, SPAWN_STEP_CGROUP, errno);
    if ((size_t)r != sizeof buf - n)
        child_fail(errfd, SPAWN_STEP_CGROUP, EIO);
}

static void child_exec(const char *path, char *const argv[], char *const envp[],
                       int out_fd, int cgroup_fd, int null_fd, int errfd, pid_t parent)
{
    /* First, so that what the child does from here on is charged there. */
    if (cgroup_fd >= 0)
        child_join_cgroup(cgroup_fd, errfd);

    sigset_t all;
    sigemptyset(&all);
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP)
            continue;
        (void)signal(s, SIG_DFL);
    }
    sigprocmask(SIG_SETMASK, &all, NULL);

    if (setsid() < 0)
        child_fail(errfd, SPAWN_STEP_SETUP, errno);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
        child_fail(errfd, SPAWN_STEP_SETUP, errno);
    /* The supervisor may have died before prctl(): then we were already
     * reparented and no signal will ever come. */
    if (getppid() != parent)
        _exit(127);

    if (dup2(null_fd, STDIN_FILENO) < 0 || dup2(out_fd, STDOUT_FILENO) < 0 ||
        dup2(out_fd, STDERR_FILENO) < 0)
        child_fail(errfd, SPAWN_STEP_SETUP, errno);
    util_cloexec_all();    /* every fd above stderr, the error pipe included */
    execve(path, argv, envp);
    child_fail(errfd, SPAWN_STEP_EXEC, errno);
}

pid_t spawn_child(const char *path, char *const argv[], char *const envp[],
                  int out_fd, int cgroup_fd, char *err, size_t errlen)
{
    return spawn_child_in(path, argv, envp, -1, out_fd, cgroup_fd, err, errlen);
}

pid_t spawn_child_in(const char *path, char *const argv[], char *const envp[],
                     int in_fd, int out_fd, int cgroup_fd, char *err, size_t errlen)
{
    int errpipe[2];
    int null_fd = in_fd >= 0 ? fcntl(in_fd, F_DUPFD_CLOEXEC, 3) : open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null_fd < 0) {
        snprintf(err, errlen, "%s: %s", in_fd >= 0 ? "dup" : "open /dev/null", strerror(errno));
        return -1;
    }
    if (pipe2(errpipe, O_CLOEXEC) < 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        close(null_fd);
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        close(errpipe[0]);
        close(errpipe[1]);
        close(null_fd);
        return -1;
    }
    if (pid == 0) {
        close(errpipe[0]);
        child_exec(path, argv, envp, out_fd, cgroup_fd, null_fd, errpipe[1], parent);
    }
    close(errpipe[1]);
    close(null_fd);

    struct spawn_failure f;
    ssize_t r;
    do {
        r = read(errpipe[0], &f, sizeof f);
    } while (r < 0 && errno == EINTR);
    close(errpipe[0]);
    if (r == (ssize_t)sizeof f) {
        /* A step failed; the child has _exit(127)ed: libev's SIGCHLD
         * handling reaps it. */
        if (f.step == SPAWN_STEP_CGROUP)
            snprintf(err, errlen, "joining its cgroup (writing its pid to cgroup.procs): %s",
                     strerror(f.err));
        else if (f.step == SPAWN_STEP_SETUP)
            snprintf(err, errlen, "setting up the child of %s: %s", path, strerror(f.err));
        else
            snprintf(err, errlen, "exec %s: %s", path, strerror(f.err));
        errno = f.err;
        return f.step == SPAWN_STEP_CGROUP ? SPAWN_CGROUP_FAILED : -1;
    }
    return pid;
}

char *spawn_resolve(const char *name)
{
    if (!name || !*name) {
        errno = ENOENT;
        return NULL;
    }
    if (strchr(name, '/')) {
        if (access(name, X_OK) != 0)
            return NULL;
        return strdup(name);
    }
    const char *path = getenv("PATH");
    if (!path || !*path)
        path = "/usr/local/bin:/usr/bin:/bin";
    int last_errno = ENOENT;
    for (const char *p = path; ; ) {
        const char *colon = strchr(p, ':');
        size_t len = colon ? (size_t)(colon - p) : strlen(p);
        char buf[PATH_MAX];
        int n = snprintf(buf, sizeof buf, "%.*s/%s", (int)(len ? len : 1), len ? p : ".", name);
        if (n > 0 && (size_t)n < sizeof buf) {
            struct stat st;
            if (stat(buf, &st) == 0 && S_ISREG(st.st_mode)) {
                if (access(buf, X_OK) == 0)
                    return strdup(buf);
                last_errno = EACCES;
            }
        }
        if (!colon)
            break;
        p = colon + 1;
    }
    errno = last_errno;
    return NULL;
}

int spawn_env_allowed(const char *entry)
{
    static const char *const exact[] = {
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
        "LD_LIBRARY_PATH", NULL,
    };
    static const char *const prefix[] = {
        "LC_", "CUDA_", "HIP_", "ROCR_", "HSA_", "GGML_", "ONEAPI_", "ZE_",
        "VK_", "OMP_", "OPENBLAS_", NULL,
    };
    /* Names that would change what a child is, whatever lists above say:
     * a router child, or a key not of the pool's choosing. */
    static const char *const never[] = {
        "LLAMA_SERVER_ROUTER_PORT", "LLAMA_API_KEY", "LLAMA_ARG_API_KEY_FILE", NULL,
    };
    const char *eq = strchr(entry, '=');
    if (!eq)
        return 0;
    size_t len = (size_t)(eq - entry);
    for (size_t i = 0; never[i]; i++)
        if (strlen(never[i]) == len && memcmp(entry, never[i], len) == 0)
            return 0;
    for (size_t i = 0; exact[i]; i++)
        if (strlen(exact[i]) == len && memcmp(entry, exact[i], len) == 0)
            return 1;
    for (size_t i = 0; prefix[i]; i++)
        if (strncmp(entry, prefix[i], strlen(prefix[i])) == 0)
            return 1;
    return 0;
}

static int env_same_name(const char *a, const char *b)
{
    const char *ea = strchr(a, '='), *eb = strchr(b, '=');
    size_t la = ea ? (size_t)(ea - a) : strlen(a);
    size_t lb = eb ? (size_t)(eb - b) : strlen(b);
    return la == lb && memcmp(a, b, la) == 0;
}

char **spawn_clean_env(char *const extra[], size_t nextra)
{
    size_t n = 0;
    for (char **e = environ; e && *e; e++)
        n++;
    char **env = calloc(n + nextra + 1, sizeof *env);
    if (!env)
        return NULL;
    size_t k = 0;
    for (char **e = environ; e && *e; e++) {
        if (!spawn_env_allowed(*e))
            continue;
        int overridden = 0;
        for (size_t i = 0; i < nextra && !overridden; i++)
            overridden = env_same_name(*e, extra[i]);
        if (overridden)
            continue;
        if (!(env[k++] = strdup(*e)))
            goto fail;
    }
    for (size_t i = 0; i < nextra; i++) {
        if (strncmp(extra[i], "LLAMA_SERVER_ROUTER_PORT=", 25) == 0)
            continue;
        if (!(env[k++] = strdup(extra[i])))
            goto fail;
    }
    env[k] = NULL;
    return env;
fail:
    util_strv_free(env);
    return NULL;
}

/* ---------- the child's API key ---------- */

int spawn_random_key(char *out, size_t outlen)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char raw[SPAWN_KEY_BYTES];
    size_t got = 0;

    if (outlen < SPAWN_KEY_LEN + 1) {
        errno = EINVAL;
        return -1;
    }
    while (got < sizeof raw) {
        ssize_t r = getrandom(raw + got, sizeof raw - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)r;
    }
    for (size_t i = 0; i < sizeof raw; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 0xf];
    }
    out[SPAWN_KEY_LEN] = '\0';
    return 0;
}

/* Bytes a key may hold to travel as "Authorization: Bearer KEY". */
static bool key_sendable(const char *k)
{
    if (!*k)
        return false;
    for (; *k; k++)
        if ((unsigned char)*k <= 0x20 || *k == 0x7f)
            return false;
    return true;
}

/* Next field of a list as llama.cpp's parse_csv_row splits it: a '"' that
 * opens a field quotes it (commas inside are kept, "" is one quote); a
 * '"' elsewhere is literal. The field goes to FIELD (room for strlen of
 * the rest); returns where the next field starts, or NULL at the end. */
static const char *csv_field(const char *s, char *field)
{
    bool quoted = false;
    size_t n = 0;
    for (; *s; s++) {
        if (*s == '"' && !quoted && n == 0) {
            quoted = true;
        } else if (*s == '"' && quoted) {
            if (s[1] == '"')
                field[n++] = *++s;
            else
                quoted = false;
        } else if (*s == ',' && !quoted) {
            field[n] = '\0';
            return s + 1;
        } else {
            field[n++] = *s;
        }
    }
    field[n] = '\0';
    return NULL;
}

char *spawn_first_key(const char *list)
{
    char *field = malloc(strlen(list) + 1);
    if (!field)
        return NULL;
    for (const char *s = list; s; ) {
        s = csv_field(s, field);
        if (key_sendable(field)) {
            char *key = strdup(field);
            free(field);
            return key;
        }
    }
    free(field);
    errno = EINVAL;
    return NULL;
}
