"""Forward frames from one connection to another as byte ranges, calling back only for frames that need attention.

``relay`` walks the bytes an endpoint received with that endpoint's current
scanner. Frames whose type is not reported are forwarded as ranges of the
input buffer without being looked at; a frame that does not fit in one read
is streamed through (``src.skip`` counts the bytes still to pass), never
assembled. Reported frames are given to ``src.on_frame``, which answers:

- FORWARD: pass the frame on;
- DROP: consume it here (pgmp answered or acted on it);
- RESCAN: consume it, and scan the rest with the (changed) current scanner;
- STOP: consume it, and keep the rest in ``src.leftover`` for later;
- REPLACE: send ``src.replacement`` instead of the frame.

Reported types that ``src.whole`` does not mark are "header only": when
such a frame is split across reads, ``src.on_partial`` sees its first bytes
and may rewrite its head (a Bind's statement name in transaction mode) or
ask to WAIT for more; the body then streams through, never assembled.
"""
from pgmp.errors import PgmpError

FORWARD, DROP, RESCAN, STOP, REPLACE = 0, 1, 2, 3, 4
WAIT = object()         # on_partial: keep the bytes until more of the frame has arrived
ASSEMBLE = object()     # on_partial: keep the bytes until the whole frame has arrived


class FramingError(PgmpError):
    """A frame with a length or type the scanner refused; carries what and where."""


def relay(src, view, n: int, out: list) -> None:
    """Process ``view[0:n]`` received by ``src``; append the ranges to forward to ``out``."""
    pos = 0
    skip = src.skip
    if skip:
        take = skip if skip < n else n
        out.append(view[0:take])
        src.skip = skip - take
        pos = take
    while pos < n:
        sc = src.scanner
        k = sc.scan(view, pos, n)
        fwd = pos
        act = FORWARD
        for i in range(k):
            kind, off, ln = sc.frame(i)
            act = src.on_frame(kind, view, off, ln)
            if act:
                if off > fwd:
                    out.append(view[fwd:off])
                fwd = off + ln
                if act == REPLACE:
                    if src.replacement:
                        out.append(src.replacement)
                    act = FORWARD
                elif act >= RESCAN:
                    break
        if act == RESCAN or act == STOP:
            pos = fwd
            if act == STOP:
                if pos < n:
                    src.leftover = bytes(view[pos:n])
                    src.need = 0
                return
            continue
        end = sc.consumed
        if end > fwd:
            out.append(view[fwd:end])
        pos = end
        if sc.error:
            src.framing_error(sc.error, view, end)
            return
        if sc.full:
            continue
        if pos < n:
            pt = sc.partial_type
            if pt >= 0 and not src.whole[pt]:
                skip_from = pos
                if src.flags[pt] & 1:
                    r = src.on_partial(pt, view, pos, n, sc.partial_length)
                    if r is WAIT or r is ASSEMBLE:  # its head (or all of it) is needed first
                        src.leftover = bytes(view[pos:n])
                        src.need = sc.partial_length if r is ASSEMBLE else 0
                        return
                    if r is not None:               # a rewritten head, then the body streams
                        head, replaced = r
                        out.append(head)
                        pos += replaced
                out.append(view[pos:n])
                src.skip = sc.partial_length - (n - skip_from)
            else:
                src.leftover = bytes(view[pos:n])
                src.need = sc.partial_length if pt >= 0 else 0
        return
