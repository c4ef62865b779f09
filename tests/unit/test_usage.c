/* Usage that lasts: per-model counts, the state file, its corruption,
 * the ranking preload = popular reads, and the bounds. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "usage.h"

#define NOW 1767225600.0            /* 2026-01-01T00:00:00Z */
#define DAY 86400.0

struct fx {
    char dir[64];                   /* the state_dir */
    char file[128];                 /* DIR/usage.json */
    char msg[1024];
};

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof *f);
    strcpy(f->dir, "/tmp/test_usage.XXXXXX");
    if (!f || !mkdtemp(f->dir))
        return -1;
    snprintf(f->file, sizeof f->file, "%s/usage.json", f->dir);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void write_text(const char *path, const char *text)
{
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
}

static char *read_text(const char *path)
{
    FILE *fp = fopen(path, "r");
    if (!fp)
        return NULL;
    char *s = calloc(1, 1 << 20);
    size_t n = fread(s, 1, (1 << 20) - 1, fp);
    s[n] = '\0';
    fclose(fp);
    return s;
}

/* How many entries of DIR start with PREFIX. */
static int entries_starting(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        n += strncmp(e->d_name, prefix, strlen(prefix)) == 0;
    if (d)
        closedir(d);
    return n;
}

static struct usage *open_in(struct fx *f, double now, enum usage_open_result want)
{
    struct usage *u = usage_new();
    assert_non_null(u);
    enum usage_open_result got = usage_open(u, f->dir, now, f->msg, sizeof f->msg);
    if (got != want)
        fail_msg("usage_open: %d, wanted %d: %s", got, want, f->msg);
    return u;
}

static void counts_survive_a_save_and_a_new_open(void **state)
{
    struct fx *f = *state;
    struct usage *u = open_in(f, NOW, USAGE_OPEN_NEW);
    assert_string_equal(usage_path(u), f->file);
    assert_false(usage_dirty(u));
    usage_count_request(u, "tiny", NOW + 1, 10, 5, 7);      /* prompt 15, generated 7 */
    usage_count_request(u, "tiny", NOW + 2, -1, -1, -1);    /* no timings seen */
    usage_count_request(u, "qwen", NOW + 3, 0, 100, 20);
    usage_count_load(u, "tiny", NOW, 0.25);
    usage_count_load(u, "tiny", NOW + 5, 0.5);
    assert_true(usage_dirty(u));
    assert_int_equal(usage_save(u, NOW + 6, f->msg, sizeof f->msg), 0);
    assert_false(usage_dirty(u));
    assert_int_equal(entries_starting(f->dir, "usage.json.tmp"), 0);
    usage_free(u);

    u = open_in(f, NOW + 10, USAGE_OPEN_LOADED);
    assert_non_null(strstr(f->msg, "read the usage of 2 models from"));
    assert_int_equal(usage_size(u), 2);
    const struct usage_record *t = usage_find(u, "tiny");
    assert_non_null(t);
    assert_int_equal(t->requests, 2);
    assert_int_equal(t->prompt_tokens, 15);
    assert_int_equal(t->generated_tokens, 7);
    assert_int_equal(t->loads, 2);
    assert_true(t->load_seconds > 0.749 && t->load_seconds < 0.751);
    assert_int_equal(t->last_used, (int64_t)NOW + 2);
    assert_int_equal(t->last_loaded, (int64_t)NOW + 5);
    const struct usage_record *q = usage_find(u, "qwen");
    assert_non_null(q);
    assert_int_equal(q->requests, 1);
    assert_int_equal(q->prompt_tokens, 100);
    assert_int_equal(q->generated_tokens, 20);
    assert_int_equal(q->loads, 0);
    assert_null(usage_find(u, "nope"));
    usage_free(u);
}

static void nothing_is_written_until_something_changes(void **state)
{
    struct fx *f = *state;
    struct usage *u = open_in(f, NOW, USAGE_OPEN_NEW);
    assert_int_equal(usage_save(u, NOW, f->msg, sizeof f->msg), 0);
    assert_int_equal(access(f->file, F_OK), -1);              /* nothing counted: no file */
    usage_count_request(u, "tiny", NOW, -1, -1, -1);
    assert_int_equal(usage_save(u, NOW, f->msg, sizeof f->msg), 0);
    assert_int_equal(unlink(f->file), 0);
    assert_int_equal(usage_save(u, NOW + 10, f->msg, sizeof f->msg), 0);
    assert_int_equal(access(f->file, F_OK), -1);              /* unchanged since: not written again */
    usage_free(u);
}

static void a_file_that_does_not_parse_is_set_aside(void **state)
{
    struct fx *f = *state;
    write_text(f->file, "{\"version\": 1, \"models\": {\"tiny\": {\"requests\": 3");
    struct usage *u = open_in(f, NOW, USAGE_OPEN_SET_ASIDE);
    assert_non_null(strstr(f->msg, "not valid JSON"));
    assert_non_null(strstr(f->msg, "usage.json.corrupt-1767225600"));
    assert_int_equal(usage_size(u), 0);
    char aside[160];
    snprintf(aside, sizeof aside, "%s.corrupt-1767225600", f->file);
    char *kept = read_text(aside);
    assert_non_null(kept);                                    /* kept whole, for a person to look at */
    assert_string_equal(kept, "{\"version\": 1, \"models\": {\"tiny\": {\"requests\": 3");
    free(kept);
    assert_int_equal(access(f->file, F_OK), -1);
    /* Counting goes on, and the next save makes a good file. */
    assert_string_equal(usage_path(u), f->file);
    usage_count_request(u, "tiny", NOW + 1, -1, -1, -1);
    assert_int_equal(usage_save(u, NOW + 1, f->msg, sizeof f->msg), 0);
    usage_free(u);
    u = open_in(f, NOW + 2, USAGE_OPEN_LOADED);
    assert_int_equal(usage_find(u, "tiny")->requests, 1);
    usage_free(u);
}

static void a_file_of_the_wrong_shape_is_set_aside(void **state)
{
    struct fx *f = *state;
    static const struct { const char *text, *why; } bad[] = {
        { "[]", "not a JSON object" },
        { "{\"models\": {}}", "\"version\" is not 1" },
        { "{\"version\": 2, \"models\": {}}", "\"version\" is not 1" },
        { "{\"version\": 1, \"models\": []}", "\"models\" is not an object" },
        { "{\"version\": 1, \"models\": {\"a\": 5}}", "model \"a\" is not an object of counts" },
        { "{\"version\": 1, \"models\": {\"a\": {\"requests\": -1}}}", "model \"a\"" },
        { "{\"version\": 1, \"models\": {\"a\": {\"requests\": \"3\"}}}", "model \"a\"" },
        { "{\"version\": 1, \"models\": {\"a\": {\"load_seconds\": -0.5}}}", "model \"a\"" },
        { "{\"version\": 1, \"models\": {\"a\": {\"last_used\": 1.5}}}", "model \"a\"" },
        { "{\"version\": 1, \"models\": {\"\": {}}}", "model \"\"" },
        { "{\"version\": 1, \"version\": 1, \"models\": {}}", "not valid JSON" },   /* duplicate key */
        { "", "not valid JSON" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_text(f->file, bad[i].text);
        struct usage *u = open_in(f, NOW + (double)i, USAGE_OPEN_SET_ASIDE);
        if (!strstr(f->msg, bad[i].why))
            fail_msg("%s: the message does not say %s: %s", bad[i].text, bad[i].why, f->msg);
        assert_int_equal(usage_size(u), 0);
        assert_int_equal(access(f->file, F_OK), -1);
        usage_free(u);
    }
    assert_int_equal(entries_starting(f->dir, "usage.json.corrupt-"), (int)(sizeof bad / sizeof *bad));
}

static void a_fifo_in_its_place_is_set_aside_unread(void **state)
{
    struct fx *f = *state;
    assert_int_equal(mkfifo(f->file, 0600), 0);
    struct usage *u = open_in(f, NOW, USAGE_OPEN_SET_ASIDE);
    assert_non_null(strstr(f->msg, "not a regular file"));
    usage_free(u);
}

static void missing_counts_read_as_zero_and_unknown_keys_are_ignored(void **state)
{
    struct fx *f = *state;
    write_text(f->file, "{\"version\": 1, \"written_by\": \"a later llama-pool\", \"models\": "
                        "{\"a\": {\"requests\": 4, \"last_used\": 1767225000, \"colour\": \"blue\"}}}");
    struct usage *u = open_in(f, NOW, USAGE_OPEN_LOADED);
    const struct usage_record *a = usage_find(u, "a");
    assert_non_null(a);
    assert_int_equal(a->requests, 4);
    assert_int_equal(a->prompt_tokens, 0);
    assert_int_equal(a->loads, 0);
    assert_int_equal(a->last_loaded, 0);
    usage_free(u);
}

static void the_most_used_come_first_then_the_most_recent(void **state)
{
    struct fx *f = *state;
    (void)f;
    struct usage *u = usage_new();
    for (int i = 0; i < 3; i++)
        usage_count_request(u, "often", NOW + i, -1, -1, -1);
    usage_count_request(u, "once-old", NOW - 50, -1, -1, -1);
    usage_count_request(u, "once-new", NOW - 10, -1, -1, -1);
    usage_count_request(u, "twice", NOW - 99, -1, -1, -1);
    usage_count_request(u, "twice", NOW - 98, -1, -1, -1);
    usage_count_load(u, "loaded-only", NOW, 1.0);             /* never asked for: last */
    usage_count_request(u, "b-tie", NOW - 5, -1, -1, -1);
    usage_count_request(u, "a-tie", NOW - 5, -1, -1, -1);
    size_t n;
    const struct usage_record **v = usage_ranked(u, &n);
    static const char *const want[] = { "often", "twice", "a-tie", "b-tie", "once-new", "once-old",
                                        "loaded-only" };
    assert_int_equal(n, 7);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(v[i]->name, want[i]);
    free(v);
    usage_free(u);

    u = usage_new();
    v = usage_ranked(u, &n);
    assert_null(v);
    assert_int_equal(n, 0);
    usage_free(u);
}

static void records_idle_for_90_days_are_dropped(void **state)
{
    struct fx *f = *state;
    write_text(f->file, "{\"version\": 1, \"models\": {"
                        "\"stale\": {\"requests\": 900, \"last_used\": 1759449000},"      /* 90 days + 10 min ago */
                        "\"recent\": {\"requests\": 1, \"last_used\": 1759449600},"       /* exactly 90 days ago */
                        "\"loaded\": {\"loads\": 1, \"last_loaded\": 1767225000},"
                        "\"never\": {}}}");
    struct usage *u = open_in(f, NOW, USAGE_OPEN_LOADED);
    assert_null(usage_find(u, "stale"));
    assert_null(usage_find(u, "never"));
    assert_non_null(usage_find(u, "recent"));
    assert_non_null(usage_find(u, "loaded"));
    assert_int_equal(usage_size(u), 2);
    /* At a save too: a day later "recent" has had its 90 days. */
    usage_count_request(u, "new", NOW + DAY, -1, -1, -1);
    assert_int_equal(usage_save(u, NOW + DAY, f->msg, sizeof f->msg), 0);
    assert_null(usage_find(u, "recent"));
    assert_non_null(usage_find(u, "new"));
    usage_free(u);
    u = open_in(f, NOW + DAY, USAGE_OPEN_LOADED);
    assert_int_equal(usage_size(u), 2);                       /* loaded, new */
    usage_free(u);
}

static void past_the_cap_the_least_recently_active_go(void **state)
{
    struct fx *f = *state;
    struct usage *u = open_in(f, NOW, USAGE_OPEN_NEW);
    char name[32];
    for (int i = 0; i < USAGE_MAX_RECORDS + 50; i++) {
        snprintf(name, sizeof name, "m%05d", i);
        usage_count_request(u, name, NOW + i, -1, -1, -1);    /* m00000 the least recent */
    }
    assert_int_equal(usage_size(u), USAGE_MAX_RECORDS + 50);
    assert_non_null(usage_find(u, "m00049"));
    assert_int_equal(usage_save(u, NOW + USAGE_MAX_RECORDS + 50, f->msg, sizeof f->msg), 0);
    assert_int_equal(usage_size(u), USAGE_MAX_RECORDS);
    assert_null(usage_find(u, "m00000"));
    assert_null(usage_find(u, "m00049"));
    assert_non_null(usage_find(u, "m00050"));
    snprintf(name, sizeof name, "m%05d", USAGE_MAX_RECORDS + 49);
    assert_non_null(usage_find(u, name));
    /* Found after the drop (the index was made again), and counted on. */
    usage_count_request(u, "m00050", NOW + 1e5, -1, -1, -1);
    assert_int_equal(usage_find(u, "m00050")->requests, 2);
    assert_int_equal(usage_size(u), USAGE_MAX_RECORDS);
    usage_free(u);
    u = open_in(f, NOW + USAGE_MAX_RECORDS + 50, USAGE_OPEN_LOADED);
    assert_int_equal(usage_size(u), USAGE_MAX_RECORDS);
    usage_free(u);
}

static void a_state_dir_that_cannot_be_made_counts_in_memory(void **state)
{
    struct fx *f = *state;
    char dir[160];
    snprintf(dir, sizeof dir, "%s/no/such/parent", f->dir);
    struct usage *u = usage_new();
    assert_int_equal(usage_open(u, dir, NOW, f->msg, sizeof f->msg), USAGE_OPEN_MEMORY_ONLY);
    assert_non_null(strstr(f->msg, dir));
    assert_non_null(strstr(f->msg, strerror(ENOENT)));
    assert_null(usage_path(u));
    usage_count_request(u, "tiny", NOW, 1, 2, 3);
    assert_int_equal(usage_find(u, "tiny")->requests, 1);
    assert_int_equal(usage_save(u, NOW, f->msg, sizeof f->msg), 0);   /* nowhere to write: not an error */
    usage_free(u);

    /* A file where the directory should be. */
    snprintf(dir, sizeof dir, "%s/plain-file", f->dir);
    write_text(dir, "");
    u = usage_new();
    assert_int_equal(usage_open(u, dir, NOW, f->msg, sizeof f->msg), USAGE_OPEN_MEMORY_ONLY);
    assert_non_null(strstr(f->msg, strerror(ENOTDIR)));
    usage_free(u);
}

static void a_save_that_fails_leaves_the_counts_in_memory(void **state)
{
    struct fx *f = *state;
    char dir[160];
    snprintf(dir, sizeof dir, "%s/state", f->dir);
    struct usage *u = usage_new();
    assert_int_equal(usage_open(u, dir, NOW, f->msg, sizeof f->msg), USAGE_OPEN_NEW);
    assert_int_equal(rmdir(dir), 0);                          /* gone from under it */
    usage_count_request(u, "tiny", NOW, -1, -1, -1);
    assert_int_equal(usage_save(u, NOW, f->msg, sizeof f->msg), -1);
    assert_non_null(strstr(f->msg, "cannot write"));
    assert_non_null(strstr(f->msg, dir));
    assert_non_null(strstr(f->msg, strerror(ENOENT)));
    assert_null(usage_path(u));
    usage_count_request(u, "tiny", NOW + 1, -1, -1, -1);
    assert_int_equal(usage_find(u, "tiny")->requests, 2);
    assert_int_equal(usage_save(u, NOW + 1, f->msg, sizeof f->msg), 0);   /* no more tries */
    usage_free(u);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(counts_survive_a_save_and_a_new_open),
        T(nothing_is_written_until_something_changes),
        T(a_file_that_does_not_parse_is_set_aside),
        T(a_file_of_the_wrong_shape_is_set_aside),
        T(a_fifo_in_its_place_is_set_aside_unread),
        T(missing_counts_read_as_zero_and_unknown_keys_are_ignored),
        T(the_most_used_come_first_then_the_most_recent),
        T(records_idle_for_90_days_are_dropped),
        T(past_the_cap_the_least_recently_active_go),
        T(a_state_dir_that_cannot_be_made_counts_in_memory),
        T(a_save_that_fails_leaves_the_counts_in_memory),
#undef T
    };
    return cmocka_run_group_tests_name("usage", tests, NULL, NULL);
}
