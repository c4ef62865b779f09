#define _GNU_SOURCE
#include "child_metrics.h"

#include "health.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define FAMILY_PREFIX "llamacpp:"
#define MAX_LABELS 64             /* per sample; more makes the line junk */

/* ================================================================ merge */

/* A piece of a child's text. */
struct span {
    const char *p;
    size_t n;
};

static bool span_is(struct span s, const char *word)
{
    return s.n == strlen(word) && memcmp(s.p, word, s.n) == 0;
}

static bool span_eq(struct span a, struct span b)
{
    return a.n == b.n && memcmp(a.p, b.p, a.n) == 0;
}

/* Whether S is PREFIX followed by WORD. */
static bool span_is_prefixed(struct span s, const char *prefix, struct span word)
{
    size_t pl = strlen(prefix);
    return s.n == pl + word.n && memcmp(s.p, prefix, pl) == 0 && memcmp(s.p + pl, word.p, word.n) == 0;
}

/* Whether NAME is one of llama-server's (llamacpp:*). */
static bool ours_to_take(struct span name)
{
    size_t pl = strlen(FAMILY_PREFIX);
    return name.n > pl && memcmp(name.p, FAMILY_PREFIX, pl) == 0;
}

/* ---- reading one line (without its newline) ---- */

struct cursor {
    const char *p, *end;
};

static bool at(const struct cursor *c, char ch)
{
    return c->p < c->end && *c->p == ch;
}

static void skip_blanks(struct cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t'))
        c->p++;
}

static bool name_start(char ch, bool colon)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' || (colon && ch == ':');
}

/* A metric name, [a-zA-Z_:][a-zA-Z0-9_:]*, or with COLON false a label
 * name, [a-zA-Z_][a-zA-Z0-9_]*; empty when none starts here. */
static struct span take_name(struct cursor *c, bool colon)
{
    const char *s = c->p;
    while (c->p < c->end && (name_start(*c->p, colon) || (c->p > s && *c->p >= '0' && *c->p <= '9')))
        c->p++;
    return (struct span){ s, (size_t)(c->p - s) };
}

/* Up to the next blank or the end. */
static struct span take_token(struct cursor *c)
{
    const char *s = c->p;
    while (c->p < c->end && *c->p != ' ' && *c->p != '\t')
        c->p++;
    return (struct span){ s, (size_t)(c->p - s) };
}

/* Text whose backslashes start only the escapes in ALLOWED (the text
 * format's: \\ \" \n in label values, \\ \n in HELP). */
static bool escapes_ok(const char *p, size_t n, const char *allowed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] == '\\' && (++i == n || !p[i] || !strchr(allowed, p[i])))
            return false;
    return true;
}

/* "quoted", the span between the quotes, escapes as sent. */
static bool take_label_value(struct cursor *c, struct span *v)
{
    if (!at(c, '"'))
        return false;
    const char *s = ++c->p;
    while (c->p < c->end && *c->p != '"')
        c->p += *c->p == '\\' && c->end - c->p > 1 ? 2 : 1;
    if (c->p >= c->end)
        return false;
    *v = (struct span){ s, (size_t)(c->p - s) };
    c->p++;
    return escapes_ok(v->p, v->n, "\\\"n");
}

/* A sample value as Prometheus reads one (Go's ParseFloat): a decimal
 * number, or NaN and the infinities in any case. */
static bool value_ok(struct span v)
{
    static const char *const words[] = { "nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity" };
    for (size_t i = 0; i < sizeof words / sizeof *words; i++)
        if (v.n == strlen(words[i]) && strncasecmp(v.p, words[i], v.n) == 0)
            return true;
    char num[64];
    if (v.n == 0 || v.n >= sizeof num)
        return false;
    for (size_t i = 0; i < v.n; i++)
        if (!strchr("0123456789.eE+-", v.p[i]) || !v.p[i])
            return false;
    memcpy(num, v.p, v.n);
    num[v.n] = '\0';
    char *end;
    (void)strtod(num, &end);
    return *end == '\0';
}

/* A timestamp: milliseconds since the epoch, an integer. */
static bool timestamp_ok(struct span t)
{
    size_t i = t.n && t.p[0] == '-';
    if (i == t.n || t.n > 20)
        return false;
    for (; i < t.n; i++)
        if (t.p[i] < '0' || t.p[i] > '9')
            return false;
    return true;
}

struct label {
    struct span name, value;      /* value: between the quotes, escaped */
};

struct sample {
    struct span name;
    struct label label[MAX_LABELS];
    size_t nlabels;
    struct span value, ts;        /* ts.n 0: none */
};

/* The label set after its '{'. */
static bool take_labels(struct cursor *c, struct sample *s)
{
    for (;;) {
        skip_blanks(c);
        if (at(c, '}'))                      /* empty, or after a trailing ',' */
            break;
        if (s->nlabels == MAX_LABELS)
            return false;
        struct label *l = &s->label[s->nlabels++];
        l->name = take_name(c, false);
        skip_blanks(c);
        if (!l->name.n || !at(c, '='))
            return false;
        c->p++;
        skip_blanks(c);
        if (!take_label_value(c, &l->value))
            return false;
        skip_blanks(c);
        if (!at(c, ','))
            break;
        c->p++;
    }
    if (!at(c, '}'))
        return false;
    c->p++;
    return true;
}

/* name[{labels}] value [timestamp] */
static bool parse_sample(struct cursor c, struct sample *s)
{
    s->nlabels = 0;
    s->name = take_name(&c, true);
    if (!s->name.n)
        return false;
    skip_blanks(&c);
    if (at(&c, '{')) {
        c.p++;
        if (!take_labels(&c, s))
            return false;
        skip_blanks(&c);
    }
    s->value = take_token(&c);
    skip_blanks(&c);
    s->ts = take_token(&c);
    skip_blanks(&c);
    return c.p == c.end && value_ok(s->value) && (!s->ts.n || timestamp_ok(s->ts));
}

enum meta { META_NONE, META_HELP, META_TYPE };

/* "# HELP name text" or "# TYPE name type"; any other '#' line is a
 * comment (META_NONE). REST: the text, or the type. */
static enum meta parse_meta(struct cursor c, struct span *name, struct span *rest)
{
    static const char *const types[] = { "counter", "gauge", "histogram", "summary", "untyped" };
    c.p++;                                   /* '#' */
    skip_blanks(&c);
    struct span kind = take_token(&c);
    enum meta m = span_is(kind, "HELP") ? META_HELP : span_is(kind, "TYPE") ? META_TYPE : META_NONE;
    if (m == META_NONE)
        return META_NONE;
    skip_blanks(&c);
    *name = take_name(&c, true);
    if (!name->n || (c.p < c.end && *c.p != ' ' && *c.p != '\t'))
        return META_NONE;
    skip_blanks(&c);
    *rest = (struct span){ c.p, (size_t)(c.end - c.p) };
    if (m == META_HELP)
        return escapes_ok(rest->p, rest->n, "\\n") ? META_HELP : META_NONE;
    while (rest->n && (rest->p[rest->n - 1] == ' ' || rest->p[rest->n - 1] == '\t'))
        rest->n--;
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (span_is(*rest, types[i]))
            return META_TYPE;
    return META_NONE;
}

/* ---- families and their samples ---- */

struct family {
    struct span name, help, type;   /* help, type: n 0 while unknown */
    size_t first, last;             /* its samples, as index + 1; 0: none yet */
    size_t refused_by;              /* the child (index + 1) whose TYPE for it
                                     * differs from the first: its samples are skipped */
};

struct msample {
    size_t off, len;                /* its relabelled line in merge.lines */
    size_t next;                    /* the family's next sample, index + 1; 0: last */
};

struct merge {
    struct family *fam;
    size_t nfam, fam_cap;
    struct msample *smp;
    size_t nsmp, smp_cap;
    struct buf lines;
    bool failed;
};

static struct family *family_find(struct merge *m, struct span name)
{
    for (size_t i = 0; i < m->nfam; i++)
        if (span_eq(m->fam[i].name, name))
            return &m->fam[i];
    return NULL;
}

static struct family *family_get(struct merge *m, struct span name)
{
    struct family *f = family_find(m, name);
    if (f)
        return f;
    if (!util_grow(&m->fam, &m->fam_cap, m->nfam + 1, sizeof *m->fam)) {
        m->failed = true;
        return NULL;
    }
    f = &m->fam[m->nfam++];
    *f = (struct family){ .name = name };
    return f;
}

/* The family a sample called NAME belongs to: its own name's, else the
 * histogram or summary it is the _bucket, _sum or _count of, else a new
 * family of that name (without TYPE: untyped). */
static struct family *sample_family(struct merge *m, struct span name)
{
    static const struct { const char *suffix; bool histogram, summary; } parts[] = {
        { "_bucket", true, false }, { "_sum", true, true }, { "_count", true, true },
    };
    struct family *f = family_find(m, name);
    if (f)
        return f;
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) {
        size_t sl = strlen(parts[i].suffix);
        if (name.n <= sl || memcmp(name.p + name.n - sl, parts[i].suffix, sl) != 0)
            continue;
        f = family_find(m, (struct span){ name.p, name.n - sl });
        if (f && ((parts[i].histogram && span_is(f->type, "histogram")) ||
                  (parts[i].summary && span_is(f->type, "summary"))))
            return f;
    }
    return family_get(m, name);
}

/* A label of the child's as it goes out: "model" and "instance" are ours. */
static const char *label_prefix(const struct label *l)
{
    return span_is(l->name, "model") || span_is(l->name, "instance") ? "exported_" : "";
}

/* Whether two labels of a sample would go out with the same name. */
static bool labels_clash(const struct label *a, const struct label *b)
{
    const char *pa = label_prefix(a), *pb = label_prefix(b);
    if (*pa == *pb)
        return span_eq(a->name, b->name);
    return *pa ? span_is_prefixed(b->name, pa, a->name) : span_is_prefixed(a->name, pb, b->name);
}

/* S, relabelled with MODEL and INSTANCE (escaped), at the end of F's samples. */
static void add_sample(struct merge *m, struct family *f, const struct sample *s,
                       const char *model, const char *instance)
{
    for (size_t i = 0; i < s->nlabels; i++)
        for (size_t j = i + 1; j < s->nlabels; j++)
            if (labels_clash(&s->label[i], &s->label[j]))
                return;                      /* not a valid label set: junk */
    if (!util_grow(&m->smp, &m->smp_cap, m->nsmp + 1, sizeof *m->smp)) {
        m->failed = true;
        return;
    }
    size_t off = m->lines.len;
    bool ok = buf_printf(&m->lines, "%.*s{model=\"%s\",instance=\"%s\"", (int)s->name.n, s->name.p,
                         model, instance);
    for (size_t i = 0; ok && i < s->nlabels; i++) {
        const struct label *l = &s->label[i];
        ok = buf_printf(&m->lines, ",%s%.*s=\"%.*s\"", label_prefix(l), (int)l->name.n, l->name.p,
                        (int)l->value.n, l->value.p);
    }
    ok = ok && buf_printf(&m->lines, "} %.*s", (int)s->value.n, s->value.p);
    if (ok && s->ts.n)
        ok = buf_printf(&m->lines, " %.*s", (int)s->ts.n, s->ts.p);
    if (!ok || !buf_putc(&m->lines, '\n')) {
        m->failed = true;
        return;
    }
    m->smp[m->nsmp] = (struct msample){ off, m->lines.len - off, 0 };
    size_t id = ++m->nsmp;
    if (f->last)
        m->smp[f->last - 1].next = id;
    else
        f->first = id;
    f->last = id;
}

/* One line of child CI's text (no newline). */
static void merge_line(struct merge *m, size_t ci, const char *p, size_t n,
                       const char *model, const char *instance)
{
    struct sample s;
    struct span name, rest;
    struct cursor c = { p, p + n };
    skip_blanks(&c);
    if (c.p == c.end || memchr(p, '\0', n) || util_utf8_check(p, n) != n)
        return;                      /* blank, or not text */
    if (*c.p == '#') {
        enum meta kind = parse_meta(c, &name, &rest);
        if (kind == META_NONE || !ours_to_take(name))
            return;
        struct family *f = family_get(m, name);
        if (!f)
            return;
        if (kind == META_HELP && !f->help.n)
            f->help = rest;
        else if (kind == META_TYPE && !f->type.n)
            f->type = rest;
        else if (kind == META_TYPE && !span_eq(f->type, rest))
            f->refused_by = ci + 1;
        return;
    }
    if (!parse_sample(c, &s) || !ours_to_take(s.name))
        return;
    struct family *f = sample_family(m, s.name);
    if (f && f->refused_by != ci + 1)
        add_sample(m, f, &s, model, instance);
}

/* TEXT as one comment line: UTF-8, no control characters. */
static bool put_comment_text(struct buf *out, const char *text)
{
    size_t len;
    char *t = util_utf8_lossy(text, strlen(text), &len);
    if (!t)
        return false;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)t[i] < 0x20 || t[i] == 0x7f)
            t[i] = ' ';
    bool ok = buf_append(out, t, len);
    free(t);
    return ok;
}

bool child_metrics_merge(const struct child_metrics_text *c, size_t n, struct buf *out)
{
    struct merge m = { 0 };
    bool ok = true;
    for (size_t i = 0; ok && i < n; i++) {
        if (c[i].text)
            continue;
        ok = buf_puts(out, "# llama-pool: skipped ") && put_comment_text(out, c[i].instance) &&
             buf_puts(out, " (model ") && put_comment_text(out, c[i].model) && buf_puts(out, "): ") &&
             put_comment_text(out, c[i].err ? c[i].err : "no answer") && buf_putc(out, '\n');
    }
    for (size_t i = 0; ok && !m.failed && i < n; i++) {
        if (!c[i].text)
            continue;
        char *model = util_prom_label_escape(c[i].model);
        char *instance = util_prom_label_escape(c[i].instance);
        ok = model && instance;
        for (size_t pos = 0; ok && !m.failed && pos < c[i].len;) {
            const char *nl = memchr(c[i].text + pos, '\n', c[i].len - pos);
            size_t end = nl ? (size_t)(nl - c[i].text) : c[i].len;
            size_t len = end - pos;
            if (len && c[i].text[end - 1] == '\r')
                len--;
            merge_line(&m, i, c[i].text + pos, len, model, instance);
            pos = end + 1;
        }
        free(model);
        free(instance);
    }
    ok = ok && !m.failed;
    for (size_t i = 0; ok && i < m.nfam; i++) {
        const struct family *f = &m.fam[i];
        if (!f->first)
            continue;                    /* HELP or TYPE without a sample */
        if (f->help.n)
            ok = buf_printf(out, "# HELP %.*s %.*s\n", (int)f->name.n, f->name.p, (int)f->help.n, f->help.p);
        if (ok && f->type.n)
            ok = buf_printf(out, "# TYPE %.*s %.*s\n", (int)f->name.n, f->name.p, (int)f->type.n, f->type.p);
        for (size_t s = f->first; ok && s; s = m.smp[s - 1].next)
            ok = buf_append(out, m.lines.data + m.smp[s - 1].off, m.smp[s - 1].len);
    }
    free(m.fam);
    free(m.smp);
    buf_free(&m.lines);
    return ok;
}

/* ================================================================ scrape */

struct scrape_one {
    struct child_metrics_scrape *s;
    struct health_probe *probe;     /* in flight, else NULL */
    char *model, *instance;
    bool ok;                        /* answered 200: TEXT is its body */
    struct buf text;
    char err[256];                  /* why not */
};

struct child_metrics_scrape {
    struct ev_loop *loop;
    ev_timer deadline;              /* the end of the scrape, answered or not */
    double timeout;
    struct scrape_one *one;
    struct child_metrics_text *res; /* made with ONE, so the end allocates nothing */
    size_t n, pending;
    child_metrics_done done;
    void *arg;
};

static void scrape_free(struct child_metrics_scrape *s)
{
    ev_timer_stop(s->loop, &s->deadline);
    for (size_t i = 0; s->one && i < s->n; i++) {
        health_cancel(s->one[i].probe);
        free(s->one[i].model);
        free(s->one[i].instance);
        buf_free(&s->one[i].text);
    }
    free(s->one);
    free(s->res);
    free(s);
}

/* Every child answered, or the time is up: hand on what came. */
static void scrape_finish(struct child_metrics_scrape *s)
{
    for (size_t i = 0; i < s->n; i++) {
        struct scrape_one *o = &s->one[i];
        if (o->probe) {
            health_cancel(o->probe);
            o->probe = NULL;
            snprintf(o->err, sizeof o->err, "no answer within %g s", s->timeout);
        }
        s->res[i] = (struct child_metrics_text){
            .model = o->model, .instance = o->instance,
            .text = o->ok ? (o->text.data ? o->text.data : "") : NULL, .len = o->text.len,
            .err = o->ok ? NULL : o->err,
        };
    }
    s->done(s->arg, s->res, s->n);
    scrape_free(s);
}

static void scrape_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop; (void)revents;
    scrape_finish(w->data);
}

static void scrape_answer(void *arg, long status, const char *body, size_t len, const char *err)
{
    struct scrape_one *o = arg;
    struct child_metrics_scrape *s = o->s;
    o->probe = NULL;                 /* health frees it after this returns */
    if (status == 200 && len >= HEALTH_BODY_MAX)
        snprintf(o->err, sizeof o->err, "its answer is %d KiB or more, more than is kept", HEALTH_BODY_MAX / 1024);
    else if (status == 200 && !buf_append(&o->text, body, len))
        snprintf(o->err, sizeof o->err, "out of memory");
    else if (status == 200)
        o->ok = true;
    else if (status)
        snprintf(o->err, sizeof o->err, "answered HTTP %ld", status);
    else
        snprintf(o->err, sizeof o->err, "%s", err && *err ? err : "no answer");
    if (--s->pending == 0)
        scrape_finish(s);
}

struct child_metrics_scrape *child_metrics_scrape(struct ev_loop *loop, struct health *h,
                                                  const struct child_metrics_target *t, size_t n,
                                                  double timeout, child_metrics_done done, void *arg)
{
    struct child_metrics_scrape *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    *s = (struct child_metrics_scrape){ .loop = loop, .timeout = timeout, .n = n, .done = done, .arg = arg };
    ev_timer_init(&s->deadline, scrape_deadline, 0., 0.);
    s->deadline.data = s;
    s->one = calloc(n ? n : 1, sizeof *s->one);
    s->res = calloc(n ? n : 1, sizeof *s->res);
    bool ok = s->one && s->res;
    for (size_t i = 0; ok && i < n; i++) {
        s->one[i].s = s;
        s->one[i].model = strdup(t[i].model);
        s->one[i].instance = strdup(t[i].instance);
        ok = s->one[i].model && s->one[i].instance;
    }
    if (!ok) {
        scrape_free(s);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        struct scrape_one *o = &s->one[i];
        char url[64];
        snprintf(url, sizeof url, "http://127.0.0.1:%u/metrics", t[i].port);
        o->probe = health_get_key(h, url, (long)(timeout * 1000), t[i].key, scrape_answer, o);
        if (o->probe)
            s->pending++;
        else
            snprintf(o->err, sizeof o->err, "cannot ask it: %s", strerror(errno));
    }
    /* Nothing in flight: end at the loop's next turn, never inside this call. */
    ev_timer_set(&s->deadline, s->pending ? timeout : 0., 0.);
    ev_timer_start(loop, &s->deadline);
    return s;
}

void child_metrics_cancel(struct child_metrics_scrape *s)
{
    if (s)
        scrape_free(s);
}
