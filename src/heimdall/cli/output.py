"""What the command line prints: values exactly, and nothing that can drive a terminal.

A decrypted value, a stored key name or a line of the audit trail is text someone else chose.
Printed as it is to a terminal, an escape sequence in it can recolour, retitle or rewrite what
the operator sees (OSC, CSI, C1 controls, bidirectional overrides), and Rich would also turn
``:smile:`` into an emoji and tabs into spaces. So:

* a value printed for a program (stdout is not a terminal) is written as its exact UTF-8
  bytes, followed by one newline, without going through Rich;
* everything printed to a terminal, and everything in tables and messages, has its control
  characters shown escaped (``\\x1b``, ``\\t``, ``\\u202e``; a backslash as ``\\\\``), so
  what is on the screen is what is stored and nothing more. ``--raw`` on ``decrypt`` prints
  the value as it is, for an operator who wants exactly that.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import IO, Any, Final

import orjson
from rich.console import Console

__all__ = ["SafeConsole", "terminal_safe", "write_json", "write_json_lines", "write_value"]

# Bidirectional controls reorder what a terminal shows ("Trojan Source"); line and paragraph
# separators break lines where a reader sees none.
_INVISIBLE: Final = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
)
_NAMED: Final = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _needs_escape(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F or char == "\\" or char in _INVISIBLE


def terminal_safe(text: str, *, message: bool = False) -> str:
    """*text* with every control character, bidirectional control and backslash escaped.

    A *message* (prose, perhaps over several lines) keeps its newlines and its backslashes,
    which there are a repr's own escapes (``field 'e\\x1b'``); only a value needs a backslash
    escaped to stay unambiguous.
    """
    if message:
        return "\n".join(
            "".join(
                _escape(char) if char != "\\" and _needs_escape(char) else char for char in line
            )
            for line in text.split("\n")
        )
    if not any(_needs_escape(char) for char in text):
        return text
    return "".join(_escape(char) if _needs_escape(char) else char for char in text)


class SafeConsole(Console):
    """A Rich console that never interprets markup or emoji codes and escapes control
    characters in every string it is given to print."""

    def __init__(self, *, stderr: bool = False, file: IO[str] | None = None) -> None:
        super().__init__(
            stderr=stderr,
            file=file,
            highlight=False,
            soft_wrap=True,
            markup=False,
            emoji=False,
        )

    def print(self, *objects: Any, **kwargs: Any) -> None:
        kwargs["markup"] = False
        kwargs["emoji"] = False
        super().print(
            *(terminal_safe(o, message=True) if isinstance(o, str) else o for o in objects),
            **kwargs,
        )

    def print_json(self, json: str | None = None, **_: Any) -> None:
        """The document in *json*, through :func:`write_json` (no Rich highlighting)."""
        write_json(orjson.loads(json or "null"), stream=self.file)


def write_value(text: str, *, raw: bool = False, stream: IO[str] | None = None) -> None:
    """Print a stored value: its exact bytes for a program, escaped for a terminal (unless
    *raw*), followed by one newline."""
    stream = stream or sys.stdout
    if stream.isatty() and not raw:
        text = terminal_safe(text)
    _write(stream, text.encode("utf-8") + b"\n")


def write_json(document: Any, stream: IO[str] | None = None) -> None:
    """Print a JSON document; on a terminal every non-ASCII character is escaped as \\uXXXX,
    so no control character (C1 included) reaches it raw."""
    stream = stream or sys.stdout
    if stream.isatty():
        data = json.dumps(document, ensure_ascii=True, indent=2).encode("ascii")
    else:
        data = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    _write(stream, data + b"\n")


def write_json_lines(documents: Iterable[Any], stream: IO[str] | None = None) -> None:
    """Print one compact JSON document per line (JSON Lines), escaped to ASCII on a terminal
    as :func:`write_json` does; exact (orjson's bytes) for a program."""
    stream = stream or sys.stdout
    terminal = stream.isatty()
    for document in documents:
        if terminal:
            data = json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode()
        else:
            data = orjson.dumps(document)
        _write(stream, data + b"\n")


def _write(stream: IO[str], data: bytes) -> None:
    """*data* as bytes to the stream's binary buffer, past Python's text layer (and Rich)."""
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # an in-memory text stream
        stream.write(data.decode("utf-8"))
        return
    buffer.write(data)
    buffer.flush()
