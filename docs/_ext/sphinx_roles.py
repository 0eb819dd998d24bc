"""A Griffe extension for this site: the package's reST-flavoured docstrings, read as Markdown.

mkdocstrings renders docstrings as Markdown. Three reST habits of this package's docstrings would show
as raw text there, so they are rewritten when the package is loaded (the source is not touched):

- roles (``:func:`fit```, ``:class:`~iwae.models.ModelConfig```, ``:mod:``, ``:meth:``, ``:data:``, ...)
  become optional cross-references: a link where the target is on the site, code otherwise;
- simple tables (rows between ``=====  =====`` rules) become Markdown tables;
- a paragraph ending in ``::`` ends in ``:`` (its indented block is a code block in both).
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|attr|data|exc|obj|const|file):`(~?)([^`]+)`")
RULE = re.compile(r"^=+(?: +=+)+ *$")


def _resolve(obj: griffe.Object, target: str) -> str | None:
    if target.startswith("iwae."):
        return target
    head, _, rest = target.partition(".")
    try:
        full = obj.resolve(head)
    except Exception:  # an unknown name stays code
        return None
    return f"{full}.{rest}" if rest else full


def _role(obj: griffe.Object, match: re.Match[str]) -> str:
    kind, short, target = match.groups()
    target = target.strip().removesuffix("()")
    title = target.rsplit(".", 1)[-1] if short else target
    full = None if kind == "file" else _resolve(obj, target)
    if full is None:
        return f"`{title}`"
    return f'<autoref identifier="{html.escape(full)}" optional><code>{html.escape(title)}</code></autoref>'


def _table(lines: list[str]) -> list[str]:
    """A reST simple table (``lines`` from its first rule to its last) as a Markdown table."""
    starts = [m.start() for m in re.finditer(r"=+", lines[0])]
    rows: list[list[str]] = []
    header_done = False
    for line in lines[1:]:
        if RULE.match(line):
            header_done = header_done or bool(rows)
            continue
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(cells)
        if not header_done:
            rows.append(["---"] * len(starts))
            header_done = True
    return ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _markdown(obj: griffe.Object, text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if RULE.match(line):
            rules = [j for j in range(i, len(lines)) if RULE.match(lines[j])]
            if len(rules) >= 3 and all(lines[j] for j in range(i, rules[2])):
                out.extend(_table(lines[i : rules[2] + 1]))
                i = rules[2] + 1
                continue
        if line.endswith("::") and line.strip() != "::":
            line = line[:-1]
        out.append(line)
        i += 1
    return ROLE.sub(lambda m: _role(obj, m), "\n".join(out))


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj, obj.docstring.value)
