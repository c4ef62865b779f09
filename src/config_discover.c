/* config_discover — the models that models_dir offers: its *.gguf files.
 *
 * Only the file system is read here. Whether a file's name can be a model
 * name, and what happens when it is also a [model NAME] section's, is
 * config.c's to decide (merge_models_dir). */
#define _GNU_SOURCE
#include "config_internal.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <strings.h>
#include <sys/stat.h>

#define SHARD_SUFFIX "-ddddd-of-ddddd"   /* llama.cpp's split naming: -00001-of-00003 */

/* Whether the file stem STEM (LEN bytes) ends with a shard suffix; its part
 * number in *PART when it does. */
static bool ends_with_shard_suffix(const char *stem, size_t len, unsigned *part)
{
    size_t pl = sizeof SHARD_SUFFIX - 1;
    if (len < pl)
        return false;
    const char *s = stem + len - pl;
    for (size_t i = 0; i < pl; i++) {
        if (SHARD_SUFFIX[i] == 'd' ? !isdigit((unsigned char)s[i]) : s[i] != SHARD_SUFFIX[i])
            return false;
    }
    *part = (unsigned)atoi(s + 1);
    return true;
}

/* Whether the directory entry DE of D is a regular file, links followed. */
static bool is_regular(DIR *d, const struct dirent *de)
{
    if (de->d_type == DT_UNKNOWN || de->d_type == DT_LNK) {
        struct stat st;
        return fstatat(dirfd(d), de->d_name, &st, 0) == 0 && S_ISREG(st.st_mode);
    }
    return de->d_type == DT_REG;
}

/* The model name that file NAME gives, as a length: its stem without a
 * shard suffix; 0 when NAME is no model (not *.gguf, hidden, or a later
 * part of a split model). */
static size_t model_name_len(const char *name)
{
    size_t len = strlen(name);
    if (name[0] == '.' || len <= 5 || strcasecmp(name + len - 5, ".gguf"))
        return 0;
    size_t stem = len - 5;
    unsigned part;
    if (ends_with_shard_suffix(name, stem, &part)) {
        if (part != 1)
            return 0;
        stem -= sizeof SHARD_SUFFIX - 1;
    }
    return stem;
}

static int cmp_found(const void *a, const void *b)
{
    const struct config_found *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : strcmp(x->fname, y->fname);
}

int config_discover(const char *dir, struct config_found **found, size_t *n)
{
    *found = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    struct config_found *v = NULL;
    size_t nv = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t name_len = model_name_len(de->d_name);
        if (!name_len || !is_regular(d, de))
            continue;
        xgrow(&v, &cap, nv + 1, sizeof *v);
        struct config_found *f = &v[nv++];
        f->name = xstrndup(de->d_name, name_len);
        f->path = xasprintf("%s/%s", dir, de->d_name);
        f->fname = f->path + strlen(dir) + 1;
        f->used = false;
    }
    closedir(d);
    if (nv > 1)                 /* qsort(NULL, 0, …) is undefined */
        qsort(v, nv, sizeof *v, cmp_found);
    *found = v;
    *n = nv;
    return 0;
}

void config_found_free(struct config_found *found, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(found[i].name);
        free(found[i].path);
    }
    free(found);
}
