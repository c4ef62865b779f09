/* usage — how much each model is used, kept across restarts.
 *
 * Per model, by name: the requests that reached an instance and ended,
 * the prompt and generated tokens their answers reported, the loads
 * (starts that became ready) and the seconds they took, and the wall-clock
 * time of the last request's end and of the last load. `preload = popular
 * N` starts the models at the top of this list at startup; /pool/usage
 * and `status --usage` show it.
 *
 * Kept in STATE_DIR/usage.json when there is a state_dir: read once at
 * startup, then written whole by whoever owns the event loop (the pool):
 * at most every USAGE_SAVE_INTERVAL_S when something changed, and at
 * exit. A save writes usage.json.tmp in the same directory, fsyncs it and
 * renames it over usage.json, so that a crash or a full disk leaves the old
 * file or the new one, never half of one. Nothing here is ever fatal:
 *   - a file that does not parse, or is not the shape written here, is
 *     renamed usage.json.corrupt-UNIXTIME and counting starts afresh;
 *   - a directory that cannot be created, read or written (or a save that
 *     fails) leaves the counts in memory only, from then on.
 * Each case comes back as a result and a message for the caller to log.
 *
 * Bounded: a record with neither a request nor a load for USAGE_KEEP_DAYS
 * is dropped, and past USAGE_MAX_RECORDS the least recently active ones
 * are, at startup and at each save. Records of models no longer
 * configured are kept until then (the model may come back).
 *
 * No clock and no I/O but the state file: times are arguments, in unix
 * seconds (libev's ev_now is wall-clock time). */
#ifndef LLAMA_POOL_USAGE_H
#define LLAMA_POOL_USAGE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define USAGE_FILE "usage.json"
#define USAGE_SAVE_INTERVAL_S 10.0
#define USAGE_KEEP_DAYS 90
#define USAGE_MAX_RECORDS 10000
#define USAGE_MAX_FILE (64 * 1024 * 1024)   /* a larger usage.json is set aside unread */

struct usage;

/* One model's counts. Written by this module only. */
struct usage_record {
    char *name;
    uint64_t requests;          /* requests that ended, answered or not */
    uint64_t prompt_tokens;     /* from the KV cache and processed (cache_n + prompt_n) */
    uint64_t generated_tokens;  /* predicted_n */
    uint64_t loads;             /* starts that became ready */
    double load_seconds;        /* spawn → ready, summed over the loads */
    int64_t last_used;          /* unix seconds of the last request's end; 0: never */
    int64_t last_loaded;        /* unix seconds of the last load; 0: never */
};

/* Empty, counting in memory until usage_open(). NULL when out of memory. */
struct usage *usage_new(void);
void usage_free(struct usage *u);

enum usage_open_result {
    USAGE_OPEN_LOADED,          /* read from the file; MSG: how many models */
    USAGE_OPEN_NEW,             /* no file yet; it is written at the first save */
    USAGE_OPEN_SET_ASIDE,       /* the file was corrupt: MSG says why and where it went;
                                 * counting starts afresh */
    USAGE_OPEN_MEMORY_ONLY,     /* the directory (or the file) cannot be used: MSG
                                 * names the path and the errno text */
};

/* Keep the counts in DIR/usage.json from now on: create DIR (not its
 * parents) when missing, read the file into U (replacing U's records),
 * check that DIR can be written. NOW: for dropping old records. MSG gets
 * one line for the log in every case (warnings for the last two). */
enum usage_open_result usage_open(struct usage *u, const char *dir, double now,
                                  char *msg, size_t len);
/* The state file's path, or NULL when the counts are in memory only. */
const char *usage_path(const struct usage *u);

/* A request for MODEL ended at NOW. Tokens as the answer's timings said
 * (-1: not seen): prompt tokens are CACHE_N + PROMPT_N. A count that finds
 * no memory for a new record is lost (only that one). */
void usage_count_request(struct usage *u, const char *model, double now,
                         long cache_n, long prompt_n, long predicted_n);
/* An instance of MODEL became ready at NOW, SECONDS after its spawn. */
void usage_count_load(struct usage *u, const char *model, double now, double seconds);

/* Whether a count came since the last save. */
bool usage_dirty(const struct usage *u);
/* Write the file now if something changed (and old records out first).
 * 0: written, or nothing to write (or no file to write to); -1: it could
 * not be written, MSG says why: the counts are in memory only from now on
 * (usage_path is NULL). */
int usage_save(struct usage *u, double now, char *msg, size_t len);

/* Every record as the file holds them (NULL when out of memory), and
 * back: U's records replaced by J's, to be saved at the next save. 0, or
 * -1 with WHY (J is not what usage_to_json makes, or out of memory). For
 * handing the counts to a new image of the daemon (upgrade). */
json_t *usage_to_json(const struct usage *u, double now);
int usage_from_json(struct usage *u, json_t *j, char *why, size_t len);

const struct usage_record *usage_find(const struct usage *u, const char *model);
size_t usage_size(const struct usage *u);
/* Every record, most used first: more requests, then the later last_used,
 * then by name. A malloc'd array (*N entries) of pointers that stay valid
 * until the next count, open or save; NULL when there is none or no
 * memory (*N is then 0). */
const struct usage_record **usage_ranked(const struct usage *u, size_t *n);

#endif
