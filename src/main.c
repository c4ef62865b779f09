/* main — argv → serve, check, or a client command. */
#define _GNU_SOURCE
#include "api.h"
#include "build_config.h"
#include "cgroup.h"
#include "cli.h"
#include "config.h"
#include "events.h"
#include "gpu.h"
#include "http.h"
#include "log.h"
#include "memory.h"
#include "notify.h"
#include "pool.h"
#include "router.h"
#include "upgrade.h"
#include "util.h"

#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

static void usage(FILE *f)
{
    fputs("usage: llama-pool COMMAND [options]\n"
          "\n"
          "  serve   [-c FILE]                  run the supervisor in the foreground\n"
          "  status  [--json] [--summary|--all] [MODEL]\n"
          "                                     instances, like `pm2 ls`; a summary past 200 models\n"
          "  status  --usage [--all] [--json]   requests, tokens and loads per model, most used first\n"
          "  start   MODEL [-n N] [--no-wait]   load (N instances), show progress until ready\n"
          "  stop    MODEL | --all              unload\n"
          "  restart MODEL\n"
          "  logs    MODEL [-f] [-n LINES]\n"
          "  monit   [--json]                   what happens, live: instances, evictions, requests\n"
          "  reload                             re-read pool.conf (same as SIGHUP)\n"
          "  upgrade [--timeout S]              run the installed binary in place: same pid,\n"
          "                                     children and sockets kept (same as SIGUSR2)\n"
          "  check   [-c FILE]                  validate a config, print what it would run\n"
          "\n"
          "options for every command:\n"
          "  -c, --config FILE    pool.conf ($LLAMA_POOL_CONFIG, else " CONFIG_DEFAULT_PATH ")\n"
          "  -s, --socket PATH    control socket ($LLAMA_POOL_SOCKET, else the config's control_socket)\n"
          "  -v, --verbose        (serve) debug logging\n"
          "  -h, --help           this text;  -V, --version\n"
          "\n"
          "exit status: 0 ok, 1 failed, 2 usage, 3 daemon not running, 4 unknown model\n", f);
}

static const char *config_path(const char *opt)
{
    if (opt)
        return opt;
    const char *env = getenv("LLAMA_POOL_CONFIG");
    return env && *env ? env : CONFIG_DEFAULT_PATH;
}

static void print_errors(const struct config_errors *errs)
{
    for (size_t i = 0; i < errs->n; i++)
        fprintf(stderr, "%s\n", errs->msgs[i]);
}

/* ---------- check ---------- */

/* One instance of M: host memory, and VRAM on the GPUs it would use. */
static void check_estimate(const struct config *cfg, const struct config_model *m, unsigned ndev)
{
    struct memory_estimate e;
    char err[512], host[32], weights[32], vram[32];
    /* As the daemon: a child it places sees one GPU, one whose args choose
     * sees them all. */
    bool fixed = config_child_gpus_fixed(cfg, m);
    if (memory_estimate_devices(cfg, m, ndev ? (fixed ? ndev : 1) : 0, &e, err, sizeof err) < 0) {
        printf("  estimate: %s\n", err);
        return;
    }
    printf("  estimate: host %s (weights %s, shared per file)", util_format_bytes(e.weights + e.more, host, sizeof host),
           util_format_bytes(e.weights, weights, sizeof weights));
    uint64_t v = m->gpu_memory ? m->gpu_memory : e.vram_total;
    if (ndev && v)
        printf("; VRAM %s%s (%u of the layers)", util_format_bytes(v, vram, sizeof vram),
               m->gpu_memory ? " (gpu_memory)" : "", e.n_gpu_layers);
    else if (ndev)
        printf("; no VRAM");
    printf("\n");
}

static int cmd_check(const char *path)
{
    struct config_errors errs = { 0 };
    struct config *cfg = config_load(path, &errs);
    if (!cfg) {
        print_errors(&errs);
        fprintf(stderr, "%s: %zu error%s\n", path, errs.n, errs.n == 1 ? "" : "s");
        config_errors_free(&errs);
        return CLI_FAILED;
    }
    printf("%s: ok, %zu model%s\n", path, cfg->nmodels, cfg->nmodels == 1 ? "" : "s");
    /* The GPUs the daemon would use, for the estimates below. */
    unsigned ndev = 0;
    if (cfg->gpus == CONFIG_GPUS_AUTO) {
        char err[256];
        struct gpus *g = gpus_open(cfg->nvml_library ? cfg->nvml_library : CONFIG_DEFAULT_NVML_LIBRARY,
                                   err, sizeof err);
        if (g) {
            ndev = (unsigned)gpus_count(g);
            for (size_t d = 0; d < ndev; d++) {
                char total[32], budget[32];
                const struct gpu_device *dv = gpus_device(g, d);
                printf("GPU %u: %s, %s, budget %s\n", dv->index, dv->name,
                       util_format_bytes(dv->total, total, sizeof total),
                       util_format_bytes(gpu_budget(cfg, dv->total), budget, sizeof budget));
            }
        } else {
            printf("no GPU in use (%s): host memory only\n", err);
        }
        gpus_close(g);
    }
    for (size_t i = 0; i < cfg->nmodels; i++) {
        const struct config_model *m = &cfg->models[i];
        printf("\n[%s]%s instances %u-%u%s\n", m->name, m->from_models_dir ? " (models_dir)" : "",
               m->instances_min, m->instances_max, m->pin ? ", pinned" : "");
        if (m->naliases) {
            printf("  aliases:");
            for (size_t j = 0; j < m->naliases; j++)
                printf("%s %s", j ? "," : "", m->aliases[j]);
            printf("\n");
        }
        for (size_t j = 0; j < m->nenv; j++)
            printf("  env: %s=%s\n", m->env[j].name, m->env[j].value);
        char **argv = config_child_argv(cfg, m, cfg->port_min);
        printf("  argv:");
        for (char **a = argv; a && *a; a++) {
            /* Show each word so that spaces inside one are visible. */
            bool plain = **a && strcspn(*a, " \t'\"\\$`") == strlen(*a);
            printf(plain ? " %s" : " '%s'", *a);
        }
        printf("\n");
        util_strv_free(argv);
        check_estimate(cfg, m, ndev);
    }
    config_free(cfg);
    return CLI_OK;
}

/* ---------- serve ---------- */

struct daemon {
    struct ev_loop *loop;
    struct pool *pool;
    struct router *router;
    struct api api;
    struct cgroup_tree cgroups;
    struct http_server *control;
    struct http_server *public;
    char *config_file;
    struct upgrade *upgrade;
    ev_signal sigterm, sigint, sighup, sigusr2;
    ev_timer kill_timer;
    ev_timer flush_timer;
    double flush_until;
    int signals;
};

static struct http_limits limits_of(const struct config *cfg)
{
    return (struct http_limits){
        .max_header = cfg->max_header,
        .max_body = cfg->max_body,
        .header_timeout_ms = cfg->header_timeout_ms,
        .body_timeout_ms = cfg->body_timeout_ms,
        .keepalive_timeout_ms = cfg->keepalive_timeout_ms,
        .max_connections = cfg->max_connections,
    };
}

static void errors_to_json(const struct config_errors *errs, json_t **out)
{
    json_t *list = json_array();
    size_t len = 0;
    for (size_t i = 0; i < errs->n; i++) {
        json_array_append_new(list, json_string(errs->msgs[i]));
        len += strlen(errs->msgs[i]) + 2;
    }
    char *msg = calloc(1, len + 64);
    if (msg) {
        strcpy(msg, "reload refused, the running config is kept: ");
        for (size_t i = 0; i < errs->n; i++) {
            strcat(msg, i ? "; " : "");
            strcat(msg, errs->msgs[i]);
        }
    }
    *out = json_pack("{s:{s:s,s:s,s:i},s:o}", "error", "message", msg ? msg : "reload refused",
                     "type", "invalid_request_error", "code", 400, "errors", list);
    free(msg);
}

static int daemon_reload(struct api *api, json_t **result)
{
    struct daemon *d = (struct daemon *)((char *)api - offsetof(struct daemon, api));
    struct config_errors errs = { 0 };
    log_info("reloading %s", d->config_file);
    notify_reloading();
    struct config *cfg = config_load(d->config_file, &errs);
    if (!cfg) {
        for (size_t i = 0; i < errs.n; i++)
            log_error("reload: %s", errs.msgs[i]);
        log_error("reload refused; still running the previous config");
        errors_to_json(&errs, result);
        config_errors_free(&errs);
        char buf[256];
        pool_summary(d->pool, buf, sizeof buf);
        notify_ready(buf);
        return -1;
    }
    const struct config *old = d->pool->cfg;
    if (strcmp(old->listen ? old->listen : "", cfg->listen ? cfg->listen : "") != 0 ||
        strcmp(old->control_socket, cfg->control_socket) != 0)
        log_warn("reload: listen and control_socket changes take effect at the next restart");
    if (strcmp(old->state_dir ? old->state_dir : "", cfg->state_dir ? cfg->state_dir : "") != 0) {
        const char *kept = usage_path(d->pool->usage);
        log_warn("reload: a state_dir change takes effect at the next restart (usage is kept %s%s until then)",
                 kept ? "in " : "in memory only", kept ? kept : "");
    }
    struct http_limits lim = limits_of(cfg);
    if (d->control)
        http_server_set_limits(d->control, &lim);
    if (d->public)
        http_server_set_limits(d->public, &lim);
    json_t *summary = json_object();
    pool_reload(d->pool, cfg, summary);
    router_reload(d->router);
    char *s = json_dumps(summary, JSON_COMPACT);
    log_info("reloaded: %s", s ? s : "");
    free(s);
    if (events_wanted(d->pool->events))
        events_publish(d->pool->events, "reload", json_deep_copy(summary));
    *result = summary;
    char buf[256];
    pool_summary(d->pool, buf, sizeof buf);
    notify_ready(buf);
    return 0;
}

#define FLUSH_LIMIT_S 5.0   /* after the last child: answers still being written */
#define FLUSH_POLL_S  0.02

static size_t open_connections(const struct daemon *d)
{
    return (d->public ? http_server_connections(d->public) : 0) +
           (d->control ? http_server_connections(d->control) : 0);
}

/* Every child is gone: exit once the last answers have left (their
 * connections close after a response while shutting down), FLUSH_LIMIT_S
 * at most. */
static void flush_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct daemon *d = w->data;
    size_t open = open_connections(d);
    if (open > 0 && ev_now(loop) < d->flush_until)
        return;
    if (open > 0)
        log_warn("%zu client connection%s still open after %.0f s; closing them",
                 open, open == 1 ? "" : "s", FLUSH_LIMIT_S);
    ev_timer_stop(loop, w);
    ev_break(loop, EVBREAK_ALL);
}

static void on_pool_stopped(struct pool *p, void *arg)
{
    struct daemon *d = arg;
    log_info("every instance has stopped; exiting");
    d->flush_until = ev_now(p->loop) + FLUSH_LIMIT_S;
    ev_timer_init(&d->flush_timer, flush_cb, 0., FLUSH_POLL_S);
    d->flush_timer.data = d;
    ev_timer_start(p->loop, &d->flush_timer);
}

static void kill_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    struct daemon *d = w->data;
    log_warn("instances still running; sending SIGKILL");
    pool_kill_all(d->pool);
}

#define SHUTDOWN_RETRY_AFTER_S 5   /* what queued requests are told at shutdown */

static void on_stop_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    struct daemon *d = w->data;
    if (d->signals++ > 0) {
        log_warn("second %s: killing every instance now", strsignal(w->signum));
        pool_kill_all(d->pool);
        return;
    }
    const struct config *cfg = d->pool->cfg;
    log_info("%s: stopping every instance (in-flight requests get drain_timeout %.0f s)",
             strsignal(w->signum), (double)cfg->drain_timeout_ms / 1000.0);
    notify_stopping();
    upgrade_cancel(d->upgrade, "a stop signal arrived");
    if (d->public)
        http_server_shutdown(d->public);
    if (d->control)
        http_server_shutdown(d->control);
    router_shutdown(d->router, SHUTDOWN_RETRY_AFTER_S);
    /* Children drain, then get stop_timeout each (in parallel); SIGKILL a
     * little after. */
    ev_timer_init(&d->kill_timer, kill_timer_cb,
                  (double)(cfg->drain_timeout_ms + cfg->stop_timeout_ms) / 1000.0 + 1.0, 0.);
    d->kill_timer.data = d;
    ev_timer_start(loop, &d->kill_timer);
    pool_shutdown(d->pool, on_pool_stopped, d);
}

static void on_sighup(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop; (void)revents;
    struct daemon *d = w->data;
    json_t *result = NULL;
    daemon_reload(&d->api, &result);
    json_decref(result);
}

static void on_sigusr2(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop; (void)revents;
    struct daemon *d = w->data;
    upgrade_begin(d->upgrade, NULL, 0);
}

static void daemon_upgrade(struct api *api, struct http_request *req, double timeout)
{
    struct daemon *d = (struct daemon *)((char *)api - offsetof(struct daemon, api));
    if (!d->upgrade) {
        http_respond_error(req, 500, NULL, "out of memory");
        return;
    }
    upgrade_begin(d->upgrade, req, timeout);
}

/* The daemon's own argv and binary, for an upgrade to run again. */
static char **g_argv;
static char *g_exe;

/* Where the handover is: the fd number in environment variable NAME
 * (removed from the environment: children must not see it), -1 if unset
 * or not a number. */
static int handover_fd(const char *name)
{
    const char *v = getenv(name);
    if (!v)
        return -1;
    char *end;
    long fd = strtol(v, &end, 10);
    unsetenv(name);
    return *v && !*end && fd >= 0 && fd < INT_MAX ? (int)fd : -1;
}

/* Serve the API on ADDR: on socket INHERITED (an upgrade), else on a new
 * one. NULL with ERR. */
static struct http_server *open_server(struct daemon *d, const char *addr, int inherited,
                                       const struct http_limits *lim, char *err, size_t errlen)
{
    struct http_server *srv = inherited >= 0
        ? http_server_adopt(d->loop, inherited, addr, lim, api_handle, &d->api, err, errlen)
        : http_server_listen(d->loop, addr, lim, api_handle, &d->api, err, errlen);
    if (srv)
        http_server_set_admit(srv, api_admit);
    return srv;
}

static int ensure_socket_dir(const char *sock)
{
    char *copy = strdup(sock);
    if (!copy)
        return -1;
    char *dir = dirname(copy);
    struct stat st;
    int rc = 0;
    if (stat(dir, &st) < 0) {
        /* Create it, parents too (mkdir -p), e.g. /run/llama-pool outside systemd. */
        for (char *p = dir + 1; ; p++) {
            if (*p == '/' || *p == '\0') {
                char c = *p;
                *p = '\0';
                if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
                    rc = -1;
                    break;
                }
                *p = c;
                if (!c)
                    break;
            }
        }
    }
    free(copy);
    return rc;
}

/* Big transient buffers (the status of 10,000 models, a /metrics scrape,
 * a large request body) get their own mappings, given back when freed.
 * glibc's default threshold rises to the size of the first such buffer
 * freed, and the next ones then come from the heap, whose memory stays
 * with the daemon: 4 MiB more after one full status of 10,000 models. */
#define SERVE_MMAP_THRESHOLD (256 * 1024)

static int cmd_serve(const char *given)
{
    /* An allocator without the knob (ASan's) keeps its own ways. */
    (void)mallopt(M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD);
    /* The binary an upgrade runs: the path this one was started from,
     * resolved now, before a new file is renamed over it. */
    g_exe = realpath("/proc/self/exe", NULL);
    struct config_errors errs = { 0 };
    char *resolved = realpath(given, NULL);
    const char *path = resolved ? resolved : given;
    bool checking = getenv(HANDOVER_CHECK_ENV) != NULL;
    int check_fd = handover_fd(HANDOVER_CHECK_ENV);
    int handover = handover_fd(HANDOVER_ENV);
    struct handover ho = { .control_fd = -1, .public_fd = -1, .reply_fd = -1 };
    char err[512];
    if (handover >= 0) {
        int rc = handover_read(handover, &ho, err, sizeof err);
        close(handover);
        if (rc < 0) {
            /* The children are ours and nobody can name them: better
             * none than orphans. */
            log_error("upgrade: %s", err);
            upgrade_kill_children();
            free(resolved);
            return CLI_FAILED;
        }
    }
    struct config *cfg = config_load(path, &errs);
    if (!cfg) {
        print_errors(&errs);
        fprintf(stderr, "llama-pool: %s has %zu error%s; not starting\n", path, errs.n,
                errs.n == 1 ? "" : "s");
        if (handover >= 0) {
            snprintf(err, sizeof err, "%s: %s", path, errs.n ? errs.msgs[0] : "cannot be loaded");
            upgrade_resume_failed(&ho, err);
            handover_free(&ho);
        }
        config_errors_free(&errs);
        free(resolved);
        return CLI_FAILED;
    }
    if (checking) {
        int rc = check_fd >= 0 ? upgrade_check(check_fd) : -1;
        if (check_fd < 0)
            printf("cannot take over: %s is not an fd number\n", HANDOVER_CHECK_ENV);
        config_free(cfg);
        free(resolved);
        return rc == 0 ? CLI_OK : CLI_FAILED;
    }

    static struct daemon d;          /* static: its cgroup_tree is two PATH_MAX */
    d.loop = ev_default_loop(EVFLAG_AUTO);
    if (!d.loop) {
        fprintf(stderr, "llama-pool: cannot initialise the event loop\n");
        config_free(cfg);
        return CLI_FAILED;
    }
    d.config_file = resolved ? resolved : strdup(given);
    signal(SIGPIPE, SIG_IGN);
    /* Grandchildren a llama-server leaves behind are ours to reap, not init's. */
    (void)prctl(PR_SET_CHILD_SUBREAPER, 1);
    /* Before any thread or child: the daemon may move into a leaf cgroup. */
    cgroup_tree_open(&d.cgroups, getenv(CGROUP_ROOT_ENV));
    if (d.cgroups.enabled)
        log_info("cgroups: each instance runs in a cgroup of its own under %s (llama-pool itself in %s/%s)",
                 d.cgroups.dir, d.cgroups.dir, CGROUP_LEAF);
    else
        log_info("cgroups: not in use (%s): children share the daemon's cgroup; stops use the process group",
                 d.cgroups.reason);

    struct http_limits lim = limits_of(cfg);
    if (handover < 0 && ensure_socket_dir(cfg->control_socket) < 0)
        log_warn("cannot create the directory of %s: %s", cfg->control_socket, strerror(errno));
    d.api.reload = daemon_reload;
    d.api.upgrade = daemon_upgrade;
    const char *cs = cfg->control_socket;
    const char *ls = cfg->listen && *cfg->listen ? cfg->listen : NULL;
    if (handover >= 0) {
        /* An upgrade: the sockets stay the ones the clients know. */
        const char *hcs = ho.control_addr ? ho.control_addr : cs;
        const char *hls = ho.public_fd < 0 ? NULL : ho.public_addr && *ho.public_addr ? ho.public_addr : ls;
        if (strcmp(hcs, cs) != 0 || !hls != !ls || (hls && ls && strcmp(hls, ls) != 0))
            log_warn("upgrade: listen and control_socket changes take effect at the next restart");
        cs = hcs;
        ls = hls;
    }
    d.control = open_server(&d, cs, ho.control_fd, &lim, err, sizeof err);
    if (d.control && ls)
        d.public = open_server(&d, ls, ho.public_fd, &lim, err, sizeof err);
    if (!d.control || (ls && !d.public)) {
        if (handover >= 0)
            upgrade_resume_failed(&ho, err);
        else
            log_error("%s %s: %s", d.control ? "listen" : "control socket", d.control ? ls : cs, err);
        goto fail;
    }
    log_info("llama-pool %s: %zu model%s from %s; control socket %s%s%s", LLAMA_POOL_VERSION,
             cfg->nmodels, cfg->nmodels == 1 ? "" : "s", d.config_file, cs,
             d.public ? "; listening on " : "", d.public ? ls : "");

    d.pool = pool_new(d.loop, cfg);
    if (!d.pool) {
        log_error("out of memory");
        cfg = NULL;
        goto fail;
    }
    cfg = NULL;                     /* the pool owns it now */
    pool_use_cgroups(d.pool, &d.cgroups);
    d.api.pool = d.pool;
    d.router = router_new(d.loop, d.pool);
    if (!d.router) {
        log_error("out of memory");
        goto fail;
    }
    d.api.router = d.router;
    struct upgrade_host host = { .loop = d.loop, .pool = d.pool, .router = d.router, .control = d.control,
                                 .public = d.public, .exe = g_exe, .argv = g_argv };
    d.upgrade = g_exe && g_argv ? upgrade_new(&host) : NULL;
    if (handover >= 0) {
        upgrade_resume(&host, &ho);
        handover_free(&ho);
    }
    pool_preload(d.pool);
    pool_preload_popular(d.pool);       /* after the minimums: what is left of the budget */

    ev_signal_init(&d.sigterm, on_stop_signal, SIGTERM);
    ev_signal_init(&d.sigint, on_stop_signal, SIGINT);
    ev_signal_init(&d.sighup, on_sighup, SIGHUP);
    ev_signal_init(&d.sigusr2, on_sigusr2, SIGUSR2);
    d.sigterm.data = d.sigint.data = d.sighup.data = d.sigusr2.data = &d;
    ev_signal_start(d.loop, &d.sigterm);
    ev_signal_start(d.loop, &d.sigint);
    ev_signal_start(d.loop, &d.sighup);
    ev_signal_start(d.loop, &d.sigusr2);

    notify_init(d.loop);
    char summary[256];
    pool_summary(d.pool, summary, sizeof summary);
    notify_ready(summary);

    ev_run(d.loop, 0);

    notify_stop();
    upgrade_free(d.upgrade);
    /* Clients first (their requests end through the router), then the rest. */
    http_server_free(d.public);
    http_server_free(d.control);
    router_free(d.router);
    /* Last: the requests ended above are counted too. */
    pool_usage_save(d.pool);
    pool_free(d.pool);
    free(d.config_file);
    log_info("exited cleanly");
    return CLI_OK;

fail:
    handover_free(&ho);
    upgrade_free(d.upgrade);
    http_server_free(d.public);
    http_server_free(d.control);
    router_free(d.router);
    if (d.pool) {
        pool_kill_all(d.pool);
        pool_free(d.pool);
    }
    config_free(cfg);
    free(d.config_file);
    return CLI_FAILED;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' },
        { "socket", required_argument, NULL, 's' },
        { "verbose", no_argument, NULL, 'v' },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    const char *config = NULL, *sock = NULL;
    bool verbose = false;
    /* An upgrade runs this binary again, as it was run: kept before the
     * command word is moved below. */
    g_argv = calloc((size_t)argc + 1, sizeof *g_argv);
    for (int i = 0; g_argv && i < argc; i++)
        g_argv[i] = argv[i];

    /* Options for every command may come first ("llama-pool -c FILE -s S
     * status"): move the command word in front of them. */
    int first = 1;
    while (first < argc && argv[first][0] == '-') {
        const char *o = argv[first];
        bool takes_value = strcmp(o, "-c") == 0 || strcmp(o, "-s") == 0 ||
                           strcmp(o, "--config") == 0 || strcmp(o, "--socket") == 0;
        bool inline_value = strncmp(o, "--config=", 9) == 0 || strncmp(o, "--socket=", 9) == 0;
        if (!takes_value && !inline_value && strcmp(o, "-v") != 0 && strcmp(o, "--verbose") != 0)
            break;                          /* -h, -V, or a mistake: handled below */
        first += takes_value ? 2 : 1;
    }
    if (first > 1 && first < argc) {
        char *command = argv[first];
        memmove(&argv[2], &argv[1], (size_t)(first - 1) * sizeof *argv);
        argv[1] = command;
    }
    if (argc < 2) {
        usage(stderr);
        return CLI_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return CLI_OK;
    }
    if (strcmp(cmd, "-V") == 0 || strcmp(cmd, "--version") == 0) {
        printf("llama-pool %s\n", LLAMA_POOL_VERSION);
        return CLI_OK;
    }
    log_init(LOG_INFO);
    curl_global_init(CURL_GLOBAL_DEFAULT);

    if (strcmp(cmd, "serve") == 0 || strcmp(cmd, "check") == 0) {
        int c;
        optind = 2;
        while ((c = getopt_long(argc, argv, "c:s:vhV", opts, NULL)) != -1) {
            switch (c) {
            case 'c': config = optarg; break;
            case 's': sock = optarg; break;
            case 'v': verbose = true; break;
            case 'h': usage(stdout); return CLI_OK;
            case 'V': printf("llama-pool %s\n", LLAMA_POOL_VERSION); return CLI_OK;
            default: usage(stderr); return CLI_USAGE;
            }
        }
        if (optind < argc) {
            fprintf(stderr, "llama-pool %s: unexpected argument \"%s\"\n", cmd, argv[optind]);
            return CLI_USAGE;
        }
        int rc;
        if (strcmp(cmd, "check") == 0) {
            rc = cmd_check(config_path(config));
        } else {
            log_init(verbose ? LOG_DEBUG : LOG_INFO);
            rc = cmd_serve(config_path(config));
        }
        curl_global_cleanup();
        return rc;
    }
    int rc = cli_run(argc - 1, argv + 1, sock, config);
    curl_global_cleanup();
    return rc;
}
