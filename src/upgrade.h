/* upgrade — replace the running daemon with a new image of its binary,
 * same pid, without stopping a child (`llama-pool upgrade`, SIGUSR2).
 *
 * The old image:
 *   1. check: runs the binary at EXE (the path it was started from, so a
 *      binary installed over it since) as `EXE serve ARGS` with the
 *      handover so far on its stdin and $HANDOVER_CHECK_ENV set: it loads
 *      pool.conf, reads the handover and exits 0, or says what is wrong.
 *      Anything else (a crash, a binary that does not run, UPGRADE_CHECK_S
 *      passing) ends the upgrade: the old image runs on, and the command
 *      gets the new binary's words.
 *   2. drain: accepts nothing more (new connections wait in the listen
 *      backlog), ends the endless streams (events, logs -f), and lets the
 *      requests under way end: queued ones are served as usual. Connections
 *      between two requests stop being read (their next request waits in
 *      the kernel). When the timeout passes first, the upgrade is given up
 *      and everything goes on as before: no request is lost either way.
 *   3. exec: writes the handover (handover.h) to a memfd, lets exactly the
 *      sockets, children's pipes and that memfd survive the exec, and
 *      execs EXE with the daemon's own argv. An exec that fails is
 *      reported like a failed check.
 * The new image (upgrade_resume) serves on the inherited sockets, adopts
 * each child whose pid, start time and argv still match (see handover.h),
 * stops the others, takes over the idle connections, and answers the
 * waiting `llama-pool upgrade` itself. */
#ifndef LLAMA_POOL_UPGRADE_H
#define LLAMA_POOL_UPGRADE_H

#include <ev.h>
#include <stdbool.h>

#include "handover.h"
#include "http.h"

struct pool;
struct router;

#define UPGRADE_CHECK_S 30.0          /* the new binary's check, at most */
#define UPGRADE_DRAIN_MIN_S 60.0      /* drain wait by default: drain_timeout, at least this */

/* What the daemon (main.c) lends the upgrade. */
struct upgrade_host {
    struct ev_loop *loop;
    struct pool *pool;
    struct router *router;
    struct http_server *control;
    struct http_server *public;       /* NULL: no listen */
    const char *exe;                  /* the binary to run */
    char *const *argv;                /* the daemon's own argv */
};

struct upgrade;

struct upgrade *upgrade_new(const struct upgrade_host *host);
void upgrade_free(struct upgrade *u);

/* Begin an upgrade. REQ (NULL for SIGUSR2) gets the answer: from the new
 * image when it worked, else an error from this one. TIMEOUT: seconds the
 * requests under way may take to end (<= 0: the default). */
void upgrade_begin(struct upgrade *u, struct http_request *req, double timeout);
/* A shutdown began: give the upgrade up. */
void upgrade_cancel(struct upgrade *u, const char *why);
bool upgrade_running(const struct upgrade *u);

/* In the new image, before pool_preload: take over what H names (the
 * servers are already on its sockets). Frees nothing of H. */
void upgrade_resume(const struct upgrade_host *host, struct handover *h);
/* The new image cannot serve: end every child H names (no orphans) and
 * answer the waiting command with WHY. */
void upgrade_resume_failed(struct handover *h, const char *why);
/* The handover cannot be read: SIGKILL every child of this process and
 * its group (found in /proc), so that none is left without a supervisor. */
void upgrade_kill_children(void);
/* `serve` with $HANDOVER_CHECK_ENV: read the handover on FD, say what the
 * new image would take over. 0 if it can, else -1 (the reason printed). */
int upgrade_check(int fd);

#endif
