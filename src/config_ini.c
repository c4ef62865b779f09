/* config_ini — pool.conf's lines, split by inih's rules, read here.
 *
 * Why not inih itself: the error contract is "FILE:LINE: message" for every
 * problem, all of them at once, and Debian 12's libinih cannot give that.
 * It is built without INI_HANDLER_LINENO (/usr/include/ini.h: the handler
 * never learns a line number), with a 200-byte line limit (50 for section
 * names), calls its handler for key lines only (a section header with no
 * key after it goes unseen), and returns the number of the first
 * malformed line alone. Reaching line numbers through ini_parse_stream and
 * a reader of our own meant splitting every line here anyway (to hand inih
 * short placeholders for long lines and to see headers and bad lines), and
 * then checking that inih agreed. The rules fit in this file, so they live
 * here alone, and the daemon and the CLI read a file the same way.
 *
 * The rules (inih's, with multi-line values and inline comments on):
 *   - a UTF-8 byte order mark at the start of the file is skipped, and the
 *     whitespace around a line ignored;
 *   - an empty line, or one starting with ';' or '#', is a comment;
 *   - an indented line after a key line (no section header in between)
 *     continues that key's value;
 *   - "[NAME]" starts a section; '[' without ']' is an error;
 *   - anything else is "key = value" or "key: value", split at the first
 *     '=' or ':' and trimmed; a line with neither is an error;
 *   - ';' after whitespace starts a comment, even inside quotes.
 * A NUL byte would cut the line short in every C string from there on: the
 * caller reports it (nul_at), and the line counts as blank. */
#define _GNU_SOURCE
#include "config_internal.h"


/* The first of CHARS in S, or the start of an inline comment (a ';' right
 * after whitespace), or the end. */
static char *find_chars_or_comment(char *s, const char *chars)
{
    bool was_space = false;
    while (*s && (!chars || !strchr(chars, *s)) && !(was_space && *s == ';')) {
        was_space = is_blank(*s);
        s++;
    }
    return s;
}

static char *lskip(char *s)
{
    while (*s && is_blank(*s))
        s++;
    return s;
}

static void rstrip(char *s)
{
    char *e = s + strlen(s);
    while (e > s && is_blank(e[-1]))
        *--e = '\0';
}

static char *trim(char *s)
{
    s = lskip(s);
    rstrip(s);
    return s;
}

/* Sets ls->kind and the parts of the line in ls->cut, cutting it up. */
static void split(struct config_ini *ls)
{
    char *line = ls->cut.data, *start = line;
    if (ls->lineno == 1 && (unsigned char)start[0] == 0xEF
        && (unsigned char)start[1] == 0xBB && (unsigned char)start[2] == 0xBF)
        start += 3;
    start = trim(start);
    ls->key = ls->value = ls->text = NULL;

    if (*start == '\0' || *start == ';' || *start == '#') {
        ls->kind = LINE_BLANK;
    } else if (ls->prev_key && start > line) {
        *find_chars_or_comment(start, NULL) = '\0';
        rstrip(start);
        ls->kind = LINE_CONT;
        ls->key = ls->prev_key;
        ls->value = start;
    } else if (*start == '[') {
        char *end = find_chars_or_comment(start + 1, "]");
        if (*end != ']') {
            ls->kind = LINE_BAD_SECTION;
            return;
        }
        *end = '\0';
        ls->kind = LINE_SECTION;
        ls->text = trim(start + 1);
        free(ls->prev_key);
        ls->prev_key = NULL;
    } else {
        char *end = find_chars_or_comment(start, "=:");
        bool has_value = *end == '=' || *end == ':';
        *end = '\0';
        rstrip(start);
        if (!has_value) {
            ls->kind = LINE_NO_VALUE;
            ls->text = start;
            return;
        }
        char *value = end + 1;
        *find_chars_or_comment(value, NULL) = '\0';
        ls->kind = LINE_KEY;
        ls->key = start;
        ls->value = trim(value);
        free(ls->prev_key);
        ls->prev_key = xstrdup(start);
    }
}

bool config_ini_next(struct config_ini *ls)
{
    if (ls->off >= ls->len)
        return false;
    const char *s = ls->src + ls->off;
    const char *nl = memchr(s, '\n', ls->len - ls->off);
    size_t n = nl ? (size_t)(nl - s) + 1 : ls->len - ls->off;
    const char *nul = memchr(s, '\0', n);
    ls->off += n;
    ls->lineno++;
    ls->raw = s;
    ls->raw_len = n;
    ls->nul_at = nul ? (size_t)(nul - s) + 1 : 0;
    ls->cut.len = 0;
    xbuf_append(&ls->cut, s, nul ? 0 : n);
    split(ls);
    return true;
}

void config_ini_free(struct config_ini *ls)
{
    buf_free(&ls->cut);
    free(ls->prev_key);
    ls->prev_key = NULL;
}
