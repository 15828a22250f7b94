/* pgmp_scan.c: find the boundaries and types of PostgreSQL v3 frames in a buffer, trusting no length. */
#include "pgmp_frame.h"

static uint32_t read_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

int pgmp_scan(const uint8_t *buf, size_t len, const uint8_t *flags,
              uint32_t max_len, pgmp_frame *frames, size_t capacity,
              pgmp_scan_result *res)
{
    size_t pos = 0, nframes = 0, nreported = 0, rfq_count = 0;
    int32_t last_rfq = -1, partial_type = -1, full = 0;
    uint32_t partial_length = 0;
    int err = PGMP_ERR_NONE;

    /* Wire lengths >= 2^31 exceed every max; this also keeps 1 + declared in range. */
    if (max_len > PGMP_LEN_MAX)
        max_len = PGMP_LEN_MAX;

    while (len - pos >= 5) {
        uint8_t type = buf[pos];
        uint8_t flag = flags[type];
        uint32_t declared = read_be32(buf + pos + 1);

        err = pgmp_check_header(flag, declared, max_len);
        if (err != PGMP_ERR_NONE)
            break;
        /* Overflow-safe form of pos + 1 + declared > len. */
        if (declared - 4 > len - pos - 5) {
            partial_type = type;
            partial_length = declared + 1;
            break;
        }
        if (flag & PGMP_F_REPORT) {
            /* Stop before a frame that does not fit: full means "more to report". */
            if (nreported == capacity) {
                full = 1;
                break;
            }
            frames[nreported].offset = pos;
            frames[nreported].length = declared + 1;
            frames[nreported].type = type;
            nreported++;
        }
        if (type == 'Z') {
            rfq_count++;
            if (declared == 5)
                last_rfq = buf[pos + 5];
        }
        pos += (size_t)declared + 1;
        nframes++;
    }

    res->consumed = pos;
    res->nframes = nframes;
    res->nreported = nreported;
    res->rfq_count = rfq_count;
    res->last_rfq = last_rfq;
    res->partial_type = partial_type;
    res->partial_length = partial_length;
    res->full = full;
    return err;
}
