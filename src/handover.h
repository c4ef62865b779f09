/* handover — what one image of the daemon gives the next at an upgrade
 * (`llama-pool upgrade`, SIGUSR2; see upgrade.h): the sockets it listens
 * on, the client connections idle between two requests, the children it
 * runs, and its counts. A JSON document (version HANDOVER_VERSION) in a
 * memfd; the new image finds the fd's number in $HANDOVER_ENV, or, when it
 * is only asked whether it could take over (the check before the real
 * exec), in $HANDOVER_CHECK_ENV.
 *
 * A child is named by its pid, and told from whatever else might have that
 * pid by its start time (field 22 of /proc/PID/stat, clock ticks since
 * boot) and a hash of its argv (/proc/PID/cmdline): the new image adopts
 * it only when both still match. Fds are numbers valid in the new image
 * (exec keeps them: the old one clears their close-on-exec flag).
 *
 * Pure but for handover_write/handover_read (a memfd) and the /proc
 * readers at the end. */
#ifndef LLAMA_POOL_HANDOVER_H
#define LLAMA_POOL_HANDOVER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define HANDOVER_ENV "LLAMA_POOL_HANDOVER"
#define HANDOVER_CHECK_ENV "LLAMA_POOL_HANDOVER_CHECK"
#define HANDOVER_VERSION 1
#define HANDOVER_MAX_BYTES (64 * 1024 * 1024)

/* A running child. STATE is "starting", "ready" or "stopping". */
struct handover_child {
    char *model;
    unsigned no;                  /* the 1 of tiny#1 */
    pid_t pid;
    unsigned port;
    unsigned long long start_time;
    uint64_t argv_hash;
    int out_fd;                   /* the read end of its stdout/stderr pipe, -1: none */
    char *api_key;
    char state[16];
    double spawned_at, ready_at;  /* unix seconds (ev_now) */
    unsigned restarts, slots;
    bool metrics;                 /* it serves /metrics */
    int device;                   /* -1: no GPU */
    char visible[100];            /* its CUDA_VISIBLE_DEVICES, "" if the daemon's */
};

/* A client connection between two requests. */
struct handover_conn {
    int fd;
    bool trusted;
    bool control;                 /* on the control socket, else on listen */
};

struct handover {
    pid_t pid;                    /* the daemon's (it stays the same) */
    char *from_version;           /* LLAMA_POOL_VERSION of the old image */
    int control_fd;               /* listening sockets; -1: none */
    int public_fd;
    char *control_addr, *public_addr;
    struct handover_conn *conns;
    size_t nconns;
    struct handover_child *children;
    size_t nchildren;
    int reply_fd;                 /* the connection of the `llama-pool upgrade`
                                   * waiting for its answer; -1: none (SIGUSR2) */
    double started_at;            /* when the daemon first started */
    unsigned upgrades;            /* upgrades before this one */
    json_t *usage;                /* usage_to_json(), or NULL */
};

/* H as a document (NULL when out of memory). */
json_t *handover_to_json(const struct handover *h);
/* A document into H (zeroed first; fds absent are -1). 0, or -1 with ERR
 * saying what is wrong with it. handover_free() in both cases. */
int handover_from_json(json_t *j, struct handover *h, char *err, size_t len);
void handover_free(struct handover *h);

/* The document in a new memfd (close-on-exec: the caller clears it for
 * the exec). The fd, or -1 with ERR. */
int handover_write(const struct handover *h, char *err, size_t len);
/* Read it back from FD (at offset 0; FD stays open). 0 or -1 with ERR. */
int handover_read(int fd, struct handover *h, char *err, size_t len);

/* The start time in a /proc/PID/stat line (field 22, after the command in
 * parentheses, which may hold spaces and ')'). 0, or -1 when malformed. */
int handover_parse_stat(const char *line, unsigned long long *start_time);
/* A hash of ARGV's words, each with its terminating NUL, as
 * /proc/PID/cmdline holds them (NULL-terminated vector). */
uint64_t handover_argv_hash(char *const argv[]);
/* The same hash of LEN bytes of a cmdline. */
uint64_t handover_cmdline_hash(const char *cmdline, size_t len);
/* PID's start time and cmdline hash, read from /proc. 0, or -1 (errno
 * set: ESRCH when there is no such process). */
int handover_proc(pid_t pid, unsigned long long *start_time, uint64_t *cmdline_hash);

#endif
