#define _GNU_SOURCE
#include "cli.h"

#include "api.h"

#include "config.h"
#include "memory.h"
#include "util.h"

#include <curl/curl.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/llama-pool/control.sock"

struct client {
    const char *socket;
    bool tty;
};

/* ---------- finding the daemon ---------- */

/* -s, then $LLAMA_POOL_SOCKET, then control_socket from the config file
 * (read for that key only: a config with errors elsewhere still says where
 * the daemon listens), then the default. */
static char *resolve_socket(const char *opt, const char *config)
{
    if (opt)
        return strdup(opt);
    const char *env = getenv("LLAMA_POOL_SOCKET");
    if (env && *env)
        return strdup(env);
    if (!config) {
        const char *c = getenv("LLAMA_POOL_CONFIG");
        config = c && *c ? c : CONFIG_DEFAULT_PATH;
    }
    char *sock = config_peek_pool_key(config, "control_socket");
    if (sock && sock[0] != '/') {
        /* Relative to the config file, as the daemon reads it. */
        const char *slash = strrchr(config, '/');
        char *abs = NULL;
        if (slash && asprintf(&abs, "%.*s/%s", (int)(slash - config), config, sock) >= 0) {
            free(sock);
            sock = abs;
        }
    }
    return sock ? sock : strdup(DEFAULT_SOCKET);
}

/* ---------- HTTP over the control socket ---------- */

struct reply {
    CURL *curl;
    struct buf body;         /* the answer; with on_line, its unfinished last line */
    long status;
    /* Streaming: called per complete line; returns false to stop. */
    bool (*on_line)(const char *line, void *arg);
    void *arg;
};

static size_t reply_write(char *data, size_t size, size_t nmemb, void *userp)
{
    struct reply *r = userp;
    size_t n = size * nmemb;
    if (!buf_append(&r->body, data, n))
        return 0;
    if (!r->on_line)
        return n;
    /* Only a successful answer is a stream of lines; an error is one body. */
    curl_easy_getinfo(r->curl, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->status >= 300)
        return n;
    /* Hand over complete lines, keep the rest. */
    char *text = r->body.data;
    size_t start = 0;
    for (size_t i = 0; i < r->body.len; i++) {
        if (text[i] != '\n')
            continue;
        text[i] = '\0';
        bool go_on = r->on_line(text + start, r->arg);
        start = i + 1;
        if (!go_on)
            return 0;
    }
    buf_consume(&r->body, start);
    return n;
}

/* Returns the HTTP status, or -1 when the daemon cannot be reached (a
 * message is printed). */
static long request(struct client *c, const char *method, const char *path, struct reply *r)
{
    CURL *curl = curl_easy_init();
    if (!curl) {
        fprintf(stderr, "llama-pool: cannot initialise libcurl\n");
        return -1;
    }
    char url[2048], errbuf[CURL_ERROR_SIZE] = "";
    snprintf(url, sizeof url, "http://localhost%s", path);
    curl_easy_setopt(curl, CURLOPT_UNIX_SOCKET_PATH, c->socket);
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method);
    if (strcmp(method, "POST") == 0) {
        curl_easy_setopt(curl, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, 0L);
    }
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, reply_write);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, r);
    r->curl = curl;
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "llama-pool-cli");
    CURLcode rc = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(curl);
    if (rc == CURLE_WRITE_ERROR && r->on_line)   /* the line handler stopped us */
        return status;
    if (rc == CURLE_GOT_NOTHING) {
        fprintf(stderr, "llama-pool: the daemon closed the connection without answering (see its log)\n");
        return -1;
    }
    if (rc == CURLE_COULDNT_CONNECT || (rc != CURLE_OK && status == 0)) {
        fprintf(stderr, "llama-pool: the daemon is not running (nothing answers on %s)\n", c->socket);
        return -1;
    }
    if (rc != CURLE_OK) {
        fprintf(stderr, "llama-pool: %s\n", errbuf[0] ? errbuf : curl_easy_strerror(rc));
        return -1;
    }
    return status;
}

/* An error reply: print its message, map its status to an exit code. */
static int report_error(long status, const struct reply *r)
{
    const char *body = r->body.data;
    json_t *j = body ? json_loads(body, 0, NULL) : NULL;
    const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    json_t *errors = json_object_get(j, "errors");
    if (json_array_size(errors)) {
        size_t i;
        json_t *e;
        json_array_foreach(errors, i, e)
            fprintf(stderr, "%s\n", json_string_value(e));
        fprintf(stderr, "llama-pool: reload refused; the daemon keeps its current config\n");
    } else {
        fprintf(stderr, "llama-pool: %s\n", msg ? msg : (body && *body ? body : "request failed"));
    }
    json_decref(j);
    return status == 404 ? CLI_UNKNOWN_MODEL : CLI_FAILED;
}

/* Sends METHOD PATH. True when the daemon answered with success (2xx): the
 * body is in R, for the caller to free. Else false, with what went wrong
 * printed (an error answer is kept whole even with a line handler: see
 * reply_write), R's body freed, and the exit code in *RC. */
static bool call(struct client *c, const char *method, const char *path, struct reply *r, int *rc)
{
    long status = request(c, method, path, r);
    if (status >= 0 && status < 300)
        return true;
    *rc = status < 0 ? CLI_NO_DAEMON : report_error(status, r);
    buf_free(&r->body);
    return false;
}

static char *escape_path_part(const char *s)
{
    CURL *curl = curl_easy_init();
    char *e = curl ? curl_easy_escape(curl, s, 0) : NULL;
    char *copy = e ? strdup(e) : NULL;
    curl_free(e);
    if (curl)
        curl_easy_cleanup(curl);
    return copy;
}

/* ---------- status ---------- */

static void fmt_duration(double s, char *buf, size_t len)
{
    long t = (long)s;
    if (t < 60)
        snprintf(buf, len, "%lds", t);
    else if (t < 3600)
        snprintf(buf, len, "%ldm%02lds", t / 60, t % 60);
    else if (t < 86400)
        snprintf(buf, len, "%ldh%02ldm", t / 3600, t % 3600 / 60);
    else
        snprintf(buf, len, "%ldd%02ldh", t / 86400, t % 86400 / 3600);
}

#define NCOLS 10
struct table {
    int ncols;                  /* columns in use, NCOLS at most */
    char *(*cells)[NCOLS];
    size_t rows, cap;
    int width[NCOLS];
};

/* Display width of UTF-8 text: count code points, not bytes. */
static int text_width(const char *s)
{
    int w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

/* Adds a row of copies of CELLS (NULL shows as "-"); false when out of
 * memory. */
static bool table_add(struct table *t, char *cells[NCOLS])
{
    if (!util_grow(&t->cells, &t->cap, t->rows + 1, sizeof *t->cells))
        return false;
    char **row = t->cells[t->rows];
    for (int i = 0; i < t->ncols; i++) {
        if (!(row[i] = strdup(cells[i] ? cells[i] : "-"))) {
            while (i--)
                free(row[i]);
            return false;
        }
    }
    for (int i = 0; i < t->ncols; i++) {
        int w = text_width(row[i]);
        if (w > t->width[i])
            t->width[i] = w;
    }
    t->rows++;
    return true;
}

static void table_print(const struct table *t)
{
    for (size_t r = 0; r < t->rows; r++) {
        for (int i = 0; i < t->ncols; i++) {
            const char *s = t->cells[r][i];
            bool last = i == t->ncols - 1;
            int pad = t->width[i] - text_width(s);
            printf("%s%*s%s", s, last ? 0 : pad, "", last ? "\n" : "  ");
        }
    }
}

static void table_free(struct table *t)
{
    for (size_t r = 0; r < t->rows; r++)
        for (int i = 0; i < t->ncols; i++)
            free(t->cells[r][i]);
    free(t->cells);
}

/* The rows of one model: one per instance, or one for the model alone.
 * False when out of memory. */
static bool status_rows(struct table *t, json_t *model)
{
    const char *name = json_string_value(json_object_get(model, "name"));
    json_t *insts = json_object_get(model, "instances");
    if (json_array_size(insts) == 0) {
        char *cells[NCOLS] = { (char *)name, NULL, (char *)json_string_value(json_object_get(model, "state")) };
        return table_add(t, cells);
    }
    size_t i;
    json_t *in;
    json_array_foreach(insts, i, in) {
        char pid[16] = "-", port[8] = "-", up[24] = "-", rs[12], mem[56] = "-", slots[24] = "-",
             used[32] = "-", state[48];
        json_t *v;
        if ((v = json_object_get(in, "pid")) && json_is_integer(v))
            snprintf(pid, sizeof pid, "%lld", (long long)json_integer_value(v));
        if ((v = json_object_get(in, "port")) && json_is_integer(v))
            snprintf(port, sizeof port, "%lld", (long long)json_integer_value(v));
        if (json_is_integer(json_object_get(in, "pid")))
            fmt_duration(json_number_value(json_object_get(in, "uptime_s")), up, sizeof up);
        snprintf(rs, sizeof rs, "%lld", (long long)json_integer_value(json_object_get(in, "restarts")));
        json_int_t m = json_integer_value(json_object_get(in, "memory"));
        if (m > 0)
            util_format_bytes((uint64_t)m, mem, sizeof mem);
        /* With a cgroup: "PSS · memory.current" (status --json has both). */
        json_int_t cgm = json_integer_value(json_object_get(in, "cgroup_memory"));
        if (cgm > 0) {
            char c[24];
            size_t n = strlen(mem);
            snprintf(mem + n, sizeof mem - n, " · %s", util_format_bytes((uint64_t)cgm, c, sizeof c));
        }
        json_int_t total = json_integer_value(json_object_get(in, "slots"));
        if (total > 0)
            snprintf(slots, sizeof slots, "%lld/%lld",
                     (long long)json_integer_value(json_object_get(in, "in_flight")), (long long)total);
        if ((v = json_object_get(in, "last_used_s_ago")) && json_is_number(v)) {
            fmt_duration(json_number_value(v), used, sizeof used - 4);
            strcat(used, " ago");
        }
        snprintf(state, sizeof state, "%s", json_string_value(json_object_get(in, "state")));
        if ((v = json_object_get(in, "next_start_s")) && json_is_number(v))
            snprintf(state, sizeof state, "restart in %.0fs", ceil(json_number_value(v)));
        char *cells[NCOLS] = { i ? "" : (char *)name, (char *)json_string_value(json_object_get(in, "id")),
                               state, pid, port, up, rs, mem, slots, used };
        if (!table_add(t, cells))
            return false;
    }
    return true;
}

/* Reads the options of a command whose only one is the switch --NAME
 * (also -SHORT unless SHORT is 0): *ON says whether it was given. False on
 * any other option (getopt has said which); else optind is at the first
 * operand. */
static bool read_switch(int argc, char **argv, const char *name, char short_opt, bool *on)
{
    const struct option opts[] = { { name, no_argument, NULL, 1 }, { NULL, 0, NULL, 0 } };
    const char shorts[] = { short_opt, '\0' };
    *on = false;
    optind = 1;
    for (int ch; (ch = getopt_long(argc, argv, shorts, opts, NULL)) != -1;) {
        if (ch != 1 && (!short_opt || ch != short_opt))
            return false;
        *on = true;
    }
    return true;
}

/* Above this many models, `status` shows a summary: counts by state and
 * the models with instances (a table of ten thousand stopped models
 * helps nobody); --all pages through every model, STATUS_PAGE a request. */
#define STATUS_SUMMARY_ABOVE 200
#define STATUS_PAGE 1000            /* the daemon's most per page */

/* GET PATH as JSON; NULL with *RC set (and the reason printed) on failure. */
static json_t *get_json(struct client *c, const char *path, int *rc)
{
    struct reply r = { 0 };
    if (!call(c, "GET", path, &r, rc))
        return NULL;
    json_t *j = r.body.data ? json_loadb(r.body.data, r.body.len, 0, NULL) : NULL;
    buf_free(&r.body);
    if (!json_is_object(j)) {
        json_decref(j);
        fprintf(stderr, "llama-pool: the daemon's answer is not JSON\n");
        *rc = CLI_FAILED;
        return NULL;
    }
    return j;
}

/* The full status of every model, read a page at a time and put together
 * as one document (without offset and limit). A daemon that does not
 * page answers the whole status to the first request. */
static json_t *get_all_pages(struct client *c, int *rc)
{
    json_t *all = NULL;
    for (size_t offset = 0;; offset += STATUS_PAGE) {
        char path[96];
        snprintf(path, sizeof path, "/pool/status?offset=%zu&limit=%d", offset, STATUS_PAGE);
        json_t *page = get_json(c, path, rc);
        if (!page) {
            json_decref(all);
            return NULL;
        }
        size_t got = json_array_size(json_object_get(page, "models"));
        json_int_t total = json_integer_value(json_object_get(page, "total"));
        if (!all) {
            all = page;
        } else {
            json_array_extend(json_object_get(all, "models"), json_object_get(page, "models"));
            json_decref(page);
        }
        if (got == 0 || (json_int_t)(offset + STATUS_PAGE) >= total)
            break;
    }
    json_object_del(all, "offset");
    json_object_del(all, "limit");
    return all;
}

/* "3 ready, 1 failed" from a counts object, states in ORDER, the zero
 * ones left out; "none" when all are. */
static void fmt_counts(json_t *counts, const char *const *order, char *out, size_t len)
{
    size_t n = 0;
    out[0] = '\0';
    for (const char *const *s = order; *s && n < len; s++) {
        json_int_t k = json_integer_value(json_object_get(counts, *s));
        if (k > 0) {
            int w = snprintf(out + n, len - n, "%s%lld %s", n ? ", " : "", (long long)k, *s);
            n += w > 0 ? (size_t)w : 0;
        }
    }
    if (!out[0])
        snprintf(out, len, "none");
}

/* The table of the models in J (a full status, a page put together, or a
 * summary), then the pool's memory, queue, devices and errors. */
static int print_status(json_t *j)
{
    bool summary = json_is_true(json_object_get(j, "summary"));
    json_t *models = json_object_get(j, "models");
    struct table t = { .ncols = NCOLS };
    char *head[NCOLS] = { "MODEL", "INSTANCE", "STATE", "PID", "PORT", "UPTIME", "↺", "MEMORY", "SLOTS", "LAST USED" };
    bool ok = table_add(&t, head);
    size_t i;
    json_t *model;
    json_array_foreach(models, i, model)
        ok = ok && status_rows(&t, model);
    if (ok && (!summary || json_array_size(models)))
        table_print(&t);
    table_free(&t);
    if (!ok) {
        fprintf(stderr, "llama-pool: out of memory\n");
        return CLI_FAILED;
    }
    if (summary) {
        /* Models and instances have the same states. */
        static const char *const order[] = { "ready", "starting", "stopping", "failed", "stopped", NULL };
        json_t *counts = json_object_get(j, "counts");
        char by_model[256], by_inst[256];
        fmt_counts(json_object_get(counts, "models"), order, by_model, sizeof by_model);
        fmt_counts(json_object_get(counts, "instances"), order, by_inst, sizeof by_inst);
        json_int_t total = json_integer_value(json_object_get(j, "total"));
        if (!json_array_size(models))
            printf("no model has an instance\n");
        printf("\n%lld model%s: %s · instances: %s\n", (long long)total, total == 1 ? "" : "s",
               by_model, by_inst);
    } else {
        printf("\n");
    }
    json_t *mem = json_object_get(j, "memory");
    char used[32], budget[32];
    printf("memory %s used of %s budget · queue %lld/%lld\n",
           util_format_bytes((uint64_t)json_integer_value(json_object_get(mem, "used")), used, sizeof used),
           util_format_bytes((uint64_t)json_integer_value(json_object_get(mem, "budget")), budget, sizeof budget),
           (long long)json_integer_value(json_object_get(json_object_get(j, "queue"), "waiting")),
           (long long)json_integer_value(json_object_get(json_object_get(j, "queue"), "max")));
    json_t *dev;
    json_array_foreach(json_object_get(j, "devices"), i, dev) {
        char charged[32], gbudget[32], measured[32], free_b[32];
        printf("GPU %lld %s: %s charged of %s budget, %s measured, %s free%s\n",
               (long long)json_integer_value(json_object_get(dev, "index")),
               json_string_value(json_object_get(dev, "name")) ? json_string_value(json_object_get(dev, "name")) : "?",
               util_format_bytes((uint64_t)json_integer_value(json_object_get(dev, "used")), charged, sizeof charged),
               util_format_bytes((uint64_t)json_integer_value(json_object_get(dev, "budget")), gbudget, sizeof gbudget),
               util_format_bytes((uint64_t)json_integer_value(json_object_get(dev, "measured")), measured, sizeof measured),
               util_format_bytes((uint64_t)json_integer_value(json_object_get(dev, "free")), free_b, sizeof free_b),
               json_is_true(json_object_get(dev, "lost")) ? " (lost: not used)" : "");
    }
    json_t *cg = json_object_get(j, "cgroup");
    if (json_is_true(json_object_get(cg, "enabled"))) {
        char cur[32];
        printf("cgroups: an instance each under %s, %s in use (MEMORY: PSS · cgroup memory.current)\n",
               json_string_value(json_object_get(cg, "path")),
               util_format_bytes((uint64_t)json_integer_value(json_object_get(mem, "cgroup_measured")),
                                 cur, sizeof cur));
    }
    json_array_foreach(models, i, model) {
        const char *err = json_string_value(json_object_get(model, "last_error"));
        if (err) {
            printf("%s: %s\n", json_string_value(json_object_get(model, "name")), err);
            continue;
        }
        /* An instance waiting to restart says why it stopped (a crash, an
         * OOM kill) until it is ready again. */
        size_t k;
        json_t *in;
        json_array_foreach(json_object_get(model, "instances"), k, in) {
            const char *ierr = json_string_value(json_object_get(in, "last_error"));
            if (ierr && json_is_number(json_object_get(in, "next_start_s")))
                printf("%s: %s\n", json_string_value(json_object_get(in, "id")), ierr);
        }
    }
    if (summary) {
        json_int_t unlisted = json_integer_value(json_object_get(j, "total")) - (json_int_t)json_array_size(models);
        if (unlisted > 0)
            printf("%lld model%s without instances not listed: `llama-pool status --all` lists every model\n",
                   (long long)unlisted, unlisted == 1 ? "" : "s");
    }
    return CLI_OK;
}

/* The usage table (GET /pool/usage): most used first. */
static int print_usage(json_t *j)
{
    enum { USAGE_COLS = 7 };
    struct table t = { .ncols = USAGE_COLS };
    char *head[NCOLS] = { "MODEL", "REQUESTS", "PROMPT TOK", "GENERATED TOK", "LOADS", "AVG LOAD",
                          "LAST USED" };
    bool ok = table_add(&t, head);
    json_t *models = json_object_get(j, "models"), *m;
    size_t i;
    double now = (double)time(NULL);
    json_array_foreach(models, i, m) {
        char name[300], req[24], prompt[24], gen[24], loads[24], avg[24] = "-", used[32] = "-";
        json_int_t nloads = json_integer_value(json_object_get(m, "loads"));
        json_t *last = json_object_get(m, "last_used_unix");
        snprintf(name, sizeof name, "%s%s", json_string_value(json_object_get(m, "name")),
                 json_is_false(json_object_get(m, "configured")) ? " (not in pool.conf)" : "");
        snprintf(req, sizeof req, "%lld", (long long)json_integer_value(json_object_get(m, "requests")));
        snprintf(prompt, sizeof prompt, "%lld", (long long)json_integer_value(json_object_get(m, "prompt_tokens")));
        snprintf(gen, sizeof gen, "%lld", (long long)json_integer_value(json_object_get(m, "generated_tokens")));
        snprintf(loads, sizeof loads, "%lld", (long long)nloads);
        if (nloads > 0)
            snprintf(avg, sizeof avg, "%.2fs",
                     json_number_value(json_object_get(m, "load_seconds")) / (double)nloads);
        if (json_is_integer(last)) {
            double ago = now - (double)json_integer_value(last);
            fmt_duration(ago > 0 ? ago : 0, used, sizeof used - 4);
            strcat(used, " ago");
        }
        char *cells[NCOLS] = { name, req, prompt, gen, loads, avg, used };
        ok = ok && table_add(&t, cells);
    }
    if (ok && json_array_size(models))
        table_print(&t);
    table_free(&t);
    if (!ok) {
        fprintf(stderr, "llama-pool: out of memory\n");
        return CLI_FAILED;
    }
    if (!json_array_size(models))
        printf("no model has been used yet\n");
    const char *file = json_string_value(json_object_get(j, "state_file"));
    if (file)
        printf("\nkept in %s\n", file);
    else
        printf("\nkept in memory only (no usable state_dir): lost when the daemon stops\n");
    json_int_t elsewhere = json_integer_value(json_object_get(j, "not_configured"));
    bool listed = false;
    json_array_foreach(models, i, m)
        listed = listed || json_is_false(json_object_get(m, "configured"));
    if (elsewhere > 0 && !listed)
        printf("%lld model%s no longer in pool.conf not listed: `llama-pool status --usage --all` lists %s\n",
               (long long)elsewhere, elsewhere == 1 ? "" : "s", elsewhere == 1 ? "it" : "them");
    return CLI_OK;
}

/* GET PATH, its body printed as the daemon wrote it. */
static int print_body(struct client *c, const char *path)
{
    struct reply r = { 0 };
    int rc;
    if (!call(c, "GET", path, &r, &rc))
        return rc;
    fwrite(r.body.data, 1, r.body.len, stdout);
    buf_free(&r.body);
    return CLI_OK;
}

static int cmd_status(struct client *c, int argc, char **argv)
{
    enum { OPT_SUMMARY = 1, OPT_ALL, OPT_USAGE };
    static const struct option opts[] = {
        { "json", no_argument, NULL, 'j' },
        { "summary", no_argument, NULL, OPT_SUMMARY },
        { "all", no_argument, NULL, OPT_ALL },
        { "usage", no_argument, NULL, OPT_USAGE },
        { NULL, 0, NULL, 0 },
    };
    bool as_json = false, summary = false, all = false, usage = false;
    optind = 1;
    for (int ch; (ch = getopt_long(argc, argv, "j", opts, NULL)) != -1;) {
        switch (ch) {
        case 'j':         as_json = true; break;
        case OPT_SUMMARY: summary = true; break;
        case OPT_ALL:     all = true; break;
        case OPT_USAGE:   usage = true; break;
        default:          return CLI_USAGE;
        }
    }
    const char *model = optind < argc ? argv[optind] : NULL;
    if (usage) {
        if (summary || model) {
            fprintf(stderr, "llama-pool status: --usage lists the usage of every model; it takes no MODEL or --summary\n");
            return CLI_USAGE;
        }
        const char *path = all ? "/pool/usage?all=1" : "/pool/usage";
        if (as_json)
            return print_body(c, path);
        int rc = CLI_OK;
        json_t *j = get_json(c, path, &rc);
        if (!j)
            return rc;
        rc = print_usage(j);
        json_decref(j);
        return rc;
    }
    if (summary && all) {
        fprintf(stderr, "llama-pool status: --summary and --all ask for different things; give one\n");
        return CLI_USAGE;
    }
    if (model && (summary || all)) {
        fprintf(stderr, "llama-pool status: MODEL shows that model; --summary and --all are for the whole pool\n");
        return CLI_USAGE;
    }

    int rc = CLI_OK;
    json_t *j = NULL;
    if (model) {
        char *m = escape_path_part(model);
        char path[1024];
        snprintf(path, sizeof path, "/pool/status?model=%s", m ? m : "");
        free(m);
        if (as_json)
            return print_body(c, path);
        j = get_json(c, path, &rc);
    } else if (all) {
        j = get_all_pages(c, &rc);
    } else if (as_json && !summary) {
        return print_body(c, "/pool/status");   /* every model in one answer, as ever: scripts rely on it */
    } else {
        /* The summary first: its total says whether a table of every
         * model is worth showing. A daemon that knows no summary answers
         * the full status, shown as it is. */
        j = get_json(c, "/pool/status?summary=1", &rc);
        if (j && !summary && json_is_true(json_object_get(j, "summary")) &&
            json_integer_value(json_object_get(j, "total")) <= STATUS_SUMMARY_ABOVE) {
            json_decref(j);
            j = get_json(c, "/pool/status", &rc);
        }
    }
    if (!j)
        return rc;
    if (as_json) {
        char *text = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!text) {
            fprintf(stderr, "llama-pool: out of memory\n");
            return CLI_FAILED;
        }
        puts(text);
        free(text);
        return CLI_OK;
    }
    rc = print_status(j);
    json_decref(j);
    return rc;
}

/* ---------- start / stop / restart with progress ---------- */

struct progress {
    struct client *c;
    const char *model;
    int result;              /* CLI_OK once ready/stopped, CLI_FAILED on failure */
    bool done;
    double t0;
    char last[256];          /* the last line shown on a tty */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void progress_show(struct progress *p, const char *text)
{
    if (p->c->tty) {
        /* One line, rewritten in place, cut to a terminal's width. */
        printf("\r\033[K%s: %.1fs %.100s", p->model, now_s() - p->t0, text);
        fflush(stdout);
    }
    snprintf(p->last, sizeof p->last, "%s", text);
}

static void progress_end_line(struct progress *p)
{
    if (p->c->tty)
        printf("\r\033[K");
}

static bool progress_line(const char *line, void *arg)
{
    struct progress *p = arg;
    json_t *j = json_loads(line, 0, NULL);
    const char *event = json_string_value(json_object_get(j, "event"));
    if (!event) {
        json_decref(j);
        return true;
    }
    const char *inst = json_string_value(json_object_get(j, "instance"));
    char buf[512];
    if (strcmp(event, "log") == 0) {
        progress_show(p, json_string_value(json_object_get(j, "line")));
    } else if (strcmp(event, "state") == 0) {
        json_t *pid = json_object_get(j, "pid"), *port = json_object_get(j, "port");
        snprintf(buf, sizeof buf, "%s %s", inst, json_string_value(json_object_get(j, "state")));
        if (pid)
            snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " (pid %lld, port %lld)",
                     (long long)json_integer_value(pid), (long long)json_integer_value(port));
        progress_show(p, buf);
        if (!p->c->tty && strcmp(json_string_value(json_object_get(j, "state")), "ready") != 0)
            printf("%s: %s\n", p->model, buf);
    } else if (strcmp(event, "ready") == 0) {
        progress_end_line(p);
        json_t *insts = json_object_get(json_object_get(j, "status"), "instances");
        size_t i;
        json_t *in;
        json_array_foreach(insts, i, in) {
            if (strcmp(json_string_value(json_object_get(in, "state")), "ready") != 0)
                continue;
            printf("%s: %s ready on port %lld (pid %lld)\n", p->model,
                   json_string_value(json_object_get(in, "id")),
                   (long long)json_integer_value(json_object_get(in, "port")),
                   (long long)json_integer_value(json_object_get(in, "pid")));
        }
        printf("%s: ready after %.1f s\n", p->model, now_s() - p->t0);
        p->result = CLI_OK;
        p->done = true;
    } else if (strcmp(event, "stopped") == 0) {
        progress_end_line(p);
        printf("%s: stopped\n", p->model);
        p->result = CLI_OK;
        p->done = true;
    } else if (strcmp(event, "failed") == 0) {
        progress_end_line(p);
        fprintf(stderr, "%s: failed to start%s%s: %s\n", p->model, inst ? " " : "", inst ? inst : "",
                json_string_value(json_object_get(j, "error")));
        json_t *log = json_object_get(j, "log");
        if (json_array_size(log)) {
            fprintf(stderr, "last lines of its log:\n");
            size_t i;
            json_t *l;
            json_array_foreach(log, i, l)
                fprintf(stderr, "  %s\n", json_string_value(l));
        }
        p->result = CLI_FAILED;
        p->done = true;
    }
    fflush(stdout);
    json_decref(j);
    return !p->done;
}

static int model_action(struct client *c, const char *action, const char *model, unsigned n, bool wait)
{
    char *m = escape_path_part(model);
    char path[1024];
    snprintf(path, sizeof path, "/pool/models/%s/%s?%s%s", m ? m : "", action,
             wait ? "wait=1" : "", "");
    if (n)
        snprintf(path + strlen(path), sizeof path - strlen(path), "%sinstances=%u", wait ? "&" : "", n);
    free(m);

    struct progress p = { .c = c, .model = model, .result = CLI_FAILED, .t0 = now_s() };
    struct reply r = { 0 };
    if (wait) {
        r.on_line = progress_line;
        r.arg = &p;
    }
    int rc;
    if (!call(c, "POST", path, &r, &rc))
        return rc;
    buf_free(&r.body);
    if (!wait) {
        printf("%s: %s requested\n", model, action);
        return CLI_OK;
    }
    if (!p.done) {
        progress_end_line(&p);
        fprintf(stderr, "%s: the daemon closed the connection before the %s finished%s%s\n", model,
                action, p.last[0] ? "; last: " : "", p.last);
        return CLI_FAILED;
    }
    return p.result;
}

static int cmd_start(struct client *c, int argc, char **argv)
{
    static const struct option opts[] = {
        { "instances", required_argument, NULL, 'n' },
        { "no-wait", no_argument, NULL, 'W' },
        { NULL, 0, NULL, 0 },
    };
    unsigned n = 0;
    bool wait = true;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "n:", opts, NULL)) != -1) {
        if (ch == 'n') {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || v < 1 || v > 1000) {
                fprintf(stderr, "llama-pool start: -n wants a number of instances, not \"%s\"\n", optarg);
                return CLI_USAGE;
            }
            n = (unsigned)v;
        } else if (ch == 'W') {
            wait = false;
        } else {
            return CLI_USAGE;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: llama-pool start MODEL [-n N] [--no-wait]\n");
        return CLI_USAGE;
    }
    return model_action(c, "start", argv[optind], n, wait);
}

static int cmd_stop(struct client *c, int argc, char **argv)
{
    bool all;
    if (!read_switch(argc, argv, "all", 0, &all))
        return CLI_USAGE;
    if (all == (optind < argc) || optind < argc - 1) {
        fprintf(stderr, "usage: llama-pool stop MODEL | --all\n");
        return CLI_USAGE;
    }
    if (!all)
        return model_action(c, "stop", argv[optind], 0, true);

    struct reply r = { 0 };
    long status = request(c, "GET", "/pool/status", &r);
    if (status < 0)
        return CLI_NO_DAEMON;
    json_t *j = status == 200 ? json_loads(r.body.data, 0, NULL) : NULL;
    buf_free(&r.body);
    if (!j) {
        fprintf(stderr, "llama-pool: cannot read the daemon's status\n");
        return CLI_FAILED;
    }
    /* Ask every model to stop first (they stop in parallel), then wait. */
    json_t *models = json_object_get(j, "models"), *model;
    size_t i;
    int rc = CLI_OK, stopped = 0;
    for (int pass = 0; pass < 2; pass++) {
        json_array_foreach(models, i, model) {
            if (json_array_size(json_object_get(model, "instances")) == 0)
                continue;
            const char *name = json_string_value(json_object_get(model, "name"));
            if (pass == 0) {
                char *m = escape_path_part(name);
                char path[1024];
                snprintf(path, sizeof path, "/pool/models/%s/stop", m ? m : "");
                free(m);
                struct reply r2 = { 0 };
                (void)request(c, "POST", path, &r2);
                buf_free(&r2.body);
            } else {
                int one = model_action(c, "stop", name, 0, true);
                if (one != CLI_OK)
                    rc = one;
                stopped++;
            }
        }
    }
    if (!stopped)
        printf("nothing is running\n");
    json_decref(j);
    return rc;
}

static int cmd_restart(struct client *c, int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: llama-pool restart MODEL\n");
        return CLI_USAGE;
    }
    return model_action(c, "restart", argv[1], 0, true);
}

/* ---------- logs ---------- */

static bool print_line(const char *line, void *arg)
{
    bool *replaced = arg;
    if (replaced && strcmp(line, API_FOLLOW_REPLACED) == 0) {
        *replaced = true;          /* not printed: the follow goes on */
        return true;
    }
    printf("%s\n", line);
    fflush(stdout);
    return true;
}

static int cmd_logs(struct client *c, int argc, char **argv)
{
    static const struct option opts[] = {
        { "follow", no_argument, NULL, 'f' },
        { "lines", required_argument, NULL, 'n' },
        { NULL, 0, NULL, 0 },
    };
    bool follow = false;
    long lines = 50;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "fn:", opts, NULL)) != -1) {
        if (ch == 'f') {
            follow = true;
        } else if (ch == 'n') {
            char *end;
            lines = strtol(optarg, &end, 10);
            if (*end || lines < 0) {
                fprintf(stderr, "llama-pool logs: -n wants a number of lines, not \"%s\"\n", optarg);
                return CLI_USAGE;
            }
        } else {
            return CLI_USAGE;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: llama-pool logs MODEL [-f] [-n LINES]\n");
        return CLI_USAGE;
    }
    char *m = escape_path_part(argv[optind]);
    bool replaced;
    do {
        /* An upgrade in place ends a follow: follow the new image, from
         * its next line on. */
        char path[1024];
        replaced = false;
        snprintf(path, sizeof path, "/pool/models/%s/logs?lines=%ld%s", m ? m : "", lines,
                 follow ? "&follow=1" : "");
        struct reply r = { .on_line = print_line, .arg = follow ? &replaced : NULL };
        int rc;
        if (!call(c, "GET", path, &r, &rc)) {
            free(m);
            return rc;
        }
        if (r.body.len)
            printf("%s\n", r.body.data);
        buf_free(&r.body);
        lines = 0;
    } while (follow && replaced);
    free(m);
    return CLI_OK;
}

/* ---------- monit ---------- */

/* GET /pool/events, read line by line: "event: TYPE", "data: JSON", a
 * blank line; ": ..." comments (pings) skipped. */
struct monit {
    bool json;
    bool replaced;              /* an "upgrade" event came: follow again */
    char type[32];
};

static const char *jstr(json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "";
}

/* "HH:MM:SS" local time of the event: its own "time" (a request's), else now. */
static void monit_clock(json_t *o, char *buf, size_t len)
{
    time_t t = time(NULL);
    const char *at = jstr(o, "time");
    struct tm tm;
    if (*at && strptime(at, "%Y-%m-%dT%H:%M:%S", &tm)) {
        tm.tm_isdst = 0;
        t = timegm(&tm);
    }
    localtime_r(&t, &tm);
    strftime(buf, len, "%H:%M:%S", &tm);
}

static void monit_print(const struct monit *mo, json_t *o)
{
    char clock[16], more[256] = "";
    monit_clock(o, clock, sizeof clock);
    const char *t = mo->type;
    if (strcmp(t, "request") == 0) {
        size_t n = 0;
        json_t *v;
        n += (size_t)snprintf(more + n, sizeof more - n, "%s %s  %lld  %.3f s", jstr(o, "method"),
                              jstr(o, "path"), (long long)json_integer_value(json_object_get(o, "status")),
                              json_number_value(json_object_get(o, "duration")));
        if ((v = json_object_get(o, "prompt_tokens")) && n < sizeof more)
            n += (size_t)snprintf(more + n, sizeof more - n, "  %lld+%lld tok", (long long)json_integer_value(v),
                                  (long long)json_integer_value(json_object_get(o, "generated_tokens")));
        if ((v = json_object_get(o, "cached_tokens")) && json_integer_value(v) && n < sizeof more)
            n += (size_t)snprintf(more + n, sizeof more - n, " (%lld cached)", (long long)json_integer_value(v));
        if ((v = json_object_get(o, "tokens_per_s")) && n < sizeof more)
            snprintf(more + n, sizeof more - n, "  %.1f tok/s", json_number_value(v));
    } else if (strcmp(t, "instance") == 0) {
        size_t n = (size_t)snprintf(more, sizeof more, "%s -> %s", jstr(o, "old"), jstr(o, "state"));
        json_t *pid = json_object_get(o, "pid");
        if (pid && n < sizeof more)
            n += (size_t)snprintf(more + n, sizeof more - n, "  pid %lld port %lld", (long long)json_integer_value(pid),
                                  (long long)json_integer_value(json_object_get(o, "port")));
        if (*jstr(o, "error") && n < sizeof more)
            snprintf(more + n, sizeof more - n, "  %s", jstr(o, "error"));
    } else if (strcmp(t, "evict") == 0) {
        snprintf(more, sizeof more, "%s", strcmp(jstr(o, "reason"), "idle") == 0 ? "idle_timeout passed"
                                                                                : "least recently used, room needed");
    } else if (strcmp(t, "reload") == 0) {
        size_t n = 0;
        const char *keys[] = { "added", "removed", "changed" };
        for (int k = 0; k < 3 && n < sizeof more; k++) {
            json_t *list = json_object_get(o, keys[k]), *v;
            size_t i;
            if (!json_array_size(list))
                continue;
            n += (size_t)snprintf(more + n, sizeof more - n, "%s%s:", n ? "; " : "", keys[k]);
            json_array_foreach(list, i, v)
                if (n < sizeof more)
                    n += (size_t)snprintf(more + n, sizeof more - n, " %s", json_string_value(v));
        }
        if (!n)
            snprintf(more, sizeof more, "nothing changed");
    } else if (strcmp(t, "upgrade") == 0) {
        snprintf(more, sizeof more, "the daemon is upgrading in place (from llama-pool %s)", jstr(o, "from"));
    }
    printf("%s  %-8s  %-20s  %-22s  %s\n", clock, t, jstr(o, "model"), jstr(o, "instance"), more);
}

static bool monit_line(const char *line, void *arg)
{
    struct monit *mo = arg;
    if (strncmp(line, "event: ", 7) == 0) {
        snprintf(mo->type, sizeof mo->type, "%s", line + 7);
        return true;
    }
    if (strncmp(line, "data: ", 6) != 0)
        return true;            /* a blank line, a ping */
    json_t *o = json_loads(line + 6, 0, NULL);
    if (!json_is_object(o)) {
        json_decref(o);
        return true;
    }
    if (strcmp(mo->type, "upgrade") == 0)
        mo->replaced = true;
    if (mo->json) {
        json_t *all = json_pack("{s:s}", "event", mo->type);
        json_object_update(all, o);
        char *s = json_dumps(all, JSON_COMPACT | JSON_REAL_PRECISION(6));
        if (s)
            printf("%s\n", s);
        free(s);
        json_decref(all);
    } else {
        monit_print(mo, o);
    }
    json_decref(o);
    fflush(stdout);
    return true;
}

static int cmd_monit(struct client *c, int argc, char **argv)
{
    struct monit mo = { 0 };
    if (!read_switch(argc, argv, "json", 0, &mo.json) || optind != argc) {
        fprintf(stderr, "usage: llama-pool monit [--json]\n");
        return CLI_USAGE;
    }
    do {
        /* An upgrade in place ends the stream after its "upgrade" event:
         * the new image's comes next. */
        mo.replaced = false;
        struct reply r = { .on_line = monit_line, .arg = &mo };
        int rc;
        if (!call(c, "GET", "/pool/events", &r, &rc))
            return rc;
        buf_free(&r.body);
    } while (mo.replaced);
    return CLI_OK;
}

/* ---------- reload ---------- */

static int cmd_reload(struct client *c, int argc, char **argv)
{
    (void)argv;
    if (argc != 1) {
        fprintf(stderr, "usage: llama-pool reload\n");
        return CLI_USAGE;
    }
    struct reply r = { 0 };
    int rc;
    if (!call(c, "POST", "/pool/reload", &r, &rc))
        return rc;
    json_t *j = json_loads(r.body.data, 0, NULL);
    buf_free(&r.body);
    const char *keys[] = { "added", "removed", "changed" };
    for (int k = 0; k < 3; k++) {
        json_t *list = json_object_get(j, keys[k]), *v;
        size_t i;
        if (!json_array_size(list))
            continue;
        printf("%s:", keys[k]);
        json_array_foreach(list, i, v)
            printf(" %s", json_string_value(v));
        printf("\n");
    }
    printf("reloaded (%lld unchanged)\n", (long long)json_integer_value(json_object_get(j, "unchanged")));
    json_decref(j);
    return CLI_OK;
}

/* ---------- upgrade ---------- */

static int cmd_upgrade(struct client *c, int argc, char **argv)
{
    static const struct option opts[] = {
        { "timeout", required_argument, NULL, 't' },
        { NULL, 0, NULL, 0 },
    };
    double timeout = 0;
    bool bad = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end = NULL;
        if (ch == 't')
            timeout = strtod(optarg, &end);
        bad = bad || ch != 't' || *end || !(timeout >= 1 && timeout <= 86400);
    }
    if (bad || optind != argc) {
        fprintf(stderr, "usage: llama-pool upgrade [--timeout SECONDS]   (1 to 86400)\n");
        return CLI_USAGE;
    }
    char path[64] = "/pool/upgrade";
    if (timeout > 0)
        snprintf(path, sizeof path, "/pool/upgrade?timeout=%g", timeout);
    struct reply r = { 0 };
    int rc;
    if (!call(c, "POST", path, &r, &rc))
        return rc;
    json_t *j = json_loads(r.body.data ? r.body.data : "", 0, NULL);
    buf_free(&r.body);
    if (!j) {
        fprintf(stderr, "llama-pool: the daemon's answer to upgrade is not JSON\n");
        return CLI_FAILED;
    }
    json_t *v;
    size_t i;
    json_array_foreach(json_object_get(j, "adopted"), i, v)
        printf("kept %s: pid %lld, port %lld, %s\n", jstr(v, "instance"),
               (long long)json_integer_value(json_object_get(v, "pid")),
               (long long)json_integer_value(json_object_get(v, "port")), jstr(v, "state"));
    json_array_foreach(json_object_get(j, "stopped"), i, v)
        printf("stopping %s: pid %lld: %s\n", jstr(v, "instance"),
               (long long)json_integer_value(json_object_get(v, "pid")), jstr(v, "reason"));
    printf("upgraded in place: pid %lld, llama-pool %s -> %s (upgrade %lld)\n",
           (long long)json_integer_value(json_object_get(j, "pid")), jstr(j, "from_version"),
           jstr(j, "version"), (long long)json_integer_value(json_object_get(j, "upgrades")));
    json_decref(j);
    return CLI_OK;
}

int cli_run(int argc, char **argv, const char *sock_opt, const char *config)
{
    /* -c/-s may come before the subcommand's own options; take them out. */
    char **args = calloc((size_t)argc + 1, sizeof *args);
    if (!args)
        return CLI_FAILED;
    int n = 0;
    for (int i = 0; i < argc; i++) {
        if ((strcmp(argv[i], "-s") == 0 || strcmp(argv[i], "--socket") == 0) && i + 1 < argc) {
            sock_opt = argv[++i];
        } else if ((strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) && i + 1 < argc) {
            config = argv[++i];
        } else if (strncmp(argv[i], "--socket=", 9) == 0) {
            sock_opt = argv[i] + 9;
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            config = argv[i] + 9;
        } else {
            args[n++] = argv[i];
        }
    }
    if (n == 0) {
        fprintf(stderr, "llama-pool: which command? (try llama-pool --help)\n");
        free(args);
        return CLI_USAGE;
    }
    char *sock = resolve_socket(sock_opt, config);
    struct client c = { .socket = sock, .tty = isatty(STDOUT_FILENO) };
    int rc;
    const char *cmd = args[0];
    if (strcmp(cmd, "status") == 0)
        rc = cmd_status(&c, n, args);
    else if (strcmp(cmd, "start") == 0)
        rc = cmd_start(&c, n, args);
    else if (strcmp(cmd, "stop") == 0)
        rc = cmd_stop(&c, n, args);
    else if (strcmp(cmd, "restart") == 0)
        rc = cmd_restart(&c, n, args);
    else if (strcmp(cmd, "logs") == 0)
        rc = cmd_logs(&c, n, args);
    else if (strcmp(cmd, "reload") == 0)
        rc = cmd_reload(&c, n, args);
    else if (strcmp(cmd, "monit") == 0)
        rc = cmd_monit(&c, n, args);
    else if (strcmp(cmd, "upgrade") == 0)
        rc = cmd_upgrade(&c, n, args);
    else {
        fprintf(stderr, "llama-pool: unknown command \"%s\" (try llama-pool --help)\n", cmd);
        rc = CLI_USAGE;
    }
    free(sock);
    free(args);
    return rc;
}
