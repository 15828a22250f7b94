/* pgmp_scan.h: the frame scanner's C interface; build_scan.py also reads it as the cffi cdef. */
#ifndef PGMP_SCAN_H
#define PGMP_SCAN_H

#include <stddef.h>
#include <stdint.h>

/* Bits of the 256-byte flags table, one entry per type byte value. */
enum {
    PGMP_F_REPORT = 1,  /* list complete frames of this type in `frames` */
    PGMP_F_SMALL = 2,   /* declared length may not exceed PGMP_SMALL_MAX */
    PGMP_F_VALID = 4    /* the type byte is allowed at all */
};

/* Return codes; on error the scan stops at the bad frame's type byte. */
enum {
    PGMP_ERR_NONE = 0,
    PGMP_ERR_SHORT = 1, /* declared length < 4 */
    PGMP_ERR_LONG = 2,  /* declared length > max_len, or > PGMP_SMALL_MAX for a small type */
    PGMP_ERR_TYPE = 3   /* type byte without PGMP_F_VALID */
};

enum {
    PGMP_SMALL_MAX = 10000,    /* PostgreSQL's cap on non-bulk messages */
    PGMP_LEN_MAX = 2147483647  /* larger max_len values are clamped to this */
};

/* A complete frame that has PGMP_F_REPORT; offset is relative to buf. */
typedef struct {
    size_t offset;
    uint32_t length;  /* total bytes: 1 type byte + declared length */
    uint32_t type;
} pgmp_frame;

typedef struct {
    size_t consumed;         /* just past the last complete frame scanned */
    size_t nframes;          /* complete frames scanned, reported or not */
    size_t nreported;        /* entries written to frames[] */
    size_t rfq_count;        /* complete 'Z' frames scanned */
    int32_t last_rfq;        /* status byte of the last 'Z' of length 5, or -1 */
    int32_t partial_type;    /* trailing incomplete frame's type, or -1 */
    uint32_t partial_length; /* its total length, or 0 */
    int32_t full;            /* 1: a reported frame at `consumed` did not fit in frames[] */
} pgmp_scan_result;

/*
 * Walk the v3 frames in buf[0:len] and fill *res (and frames[0:nreported]).
 * On error, res->consumed is the offset of the bad frame's type byte.
 * Partial info is set only when the scan ends without error and not full.
 * Returns a PGMP_ERR_* code. Reads only buf[0:len] and flags[0:256].
 */
int pgmp_scan(const uint8_t *buf, size_t len, const uint8_t *flags,
              uint32_t max_len, pgmp_frame *frames, size_t capacity,
              pgmp_scan_result *res);

#endif
