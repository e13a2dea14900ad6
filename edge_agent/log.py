"""Logging set-up: one line per event, readable by journald and by a person at a terminal.

Under systemd, stderr goes to the journal, which adds its own timestamps and
understands `<N>` syslog priority prefixes; so there we emit only the prefix
and the message. On a terminal we add a timestamp and colour the level; when
piped to a file we add the timestamp but never ANSI escapes, which would end
up as garbage in log files.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_COLOURS = {logging.DEBUG: "\x1b[2m", logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m", logging.CRITICAL: "\x1b[1;31m"}


def _stream_is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald socket systemd gave us (JOURNAL_STREAM=dev:ino)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _stream_is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})
_CONTROL_ONLY = dict(_CONTROL)
_CONTROL.update({0x5C: "\\\\"})


def printable(value: object) -> str:
    """Text from outside (file names, reasons quoting them, error messages) made safe for one log line:
    control characters (newlines, carriage returns, escape sequences that would drive a terminal or forge
    a journal priority) become backslash escapes, and bytes that are not UTF-8 (lone surrogates from
    os.fsdecode) become \\xNN. A backslash is doubled, so an escape cannot be faked either."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return _no_surrogates(text.translate(_CONTROL))


def _no_surrogates(text: str) -> str:
    """Bytes that are not UTF-8 (lone surrogates from os.fsdecode) as \\xNN: writable to any stream."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else
                       ch if not 0xD800 <= ord(ch) <= 0xDFFF else f"\\u{ord(ch):04x}" for ch in text)


def _escape_args(args: object) -> object:
    """The record's arguments with every string and path escaped (the format string is the code's own)."""
    def one(a: object) -> object:
        return printable(a) if isinstance(a, (str, os.PathLike, BaseException)) else a

    if isinstance(args, tuple):
        return tuple(one(a) for a in args)
    if isinstance(args, dict):
        return {k: one(v) for k, v in args.items()}
    return args


class OneLineFormatter(logging.Formatter):
    """Formats a record as exactly one line, so journald and grep see one event per line."""

    def __init__(self, journal: bool, colour: bool) -> None:
        super().__init__()
        self.journal, self.colour = journal, colour

    def format(self, record: logging.LogRecord) -> str:
        if record.args:
            record = logging.makeLogRecord({**record.__dict__, "args": _escape_args(record.args)})
            msg = record.getMessage()
        else:
            msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            msg = f"{msg} ({type(exc).__name__}: {printable(exc)})"
        msg = " | ".join(part for part in msg.splitlines() if part.strip()) or msg
        msg = _no_surrogates(msg.translate(_CONTROL_ONLY))  # text that reached the message some other way
        name = record.name.removeprefix("edge_agent.")
        if self.journal:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{name}: {msg}"
        stamp = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
        level = record.levelname
        if self.colour and record.levelno in _COLOURS:
            level = f"{_COLOURS[record.levelno]}{level}\x1b[0m"
        return f"{stamp} {level} {name}: {msg}"


def setup(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route the `edge_agent` loggers to `stream` (stderr by default) at `level`."""
    stream = stream or sys.stderr
    journal = _stream_is_journal(stream)
    colour = not journal and _stream_is_tty(stream) and "NO_COLOR" not in os.environ
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(journal, colour))
    logger = logging.getLogger("edge_agent")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    # onnxruntime and OpenCV print their own warnings to stderr; keep them for
    # real errors only so the journal stays one line per event.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
