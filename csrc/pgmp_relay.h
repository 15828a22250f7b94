/* pgmp_relay.h: the C relay's interface (epoll batch, recv, frame walk, send); build_scan.py reads it as cdef. */
#ifndef PGMP_RELAY_H
#define PGMP_RELAY_H

#include <stddef.h>
#include <stdint.h>

/* An extra bit of the scanner's flags table: a reported type the C relay may forward itself and
 * count ('Q', 'F', 'S' as requests, 'P'/'B'/'E' as unsynced, 'Z' as ReadyForQuery). */
enum { PGMP_F_COUNT = 8 };

/* What one record says happened to one epoll event (record field PGMP_R_CODE). */
enum {
    PGMP_EV_PYTHON = 0,  /* not touched: Python handles the event as usual (nothing was read) */
    PGMP_EV_RELAYED = 1, /* read and relayed; see the record's ranges and counts */
    PGMP_EV_QUIET_END = 2, /* as RELAYED, and the read ended the pair's quiet state (pgmp_quiet) */
    PGMP_EV_QUIET = 3    /* read, relayed and kept in the pair's quiet state: no record */
};

/* Fields of one record, an array of PGMP_R_SIZE int32 values per event. */
enum {
    PGMP_R_FD = 0,       /* the socket */
    PGMP_R_EVENTS = 1,   /* the epoll mask */
    PGMP_R_CODE = 2,     /* PGMP_EV_* */
    PGMP_R_N = 3,        /* bytes in buf[0:n] (received, then as rewritten); 0: EOF or error, Python reads again */
    PGMP_R_SENT = 4,     /* buf[0:sent] went to the peer */
    PGMP_R_GOOD = 5,     /* buf[sent:good] did not: queue it for the peer; buf[good:n] is Python's to process */
    PGMP_R_COUNT = 6,    /* requests (client side) or ReadyForQuery frames (server side) in buf[0:good] */
    PGMP_R_KIND = 7,     /* client: the requests' type byte (pooled: 'Q', 'b', 'c' or 'r', or
                          * PGMP_KIND_BATCH + a batch's shape, see below); server: the last
                          * ReadyForQuery's status */
    PGMP_R_SYNC = 8,     /* client: 1 Parse/Bind/Execute after the last Sync, 2 a Sync after them, 0 neither */
    PGMP_R_PEER = 9,     /* the socket the bytes went to */
    PGMP_R_SIZE = 10
};

/* Pooled mode: a record's requests may be unnamed extended-protocol batches, each whole up to its
 * Sync (the Sync is the request), all of one shape: kind = PGMP_KIND_BATCH + these bits, in the
 * order the messages come (Parse first, always). */
enum {
    PGMP_KIND_BATCH = 256,
    PGMP_BATCH_PARSE = 1,        /* an unnamed Parse whose text passes as a Query's would */
    PGMP_BATCH_BIND = 2,         /* a Bind of the unnamed statement to the unnamed portal */
    PGMP_BATCH_DESC_PORTAL = 4,  /* Describe of the unnamed portal (after the Bind) */
    PGMP_BATCH_DESC_STMT = 8,    /* Describe of the unnamed statement (after the Parse, before any Bind) */
    PGMP_BATCH_EXECUTE = 16,     /* Execute of the unnamed portal (after the Bind) */
    PGMP_BATCH_NAMED = 32,       /* the batch starts with a Bind of a named statement found in the
                                  * client's binds table (below), rewritten to its server name; the
                                  * entry's index is kind >> PGMP_KIND_STMT_SHIFT */
    PGMP_BATCH_CONTROL = 64,     /* 2 bits: an unnamed Parse's text is a bare transaction command
                                  * (pgmp_sql_control): 1 BEGIN, 2 COMMIT, 3 ROLLBACK, times this */
    PGMP_KIND_STMT_SHIFT = 9
};

/* The relay receives at most cap - PGMP_REWRITE_ROOM bytes per read: the rest of the buffer is
 * room for the Bind heads it rewrites (a server name longer than the client's). */
enum { PGMP_REWRITE_ROOM = 4096, PGMP_REWRITES_MAX = 64 };

/* At most this many entries per binds table (an index must fit in a record's kind). */
enum { PGMP_BINDS_MAX = 4096 };

/* A pooled client's named statements as its current server has them: client name -> server name
 * (pgmp.prepared's pgmp_<n>). Python fills it for the pair it arms (Link.bound_statements) and
 * enables it while no simple Query is unanswered (one might be a DISCARD ALL); C disables it
 * when it passes a Query itself. A table made in an older epoch (pgmp_relay_retire: a statement
 * name left the worker's cache) is not used. */
typedef struct pgmp_binds pgmp_binds;

pgmp_binds *pgmp_binds_new(void);
void pgmp_binds_free(pgmp_binds *t);
/* Empty the table, disabled, for the relay's current epoch. */
void pgmp_binds_reset(pgmp_binds *t, uint32_t epoch);
/* Add name -> sname; returns the entry's index, or -1 when out of memory or the table holds
 * PGMP_BINDS_MAX entries. A name added twice keeps its first entry. */
int pgmp_binds_add(pgmp_binds *t, const uint8_t *name, size_t name_len, const uint8_t *sname, size_t sname_len);
void pgmp_binds_enable(pgmp_binds *t, int ok);
int pgmp_binds_enabled(const pgmp_binds *t);

typedef struct pgmp_relay pgmp_relay;

pgmp_relay *pgmp_relay_new(void);
void pgmp_relay_free(pgmp_relay *r);

/* Arm fd: its input goes to peer after a walk with flags[256] (which must outlive the arming) and
 * max_len; side 0 = a client (counts requests), 1 = a server (counts ReadyForQuery). pooled 1:
 * transaction mode's rules (below); limits: NULL, or the largest length word accepted per type
 * for the counted types (uint32_t[256], which must outlive the arming): a longer one is Python's.
 * Returns 0, or -1 when out of memory.
 *
 * In pooled mode a client's counted type is a Query whose text is one NUL-terminated string
 * free of the words that may change session state (pgmp_sql_trigger) or one INSERT, UPDATE or
 * DELETE (pgmp_sql_dml), kind 'Q', or a bare
 * transaction command (pgmp_sql_control), kind 'b', 'c' or 'r', or an unnamed extended batch
 * (PGMP_KIND_BATCH) whose Parse text would pass as such a Query's (PGMP_BATCH_CONTROL for a
 * transaction command), or a batch binding a named statement of the client's binds table
 * (PGMP_BATCH_NAMED, its Bind rewritten to the server name), messages well formed as
 * pgmp.protocol.frontend checks them, whole in the read; a server's answer passes
 * whole, through its ReadyForQuery, when its reported frames are all counted and no
 * CommandComplete's tag is a session command's (SET, RESET, DISCARD, LISTEN, PREPARE, LOAD,
 * DEALLOCATE); of an answer not whole in the read, or with a frame Python must see, only the
 * leading frames that are not reported pass (Python's Pipeline pops what a reported frame
 * answers when it sees it). */
int pgmp_relay_arm(pgmp_relay *r, int fd, int peer, const uint8_t *flags, uint32_t max_len, int side,
                   int pooled, const uint32_t *limits);
/* Give the armed client fd its binds table (NULL: none); disarming takes it away. The table
 * must outlive the arming. */
void pgmp_relay_binds(pgmp_relay *r, int fd, pgmp_binds *t);
/* The relay's statement-name epoch, and a new one (every binds table made before is stale). */
uint32_t pgmp_relay_epoch(pgmp_relay *r);
void pgmp_relay_retire(pgmp_relay *r);
/* Disarm fd: Python handles its events again. */
void pgmp_relay_disarm(pgmp_relay *r, int fd);
/* Python holds unsent bytes for fd (1) or no longer (0): the relay must not send to it meanwhile. */
void pgmp_relay_blocked(pgmp_relay *r, int fd, int blocked);
int pgmp_relay_is_armed(pgmp_relay *r, int fd);
/* Mark an armed server held (1) or not (0): between its client's transactions, linked to it only
 * so that the next request needs no Python (pgmp.pool's held servers). An event of a held server
 * is Python's (data or EOF while idle); C's first read of its client's bytes clears the mark, and
 * so does disarming. Before that read C looks for the held server among the poll's events (with
 * pgmp_relay_step, which has none, it peeks at its socket): with input pending there (a FATAL,
 * EOF), the client's event is Python's, which replaces the server. */
void pgmp_relay_hold(pgmp_relay *r, int fd, int held);
/* 1 if fd is armed and still held: C has read nothing of its client's since the mark. */
int pgmp_relay_held(pgmp_relay *r, int fd);

/* A quiet pair: while its traffic is plain round trips, C keeps the Link's bookkeeping of it itself
 * and writes no record, so that Python does nothing per transaction. Python starts it on an armed
 * client (pgmp_relay_quiet) between round trips, and reads and applies what it holds when it
 * ends it (pgmp.crelay.Quiet, ClientConnection.quiet_end). A read is quiet when all of it was
 * relayed, nothing left for Python or the peer's queue: on the client side requests only (in
 * session mode 'Q', or extended-protocol messages through their Sync, kind 'S'; in pooled mode
 * 'Q', 'b', 'c', 'r', unnamed batches and named ones of the binds table, of at most
 * PGMP_QUIET_USED statements), at most PGMP_QUIET_KINDS outstanding; on the server side
 * answers whose ReadyForQuery frames answer outstanding requests, status 'I' or 'T'. The first
 * read that is not quiet, and any read after the relay's quiet epoch moved on
 * (pgmp_relay_quiet_end_all), ends it: that read's record has code PGMP_EV_QUIET_END, and Python
 * takes in what C kept before it applies the record. ``hold``: transaction mode's held server,
 * which C marks held again (pgmp_relay_hold) at each ReadyForQuery 'I' with nothing outstanding,
 * as Python's Pool.hold would. A binds table a Query disabled is enabled again when no Query is
 * outstanding, as Python's Binds.answered would (one whose epoch is stale stays unused). Clock: CLOCK_MONOTONIC seconds, Python's time.monotonic(). */
enum { PGMP_HIST_MAX = 32, PGMP_QUIET_KINDS = 32, PGMP_QUIET_USED = 64 };
typedef struct pgmp_quiet {
    int32_t on;                  /* Python: 1 to start; C: 0 once it ended */
    uint32_t epoch;              /* the relay's quiet epoch it started in */
    int32_t hold;                /* pooled: re-hold the server at each transaction's end */
    int32_t nbounds;             /* histogram bucket bounds, microseconds, ascending */
    int64_t bounds[PGMP_HIST_MAX];
    int32_t outstanding;         /* requests sent and not answered (Link.outstanding) */
    int32_t status;              /* the last ReadyForQuery's status (Link.status) */
    int32_t head;                /* kinds[head] is the oldest outstanding request's kind */
    int32_t kinds[PGMP_QUIET_KINDS];    /* a record's kinds: 'Q', 'S', 'b', 'c', 'r', or a batch's */
    int32_t last_batch;          /* the kind of the last unnamed batch C passed, or 0 */
    int32_t nused;               /* binds table entries C bound, oldest last use first */
    uint16_t used[PGMP_QUIET_USED];
    double t_query, t_xact, t_ready, t_used;   /* Link's, and the server's last_used (0: unset) */
    uint64_t rx_client, rx_server;             /* bytes read of each, since the start */
    uint64_t readies, xacts, assigns;          /* ReadyForQuery frames, transactions, held reuses */
    uint64_t query_us, xact_us;                /* time over rounds (outstanding back to 0), transactions */
    uint32_t query_hist[PGMP_HIST_MAX], xact_hist[PGMP_HIST_MAX];
} pgmp_quiet;

/* Start q: on, its counts zero, nothing outstanding, the Link's status and clocks as given. */
void pgmp_quiet_start(pgmp_quiet *q, int hold, int status, double t_query, double t_xact, double t_ready);
/* Give the armed client fd its quiet state (NULL: none), in the relay's current quiet epoch;
 * disarming takes it away. It must outlive the arming. */
void pgmp_relay_quiet(pgmp_relay *r, int fd, pgmp_quiet *q);
/* The relay's quiet epoch; a new one ends every quiet pair at its next read. */
uint32_t pgmp_relay_quiet_epoch(pgmp_relay *r);
void pgmp_relay_quiet_end_all(pgmp_relay *r);
/* Reads kept in quiet state so far (for pgmp stats). */
uint64_t pgmp_relay_quiet_reads(pgmp_relay *r);

/* The hand-off: transaction mode under contention, C links a server at its client's transaction
 * end to the first client of its pool's queue and sends that client's request, as Python's
 * Pool.release and _put_idle would, so that the pool's round trip needs no Python between the
 * answer and the next request. Python keeps deciding: it mirrors its Pool.waiting into the
 * pool's pgmp_queue (every client in order, so that C never passes over one), tells C which
 * servers may be handed over (pgmp_relay_handoff: the pool's conditions for reusing them as they
 * are, the client's and the server's settings the pool's common ones) and how many requests each
 * armed client has outstanding (pgmp_relay_owed), and takes in the two records of each hand-off
 * (pgmp.crelay, Server.handed_off).
 *
 * C hands a server over at a read of it that it relayed whole, all sent, through a
 * ReadyForQuery 'I' that answers its client's last outstanding request, when the server may be
 * handed over in the current hand-off epoch, the queue's first client has a request C may pass
 * (pgmp_queue_push returned 1), the server's settings tag and no event of its in the poll's
 * batch, and no quiet state is
 * involved. Then: the request goes to the server (what the socket does not take is Python's to
 * queue), the old client is disarmed, the new one armed with the server, and two records are
 * written: the server's, code PGMP_EV_HANDOFF (as RELAYED; PEER the old client), then the new
 * client's, code PGMP_EV_HANDED: FD the client, N its request's bytes, SENT how many went out,
 * COUNT/KIND its requests as a client record's, PEER the server. */
enum { PGMP_EV_HANDOFF = 4, PGMP_EV_HANDED = 5, PGMP_EV_QUEUED = 6, PGMP_EV_MEMBER = 7 };

/* The old client of a hand-off stays known to C as a *member* of the queue (unarmed, no peer):
 * its next read, if it is requests C may pass (as pgmp_queue_push would take them), joins the
 * end of the queue with its settings tag, and its record has code PGMP_EV_QUEUED (N = SENT =
 * GOOD its bytes, which stay in the queue's entry, COUNT/KIND its requests, PEER -1); any other
 * read of it is Python's, in the buffer (code PGMP_EV_MEMBER, N its bytes, GOOD 0). Either way
 * it is a member no more; arming or disarming it ends that too. */

typedef struct pgmp_queue pgmp_queue;

pgmp_queue *pgmp_queue_new(void);
void pgmp_queue_free(pgmp_queue *q);
/* fd joins the end of the queue. data[0:len] (copied; NULL: none) is the request it waits with,
 * flags and max_len its scanner's (the table must outlive the queue entry and any arming C makes
 * of it), tag its settings' (C hands it only a server of the same tag; 0: none):
 * 1 if C may hand it a server (whole requests the pooled walk passes, of one kind, a tag);
 * 0 if only Python may (it keeps its place: C hands no server over while it is first);
 * -1 out of memory (then it is not in the queue). */
int pgmp_queue_push(pgmp_queue *q, int fd, const uint8_t *data, size_t len, const uint8_t *flags,
                    uint32_t max_len, uint32_t tag);
/* fd leaves the queue: 1 if it was in it, 0 if not (C handed it a server in this poll: the records
 * are still to come). */
int pgmp_queue_remove(pgmp_queue *q, int fd);
/* fd keeps its place, but only Python may hand it a server now (what it waits with changed). */
void pgmp_queue_block(pgmp_queue *q, int fd);
/* The request fd's entry holds (bytes C keeps for it: a member's, PGMP_EV_QUEUED), copied to
 * out[0:cap]: its length (at most cap copied), or -1 if fd is not in the queue. */
long pgmp_queue_data(const pgmp_queue *q, int fd, uint8_t *out, size_t cap);
/* What a hand-off could not send of the request (the socket took only part), for the server fd:
 * its length, or 0; copied to out and let go when cap is at least that. */
long pgmp_relay_take_rest(pgmp_relay *r, int fd, uint8_t *out, size_t cap);
void pgmp_queue_clear(pgmp_queue *q);
/* Clients in the queue (for tests and stats). */
int pgmp_queue_len(const pgmp_queue *q);
/* The armed pooled server fd, whose settings have tag ``tag``, may be handed over to q's first
 * client if that one's tag is the same (q NULL: to none) until the next
 * pgmp_relay_handoff_end_all; disarming ends it too. Its client (armed with it) has ``owed``
 * requests outstanding (Link.outstanding): C adds the requests it relays and takes off the
 * ReadyForQuery frames; arming anew forgets it (unknown: no hand-off). */
void pgmp_relay_handoff(pgmp_relay *r, int fd, pgmp_queue *q, int owed, uint32_t tag);
void pgmp_relay_handoff_end_all(pgmp_relay *r);
/* Hand-offs C made so far (for pgmp stats). */
uint64_t pgmp_relay_handoffs(pgmp_relay *r);

/*
 * One epoll_wait on epfd (timeout in ms), then for each event on an armed socket whose peer is
 * not blocked: recv into buf[0:cap - PGMP_REWRITE_ROOM], walk the frames (rewriting the Binds
 * of named batches in buf, whose bytes then move: the record's N is after that), send the
 * leading frames that need no
 * decision to the peer, and describe it in a record. Once one record leaves bytes for Python
 * (good < n), buf is Python's: the later events of the batch get PGMP_EV_PYTHON records, and so
 * does a second event of a pair already relayed in this batch, so that Python has taken in the
 * first one's record before the pair's state moves on.
 * Reads kept in quiet state write no record; when a poll's events were all such reads, it waits
 * again, until the timeout (the first wait's) runs out.
 * A hand-off writes two records for its event: recs must have room for 2 * max_events.
 * Returns the number of records written to recs, or -errno.
 */
int pgmp_relay_poll(pgmp_relay *r, int epfd, int timeout_ms, uint8_t *buf, size_t cap,
                    int32_t *recs, int max_events);

/* The same relay step for one socket, without epoll: fills one record, or two at a hand-off (rec
 * must have room for two; for tests); returns the number of records, or 0 when fd is not armed
 * or its peer is blocked. */
int pgmp_relay_step(pgmp_relay *r, int fd, uint32_t events, uint8_t *buf, size_t cap, int32_t *rec);

/* The frame walk alone over buf[0:len] (no IO), as the relay does it: fills rec's GOOD, COUNT,
 * KIND and SYNC (SENT and N are set to the length after rewriting). With binds (an enabled table,
 * or NULL) the named batches it passes are rewritten in buf, which must hold cap bytes: buf[0:N]
 * is then what the relay would have. For the tests that hold it against the Python relay. */
void pgmp_relay_walk(uint8_t *buf, size_t len, size_t cap, const uint8_t *flags, uint32_t max_len, int side,
                     int pooled, const uint32_t *limits, const pgmp_binds *binds, int32_t *rec);

/* 1 if text[0:len] holds a word that may change session state, as pgmp.protocol.sql's _TRIGGER
 * finds it (ASCII case folded; a word is a whole run of [A-Za-z0-9_]; advisory_lock and set_config
 * anywhere); 0 if the Query is an ordinary one. */
int pgmp_sql_trigger(const char *text, size_t len);

/* 'b', 'c' or 'r' if text[0:len] is one bare transaction command (BEGIN, BEGIN WORK/TRANSACTION,
 * START TRANSACTION; COMMIT or END, with WORK/TRANSACTION; ROLLBACK or ABORT, with WORK/TRANSACTION;
 * ASCII case folded, whitespace around, one ';' at most, nothing else); 0 otherwise. In pooled mode
 * the relay passes such a Query and reports it as its request kind, for the Link's effects. */
int pgmp_sql_control(const char *text, size_t len);

/* 1 if text[0:len] is one INSERT, UPDATE or DELETE (its first word, ASCII case folded; a ';' only
 * at the end; no advisory_lock or set_config anywhere): a statement sql.py finds no session effect
 * in, whatever trigger words (SET, TEMP, ...) it holds. 0 otherwise. */
int pgmp_sql_dml(const char *text, size_t len);

#endif
