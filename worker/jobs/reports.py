"""Reading a training's evaluation files (``<out_dir>/eval/``, see docs/eval-format.md).

The worker writes ``report.json``, ``latents.safetensors`` and ``vocab.json`` after a training
ends; the web app's report page and latent browser read them here, never through the engine
(no torch: safetensors is opened with ``framework="numpy"`` and only the rows a page needs are
sliced out). The small per-latent arrays (``frequency``, ``max_act``, ``mean_act``, the encoder
and decoder statistics) and the vocabulary are cached per file (path, mtime, size), so paging
through the table reads nothing.

Both formats read: ``sae-studio-eval/1`` (older trainings) and ``/2`` (SAEBench core metrics and
per-latent details: activation histogram, a uniform sample of firings, logit lens, decoder
neighbours). What a folder lacks (a /1 folder, or a /2 one written with ``latent_details``
False) reads as null and the pages hide those sections; nothing of it is an error.

- ``report``: report.json (every /2 key present, null when absent);
- ``latents_page``: one page of the latent table, sorted, with a search by latent ``id``,
  ``label`` (substring of the users' labels, ``latent_labels``) or ``token`` (latents that fire
  on a token most, and latents whose logit lens promotes it most);
- ``latent_nav``: the latents before and after one in the table's current order and filter;
- ``latent``: one latent with its contexts, histogram, quantile examples, logits, neighbours,
  label and an automatic label hint;
- ``saebench``: the report in SAEBench's core-eval output schema.

Problems raise the job layer's errors: ``NoReport`` (404: no evaluation yet, with a sentence
that fits the training's status), ``NotFound`` (404: no such latent), ``Invalid`` (422: a bad
page, sort, order, search mode or search, in ``errors`` by parameter) and ``Unreadable`` (500:
the files exist but cannot be read).
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..db import FINISHED, Training
from ..engine.files import json_safe
from . import latent_labels
from .errors import Invalid, JobError, NotFound
from .trainings import get_training

FORMAT = "sae-studio-eval/2"
FORMATS = ("sae-studio-eval/1", FORMAT)
"""The report formats this version reads (the newest last)."""
EVAL_DIR = "eval"
REPORT_FILE = "report.json"
LATENTS_FILE = "latents.safetensors"
VOCAB_FILE = "vocab.json"
SORTS = ("frequency", "max_act", "mean_act", "id")
MATCH_SORT = "match"
"""The token search's own order: most firings on the token first, then the strongest
promoters (only with ``by=token``, where it is the default)."""
ORDERS = ("desc", "asc")
SEARCH_BY = ("id", "label", "token")
PER_PAGE_MAX = 500
STATS = ("frequency", "max_act", "mean_act")
TOP_TENSORS = ("top_acts", "top_context", "top_position", "top_tokens", "top_window_acts")
SAMPLE_TENSORS = ("sample_acts", "sample_context", "sample_position", "sample_tokens",
                  "sample_window_acts")
DETAIL_STATS = ("contexts_fired", "hist_max", "max_decoder_cosine_per_latent",
                "max_encoder_cosine_per_latent", "encoder_decoder_cosine", "encoder_norm",
                "encoder_bias")
"""Per-latent [d_sae] arrays of format 2, cached with the table's statistics when present."""
QUANTILE_INTERVALS = 5
"""The quantile examples: the sample grouped into this many equal-width activation intervals
from 0 to the latent's max activation."""
AUTO_TOKENS, AUTO_LOGITS = 3, 2
"""The automatic hint names at most this many activating tokens and promoted tokens."""
SAEBENCH_KEYS = (
    "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias", "cossim", "l1",
    "kl_div_with_ablation", "kl_div_score", "freq_over_1_percent", "freq_over_10_percent",
    "normalized_freq_over_1_percent", "normalized_freq_over_10_percent", "frac_alive",
    "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim", "max_decoder_cosine",
    "near_duplicate_share",
)
"""Report scalars of format 2 (null when a folder has format 1)."""
REPORT_V2_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(SAEBENCH_KEYS), "has_logits": False, "latent_details": False,
    "sample_n": None, "hist_bins": None, "neighbours_n": None, "logits_n": None,
    "promoters_n": None, "matryoshka_fvu": None, "target_hook_point": None,
    "skip_connection": False,
}


class NoReport(NotFound):
    """The training has no evaluation (yet). ``training`` is the row, for a friendly page."""

    def __init__(self, message: str, training: Training) -> None:
        super().__init__(message)
        self.training = training


class Unreadable(JobError):
    status = 500


# ---------------------------------------------------------------------------- paths
def _training(training: Training | int | str) -> Training:
    return training if isinstance(training, Training) else get_training(training)


def eval_dir(training: Training) -> Path | None:
    return Path(training.out_dir) / EVAL_DIR if training.out_dir else None


def has_report(training: Training) -> bool:
    """Whether the training's ``eval/report.json`` exists (one stat; for the card's link)."""
    folder = eval_dir(training)
    return folder is not None and (folder / REPORT_FILE).is_file()


def _missing_message(t: Training) -> str:
    if t.status in ("failed", "interrupted"):
        return (f"Training {t.id} {t.status} before its evaluation was written: "
                "there is no report.")
    if t.status not in FINISHED:
        return (f"Training {t.id} is {t.status}: its report appears when the training ends "
                "(the worker evaluates the SAE on held-out text then).")
    return (f"Training {t.id} has no evaluation report yet. The worker writes it right after "
            "the training ends; if the training ended a while ago, see its log.")


def _require(t: Training) -> Path:
    if not has_report(t):
        raise NoReport(_missing_message(t), t)
    folder = eval_dir(t)
    assert folder is not None
    return folder


# ---------------------------------------------------------------------------- cache
_CACHE: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()
_CACHE_SIZE = 8
_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise Unreadable(f"The evaluation file {path.name} is missing or unreadable "
                         f"({exc.strerror}).") from None
    return (str(path), st.st_mtime_ns, st.st_size)


def _cached(path: Path, load: Any) -> dict[str, Any]:
    key = _file_key(path)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    value = load(path)
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as exc:  # a corrupt file is a sentence for the user
        raise Unreadable(f"The evaluation file {path.name} cannot be read ({exc}).") from None


def _load_stats(path: Path) -> dict[str, Any]:
    with _open(path) as f:
        names = set(f.keys())
        missing = [n for n in STATS + TOP_TENSORS if n not in names]
        if missing:
            raise Unreadable(f"The evaluation file {path.name} lacks the tensors "
                             f"{', '.join(missing)}.")
        stats = {n: np.asarray(f.get_tensor(n), dtype=np.float64) for n in STATS}
        shape = f.get_slice("top_tokens").get_shape()
        d_sae = int(stats["frequency"].shape[0])
        extra = {n: np.asarray(f.get_tensor(n), dtype=np.float64) for n in DETAIL_STATS
                 if n in names and f.get_slice(n).get_shape() == [d_sae]}
    if len(shape) != 3 or int(shape[0]) != d_sae:
        raise Unreadable(f"The evaluation file {path.name} has top_tokens of shape {shape}, "
                         f"not [{d_sae}, N, W].")
    return {"d_sae": d_sae, "top_n": int(shape[1]), "window": int(shape[2]), **stats,
            "extra": extra, "names": names, "orders": {}, "fired_tokens": {}}


def _stats(folder: Path) -> dict[str, Any]:
    return _cached(folder / LATENTS_FILE, _load_stats)


def _load_vocab(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unreadable(f"The evaluation file {path.name} cannot be read ({exc}).") from None
    return {"vocab": {int(k): str(v) for k, v in raw.items()}, "by_text": None}


def _vocab_entry(folder: Path) -> dict[str, Any]:
    path = folder / VOCAB_FILE
    if not path.is_file():
        return {"vocab": {}, "by_text": None}
    return _cached(path, _load_vocab)


def _vocab(folder: Path) -> dict[int, str]:
    return _vocab_entry(folder)["vocab"]


def _token_text(vocab: dict[int, str], token_id: int) -> str:
    text = vocab.get(token_id)
    return text if text is not None else f"⟨{token_id}⟩"


def _order(stats: dict[str, Any], sort: str, order: str) -> np.ndarray:
    """Latent ids in display order; ties keep ascending ids (stable across pages)."""
    key = (sort, order)
    cached = stats["orders"].get(key)
    if cached is None:
        ids = np.arange(stats["d_sae"])
        if sort == "id":
            cached = ids if order == "asc" else ids[::-1].copy()
        else:
            values = np.nan_to_num(stats[sort], nan=-np.inf)
            cached = np.lexsort((ids, -values if order == "desc" else values))
        ranks = np.empty_like(cached)
        ranks[cached] = np.arange(len(cached))
        stats["orders"][key] = cached = (cached, ranks)
    return cached


# ---------------------------------------------------------------------------- helpers
def _num(value: Any) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def log10_frequency(freq: float) -> float | None:
    return math.log10(freq) if freq > 0 and math.isfinite(freq) else None


def _stat_row(stats: dict[str, Any], n: int) -> dict[str, Any]:
    freq = float(stats["frequency"][n])
    return {"id": n, "frequency": _num(freq), "log10_frequency": log10_frequency(freq),
            "max_act": _num(stats["max_act"][n]), "mean_act": _num(stats["mean_act"][n]),
            "dead": not freq > 0}


def parse_latent_id(raw: Any, d_sae: int, field: str = "q") -> int:
    """"17", " #17 " -> 17; anything else (or out of range) -> Invalid with a sentence."""
    text = str(raw).strip().lstrip("#").strip()
    try:
        n = int(text)
    except ValueError:
        msg = (f"“{str(raw).strip()}” is not a latent id: enter a whole number from 0 to "
               f"{d_sae - 1}.")
        raise Invalid(msg, {field: msg}) from None
    if not 0 <= n < d_sae:
        msg = f"There is no latent {n}: this SAE has {d_sae:,} latents (0 to {d_sae - 1})."
        raise Invalid(msg, {field: msg})
    return n


def _parse_int(raw: Any, field: str, lo: int, hi: int | None = None) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise Invalid(f"{field} must be a whole number, not “{raw}”.",
                      {field: "Enter a whole number."}) from None
    if value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise Invalid(f"{field} must be {bound} (got {value}).", {field: f"Enter {bound}."})
    return value


def _read_report(t: Training) -> dict[str, Any]:
    folder = _require(t)
    path = folder / REPORT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unreadable(f"The evaluation report of training {t.id} cannot be read "
                         f"({exc}).") from None
    if not isinstance(data, dict):
        raise Unreadable(f"The evaluation report of training {t.id} is not a JSON object.")
    fmt = data.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise Unreadable(f"The evaluation report of training {t.id} has format {fmt!r}; "
                         f"this version reads {' and '.join(map(repr, FORMATS))}.")
    return data


def _window_before(report_data: dict[str, Any], window: int) -> int:
    before = int(report_data.get("window_before", window // 2))
    return min(max(before, 0), window - 1)


# ---------------------------------------------------------------------------- the report
def report(training: Training | int | str) -> dict[str, Any] | None:
    """``report.json`` as a dict, plus ``training_id``, ``training_name`` ("model + dataset")
    and ``status`` (the training's, now); None when the training has no evaluation. Every key
    of format 2 is present (null, ``has_logits`` and ``latent_details`` false, when the folder
    has format 1); ``format_version`` is 1 or 2."""
    t = _training(training)
    if not has_report(t):
        return None
    data = _read_report(t)
    out = json_safe(data)
    for key, value in REPORT_V2_DEFAULTS.items():
        out.setdefault(key, value)
    out["format_version"] = 2 if data.get("format") == FORMAT else 1
    out["training_id"] = t.id
    out["training_name"] = f"{t.model.name} + {t.dataset.name}"
    out["status"] = t.status
    return out


def require_report(training: Training | int | str) -> dict[str, Any]:
    """``report()``, or ``NoReport`` (404) with a sentence that fits the training's status."""
    t = _training(training)
    data = report(t)
    if data is None:
        raise NoReport(_missing_message(t), t)
    return data


def require_latent(training: Training | int | str, n: Any) -> int:
    """``n`` as a latent id of the training's SAE: ``NoReport`` without an evaluation,
    ``NotFound`` for an id that is not a whole number in range."""
    t = _training(training)
    d_sae = _stats(_require(t))["d_sae"]
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise NotFound(f"Latent {n} does not exist: latent ids are whole numbers.") from None
    if not 0 <= n < d_sae:
        raise NotFound(f"Latent {n} does not exist: this SAE has {d_sae:,} latents "
                       f"(0 to {d_sae - 1}).")
    return n


# ---------------------------------------------------------------------------- table views
@dataclass
class View:
    """The latents a table shows, in order, and what its search found."""

    ids: np.ndarray  # latent ids in display order (all of them, or the search's matches)
    by: str
    q: str | None
    sort: str
    order: str
    highlight: int | None = None  # by=id: the latent searched for
    matches: int | None = None  # label / token search: how many latents matched
    token_ids: list[int] | None = None  # token search: the vocabulary ids whose text matched
    fires: dict[int, int] | None = None  # token search: firings on the token per latent
    promotes: dict[int, float] | None = None  # token search: logit lens value per promoter


def _check_view_args(sort: str | None, order: str | None, by: str | None
                     ) -> tuple[str, str, str]:
    by = by or "id"
    if by not in SEARCH_BY:
        raise Invalid(f"Unknown search “{by}”: choose one of {', '.join(SEARCH_BY)}.",
                      {"by": f"Choose one of {', '.join(SEARCH_BY)}."})
    sort = sort or (MATCH_SORT if by == "token" else "frequency")
    allowed = SORTS + ((MATCH_SORT,) if by == "token" else ())
    if sort not in allowed:
        raise Invalid(f"Unknown sort “{sort}”: choose one of {', '.join(allowed)}.",
                      {"sort": f"Choose one of {', '.join(allowed)}."})
    order = order or ("asc" if sort == "id" else "desc")
    if order not in ORDERS:
        raise Invalid(f"Unknown order “{order}”: choose asc or desc.",
                      {"order": "Choose asc or desc."})
    return sort, order, by


def _matching_tokens(folder: Path, text: str) -> list[int]:
    """Vocabulary ids whose text is ``text`` exactly, or equal to it ignoring case and the
    spaces around it (" Cat" finds "cat", " cat", "Cat")."""
    entry = _vocab_entry(folder)
    if entry["by_text"] is None:
        index: dict[str, list[int]] = {}
        for token_id, tok in entry["vocab"].items():
            index.setdefault(tok.strip().casefold(), []).append(token_id)
        entry["by_text"] = index
    exact = [i for i, tok in entry["vocab"].items() if tok == text]
    loose = entry["by_text"].get(text.strip().casefold(), []) if text.strip() else []
    return sorted(set(exact) | set(loose))


def _fired_tokens(folder: Path, stats: dict[str, Any], before: int) -> np.ndarray:
    """The activating token of each latent's top and sample entries, [d_sae, N + S] (-1 for
    no entry and for a sample entry that repeats a top entry: each firing counted once)."""
    cached = stats["fired_tokens"].get(before)
    if cached is not None:
        return cached
    with _open(folder / LATENTS_FILE) as f:
        parts = []
        top_key = None
        for prefix in ("top", "sample"):
            if f"{prefix}_tokens" not in stats["names"]:
                continue
            center = np.asarray(f.get_slice(f"{prefix}_tokens")[:, :, before:before + 1],
                                dtype=np.int64)[:, :, 0]
            ctx = np.asarray(f.get_tensor(f"{prefix}_context"), dtype=np.int64)
            pos = np.asarray(f.get_tensor(f"{prefix}_position"), dtype=np.int64)
            key = np.where(ctx >= 0, ctx * (1 << 32) + pos, -1)
            center = np.where(ctx >= 0, center, -1)
            if top_key is None:
                top_key = key
            else:  # a firing in both the top and the sample counts once
                repeat = (key[:, :, None] == top_key[:, None, :]).any(-1) & (key >= 0)
                center = np.where(repeat, -1, center)
            parts.append(center)
    cached = np.concatenate(parts, axis=1)
    stats["fired_tokens"][before] = cached
    return cached


def _token_search(t: Training, folder: Path, stats: dict[str, Any], q: str) -> View:
    ids = _matching_tokens(folder, q)
    if not ids:
        msg = (f"No token of the vocabulary reads “{q}”: type a token's text (case and "
               "surrounding spaces are ignored), e.g. “ the” or “God”.")
        raise Invalid(msg, {"q": msg})
    before = _window_before(_read_report(t), stats["window"])
    fired = _fired_tokens(folder, stats, before)
    counts = np.isin(fired, ids).sum(axis=1)
    fires = {int(n): int(counts[n]) for n in np.flatnonzero(counts)}
    promotes: dict[int, float] = {}
    if "token_promoter_ids" in stats["names"]:
        with _open(folder / LATENTS_FILE) as f:
            p_ids = f.get_slice("token_promoter_ids")
            p_vals = f.get_slice("token_promoter_values")
            vocab_size = int(p_ids.get_shape()[0])
            for token_id in ids:
                if not 0 <= token_id < vocab_size:
                    continue
                row_ids = np.asarray(p_ids[token_id:token_id + 1])[0]
                row_vals = np.asarray(p_vals[token_id:token_id + 1])[0]
                for n, v in zip(row_ids.tolist(), row_vals.tolist(), strict=True):
                    if 0 <= n < stats["d_sae"] and math.isfinite(v):
                        promotes[int(n)] = max(promotes.get(int(n), -math.inf), float(v))
    return View(ids=np.array([], dtype=np.int64), by="token", q=q, sort="", order="",
                token_ids=ids, fires=fires, promotes=promotes)


def _view(t: Training, folder: Path, stats: dict[str, Any], sort: str | None,
          order: str | None, by: str | None, q: Any) -> View:
    """The table's latents in display order for a sort, order and search (``q`` blank: every
    latent; with ``by=label`` every labelled latent)."""
    sort, order, by = _check_view_args(sort, order, by)
    q = None if q is None or str(q).strip() == "" else str(q)
    if by == "id" or (by == "token" and q is None):
        base_sort = "frequency" if sort == MATCH_SORT else sort
        ids, _ = _order(stats, base_sort, order)
        highlight = parse_latent_id(q, stats["d_sae"]) if by == "id" and q is not None \
            else None
        return View(ids=ids, by=by, q=q.strip() if q else None, sort=base_sort, order=order,
                    highlight=highlight)
    if by == "label":
        found = latent_labels.search_labels(t.id, q)
        found = [n for n in found if 0 <= n < stats["d_sae"]]
        view = View(ids=np.array([], dtype=np.int64), by=by, q=q.strip() if q else None,
                    sort=sort, order=order, matches=len(found))
        subset = np.array(found, dtype=np.int64)
    else:
        view = _token_search(t, folder, stats, q)
        view.sort, view.order = sort, order
        subset = np.array(sorted(set(view.fires or {}) | set(view.promotes or {})),
                          dtype=np.int64)
        view.matches = len(subset)
        if sort == MATCH_SORT:
            fires, promotes = view.fires or {}, view.promotes or {}
            key = sorted(subset.tolist(), key=lambda n: (-fires.get(n, 0),
                                                         -promotes.get(n, -math.inf), n))
            view.ids = np.array(key if order == "desc" else key[::-1], dtype=np.int64)
            return view
    ordered, _ = _order(stats, sort, order)
    view.ids = ordered[np.isin(ordered, subset)] if len(subset) else subset
    return view


def latents_page(training: Training | int | str, *, page: Any = 1, per_page: Any = 50,
                 sort: str | None = None, order: str | None = None, q: Any = None,
                 by: str | None = None) -> dict[str, Any]:
    """One page of the latent table.

    Returns ``rows`` (``id, frequency, log10_frequency, max_act, mean_act, dead, label``; a
    token search adds ``fires`` and ``promotes``), ``total`` (latents of the SAE), ``page``,
    ``pages``, ``per_page``, ``sort``, ``order`` (default: asc for id, desc for the others),
    ``by``, ``q``, ``highlight``, ``matches`` and ``tokens``:

    - ``by=id`` (default), ``q`` a latent id ("17" or "#17"): every latent; the page is the one
      holding that latent in the chosen order and ``highlight`` is its id (else None);
    - ``by=label``: the latents whose label contains ``q`` (case-insensitive; blank: every
      labelled latent), ``matches`` their number;
    - ``by=token``: latents that fire on the token ``q`` (``fires``: how many of its top and
      sample firings are on it) or promote it (``promotes``: the logit lens value, among each
      token's strongest promoters); ``tokens`` the matching vocabulary ``[{id, text}]``; sort
      ``match`` (default) ranks by ``fires``, then ``promotes``.

    A page past the end shows the last.
    """
    t = _training(training)
    folder = _require(t)
    per_page = _parse_int(per_page, "per_page", 1, PER_PAGE_MAX)
    page = _parse_int(page, "page", 1)
    stats = _stats(folder)
    view = _view(t, folder, stats, sort, order, by, q)
    shown = len(view.ids)
    pages = max(1, -(-shown // per_page))
    if view.highlight is not None:
        ranks = _order(stats, view.sort, view.order)[1]
        page = int(ranks[view.highlight]) // per_page + 1
    page = min(page, pages)
    start = (page - 1) * per_page
    labels = latent_labels.labels_of(t.id)
    rows = []
    for n in view.ids[start:start + per_page].tolist():
        row = _stat_row(stats, int(n))
        row["label"] = labels.get(int(n))
        if view.by == "token" and view.fires is not None:
            row["fires"] = view.fires.get(int(n), 0)
            row["promotes"] = (view.promotes or {}).get(int(n))
        rows.append(row)
    vocab = _vocab(folder)
    tokens = [{"id": i, "text": _token_text(vocab, i)} for i in view.token_ids] \
        if view.token_ids is not None else None
    return {"rows": rows, "total": stats["d_sae"], "page": page, "pages": pages,
            "per_page": per_page, "sort": view.sort, "order": view.order, "by": view.by,
            "q": view.q, "highlight": view.highlight, "matches": view.matches,
            "tokens": tokens}


def latent_nav(training: Training | int | str, n: int, *, sort: str | None = None,
               order: str | None = None, by: str | None = None, q: Any = None
               ) -> dict[str, Any]:
    """The latents before and after ``n`` in the table's order and search: ``{"prev", "next",
    "position" (1-based), "count", "filtered"}``. Arguments that do not parse, or a latent that
    the search does not hold, fall back to the whole table in that order (or by frequency)."""
    t = _training(training)
    folder = _require(t)
    stats = _stats(folder)
    try:
        view = _view(t, folder, stats, sort, order, by, q)
    except Invalid:
        view = None
    filtered = view is not None and (view.by == "label"
                                     or (view.by == "token" and view.q is not None))
    if view is None or not np.isin(n, view.ids):
        filtered = False
        try:
            base = _check_view_args(sort, order, "id")
        except Invalid:
            base = ("frequency", "desc", "id")
        view = View(ids=_order(stats, *base[:2])[0], by="id", q=None, sort=base[0],
                    order=base[1])
    pos = int(np.flatnonzero(view.ids == n)[0])
    prev_id = int(view.ids[pos - 1]) if pos > 0 else None
    next_id = int(view.ids[pos + 1]) if pos + 1 < len(view.ids) else None
    return {"prev": prev_id, "next": next_id, "position": pos + 1, "count": len(view.ids),
            "filtered": bool(filtered)}


# ---------------------------------------------------------------------------- one latent
def _contexts(rows: dict[str, np.ndarray], prefix: str, vocab: dict[int, str], window: int,
              before: int) -> list[dict[str, Any]]:
    """The entries of one latent's ``top_*`` or ``sample_*`` rows: ``{activation, context,
    position, tokens: [{id, text, act}], center}`` (pads dropped, empty entries skipped)."""
    out = []
    acts = rows[f"{prefix}_acts"]
    for j in range(len(acts)):
        ctx = int(rows[f"{prefix}_context"][j])
        if ctx < 0:
            continue
        tokens, center = [], 0
        for w in range(window):
            tok = int(rows[f"{prefix}_tokens"][j][w])
            if tok < 0:
                continue
            if w == before:
                center = len(tokens)
            tokens.append({"id": tok, "text": _token_text(vocab, tok),
                           "act": _num(rows[f"{prefix}_window_acts"][j][w]) or 0.0})
        out.append({"activation": _num(acts[j]), "context": ctx,
                    "position": int(rows[f"{prefix}_position"][j]), "tokens": tokens,
                    "center": center})
    return out


def _histogram(rows: dict[str, np.ndarray], hist_max: float | None) -> dict[str, Any] | None:
    counts = rows.get("hist_counts")
    if counts is None or hist_max is None or not hist_max > 0:
        return None
    edges = np.linspace(0.0, hist_max, len(counts) + 1)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def quantile_groups(samples: list[dict[str, Any]], top: float | None,
                    intervals: int = QUANTILE_INTERVALS) -> list[dict[str, Any]]:
    """The sampled firings in ``intervals`` equal-width activation intervals from 0 to
    ``top`` (the latent's max activation), highest interval first: ``[{range: [lo, hi],
    count, contexts}]``, each interval's contexts highest first (an interval holds lo < a <=
    hi; the lowest starts at 0). Empty intervals are kept (the sample had none there)."""
    if not samples:
        return []
    hi = top if top and top > 0 else max(s["activation"] or 0.0 for s in samples)
    if not hi > 0:
        return []
    groups: list[list[dict[str, Any]]] = [[] for _ in range(intervals)]
    for s in samples:
        a = s["activation"] or 0.0
        k = min(intervals - 1, max(0, math.ceil(a / hi * intervals) - 1))
        groups[k].append(s)
    out = []
    for k in range(intervals - 1, -1, -1):
        members = sorted(groups[k], key=lambda s: -(s["activation"] or 0.0))
        out.append({"range": [hi * k / intervals, hi * (k + 1) / intervals],
                    "count": len(members), "contexts": members})
    return out


def _logits(rows: dict[str, np.ndarray], which: str, vocab: dict[int, str]
            ) -> list[dict[str, Any]] | None:
    ids, values = rows.get(f"logit_{which}_ids"), rows.get(f"logit_{which}_values")
    if ids is None or values is None:
        return None
    return [{"id": int(i), "token": _token_text(vocab, int(i)), "value": _num(v)}
            for i, v in zip(ids.tolist(), values.tolist(), strict=True) if i >= 0]


def _quoted(text: str) -> str:
    shown = "".join({"\n": "↵", "\r": "␍", "\t": "⇥"}.get(ch, ch) for ch in text)
    return f"'{shown}'"


def auto_label(contexts: list[dict[str, Any]], top_logits: list[dict[str, Any]] | None
               ) -> str | None:
    """A short hint from the latent's activating tokens (its top contexts' centre tokens, most
    frequent first, at most ``AUTO_TOKENS``) and the tokens it promotes most (``AUTO_LOGITS``
    of its top logits): ``"' the'/' a' → ' cat'"``. None when it never fired."""
    centers = [c["tokens"][c["center"]]["text"] for c in contexts if c["tokens"]]
    if not centers:
        return None
    counts = Counter(centers)
    firsts = {text: i for i, text in reversed(list(enumerate(centers)))}
    common = sorted(counts, key=lambda text: (-counts[text], firsts[text]))[:AUTO_TOKENS]
    hint = "/".join(_quoted(text) for text in common)
    if top_logits:
        hint += " → " + "/".join(_quoted(x["token"]) for x in top_logits[:AUTO_LOGITS])
    return hint


def _row_slices(folder: Path, names: set[str], n: int, wanted: tuple[str, ...]
                ) -> dict[str, np.ndarray]:
    with _open(folder / LATENTS_FILE) as f:
        return {name: np.asarray(f.get_slice(name)[n:n + 1])[0] for name in wanted
                if name in names}


def latent(training: Training | int | str, n: Any) -> dict[str, Any]:
    """One latent: ``id, d_sae, frequency, log10_frequency, max_act, mean_act, dead``,
    ``contexts`` (its top activations, highest first, each ``{activation, context, position,
    tokens: [{id, text, act}], center}``; ``center`` indexes the activating token in
    ``tokens``; pads of windows clipped by a context's start or end are dropped), and:

    - ``histogram {edges, counts}``: its non-zero activations on the scored tokens;
    - ``quantiles [{range: [lo, hi], count, contexts}]``: a uniform sample of its firings
      (``sample_n`` at most) in ``QUANTILE_INTERVALS`` equal-width activation intervals from 0
      to its max activation, highest first (``quantile_groups``);
    - ``top_logits``, ``bottom_logits`` ``[{id, token, value}]``: the logit lens;
    - ``neighbours [{id, cosine, label}]``: the nearest latents by decoder cosine;
    - ``label``, ``notes`` (the user's), ``auto_label`` (a hint, ``auto_label()``);
    - ``contexts_fired``, ``max_decoder_cosine``, ``max_encoder_cosine``,
      ``encoder_decoder_cosine``, ``encoder_norm``, ``encoder_bias``; ``details`` whether the
      evaluation kept per-latent details.

    Each of these is null when the evaluation has no such data (format 1, ``latent_details``
    false, or no output embedding for the logits). Raises ``NoReport`` without an evaluation,
    ``NotFound`` for an id out of range."""
    t = _training(training)
    n = require_latent(t, n)
    folder = _require(t)
    stats = _stats(folder)
    d_sae, window, names = stats["d_sae"], stats["window"], stats["names"]
    report_data = report(t) or {}
    before = _window_before(report_data, window)
    wanted = TOP_TENSORS + SAMPLE_TENSORS + (
        "hist_counts", "neighbour_ids", "neighbour_cosines", "logit_top_ids",
        "logit_top_values", "logit_bottom_ids", "logit_bottom_values")
    rows = _row_slices(folder, names, n, wanted)
    vocab = _vocab(folder)
    contexts = _contexts(rows, "top", vocab, window, before)
    extra = {k: float(v[n]) for k, v in stats["extra"].items()}
    has_sample = all(name in rows for name in SAMPLE_TENSORS)
    samples = _contexts(rows, "sample", vocab, window, before) if has_sample else None
    max_act = _num(stats["max_act"][n])
    top_logits = _logits(rows, "top", vocab)
    neighbours = None
    if "neighbour_ids" in rows and "neighbour_cosines" in rows:
        labels = latent_labels.labels_of(t.id)
        neighbours = [{"id": int(i), "cosine": _num(c), "label": labels.get(int(i))}
                      for i, c in zip(rows["neighbour_ids"].tolist(),
                                      rows["neighbour_cosines"].tolist(), strict=True)
                      if 0 <= i < d_sae]
    state = latent_labels.get_label(t.id, n)
    out = _stat_row(stats, n)
    firings = float(stats["frequency"][n]) * float(report_data.get("scored_tokens") or 0)
    fired = extra.get("contexts_fired")
    out.update({
        "training_id": t.id, "d_sae": d_sae, "window_before": before,
        "window_after": window - before - 1, "contexts": contexts,
        "details": has_sample,
        "firings": int(round(firings)) if report_data.get("scored_tokens") else None,
        "histogram": _histogram(rows, extra.get("hist_max")),
        "quantiles": quantile_groups(samples, max_act) if samples is not None else None,
        "sample_n": len(samples) if samples is not None else None,
        "top_logits": top_logits, "bottom_logits": _logits(rows, "bottom", vocab),
        "neighbours": neighbours,
        "label": state["label"], "notes": state["notes"],
        "auto_label": auto_label(contexts, top_logits),
        "contexts_fired": int(fired) if fired is not None else None,
        "max_decoder_cosine": extra.get("max_decoder_cosine_per_latent"),
        "max_encoder_cosine": extra.get("max_encoder_cosine_per_latent"),
        "encoder_decoder_cosine": extra.get("encoder_decoder_cosine"),
        "encoder_norm": extra.get("encoder_norm"), "encoder_bias": extra.get("encoder_bias"),
    })
    return json_safe(out)


def label_state(training: Training | int | str, n: Any) -> dict[str, Any]:
    """The latent's label state for the label editor: ``latent_labels.get_label``'s dict plus
    ``auto_label`` (from the evaluation, as ``latent``'s)."""
    data = latent(training, n)
    return {"training_id": data["training_id"], "latent": data["id"], "label": data["label"],
            "notes": data["notes"], "auto_label": data["auto_label"]}


def set_latent_label(training: Training | int | str, n: Any, **changes: Any) -> dict[str, Any]:
    """Check the latent exists in the evaluation, then ``latent_labels.set_label``; returns
    ``label_state``."""
    t = _training(training)
    n = require_latent(t, n)
    latent_labels.set_label(t.id, n, **changes)
    return label_state(t, n)


# ---------------------------------------------------------------------------- SAEBench
SAEBENCH_CATEGORIES: dict[str, dict[str, str]] = {
    "model_behavior_preservation": {"kl_div_score": "kl_div_score",
                                    "kl_div_with_ablation": "kl_div_with_ablation",
                                    "kl_div_with_sae": "kl_div"},
    "model_performance_preservation": {"ce_loss_score": "ce_loss_recovered",
                                       "ce_loss_with_ablation": "ce_loss_zero",
                                       "ce_loss_with_sae": "ce_loss_spliced",
                                       "ce_loss_without_sae": "ce_loss_clean"},
    "reconstruction_quality": {"explained_variance": "explained_variance", "mse": "mse",
                               "cossim": "cossim"},
    "shrinkage": {"l2_norm_in": "l2_norm_in", "l2_norm_out": "l2_norm_out",
                  "l2_ratio": "l2_ratio",
                  "relative_reconstruction_bias": "relative_reconstruction_bias"},
    "sparsity": {"l0": "l0", "l1": "l1"},
    "token_stats": {"total_tokens_eval_reconstruction": "scored_tokens",
                    "total_tokens_eval_sparsity_variance": "scored_tokens"},
    "misc_metrics": {"freq_over_1_percent": "freq_over_1_percent",
                     "freq_over_10_percent": "freq_over_10_percent",
                     "normalized_freq_over_1_percent": "normalized_freq_over_1_percent",
                     "normalized_freq_over_10_percent": "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim": "average_max_encoder_cosine_sim",
                     "average_max_decoder_cosine_sim": "average_max_decoder_cosine_sim",
                     "frac_alive": "frac_alive"},
}
"""SAEBench core's ``eval_result_metrics``: category -> {its metric: our report key}."""


def _saebench_details(folder: Path, stats: dict[str, Any], scored: float
                      ) -> list[dict[str, Any]]:
    extra = stats["extra"]
    needed = ("contexts_fired", "max_decoder_cosine_per_latent", "max_encoder_cosine_per_latent",
              "encoder_decoder_cosine", "encoder_norm", "encoder_bias")
    if any(name not in extra for name in needed):
        return []
    freq = stats["frequency"]
    out = []
    for n in range(stats["d_sae"]):
        fired = extra["contexts_fired"][n]
        cah = float(freq[n]) * scored / fired if fired > 0 else None
        out.append({"index": n, "feature_density": _num(freq[n]),
                    "consistent_activation_heuristic": cah,
                    "encoder_bias": _num(extra["encoder_bias"][n]),
                    "encoder_norm": _num(extra["encoder_norm"][n]),
                    "encoder_decoder_cosine_sim": _num(extra["encoder_decoder_cosine"][n]),
                    "max_decoder_cosine_sim": _num(extra["max_decoder_cosine_per_latent"][n]),
                    "max_encoder_cosine_sim": _num(extra["max_encoder_cosine_per_latent"][n])})
    return out


def saebench(training: Training | int | str) -> dict[str, Any]:
    """The report in SAEBench's core-eval output schema (``CoreEvalOutput`` of
    sae_bench/evals/core/eval_output.py): ``eval_type_id`` "core", ``eval_config`` (its
    ``CoreEvalConfig`` fields, filled with this evaluation's settings: every held-out context
    as one batch), ``eval_id`` (stable per report), ``datetime_epoch_millis``,
    ``eval_result_metrics`` (its seven categories, ``SAEBENCH_CATEGORIES``; null where not
    measured: KL and CE for a model that is not a causal LM, the format-2 metrics in a
    format-1 report), ``eval_result_details`` (its per-feature metrics; empty without
    per-latent details), ``sae_bench_commit_hash`` (none: SAEBench did not run),
    ``sae_lens_*`` (null), ``sae_cfg_dict`` and ``eval_result_unstructured`` (what SAE Studio
    adds: the decoder's maximum cosine, the near-duplicate share, the source)."""
    t = _training(training)
    r = require_report(t)
    folder = _require(t)
    stats = _stats(folder)
    cfg = t.config or {}
    causal = bool(r.get("is_causal"))
    details = bool(r.get("latent_details"))
    metrics = {cat: {name: r.get(key) for name, key in fields.items()}
               for cat, fields in SAEBENCH_CATEGORIES.items()}
    created = float(r.get("created_at") or 0.0)
    eval_config = {
        "model_name": r.get("model") or t.model.name,
        "llm_dtype": str(cfg.get("precision") or "float32"),
        "batch_size_prompts": int(r.get("contexts") or 0),
        "n_eval_reconstruction_batches": 1, "n_eval_sparsity_variance_batches": 1,
        "dataset": t.dataset.source or t.dataset.name,
        "context_size": int(r.get("context_size") or 0),
        "compute_kl": causal, "compute_ce_loss": causal,
        "compute_l2_norms": r.get("l2_ratio") is not None,
        "compute_sparsity_metrics": True, "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": details,
        "compute_featurewise_weight_based_metrics": details,
        "exclude_special_tokens_from_reconstruction": bool(cfg.get("exclude_special", True)),
        "verbose": False,
    }
    return json_safe({
        "eval_type_id": "core",
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                  f"sae-studio:training/{t.id}/eval/{created!r}")),
        "datetime_epoch_millis": int(created * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": _saebench_details(folder, stats,
                                                 float(r.get("scored_tokens") or 0)),
        "sae_bench_commit_hash": "none: computed by SAE Studio, not by SAEBench",
        "sae_lens_id": None, "sae_lens_release_id": None, "sae_lens_version": None,
        "sae_cfg_dict": {
            "architecture": r.get("encoder_type"), "d_in": r.get("d_in"),
            "d_sae": r.get("d_sae"), "model_name": r.get("model"),
            "hook_layer": r.get("layer"), "hook_point": r.get("hook_point"),
            "context_size": r.get("context_size"), "dtype": "float32",
            "k": cfg.get("k"),
        },
        "eval_result_unstructured": {
            "source": "SAE Studio", "training_id": t.id, "report_format": r.get("format"),
            "step": r.get("step"), "scored_tokens": r.get("scored_tokens"),
            "max_decoder_cosine": r.get("max_decoder_cosine"),
            "near_duplicate_share": r.get("near_duplicate_share"),
            "note": ("Metrics are over the held-out tokens SAE Studio scored; null means not "
                     "measured (KL and CE need a causal LM; shrinkage, cosine, L1, frequency "
                     "buckets and weight cosines need evaluation format 2)."),
        },
    })
