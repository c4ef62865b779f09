/* The children's /metrics: merged into one exposition (pure), and scraped
 * from scripted children on a real loop. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <ev.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "child_metrics.h"
#include "health.h"

/* ------------------------------------------------------------ helpers */

/* llama-server b9749's /metrics after one completion (captured with
 * --metrics; see tests/data). */
static char *real_text(size_t *len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/data/llama-server-b9749-metrics.txt", SOURCE_ROOT);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *text = calloc(1, 1 << 16);
    *len = fread(text, 1, (1 << 16) - 1, f);
    fclose(f);
    assert_true(*len > 1000);
    return text;
}

static char *merge(const struct child_metrics_text *c, size_t n)
{
    struct buf out = { 0 };
    assert_true(child_metrics_merge(c, n, &out));
    return out.data ? buf_take(&out) : strdup("");
}

static size_t count(const char *hay, const char *needle)
{
    size_t n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)); p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return true;
    return false;
}

/* Checks TEXT is an exposition Prometheus takes: each family's HELP and
 * TYPE at most once and before its samples, and its samples together,
 * every one of them with model and instance labels. Returns the number
 * of samples. */
static size_t check_exposition(const char *text)
{
    char seen[64][128];
    size_t nseen = 0, samples = 0;
    char current[128] = "";
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        assert_non_null(nl);                         /* every line ends */
        char line[1024];
        size_t len = (size_t)(nl - p);
        assert_true(len < sizeof line);
        memcpy(line, p, len);
        line[len] = '\0';
        p = nl + 1;
        char kind[8], name[128];
        if (sscanf(line, "# %7s %127s", kind, name) == 2 && (!strcmp(kind, "HELP") || !strcmp(kind, "TYPE"))) {
            if (strcmp(name, current) != 0) {
                for (size_t i = 0; i < nseen; i++)
                    if (!strcmp(seen[i], name))
                        fail_msg("family %s comes back: %s", name, line);
                assert_true(nseen < 64);
                snprintf(seen[nseen++], sizeof seen[0], "%s", name);
                snprintf(current, sizeof current, "%s", name);
            } else if (!strcmp(kind, "HELP")) {
                fail_msg("HELP after TYPE, or twice: %s", line);
            }
            continue;
        }
        if (line[0] == '#')
            continue;
        size_t nl_name = strcspn(line, "{ ");
        if (!*current || strncmp(line, current, strlen(current)) != 0 || nl_name < strlen(current)) {
            /* a family of its own, without HELP or TYPE: once, too */
            snprintf(name, sizeof name, "%.*s", (int)nl_name, line);
            for (size_t i = 0; i < nseen; i++)
                if (!strcmp(seen[i], name))
                    fail_msg("sample outside its family %s: %s", current, line);
            assert_true(nseen < 64);
            snprintf(seen[nseen++], sizeof seen[0], "%s", name);
            snprintf(current, sizeof current, "%s", name);
        }
        if (!strstr(line, "{model=\"") || !strstr(line, "\",instance=\""))
            fail_msg("sample without model and instance: %s", line);
        samples++;
    }
    return samples;
}

/* ------------------------------------------------------------ merging */

static void two_real_children_make_one_family_each_with_both_samples(void **state)
{
    (void)state;
    size_t len;
    char *real = real_text(&len);
    struct child_metrics_text c[] = {
        { .model = "tiny", .instance = "tiny#1", .text = real, .len = len },
        { .model = "big", .instance = "big#2", .text = real, .len = len },
    };
    char *out = merge(c, 2);
    assert_int_equal(check_exposition(out), 28);     /* 14 families, 2 samples each */
    assert_int_equal(count(out, "# HELP "), 14);
    assert_int_equal(count(out, "# TYPE "), 14);
    assert_true(has_line(out, "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
                              "# TYPE llamacpp:prompt_tokens_total counter\n"
                              "llamacpp:prompt_tokens_total{model=\"tiny\",instance=\"tiny#1\"} 18\n"
                              "llamacpp:prompt_tokens_total{model=\"big\",instance=\"big#2\"} 18"));
    assert_true(has_line(out, "llamacpp:n_busy_slots_per_decode{model=\"big\",instance=\"big#2\"} 1"));
    /* in the order llama-server gives them */
    assert_true(strstr(out, "llamacpp:prompt_tokens_total") < strstr(out, "llamacpp:requests_deferred"));
    free(out);
    free(real);
}

static void a_childs_labels_are_kept_after_model_and_instance(void **state)
{
    (void)state;
    const char *text =
        "# HELP llamacpp:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position\n"
        "# TYPE llamacpp:spec_decode_num_accepted_tokens_per_pos_total counter\n"
        "llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"} 12\n"
        "llamacpp:spec_decode_num_accepted_tokens_per_pos_total{ position = \"1\" , } 7 1700000000000\n"
        "llamacpp:x{a=\"1\",b=\"q\\\"uo\\\\te\\nd\"} -Inf\n";
    struct child_metrics_text c = { .model = "m", .instance = "m#1", .text = text, .len = strlen(text) };
    char *out = merge(&c, 1);
    assert_int_equal(check_exposition(out), 3);
    assert_true(has_line(out, "llamacpp:spec_decode_num_accepted_tokens_per_pos_total"
                              "{model=\"m\",instance=\"m#1\",position=\"0\"} 12"));
    assert_true(has_line(out, "llamacpp:spec_decode_num_accepted_tokens_per_pos_total"
                              "{model=\"m\",instance=\"m#1\",position=\"1\"} 7 1700000000000"));
    assert_true(has_line(out, "llamacpp:x{model=\"m\",instance=\"m#1\",a=\"1\",b=\"q\\\"uo\\\\te\\nd\"} -Inf"));
    /* a family without HELP or TYPE comes out without them */
    assert_null(strstr(out, "# TYPE llamacpp:x "));
    free(out);
}

static void a_childs_own_model_and_instance_labels_become_exported_ones(void **state)
{
    (void)state;
    const char *text = "llamacpp:a{model=\"gguf\",instance=\"x\",slot=\"2\"} 1\n"
                       "llamacpp:b{model=\"gguf\",exported_model=\"y\"} 1\n";   /* would clash: junk */
    struct child_metrics_text c = { .model = "m", .instance = "m#1", .text = text, .len = strlen(text) };
    char *out = merge(&c, 1);
    assert_string_equal(out, "llamacpp:a{model=\"m\",instance=\"m#1\",exported_model=\"gguf\","
                             "exported_instance=\"x\",slot=\"2\"} 1\n");
    free(out);
}

static void model_and_instance_values_are_escaped(void **state)
{
    (void)state;
    const char *text = "llamacpp:a 1\n";
    struct child_metrics_text c = { .model = "q\"b\\s", .instance = "q\"b\\s#1\nx\xff",
                                    .text = text, .len = strlen(text) };
    char *out = merge(&c, 1);
    assert_string_equal(out, "llamacpp:a{model=\"q\\\"b\\\\s\",instance=\"q\\\"b\\\\s#1\\nx\xEF\xBF\xBD\"} 1\n");
    free(out);
}

static void junk_lines_are_skipped_one_at_a_time(void **state)
{
    (void)state;
    static const char text[] =
        "# HELP llamacpp:good Good.\n"
        "# TYPE llamacpp:good gauge\n"
        "garbage\n"
        "llamacpp:good{a=b} 1\n"                     /* unquoted value */
        "llamacpp:good{a=\"b} 1\n"                   /* unterminated */
        "llamacpp:good{a=\"\\t\"} 1\n"               /* not an escape of the format */
        "llamacpp:good{1a=\"b\"} 1\n"                /* bad label name */
        "llamacpp:good{a=\"1\",a=\"2\"} 1\n"         /* a label twice */
        "llamacpp:good 1 2 3\n"
        "llamacpp:good notanumber\n"
        "llamacpp:good 0x10\n"
        "llamacpp:good 1 12.5\n"                     /* timestamp not an integer */
        "llamacpp:good\n"
        "llamacpp:good \xff\xfe\n"                   /* not UTF-8 */
        "llamacpp:good{a=\"\xc3\"} 1\n"
        "# TYPE llamacpp:good sometype\n"
        "# HELP llamacpp:good bad \\escape\n"
        "process_cpu_seconds_total 3\n"              /* not llama-server's: not taken */
        "# TYPE process_cpu_seconds_total counter\n"
        "llamacpp: 1\n"
        "   \n"
        "# a comment\n"
        "llamacpp:good 42\r\n"
        "llamacpp:good{le=\"+Inf\"} NaN\n"
        "llamacpp:good{nul=\"a\0b\"} 1\n"
        "llamacpp:last 1e+06";                       /* no final newline */
    struct child_metrics_text c = { .model = "m", .instance = "m#1", .text = text, .len = sizeof text - 1 };
    char *out = merge(&c, 1);
    assert_string_equal(out,
        "# HELP llamacpp:good Good.\n"
        "# TYPE llamacpp:good gauge\n"
        "llamacpp:good{model=\"m\",instance=\"m#1\"} 42\n"
        "llamacpp:good{model=\"m\",instance=\"m#1\",le=\"+Inf\"} NaN\n"
        "llamacpp:last{model=\"m\",instance=\"m#1\"} 1e+06\n");
    free(out);
}

static void a_family_of_one_child_only_comes_in_first_seen_order(void **state)
{
    (void)state;
    const char *a = "# HELP llamacpp:both B.\n# TYPE llamacpp:both counter\nllamacpp:both 1\n"
                    "# HELP llamacpp:only_a A.\n# TYPE llamacpp:only_a gauge\nllamacpp:only_a 2\n";
    const char *b = "# HELP llamacpp:only_b B only.\n# TYPE llamacpp:only_b gauge\nllamacpp:only_b 3\n"
                    "# HELP llamacpp:both B, said again.\n# TYPE llamacpp:both counter\nllamacpp:both 4\n";
    struct child_metrics_text c[] = {
        { .model = "a", .instance = "a#1", .text = a, .len = strlen(a) },
        { .model = "b", .instance = "b#1", .text = b, .len = strlen(b) },
    };
    char *out = merge(c, 2);
    assert_string_equal(out,
        "# HELP llamacpp:both B.\n# TYPE llamacpp:both counter\n"
        "llamacpp:both{model=\"a\",instance=\"a#1\"} 1\n"
        "llamacpp:both{model=\"b\",instance=\"b#1\"} 4\n"
        "# HELP llamacpp:only_a A.\n# TYPE llamacpp:only_a gauge\n"
        "llamacpp:only_a{model=\"a\",instance=\"a#1\"} 2\n"
        "# HELP llamacpp:only_b B only.\n# TYPE llamacpp:only_b gauge\n"
        "llamacpp:only_b{model=\"b\",instance=\"b#1\"} 3\n");
    free(out);
}

static void a_child_that_types_a_family_otherwise_has_those_samples_skipped(void **state)
{
    (void)state;
    const char *a = "# TYPE llamacpp:n gauge\nllamacpp:n 1\n";
    const char *b = "# TYPE llamacpp:n counter\nllamacpp:n 2\n# TYPE llamacpp:m gauge\nllamacpp:m 3\n";
    struct child_metrics_text c[] = {
        { .model = "a", .instance = "a#1", .text = a, .len = strlen(a) },
        { .model = "b", .instance = "b#1", .text = b, .len = strlen(b) },
        { .model = "c", .instance = "c#1", .text = a, .len = strlen(a) },
    };
    char *out = merge(c, 3);
    assert_string_equal(out,
        "# TYPE llamacpp:n gauge\n"
        "llamacpp:n{model=\"a\",instance=\"a#1\"} 1\n"
        "llamacpp:n{model=\"c\",instance=\"c#1\"} 1\n"
        "# TYPE llamacpp:m gauge\n"
        "llamacpp:m{model=\"b\",instance=\"b#1\"} 3\n");
    free(out);
}

static void histogram_samples_stay_with_their_family(void **state)
{
    (void)state;
    const char *h = "# HELP llamacpp:lat Latency.\n# TYPE llamacpp:lat histogram\n"
                    "llamacpp:lat_bucket{le=\"1\"} 1\nllamacpp:lat_bucket{le=\"+Inf\"} 2\n"
                    "llamacpp:lat_sum 3.5\nllamacpp:lat_count 2\n"
                    "# TYPE llamacpp:g gauge\nllamacpp:g 1\n";
    struct child_metrics_text c[] = {
        { .model = "a", .instance = "a#1", .text = h, .len = strlen(h) },
        { .model = "b", .instance = "b#1", .text = h, .len = strlen(h) },
    };
    char *out = merge(c, 2);
    assert_int_equal(check_exposition(out), 10);
    assert_true(has_line(out, "llamacpp:lat_count{model=\"a\",instance=\"a#1\"} 2\n"
                              "llamacpp:lat_bucket{model=\"b\",instance=\"b#1\",le=\"1\"} 1"));
    free(out);
}

static void a_skipped_child_is_a_comment_line(void **state)
{
    (void)state;
    size_t len;
    char *real = real_text(&len);
    struct child_metrics_text c[] = {
        { .model = "a", .instance = "a#1", .err = "no answer within 1 s" },
        { .model = "b", .instance = "b#1", .text = real, .len = len },
        { .model = "c", .instance = "c#1\nnot a line", .err = "answered HTTP 501\r\n" },
    };
    char *out = merge(c, 3);
    assert_int_equal(check_exposition(out), 14);
    assert_true(has_line(out, "# llama-pool: skipped a#1 (model a): no answer within 1 s"));
    assert_true(has_line(out, "# llama-pool: skipped c#1 not a line (model c): answered HTTP 501  "));
    assert_null(strstr(out, "model=\"a\""));
    free(out);
    free(real);
}

static void nothing_in_nothing_out(void **state)
{
    (void)state;
    char *out = merge(NULL, 0);
    assert_string_equal(out, "");
    free(out);
    struct child_metrics_text c = { .model = "a", .instance = "a#1", .text = "", .len = 0 };
    out = merge(&c, 1);
    assert_string_equal(out, "");
    free(out);
}

/* ------------------------------------------------------------ scraping */

/* A scripted child: accepts one connection, reads one request, and
 * answers RESPONSE (NULL: never; it waits for the client to leave). */
struct child {
    int fd;
    unsigned port;
    const char *response;
    char request[2048];
    pthread_t th;
};

static void *child_main(void *arg)
{
    struct child *c = arg;
    int fd = accept(c->fd, NULL, NULL);
    if (fd < 0)
        return NULL;
    size_t got = 0;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    while (!strstr(c->request, "\r\n\r\n") && got < sizeof c->request - 1 && poll(&p, 1, 5000) > 0) {
        ssize_t n = read(fd, c->request + got, sizeof c->request - 1 - got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (c->response) {
        ssize_t w = write(fd, c->response, strlen(c->response));
        (void)w;
    } else {
        char b[64];
        while (poll(&p, 1, 5000) > 0 && read(fd, b, sizeof b) > 0)
            ;                        /* until the scrape gives up */
    }
    close(fd);
    return NULL;
}

static void child_start(struct child *c, const char *response)
{
    memset(c, 0, sizeof *c);
    c->response = response;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(c->fd >= 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof a;
    assert_int_equal(bind(c->fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(c->fd, 4), 0);
    assert_int_equal(getsockname(c->fd, (struct sockaddr *)&a, &alen), 0);
    c->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&c->th, NULL, child_main, c), 0);
}

static void child_join(struct child *c)
{
    shutdown(c->fd, SHUT_RDWR);      /* an accept still waiting returns */
    pthread_join(c->th, NULL);
    close(c->fd);
}

struct outcome {
    struct ev_loop *loop;
    int calls;
    double at;
    char text[4][256];
    char err[4][256];
    bool skipped[4];
};

static void scraped(void *arg, const struct child_metrics_text *r, size_t n)
{
    struct outcome *o = arg;
    o->calls++;
    o->at = ev_time();
    for (size_t i = 0; i < n && i < 4; i++) {
        o->skipped[i] = !r[i].text;
        snprintf(o->text[i], sizeof o->text[i], "%s %s %.*s", r[i].model, r[i].instance,
                 r[i].text ? (int)r[i].len : 0, r[i].text ? r[i].text : "");
        snprintf(o->err[i], sizeof o->err[i], "%s", r[i].err ? r[i].err : "");
    }
    ev_break(o->loop, EVBREAK_ALL);
}

static void guard(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w; (void)revents;
    ev_break(loop, EVBREAK_ALL);
}

static void each_child_is_asked_with_its_key_and_the_slow_one_is_skipped_at_the_deadline(void **state)
{
    (void)state;
    struct child ok, refused, silent;
    child_start(&ok, "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                     "Content-Length: 15\r\n\r\nllamacpp:a 1\n\n\n");
    child_start(&refused, "HTTP/1.1 501 Not Implemented\r\nContent-Length: 2\r\n\r\n{}");
    child_start(&silent, NULL);
    /* a port nobody listens on */
    int gone = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof a;
    assert_int_equal(bind(gone, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(gone, (struct sockaddr *)&a, &alen), 0);
    unsigned gone_port = ntohs(a.sin_port);
    close(gone);

    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct health *h = health_new(loop);
    struct outcome o = { .loop = loop };
    struct child_metrics_target t[] = {
        { "ok", "ok#1", ok.port, "key-of-ok" },
        { "refused", "refused#1", refused.port, "key-2" },
        { "silent", "silent#3", silent.port, "key-3" },
        { "gone", "gone#1", gone_port, NULL },
    };
    ev_now_update(loop);              /* timers count from the loop's time */
    double t0 = ev_now(loop);
    struct child_metrics_scrape *s = child_metrics_scrape(loop, h, t, 4, 0.3, scraped, &o);
    assert_non_null(s);
    assert_int_equal(o.calls, 0);             /* never from inside the call */
    ev_timer g;
    ev_timer_init(&g, guard, 5., 0.);
    ev_timer_start(loop, &g);
    ev_run(loop, 0);
    ev_timer_stop(loop, &g);

    assert_int_equal(o.calls, 1);
    if (o.at - t0 < 0.28)
        fail_msg("done after %.3f s: %s / %s / %s", o.at - t0, o.err[1], o.err[2], o.err[3]);
    assert_true(o.at - t0 < 1.0);             /* the deadline, not curl's retries */
    assert_false(o.skipped[0]);
    assert_string_equal(o.text[0], "ok ok#1 llamacpp:a 1\n\n\n");
    assert_true(o.skipped[1]);
    assert_string_equal(o.err[1], "answered HTTP 501");
    assert_true(o.skipped[2]);
    assert_true(strstr(o.err[2], "300") || strstr(o.err[2], "0.3"));   /* curl's timeout, or ours */
    assert_true(o.skipped[3]);
    if (!strstr(o.err[3], "connect"))
        fail_msg("gone: %s", o.err[3]);
    assert_non_null(strstr(ok.request, "GET /metrics HTTP/1.1\r\n"));
    assert_non_null(strstr(ok.request, "\r\nAuthorization: Bearer key-of-ok\r\n"));
    assert_non_null(strstr(refused.request, "\r\nAuthorization: Bearer key-2\r\n"));

    health_free(h);
    ev_loop_destroy(loop);
    child_join(&ok);
    child_join(&refused);
    child_join(&silent);
}

static void no_children_still_answers_from_the_loop_and_a_cancel_calls_nothing(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct health *h = health_new(loop);
    struct outcome o = { .loop = loop };
    assert_non_null(child_metrics_scrape(loop, h, NULL, 0, 1.0, scraped, &o));
    assert_int_equal(o.calls, 0);
    ev_timer g;
    ev_timer_init(&g, guard, 5., 0.);
    ev_timer_start(loop, &g);
    ev_run(loop, 0);
    assert_int_equal(o.calls, 1);
    assert_true(ev_time() - o.at < 0.5);

    /* cancelled with a probe in flight: no call, nothing left behind */
    struct child silent;
    child_start(&silent, NULL);
    struct child_metrics_target t = { "s", "s#1", silent.port, "k" };
    struct child_metrics_scrape *s = child_metrics_scrape(loop, h, &t, 1, 1.0, scraped, &o);
    assert_non_null(s);
    ev_run(loop, EVRUN_NOWAIT);
    child_metrics_cancel(s);
    ev_timer_set(&g, 0.2, 0.);
    ev_timer_start(loop, &g);
    ev_run(loop, 0);
    assert_int_equal(o.calls, 1);
    health_free(h);
    ev_loop_destroy(loop);
    child_join(&silent);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(two_real_children_make_one_family_each_with_both_samples),
        cmocka_unit_test(a_childs_labels_are_kept_after_model_and_instance),
        cmocka_unit_test(a_childs_own_model_and_instance_labels_become_exported_ones),
        cmocka_unit_test(model_and_instance_values_are_escaped),
        cmocka_unit_test(junk_lines_are_skipped_one_at_a_time),
        cmocka_unit_test(a_family_of_one_child_only_comes_in_first_seen_order),
        cmocka_unit_test(a_child_that_types_a_family_otherwise_has_those_samples_skipped),
        cmocka_unit_test(histogram_samples_stay_with_their_family),
        cmocka_unit_test(a_skipped_child_is_a_comment_line),
        cmocka_unit_test(nothing_in_nothing_out),
        cmocka_unit_test(each_child_is_asked_with_its_key_and_the_slow_one_is_skipped_at_the_deadline),
        cmocka_unit_test(no_children_still_answers_from_the_loop_and_a_cancel_calls_nothing),
    };
    return cmocka_run_group_tests_name("child_metrics", tests, NULL, NULL);
}
