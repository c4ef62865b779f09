/* cutoff — the pure pieces of request_timeout. See cutoff.h.
 *
 * Values are copied as the upstream wrote them (found by cutoff_json_member,
 * never parsed and printed again), so an answer put back together from a
 * stream that ended by itself has the bytes llama-server's plain answer
 * would: its numbers, its escapes, its key order (that of b9749's
 * server-task.cpp, written out below). */
#define _GNU_SOURCE
#include "cutoff.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum cutoff_api cutoff_api_of(const char *path)
{
    if (!strcmp(path, "/v1/chat/completions") || !strcmp(path, "/chat/completions"))
        return CUTOFF_CHAT;
    if (!strcmp(path, "/v1/completions"))
        return CUTOFF_OAI_CMPL;
    if (!strcmp(path, "/completion") || !strcmp(path, "/completions") || !strcmp(path, "/infill"))
        return CUTOFF_NATIVE;
    return CUTOFF_NONE;
}

/* ------------------------------------------------------------ the request */

/* true, or a number other than 0 */
static bool truthy(const json_t *v)
{
    return json_is_true(v) || (json_is_integer(v) && json_integer_value(v) != 0) ||
           (json_is_real(v) && json_real_value(v) != 0);
}

void cutoff_request_read(const char *body, size_t len, struct cutoff_request *out)
{
    *out = (struct cutoff_request){ 0 };
    json_t *j = len ? json_loadb(body, len, 0, NULL) : NULL;
    if (!json_is_object(j)) {
        json_decref(j);
        return;
    }
    out->object = true;
    out->stream = json_is_true(json_object_get(j, "stream"));
    out->has_tmax = json_object_get(j, "t_max_predict_ms") != NULL;
    json_t *n = json_object_get(j, "n");
    bool more = truthy(json_object_get(j, "logprobs")) || truthy(json_object_get(j, "top_logprobs")) ||
                truthy(json_object_get(j, "n_probs")) || truthy(json_object_get(j, "return_tokens")) ||
                truthy(json_object_get(j, "post_sampling_probs")) ||
                json_object_get(j, "response_fields") ||
                (json_is_integer(n) && json_integer_value(n) > 1);
    out->gatherable = !out->stream && !more;
    json_decref(j);
}

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

bool cutoff_body_rewrite(const char *body, size_t len, enum cutoff_api api, long long tmax_ms,
                         bool gather, char **out, size_t *outlen)
{
    size_t close = len;
    while (close > 0 && is_ws(body[close - 1]))
        close--;
    if (close == 0 || body[close - 1] != '}')
        return false;
    close--;
    size_t before = close;
    while (before > 0 && is_ws(body[before - 1]))
        before--;
    if (before == 0)
        return false;
    bool empty = body[before - 1] == '{';

    struct buf b = { 0 };
    bool ok = buf_reserve(&b, len + 160) && buf_append(&b, body, close);
    const char *sep = empty ? "" : ",";
    if (ok && tmax_ms > 0) {
        ok = buf_printf(&b, "%s\"t_max_predict_ms\":%lld", sep, tmax_ms);
        sep = ",";
    }
    if (ok && gather) {
        ok = buf_printf(&b, "%s\"stream\":true,\"timings_per_token\":true", sep);
        if (ok && api == CUTOFF_CHAT)
            ok = buf_puts(&b, ",\"stream_options\":{\"include_usage\":true}");
    }
    ok = ok && buf_append(&b, body + close, len - close);
    if (!ok) {
        buf_free(&b);
        return false;
    }
    *outlen = b.len;
    *out = buf_take(&b);
    return true;
}

/* ------------------------------------------------------- JSON as text */

static const char *skip_ws(const char *p, const char *e)
{
    while (p < e && is_ws(*p))
        p++;
    return p;
}

/* Past the string whose opening quote is at P; NULL when unterminated. */
static const char *skip_string(const char *p, const char *e)
{
    for (p++; p < e; p++) {
        if (*p == '\\')
            p++;
        else if (*p == '"')
            return p + 1;
    }
    return NULL;
}

/* Past the value at P (after whitespace); NULL when there is none whole. */
static const char *skip_value(const char *p, const char *e)
{
    p = skip_ws(p, e);
    if (p >= e)
        return NULL;
    if (*p == '"')
        return skip_string(p, e);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < e) {
            char c = *p;
            if (c == '"') {
                if (!(p = skip_string(p, e)))
                    return NULL;
                continue;
            }
            if (c == '{' || c == '[') {
                depth++;
            } else if (c == '}' || c == ']') {
                if (--depth == 0)
                    return p + 1;
            }
            p++;
        }
        return NULL;
    }
    const char *s = p;
    while (p < e && !is_ws(*p) && *p != ',' && *p != '}' && *p != ']')
        p++;
    return p > s ? p : NULL;
}

bool cutoff_json_member(const char *s, size_t len, const char *key, const char **v, size_t *vlen)
{
    const char *e = s + len, *p = skip_ws(s, e);
    size_t kl = strlen(key);
    if (p >= e || *p != '{')
        return false;
    p++;
    for (;;) {
        p = skip_ws(p, e);
        if (p >= e || *p != '"')
            return false;          /* '}' (the end), or not JSON */
        const char *ks = p + 1, *ke = skip_string(p, e);
        if (!ke)
            return false;
        bool match = (size_t)(ke - 1 - ks) == kl && memcmp(ks, key, kl) == 0;
        p = skip_ws(ke, e);
        if (p >= e || *p != ':')
            return false;
        p = skip_ws(p + 1, e);
        const char *ve = skip_value(p, e);
        if (!ve)
            return false;
        if (match) {
            *v = p;
            *vlen = (size_t)(ve - p);
            return true;
        }
        p = skip_ws(ve, e);
        if (p >= e || *p != ',')
            return false;
        p++;
    }
}

bool cutoff_json_element(const char *s, size_t len, size_t i, const char **v, size_t *vlen)
{
    const char *e = s + len, *p = skip_ws(s, e);
    if (p >= e || *p != '[')
        return false;
    p = skip_ws(p + 1, e);
    if (p < e && *p == ']')
        return false;
    for (size_t k = 0;; k++) {
        p = skip_ws(p, e);
        const char *ve = skip_value(p, e);
        if (!ve)
            return false;
        if (k == i) {
            *v = p;
            *vlen = (size_t)(ve - p);
            return true;
        }
        p = skip_ws(ve, e);
        if (p >= e || *p != ',')
            return false;
        p++;
    }
}

/* choices[0].NAME of the object at S. */
static bool choice_member(const char *s, size_t len, const char *name, const char **v, size_t *vlen)
{
    const char *c, *c0;
    size_t cl, c0l;
    return cutoff_json_member(s, len, "choices", &c, &cl) &&
           cutoff_json_element(c, cl, 0, &c0, &c0l) &&
           cutoff_json_member(c0, c0l, name, v, vlen);
}

static bool is_string(const char *v, size_t vl)
{
    return vl >= 2 && v[0] == '"' && v[vl - 1] == '"';
}

static bool is_null(const char *v, size_t vl)
{
    return vl == 4 && memcmp(v, "null", 4) == 0;
}

/* --------------------------------------------------- server-sent events */

bool cutoff_sse_take(const char *p, size_t n, size_t *evlen, const char **data, size_t *dlen)
{
    size_t i = 0;
    *data = NULL;
    *dlen = 0;
    while (i < n) {
        const char *nl = memchr(p + i, '\n', n - i);
        if (!nl)
            return false;
        size_t ls = i, le = (size_t)(nl - p);
        i = le + 1;
        if (le > ls && p[le - 1] == '\r')
            le--;
        if (le == ls) {            /* a blank line ends the event */
            *evlen = i;
            return true;
        }
        if (!*data && le - ls >= 5 && memcmp(p + ls, "data:", 5) == 0) {
            size_t s = ls + 5;
            if (s < le && p[s] == ' ')
                s++;
            *data = p + s;
            *dlen = le - s;
        }
    }
    return false;
}

/* ------------------------------------------------------ the last event */

static bool is_object(const char *s, size_t len)
{
    const char *e = s + len, *p = skip_ws(s, e);
    return p < e && *p == '{';
}

bool cutoff_seen_note(struct cutoff_seen *s, const char *data, size_t len)
{
    if (!is_object(data, len))
        return true;
    buf_clear(&s->last);
    return buf_append(&s->last, data, len);
}

void cutoff_seen_free(struct cutoff_seen *s)
{
    buf_free(&s->last);
}

/* ,"KEY":value — the value from SRC (LEN bytes) when it has KEY, else
 * FALLBACK (JSON text; NULL: the member is left out). No leading comma
 * when FIRST. */
static bool put_member(struct buf *out, const char *src, size_t len, const char *key,
                       const char *fallback, bool first)
{
    const char *v = NULL;
    size_t vl = 0;
    if (!(src && cutoff_json_member(src, len, key, &v, &vl)) || is_null(v, vl)) {
        if (!fallback)
            return true;
        v = fallback;
        vl = strlen(fallback);
    }
    return buf_printf(out, "%s\"%s\":", first ? "" : ",", key) && buf_append(out, v, vl);
}

/* Fallbacks for what no event said: the model's name as a JSON string,
 * the time, an id of ours. */
struct made {
    char model[600];
    char created[24];
    char id[64];
};

static void made_fill(struct made *m, const char *model, long long now)
{
    static unsigned serial;
    char esc[sizeof m->model - 2];
    util_json_escape(esc, sizeof esc, model ? model : "");
    snprintf(m->model, sizeof m->model, "\"%s\"", esc);
    snprintf(m->created, sizeof m->created, "%lld", now);
    snprintf(m->id, sizeof m->id, "\"chatcmpl-llamapool%llx%04x\"", now, ++serial & 0xffff);
}

/* Chat and text_completion: "created" … "object":OBJECT, as llama-server
 * orders them (chat chunks: created, id, model, system_fingerprint,
 * object; text_completion: created, model, system_fingerprint, object, id). */
static bool put_oai_tail(struct buf *out, enum cutoff_api api, const char *src, size_t len,
                         const struct made *m, const char *object)
{
    bool ok = put_member(out, src, len, "created", m->created, false);
    if (api == CUTOFF_CHAT)
        ok = ok && put_member(out, src, len, "id", m->id, false);
    ok = ok && put_member(out, src, len, "model", m->model, false) &&
         put_member(out, src, len, "system_fingerprint", NULL, false) &&
         buf_printf(out, ",\"object\":\"%s\"", object);
    if (api != CUTOFF_CHAT)
        ok = ok && put_member(out, src, len, "id", m->id, false);
    return ok;
}

/* The native answer's last object at the limit: what the last partial said
 * of the slot and the counts, "stop":true, "stop_type":"limit". CONTENT:
 * the text's escaped body. */
static bool put_native_last(struct buf *out, const char *src, size_t len, const struct made *m,
                            const char *content, size_t clen, const char *timings, size_t tlen)
{
    bool ok = buf_puts(out, "{\"index\":0,\"content\":\"") && buf_append(out, content, clen) &&
              buf_puts(out, "\",\"tokens\":[]") &&
              put_member(out, src, len, "id_slot", "-1", false) &&
              buf_puts(out, ",\"stop\":true") &&
              put_member(out, src, len, "model", m->model, false) &&
              put_member(out, src, len, "tokens_predicted", NULL, false) &&
              put_member(out, src, len, "tokens_evaluated", NULL, false) &&
              buf_puts(out, ",\"truncated\":false,\"stop_type\":\"limit\"");
    if (ok && tlen)
        ok = buf_puts(out, ",\"timings\":") && buf_append(out, timings, tlen);
    return ok && buf_putc(out, '}');
}

bool cutoff_final_events(struct buf *out, enum cutoff_api api, const struct cutoff_seen *seen,
                         const char *model, long long now)
{
    struct made m;
    made_fill(&m, model, now);
    const char *src = seen->last.len ? seen->last.data : NULL;
    size_t len = seen->last.len;
    bool ok;
    switch (api) {
    case CUTOFF_CHAT:
        ok = buf_puts(out, "data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}]") &&
             put_oai_tail(out, api, src, len, &m, "chat.completion.chunk") &&
             buf_puts(out, "}\n\ndata: [DONE]\n\n");
        break;
    case CUTOFF_OAI_CMPL:
        ok = buf_puts(out, "data: {\"choices\":[{\"text\":\"\",\"index\":0,\"logprobs\":null,"
                           "\"finish_reason\":\"length\"}]") &&
             put_oai_tail(out, api, src, len, &m, "text_completion") &&
             buf_puts(out, "}\n\ndata: [DONE]\n\n");
        break;
    case CUTOFF_NATIVE:
        ok = buf_puts(out, "data: ") && put_native_last(out, src, len, &m, "", 0, NULL, 0) &&
             buf_puts(out, "\n\n");
        break;
    default:
        ok = true;
        break;
    }
    return ok;
}

/* ------------------------------------------------ a plain answer back */

void cutoff_plain_init(struct cutoff_plain *pl, enum cutoff_api api)
{
    *pl = (struct cutoff_plain){ .api = api };
}

void cutoff_plain_free(struct cutoff_plain *pl)
{
    buf_free(&pl->content);
    buf_free(&pl->reasoning);
    json_decref(pl->tool_calls);
    cutoff_seen_free(&pl->seen);
    buf_free(&pl->final);
    buf_free(&pl->usage);
    buf_free(&pl->timings);
    buf_free(&pl->error);
    pl->tool_calls = NULL;
}

static bool keep(struct buf *b, const char *v, size_t vl)
{
    buf_clear(b);
    return buf_append(b, v, vl);
}

/* The string's escaped body appended to B (the pieces of one text join
 * as their escaped forms do). Null or not a string: nothing. */
static bool append_string_body(struct buf *b, const char *v, size_t vl)
{
    return !is_string(v, vl) || buf_append(b, v + 1, vl - 2);
}

/* String member NAME of OBJ appended to *DST ("" first when absent). */
static void json_append_str(json_t *obj, const char *name, const json_t *piece)
{
    const char *s = json_string_value(piece);
    if (!s)
        return;
    const char *had = json_string_value(json_object_get(obj, name));
    char *joined = NULL;
    if (asprintf(&joined, "%s%s", had ? had : "", s) < 0)
        return;
    json_object_set_new(obj, name, json_string(joined));
    free(joined);
}

/* A delta's tool_calls into the merged list: by "index", the first piece
 * brings id and name, the next ones more of the arguments. */
static bool merge_tool_calls(struct cutoff_plain *pl, const char *v, size_t vl)
{
    json_t *in = json_loadb(v, vl, 0, NULL);
    if (!json_is_array(in)) {
        json_decref(in);
        return true;
    }
    if (!pl->tool_calls && !(pl->tool_calls = json_array())) {
        json_decref(in);
        return false;
    }
    json_t *calls = pl->tool_calls;
    size_t i;
    json_t *d;
    json_array_foreach(in, i, d) {
        json_int_t k = json_integer_value(json_object_get(d, "index"));
        if (k < 0 || k > 1024)
            continue;
        while (json_array_size(calls) <= (size_t)k)
            json_array_append_new(calls, json_pack("{s:s,s:{s:s,s:s}}", "type", "function",
                                                   "function", "name", "", "arguments", ""));
        json_t *tc = json_array_get(calls, (size_t)k);
        json_t *fn = json_object_get(tc, "function");
        json_t *dfn = json_object_get(d, "function");
        if (json_is_object(fn) && json_is_object(dfn)) {
            json_append_str(fn, "name", json_object_get(dfn, "name"));
            json_append_str(fn, "arguments", json_object_get(dfn, "arguments"));
        }
        json_t *id = json_object_get(d, "id");
        if (json_is_string(id))
            json_object_set(tc, "id", id);
    }
    json_decref(in);
    return true;
}

bool cutoff_plain_feed(struct cutoff_plain *pl, const char *data, size_t len)
{
    if (!is_object(data, len))
        return true;                   /* [DONE], or nothing of ours */
    if (!cutoff_seen_note(&pl->seen, data, len))
        return false;
    const char *v;
    size_t vl;
    if (cutoff_json_member(data, len, "error", &v, &vl)) {
        const char *c;
        size_t cl;
        pl->error_code = cutoff_json_member(v, vl, "code", &c, &cl) ? atoi(c) : 500;
        if (pl->error_code < 400 || pl->error_code > 599)
            pl->error_code = 500;
        return keep(&pl->error, v, vl);
    }
    if (cutoff_json_member(data, len, "usage", &v, &vl) && !is_null(v, vl) && !keep(&pl->usage, v, vl))
        return false;
    if (cutoff_json_member(data, len, "timings", &v, &vl) && !keep(&pl->timings, v, vl))
        return false;
    switch (pl->api) {
    case CUTOFF_CHAT: {
        const char *d;
        size_t dl;
        if (choice_member(data, len, "delta", &d, &dl)) {
            if (cutoff_json_member(d, dl, "content", &v, &vl) && !append_string_body(&pl->content, v, vl))
                return false;
            if (cutoff_json_member(d, dl, "reasoning_content", &v, &vl) &&
                !append_string_body(&pl->reasoning, v, vl))
                return false;
            if (cutoff_json_member(d, dl, "tool_calls", &v, &vl) && !merge_tool_calls(pl, v, vl))
                return false;
        }
        if (choice_member(data, len, "finish_reason", &v, &vl) && !is_null(v, vl)) {
            pl->done = true;
            return keep(&pl->final, data, len);
        }
        return true;
    }
    case CUTOFF_OAI_CMPL:
        if (choice_member(data, len, "text", &v, &vl) && !append_string_body(&pl->content, v, vl))
            return false;
        if (choice_member(data, len, "finish_reason", &v, &vl) && !is_null(v, vl)) {
            pl->done = true;
            return keep(&pl->final, data, len);
        }
        return true;
    case CUTOFF_NATIVE:
        if (cutoff_json_member(data, len, "content", &v, &vl) && !append_string_body(&pl->content, v, vl))
            return false;
        if (cutoff_json_member(data, len, "stop", &v, &vl) && vl == 4 && !memcmp(v, "true", 4)) {
            pl->done = true;
            return keep(&pl->final, data, len);
        }
        return true;
    case CUTOFF_NONE:
        break;
    }
    return true;
}

/* "usage" from the events, else from the last timings (prompt tokens =
 * those evaluated and those from the cache), else none. */
static bool put_usage(struct buf *out, const struct cutoff_plain *pl)
{
    if (pl->usage.len)
        return buf_puts(out, ",\"usage\":") && buf_append(out, pl->usage.data, pl->usage.len);
    if (!pl->timings.len)
        return true;
    json_t *t = json_loadb(pl->timings.data, pl->timings.len, 0, NULL);
    json_int_t pn = json_integer_value(json_object_get(t, "prompt_n"));
    json_int_t cn = json_integer_value(json_object_get(t, "cache_n"));
    json_int_t gn = json_integer_value(json_object_get(t, "predicted_n"));
    bool has = json_object_get(t, "predicted_n") != NULL;
    json_decref(t);
    if (!has)
        return true;
    if (pn < 0)
        pn = 0;
    if (cn < 0)
        cn = 0;
    return buf_printf(out, ",\"usage\":{\"completion_tokens\":%lld,\"prompt_tokens\":%lld,"
                           "\"total_tokens\":%lld,\"prompt_tokens_details\":{\"cached_tokens\":%lld}}",
                      (long long)gn, (long long)(pn + cn), (long long)(gn + pn + cn), (long long)cn);
}

static bool put_timings(struct buf *out, const struct cutoff_plain *pl)
{
    return !pl->timings.len ||
           (buf_puts(out, ",\"timings\":") && buf_append(out, pl->timings.data, pl->timings.len));
}

/* The finish_reason: "length" when cut, else the final event's. */
static bool put_finish(struct buf *out, const struct cutoff_plain *pl, bool length)
{
    const char *v;
    size_t vl;
    if (!length && choice_member(pl->final.data, pl->final.len, "finish_reason", &v, &vl))
        return buf_puts(out, "\"finish_reason\":") && buf_append(out, v, vl);
    return buf_puts(out, "\"finish_reason\":\"length\"");
}

/* The native final event with the text put in and its settings saying
 * what the client asked (not a stream). */
static bool native_splice(struct buf *out, const struct cutoff_plain *pl)
{
    const char *f = pl->final.data, *c, *g = NULL, *s = NULL;
    size_t fl = pl->final.len, cl, gl, sl;
    if (!cutoff_json_member(f, fl, "content", &c, &cl))
        return false;
    bool ok = buf_append(out, f, (size_t)(c - f)) && buf_putc(out, '"') &&
              buf_append(out, pl->content.data, pl->content.len) && buf_putc(out, '"');
    const char *rest = c + cl;
    if (cutoff_json_member(f, fl, "generation_settings", &g, &gl) && g > rest &&
        cutoff_json_member(g, gl, "stream", &s, &sl) && sl == 4 && !memcmp(s, "true", 4)) {
        ok = ok && buf_append(out, rest, (size_t)(s - rest)) && buf_puts(out, "false");
        rest = s + sl;
    }
    return ok && buf_append(out, rest, (size_t)(f + fl - rest));
}

bool cutoff_plain_answer(struct cutoff_plain *pl, bool cut, const char *model, long long now,
                         struct buf *out, int *status)
{
    buf_clear(out);
    if (pl->error.len) {
        *status = pl->error_code;
        return buf_puts(out, "{\"error\":") && buf_append(out, pl->error.data, pl->error.len) &&
               buf_putc(out, '}');
    }
    *status = 200;
    struct made m;
    made_fill(&m, model, now);
    bool length = cut || !pl->done;
    const struct buf *src = pl->final.len ? &pl->final : &pl->seen.last;
    const char *s = src->len ? src->data : NULL;
    size_t sl = src->len;
    const char *content = pl->content.len ? pl->content.data : "";
    bool ok = true;
    switch (pl->api) {
    case CUTOFF_CHAT:
        ok = buf_puts(out, "{\"choices\":[{") && put_finish(out, pl, length) &&
             buf_puts(out, ",\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"") &&
             buf_append(out, content, pl->content.len) && buf_putc(out, '"');
        if (ok && pl->reasoning.len)
            ok = buf_puts(out, ",\"reasoning_content\":\"") &&
                 buf_append(out, pl->reasoning.data, pl->reasoning.len) && buf_putc(out, '"');
        if (ok && pl->tool_calls && json_array_size(pl->tool_calls)) {
            char *tc = json_dumps(pl->tool_calls, JSON_COMPACT);
            ok = tc && buf_puts(out, ",\"tool_calls\":") && buf_puts(out, tc);
            free(tc);
        }
        ok = ok && buf_puts(out, "}}]") &&
             put_member(out, s, sl, "created", m.created, false) &&
             put_member(out, s, sl, "model", m.model, false) &&
             put_member(out, s, sl, "system_fingerprint", NULL, false) &&
             buf_puts(out, ",\"object\":\"chat.completion\"") && put_usage(out, pl) &&
             put_member(out, s, sl, "id", m.id, false) && put_timings(out, pl) && buf_putc(out, '}');
        break;
    case CUTOFF_OAI_CMPL:
        ok = buf_puts(out, "{\"choices\":[{\"text\":\"") && buf_append(out, content, pl->content.len) &&
             buf_puts(out, "\",\"index\":0,\"logprobs\":null,") && put_finish(out, pl, length) &&
             buf_puts(out, "}]") &&
             put_member(out, s, sl, "created", m.created, false) &&
             put_member(out, s, sl, "model", m.model, false) &&
             put_member(out, s, sl, "system_fingerprint", NULL, false) &&
             buf_puts(out, ",\"object\":\"text_completion\"") && put_usage(out, pl) &&
             put_member(out, s, sl, "id", m.id, false) && put_timings(out, pl) && buf_putc(out, '}');
        break;
    case CUTOFF_NATIVE:
        if (!length && native_splice(out, pl))
            break;
        buf_clear(out);
        ok = put_native_last(out, s, sl, &m, content, pl->content.len, pl->timings.data,
                             pl->timings.len);
        break;
    case CUTOFF_NONE:
        ok = false;
        break;
    }
    return ok;
}
