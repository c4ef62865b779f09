/* fake-llama-server — a stand-in for llama.cpp's llama-server in llama-pool's tests.
 *
 * It behaves like the real server wherever a supervisor or an HTTP client can
 * see it (see /work/shared/llama-server.md): it binds its port before
 * "loading", answers 503 "Loading model" on every path while loading, logs
 * the same lines on stderr, serves /health /v1/models /props /slots /metrics,
 * and generates deterministic completions (token i is " tok<i>") on -np slots,
 * queueing requests when all slots are busy and cancelling a generation when
 * its client goes away.
 *
 * Build: cc -std=gnu11 -Wall -Wextra -O2 -pthread tests/fake-llama-server.c -o fake-llama-server
 *
 * Flags (as llama-server; anything else is ignored, with its value if the next
 * word does not start with '-'):
 *   -m, --model PATH     required; must be readable and start with "GGUF"
 *   --host H             127.0.0.1; a name ending in ".sock" binds a UNIX socket
 *   --port P             8080; 0 picks a free port, shown in the "listening on" line
 *   -c, --ctx-size N     context size; 0 (default) = n_ctx_train (FAKE_N_CTX_TRAIN)
 *   -np, --parallel N    slots; -1 (default) = 4 slots sharing the whole context,
 *                        N > 0 = N slots of n_ctx / N each
 *   -a, --alias A[,B]    the API model id is the first alias, else -m as given
 *   --api-key K[,K2]     Bearer K or X-Api-Key K; /health, /models stay public.
 *                        Keys also come from LLAMA_API_KEY (read first, as
 *                        llama.cpp reads env before argv): all of them count
 *   --metrics            enable /metrics (else 501); LLAMA_ARG_ENDPOINT_METRICS
 *                        = on|enabled|true|1 in the environment does too
 *   --slots, --no-slots  /slots on (default) or 501
 *   --no-mmap, --load-mode none|dio   read the model into anonymous memory
 *                        instead of mapping it (default: mmap, shared file pages)
 *   -to, --timeout N     socket read/write timeout in seconds (3600)
 *   -v, --verbose        also log debug lines (every request, queueing)
 *   -ngl, --gpu-layers, --n-gpu-layers N|all|auto   layers "offloaded" (auto,
 *                        the default as in CUDA builds, = all): only counts
 *                        when NVML_STANDIN_DIR is set (below)
 *   -dev, --device CUDAk[,...]|none   the device offloaded to (the first one);
 *                        CUDA_VISIBLE_DEVICES maps k to NVML's index
 *
 * Environment knobs (all optional):
 *   FAKE_LOAD_MS=100         time spent "loading" (503 on every path meanwhile)
 *   FAKE_BIND_DELAY_MS=0     wait this long before binding the port (a test
 *                            can take the port first: the "port taken" race)
 *   FAKE_TOKEN_MS=0          delay before each generated token
 *   FAKE_PROMPT_MS_PER_TOKEN=0   cost of each prompt token not in the prompt
 *                            cache (a fraction is fine: 0.5), spent before the
 *                            first token; the client is watched meanwhile
 *   FAKE_PROMPT_CACHE=16     prompts remembered instance-wide (llama-server's
 *                            slot KV plus its -cram host cache; -cram itself
 *                            is ignored), least recently used dropped first;
 *                            0 = none, and 0 is the default with
 *                            FAKE_DETERMINISTIC. A prompt's longest common
 *                            prefix with any of them, /4 bytes a token, at
 *                            most all but its last token, is timings.cache_n
 *                            and costs nothing; prompt_n and prompt_ms count
 *                            the rest; usage.prompt_tokens is the whole prompt
 *   FAKE_NEWLINE_EVERY=0     every N-th token ends with a newline (" tok<i>\n");
 *                            0 = none. t_max_predict_ms stops a generation only
 *                            at such a token, as llama-server does
 *   FAKE_TOKENS=8            tokens generated when the request sets no limit
 *                            (finish_reason "stop"); max_tokens / n_predict /
 *                            max_completion_tokens set the count exactly
 *                            (finish_reason "length")
 *   FAKE_MEMORY=64M          anonymous memory to allocate and touch after the
 *                            load (K/M/G/T, powers of 1024): shows as Pss_Anon
 *   FAKE_MEMORY_PER_REQUEST=64M  more anonymous memory allocated, touched and
 *                            kept by each completion once it has a slot: a
 *                            child that grows until memory.max stops it
 *   FAKE_CRASH_AT_LOAD=1     fail the load after FAKE_LOAD_MS: exit 1 with
 *                            "exiting due to model loading error"
 *   FAKE_CRASH_AFTER=N       the (N+1)-th completion to get a slot dies half way
 *                            through its generation (after floor(n/2) tokens;
 *                            a stream has sent its headers and those tokens)
 *                            by SIGSEGV with no core dump
 *   FAKE_HEALTH_HANG=1       after ready, /health reads the request and never answers
 *   FAKE_HEALTH_HANG_AFTER=N answer N /health requests after ready, then hang
 *   FAKE_METRICS_HANG=1      /metrics reads the request and never answers
 *   FAKE_EXIT_AFTER_MS=N     exit 0 on its own N ms after ready
 *   FAKE_DETERMINISTIC=1     created = 0, ids "chatcmpl-fake", timings computed
 *                            from FAKE_TOKEN_MS and FAKE_PROMPT_MS_PER_TOKEN,
 *                            no prompt cache: byte-identical responses
 *   FAKE_IGNORE_SIGTERM=1    ignore SIGTERM entirely (SIGINT still works)
 *   FAKE_KEEPALIVE_MS=5000   idle keep-alive timeout (cpp-httplib's 5 s)
 *   FAKE_N_CTX_TRAIN=4096    the model's training context
 *   FAKE_VERBOSE=1           same as -v
 *   NVML_STANDIN_DIR=DIR     "use VRAM" for tests/nvml-standin.c: when layers are
 *                            offloaded, write DIR/PID ("DEVICE BYTES") at load,
 *                            print CUDA buffer lines, remove the file at exit
 *   FAKE_VRAM_MB=N           the VRAM written there (default 700 MiB + the
 *                            offloaded share of the file and of the KV cache)
 *   FAKE_N_LAYERS=16         the model's layer count, for -ngl N
 *   FAKE_LOG_AUTH=1          log the Authorization and X-Api-Key headers of
 *                            every request (to check what a proxy forwards)
 *
 * Signals: SIGTERM/SIGINT while loading kill at once (default action). After
 * ready the first stops accepting connections and generating, as
 * llama-server's stops its task loop: completions in flight (queued or
 * generating) get no further byte, and it exits 0 once their clients have
 * gone; a second exits 1 at once.
 *
 * Only libc and pthreads; Linux (POLLRDHUP, accept4, prctl). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BUILD_INFO             "b9749-fake"
#define KEEPALIVE_MAX_REQUESTS 100         /* cpp-httplib: requests per connection */
#define HEADER_LINE_MAX        8192
#define HEADER_COUNT_MAX       100
#define BODY_MAX               (64LL << 20)
#define INBUF_SIZE             65536
#define CANCEL_POLL_MS         50          /* how often a generation looks at its client */
#define JSON_DEPTH_MAX         256

/* ---------------------------------------------------------------- config */

struct config {
    /* command line */
    const char *model;
    const char *host;
    const char *aliases;      /* "a,b" or NULL */
    char **api_keys;          /* LLAMA_API_KEY's, then each --api-key's */
    size_t n_api_keys;        /* 0: no key needed */
    long port, n_ctx, n_parallel, timeout_s;
    long n_gpu_layers;        /* -1: auto/all (the default) */
    const char *device;       /* --device: "CUDA1", "CUDA0,CUDA1", "none"; NULL */
    bool port_given, metrics, slots, use_mmap, verbose;
    /* environment */
    long load_ms, token_ms, tokens, crash_after, health_hang_after;
    long newline_every;       /* FAKE_NEWLINE_EVERY: 0 = no token has a newline */
    long bind_delay_ms;
    long exit_after_ms, keepalive_ms, n_ctx_train;
    long prompt_cache;        /* FAKE_PROMPT_CACHE: prompts remembered, 0 = none */
    double prompt_ms_per_token;
    const char *vram_dir;     /* NVML_STANDIN_DIR: NULL = no GPU */
    long vram_mb, n_layers;   /* FAKE_VRAM_MB (-1: computed), FAKE_N_LAYERS */
    unsigned long long memory;
    unsigned long long memory_per_request;
    bool crash_at_load, deterministic, ignore_sigterm, log_auth, metrics_hang;
    /* derived */
    int n_slots;
    long slot_n_ctx;
    char model_id[1024];
};

static struct config g_cfg = {
    .host = "127.0.0.1", .port = 8080, .n_parallel = -1, .timeout_s = 3600, .n_gpu_layers = -1,
    .slots = true, .use_mmap = true,
};

static int64_t g_t0_us;                   /* process start, for log timestamps */
static long long g_start_unix;
static int g_listen_fd = -1;
static int g_sigpipe[2] = { -1, -1 };     /* signal handler -> main thread */
static atomic_bool g_ready;               /* model loaded: serve the API */
static atomic_bool g_stopping;            /* first signal: no new work */
static atomic_int g_signals;
static atomic_int g_next_task;
static atomic_long g_started;             /* completions that got a slot */
static atomic_long g_health_answered;

static struct {
    atomic_ullong prompt_tokens, tokens_predicted, n_decode;
    atomic_ullong prompt_us, predicted_us;
    atomic_ullong n_tokens_max;           /* the most tokens a slot has held */
} g_stats;

/* ---------------------------------------------------------------- time, log */

static int64_t now_us(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
        abort();    /* cannot fail for CLOCK_MONOTONIC */
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t now_ms(void) { return now_us() / 1000; }

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;     /* nowhere left to report it */
        }
        p += w;
        n -= (size_t)w;
    }
}

/* One line on stderr, in llama.cpp's format: "0.00.177.680 I srv  ...".
 * level is I, W, E or D (D only with -v). One write(2): lines never mix. */
__attribute__((format(printf, 2, 3)))
static void log_msg(char level, const char *fmt, ...)
{
    if (level == 'D' && !g_cfg.verbose)
        return;
    char line[2048];
    int64_t us = now_us() - g_t0_us;
    int n = snprintf(line, sizeof line, "%d.%02d.%03d.%03d %c ",
                     (int)(us / 60000000), (int)(us / 1000000 % 60),
                     (int)(us / 1000 % 1000), (int)(us % 1000), level);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    if ((size_t)(n + m) > sizeof line - 2)
        m = (int)sizeof line - 2 - n;
    line[n + m] = '\n';
    write_all(STDERR_FILENO, line, (size_t)(n + m + 1));
}

#define SRV_LOG(lvl, fn, fmt, ...) \
    log_msg(lvl, "srv  %12.12s: " fmt, fn, ##__VA_ARGS__)
#define SLT_LOG(lvl, fn, id, task, fmt, ...) \
    log_msg(lvl, "slot %12.12s: id %2d | task %d | " fmt, fn, id, task, ##__VA_ARGS__)

__attribute__((format(printf, 1, 2), noreturn))
static void fatal(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_msg('E', "%s", msg);
    exit(1);
}

static void mu_lock(pthread_mutex_t *m)
{
    int e = pthread_mutex_lock(m);
    if (e)
        fatal("pthread_mutex_lock: %s", strerror(e));
}

static void mu_unlock(pthread_mutex_t *m)
{
    int e = pthread_mutex_unlock(m);
    if (e)
        fatal("pthread_mutex_unlock: %s", strerror(e));
}

/* ---------------------------------------------------------------- strings */

struct sbuf {
    char *p;
    size_t len, cap;
};

static void sb_reserve(struct sbuf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        fatal("out of memory (%zu bytes)", cap);
    b->p = p;
    b->cap = cap;
}

static void sb_add(struct sbuf *b, const void *s, size_t n)
{
    sb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(struct sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3)))
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    va_list ap;
    sb_reserve(b, 128);
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0)
        fatal("vsnprintf: bad format");
    if ((size_t)n >= b->cap - b->len) {     /* did not fit: grow and format again */
        sb_reserve(b, (size_t)n);
        va_start(ap, fmt);
        vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
}

/* Appends s as a quoted JSON string. */
static void sb_json_str(struct sbuf *b, const char *s, size_t n)
{
    sb_add(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        switch (ch) {
        case '"':  sb_puts(b, "\\\""); break;
        case '\\': sb_puts(b, "\\\\"); break;
        case '\n': sb_puts(b, "\\n"); break;
        case '\r': sb_puts(b, "\\r"); break;
        case '\t': sb_puts(b, "\\t"); break;
        default:
            if (ch < 0x20)
                sb_printf(b, "\\u%04x", ch);
            else
                sb_add(b, &s[i], 1);
        }
    }
    sb_add(b, "\"", 1);
}

static void sb_free(struct sbuf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static bool streq(const char *a, const char *b) { return strcmp(a, b) == 0; }

/* ---------------------------------------------------------------- JSON scanner
 * Validates a request body and picks out a few top-level members; values are
 * kept as spans of the original text. */

struct jspan {
    const char *p;
    size_t n;
    char type;      /* 0 absent, 'o' 'a' 's' 'n' 't' 'f', 'z' null */
};

struct jfield {
    const char *name;
    struct jspan v;
};

struct jparser {
    const char *start, *p, *end;
    int depth;
    const char *why;
};

static bool jp_value(struct jparser *j, struct jspan *out, struct jfield *f, size_t nf);

static bool jp_fail(struct jparser *j, const char *why)
{
    if (!j->why)
        j->why = why;
    return false;
}

static void jp_ws(struct jparser *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static bool jp_string(struct jparser *j)
{
    j->p++;     /* the opening quote */
    while (j->p < j->end) {
        unsigned char ch = (unsigned char)*j->p++;
        if (ch == '"')
            return true;
        if (ch < 0x20)
            return jp_fail(j, "invalid string: control character must be escaped");
        if (ch != '\\')
            continue;
        if (j->p >= j->end)
            break;
        ch = (unsigned char)*j->p++;
        if (ch == 'u') {
            for (int k = 0; k < 4; k++, j->p++)
                if (j->p >= j->end || !isxdigit((unsigned char)*j->p))
                    return jp_fail(j, "invalid string: '\\u' must be followed by 4 hex digits");
        } else if (ch == 0 || !strchr("\"\\/bfnrt", ch)) {
            return jp_fail(j, "invalid string: forbidden character after backslash");
        }
    }
    return jp_fail(j, "invalid string: missing closing quote");
}

static bool jp_digits(struct jparser *j)
{
    const char *s = j->p;
    while (j->p < j->end && isdigit((unsigned char)*j->p))
        j->p++;
    return j->p > s;
}

static bool jp_number(struct jparser *j)
{
    if (*j->p == '-')
        j->p++;
    if (j->p < j->end && *j->p == '0')
        j->p++;
    else if (!jp_digits(j))
        return jp_fail(j, "invalid number");
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!jp_digits(j))
            return jp_fail(j, "invalid number: expected digit after '.'");
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (!jp_digits(j))
            return jp_fail(j, "invalid number: expected digit after exponent");
    }
    return true;
}

static bool jp_literal(struct jparser *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return jp_fail(j, "invalid literal");
    j->p += n;
    return true;
}

static bool jp_array(struct jparser *j)
{
    j->p++;
    jp_ws(j);
    if (j->p < j->end && *j->p == ']') {
        j->p++;
        return true;
    }
    for (;;) {
        struct jspan v;
        if (!jp_value(j, &v, NULL, 0))
            return false;
        jp_ws(j);
        if (j->p >= j->end)
            return jp_fail(j, "unexpected end of input; expected ',' or ']'");
        char ch = *j->p++;
        if (ch == ']')
            return true;
        if (ch != ',')
            return jp_fail(j, "unexpected character; expected ',' or ']'");
    }
}

/* f/nf: members to capture (top level only). */
static bool jp_object(struct jparser *j, struct jfield *f, size_t nf)
{
    j->p++;
    jp_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
        return true;
    }
    for (;;) {
        jp_ws(j);
        if (j->p >= j->end || *j->p != '"')
            return jp_fail(j, "expected string literal as object key");
        const char *key = j->p + 1;
        if (!jp_string(j))
            return false;
        size_t key_len = (size_t)(j->p - 1 - key);
        jp_ws(j);
        if (j->p >= j->end || *j->p != ':')
            return jp_fail(j, "expected ':' after object key");
        j->p++;
        struct jspan v;
        if (!jp_value(j, &v, NULL, 0))
            return false;
        for (size_t i = 0; i < nf; i++)
            if (strlen(f[i].name) == key_len && memcmp(f[i].name, key, key_len) == 0)
                f[i].v = v;     /* the last duplicate wins, as in nlohmann::json */
        jp_ws(j);
        if (j->p >= j->end)
            return jp_fail(j, "unexpected end of input; expected ',' or '}'");
        char ch = *j->p++;
        if (ch == '}')
            return true;
        if (ch != ',')
            return jp_fail(j, "unexpected character; expected ',' or '}'");
    }
}

static bool jp_value(struct jparser *j, struct jspan *out, struct jfield *f, size_t nf)
{
    jp_ws(j);
    if (j->p >= j->end)
        return jp_fail(j, "unexpected end of input; expected '[', '{', or a literal");
    if (j->depth >= JSON_DEPTH_MAX)
        return jp_fail(j, "nesting too deep");
    const char *s = j->p;
    char type;
    bool ok;
    j->depth++;
    switch (*s) {
    case '{': type = 'o'; ok = jp_object(j, f, nf); break;
    case '[': type = 'a'; ok = jp_array(j); break;
    case '"': type = 's'; ok = jp_string(j); break;
    case 't': type = 't'; ok = jp_literal(j, "true"); break;
    case 'f': type = 'f'; ok = jp_literal(j, "false"); break;
    case 'n': type = 'z'; ok = jp_literal(j, "null"); break;
    default:
        type = 'n';
        ok = (*s == '-' || isdigit((unsigned char)*s)) ? jp_number(j)
                                                        : jp_fail(j, "invalid literal");
    }
    j->depth--;
    if (!ok)
        return false;
    out->p = s;
    out->n = (size_t)(j->p - s);
    out->type = type;
    return true;
}

/* Parses text as a JSON object, capturing the named top-level members.
 * On error writes a message like nlohmann::json's into err. */
static bool json_parse_object(const char *text, size_t n, struct jfield *f, size_t nf,
                              char *err, size_t errlen)
{
    struct jparser j = { .start = text, .p = text, .end = text + n };
    struct jspan top;
    for (size_t i = 0; i < nf; i++)
        f[i].v.type = 0;
    bool ok = jp_value(&j, &top, f, nf);
    if (ok) {
        jp_ws(&j);
        if (j.p != j.end)
            ok = jp_fail(&j, "syntax error; expected end of input");
    }
    if (!ok) {
        int line = 1, col = 1;
        for (const char *q = j.start; q < j.p && q < j.end; q++, col++)
            if (*q == '\n') {
                line++;
                col = 0;
            }
        snprintf(err, errlen, "[json.exception.parse_error.101] parse error at line %d, "
                 "column %d: syntax error while parsing value - %s", line, col, j.why);
        return false;
    }
    if (top.type != 'o') {
        snprintf(err, errlen, "request body must be a JSON object");
        return false;
    }
    return true;
}

/* A number span as a long (fractions truncated, like json::get<int>). */
static long jspan_long(const struct jspan *v)
{
    char buf[64];
    size_t n = v->n < sizeof buf - 1 ? v->n : sizeof buf - 1;
    memcpy(buf, v->p, n);
    buf[n] = '\0';
    double d = strtod(buf, NULL);
    if (d >= (double)LONG_MAX)
        return LONG_MAX;
    if (d <= (double)LONG_MIN)
        return LONG_MIN;
    return (long)d;
}

/* ---------------------------------------------------------------- sockets */

/* poll() one descriptor; EINTR restarts with the time left.
 * Returns >0 ready, 0 timeout, -1 error. */
static int poll_one(int fd, short events, int timeout_ms, short *revents)
{
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        struct pollfd p = { .fd = fd, .events = events };
        int r = poll(&p, 1, timeout_ms);
        if (r >= 0) {
            if (revents)
                *revents = p.revents;
            return r;
        }
        if (errno != EINTR)
            return -1;
        if (timeout_ms > 0) {
            int64_t left = deadline - now_ms();
            timeout_ms = left > 0 ? (int)left : 0;
        }
    }
}

/* True if the peer has closed or reset the connection (waiting up to wait_ms
 * for it). Pipelined request bytes do not count: only hang-ups do. */
static bool client_gone(int fd, int wait_ms)
{
    short rev = 0;
    int r = poll_one(fd, POLLRDHUP, wait_ms, &rev);
    if (r < 0)
        return true;
    return r > 0 && (rev & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

/* The server is stopping: a task gets nothing more, and its HTTP thread
 * holds on until the client leaves (as llama-server's do). */
static void hang_until_gone(int fd)
{
    while (!client_gone(fd, CANCEL_POLL_MS))
        ;
}

/* Sleeps us microseconds, watching the client. True if it went away. poll()
 * counts in milliseconds: a last fraction of one is slept plainly. */
static bool sleep_us_or_gone(int fd, int64_t us)
{
    if (us <= 0)
        return client_gone(fd, 0);
    int64_t deadline = now_us() + us;
    for (;;) {
        int64_t left = deadline - now_us();
        if (left <= 0)
            return false;
        if (left < 1000) {
            struct timespec ts = { 0, (long)left * 1000 };
            while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
            continue;
        }
        int64_t ms = left / 1000;
        if (client_gone(fd, ms > CANCEL_POLL_MS ? CANCEL_POLL_MS : (int)ms))
            return true;
    }
}

static bool send_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static int listen_socket_ready(int fd, char *err, size_t errlen)
{
    if (listen(fd, SOMAXCONN) < 0) {
        snprintf(err, errlen, "listen: %s", strerror(errno));
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "fcntl(O_NONBLOCK): %s", strerror(errno));
        return -1;
    }
    return 0;
}

static int listen_unix(const char *path, char *err, size_t errlen)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path) {
        snprintf(err, errlen, "%s: path too long for a UNIX socket", path);
        return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        snprintf(err, errlen, "bind %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (listen_socket_ready(fd, err, errlen) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* One TCP listening socket on ai, or -1 with err set. */
static int listen_addr(const struct addrinfo *ai, char *err, size_t errlen)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;    /* like cpp-httplib */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
        snprintf(err, errlen, "setsockopt(SO_REUSEADDR): %s", strerror(errno));
    } else if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        snprintf(err, errlen, "bind: %s", strerror(errno));
    } else if (listen_socket_ready(fd, err, errlen) == 0) {
        return fd;
    }
    close(fd);
    return -1;
}

/* Binds host:port (port 0: any free port, stored back into *port). */
static int listen_tcp(const char *host, long *port, char *err, size_t errlen)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
    struct addrinfo *res;
    char service[16];
    snprintf(service, sizeof service, "%ld", *port);
    int e = getaddrinfo(host, service, &hints, &res);
    if (e) {
        snprintf(err, errlen, "getaddrinfo %s: %s", host, gai_strerror(e));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next)
        fd = listen_addr(ai, err, errlen);
    freeaddrinfo(res);
    if (fd < 0)
        return -1;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0) {
        snprintf(err, errlen, "getsockname: %s", strerror(errno));
        close(fd);
        return -1;
    }
    *port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                           : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

static bool host_is_unix(const char *host)
{
    size_t n = strlen(host);
    return n > 5 && streq(host + n - 5, ".sock");
}

/* ---------------------------------------------------------------- slots
 * n slots; a completion takes an idle one or waits in an unbounded FIFO.
 * A finishing task hands its slot straight to the head of the queue. */

struct waiter {
    struct waiter *next;
    int task;
    int slot;       /* -1 until handed one */
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t handoff;     /* a queued waiter was given a slot */
    pthread_cond_t idle;        /* n_active dropped to 0 */
    int n;
    int *task;                  /* task per slot, -1 idle */
    struct waiter *head, *tail;
    int n_busy, n_waiting;
    int n_active;               /* completions in flight, queued or generating */
} g_pool = { .mu = PTHREAD_MUTEX_INITIALIZER, .idle = PTHREAD_COND_INITIALIZER };

static void pool_init(int n)
{
    pthread_condattr_t attr;
    int e = pthread_condattr_init(&attr);
    if (!e)
        e = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (!e)
        e = pthread_cond_init(&g_pool.handoff, &attr);
    if (e)
        fatal("pthread_cond_init: %s", strerror(e));
    pthread_condattr_destroy(&attr);
    g_pool.n = n;
    g_pool.task = malloc(sizeof *g_pool.task * (size_t)n);
    if (!g_pool.task)
        fatal("out of memory");
    for (int i = 0; i < n; i++)
        g_pool.task[i] = -1;
}

/* Called locked. */
static int pool_take_idle(int task)
{
    for (int i = 0; i < g_pool.n; i++)
        if (g_pool.task[i] < 0) {
            g_pool.task[i] = task;
            g_pool.n_busy++;
            return i;
        }
    return -1;
}

/* Called locked. */
static void pool_unqueue(struct waiter *w)
{
    struct waiter **pp = &g_pool.head, *prev = NULL;
    while (*pp && *pp != w) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return;
    *pp = w->next;
    if (g_pool.tail == w)
        g_pool.tail = prev;
    g_pool.n_waiting--;
}

static void cond_wait_ms(pthread_cond_t *cv, pthread_mutex_t *mu, int ms)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
        abort();
    ts.tv_nsec += (long)ms * 1000000;
    ts.tv_sec += ts.tv_nsec / 1000000000;
    ts.tv_nsec %= 1000000000;
    int e = pthread_cond_timedwait(cv, mu, &ts);
    if (e && e != ETIMEDOUT)
        fatal("pthread_cond_timedwait: %s", strerror(e));
}

/* Returns the slot given to task, waiting in line if none is idle;
 * -1 if the client (fd) went away while waiting. */
static int slots_acquire(int fd, int task)
{
    mu_lock(&g_pool.mu);
    int id = g_pool.head ? -1 : pool_take_idle(task);
    if (id >= 0) {
        mu_unlock(&g_pool.mu);
        return id;
    }
    struct waiter w = { .task = task, .slot = -1 };
    if (g_pool.tail)
        g_pool.tail->next = &w;
    else
        g_pool.head = &w;
    g_pool.tail = &w;
    g_pool.n_waiting++;
    SRV_LOG('D', "update_slots", "all slots are busy, task %d deferred (%d waiting)",
            task, g_pool.n_waiting);
    while (w.slot < 0) {
        cond_wait_ms(&g_pool.handoff, &g_pool.mu, CANCEL_POLL_MS);
        if (w.slot >= 0)
            break;
        if (atomic_load(&g_stopping)) {
            pool_unqueue(&w);
            mu_unlock(&g_pool.mu);
            hang_until_gone(fd);
            return -1;
        }
        mu_unlock(&g_pool.mu);
        bool gone = client_gone(fd, 0);
        mu_lock(&g_pool.mu);
        if (gone && w.slot < 0) {
            pool_unqueue(&w);
            mu_unlock(&g_pool.mu);
            return -1;
        }
    }
    mu_unlock(&g_pool.mu);
    return w.slot;
}

static void slots_release(int id)
{
    mu_lock(&g_pool.mu);
    struct waiter *w = g_pool.head;
    if (w) {
        g_pool.head = w->next;
        if (!g_pool.head)
            g_pool.tail = NULL;
        g_pool.n_waiting--;
        g_pool.task[id] = w->task;
        w->slot = id;
        int e = pthread_cond_broadcast(&g_pool.handoff);
        if (e)
            fatal("pthread_cond_broadcast: %s", strerror(e));
    } else {
        g_pool.task[id] = -1;
        g_pool.n_busy--;
    }
    mu_unlock(&g_pool.mu);
}

/* Copies the task of every slot (g_pool.n entries) and the counters. */
static void slots_snapshot(int *tasks, int *busy, int *waiting)
{
    mu_lock(&g_pool.mu);
    memcpy(tasks, g_pool.task, sizeof *tasks * (size_t)g_pool.n);
    *busy = g_pool.n_busy;
    *waiting = g_pool.n_waiting;
    mu_unlock(&g_pool.mu);
}

static void activity_begin(void)
{
    mu_lock(&g_pool.mu);
    g_pool.n_active++;
    mu_unlock(&g_pool.mu);
}

static void activity_end(void)
{
    mu_lock(&g_pool.mu);
    if (--g_pool.n_active == 0) {
        int e = pthread_cond_broadcast(&g_pool.idle);
        if (e)
            fatal("pthread_cond_broadcast: %s", strerror(e));
    }
    mu_unlock(&g_pool.mu);
}

static void wait_until_idle(void)
{
    mu_lock(&g_pool.mu);
    while (g_pool.n_active > 0) {
        int e = pthread_cond_wait(&g_pool.idle, &g_pool.mu);
        if (e)
            fatal("pthread_cond_wait: %s", strerror(e));
    }
    mu_unlock(&g_pool.mu);
}

/* ---------------------------------------------------------------- HTTP input */

struct conn {
    int fd;
    char peer[INET6_ADDRSTRLEN];
    char *in;               /* INBUF_SIZE bytes of buffered input */
    size_t in_len, in_off;
    int n_served;
};

struct request {
    char method[16];
    char path[4096];
    char query[4096];
    int minor;              /* HTTP/1.<minor> */
    bool close;             /* close the connection after the response */
    bool head;              /* HEAD: headers only */
    long long content_length;   /* -1: none */
    bool chunked, expect_continue, conn_close, conn_keep_alive;
    char authorization[1024], x_api_key[1024], origin[1024];
    struct sbuf body;
    int status;             /* sent, for the request log; 0: none */
};

enum { RD_OK = 0, RD_EOF = -1, RD_ERR = -2, RD_BAD = -3, RD_TOO_BIG = -4 };

static int read_timeout_ms(void)
{
    return g_cfg.timeout_s > INT_MAX / 1000 ? INT_MAX : (int)(g_cfg.timeout_s * 1000);
}

/* Reads more input into the buffer. */
static int conn_fill(struct conn *c, int timeout_ms)
{
    if (c->in_off > 0) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    if (c->in_len == INBUF_SIZE)
        return RD_BAD;
    int r = poll_one(c->fd, POLLIN, timeout_ms, NULL);
    if (r <= 0)
        return RD_ERR;      /* timeout or error */
    ssize_t n;
    do
        n = recv(c->fd, c->in + c->in_len, INBUF_SIZE - c->in_len, 0);
    while (n < 0 && errno == EINTR);
    if (n == 0)
        return RD_EOF;
    if (n < 0) {
        log_msg('D', "recv from %s: %s", c->peer, strerror(errno));
        return RD_ERR;
    }
    c->in_len += (size_t)n;
    return RD_OK;
}

/* Next input line without its CRLF (or LF). *line points into the buffer
 * and stays valid until the next read. */
static int conn_getline(struct conn *c, char **line, size_t *len)
{
    for (;;) {
        char *s = c->in + c->in_off;
        char *nl = memchr(s, '\n', c->in_len - c->in_off);
        if (nl) {
            size_t n = (size_t)(nl - s);
            c->in_off += n + 1;
            if (n > 0 && s[n - 1] == '\r')
                n--;
            *line = s;
            *len = n;
            return RD_OK;
        }
        if (c->in_len - c->in_off > HEADER_LINE_MAX)
            return RD_BAD;
        int r = conn_fill(c, read_timeout_ms());
        if (r != RD_OK)
            return r;
    }
}

/* Appends the next n input bytes to out. */
static int conn_read_n(struct conn *c, size_t n, struct sbuf *out)
{
    while (n > 0) {
        if (c->in_off == c->in_len) {
            int r = conn_fill(c, read_timeout_ms());
            if (r != RD_OK)
                return r == RD_EOF ? RD_ERR : r;
        }
        size_t take = c->in_len - c->in_off < n ? c->in_len - c->in_off : n;
        sb_add(out, c->in + c->in_off, take);
        c->in_off += take;
        n -= take;
    }
    return RD_OK;
}

/* Waits for the first byte of the next request: false when the keep-alive
 * timeout passes, the client closes, or the server is stopping. */
static bool conn_wait_request(struct conn *c)
{
    if (c->in_off < c->in_len)
        return true;    /* pipelined */
    for (long waited = 0; waited < g_cfg.keepalive_ms; waited += 100) {
        if (atomic_load(&g_stopping))
            return false;
        long step = g_cfg.keepalive_ms - waited < 100 ? g_cfg.keepalive_ms - waited : 100;
        int r = poll_one(c->fd, POLLIN, (int)step, NULL);
        if (r != 0)
            return r > 0;
    }
    return false;
}

static bool is_tchar(unsigned char ch)
{
    return isalnum(ch) || strchr("!#$%&'*+-.^_`|~", ch);
}

static bool copy_field(char *dst, size_t cap, const char *src, size_t n)
{
    if (n >= cap)
        return false;
    memcpy(dst, src, n);
    dst[n] = '\0';
    return true;
}

static bool parse_request_line(const char *line, size_t n, struct request *rq)
{
    const char *sp1 = memchr(line, ' ', n);
    if (!sp1)
        return false;
    size_t ml = (size_t)(sp1 - line);
    for (size_t i = 0; i < ml; i++)
        if (!is_tchar((unsigned char)line[i]))
            return false;
    if (!copy_field(rq->method, sizeof rq->method, line, ml) || ml == 0)
        return false;
    const char *t = sp1 + 1;
    const char *sp2 = memchr(t, ' ', (size_t)(line + n - t));
    if (!sp2)
        return false;
    const char *ver = sp2 + 1;
    size_t vl = (size_t)(line + n - ver);
    if (vl != 8 || memcmp(ver, "HTTP/1.", 7) != 0 || (ver[7] != '0' && ver[7] != '1'))
        return false;
    rq->minor = ver[7] - '0';
    size_t tl = (size_t)(sp2 - t);
    if (tl == 0 || (t[0] != '/' && !(tl == 1 && t[0] == '*')))
        return false;
    for (size_t i = 0; i < tl; i++)
        if ((unsigned char)t[i] <= 0x20 || t[i] == 0x7f)
            return false;
    const char *q = memchr(t, '?', tl);
    size_t pl = q ? (size_t)(q - t) : tl;
    if (!copy_field(rq->path, sizeof rq->path, t, pl))
        return false;
    return copy_field(rq->query, sizeof rq->query, q ? q + 1 : "", q ? tl - pl - 1 : 0);
}

/* Case-insensitive: does the comma-separated list contain token? */
static bool has_token(const char *v, size_t n, const char *token)
{
    size_t tl = strlen(token);
    size_t i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tl && strncasecmp(v + s, token, tl) == 0)
            return true;
    }
    return false;
}

static bool name_is(const char *name, size_t n, const char *want)
{
    return strlen(want) == n && strncasecmp(name, want, n) == 0;
}

static bool parse_content_length(const char *v, size_t n, struct request *rq)
{
    if (n == 0 || n > 18)
        return false;
    long long x = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)v[i]))
            return false;
        x = x * 10 + (v[i] - '0');
    }
    if (rq->content_length >= 0 && rq->content_length != x)
        return false;
    rq->content_length = x;
    return true;
}

static bool parse_header_line(const char *line, size_t n, struct request *rq)
{
    if (line[0] == ' ' || line[0] == '\t')
        return false;   /* obsolete line folding */
    const char *colon = memchr(line, ':', n);
    if (!colon || colon == line)
        return false;
    size_t nl = (size_t)(colon - line);
    for (size_t i = 0; i < nl; i++)
        if (!is_tchar((unsigned char)line[i]))
            return false;
    const char *v = colon + 1, *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    size_t vn = (size_t)(end - v);

    if (name_is(line, nl, "Content-Length"))
        return parse_content_length(v, vn, rq);
    if (name_is(line, nl, "Transfer-Encoding")) {
        if (!has_token(v, vn, "chunked"))
            return false;   /* no other coding is supported */
        rq->chunked = true;
    } else if (name_is(line, nl, "Connection")) {
        rq->conn_close |= has_token(v, vn, "close");
        rq->conn_keep_alive |= has_token(v, vn, "keep-alive");
    } else if (name_is(line, nl, "Expect")) {
        rq->expect_continue = has_token(v, vn, "100-continue");
    } else if (name_is(line, nl, "Authorization")) {
        copy_field(rq->authorization, sizeof rq->authorization, v, vn);
    } else if (name_is(line, nl, "X-Api-Key")) {
        copy_field(rq->x_api_key, sizeof rq->x_api_key, v, vn);
    } else if (name_is(line, nl, "Origin")) {
        copy_field(rq->origin, sizeof rq->origin, v, vn);
    }
    return true;
}

static int read_chunked_body(struct conn *c, struct request *rq)
{
    for (;;) {
        char *line;
        size_t n;
        int r = conn_getline(c, &line, &n);
        if (r != RD_OK)
            return r == RD_EOF ? RD_ERR : r;
        size_t size = 0, i = 0;
        for (; i < n && isxdigit((unsigned char)line[i]); i++) {
            if (size > (size_t)BODY_MAX)
                return RD_TOO_BIG;
            size = size * 16 + (size_t)(isdigit((unsigned char)line[i]) ? line[i] - '0'
                                        : tolower((unsigned char)line[i]) - 'a' + 10);
        }
        if (i == 0 || (i < n && line[i] != ';' && line[i] != ' ' && line[i] != '\t'))
            return RD_BAD;
        if (size == 0)
            break;
        if (rq->body.len + size > (size_t)BODY_MAX)
            return RD_TOO_BIG;
        if ((r = conn_read_n(c, size, &rq->body)) != RD_OK)
            return r;
        if ((r = conn_getline(c, &line, &n)) != RD_OK)
            return r == RD_EOF ? RD_ERR : r;
        if (n != 0)
            return RD_BAD;
    }
    for (;;) {      /* trailer fields, ignored */
        char *line;
        size_t n;
        int r = conn_getline(c, &line, &n);
        if (r != RD_OK)
            return r == RD_EOF ? RD_ERR : r;
        if (n == 0)
            return RD_OK;
    }
}

static int read_body(struct conn *c, struct request *rq)
{
    if (!rq->chunked && rq->content_length <= 0)
        return RD_OK;
    if (rq->content_length > BODY_MAX)
        return RD_TOO_BIG;
    if (rq->expect_continue && rq->minor == 1 && c->in_off == c->in_len) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (!send_all(c->fd, cont, sizeof cont - 1))
            return RD_ERR;
    }
    if (rq->chunked)
        return read_chunked_body(c, rq);
    return conn_read_n(c, (size_t)rq->content_length, &rq->body);
}

/* Reads one request: line, headers, body. */
static int read_request(struct conn *c, struct request *rq)
{
    char *line;
    size_t n;
    int r, blank = 0;
    do {        /* tolerate a few empty lines before the request (RFC 9112 2.2) */
        if ((r = conn_getline(c, &line, &n)) != RD_OK)
            return r;
    } while (n == 0 && ++blank < 4);
    if (!parse_request_line(line, n, rq))
        return RD_BAD;
    for (int count = 0;; count++) {
        if ((r = conn_getline(c, &line, &n)) != RD_OK)
            return r == RD_EOF ? RD_ERR : r;
        if (n == 0)
            break;
        if (count >= HEADER_COUNT_MAX || !parse_header_line(line, n, rq))
            return RD_BAD;
    }
    if (rq->chunked && rq->content_length >= 0)
        return RD_BAD;
    rq->close = rq->minor == 0 ? !rq->conn_keep_alive : rq->conn_close;
    return read_body(c, rq);
}

/* ---------------------------------------------------------------- HTTP output */

#define CLEN_CHUNKED (-1)
#define CLEN_NONE    (-2)   /* HTTP/1.0 stream: the body ends when the connection does */

static const char *status_text(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 413: return "Payload Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default:  return "Unknown";
    }
}

/* Response head, headers in cpp-httplib's (alphabetical) order;
 * extra ("Name: value\r\n"...) goes last. */
static void build_head(struct sbuf *h, const struct request *rq, int status,
                       const char *ctype, long long clen, const char *extra)
{
    sb_printf(h, "HTTP/1.1 %d %s\r\n", status, status_text(status));
    sb_printf(h, "Access-Control-Allow-Origin: %s\r\n", rq->origin);
    if (rq->close) {
        sb_puts(h, "Connection: close\r\n");
    } else {
        if (rq->minor == 0)
            sb_puts(h, "Connection: keep-alive\r\n");
    }
    if (clen >= 0)
        sb_printf(h, "Content-Length: %lld\r\n", clen);
    if (ctype)
        sb_printf(h, "Content-Type: %s\r\n", ctype);
    if (!rq->close)
        sb_printf(h, "Keep-Alive: timeout=%ld, max=%d\r\n",
                  g_cfg.keepalive_ms / 1000, KEEPALIVE_MAX_REQUESTS);
    sb_puts(h, "Server: llama.cpp\r\n");
    if (clen == CLEN_CHUNKED)
        sb_puts(h, "Transfer-Encoding: chunked\r\n");
    if (extra)
        sb_puts(h, extra);
    sb_puts(h, "\r\n");
}

static void reply(struct conn *c, struct request *rq, int status, const char *ctype,
                  const char *body, size_t len, const char *extra)
{
    struct sbuf out = { 0 };
    build_head(&out, rq, status, ctype, (long long)len, extra);
    if (!rq->head)
        sb_add(&out, body, len);
    rq->status = status;
    if (!send_all(c->fd, out.p, out.len))
        rq->close = true;
    sb_free(&out);
}

static const char JSON_TYPE[] = "application/json; charset=utf-8";

static void reply_json(struct conn *c, struct request *rq, int status, const struct sbuf *body)
{
    reply(c, rq, status, JSON_TYPE, body->p, body->len, NULL);
}

/* A handler's error: {"error":{"code","message","type"}}. */
static void reply_error(struct conn *c, struct request *rq, int status,
                        const char *type, const char *message)
{
    struct sbuf b = { 0 };
    sb_printf(&b, "{\"error\":{\"code\":%d,\"message\":", status);
    sb_json_str(&b, message, strlen(message));
    sb_printf(&b, ",\"type\":\"%s\"}}", type);
    reply_json(c, rq, status, &b);
    sb_free(&b);
}

/* A middleware's error (loading, 404, 401): {"error":{"message","type","code"}}. */
static void reply_error_mw(struct conn *c, struct request *rq, int status,
                           const char *type, const char *message)
{
    struct sbuf b = { 0 };
    sb_printf(&b, "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"code\":%d}}",
              message, type, status);
    reply_json(c, rq, status, &b);
    sb_free(&b);
}

/* Streaming: one chunk per write (raw bytes for an HTTP/1.0 client). */
static bool stream_write(struct conn *c, struct request *rq, const char *data, size_t n)
{
    bool ok;
    if (rq->minor == 0) {
        ok = send_all(c->fd, data, n);
    } else {
        struct sbuf ch = { 0 };
        sb_printf(&ch, "%zx\r\n", n);
        sb_add(&ch, data, n);
        sb_puts(&ch, "\r\n");
        ok = send_all(c->fd, ch.p, ch.len);
        sb_free(&ch);
    }
    if (!ok)
        rq->close = true;
    return ok;
}

static bool stream_head(struct conn *c, struct request *rq)
{
    if (rq->minor == 0)
        rq->close = true;
    struct sbuf h = { 0 };
    build_head(&h, rq, 200, "text/event-stream", rq->minor == 0 ? CLEN_NONE : CLEN_CHUNKED,
               "X-Accel-Buffering: no\r\n");
    rq->status = 200;
    bool ok = send_all(c->fd, h.p, h.len);
    sb_free(&h);
    if (!ok)
        rq->close = true;
    return ok;
}

/* "data: <json>\n\n" as its own chunk. */
static bool sse_send(struct conn *c, struct request *rq, const struct sbuf *json)
{
    struct sbuf ev = { 0 };
    sb_puts(&ev, "data: ");
    sb_add(&ev, json->p, json->len);
    sb_puts(&ev, "\n\n");
    bool ok = stream_write(c, rq, ev.p, ev.len);
    sb_free(&ev);
    return ok;
}

static bool stream_end(struct conn *c, struct request *rq)
{
    if (rq->minor == 0)
        return true;
    if (send_all(c->fd, "0\r\n\r\n", 5))
        return true;
    rq->close = true;
    return false;
}

/* ---------------------------------------------------------------- prompt cache
 * llama-server keeps each slot's last prompt in its KV cache and, with
 * --cache-ram (-cram), more prompts in host RAM; a new prompt starts from the
 * longest common prefix with any of them and only the rest is evaluated.
 * Here it is one instance-wide list of the last FAKE_PROMPT_CACHE prompts,
 * as the bytes the token count is made from (the request's messages or
 * prompt, ~4 bytes a token), whatever -cram says: what a router can see is
 * that an instance that served a prefix serves it again faster. Slots run on
 * threads, so one mutex guards the list. */

struct cached_prompt {
    char *text;             /* NULL: a free entry */
    size_t n;
    uint64_t used;          /* g_pcache.clock when last matched or stored: LRU */
};

static struct {
    pthread_mutex_t mu;
    struct cached_prompt *e;
    size_t cap;             /* FAKE_PROMPT_CACHE */
    uint64_t clock;
} g_pcache = { .mu = PTHREAD_MUTEX_INITIALIZER };

static void pcache_init(long cap)
{
    if (cap <= 0)
        return;
    g_pcache.e = calloc((size_t)cap, sizeof *g_pcache.e);
    if (!g_pcache.e)
        fatal("out of memory (prompt cache of %ld)", cap);
    g_pcache.cap = (size_t)cap;
}

static size_t common_prefix(const char *a, size_t na, const char *b, size_t nb)
{
    size_t n = na < nb ? na : nb, i = 0;
    while (i < n && a[i] == b[i])
        i++;
    return i;
}

/* Bytes of TEXT that the best remembered prompt shares as a prefix; that
 * prompt counts as used now, so it is the last to be evicted. */
static size_t pcache_match(const char *text, size_t n)
{
    mu_lock(&g_pcache.mu);
    size_t best = 0;
    struct cached_prompt *hit = NULL;
    for (size_t i = 0; i < g_pcache.cap; i++) {
        struct cached_prompt *e = &g_pcache.e[i];
        size_t len = e->text ? common_prefix(e->text, e->n, text, n) : 0;
        if (len > best) {
            best = len;
            hit = e;
        }
    }
    if (hit)
        hit->used = ++g_pcache.clock;
    mu_unlock(&g_pcache.mu);
    return best;
}

/* Called locked: the entry to overwrite, a free one or else the least
 * recently used. */
static struct cached_prompt *pcache_victim(void)
{
    struct cached_prompt *v = &g_pcache.e[0];
    for (size_t i = 0; i < g_pcache.cap; i++) {
        struct cached_prompt *e = &g_pcache.e[i];
        if (!e->text)
            return e;
        if (e->used < v->used)
            v = e;
    }
    return v;
}

/* Remembers TEXT as llama-server's prompt cache stores a state: nothing new
 * if a remembered prompt already holds all of it, and the remembered
 * prompts that TEXT holds all of are dropped (TEXT answers for them). */
static void pcache_store(const char *text, size_t n)
{
    if (g_pcache.cap == 0)
        return;
    char *copy = malloc(n ? n : 1);
    if (!copy)
        fatal("out of memory (a prompt of %zu bytes)", n);
    memcpy(copy, text, n);
    mu_lock(&g_pcache.mu);
    uint64_t now = ++g_pcache.clock;
    for (size_t i = 0; i < g_pcache.cap; i++) {
        struct cached_prompt *e = &g_pcache.e[i];
        if (e->text && common_prefix(e->text, e->n, text, n) == n) {
            e->used = now;
            mu_unlock(&g_pcache.mu);
            free(copy);
            return;
        }
    }
    for (size_t i = 0; i < g_pcache.cap; i++) {
        struct cached_prompt *e = &g_pcache.e[i];
        if (e->text && common_prefix(e->text, e->n, text, n) == e->n) {
            free(e->text);
            e->text = NULL;
        }
    }
    struct cached_prompt *v = pcache_victim();
    char *old = v->text;
    *v = (struct cached_prompt){ .text = copy, .n = n, .used = now };
    mu_unlock(&g_pcache.mu);
    free(old);
}

/* ---------------------------------------------------------------- completions */

enum api { API_CHAT, API_OAI_COMPLETIONS, API_COMPLETION };

struct gen {
    enum api api;
    bool stream;
    bool limited;           /* the count came from the request (or the context): "length" */
    long n_predict;         /* as requested, -1 if not */
    long t_max_predict_ms;  /* as requested, -1 if not: see generate() */
    bool timings_per_token; /* every streamed chunk carries timings */
    bool has_new_line;      /* a token with a newline was generated */
    long n_tokens;          /* tokens to generate */
    long n_done;
    long n_prompt;          /* the whole prompt: usage.prompt_tokens */
    long n_cached;          /* of which served from the prompt cache: timings.cache_n */
    struct jspan input;     /* "messages" or "prompt": the text tokens are counted from */
    struct jspan prompt;    /* "prompt", echoed by /completion when a string */
    int task, slot;
    char id[48];
    long long created;
    int64_t t_start_us, t_gen_us, t_end_us;
};

static pthread_mutex_t g_rng_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t g_rng;

static void make_id(char *out, size_t cap)
{
    if (g_cfg.deterministic) {
        snprintf(out, cap, "chatcmpl-fake");
        return;
    }
    static const char al[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    char rnd[33];
    mu_lock(&g_rng_mu);
    for (int i = 0; i < 32; i++) {
        g_rng ^= g_rng << 13;
        g_rng ^= g_rng >> 7;
        g_rng ^= g_rng << 17;
        rnd[i] = al[g_rng % (sizeof al - 1)];
    }
    mu_unlock(&g_rng_mu);
    rnd[32] = '\0';
    snprintf(out, cap, "chatcmpl-%s", rnd);
}

static long long unix_now(void)
{
    return g_cfg.deterministic ? 0 : (long long)time(NULL);
}

static struct sbuf g_model_json;    /* the model id as a JSON string */

/* Parses the request body into g; false with err set on a 400. */
static bool gen_parse(const struct request *rq, enum api api, struct gen *g,
                      char *err, size_t errlen, int *status)
{
    *status = 500;   /* a body that is not JSON: real llama-server says 500 */
    struct jfield f[] = {
        { .name = "stream" }, { .name = "n_predict" }, { .name = "max_tokens" },
        { .name = "max_completion_tokens" }, { .name = "messages" }, { .name = "prompt" },
        { .name = "t_max_predict_ms" }, { .name = "timings_per_token" },
    };
    if (!json_parse_object(rq->body.p ? rq->body.p : "", rq->body.len, f,
                           sizeof f / sizeof f[0], err, errlen))
        return false;
    *status = 400;
    memset(g, 0, sizeof *g);
    g->api = api;
    g->stream = f[0].v.type == 't';
    g->n_predict = -1;
    g->t_max_predict_ms = f[6].v.type == 'n' ? jspan_long(&f[6].v) : -1;
    g->timings_per_token = f[7].v.type == 't';
    for (int i = 1; i <= 3; i++)
        if (f[i].v.type == 'n') {
            g->n_predict = jspan_long(&f[i].v);
            break;
        }
    struct jspan *input = api == API_CHAT ? &f[4].v : &f[5].v;
    if (api == API_CHAT && input->type != 'a') {
        snprintf(err, errlen, input->type ? "Expected 'messages' to be an array"
                                          : "'messages' is required");
        return false;
    }
    if (api != API_CHAT && input->type == 0) {
        snprintf(err, errlen, "\"prompt\" is required");
        return false;
    }
    g->input = *input;
    g->prompt = f[5].v;
    g->n_prompt = (long)(input->n + 3) / 4;     /* ~4 bytes a token, deterministic */
    if (g->n_prompt < 1)
        g->n_prompt = 1;
    g->limited = g->n_predict >= 0;
    g->n_tokens = g->limited ? g->n_predict : g_cfg.tokens;
    long room = g_cfg.slot_n_ctx - g->n_prompt;
    if (g->n_tokens > room) {       /* the context fills up: stops like n_predict */
        g->n_tokens = room > 0 ? room : 0;
        g->limited = true;
    }
    return true;
}

static const char *gen_finish(const struct gen *g) { return g->limited ? "length" : "stop"; }

/* Token I's text ends with a newline (FAKE_NEWLINE_EVERY). */
static bool token_has_newline(long i)
{
    return g_cfg.newline_every > 0 && (i + 1) % g_cfg.newline_every == 0;
}

static void emit_text(struct sbuf *b, long from, long to)
{
    sb_puts(b, "\"");
    for (long i = from; i < to; i++)
        sb_printf(b, " tok%ld%s", i, token_has_newline(i) ? "\\n" : "");
    sb_puts(b, "\"");
}

/* As llama-server's usage_json_oaicompat: prompt_tokens is the whole prompt,
 * cached ones included. */
static void emit_usage(struct sbuf *b, const struct gen *g)
{
    sb_printf(b, "\"usage\":{\"completion_tokens\":%ld,\"prompt_tokens\":%ld,"
              "\"prompt_tokens_details\":{\"cached_tokens\":%ld},\"total_tokens\":%ld}",
              g->n_done, g->n_prompt, g->n_cached, g->n_done + g->n_prompt);
}

/* As llama-server's get_timings: cache_n tokens came from the cache, prompt_n
 * were evaluated (never 0) in prompt_ms. */
static void emit_timings(struct sbuf *b, const struct gen *g)
{
    long n_eval = g->n_prompt - g->n_cached;
    double prompt_ms = (double)n_eval * g_cfg.prompt_ms_per_token;
    double pred_ms = (double)g->n_done * (double)g_cfg.token_ms;
    if (!g_cfg.deterministic) {
        prompt_ms = (double)(g->t_gen_us - g->t_start_us) / 1000.0;
        pred_ms = (double)(g->t_end_us - g->t_gen_us) / 1000.0;
    }
    double np = (double)n_eval, nd = (double)g->n_done;
    sb_printf(b, "\"timings\":{\"cache_n\":%ld,\"prompt_n\":%ld,\"prompt_ms\":%.3f,"
              "\"prompt_per_token_ms\":%.3f,\"prompt_per_second\":%.3f,\"predicted_n\":%ld,"
              "\"predicted_ms\":%.3f,\"predicted_per_token_ms\":%.3f,\"predicted_per_second\":%.3f}",
              g->n_cached, n_eval, prompt_ms, prompt_ms / np,
              prompt_ms > 0 ? 1000.0 * np / prompt_ms : 0.0,
              g->n_done, pred_ms, nd > 0 ? pred_ms / nd : 0.0,
              pred_ms > 0 ? 1000.0 * nd / pred_ms : 0.0);
}

/* ,"created":..,"model":..,"system_fingerprint":..,"object":..,"id":.. */
static void emit_oai_tail(struct sbuf *b, const struct gen *g, const char *object)
{
    sb_printf(b, ",\"created\":%lld,\"model\":%s,\"system_fingerprint\":\"%s\","
              "\"object\":\"%s\",\"id\":\"%s\"",
              g->created, g_model_json.p, BUILD_INFO, object, g->id);
}

static void emit_usage_timings(struct sbuf *b, const struct gen *g)
{
    sb_puts(b, ",");
    emit_usage(b, g);
    sb_puts(b, ",");
    emit_timings(b, g);
}

/* Chat chunk: delta is JSON; finish NULL -> null. */
static void chat_chunk(struct sbuf *b, const struct gen *g, const char *finish, long token)
{
    sb_puts(b, "{\"choices\":[{\"finish_reason\":");
    if (finish)
        sb_printf(b, "\"%s\"", finish);
    else
        sb_puts(b, "null");
    sb_puts(b, ",\"index\":0,\"delta\":");
    if (finish) {
        sb_puts(b, "{}");
    } else if (token < 0) {
        sb_puts(b, "{\"role\":\"assistant\",\"content\":null}");
    } else {
        sb_puts(b, "{\"content\":");
        emit_text(b, token, token + 1);
        sb_puts(b, "}");
    }
    sb_puts(b, "}]");
    emit_oai_tail(b, g, "chat.completion.chunk");
    if (finish) {
        emit_usage_timings(b, g);
    } else if (g->timings_per_token && token >= 0) {
        sb_puts(b, ",");
        emit_timings(b, g);
    }
    sb_puts(b, "}");
}

/* /v1/completions chunk: one token, or (finish) the last, empty one. */
static void cmpl_chunk(struct sbuf *b, const struct gen *g, const char *finish, long token)
{
    sb_puts(b, "{\"choices\":[{\"text\":");
    if (finish)
        sb_puts(b, "\"\"");
    else
        emit_text(b, token, token + 1);
    sb_puts(b, ",\"index\":0,\"logprobs\":null,\"finish_reason\":");
    if (finish)
        sb_printf(b, "\"%s\"}]", finish);
    else
        sb_puts(b, "null}]");
    emit_oai_tail(b, g, "text_completion");
    if (finish) {
        emit_usage_timings(b, g);
    } else if (g->timings_per_token) {
        sb_puts(b, ",");
        emit_timings(b, g);
    }
    sb_puts(b, "}");
}

static void legacy_partial(struct sbuf *b, const struct gen *g, long token)
{
    sb_puts(b, "{\"index\":0,\"content\":");
    emit_text(b, token, token + 1);
    sb_printf(b, ",\"tokens\":[],\"stop\":false,\"id_slot\":-1,\"tokens_predicted\":%ld,"
              "\"tokens_evaluated\":%ld", token + 1, g->n_prompt);
    if (g->timings_per_token) {
        sb_puts(b, ",");
        emit_timings(b, g);
    }
    sb_puts(b, "}");
}

/* /completion's final object: the whole text (plain) or "" (stream). */
static void legacy_final(struct sbuf *b, const struct gen *g, bool with_text)
{
    sb_puts(b, "{\"index\":0,\"content\":");
    emit_text(b, 0, with_text ? g->n_done : 0);
    sb_printf(b, ",\"tokens\":[],\"id_slot\":%d,\"stop\":true,\"model\":%s,"
              "\"tokens_predicted\":%ld,\"tokens_evaluated\":%ld,"
              "\"generation_settings\":{\"n_predict\":%ld,\"stream\":%s},\"prompt\":",
              g->slot, g_model_json.p, g->n_done, g->n_prompt, g->n_predict,
              g->stream ? "true" : "false");
    if (g->prompt.type == 's')
        sb_add(b, g->prompt.p, g->prompt.n);
    else
        sb_puts(b, "\"\"");
    sb_printf(b, ",\"has_new_line\":%s,\"truncated\":false,\"stop_type\":\"%s\","
              "\"stopping_word\":\"\",\"tokens_cached\":%ld,",
              g->has_new_line ? "true" : "false", g->limited ? "limit" : "eos",
              g->n_prompt + g->n_done);
    emit_timings(b, g);
    sb_puts(b, "}");
}

/* A plain answer's members after "choices", in llama-server's order
 * (server-task.cpp's to_json_oaicompat and _chat): created, model,
 * system_fingerprint, object, usage, id, timings; and the closing brace. */
static void emit_plain_tail(struct sbuf *b, const struct gen *g, const char *object)
{
    sb_printf(b, ",\"created\":%lld,\"model\":%s,\"system_fingerprint\":\"%s\",\"object\":\"%s\",",
              g->created, g_model_json.p, BUILD_INFO, object);
    emit_usage(b, g);
    sb_printf(b, ",\"id\":\"%s\",", g->id);
    emit_timings(b, g);
    sb_puts(b, "}");
}

static void plain_result(struct sbuf *b, const struct gen *g)
{
    switch (g->api) {
    case API_CHAT:
        sb_printf(b, "{\"choices\":[{\"finish_reason\":\"%s\",\"index\":0,"
                  "\"message\":{\"role\":\"assistant\",\"content\":", gen_finish(g));
        emit_text(b, 0, g->n_done);
        sb_puts(b, "}}]");
        emit_plain_tail(b, g, "chat.completion");
        break;
    case API_OAI_COMPLETIONS:
        sb_puts(b, "{\"choices\":[{\"text\":");
        emit_text(b, 0, g->n_done);
        sb_printf(b, ",\"index\":0,\"logprobs\":null,\"finish_reason\":\"%s\"}]", gen_finish(g));
        emit_plain_tail(b, g, "text_completion");
        break;
    case API_COMPLETION:
        legacy_final(b, g, true);
        break;
    }
}

/* Streaming: headers, then (chat) the role chunk. */
static bool stream_start(struct conn *c, struct request *rq, const struct gen *g)
{
    if (!stream_head(c, rq))
        return false;
    if (g->api != API_CHAT)
        return true;
    struct sbuf b = { 0 };
    chat_chunk(&b, g, NULL, -1);
    bool ok = sse_send(c, rq, &b);
    sb_free(&b);
    return ok;
}

static bool stream_token(struct conn *c, struct request *rq, const struct gen *g, long token)
{
    struct sbuf b = { 0 };
    if (g->api == API_CHAT)
        chat_chunk(&b, g, NULL, token);
    else if (g->api == API_OAI_COMPLETIONS)
        cmpl_chunk(&b, g, NULL, token);
    else
        legacy_partial(&b, g, token);
    bool ok = sse_send(c, rq, &b);
    sb_free(&b);
    return ok;
}

static bool stream_finish(struct conn *c, struct request *rq, const struct gen *g)
{
    struct sbuf b = { 0 };
    if (g->api == API_CHAT)
        chat_chunk(&b, g, gen_finish(g), 0);
    else if (g->api == API_OAI_COMPLETIONS)
        cmpl_chunk(&b, g, gen_finish(g), 0);
    else
        legacy_final(&b, g, false);
    bool ok = sse_send(c, rq, &b);
    sb_free(&b);
    if (ok && g->api != API_COMPLETION)
        ok = stream_write(c, rq, "data: [DONE]\n\n", 14);
    return ok && stream_end(c, rq);
}

__attribute__((noreturn))
static void crash_now(const struct gen *g)
{
    SRV_LOG('E', "fake_crash", "FAKE_CRASH_AFTER=%ld reached: task %d dies after %ld of %ld "
            "tokens (SIGSEGV)", g_cfg.crash_after, g->task, g->n_done, g->n_tokens);
    struct rlimit no_core = { 0, 0 };
    if (setrlimit(RLIMIT_CORE, &no_core) < 0 || prctl(PR_SET_DUMPABLE, 0) < 0)
        log_msg('W', "could not disable the core dump: %s", strerror(errno));
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
    abort();
}

/* Evaluates the prompt: tokens the prompt cache holds are free, each other
 * one costs FAKE_PROMPT_MS_PER_TOKEN; the last token is always evaluated,
 * as llama-server needs its logits. The client is watched as during
 * generation. Once evaluated, the prompt is in the cache for later requests
 * (llama-server's slot holds it from then on, even if the generation is
 * cancelled). False if the client went away or the server is stopping. */
static bool process_prompt(struct conn *c, struct gen *g)
{
    long hit = (long)(pcache_match(g->input.p, g->input.n) / 4);
    g->n_cached = hit < g->n_prompt - 1 ? hit : g->n_prompt - 1;
    SLT_LOG('D', "update_slots", g->slot, g->task, "cached n_tokens = %ld, memory_seq_rm [%ld, end)",
            g->n_cached, g->n_cached);
    double us = (double)(g->n_prompt - g->n_cached) * g_cfg.prompt_ms_per_token * 1000.0;
    if (sleep_us_or_gone(c->fd, (int64_t)us))
        return false;
    if (atomic_load(&g_stopping)) {
        hang_until_gone(c->fd);
        return false;
    }
    pcache_store(g->input.p, g->input.n);
    return true;
}

/* Evaluates the prompt, then produces the tokens, one per FAKE_TOKEN_MS,
 * streaming them if asked. False if the client went away (the task is to
 * be cancelled). */
static bool generate(struct conn *c, struct request *rq, struct gen *g, bool crash)
{
    if (!process_prompt(c, g))
        return false;
    g->t_gen_us = now_us();
    atomic_fetch_add(&g_stats.prompt_tokens, (unsigned long long)(g->n_prompt - g->n_cached));
    atomic_fetch_add(&g_stats.prompt_us, (unsigned long long)(g->t_gen_us - g->t_start_us));
    while (g->n_done < g->n_tokens) {
        if (crash && g->n_done == g->n_tokens / 2)
            crash_now(g);
        if (sleep_us_or_gone(c->fd, (int64_t)g_cfg.token_ms * 1000))
            return false;
        if (atomic_load(&g_stopping)) {
            hang_until_gone(c->fd);
            return false;
        }
        g->n_done++;
        g->t_end_us = now_us();
        atomic_fetch_add(&g_stats.tokens_predicted, 1);
        atomic_fetch_add(&g_stats.n_decode, 1);
        /* As llama-server's on_decoded: the slot holds the prompt and
         * every token but the one just sampled. */
        unsigned long long held = (unsigned long long)(g->n_prompt + g->n_done - 1);
        unsigned long long max = atomic_load(&g_stats.n_tokens_max);
        while (held > max && !atomic_compare_exchange_weak(&g_stats.n_tokens_max, &max, held))
            ;
        if (g->stream && !stream_token(c, rq, g, g->n_done - 1))
            return false;
        /* As llama-server's process_token: t_max_predict_ms is checked
         * only when a token with a newline comes, and stops generation
         * as a limit ("length", stop_type "limit") once it has passed. */
        if (token_has_newline(g->n_done - 1)) {
            g->has_new_line = true;
            if (g->t_max_predict_ms > 0 &&
                now_us() - g->t_gen_us > (int64_t)g->t_max_predict_ms * 1000) {
                SLT_LOG('D', "process_toke", g->slot, g->task,
                        "stopped by time limit, n_decoded = %ld, t_max_predict_ms = %ld ms",
                        g->n_done, g->t_max_predict_ms);
                g->limited = true;
                break;
            }
        }
    }
    if (crash)
        crash_now(g);
    g->t_end_us = now_us();
    atomic_fetch_add(&g_stats.predicted_us, (unsigned long long)(g->t_end_us - g->t_gen_us));
    return true;
}

static void reply_exceed_context(struct conn *c, struct request *rq, const struct gen *g)
{
    struct sbuf b = { 0 };
    sb_printf(&b, "{\"error\":{\"code\":400,\"message\":\"request (%ld tokens) exceeds the "
              "available context size (%ld tokens), try increasing it\","
              "\"type\":\"exceed_context_size_error\",\"n_prompt_tokens\":%ld,\"n_ctx\":%ld}}",
              g->n_prompt, g_cfg.slot_n_ctx, g->n_prompt, g_cfg.slot_n_ctx);
    reply_json(c, rq, 400, &b);
    sb_free(&b);
}

static void grow_fake_memory(void);

static void handle_completion(struct conn *c, struct request *rq, enum api api)
{
    struct gen g;
    char err[512];
    int status;
    if (!gen_parse(rq, api, &g, err, sizeof err, &status)) {
        reply_error(c, rq, status, status == 500 ? "server_error" : "invalid_request_error", err);
        return;
    }
    if (g.n_prompt >= g_cfg.slot_n_ctx) {
        reply_exceed_context(c, rq, &g);
        return;
    }
    activity_begin();
    g.task = atomic_fetch_add(&g_next_task, 1);
    g.slot = slots_acquire(c->fd, g.task);
    if (g.slot < 0) {
        SRV_LOG('I', "cancel_tasks", "cancel task, id_task = %d", g.task);
        rq->close = true;
        activity_end();
        return;
    }
    bool crash = g_cfg.crash_after >= 0 && atomic_fetch_add(&g_started, 1) == g_cfg.crash_after;
    grow_fake_memory();
    make_id(g.id, sizeof g.id);
    g.created = unix_now();
    g.t_start_us = now_us();
    SLT_LOG('I', "launch_slot_", g.slot, g.task, "processing task");

    bool ok = (!g.stream || stream_start(c, rq, &g)) && generate(c, rq, &g, crash);
    if (!ok)
        SRV_LOG('I', "cancel_tasks", "cancel task, id_task = %d", g.task);
    SLT_LOG('I', "release", g.slot, g.task, "stop processing: n_tokens = %ld, truncated = 0",
            g.n_prompt + g.n_done);
    slots_release(g.slot);
    if (!ok) {
        rq->close = true;
    } else if (g.stream) {
        stream_finish(c, rq, &g);
    } else {
        struct sbuf b = { 0 };
        plain_result(&b, &g);
        reply_json(c, rq, 200, &b);
        sb_free(&b);
    }
    activity_end();
}

/* ---------------------------------------------------------------- other endpoints */

static void handle_health(struct conn *c, struct request *rq)
{
    long answered = atomic_fetch_add(&g_health_answered, 1);
    if (g_cfg.health_hang_after >= 0 && answered >= g_cfg.health_hang_after) {
        SRV_LOG('D', "handle_healt", "FAKE_HEALTH_HANG: not answering %s", c->peer);
        while (!client_gone(c->fd, 1000))
            ;
        rq->close = true;
        return;
    }
    static const char ok[] = "{\"status\":\"ok\"}";
    reply(c, rq, 200, JSON_TYPE, ok, sizeof ok - 1, NULL);
}

static off_t g_model_size;

static void handle_models(struct conn *c, struct request *rq)
{
    const char *m = g_model_json.p;
    struct sbuf b = { 0 };
    sb_printf(&b, "{\"models\":[{\"name\":%s,\"model\":%s,\"modified_at\":\"\",\"size\":\"\","
              "\"digest\":\"\",\"type\":\"model\",\"description\":\"\",\"tags\":[\"\"],"
              "\"capabilities\":[\"completion\"],\"parameters\":\"\",\"details\":{"
              "\"parent_model\":\"\",\"format\":\"gguf\",\"family\":\"\",\"families\":[\"\"],"
              "\"parameter_size\":\"\",\"quantization_level\":\"\"}}],\"object\":\"list\","
              "\"data\":[{\"id\":%s,\"object\":\"model\",\"owned_by\":\"llamacpp\","
              "\"created\":%lld,\"meta\":{\"vocab_type\":1,\"n_vocab\":32000,"
              "\"n_ctx_train\":%ld,\"n_embd\":64,\"n_params\":%lld,\"size\":%lld}}]}",
              m, m, m, unix_now(), g_cfg.n_ctx_train,
              (long long)g_model_size / 2, (long long)g_model_size);
    reply_json(c, rq, 200, &b);
    sb_free(&b);
}

static void handle_props(struct conn *c, struct request *rq)
{
    struct sbuf b = { 0 };
    sb_printf(&b, "{\"default_generation_settings\":{\"id\":0,\"id_task\":-1,\"n_ctx\":%ld,"
              "\"speculative\":false,\"is_processing\":false,\"params\":{\"n_predict\":-1,"
              "\"stream\":true}},\"total_slots\":%d,\"model_alias\":%s,\"model_path\":",
              g_cfg.slot_n_ctx, g_cfg.n_slots, g_model_json.p);
    sb_json_str(&b, g_cfg.model, strlen(g_cfg.model));
    sb_printf(&b, ",\"modalities\":{\"vision\":false,\"audio\":false},\"endpoint_slots\":%s,"
              "\"endpoint_props\":false,\"endpoint_metrics\":%s,\"webui\":false,"
              "\"chat_template\":\"\",\"bos_token\":\"<s>\",\"eos_token\":\"</s>\","
              "\"build_info\":\"%s\",\"is_sleeping\":false}",
              g_cfg.slots ? "true" : "false", g_cfg.metrics ? "true" : "false", BUILD_INFO);
    reply_json(c, rq, 200, &b);
    sb_free(&b);
}

static void handle_slots(struct conn *c, struct request *rq)
{
    if (!g_cfg.slots) {
        reply_error(c, rq, 501, "not_supported_error",
                    "This server does not support slots endpoint. Start it with `--slots`");
        return;
    }
    int tasks[g_cfg.n_slots], busy, waiting;
    slots_snapshot(tasks, &busy, &waiting);
    /* any fail_on_no_slot parameter counts (req.has_param), whatever its value */
    bool fail_on_no_slot = strncmp(rq->query, "fail_on_no_slot", 15) == 0 ||
                           strstr(rq->query, "&fail_on_no_slot") != NULL;
    if (fail_on_no_slot && busy == g_cfg.n_slots) {
        reply_error(c, rq, 503, "unavailable_error", "no slot available");
        return;
    }
    struct sbuf b = { 0 };
    sb_puts(&b, "[");
    for (int i = 0; i < g_cfg.n_slots; i++)
        sb_printf(&b, "%s{\"id\":%d,\"id_task\":%d,\"n_ctx\":%ld,\"speculative\":false,"
                  "\"is_processing\":%s}", i ? "," : "", i, tasks[i], g_cfg.slot_n_ctx,
                  tasks[i] >= 0 ? "true" : "false");
    sb_puts(&b, "]");
    reply_json(c, rq, 200, &b);
    sb_free(&b);
}

static void metric(struct sbuf *b, const char *name, const char *type, const char *help,
                   double value)
{
    sb_printf(b, "# HELP llamacpp:%s %s\n# TYPE llamacpp:%s %s\nllamacpp:%s %.6g\n",
              name, help, name, type, name, value);
}

/* As llama-server b9749: the counters, then the gauges, each family with
 * its HELP and TYPE, values as C++ streams print a double (%g). The
 * speculative-decoding counters are always 0 here (no draft model). */
static void handle_metrics(struct conn *c, struct request *rq)
{
    if (!g_cfg.metrics) {
        reply_error(c, rq, 501, "not_supported_error",
                    "This server does not support metrics endpoint. Start it with `--metrics`");
        return;
    }
    if (g_cfg.metrics_hang) {
        SRV_LOG('D', "handle_metrics", "FAKE_METRICS_HANG: not answering %s", c->peer);
        while (!client_gone(c->fd, 1000))
            ;
        rq->close = true;
        return;
    }
    int tasks[g_cfg.n_slots], busy, waiting;
    slots_snapshot(tasks, &busy, &waiting);
    double prompt_n = (double)atomic_load(&g_stats.prompt_tokens);
    double pred_n = (double)atomic_load(&g_stats.tokens_predicted);
    double prompt_s = (double)atomic_load(&g_stats.prompt_us) / 1e6;
    double pred_s = (double)atomic_load(&g_stats.predicted_us) / 1e6;
    double decodes = (double)atomic_load(&g_stats.n_decode);
    struct sbuf b = { 0 };
    metric(&b, "prompt_tokens_total", "counter", "Number of prompt tokens processed.", prompt_n);
    metric(&b, "prompt_seconds_total", "counter", "Prompt process time", prompt_s);
    metric(&b, "tokens_predicted_total", "counter", "Number of generation tokens processed.", pred_n);
    metric(&b, "tokens_predicted_seconds_total", "counter", "Predict process time", pred_s);
    metric(&b, "n_decode_total", "counter", "Total number of llama_decode() calls", decodes);
    metric(&b, "n_tokens_max", "counter", "Largest observed n_tokens.",
           (double)atomic_load(&g_stats.n_tokens_max));
    metric(&b, "spec_decode_num_draft_tokens_total", "counter", "Total draft tokens generated", 0);
    metric(&b, "spec_decode_num_accepted_tokens_total", "counter",
           "Total draft tokens accepted by the target model", 0);
    metric(&b, "spec_decode_num_drafts_total", "counter", "Total speculative decoding verification steps", 0);
    metric(&b, "prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
           prompt_s > 0 ? prompt_n / prompt_s : 0);
    metric(&b, "predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
           pred_s > 0 ? pred_n / pred_s : 0);
    metric(&b, "requests_processing", "gauge", "Number of requests processing.", busy);
    metric(&b, "requests_deferred", "gauge", "Number of requests deferred.", waiting);
    metric(&b, "n_busy_slots_per_decode", "gauge",
           "Average number of busy slots per llama_decode() call", decodes > 0 ? 1 : 0);
    char extra[64];
    snprintf(extra, sizeof extra, "Process-Start-Time-Unix: %lld\r\n", g_start_unix);
    reply(c, rq, 200, "text/plain; version=0.0.4", b.p, b.len, extra);
    sb_free(&b);
}

static void handle_options(struct conn *c, struct request *rq)
{
    reply(c, rq, 200, "text/html", "", 0,
          "Access-Control-Allow-Credentials: true\r\n"
          "Access-Control-Allow-Headers: *\r\n"
          "Access-Control-Allow-Methods: GET, POST\r\n");
}

/* ---------------------------------------------------------------- routing */

/* key is one of the keys from LLAMA_API_KEY and --api-key */
static bool key_listed(const char *key)
{
    for (size_t i = 0; i < g_cfg.n_api_keys; i++)
        if (streq(g_cfg.api_keys[i], key))
            return true;
    return false;
}

/* As llama-server's middleware: no keys, or a public path, or the key in
 * Authorization (with or without "Bearer "), or in X-Api-Key when there is
 * no Authorization at all. */
static bool api_key_ok(const struct request *rq)
{
    static const char *const public_paths[] = { "/health", "/v1/health", "/models", "/v1/models", "/" };
    if (!g_cfg.n_api_keys)
        return true;
    for (size_t i = 0; i < sizeof public_paths / sizeof public_paths[0]; i++)
        if (streq(rq->path, public_paths[i]))
            return true;
    const char *key = rq->authorization[0] ? rq->authorization : rq->x_api_key;
    if (strncmp(key, "Bearer ", 7) == 0)
        key += 7;
    return key_listed(key);
}

static int completion_api(const char *path)
{
    if (streq(path, "/v1/chat/completions") || streq(path, "/chat/completions"))
        return API_CHAT;
    if (streq(path, "/v1/completions"))
        return API_OAI_COMPLETIONS;
    if (streq(path, "/completion") || streq(path, "/completions"))
        return API_COMPLETION;
    return -1;
}

static void route(struct conn *c, struct request *rq)
{
    const char *p = rq->path;
    rq->head = streq(rq->method, "HEAD");
    bool get = rq->head || streq(rq->method, "GET");
    bool post = streq(rq->method, "POST");

    if (g_cfg.log_auth)
        SRV_LOG('I', "log_auth", "%s %s authorization=\"%s\" x-api-key=\"%s\"",
                rq->method, rq->path, rq->authorization, rq->x_api_key);
    if (streq(rq->method, "OPTIONS"))
        return handle_options(c, rq);
    if (!atomic_load(&g_ready))
        return reply_error_mw(c, rq, 503, "unavailable_error", "Loading model");
    if (!api_key_ok(rq)) {
        SRV_LOG('W', "operator()", "unauthorized: Invalid API Key");
        return reply_error_mw(c, rq, 401, "authentication_error", "Invalid API Key");
    }
    if (get && (streq(p, "/health") || streq(p, "/v1/health")))
        return handle_health(c, rq);
    if (get && (streq(p, "/models") || streq(p, "/v1/models")))
        return handle_models(c, rq);
    if (get && streq(p, "/props"))
        return handle_props(c, rq);
    if (post && streq(p, "/props"))
        return reply_error(c, rq, 501, "not_supported_error", "This server does not support "
                           "changing global properties. Start it with `--props`");
    if (get && streq(p, "/slots"))
        return handle_slots(c, rq);
    if (get && streq(p, "/metrics"))
        return handle_metrics(c, rq);
    int api = post ? completion_api(p) : -1;
    if (api >= 0)
        return handle_completion(c, rq, (enum api)api);
    reply_error_mw(c, rq, 404, "not_found_error", "File Not Found");
}

static void log_request(const struct conn *c, const struct request *rq)
{
    if (!rq->status)
        return;
    bool completion = streq(rq->method, "POST") && completion_api(rq->path) >= 0;
    SRV_LOG(completion ? 'I' : 'D', "log_server_r", "request: %s %s %s %d",
            rq->method, rq->path, c->peer, rq->status);
}

/* ---------------------------------------------------------------- connections */

/* Reads and answers one request; false when the connection is to close. */
static bool serve_one(struct conn *c)
{
    struct request rq = { .content_length = -1 };
    int r = read_request(c, &rq);
    if (r == RD_OK) {
        c->n_served++;
        if (c->n_served >= KEEPALIVE_MAX_REQUESTS || atomic_load(&g_stopping))
            rq.close = true;
        route(c, &rq);
        log_request(c, &rq);
    } else if (r == RD_BAD || r == RD_TOO_BIG) {
        int status = r == RD_BAD ? 400 : 413;
        rq.close = true;
        reply(c, &rq, status, NULL, "", 0, NULL);
        log_msg('D', "bad request from %s: %d", c->peer, status);
    } else {
        rq.close = true;    /* EOF, error or timeout: just close */
    }
    sb_free(&rq.body);
    return !rq.close;
}

static void *conn_main(void *arg)
{
    struct conn *c = arg;
    while (conn_wait_request(c) && serve_one(c))
        ;
    if (close(c->fd) < 0)
        log_msg('D', "close: %s", strerror(errno));
    free(c->in);
    free(c);
    return NULL;
}

static void peer_name(const struct sockaddr_storage *ss, char *out, size_t cap)
{
    const void *addr = NULL;
    if (ss->ss_family == AF_INET)
        addr = &((const struct sockaddr_in *)ss)->sin_addr;
    else if (ss->ss_family == AF_INET6)
        addr = &((const struct sockaddr_in6 *)ss)->sin6_addr;
    if (!addr || !inet_ntop(ss->ss_family, addr, out, (socklen_t)cap))
        snprintf(out, cap, "%s", ss->ss_family == AF_UNIX ? "unix" : "?");
}

static void configure_client_socket(int fd, int family)
{
    int one = 1;
    if (family != AF_UNIX && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        log_msg('W', "setsockopt(TCP_NODELAY): %s", strerror(errno));
    struct timeval tv = { .tv_sec = g_cfg.timeout_s };
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        log_msg('W', "setsockopt(SO_SNDTIMEO): %s", strerror(errno));
}

static void start_connection(int fd, const struct sockaddr_storage *ss)
{
    struct conn *c = calloc(1, sizeof *c);
    char *in = malloc(INBUF_SIZE);
    if (!c || !in) {
        log_msg('E', "out of memory: dropping a connection");
        free(c);
        free(in);
        close(fd);
        return;
    }
    c->fd = fd;
    c->in = in;
    peer_name(ss, c->peer, sizeof c->peer);
    configure_client_socket(fd, ss->ss_family);
    pthread_attr_t attr;
    pthread_t tid;
    int e = pthread_attr_init(&attr);
    if (!e)
        e = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (!e)
        e = pthread_create(&tid, &attr, conn_main, c);
    pthread_attr_destroy(&attr);
    if (e) {
        log_msg('E', "pthread_create: %s: dropping a connection", strerror(e));
        close(fd);
        free(in);
        free(c);
    }
}

static void *accept_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&g_stopping)) {
        if (poll_one(g_listen_fd, POLLIN, 100, NULL) <= 0)
            continue;
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(g_listen_fd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
        if (fd >= 0) {
            start_connection(fd, &ss);
            continue;
        }
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED)
            continue;
        log_msg('E', "accept: %s", strerror(errno));
        struct timespec pause = { 0, 50 * 1000000 };    /* EMFILE and friends: back off */
        nanosleep(&pause, NULL);
    }
    return NULL;
}

/* ---------------------------------------------------------------- model loading */

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void *g_model_mem;       /* kept for the life of the process */
static void *g_fake_mem;

static bool read_fully(int fd, char *p, size_t n)
{
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        p += r;
        n -= (size_t)r;
    }
    return true;
}

/* Maps the file and reads every page (shared file pages, like the real
 * mmap'd weights), or with --no-mmap copies it into anonymous memory. */
static bool model_map(int fd, size_t size)
{
    if (size == 0)
        return true;
    if (!g_cfg.use_mmap) {
        char *p = malloc(size);
        if (!p || lseek(fd, 0, SEEK_SET) < 0 || !read_fully(fd, p, size)) {
            log_msg('E', "llama_model_load: error loading model: reading %s: %s",
                    g_cfg.model, p ? strerror(errno) : "out of memory");
            free(p);
            return false;
        }
        g_model_mem = p;
        return true;
    }
    void *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        log_msg('E', "llama_model_load: error loading model: mmap %s: %s",
                g_cfg.model, strerror(errno));
        return false;
    }
    long page = sysconf(_SC_PAGESIZE);
    volatile const char *v = p;
    unsigned sum = 0;
    for (size_t off = 0; off < size; off += (size_t)(page > 0 ? page : 4096))
        sum += (unsigned char)v[off];
    (void)sum;
    g_model_mem = p;
    return true;
}

/* FAKE_MEMORY_PER_REQUEST: allocate, touch and keep (never freed: a
 * leak by design) that much more. Logged before the touching, so that the
 * log says what it was doing if the OOM killer ends it. */
static void grow_fake_memory(void)
{
    if (g_cfg.memory_per_request == 0)
        return;
    log_msg('I', "srv  grow_memory: FAKE_MEMORY_PER_REQUEST: touching %llu more bytes",
            g_cfg.memory_per_request);
    char *p = malloc(g_cfg.memory_per_request);
    if (!p) {
        log_msg('E', "srv  grow_memory: cannot allocate %llu bytes", g_cfg.memory_per_request);
        return;
    }
    memset(p, 0x5a, g_cfg.memory_per_request);
    /* Kept, reachable from a global: the memory stays in use (a block
     * nobody points at again would let the compiler drop the memset as a
     * dead store, and untouched pages are charged to no one). */
    static pthread_mutex_t grown_lock = PTHREAD_MUTEX_INITIALIZER;
    static void *grown;
    pthread_mutex_lock(&grown_lock);
    memcpy(p, &grown, sizeof grown);
    grown = p;
    pthread_mutex_unlock(&grown_lock);
}

static bool touch_fake_memory(void)
{
    if (g_cfg.memory == 0)
        return true;
    g_fake_mem = malloc(g_cfg.memory);
    if (!g_fake_mem) {
        log_msg('E', "llama_model_load: error loading model: cannot allocate FAKE_MEMORY=%llu bytes",
                g_cfg.memory);
        return false;
    }
    memset(g_fake_mem, 0xa5, g_cfg.memory);     /* every page, non-zero: counted in RSS/PSS */
    log_msg('I', "load_tensors: FAKE_MEMORY: %llu bytes allocated and touched", g_cfg.memory);
    return true;
}

/* Opens the model and checks its magic; -1 (logged) if it is no GGUF file. */
static int model_open(struct stat *st)
{
    int fd = open(g_cfg.model, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        log_msg('E', "gguf_init_from_file: failed to open GGUF file '%s' (%s)",
                g_cfg.model, strerror(errno));
        return -1;
    }
    unsigned char m[4];
    if (fstat(fd, st) < 0 || !S_ISREG(st->st_mode)) {
        log_msg('E', "gguf_init_from_file: '%s' is not a regular file", g_cfg.model);
    } else if (!read_fully(fd, (char *)m, 4)) {
        log_msg('E', "gguf_init_from_file_impl: failed to read magic of '%s'", g_cfg.model);
    } else if (memcmp(m, "GGUF", 4) != 0) {
        log_msg('E', "gguf_init_from_file_impl: invalid magic characters: '%c%c%c%c', expected 'GGUF'",
                isprint(m[0]) ? m[0] : '?', isprint(m[1]) ? m[1] : '?',
                isprint(m[2]) ? m[2] : '?', isprint(m[3]) ? m[3] : '?');
    } else {
        return fd;
    }
    close(fd);
    return -1;
}

/* ---------------------------------------------------------------- VRAM (stand-in NVML) */

static char g_vram_file[4096];            /* DIR/PID while it exists */

/* The NVML index of the device this process offloads to, or -1 for none:
 * --device CUDAk (the first one listed) picks k among CUDA_VISIBLE_DEVICES,
 * default 0. Like CUDA, CUDA_VISIBLE_DEVICES lists indexes or UUIDs (the
 * stand-in NVML's: GPU-5a4d0000-0000-4000-8000-<index>) and ends at the
 * first entry that is neither ("-1": no device, the child runs on the CPU). */
static long vram_device(void)
{
    static const char uuid_prefix[] = "GPU-5a4d0000-0000-4000-8000-";
    long k = 0;
    if (g_cfg.device) {
        if (streq(g_cfg.device, "none"))
            return -1;
        if (strncmp(g_cfg.device, "CUDA", 4) || !isdigit((unsigned char)g_cfg.device[4]))
            fatal("error: invalid device: %s (fake-llama-server knows CUDAk and none)", g_cfg.device);
        k = strtol(g_cfg.device + 4, NULL, 10);
    }
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    if (!visible)
        return k;
    long n = 0;
    for (long i = 0; *visible; i++) {
        const char *at = visible;
        if (strncmp(at, uuid_prefix, sizeof uuid_prefix - 1) == 0)
            at += sizeof uuid_prefix - 1;
        char *end;
        long idx = strtol(at, &end, 10);
        if (end == at || idx < 0)
            break;                      /* the list ends here */
        n++;
        if (i == k)
            return idx;
        visible = *end == ',' ? end + 1 : end + strlen(end);
    }
    if (n == 0 && !g_cfg.device)
        return -1;                      /* no device visible: a CPU run */
    fatal("error: device CUDA%ld is not among CUDA_VISIBLE_DEVICES=%s", k, getenv("CUDA_VISIBLE_DEVICES"));
}

static void vram_release(void)
{
    if (g_vram_file[0] && unlink(g_vram_file) < 0)
        log_msg('W', "unlink %s: %s", g_vram_file, strerror(errno));
    g_vram_file[0] = '\0';
}

/* With NVML_STANDIN_DIR and layers offloaded: prints the buffer lines a
 * CUDA build prints and writes DIR/PID for the stand-in NVML. False (logged)
 * when the file cannot be written. */
static bool vram_take(long long file_bytes)
{
    long dev = vram_device();
    if (!g_cfg.vram_dir || g_cfg.n_gpu_layers == 0 || dev < 0)
        return true;
    long layers = g_cfg.n_gpu_layers < 0 || g_cfg.n_gpu_layers > g_cfg.n_layers
                ? g_cfg.n_layers : g_cfg.n_gpu_layers;
    double share = (double)layers / (double)g_cfg.n_layers;
    double mib = 1024.0 * 1024.0;
    double model = (double)file_bytes * share / mib;
    long n_ctx = g_cfg.n_ctx > 0 ? g_cfg.n_ctx : g_cfg.n_ctx_train;
    double kv = (double)n_ctx * 128.0 / 1024.0 * share;   /* 128 KiB a cell: 16 layers x 2048 x f16 x K,V */
    double compute = 300.0;
    long cuda = g_cfg.device ? strtol(g_cfg.device + 4, NULL, 10) : 0;
    char name[16];
    snprintf(name, sizeof name, "CUDA%ld", cuda);

    log_msg('I', "load_tensors: offloading %ld repeating layers to GPU", layers);
    log_msg('I', "load_tensors: offloaded %ld/%ld layers to GPU", layers, g_cfg.n_layers + 1);
    log_msg('I', "load_tensors: %12s model buffer size = %8.2f MiB", name, model);
    if (share < 1.0)
        log_msg('I', "load_tensors: %12s model buffer size = %8.2f MiB", "CPU_Mapped",
                (double)file_bytes / mib - model);
    log_msg('I', "llama_kv_cache: %10s KV buffer size = %8.2f MiB", name, kv);
    log_msg('I', "sched_reserve: %10s compute buffer size = %8.2f MiB", name, compute);

    unsigned long long bytes = g_cfg.vram_mb >= 0 ? (unsigned long long)g_cfg.vram_mb << 20
                             : (700ULL << 20) + (unsigned long long)((model + kv) * mib);
    char tmp[4096];
    snprintf(g_vram_file, sizeof g_vram_file, "%s/%d", g_cfg.vram_dir, (int)getpid());
    snprintf(tmp, sizeof tmp, "%s/.%d.tmp", g_cfg.vram_dir, (int)getpid());
    FILE *f = fopen(tmp, "we");
    bool ok = f && fprintf(f, "%ld %llu\n", dev, bytes) > 0;
    if (f && fclose(f) != 0)
        ok = false;
    if (!ok || rename(tmp, g_vram_file) < 0) {
        log_msg('E', "ggml_backend_cuda_buffer_type_alloc_buffer: cannot write %s: %s",
                g_vram_file, strerror(errno));
        unlink(tmp);
        g_vram_file[0] = '\0';
        return false;
    }
    return true;
}

/* "Allocates" VRAM (vram_take), takes FAKE_LOAD_MS, then maps the file and
 * allocates FAKE_MEMORY. */
static bool model_fill(int fd, const struct stat *st)
{
    g_model_size = st->st_size;
    log_msg('I', "llama_model_loader: loaded meta data from %s (%lld bytes, fake)",
            g_cfg.model, (long long)st->st_size);
    log_msg('I', "load_tensors: loading model tensors, this can take a while... (mmap = %s)",
            g_cfg.use_mmap ? "true" : "false");
    if (!vram_take((long long)st->st_size))
        return false;
    sleep_ms(g_cfg.load_ms);
    if (g_cfg.crash_at_load) {
        log_msg('E', "llama_model_load: error loading model: FAKE_CRASH_AT_LOAD=1");
        return false;
    }
    return model_map(fd, (size_t)st->st_size) && touch_fake_memory();
}

static bool model_load(void)
{
    SRV_LOG('I', "load_model", "loading model '%s'", g_cfg.model);
    struct stat st;
    int fd = model_open(&st);
    bool ok = fd >= 0 && model_fill(fd, &st);
    if (fd >= 0 && close(fd) < 0)
        log_msg('W', "close %s: %s", g_cfg.model, strerror(errno));
    if (!ok)
        log_msg('E', "llama_model_load_from_file_impl: failed to load model");
    return ok;
}

/* ---------------------------------------------------------------- signals, main loop */

static void on_signal(int sig)
{
    int saved = errno;
    if (atomic_fetch_add(&g_signals, 1) > 0) {
        static const char msg[] = "Received second interrupt, terminating immediately.\n";
        write_all(STDERR_FILENO, msg, sizeof msg - 1);
        _exit(1);
    }
    unsigned char b = (unsigned char)sig;
    if (write(g_sigpipe[1], &b, 1) < 0) {
        /* the pipe cannot be full: one byte is ever written */
    }
    errno = saved;
}

static void install_signal_handlers(void)
{
    if (pipe2(g_sigpipe, O_CLOEXEC | O_NONBLOCK) < 0)
        fatal("pipe2: %s", strerror(errno));
    struct sigaction sa = { .sa_handler = on_signal };
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) < 0 ||
        (!g_cfg.ignore_sigterm && sigaction(SIGTERM, &sa, NULL) < 0))
        fatal("sigaction: %s", strerror(errno));
}

/* Returns the first signal received, or 0 when FAKE_EXIT_AFTER_MS runs out. */
static int wait_for_stop(void)
{
    int64_t deadline = g_cfg.exit_after_ms >= 0 ? now_ms() + g_cfg.exit_after_ms : -1;
    for (;;) {
        int timeout = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0)
                return 0;
            timeout = left > INT_MAX ? INT_MAX : (int)left;
        }
        int r = poll_one(g_sigpipe[0], POLLIN, timeout, NULL);
        if (r < 0)
            fatal("poll: %s", strerror(errno));
        unsigned char sig;
        if (r > 0 && read(g_sigpipe[0], &sig, 1) == 1)
            return sig;
    }
}

/* Stops accepting and generating, exits 0 once every client of a
 * completion in flight has gone. */
__attribute__((noreturn))
static void shut_down(pthread_t acceptor, int sig)
{
    mu_lock(&g_pool.mu);
    int active = g_pool.n_active;
    mu_unlock(&g_pool.mu);
    SRV_LOG('I', "llama_server", "received signal %d: no longer accepting connections; "
            "%d request(s) in flight get nothing more", sig, active);
    atomic_store(&g_stopping, true);
    SRV_LOG('I', "operator()", "operator(): cleaning up before exit...");
    int e = pthread_join(acceptor, NULL);
    if (e)
        log_msg('W', "pthread_join: %s", strerror(e));
    if (close(g_listen_fd) < 0)
        log_msg('W', "close listening socket: %s", strerror(errno));
    wait_until_idle();
    vram_release();
    _exit(0);
}

/* ---------------------------------------------------------------- configuration */

__attribute__((noreturn))
static void usage(void)
{
    static const char text[] =
        "usage: fake-llama-server -m MODEL.gguf [--host H] [--port P] [-c N] [-np N]\n"
        "                         [-a ALIAS[,ALIAS]] [--api-key K] [--metrics] [--no-slots]\n"
        "                         [--no-mmap] [-to SECONDS] [-v]\n"
        "A stand-in for llama-server; see the comment at the top of its source for the\n"
        "FAKE_* environment knobs.\n";
    write_all(STDOUT_FILENO, text, sizeof text - 1);
    exit(0);
}

static long parse_long(const char *what, const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        fatal("error: invalid value for %s: '%s' (expected an integer in [%ld, %ld])",
              what, s, min, max);
    return v;
}

static long env_long(const char *name, long def, long min)
{
    const char *s = getenv(name);
    return s && *s ? parse_long(name, s, min, LONG_MAX) : def;
}

/* A number >= 0, fractions allowed; DEF if unset. */
static double env_double(const char *name, double def)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return def;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= 0 && v <= 1e9))
        fatal("error: invalid %s='%s' (expected a number >= 0, such as 0.5)", name, s);
    return v;
}

static bool env_flag(const char *name)
{
    const char *s = getenv(name);
    return s && *s && !streq(s, "0");
}

/* "64M", "1.5G", "4096": K/M/G/T are powers of 1024; a trailing B or iB is allowed. */
static unsigned long long env_size(const char *name)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return 0;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    const char *units = "KMGT";
    const char *u = *end ? strchr(units, toupper((unsigned char)*end)) : NULL;
    double mult = 1;
    if (u && *end) {
        for (const char *k = units; k <= u; k++)
            mult *= 1024;
        end++;
        if (*end == 'i')
            end++;
    }
    if (*end == 'B' || *end == 'b')
        end++;
    if (errno || end == s || *end || v < 0 || v * mult > 1e18)
        fatal("error: invalid %s='%s' (expected a size such as 64M)", name, s);
    return (unsigned long long)(v * mult);
}

/* Append the keys of LIST as llama.cpp's parse_csv_row splits it: commas
 * separate; a '"' that opens a field quotes it (commas inside kept, ""
 * is one quote); a '"' elsewhere is literal. Empty keys are skipped. */
static void add_api_keys(const char *list)
{
    char *field = malloc(strlen(list) + 1);
    if (!field)
        fatal("out of memory");
    const char *s = list;
    for (bool more = true; more; ) {
        bool quoted = false;
        size_t n = 0;
        more = false;
        for (; *s; s++) {
            if (*s == '"' && !quoted && n == 0) {
                quoted = true;
            } else if (*s == '"' && quoted) {
                if (s[1] == '"')
                    field[n++] = *++s;
                else
                    quoted = false;
            } else if (*s == ',' && !quoted) {
                s++;
                more = true;
                break;
            } else {
                field[n++] = *s;
            }
        }
        if (n == 0)
            continue;
        char **v = realloc(g_cfg.api_keys, (g_cfg.n_api_keys + 1) * sizeof *v);
        if (!v || !(v[g_cfg.n_api_keys] = strndup(field, n)))
            fatal("out of memory");
        g_cfg.api_keys = v;
        g_cfg.n_api_keys++;
    }
    free(field);
}

static void read_environment(void)
{
    g_cfg.load_ms = env_long("FAKE_LOAD_MS", 100, 0);
    g_cfg.bind_delay_ms = env_long("FAKE_BIND_DELAY_MS", 0, 0);
    g_cfg.token_ms = env_long("FAKE_TOKEN_MS", 0, 0);
    g_cfg.tokens = env_long("FAKE_TOKENS", 8, 0);
    g_cfg.newline_every = env_long("FAKE_NEWLINE_EVERY", 0, 0);
    g_cfg.memory = env_size("FAKE_MEMORY");
    g_cfg.memory_per_request = env_size("FAKE_MEMORY_PER_REQUEST");
    g_cfg.crash_at_load = env_flag("FAKE_CRASH_AT_LOAD");
    g_cfg.crash_after = env_long("FAKE_CRASH_AFTER", -1, 0);
    g_cfg.health_hang_after = env_flag("FAKE_HEALTH_HANG") ? 0
                            : env_long("FAKE_HEALTH_HANG_AFTER", -1, 0);
    g_cfg.metrics_hang = env_flag("FAKE_METRICS_HANG");
    /* llama.cpp's is_truthy: only these turn it on; --metrics does too. */
    const char *em = getenv("LLAMA_ARG_ENDPOINT_METRICS");
    g_cfg.metrics = em && (streq(em, "on") || streq(em, "enabled") || streq(em, "true") || streq(em, "1"));
    g_cfg.exit_after_ms = env_long("FAKE_EXIT_AFTER_MS", -1, 0);
    g_cfg.deterministic = env_flag("FAKE_DETERMINISTIC");
    g_cfg.ignore_sigterm = env_flag("FAKE_IGNORE_SIGTERM");
    g_cfg.keepalive_ms = env_long("FAKE_KEEPALIVE_MS", 5000, 1);
    g_cfg.n_ctx_train = env_long("FAKE_N_CTX_TRAIN", 4096, 1);
    /* A hit changes cache_n and the timings: deterministic answers come
     * without a cache unless one is asked for. */
    g_cfg.prompt_cache = env_long("FAKE_PROMPT_CACHE", g_cfg.deterministic ? 0 : 16, 0);
    g_cfg.prompt_ms_per_token = env_double("FAKE_PROMPT_MS_PER_TOKEN", 0);
    g_cfg.verbose = env_flag("FAKE_VERBOSE");
    g_cfg.log_auth = env_flag("FAKE_LOG_AUTH");
    g_cfg.vram_dir = getenv("NVML_STANDIN_DIR");
    if (g_cfg.vram_dir && !*g_cfg.vram_dir)
        g_cfg.vram_dir = NULL;
    g_cfg.vram_mb = env_long("FAKE_VRAM_MB", -1, 0);
    g_cfg.n_layers = env_long("FAKE_N_LAYERS", 16, 1);
    const char *keys = getenv("LLAMA_API_KEY");
    if (keys)
        add_api_keys(keys);
}

static bool arg_is(const char *a, const char *short_name, const char *long_name)
{
    return (short_name && streq(a, short_name)) || streq(a, long_name);
}

static const char *arg_value(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc)
        fatal("error: argument %s expects a value", argv[*i]);
    return argv[++*i];
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (arg_is(a, "-m", "--model"))
            g_cfg.model = arg_value(argc, argv, &i);
        else if (arg_is(a, NULL, "--host"))
            g_cfg.host = arg_value(argc, argv, &i);
        else if (arg_is(a, NULL, "--port")) {
            g_cfg.port = parse_long(a, arg_value(argc, argv, &i), 0, 65535);
            g_cfg.port_given = true;
        } else if (arg_is(a, "-c", "--ctx-size"))
            g_cfg.n_ctx = parse_long(a, arg_value(argc, argv, &i), 0, INT_MAX);
        else if (arg_is(a, "-np", "--parallel"))
            g_cfg.n_parallel = parse_long(a, arg_value(argc, argv, &i), -1, 4096);
        else if (arg_is(a, "-a", "--alias"))
            g_cfg.aliases = arg_value(argc, argv, &i);
        else if (arg_is(a, NULL, "--api-key")) {
            if (getenv("LLAMA_API_KEY"))   /* llama.cpp's words; the keys add up all the same */
                fprintf(stderr, "warn: LLAMA_API_KEY environment variable is set, but will be "
                        "overwritten by command line argument --api-key\n");
            add_api_keys(arg_value(argc, argv, &i));
        }
        else if (arg_is(a, "-to", "--timeout"))
            g_cfg.timeout_s = parse_long(a, arg_value(argc, argv, &i), 1, INT_MAX);
        else if (arg_is(a, NULL, "--metrics"))
            g_cfg.metrics = true;
        else if (arg_is(a, NULL, "--slots"))
            g_cfg.slots = true;
        else if (arg_is(a, NULL, "--no-slots"))
            g_cfg.slots = false;
        else if (arg_is(a, NULL, "--no-mmap"))
            g_cfg.use_mmap = false;
        else if (arg_is(a, NULL, "--mmap"))
            g_cfg.use_mmap = true;
        else if (arg_is(a, NULL, "--load-mode"))
            g_cfg.use_mmap = strncmp(arg_value(argc, argv, &i), "mmap", 4) == 0;
        else if (arg_is(a, "-ngl", "--gpu-layers") || streq(a, "--n-gpu-layers")) {
            const char *v = arg_value(argc, argv, &i);
            g_cfg.n_gpu_layers = streq(v, "auto") || streq(v, "all") ? -1 : parse_long(a, v, 0, INT_MAX);
        } else if (arg_is(a, "-dev", "--device"))
            g_cfg.device = arg_value(argc, argv, &i);
        else if (arg_is(a, "-v", "--verbose") || streq(a, "--log-verbose"))
            g_cfg.verbose = true;
        else if (arg_is(a, "-h", "--help"))
            usage();
        else if (a[0] == '-') {     /* a flag we do not emulate: skip it and its value */
            if (i + 1 < argc && argv[i + 1][0] != '-')
                i++;
        } else
            fatal("error: invalid argument: %s", a);
    }
}

/* Slots, context and the API id, as llama-server derives them. */
static void derive_config(void)
{
    if (!g_cfg.model)
        fatal("error: no model given (-m PATH); fake-llama-server does not emulate router mode");
    long n_ctx = g_cfg.n_ctx > 0 ? g_cfg.n_ctx : g_cfg.n_ctx_train;
    if (g_cfg.n_parallel < 1) {
        SRV_LOG('I', "llama_server", "n_parallel is set to auto, using n_parallel = 4 and kv_unified = true");
        g_cfg.n_slots = 4;
        g_cfg.slot_n_ctx = n_ctx;       /* unified KV: every slot may use all of it */
    } else {
        g_cfg.n_slots = (int)g_cfg.n_parallel;
        g_cfg.slot_n_ctx = n_ctx / g_cfg.n_parallel;
    }
    const char *id = g_cfg.model;
    size_t n = strlen(id);
    if (g_cfg.aliases && *g_cfg.aliases) {
        id = g_cfg.aliases;
        n = strcspn(id, ",");
    }
    if (!copy_field(g_cfg.model_id, sizeof g_cfg.model_id, id, n))
        fatal("error: model name too long");
    sb_json_str(&g_model_json, g_cfg.model_id, strlen(g_cfg.model_id));
}

static int open_listener(void)
{
    char err[512] = "";
    int fd;
    if (host_is_unix(g_cfg.host)) {
        SRV_LOG('I', "start", "setting address family to AF_UNIX");
        fd = listen_unix(g_cfg.host, err, sizeof err);
    } else {
        SRV_LOG('I', "start", "binding port with default address family");
        fd = listen_tcp(g_cfg.host, &g_cfg.port, err, sizeof err);
    }
    if (fd < 0) {
        log_msg('W', "%s", err);
        SRV_LOG('E', "start", "couldn't bind HTTP server socket, hostname: %s, port: %ld",
                g_cfg.host, g_cfg.port);
    }
    return fd;
}

int main(int argc, char **argv)
{
    g_t0_us = now_us();
    g_start_unix = (long long)time(NULL);
    g_rng = (uint64_t)g_t0_us ^ ((uint64_t)getpid() << 32) ^ (uint64_t)g_start_unix;
    if (g_rng == 0)
        g_rng = 88172645463325252ULL;
    read_environment();
    parse_args(argc, argv);

    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR ||
        (g_cfg.ignore_sigterm && signal(SIGTERM, SIG_IGN) == SIG_ERR))
        fatal("signal: %s", strerror(errno));

    log_msg('I', "build: 9749 (%s) with cc for fake-llama-server", "fake0000");
    log_msg('I', "system info: n_threads = %ld, fake-llama-server (no inference)",
            sysconf(_SC_NPROCESSORS_ONLN));
    derive_config();
    if (!g_cfg.port_given && !host_is_unix(g_cfg.host))
        SRV_LOG('W', "llama_server", "--port not given: using 8080 (the default will become 9931)");
    pool_init(g_cfg.n_slots);
    pcache_init(g_cfg.prompt_cache);

    if (g_cfg.bind_delay_ms > 0)
        sleep_ms(g_cfg.bind_delay_ms);
    g_listen_fd = open_listener();
    if (g_listen_fd < 0) {
        SRV_LOG('E', "llama_server", "exiting due to HTTP server error");
        return 1;
    }
    pthread_t acceptor;
    int e = pthread_create(&acceptor, NULL, accept_main, NULL);
    if (e)
        fatal("pthread_create: %s", strerror(e));

    SRV_LOG('I', "llama_server", "loading model");
    if (!model_load()) {
        SRV_LOG('E', "load_model", "failed to load model, '%s'", g_cfg.model);
        SRV_LOG('E', "llama_server", "exiting due to model loading error");
        /* Real llama-server's cleanup may log after the error line. */
        SRV_LOG('I', "operator()", "operator(): cleaning up before exit...");
        vram_release();
        _exit(1);
    }
    SRV_LOG('I', "init", "initializing slots, n_slots = %d", g_cfg.n_slots);
    for (int i = 0; i < g_cfg.n_slots; i++)
        SLT_LOG('I', "init", i, -1, "new slot, n_ctx = %ld", g_cfg.slot_n_ctx);

    install_signal_handlers();
    atomic_store(&g_ready, true);
    SRV_LOG('I', "llama_server", "model loaded");
    if (host_is_unix(g_cfg.host))
        SRV_LOG('I', "llama_server", "listening on unix://%s", g_cfg.host);
    else
        SRV_LOG('I', "llama_server", "listening on http://%s:%ld", g_cfg.host, g_cfg.port);
    SRV_LOG('I', "update_slots", "all slots are idle");

    int sig = wait_for_stop();
    if (sig == 0) {
        SRV_LOG('I', "llama_server", "FAKE_EXIT_AFTER_MS=%ld elapsed: exiting", g_cfg.exit_after_ms);
        vram_release();
        _exit(0);
    }
    shut_down(acceptor, sig);
}
