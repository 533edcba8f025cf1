"""tests/html.py, the HTML helper the web tests use: a tree that matches what a browser builds."""

from __future__ import annotations

import pytest

from .html import attr, element_by_id, find_all, ids, text_of

PAGE = """<!doctype html><html><body>
<form id="f"><input id="q" name="q" value="a &amp; b" disabled><br>
  <select id="s"><option value="1">One</option><option value="2" selected>Two</option></select>
</form>
<p id="p" class="note  hit">Say <b>“&lt;b&gt;”</b>
   twice</p></div>
<svg id="c"><circle r="1"/><g class="axis axis-x"><text text-anchor="middle">10</text></g></svg>
</body></html>"""


def test_elements_by_id_text_and_attributes():
    assert ids(PAGE) == ["f", "q", "s", "p", "c"] and ids(PAGE, "s") == ["s"]
    assert attr(PAGE, "q", "value") == "a & b" and attr(PAGE, "q", "disabled") == ""
    assert attr(PAGE, "q", "checked") is None
    # void elements do not swallow what follows; a stray </div> closes nothing
    assert [e.tag for e in find_all(element_by_id(PAGE, "f"))] == [
        "input", "br", "select", "option", "option"]
    (body,) = find_all(PAGE, "body")
    assert ids(body) == ["f", "q", "s", "p", "c"]
    assert element_by_id(PAGE, "p").classes == ["note", "hit"]
    assert text_of(PAGE, "p") == "Say “<b>” twice"
    assert find_all(PAGE, "b")[0].raw_text == "“<b>”"
    assert [o.get("value") for o in find_all(PAGE, "option") if "selected" in o.attrs] == ["2"]
    assert [t.text for t in find_all(PAGE, "text", text_anchor="middle")] == ["10"]
    assert len(find_all(PAGE, "g", class_="axis-x")) == 1
    assert find_all(PAGE, "g", class_="axis-y") == []
    (circle,) = find_all(PAGE, "circle")
    assert circle.children == []  # <circle/> closes itself


def test_missing_id_names_the_ids_there_are():
    with pytest.raises(AssertionError, match=r"no element with id='nope'; ids: \['f', 'q'"):
        element_by_id(PAGE, "nope")
