"""cffi build script for pgmp._scan (scanner and relay); the cdef is the headers themselves, minus preprocessor lines.

Used by setup.py (cffi_modules); `python csrc/build_scan.py` from the
repository root builds pgmp/_scan*.so in place.
"""
import os

from cffi import FFI

CSRC = os.path.relpath(os.path.dirname(os.path.abspath(__file__)))


def header_cdef(path: str) -> str:
    """The header without #include/#ifndef/#define lines, which cdef cannot parse."""
    with open(path, encoding="utf-8") as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(header_cdef(os.path.join(CSRC, "pgmp_scan.h")))
ffibuilder.cdef(header_cdef(os.path.join(CSRC, "pgmp_relay.h")))
ffibuilder.set_source(
    "pgmp._scan",
    '#include "pgmp_scan.h"\n#include "pgmp_relay.h"',
    sources=[os.path.join(CSRC, "pgmp_scan.c"), os.path.join(CSRC, "pgmp_relay.c")],
    include_dirs=[CSRC],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
