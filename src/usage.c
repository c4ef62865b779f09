#define _GNU_SOURCE
#include "usage.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#define USAGE_VERSION 1

/* Records in an array, found by name through an open-addressing table of
 * record index + 1 (0: empty) on the name's hash, at most half full. */
struct usage {
    struct usage_record *rec;
    size_t n, cap;
    uint32_t *slot;
    size_t nslot;               /* a power of two, or 0 */
    char *dir;                  /* NULL: in memory only */
    char *path;                 /* DIR/usage.json */
    bool dirty;
};

struct usage *usage_new(void)
{
    return calloc(1, sizeof(struct usage));
}

static void records_clear(struct usage *u)
{
    for (size_t i = 0; i < u->n; i++)
        free(u->rec[i].name);
    u->n = 0;
    if (u->nslot)
        memset(u->slot, 0, u->nslot * sizeof *u->slot);
}

static void forget_dir(struct usage *u)
{
    free(u->dir);
    free(u->path);
    u->dir = u->path = NULL;
}

void usage_free(struct usage *u)
{
    if (!u)
        return;
    records_clear(u);
    free(u->rec);
    free(u->slot);
    forget_dir(u);
    free(u);
}

const char *usage_path(const struct usage *u)
{
    return u->path;
}

bool usage_dirty(const struct usage *u)
{
    return u->dirty;
}

size_t usage_size(const struct usage *u)
{
    return u->n;
}

/* ---------- finding a record ---------- */

static size_t name_hash(const char *name)
{
    return (size_t)XXH3_64bits(name, strlen(name));
}

/* Where NAME is in the table, or the empty slot where it would go. */
static size_t slot_of(const struct usage *u, const char *name)
{
    size_t mask = u->nslot - 1, i = name_hash(name) & mask;
    while (u->slot[i] && strcmp(u->rec[u->slot[i] - 1].name, name) != 0)
        i = (i + 1) & mask;
    return i;
}

/* The table made again for the records there are (after records were
 * dropped, or to grow it); false when out of memory (the old one stays). */
static bool index_rebuild(struct usage *u, size_t want)
{
    size_t n = 16;
    while (n < 2 * want)
        n *= 2;
    uint32_t *slot = calloc(n, sizeof *slot);
    if (!slot)
        return false;
    free(u->slot);
    u->slot = slot;
    u->nslot = n;
    for (size_t r = 0; r < u->n; r++)
        u->slot[slot_of(u, u->rec[r].name)] = (uint32_t)(r + 1);
    return true;
}

const struct usage_record *usage_find(const struct usage *u, const char *model)
{
    if (!u->nslot)
        return NULL;
    uint32_t k = u->slot[slot_of(u, model)];
    return k ? &u->rec[k - 1] : NULL;
}

/* MODEL's record, made (zeroed) when missing; NULL when out of memory. */
static struct usage_record *record_get(struct usage *u, const char *model)
{
    const struct usage_record *found = usage_find(u, model);
    if (found)
        return (struct usage_record *)found;
    if (2 * (u->n + 1) > u->nslot && !index_rebuild(u, u->n + 1))
        return NULL;
    if (u->n == u->cap) {
        size_t cap = u->cap ? 2 * u->cap : 16;
        struct usage_record *v = realloc(u->rec, cap * sizeof *v);
        if (!v)
            return NULL;
        u->rec = v;
        u->cap = cap;
    }
    char *name = strdup(model);
    if (!name)
        return NULL;
    struct usage_record *r = &u->rec[u->n];
    *r = (struct usage_record){ .name = name };
    u->slot[slot_of(u, name)] = (uint32_t)++u->n;
    return r;
}

/* ---------- counting ---------- */

void usage_count_request(struct usage *u, const char *model, double now,
                         long cache_n, long prompt_n, long predicted_n)
{
    struct usage_record *r = record_get(u, model);
    if (!r)
        return;
    r->requests++;
    r->prompt_tokens += (uint64_t)(cache_n > 0 ? cache_n : 0) + (uint64_t)(prompt_n > 0 ? prompt_n : 0);
    r->generated_tokens += (uint64_t)(predicted_n > 0 ? predicted_n : 0);
    r->last_used = (int64_t)now;
    u->dirty = true;
}

void usage_count_load(struct usage *u, const char *model, double now, double seconds)
{
    struct usage_record *r = record_get(u, model);
    if (!r)
        return;
    r->loads++;
    r->load_seconds += seconds > 0 ? seconds : 0;
    r->last_loaded = (int64_t)now;
    u->dirty = true;
}

/* ---------- ranking and bounding ---------- */

static int cmp_rank(const void *a, const void *b)
{
    const struct usage_record *x = *(const struct usage_record *const *)a;
    const struct usage_record *y = *(const struct usage_record *const *)b;
    if (x->requests != y->requests)
        return x->requests > y->requests ? -1 : 1;
    if (x->last_used != y->last_used)
        return x->last_used > y->last_used ? -1 : 1;
    return strcmp(x->name, y->name);
}

const struct usage_record **usage_ranked(const struct usage *u, size_t *n)
{
    *n = 0;
    const struct usage_record **v = u->n ? malloc(u->n * sizeof *v) : NULL;
    if (!v)
        return NULL;
    for (size_t i = 0; i < u->n; i++)
        v[i] = &u->rec[i];
    qsort(v, u->n, sizeof *v, cmp_rank);
    *n = u->n;
    return v;
}

/* When a record last saw activity: a request's end or a load. */
static int64_t active_at(const struct usage_record *r)
{
    return r->last_used > r->last_loaded ? r->last_used : r->last_loaded;
}

static int cmp_active(const void *a, const void *b)
{
    int64_t x = active_at(a), y = active_at(b);
    return x != y ? (x > y ? -1 : 1) : strcmp(((const struct usage_record *)a)->name,
                                              ((const struct usage_record *)b)->name);
}

/* Drop the records idle for USAGE_KEEP_DAYS, then the least recently
 * active beyond USAGE_MAX_RECORDS. */
static void prune(struct usage *u, double now)
{
    int64_t oldest = (int64_t)now - (int64_t)USAGE_KEEP_DAYS * 86400;
    size_t keep = 0;
    for (size_t i = 0; i < u->n; i++) {
        if (active_at(&u->rec[i]) < oldest)
            free(u->rec[i].name);
        else
            u->rec[keep++] = u->rec[i];
    }
    bool dropped = keep < u->n;
    u->n = keep;
    if (u->n > USAGE_MAX_RECORDS) {
        qsort(u->rec, u->n, sizeof *u->rec, cmp_active);
        for (size_t i = USAGE_MAX_RECORDS; i < u->n; i++)
            free(u->rec[i].name);
        u->n = USAGE_MAX_RECORDS;
        dropped = true;
    }
    /* Out of memory for a smaller table: the old one is rebuilt in place. */
    if (dropped && !index_rebuild(u, u->n)) {
        memset(u->slot, 0, u->nslot * sizeof *u->slot);
        for (size_t r = 0; r < u->n; r++)
            u->slot[slot_of(u, u->rec[r].name)] = (uint32_t)(r + 1);
    }
}

/* ---------- the file ---------- */

/* A counter from the file: absent is 0; anything but a whole number >= 0
 * is the wrong shape. */
static bool read_count(json_t *o, const char *key, uint64_t *out)
{
    json_t *v = json_object_get(o, key);
    if (!v)
        return true;
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (uint64_t)json_integer_value(v);
    return true;
}

static bool read_time(json_t *o, const char *key, int64_t *out)
{
    uint64_t t = 0;
    if (!read_count(o, key, &t) || t > INT64_MAX)
        return false;
    *out = (int64_t)t;
    return true;
}

/* The records of document J into U: 0; -1 with WHY when it is not what
 * usage_save writes; -2 when out of memory. */
static int from_json(struct usage *u, json_t *j, char *why, size_t len)
{
    json_t *version = json_object_get(j, "version");
    json_t *models = json_object_get(j, "models");
    if (!json_is_object(j)) {
        snprintf(why, len, "not a JSON object");
        return -1;
    }
    if (!json_is_integer(version) || json_integer_value(version) != USAGE_VERSION) {
        snprintf(why, len, "\"version\" is not %d", USAGE_VERSION);
        return -1;
    }
    if (!json_is_object(models)) {
        snprintf(why, len, "\"models\" is not an object");
        return -1;
    }
    const char *name;
    json_t *m;
    json_object_foreach(models, name, m) {
        struct usage_record r = { 0 };
        json_t *secs = json_object_get(m, "load_seconds");
        if (!*name || !json_is_object(m) || !read_count(m, "requests", &r.requests) ||
            !read_count(m, "prompt_tokens", &r.prompt_tokens) ||
            !read_count(m, "generated_tokens", &r.generated_tokens) ||
            !read_count(m, "loads", &r.loads) || !read_time(m, "last_used", &r.last_used) ||
            !read_time(m, "last_loaded", &r.last_loaded) ||
            (secs && (!json_is_number(secs) || !(json_number_value(secs) >= 0)))) {
            snprintf(why, len, "the record of model \"%.200s\" is not an object of counts", name);
            return -1;
        }
        r.load_seconds = secs ? json_number_value(secs) : 0;
        struct usage_record *dst = record_get(u, name);
        if (!dst)
            return -2;
        r.name = dst->name;
        *dst = r;
    }
    return 0;
}

/* The file at PATH was unusable for WHY: it goes aside, as
 * PATH.corrupt-NOW, for someone to look at. */
static enum usage_open_result set_aside(struct usage *u, double now, const char *why,
                                        char *msg, size_t len)
{
    char *aside = NULL;
    records_clear(u);
    if (asprintf(&aside, "%s.corrupt-%lld", u->path, (long long)now) < 0)
        aside = NULL;
    if (!aside || rename(u->path, aside) < 0) {
        /* Writing over it would lose it: leave it be, and count in memory. */
        snprintf(msg, len, "%s: %s, and it cannot be set aside (%s); usage is counted in memory only",
                 u->path, why, aside ? strerror(errno) : "out of memory");
        free(aside);
        forget_dir(u);
        return USAGE_OPEN_MEMORY_ONLY;
    }
    snprintf(msg, len, "%s: %s; set aside as %s, usage counted afresh", u->path, why, aside);
    free(aside);
    return USAGE_OPEN_SET_ASIDE;
}

/* Read U->path into U. */
static enum usage_open_result load_file(struct usage *u, double now, char *msg, size_t len)
{
    /* O_NONBLOCK: a FIFO there must not hang the startup (it is refused below). */
    int fd = open(u->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == ENOENT) {
        snprintf(msg, len, "no %s yet: usage is counted from now on", u->path);
        return USAGE_OPEN_NEW;
    }
    if (fd < 0) {
        snprintf(msg, len, "cannot read %s: %s; usage is counted in memory only", u->path, strerror(errno));
        forget_dir(u);
        return USAGE_OPEN_MEMORY_ONLY;
    }
    struct stat st;
    char why[300];
    json_t *j = NULL;
    if (fstat(fd, &st) < 0) {
        snprintf(msg, len, "cannot read %s: %s; usage is counted in memory only", u->path, strerror(errno));
        close(fd);
        forget_dir(u);
        return USAGE_OPEN_MEMORY_ONLY;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(why, sizeof why, "not a regular file");
    } else if (st.st_size > USAGE_MAX_FILE) {
        snprintf(why, sizeof why, "larger than %d MiB", USAGE_MAX_FILE >> 20);
    } else {
        json_error_t err;
        j = json_loadfd(fd, JSON_REJECT_DUPLICATES, &err);
        if (!j)
            snprintf(why, sizeof why, "not valid JSON (line %d column %d: %s)", err.line, err.column,
                     err.text);
    }
    close(fd);
    if (!j)
        return set_aside(u, now, why, msg, len);
    int rc = from_json(u, j, why, sizeof why);
    json_decref(j);
    if (rc == -1)
        return set_aside(u, now, why, msg, len);
    if (rc == -2) {
        /* The file is fine: it must not be written over with less. */
        records_clear(u);
        snprintf(msg, len, "cannot read %s: out of memory; usage is counted in memory only", u->path);
        forget_dir(u);
        return USAGE_OPEN_MEMORY_ONLY;
    }
    prune(u, now);
    snprintf(msg, len, "read the usage of %zu model%s from %s", u->n, u->n == 1 ? "" : "s", u->path);
    return USAGE_OPEN_LOADED;
}

enum usage_open_result usage_open(struct usage *u, const char *dir, double now,
                                  char *msg, size_t len)
{
    forget_dir(u);
    records_clear(u);
    u->dirty = false;
    if (!(u->dir = strdup(dir)) || asprintf(&u->path, "%s/" USAGE_FILE, dir) < 0) {
        u->path = NULL;
        forget_dir(u);
        snprintf(msg, len, "out of memory; usage is counted in memory only");
        return USAGE_OPEN_MEMORY_ONLY;
    }
    if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
        snprintf(msg, len, "cannot create state_dir %s: %s; usage is counted in memory only", dir,
                 strerror(errno));
        forget_dir(u);
        return USAGE_OPEN_MEMORY_ONLY;
    }
    enum usage_open_result res = load_file(u, now, msg, len);
    if (res == USAGE_OPEN_MEMORY_ONLY)
        return res;
    /* Found now rather than at the first save, ten seconds into serving. */
    if (access(dir, W_OK | X_OK) < 0) {
        char was[256];
        snprintf(was, sizeof was, "%s", res == USAGE_OPEN_LOADED ? msg : "");
        snprintf(msg, len, "%s%scannot write in state_dir %s: %s; usage is counted in memory only",
                 was, *was ? ", but " : "", dir, strerror(errno));
        forget_dir(u);
        return USAGE_OPEN_MEMORY_ONLY;
    }
    return res;
}

static json_t *to_json(const struct usage *u, double now)
{
    json_t *models = json_object();
    json_t *j = json_pack("{s:i,s:I,s:o}", "version", USAGE_VERSION, "saved", (json_int_t)now,
                          "models", models);
    for (size_t i = 0; j && i < u->n; i++) {
        const struct usage_record *r = &u->rec[i];
        json_t *o = json_pack("{s:I,s:I,s:I,s:I,s:f,s:I,s:I}",
                              "requests", (json_int_t)r->requests,
                              "prompt_tokens", (json_int_t)r->prompt_tokens,
                              "generated_tokens", (json_int_t)r->generated_tokens,
                              "loads", (json_int_t)r->loads,
                              "load_seconds", r->load_seconds,
                              "last_used", (json_int_t)r->last_used,
                              "last_loaded", (json_int_t)r->last_loaded);
        if (!o || json_object_set_new(models, r->name, o) < 0) {
            json_decref(j);
            return NULL;
        }
    }
    return j;
}

/* LEN bytes of TEXT to a new PATH.tmp, on disk, renamed over PATH; -1 with
 * errno set (the temporary file removed) when any step fails. */
static int write_atomically(const char *path, const char *text, size_t len)
{
    char tmp[4200];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (fd < 0)
        return -1;
    size_t off = 0;
    int rc = 0;
    while (off < len && rc == 0) {
        ssize_t w = write(fd, text + off, len - off);
        if (w > 0)
            off += (size_t)w;
        else if (!(w < 0 && errno == EINTR))
            rc = -1;
    }
    if (rc == 0 && fsync(fd) < 0)
        rc = -1;
    int saved = errno;
    if (close(fd) < 0 && rc == 0) {
        rc = -1;
        saved = errno;
    }
    if (rc == 0 && rename(tmp, path) < 0) {
        rc = -1;
        saved = errno;
    }
    if (rc < 0) {
        unlink(tmp);
        errno = saved;
    }
    return rc;
}

int usage_save(struct usage *u, double now, char *msg, size_t len)
{
    if (!u->dirty || !u->path)
        return 0;
    prune(u, now);
    json_t *j = to_json(u, now);
    char *text = j ? json_dumps(j, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_REAL_PRECISION(12)) : NULL;
    json_decref(j);
    if (!text) {
        snprintf(msg, len, "cannot write %s: out of memory; usage is counted in memory only from now on",
                 u->path);
        forget_dir(u);
        return -1;
    }
    size_t n = strlen(text);
    text[n] = '\n';             /* json_dumps left room for the NUL */
    int rc = write_atomically(u->path, text, n + 1);
    free(text);
    if (rc < 0) {
        snprintf(msg, len, "cannot write %s: %s; usage is counted in memory only from now on",
                 u->path, strerror(errno));
        forget_dir(u);
        return -1;
    }
    /* The rename is only on disk once the directory is; a failure here
     * (some file systems refuse fsync on a directory) loses nothing now. */
    int dfd = open(u->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    u->dirty = false;
    return 0;
}

json_t *usage_to_json(const struct usage *u, double now)
{
    return to_json(u, now);
}

int usage_from_json(struct usage *u, json_t *j, char *why, size_t len)
{
    records_clear(u);
    int rc = from_json(u, j, why, len);
    if (rc == -2)
        snprintf(why, len, "out of memory");
    if (rc == 0)
        u->dirty = true;
    return rc < 0 ? -1 : 0;
}
