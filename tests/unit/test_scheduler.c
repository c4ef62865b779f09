/* The scheduler's policy, event by event, with a fake clock: who is served,
 * who waits, what starts, who fails and when. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "scheduler.h"

/* ---------- helpers ---------- */

#define MAXGOT 512

/* The actions of one drain, messages copied (they live until the next call). */
struct got {
    size_t n;
    struct sched_action a[MAXGOT];
    char msg[MAXGOT][160];
};

static struct got g;

static struct got *drain(struct sched *s)
{
    struct sched_action a;
    g.n = 0;
    while (sched_next_action(s, &a)) {
        assert_true(g.n < MAXGOT);
        g.msg[g.n][0] = '\0';
        if (a.message)
            snprintf(g.msg[g.n], sizeof g.msg[g.n], "%s", a.message);
        a.message = g.msg[g.n];
        g.a[g.n++] = a;
    }
    return &g;
}

static size_t count(const struct got *x, enum sched_action_kind kind)
{
    size_t n = 0;
    for (size_t i = 0; i < x->n; i++)
        n += x->a[i].kind == kind;
    return n;
}

/* The I-th action of KIND, failing the test when there is none. */
static const struct sched_action *nth(const struct got *x, enum sched_action_kind kind, size_t i)
{
    for (size_t k = 0; k < x->n; k++)
        if (x->a[k].kind == kind && i-- == 0)
            return &x->a[k];
    fail_msg("no action #%zu of kind %d among %zu", i, (int)kind, x->n);
    return NULL;
}

enum { TINY, BIG, OTHER };

/* Three models: tiny (up to 3 instances, 4 slots expected), big (1
 * instance, 1 slot), other (2 instances, 2 slots). */
static struct sched *pool_new(unsigned max_queue, double queue_timeout)
{
    struct sched_limits l = { .max_queue = max_queue, .queue_timeout = queue_timeout };
    struct sched *s = sched_new(&l);
    assert_non_null(s);
    sched_models_resize(s, 3);
    sched_model_set(s, TINY, "tiny", &(struct sched_model_info){ 0, 3, 4 });
    sched_model_set(s, BIG, "big", &(struct sched_model_info){ 0, 1, 1 });
    sched_model_set(s, OTHER, "other", &(struct sched_model_info){ 0, 2, 2 });
    drain(s);
    return s;
}

/* An instance that is there and ready with SLOTS slots. */
static void ready(struct sched *s, double now, sched_inst_t inst, size_t model, unsigned slots)
{
    sched_instance_added(s, now, inst, model);
    sched_instance_ready(s, now, inst, slots);
}

/* ---------- choosing an instance ---------- */

static void a_request_goes_to_a_ready_instance_with_a_free_slot(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 1, 50, TINY, 2);
    assert_int_equal(drain(s)->n, 0);

    sched_request(s, 2, 10, TINY);
    struct got *x = drain(s);
    assert_int_equal(x->n, 1);
    assert_int_equal(x->a[0].kind, SCHED_DISPATCH);
    assert_int_equal(x->a[0].req, 10);
    assert_int_equal(x->a[0].inst, 50);
    assert_int_equal(x->a[0].model, TINY);
    assert_int_equal(sched_in_flight(s, 50), 1);

    sched_request(s, 3, 11, TINY);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->req, 11);
    assert_int_equal(sched_in_flight(s, 50), 2);

    /* Both slots taken: the third waits (and asks for a second instance). */
    sched_request(s, 4, 12, TINY);
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 0);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(sched_waiting(s), 1);
    assert_int_equal(sched_waiting_model(s, TINY), 1);
    assert_int_equal(sched_in_flight(s, 50), 2);
    sched_free(s);
}

static void the_instance_with_fewest_in_flight_serves_earliest_added_on_ties(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 7, TINY, 4);            /* added first, larger id */
    ready(s, 0, 3, TINY, 4);
    drain(s);

    sched_request(s, 1, 1, TINY);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->inst, 7);   /* tie: earliest added */
    sched_request(s, 1, 2, TINY);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->inst, 3);   /* 7 has one, 3 none */
    sched_request(s, 1, 3, TINY);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->inst, 7);
    sched_request(s, 1, 4, TINY);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->inst, 3);   /* 7: 2, 3: 1 */
    sched_request_done(s, 2, 1);
    sched_request_done(s, 2, 3);
    drain(s);
    assert_int_equal(sched_in_flight(s, 7), 0);
    assert_int_equal(sched_in_flight(s, 3), 2);
    sched_request(s, 3, 5, TINY);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->inst, 7);
    sched_free(s);
}

static void waiters_are_served_first_come_first_served_when_a_slot_frees(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 100, BIG);
    sched_request(s, 2, 101, BIG);
    sched_request(s, 3, 102, BIG);
    sched_request(s, 4, 103, BIG);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 1);
    assert_int_equal(count(x, SCHED_START), 0);     /* big is at its max of 1 */
    assert_int_equal(sched_waiting_model(s, BIG), 3);

    const sched_req_t order[] = { 101, 102, 103 };
    sched_req_t prev = 100;
    for (size_t i = 0; i < 3; i++) {
        sched_request_done(s, 10 + (double)i, prev);
        x = drain(s);
        assert_int_equal(count(x, SCHED_DISPATCH), 1);
        assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, order[i]);
        assert_int_equal(nth(x, SCHED_DISPATCH, 0)->inst, 1);
        prev = order[i];
    }
    assert_int_equal(sched_waiting(s), 0);
    assert_int_equal(sched_in_flight(s, 1), 1);
    sched_free(s);
}

static void a_ready_instance_takes_waiters_in_order_up_to_its_slots(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    for (sched_req_t r = 1; r <= 6; r++)
        sched_request(s, 1, r, TINY);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 2);     /* 6 waiters > 4 expected slots */
    sched_instance_added(s, 2, 70, TINY);
    sched_instance_added(s, 2, 71, TINY);
    assert_int_equal(count(drain(s), SCHED_START), 0);

    sched_instance_ready(s, 5, 70, 0);              /* 0: the hint, 4 slots */
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 4);
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(nth(x, SCHED_DISPATCH, i)->req, i + 1);
        assert_int_equal(nth(x, SCHED_DISPATCH, i)->inst, 70);
    }
    assert_int_equal(sched_waiting(s), 2);

    /* /props says 6 slots after all: two more go there at once. */
    sched_instance_slots(s, 6, 70, 6);
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 2);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 5);
    assert_int_equal(nth(x, SCHED_DISPATCH, 1)->req, 6);
    assert_int_equal(sched_in_flight(s, 70), 6);
    assert_int_equal(sched_waiting(s), 0);
    sched_free(s);
}

/* ---------- starting instances ---------- */

static void concurrent_requests_to_a_cold_model_start_one_instance(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    /* Four at once, before the caller acts on anything: one start. */
    for (sched_req_t r = 1; r <= 4; r++)
        sched_request(s, 1, r, TINY);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(nth(x, SCHED_START, 0)->model, TINY);
    assert_int_equal(count(x, SCHED_FAIL), 0);
    assert_int_equal(sched_waiting_model(s, TINY), 4);
    sched_free(s);

    /* The same with the caller adding the instance right after the START. */
    s = pool_new(100, 0);
    size_t starts = 0;
    for (sched_req_t r = 1; r <= 4; r++) {
        sched_request(s, 1, r, TINY);
        x = drain(s);
        for (size_t i = 0; i < count(x, SCHED_START); i++)
            sched_instance_added(s, 1, 1000 + starts++, TINY);
    }
    assert_int_equal(starts, 1);
    sched_instance_ready(s, 9, 1000, 4);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 4);
    sched_free(s);
}

static void waiters_beyond_the_coming_slots_start_more_instances_up_to_max(void **state)
{
    (void)state;
    /* tiny expects 4 slots per instance and has at most 3 instances. */
    const struct { sched_req_t requests; size_t starts; } cases[] = {
        { 4, 1 }, { 5, 2 }, { 8, 2 }, { 9, 3 }, { 12, 3 }, { 40, 3 },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        struct sched *s = pool_new(100, 0);
        size_t starts = 0;
        for (sched_req_t r = 1; r <= cases[c].requests; r++) {
            sched_request(s, 1, r, TINY);
            struct got *x = drain(s);
            for (size_t i = 0; i < count(x, SCHED_START); i++)
                sched_instance_added(s, 1, 1000 + starts++, TINY);
        }
        if (starts != cases[c].starts)
            fail_msg("%u requests: %zu starts, want %zu", (unsigned)cases[c].requests, starts,
                     cases[c].starts);
        sched_free(s);
    }
}

static void a_start_the_caller_did_not_make_is_asked_again(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    sched_request(s, 1, 1, TINY);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    /* No sched_instance_added(): the pool could not add one. */
    sched_request(s, 2, 2, TINY);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    /* This time it did: the next request waits for that start. */
    sched_instance_added(s, 2, 9, TINY);
    sched_request(s, 3, 3, TINY);
    assert_int_equal(count(drain(s), SCHED_START), 0);
    sched_free(s);
}

static void no_start_without_a_waiting_request(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, TINY, 1);
    sched_request(s, 1, 1, TINY);       /* served at once */
    assert_int_equal(count(drain(s), SCHED_START), 0);
    sched_instance_removed(s, 2, 1);    /* nobody waits: nothing to start */
    assert_int_equal(drain(s)->n, 0);
    sched_free(s);
}

static void a_higher_max_after_reload_starts_for_the_waiters(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 1, BIG);
    sched_request(s, 1, 2, BIG);
    assert_int_equal(count(drain(s), SCHED_START), 0);   /* at its max */
    sched_model_set(s, BIG, "big", &(struct sched_model_info){ 0, 2, 1 });
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(nth(x, SCHED_START, 0)->model, BIG);
    sched_free(s);
}

/* ---------- failures ---------- */

static void a_failed_start_fails_every_waiter_with_502_and_its_error(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    for (sched_req_t r = 1; r <= 3; r++)
        sched_request(s, 1, r, TINY);
    drain(s);
    sched_instance_added(s, 1, 40, TINY);
    sched_instance_failed(s, 3, 40, "error: failed to load model 'x.gguf'");
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 3);
    for (size_t i = 0; i < 3; i++) {
        const struct sched_action *a = nth(x, SCHED_FAIL, i);
        assert_int_equal(a->req, i + 1);
        assert_int_equal(a->status, 502);
        assert_string_equal(a->message, "tiny: failed to start: error: failed to load model 'x.gguf'");
    }
    assert_int_equal(count(x, SCHED_START), 0);     /* nobody left to start for */
    assert_int_equal(sched_waiting(s), 0);
    /* They are forgotten: a late "gone" changes nothing. */
    sched_request_gone(s, 4, 2);
    assert_int_equal(drain(s)->n, 0);
    sched_free(s);
}

static void a_failed_start_keeps_waiters_when_another_instance_serves(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, OTHER, 1);
    sched_request(s, 1, 10, OTHER);     /* takes the one slot */
    sched_request(s, 1, 11, OTHER);     /* waits; asks for a second */
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    sched_instance_added(s, 1, 2, OTHER);
    sched_instance_failed(s, 2, 2, "out of memory");
    x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 0);
    assert_int_equal(sched_waiting_model(s, OTHER), 1);
    sched_request_done(s, 3, 10);
    x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 11);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->inst, 1);
    sched_free(s);
}

static void a_failed_start_keeps_waiters_when_another_instance_is_starting(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    for (sched_req_t r = 1; r <= 3; r++)    /* 3 waiters > 2 expected slots: two starts */
        sched_request(s, 1, r, OTHER);
    assert_int_equal(count(drain(s), SCHED_START), 2);
    sched_instance_added(s, 1, 5, OTHER);
    sched_instance_added(s, 1, 6, OTHER);
    sched_instance_failed(s, 2, 5, "crashed");
    assert_int_equal(count(drain(s), SCHED_FAIL), 0);
    assert_int_equal(sched_waiting_model(s, OTHER), 3);
    sched_instance_ready(s, 3, 6, 2);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 2);
    sched_free(s);
}

static void a_crash_of_a_ready_instance_forgets_its_requests_and_waits_for_the_restart(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 10, BIG);
    sched_request(s, 1, 11, BIG);
    drain(s);
    assert_int_equal(sched_in_flight(s, 1), 1);
    sched_instance_failed(s, 2, 1, "segfault");
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 0);      /* 10 is the caller's, 11 waits */
    assert_int_equal(sched_in_flight(s, 1), 0);
    assert_int_equal(sched_waiting(s), 1);
    sched_request_done(s, 2, 10);                   /* forgotten: no effect */
    assert_int_equal(sched_in_flight(s, 1), 0);
    drain(s);
    /* Backoff over: starting again counts as coming, so no new start. */
    sched_instance_starting(s, 3, 1);
    assert_int_equal(count(drain(s), SCHED_START), 0);
    sched_instance_ready(s, 4, 1, 1);
    x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 11);
    sched_free(s);
}

static void removing_the_last_instance_with_waiters_starts_another(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 10, BIG);
    sched_request(s, 1, 11, BIG);
    assert_int_equal(count(drain(s), SCHED_START), 0);
    sched_instance_removed(s, 2, 1);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(count(x, SCHED_FAIL), 0);
    assert_int_equal(sched_in_flight(s, 1), 0);
    assert_int_equal(sched_waiting(s), 1);
    sched_free(s);
}

static void a_failed_model_answers_503_with_its_reason(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    sched_request(s, 1, 1, TINY);
    sched_request(s, 1, 2, TINY);
    drain(s);
    sched_model_failed(s, 2, TINY, "crashed 6 times in 5m");
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 2);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(nth(x, SCHED_FAIL, i)->status, 503);
        assert_string_equal(nth(x, SCHED_FAIL, i)->message, "crashed 6 times in 5m");
    }
    assert_int_equal(sched_waiting(s), 0);

    sched_request(s, 3, 3, TINY);
    x = drain(s);
    assert_int_equal(x->n, 1);
    assert_int_equal(x->a[0].kind, SCHED_FAIL);
    assert_int_equal(x->a[0].req, 3);
    assert_int_equal(x->a[0].status, 503);
    assert_true(x->a[0].retry_after == 0);
    assert_string_equal(x->a[0].message, "crashed 6 times in 5m");

    sched_model_failed(s, 4, TINY, NULL);           /* llama-pool start */
    sched_request(s, 5, 4, TINY);
    x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 0);
    assert_int_equal(count(x, SCHED_START), 1);
    sched_free(s);
}

static void a_fail_message_outlives_the_reason_it_was_made_from(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    sched_request(s, 1, 1, TINY);
    drain(s);
    char reason[32];
    snprintf(reason, sizeof reason, "first reason");
    sched_model_failed(s, 2, TINY, reason);
    snprintf(reason, sizeof reason, "overwritten");
    sched_model_failed(s, 2, TINY, NULL);           /* frees the model's copy */
    sched_model_failed(s, 2, TINY, "second reason");
    struct sched_action a;
    assert_true(sched_next_action(s, &a));
    assert_int_equal(a.kind, SCHED_FAIL);
    assert_string_equal(a.message, "first reason");
    assert_false(sched_next_action(s, &a));
    sched_free(s);
}

static void an_unknown_model_answers_404(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    sched_request(s, 1, 1, 3);
    struct got *x = drain(s);
    assert_int_equal(x->n, 1);
    assert_int_equal(x->a[0].kind, SCHED_FAIL);
    assert_int_equal(x->a[0].status, 404);
    assert_string_equal(x->a[0].message, "unknown model");
    assert_int_equal(sched_waiting(s), 0);
    sched_free(s);
}

static void a_reload_that_drops_models_fails_their_waiters_with_404(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 30);
    ready(s, 0, 9, OTHER, 1);
    sched_request(s, 1, 1, OTHER);      /* dispatched to 9 */
    sched_request(s, 1, 2, OTHER);
    sched_request(s, 1, 3, OTHER);
    sched_request(s, 1, 4, TINY);
    drain(s);
    sched_models_resize(s, 2);          /* "other" is gone */
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 2);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(nth(x, SCHED_FAIL, i)->req, i + 2);
        assert_int_equal(nth(x, SCHED_FAIL, i)->status, 404);
        assert_string_equal(nth(x, SCHED_FAIL, i)->message, "model removed by reload");
    }
    assert_int_equal(sched_waiting(s), 1);          /* tiny's stays */
    assert_int_equal(sched_waiting_model(s, TINY), 1);
    assert_int_equal(sched_in_flight(s, 9), 0);     /* its instance is forgotten */
    sched_request(s, 2, 5, OTHER);
    assert_int_equal(nth(drain(s), SCHED_FAIL, 0)->status, 404);
    sched_free(s);
}

/* ---------- the queue ---------- */

static void a_full_queue_answers_429_with_retry_after(void **state)
{
    (void)state;
    struct sched *s = pool_new(2, 0);
    sched_request(s, 1, 1, TINY);
    sched_request(s, 1, 2, BIG);
    drain(s);
    assert_int_equal(sched_waiting(s), 2);
    sched_request(s, 1, 3, OTHER);
    struct got *x = drain(s);
    assert_int_equal(x->n, 1);
    assert_int_equal(x->a[0].kind, SCHED_FAIL);
    assert_int_equal(x->a[0].req, 3);
    assert_int_equal(x->a[0].status, 429);
    assert_true(x->a[0].retry_after == 1);
    assert_string_equal(x->a[0].message, "queue full (2 waiting)");
    assert_int_equal(sched_waiting(s), 2);
    /* A request that a free slot can take needs no room in the queue. */
    ready(s, 2, 5, OTHER, 1);
    sched_request(s, 2, 4, OTHER);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->req, 4);
    sched_free(s);
}

static void queue_timeout_answers_504_at_the_woken_time(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 30);
    sched_request(s, 100, 1, BIG);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_WAKE), 1);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 130);
    sched_request(s, 110, 2, BIG);
    assert_int_equal(count(drain(s), SCHED_WAKE), 0);  /* the earliest deadline is unchanged */

    sched_tick(s, 129.5);                           /* early: nothing expires, re-armed */
    x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 0);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 130);

    sched_tick(s, 130);
    x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 1);
    assert_int_equal(nth(x, SCHED_FAIL, 0)->req, 1);
    assert_int_equal(nth(x, SCHED_FAIL, 0)->status, 504);
    assert_string_equal(nth(x, SCHED_FAIL, 0)->message, "waited 30 s in the queue for big");
    assert_int_equal(count(x, SCHED_WAKE), 1);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 140);
    assert_int_equal(sched_waiting(s), 1);

    /* The last waiter leaves: no WAKE for an empty queue. */
    sched_request_gone(s, 120, 2);
    assert_int_equal(drain(s)->n, 0);
    sched_tick(s, 140);
    assert_int_equal(drain(s)->n, 0);

    /* A late tick expires everyone overdue, oldest first. */
    sched_request(s, 200, 3, BIG);
    sched_request(s, 201, 4, TINY);
    sched_request(s, 230, 5, TINY);
    drain(s);
    sched_tick(s, 250);
    x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 2);
    assert_int_equal(nth(x, SCHED_FAIL, 0)->req, 3);
    assert_string_equal(nth(x, SCHED_FAIL, 0)->message, "waited 50 s in the queue for big");
    assert_int_equal(nth(x, SCHED_FAIL, 1)->req, 4);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 260);
    sched_free(s);
}

static void the_wake_follows_the_oldest_waiter_and_the_limits(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 30);
    sched_request(s, 10, 1, BIG);
    sched_request(s, 20, 2, BIG);
    assert_true(nth(drain(s), SCHED_WAKE, 0)->at == 40);
    /* The oldest is served: the deadline moves to the next one. */
    ready(s, 21, 7, BIG, 1);
    struct got *x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 1);
    assert_int_equal(count(x, SCHED_WAKE), 1);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 50);
    /* A shorter queue_timeout after a reload moves it earlier. */
    sched_set_limits(s, &(struct sched_limits){ .max_queue = 100, .queue_timeout = 5 });
    assert_true(nth(drain(s), SCHED_WAKE, 0)->at == 25);
    /* 0 = forever: no WAKE, and a tick expires nobody. */
    sched_set_limits(s, &(struct sched_limits){ .max_queue = 100, .queue_timeout = 0 });
    assert_int_equal(drain(s)->n, 0);
    sched_tick(s, 1e9);
    assert_int_equal(drain(s)->n, 0);
    assert_int_equal(sched_waiting(s), 1);
    sched_free(s);
}

/* ---------- clients leaving, finishing ---------- */

static void a_client_gone_while_waiting_leaves_the_queue_without_an_answer(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 10, BIG);
    sched_request(s, 1, 11, BIG);
    sched_request(s, 1, 12, BIG);
    drain(s);
    assert_int_equal(sched_waiting(s), 2);
    sched_request_gone(s, 2, 11);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 0);
    assert_int_equal(count(x, SCHED_DISPATCH), 0);
    assert_int_equal(sched_waiting(s), 1);
    assert_int_equal(sched_waiting_model(s, BIG), 1);
    sched_request_done(s, 3, 10);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->req, 12);
    sched_request_gone(s, 4, 999);                  /* unknown: ignored */
    assert_int_equal(drain(s)->n, 0);
    sched_free(s);
}

static void a_client_gone_while_dispatched_frees_its_slot(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 10, BIG);
    sched_request(s, 1, 11, BIG);
    drain(s);
    sched_request_gone(s, 7, 10);
    struct got *x = drain(s);
    assert_int_equal(x->n, 1);
    assert_int_equal(x->a[0].kind, SCHED_DISPATCH);
    assert_int_equal(x->a[0].req, 11);
    assert_int_equal(sched_in_flight(s, 1), 1);
    assert_true(sched_last_used(s, 1) == 7);
    sched_request_gone(s, 8, 11);
    assert_int_equal(sched_in_flight(s, 1), 0);
    sched_free(s);
}

static void done_frees_the_slot_and_updates_last_used(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 5, 1, TINY, 4);
    assert_true(sched_last_used(s, 1) == 0);        /* never used */
    sched_request(s, 10, 1, TINY);
    drain(s);
    assert_int_equal(sched_in_flight(s, 1), 1);
    sched_request_done(s, 25, 1);
    assert_int_equal(sched_in_flight(s, 1), 0);
    assert_true(sched_last_used(s, 1) == 25);
    sched_request_done(s, 30, 1);                   /* twice: ignored */
    assert_true(sched_last_used(s, 1) == 25);
    assert_int_equal(sched_in_flight(s, 1), 0);
    sched_free(s);
}

/* ---------- scale ---------- */

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A million requests over 100 models through the real policy: instances
 * start on demand and are ready one event later, the oldest request
 * finishes whenever 600 are in flight, the queue is ticked now and then. */
static void a_million_requests_over_100_models_replay_quickly(void **state)
{
    (void)state;
    enum { MODELS = 100, REQUESTS = 1000000, IN_FLIGHT = 600 };
    struct sched *s = sched_new(&(struct sched_limits){ .max_queue = 5000, .queue_timeout = 120 });
    assert_non_null(s);
    sched_models_resize(s, MODELS);
    for (size_t m = 0; m < MODELS; m++) {
        char name[16];
        snprintf(name, sizeof name, "m%zu", m);
        sched_model_set(s, m, name, &(struct sched_model_info){ 0, 2, 4 });
    }
    sched_req_t *flight = malloc(REQUESTS * sizeof *flight);   /* dispatched, FIFO */
    sched_inst_t *coming = malloc(2 * MODELS * sizeof *coming);
    assert_non_null(flight);
    assert_non_null(coming);
    size_t fhead = 0, ftail = 0, ncoming = 0, dispatched = 0, failed = 0, starts = 0, peak = 0;
    sched_inst_t next_inst = 1;
    uint64_t rng = 88172645463325252ULL;
    double now = 1000, t0 = mono();

    for (sched_req_t r = 1; r <= REQUESTS; r++) {
        now += 0.0001;
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        size_t model = (size_t)(rng % MODELS);
        if (model >= 90)
            model = (size_t)(rng >> 32) % MODELS;   /* a little skew */
        for (size_t i = 0; i < ncoming; i++)         /* started last round: ready now */
            sched_instance_ready(s, now, coming[i], 4);
        ncoming = 0;
        sched_request(s, now, r, model);
        while (ftail - fhead > IN_FLIGHT)
            sched_request_done(s, now, flight[fhead++]);
        if (sched_waiting(s) > peak)
            peak = sched_waiting(s);
        if (r % 1000 == 0)
            sched_tick(s, now);
        struct sched_action a;
        while (sched_next_action(s, &a)) {
            switch (a.kind) {
            case SCHED_DISPATCH: flight[ftail++] = a.req; dispatched++; break;
            case SCHED_FAIL: failed++; break;
            case SCHED_START:
                assert_true(ncoming < 2 * MODELS);
                sched_instance_added(s, now, next_inst, a.model);
                coming[ncoming++] = next_inst++;
                starts++;
                break;
            default: break;
            }
        }
    }
    while (fhead < ftail) {                 /* finish everything still running */
        sched_request_done(s, now, flight[fhead++]);
        struct sched_action a;
        while (sched_next_action(s, &a))
            if (a.kind == SCHED_DISPATCH) {
                flight[ftail++] = a.req;
                dispatched++;
            } else if (a.kind == SCHED_FAIL) {
                failed++;
            }
    }
    double took = mono() - t0;
    print_message("1000000 requests over 100 models: %.3f s (%zu dispatched, %zu failed, "
                  "%zu starts, at most %zu waiting)\n", took, dispatched, failed, starts, peak);
    assert_int_equal(dispatched + failed + sched_waiting(s), REQUESTS);
    assert_int_equal(sched_waiting(s), 0);
    assert_true(starts <= 2 * MODELS);      /* never beyond max */
    for (sched_inst_t i = 1; i < next_inst; i++)
        assert_int_equal(sched_in_flight(s, i), 0);     /* every slot given back */
    free(flight);
    free(coming);
    sched_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(a_request_goes_to_a_ready_instance_with_a_free_slot),
        cmocka_unit_test(the_instance_with_fewest_in_flight_serves_earliest_added_on_ties),
        cmocka_unit_test(waiters_are_served_first_come_first_served_when_a_slot_frees),
        cmocka_unit_test(a_ready_instance_takes_waiters_in_order_up_to_its_slots),
        cmocka_unit_test(concurrent_requests_to_a_cold_model_start_one_instance),
        cmocka_unit_test(waiters_beyond_the_coming_slots_start_more_instances_up_to_max),
        cmocka_unit_test(a_start_the_caller_did_not_make_is_asked_again),
        cmocka_unit_test(no_start_without_a_waiting_request),
        cmocka_unit_test(a_higher_max_after_reload_starts_for_the_waiters),
        cmocka_unit_test(a_failed_start_fails_every_waiter_with_502_and_its_error),
        cmocka_unit_test(a_failed_start_keeps_waiters_when_another_instance_serves),
        cmocka_unit_test(a_failed_start_keeps_waiters_when_another_instance_is_starting),
        cmocka_unit_test(a_crash_of_a_ready_instance_forgets_its_requests_and_waits_for_the_restart),
        cmocka_unit_test(removing_the_last_instance_with_waiters_starts_another),
        cmocka_unit_test(a_failed_model_answers_503_with_its_reason),
        cmocka_unit_test(a_fail_message_outlives_the_reason_it_was_made_from),
        cmocka_unit_test(an_unknown_model_answers_404),
        cmocka_unit_test(a_reload_that_drops_models_fails_their_waiters_with_404),
        cmocka_unit_test(a_full_queue_answers_429_with_retry_after),
        cmocka_unit_test(queue_timeout_answers_504_at_the_woken_time),
        cmocka_unit_test(the_wake_follows_the_oldest_waiter_and_the_limits),
        cmocka_unit_test(a_client_gone_while_waiting_leaves_the_queue_without_an_answer),
        cmocka_unit_test(a_client_gone_while_dispatched_frees_its_slot),
        cmocka_unit_test(done_frees_the_slot_and_updates_last_used),
        cmocka_unit_test(a_million_requests_over_100_models_replay_quickly),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
