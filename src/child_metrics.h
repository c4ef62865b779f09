/* child_metrics — the children's own /metrics, added to the pool's
 * (metrics_children = yes: children run with --metrics).
 *
 * Two parts:
 *
 * - child_metrics_scrape(): GET /metrics from each child it is given, all
 *   at once, with the child's API key, through health's curl multi on the
 *   daemon's loop (nothing blocks). One deadline for all: a child that has
 *   not answered by then, that fails, or that answers anything but 200, is
 *   skipped with the reason, and the others are handed on. The scrape goes
 *   straight to the child's port: the scheduler never hears of it, so it is
 *   not a use of the instance (no last_used, no idle timer).
 *
 * - child_metrics_merge(), pure: the children's Prometheus text as one
 *   valid exposition. Only llamacpp:* families are taken (the pool's own
 *   names are llama_pool_*, so nothing a child sends can clash with them).
 *   Every sample gets model="…" and instance="…" in its label set (a
 *   child's own "model" or "instance" label becomes exported_model or
 *   exported_instance, as Prometheus does with honor_labels off), and
 *   samples are grouped by family, so that each family's HELP and TYPE
 *   appear once with every child's samples under them: the text format
 *   wants a family's samples together. Lines that are not valid Prometheus
 *   text (or not UTF-8) are skipped, one at a time; a child whose TYPE for
 *   a family differs from the first child's has its samples of that family
 *   skipped. A skipped child becomes a comment line saying why. */
#ifndef LLAMA_POOL_CHILD_METRICS_H
#define LLAMA_POOL_CHILD_METRICS_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#include "util.h"

/* How long a scrape waits for the children, all together: Prometheus's
 * own scrape_timeout is 10 s by default, and the pool's part must not
 * take the most of it because one child is stuck. */
#define CHILD_METRICS_TIMEOUT 1.0   /* seconds */

/* One child's answer. */
struct child_metrics_text {
    const char *model;        /* label values, as they are (escaped by the merge) */
    const char *instance;
    const char *text;         /* its /metrics body; NULL: skipped */
    size_t len;
    const char *err;          /* why it was skipped (text NULL), else NULL */
};

/* Appends to OUT the llamacpp:* families of the N children (in the order
 * each family first appears), relabelled and grouped, after a comment line
 * for each skipped child. False when out of memory (OUT then holds part of
 * it). */
bool child_metrics_merge(const struct child_metrics_text *c, size_t n, struct buf *out);

/* ---- scraping ---- */

struct health;
struct child_metrics_scrape;

/* Whom to scrape. Everything is copied: the instance may stop, and a
 * reload free its model's name, while the scrape runs. */
struct child_metrics_target {
    const char *model;
    const char *instance;
    unsigned port;            /* on 127.0.0.1 */
    const char *key;          /* its API key, sent as Bearer; NULL: none */
};

/* RESULTS holds one entry per target, in the order given. */
typedef void (*child_metrics_done)(void *arg, const struct child_metrics_text *results, size_t n);

/* Scrape the N targets within TIMEOUT seconds, then call DONE once, from
 * the loop (never from inside this call, even with N = 0); the scrape is
 * freed after DONE returns. NULL when out of memory. */
struct child_metrics_scrape *child_metrics_scrape(struct ev_loop *loop, struct health *h,
                                                  const struct child_metrics_target *t, size_t n,
                                                  double timeout, child_metrics_done done, void *arg);
/* Stop it now (the client left): DONE is not called. */
void child_metrics_cancel(struct child_metrics_scrape *s);

#endif
