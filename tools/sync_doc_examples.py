"""Copy each example file into the docs pages that show it: ``python tools/sync_doc_examples.py``.

A page shows an example as a fenced block right after a marker line::

    <!-- example: docs/examples/quickstart.py -->
    ```python
    ...the file's text, verbatim...
    ```

so the code reads as plain Markdown (on GitHub, in an editor) while the file
itself stays what the test suite runs. ``tests/test_docs_examples.py`` fails
when a block and its file differ; this script makes them equal again. With
``--check`` it only reports the pages that are out of date (exit code 1).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(
    r"^(?P<marker><!-- example: (?P<path>[^ ]+) -->\n)```python\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def shown_examples(text: str) -> list[tuple[str, str]]:
    """(example path, the code the page shows for it), in page order."""
    return [(match["path"], match["code"]) for match in BLOCK.finditer(text)]


def synced(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        code = (ROOT / match["path"]).read_text()
        return f"{match['marker']}```python\n{code}```"

    return BLOCK.sub(replace, text)


def main(argv: list[str]) -> int:
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = synced(text)
        if new != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if "--check" not in argv:
                page.write_text(new)
    verb = "out of date" if "--check" in argv else "updated"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
