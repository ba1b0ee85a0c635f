"""A minimal HOCON reader for the shipped EMQX configuration (pyhocon is not among the locked dependencies).

What it reads: ``#`` and ``//`` comments; objects (``{...}``) of ``key = value``, ``key : value`` and
``key { ... }`` members; arrays (``[...]``); double-quoted strings with JSON escapes; unquoted values up to
the end of the line, a comma or a closing bracket (numbers, booleans and ``5s`` stay strings); members and
elements separated by commas or newlines. What it refuses (ValueError): anything else, e.g. substitutions
(``${...}`` outside quotes), ``include``, dotted keys, ``+=`` - none of which the shipped file uses, so a
new one there fails this reader loudly instead of being misread.
"""

from __future__ import annotations

import json
from typing import Any

_UNQUOTED_END = set(",}]\n#")


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> ValueError:
        line = self.text.count("\n", 0, self.pos) + 1
        return ValueError(f"HOCON line {line}: {what}")

    def skip(self, newlines: bool = True) -> None:
        """Skip blanks and comments (and newlines, unless told not to)."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#" or self.text.startswith("//", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def string(self) -> str:
        decoder = json.JSONDecoder()
        value, end = decoder.raw_decode(self.text, self.pos)
        if not isinstance(value, str):
            raise self.error("expected a string")
        self.pos = end
        return value

    def key(self) -> str:
        if self.peek() == '"':
            return self.string()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "_-"):
            self.pos += 1
        if start == self.pos:
            raise self.error(f"expected a key at {self.text[self.pos:self.pos + 20]!r}")
        return self.text[start:self.pos]

    def value(self) -> Any:
        self.skip()
        char = self.peek()
        if char == "{":
            return self.obj()
        if char == "[":
            return self.array()
        if char == '"':
            return self.string()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _UNQUOTED_END:
            if self.text.startswith("//", self.pos):
                break
            self.pos += 1
        raw = self.text[start:self.pos].strip()
        if not raw or "${" in raw or raw.startswith("include"):
            raise self.error(f"unsupported value {raw!r}")
        return raw

    def members(self, closing: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while True:
            self.skip()
            if self.peek() == closing or (closing == "" and self.pos >= len(self.text)):
                return result
            key = self.key()
            self.skip(newlines=False)
            if self.peek() in "=:":
                self.pos += 1
                value = self.value()
            elif self.peek() == "{":
                value = self.obj()
            else:
                raise self.error(f"expected '=', ':' or '{{' after {key!r}")
            if key in result:
                raise self.error(f"duplicate key {key!r} (merging is not supported here)")
            result[key] = value
            self.skip(newlines=False)
            if self.peek() == ",":
                self.pos += 1

    def obj(self) -> dict[str, Any]:
        self.pos += 1  # {
        result = self.members("}")
        self.pos += 1  # }
        return result

    def array(self) -> list[Any]:
        self.pos += 1  # [
        items: list[Any] = []
        while True:
            self.skip()
            if self.peek() == "]":
                self.pos += 1
                return items
            if not self.peek():
                raise self.error("unterminated array")
            items.append(self.value())
            self.skip(newlines=False)
            if self.peek() == ",":
                self.pos += 1


def loads(text: str) -> dict[str, Any]:
    """The document (an object without its outer braces, as EMQX's files are)."""
    return _Reader(text).members("")
