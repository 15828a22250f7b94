/* fuzz_scan.c: libFuzzer harness for pgmp_scan(), checked against a reference parser and its own split scans. */
/*
 * Built by scripts/fuzz with clang -fsanitize=fuzzer,address,undefined; not part of the
 * Python extension. Input layout (every byte is the fuzzer's choice):
 *
 *   [0]     flags table: a preset of pgmp's (client auth/ready/pooled, server
 *           normal/pooled/internal, all valid) or, for other values, 96 more bytes of
 *           bitmaps (VALID, REPORT, SMALL; 32 bytes each) taken from the input
 *   [1:5]   max_len, big-endian; its top bits pick a preset or the raw value (so values
 *           above PGMP_LEN_MAX, which pgmp_scan clamps, are tried too)
 *   [5]     capacity of frames[] (1 + byte % 64)
 *   [6:8]   start offset into the buffer, modulo its length + 1
 *   [8:10]  split point: where the buffer is cut for the incremental scan
 *   [10:]   the buffer
 *
 * Checks, any failure aborts (libFuzzer saves the input):
 *   1. the scan of buf[start:] equals the reference parser's answer field by field;
 *   2. invariants: reported frames lie inside buf[0:consumed], in order, contiguous with
 *      unreported ones, each frame's length equals its length word + 1; counts agree;
 *   3. incremental scan, as the relay does it: buf[0:split] then the rest resumed at
 *      `consumed` (again while `full`), reports the same frames as one scan of it all;
 *   4. the C relay's walk (pgmp_relay_walk) over buf[start:], both sides, plain and pooled:
 *      what it passes ends on a frame boundary inside the buffer, and it counts no more
 *      frames than it passes (a pooled client's batches have a valid shape); the pooled Query tests (pgmp_sql_trigger, _control, _dml)
 *      over the same bytes as text, where only ASan and UBSan judge.
 * Each range is copied to a heap block of exactly its size, so ASan sees any read past it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgmp_scan.h"
#include "pgmp_relay.h"

#define CHECK(cond) do { if (!(cond)) { \
        fprintf(stderr, "fuzz_scan: check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
        abort(); } } while (0)

/* ---- flags tables pgmp uses (pgmp/client.py, pgmp/server.py) ---- */

static void set_types(uint8_t *t, const char *types, uint8_t bit)
{
    for (const char *p = types; *p; p++)
        t[(uint8_t)*p] |= bit;
}

static void preset_flags(int which, uint8_t *t)
{
    static const char frontend[] = "BCcdDEfFHPQSX", small[] = "CDEHSXcf";
    static const char server_response[] = "123tTnCIsEZGV";
    memset(t, 0, 256);
    switch (which) {
    case 0: /* client AUTH_FLAGS: report everything, valid p and X, X small */
        for (int i = 0; i < 256; i++)
            t[i] = PGMP_F_REPORT;
        set_types(t, "pX", PGMP_F_VALID);
        set_types(t, "X", PGMP_F_SMALL);
        break;
    case 1: /* client READY_FLAGS */
    case 2: /* client POOLED_FLAGS */
        set_types(t, frontend, PGMP_F_VALID);
        set_types(t, small, PGMP_F_SMALL);
        set_types(t, which == 1 ? "QSFcfXPBE" : "QSFcfXPBCDE", PGMP_F_REPORT);
        break;
    case 3: /* server NORMAL_FLAGS */
        for (int i = 0; i < 256; i++)
            t[i] = PGMP_F_VALID;
        set_types(t, "ZGSE", PGMP_F_REPORT);
        break;
    case 4: /* server POOLED_FLAGS */
        for (int i = 0; i < 256; i++)
            t[i] = PGMP_F_VALID;
        set_types(t, "ZGS", PGMP_F_REPORT);
        set_types(t, server_response, PGMP_F_REPORT);
        break;
    default: /* server ALL_FLAGS */
        for (int i = 0; i < 256; i++)
            t[i] = PGMP_F_VALID | PGMP_F_REPORT;
        break;
    }
}

/* ---- the reference: the documented contract, written plainly in 64-bit arithmetic ---- */

typedef struct {
    size_t offset;
    uint64_t length;
    unsigned type;
} ref_frame;

typedef struct {
    int err;
    pgmp_scan_result res;
    ref_frame *frames;
} ref_result;

static uint64_t be32(const uint8_t *p)
{
    return ((uint64_t)p[0] << 24) | ((uint64_t)p[1] << 16) | ((uint64_t)p[2] << 8) | p[3];
}

static void reference_scan(const uint8_t *buf, size_t len, const uint8_t *flags, uint64_t max_len,
                           size_t capacity, ref_result *out)
{
    size_t pos = 0;
    if (max_len > PGMP_LEN_MAX)
        max_len = PGMP_LEN_MAX;
    memset(&out->res, 0, sizeof out->res);
    out->res.last_rfq = -1;
    out->res.partial_type = -1;
    out->err = PGMP_ERR_NONE;
    for (;;) {
        if (pos + 5 > len)
            break;
        unsigned type = buf[pos];
        uint64_t declared = be32(buf + pos + 1);
        uint8_t flag = flags[type];
        if (!(flag & PGMP_F_VALID))
            out->err = PGMP_ERR_TYPE;
        else if (declared < 4)
            out->err = PGMP_ERR_SHORT;
        else if (declared > max_len || ((flag & PGMP_F_SMALL) && declared > PGMP_SMALL_MAX))
            out->err = PGMP_ERR_LONG;
        if (out->err)
            break;
        if ((uint64_t)pos + 1 + declared > (uint64_t)len) {
            out->res.partial_type = (int32_t)type;
            out->res.partial_length = (uint32_t)(declared + 1);
            break;
        }
        if (flag & PGMP_F_REPORT) {
            if (out->res.nreported == capacity) {
                out->res.full = 1;
                break;
            }
            out->frames[out->res.nreported].offset = pos;
            out->frames[out->res.nreported].length = declared + 1;
            out->frames[out->res.nreported].type = type;
            out->res.nreported++;
        }
        if (type == 'Z') {
            out->res.rfq_count++;
            if (declared == 5)
                out->res.last_rfq = buf[pos + 5];
        }
        pos += (size_t)(declared + 1);
        out->res.nframes++;
    }
    out->res.consumed = pos;
}

/* ---- one scan of an exact-size heap copy, with the invariants ---- */

static int scan_copy(const uint8_t *data, size_t len, const uint8_t *flags, uint32_t max_len,
                     pgmp_frame *frames, size_t capacity, pgmp_scan_result *res)
{
    uint8_t *copy = malloc(len ? len : 1);
    CHECK(copy != NULL);
    if (len)
        memcpy(copy, data, len);
    memset(res, 0xA5, sizeof *res);  /* every field must be written */
    int err = pgmp_scan(len ? copy : copy + 1, len, flags, max_len, frames, capacity, res);
    /* (a zero-length scan gets a pointer one past a 1-byte block: it must not read it) */

    CHECK(err >= PGMP_ERR_NONE && err <= PGMP_ERR_TYPE);
    CHECK(res->consumed <= len);
    CHECK(res->nreported <= capacity && res->nreported <= res->nframes);
    CHECK(res->rfq_count <= res->nframes);
    CHECK(res->full == 0 || res->full == 1);
    CHECK(res->last_rfq >= -1 && res->last_rfq <= 255);
    if (res->last_rfq >= 0)
        CHECK(res->rfq_count > 0);
    if (err) {
        /* stopped at a bad header: its 5 bytes are there */
        CHECK(len - res->consumed >= 5);
        CHECK(res->partial_type == -1 && res->partial_length == 0 && !res->full);
    }
    if (res->full) {
        CHECK(res->nreported == capacity && res->partial_type == -1);
        CHECK(len - res->consumed >= 5);
        CHECK(flags[copy[res->consumed]] & PGMP_F_REPORT);
    }
    if (res->partial_type >= 0) {
        CHECK(len - res->consumed >= 5 && res->partial_type == copy[res->consumed]);
        CHECK(res->partial_length == be32(copy + res->consumed + 1) + 1);
        CHECK(res->partial_length > len - res->consumed);
    } else {
        CHECK(res->partial_length == 0);
        if (!err && !res->full)
            CHECK(len - res->consumed < 5);
    }
    /* reported frames: in order, inside the consumed range, each as its length word says */
    size_t prev_end = 0;
    for (size_t i = 0; i < res->nreported; i++) {
        const pgmp_frame *f = &frames[i];
        CHECK(f->offset >= prev_end);
        CHECK(f->length >= 5 && f->offset + f->length <= res->consumed);
        CHECK(f->type == copy[f->offset]);
        CHECK(f->length == be32(copy + f->offset + 1) + 1);
        CHECK(flags[f->type] & PGMP_F_REPORT);
        prev_end = f->offset + f->length;
    }
    free(copy);
    return err;
}

static void compare(int err, const pgmp_scan_result *res, const pgmp_frame *frames, const ref_result *ref)
{
    CHECK(err == ref->err);
    CHECK(res->consumed == ref->res.consumed);
    CHECK(res->nframes == ref->res.nframes);
    CHECK(res->nreported == ref->res.nreported);
    CHECK(res->rfq_count == ref->res.rfq_count);
    CHECK(res->last_rfq == ref->res.last_rfq);
    CHECK(res->partial_type == ref->res.partial_type);
    CHECK(res->partial_length == ref->res.partial_length);
    CHECK(res->full == ref->res.full);
    for (size_t i = 0; i < res->nreported; i++) {
        CHECK(frames[i].offset == ref->frames[i].offset);
        CHECK(frames[i].length == ref->frames[i].length);
        CHECK(frames[i].type == ref->frames[i].type);
    }
}

/* ---- incremental scan, as pgmp/relay.py walks a connection's reads ---- */

typedef struct {
    size_t n, cap;
    ref_frame *items;
} frame_list;

static void push(frame_list *l, size_t offset, uint64_t length, unsigned type)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->items = realloc(l->items, l->cap * sizeof *l->items);
        CHECK(l->items != NULL);
    }
    l->items[l->n].offset = offset;
    l->items[l->n].length = length;
    l->items[l->n].type = type;
    l->n++;
}

/* Scan buf[pos:end] until it stops for a reason other than `full`; frames go to `out`. */
static size_t scan_until_stop(const uint8_t *buf, size_t pos, size_t end, const uint8_t *flags,
                              uint32_t max_len, pgmp_frame *frames, size_t capacity, frame_list *out,
                              int *err, pgmp_scan_result *res)
{
    for (;;) {
        *err = scan_copy(buf + pos, end - pos, flags, max_len, frames, capacity, res);
        for (size_t i = 0; i < res->nreported; i++)
            push(out, pos + frames[i].offset, frames[i].length, frames[i].type);
        pos += res->consumed;
        if (*err || !res->full)
            return pos;
    }
}

static void check_incremental(const uint8_t *buf, size_t len, size_t split, const uint8_t *flags,
                              uint32_t max_len, pgmp_frame *frames, size_t capacity)
{
    frame_list whole = {0}, parts = {0};
    pgmp_scan_result res;
    int err_whole, err_parts;
    size_t end_whole, pos;

    end_whole = scan_until_stop(buf, 0, len, flags, max_len, frames, capacity, &whole, &err_whole, &res);
    /* first read: buf[0:split]; the second read appends the rest; the relay resumes at `consumed` */
    pos = scan_until_stop(buf, 0, split, flags, max_len, frames, capacity, &parts, &err_parts, &res);
    if (!err_parts)
        pos = scan_until_stop(buf, pos, len, flags, max_len, frames, capacity, &parts, &err_parts, &res);
    /* a header cut by the split is the same header once whole: same frames, same stop */
    CHECK(err_parts == err_whole);
    CHECK(pos == end_whole);
    CHECK(parts.n == whole.n);
    for (size_t i = 0; i < whole.n; i++) {
        CHECK(parts.items[i].offset == whole.items[i].offset);
        CHECK(parts.items[i].length == whole.items[i].length);
        CHECK(parts.items[i].type == whole.items[i].type);
    }
    free(whole.items);
    free(parts.items);
}

/* ---- the C relay's walk (pgmp_relay.c) ---- */

static void check_walk(const uint8_t *src, size_t len, const uint8_t *flags, uint32_t max_len)
{
    size_t cap = len + PGMP_REWRITE_ROOM;
    uint8_t *copy = malloc(cap), *counted = malloc(256);
    int32_t rec[PGMP_R_SIZE];
    uint32_t limits[256];
    pgmp_binds *binds = pgmp_binds_new();
    static const char *const names[][2] = {{"s1", "pgmp_1"}, {"P0_1", "pgmp_22"},
                                           {"a", "pgmp_1234567890123456789"}, {"long_client_name", "p"}};

    CHECK(copy != NULL && counted != NULL && binds != NULL);
    pgmp_binds_reset(binds, 0);
    for (int i = 0; i < 4; i++)
        CHECK(pgmp_binds_add(binds, (const uint8_t *)names[i][0], strlen(names[i][0]),
                             (const uint8_t *)names[i][1], strlen(names[i][1])) == i);
    pgmp_binds_enable(binds, 1);
    for (int i = 0; i < 256; i++) {
        counted[i] = flags[i] | (strchr("QSFPBDETCIZ12tns", i) != NULL && i ? PGMP_F_COUNT : 0);
        limits[i] = 64 + (uint32_t)i * 16;
    }
    for (int side = 0; side < 2; side++) {
        for (int pooled = 0; pooled < 3; pooled++) {
            /* pooled 2: the pooled walk with a binds table, which rewrites what it passes */
            memcpy(copy, src, len);
            pgmp_relay_walk(copy, len, cap, counted, max_len, side, pooled != 0, pooled ? limits : NULL,
                            pooled == 2 ? binds : NULL, rec);
            size_t n = (size_t)rec[PGMP_R_N], good = (size_t)rec[PGMP_R_GOOD], pos = 0, frames = 0;
            int32_t kind = rec[PGMP_R_KIND];
            CHECK(n <= cap && good <= n && rec[PGMP_R_COUNT] >= 0);
            CHECK(pooled == 2 || (n == len && memcmp(copy, src, len) == 0));    /* no rewrite without binds */
            CHECK(n - good <= len && memcmp(copy + good, src + len - (n - good), n - good) == 0);  /* Python's rest */
            while (pos < good) {                         /* good is a frame boundary */
                CHECK(good - pos >= 5);
                pos += (size_t)be32(copy + pos + 1) + 1;
                frames++;
            }
            CHECK(pos == good && (size_t)rec[PGMP_R_COUNT] <= frames);
            if (side == 0 && pooled && kind >= PGMP_KIND_BATCH) {
                int shape = (kind - PGMP_KIND_BATCH) & (PGMP_BATCH_CONTROL * 4 - 1);
                if (shape & PGMP_BATCH_NAMED)        /* a named batch: a Bind of an entry, no Parse */
                    CHECK(pooled == 2 && (kind >> PGMP_KIND_STMT_SHIFT) < 4 && !(shape & PGMP_BATCH_PARSE)
                          && (shape & PGMP_BATCH_BIND) && shape < PGMP_BATCH_CONTROL);
                else                                 /* unnamed: Parse first, one index only */
                    CHECK((kind >> PGMP_KIND_STMT_SHIFT) == 0 && (shape & PGMP_BATCH_PARSE));
            }
        }
    }
    pgmp_binds_free(binds);
    int t = pgmp_sql_trigger((const char *)copy, len), c = pgmp_sql_control((const char *)copy, len);
    int d = pgmp_sql_dml((const char *)copy, len);
    CHECK((t == 0 || t == 1) && (c == 0 || c == 'b' || c == 'c' || c == 'r') && (d == 0 || d == 1));
    CHECK(c == 0 || t == 1);                         /* a transaction command has a trigger word */
    free(counted);
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum { HEAD = 10 };
    uint8_t *flags;
    uint32_t max_len;
    size_t capacity, start, split, len;
    const uint8_t *buf;

    if (size < HEAD)
        return 0;
    flags = malloc(256);
    CHECK(flags != NULL);
    if (data[0] < 0xF0 || size < HEAD + 96) {
        preset_flags(data[0] % 6, flags);
    } else {
        /* fuzzer-chosen table: three bitmaps after the head */
        for (int i = 0; i < 256; i++) {
            uint8_t f = 0;
            if (data[HEAD + i / 8] >> (i % 8) & 1)
                f |= PGMP_F_VALID;
            if (data[HEAD + 32 + i / 8] >> (i % 8) & 1)
                f |= PGMP_F_REPORT;
            if (data[HEAD + 64 + i / 8] >> (i % 8) & 1)
                f |= PGMP_F_SMALL;
            flags[i] = f;
        }
        data += 96;
        size -= 96;
    }
    max_len = (uint32_t)be32(data + 1);
    switch (max_len >> 30) {
    case 0: max_len = 1u << 30; break;                  /* pgmp's default max_message_size */
    case 1: max_len = 4 + (max_len & 0xFFFF); break;    /* small limits: ERR_LONG is reachable */
    case 2: max_len = 65535 + 1024; break;              /* the auth scanner's */
    default: break;                                     /* raw, >= 3 << 30: clamped */
    }
    capacity = 1 + data[5] % 64;
    buf = data + HEAD;
    len = size - HEAD;
    start = ((size_t)data[6] << 8 | data[7]) % (len + 1);
    split = ((size_t)data[8] << 8 | data[9]) % (len - start + 1);

    pgmp_frame *frames = malloc(capacity * sizeof *frames);
    ref_result ref = {.frames = malloc(capacity * sizeof(ref_frame))};
    pgmp_scan_result res;
    CHECK(frames != NULL && ref.frames != NULL);

    /* 1 and 2: one scan of buf[start:], as scanner.py passes view + start */
    int err = scan_copy(buf + start, len - start, flags, max_len, frames, capacity, &res);
    reference_scan(buf + start, len - start, flags, max_len, capacity, &ref);
    compare(err, &res, frames, &ref);

    /* 3: the same bytes arriving in two reads */
    check_incremental(buf + start, len - start, split, flags, max_len, frames, capacity);

    /* 4: the relay's walk and its Query tests, on an exact-size copy */
    check_walk(buf + start, len - start, flags, max_len);

    free(ref.frames);
    free(frames);
    free(flags);
    return 0;
}
