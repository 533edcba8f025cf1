"""Reading a training's evaluation files (``<out_dir>/eval/``, see docs/eval-format.md).

The worker writes ``report.json``, ``latents.safetensors`` and ``vocab.json`` after a training
ends; the web app's report page and latent browser read them here, never through the engine
(no torch: safetensors is opened with ``framework="numpy"`` and only the rows a page needs are
sliced out). The small per-latent arrays (``frequency``, ``max_act``, ``mean_act``) and the
vocabulary are cached per file (path, mtime, size), so paging through the table reads nothing.

Problems raise the job layer's errors: ``NoReport`` (404: no evaluation yet, with a sentence
that fits the training's status), ``NotFound`` (404: no such latent), ``Invalid`` (422: a bad
page, sort, order or latent id search, in ``errors`` by parameter) and ``Unreadable`` (500: the
files exist but cannot be read).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..db import FINISHED, Training
from ..engine.files import json_safe
from .errors import Invalid, JobError, NotFound
from .trainings import get_training

FORMAT = "sae-studio-eval/1"
EVAL_DIR = "eval"
REPORT_FILE = "report.json"
LATENTS_FILE = "latents.safetensors"
VOCAB_FILE = "vocab.json"
SORTS = ("frequency", "max_act", "mean_act", "id")
ORDERS = ("desc", "asc")
PER_PAGE_MAX = 500
STATS = ("frequency", "max_act", "mean_act")
TOP_TENSORS = ("top_acts", "top_context", "top_position", "top_tokens", "top_window_acts")


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
    if len(shape) != 3 or int(shape[0]) != d_sae:
        raise Unreadable(f"The evaluation file {path.name} has top_tokens of shape {shape}, "
                         f"not [{d_sae}, N, W].")
    return {"d_sae": d_sae, "top_n": int(shape[1]), "window": int(shape[2]), **stats,
            "orders": {}}


def _stats(folder: Path) -> dict[str, Any]:
    return _cached(folder / LATENTS_FILE, _load_stats)


def _load_vocab(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unreadable(f"The evaluation file {path.name} cannot be read ({exc}).") from None
    return {"vocab": {int(k): str(v) for k, v in raw.items()}}


def _vocab(folder: Path) -> dict[int, str]:
    path = folder / VOCAB_FILE
    if not path.is_file():
        return {}
    return _cached(path, _load_vocab)["vocab"]


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


# ---------------------------------------------------------------------------- API
def report(training: Training | int | str) -> dict[str, Any] | None:
    """``report.json`` as a dict, plus ``training_id``, ``training_name`` ("model + dataset")
    and ``status`` (the training's, now); None when the training has no evaluation."""
    t = _training(training)
    if not has_report(t):
        return None
    folder = eval_dir(t)
    assert folder is not None
    path = folder / REPORT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unreadable(f"The evaluation report of training {t.id} cannot be read "
                         f"({exc}).") from None
    if not isinstance(data, dict):
        raise Unreadable(f"The evaluation report of training {t.id} is not a JSON object.")
    fmt = data.get("format")
    if fmt is not None and fmt != FORMAT:
        raise Unreadable(f"The evaluation report of training {t.id} has format {fmt!r}; "
                         f"this version reads {FORMAT!r}.")
    out = json_safe(data)
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


def latents_page(training: Training | int | str, *, page: Any = 1, per_page: Any = 50,
                 sort: str | None = "frequency", order: str | None = None,
                 q: Any = None) -> dict[str, Any]:
    """One page of the latent table.

    Returns ``rows`` (``id, frequency, log10_frequency, max_act, mean_act, dead``), ``total``
    (latents), ``page``, ``pages``, ``per_page``, ``sort``, ``order`` (default: asc for id,
    desc for the others), ``q`` and ``highlight``:
    with ``q`` (a latent id, "17" or "#17") the page is the one holding that latent in the
    chosen order and ``highlight`` is its id (else None). A page past the end shows the last.
    """
    t = _training(training)
    folder = _require(t)
    sort = sort or "frequency"
    order = order or ("asc" if sort == "id" else "desc")
    if sort not in SORTS:
        raise Invalid(f"Unknown sort “{sort}”: choose one of {', '.join(SORTS)}.",
                      {"sort": f"Choose one of {', '.join(SORTS)}."})
    if order not in ORDERS:
        raise Invalid(f"Unknown order “{order}”: choose asc or desc.",
                      {"order": "Choose asc or desc."})
    per_page = _parse_int(per_page, "per_page", 1, PER_PAGE_MAX)
    page = _parse_int(page, "page", 1)
    stats = _stats(folder)
    total = stats["d_sae"]
    pages = max(1, -(-total // per_page))
    ids, ranks = _order(stats, sort, order)
    highlight = None
    q = None if q is None or str(q).strip() == "" else str(q).strip()
    if q is not None:
        highlight = parse_latent_id(q, total)
        page = int(ranks[highlight]) // per_page + 1
    page = min(page, pages)
    start = (page - 1) * per_page
    rows = [_stat_row(stats, int(n)) for n in ids[start:start + per_page]]
    return {"rows": rows, "total": total, "page": page, "pages": pages, "per_page": per_page,
            "sort": sort, "order": order, "q": q, "highlight": highlight}


def latent(training: Training | int | str, n: Any) -> dict[str, Any]:
    """One latent: ``id, d_sae, frequency, log10_frequency, max_act, mean_act, dead`` and
    ``contexts``: its top activations, highest first, each ``{activation, context, position,
    tokens: [{id, text, act}], center}`` (``center`` indexes the activating token in
    ``tokens``; pads of windows clipped by a context's start or end are dropped).

    Raises ``NoReport`` without an evaluation, ``NotFound`` for an id out of range."""
    t = _training(training)
    folder = _require(t)
    stats = _stats(folder)
    d_sae = stats["d_sae"]
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise NotFound(f"Latent {n} does not exist: latent ids are whole numbers.") from None
    if not 0 <= n < d_sae:
        raise NotFound(f"Latent {n} does not exist: this SAE has {d_sae:,} latents "
                       f"(0 to {d_sae - 1}).")
    path = folder / LATENTS_FILE
    with _open(path) as f:
        rows = {name: np.asarray(f.get_slice(name)[n:n + 1])[0] for name in TOP_TENSORS}
    vocab = _vocab(folder)
    window = stats["window"]
    report_data = report(t) or {}
    before = int(report_data.get("window_before", window // 2))
    before = min(max(before, 0), window - 1)
    contexts = []
    for j in range(len(rows["top_acts"])):
        ctx = int(rows["top_context"][j])
        if ctx < 0:
            continue
        tokens, center = [], 0
        for w in range(window):
            tok = int(rows["top_tokens"][j][w])
            if tok < 0:
                continue
            if w == before:
                center = len(tokens)
            text = vocab.get(tok)
            tokens.append({"id": tok, "text": text if text is not None else f"⟨{tok}⟩",
                           "act": _num(rows["top_window_acts"][j][w]) or 0.0})
        contexts.append({"activation": _num(rows["top_acts"][j]), "context": ctx,
                         "position": int(rows["top_position"][j]), "tokens": tokens,
                         "center": center})
    out = _stat_row(stats, n)
    out.update({"training_id": t.id, "d_sae": d_sae, "window_before": before,
                "window_after": window - before - 1, "contexts": contexts})
    return out
