/* pgmp_frame.h: what the scanner and the relay share inside the C helper (not part of the cffi interface). */
#ifndef PGMP_FRAME_H
#define PGMP_FRAME_H

#include "pgmp_scan.h"

/* The header checks of the scanner and the relay, in their order: a PGMP_ERR_* code. */
static inline int pgmp_check_header(uint8_t flag, uint32_t declared, uint32_t max_len)
{
    if (!(flag & PGMP_F_VALID))
        return PGMP_ERR_TYPE;
    if (declared < 4)
        return PGMP_ERR_SHORT;
    if (declared > max_len)
        return PGMP_ERR_LONG;
    if ((flag & PGMP_F_SMALL) && declared > PGMP_SMALL_MAX)
        return PGMP_ERR_LONG;
    return PGMP_ERR_NONE;
}

#endif
