#define _GNU_SOURCE
#include "instance.h"

#include "config.h"
#include "health.h"
#include "log.h"
#include "memory.h"
#include "port.h"
#include "spawn.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define POLL_STARTING_S      0.005  /* /health poll period while starting */
#define PROBE_STARTING_MS    1000L  /* timeout of one readiness probe */
#define LIVENESS_FAILURES    3      /* consecutive failed probes → restart */
#define PORT_RETRIES_MAX     10     /* "port taken" respawns in a row */
#define TAIL_LINES           40     /* child output kept per instance */
#define OUTPUT_BATCH_S       0.05   /* a ready child's output is read at most this often */
#define OUTPUT_PIPE_BYTES    (1 << 20)  /* pipe room for it meanwhile (F_SETPIPE_SZ) */
#define OUTPUT_READ_BYTES    (64 * 1024) /* one read of a child's output, at most */
#define CGROUP_RETRY_S       0.1    /* a populated cgroup's next rmdir */
#define CGROUP_RETRIES       100    /* of them before giving up (10 s) */

enum instance_event {
    IEV_START,        /* the operator or the proxy wants it running */
    IEV_STOP,         /* the operator, eviction or shutdown wants it gone */
    IEV_RESTART,
    IEV_HEALTH_OK,    /* /health answered 200 */
    IEV_HEALTH_FAIL,  /* /health answered otherwise, or not at all */
    IEV_EXIT,         /* the child exited; inst->exit_status holds why */
    IEV_DEADLINE,     /* the state's timer: start_timeout, stop_timeout, backoff */
};

static void instance_step(struct instance *inst, enum instance_event ev);
static const struct cgroup_tree *cgroups_of(const struct instance *inst);

/* ---------- small helpers ---------- */

static double now_of(const struct instance *inst)
{
    return ev_now(inst->world->loop);
}

static void instance_eventf(struct instance *inst, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void instance_eventf(struct instance *inst, int level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    inst->world->ops->event(inst, level, msg, inst->world->arg);
}

static void set_state(struct instance *inst, enum instance_state s)
{
    enum instance_state old = inst->state;
    if (old == s)
        return;
    inst->state = s;
    inst->world->ops->changed(inst, old, inst->world->arg);
}

/* Requests in flight on it, as the owner's router counts them. */
static unsigned in_flight(const struct instance *inst)
{
    return inst->world->ops->in_flight(inst, inst->world->arg);
}

static void set_error(struct instance *inst, const char *msg)
{
    free(inst->last_error);
    inst->last_error = msg ? strdup(msg) : NULL;
}

static void arm_deadline(struct instance *inst, double after)
{
    ev_timer_stop(inst->world->loop, &inst->deadline);
    ev_timer_set(&inst->deadline, after > 0 ? after : 0, 0.);
    ev_timer_start(inst->world->loop, &inst->deadline);
}

static void arm_poll(struct instance *inst, double after)
{
    ev_timer_stop(inst->world->loop, &inst->poll);
    ev_timer_set(&inst->poll, after > 0 ? after : 0, 0.);
    ev_timer_start(inst->world->loop, &inst->poll);
}

/* Its PSS and its cgroup's memory.current, now; a failed read keeps the
 * last value. */
static void measure(struct instance *inst)
{
    uint64_t pss = memory_pss(inst->pid);
    if (pss)
        inst->pss = pss;
    if (cgroups_of(inst))
        (void)cgroup_child_measure(cgroups_of(inst), &inst->cgroup);
}

static void cancel_probes(struct instance *inst)
{
    health_cancel(inst->probe);
    inst->probe = NULL;
    health_cancel(inst->props_probe);
    inst->props_probe = NULL;
    inst->reprobe = false;
    ev_timer_stop(inst->world->loop, &inst->poll);
}

const char *instance_state_name(enum instance_state s)
{
    switch (s) {
    case INSTANCE_STOPPED:  return "stopped";
    case INSTANCE_STARTING: return "starting";
    case INSTANCE_READY:    return "ready";
    case INSTANCE_STOPPING: return "stopping";
    case INSTANCE_BACKOFF:  return "starting";   /* waiting to start again */
    case INSTANCE_FAILED:   return "failed";
    }
    return "unknown";
}

void instance_describe_status(int status, char *buf, size_t len)
{
    if (status < 0)
        snprintf(buf, len, "exited");
    else if (WIFEXITED(status))
        snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d (%s)%s", WTERMSIG(status),
                 strsignal(WTERMSIG(status)), WCOREDUMP(status) ? ", core dumped" : "");
    else
        snprintf(buf, len, "ended with wait status %d", status);
}

/* Bytes as whole MiB, rounded. */
static unsigned long long mib(uint64_t bytes)
{
    return (unsigned long long)((bytes + (UINT64_C(1) << 19)) >> 20);
}

void instance_describe_exit(const struct instance *inst, char *buf, size_t len)
{
    if (inst->cgroup.oom_killed) {
        if (inst->cgroup.limit)
            snprintf(buf, len, "killed by the OOM killer at %llu MiB (memory.max %llu MiB)",
                     mib(inst->cgroup.oom_at), mib(inst->cgroup.limit));
        else
            snprintf(buf, len, "killed by the OOM killer at %llu MiB", mib(inst->cgroup.oom_at));
        return;
    }
    instance_describe_status(inst->exit_status, buf, len);
}

/* The daemon's cgroup tree when children get cgroups, else NULL. */
static const struct cgroup_tree *cgroups_of(const struct instance *inst)
{
    const struct cgroup_tree *t = inst->world->cgroups;
    return t && t->enabled ? t : NULL;
}

bool instance_has_process(const struct instance *inst)
{
    return inst->pid > 0;
}

/* ---------- child output ---------- */

static bool line_is_progress_hint(const char *line)
{
    return strstr(line, "model loaded") || strstr(line, "listening on") ||
           strstr(line, "server is listening");
}

static void instance_line(struct instance *inst, const char *line, size_t len)
{
    logring_push(&inst->tail, line, len);
    inst->world->ops->output(inst, line, len, inst->world->arg);
    if (inst->state != INSTANCE_STARTING)
        return;
    /* Output while starting is progress: start_timeout counts from here. */
    arm_deadline(inst, (double)inst->world->cfg->start_timeout_ms / 1000.0);
    if (line_is_progress_hint(logring_last(&inst->tail, 0))) {
        if (inst->probe)
            inst->reprobe = true;
        else
            arm_poll(inst, 0);
    }
}

/* One line of LEN bytes, in pieces of at most sizeof linebuf (what one log
 * line holds). */
static void instance_lines(struct instance *inst, const char *line, size_t len)
{
    while (len > sizeof inst->linebuf) {
        instance_line(inst, line, sizeof inst->linebuf);
        line += sizeof inst->linebuf;
        len -= sizeof inst->linebuf;
    }
    instance_line(inst, line, len);
}

/* Read what the child wrote; split into lines. The bytes read (0: none
 * were there), or -1 at EOF or error. A ready child's output comes in
 * batches (see output_cb): it is read OUTPUT_READ_BYTES at a time, into a
 * buffer all instances share (the daemon is one thread); the line it ends
 * in the middle of waits in the instance's linebuf for the next read. */
static ssize_t instance_drain_output(struct instance *inst)
{
    static char buf[OUTPUT_READ_BYTES];
    ssize_t got = 0;
    for (;;) {
        size_t keep = inst->linelen;
        memcpy(buf, inst->linebuf, keep);
        size_t room = sizeof buf - keep;
        ssize_t r = read(inst->out_fd, buf + keep, room);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? got : -1;
        }
        if (r == 0) {
            if (keep)
                instance_line(inst, buf, keep);     /* keep < sizeof linebuf */
            inst->linelen = 0;
            return -1;
        }
        got += r;
        /* Only the new bytes can end a line: the kept ones had none. */
        size_t len = keep + (size_t)r, start = 0, from = keep;
        const char *nl;
        while ((nl = memchr(buf + from, '\n', len - from))) {
            size_t end = (size_t)(nl - buf);
            from = end + 1;
            if (end > start && buf[end - 1] == '\r')
                end--;
            instance_lines(inst, buf + start, end - start);
            start = from;
        }
        /* A line longer than linebuf is passed on in pieces that size. */
        while (len - start >= sizeof inst->linebuf) {
            instance_line(inst, buf + start, sizeof inst->linebuf);
            start += sizeof inst->linebuf;
        }
        size_t rest = len - start;
        memcpy(inst->linebuf, buf + start, rest);
        inst->linelen = rest;
        /* A short read emptied the pipe: no second read() to hear EAGAIN
         * (libev calls again when more comes). */
        if ((size_t)r < room)
            return got;
    }
}

static void close_output(struct instance *inst)
{
    if (inst->out_fd < 0)
        return;
    ev_io_stop(inst->world->loop, &inst->out_w);
    ev_timer_stop(inst->world->loop, &inst->out_later);
    close(inst->out_fd);
    inst->out_fd = -1;
    inst->linelen = 0;
}

/* A ready child writes some lines per request, each a wakeup of ours if
 * read as it comes: its output is read in batches instead, OUTPUT_BATCH_S
 * apart (the pipe holds OUTPUT_PIPE_BYTES meanwhile). The first output
 * after a quiet spell wakes us (the pipe's watcher); from then on a timer
 * reads it, as long as each read finds some, and the watcher takes over
 * again when one finds none: a busy child costs one wakeup per batch, a
 * quiet one none. While it starts, every line is read at once: readiness
 * is seen in them. */
static void output_batch(struct ev_loop *loop, struct instance *inst)
{
    ev_timer_set(&inst->out_later, OUTPUT_BATCH_S, 0.);
    ev_timer_start(loop, &inst->out_later);
}

static void output_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct instance *inst = w->data;
    if (instance_drain_output(inst) < 0) {
        close_output(inst);
        return;
    }
    if (inst->state == INSTANCE_READY) {
        ev_io_stop(loop, &inst->out_w);
        output_batch(loop, inst);
    }
}

static void output_later_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct instance *inst = w->data;
    if (inst->out_fd < 0)
        return;
    ssize_t got = instance_drain_output(inst);
    if (got < 0)
        close_output(inst);
    else if (got > 0 && inst->state == INSTANCE_READY)
        output_batch(loop, inst);
    else
        ev_io_start(loop, &inst->out_w);
}

/* ---------- process ---------- */

static void child_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)revents;
    struct instance *inst = w->data;
    ev_child_stop(loop, w);
    inst->exit_status = w->rstatus;
    if (cgroups_of(inst) && cgroup_child_exited(cgroups_of(inst), &inst->cgroup, w->rstatus))
        inst->oom_kills++;
    /* Take every line it wrote before dying: they explain the exit. */
    if (inst->out_fd >= 0 && instance_drain_output(inst) < 0)
        close_output(inst);
    instance_step(inst, IEV_EXIT);
}

/* Watch child PID (its exit) and OUT_FD, the read end of its output
 * pipe (-1: none): a child just spawned, or one adopted at an upgrade. */
static void watch_child(struct instance *inst, pid_t pid, int out_fd)
{
    inst->out_fd = out_fd;
    if (out_fd >= 0) {
        (void)fcntl(out_fd, F_SETFD, FD_CLOEXEC);    /* an inherited one lost it for the exec */
        (void)fcntl(out_fd, F_SETFL, fcntl(out_fd, F_GETFL) | O_NONBLOCK);
#ifdef F_SETPIPE_SZ
        (void)fcntl(out_fd, F_SETPIPE_SZ, OUTPUT_PIPE_BYTES);  /* best effort: 64 KiB else */
#endif
        ev_io_init(&inst->out_w, output_cb, out_fd, EV_READ);
        inst->out_w.data = inst;
        ev_io_start(inst->world->loop, &inst->out_w);
    }
    ev_child_init(&inst->child_w, child_cb, pid, 0);
    inst->child_w.data = inst;
    ev_child_start(inst->world->loop, &inst->child_w);
}

static const char *model_env_value(const struct config_model *m, const char *name);

/* The model's env as "NAME=VALUE" strings, *N of them; with OUR_KEY, its
 * LLAMA_API_KEY (the pool's key for the child) in place of the model's.
 * A child placed on a GPU (instance_place) also gets CUDA_VISIBLE_DEVICES
 * and LLAMA_ARG_FIT=off (llama-server's --fit would otherwise grow or
 * shrink it to what the device has free), unless the model's env sets
 * them: the operator's word wins. */
static char **child_env_strings(const struct instance *inst, const char *our_key, size_t *n)
{
    const struct config_model *m = inst->model;
    char **env = calloc(m->nenv + 4, sizeof *env);
    size_t k = 0;
    if (!env)
        return NULL;
    if (inst->visible[0] && !model_env_value(m, "CUDA_VISIBLE_DEVICES")) {
        if (asprintf(&env[k], "CUDA_VISIBLE_DEVICES=%s", inst->visible) < 0)
            goto fail;
        k++;
        if (!model_env_value(m, "LLAMA_ARG_FIT")) {
            if (!(env[k] = strdup("LLAMA_ARG_FIT=off")))
                goto fail;
            k++;
        }
    }
    for (size_t i = 0; i < m->nenv; i++) {
        if (our_key && strcmp(m->env[i].name, "LLAMA_API_KEY") == 0)
            continue;
        if (asprintf(&env[k], "%s=%s", m->env[i].name, m->env[i].value) < 0)
            goto fail;
        k++;
    }
    if (our_key) {
        if (asprintf(&env[k], "LLAMA_API_KEY=%s", our_key) < 0)
            goto fail;
        k++;
    }
    *n = k;
    return env;
fail:
    env[k] = NULL;
    util_strv_free(env);
    return NULL;
}

static const char *model_env_value(const struct config_model *m, const char *name)
{
    const char *v = NULL;
    for (size_t i = 0; i < m->nenv; i++)
        if (strcmp(m->env[i].name, name) == 0)
            v = m->env[i].value;
    return v;
}

/* The key the child will require. The operator's when args (or
 * default_args) give --api-key or the model's env gives LLAMA_API_KEY
 * (the first usable key of the list); else a fresh random one, *OURS set,
 * which the child gets through LLAMA_API_KEY. NULL when out of memory or
 * out of randomness (errno set). */
static char *child_api_key(const struct config *cfg, const struct config_model *m, bool *ours)
{
    const char *lists[] = {
        config_child_arg(cfg, m, "--api-key", "--api-key"),
        model_env_value(m, "LLAMA_API_KEY"),
    };
    *ours = false;
    for (size_t i = 0; i < sizeof lists / sizeof *lists; i++) {
        char *key = lists[i] ? spawn_first_key(lists[i]) : NULL;
        if (key || (lists[i] && errno == ENOMEM))
            return key;
    }
    char buf[SPAWN_KEY_LEN + 1];
    if (spawn_random_key(buf, sizeof buf) < 0)
        return NULL;
    *ours = true;
    return strdup(buf);
}

/* Fork and exec a child on a fresh port. Returns 0, or -1 with
 * inst->last_error set; FATAL tells whether retrying could ever help. */
static int instance_spawn(struct instance *inst, bool *fatal)
{
    const struct config *cfg = inst->world->cfg;
    char err[512];
    *fatal = false;

    unsigned port = port_alloc(inst->world->ports);
    if (!port) {
        snprintf(err, sizeof err, "no free port in port_range %u-%u", cfg->port_min, cfg->port_max);
        set_error(inst, err);
        return -1;
    }
    bool our_key = false;
    size_t nextra = 0;
    char *key = child_api_key(cfg, inst->model, &our_key);
    int key_errno = errno;
    char **argv = config_child_argv(cfg, inst->model, port);
    char **extra = key ? child_env_strings(inst, our_key ? key : NULL, &nextra) : NULL;
    char **env = extra ? spawn_clean_env(extra, nextra) : NULL;
    char *path = argv ? spawn_resolve(argv[0]) : NULL;
    int pipefd[2] = { -1, -1 };
    int cgroup_fd = -1;
    pid_t pid = -1;

    if (!key) {
        snprintf(err, sizeof err, "cannot make the child's API key: %s", strerror(key_errno));
    } else if (!argv || !extra || !env) {
        snprintf(err, sizeof err, "out of memory preparing the child");
    } else if (!path) {
        snprintf(err, sizeof err, "cannot run %s: %s (set llama_server in pool.conf)",
                 argv[0], strerror(errno));
        *fatal = true;
    } else if (pipe2(pipefd, O_CLOEXEC) < 0) {
        snprintf(err, sizeof err, "pipe: %s", strerror(errno));
    } else if (cgroups_of(inst) &&
               (cgroup_fd = cgroup_child_prepare(cgroups_of(inst), &inst->cgroup, inst->model->name, inst->no,
                                                 inst->world->ops->memory_limit(inst, inst->world->arg),
                                                 err, sizeof err)) < 0) {
        /* Not fatal: a cgroup still being removed, a passing error. */
    } else {
        pid = spawn_child(path, argv, env, pipefd[1], cgroup_fd, err, sizeof err);
        /* Exec failing will fail again; joining the cgroup may not. */
        if (pid == -1)
            *fatal = true;
    }
    if (cgroup_fd >= 0)
        close(cgroup_fd);
    if (pipefd[1] >= 0)
        close(pipefd[1]);
    free(path);
    util_strv_free(argv);
    util_strv_free(extra);
    util_strv_free(env);

    if (pid < 0) {
        if (pipefd[0] >= 0)
            close(pipefd[0]);
        port_release(inst->world->ports, port);
        set_error(inst, err);
        free(key);
        return -1;
    }

    free(inst->api_key);
    inst->api_key = key;
    inst->metrics = config_child_metrics(cfg, inst->model);
    inst->pid = pid;
    inst->port = port;
    inst->spawned_at = now_of(inst);
    inst->ready_at = 0;
    inst->slots = 0;
    inst->pss = 0;
    inst->health_failures = 0;
    inst->answered = false;
    inst->stop_reason = INSTANCE_STOP_ASKED;
    inst->exit_status = -1;
    watch_child(inst, pid, pipefd[0]);
    if (inst->cgroup.name[0] && inst->cgroup.limit) {
        char max[32];
        instance_eventf(inst, LOG_INFO, "started pid %d on port %u in cgroup %s (memory.max %s)", (int)pid,
                        port, inst->cgroup.name, util_format_bytes(inst->cgroup.limit, max, sizeof max));
    } else if (inst->cgroup.name[0]) {
        instance_eventf(inst, LOG_INFO, "started pid %d on port %u in cgroup %s", (int)pid, port,
                        inst->cgroup.name);
    } else {
        instance_eventf(inst, LOG_INFO, "started pid %d on port %u", (int)pid, port);
    }
    return 0;
}

static void signal_group(struct instance *inst, int sig)
{
    if (inst->pid > 0 && kill(-inst->pid, sig) < 0 && errno == ESRCH)
        (void)kill(inst->pid, sig);
}

/* SIGKILL to every process of its cgroup (cgroup.kill), a child of it
 * that left the process group included. */
static void kill_cgroup(struct instance *inst)
{
    char err[512];
    if (cgroups_of(inst) && inst->cgroup.name[0] &&
        cgroup_child_kill(cgroups_of(inst), &inst->cgroup, err, sizeof err) < 0)
        instance_eventf(inst, LOG_WARN, "%s", err);
}

/* The final word: SIGKILL to the group, and to the cgroup. */
static void kill_all(struct instance *inst)
{
    signal_group(inst, SIGKILL);
    kill_cgroup(inst);
}

/* Remove its cgroup; while populated (processes still exiting), again
 * every CGROUP_RETRY_S. */
static void remove_cgroup(struct instance *inst)
{
    char err[512];
    const struct cgroup_tree *t = cgroups_of(inst);
    if (!t || !inst->cgroup.name[0])
        return;
    int rc = cgroup_child_remove(t, &inst->cgroup, err, sizeof err);
    if (rc < 0) {
        instance_eventf(inst, LOG_WARN, "%s", err);
        inst->cgroup.name[0] = '\0';     /* left there; reused at its next start */
    } else if (rc > 0 && inst->cgroup_retries++ < CGROUP_RETRIES) {
        ev_timer_stop(inst->world->loop, &inst->cgroup_retry);
        ev_timer_set(&inst->cgroup_retry, CGROUP_RETRY_S, 0.);
        ev_timer_start(inst->world->loop, &inst->cgroup_retry);
    } else if (rc > 0) {
        instance_eventf(inst, LOG_WARN, "cgroup %s/%s still has processes %.0f s after the child's exit; "
                        "left in place", t->dir, inst->cgroup.name, CGROUP_RETRY_S * CGROUP_RETRIES);
    }
}

static void cgroup_retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct instance *inst = w->data;
    if (inst->pid <= 0)          /* not while a new child runs in it */
        remove_cgroup(inst);
}

/* The instance goes away with its cgroup still populated (a process of
 * it dying slowly after cgroup.kill): a few more tries, CGROUP_LAST_TRY_MS
 * at most, then it is left in place (and reused if the instance comes
 * back). Rare: the child itself has been reaped already. */
#define CGROUP_LAST_TRY_MS 100
static void cgroup_last_try(struct instance *inst)
{
    char err[512];
    const struct cgroup_tree *t = cgroups_of(inst);
    if (!t || !inst->cgroup.name[0])
        return;
    for (int ms = 0; ; ms += 5) {
        int rc = cgroup_child_remove(t, &inst->cgroup, err, sizeof err);
        if (rc == 0)
            return;
        if (rc < 0) {
            instance_eventf(inst, LOG_WARN, "%s", err);
            return;
        }
        if (ms >= CGROUP_LAST_TRY_MS)
            break;
        (void)nanosleep(&(struct timespec){ .tv_nsec = 5 * 1000 * 1000 }, NULL);
    }
    instance_eventf(inst, LOG_WARN, "cgroup %s/%s still has processes; left in place", t->dir,
                    inst->cgroup.name);
}

/* The child is gone: sweep its group and its cgroup, free its port. */
static void reap_cleanup(struct instance *inst)
{
    if (inst->pid > 0) {
        (void)kill(-inst->pid, SIGKILL);   /* anything it left in its group */
        kill_cgroup(inst);                 /* or elsewhere */
    }
    close_output(inst);
    cancel_probes(inst);
    if (inst->port)
        port_release(inst->world->ports, inst->port);
    inst->pid = 0;
    inst->port = 0;
    inst->slots = 0;
    inst->pss = 0;
    inst->cgroup.current = 0;
    inst->cgroup_retries = 0;
    remove_cgroup(inst);
}

/* ---------- health ---------- */

static void probe_cb(void *arg, long status, const char *body, size_t len, const char *err);

static void send_probe(struct instance *inst)
{
    char url[64];
    long timeout_ms = PROBE_STARTING_MS;
    if (inst->state == INSTANCE_READY) {
        timeout_ms = inst->world->cfg->health_interval_ms;
        if (timeout_ms > 5000) timeout_ms = 5000;
        if (timeout_ms < 100) timeout_ms = 100;
    }
    snprintf(url, sizeof url, "http://127.0.0.1:%u/health", inst->port);
    inst->reprobe = false;
    inst->probe = health_get(inst->world->health, url, timeout_ms, probe_cb, inst);
    if (!inst->probe)
        arm_poll(inst, 0.1);   /* out of memory: try again shortly */
}

static void poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct instance *inst = w->data;
    if (inst->probe) {
        inst->reprobe = true;
        return;
    }
    if (inst->state == INSTANCE_STARTING || inst->state == INSTANCE_READY)
        send_probe(inst);
}

static void probe_cb(void *arg, long status, const char *body, size_t len, const char *err)
{
    (void)body; (void)len;
    struct instance *inst = arg;
    inst->probe = NULL;
    if (status == 200) {
        instance_step(inst, IEV_HEALTH_OK);
        return;
    }
    if (inst->state == INSTANCE_STARTING && status && !inst->answered) {
        /* First answer ("503 Loading model"): the port is bound, loading is
         * under way. That is progress; later 503s are not. */
        inst->answered = true;
        arm_deadline(inst, (double)inst->world->cfg->start_timeout_ms / 1000.0);
    }
    if (inst->state == INSTANCE_READY) {
        char why[256];
        if (status)
            snprintf(why, sizeof why, "HTTP %ld", status);
        else
            snprintf(why, sizeof why, "%s", err ? err : "no answer");
        instance_eventf(inst, LOG_WARN, "/health failed (%s), %u of %u", why,
                        inst->health_failures + 1, LIVENESS_FAILURES);
    }
    instance_step(inst, IEV_HEALTH_FAIL);
}

static void props_cb(void *arg, long status, const char *body, size_t len, const char *err)
{
    (void)err;
    struct instance *inst = arg;
    inst->props_probe = NULL;
    if (status != 200)
        return;
    json_error_t jerr;
    json_t *props = json_loadb(body, len, 0, &jerr);
    json_int_t slots = json_integer_value(json_object_get(props, "total_slots"));
    json_decref(props);
    if (slots > 0 && (unsigned)slots != inst->slots) {
        inst->slots = (unsigned)slots;
        inst->world->ops->updated(inst, inst->world->arg);
    }
}

static void fetch_props(struct instance *inst)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/props", inst->port);
    health_cancel(inst->props_probe);
    inst->props_probe = health_get_key(inst->world->health, url, 5000, inst->api_key,
                                       props_cb, inst);
}

/* ---------- the state machine ---------- */

static void deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    instance_step(w->data, IEV_DEADLINE);
}

static void send_sigterm(struct instance *inst)
{
    inst->draining = false;
    signal_group(inst, SIGTERM);
    arm_deadline(inst, (double)inst->world->cfg->stop_timeout_ms / 1000.0);
}

/* SIGTERM now (a child that is loading, broken or idle). */
static void begin_stop(struct instance *inst)
{
    cancel_probes(inst);
    send_sigterm(inst);
    set_state(inst, INSTANCE_STOPPING);
}

/* A ready child with requests in flight finishes them first: STOPPING
 * (it takes no new ones), SIGTERM once the last ends (instance_drained)
 * or drain_timeout passes. llama-server has no drain of its own: a
 * SIGTERM ends its open streams. */
static void begin_drain(struct instance *inst)
{
    double limit = (double)inst->world->cfg->drain_timeout_ms / 1000.0;
    unsigned n = in_flight(inst);
    if (n == 0 || limit <= 0) {
        begin_stop(inst);
        return;
    }
    cancel_probes(inst);
    inst->draining = true;
    arm_deadline(inst, limit);
    instance_eventf(inst, LOG_INFO, "draining: %u request%s in flight, at most %.0f s before SIGTERM",
                    n, n == 1 ? "" : "s", limit);
    set_state(inst, INSTANCE_STOPPING);
}

static void begin_start(struct instance *inst)
{
    bool fatal;
    if (instance_spawn(inst, &fatal) < 0) {
        instance_eventf(inst, LOG_ERROR, "cannot start: %s", inst->last_error);
        /* Every attempt is seen as one, even from FAILED to FAILED: the
         * owner hears "starting → failed" (with no pid: nothing was
         * spawned) and can answer who waits. */
        set_state(inst, INSTANCE_STARTING);
        if (fatal) {
            set_state(inst, INSTANCE_FAILED);
            return;
        }
        /* Temporary (no port, no memory): try again like after a crash. */
        double delay = backoff_on_crash(&inst->backoff, 0);
        inst->next_start_at = now_of(inst) + delay;
        arm_deadline(inst, delay);
        set_state(inst, INSTANCE_BACKOFF);
        return;
    }
    arm_deadline(inst, (double)inst->world->cfg->start_timeout_ms / 1000.0);
    arm_poll(inst, 0);
    set_state(inst, INSTANCE_STARTING);
}

/* The line of the child's last output that best says why it died: the
 * newest error line among the last few (llama.cpp marks them " E ", and
 * may print "cleaning up before exit..." after), else the very last. */
static const char *telling_line(const struct logring *tail)
{
    for (size_t i = 0; i < 10; i++) {
        const char *l = logring_last(tail, i);
        if (!l)
            break;
        if (strstr(l, " E ") || strcasestr(l, "error"))
            return l;
    }
    return logring_last(tail, 0);
}

/* The child died unasked (or was stopped for failing health). */
static void on_crash(struct instance *inst, const char *what)
{
    char msg[1024];
    const char *last = telling_line(&inst->tail);
    double uptime = inst->ready_at > 0 ? now_of(inst) - inst->ready_at : 0;
    snprintf(msg, sizeof msg, "%s%s%s", what, last && *last ? ": " : "", last && *last ? last : "");
    set_error(inst, msg);
    instance_eventf(inst, LOG_WARN, "%s", msg);
    reap_cleanup(inst);
    if (inst->world->ops->crashed(inst, inst->world->arg)) {
        set_state(inst, INSTANCE_FAILED);
        return;
    }
    double delay = backoff_on_crash(&inst->backoff, uptime);
    inst->next_start_at = now_of(inst) + delay;
    instance_eventf(inst, LOG_INFO, "restarting in %.0f s", delay);
    arm_deadline(inst, delay);
    set_state(inst, INSTANCE_BACKOFF);
}

static bool exit_was_port_taken(struct instance *inst)
{
    if (!WIFEXITED(inst->exit_status) || WEXITSTATUS(inst->exit_status) != 1)
        return false;
    for (size_t i = 0; i < 5; i++) {
        const char *l = logring_last(&inst->tail, i);
        if (l && strstr(l, "couldn't bind HTTP server socket"))
            return true;
    }
    return false;
}

static void on_exit_starting(struct instance *inst)
{
    char what[256], st[128];
    instance_describe_exit(inst, st, sizeof st);
    if (exit_was_port_taken(inst) && inst->port_retries < PORT_RETRIES_MAX) {
        unsigned port = inst->port;
        inst->port_retries++;
        reap_cleanup(inst);
        instance_eventf(inst, LOG_WARN, "port %u is taken by another process; trying the next port", port);
        begin_start(inst);
        return;
    }
    snprintf(what, sizeof what, "%s while loading", st);
    on_crash(inst, what);
}

static void instance_step(struct instance *inst, enum instance_event ev)
{
    char st[128];
    const struct config *cfg = inst->world->cfg;

    switch (inst->state) {
    case INSTANCE_STOPPED:
    case INSTANCE_FAILED:
        if (ev == IEV_START || ev == IEV_RESTART) {
            backoff_reset(&inst->backoff);
            inst->port_retries = 0;
            begin_start(inst);
        } else if (ev == IEV_STOP && inst->state == INSTANCE_FAILED) {
            set_state(inst, INSTANCE_STOPPED);
        }
        break;

    case INSTANCE_BACKOFF:
        if (ev == IEV_DEADLINE || ev == IEV_START || ev == IEV_RESTART) {
            if (ev != IEV_DEADLINE)
                backoff_reset(&inst->backoff);
            else
                inst->restarts++;
            inst->port_retries = 0;
            begin_start(inst);
        } else if (ev == IEV_STOP) {
            ev_timer_stop(inst->world->loop, &inst->deadline);
            set_state(inst, INSTANCE_STOPPED);
        }
        break;

    case INSTANCE_STARTING:
        switch (ev) {
        case IEV_HEALTH_OK:
            inst->ready_at = now_of(inst);
            inst->port_retries = 0;
            inst->health_failures = 0;
            ev_timer_stop(inst->world->loop, &inst->deadline);
            set_error(inst, NULL);
            instance_eventf(inst, LOG_INFO, "ready on port %u after %.3f s", inst->port,
                            inst->ready_at - inst->spawned_at);
            measure(inst);
            fetch_props(inst);
            arm_poll(inst, (double)cfg->health_interval_ms / 1000.0);
            set_state(inst, INSTANCE_READY);
            break;
        case IEV_HEALTH_FAIL:
            arm_poll(inst, inst->reprobe ? 0 : POLL_STARTING_S);
            break;
        case IEV_DEADLINE:
            instance_eventf(inst, LOG_WARN, "no progress for %.0f s while loading; stopping it",
                            (double)cfg->start_timeout_ms / 1000.0);
            inst->stop_reason = INSTANCE_STOP_START_TIMEOUT;
            begin_stop(inst);
            set_error(inst, "start_timeout: no progress while loading");
            break;
        case IEV_EXIT:
            on_exit_starting(inst);
            break;
        case IEV_STOP:
            begin_stop(inst);
            break;
        case IEV_RESTART:
            inst->restart_after_stop = true;
            begin_stop(inst);
            break;
        case IEV_START:
            break;
        }
        break;

    case INSTANCE_READY:
        switch (ev) {
        case IEV_HEALTH_OK:
            inst->health_failures = 0;
            measure(inst);
            if (!inst->slots && !inst->props_probe)
                fetch_props(inst);
            arm_poll(inst, (double)cfg->health_interval_ms / 1000.0);
            if (inst->recheck) {
                inst->recheck = false;
                inst->world->ops->updated(inst, inst->world->arg);
            }
            break;
        case IEV_HEALTH_FAIL:
            if (++inst->health_failures >= LIVENESS_FAILURES) {
                instance_eventf(inst, LOG_WARN, "not answering /health; restarting it");
                inst->stop_reason = INSTANCE_STOP_UNHEALTHY;
                begin_stop(inst);
            } else {
                arm_poll(inst, (double)cfg->health_interval_ms / 1000.0);
            }
            break;
        case IEV_EXIT:
            instance_describe_exit(inst, st, sizeof st);
            on_crash(inst, st);
            break;
        case IEV_STOP:
            begin_drain(inst);
            break;
        case IEV_RESTART:
            inst->restart_after_stop = true;
            begin_drain(inst);
            break;
        case IEV_START:
        case IEV_DEADLINE:
            break;
        }
        break;

    case INSTANCE_STOPPING:
        switch (ev) {
        case IEV_DEADLINE:
            if (inst->draining) {
                unsigned n = in_flight(inst);
                instance_eventf(inst, LOG_WARN, "drain_timeout passed with %u request%s in flight; "
                                "sending SIGTERM", n, n == 1 ? "" : "s");
                send_sigterm(inst);
                break;
            }
            instance_eventf(inst, LOG_WARN, "still running %.0f s after SIGTERM; sending SIGKILL",
                            (double)cfg->stop_timeout_ms / 1000.0);
            kill_all(inst);
            break;
        case IEV_EXIT:
            ev_timer_stop(inst->world->loop, &inst->deadline);
            inst->draining = false;
            instance_describe_exit(inst, st, sizeof st);
            if (inst->stop_reason != INSTANCE_STOP_ASKED) {
                enum instance_stop_reason why = inst->stop_reason;
                inst->stop_reason = INSTANCE_STOP_ASKED;
                on_crash(inst, why == INSTANCE_STOP_START_TIMEOUT
                                   ? "start_timeout: no progress while loading"
                                   : "restarted after failing /health");
                break;
            }
            instance_eventf(inst, LOG_INFO, "stopped (%s)", st);
            reap_cleanup(inst);
            set_state(inst, INSTANCE_STOPPED);
            if (inst->restart_after_stop) {
                inst->restart_after_stop = false;
                instance_step(inst, IEV_START);
            }
            break;
        case IEV_START:
        case IEV_RESTART:
            inst->restart_after_stop = true;
            break;
        case IEV_STOP:
            inst->restart_after_stop = false;
            inst->stop_reason = INSTANCE_STOP_ASKED;
            break;
        case IEV_HEALTH_OK:
        case IEV_HEALTH_FAIL:
            break;
        }
        break;
    }
}

/* ---------- public ---------- */

struct instance *instance_new(struct instance_world *w, const struct config_model *m,
                              unsigned no, void *owner)
{
    struct instance *inst = calloc(1, sizeof *inst);
    if (!inst)
        return NULL;
    if (logring_init(&inst->tail, TAIL_LINES) < 0) {
        free(inst);
        return NULL;
    }
    snprintf(inst->id, sizeof inst->id, "%s#%u", m->name, no);
    inst->no = no;
    inst->model = m;
    inst->world = w;
    inst->owner = owner;
    inst->state = INSTANCE_STOPPED;
    inst->device = -1;
    inst->out_fd = -1;
    inst->exit_status = -1;
    ev_timer_init(&inst->deadline, deadline_cb, 0., 0.);
    inst->deadline.data = inst;
    ev_timer_init(&inst->poll, poll_cb, 0., 0.);
    inst->poll.data = inst;
    ev_timer_init(&inst->out_later, output_later_cb, 0., 0.);
    inst->out_later.data = inst;
    ev_timer_init(&inst->cgroup_retry, cgroup_retry_cb, 0., 0.);
    inst->cgroup_retry.data = inst;
    return inst;
}

void instance_free(struct instance *inst)
{
    if (!inst)
        return;
    if (inst->pid > 0) {
        /* Should not happen; never leave a child behind. */
        kill_all(inst);
        ev_child_stop(inst->world->loop, &inst->child_w);
    }
    reap_cleanup(inst);
    ev_timer_stop(inst->world->loop, &inst->cgroup_retry);
    cgroup_last_try(inst);
    ev_timer_stop(inst->world->loop, &inst->deadline);
    logring_free(&inst->tail);
    free(inst->last_error);
    free(inst->api_key);
    free(inst);
}

void instance_start(struct instance *inst)   { instance_step(inst, IEV_START); }
void instance_stop(struct instance *inst)    { instance_step(inst, IEV_STOP); }
void instance_restart(struct instance *inst) { instance_step(inst, IEV_RESTART); }

void instance_check(struct instance *inst)
{
    if (inst->state != INSTANCE_READY)
        return;
    inst->recheck = true;
    arm_poll(inst, 0);      /* poll_cb waits for a probe already out */
}

void instance_drained(struct instance *inst)
{
    if (inst->state == INSTANCE_STOPPING && inst->draining && in_flight(inst) == 0) {
        instance_eventf(inst, LOG_INFO, "drained; sending SIGTERM");
        send_sigterm(inst);
    }
}

uint64_t instance_measure(struct instance *inst)
{
    if (inst->pid > 0)
        measure(inst);
    return inst->pid > 0 ? inst->pss : 0;
}

void instance_place(struct instance *inst, int device, const char *visible)
{
    inst->device = device;
    snprintf(inst->visible, sizeof inst->visible, "%s", visible ? visible : "");
}

void instance_rebind(struct instance *inst, const struct config_model *m)
{
    inst->model = m;
}

void instance_adopt(struct instance *inst, const struct instance_adoption *a)
{
    const struct config *cfg = inst->world->cfg;
    double now = now_of(inst);
    free(inst->api_key);
    inst->api_key = a->api_key;
    inst->metrics = a->metrics;
    inst->pid = a->pid;
    inst->port = a->port;
    port_hold(inst->world->ports, a->port);
    inst->spawned_at = a->spawned_at;
    inst->ready_at = a->ready_at;
    inst->restarts = a->restarts;
    inst->slots = a->slots;
    inst->health_failures = 0;
    inst->answered = a->state != INSTANCE_STARTING;
    inst->stop_reason = INSTANCE_STOP_ASKED;
    inst->exit_status = -1;
    instance_place(inst, a->device, a->visible);
    if (cgroups_of(inst))
        (void)cgroup_child_adopt(cgroups_of(inst), &inst->cgroup, inst->model->name, inst->no);
    watch_child(inst, a->pid, a->out_fd);
    measure(inst);
    switch (a->state) {
    case INSTANCE_READY:
        arm_poll(inst, 0);      /* a first liveness probe now */
        if (!inst->slots)
            fetch_props(inst);
        break;
    case INSTANCE_STARTING: {
        double left = a->spawned_at + (double)cfg->start_timeout_ms / 1000.0 - now;
        arm_deadline(inst, left > 1 ? left : 1);
        arm_poll(inst, 0);
        break;
    }
    default:                    /* STOPPING: its SIGTERM was sent */
        arm_deadline(inst, (double)cfg->stop_timeout_ms / 1000.0);
        break;
    }
    set_state(inst, a->state);
}

void instance_kill(struct instance *inst)
{
    if (inst->pid > 0)
        kill_all(inst);
}
