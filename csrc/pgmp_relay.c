/* pgmp_relay.c: move frames that need no decision from one socket to its peer without Python.
 *
 * Python arms a socket with its peer and the flags table of its current scanner. An armed
 * socket's read is done here: recv, a walk over the frames (the same header checks as
 * pgmp_scan), send of the leading frames Python need not see, and a record that says what was
 * read, sent and counted. The walk stops at the first frame Python must see (a reported type
 * without PGMP_F_COUNT), at a partial frame and at a bad header: those bytes, and any the peer
 * did not take, are Python's, described by the record, in the caller's buffer.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include "pgmp_relay.h"
#include "pgmp_frame.h"

typedef struct {
    int32_t peer;            /* -1: not armed */
    int32_t side;
    const uint8_t *flags;
    uint32_t max_len;
    int32_t pooled;          /* transaction mode's rules for the counted types */
    const uint32_t *limits;  /* per type, the largest length word accepted, or NULL */
    int32_t blocked;         /* Python has unsent bytes for this socket */
    int32_t held;            /* a server between its client's transactions (pgmp_relay_hold) */
    uint32_t touched;        /* the poll round that last relayed from or to it */
    pgmp_binds *binds;       /* a pooled client's named statements on its server, or NULL */
    pgmp_quiet *quiet;       /* a client's quiet state (pgmp_relay_quiet), or NULL */
    pgmp_queue *handoff;     /* a server that may be handed over to this queue's first client */
    uint32_t handoff_epoch;  /* ... in this hand-off epoch */
    uint32_t tag;            /* ... if that client's settings tag is this */
    int32_t owed;            /* a client's requests outstanding, -1 unknown (pgmp_relay_handoff) */
    pgmp_queue *member;      /* an unarmed client whose next plain read joins this queue */
    uint32_t member_tag;     /* ... with this settings tag */
    uint8_t *rest;           /* a server's: what a hand-off could not send (pgmp_relay_take_rest) */
    uint32_t rest_len;
} slot;

/* One client waiting in a pool's queue (pgmp_queue_push). */
struct qentry {
    int32_t fd;              /* -1: left the queue (a hole until it reaches the head) */
    int32_t ok;              /* C may hand it a server */
    uint32_t tag;            /* its settings: a server of this tag only */
    uint8_t *data;
    uint32_t len;
    int32_t count, kind;     /* its requests, as the pooled walk counted them */
    const uint8_t *flags;
    uint32_t max_len;
};

struct pgmp_queue {
    struct qentry *ents;     /* a ring: ents[(head + i) % cap], i < n (holes included) */
    size_t cap, head, n;
    int live;                /* entries that are not holes */
};

struct pgmp_relay {
    slot *slots;
    size_t cap;
    uint32_t round;          /* poll rounds, for slot.touched */
    uint32_t epoch;          /* statement-name epoch (pgmp_relay_retire) */
    uint32_t quiet_epoch;    /* pgmp_relay_quiet_end_all */
    uint64_t quiet_reads;    /* reads kept in quiet state */
    uint8_t *tmp;            /* room to rewrite a read in (tmp_cap bytes), made on first use */
    size_t tmp_cap;
    const struct epoll_event *batch;   /* the events of the poll being relayed, or NULL */
    int batch_n;
    uint32_t handoff_epoch;  /* pgmp_relay_handoff_end_all */
    uint64_t handoffs;       /* servers C handed over */
};

struct bind_entry {
    uint32_t name_off, name_len, sname_off, sname_len, hash;
};

struct pgmp_binds {
    uint8_t *arena;          /* the names, back to back */
    size_t used, arena_cap;
    struct bind_entry *ents;
    size_t n, ents_cap;
    int32_t *index;          /* open addressing over ents, -1 empty; index_cap a power of 2 */
    size_t index_cap;
    int ok;
    uint32_t epoch;
};

static uint32_t name_hash(const uint8_t *p, size_t n)
{
    uint32_t h = 2166136261u;
    size_t i;

    for (i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

pgmp_binds *pgmp_binds_new(void)
{
    return calloc(1, sizeof(pgmp_binds));
}

void pgmp_binds_free(pgmp_binds *t)
{
    if (t != NULL) {
        free(t->arena);
        free(t->ents);
        free(t->index);
        free(t);
    }
}

void pgmp_binds_reset(pgmp_binds *t, uint32_t epoch)
{
    size_t i;

    t->used = 0;
    t->n = 0;
    for (i = 0; i < t->index_cap; i++)
        t->index[i] = -1;
    t->ok = 0;
    t->epoch = epoch;
}

void pgmp_binds_enable(pgmp_binds *t, int ok)
{
    t->ok = ok != 0;
}

int pgmp_binds_enabled(const pgmp_binds *t)
{
    return t->ok;
}

/* The entry of name[0:n], or -1. */
static int binds_find(const pgmp_binds *t, const uint8_t *name, size_t n)
{
    uint32_t h;
    size_t i, mask;

    if (t->n == 0 || n > 0xffffffffu)
        return -1;
    h = name_hash(name, n);
    mask = t->index_cap - 1;
    for (i = h & mask; t->index[i] >= 0; i = (i + 1) & mask) {
        const struct bind_entry *e = &t->ents[t->index[i]];
        if (e->hash == h && e->name_len == n && memcmp(t->arena + e->name_off, name, n) == 0)
            return t->index[i];
    }
    return -1;
}

static void binds_place(pgmp_binds *t, int32_t k)
{
    size_t mask = t->index_cap - 1, i;

    for (i = t->ents[k].hash & mask; t->index[i] >= 0; i = (i + 1) & mask)
        ;
    t->index[i] = k;
}

int pgmp_binds_add(pgmp_binds *t, const uint8_t *name, size_t name_len, const uint8_t *sname, size_t sname_len)
{
    struct bind_entry *e;
    int k;

    if ((k = binds_find(t, name, name_len)) >= 0)
        return k;
    if (name_len + sname_len > 0x7fffffffu - t->used || t->n >= PGMP_BINDS_MAX)
        return -1;
    if (t->used + name_len + sname_len > t->arena_cap) {
        size_t want = t->arena_cap ? t->arena_cap : 256;
        uint8_t *a;
        while (want < t->used + name_len + sname_len)
            want *= 2;
        if ((a = realloc(t->arena, want)) == NULL)
            return -1;
        t->arena = a;
        t->arena_cap = want;
    }
    if (t->n == t->ents_cap) {
        size_t want = t->ents_cap ? 2 * t->ents_cap : 8;
        struct bind_entry *a = realloc(t->ents, want * sizeof(*a));
        if (a == NULL)
            return -1;
        t->ents = a;
        t->ents_cap = want;
    }
    if (2 * (t->n + 1) > t->index_cap) {
        size_t want = t->index_cap ? 2 * t->index_cap : 16, i;
        int32_t *a = malloc(want * sizeof(*a));
        if (a == NULL)
            return -1;
        free(t->index);
        t->index = a;
        t->index_cap = want;
        for (i = 0; i < want; i++)
            a[i] = -1;
        for (i = 0; i < t->n; i++)
            binds_place(t, (int32_t)i);
    }
    e = &t->ents[t->n];
    e->name_off = (uint32_t)t->used;
    e->name_len = (uint32_t)name_len;
    memcpy(t->arena + t->used, name, name_len);
    t->used += name_len;
    e->sname_off = (uint32_t)t->used;
    e->sname_len = (uint32_t)sname_len;
    memcpy(t->arena + t->used, sname, sname_len);
    t->used += sname_len;
    e->hash = name_hash(name, name_len);
    k = (int)t->n++;
    binds_place(t, k);
    return k;
}

static void clear_slot(slot *s)
{
    s->peer = -1;
    s->side = 0;
    s->flags = NULL;
    s->max_len = 0;
    s->pooled = 0;
    s->limits = NULL;
    s->blocked = 0;
    s->held = 0;
    s->touched = 0;
    s->binds = NULL;
    s->quiet = NULL;
    s->handoff = NULL;
    s->handoff_epoch = 0;
    s->tag = 0;
    s->owed = -1;
    s->member = NULL;
    s->member_tag = 0;
    free(s->rest);
    s->rest = NULL;
    s->rest_len = 0;
}

pgmp_relay *pgmp_relay_new(void)
{
    return calloc(1, sizeof(pgmp_relay));
}

void pgmp_relay_free(pgmp_relay *r)
{
    if (r != NULL) {
        size_t i;
        for (i = 0; i < r->cap; i++)
            free(r->slots[i].rest);
        free(r->slots);
        free(r->tmp);
        free(r);
    }
}

static slot *get_slot(pgmp_relay *r, int fd)
{
    if (fd < 0 || (size_t)fd >= r->cap)
        return NULL;
    return &r->slots[fd];
}

static int grow(pgmp_relay *r, int fd)
{
    size_t want, i;
    slot *s;

    if ((size_t)fd < r->cap)
        return 0;
    want = r->cap ? r->cap : 256;
    while (want <= (size_t)fd)
        want *= 2;
    s = realloc(r->slots, want * sizeof(slot));
    if (s == NULL)
        return -1;
    for (i = r->cap; i < want; i++) {
        s[i].rest = NULL;
        clear_slot(&s[i]);
    }
    r->slots = s;
    r->cap = want;
    return 0;
}

int pgmp_relay_arm(pgmp_relay *r, int fd, int peer, const uint8_t *flags, uint32_t max_len, int side,
                   int pooled, const uint32_t *limits)
{
    slot *s;

    if (fd < 0 || peer < 0 || flags == NULL)
        return -1;
    if (grow(r, fd > peer ? fd : peer) != 0)
        return -1;
    s = &r->slots[fd];
    if (s->peer != peer) {
        s->handoff = NULL;   /* (Python disarms first; a new peer starts with nothing known) */
        s->owed = -1;
    }
    s->member = NULL;
    s->peer = peer;
    s->side = side;
    s->flags = flags;
    s->max_len = max_len > PGMP_LEN_MAX ? PGMP_LEN_MAX : max_len;
    s->pooled = pooled != 0;
    s->limits = limits;
    return 0;
}

void pgmp_relay_binds(pgmp_relay *r, int fd, pgmp_binds *t)
{
    slot *s = get_slot(r, fd);

    if (s != NULL && s->peer >= 0 && s->side == 0 && s->pooled)
        s->binds = t;
}

void pgmp_quiet_start(pgmp_quiet *q, int hold, int status, double t_query, double t_xact, double t_ready)
{
    q->hold = hold != 0;
    q->outstanding = 0;
    q->head = 0;
    q->last_batch = 0;
    q->nused = 0;
    q->status = status;
    q->t_query = t_query;
    q->t_xact = t_xact;
    q->t_ready = t_ready;
    q->t_used = 0.0;
    q->rx_client = q->rx_server = 0;
    q->readies = q->xacts = q->assigns = 0;
    q->query_us = q->xact_us = 0;
    memset(q->query_hist, 0, sizeof q->query_hist);
    memset(q->xact_hist, 0, sizeof q->xact_hist);
    q->on = 1;
}

void pgmp_relay_quiet(pgmp_relay *r, int fd, pgmp_quiet *q)
{
    slot *s = get_slot(r, fd);

    if (s != NULL && s->peer >= 0 && s->side == 0) {
        s->quiet = q;
        if (q != NULL)
            q->epoch = r->quiet_epoch;
    }
}

uint32_t pgmp_relay_quiet_epoch(pgmp_relay *r)
{
    return r->quiet_epoch;
}

void pgmp_relay_quiet_end_all(pgmp_relay *r)
{
    r->quiet_epoch++;
}

uint64_t pgmp_relay_quiet_reads(pgmp_relay *r)
{
    return r->quiet_reads;
}

uint32_t pgmp_relay_epoch(pgmp_relay *r)
{
    return r->epoch;
}

void pgmp_relay_retire(pgmp_relay *r)
{
    r->epoch++;
}

void pgmp_relay_disarm(pgmp_relay *r, int fd)
{
    slot *s = get_slot(r, fd);

    if (s != NULL) {
        int blocked = s->blocked;
        clear_slot(s);
        s->blocked = blocked;    /* a property of the socket as a destination, not of the arming */
    }
}

void pgmp_relay_blocked(pgmp_relay *r, int fd, int blocked)
{
    if (grow(r, fd) == 0)
        r->slots[fd].blocked = blocked != 0;
}

void pgmp_relay_hold(pgmp_relay *r, int fd, int held)
{
    slot *s = get_slot(r, fd);

    if (s != NULL && s->peer >= 0)
        s->held = held != 0;
}

int pgmp_relay_held(pgmp_relay *r, int fd)
{
    slot *s = get_slot(r, fd);

    return s != NULL && s->peer >= 0 && s->held;
}

int pgmp_relay_is_armed(pgmp_relay *r, int fd)
{
    slot *s = get_slot(r, fd);

    return s != NULL && s->peer >= 0;
}

void pgmp_relay_handoff(pgmp_relay *r, int fd, pgmp_queue *q, int owed, uint32_t tag)
{
    slot *s = get_slot(r, fd), *c;

    if (s == NULL || s->peer < 0 || s->side != 1 || !s->pooled)
        return;
    c = get_slot(r, s->peer);
    if (c == NULL || c->peer != fd || c->side != 0) {
        s->handoff = NULL;
        return;
    }
    c->owed = owed < 0 ? -1 : owed;
    s->handoff = tag != 0 ? q : NULL;
    s->tag = tag;
    s->handoff_epoch = r->handoff_epoch;
}

void pgmp_relay_handoff_end_all(pgmp_relay *r)
{
    r->handoff_epoch++;
}

uint64_t pgmp_relay_handoffs(pgmp_relay *r)
{
    return r->handoffs;
}

pgmp_queue *pgmp_queue_new(void)
{
    return calloc(1, sizeof(pgmp_queue));
}

static struct qentry *qat(const pgmp_queue *q, size_t i)
{
    return &q->ents[(q->head + i) % q->cap];
}

/* Drop the holes at the head. */
static void queue_trim(pgmp_queue *q)
{
    while (q->n > 0 && qat(q, 0)->fd < 0) {
        q->head = (q->head + 1) % q->cap;
        q->n--;
    }
    if (q->n == 0)
        q->head = 0;
}

void pgmp_queue_clear(pgmp_queue *q)
{
    size_t i;

    for (i = 0; i < q->n; i++) {
        struct qentry *e = qat(q, i);
        free(e->data);
        e->data = NULL;
        e->fd = -1;
    }
    q->n = q->head = 0;
    q->live = 0;
}

void pgmp_queue_free(pgmp_queue *q)
{
    if (q != NULL) {
        pgmp_queue_clear(q);
        free(q->ents);
        free(q);
    }
}

int pgmp_queue_len(const pgmp_queue *q)
{
    return q->live;
}

static void walk(uint8_t *buf, size_t len, size_t cap, const uint8_t *flags, uint32_t max_len, int side,
                 int pooled, const uint32_t *limits, const pgmp_binds *binds, uint8_t *tmp, int32_t *rec);

int pgmp_queue_push(pgmp_queue *q, int fd, const uint8_t *data, size_t len, const uint8_t *flags,
                    uint32_t max_len, uint32_t tag)
{
    struct qentry *e;
    int32_t rec[PGMP_R_SIZE];

    if (fd < 0)
        return -1;
    if (q->n == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 64, i;
        struct qentry *ents = malloc(cap * sizeof *ents);
        if (ents == NULL)
            return -1;
        for (i = 0; i < q->n; i++)
            ents[i] = *qat(q, i);
        free(q->ents);
        q->ents = ents;
        q->cap = cap;
        q->head = 0;
    }
    e = &q->ents[(q->head + q->n) % q->cap];
    e->fd = fd;
    e->ok = 0;
    e->data = NULL;
    e->len = 0;
    e->count = 0;
    e->kind = -1;
    e->tag = tag;
    e->flags = flags;
    e->max_len = max_len > PGMP_LEN_MAX ? PGMP_LEN_MAX : max_len;
    if (tag != 0 && data != NULL && len > 0 && len <= 0x7fffffff && flags != NULL && (e->data = malloc(len)) != NULL) {
        memcpy(e->data, data, len);
        e->len = (uint32_t)len;
        walk(e->data, len, len, flags, e->max_len, 0, 1, NULL, NULL, NULL, rec);
        if ((size_t)rec[PGMP_R_GOOD] == len && rec[PGMP_R_COUNT] > 0 && rec[PGMP_R_SYNC] == 0 &&
            !(rec[PGMP_R_KIND] >= PGMP_KIND_BATCH && (rec[PGMP_R_KIND] & PGMP_BATCH_NAMED))) {
            e->ok = 1;
            e->count = rec[PGMP_R_COUNT];
            e->kind = rec[PGMP_R_KIND];
        } else {
            free(e->data);
            e->data = NULL;
            e->len = 0;
        }
    }
    q->n++;
    q->live++;
    return e->ok;
}

static struct qentry *queue_find(pgmp_queue *q, int fd)
{
    size_t i;

    for (i = 0; i < q->n; i++) {
        struct qentry *e = qat(q, i);
        if (e->fd == fd)
            return e;
    }
    return NULL;
}

/* Close up the holes (clients that left from the middle), in order. */
static void queue_compact(pgmp_queue *q)
{
    size_t i, k = 0;

    for (i = 0; i < q->n; i++) {
        struct qentry *e = qat(q, i);
        if (e->fd >= 0)
            *qat(q, k++) = *e;       /* (k <= i: nothing live is overwritten) */
    }
    q->n = k;
}

static void queue_drop(pgmp_queue *q, struct qentry *e)
{
    free(e->data);
    e->data = NULL;
    e->fd = -1;
    e->ok = 0;
    q->live--;
    queue_trim(q);
    if (q->n > 2 * (size_t)q->live + 32)
        queue_compact(q);
}

int pgmp_queue_remove(pgmp_queue *q, int fd)
{
    struct qentry *e = queue_find(q, fd);

    if (e == NULL)
        return 0;
    queue_drop(q, e);
    return 1;
}

long pgmp_queue_data(const pgmp_queue *q, int fd, uint8_t *out, size_t cap)
{
    size_t i;

    for (i = 0; i < q->n; i++) {
        const struct qentry *e = qat(q, i);
        if (e->fd == fd) {
            if (e->data != NULL && cap > 0)
                memcpy(out, e->data, e->len < cap ? e->len : cap);
            return (long)e->len;
        }
    }
    return -1;
}

long pgmp_relay_take_rest(pgmp_relay *r, int fd, uint8_t *out, size_t cap)
{
    slot *s = get_slot(r, fd);
    long n;

    if (s == NULL || s->rest == NULL)
        return 0;
    n = (long)s->rest_len;
    if (cap < s->rest_len)
        return n;                /* no room: its length only, nothing let go */
    memcpy(out, s->rest, s->rest_len);
    free(s->rest);
    s->rest = NULL;
    s->rest_len = 0;
    return n;
}

void pgmp_queue_block(pgmp_queue *q, int fd)
{
    struct qentry *e = queue_find(q, fd);

    if (e != NULL && e->ok) {
        e->ok = 0;
        free(e->data);
        e->data = NULL;
        e->len = 0;
    }
}

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* The words of sql.py's _TRIGGER, by length, lower case. */
static const char *const trigger_words[] = {
    "do", "end", "set", "call", "load", "temp", "abort", "begin", "reset", "start", "commit", "create",
    "listen", "declare", "discard", "prepare", "release", "rollback", "unlisten", "savepoint",
    "temporary", NULL
};

static int word_char(uint8_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static uint8_t lower(uint8_t c)
{
    return (c >= 'A' && c <= 'Z') ? (uint8_t)(c + 32) : c;
}

/* s[0:n] holds the lower-case ASCII text lit, anywhere, ASCII case folded */
static int contains_folded(const uint8_t *s, size_t n, const char *lit)
{
    size_t m = strlen(lit), i, j;

    for (i = 0; i + m <= n; i++) {
        for (j = 0; j < m && lower(s[i + j]) == (uint8_t)lit[j]; j++)
            ;
        if (j == m)
            return 1;
    }
    return 0;
}

int pgmp_sql_trigger(const char *chars, size_t len)
{
    const uint8_t *text = (const uint8_t *)chars;
    size_t pos = 0;

    while (pos < len) {
        size_t start, n, k;

        if (!word_char(text[pos])) {
            pos++;
            continue;
        }
        start = pos;
        while (pos < len && word_char(text[pos]))
            pos++;
        n = pos - start;
        if (n >= 2 && n <= 9) {
            for (k = 0; trigger_words[k] != NULL; k++) {
                const char *w = trigger_words[k];
                size_t j;

                if (strlen(w) != n)
                    continue;
                for (j = 0; j < n && lower(text[start + j]) == (uint8_t)w[j]; j++)
                    ;
                if (j == n)
                    return 1;
            }
        }
        /* advisory_lock and set_config are made of word characters: within one run */
        if (n >= 10 && (contains_folded(text + start, n, "advisory_lock") ||
                        contains_folded(text + start, n, "set_config")))
            return 1;
    }
    return 0;
}

/* CommandComplete tags Python must see in pooled mode: session commands (link.py's
 * _SESSION_TAGS) and the ones that drop prepared statements (prepared.py). */
static const char *const session_tags[] = {
    "SET", "RESET", "DISCARD", "LISTEN", "PREPARE", "LOAD", "DEALLOCATE", NULL
};

static int session_tag(const uint8_t *tag, size_t n)
{
    size_t k;

    /* a prefix is enough: a tag that merely starts like one goes to Python too, which decides */
    for (k = 0; session_tags[k] != NULL; k++) {
        size_t m = strlen(session_tags[k]);
        if (n >= m && memcmp(tag, session_tags[k], m) == 0)
            return 1;
    }
    return 0;
}

static int space_char(uint8_t c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* The next word of text[*pos:len] after whitespace, lower case into w (at most 11 bytes, NUL
 * ended); its length, 0 if none, -1 if it is longer or is followed by a character that is
 * neither whitespace nor ';' (then the text is not a bare transaction command). */
static int next_word(const uint8_t *text, size_t len, size_t *pos, char *w)
{
    size_t p = *pos;
    int n = 0;

    while (p < len && space_char(text[p]))
        p++;
    while (p < len && word_char(text[p])) {
        if (n == 11)
            return -1;
        w[n++] = (char)lower(text[p++]);
    }
    w[n] = 0;
    if (p < len && !space_char(text[p]) && text[p] != ';')
        return -1;
    *pos = p;
    return n;
}

int pgmp_sql_control(const char *chars, size_t len)
{
    const uint8_t *text = (const uint8_t *)chars;
    char w1[12], w2[12], w3[12];
    size_t pos = 0;
    int kind;

    if (next_word(text, len, &pos, w1) <= 0)
        return 0;
    if (strcmp(w1, "begin") == 0 || strcmp(w1, "start") == 0)
        kind = 'b';
    else if (strcmp(w1, "commit") == 0 || strcmp(w1, "end") == 0)
        kind = 'c';
    else if (strcmp(w1, "rollback") == 0 || strcmp(w1, "abort") == 0)
        kind = 'r';
    else
        return 0;
    if (next_word(text, len, &pos, w2) < 0)
        return 0;
    if (w1[0] == 's' ? strcmp(w2, "transaction") != 0
                     : (w2[0] != 0 && strcmp(w2, "work") != 0 && strcmp(w2, "transaction") != 0))
        return 0;
    while (pos < len && space_char(text[pos]))
        pos++;
    if (pos < len && text[pos] == ';')
        pos++;
    if (next_word(text, len, &pos, w3) != 0 || pos != len)
        return 0;                                    /* more than one statement, or options */
    return kind;
}

int pgmp_sql_dml(const char *chars, size_t len)
{
    const uint8_t *text = (const uint8_t *)chars, *semi;
    char w[12];
    size_t pos = 0;

    if (next_word(text, len, &pos, w) != 6 ||
        (strcmp(w, "update") != 0 && strcmp(w, "insert") != 0 && strcmp(w, "delete") != 0))
        return 0;
    semi = memchr(text, ';', len);                   /* one statement: a ';' only at the end */
    if (semi != NULL) {
        for (pos = (size_t)(semi - text) + 1; pos < len; pos++)
            if (!space_char(text[pos]))
                return 0;
    }
    /* functions that leave session state, found by name anywhere (as the prefilter does) */
    return !contains_folded(text, len, "advisory_lock") && !contains_folded(text, len, "set_config");
}

/* A statement text the relay may pass in pooled mode: 'Q' for one with no trigger word or for one
 * INSERT, UPDATE or DELETE (pgmp_sql_dml: its SET, TEMP, ... are not session commands), 'b', 'c'
 * or 'r' for a bare BEGIN, COMMIT or ROLLBACK (pgmp_sql_control), 0 for one Python must see. */
static int text_kind(const uint8_t *text, size_t n)
{
    if (!pgmp_sql_trigger((const char *)text, n) || pgmp_sql_dml((const char *)text, n))
        return 'Q';
    return pgmp_sql_control((const char *)text, n);
}

/* A pooled client's Query the relay may pass: its text_kind when it is one string ending at the
 * frame's end, else 0. */
static int query_kind(const uint8_t *body, size_t n)
{
    if (n == 0 || memchr(body, 0, n) != body + n - 1)
        return 0;
    return text_kind(body, n - 1);
}

static uint32_t be16(const uint8_t *p)
{
    return ((uint32_t)p[0] << 8) | (uint32_t)p[1];
}

/* The frame at buf[pos:len], if its header passes the scanner's checks and it is whole here: 1,
 * with its flag and length word in *flag and *declared; else 0 (bad or partial: Python's). */
static int whole_frame(const uint8_t *buf, size_t len, size_t pos, const uint8_t *flags, uint32_t max_len,
                       uint8_t *flag, uint32_t *declared)
{
    if (len - pos < 5)
        return 0;
    *flag = flags[buf[pos]];
    *declared = be32(buf + pos + 1);
    return pgmp_check_header(*flag, *declared, max_len) == PGMP_ERR_NONE && *declared - 4 <= len - pos - 5;
}

/* A reported frame the relay may pass: a counted type within its length limit (a longer one is
 * Python's, which refuses it). */
static int counted(uint8_t type, uint8_t flag, uint32_t declared, const uint32_t *limits)
{
    return (flag & PGMP_F_COUNT) && (limits == NULL || declared <= limits[type]);
}

/* An unnamed Parse's body that frontend.check_message accepts: its text's kind as text_kind
 * finds it ('Q', 'b', 'c', 'r'), or 0. */
static int plain_parse(const uint8_t *b, size_t n)
{
    const uint8_t *nul;
    size_t q;

    if (n < 1 || b[0] != 0)
        return 0;                                    /* a named statement: Python renames it */
    nul = memchr(b + 1, 0, n - 1);
    if (nul == NULL)
        return 0;
    q = (size_t)(nul - b) + 1;                       /* after the text's NUL: the type count */
    if (n - q < 2 || n - q - 2 != 4 * (size_t)be16(b + q))
        return 0;
    return text_kind(b + 1, (size_t)(nul - b) - 1);
}

/* A Bind to the unnamed portal that frontend.check_message accepts, with parameter format codes
 * 0 or 1 only (anything else is Python's, and the server's): the length of its statement name
 * (0: the unnamed statement), or -1. */
static long plain_bind(const uint8_t *b, size_t n)
{
    const uint8_t *nul;
    size_t p, nf, np, nr, i;

    if (n < 2 || b[0] != 0)
        return -1;
    if ((nul = memchr(b + 1, 0, n - 1)) == NULL)
        return -1;
    p = (size_t)(nul - b) + 1;
    if (n - p < 2)
        return -1;
    nf = be16(b + p);
    p += 2;
    if ((n - p) / 2 < nf)
        return -1;
    for (i = 0; i < nf; i++)
        if (be16(b + p + 2 * i) > 1)
            return -1;
    p += 2 * nf;
    if (n - p < 2)
        return -1;
    np = be16(b + p);
    p += 2;
    if (nf > 1 && nf != np)
        return -1;
    for (i = 0; i < np; i++) {
        uint32_t l;

        if (n - p < 4)
            return -1;
        l = be32(b + p);
        p += 4;
        if (l == 0xffffffffu)
            continue;                                /* NULL */
        if (l > 0x7fffffffu || n - p < l)
            return -1;
        p += l;
    }
    if (n - p < 2)
        return -1;
    nr = be16(b + p);
    p += 2;
    return n - p == 2 * nr ? (long)(nul - b) - 1 : -1;
}

/* A named batch's Bind to rewrite: the frame's offset, its statement name's length, the entry. */
struct rewrite {
    size_t frame;
    uint32_t name_len;
    int32_t entry;
};

/* An extended-protocol batch at buf[pos:len] the relay passes, whole up to its Sync. Either an
 * unnamed one: Parse, an optional Describe of the statement, then optionally Bind, Describe of
 * the portal, Execute; or, with binds, a named one: a Bind of a statement in the table, then
 * optionally Describe of the portal and Execute. In that order, each at most once, Flushes
 * anywhere. Returns its shape (PGMP_BATCH_* bits, a transaction command's PGMP_BATCH_CONTROL
 * bits) and sets *end after the Sync, and for a named one *rw, or 0 when the batch is not one
 * the relay passes (then none of it is passed). */
static int plain_batch(const uint8_t *buf, size_t len, size_t pos, const uint8_t *flags, uint32_t max_len,
                       const uint32_t *limits, const pgmp_binds *binds, size_t *end, struct rewrite *rw)
{
    int shape = 0, stage = 0, k;
    long name_len;
    uint8_t flag;
    uint32_t declared;

    while (whole_frame(buf, len, pos, flags, max_len, &flag, &declared)) {
        uint8_t type = buf[pos];
        const uint8_t *body = buf + pos + 5;
        size_t n = declared - 4, at = pos;

        pos += (size_t)declared + 1;
        if (!(flag & PGMP_F_REPORT))
            continue;                                /* a Flush: it passes here as anywhere */
        if (!counted(type, flag, declared, limits))
            return 0;
        switch (type) {
        case 'P':
            if (stage != 0 || (k = plain_parse(body, n)) == 0)
                return 0;
            stage = 1;
            shape |= PGMP_BATCH_PARSE;
            if (k != 'Q')
                shape |= PGMP_BATCH_CONTROL * (k == 'b' ? 1 : k == 'c' ? 2 : 3);
            break;
        case 'D':
            if (n != 2 || body[1] != 0)
                return 0;
            if (body[0] == 'S' && stage == 1) {
                stage = 2;
                shape |= PGMP_BATCH_DESC_STMT;
            } else if (body[0] == 'P' && stage == 3) {
                stage = 4;
                shape |= PGMP_BATCH_DESC_PORTAL;
            } else {
                return 0;
            }
            break;
        case 'B':
            if ((name_len = plain_bind(body, n)) < 0)
                return 0;
            if (stage == 0 && name_len > 0 && binds != NULL) {
                /* a statement the client prepared: passed only as its server has it */
                if ((k = binds_find(binds, body + 1, (size_t)name_len)) < 0)
                    return 0;
                rw->frame = at;
                rw->name_len = (uint32_t)name_len;
                rw->entry = k;
                shape |= PGMP_BATCH_NAMED;
            } else if ((stage != 1 && stage != 2) || name_len != 0) {
                return 0;
            }
            stage = 3;
            shape |= PGMP_BATCH_BIND;
            break;
        case 'E':
            if ((stage != 3 && stage != 4) || n != 5 || body[0] != 0)
                return 0;
            stage = 5;
            shape |= PGMP_BATCH_EXECUTE;
            break;
        case 'S':
            if (stage == 0 || n != 0)
                return 0;
            *end = pos;
            return shape;
        default:
            return 0;
        }
    }
    return 0;                                        /* bad, or not whole in this read */
}

/* Pooled mode, server side: the answer at buf[pos:len] up to its ReadyForQuery. Returns the
 * ReadyForQuery's status and sets *end after it when the answer is whole here and every reported
 * frame in it may pass (counted, within its limit, no session command's tag, a well-formed
 * ReadyForQuery); else -1 and *end at the first frame that stopped it. */
static int plain_answer(const uint8_t *buf, size_t len, size_t pos, const uint8_t *flags, uint32_t max_len,
                        const uint32_t *limits, size_t *end)
{
    uint8_t flag;
    uint32_t declared;

    while (whole_frame(buf, len, pos, flags, max_len, &flag, &declared)) {
        uint8_t type = buf[pos];

        if (flag & PGMP_F_REPORT) {
            if (!counted(type, flag, declared, limits))
                break;
            if (type == 'Z') {
                if (declared != 5)
                    break;
                *end = pos + 6;
                return buf[pos + 5];
            }
            if (type == 'C' && session_tag(buf + pos + 5, declared - 4))
                break;
        }
        pos += (size_t)declared + 1;
    }
    *end = pos;
    return -1;
}

/* Pooled mode, server side: how far the relay passes buf[0:len]. Python's Pipeline pops what a
 * frame answers only when it sees the frame, so an answer passes whole, through its ReadyForQuery
 * (Pipeline.answered pops all it answered), or only its leading frames that answer nothing
 * (DataRow, NoticeResponse, ...). */
static size_t plain_answers(const uint8_t *buf, size_t len, const uint8_t *flags, uint32_t max_len,
                            const uint32_t *limits, int32_t *count, int32_t *kind)
{
    size_t pos = 0, stop;
    int status;

    while ((status = plain_answer(buf, len, pos, flags, max_len, limits, &stop)) >= 0) {
        pos = stop;
        ++*count;
        *kind = status;
    }
    while (pos < stop && !(flags[buf[pos]] & PGMP_F_REPORT))
        pos += (size_t)be32(buf + pos + 1) + 1;
    return pos;
}


/* Write the named batches' Binds with their server names: buf[0:len] becomes buf[0:len + growth]
 * through tmp (cap bytes). */
static void rewrite_binds(uint8_t *buf, size_t len, const struct rewrite *rw, int k, const pgmp_binds *binds,
                          uint8_t *tmp)
{
    size_t from = rw[0].frame, out = 0;
    int i;

    for (i = 0; i < k; i++) {
        const struct bind_entry *e = &binds->ents[rw[i].entry];
        size_t name_at = rw[i].frame + 6;            /* type, length word, the unnamed portal's NUL */
        uint32_t declared = be32(buf + rw[i].frame + 1) - rw[i].name_len + e->sname_len;
        size_t head = out + (rw[i].frame - from);

        memcpy(tmp + out, buf + from, name_at - from);
        out += name_at - from;
        tmp[head + 1] = (uint8_t)(declared >> 24);
        tmp[head + 2] = (uint8_t)(declared >> 16);
        tmp[head + 3] = (uint8_t)(declared >> 8);
        tmp[head + 4] = (uint8_t)declared;
        memcpy(tmp + out, binds->arena + e->sname_off, e->sname_len);
        out += e->sname_len;
        from = name_at + rw[i].name_len;
    }
    memcpy(tmp + out, buf + from, len - from);
    out += len - from;
    memcpy(buf + rw[0].frame, tmp, out);
}

/* The walk; tmp: cap bytes of room to rewrite in, or NULL (then no named batch passes). */
static void walk(uint8_t *buf, size_t len, size_t cap, const uint8_t *flags, uint32_t max_len, int side,
                 int pooled, const uint32_t *limits, const pgmp_binds *binds, uint8_t *tmp, int32_t *rec)
{
    size_t pos = 0;
    long long growth = 0;
    int32_t count = 0, kind = -1, sync = 0;
    uint8_t flag;
    uint32_t declared;
    struct rewrite rw[PGMP_REWRITES_MAX];
    int nrw = 0;

    if (max_len > PGMP_LEN_MAX)
        max_len = PGMP_LEN_MAX;
    if (binds != NULL && (!binds->ok || tmp == NULL || cap < len))
        binds = NULL;
    if (pooled && side == 1)
        pos = plain_answers(buf, len, flags, max_len, limits, &count, &kind);
    while ((!pooled || side == 0) && whole_frame(buf, len, pos, flags, max_len, &flag, &declared)) {
        /* (a bad header is the scanner's to report, a partial frame Python's to stream or keep) */
        uint8_t type = buf[pos];

        if (flag & PGMP_F_REPORT) {
            if (!counted(type, flag, declared, limits))
                break;
            if (side == 0 && pooled) {
                int32_t k;
                size_t end = 0;

                if (type == 'Q') {
                    if ((k = query_kind(buf + pos + 5, declared - 4)) == 0)
                        break;
                    end = pos + (size_t)declared + 1;
                } else if (type == 'P' || type == 'B') {
                    int shape = plain_batch(buf, len, pos, flags, max_len, limits,
                                            nrw < PGMP_REWRITES_MAX ? binds : NULL, &end, &rw[nrw]);
                    if (shape == 0)
                        break;
                    k = PGMP_KIND_BATCH + shape;
                    if (shape & PGMP_BATCH_NAMED)
                        k += rw[nrw].entry << PGMP_KIND_STMT_SHIFT;
                } else {
                    break;
                }
                if (count > 0 && k != kind)
                    break;                           /* one kind of request per record */
                if (k >= PGMP_KIND_BATCH && (k & PGMP_BATCH_NAMED)) {
                    long long d = (long long)binds->ents[rw[nrw].entry].sname_len - (long long)rw[nrw].name_len;
                    if (d > (long long)(cap - len) - growth)
                        break;                       /* no room left: the rest is Python's */
                    growth += d;
                    nrw++;
                }
                kind = k;
                count++;
                pos = end;
                continue;
            }
            if (side == 0) {
                if (type == 'Q' || type == 'F' || type == 'S') {
                    if (count > 0 && type != kind)
                        break;                       /* one kind of request per record */
                    kind = type;
                    count++;
                    if (type == 'S')
                        sync = 2;
                } else if (type == 'P' || type == 'B' || type == 'E') {
                    sync = 1;
                } else {
                    break;
                }
            } else if (type == 'Z') {
                if (declared != 5)
                    break;
                count++;
                kind = buf[pos + 5];
            } else {
                break;
            }
        }
        pos += (size_t)declared + 1;
    }
    if (nrw > 0) {
        rewrite_binds(buf, len, rw, nrw, binds, tmp);
        len = (size_t)((long long)len + growth);
        pos = (size_t)((long long)pos + growth);
    }
    rec[PGMP_R_N] = (int32_t)len;
    rec[PGMP_R_SENT] = (int32_t)len;
    rec[PGMP_R_GOOD] = (int32_t)pos;
    rec[PGMP_R_COUNT] = count;
    rec[PGMP_R_KIND] = kind;
    rec[PGMP_R_SYNC] = sync;
}

void pgmp_relay_walk(uint8_t *buf, size_t len, size_t cap, const uint8_t *flags, uint32_t max_len, int side,
                     int pooled, const uint32_t *limits, const pgmp_binds *binds, int32_t *rec)
{
    uint8_t *tmp = binds != NULL ? malloc(cap > 0 ? cap : 1) : NULL;

    walk(buf, len, cap, flags, max_len, side, pooled, limits, binds, tmp, rec);
    free(tmp);
}

static size_t send_all(int fd, const uint8_t *buf, size_t len)
{
    size_t sent = 0;

    while (sent < len) {
        ssize_t k = send(fd, buf + sent, len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) {
            sent += (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        break;                 /* EAGAIN, or an error Python meets when it sends the rest */
    }
    return sent;
}

static double monotonic_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* As pgmp.stats' bucket_of (bisect_left): the first bucket whose bound is >= us. */
static void observe(uint32_t *hist, const pgmp_quiet *q, int64_t us)
{
    int i = 0;

    while (i < q->nbounds && q->bounds[i] < us)
        i++;
    hist[i]++;
}

/* A client read of ``count`` requests of type ``kind``, all relayed: as Link._stamp and
 * _request, and Pool.reuse_held for a held server (``was_held``). 0 if it is not quiet. */
static int quiet_requests(pgmp_quiet *q, const int32_t *rec, int pooled, int was_held, ssize_t n)
{
    int32_t count = rec[PGMP_R_COUNT], kind = rec[PGMP_R_KIND], i, used_at = -1;
    double now;

    if (count <= 0 || q->outstanding + count > PGMP_QUIET_KINDS)
        return 0;
    if (kind >= PGMP_KIND_BATCH) {
        if (!pooled)
            return 0;
        if (kind & PGMP_BATCH_NAMED) {
            int entry = kind >> PGMP_KIND_STMT_SHIFT;
            for (used_at = 0; used_at < q->nused && q->used[used_at] != entry; used_at++)
                ;
            if (used_at == q->nused && q->nused == PGMP_QUIET_USED)
                return 0;            /* more statements than it can name back */
        }
    } else if (kind == 'S') {
        if (pooled || rec[PGMP_R_SYNC] != 2)
            return 0;                /* session mode, through the Sync: nothing left unsynced */
    } else if (kind == 'Q') {
        if (rec[PGMP_R_SYNC] != 0)
            return 0;
    } else if (!(pooled && (kind == 'b' || kind == 'c' || kind == 'r'))) {
        return 0;
    }
    if (used_at >= 0) {                  /* a named batch: its entry to the end, the most recent */
        if (used_at < q->nused) {
            memmove(&q->used[used_at], &q->used[used_at + 1],
                    (size_t)(q->nused - used_at - 1) * sizeof q->used[0]);
            q->nused--;
        }
        q->used[q->nused++] = (uint16_t)(kind >> PGMP_KIND_STMT_SHIFT);
    } else if (kind >= PGMP_KIND_BATCH) {
        q->last_batch = kind;
    }
    now = monotonic_now();
    if (was_held) {
        q->assigns++;
        q->t_used = now;
    }
    if (q->outstanding == 0) {
        q->t_query = now;
        if (q->status == 'I')
            q->t_xact = now;
    }
    for (i = 0; i < count; i++)
        q->kinds[(q->head + q->outstanding + i) % PGMP_QUIET_KINDS] = kind;
    q->outstanding += count;
    q->rx_client += (uint64_t)n;
    return 1;
}

/* A server read, all relayed, of answers through ``count`` ReadyForQuery frames (maybe none):
 * as Link.server_ready (and Pipeline.answered), and for a held pair at a transaction's end
 * Pool.hold. 0 if it is not quiet. */
static int quiet_answers(pgmp_quiet *q, const int32_t *rec, slot *server, slot *client, ssize_t n)
{
    int32_t count = rec[PGMP_R_COUNT], status = rec[PGMP_R_KIND], i;
    double now;
    int64_t us;

    if (count > 0 && (count > q->outstanding || (status != 'I' && status != 'T')))
        return 0;
    q->rx_server += (uint64_t)n;
    if (count <= 0)
        return 1;
    q->head = (q->head + count) % PGMP_QUIET_KINDS;
    q->outstanding -= count;
    q->readies += (uint64_t)count;
    q->status = status;
    if (client->binds != NULL && !client->binds->ok && client->binds->n > 0) {
        /* as Binds.answered: no simple Query owed an answer, the table may be used again */
        for (i = 0; i < q->outstanding; i++)
            if (q->kinds[(q->head + i) % PGMP_QUIET_KINDS] < PGMP_KIND_BATCH)
                break;
        if (i == q->outstanding)
            client->binds->ok = 1;
    }
    if (q->outstanding > 0)
        return 1;
    q->t_ready = now = monotonic_now();
    us = (int64_t)((now - q->t_query) * 1e6);
    q->query_us += (uint64_t)us;
    observe(q->query_hist, q, us);
    if (status == 'I') {
        us = (int64_t)((now - q->t_xact) * 1e6);
        q->xacts++;
        q->xact_us += (uint64_t)us;
        observe(q->xact_hist, q, us);
        if (q->hold) {
            server->held = 1;
            q->t_used = now;
        }
    }
    return 1;
}

/* After a server read that ended its client's last transaction: hand the server over to the first
 * client of its queue (see pgmp_relay.h), writing the second record after rec. Returns the
 * number of records (1: no hand-off). */
static int handoff(pgmp_relay *r, int fd, int32_t *rec)
{
    pgmp_queue *q = r->slots[fd].handoff;
    struct qentry *e;
    slot *s, *c, *old;
    int32_t *rec2;
    int cfd, oldfd, i, blocked;
    size_t sent;

    queue_trim(q);
    if (q->n == 0)
        return 1;
    e = qat(q, 0);
    if (!e->ok || e->tag != r->slots[fd].tag)
        return 1;                /* the first waits for Python: no one is passed over */
    cfd = e->fd;
    if (r->batch != NULL)        /* an event of it in this batch (EOF, more bytes) is Python's first */
        for (i = 0; i < r->batch_n; i++)
            if (r->batch[i].data.fd == cfd)
                return 1;
    if (grow(r, cfd) != 0)
        return 1;
    s = &r->slots[fd];           /* (grow may have moved the slots) */
    c = &r->slots[cfd];
    oldfd = s->peer;
    if (c->peer >= 0 || cfd == fd || cfd == oldfd)
        return 1;
    old = &r->slots[oldfd];
    free(s->rest);               /* (one hand-off's rest at a time: Python takes it in its records) */
    s->rest = NULL;
    s->rest_len = 0;
    sent = send_all(fd, e->data, e->len);
    if (sent < e->len) {         /* the rest is for Python to queue (pgmp_relay_take_rest): the
                                  * entry's own buffer, moved up (no allocation that could fail) */
        memmove(e->data, e->data + sent, e->len - sent);
        s->rest = e->data;
        s->rest_len = (uint32_t)(e->len - sent);
        e->data = NULL;
    }
    {
        const uint8_t *flags = old->flags;
        uint32_t max_len = old->max_len;

        blocked = old->blocked;
        clear_slot(old);
        old->blocked = blocked;
        old->member = q;         /* its next plain read queues in C (PGMP_EV_QUEUED) */
        old->member_tag = s->tag;
        old->flags = flags;
        old->max_len = max_len;
    }
    blocked = c->blocked;
    clear_slot(c);
    c->blocked = blocked;
    c->peer = fd;
    c->side = 0;
    c->flags = e->flags;
    c->max_len = e->max_len;
    c->pooled = 1;
    c->touched = r->round;
    c->owed = e->count;
    s->peer = cfd;
    rec[PGMP_R_CODE] = PGMP_EV_HANDOFF;
    rec2 = rec + PGMP_R_SIZE;
    rec2[PGMP_R_FD] = cfd;
    rec2[PGMP_R_EVENTS] = 0;
    rec2[PGMP_R_CODE] = PGMP_EV_HANDED;
    rec2[PGMP_R_N] = (int32_t)e->len;
    rec2[PGMP_R_SENT] = (int32_t)sent;
    rec2[PGMP_R_GOOD] = (int32_t)e->len;
    rec2[PGMP_R_COUNT] = e->count;
    rec2[PGMP_R_KIND] = e->kind;
    rec2[PGMP_R_SYNC] = 0;
    rec2[PGMP_R_PEER] = fd;
    queue_drop(q, e);
    r->handoffs++;
    return 2;
}

/* A member's read (see pgmp_relay.h): queued in C, or Python's. */
static int member_step(pgmp_relay *r, slot *s, int fd, uint32_t events, uint8_t *buf, size_t cap,
                       int32_t *rec, int allow)
{
    pgmp_queue *q = s->member;
    ssize_t n;
    int ok;

    s->member = NULL;            /* a member no more, whatever this event is: Python's if not queued */
    if (!allow || events != EPOLLIN || s->touched == r->round || cap <= PGMP_REWRITE_ROOM) {
        s->touched = r->round;
        return 0;
    }
    s->touched = r->round;
    if (cap > 0x7fffffff)
        cap = 0x7fffffff;
    do {
        n = recv(fd, buf, cap - PGMP_REWRITE_ROOM, 0);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return 0;                /* EOF, an error or nothing after all: Python reads and sees which */
    /* (an entry of its already would be Python's doing: then these bytes are Python's too) */
    ok = queue_find(q, fd) == NULL ? pgmp_queue_push(q, fd, buf, (size_t)n, s->flags, s->max_len,
                                                     s->member_tag) : -1;
    if (ok >= 0) {
        struct qentry *e = qat(q, q->n - 1);
        if (ok == 1) {
            rec[PGMP_R_CODE] = PGMP_EV_QUEUED;
            rec[PGMP_R_N] = rec[PGMP_R_SENT] = rec[PGMP_R_GOOD] = (int32_t)n;
            rec[PGMP_R_COUNT] = e->count;
            rec[PGMP_R_KIND] = e->kind;
            return 1;
        }
        queue_drop(q, e);        /* not requests C may pass: out of the queue again, Python's bytes */
    }
    rec[PGMP_R_CODE] = PGMP_EV_MEMBER;
    rec[PGMP_R_N] = (int32_t)n;
    return 1;
}

/* allow 0: the event is Python's whatever it is (the batch's buffer is taken); an armed pair's
 * event that Python handles still counts as the pair's turn in this round, so that a later event
 * of the same pair is Python's too and Python sees the pair's events in the order they came. */
static int step(pgmp_relay *r, slot *s, int fd, uint32_t events, uint8_t *buf, size_t cap, int32_t *rec,
                int allow)
{
    slot *peer;
    ssize_t n;
    size_t good;
    pgmp_binds *binds;
    pgmp_quiet *q;
    int was_held;

    rec[PGMP_R_FD] = fd;
    rec[PGMP_R_EVENTS] = (int32_t)events;
    rec[PGMP_R_CODE] = PGMP_EV_PYTHON;
    rec[PGMP_R_N] = rec[PGMP_R_SENT] = rec[PGMP_R_GOOD] = 0;
    rec[PGMP_R_COUNT] = rec[PGMP_R_SYNC] = 0;
    rec[PGMP_R_KIND] = -1;
    rec[PGMP_R_PEER] = -1;
    if (s != NULL && s->peer < 0 && s->member != NULL)
        return member_step(r, s, fd, events, buf, cap, rec, allow);
    if (s == NULL || s->peer < 0)
        return 0;
    peer = get_slot(r, s->peer);
    /* both ends armed for each other, the peer's queue empty, the pair not relayed this round */
    if (peer == NULL || peer->peer != fd)
        return 0;
    if (!allow || events != EPOLLIN || peer->blocked || s->held || s->touched == r->round ||
        peer->touched == r->round) {
        s->touched = peer->touched = r->round;
        return 0;
    }
    s->touched = peer->touched = r->round;
    if (peer->held) {
        /* the client's first bytes after a hold: a held server that sent something or closed
         * meanwhile (a FATAL, EOF) is not to get them; Python replaces it, as for an idle one.
         * In a poll, such a server is among the batch's events (no syscall to ask); alone
         * (pgmp_relay_step), a peek asks. */
        if (r->batch != NULL) {
            int i;
            for (i = 0; i < r->batch_n; i++)
                if (r->batch[i].data.fd == s->peer)
                    return 0;
        } else {
            uint8_t c;
            ssize_t k = recv(s->peer, &c, 1, MSG_PEEK | MSG_DONTWAIT);
            if (k >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
                return 0;
        }
    }
    if (cap > 0x7fffffff)
        cap = 0x7fffffff;
    if (cap <= PGMP_REWRITE_ROOM)
        return 0;
    binds = s->binds;
    if (binds != NULL && (!binds->ok || binds->epoch != r->epoch))
        binds = NULL;
    if (binds != NULL && r->tmp_cap < cap) {
        uint8_t *t = realloc(r->tmp, cap);
        if (t == NULL) {
            binds = NULL;      /* no room to rewrite in: named batches are Python's */
        } else {
            r->tmp = t;
            r->tmp_cap = cap;
        }
    }
    do {
        n = recv(fd, buf, cap - PGMP_REWRITE_ROOM, 0);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return 0;              /* EOF, an error or nothing after all: Python reads and sees which */
    was_held = peer->held;
    peer->held = 0;            /* its client's bytes, for it or for Python: in use again */
    walk(buf, (size_t)n, cap, s->flags, s->max_len, s->side, s->pooled, s->limits, binds, r->tmp, rec);
    if (s->binds != NULL && rec[PGMP_R_COUNT] > 0 && rec[PGMP_R_KIND] < PGMP_KIND_BATCH)
        s->binds->ok = 0;      /* a Query passed: it might drop statements (Python enables it again) */
    rec[PGMP_R_PEER] = s->peer;
    good = (size_t)rec[PGMP_R_GOOD];
    rec[PGMP_R_SENT] = (int32_t)(good ? send_all(s->peer, buf, good) : 0);
    rec[PGMP_R_CODE] = PGMP_EV_RELAYED;
    if (s->pooled) {             /* the client's requests outstanding, as far as C knows them */
        slot *c = s->side == 0 ? s : peer;
        if (c->owed >= 0) {
            c->owed += s->side == 0 ? rec[PGMP_R_COUNT] : -rec[PGMP_R_COUNT];
            if (c->owed < 0)
                c->owed = -1;
        }
    }
    q = s->side == 0 ? s->quiet : peer->quiet;
    if (q != NULL && q->on) {
        /* (N: after the rewrite of named Binds, if any; rx counts what was received) */
        int quiet = q->epoch == r->quiet_epoch && good == (size_t)rec[PGMP_R_N] &&
                    rec[PGMP_R_SENT] == rec[PGMP_R_GOOD] &&
                    (s->side == 0 ? quiet_requests(q, rec, s->pooled, was_held, n) : quiet_answers(q, rec, s, peer, n));
        if (quiet) {
            rec[PGMP_R_CODE] = PGMP_EV_QUIET;
            r->quiet_reads++;
        } else {
            q->on = 0;
            rec[PGMP_R_CODE] = PGMP_EV_QUIET_END;
        }
    } else if (s->side == 1 && s->handoff != NULL && s->handoff_epoch == r->handoff_epoch && q == NULL &&
               peer->owed == 0 && rec[PGMP_R_COUNT] > 0 && rec[PGMP_R_KIND] == 'I' &&
               good == (size_t)rec[PGMP_R_N] && rec[PGMP_R_SENT] == rec[PGMP_R_GOOD] && !s->blocked) {
        return handoff(r, fd, rec);
    }
    return 1;
}

int pgmp_relay_step(pgmp_relay *r, int fd, uint32_t events, uint8_t *buf, size_t cap, int32_t *rec)
{
    if (++r->round == 0)
        r->round = 1;
    return step(r, get_slot(r, fd), fd, events, buf, cap, rec, 1);
}

int pgmp_relay_poll(pgmp_relay *r, int epfd, int timeout_ms, uint8_t *buf, size_t cap,
                    int32_t *recs, int max_events)
{
    struct epoll_event evs[256];
    int n, i, k, buf_taken;
    double deadline = 0.0;

    if (max_events > 256)
        max_events = 256;
    if (max_events < 1)
        return -EINVAL;
    if (timeout_ms > 0)
        deadline = monotonic_now() + timeout_ms / 1000.0;
    for (;;) {
        n = epoll_wait(epfd, evs, max_events, timeout_ms);
        if (n < 0)
            return -errno;
        if (++r->round == 0)
            r->round = 1;    /* 0 is "never" */
        r->batch = evs;
        r->batch_n = n;
        buf_taken = 0;
        for (i = k = 0; i < n; i++) {
            int32_t *rec = recs + (size_t)k * PGMP_R_SIZE;
            int fd = evs[i].data.fd;

            /* once the buffer holds bytes Python has yet to see, Python reads the rest itself */
            int w = step(r, get_slot(r, fd), fd, evs[i].events, buf, cap, rec, !buf_taken);
            if (rec[PGMP_R_CODE] == PGMP_EV_QUIET)
                continue;        /* kept in the pair's quiet state: no record */
            k += w == 2 ? 2 : 1; /* a hand-off: the server's record and its new client's */
            if (!buf_taken && rec[PGMP_R_CODE] != PGMP_EV_PYTHON &&
                (rec[PGMP_R_SENT] < rec[PGMP_R_GOOD] || rec[PGMP_R_GOOD] < rec[PGMP_R_N]))
                buf_taken = 1;
        }
        r->batch = NULL;
        if (k > 0 || n == 0 || timeout_ms == 0)
            return k;
        /* every event was a quiet read: nothing for Python yet, wait out the rest of the timeout */
        if (timeout_ms > 0) {
            double left = deadline - monotonic_now();
            if (left <= 0)
                return 0;
            timeout_ms = (int)(left * 1000.0) + 1;
        }
    }
}
