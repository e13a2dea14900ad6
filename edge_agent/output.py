"""Standard output that cannot be written ends a command with one line and an exit code, never a traceback.

Why: `edge-agent results > /mnt/usb/list.txt` on a full stick, or into a
closed or broken descriptor (a cron job with `>&-`, a dead ssh session), used
to end in an OSError traceback (ENOSPC, EIO), or, with standard output closed,
in exit 0 with nothing written anywhere: a script believed it had its list.
A reader that goes away early (`results | head -1`) is normal and stays quiet
(click handles EPIPE).
"""
from __future__ import annotations

import errno
import io
import os
import sys

import click

# Commands whose only product is what they print: with no standard output they would do nothing, say nothing.
REPORTS = {"results", "quarantine", "duplicates", "status"}


def require_stdout(command: str | None) -> None:
    """A report command with standard output closed (`>&-`) fails instead of printing into nothing."""
    if command in REPORTS and (sys.stdout is None or not _fd_open(1)):
        click.echo(f"edge-agent: error: standard output is closed, so `{command}` has nowhere to print; redirect it "
                   "to a file (> list.txt) or to /dev/null", err=True)
        sys.exit(1)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class OutputFailed(OSError):
    """Writing to standard output failed (raised by CheckedStdout in place of the plain OSError)."""


class CheckedStdout(io.TextIOWrapper):
    """The process's standard output, whose write errors say they are output errors: an ENOSPC from a full
    destination must not be mistaken for (or reported like) a fault of the command."""

    def write(self, s: str) -> int:
        try:
            return super().write(s)
        except OSError as e:
            raise OutputFailed(e.errno, e.strerror) from None

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            raise OutputFailed(e.errno, e.strerror) from None


def check_stdout() -> None:
    """Put CheckedStdout in place of the real standard output (not of a test runner's capture)."""
    out = sys.stdout
    if out is None or out is not sys.__stdout__ or not isinstance(out, io.TextIOWrapper):
        return
    try:
        out.flush()
        sys.stdout = CheckedStdout(out.detach(), encoding=out.encoding, errors=out.errors,
                                   line_buffering=out.line_buffering)
    except (OSError, ValueError):
        return


def fail_output(e: OSError, quiet: bool = False) -> None:
    """Drop what could not be written (so the exit does not raise again) and exit 1 with the cause."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    if quiet:
        sys.exit(1)
    click.echo(f"edge-agent: error: cannot write the output ({e.strerror or e}); the listing is incomplete: free "
               "space on the destination or write somewhere else", err=True)
    sys.exit(1)


class OutputGroup(click.Group):
    """The `edge-agent` command group: output write failures become one error line (output.py)."""

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        check_stdout()
        try:
            try:
                return super().invoke(ctx)
            finally:  # what is still buffered must fail here, not at exit (where it would be a traceback)
                if isinstance(sys.stdout, CheckedStdout):
                    sys.stdout.flush()
        except OutputFailed as e:
            if e.errno == errno.EPIPE:  # the reader went away (| head): quiet, as click does
                fail_output(e, quiet=True)
            fail_output(e)
