"""Fuzz the frontend message checks: pgmp/protocol/frontend.py check_message and check_head.

Input: a client's byte stream after startup, cut into frames (leniently, see
_common.frames); each frame's payload is checked whole as bytes, bytearray and
memoryview (the types pgmp passes), and every head of it as a Bind or Parse too large
to assemble.

Documented errors: ClientProtocolError. Invariants: the three buffer types give the
same verdict and message; a head of a message check_message accepts is accepted; a
fault check_head reports is the one check_message reports for the whole message.
"""
from pgmp.errors import ClientProtocolError
from pgmp.protocol.frontend import check_head, check_message
from tests.fuzz.harnesses._common import check, frames

MAX_LEN = 4096
_HEAD_KINDS = (ord("B"), ord("P"))


def _verdict(fn, kind: int, payload):
    try:
        fn(kind, payload)
    except ClientProtocolError as exc:
        return exc.sqlstate, exc.message
    return None


def one_input(data: bytes) -> None:
    for kind, payload in frames(data):
        whole = _verdict(check_message, kind, payload)
        for other in (bytearray(payload), memoryview(payload)):
            check(_verdict(check_message, kind, other) == whole,
                  f"check_message of type {kind} differs between bytes and {type(other).__name__}")
        if kind not in _HEAD_KINDS:
            continue
        # heads as pgmp sees them when the frame is split across reads: every one of the first
        # 48 bytes (names, counts), then 16 spread over the rest
        n = len(payload)
        cuts = list(range(min(n, 48))) + list(range(48, n, max(1, (n - 48) // 16)))
        for cut in cuts:
            head = payload[:cut]
            verdict = _verdict(check_head, kind, head)
            check(verdict == _verdict(check_head, kind, memoryview(head)),
                  "check_head differs between bytes and memoryview")
            if verdict is not None:
                check(whole == verdict, f"check_head({chr(kind)}, {cut}-byte head) refused {verdict} "
                                        f"but check_message of the whole says {whole}")
