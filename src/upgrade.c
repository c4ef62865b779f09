/* upgrade — a new image of the daemon, same pid, children kept. See upgrade.h. */
#define _GNU_SOURCE
#include "upgrade.h"

#include "build_config.h"
#include "config.h"
#include "instance.h"
#include "log.h"
#include "notify.h"
#include "pool.h"
#include "spawn.h"
#include "usage.h"
#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DRAIN_POLL_S 0.01
#define CHECK_OUTPUT_MAX 8192         /* of the check's words, kept for the answer */

enum upgrade_phase {
    UPGRADE_IDLE,
    UPGRADE_CHECKING,                 /* the new binary says whether it can take over */
    UPGRADE_DRAINING,                 /* requests under way end */
};

struct upgrade {
    struct upgrade_host h;
    enum upgrade_phase phase;
    struct http_request *req;         /* the command waiting; NULL: none (SIGUSR2, or it left) */
    double timeout;                   /* drain, seconds */
    /* the check */
    pid_t check_pid;
    int check_out;                    /* its stdout+stderr, -1 once at EOF */
    int check_state;                  /* the memfd it reads */
    int check_status;                 /* wait status once it exited, else -1 */
    struct buf check_text;
    ev_child check_w;
    ev_io check_io;
    ev_timer timer;                   /* check time limit, then the drain's poll */
    double drain_until;
};

struct upgrade *upgrade_new(const struct upgrade_host *host)
{
    struct upgrade *u = calloc(1, sizeof *u);
    if (!u)
        return NULL;
    u->h = *host;
    u->check_out = u->check_state = -1;
    ev_init(&u->timer, NULL);
    return u;
}

bool upgrade_running(const struct upgrade *u)
{
    return u && u->phase != UPGRADE_IDLE;
}

/* ---------- the answer ---------- */

static void req_gone(struct http_request *req, void *arg)
{
    (void)req;
    struct upgrade *u = arg;
    u->req = NULL;
}

static void check_stop(struct upgrade *u)
{
    struct ev_loop *loop = u->h.loop;
    ev_io_stop(loop, &u->check_io);
    ev_child_stop(loop, &u->check_w);
    if (u->check_pid > 0 && u->check_status < 0) {
        (void)kill(-u->check_pid, SIGKILL);   /* it has its own group (setsid) */
        /* Reaped by libev's SIGCHLD handling. */
    }
    u->check_pid = 0;
    if (u->check_out >= 0)
        close(u->check_out);
    if (u->check_state >= 0)
        close(u->check_state);
    u->check_out = u->check_state = -1;
    buf_free(&u->check_text);
}

/* The upgrade did not happen: everything goes on as before. */
static void upgrade_fail(struct upgrade *u, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void upgrade_fail(struct upgrade *u, int status, const char *fmt, ...)
{
    char msg[CHECK_OUTPUT_MAX + 512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_error("upgrade: %s; the running daemon goes on unchanged", msg);
    check_stop(u);
    ev_timer_stop(u->h.loop, &u->timer);
    if (u->phase == UPGRADE_DRAINING) {
        http_server_hold(u->h.control, false);
        if (u->h.public)
            http_server_hold(u->h.public, false);
    }
    u->phase = UPGRADE_IDLE;
    if (u->req) {
        http_request_unwatch(u->req);
        http_respond_error(u->req, status, NULL, "upgrade failed, the running daemon goes on unchanged: %s",
                           msg);
        u->req = NULL;
    }
}

void upgrade_cancel(struct upgrade *u, const char *why)
{
    if (upgrade_running(u))
        upgrade_fail(u, 503, "%s", why);
}

void upgrade_free(struct upgrade *u)
{
    if (!u)
        return;
    check_stop(u);
    ev_timer_stop(u->h.loop, &u->timer);
    if (u->req)
        http_request_unwatch(u->req);
    free(u);
}

/* ---------- the handover ---------- */

static const char *state_word(enum instance_state s)
{
    return s == INSTANCE_READY ? "ready" : s == INSTANCE_STARTING ? "starting" : "stopping";
}

/* Every running child of the pool into H (its strings borrowed). */
static int collect_children(struct pool *p, struct handover *h)
{
    size_t n = 0;
    for (size_t i = 0; i < p->nmodels; i++)
        n += p->models[i]->ninst;
    for (size_t i = 0; i < p->nretired; i++)
        n += p->retired[i]->ninst;
    h->children = calloc(n ? n : 1, sizeof *h->children);
    if (!h->children)
        return -1;
    for (size_t k = 0; k < p->nmodels + p->nretired; k++) {
        struct pool_model *m = k < p->nmodels ? p->models[k] : p->retired[k - p->nmodels];
        for (size_t i = 0; i < m->ninst; i++) {
            struct instance *inst = m->inst[i];
            enum instance_state s = inst->state;
            if (inst->pid <= 0 || (s != INSTANCE_READY && s != INSTANCE_STARTING && s != INSTANCE_STOPPING))
                continue;
            struct handover_child *c = &h->children[h->nchildren];
            if (handover_proc(inst->pid, &c->start_time, &c->argv_hash) < 0) {
                log_warn("upgrade: %s: pid %d: cannot read /proc: %s; not handed over",
                         inst->id, (int)inst->pid, strerror(errno));
                continue;
            }
            c->model = (char *)m->cfg->name;
            c->no = inst->no;
            c->pid = inst->pid;
            c->port = inst->port;
            c->out_fd = inst->out_fd;
            c->api_key = inst->api_key;
            /* A removed model's child, or one told to stop, is handed over
             * stopping: the new image sees it end. */
            snprintf(c->state, sizeof c->state, "%s", m->retired ? "stopping" : state_word(s));
            c->spawned_at = inst->spawned_at;
            c->ready_at = inst->ready_at;
            c->restarts = inst->restarts;
            c->slots = inst->slots;
            c->metrics = inst->metrics;
            c->device = inst->device;
            snprintf(c->visible, sizeof c->visible, "%s", inst->visible);
            h->nchildren++;
        }
    }
    return 0;
}

static int collect_conns(struct http_server *srv, bool control, struct handover *h)
{
    if (!srv)
        return 0;
    size_t max = http_server_connections(srv);
    int *fds = calloc(max ? max : 1, sizeof *fds);
    bool *trusted = calloc(max ? max : 1, sizeof *trusted);
    struct handover_conn *v = realloc(h->conns, (h->nconns + max + 1) * sizeof *v);
    if (v)
        h->conns = v;
    if (!fds || !trusted || !v) {
        free(fds);
        free(trusted);
        return -1;
    }
    size_t n = http_server_idle_fds(srv, fds, trusted, max);
    for (size_t i = 0; i < n; i++)
        h->conns[h->nconns++] = (struct handover_conn){ .fd = fds[i], .trusted = trusted[i],
                                                        .control = control };
    free(fds);
    free(trusted);
    return 0;
}

/* The handover as it stands now into H (its strings and fds borrowed
 * from the daemon); release it with handover_release(). 0, or -1 with ERR. */
static int handover_collect(struct upgrade *u, struct handover *h, char *err, size_t len)
{
    struct pool *p = u->h.pool;
    const struct config *cfg = p->cfg;
    *h = (struct handover){
        .pid = getpid(),
        .from_version = LLAMA_POOL_VERSION,
        .control_fd = http_server_fd(u->h.control),
        .public_fd = u->h.public ? http_server_fd(u->h.public) : -1,
        .control_addr = cfg->control_socket,
        .public_addr = cfg->listen,
        .reply_fd = u->req ? http_request_fd(u->req) : -1,
        .started_at = p->started_at,
        .upgrades = p->upgrades,
        .usage = usage_to_json(p->usage, ev_now(u->h.loop)),
    };
    if (collect_children(p, h) < 0 || collect_conns(u->h.control, true, h) < 0 ||
        collect_conns(u->h.public, false, h) < 0) {
        snprintf(err, len, "out of memory");
        return -1;
    }
    return 0;
}

/* Frees only what handover_collect made: the rest was borrowed. */
static void handover_release(struct handover *h)
{
    free(h->children);
    free(h->conns);
    json_decref(h->usage);
}

/* The handover as it stands now, in a memfd: its fd, or -1 with ERR. */
static int handover_now(struct upgrade *u, char *err, size_t len)
{
    struct handover h;
    int fd = handover_collect(u, &h, err, len) < 0 ? -1 : handover_write(&h, err, len);
    handover_release(&h);
    return fd;
}

/* ---------- 3. exec ---------- */

/* FDS survive the exec; every other fd above stderr is closed by it. */
static void keep_fds(const int *fds, size_t n, bool keep)
{
    if (keep)
        util_cloexec_all();
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0)
            (void)fcntl(fds[i], F_SETFD, keep ? 0 : FD_CLOEXEC);
}

static void do_exec(struct upgrade *u)
{
    char err[512];
    struct handover h;
    int state = -1;
    if (handover_collect(u, &h, err, sizeof err) < 0 || (state = handover_write(&h, err, sizeof err)) < 0) {
        handover_release(&h);
        upgrade_fail(u, 500, "%s", err);
        return;
    }
    /* What survives the exec: the memfd, and every fd the handover names. */
    size_t nfds = 4 + h.nconns + h.nchildren, k = 0;
    int *fds = calloc(nfds, sizeof *fds);
    if (!fds) {
        handover_release(&h);
        close(state);
        upgrade_fail(u, 500, "out of memory");
        return;
    }
    fds[k++] = state;
    fds[k++] = h.control_fd;
    fds[k++] = h.public_fd;
    fds[k++] = h.reply_fd;
    for (size_t i = 0; i < h.nconns; i++)
        fds[k++] = h.conns[i].fd;
    for (size_t i = 0; i < h.nchildren; i++)
        fds[k++] = h.children[i].out_fd;
    log_info("upgrade: handing over to %s: %zu child%s, %zu idle connection%s", u->h.exe, h.nchildren,
             h.nchildren == 1 ? "" : "ren", h.nconns, h.nconns == 1 ? "" : "s");
    handover_release(&h);

    char num[16];
    snprintf(num, sizeof num, "%d", state);
    pool_flush_logs(u->h.pool);
    notify_reloading();
    fflush(NULL);
    keep_fds(fds, k, true);
    if (setenv(HANDOVER_ENV, num, 1) == 0)
        execv(u->h.exe, u->h.argv);
    int e = errno;
    /* Still here: nothing has changed hands. */
    keep_fds(fds, k, false);
    unsetenv(HANDOVER_ENV);
    free(fds);
    close(state);
    char summary[256];
    pool_summary(u->h.pool, summary, sizeof summary);
    notify_ready(summary);
    upgrade_fail(u, 500, "exec %s: %s", u->h.exe, strerror(e));
}

/* ---------- 2. drain ---------- */

static size_t busy(const struct upgrade *u)
{
    return http_server_busy(u->h.control, u->req) +
           (u->h.public ? http_server_busy(u->h.public, u->req) : 0);
}

static void drain_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct upgrade *u = w->data;
    size_t n = busy(u);
    if (n == 0) {
        ev_timer_stop(loop, w);
        do_exec(u);
        return;
    }
    if (ev_now(loop) >= u->drain_until)
        upgrade_fail(u, 503, "%zu request%s still under way after %.0f s (upgrade --timeout)", n,
                     n == 1 ? "" : "s", u->timeout);
}

static void drain_begin(struct upgrade *u)
{
    u->phase = UPGRADE_DRAINING;
    http_server_hold(u->h.control, true);
    if (u->h.public)
        http_server_hold(u->h.public, true);
    pool_end_streams(u->h.pool);
    size_t n = busy(u);
    log_info("upgrade: the new binary can take over; waiting for %zu request%s under way to end "
             "(at most %.0f s), new connections wait", n, n == 1 ? "" : "s", u->timeout);
    u->drain_until = ev_now(u->h.loop) + u->timeout;
    ev_timer_stop(u->h.loop, &u->timer);
    ev_init(&u->timer, drain_cb);
    u->timer.data = u;
    u->timer.repeat = DRAIN_POLL_S;
    ev_timer_again(u->h.loop, &u->timer);
}

/* ---------- 1. check ---------- */

static void check_done(struct upgrade *u)
{
    if (u->check_out >= 0 || u->check_status < 0)
        return;                       /* its exit and its last words, both */
    int st = u->check_status;
    char what[128];
    instance_describe_status(st, what, sizeof what);
    const char *text = u->check_text.len ? u->check_text.data : "";
    /* Its words, on one line: "; " between its lines. */
    struct buf one = { 0 };
    for (const char *c = text; *c; c++) {
        bool ok = *c != '\n' ? buf_append(&one, c, 1) : !c[1] || buf_append(&one, "; ", 2);
        if (!ok)
            break;
    }
    if (buf_append(&one, "", 1))
        text = one.data;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
        log_info("upgrade: %s checked: %s", u->h.exe, text);
        buf_free(&one);
        check_stop(u);
        drain_begin(u);
        return;
    }
    char msg[CHECK_OUTPUT_MAX + 256];
    snprintf(msg, sizeof msg, "the new binary %s %s%s%s", u->h.exe, what, *text ? ": " : "", text);
    buf_free(&one);
    upgrade_fail(u, 500, "%s", msg);
}

static void check_exit_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)revents;
    struct upgrade *u = w->data;
    ev_child_stop(loop, w);
    u->check_status = w->rstatus;
    check_done(u);
}

static void check_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct upgrade *u = w->data;
    char chunk[4096];
    ssize_t r = read(u->check_out, chunk, sizeof chunk);
    if (r < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (r > 0) {
        size_t room = CHECK_OUTPUT_MAX - u->check_text.len;
        if (room > 0 && !buf_append(&u->check_text, chunk, (size_t)r < room ? (size_t)r : room))
            log_warn("upgrade: out of memory keeping the check's output");
        return;
    }
    ev_io_stop(loop, w);
    close(u->check_out);
    u->check_out = -1;
    if (!buf_append(&u->check_text, "", 1))    /* NUL-terminated */
        buf_clear(&u->check_text);
    else
        u->check_text.len--;
    check_done(u);
}

static void check_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct upgrade *u = w->data;
    upgrade_fail(u, 500, "the new binary %s did not finish its check within %.0f s", u->h.exe,
                 UPGRADE_CHECK_S);
}

static int check_begin(struct upgrade *u, char *err, size_t len)
{
    int pipefd[2];
    u->check_state = handover_now(u, err, len);
    if (u->check_state < 0)
        return -1;
    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        snprintf(err, len, "pipe: %s", strerror(errno));
        return -1;
    }
    /* Its environment: ours (serve took both handover variables out of
     * it at start), plus where the handover is: its stdin. */
    extern char **environ;
    size_t n = 0;
    while (environ[n])
        n++;
    char **env = calloc(n + 2, sizeof *env);
    if (!env) {
        close(pipefd[0]);
        close(pipefd[1]);
        snprintf(err, len, "out of memory");
        return -1;
    }
    memcpy(env, environ, n * sizeof *env);
    env[n] = HANDOVER_CHECK_ENV "=0";
    u->check_pid = spawn_child_in(u->h.exe, u->h.argv, env, u->check_state, pipefd[1], -1, err, len);
    free(env);
    close(pipefd[1]);
    if (u->check_pid < 0) {
        u->check_pid = 0;
        close(pipefd[0]);
        return -1;
    }
    u->check_out = pipefd[0];
    u->check_status = -1;
    (void)fcntl(u->check_out, F_SETFL, fcntl(u->check_out, F_GETFL) | O_NONBLOCK);
    ev_io_init(&u->check_io, check_read_cb, u->check_out, EV_READ);
    u->check_io.data = u;
    ev_io_start(u->h.loop, &u->check_io);
    ev_child_init(&u->check_w, check_exit_cb, u->check_pid, 0);
    u->check_w.data = u;
    ev_child_start(u->h.loop, &u->check_w);
    ev_timer_stop(u->h.loop, &u->timer);
    ev_timer_init(&u->timer, check_timeout_cb, UPGRADE_CHECK_S, 0.);
    u->timer.data = u;
    ev_timer_start(u->h.loop, &u->timer);
    return 0;
}

void upgrade_begin(struct upgrade *u, struct http_request *req, double timeout)
{
    if (upgrade_running(u)) {
        if (req)
            http_respond_error(req, 409, NULL, "an upgrade is already under way");
        log_warn("upgrade: asked again while one is under way; ignored");
        return;
    }
    if (u->h.pool->shutting_down) {
        if (req)
            http_respond_error(req, 503, "unavailable_error", "llama-pool is shutting down");
        return;
    }
    double def = (double)u->h.pool->cfg->drain_timeout_ms / 1000.0;
    u->timeout = timeout > 0 ? timeout : def > UPGRADE_DRAIN_MIN_S ? def : UPGRADE_DRAIN_MIN_S;
    u->req = req;
    if (req)
        http_request_watch(req, req_gone, NULL, u);
    log_info("upgrade: checking %s%s", u->h.exe, req ? "" : " (SIGUSR2)");
    u->phase = UPGRADE_CHECKING;
    char err[512];
    if (check_begin(u, err, sizeof err) < 0)
        upgrade_fail(u, 500, "cannot run the new binary: %s", err);
}

/* ---------- the new image ---------- */

/* Whether PID is still the process that started at START_TIME. */
static bool still_same(pid_t pid, unsigned long long start_time)
{
    unsigned long long st;
    uint64_t hash;
    return handover_proc(pid, &st, &hash) == 0 && st == start_time;
}

/* A child of the old image that no model here takes: SIGTERM now,
 * SIGKILL to its group after stop_timeout if it is still the same
 * process. libev reaps it. */
struct stray {
    ev_timer t;
    pid_t pid;
    unsigned long long start_time;
};

static void stray_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct stray *s = (struct stray *)w;
    if (still_same(s->pid, s->start_time)) {
        log_warn("upgrade: pid %d still running after SIGTERM; sending SIGKILL", (int)s->pid);
        (void)kill(-s->pid, SIGKILL);
    }
    free(s);
}

static void stray_stop(struct ev_loop *loop, const struct config *cfg, pid_t pid,
                       unsigned long long start_time)
{
    if (kill(-pid, SIGTERM) < 0 && errno == ESRCH)
        (void)kill(pid, SIGTERM);
    struct stray *s = calloc(1, sizeof *s);
    if (!s) {
        (void)kill(-pid, SIGKILL);
        return;
    }
    s->pid = pid;
    s->start_time = start_time;
    ev_timer_init(&s->t, stray_cb, (double)cfg->stop_timeout_ms / 1000.0, 0.);
    ev_timer_start(loop, &s->t);
    ev_unref(loop);               /* it alone keeps nothing running */
}

static enum instance_state state_of(const char *word)
{
    return strcmp(word, "ready") == 0 ? INSTANCE_READY
         : strcmp(word, "starting") == 0 ? INSTANCE_STARTING : INSTANCE_STOPPING;
}

/* Write a whole answer on FD (the waiting `upgrade` command) and close it. */
static void reply(int fd, int status, json_t *body)
{
    if (fd < 0) {
        json_decref(body);
        return;
    }
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    char head[256];
    size_t len = text ? strlen(text) : 0;
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n", status, http_status_text(status), len);
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    struct { const char *p; size_t n; } parts[2] = { { head, (size_t)n }, { text, len } };
    for (int i = 0; i < 2; i++) {
        size_t off = 0;
        while (parts[i].p && off < parts[i].n) {
            ssize_t w = write(fd, parts[i].p + off, parts[i].n - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                break;              /* the command left: its loss */
            off += (size_t)w;
        }
    }
    free(text);
    close(fd);
}

void upgrade_resume(const struct upgrade_host *host, struct handover *h)
{
    struct pool *p = host->pool;
    struct ev_loop *loop = host->loop;
    json_t *adopted = json_array(), *stopped = json_array();
    p->upgrades = h->upgrades + 1;
    if (h->started_at > 0)
        p->started_at = h->started_at;
    if (h->usage) {
        char why[256];
        if (usage_from_json(p->usage, h->usage, why, sizeof why) < 0)
            log_warn("upgrade: the usage counts were not handed over: %s", why);
    }
    for (size_t i = 0; i < h->nchildren; i++) {
        struct handover_child *c = &h->children[i];
        char id[160];
        unsigned long long start;
        uint64_t hash;
        snprintf(id, sizeof id, "%s#%u", c->model, c->no);
        if (handover_proc(c->pid, &start, &hash) < 0 || start != c->start_time) {
            log_warn("upgrade: %s: pid %d is no longer the child handed over; not adopted", id, (int)c->pid);
            if (c->out_fd >= 0)
                close(c->out_fd);
            continue;
        }
        struct pool_model *m = pool_find_named(p, c->model);
        const char *why = NULL;
        if (!m) {
            why = "its model is no longer in pool.conf";
        } else if (hash != c->argv_hash) {
            why = "its command line is not the one handed over";
        } else {
            char **argv = config_child_argv(p->cfg, m->cfg, c->port);
            if (!argv || handover_argv_hash(argv) != hash)
                why = "its model's command line changed in pool.conf";
            else if (m->ninst >= m->cfg->instances_max)
                why = "its model's instances maximum is lower in pool.conf";
            util_strv_free(argv);
        }
        struct instance *inst = NULL;
        if (m) {
            struct instance_adoption a = {
                .pid = c->pid, .port = c->port, .out_fd = c->out_fd, .api_key = c->api_key,
                .state = state_of(c->state), .spawned_at = c->spawned_at, .ready_at = c->ready_at,
                .restarts = c->restarts, .slots = c->slots, .metrics = c->metrics,
                .device = c->device, .visible = c->visible,
            };
            inst = pool_model_adopt(m, c->no, &a);
            if (inst)
                c->api_key = NULL;      /* the instance's now */
        }
        if (!inst || why) {
            if (!why)
                why = "it could not be adopted (out of memory, or its number is taken)";
            log_warn("upgrade: %s (pid %d): %s; stopping it", id, (int)c->pid, why);
            json_array_append_new(stopped, json_pack("{s:s,s:i,s:s}", "instance", id, "pid", c->pid,
                                                     "reason", why));
            if (inst) {
                instance_stop(inst);
            } else {
                if (c->out_fd >= 0)
                    close(c->out_fd);
                stray_stop(loop, p->cfg, c->pid, c->start_time);
            }
            continue;
        }
        log_info("upgrade: %s: adopted pid %d on port %u (%s)", id, (int)c->pid, c->port, c->state);
        json_array_append_new(adopted, json_pack("{s:s,s:i,s:i,s:s}", "instance", id, "pid", c->pid,
                                                 "port", c->port, "state", c->state));
    }
    /* A child that ended during the exec is a zombie: reap it now. */
    ev_feed_signal(SIGCHLD);
    size_t nconns = 0;
    for (size_t i = 0; i < h->nconns; i++) {
        struct http_server *srv = h->conns[i].control ? host->control : host->public;
        if (srv && http_server_adopt_conn(srv, h->conns[i].fd, h->conns[i].trusted) == 0)
            nconns++;
        else
            close(h->conns[i].fd);
    }
    log_info("upgraded in place from llama-pool %s (pid %d, upgrade %u): %zu instance%s adopted, "
             "%zu stopped, %zu idle connection%s taken over", h->from_version ? h->from_version : "?",
             (int)getpid(), p->upgrades, json_array_size(adopted), json_array_size(adopted) == 1 ? "" : "s",
             json_array_size(stopped), nconns, nconns == 1 ? "" : "s");
    reply(h->reply_fd, 200,
          json_pack("{s:b,s:i,s:s,s:s,s:i,s:o,s:o,s:I}", "upgraded", 1, "pid", (int)getpid(),
                    "from_version", h->from_version ? h->from_version : "", "version", LLAMA_POOL_VERSION,
                    "upgrades", p->upgrades, "adopted", adopted, "stopped", stopped,
                    "connections", (json_int_t)nconns));
    h->reply_fd = -1;
}

void upgrade_resume_failed(struct handover *h, const char *why)
{
    log_error("upgrade: the new image cannot serve: %s; stopping the %zu child%s handed over", why,
              h->nchildren, h->nchildren == 1 ? "" : "ren");
    for (size_t i = 0; i < h->nchildren; i++)
        if (still_same(h->children[i].pid, h->children[i].start_time))
            (void)kill(-h->children[i].pid, SIGKILL);
    reply(h->reply_fd, 500,
          json_pack("{s:{s:s,s:s,s:i}}", "error", "message", why, "type", "server_error", "code", 500));
    h->reply_fd = -1;
}

void upgrade_kill_children(void)
{
    DIR *dir = opendir("/proc");
    struct dirent *e;
    pid_t self = getpid();
    size_t n = 0;
    if (!dir) {
        log_error("upgrade: /proc: %s; children may be left running", strerror(errno));
        return;
    }
    while ((e = readdir(dir))) {
        char path[300], line[4096];
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0)
            continue;
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        FILE *f = fopen(path, "re");
        if (!f)
            continue;
        bool ours = false;
        if (fgets(line, sizeof line, f)) {
            const char *p = strrchr(line, ')');
            int ppid;
            char state;
            ours = p && sscanf(p + 1, " %c %d", &state, &ppid) == 2 && ppid == self;
        }
        fclose(f);
        if (ours) {
            (void)kill(-(pid_t)pid, SIGKILL);
            (void)kill((pid_t)pid, SIGKILL);
            n++;
        }
    }
    closedir(dir);
    log_error("upgrade: killed %zu child%s nobody can take over", n, n == 1 ? "" : "ren");
}

int upgrade_check(int fd)
{
    struct handover h;
    char err[512];
    if (handover_read(fd, &h, err, sizeof err) < 0) {
        printf("cannot take over: %s\n", err);
        return -1;
    }
    if (h.pid != getppid()) {
        printf("cannot take over: the handover is from pid %d, not from my parent %d\n", (int)h.pid,
               (int)getppid());
        handover_free(&h);
        return -1;
    }
    printf("llama-pool %s can take over %zu child%s and %zu connection%s\n", LLAMA_POOL_VERSION,
           h.nchildren, h.nchildren == 1 ? "" : "ren", h.nconns, h.nconns == 1 ? "" : "s");
    handover_free(&h);
    return 0;
}
