"""HTML checked by element, not by regex: a small tree built with the standard library's
``html.parser``, and look-ups by id, tag and attribute.

    page = client.get("/").data.decode()
    assert "disabled" in element_by_id(page, "start-training").attrs
    assert text_of(page, "density-dead") == "2"
    rows = [e.get("id") for e in find_all(page, "tr", class_="hit")]

Every function takes the HTML text or an ``Element`` (e.g. one found before). Text is unescaped
(``&lt;b&gt;`` reads ``<b>``) and ``text`` collapses runs of whitespace to one space.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

# Elements that never have content or an end tag.
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                  "source", "track", "wbr"})


@dataclass(eq=False)
class Element:
    """One element: its tag, its attributes (a valueless one, like ``disabled``, maps to "")
    and its children (elements and text, in document order)."""

    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        return self.attrs.get(name)

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    @property
    def text(self) -> str:
        """The text of the element and everything in it, whitespace collapsed."""
        return " ".join(self.raw_text.split())

    @property
    def raw_text(self) -> str:
        """The text of the element and everything in it, exactly as written (unescaped)."""
        return "".join(c if isinstance(c, str) else c.raw_text for c in self.children)

    def iter(self) -> Iterator[Element]:
        """This element and all elements inside it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def matches(self, tag: str | None, attrs: dict[str, str]) -> bool:
        """Tag equal (if given) and each attribute equal; ``class`` matches one class name."""
        if tag is not None and self.tag != tag:
            return False
        for name, value in attrs.items():
            if name == "class":
                if value not in self.classes:
                    return False
            elif self.attrs.get(name) != value:
                return False
        return True


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v if v is not None else "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(
            Element(tag, {k: v if v is not None else "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        # Close up to the innermost open element of that tag; a stray end tag is ignored.
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str | Element) -> Element:
    """The document tree of ``html`` (an ``Element`` is returned as it is)."""
    if isinstance(html, Element):
        return html
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def find_all(html: str | Element, tag: str | None = None, **attrs: str) -> list[Element]:
    """Elements inside ``html`` with that tag (any if None) and attributes, in document order.
    Attribute names are Python names: ``class_`` for ``class``, underscores for dashes
    (``text_anchor``)."""
    root = parse(html)
    wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}
    return [e for e in root.iter() if e is not root and e.matches(tag, wanted)]


def ids(html: str | Element, prefix: str = "") -> list[str]:
    """Every id in the document that starts with ``prefix``, in order."""
    found = (e.attrs.get("id") for e in parse(html).iter())
    return [i for i in found if i is not None and i.startswith(prefix)]


def element_by_id(html: str | Element, element_id: str) -> Element:
    """The element with that id; AssertionError (listing the ids there are) when none has it."""
    for e in parse(html).iter():
        if e.attrs.get("id") == element_id:
            return e
    raise AssertionError(f"no element with id={element_id!r}; ids: {ids(html)}")


def text_of(html: str | Element, element_id: str) -> str:
    """The whitespace-collapsed text of the element with that id."""
    return element_by_id(html, element_id).text


def attr(html: str | Element, element_id: str, name: str) -> str | None:
    """Attribute ``name`` of the element with that id (None when it has none)."""
    return element_by_id(html, element_id).get(name)
