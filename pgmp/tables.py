"""Aligned text tables for the operator's terminal: columns, humanised units, fitting the terminal's width.

Cells are text the caller formatted (with the ``human_*`` helpers). Numbers are
right-aligned, text left-aligned, columns two spaces apart. Given a width (a
terminal), a table that does not fit first uses its columns' short titles, then
abbreviates long text, then drops the columns it may drop; with no width (a pipe, a
file) every column is printed whole. Escape codes only when asked (a terminal
that wants them): the header in bold, nothing else.
"""
from __future__ import annotations

import os
import shutil
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

SEP = "  "
TEXT_CAP = 16           # long text is abbreviated to this before a column is dropped
TEXT_FLOOR = 4          # and to no less than this (or its title) before giving up
BOLD, RESET = "\x1b[1m", "\x1b[0m"


@dataclass(frozen=True)
class Column:
    """One column: its title, how it aligns, and what it may give up when space is short."""
    title: str
    numeric: bool = False   # right-aligned
    drop: int = 0           # 0: always shown; when space is short, higher numbers are dropped first
    short: str = ""         # a shorter title for a narrow terminal
    shrink: bool = False    # text that may be abbreviated with an ellipsis


@dataclass(frozen=True)
class Terminal:
    """Where the output goes: a terminal (its size, whether to style) or not (full width, plain)."""
    tty: bool
    width: int | None = None
    height: int | None = None
    style: bool = False
    ellipsis: str = "…"

    @classmethod
    def of(cls, stream) -> Terminal:
        if not stream.isatty():
            return cls(tty=False)
        size = shutil.get_terminal_size()
        style = "NO_COLOR" not in os.environ and os.environ.get("TERM", "") not in ("", "dumb")
        utf8 = (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8"
        return cls(tty=True, width=size.columns, height=size.lines, style=style, ellipsis="…" if utf8 else "~")

    @property
    def layout(self) -> dict:
        """The keyword arguments of render() (and of the views built on it) for this output."""
        return {"width": self.width, "style": self.style, "ellipsis": self.ellipsis}


# ---------------------------------------------------------------- rendering

def render(columns: Sequence[Column], rows: Sequence[Sequence], width: int | None = None,
           style: bool = False, ellipsis: str = "…") -> str:
    """The table as text: a header line, then one line per row (None is an empty cell)."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    keep, titles, widths = _layout(columns, cells, width)
    lines = [_line([titles[i] for i in keep], [columns[i] for i in keep], [widths[i] for i in keep], ellipsis)]
    for row in cells:
        lines.append(_line([row[i] for i in keep], [columns[i] for i in keep], [widths[i] for i in keep], ellipsis))
    if style:
        lines[0] = BOLD + lines[0] + RESET
    return "\n".join(lines)


def render_pairs(pairs: Sequence[tuple[str, object]]) -> str:
    """A block of ``name  value`` lines, the values lined up."""
    w = max((text_width(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k}{' ' * (w - text_width(k))}{SEP}{v}".rstrip() for k, v in pairs)


def _line(values: list[str], columns: list[Column], widths: list[int], ellipsis: str) -> str:
    out = []
    for value, col, w in zip(values, columns, widths):
        if text_width(value) > w:
            value = _truncate(value, w, ellipsis)
        pad = " " * (w - text_width(value))
        out.append(pad + value if col.numeric else value + pad)
    return SEP.join(out).rstrip()


def _layout(columns: Sequence[Column], cells: list[list[str]], width: int | None):
    """Which columns to show, under which titles, how wide: all of them in full unless ``width`` says less."""
    titles = [c.title for c in columns]
    content = [max((text_width(row[i]) for row in cells), default=0) for i in range(len(columns))]
    widths = [max(content[i], text_width(titles[i])) for i in range(len(columns))]
    keep = list(range(len(columns)))

    def total() -> int:
        return sum(widths[i] for i in keep) + len(SEP) * max(len(keep) - 1, 0)

    if width is None or total() <= width:
        return keep, titles, widths
    for i, col in enumerate(columns):
        if col.short:
            titles[i] = col.short
            widths[i] = max(content[i], text_width(col.short))
    _shrink(columns, titles, widths, keep, total, width, TEXT_CAP)
    while total() > width:
        droppable = [i for i in keep if columns[i].drop > 0]
        if not droppable:
            break
        keep.remove(max(droppable, key=lambda i: (columns[i].drop, i)))
    _shrink(columns, titles, widths, keep, total, width, TEXT_FLOOR)
    return keep, titles, widths


def _shrink(columns, titles, widths, keep, total, width, floor):
    """Narrow the widest abbreviable text column one cell at a time, none below ``floor`` or its title."""
    while total() > width:
        narrowable = [i for i in keep
                      if columns[i].shrink and widths[i] > max(floor, text_width(titles[i]))]
        if not narrowable:
            return
        widths[max(narrowable, key=lambda i: widths[i])] -= 1


def text_width(s: str) -> int:
    """Columns ``s`` takes on a terminal: wide (East Asian) characters two, combining marks none."""
    if s.isascii():
        return len(s)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in s)


def _truncate(s: str, w: int, ellipsis: str) -> str:
    room = w - text_width(ellipsis)
    out, used = [], 0
    for ch in s:
        cw = text_width(ch)
        if used + cw > room:
            break
        out.append(ch)
        used += cw
    return "".join(out) + ellipsis


# ---------------------------------------------------------------- units

def human_bytes(n: float) -> str:
    """Bytes with PostgreSQL's units (pg_size_pretty: 1 kB = 1024 bytes): "512 B", "12.3 MB"."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1024
        if abs(n) < 1023.95 or unit == "PB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """A count in at most five characters: "999", "1.2k", "123k", "4.5M"."""
    n = round(n)
    if abs(n) < 1000:
        return str(n)
    x = float(n)
    for unit in ("k", "M", "G", "T", "P"):
        x /= 1000
        if abs(x) < 99.95:
            return f"{x:.1f}{unit}"
        if abs(x) < 999.5 or unit == "P":
            return f"{x:.0f}{unit}"
    raise AssertionError("unreachable")


def human_rate(x: float) -> str:
    """A rate per second: one decimal below 100 ("0.5", "12.3"), then as a count ("1.2k")."""
    if x == 0:
        return "0"
    return f"{x:.1f}" if abs(x) < 99.95 else human_count(x)


def human_us(us: float | None) -> str:
    """A duration given in microseconds: "850 us", "12.3 ms", "2.5 s", "1m 30s"; None (no sample) is "-"."""
    if us is None:
        return "-"
    if us < 999.5:
        return f"{us:.0f} us"
    if us < 999_950:
        return f"{us / 1000:.1f} ms"
    if us < 59_950_000:
        return f"{us / 1e6:.1f} s"
    return human_seconds(us / 1e6)


def human_seconds(s: float) -> str:
    """An age or uptime: "59s", "12m 03s", "3h 02m", "5d 03h"."""
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def human_percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
