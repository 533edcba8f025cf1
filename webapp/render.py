"""Rendering helpers: one URL two renderings, JSON negotiation, number formats, SVG charts.

No markup for cards lives here (that is ``templates/trainings/_card.html``); only the small
pieces the templates call as filters and globals.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import Response, abort, current_app, jsonify, render_template, request
from markupsafe import Markup, escape
from werkzeug.exceptions import RequestEntityTooLarge

from worker.jobs import Invalid
from worker.jobs.common import finite


# ---------------------------------------------------------------------------- negotiation
def is_fragment_request() -> bool:
    """An htmx request that asked for a part of the page (not a boosted navigation, and not a
    history restore, which wants the whole page back)."""
    h = request.headers
    return h.get("HX-Request") == "true" and h.get("HX-Boosted") != "true" \
        and h.get("HX-History-Restore-Request") != "true"


def posted() -> Mapping[str, Any]:
    """The request's fields: a JSON object's (``Content-Type: application/json``), else the
    form's (a MultiDict: checkboxes read right). A JSON body that does not parse, nests past
    what the parser follows, or is not an object raises ``Invalid`` (422 with the sentence);
    one over the size limit ``RequestEntityTooLarge`` (413), chunked or not."""
    if not request.is_json:
        return request.form
    data = request.get_data(cache=True)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and request.content_length is None and len(data) >= limit:
        raise RequestEntityTooLarge()  # a chunked body is cut at the limit, not refused
    problem = None
    try:
        body = json.loads(data)
    except RecursionError:
        problem = "The JSON body nests too deeply."
    except ValueError as exc:  # not JSON, or not UTF-8
        problem = f"The body is not valid JSON ({exc})."
    else:
        if not isinstance(body, Mapping):
            problem = "The body must be a JSON object of fields."
        else:
            try:  # a lone surrogate ("\ud800") parses, but can be neither stored nor shown
                json.dumps(body, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                problem = ("The body holds text that is not valid Unicode (a lone surrogate "
                           "escape such as \\ud800).")
    if problem:
        raise Invalid(problem, {"form": problem})
    return body


def posted_text(names: Sequence[str]) -> dict[str, str]:
    """The named fields of ``posted()`` as the form's strings ("" when missing or null; a JSON
    number as its text), for the routes that parse text fields (adding a model or dataset):
    a JSON body works as the form does."""
    body = posted()
    return {n: "" if body.get(n) is None else body[n] if isinstance(body[n], str)
            else json.dumps(body[n]) for n in names}


def page_or_fragment(page: str, fragment: str, status: int = 200, **ctx: Any) -> tuple[str, int]:
    """Render ``fragment`` for htmx requests, else the full ``page`` (which includes it)."""
    template = fragment if is_fragment_request() else page
    return render_template(template, **ctx), status


def wants_json() -> bool:
    """JSON when ``?format=json``, HTML when ``?format=html``, else when the Accept header
    prefers JSON over HTML (the error about another format, too: ``check_format``)."""
    fmt = request.args.get("format")
    if fmt in ("json", "html"):
        return fmt == "json"
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and \
        request.accept_mimetypes["application/json"] > request.accept_mimetypes["text/html"]


OTHER_FORMATS = {"trainings.metrics": ("csv",), "reports.report": ("saebench",),
                 "config_templates.detail": ("toml",)}
"""The ``?format=`` values a route answers besides ``json`` and ``html``, by endpoint."""


def check_format() -> None:
    """422 naming the choices for a ``?format=`` the route does not answer (an unknown one
    quietly got the HTML page)."""
    fmt = request.args.get("format")
    if not fmt or request.endpoint in (None, "static"):
        return
    known = ("json", "html", *OTHER_FORMATS.get(request.endpoint, ()))
    if fmt not in known:
        shown = fmt if len(fmt) <= 40 else fmt[:40] + "..."
        abort(422, description=f"format must be one of {', '.join(known)} (got {shown!r}).")


def json_response(data: Any, status: int = 200) -> Response:
    resp = jsonify(data)
    resp.status_code = status
    return resp


# ---------------------------------------------------------------------------- formats
def fmt_int(value: Any) -> str:
    if value is None:
        return "—"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "—"


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "—"


def fmt_sci(value: Any) -> str:
    """Learning rates: 0.002 -> "2.00e-3"."""
    v = finite(value)
    if v is None:
        return "—"
    if v == 0:
        return "0"
    mant, exp = f"{v:.2e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_compact(value: Any) -> str:
    """12345 -> "12.3k", 2.5e6 -> "2.50M"."""
    v = finite(value)
    if v is None:
        return "—"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}"


def fmt_bytes(value: Any) -> str:
    if value is None:
        return "—"
    v = float(value)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{int(v)} B"


def fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = max(0, int(round(float(seconds))))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def fmt_time(ts: Any) -> str:
    """Clock time of a timestamp (today: HH:MM:SS; older: date too)."""
    if ts is None:
        return "—"
    t = float(ts)
    if time.strftime("%Y-%m-%d", time.localtime(t)) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", time.localtime(t))
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def fmt_pct(fraction: Any, digits: int = 1) -> str:
    if fraction is None:
        return "—"
    return f"{100 * float(fraction):.{digits}f}%"


FILTERS = {"int": fmt_int, "num": fmt_num, "sci": fmt_sci, "compact": fmt_compact,
           "bytes": fmt_bytes, "duration": fmt_duration, "clock": fmt_time, "pct": fmt_pct}


# ---------------------------------------------------------------------------- charts
MAX_POINTS = 200


def downsample(points: Sequence[tuple[float, float]], limit: int = MAX_POINTS
               ) -> list[tuple[float, float]]:
    """At most ``limit`` points spread evenly over the run; the first and last always kept."""
    pts = [(float(x), float(y)) for x, y in points
           if y is not None and math.isfinite(float(y))]
    n = len(pts)
    if n <= limit:
        return pts
    idx = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})
    return [pts[i] for i in idx]


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        if v >= lo - step * 1e-9:
            ticks.append(round(v, 12))
        v += step
    return ticks or [lo, hi]


def _tick_label(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 10000:
        return fmt_compact(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.3g}"
    if a >= 0.001:
        return f"{v:.3g}"
    return fmt_sci(v)


def _step_decimals(step: float) -> int | None:
    """The decimals that write every multiple of a round tick step (1, 2, 2.5 or 5 x 10^e, as
    ``nice_ticks`` makes) exactly: 0.002 -> 3, 0.0025 -> 4, 5 -> 0, 25 -> 0; None for any
    other step (a log axis, or a range's bare ends)."""
    e = math.floor(math.log10(step))
    m = step / 10 ** e
    for nice in (1.0, 2.0, 2.5, 5.0, 10.0):
        if abs(m - nice) < 1e-6:
            return max(0, -e + (1 if nice == 2.5 else 0) - (1 if nice == 10.0 else 0))
    return None


def _tick_labels(ticks: Sequence[float]) -> list[str]:
    """One axis's labels. Evenly spaced round ticks get the decimals their step needs, so that
    no two read alike (15.9975, 16.0000, 16.0025, not "16" three times) and each is exact
    (10.25, not 10.2); values from 10,000 up or with more than 4 decimals keep
    ``_tick_label``'s compact forms (25k, 2.00e-4) unless those repeat. Other ticks keep
    ``_tick_label``'s forms, with more significant digits while two are alike."""
    labels = [_tick_label(t) for t in ticks]
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    if not steps or min(steps) <= 0:
        return labels
    step = min(steps)
    d = _step_decimals(step) if max(steps) - step <= step * 1e-6 else None
    repeats = len(set(labels)) < len(labels)
    if d is not None and (repeats or (d <= 4 and max(abs(t) for t in ticks) < 10000)):
        # 0.0 for a zero that came out as -1e-17 (no "-0.000")
        return [f"{0.0 if abs(t) < step * 1e-6 else t:.{d}f}" for t in ticks]
    digits = 3
    while len(set(labels)) < len(labels) and digits < 15:
        digits += 1
        labels = [f"{t:.{digits}g}" for t in ticks]
    return labels


def _tick(cls: str, line: tuple[Any, Any, Any, Any], label_at: tuple[Any, Any], anchor: str,
          label: str) -> str:
    """One gridline or tick mark (``line``: x1, x2, y1, y2) and its ``label`` at ``label_at``
    (x, y); coordinates in SVG user units, as numbers or already formatted text."""
    x1, x2, y1, y2 = line
    x, y = label_at
    return (f'<line class="{cls}" x1="{x1}" x2="{x2}" y1="{y1}" y2="{y2}"/>'
            f'<text x="{x}" y="{y}" text-anchor="{anchor}">{escape(label)}</text>')


def _axes(out: list[str], yticks: list[float], xticks: list[float],
          sx: Callable[[float], float], sy: Callable[[float], float],
          plot: tuple[float, float, float, float], label_y: float) -> None:
    """Gridlines with y labels, the x axis line with ticks and labels (shared by the charts)."""
    left, top, pw, ph = plot
    out.append('<g class="axis axis-y">')
    for t, label in zip(yticks, _tick_labels(yticks)):
        y = f"{sy(t):.1f}"
        out.append(_tick("grid", (left, left + pw, y, y), (left - 6, f"{sy(t) + 3.5:.1f}"),
                         "end", label))
    out.append('</g><g class="axis axis-x">')
    out.append(f'<line class="axis-line" x1="{left}" x2="{left + pw}" y1="{top + ph}" '
               f'y2="{top + ph}"/>')
    for t, label in zip(xticks, _tick_labels(xticks)):
        x = f"{sx(t):.1f}"
        out.append(_tick("tick", (x, x, top + ph, top + ph + 4), (x, label_y), "middle", label))
    out.append("</g>")


def _svg_open(chart_id: str, cls: str, label: str, width: int, height: int, attrs: str,
              data: str) -> str:
    """A chart's opening ``<svg>`` (fixed viewBox of ``width`` x ``height`` user units, then
    ``attrs``, the aria label and ``data``) and its ``<title>``."""
    return (f'<svg id="{escape(chart_id)}" class="{cls}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" {attrs} aria-label="{escape(label)}" {data}>'
            f'<title>{escape(label)}</title>')


def _empty_plot(plot: tuple[float, float, float, float], text: str) -> str:
    """The frame of the plot area (left, top, width, height in user units) with ``text`` in its
    middle: a chart with nothing to draw."""
    left, top, pw, ph = plot
    return (f'<rect class="chart-frame" x="{left}" y="{top}" width="{pw}" height="{ph}"/>'
            f'<text class="chart-empty" x="{left + pw / 2}" y="{top + ph / 2}" '
            f'text-anchor="middle">{escape(text)}</text>')


def line_chart(points: Sequence[tuple[float, float]], *, label: str, chart_id: str,
               digits: int = 4, width: int = 480, height: int = 180) -> Markup:
    """An inline SVG line chart: axes with tick labels, a path, a circle with a ``<title>``
    hover text per (downsampled) point. Fixed size (viewBox) so swaps never move the layout."""
    pts = downsample(points)
    left, right, top, bottom = 52, 12, 12, 26
    pw, ph = width - left - right, height - top - bottom
    out = [_svg_open(chart_id, "chart", label, width, height,
                     'preserveAspectRatio="none" role="img"', f'data-points="{len(pts)}"')]
    if not pts:
        out.append(_empty_plot((left, top, pw, ph), "Waiting for the first metrics…"))
        out.append("</svg>")
        return Markup("".join(out))
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:
        x1 = x0 + 1
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo <= max(1e-12, 1e-9 * max(abs(y_lo), abs(y_hi))):  # flat: one labelled line
        pad = abs(y_hi) * 0.1 or 1.0
        yticks = [y_hi]
        y_lo, y_hi = y_lo - pad, y_hi + pad
    else:
        yticks = nice_ticks(y_lo, y_hi, 4)
    y0, y1 = min(yticks[0], y_lo), max(yticks[-1], y_hi)
    xticks = [t for t in nice_ticks(x0, x1, 5) if x0 <= t <= x1]
    if all(float(x).is_integer() for x in xs):  # steps: no tick at step 1.5
        xticks = [t for t in xticks if float(t).is_integer()]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    _axes(out, yticks, xticks, sx, sy, (left, top, pw, ph), label_y=height - 8)
    d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}"
                 for i, (x, y) in enumerate(pts))
    out.append(f'<path class="line" d="{d}"/>')
    out.append('<g class="points">')
    name = escape(label)
    for x, y in pts:  # fmt_num gives digits only: nothing to escape
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"><title>step '
                   f'{int(x):,}: {name} {fmt_num(y, digits)}</title></circle>')
    out.append("</g></svg>")
    return Markup("".join(out))


def device_label(health: dict[str, Any]) -> str:
    """"CPU", "CUDA: Orin (5.6 GiB)" or "No worker yet" (memory as everywhere: ``fmt_bytes``)."""
    device = health.get("device")
    if not device:
        return "No worker yet"
    kind = str(device).split(":")[0].upper()
    name = health.get("device_name")
    mem = health.get("device_memory")
    if kind == "CPU":
        return "CPU"
    text = f"{kind}: {name}" if name else kind
    if mem:
        text += f" ({fmt_bytes(mem)})"
    return text


def _density_tip(lo: float, hi: float, count: float) -> str:
    return f"log10 frequency {lo:.2f} to {hi:.2f}: {int(count):,} latents"


def histogram_svg(edges: Sequence[float], counts: Sequence[float], *, chart_id: str,
                  label: str = "Latent density", x_label: str = "log10 frequency",
                  y_label: str = "latents", width: int = 560, height: int = 220,
                  tip: Callable[[float, float, float], str] = _density_tip,
                  decade_ticks: bool = True, empty: str = "No alive latents.") -> Markup:
    """An inline SVG histogram in ``line_chart``'s style: one bar per bin (``edges`` has one
    more entry than ``counts``) with a ``<title>`` hover text (``tip(lo, hi, count)``), tick
    labels and axis labels. ``decade_ticks``: whole numbers on the x axis when it spans at
    most 12 (log10 decades), else round ticks; ``empty``: the text when every count is 0.

    Fixed viewBox, scaled by CSS with its aspect ratio kept (the text stays undistorted)."""
    left, right, top, bottom = 52, 12, 12, 44
    pw, ph = width - left - right, height - top - bottom
    out = [_svg_open(chart_id, "chart histogram", label, width, height, 'role="img"',
                     f'data-bins="{len(counts)}"')]
    axis_labels = (f'<text class="axis-label" x="{left + pw / 2:.1f}" y="{height - 4}" '
                   f'text-anchor="middle">{escape(x_label)}</text>'
                   f'<text class="axis-label" x="12" y="{top + ph / 2:.1f}" '
                   f'text-anchor="middle" transform="rotate(-90 12 {top + ph / 2:.1f})">'
                   f'{escape(y_label)}</text>')
    try:
        xs = [float(e) for e in edges]
        ys = [max(0.0, float(c)) for c in counts]
    except (TypeError, ValueError):
        xs, ys = [], []
    ok = len(xs) == len(ys) + 1 and len(ys) > 0 and all(map(math.isfinite, xs + ys)) \
        and xs[-1] > xs[0]
    if not ok or max(ys) <= 0:
        out.append(_empty_plot((left, top, pw, ph), empty if ok else "No histogram."))
        out.append(axis_labels + "</svg>")
        return Markup("".join(out))
    x0, x1 = xs[0], xs[-1]
    yticks = nice_ticks(0.0, max(max(ys), 4.0), 4)  # whole counts: no 0.25 latents
    if yticks[-1] < max(ys):  # end the axis on a labelled gridline above the tallest bar
        yticks.append(round(yticks[-1] + (yticks[-1] - yticks[-2]), 12))
    y1 = yticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - y / y1 * ph

    if decade_ticks and x1 - x0 <= 12:  # whole decades on the log10 axis
        xticks = [float(v) for v in range(math.ceil(x0 - 1e-9), math.floor(x1 + 1e-9) + 1)]
    else:
        xticks = [t for t in nice_ticks(x0, x1, 6) if x0 - 1e-9 <= t <= x1 + 1e-9]
    _axes(out, yticks, xticks, sx, sy, (left, top, pw, ph), label_y=top + ph + 16)
    out.append('<g class="bars">')
    for lo, hi, c in zip(xs[:-1], xs[1:], ys, strict=False):
        xa, xb = sx(lo), sx(hi)
        y = sy(c)
        out.append(f'<rect x="{xa + 0.5:.1f}" y="{y:.1f}" width="{max(0.5, xb - xa - 1):.1f}" '
                   f'height="{top + ph - y:.1f}"><title>{escape(tip(lo, hi, c))}</title></rect>')
    out.append("</g>" + axis_labels + "</svg>")
    return Markup("".join(out))


def _activation_tip(lo: float, hi: float, count: float) -> str:
    return f"activation {_tick_label(lo)} to {_tick_label(hi)}: {int(count):,} firings"


def activation_histogram_svg(edges: Sequence[float], counts: Sequence[float], *,
                             chart_id: str, label: str) -> Markup:
    """One latent's activation histogram (``histogram_svg``'s style): its non-zero
    activations on the held-out tokens, bins of equal width from 0 to its histogram's upper
    edge; y: firings (tokens) per bin."""
    return histogram_svg(edges, counts, chart_id=chart_id, label=label, x_label="activation",
                         y_label="firings", tip=_activation_tip, decade_ticks=False,
                         empty="Never fired on the held-out tokens.")


# ---------------------------------------------------------------------------- comparison charts
SERIES_COLORS = ("#5b9cff", "#f5a524", "#3ddc97", "#ff6b6b", "#c792ea", "#7fdbff", "#ffd166",
                 "#f78fb3", "#a3be8c", "#d8dee9")
"""One colour per run, bright on the dark page; after ten the dash pattern changes."""
SERIES_DASHES = ("", "6 3", "2 3", "8 3 2 3")


def series_color(index: int) -> str:
    return SERIES_COLORS[index % len(SERIES_COLORS)]


def series_dash(index: int) -> str:
    return SERIES_DASHES[(index // len(SERIES_COLORS)) % len(SERIES_DASHES)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values of a log axis covering [lo, hi] (both > 0): whole decades, with 2 and 5
    between them when the range spans fewer than three decades."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1.0,) if b - a > 3 else (1.0, 2.0, 5.0)
    ticks = [round(m * 10.0 ** e, 12) for e in range(a, b + 1) for m in steps]
    inside = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return inside if len(inside) >= 2 else [lo, hi]


class _Scale:
    """A linear or log axis mapping values in [lo, hi] to pixels in [start, start + size]
    (``flip``: the pixel grows as the value falls, for y)."""

    def __init__(self, values: Sequence[float], log: bool, start: float, size: float,
                 flip: bool, count: int = 4) -> None:
        self.log, self.start, self.size, self.flip = log, start, size, flip
        lo, hi = min(values), max(values)
        if log:
            pad = 1.25 if hi / lo < 1.5 else 1.08  # dots at the ends stay inside the plot
            lo, hi = lo / pad, hi * pad
            self.ticks = log_ticks(lo, hi)
            self.lo, self.hi = min(lo, self.ticks[0]), max(hi, self.ticks[-1])
        else:
            if hi - lo < 1e-12:
                pad = abs(hi) * 0.1 or 1.0
                lo, hi = lo - pad, hi + pad
            self.ticks = nice_ticks(lo, hi, count)
            self.lo, self.hi = min(lo, self.ticks[0]), max(hi, self.ticks[-1])

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        span = self._t(self.hi) - self._t(self.lo) or 1.0
        f = (self._t(v) - self._t(self.lo)) / span
        return self.start + (1 - f if self.flip else f) * self.size


def _axis_labels(plot: tuple[float, float, float, float], height: int, x_label: str,
                 y_label: str) -> str:
    left, top, pw, ph = plot
    return (f'<text class="axis-label" x="{left + pw / 2:.1f}" y="{height - 4}" '
            f'text-anchor="middle">{escape(x_label)}</text>'
            f'<text class="axis-label" x="12" y="{top + ph / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 12 {top + ph / 2:.1f})">{escape(y_label)}</text>')


def _usable(value: Any, log: bool) -> float | None:
    v = finite(value)
    return None if v is None or (log and v <= 0) else v


def multi_line_chart(series: Sequence[dict[str, Any]], *, label: str, chart_id: str,
                     x_label: str = "tokens seen (training)", y_label: str = "",
                     log_y: bool = False, digits: int = 4, width: int = 560,
                     height: int = 240) -> Markup:
    """Several runs' curves over each other in one inline SVG, in ``line_chart``'s style.

    ``series``: ``{"key", "name", "points": [(x, y)], "index"?}`` each (``index`` picks the
    colour, ``series_color``; default its position). Each run is a ``<g class="series"
    data-series=key>`` with its path (a ``<title>`` naming the run) and a marker on its last
    point (hover: its value). ``log_y`` draws the y axis on a log scale (values <= 0 left out)
    and says so in the axis label. Fixed viewBox, scaled by CSS with its aspect ratio kept."""
    left, right, top, bottom = 58, 14, 12, 44
    pw, ph = width - left - right, height - top - bottom
    plot = (left, top, pw, ph)
    shown = []
    for i, s in enumerate(series):
        pts = [(float(x), y) for x, y in ((p[0], _usable(p[1], log_y)) for p in s["points"])
               if y is not None and finite(x) is not None]
        shown.append((s, int(s.get("index", i)), downsample(pts)))
    y_text = f"{y_label} (log scale)" if log_y else y_label
    out = [_svg_open(chart_id, "chart multi-chart", label, width, height, 'role="img"',
                     f'data-series="{sum(1 for _, _, p in shown if p)}"')]
    xs = [x for _, _, pts in shown for x, _ in pts]
    ys = [y for _, _, pts in shown for _, y in pts]
    if not xs:
        out.append(_empty_plot(plot, "No metrics yet."))
        out.append(_axis_labels(plot, height, x_label, y_text) + "</svg>")
        return Markup("".join(out))
    if max(xs) <= min(xs):
        xs = xs + [min(xs) + 1]
    sx = _Scale(xs, False, left, pw, flip=False, count=5)
    sy = _Scale(ys, log_y, top, ph, flip=True)
    xticks = [t for t in sx.ticks if min(xs) <= t <= max(xs)]
    _axes(out, sy.ticks, xticks, sx, sy, plot, label_y=top + ph + 16)
    for s, index, pts in shown:
        if not pts:
            continue
        name = escape(s["name"])
        dash = series_dash(index)
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}"
                     for i, (x, y) in enumerate(pts))
        x, y = pts[-1]
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<g class="series" data-series="{escape(str(s["key"]))}" '
                   f'style="--series:{series_color(index)}">'
                   f'<path class="line" d="{d}"{dashed}>'
                   f'<title>{name}</title></path>'
                   f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"><title>{name}: '
                   f'{escape(label)} {fmt_num(y, digits)} at {fmt_compact(x)} tokens</title>'
                   f'</circle></g>')
    out.append(_axis_labels(plot, height, x_label, y_text) + "</svg>")
    return Markup("".join(out))


def pareto_chart(points: Sequence[dict[str, Any]], frontier: Sequence[Any], *, label: str,
                 chart_id: str, y_label: str, x_label: str = "L0 (active latents per token)",
                 digits: int = 4, width: int = 560, height: int = 260) -> Markup:
    """L0 (log x axis) against a figure: one linked dot per run and the frontier as a line.

    ``points``: ``{"key", "name", "x" (L0), "y", "href", "index"?, "live"?}`` each (a live
    run's dot is hollow: its figures are the training window's); ``frontier``: the keys on the
    frontier in L0 order (``jobs.pareto_front``). Points without an L0 > 0 or a y are left out
    (``data-points`` counts the drawn ones)."""
    left, right, top, bottom = 58, 14, 12, 44
    pw, ph = width - left - right, height - top - bottom
    plot = (left, top, pw, ph)
    pts = []
    for i, p in enumerate(points):
        x, y = _usable(p.get("x"), True), finite(p.get("y"))
        if x is not None and y is not None:
            pts.append((p, int(p.get("index", i)), x, y))
    out = [_svg_open(chart_id, "chart pareto-chart", label, width, height, 'role="img"',
                     f'data-points="{len(pts)}"')]
    if not pts:
        out.append(_empty_plot(plot, "No run has both figures yet."))
        out.append(_axis_labels(plot, height, x_label + " (log scale)", y_label) + "</svg>")
        return Markup("".join(out))
    sx = _Scale([x for *_, x, _ in pts], True, left, pw, flip=False)
    sy = _Scale([y for *_, y in pts], False, top, ph, flip=True)
    _axes(out, sy.ticks, sx.ticks, sx, sy, plot, label_y=top + ph + 16)
    by_key = {p["key"]: (x, y) for p, _, x, y in pts}
    front = [by_key[k] for k in frontier if k in by_key]
    if front:
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}"
                     for i, (x, y) in enumerate(front))
        out.append(f'<path class="frontier" d="{d}" data-keys="'
                   f'{escape(",".join(str(k) for k in frontier if k in by_key))}"/>')
    out.append('<g class="points">')
    on_front = {str(k) for k in frontier}
    for p, index, x, y in pts:
        cls = "point" + (" on-frontier" if str(p["key"]) in on_front else "") \
            + (" live" if p.get("live") else "")
        tip = (f"{p['name']}: L0 {fmt_num(x, 1)}, {y_label} {fmt_num(y, digits)}"
               + (" (training window, still running)" if p.get("live") else ""))
        out.append(f'<a href="{escape(p["href"])}">'
                   f'<circle class="{cls}" data-series="{escape(str(p["key"]))}" '
                   f'cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" '
                   f'style="--series:{series_color(index)}"><title>{escape(tip)}</title>'
                   f'</circle></a>')
    out.append("</g>" + _axis_labels(plot, height, x_label + " (log scale)", y_label) + "</svg>")
    return Markup("".join(out))
