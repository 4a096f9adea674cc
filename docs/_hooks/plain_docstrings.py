"""Griffe extension for the API reference: gdrd_fast's docstrings are plain text, not HTML.

Markdown passes raw HTML through, so formulas such as `<q_b, p_b>` or placeholders such as
`root/<identity>` would vanish from the rendered page as unknown tags, and `B*Ct*H*W` would turn
into emphasis. This escapes `<` and `*` in prose (outside code spans and indented code
blocks, where Markdown already shows them literally).
"""
from __future__ import annotations

import re

import griffe

_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")


def _escape(prose: str) -> str:
    return prose.replace("<", "&lt;").replace("*", "\\*")


def escape_prose(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("    "):  # an indented block: literal already
            lines.append(line)
            continue
        pieces, last = [], 0
        for span in _CODE_SPAN.finditer(line):
            pieces.append(_escape(line[last:span.start()]))
            pieces.append(span.group(0))
            last = span.end()
        pieces.append(_escape(line[last:]))
        lines.append("".join(pieces))
    return "\n".join(lines)


class PlainDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = escape_prose(obj.docstring.value)
