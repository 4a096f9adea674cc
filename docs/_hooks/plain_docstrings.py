"""Griffe extension for the API reference: gdrd_fast's docstrings are plain text, not HTML.

Markdown passes raw HTML through, so formulas such as `<q_b, p_b>` or placeholders such as
`root/<identity>` would vanish from the rendered page as unknown tags. This escapes `<` in prose
(outside code spans and indented code blocks, where Markdown already shows it literally).
"""
from __future__ import annotations

import re

import griffe

_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")


def escape_prose(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("    "):  # an indented block: literal already
            lines.append(line)
            continue
        pieces, last = [], 0
        for span in _CODE_SPAN.finditer(line):
            pieces.append(line[last:span.start()].replace("<", "&lt;"))
            pieces.append(span.group(0))
            last = span.end()
        pieces.append(line[last:].replace("<", "&lt;"))
        lines.append("".join(pieces))
    return "\n".join(lines)


class PlainDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = escape_prose(obj.docstring.value)
