/* handover — the document one image of the daemon leaves the next. */
#define _GNU_SOURCE
#include "handover.h"

#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

/* ---------- to and from JSON ---------- */

static json_t *fd_json(int fd)
{
    return fd >= 0 ? json_integer(fd) : json_null();
}

static json_t *child_json(const struct handover_child *c)
{
    char hash[17];
    snprintf(hash, sizeof hash, "%016" PRIx64, c->argv_hash);
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "model", util_json_string(c->model));
    json_object_set_new(o, "no", json_integer(c->no));
    json_object_set_new(o, "pid", json_integer(c->pid));
    json_object_set_new(o, "port", json_integer(c->port));
    json_object_set_new(o, "start_time", json_integer((json_int_t)c->start_time));
    json_object_set_new(o, "argv_hash", json_string(hash));
    json_object_set_new(o, "out_fd", fd_json(c->out_fd));
    json_object_set_new(o, "api_key", c->api_key ? util_json_string(c->api_key) : json_null());
    json_object_set_new(o, "state", json_string(c->state));
    json_object_set_new(o, "spawned_at", json_real(c->spawned_at));
    json_object_set_new(o, "ready_at", json_real(c->ready_at));
    json_object_set_new(o, "restarts", json_integer(c->restarts));
    json_object_set_new(o, "slots", json_integer(c->slots));
    json_object_set_new(o, "metrics", json_boolean(c->metrics));
    json_object_set_new(o, "device", json_integer(c->device));
    json_object_set_new(o, "visible", json_string(c->visible));
    return o;
}

json_t *handover_to_json(const struct handover *h)
{
    json_t *children = json_array(), *conns = json_array();
    json_t *j = json_object();
    if (!children || !conns || !j) {
        json_decref(children);
        json_decref(conns);
        json_decref(j);
        return NULL;
    }
    json_object_set_new(j, "version", json_integer(HANDOVER_VERSION));
    json_object_set_new(j, "pid", json_integer(h->pid));
    json_object_set_new(j, "from_version", util_json_string(h->from_version ? h->from_version : ""));
    json_object_set_new(j, "control_fd", fd_json(h->control_fd));
    json_object_set_new(j, "control_addr", util_json_string(h->control_addr ? h->control_addr : ""));
    json_object_set_new(j, "public_fd", fd_json(h->public_fd));
    json_object_set_new(j, "public_addr", util_json_string(h->public_addr ? h->public_addr : ""));
    json_object_set_new(j, "reply_fd", fd_json(h->reply_fd));
    json_object_set_new(j, "started_at", json_real(h->started_at));
    json_object_set_new(j, "upgrades", json_integer(h->upgrades));
    for (size_t i = 0; i < h->nconns; i++)
        json_array_append_new(conns, json_pack("{s:i,s:b,s:b}", "fd", h->conns[i].fd,
                                               "trusted", h->conns[i].trusted,
                                               "control", h->conns[i].control));
    for (size_t i = 0; i < h->nchildren; i++) {
        json_t *o = child_json(&h->children[i]);
        if (!o || json_array_append_new(children, o) < 0) {
            json_decref(children);
            json_decref(conns);
            json_decref(j);
            return NULL;
        }
    }
    json_object_set_new(j, "conns", conns);
    json_object_set_new(j, "children", children);
    if (h->usage)
        json_object_set(j, "usage", h->usage);
    return j;
}

/* Readers: each returns false when the field is there but of the wrong
 * kind; an absent optional field keeps the default. */
static bool get_int(json_t *o, const char *key, long long min, long long max, long long *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return true;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
        return false;
    *out = json_integer_value(v);
    return true;
}

static bool get_fd(json_t *o, const char *key, int *fd)
{
    long long v = -1;
    *fd = -1;
    if (!get_int(o, key, 0, INT32_MAX, &v))
        return false;
    *fd = (int)v;
    return true;
}

static bool get_str(json_t *o, const char *key, char **out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return true;
    if (!json_is_string(v))
        return false;
    return (*out = strdup(json_string_value(v))) != NULL;
}

static bool get_real(json_t *o, const char *key, double *out)
{
    json_t *v = json_object_get(o, key);
    if (!v)
        return true;
    if (!json_is_number(v))
        return false;
    *out = json_number_value(v);
    return true;
}

static int child_from_json(json_t *o, struct handover_child *c, char *err, size_t len)
{
    long long no = 0, pid = 0, port = 0, start = 0, restarts = 0, slots = 0, device = -1;
    const char *hash = json_string_value(json_object_get(o, "argv_hash"));
    const char *state = json_string_value(json_object_get(o, "state"));
    const char *visible = json_string_value(json_object_get(o, "visible"));
    json_t *metrics = json_object_get(o, "metrics");
    char *end = NULL;
    c->out_fd = -1;
    c->device = -1;
    if (!json_is_object(o)) {
        snprintf(err, len, "a child is not an object");
        return -1;
    }
    if (!get_str(o, "model", &c->model) || !c->model || !get_int(o, "no", 1, UINT32_MAX, &no) ||
        !get_int(o, "pid", 1, INT32_MAX, &pid) || !get_int(o, "port", 1, 65535, &port) ||
        !get_int(o, "start_time", 1, INT64_MAX, &start) || !get_fd(o, "out_fd", &c->out_fd) ||
        !get_str(o, "api_key", &c->api_key) || !get_real(o, "spawned_at", &c->spawned_at) ||
        !get_real(o, "ready_at", &c->ready_at) || !get_int(o, "restarts", 0, UINT32_MAX, &restarts) ||
        !get_int(o, "slots", 0, UINT32_MAX, &slots) || !get_int(o, "device", -1, INT32_MAX, &device) ||
        !hash || !state || (metrics && !json_is_boolean(metrics)) || no == 0 || pid == 0 || port == 0) {
        snprintf(err, len, "child %s: a field is missing or of the wrong kind",
                 c->model ? c->model : "(unnamed)");
        return -1;
    }
    errno = 0;
    c->argv_hash = strtoull(hash, &end, 16);
    if (errno || !*hash || *end || strlen(hash) > 16) {
        snprintf(err, len, "child %s: argv_hash \"%s\" is not a 64-bit hex number", c->model, hash);
        return -1;
    }
    if (strcmp(state, "starting") != 0 && strcmp(state, "ready") != 0 && strcmp(state, "stopping") != 0) {
        snprintf(err, len, "child %s: state \"%s\" is not starting, ready or stopping", c->model, state);
        return -1;
    }
    snprintf(c->state, sizeof c->state, "%s", state);
    snprintf(c->visible, sizeof c->visible, "%s", visible ? visible : "");
    c->no = (unsigned)no;
    c->pid = (pid_t)pid;
    c->port = (unsigned)port;
    c->start_time = (unsigned long long)start;
    c->restarts = (unsigned)restarts;
    c->slots = (unsigned)slots;
    c->device = (int)device;
    c->metrics = json_is_true(metrics);
    return 0;
}

int handover_from_json(json_t *j, struct handover *h, char *err, size_t len)
{
    memset(h, 0, sizeof *h);
    h->control_fd = h->public_fd = h->reply_fd = -1;
    json_t *version = json_object_get(j, "version");
    json_t *conns = json_object_get(j, "conns");
    json_t *children = json_object_get(j, "children");
    long long pid = 0, upgrades = 0;
    if (!json_is_object(j)) {
        snprintf(err, len, "not a JSON object");
        return -1;
    }
    if (!json_is_integer(version) || json_integer_value(version) != HANDOVER_VERSION) {
        snprintf(err, len, "version is not %d (a newer or older llama-pool wrote it)", HANDOVER_VERSION);
        return -1;
    }
    if (!get_int(j, "pid", 1, INT32_MAX, &pid) || !get_str(j, "from_version", &h->from_version) ||
        !get_fd(j, "control_fd", &h->control_fd) || !get_str(j, "control_addr", &h->control_addr) ||
        !get_fd(j, "public_fd", &h->public_fd) || !get_str(j, "public_addr", &h->public_addr) ||
        !get_fd(j, "reply_fd", &h->reply_fd) || !get_real(j, "started_at", &h->started_at) ||
        !get_int(j, "upgrades", 0, UINT32_MAX, &upgrades) ||
        (conns && !json_is_array(conns)) || (children && !json_is_array(children))) {
        snprintf(err, len, "a field is missing or of the wrong kind");
        return -1;
    }
    h->pid = (pid_t)pid;
    h->upgrades = (unsigned)upgrades;
    size_t nconns = json_array_size(conns), nchildren = json_array_size(children);
    h->conns = calloc(nconns ? nconns : 1, sizeof *h->conns);
    h->children = calloc(nchildren ? nchildren : 1, sizeof *h->children);
    if (!h->conns || !h->children) {
        snprintf(err, len, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < nconns; i++) {
        json_t *o = json_array_get(conns, i);
        struct handover_conn *c = &h->conns[h->nconns++];
        json_t *trusted = json_object_get(o, "trusted"), *control = json_object_get(o, "control");
        if (!json_is_object(o) || !get_fd(o, "fd", &c->fd) || c->fd < 0 ||
            !json_is_boolean(trusted) || !json_is_boolean(control)) {
            snprintf(err, len, "connection %zu: fd, trusted and control are needed", i);
            return -1;
        }
        c->trusted = json_is_true(trusted);
        c->control = json_is_true(control);
    }
    for (size_t i = 0; i < nchildren; i++)
        if (child_from_json(json_array_get(children, i), &h->children[h->nchildren++], err, len) < 0)
            return -1;
    json_t *usage = json_object_get(j, "usage");
    if (usage)
        h->usage = json_incref(usage);
    return 0;
}

void handover_free(struct handover *h)
{
    for (size_t i = 0; i < h->nchildren; i++) {
        free(h->children[i].model);
        if (h->children[i].api_key) {
            explicit_bzero(h->children[i].api_key, strlen(h->children[i].api_key));
            free(h->children[i].api_key);
        }
    }
    free(h->children);
    free(h->conns);
    free(h->from_version);
    free(h->control_addr);
    free(h->public_addr);
    json_decref(h->usage);
    memset(h, 0, sizeof *h);
    h->control_fd = h->public_fd = h->reply_fd = -1;
}

/* ---------- the memfd ---------- */

int handover_write(const struct handover *h, char *err, size_t len)
{
    json_t *j = handover_to_json(h);
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!text) {
        snprintf(err, len, "out of memory writing the handover");
        return -1;
    }
    int fd = memfd_create("llama-pool-handover", MFD_CLOEXEC);
    if (fd < 0) {
        snprintf(err, len, "memfd_create: %s", strerror(errno));
        free(text);
        return -1;
    }
    size_t n = strlen(text), off = 0;
    while (off < n) {
        ssize_t w = write(fd, text + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(err, len, "writing the handover: %s", w < 0 ? strerror(errno) : "short write");
            close(fd);
            free(text);
            return -1;
        }
        off += (size_t)w;
    }
    free(text);
    return fd;
}

int handover_read(int fd, struct handover *h, char *err, size_t len)
{
    struct stat st;
    memset(h, 0, sizeof *h);
    h->control_fd = h->public_fd = h->reply_fd = -1;
    if (fstat(fd, &st) < 0) {
        snprintf(err, len, "handover fd %d: %s", fd, strerror(errno));
        return -1;
    }
    if (st.st_size <= 0 || st.st_size > HANDOVER_MAX_BYTES) {
        snprintf(err, len, "handover fd %d: %lld bytes", fd, (long long)st.st_size);
        return -1;
    }
    size_t n = (size_t)st.st_size, off = 0;
    char *text = malloc(n + 1);
    if (!text) {
        snprintf(err, len, "out of memory reading the handover");
        return -1;
    }
    while (off < n) {
        ssize_t r = pread(fd, text + off, n - off, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(err, len, "reading the handover: %s", r < 0 ? strerror(errno) : "short read");
            free(text);
            return -1;
        }
        off += (size_t)r;
    }
    text[n] = '\0';
    json_error_t jerr;
    json_t *j = json_loadb(text, n, 0, &jerr);
    free(text);
    if (!j) {
        snprintf(err, len, "the handover is not JSON: %s", jerr.text);
        return -1;
    }
    char why[256];
    int rc = handover_from_json(j, h, why, sizeof why);
    json_decref(j);
    if (rc < 0)
        snprintf(err, len, "the handover: %s", why);
    return rc;
}

/* ---------- /proc ---------- */

int handover_parse_stat(const char *line, unsigned long long *start_time)
{
    const char *p = strrchr(line, ')');
    if (!p)
        return -1;
    p++;
    /* Fields 3.. follow; the start time is field 22, the 20th of them. */
    for (int field = 3; field < 22; field++) {
        p = strchr(p + 1, ' ');
        if (!p)
            return -1;
    }
    char *end;
    errno = 0;
    unsigned long long v = strtoull(p + 1, &end, 10);
    if (errno || end == p + 1 || (*end != ' ' && *end != '\n' && *end != '\0'))
        return -1;
    *start_time = v;
    return 0;
}

uint64_t handover_cmdline_hash(const char *cmdline, size_t len)
{
    return XXH3_64bits(cmdline, len);
}

uint64_t handover_argv_hash(char *const argv[])
{
    XXH3_state_t *st = XXH3_createState();
    if (!st)
        return 0;
    XXH3_64bits_reset(st);
    for (char *const *a = argv; a && *a; a++)
        XXH3_64bits_update(st, *a, strlen(*a) + 1);
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return h;
}

int handover_proc(pid_t pid, unsigned long long *start_time, uint64_t *cmdline_hash)
{
    char path[64], buf[65536];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if (util_read_file(path, buf, sizeof buf) < 0) {
        if (errno == ENOENT)
            errno = ESRCH;
        return -1;
    }
    if (handover_parse_stat(buf, start_time) < 0) {
        errno = EINVAL;
        return -1;
    }
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    ssize_t n = util_read_file(path, buf, sizeof buf);
    if (n < 0) {
        if (errno == ENOENT)
            errno = ESRCH;
        return -1;
    }
    *cmdline_hash = handover_cmdline_hash(buf, (size_t)n);
    return 0;
}
