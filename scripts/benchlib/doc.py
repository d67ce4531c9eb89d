"""docs/benchmarks.md: one bench's section rewritten between its markers, the others kept."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-serving:begin -->"
END = "<!-- bench-serving:end -->"


def write_doc(section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section between ``begin`` and ``end`` in docs/benchmarks.md (or append it)."""
    block = f"{begin}\n{section}\n{end}"
    if DOC.exists():
        text = DOC.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + block + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\nNumbers, and the exact commands that made them.\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
