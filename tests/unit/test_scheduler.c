/* The scheduler's policy, event by event, with a fake clock: who is served,
 * who waits, what starts, who fails and when. */
#include <math.h>
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
    char msg[MAXGOT][320];
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
    sched_model_set(s, TINY, "tiny",
                    &(struct sched_model_info){ .instances_max = 3, .slots_hint = 4 });
    sched_model_set(s, BIG, "big",
                    &(struct sched_model_info){ .instances_max = 1, .slots_hint = 1 });
    sched_model_set(s, OTHER, "other",
                    &(struct sched_model_info){ .instances_max = 2, .slots_hint = 2 });
    drain(s);
    return s;
}

/* An instance that is there and ready with SLOTS slots. */
static void ready(struct sched *s, double now, sched_inst_t inst, size_t model, unsigned slots)
{
    sched_instance_added(s, now, inst, model);
    sched_instance_ready(s, now, inst, slots);
}

/* big#1 (one slot) serving request 10 since t=1, request 11 waiting. */
static struct sched *big_busy_and_one_waiting(void)
{
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 10, BIG);
    sched_request(s, 1, 11, BIG);
    drain(s);
    return s;
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
    sched_model_set(s, BIG, "big",
                    &(struct sched_model_info){ .instances_max = 2, .slots_hint = 1 });
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
    struct sched *s = big_busy_and_one_waiting();
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
    struct sched *s = big_busy_and_one_waiting();
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

/* ---------- hand-off: requests queued inside a full instance ---------- */

/* big (one instance at most, one slot) has served a request that took D s. */
static struct sched *big_after_one_of(double d)
{
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, BIG, 1);
    sched_request(s, 1, 10, BIG);
    sched_request_done(s, 1 + d, 10);
    drain(s);
    return s;
}

static void a_full_instance_of_a_model_with_short_requests_takes_more(void **state)
{
    (void)state;
    struct sched *s = big_after_one_of(0.01);
    sched_request(s, 2, 11, BIG);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->req, 11);
    /* Its one slot is taken and big can have no other instance: the next
     * go to llama-server's own queue, where each starts when the slot
     * frees. 10 ms requests: 50 ms of them would be 5, 4 per slot at most. */
    for (sched_req_t r = 12; r <= 17; r++)
        sched_request(s, 2, r, BIG);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 4);
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(nth(x, SCHED_DISPATCH, i)->req, 12 + i);    /* in order */
        assert_int_equal(nth(x, SCHED_DISPATCH, i)->inst, 1);
    }
    assert_int_equal(sched_in_flight(s, 1), 5);
    assert_int_equal(sched_waiting(s), 2);
    /* 11 ends: 12 is already there; 16 is handed off in its place. */
    sched_request_done(s, 2.01, 11);
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 1);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 16);
    assert_int_equal(sched_in_flight(s, 1), 5);
    assert_int_equal(sched_waiting(s), 1);
    sched_free(s);
}

static void slower_requests_get_one_handed_off_per_slot(void **state)
{
    (void)state;
    struct sched *s = big_after_one_of(0.2);      /* 50 ms of them is less than one */
    sched_request(s, 2, 11, BIG);
    sched_request(s, 2, 12, BIG);
    sched_request(s, 2, 13, BIG);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 2);
    assert_int_equal(nth(x, SCHED_DISPATCH, 1)->req, 12);
    assert_int_equal(sched_in_flight(s, 1), 2);
    assert_int_equal(sched_waiting(s), 1);
    sched_free(s);
}

static void the_handoff_stays_within_the_instances_http_threads(void **state)
{
    (void)state;
    struct sched *s = big_after_one_of(0.01);
    /* big's child serves 3 connections at once (--threads-http 5, less the
     * pool's /health and /props): a fourth would wait for a thread. */
    sched_model_set(s, BIG, "big", &(struct sched_model_info){ .instances_max = 1, .slots_hint = 1,
                                                               .http_conns = 3 });
    drain(s);
    for (sched_req_t r = 11; r <= 16; r++)
        sched_request(s, 2, r, BIG);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 3);
    assert_int_equal(sched_in_flight(s, 1), 3);
    assert_int_equal(sched_waiting(s), 3);
    sched_free(s);
}

static void no_handoff_before_a_request_is_done_or_when_requests_are_long(void **state)
{
    (void)state;
    struct sched *s = big_busy_and_one_waiting();     /* nothing done yet */
    assert_int_equal(sched_in_flight(s, 1), 1);
    assert_int_equal(sched_waiting(s), 1);
    /* A client that left says nothing of how long requests take. */
    sched_request_gone(s, 1.01, 10);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->req, 11);
    sched_request(s, 1.02, 12, BIG);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 0);
    /* 11 took 3 s: a request handed off could wait that long behind the
     * next one, when a slot of its own might come sooner. */
    sched_request_done(s, 4.02, 11);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->req, 12);
    sched_request(s, 4.03, 13, BIG);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 0);
    assert_int_equal(sched_in_flight(s, 1), 1);
    sched_free(s);
}

static void no_handoff_while_another_instance_is_coming(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 1, OTHER, 1);                       /* other: up to 2 instances */
    sched_request(s, 1, 10, OTHER);
    sched_request_done(s, 1.01, 10);
    sched_request(s, 2, 11, OTHER);
    drain(s);
    /* A waiter below the max asks for a second instance, which will serve it
     * sooner than the busy one: no hand-off meanwhile. */
    sched_request(s, 2, 12, OTHER);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 0);
    assert_int_equal(count(x, SCHED_START), 1);
    sched_instance_added(s, 2.1, 2, OTHER);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 0);
    assert_int_equal(sched_in_flight(s, 1), 1);
    sched_instance_ready(s, 3, 2, 1);
    x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 12);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->inst, 2);
    /* At its max, both full: each instance takes up to 4 more (its one
     * slot's worth of 10 ms requests in 50 ms, at most 4 per slot). */
    for (sched_req_t r = 13; r <= 22; r++)
        sched_request(s, 3, r, OTHER);
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 8);
    assert_int_equal(count(x, SCHED_START), 0);
    assert_int_equal(sched_in_flight(s, 1), 5);
    assert_int_equal(sched_in_flight(s, 2), 5);
    assert_int_equal(sched_waiting(s), 2);
    sched_free(s);
}

/* ---------- prefix affinity ---------- */

/* other (2 instances, 2 slots) with two ready instances, 50 and 51. */
static struct sched *other_two_ready(void)
{
    struct sched *s = pool_new(100, 0);
    ready(s, 0, 50, OTHER, 2);
    ready(s, 0, 51, OTHER, 2);
    drain(s);
    return s;
}

static int last_affinity;       /* of the DISPATCH sent_to() found */

static sched_inst_t sent_to(struct sched *s, sched_req_t req)
{
    struct got *x = drain(s);
    for (size_t i = 0; i < x->n; i++)
        if (x->a[i].kind == SCHED_DISPATCH && x->a[i].req == req) {
            last_affinity = x->a[i].affinity;
            return x->a[i].inst;
        }
    fail_msg("request %llu was not dispatched", (unsigned long long)req);
    return 0;
}

static void a_conversation_goes_back_to_the_instance_that_holds_it(void **state)
{
    (void)state;
    struct sched *s = other_two_ready();
    const uint64_t a1[] = { 11, 12, 13 }, b1[] = { 21, 22 };
    const uint64_t a2[] = { 11, 12, 13, 14, 15 }, b2[] = { 21, 22, 23 };
    struct sched_prefix pa1 = { .n = 3, .block = a1 }, pb1 = { .n = 2, .block = b1 };
    struct sched_prefix pa2 = { .n = 5, .block = a2 }, pb2 = { .n = 3, .block = b2 };
    sched_request_prefix(s, 1, 1, OTHER, &pa1);
    assert_int_equal(sent_to(s, 1), 50);
    assert_int_equal(last_affinity, 0);             /* a miss: nothing known yet */
    sched_request_prefix(s, 1, 2, OTHER, &pb1);
    assert_int_equal(sent_to(s, 2), 51);            /* fewest in flight */
    sched_request_done(s, 2, 1);
    sched_request_done(s, 2, 2);
    drain(s);
    /* Both idle: without affinity b's next turn would go to 50 (the
     * earliest added); it goes to 51, which holds its prompt. */
    sched_request_prefix(s, 3, 3, OTHER, &pb2);
    assert_int_equal(sent_to(s, 3), 51);
    assert_int_equal(last_affinity, 1);             /* a hit */
    sched_request_prefix(s, 3, 4, OTHER, &pa2);
    assert_int_equal(sent_to(s, 4), 50);
    assert_int_equal(last_affinity, 1);
    /* Without a prefix: as before, fewest in flight. */
    sched_request(s, 3, 5, OTHER);
    assert_int_equal(sent_to(s, 5), 50);            /* a tie: the earliest added */
    assert_int_equal(last_affinity, -1);
    sched_free(s);
}

static void a_shared_leading_part_or_a_session_finds_the_instance(void **state)
{
    (void)state;
    struct sched *s = other_two_ready();
    const uint64_t a[] = { 11, 12, 13, 14, 15, 16, 17, 18, 19 };
    struct sched_prefix pa = { .n = 9, .block = a };
    sched_request(s, 1, 1, OTHER);                  /* keeps 50 busier */
    assert_int_equal(sent_to(s, 1), 50);
    sched_request_prefix(s, 1, 2, OTHER, &pa);
    assert_int_equal(sent_to(s, 2), 51);
    sched_request_done(s, 2, 2);
    drain(s);
    /* Another prompt with a's first 4 blocks (a system prompt, say). */
    const uint64_t c[] = { 11, 12, 13, 14, 99, 98 };
    struct sched_prefix pc = { .n = 6, .block = c };
    sched_request(s, 2, 3, OTHER);                  /* 51 as busy as 50 now */
    assert_int_equal(sent_to(s, 3), 51);
    sched_request_prefix(s, 3, 4, OTHER, &pc);
    assert_int_equal(sent_to(s, 4), 51);
    /* A session alone (a short prompt): where that session went last. */
    struct sched_prefix ps = { .session = 777 };
    sched_request_prefix(s, 4, 5, OTHER, &ps);
    assert_int_equal(sent_to(s, 5), 50);            /* 50: 1 in flight, 51: 2 */
    sched_request_done(s, 5, 1);
    sched_request_done(s, 5, 3);
    sched_request_done(s, 5, 4);
    drain(s);
    /* 50 has 5 in flight, 51 nothing: the session's instance all the same. */
    const uint64_t other_blocks[] = { 5, 6 };
    struct sched_prefix ps2 = { .session = 777, .n = 2, .block = other_blocks };
    sched_request_prefix(s, 6, 7, OTHER, &ps2);
    assert_int_equal(sent_to(s, 7), 50);
    sched_free(s);
}

static void a_busy_or_stopping_instance_is_no_match(void **state)
{
    (void)state;
    struct sched *s = other_two_ready();
    const uint64_t a[] = { 11, 12 };
    struct sched_prefix pa = { .n = 2, .block = a };
    sched_request_prefix(s, 1, 1, OTHER, &pa);
    assert_int_equal(sent_to(s, 1), 50);
    sched_request(s, 1, 2, OTHER);
    assert_int_equal(sent_to(s, 2), 51);
    sched_request(s, 1, 3, OTHER);
    assert_int_equal(sent_to(s, 3), 50);            /* 50 full now */
    /* a's next turn: 50 has no free slot, so the one that has. */
    sched_request_prefix(s, 2, 4, OTHER, &pa);
    assert_int_equal(sent_to(s, 4), 51);
    /* Recorded there too now; once 51 is stopping, 50 (free again) matches. */
    sched_request_done(s, 3, 1);
    sched_request_done(s, 3, 3);
    sched_request_done(s, 3, 4);
    sched_instance_stopping(s, 3, 51);
    drain(s);
    sched_request_prefix(s, 4, 5, OTHER, &pa);
    assert_int_equal(sent_to(s, 5), 50);
    sched_free(s);
}

static void the_affinity_table_is_bounded_and_forgets_the_oldest(void **state)
{
    (void)state;
    struct sched *s = other_two_ready();
    const uint64_t first[] = { 424242 };
    struct sched_prefix pf = { .n = 1, .block = first };
    sched_request(s, 1, 1, OTHER);
    assert_int_equal(sent_to(s, 1), 50);
    sched_request_prefix(s, 1, 2, OTHER, &pf);      /* 51: the less busy */
    assert_int_equal(sent_to(s, 2), 51);
    sched_request_done(s, 1, 1);
    drain(s);
    /* Ten times the table's entries, each a new prompt, sent to 50 (51 is
     * kept busier by 2 meanwhile). */
    uint64_t block;
    struct sched_prefix pn = { .n = 1, .block = &block };
    for (uint64_t i = 0; i < 10 * SCHED_AFFINITY_ENTRIES; i++) {
        block = 1000000 + i;
        sched_request_prefix(s, 2, 100, OTHER, &pn);
        assert_int_equal(sent_to(s, 100), 50);
        sched_request_done(s, 2, 100);
        drain(s);
    }
    sched_request_done(s, 3, 2);
    drain(s);
    /* Both idle: first's next turn would go to 51 had its entry stayed; it
     * is gone, so to the earliest added. */
    sched_request_prefix(s, 4, 3, OTHER, &pf);
    assert_int_equal(sent_to(s, 3), 50);
    sched_free(s);
}

/* other_two_ready(), with OTHER's requests waiting up to WAIT seconds for
 * the busy instance that holds their prompt; and IDLE_TIMEOUT, MIN. */
static void other_set(struct sched *s, double wait, double idle_timeout, unsigned min)
{
    sched_model_set(s, OTHER, "other",
                    &(struct sched_model_info){ .instances_min = min, .instances_max = 2, .slots_hint = 2,
                                                .affinity_wait = wait, .idle_timeout = idle_timeout });
    drain(s);
}

/* Whether the last drain armed the timer at AT. */
static bool woke_at(const struct got *x, double at)
{
    for (size_t i = 0; i < x->n; i++)
        if (x->a[i].kind == SCHED_WAKE && fabs(x->a[i].at - at) < 1e-9)
            return true;
    return false;
}

/* 50 serves a (8 blocks: long) and one more request, so it is full; 51
 * serves one and has a slot free. */
static const uint64_t a_blocks[] = { 11, 12, 13, 14, 15, 16, 17, 18, 19 };
static struct sched *fifty_full_with_a(double wait)
{
    struct sched *s = other_two_ready();
    other_set(s, wait, 0, 0);
    struct sched_prefix pa = { .n = 8, .block = a_blocks };
    sched_request_prefix(s, 1, 1, OTHER, &pa);
    assert_int_equal(sent_to(s, 1), 50);
    sched_request(s, 1, 2, OTHER);
    assert_int_equal(sent_to(s, 2), 51);
    sched_request(s, 1, 3, OTHER);
    assert_int_equal(sent_to(s, 3), 50);
    return s;
}

static void a_request_waits_briefly_for_its_busy_instance_and_others_pass_it(void **state)
{
    (void)state;
    struct sched *s = fifty_full_with_a(0.25);
    struct sched_prefix pa2 = { .n = 9, .block = a_blocks };   /* a's next turn */
    sched_request_prefix(s, 2, 4, OTHER, &pa2);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 0);  /* 51 is free, but it waits for 50 */
    assert_true(woke_at(x, 2.25));                  /* until its hold ends */
    assert_int_equal(sched_waiting_model(s, OTHER), 1);
    /* A request without a prompt behind it is served past it. */
    sched_request(s, 2.1, 5, OTHER);
    assert_int_equal(sent_to(s, 5), 51);
    assert_int_equal(sched_waiting_model(s, OTHER), 1);
    /* 50 frees a slot within the bound: the waiting turn goes there. */
    sched_request_done(s, 2.2, 1);
    assert_int_equal(sent_to(s, 4), 50);
    assert_int_equal(last_affinity, 1);
    sched_free(s);
}

static void a_hold_ends_after_affinity_wait_and_the_request_goes_elsewhere(void **state)
{
    (void)state;
    struct sched *s = fifty_full_with_a(0.25);
    struct sched_prefix pa2 = { .n = 9, .block = a_blocks };
    sched_request_prefix(s, 2, 4, OTHER, &pa2);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 0);
    sched_tick(s, 2.2);                             /* not yet */
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 0);
    sched_tick(s, 2.25);
    assert_int_equal(sent_to(s, 4), 51);
    assert_int_equal(last_affinity, 0);             /* a miss */
    /* With affinity_wait = 0 it would not have waited at all. */
    sched_free(s);
    s = fifty_full_with_a(0);
    sched_request_prefix(s, 2, 4, OTHER, &pa2);
    assert_int_equal(sent_to(s, 4), 51);
    assert_int_equal(last_affinity, 0);
    sched_free(s);
}

/* 50 holds a prompt of N blocks and is full, 51 idle; that prompt's next
 * turn comes (WAIT 0.25): where it went, 0 if it waits. */
static sched_inst_t next_turn_with_51_idle(unsigned n)
{
    struct sched *s = other_two_ready();
    other_set(s, 0.25, 0, 0);
    struct sched_prefix p1 = { .n = n, .block = a_blocks }, p2 = { .n = n + 1, .block = a_blocks };
    sched_request_prefix(s, 1, 1, OTHER, &p1);
    assert_int_equal(sent_to(s, 1), 50);
    sched_request(s, 1, 2, OTHER);
    assert_int_equal(sent_to(s, 2), 51);
    sched_request(s, 1, 3, OTHER);
    assert_int_equal(sent_to(s, 3), 50);            /* 50 full */
    sched_request_done(s, 2, 2);
    drain(s);                                       /* 51 idle */
    sched_request_prefix(s, 3, 4, OTHER, &p2);
    struct got *x = drain(s);
    sched_inst_t to = 0;
    for (size_t i = 0; i < x->n; i++)
        if (x->a[i].kind == SCHED_DISPATCH && x->a[i].req == 4) {
            to = x->a[i].inst;
            last_affinity = x->a[i].affinity;
        }
    sched_free(s);
    return to;
}

static void a_short_prompt_does_not_wait_while_another_instance_is_idle(void **state)
{
    (void)state;
    assert_int_equal(next_turn_with_51_idle(2), 51);   /* 2 blocks: to idle 51 at once */
    assert_int_equal(last_affinity, 0);
    assert_int_equal(next_turn_with_51_idle(8), 0);    /* 8: worth waiting for 50 */
}

static void a_shared_system_prompt_is_known_on_two_instances(void **state)
{
    (void)state;
    struct sched *s = other_two_ready();
    /* Two conversations with one system prompt (blocks 1-4): x on 50, and
     * y, with 50 full and no waiting, on 51. */
    const uint64_t x[] = { 1, 2, 3, 4, 70, 71 }, y[] = { 1, 2, 3, 4, 80, 81 };
    struct sched_prefix px = { .n = 6, .block = x }, py = { .n = 6, .block = y };
    sched_request_prefix(s, 1, 1, OTHER, &px);
    assert_int_equal(sent_to(s, 1), 50);
    sched_request(s, 1, 2, OTHER);
    assert_int_equal(sent_to(s, 2), 51);
    sched_request(s, 1, 3, OTHER);
    assert_int_equal(sent_to(s, 3), 50);            /* 50 full */
    sched_request_prefix(s, 1, 4, OTHER, &py);
    assert_int_equal(sent_to(s, 4), 51);
    for (sched_req_t r = 1; r <= 4; r++)
        sched_request_done(s, 2, r);
    other_set(s, 0.25, 0, 0);
    /* Now 51 full, 50 with one in flight. */
    sched_request(s, 3, 5, OTHER);
    assert_int_equal(sent_to(s, 5), 50);
    sched_request(s, 3, 6, OTHER);
    assert_int_equal(sent_to(s, 6), 51);
    sched_request(s, 3, 7, OTHER);
    assert_int_equal(sent_to(s, 7), 50);
    sched_request(s, 3, 8, OTHER);
    assert_int_equal(sent_to(s, 8), 51);
    sched_request_done(s, 4, 5);
    drain(s);
    /* A third conversation: the system prompt, last sent to 51 (full), was
     * sent to 50 before: 50 holds it too, a hit, no wait. */
    const uint64_t z[] = { 1, 2, 3, 4, 90, 91 };
    struct sched_prefix pz = { .n = 6, .block = z };
    sched_request_prefix(s, 5, 9, OTHER, &pz);
    assert_int_equal(sent_to(s, 9), 50);
    assert_int_equal(last_affinity, 1);
    sched_free(s);
}

static void an_instance_that_goes_leaves_no_match_even_if_its_id_comes_back(void **state)
{
    (void)state;
    struct sched *s = other_two_ready();
    struct sched_prefix pa = { .n = 8, .block = a_blocks };
    sched_request(s, 1, 1, OTHER);
    assert_int_equal(sent_to(s, 1), 50);
    sched_request_prefix(s, 1, 2, OTHER, &pa);
    assert_int_equal(sent_to(s, 2), 51);
    sched_request_done(s, 2, 1);
    sched_request_done(s, 2, 2);
    sched_instance_stopping(s, 2, 51);
    sched_instance_removed(s, 2, 51);
    ready(s, 3, 51, OTHER, 2);                      /* a new one, the same id */
    drain(s);
    sched_request_prefix(s, 4, 3, OTHER, &pa);
    assert_int_equal(sent_to(s, 3), 50);            /* no match: the earliest added */
    assert_int_equal(last_affinity, 0);
    /* A restart empties the cache too: 50 holds a now, restarts, and a's
     * next turn is a miss. */
    sched_request_done(s, 5, 3);
    drain(s);
    sched_instance_starting(s, 6, 50);
    sched_instance_ready(s, 7, 50, 2);
    drain(s);
    sched_request_prefix(s, 8, 4, OTHER, &pa);
    sent_to(s, 4);
    assert_int_equal(last_affinity, 0);
    sched_free(s);
}

static void scale_down_stops_the_instance_whose_prompts_are_cold_first(void **state)
{
    (void)state;
    struct sched *s = other_two_ready();
    other_set(s, 0, 100, 1);
    struct sched_prefix pa = { .n = 8, .block = a_blocks };
    sched_request_prefix(s, 1, 1, OTHER, &pa);      /* 50 holds a */
    assert_int_equal(sent_to(s, 1), 50);
    sched_request(s, 1.5, 2, OTHER);                /* no prompt: 51 */
    assert_int_equal(sent_to(s, 2), 51);
    sched_request_done(s, 2, 1);
    sched_request_done(s, 6, 2);                    /* 51 used later */
    drain(s);
    /* Both idle past their deadline, one goes: by idleness alone 50; but
     * 51 holds no prompt anyone would come back to. */
    sched_tick(s, 200);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 51);
    sched_free(s);
}

static void a_hand_off_goes_to_the_instance_that_holds_the_prompt(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    other_set(s, 0.25, 0, 0);
    ready(s, 0, 50, OTHER, 1);
    ready(s, 0, 51, OTHER, 1);
    drain(s);
    struct sched_prefix pa = { .n = 8, .block = a_blocks };
    struct sched_prefix pa2 = { .n = 9, .block = a_blocks };
    sched_request(s, 1, 1, OTHER);
    assert_int_equal(sent_to(s, 1), 50);
    sched_request_prefix(s, 1, 2, OTHER, &pa);
    assert_int_equal(sent_to(s, 2), 51);
    sched_request_done(s, 1.01, 1);                 /* short requests: a turnaround */
    sched_request_done(s, 1.01, 2);
    drain(s);
    sched_request(s, 2, 3, OTHER);
    assert_int_equal(sent_to(s, 3), 50);
    sched_request(s, 2, 4, OTHER);
    assert_int_equal(sent_to(s, 4), 51);            /* both full */
    /* a's next turn is handed off, and to 51, which holds it (the least
     * busy on a tie would be 50). */
    sched_request_prefix(s, 2, 5, OTHER, &pa2);
    assert_int_equal(sent_to(s, 5), 51);
    assert_int_equal(last_affinity, 1);
    sched_free(s);
}

/* ---------- memory: budget, eviction, idleness ---------- */

#define MiB (1024ull * 1024)
#define GiB (1024ull * MiB)

/* A pool of N models (named by the caller) under BUDGET bytes. */
static struct sched *mem_new(uint64_t budget, double queue_timeout, size_t n)
{
    struct sched *s = sched_new(&(struct sched_limits){ .max_queue = 1000,
                                                        .queue_timeout = queue_timeout,
                                                        .budget = budget });
    assert_non_null(s);
    sched_models_resize(s, n);
    return s;
}

/* One instance of at most one, one slot, charged WEIGHTS + MORE. */
static void mem_model(struct sched *s, size_t model, const char *name, uint64_t weights,
                      uint64_t more)
{
    sched_model_set(s, model, name, &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .mem_weights = weights, .mem_more = more });
}

/* An instance used at time USED: ready at READY, one request served. */
static void used_at(struct sched *s, double ready_t, double used, sched_inst_t inst, size_t model,
                    sched_req_t req)
{
    ready(s, ready_t, inst, model, 1);
    sched_request(s, used - 1, req, model);
    sched_request_done(s, used, req);
}

static bool stopped(const struct got *x, sched_inst_t inst)
{
    for (size_t i = 0; i < x->n; i++)
        if (x->a[i].kind == SCHED_STOP && x->a[i].inst == inst)
            return true;
    return false;
}

static void an_eviction_stops_the_instance_whose_prompts_are_cold_first(void **state)
{
    (void)state;
    enum { A, D };
    struct sched *s = mem_new(5 * GiB, 0, 2);
    sched_model_set(s, A, "a", &(struct sched_model_info){
        .instances_max = 2, .slots_hint = 1, .mem_weights = 2 * GiB, .mem_more = GiB });
    mem_model(s, D, "d", GiB + GiB / 2, 0);
    ready(s, 0, 50, A, 1);
    ready(s, 0, 51, A, 1);
    const uint64_t blocks[] = { 1, 2, 3, 4, 5, 6 };
    struct sched_prefix p = { .n = 6, .block = blocks };
    sched_request_prefix(s, 1, 1, A, &p);           /* 50 holds a prompt */
    sched_request(s, 1.5, 2, A);                    /* 51 none, used later */
    sched_request_done(s, 2, 1);
    sched_request_done(s, 4, 2);
    drain(s);
    /* d needs 1.5 GiB: one of a's goes, the cold one, though 50 is the
     * least recently used. */
    sched_request(s, 10, 100, D);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 51);
    sched_free(s);
}

/* S (1 GiB, asked 10 times, long ago) and B (8 GiB, asked once, lately)
 * under a 10 GiB budget; N (2 GiB) is asked for: one of them must go. */
static sched_inst_t who_goes(enum sched_eviction policy, double b_load_s)
{
    enum { S, B, N };
    struct sched *s = sched_new(&(struct sched_limits){ .max_queue = 1000, .budget = 10 * GiB,
                                                        .eviction = policy });
    sched_models_resize(s, 3);
    mem_model(s, S, "s", GiB, 0);
    mem_model(s, B, "b", 8 * GiB, 0);
    mem_model(s, N, "n", 2 * GiB, 0);
    sched_instance_added(s, 0, 1, S);
    sched_instance_ready(s, 1, 1, 1);               /* S took 1 s to load */
    for (sched_req_t r = 100; r < 110; r++) {
        sched_request(s, 1, r, S);
        sched_request_done(s, 1.5, r);
    }
    sched_instance_added(s, 2, 2, B);
    sched_instance_ready(s, 2 + b_load_s, 2, 1);    /* B took B_LOAD_S to load */
    sched_request(s, 50, 200, B);
    sched_request_done(s, 51, 200);
    drain(s);
    sched_request(s, 60, 300, N);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    sched_inst_t gone = nth(x, SCHED_STOP, 0)->inst;
    sched_free(s);
    return gone;
}

static void eviction_cost_weighs_requests_reload_time_and_size(void **state)
{
    (void)state;
    /* LRU: S, asked least recently, though it is asked most. */
    assert_int_equal(who_goes(SCHED_EVICT_LRU, 8), 1);
    /* cost: B. Per GiB a reload of either costs the same (B took 8 s for
     * 8 GiB, S 1 s for 1 GiB), and S was asked ten times. */
    assert_int_equal(who_goes(SCHED_EVICT_COST, 8), 2);
    /* But a B that takes 200 s to load is worth keeping for its one request:
     * 1 x 200 s / 8 GiB > 10 x 1 s / 1 GiB. */
    assert_int_equal(who_goes(SCHED_EVICT_COST, 200), 1);
}

static void eviction_cost_ages_what_is_not_asked_again(void **state)
{
    (void)state;
    /* A (asked 5 times) and B (asked 5 times), 4 GiB each; budget 8 GiB.
     * C comes: one goes (B, asked least recently on the tie), and the clock
     * rises to its H. Then A is asked no more, C is asked once more: when D
     * comes, A (H 5, from the old clock) goes before C (H = clock + 2). */
    enum { A, B, C, D };
    struct sched *s = sched_new(&(struct sched_limits){ .max_queue = 1000, .budget = 8 * GiB,
                                                        .eviction = SCHED_EVICT_COST });
    sched_models_resize(s, 4);
    mem_model(s, A, "a", 4 * GiB, 0);
    mem_model(s, B, "b", 4 * GiB, 0);
    mem_model(s, C, "c", 4 * GiB, 0);
    mem_model(s, D, "d", 4 * GiB, 0);
    ready(s, 0, 1, B, 1);
    ready(s, 0, 2, A, 1);
    for (sched_req_t r = 0; r < 5; r++) {
        sched_request(s, 1, 100 + r, B);
        sched_request_done(s, 1, 100 + r);
        sched_request(s, 2, 200 + r, A);
        sched_request_done(s, 2, 200 + r);
    }
    drain(s);
    sched_request(s, 10, 300, C);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 1);   /* B */
    sched_instance_removed(s, 11, 1);
    sched_instance_added(s, 11, 3, C);
    sched_instance_ready(s, 15, 3, 1);
    sched_request_done(s, 16, 300);
    sched_request(s, 20, 301, C);
    sched_request_done(s, 21, 301);
    drain(s);
    sched_request(s, 30, 400, D);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 2);   /* A, though asked 5 times */
    sched_free(s);
}

static void prio_model(struct sched *s, size_t model, const char *name, uint64_t bytes, int priority)
{
    sched_model_set(s, model, name, &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .mem_weights = bytes, .priority = priority });
}

static void a_lower_priority_is_evicted_first_whatever_its_recency(void **state)
{
    (void)state;
    enum { A, B, N };
    struct sched *s = mem_new(10 * GiB, 0, 3);
    prio_model(s, A, "a", 4 * GiB, 1);
    prio_model(s, B, "b", 4 * GiB, 0);
    prio_model(s, N, "n", 4 * GiB, 0);
    used_at(s, 0, 5, 1, A, 100);                    /* A: least recently used */
    used_at(s, 0, 20, 2, B, 101);
    drain(s);
    sched_request(s, 30, 200, N);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 2);   /* B: its priority is lower */
    sched_free(s);
}

/* X (4 GiB, busy) fills most of a 6 GiB budget; L (priority 0) is asked
 * at 0, H (priority 1) at H_AT; X's request ends at FREE_AT: which starts? */
static size_t first_started(double h_at, double free_at)
{
    enum { X, L, H };
    struct sched *s = mem_new(6 * GiB, 0, 3);
    prio_model(s, X, "x", 4 * GiB, 0);
    prio_model(s, L, "l", 4 * GiB, 0);
    prio_model(s, H, "h", 4 * GiB, 1);
    ready(s, 0, 1, X, 1);
    sched_request(s, 0, 100, X);                    /* busy: not evictable */
    sched_request(s, 0, 200, L);
    sched_request(s, h_at, 300, H);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    sched_request_done(s, free_at, 100);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);      /* X goes for the first of them */
    sched_instance_removed(s, free_at + 0.5, 1);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    size_t model = nth(x, SCHED_START, 0)->model;
    sched_free(s);
    return model;
}

static void a_higher_priority_starts_first_and_age_raises_a_lower_one(void **state)
{
    (void)state;
    enum { X, L, H };
    /* H, asked later, goes first: its priority is higher. */
    assert_int_equal(first_started(15, 20), H);
    /* L has waited 30 s longer than H: one level up, even with H, and older. */
    assert_int_equal(first_started(40, 45), L);
}

static void evictions_stop_the_least_recently_used_first_and_start_once_removed(void **state)
{
    (void)state;
    enum { A, B, C, N, D };
    struct sched *s = mem_new(10 * GiB, 0, 5);
    mem_model(s, A, "a", 2 * GiB, 0);
    mem_model(s, B, "b", 2 * GiB, 0);
    mem_model(s, C, "c", 2 * GiB, 0);
    mem_model(s, N, "n", 2 * GiB, 0);
    mem_model(s, D, "d", 7 * GiB, 0);
    used_at(s, 0, 10, 1, A, 101);
    used_at(s, 0, 5, 2, B, 102);
    used_at(s, 0, 20, 3, C, 103);
    ready(s, 7, 4, N, 1);               /* never used: its add time, 7, counts */
    drain(s);
    assert_true(sched_used(s) == 8 * GiB);

    /* d needs 7 GiB: 8 + 7 - 10 = 5 GiB must go, three of the four. */
    sched_request(s, 30, 200, D);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    assert_int_equal(count(x, SCHED_STOP), 3);
    const sched_inst_t order[] = { 2, 4, 1 };      /* b (5), n (7), a (10); c (20) stays */
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(nth(x, SCHED_STOP, i)->inst, order[i]);
        assert_int_equal(nth(x, SCHED_STOP, i)->reason, SCHED_STOP_LRU);
    }
    assert_true(sched_used(s) == 8 * GiB);          /* stopping ones still count */

    /* More events while they stop: no STOP twice, no START yet. */
    sched_request(s, 31, 201, D);
    sched_tick(s, 32);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_int_equal(count(x, SCHED_START), 0);
    sched_instance_removed(s, 33, 2);
    sched_instance_removed(s, 33, 4);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);     /* 4 + 7 > 10 still */
    assert_int_equal(count(x, SCHED_STOP), 0);
    sched_instance_removed(s, 34, 1);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(nth(x, SCHED_START, 0)->model, D);
    assert_int_equal(count(x, SCHED_STOP), 0);
    sched_instance_added(s, 34, 5, D);
    assert_true(sched_used(s) == 9 * GiB);
    sched_free(s);
}

static void an_instance_being_stopped_is_not_stopped_again(void **state)
{
    (void)state;
    enum { A, C, D };
    struct sched *s = mem_new(10 * GiB, 0, 3);
    sched_model_set(s, A, "a", &(struct sched_model_info){
        .instances_max = 2, .slots_hint = 1, .mem_weights = 2 * GiB });
    mem_model(s, C, "c", 2 * GiB, 0);
    mem_model(s, D, "d", 6 * GiB, 0);
    ready(s, 0, 1, A, 1);
    ready(s, 0, 2, A, 1);
    sched_request(s, 0.5, 101, A);      /* a#1 */
    sched_request(s, 1, 102, A);        /* a#2 */
    sched_request_done(s, 1, 101);
    sched_request_done(s, 2, 102);
    used_at(s, 0, 3, 3, C, 103);
    drain(s);
    sched_request(s, 10, 200, D);       /* 6 + 6 - 10: a#1 alone makes room */
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 1);
    /* c turns out bigger: a#1 is not enough any more. a#2 goes too; a#1,
     * still the least recently used, is not asked to stop twice. */
    sched_instance_memory(s, 11, 3, 3 * GiB);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 2);
    sched_instance_removed(s, 12, 1);
    sched_instance_removed(s, 12, 2);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_int_equal(count(x, SCHED_START), 1);     /* 3 + 6 <= 10 */
    sched_free(s);
}

static void a_pinned_instance_is_never_evicted(void **state)
{
    (void)state;
    enum { P, B, D };
    struct sched *s = mem_new(10 * GiB, 30, 3);
    sched_model_set(s, P, "p", &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .mem_weights = 4 * GiB, .pinned = true });
    mem_model(s, B, "b", 4 * GiB, 0);
    mem_model(s, D, "d", 4 * GiB, 0);
    used_at(s, 0, 1, 1, P, 101);        /* the least recently used */
    used_at(s, 0, 5, 2, B, 102);
    drain(s);
    sched_request(s, 10, 200, D);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 2);
    sched_instance_removed(s, 11, 2);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    sched_instance_added(s, 11, 3, D);
    sched_instance_ready(s, 12, 3, 1);
    sched_request_done(s, 13, 200);     /* d served and idle now */
    drain(s);

    /* b again: d may go, p may not; and with d busy, nothing goes. */
    sched_request(s, 20, 201, D);       /* d busy */
    sched_request(s, 21, 202, B);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_int_equal(count(x, SCHED_START), 0);
    sched_tick(s, 51);                  /* b's request times out; p is still there */
    x = drain(s);
    assert_int_equal(nth(x, SCHED_FAIL, 0)->status, 504);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_true(sched_charge(s, 1) == 4 * GiB);
    sched_free(s);
}

static void eviction_keeps_each_models_instances_min(void **state)
{
    (void)state;
    enum { K, M, B, E };
    struct sched *s = mem_new(12 * GiB, 0, 4);
    sched_model_set(s, K, "k", &(struct sched_model_info){
        .instances_min = 1, .instances_max = 1, .slots_hint = 1, .mem_more = GiB });
    sched_model_set(s, M, "m", &(struct sched_model_info){
        .instances_min = 1, .instances_max = 2, .slots_hint = 1, .mem_more = 3 * GiB });
    mem_model(s, B, "b", 3 * GiB, 0);
    mem_model(s, E, "e", 8 * GiB, 0);
    used_at(s, 0, 1, 5, K, 101);        /* k's only instance: the least recently used */
    used_at(s, 0, 2, 1, M, 102);        /* m#1 */
    ready(s, 3, 4, M, 1);               /* m#2, never used: 3 */
    used_at(s, 0, 5, 2, B, 103);
    drain(s);
    assert_true(sched_used(s) == 10 * GiB);

    /* e: 10 + 8 - 12 = 6 GiB to free. By age alone k, m#1, m#2 would go;
     * k and m each keep one, so m#1 and b go. */
    sched_request(s, 10, 200, E);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 2);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 1);
    assert_int_equal(nth(x, SCHED_STOP, 1)->inst, 2);
    assert_false(stopped(x, 5));
    assert_false(stopped(x, 4));
    sched_free(s);
}

static void instances_in_flight_or_waited_for_are_never_evicted(void **state)
{
    (void)state;
    enum { A, B, C, D };
    struct sched *s = mem_new(10 * GiB, 0, 4);
    mem_model(s, A, "a", 3 * GiB, 0);
    mem_model(s, B, "b", 3 * GiB, 0);
    mem_model(s, C, "c", 3 * GiB, 0);
    mem_model(s, D, "d", 6 * GiB, 0);
    ready(s, 0, 1, A, 1);
    ready(s, 0, 2, B, 1);
    ready(s, 0, 3, C, 1);
    sched_request(s, 1, 101, A);        /* a: in flight */
    sched_request(s, 2, 102, B);        /* b: in flight */
    sched_request(s, 3, 103, B);        /* ... and waited for */
    used_at(s, 0, 5, 3, C, 104);        /* c: idle, the most recently used */
    drain(s);

    /* d needs 9 + 6 - 10 = 5 GiB freed: c alone is not enough, so nothing
     * stops (a stop that cannot make room would only cost a reload). */
    sched_request(s, 10, 200, D);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_int_equal(count(x, SCHED_START), 0);
    /* b's first request ends: b serves its waiter, stays busy. */
    sched_request_done(s, 11, 102);
    x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 103);
    assert_int_equal(count(x, SCHED_STOP), 0);
    /* a's ends: a and c are enough, least recently asked for first. */
    sched_request_done(s, 12, 101);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 2);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 1);   /* a (asked at 1) */
    assert_int_equal(nth(x, SCHED_STOP, 1)->inst, 3);   /* c (asked at 4) */
    assert_false(stopped(x, 2));
    sched_free(s);
}

/* Recency is demand: when the model was last asked for. A cold model that
 * waited 12 s for its load served later than a hot one, but was asked for
 * earlier; it is the one to go. */
static void recency_is_the_latest_request_not_the_end_of_a_slow_load(void **state)
{
    (void)state;
    enum { COLD, HOT, NEW };
    struct sched *s = mem_new(8 * GiB, 0, 3);
    mem_model(s, COLD, "cold", 4 * GiB, 0);
    mem_model(s, HOT, "hot", 4 * GiB, 0);
    mem_model(s, NEW, "new", 4 * GiB, 0);
    ready(s, 0, 1, HOT, 1);
    drain(s);
    sched_request(s, 1, 100, COLD);     /* asked at 1 ... */
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    sched_instance_added(s, 1, 2, COLD);
    sched_request(s, 10, 101, HOT);     /* hot asked at 10, done at 11 */
    sched_request_done(s, 11, 101);
    sched_instance_ready(s, 13, 2, 1);  /* ... loaded at 13, served until 14 */
    sched_request_done(s, 14, 100);
    drain(s);
    sched_request(s, 15, 102, NEW);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 2);   /* cold */
    sched_free(s);
}

/* An instance an operator stops holds its memory until it has exited: a
 * start that needs that memory waits for the exit, and the stopping one
 * gets no requests. A stop that turns into a restart makes it usable. */
static void an_operator_stop_keeps_the_charge_until_the_instance_is_gone(void **state)
{
    (void)state;
    enum { A, B };
    struct sched *s = mem_new(10 * GiB, 0, 2);
    mem_model(s, A, "a", 6 * GiB, 0);
    mem_model(s, B, "b", 6 * GiB, 0);
    ready(s, 0, 1, A, 1);
    drain(s);
    sched_instance_stopping(s, 1, 1);
    assert_true(sched_charge(s, 1) == 6 * GiB);
    sched_request(s, 2, 100, B);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);     /* 6 + 6 > 10 until a is gone */
    assert_int_equal(count(x, SCHED_STOP), 0);      /* nor asked to stop again */
    sched_request(s, 2, 101, A);                    /* a stopping a is no use */
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 0);
    sched_request_gone(s, 3, 101);
    sched_instance_removed(s, 3, 1);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(nth(x, SCHED_START, 0)->model, B);
    assert_true(sched_used(s) == 0);

    /* A stop that became a restart: usable again once ready. */
    sched_instance_added(s, 4, 2, B);
    sched_instance_ready(s, 5, 2, 1);
    drain(s);
    sched_request_done(s, 6, 100);
    sched_instance_stopping(s, 7, 2);
    sched_instance_starting(s, 8, 2);
    sched_instance_ready(s, 9, 2, 1);
    sched_request(s, 10, 102, B);
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 1);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->inst, 2);
    sched_free(s);
}

static void a_model_that_can_never_fit_fails_its_waiters_with_503_and_the_numbers(void **state)
{
    (void)state;
    enum { A, B, TINY_ };
    struct sched *s = mem_new(8 * GiB, 0, 3);
    mem_model(s, A, "a", 600 * MiB, 0);
    mem_model(s, B, "b", 400 * MiB, 100 * MiB);
    sched_model_set(s, TINY_, "tiny", &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 4, .mem_weights = 8 * GiB, .mem_more = GiB / 5 * 6 / 5 });
    ready(s, 0, 1, A, 1);
    ready(s, 0, 2, B, 1);
    drain(s);
    /* 8 GiB + 0.24 GiB: 8.2 GiB is more than the whole budget. */
    sched_request(s, 1, 10, TINY_);
    sched_request(s, 1, 11, TINY_);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_int_equal(count(x, SCHED_FAIL), 2);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(nth(x, SCHED_FAIL, i)->req, 10 + i);
        assert_int_equal(nth(x, SCHED_FAIL, i)->status, 503);
        assert_string_equal(nth(x, SCHED_FAIL, i)->message,
                            "tiny needs 8.2 GiB; the budget is 8.0 GiB "
                            "(in use 1.1 GiB: a#1 600 MiB, b#1 500 MiB)");
    }
    assert_int_equal(sched_waiting(s), 0);
    sched_free(s);

    /* Many instances: the message names eight and stops. */
    s = mem_new(GiB, 0, 11);
    char name[8];
    for (size_t m = 0; m < 10; m++) {
        snprintf(name, sizeof name, "m%zu", m);
        mem_model(s, m, name, 10 * MiB, 0);
        ready(s, 0, 100 + m, m, 1);
    }
    mem_model(s, 10, "huge", 2 * GiB, 0);
    drain(s);
    sched_request(s, 1, 1, 10);
    x = drain(s);
    assert_int_equal(count(x, SCHED_FAIL), 1);
    assert_string_equal(nth(x, SCHED_FAIL, 0)->message,
                        "huge needs 2.0 GiB; the budget is 1.0 GiB (in use 100 MiB: "
                        "m0#1 10 MiB, m1#1 10 MiB, m2#1 10 MiB, m3#1 10 MiB, m4#1 10 MiB, "
                        "m5#1 10 MiB, m6#1 10 MiB, m7#1 10 MiB, …)");
    sched_free(s);
}

static void a_second_instance_of_the_same_file_is_charged_without_the_weights(void **state)
{
    (void)state;
    enum { X, Y, U };
    struct sched *s = mem_new(8 * GiB, 0, 3);
    struct sched_model_info shared = { .instances_max = 2, .slots_hint = 1,
                                       .mem_weights = 4 * GiB, .mem_more = GiB, .file_id = 7 };
    sched_model_set(s, X, "x", &shared);
    sched_model_set(s, Y, "y", &shared);        /* another name, same file */
    shared.file_id = 0;
    sched_model_set(s, U, "u", &shared);        /* same size, never shared */
    ready(s, 0, 1, X, 1);
    drain(s);
    assert_true(sched_charge(s, 1) == 5 * GiB);

    /* y maps the file x has loaded: 1 GiB more fits in 8; u's 5 would not. */
    sched_request(s, 1, 10, Y);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    sched_instance_added(s, 1, 2, Y);
    assert_true(sched_charge(s, 2) == GiB);
    sched_request(s, 1, 11, X);                 /* served by x#1 */
    sched_request(s, 1, 12, X);                 /* a second x: 1 GiB too */
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    sched_instance_added(s, 1, 3, X);
    assert_true(sched_charge(s, 3) == GiB);
    assert_true(sched_used(s) == 7 * GiB);
    sched_request(s, 2, 13, U);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);  /* 7 + 5 > 8, nothing idle */

    /* x#1 goes: the weights stay mapped by the others, so their charge is
     * kept (by the first of them) and only x#1's own part is freed. */
    sched_instance_failed(s, 3, 1, "crashed");
    assert_true(sched_charge(s, 1) == 0);       /* a failed instance counts no more */
    assert_true(sched_used(s) == 6 * GiB);
    assert_true(sched_charge(s, 2) == 5 * GiB);
    sched_free(s);
}

static void measured_memory_replaces_the_estimate(void **state)
{
    (void)state;
    enum { A, B };
    struct sched *s = mem_new(10 * GiB, 0, 2);
    mem_model(s, A, "a", 6 * GiB, 0);
    mem_model(s, B, "b", 6 * GiB, 0);
    sched_request(s, 1, 10, A);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    sched_instance_added(s, 1, 1, A);
    /* Measured while loading: partial, so it may only raise the charge. */
    sched_instance_memory(s, 2, 1, 2 * GiB);
    assert_true(sched_charge(s, 1) == 6 * GiB);
    sched_instance_memory(s, 2, 1, 7 * GiB);
    assert_true(sched_charge(s, 1) == 7 * GiB);
    sched_instance_ready(s, 3, 1, 1);           /* 10 dispatched: a busy */
    sched_request(s, 4, 11, B);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    assert_int_equal(count(x, SCHED_STOP), 0);
    /* Ready and measured at 3 GiB: 3 + 6 fits, b starts at once. */
    sched_instance_memory(s, 5, 1, 3 * GiB);
    assert_true(sched_charge(s, 1) == 3 * GiB);
    assert_true(sched_used(s) == 3 * GiB);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(nth(x, SCHED_START, 0)->model, B);
    sched_free(s);
}

static void available_memory_gates_starts(void **state)
{
    (void)state;
    enum { A, B, C };
    struct sched *s = mem_new(100 * GiB, 0, 3);
    mem_model(s, A, "a", 6 * GiB, 0);
    mem_model(s, B, "b", 2 * GiB, 0);
    mem_model(s, C, "c", 50 * GiB, 0);
    sched_set_available(s, 0, 5 * GiB);
    sched_request(s, 1, 10, A);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);  /* far under budget, but 6 > 5 */
    assert_int_equal(count(x, SCHED_FAIL), 0);
    sched_set_available(s, 2, 7 * GiB);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    sched_instance_added(s, 2, 1, A);
    /* The 6 GiB a is loading are not in the last report: b waits for the next. */
    sched_request(s, 3, 11, B);
    assert_int_equal(count(drain(s), SCHED_START), 0);
    sched_set_available(s, 4, 2 * GiB);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    sched_instance_added(s, 4, 2, B);
    /* 0 = unknown: only the budget counts. */
    sched_request(s, 5, 12, C);
    assert_int_equal(count(drain(s), SCHED_START), 0);
    sched_set_available(s, 6, 0);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    sched_free(s);
}

static void an_idle_instance_stops_after_idle_timeout_and_the_wake_says_when(void **state)
{
    (void)state;
    struct sched *s = mem_new(0, 0, 1);         /* idleness needs no budget */
    sched_model_set(s, 0, "a", &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .idle_timeout = 60 });
    ready(s, 0, 1, 0, 1);
    struct got *x = drain(s);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 60);           /* ready, never used */
    sched_request(s, 10, 1, 0);
    x = drain(s);
    assert_int_equal(count(x, SCHED_WAKE), 0);  /* busy: no idle deadline (60 stays armed) */
    sched_request_done(s, 20, 1);
    x = drain(s);
    assert_int_equal(count(x, SCHED_WAKE), 1);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 80);
    sched_tick(s, 60);                          /* the old timer: nothing to do */
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 80);
    sched_tick(s, 79.5);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 80);
    sched_tick(s, 80);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->reason, SCHED_STOP_IDLE);
    assert_int_equal(count(x, SCHED_WAKE), 0);  /* nothing left to wait for */
    sched_tick(s, 200);
    assert_int_equal(count(drain(s), SCHED_STOP), 0);       /* not twice */
    sched_free(s);

    /* The one WAKE is the earliest of a queue timeout and an idle deadline. */
    s = mem_new(0, 30, 2);
    sched_model_set(s, 0, "a", &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .idle_timeout = 60 });
    sched_model_set(s, 1, "b", &(struct sched_model_info){ .instances_max = 0 });
    ready(s, 0, 1, 0, 1);
    drain(s);
    sched_request(s, 10, 2, 1);                 /* b can never start: waits, 504 at 40 */
    assert_true(nth(drain(s), SCHED_WAKE, 0)->at == 40);
    sched_tick(s, 40);
    x = drain(s);
    assert_int_equal(nth(x, SCHED_FAIL, 0)->status, 504);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 60);
    sched_free(s);
}

/* Whether any model has an idle_timeout is kept as a count as models are
 * set, set again and removed: the idle pass follows each change. */
static void idle_timeouts_follow_models_set_again_and_removed(void **state)
{
    (void)state;
    struct sched *s = mem_new(0, 0, 2);
    sched_model_set(s, 0, "a", &(struct sched_model_info){ .instances_max = 1, .slots_hint = 1 });
    sched_model_set(s, 1, "b", &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .idle_timeout = 5 });
    ready(s, 0, 1, 0, 1);
    assert_int_equal(count(drain(s), SCHED_WAKE), 0);          /* a has no idle_timeout */
    sched_model_set(s, 0, "a", &(struct sched_model_info){     /* a reload gives it one */
        .instances_max = 1, .slots_hint = 1, .idle_timeout = 10 });
    assert_true(nth(drain(s), SCHED_WAKE, 0)->at == 10);
    sched_models_resize(s, 1);                                  /* b (the other idle one) goes */
    drain(s);
    sched_model_set(s, 0, "a", &(struct sched_model_info){ .instances_max = 1, .slots_hint = 1 });
    drain(s);
    sched_tick(s, 100);                                         /* none has one now */
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_int_equal(count(x, SCHED_WAKE), 0);
    sched_model_set(s, 0, "a", &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .idle_timeout = 1 });
    sched_tick(s, 101);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->reason, SCHED_STOP_IDLE);
    sched_free(s);
}

static void idle_stops_keep_instances_min_and_spare_pinned_models(void **state)
{
    (void)state;
    enum { MIN1, PIN, TWO };
    struct sched *s = mem_new(0, 0, 3);
    sched_model_set(s, MIN1, "min1", &(struct sched_model_info){
        .instances_min = 1, .instances_max = 1, .slots_hint = 1, .idle_timeout = 10 });
    sched_model_set(s, PIN, "pin", &(struct sched_model_info){
        .instances_max = 1, .slots_hint = 1, .idle_timeout = 10, .pinned = true });
    sched_model_set(s, TWO, "two", &(struct sched_model_info){
        .instances_min = 1, .instances_max = 2, .slots_hint = 1, .idle_timeout = 10 });
    ready(s, 0, 1, MIN1, 1);
    ready(s, 0, 2, PIN, 1);
    ready(s, 0, 3, TWO, 1);
    ready(s, 5, 4, TWO, 1);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_WAKE), 1);
    assert_true(nth(x, SCHED_WAKE, 0)->at == 10);   /* two#1, the only one that may go */
    sched_tick(s, 100);
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);      /* two#1 (idle since 0); two#2 is the min */
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 3);
    assert_int_equal(count(x, SCHED_WAKE), 0);      /* min1, pin, two#2 never idle-stop */
    sched_tick(s, 1000);
    assert_int_equal(count(drain(s), SCHED_STOP), 0);
    sched_free(s);
}

static void the_oldest_waiting_model_gets_room_first_and_newer_ones_keep_off_it(void **state)
{
    (void)state;
    enum { C, D, B, A };                /* a is older but comes later in the config */
    struct sched *s = mem_new(10 * GiB, 0, 4);
    mem_model(s, C, "c", 6 * GiB, 0);
    mem_model(s, D, "d", 2 * GiB, 0);
    mem_model(s, A, "a", 6 * GiB, 0);
    mem_model(s, B, "b", 3 * GiB, 0);
    used_at(s, 0, 1, 2, D, 100);        /* d idle */
    ready(s, 0, 1, C, 1);
    sched_request(s, 2, 101, C);        /* c busy */
    drain(s);
    /* a (older) cannot be made room for while c is busy: nothing stops. b
     * would fit by stopping d (8 - 2 + 3 <= 10), but a comes first: no
     * eviction for b, and no start of b that takes a's room. */
    sched_request(s, 3, 200, A);
    sched_request(s, 4, 300, B);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 0);
    assert_int_equal(count(x, SCHED_START), 0);
    sched_request_done(s, 5, 101);      /* c idle: d (1) and c (5) make room for a */
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 2);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 2);
    assert_int_equal(nth(x, SCHED_STOP, 1)->inst, 1);
    assert_int_equal(count(x, SCHED_START), 0);
    sched_instance_removed(s, 6, 2);    /* d gone: 6 used; b would fit (9), a not */
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    sched_instance_removed(s, 7, 1);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 2);     /* a, then b beside it: 9 <= 10 */
    assert_int_equal(nth(x, SCHED_START, 0)->model, A);
    assert_int_equal(nth(x, SCHED_START, 1)->model, B);
    sched_free(s);
}

static void a_fresh_instance_serves_its_batch_before_it_is_evicted(void **state)
{
    (void)state;
    enum { A, B };
    struct sched *s = mem_new(10 * GiB, 0, 2);
    mem_model(s, A, "a", 6 * GiB, 0);
    mem_model(s, B, "b", 6 * GiB, 0);
    sched_request(s, 1, 1, A);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    sched_instance_added(s, 1, 1, A);
    sched_request(s, 2, 2, B);          /* b waits for memory, older than a's batch */
    sched_request(s, 3, 3, A);
    sched_request(s, 4, 4, A);
    drain(s);
    sched_instance_ready(s, 10, 1, 1);  /* one slot: its batch is 1, 3, 4 */
    struct got *x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 1);
    assert_int_equal(count(x, SCHED_STOP), 0);
    const sched_req_t batch[] = { 1, 3, 4 };
    for (size_t i = 0; i < 2; i++) {
        sched_request_done(s, 11 + (double)i, batch[i]);
        x = drain(s);
        assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, batch[i + 1]);
        assert_int_equal(count(x, SCHED_STOP), 0);
        assert_int_equal(count(x, SCHED_START), 0);
    }
    sched_request_done(s, 13, 4);       /* batch served: now b's turn */
    x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_int_equal(nth(x, SCHED_STOP, 0)->inst, 1);
    sched_free(s);
}

/* ---------- a fake pool in simulated time ---------- */

/* It performs the scheduler's actions the way the daemon does: a START is
 * added at once and is ready (or fails) after a load time, a DISPATCH ends
 * after a service time, a STOP is removed after a stop time, a WAKE arms
 * the one timer. It checks the memory rules as it goes. */

enum simkind { EV_ARRIVE, EV_READY, EV_FAILSTART, EV_DONE, EV_REMOVED, EV_TICK };

struct simev {
    double at;
    uint64_t seq;
    enum simkind kind;
    uint64_t id;
};

struct siminst {
    size_t model;
    int state;                  /* 0 gone, 1 starting, 2 ready */
    bool stopping;
    unsigned in_flight;
};

struct simreq {
    size_t model;
    int state;                  /* 0 not yet, 1 waiting, 2 dispatched, 3 done, 4 failed */
    int status;
    size_t starts_seen;         /* START log length when it arrived */
    sched_inst_t inst;          /* once dispatched */
};

struct sim {
    struct sched *s;
    uint64_t budget;
    const struct sched_model_info *info;
    size_t nmodels;
    double now, wake_at;
    uint64_t rng, seq;
    struct simev *ev;
    size_t nev, capev;
    struct siminst *inst;       /* id = index + 1 */
    size_t ninst, capinst;
    struct simreq *req;         /* id = index + 1 */
    size_t nreq;
    size_t *starts;             /* the model of every START, in order */
    size_t nstarts, capstarts;
    double load_lo, load_hi, serve_lo, serve_hi, stop_time, fail_p, measure_lo;
    size_t last_model, runs, dispatched, failed, f503, f504, stops_lru, stops_idle;
    size_t max_other_loads;     /* loads of other models a request waited behind */
    size_t handoffs;            /* dispatches beyond an instance's slots */
};

static double sim_rand(struct sim *x)
{
    x->rng ^= x->rng << 13, x->rng ^= x->rng >> 7, x->rng ^= x->rng << 17;
    return (double)(x->rng >> 11) / 9007199254740992.0;
}

static double sim_between(struct sim *x, double lo, double hi)
{
    return lo + (hi - lo) * sim_rand(x);
}

static void sim_at(struct sim *x, double at, enum simkind kind, uint64_t id)
{
    if (x->nev == x->capev) {
        x->capev = x->capev ? 2 * x->capev : 256;
        x->ev = realloc(x->ev, x->capev * sizeof *x->ev);
        assert_non_null(x->ev);
    }
    x->ev[x->nev++] = (struct simev){ .at = at < x->now ? x->now : at, .seq = x->seq++,
                                      .kind = kind, .id = id };
}

/* What one more instance of MODEL is charged, by the rules, as the fake
 * pool sees its instances. */
static uint64_t sim_estimate(const struct sim *x, size_t model)
{
    const struct sched_model_info *mi = &x->info[model];
    bool shared = false;
    for (size_t i = 0; i < x->ninst && mi->file_id; i++)
        shared |= x->inst[i].state && x->info[x->inst[i].model].file_id == mi->file_id;
    return mi->mem_more + (shared ? 0 : mi->mem_weights);
}

static size_t sim_alive(const struct sim *x, size_t model)
{
    size_t n = 0;
    for (size_t i = 0; i < x->ninst; i++)
        n += x->inst[i].state && !x->inst[i].stopping && x->inst[i].model == model;
    return n;
}

static size_t sim_instances(const struct sim *x, size_t model)
{
    size_t n = 0;
    for (size_t i = 0; i < x->ninst; i++)
        n += x->inst[i].state && x->inst[i].model == model;
    return n;
}

static void sim_actions(struct sim *x)
{
    struct sched_action a;
    while (sched_next_action(x->s, &a)) {
        switch (a.kind) {
        case SCHED_DISPATCH: {
            struct simreq *r = &x->req[a.req - 1];
            struct siminst *in = &x->inst[a.inst - 1];
            assert_int_equal(r->state, 1);
            assert_int_equal(in->state, 2);
            assert_false(in->stopping);
            /* Its slots, and at most 4 handed off per slot. */
            assert_true(in->in_flight < x->info[in->model].slots_hint * 5);
            if (in->in_flight >= x->info[in->model].slots_hint)
                x->handoffs++;
            in->in_flight++;
            r->state = 2;
            r->inst = a.inst;
            x->dispatched++;
            if (r->model != x->last_model || !x->runs)
                x->runs++;
            x->last_model = r->model;
            size_t other = 0;
            for (size_t i = r->starts_seen; i < x->nstarts; i++)
                other += x->starts[i] != r->model;
            if (other > x->max_other_loads)
                x->max_other_loads = other;
            sim_at(x, x->now + sim_between(x, x->serve_lo, x->serve_hi), EV_DONE, a.req);
            break;
        }
        case SCHED_START: {
            uint64_t est = sim_estimate(x, a.model);
            if (x->budget && sched_used(x->s) + est > x->budget)
                fail_msg("START of model %zu at %.2f: %llu used + %llu > %llu", a.model, x->now,
                         (unsigned long long)sched_used(x->s), (unsigned long long)est,
                         (unsigned long long)x->budget);
            assert_true(sim_instances(x, a.model) < x->info[a.model].instances_max);
            if (x->ninst == x->capinst) {
                x->capinst = x->capinst ? 2 * x->capinst : 64;
                x->inst = realloc(x->inst, x->capinst * sizeof *x->inst);
                assert_non_null(x->inst);
            }
            x->inst[x->ninst++] = (struct siminst){ .model = a.model, .state = 1 };
            if (x->nstarts == x->capstarts) {
                x->capstarts = x->capstarts ? 2 * x->capstarts : 64;
                x->starts = realloc(x->starts, x->capstarts * sizeof *x->starts);
                assert_non_null(x->starts);
            }
            x->starts[x->nstarts++] = a.model;
            sched_inst_t id = x->ninst;
            sched_instance_added(x->s, x->now, id, a.model);
            assert_true(sched_charge(x->s, id) == est);
            bool fails = sim_rand(x) < x->fail_p;
            sim_at(x, x->now + sim_between(x, x->load_lo, x->load_hi),
                   fails ? EV_FAILSTART : EV_READY, id);
            break;
        }
        case SCHED_STOP: {
            struct siminst *in = &x->inst[a.inst - 1];
            const struct sched_model_info *mi = &x->info[in->model];
            assert_int_equal(in->state, 2);
            assert_false(in->stopping);                 /* never twice */
            assert_int_equal(in->in_flight, 0);
            assert_false(mi->pinned);
            assert_int_equal(sched_waiting_model(x->s, in->model), 0);
            assert_true(sim_alive(x, in->model) > mi->instances_min);
            in->stopping = true;
            if (a.reason == SCHED_STOP_LRU)
                x->stops_lru++;
            else
                x->stops_idle++;
            sim_at(x, x->now + x->stop_time, EV_REMOVED, a.inst);
            break;
        }
        case SCHED_FAIL: {
            struct simreq *r = &x->req[a.req - 1];
            assert_int_equal(r->state, 1);
            r->state = 4;
            r->status = a.status;
            x->failed++;
            x->f503 += a.status == 503;
            x->f504 += a.status == 504;
            if (a.status == 503)
                assert_non_null(strstr(a.message, " needs "));
            break;
        }
        case SCHED_WAKE:
            x->wake_at = a.at;
            sim_at(x, a.at, EV_TICK, 0);
            break;
        }
    }
}

/* Run until nothing is left to happen, checking after every event. */
static void sim_run(struct sim *x)
{
    while (x->nev) {
        size_t b = 0;
        for (size_t i = 1; i < x->nev; i++)
            if (x->ev[i].at < x->ev[b].at ||
                (x->ev[i].at == x->ev[b].at && x->ev[i].seq < x->ev[b].seq))
                b = i;
        struct simev e = x->ev[b];
        x->ev[b] = x->ev[--x->nev];
        x->now = e.at;
        switch (e.kind) {
        case EV_ARRIVE: {
            struct simreq *r = &x->req[e.id - 1];
            r->state = 1;
            r->starts_seen = x->nstarts;
            sched_request(x->s, x->now, e.id, r->model);
            break;
        }
        case EV_READY: {
            struct siminst *in = &x->inst[e.id - 1];
            in->state = 2;
            sched_instance_ready(x->s, x->now, e.id, x->info[in->model].slots_hint);
            sim_actions(x);
            /* The first measurement: at most the estimate, PSS splits shares. */
            uint64_t c = sched_charge(x->s, e.id);
            sched_instance_memory(x->s, x->now, e.id,
                                  (uint64_t)((double)c * sim_between(x, x->measure_lo, 1)) + 1);
            break;
        }
        case EV_FAILSTART:              /* the fake pool drops a failed instance at once */
            x->inst[e.id - 1].state = 0;
            sched_instance_failed(x->s, x->now, e.id, "failed to load");
            sim_actions(x);
            sched_instance_removed(x->s, x->now, e.id);
            break;
        case EV_DONE: {
            struct simreq *r = &x->req[e.id - 1];
            r->state = 3;
            x->inst[r->inst - 1].in_flight--;
            sched_request_done(x->s, x->now, e.id);
            break;
        }
        case EV_REMOVED:
            x->inst[e.id - 1].state = 0;
            x->inst[e.id - 1].stopping = false;
            sched_instance_removed(x->s, x->now, e.id);
            break;
        case EV_TICK:
            if (e.at != x->wake_at)
                continue;                               /* replaced by a later WAKE */
            x->wake_at = -1;
            sched_tick(x->s, x->now);
            break;
        }
        sim_actions(x);
        if (x->budget)
            assert_true(sched_used(x->s) <= x->budget);
    }
}

static void sim_free(struct sim *x)
{
    sched_free(x->s);
    free(x->ev);
    free(x->inst);
    free(x->req);
    free(x->starts);
}

/* Ten models, room for about three, random sizes, sharing, pinning, idle
 * timeouts, failed starts: at every START the instances charged plus its
 * estimate stay within the budget, and every request is answered. */
static void memory_never_exceeds_the_budget_in_a_random_replay(void **state)
{
    (void)state;
    enum { MODELS = 10, REQUESTS = 4000 };
    size_t lru = 0, idle = 0;
    for (uint64_t seed = 1; seed <= 5; seed++) {
        struct sched_model_info info[MODELS];
        struct sim x = { .budget = 10 * GiB, .info = info, .nmodels = MODELS, .wake_at = -1,
                         .rng = 0x9e3779b97f4a7c15ULL * seed, .load_lo = 1, .load_hi = 6,
                         .serve_lo = 0.2, .serve_hi = 4, .stop_time = 0.3, .fail_p = 0.03,
                         .measure_lo = 0.6 };
        x.s = mem_new(x.budget, 60, MODELS);
        for (size_t m = 0; m < MODELS; m++) {
            info[m] = (struct sched_model_info){
                .instances_max = m == 2 ? 2 : 1,
                .slots_hint = 1 + (unsigned)(sim_rand(&x) * 4),
                .mem_weights = (uint64_t)(sim_between(&x, 1.5, 4) * (double)GiB),
                .mem_more = (uint64_t)(sim_between(&x, 0.25, 1) * (double)GiB),
                .pinned = m == 0,
                .instances_min = m == 1,
                .idle_timeout = m % 2 ? 0 : 20,
            };
        }
        info[0].mem_weights = info[1].mem_weights = GiB;    /* held for good: small */
        info[7].mem_weights = 11 * GiB;             /* can never fit */
        info[8].file_id = info[9].file_id = 42;     /* one file, two names */
        info[9].mem_weights = info[8].mem_weights;
        for (size_t m = 0; m < MODELS; m++) {
            char name[8];
            snprintf(name, sizeof name, "m%zu", m);
            sched_model_set(x.s, m, name, &info[m]);
        }
        sim_actions(&x);
        x.req = calloc(REQUESTS, sizeof *x.req);
        assert_non_null(x.req);
        double t = 0;
        for (size_t r = 0; r < REQUESTS; r++) {
            t += sim_between(&x, 0, 0.8);
            size_t m = sim_rand(&x) < 0.5 ? (size_t)(sim_rand(&x) * 3)
                                          : (size_t)(sim_rand(&x) * MODELS);
            x.req[r].model = m;
            sim_at(&x, t, EV_ARRIVE, r + 1);
        }
        x.nreq = REQUESTS;
        sim_run(&x);
        for (size_t r = 0; r < REQUESTS; r++) {
            if (x.req[r].state != 3 && x.req[r].state != 4)
                fail_msg("request %zu never answered (state %d)", r + 1, x.req[r].state);
            if (x.req[r].status == 503)
                assert_int_equal(x.req[r].model, 7);    /* only the one that never fits */
            if (x.req[r].model == 7)
                assert_int_equal(x.req[r].status, 503);
        }
        assert_int_equal(sched_waiting(x.s), 0);
        assert_true(x.dispatched > REQUESTS / 2);
        print_message("random replay %d: %zu dispatched, %zu failed (%zu 503, %zu 504), "
                      "%zu starts, %zu LRU stops, %zu idle stops\n", (int)seed, x.dispatched,
                      x.failed, x.f503, x.f504, x.nstarts, x.stops_lru, x.stops_idle);
        lru += x.stops_lru;
        idle += x.stops_idle;
        sim_free(&x);
    }
    assert_true(lru > 0);       /* the replay did exercise both kinds of stop */
    assert_true(idle > 0);
}

/* Room for one of two models; requests alternate A, B, A, B. */
static void sim_two(struct sim *x, struct sched_model_info info[2], double queue_timeout)
{
    for (size_t m = 0; m < 2; m++)
        info[m] = (struct sched_model_info){ .instances_max = 1, .slots_hint = 2,
                                             .mem_weights = 6 * GiB, .mem_more = GiB / 2 };
    *x = (struct sim){ .budget = 10 * GiB, .info = info, .nmodels = 2, .wake_at = -1,
                       .rng = 12345, .load_lo = 5, .load_hi = 5, .serve_lo = 1, .serve_hi = 1,
                       .stop_time = 0.5, .measure_lo = 1 };
    x->s = mem_new(x->budget, queue_timeout, 2);
    sched_model_set(x->s, 0, "A", &info[0]);
    sched_model_set(x->s, 1, "B", &info[1]);
    sim_actions(x);
}

static void alternating_models_are_served_in_batches_without_thrash(void **state)
{
    (void)state;
    /* Bursts: each round sends 10 requests, A B A B ..., 10 ms apart. */
    enum { ROUNDS = 6, PER = 10 };
    struct sched_model_info info[2];
    struct sim x;
    sim_two(&x, info, 0);
    x.req = calloc(ROUNDS * PER, sizeof *x.req);
    assert_non_null(x.req);
    for (size_t k = 0; k < ROUNDS; k++)
        for (size_t i = 0; i < PER; i++) {
            size_t r = k * PER + i;
            x.req[r].model = (i + k / 2) % 2;   /* rounds start with A, A, B, B, A, A */
            sim_at(&x, 100.0 * (double)k + 0.01 * (double)i, EV_ARRIVE, r + 1);
        }
    x.nreq = ROUNDS * PER;
    sim_run(&x);
    assert_int_equal(x.dispatched, ROUNDS * PER);
    /* Every load serves a whole batch: one run of dispatches per load. */
    assert_int_equal(x.nstarts, x.runs);
    assert_true(x.nstarts <= 2 * ROUNDS);
    assert_true(x.max_other_loads <= 1);
    size_t bursts_loads = x.nstarts;
    sim_free(&x);

    /* A steady stream: A, B, A, B every 0.7 s for 200 s. */
    enum { STREAM = 286 };
    sim_two(&x, info, 0);
    x.req = calloc(STREAM, sizeof *x.req);
    assert_non_null(x.req);
    for (size_t r = 0; r < STREAM; r++) {
        x.req[r].model = r % 2;
        sim_at(&x, 0.7 * (double)r, EV_ARRIVE, r + 1);
    }
    x.nreq = STREAM;
    sim_run(&x);
    assert_int_equal(x.dispatched, STREAM);
    assert_int_equal(x.nstarts, x.runs);
    assert_true(x.max_other_loads <= 1);
    assert_true(x.nstarts < STREAM / 4);    /* batches, not one load per request */
    print_message("alternating A/B: bursts %zu loads for %d rounds; stream %zu loads for "
                  "%d requests\n", bursts_loads, ROUNDS, x.nstarts, STREAM);
    sim_free(&x);
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
        sched_model_set(s, m, name,
                        &(struct sched_model_info){ .instances_max = 2, .slots_hint = 4 });
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

/* ---------- a request an instance dropped unanswered ---------- */

static void a_suspect_instance_gets_nothing_until_it_answers_again(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 1, 50, TINY, 1);
    ready(s, 1, 51, TINY, 1);
    drain(s);
    sched_request(s, 2, 10, TINY);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->inst, 50);

    /* 50 reset the connection: it is suspect, the request comes back as a
     * new one and goes to 51, not to 50's free slot. */
    sched_instance_suspect(s, 3, 50);
    sched_request_done(s, 3, 10);
    sched_request(s, 3, 11, TINY);
    struct got *x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->inst, 51);
    assert_int_equal(count(x, SCHED_START), 0);

    /* The next one waits, and starts nothing: 50 is as good as coming. */
    sched_request(s, 4, 12, TINY);
    x = drain(s);
    assert_int_equal(count(x, SCHED_DISPATCH), 0);
    assert_int_equal(count(x, SCHED_START), 0);

    /* It answered /health: usable again, the waiter goes there. */
    sched_instance_slots(s, 5, 50, 0);
    x = drain(s);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->req, 12);
    assert_int_equal(nth(x, SCHED_DISPATCH, 0)->inst, 50);
    sched_free(s);
}

static void a_suspect_instance_that_crashed_is_failed_as_usual(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    ready(s, 1, 50, BIG, 1);
    drain(s);
    sched_instance_suspect(s, 2, 50);
    sched_request(s, 2, 10, BIG);
    assert_int_equal(count(drain(s), SCHED_DISPATCH), 0);
    sched_instance_failed(s, 3, 50, "killed by signal 9");
    sched_instance_starting(s, 3, 50);      /* backoff: coming back */
    sched_instance_ready(s, 4, 50, 1);
    assert_int_equal(nth(drain(s), SCHED_DISPATCH, 0)->req, 10);
    sched_free(s);
}

/* ---------- starts asked by others ---------- */

static void an_operator_start_is_admitted_as_the_scheduler_counts_memory(void **state)
{
    (void)state;
    enum { X, Y, U };
    char err[256];
    struct sched *s = mem_new(8 * GiB, 0, 3);
    struct sched_model_info shared = { .instances_max = 3, .slots_hint = 1,
                                       .mem_weights = 4 * GiB, .mem_more = GiB, .file_id = 7 };
    sched_model_set(s, X, "x", &shared);
    sched_model_set(s, Y, "y", &shared);        /* another name, same file */
    shared.file_id = 0;
    sched_model_set(s, U, "u", &shared);
    /* Nothing runs: 4 + 1 fits, 4 + 2 + 2 (two more share the weights) too. */
    assert_int_equal(sched_admit(s, X, 1, err, sizeof err), 0);
    assert_int_equal(sched_admit(s, X, 4, err, sizeof err), 0);
    assert_int_equal(sched_admit(s, X, 5, err, sizeof err), -1);
    ready(s, 0, 1, X, 1);
    drain(s);
    /* y maps x's file: only 1 GiB each (3 more fit in 8 - 5), u pays its weights. */
    assert_int_equal(sched_admit(s, Y, 3, err, sizeof err), 0);
    assert_int_equal(sched_admit(s, Y, 4, err, sizeof err), -1);
    assert_int_equal(sched_admit(s, U, 1, err, sizeof err), -1);
    assert_string_equal(err, "u needs 5.0 GiB more; 5.0 GiB of the 8.0 GiB budget is in use "
                             "(stop a model, or raise memory_budget)");
    /* A start asked and not yet added counts as in use. */
    sched_request(s, 1, 10, Y);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    assert_int_equal(sched_admit(s, Y, 3, err, sizeof err), -1);
    assert_int_equal(sched_admit(s, Y, 2, err, sizeof err), 0);
    /* The machine's available memory gates it as it gates the scheduler's starts. */
    sched_set_available(s, 2, GiB / 2);
    assert_int_equal(sched_admit(s, Y, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "available"));
    /* No budget: anything goes. */
    sched_set_limits(s, &(struct sched_limits){ .max_queue = 10 });
    assert_int_equal(sched_admit(s, U, 3, err, sizeof err), 0);
    sched_free(s);
}

static void the_instance_named_to_a_direct_caller_is_the_one_dispatch_would_pick(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    assert_true(sched_pick_ready(s, TINY) == 0);   /* nothing ready */
    sched_instance_added(s, 0, 50, TINY);          /* starting only */
    assert_true(sched_pick_ready(s, TINY) == 0);
    sched_instance_ready(s, 1, 50, 1);
    ready(s, 1, 51, TINY, 2);
    drain(s);
    assert_true(sched_pick_ready(s, TINY) == 50);  /* earliest added on ties */
    sched_request(s, 2, 10, TINY);                 /* to 50: its one slot is busy */
    assert_true(drain(s)->a[0].inst == 50);
    assert_true(sched_pick_ready(s, TINY) == 51);  /* a free slot */
    sched_request(s, 2, 11, TINY);
    sched_request(s, 2, 12, TINY);                 /* 51 full too */
    drain(s);
    assert_true(sched_pick_ready(s, TINY) == 50);  /* all busy: the least busy */
    sched_instance_suspect(s, 3, 50);              /* 50 dropped one: not named */
    assert_true(sched_pick_ready(s, TINY) == 51);
    sched_instance_stopping(s, 3, 51);
    assert_true(sched_pick_ready(s, TINY) == 0);
    assert_true(sched_pick_ready(s, 99) == 0);     /* no such model */
    sched_free(s);
}

static void an_instance_is_known_from_added_to_removed(void **state)
{
    (void)state;
    struct sched *s = pool_new(100, 0);
    assert_false(sched_instance_known(s, 50));
    sched_instance_added(s, 0, 50, TINY);
    assert_true(sched_instance_known(s, 50));
    sched_instance_failed(s, 1, 50, "crashed");
    assert_true(sched_instance_known(s, 50));      /* failed is still known */
    sched_instance_removed(s, 2, 50);
    assert_false(sched_instance_known(s, 50));
    sched_free(s);
}

/* ---------- GPUs ---------- */

/* A pool with no host budget and N devices of BUDGET each. */
static struct sched *gpu_new(size_t nmodels, size_t ndev, uint64_t budget)
{
    struct sched *s = mem_new(0, 0, nmodels);
    uint64_t b[SCHED_MAX_DEVICES];
    for (size_t d = 0; d < ndev; d++)
        b[d] = budget;
    sched_devices_set(s, 0, ndev, b);
    return s;
}

/* Up to MAX instances of one slot, VRAM bytes each on one device. */
static void gpu_model(struct sched *s, size_t model, const char *name, unsigned max, uint64_t vram)
{
    sched_model_set(s, model, name, &(struct sched_model_info){
        .instances_max = max, .slots_hint = 1, .vram = vram });
}

/* Takes the actions; every START is added at once on its device (ids from
 * *NEXT) and made ready at NOW. Returns how many STARTs there were. */
static size_t start_all(struct sched *s, double now, sched_inst_t *next, int *devices)
{
    struct got *x = drain(s);
    size_t n = 0;
    struct sched_action starts[MAXGOT];
    for (size_t i = 0; i < x->n; i++)
        if (x->a[i].kind == SCHED_START)
            starts[n++] = x->a[i];
    for (size_t i = 0; i < n; i++) {
        if (devices)
            devices[i] = starts[i].device;
        sched_inst_t id = (*next)++;
        sched_instance_added_on(s, now, id, starts[i].model, starts[i].device);
        sched_instance_ready(s, now, id, 1);
    }
    return n;
}

static void instances_spread_over_two_devices_by_the_room_left(void **state)
{
    (void)state;
    struct sched *s = gpu_new(1, 2, 10 * GiB);
    gpu_model(s, 0, "a", 4, 3 * GiB);
    for (sched_req_t r = 1; r <= 4; r++)
        sched_request(s, 1, r, 0);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 4);
    /* 10/10 → 0; 7/10 → 1; 7/7 → 0; 4/7 → 1. */
    assert_int_equal(nth(x, SCHED_START, 0)->device, 0);
    assert_int_equal(nth(x, SCHED_START, 1)->device, 1);
    assert_int_equal(nth(x, SCHED_START, 2)->device, 0);
    assert_int_equal(nth(x, SCHED_START, 3)->device, 1);
    for (int i = 0; i < 4; i++)
        sched_instance_added_on(s, 1, 100 + (sched_inst_t)i, 0, nth(x, SCHED_START, (size_t)i)->device);
    assert_true(sched_device_used(s, 0) == 6 * GiB);
    assert_true(sched_device_used(s, 1) == 6 * GiB);
    assert_int_equal(sched_instance_device(s, 101), 1);
    sched_free(s);
}

static void a_full_device_stops_its_least_recently_used_idle_instance(void **state)
{
    (void)state;
    enum { X, Y, Z };
    struct sched *s = gpu_new(3, 2, 4 * GiB);
    gpu_model(s, X, "x", 1, 3 * GiB);
    gpu_model(s, Y, "y", 1, 3 * GiB);
    gpu_model(s, Z, "z", 1, 3 * GiB);
    sched_inst_t next = 1;
    sched_request(s, 1, 10, Y);         /* y on device 0, used last at 1 */
    assert_int_equal(start_all(s, 1, &next, NULL), 1);
    sched_request(s, 2, 11, X);         /* x on device 1 */
    assert_int_equal(start_all(s, 2, &next, NULL), 1);
    drain(s);
    sched_request_done(s, 3, 10);
    sched_request_done(s, 5, 11);       /* x used later than y */
    drain(s);
    assert_int_equal(sched_instance_device(s, 1), 0);
    assert_int_equal(sched_instance_device(s, 2), 1);
    /* z fits on neither: y (device 0, least recently used) makes room. */
    sched_request(s, 6, 12, Z);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 1);
    assert_true(nth(x, SCHED_STOP, 0)->inst == 1);
    assert_int_equal(count(x, SCHED_START), 0);   /* not before y is gone */
    sched_instance_removed(s, 7, 1);
    x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);
    assert_int_equal(nth(x, SCHED_START, 0)->device, 0);
    sched_free(s);
}

static void a_cpu_only_model_starts_beside_full_gpus(void **state)
{
    (void)state;
    enum { G, C };
    struct sched *s = gpu_new(2, 1, 4 * GiB);
    gpu_model(s, G, "g", 1, 3 * GiB);
    gpu_model(s, C, "c", 1, 0);
    sched_inst_t next = 1;
    sched_request(s, 1, 10, G);         /* g fills the device and stays busy */
    assert_int_equal(start_all(s, 1, &next, NULL), 1);
    drain(s);
    sched_request(s, 2, 11, C);
    int dev[4];
    assert_int_equal(start_all(s, 2, &next, dev), 1);
    assert_int_equal(dev[0], -1);       /* no device */
    assert_true(sched_device_used(s, 0) == 3 * GiB);
    sched_free(s);
}

static void a_model_larger_than_every_device_fails_with_503_and_the_numbers(void **state)
{
    (void)state;
    struct sched *s = gpu_new(1, 2, 10 * GiB);
    gpu_model(s, 0, "huge", 1, 20 * GiB);
    sched_request(s, 1, 10, 0);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    assert_int_equal(nth(x, SCHED_FAIL, 0)->status, 503);
    assert_string_equal(nth(x, SCHED_FAIL, 0)->message,
                        "huge needs 20 GiB of GPU memory; the largest device budget is 10 GiB "
                        "(raise gpu_budget, or offload fewer layers with -ngl)");
    sched_free(s);
}

static void the_devices_free_memory_gates_starts_as_its_budget_does(void **state)
{
    (void)state;
    char err[256];
    struct sched *s = gpu_new(1, 1, 10 * GiB);
    gpu_model(s, 0, "a", 2, 3 * GiB);
    /* An operator's start of N: placed one after another. */
    sched_device_free(s, 0, 0, 7 * GiB);
    assert_int_equal(sched_admit(s, 0, 2, err, sizeof err), 0);     /* 3 + 3 <= 7 */
    assert_int_equal(sched_admit(s, 0, 3, err, sizeof err), -1);    /* 9 > 7 */
    assert_string_equal(err, "a needs 3.0 GiB of GPU memory per instance; no device has that much "
                             "left (stop a model, or raise gpu_budget)");
    sched_device_free(s, 0, 0, 2 * GiB);    /* another program holds the rest */
    sched_request(s, 1, 10, 0);
    assert_int_equal(count(drain(s), SCHED_START), 0);
    assert_int_equal(sched_admit(s, 0, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "no device has that much left"));
    sched_device_free(s, 2, 0, 5 * GiB);
    /* The waiting request's start is asked: 3 of the 5 are spoken for. */
    assert_int_equal(sched_admit(s, 0, 1, err, sizeof err), -1);
    assert_string_equal(err, "a needs 3.0 GiB of GPU memory; no device has that much "
                             "left (stop a model, or raise gpu_budget)");
    assert_int_equal(count(drain(s), SCHED_START), 1);
    sched_instance_added_on(s, 2, 1, 0, 0);
    /* Its 3 GiB are not in the driver's figure yet: 2 left, not 5. */
    sched_request(s, 3, 11, 0);
    assert_int_equal(count(drain(s), SCHED_START), 0);
    sched_free(s);
}

static void measured_vram_above_the_estimate_is_charged(void **state)
{
    (void)state;
    enum { A, B };
    struct sched *s = gpu_new(2, 1, 7 * GiB);
    gpu_model(s, A, "a", 1, 3 * GiB);
    gpu_model(s, B, "b", 1, 3 * GiB);
    sched_inst_t next = 1;
    sched_request(s, 1, 10, A);
    assert_int_equal(start_all(s, 1, &next, NULL), 1);
    drain(s);
    sched_instance_vram(s, 2, 1, 2 * GiB);      /* below: the estimate stands */
    assert_true(sched_device_used(s, 0) == 3 * GiB);
    sched_instance_vram(s, 2, 1, 5 * GiB);
    assert_true(sched_device_used(s, 0) == 5 * GiB);
    sched_request(s, 3, 11, B);                 /* 5 + 3 > 7, and a is busy */
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    assert_int_equal(count(x, SCHED_STOP), 0);
    sched_free(s);
}

static void a_model_whose_args_fix_its_device_goes_there_or_waits(void **state)
{
    (void)state;
    struct sched *s = gpu_new(1, 2, 4 * GiB);
    sched_model_set(s, 0, "one", &(struct sched_model_info){
        .instances_max = 2, .slots_hint = 1, .vram = 3 * GiB, .vram_fixed = true, .vram_device = 1 });
    sched_request(s, 1, 10, 0);
    sched_request(s, 1, 11, 0);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 1);  /* device 0 is free, but not its */
    assert_int_equal(nth(x, SCHED_START, 0)->device, 1);
    sched_instance_added(s, 1, 1, 0);           /* an operator's: on its fixed device */
    assert_int_equal(sched_instance_device(s, 1), 1);
    sched_free(s);
}

/* A model split over two devices: ON0 and ON1 bytes, as its args say. */
static void split_model(struct sched *s, size_t model, const char *name, uint64_t on0, uint64_t on1)
{
    uint64_t split[SCHED_MAX_DEVICES] = { on0, on1 };
    sched_model_set(s, model, name, &(struct sched_model_info){
        .instances_max = 2, .slots_hint = 1, .vram_split = split });
}

/* Requests for six models of 2 to 5 GiB and one split 3 + 2 GiB, over two
 * devices of 8 GiB, one
 * every other step on average; each served request ends the step after it
 * was dispatched; every start added and ready at once, every stop gone at
 * once: no device is ever charged past its budget. */
static void no_device_budget_is_ever_passed(void **state)
{
    (void)state;
    enum { MODELS = 7 };
    struct sched *s = gpu_new(MODELS, 2, 8 * GiB);
    for (size_t m = 0; m < MODELS - 1; m++)
        gpu_model(s, m, "m", 2, (2 + m % 4) * GiB);
    split_model(s, MODELS - 1, "split", 3 * GiB, 2 * GiB);
    uint64_t rng = 12345;
    sched_inst_t next = 1;
    sched_req_t req = 1, served[MAXGOT];
    size_t nserved = 0, starts = 0, stops = 0;
    for (int step = 0; step < 3000; step++) {
        double now = step;
        for (size_t i = 0; i < nserved; i++)
            sched_request_done(s, now, served[i]);
        nserved = 0;
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        unsigned r = (unsigned)(rng >> 33);
        if (r % 2)
            sched_request(s, now, req++, (r >> 8) % MODELS);
        for (struct got *x = drain(s); x->n; x = drain(s)) {
            sched_inst_t stop_ids[MAXGOT];
            struct sched_action st[MAXGOT];
            size_t nstop = 0, nst = 0;
            for (size_t i = 0; i < x->n; i++) {
                if (x->a[i].kind == SCHED_STOP)
                    stop_ids[nstop++] = x->a[i].inst;
                else if (x->a[i].kind == SCHED_START)
                    st[nst++] = x->a[i];
                else if (x->a[i].kind == SCHED_DISPATCH && nserved < MAXGOT)
                    served[nserved++] = x->a[i].req;
            }
            for (size_t d = 0; d < 2; d++)      /* before the stops are gone too */
                assert_true(sched_device_used(s, d) <= 8 * GiB);
            for (size_t i = 0; i < nst; i++) {
                sched_instance_added_on(s, now, next, st[i].model, st[i].device);
                sched_instance_ready(s, now, next++, 1);
                starts++;
            }
            for (size_t i = 0; i < nstop; i++) {
                sched_instance_removed(s, now, stop_ids[i]);
                stops++;
            }
        }
        for (size_t d = 0; d < 2; d++)
            assert_true(sched_device_used(s, d) <= 8 * GiB);
    }
    assert_true(starts > 100);          /* it did run models, and swap them */
    assert_true(stops > 100);
    sched_free(s);
}


static void a_split_model_is_charged_its_share_on_each_device(void **state)
{
    (void)state;
    enum { SPLIT, ONE };
    struct sched *s = gpu_new(2, 2, 8 * GiB);
    split_model(s, SPLIT, "split", 6 * GiB, 2 * GiB);
    gpu_model(s, ONE, "one", 1, 3 * GiB);
    sched_inst_t next = 1;
    sched_request(s, 1, 10, SPLIT);
    int dev[4];
    assert_int_equal(start_all(s, 1, &next, dev), 1);
    assert_int_equal(dev[0], -1);               /* its args place it */
    assert_int_equal(sched_instance_device(s, 1), SCHED_DEVICE_SPLIT);
    assert_true(sched_device_used(s, 0) == 6 * GiB);
    assert_true(sched_device_used(s, 1) == 2 * GiB);
    /* one (3 GiB) fits only on device 1; a second split does not fit. */
    sched_request(s, 2, 11, ONE);
    assert_int_equal(start_all(s, 2, &next, dev), 1);
    assert_int_equal(dev[0], 1);
    sched_request(s, 3, 12, SPLIT);             /* 10 busy: a second instance wanted */
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_START), 0);
    assert_int_equal(count(x, SCHED_STOP), 0);   /* one is busy, split#1 too */
    char err[256];
    assert_int_equal(sched_admit(s, SPLIT, 1, err, sizeof err), -1);
    sched_free(s);
}

static void a_split_model_makes_room_on_every_device_it_is_short_of(void **state)
{
    (void)state;
    enum { A, B, SPLIT };
    struct sched *s = gpu_new(3, 2, 8 * GiB);
    gpu_model(s, A, "a", 1, 5 * GiB);
    gpu_model(s, B, "b", 1, 5 * GiB);
    split_model(s, SPLIT, "split", 4 * GiB, 4 * GiB);
    sched_inst_t next = 1;
    sched_request(s, 1, 10, A);                 /* a on 0 */
    assert_int_equal(start_all(s, 1, &next, NULL), 1);
    sched_request(s, 2, 11, B);                 /* b on 1 */
    assert_int_equal(start_all(s, 2, &next, NULL), 1);
    drain(s);
    sched_request_done(s, 3, 10);
    sched_request_done(s, 4, 11);
    drain(s);
    /* The split needs 4 on each: both a and b go, then it starts. */
    sched_request(s, 5, 12, SPLIT);
    struct got *x = drain(s);
    assert_int_equal(count(x, SCHED_STOP), 2);
    assert_int_equal(count(x, SCHED_START), 0);
    sched_instance_removed(s, 6, 1);
    assert_int_equal(count(drain(s), SCHED_START), 0);  /* b still holds device 1 */
    sched_instance_removed(s, 6, 2);
    assert_int_equal(count(drain(s), SCHED_START), 1);
    sched_free(s);
}

static void a_split_share_larger_than_its_device_fails_with_503(void **state)
{
    (void)state;
    struct sched *s = gpu_new(1, 2, 8 * GiB);
    split_model(s, 0, "split", 4 * GiB, 9 * GiB);
    sched_request(s, 1, 10, 0);
    struct got *x = drain(s);
    assert_int_equal(nth(x, SCHED_FAIL, 0)->status, 503);
    assert_string_equal(nth(x, SCHED_FAIL, 0)->message,
                        "split needs 9.0 GiB of GPU memory on GPU 1; its budget is 8.0 GiB "
                        "(raise gpu_budget, or change the split with -ts or -ngl)");
    sched_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(a_request_goes_to_a_ready_instance_with_a_free_slot),
        cmocka_unit_test(the_instance_with_fewest_in_flight_serves_earliest_added_on_ties),
        cmocka_unit_test(a_full_instance_of_a_model_with_short_requests_takes_more),
        cmocka_unit_test(slower_requests_get_one_handed_off_per_slot),
        cmocka_unit_test(the_handoff_stays_within_the_instances_http_threads),
        cmocka_unit_test(a_conversation_goes_back_to_the_instance_that_holds_it),
        cmocka_unit_test(a_shared_leading_part_or_a_session_finds_the_instance),
        cmocka_unit_test(a_busy_or_stopping_instance_is_no_match),
        cmocka_unit_test(the_affinity_table_is_bounded_and_forgets_the_oldest),
        cmocka_unit_test(a_request_waits_briefly_for_its_busy_instance_and_others_pass_it),
        cmocka_unit_test(a_hold_ends_after_affinity_wait_and_the_request_goes_elsewhere),
        cmocka_unit_test(a_short_prompt_does_not_wait_while_another_instance_is_idle),
        cmocka_unit_test(a_shared_system_prompt_is_known_on_two_instances),
        cmocka_unit_test(an_instance_that_goes_leaves_no_match_even_if_its_id_comes_back),
        cmocka_unit_test(scale_down_stops_the_instance_whose_prompts_are_cold_first),
        cmocka_unit_test(an_eviction_stops_the_instance_whose_prompts_are_cold_first),
        cmocka_unit_test(eviction_cost_weighs_requests_reload_time_and_size),
        cmocka_unit_test(eviction_cost_ages_what_is_not_asked_again),
        cmocka_unit_test(a_lower_priority_is_evicted_first_whatever_its_recency),
        cmocka_unit_test(a_higher_priority_starts_first_and_age_raises_a_lower_one),
        cmocka_unit_test(a_hand_off_goes_to_the_instance_that_holds_the_prompt),
        cmocka_unit_test(no_handoff_before_a_request_is_done_or_when_requests_are_long),
        cmocka_unit_test(no_handoff_while_another_instance_is_coming),
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
        cmocka_unit_test(evictions_stop_the_least_recently_used_first_and_start_once_removed),
        cmocka_unit_test(an_instance_being_stopped_is_not_stopped_again),
        cmocka_unit_test(a_pinned_instance_is_never_evicted),
        cmocka_unit_test(eviction_keeps_each_models_instances_min),
        cmocka_unit_test(instances_in_flight_or_waited_for_are_never_evicted),
        cmocka_unit_test(recency_is_the_latest_request_not_the_end_of_a_slow_load),
        cmocka_unit_test(an_operator_stop_keeps_the_charge_until_the_instance_is_gone),
        cmocka_unit_test(a_model_that_can_never_fit_fails_its_waiters_with_503_and_the_numbers),
        cmocka_unit_test(a_second_instance_of_the_same_file_is_charged_without_the_weights),
        cmocka_unit_test(measured_memory_replaces_the_estimate),
        cmocka_unit_test(available_memory_gates_starts),
        cmocka_unit_test(an_idle_instance_stops_after_idle_timeout_and_the_wake_says_when),
        cmocka_unit_test(idle_stops_keep_instances_min_and_spare_pinned_models),
        cmocka_unit_test(idle_timeouts_follow_models_set_again_and_removed),
        cmocka_unit_test(the_oldest_waiting_model_gets_room_first_and_newer_ones_keep_off_it),
        cmocka_unit_test(a_fresh_instance_serves_its_batch_before_it_is_evicted),
        cmocka_unit_test(memory_never_exceeds_the_budget_in_a_random_replay),
        cmocka_unit_test(alternating_models_are_served_in_batches_without_thrash),
        cmocka_unit_test(a_million_requests_over_100_models_replay_quickly),
        cmocka_unit_test(a_suspect_instance_gets_nothing_until_it_answers_again),
        cmocka_unit_test(a_suspect_instance_that_crashed_is_failed_as_usual),
        cmocka_unit_test(an_operator_start_is_admitted_as_the_scheduler_counts_memory),
        cmocka_unit_test(the_instance_named_to_a_direct_caller_is_the_one_dispatch_would_pick),
        cmocka_unit_test(an_instance_is_known_from_added_to_removed),
        cmocka_unit_test(instances_spread_over_two_devices_by_the_room_left),
        cmocka_unit_test(a_full_device_stops_its_least_recently_used_idle_instance),
        cmocka_unit_test(a_cpu_only_model_starts_beside_full_gpus),
        cmocka_unit_test(a_model_larger_than_every_device_fails_with_503_and_the_numbers),
        cmocka_unit_test(the_devices_free_memory_gates_starts_as_its_budget_does),
        cmocka_unit_test(measured_vram_above_the_estimate_is_charged),
        cmocka_unit_test(a_model_whose_args_fix_its_device_goes_there_or_waits),
        cmocka_unit_test(no_device_budget_is_ever_passed),
        cmocka_unit_test(a_split_model_is_charged_its_share_on_each_device),
        cmocka_unit_test(a_split_model_makes_room_on_every_device_it_is_short_of),
        cmocka_unit_test(a_split_share_larger_than_its_device_fails_with_503),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
