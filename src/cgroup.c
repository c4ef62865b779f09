#define _GNU_SOURCE
#include "cgroup.h"

#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---------- pure parts ---------- */

int cgroup_parse_self(const char *text, char *path, size_t len)
{
    for (const char *l = text; l && *l; ) {
        const char *nl = strchr(l, '\n');
        size_t n = nl ? (size_t)(nl - l) : strlen(l);
        if (n >= 3 && memcmp(l, "0::", 3) == 0) {
            if (n - 3 == 0 || n - 3 >= len)
                return -1;
            memcpy(path, l + 3, n - 3);
            path[n - 3] = '\0';
            return 0;
        }
        l = nl ? nl + 1 : NULL;
    }
    return -1;
}

/* Copy the next space-separated field of *S into OUT (LEN bytes),
 * decoding mountinfo's octal escapes (\040 is a space); advance *S. */
static int mountinfo_field(const char **s, char *out, size_t len)
{
    const char *p = *s;
    size_t n = 0;
    while (*p == ' ')
        p++;
    if (!*p || *p == '\n')
        return -1;
    for (; *p && *p != ' ' && *p != '\n'; p++) {
        char c = *p;
        if (c == '\\' && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' &&
            p[3] >= '0' && p[3] <= '7') {
            c = (char)((p[1] - '0') * 64 + (p[2] - '0') * 8 + (p[3] - '0'));
            p += 3;
        }
        if (n + 1 >= len)
            return -1;
        out[n++] = c;
    }
    out[n] = '\0';
    *s = p;
    return 0;
}

int cgroup_parse_mountinfo_line(const char *line, struct cgroup_mount *out)
{
    /* ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER */
    char skip[PATH_MAX];
    const char *s = line;
    for (int i = 0; i < 3; i++)
        if (mountinfo_field(&s, skip, sizeof skip) < 0)
            return -1;
    if (mountinfo_field(&s, out->root, sizeof out->root) < 0 ||
        mountinfo_field(&s, out->point, sizeof out->point) < 0 ||
        mountinfo_field(&s, skip, sizeof skip) < 0)
        return -1;
    for (;;) {
        if (mountinfo_field(&s, skip, sizeof skip) < 0)
            return -1;
        if (strcmp(skip, "-") == 0)
            break;
    }
    if (mountinfo_field(&s, out->fstype, sizeof out->fstype) < 0 ||
        mountinfo_field(&s, skip, sizeof skip) < 0)
        return -1;
    if (mountinfo_field(&s, out->options, sizeof out->options) < 0)
        out->options[0] = '\0';
    return 0;
}

/* Whether WORD is one of the comma-separated OPTIONS. */
static bool has_option(const char *options, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = options; p; ) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == n && memcmp(p, word, n) == 0)
            return true;
        p = comma ? comma + 1 : NULL;
    }
    return false;
}

int cgroup_find_dir(const char *mountinfo, const char *path, char *dir, size_t len, bool *v1_memory)
{
    int found = -1;
    *v1_memory = false;
    struct cgroup_mount *m = malloc(sizeof *m);
    if (!m)
        return -1;
    for (const char *l = mountinfo; l && *l; ) {
        const char *nl = strchr(l, '\n');
        if (cgroup_parse_mountinfo_line(l, m) == 0) {
            if (strcmp(m->fstype, "cgroup") == 0 && has_option(m->options, "memory"))
                *v1_memory = true;
            size_t rl = strlen(m->root);
            bool under = strcmp(m->root, "/") == 0 ||
                         (strncmp(path, m->root, rl) == 0 && (path[rl] == '/' || path[rl] == '\0'));
            if (found < 0 && strcmp(m->fstype, "cgroup2") == 0 && under) {
                const char *rest = strcmp(m->root, "/") == 0 ? path : path + rl;
                if (strcmp(rest, "/") == 0)
                    rest = "";
                int n = snprintf(dir, len, "%s%s", m->point, rest);
                if (n > 0 && (size_t)n < len)
                    found = 0;
            }
        }
        l = nl ? nl + 1 : NULL;
    }
    free(m);
    return found;
}

bool cgroup_strip_leaf(char *path, char *dir)
{
    char *tail = strrchr(path, '/'), *dtail = strrchr(dir, '/');
    if (!tail || !dtail || tail == path || strcmp(tail + 1, CGROUP_LEAF) != 0 ||
        strcmp(dtail + 1, CGROUP_LEAF) != 0)
        return false;
    *tail = '\0';
    *dtail = '\0';
    return true;
}

bool cgroup_has_controller(const char *controllers, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = controllers; *p; ) {
        while (*p && isspace((unsigned char)*p))
            p++;
        size_t len = 0;
        while (p[len] && !isspace((unsigned char)p[len]))
            len++;
        if (len == n && memcmp(p, name, n) == 0)
            return true;
        p += len;
    }
    return false;
}

void cgroup_parse_memory_events(const char *text, struct cgroup_memory_events *out)
{
    static const struct { const char *key; size_t off; } keys[] = {
        { "low", offsetof(struct cgroup_memory_events, low) },
        { "high", offsetof(struct cgroup_memory_events, high) },
        { "max", offsetof(struct cgroup_memory_events, max) },
        { "oom", offsetof(struct cgroup_memory_events, oom) },
        { "oom_kill", offsetof(struct cgroup_memory_events, oom_kill) },
        { "oom_group_kill", offsetof(struct cgroup_memory_events, oom_group_kill) },
    };
    memset(out, 0, sizeof *out);
    for (const char *l = text; l && *l; ) {
        const char *nl = strchr(l, '\n');
        const char *sp = strchr(l, ' ');
        if (sp && (!nl || sp < nl)) {
            size_t klen = (size_t)(sp - l);
            for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
                if (strlen(keys[i].key) != klen || memcmp(l, keys[i].key, klen) != 0)
                    continue;
                char *end;
                errno = 0;
                unsigned long long v = strtoull(sp + 1, &end, 10);
                if (end != sp + 1 && errno == 0)
                    *(uint64_t *)((char *)out + keys[i].off) = (uint64_t)v;
            }
        }
        l = nl ? nl + 1 : NULL;
    }
}

uint64_t cgroup_memory_limit(uint64_t charge)
{
    if (charge == 0)
        return 0;
    uint64_t margin = charge / 10;
    if (margin < CGROUP_MARGIN_MIN)
        margin = CGROUP_MARGIN_MIN;
    return charge > UINT64_MAX - margin ? UINT64_MAX : charge + margin;
}

int cgroup_child_name(const char *model, unsigned no, char *out, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    char buf[CGROUP_NAME_MAX];
    size_t n = 0;
    if (len > sizeof buf)
        len = sizeof buf;
    for (const unsigned char *p = (const unsigned char *)model; *p; p++) {
        bool plain = isalnum(*p) || *p == '_' || *p == '-' || (*p == '.' && p != (const unsigned char *)model);
        if (!isascii(*p))
            plain = false;
        if (n + 3 >= sizeof buf)
            return -1;
        if (plain) {
            buf[n++] = (char)*p;
        } else {
            buf[n++] = '%';
            buf[n++] = hex[*p >> 4];
            buf[n++] = hex[*p & 15];
        }
    }
    int w = snprintf(buf + n, sizeof buf - n, "-%u", no);
    if (w < 0 || (size_t)w >= sizeof buf - n || n + (size_t)w >= len)
        return -1;
    memcpy(out, buf, n + (size_t)w + 1);
    return 0;
}

/* ---------- files ---------- */

/* A small file into BUF (NUL-terminated). Bytes read, or -1. */
static ssize_t read_text(const char *path, char *buf, size_t len)
{
    return util_read_file(path, buf, len);
}

/* Open a cgroup file for writing: created, and emptied, in a fake tree
 * (on cgroupfs every file exists, and a write is one command). */
static int open_for_write(const struct cgroup_tree *t, const char *path)
{
    return open(path, O_WRONLY | O_CLOEXEC | (t->fake ? O_CREAT | O_TRUNC : 0), 0644);
}

/* Write TEXT to PATH in one write(2), as cgroupfs wants. 0, or -1 with
 * errno set. */
static int write_text(const struct cgroup_tree *t, const char *path, const char *text)
{
    int fd = open_for_write(t, path);
    if (fd < 0)
        return -1;
    size_t len = strlen(text);
    ssize_t w;
    do {
        w = write(fd, text, len);
    } while (w < 0 && errno == EINTR);
    int e = errno;
    if (close(fd) < 0 && w >= 0) {
        e = errno;
        w = -1;
    }
    errno = e;
    if (w >= 0 && (size_t)w != len) {
        errno = EIO;
        return -1;
    }
    return w < 0 ? -1 : 0;
}

/* PATH/NAME into OUT; false (ENAMETOOLONG) when it does not fit. */
static bool join(char *out, size_t len, const char *path, const char *name)
{
    int n = snprintf(out, len, "%s/%s", path, name);
    if (n < 0 || (size_t)n >= len) {
        errno = ENAMETOOLONG;
        return false;
    }
    return true;
}

/* A file of instance C's directory, or of D when C is NULL. */
static bool child_file(const struct cgroup_tree *t, const struct cgroup_child *c, const char *file,
                       char *out, size_t len)
{
    char dir[PATH_MAX];
    if (!c)
        return join(out, len, t->dir, file);
    return join(dir, sizeof dir, t->dir, c->name) && join(out, len, dir, file);
}

static uint64_t read_number(const struct cgroup_tree *t, const struct cgroup_child *c, const char *file)
{
    char path[PATH_MAX], buf[64];
    if (!child_file(t, c, file, path, sizeof path) || read_text(path, buf, sizeof buf) <= 0)
        return 0;
    return strtoull(buf, NULL, 10);
}

static int read_events(const struct cgroup_tree *t, const struct cgroup_child *c,
                       struct cgroup_memory_events *ev)
{
    char path[PATH_MAX], buf[512];
    memset(ev, 0, sizeof *ev);
    if (!child_file(t, c, "memory.events", path, sizeof path))
        return -1;
    ssize_t n = read_text(path, buf, sizeof buf);
    if (n < 0)
        return -1;
    cgroup_parse_memory_events(buf, ev);
    return 0;
}

/* ---------- the daemon's cgroup ---------- */

static void not_used(struct cgroup_tree *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void not_used(struct cgroup_tree *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->reason, sizeof t->reason, fmt, ap);
    va_end(ap);
    t->enabled = false;
}

/* Find D from /proc (not for a fake tree). 0, or -1 with the reason set. */
static int tree_locate(struct cgroup_tree *t)
{
    char self[4096];
    if (read_text("/proc/self/cgroup", self, sizeof self) < 0) {
        not_used(t, "cannot read /proc/self/cgroup: %s", strerror(errno));
        return -1;
    }
    if (cgroup_parse_self(self, t->path, sizeof t->path) < 0) {
        not_used(t, "no cgroup v2 (/proc/self/cgroup has no 0:: line): cgroup v1 only");
        return -1;
    }
    size_t cap = 1 << 20;
    char *mi = malloc(cap);
    if (!mi) {
        not_used(t, "out of memory reading /proc/self/mountinfo");
        return -1;
    }
    bool v1_memory = false;
    int rc = -1;
    if (read_text("/proc/self/mountinfo", mi, cap) < 0)
        not_used(t, "cannot read /proc/self/mountinfo: %s", strerror(errno));
    else if (cgroup_find_dir(mi, t->path, t->dir, sizeof t->dir, &v1_memory) < 0)
        not_used(t, "no cgroup2 mount holds %s", t->path);
    else
        rc = 0;
    /* Already in our leaf (an upgrade in place re-execs us there; systemd's
     * DelegateSubgroup= puts us there too): D is its parent. */
    if (rc == 0)
        (void)cgroup_strip_leaf(t->path, t->dir);
    free(mi);
    if (rc < 0)
        return -1;

    char ctl[512], path[PATH_MAX];
    if (!join(path, sizeof path, t->dir, "cgroup.controllers") || read_text(path, ctl, sizeof ctl) < 0) {
        not_used(t, "cannot read %s/cgroup.controllers: %s", t->dir, strerror(errno));
        return -1;
    }
    ctl[strcspn(ctl, "\n")] = '\0';
    if (!cgroup_has_controller(ctl, "memory")) {
        not_used(t, "cgroup v2 has no memory controller in %s (cgroup.controllers: \"%s\")%s", t->dir, ctl,
                 v1_memory ? "; memory is on cgroup v1 here (a hybrid layout)" : "");
        return -1;
    }
    /* Every cgroup but the root has cgroup.type; "/" alone does not tell
     * (in a cgroup namespace, ProtectControlGroups=private, our own
     * cgroup is "/"). */
    if (!join(path, sizeof path, t->dir, "cgroup.type") || access(path, F_OK) < 0) {
        not_used(t, "llama-pool runs in the root cgroup (%s): give it one of its own "
                 "(systemd: Delegate=yes)", t->dir);
        return -1;
    }
    return 0;
}

void cgroup_tree_open(struct cgroup_tree *t, const char *fake_root)
{
    memset(t, 0, sizeof *t);
    char path[PATH_MAX], ctl[512] = "";
    if (fake_root && *fake_root) {
        t->fake = true;
        snprintf(t->dir, sizeof t->dir, "%s", fake_root);
        snprintf(t->path, sizeof t->path, "%s", fake_root);
        if (join(path, sizeof path, t->dir, "cgroup.controllers"))
            (void)read_text(path, ctl, sizeof ctl);
        if (!cgroup_has_controller(ctl, "memory")) {
            not_used(t, "%s=%s has no memory in its cgroup.controllers", CGROUP_ROOT_ENV, fake_root);
            return;
        }
    } else {
        if (tree_locate(t) < 0)
            return;
        if (!join(path, sizeof path, t->dir, "cgroup.controllers") || read_text(path, ctl, sizeof ctl) < 0)
            ctl[0] = '\0';
    }
    t->pids = cgroup_has_controller(ctl, "pids");

    /* Delegated: D and its cgroup.procs and cgroup.subtree_control are ours. */
    char procs[PATH_MAX], subtree[PATH_MAX];
    if (!join(procs, sizeof procs, t->dir, "cgroup.procs") ||
        !join(subtree, sizeof subtree, t->dir, "cgroup.subtree_control")) {
        not_used(t, "%s: path too long", t->dir);
        return;
    }
    if (!t->fake && (access(t->dir, W_OK) < 0 || access(procs, W_OK) < 0 || access(subtree, W_OK) < 0)) {
        not_used(t, "not delegated (%s is not writable: %s)", t->dir, strerror(errno));
        return;
    }

    /* Into the leaf first: controllers are handed down only by a cgroup
     * with no process of its own. */
    char leaf[PATH_MAX], leaf_procs[PATH_MAX], pid[32];
    bool made = false;
    if (!join(leaf, sizeof leaf, t->dir, CGROUP_LEAF) || !join(leaf_procs, sizeof leaf_procs, leaf, "cgroup.procs")) {
        not_used(t, "%s: path too long", t->dir);
        return;
    }
    if (mkdir(leaf, 0755) == 0)
        made = true;
    else if (errno != EEXIST) {
        not_used(t, "cannot create %s: %s", leaf, strerror(errno));
        return;
    }
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    if (write_text(t, leaf_procs, pid) < 0) {
        not_used(t, "cannot move llama-pool into %s: %s", leaf, strerror(errno));
        if (made)
            (void)rmdir(leaf);
        return;
    }
    char enable[32];
    snprintf(enable, sizeof enable, "+memory%s", t->pids ? " +pids" : "");
    if (write_text(t, subtree, enable) < 0) {
        int e = errno;
        (void)write_text(t, procs, pid);            /* back where we were */
        if (made)
            (void)rmdir(leaf);
        if (e == EBUSY)
            not_used(t, "cannot enable memory for children in %s: other processes run in it "
                     "(llama-pool needs a cgroup of its own: systemd Delegate=yes)", t->dir);
        else
            not_used(t, "cannot enable memory for children in %s: %s", subtree, strerror(e));
        return;
    }
    t->enabled = true;
}

/* ---------- a child's cgroup ---------- */

int cgroup_child_prepare(const struct cgroup_tree *t, struct cgroup_child *c, const char *model,
                         unsigned no, uint64_t limit, char *err, size_t errlen)
{
    char dir[PATH_MAX], path[PATH_MAX], num[32];
    if (cgroup_child_name(model, no, c->name, sizeof c->name) < 0) {
        snprintf(err, errlen, "cgroup name for %s#%u is too long", model, no);
        c->name[0] = '\0';
        return -1;
    }
    if (!join(dir, sizeof dir, t->dir, c->name)) {
        snprintf(err, errlen, "cgroup %s/%s: path too long", t->dir, c->name);
        return -1;
    }
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
        snprintf(err, errlen, "cannot create cgroup %s: %s", dir, strerror(errno));
        return -1;
    }
    c->lingering = false;
    c->limit = limit;
    c->current = c->highest = 0;
    c->oom_killed = false;
    c->oom_at = 0;
    if (limit)
        snprintf(num, sizeof num, "%" PRIu64, limit);
    else
        snprintf(num, sizeof num, "max");
    if (!child_file(t, c, "memory.max", path, sizeof path) || write_text(t, path, num) < 0) {
        snprintf(err, errlen, "cannot set %s/memory.max to %s: %s", dir, num, strerror(errno));
        return -1;
    }
    /* A hard limit is on memory, not memory and swap: a child past it
     * would swap instead of being stopped. No file without swap
     * accounting: nothing to forbid then. */
    if (child_file(t, c, "memory.swap.max", path, sizeof path) &&
        write_text(t, path, limit ? "0" : "max") < 0 && errno != ENOENT) {
        snprintf(err, errlen, "cannot set %s/memory.swap.max: %s", dir, strerror(errno));
        return -1;
    }
    /* An OOM kill takes the whole instance, not one of its processes. */
    if (child_file(t, c, "memory.oom.group", path, sizeof path) && write_text(t, path, "1") < 0 &&
        errno != ENOENT) {
        snprintf(err, errlen, "cannot set %s/memory.oom.group: %s", dir, strerror(errno));
        return -1;
    }
    struct cgroup_memory_events ev;
    (void)read_events(t, c, &ev);           /* a fresh directory: zeros */
    c->oom_kills_before = ev.oom_kill;
    if (!child_file(t, c, "cgroup.procs", path, sizeof path)) {
        snprintf(err, errlen, "cgroup %s: path too long", dir);
        return -1;
    }
    int fd = open_for_write(t, path);
    if (fd < 0)
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
    return fd;
}

bool cgroup_child_adopt(const struct cgroup_tree *t, struct cgroup_child *c, const char *model, unsigned no)
{
    char dir[PATH_MAX];
    struct stat st;
    memset(c, 0, sizeof *c);
    if (cgroup_child_name(model, no, c->name, sizeof c->name) < 0 || !join(dir, sizeof dir, t->dir, c->name) ||
        stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        c->name[0] = '\0';
        return false;
    }
    c->limit = read_number(t, c, "memory.max");     /* "max": 0, none */
    struct cgroup_memory_events ev;
    if (read_events(t, c, &ev) == 0)
        c->oom_kills_before = ev.oom_kill;
    return true;
}

uint64_t cgroup_child_measure(const struct cgroup_tree *t, struct cgroup_child *c)
{
    if (!c->name[0])
        return 0;
    uint64_t cur = read_number(t, c, "memory.current");
    if (cur) {
        c->current = cur;
        if (cur > c->highest)
            c->highest = cur;
    }
    return cur;
}

bool cgroup_child_exited(const struct cgroup_tree *t, struct cgroup_child *c, int status)
{
    c->oom_killed = false;
    if (!c->name[0] || !WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
        return false;
    struct cgroup_memory_events ev;
    if (read_events(t, c, &ev) < 0 || ev.oom_kill <= c->oom_kills_before)
        return false;
    c->oom_kills_before = ev.oom_kill;
    c->oom_killed = true;
    (void)cgroup_child_measure(t, c);
    uint64_t peak = read_number(t, c, "memory.peak");
    c->oom_at = peak ? peak : c->highest;
    return true;
}

int cgroup_child_kill(const struct cgroup_tree *t, const struct cgroup_child *c, char *err, size_t errlen)
{
    char path[PATH_MAX];
    if (!c->name[0])
        return 0;
    if (!child_file(t, c, "cgroup.kill", path, sizeof path)) {
        snprintf(err, errlen, "cgroup %s: path too long", c->name);
        return -1;
    }
    if (write_text(t, path, "1") == 0)
        return 0;
    if (errno != ENOENT) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    /* No cgroup.kill before Linux 5.14: each process it lists. */
    char procs[8192];
    if (!child_file(t, c, "cgroup.procs", path, sizeof path) || read_text(path, procs, sizeof procs) < 0) {
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        return -1;
    }
    for (char *p = procs, *end; *p; p = end) {
        long pid = strtol(p, &end, 10);
        if (end == p)
            break;
        if (pid > 1)
            (void)kill((pid_t)pid, SIGKILL);
    }
    return 0;
}

int cgroup_child_remove(const struct cgroup_tree *t, struct cgroup_child *c, char *err, size_t errlen)
{
    char dir[PATH_MAX];
    if (!c->name[0])
        return 0;
    if (!join(dir, sizeof dir, t->dir, c->name)) {
        snprintf(err, errlen, "cgroup %s: path too long", c->name);
        return -1;
    }
    if (rmdir(dir) == 0 || errno == ENOENT || (t->fake && errno == ENOTEMPTY)) {
        c->lingering = false;
        c->name[0] = '\0';
        return 0;
    }
    if (errno == EBUSY) {
        c->lingering = true;
        return 1;
    }
    snprintf(err, errlen, "cannot remove cgroup %s: %s", dir, strerror(errno));
    return -1;
}
