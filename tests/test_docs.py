"""The documents' links into the code point at what they name.

docs/derivation.md links equations to line ranges of the code (``file.py#L10-L24``). Where a
link's label is a code name (`` `SRVAE.model` ``, `` `GaussianEncoder` ``), the range must start
at that name's ``def`` or ``class`` (or its decorator), so that an edit which moves code without
moving the links fails here instead of leaving the reader on the wrong lines.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
LINK = re.compile(r"\[`([A-Za-z_][\w.]*)`\]\(\.\./pyro_srvae/([\w/]+\.py)#L(\d+)(?:-L(\d+))?\)")


def _named_links():
    for doc in DOCS:
        for match in LINK.finditer(doc.read_text()):
            yield doc.name, *match.groups()


LINKS = sorted(set(_named_links()))


def test_there_are_named_links_to_check():
    assert len(LINKS) > 30


@pytest.mark.parametrize("doc, label, path, first, last", LINKS)
def test_a_named_link_starts_at_its_definition(doc, label, path, first, last):
    lines = (ROOT / "pyro_srvae" / path).read_text().splitlines()
    first, last = int(first), int(last or first)
    assert 1 <= first <= last <= len(lines), f"{doc}: {label} -> {path}#L{first}-L{last} is outside the file"
    if label.endswith(".py"):
        return  # a link to a file's opening lines
    name = label.split(".")[-1]
    head = lines[first - 1 : first + 1]  # a decorator may come first
    defines = (f"def {name}(", f"class {name}(", f"class {name}:", f"self.{name} = ")
    if any(pattern in line for line in head for pattern in defines):
        return
    # a class's label may point into that class (its constructor, say)
    enclosing = next((line for line in reversed(lines[:first]) if line.startswith("class ")), "")
    if enclosing.startswith((f"class {name}(", f"class {name}:")):
        return
    pytest.fail(f"{doc}: [{label}] -> {path}#L{first} is {lines[first - 1].strip()!r}, not the definition of {name}")


LINE_LABEL = re.compile(r"\[[^\]]*?\bL(\d+)(?:–(\d+))?[^\]]*\]\(\.\./pyro_srvae/([\w/]+\.py)#L(\d+)(?:-L(\d+))?\)")


def test_a_label_that_names_lines_names_the_link_s_lines():
    """``[L42–44](file.py#L42-L44)``: a reader who reads the label goes to the lines the link opens."""
    stale = []
    for doc in DOCS:
        for match in LINE_LABEL.finditer(doc.read_text()):
            first, last, path, link_first, link_last = match.groups()
            if (first, last or first) != (link_first, link_last or link_first):
                stale.append(f"{doc.name}: {match.group(0)}")
    assert stale == []
