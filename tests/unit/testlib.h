/* testlib — what the socket-level unit tests (test_http, test_proxy) share.
 *
 * The loop under test (an http server, a proxy) runs in the test's thread;
 * the parties that talk to it (a client, a scripted upstream) run in
 * threads of their own with blocking sockets whose every wait is bounded.
 * cmocka is not thread-safe: a party never calls it, it records its first
 * failed check (CHECK) in the fixture, and the test thread fails the test
 * once it has joined the parties.
 *
 * Each test file has its own `struct fx` holding a `struct tl_loop tl`;
 * testlib only passes the fx back (to the parties, to tl.act, to a
 * condition), never looks inside it.
 *
 * The client reads responses with llhttp in response mode: headers, body
 * (or a count of pattern_byte() mismatches for bodies too big to keep),
 * and the raw bytes of each response for framing checks. */
#ifndef LLAMA_POOL_TESTLIB_H
#define LLAMA_POOL_TESTLIB_H

#include <ev.h>
#include <llhttp.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "http.h"

/* ------------------------------------------------------------ the loop */

struct fx;                                   /* each test file's fixture */
typedef void (*tl_party_fn)(struct fx *);    /* a client or upstream script */
typedef bool (*tl_cond_fn)(struct fx *);     /* checked by the loop between turns */

#define TL_MAX_PARTIES 2

struct tl_party {
    struct tl_loop *tl;
    tl_party_fn fn;
    pthread_t th;
};

struct tl_loop {
    struct ev_loop *loop;
    struct fx *fx;
    ev_async wake_w;           /* a party finished */
    ev_async act_w;            /* a party asks the loop to run act (tl_ask) */
    void (*act)(struct fx *);
    ev_timer guard_w;
    ev_prepare cond_w;
    tl_cond_fn cond;
    bool guard_fired;
    struct tl_party party[TL_MAX_PARTIES];
    int nparties;
    atomic_int parties_done;
    pthread_mutex_t mu;
    char fail[512];            /* the first failed check of any party */
};

/* A new loop with its watchers; 0, or -1 if the loop cannot be made. */
int tl_init(struct tl_loop *tl, struct fx *fx);
/* After the test has freed what runs on the loop. */
void tl_destroy(struct tl_loop *tl);

/* Party-side check: record the first failure and leave the script. Needs a
 * `struct fx *fx` in scope with the tl_loop as fx->tl. */
#define CHECK(cond)                                              \
    do {                                                         \
        if (!(cond)) {                                           \
            tl_fail(&fx->tl, __FILE__, __LINE__, #cond);         \
            return;                                              \
        }                                                        \
    } while (0)

void tl_fail(struct tl_loop *tl, const char *file, int line, const char *what);

/* From a party: have the loop run tl->act(fx) (set before). */
void tl_ask(struct tl_loop *tl);

/* Runs the loop until COND holds (checked first, then between loop turns),
 * at most SECONDS; returns whether it holds. */
bool tl_wait(struct tl_loop *tl, tl_cond_fn cond, double seconds);

/* Starts each non-NULL party in a thread of its own, runs the loop until
 * they have all finished and COND (if any) holds, at most SECONDS, then
 * joins them. Fails the test with a party's first failed check; otherwise
 * returns false if the time ran out (the caller says what it waited for). */
bool tl_run(struct tl_loop *tl, tl_party_fn a, tl_party_fn b, tl_cond_fn cond, double seconds);

/* ------------------------------------------------------------- helpers */

double now_s(void);                          /* CLOCK_MONOTONIC */
bool wait_sem(sem_t *s, double seconds);     /* sem_timedwait, bounded */

/* The server limits both suites start from. */
struct http_limits tl_limits(void);

/* ------------------------------------------------------------- sockets */

void set_timeouts(int fd, int ms);           /* SO_RCVTIMEO and SO_SNDTIMEO */
/* A connection to 127.0.0.1:PORT with every wait bounded by TIMEOUT_MS and,
 * unless 0, a receive buffer of RCVBUF bytes; -1 if it fails. */
int tl_connect(unsigned port, int timeout_ms, int rcvbuf);
bool send_all(int fd, const void *data, size_t n);
bool send_str(int fd, const char *s);

/* -------------------------------------------------------------- client */

struct cresp {
    int status;
    int nh;
    char hn[32][64];
    char hv[32][256];
    char *body;                /* unless counting; NUL-terminated */
    size_t body_len, body_cap;
    char *raw;                 /* the response's bytes as received, unless counting */
    size_t raw_len, raw_cap;
    bool counting;             /* check the body against pattern_byte() instead of keeping it */
    size_t pattern_errors;
    bool done;                 /* message complete */
};

/* A client connection: bytes past one response carry over to the next. */
struct cconn {
    int fd;
    llhttp_t p;
    llhttp_settings_t s;
    char buf[65536];
    size_t off, len;
    struct cresp *r;
    bool head;                 /* the request was HEAD */
    bool eof;                  /* the peer closed (FIN or reset) */
};

/* The body bytes the counting mode expects: 'a' + i % 26. */
char pattern_byte(size_t i);

void cc_init(struct cconn *cc, int fd);
/* Starts reading the next response into R (what R held is freed: R starts
 * zeroed). HEAD: the response has no body. */
void cc_expect(struct cconn *cc, struct cresp *r, bool head);
/* Reads until the response is complete, STOP(r, arg) holds, or the peer
 * closes (cc->eof). False on a parse error, a receive error or timeout. */
bool cc_read_until(struct cconn *cc, bool (*stop)(struct cresp *, const void *), const void *arg);
bool cc_read_response(struct cconn *cc);
/* cc_expect, then read: true only for a complete response. */
bool cc_read(struct cconn *cc, struct cresp *r, bool head);
/* True if the peer closes (EOF or reset) with no further bytes. */
bool cc_expect_eof(struct cconn *cc);
void cresp_free(struct cresp *r);

const char *cresp_header(const struct cresp *r, const char *name);
int header_count(const struct cresp *r, const char *name);
/* The header is there and its value is VALUE (exactly; _ci: any case). */
bool header_is(const struct cresp *r, const char *name, const char *value);
bool header_is_ci(const struct cresp *r, const char *name, const char *value);
/* Stop conditions for cc_read_until. */
bool body_has(struct cresp *r, const void *needle);
bool got_status(struct cresp *r, const void *arg);

#endif
