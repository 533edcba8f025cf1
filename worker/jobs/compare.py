"""Comparing trainings: their curves over tokens, their final figures and the L0 Pareto fronts.

``compare_trainings(ids)`` reads any trainings, live or finished. A training's *final* figures
come from its held-out evaluation (``result["eval"]``) once it finished with one, else from its
newest metrics row (the last log window of training batches); ``final["window"]`` says which:
``"heldout_text"``, ``"heldout_vectors"`` or ``"training"``. CE loss recovered and KL exist
only in the held-out text evaluation.

Curves are the metrics rows (each the mean over its log window), at most ``CURVE_POINTS``
spread over the run, against tokens seen (the row's ``tokens``, else step x batch size).

The Pareto fronts: among the trainings with an L0 and the figure, those no other beats on both
(lower L0 and lower FVU; lower L0 and higher CE loss recovered), in L0 order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..db import FINISHED, TRAINING_STATUSES, Training, spread_metrics
from ..engine.files import json_safe
from .common import finite, with_model_and_dataset
from .errors import Invalid, NotFound
from .labels import applies, display_names, sparsity_label, width_label

MAX_IDS = 50
"""Trainings one comparison takes at most."""
CURVE_POINTS = 200
"""Points per curve at most (first and last kept)."""
CURVES = ("loss", "fvu", "l0", "dead", "dead_frac")
"""The curves' series besides ``step`` and ``tokens``."""
FIGURES = ("fvu", "l0", "dead", "dead_frac", "ce_loss_recovered", "kl_div")
"""The final figures (``final``), with ``window``, ``window_tokens``, ``step`` and ``tokens``."""
CONFIG_FIELDS = ("encoder_type", "layer", "hook_point", "target_hook_point", "skip_connection",
                 "k", "target_l0", "l1_alpha", "l0_coef", "expansion_factor", "latent_dim",
                 "learning_rate", "seed", "batch_size", "total_steps")
TABLE_SORTS = ("id", "name", "status", "encoder_type", "layer", "sparsity", "width", "steps",
               "fvu", "l0", "dead_frac", "ce_loss_recovered", "kl_div")
"""The comparison table's columns it sorts by (``?sort=``)."""
DESC_FIRST = ("ce_loss_recovered", "steps")
"""Sorted highest first unless ``order`` says otherwise."""
ORDERS = ("asc", "desc")


# ---------------------------------------------------------------------------- ids
def parse_ids(raw: str | Sequence[str] | None) -> list[int]:
    """Training ids from ``"1,2,3"`` (or several such strings: repeated ``ids=`` fields), in
    order, each once. Invalid (422) when one is not a whole number, none is given or more than
    ``MAX_IDS``; NotFound (404) naming every id that does not exist."""
    parts = [raw] if isinstance(raw, str) else list(raw or [])
    tokens = [p.strip().lstrip("#") for text in parts for p in str(text).split(",")]
    tokens = [p for p in tokens if p]
    bad = [p for p in tokens if not (p.isascii() and p.isdigit()) or len(p) > 18]
    if bad:
        msg = (f"'{bad[0][:30]}' is not a training id; give ids as whole numbers separated "
               "by commas, e.g. ids=1,2,3.")
        raise Invalid(msg, {"ids": msg})
    ids = list(dict.fromkeys(int(p) for p in tokens))
    if not ids:
        msg = "Choose at least one training to compare (ids=1,2,3)."
        raise Invalid(msg, {"ids": msg})
    if len(ids) > MAX_IDS:
        msg = f"{len(ids)} trainings given; at most {MAX_IDS} can be compared at once."
        raise Invalid(msg, {"ids": msg})
    found = {t.id for t in Training.select(Training.id).where(Training.id.in_(ids))}
    missing = [i for i in ids if i not in found]
    if missing:
        which = ", ".join(map(str, missing))
        raise NotFound(f"Training {which} does not exist." if len(missing) == 1
                       else f"Trainings {which} do not exist.", {"ids": which})
    return ids


# ---------------------------------------------------------------------------- one training
def d_sae(t: Training) -> int | None:
    """The number of latents: the estimate's, the config's latent_dim, or expansion x hidden."""
    cfg = t.config or {}
    value = (t.estimate or {}).get("d_sae") or cfg.get("latent_dim")
    if value is None and t.model.hidden_dim:
        value = int(cfg.get("expansion_factor") or 8) * int(t.model.hidden_dim)
    return int(value) if value else None


def final_figures(t: Training, latents: int | None = None) -> dict[str, Any]:
    """``{fvu, l0, dead, dead_frac, ce_loss_recovered, kl_div, window, window_tokens, step,
    tokens}``: from the held-out evaluation of a finished run (``window`` "heldout_text" or
    "heldout_vectors", ``window_tokens`` the tokens it scored), else from the newest metrics
    row (``window`` "training": the last log window of training batches; ``window_tokens``
    None). Missing figures are None; ``window`` is None before any metrics."""
    latents = latents if latents is not None else d_sae(t)
    result = t.result if isinstance(t.result, dict) else {}
    ev = result.get("eval") if isinstance(result.get("eval"), dict) else {}
    latest = t.latest if isinstance(t.latest, dict) else {}
    step = int(t.current_step or 0)
    tokens = finite(latest.get("tokens"))
    if tokens is None:
        tokens = step * int((t.config or {}).get("batch_size") or 0)
    out: dict[str, Any] = {k: None for k in FIGURES}
    out.update(step=step, tokens=int(tokens), window=None, window_tokens=None)
    if t.status in FINISHED and ev.get("measured_on") and finite(ev.get("fvu")) is not None:
        out["window"] = ev["measured_on"]
        out["window_tokens"] = ev.get("scored_tokens") or ev.get("tokens")
        for key in FIGURES:
            out[key] = finite(ev.get(key))
        if out["dead"] is None and out["dead_frac"] is not None and latents:
            out["dead"] = round(out["dead_frac"] * latents)
        if out["dead_frac"] is None and out["dead"] is not None:
            alive = finite(ev.get("alive"))
            total = out["dead"] + alive if alive is not None else latents
            out["dead_frac"] = out["dead"] / total if total else None
        return out
    if latest:
        out["window"] = "training"
        out["fvu"] = finite(latest.get("fvu"))
        out["l0"] = finite(latest.get("l0"))
        dead = latest.get("dead", latest.get("dead_neurons"))
        out["dead"] = finite(dead)
        out["dead_frac"] = finite(latest.get("dead_frac"))
        if out["dead_frac"] is None and out["dead"] is not None and latents:
            out["dead_frac"] = out["dead"] / latents
    return out


def curves(t: Training, latents: int | None = None, limit: int = CURVE_POINTS
           ) -> dict[str, list[Any]]:
    """``{step, tokens, loss, fvu, l0, dead, dead_frac}``: equal-length lists, oldest first, at
    most ``limit`` rows spread over the run (first and last kept; ``db.spread_metrics``)."""
    latents = latents if latents is not None else d_sae(t)
    out: dict[str, list[Any]] = {"step": [], "tokens": [], **{k: [] for k in CURVES}}
    rows = spread_metrics(t.id, limit, "tokens", "loss", "fvu", "l0", ("dead", "dead_neurons"),
                          "dead_frac")
    batch = int((t.config or {}).get("batch_size") or 0)
    for step, tokens, loss, fvu, l0, dead, dead_frac in rows:
        out["step"].append(int(step))
        tok = finite(tokens)
        out["tokens"].append(int(tok) if tok is not None else int(step) * batch)
        out["loss"].append(finite(loss))
        out["fvu"].append(finite(fvu))
        out["l0"].append(finite(l0))
        dead = finite(dead)
        out["dead"].append(dead)
        frac = finite(dead_frac)
        if frac is None and dead is not None and latents:
            frac = dead / latents
        out["dead_frac"].append(frac)
    return out


# ---------------------------------------------------------------------------- Pareto
def pareto_front(points: Iterable[tuple[int, Any, Any]], higher_is_better: bool = False
                 ) -> list[int]:
    """The ids of the non-dominated ``(id, l0, y)`` points, in L0 order: no other point has an
    L0 at most as high and a ``y`` at least as good with one of them strictly better (lower y,
    or higher with ``higher_is_better``). Points without a finite L0 > 0 or y are left out."""
    pts = []
    for key, l0, y in points:
        x, v = finite(l0), finite(y)
        if x is None or v is None or x <= 0:
            continue
        pts.append((x, -v if higher_is_better else v, key))
    pts.sort()
    front: list[int] = []
    best: tuple[float, float] | None = None
    for x, v, key in pts:
        if best is None or v < best[1] or (x, v) == best:
            front.append(key)
            best = (x, v)
    return front


# ---------------------------------------------------------------------------- sorting
def sort_rows(rows: list[Any], key: Callable[[Any], Any], desc: bool) -> list[Any]:
    """``rows`` by ``key`` (ascending or descending), rows whose key is None last, ties in
    their given order."""
    present = [r for r in rows if key(r) is not None]
    missing = [r for r in rows if key(r) is None]
    return sorted(present, key=key, reverse=desc) + missing


def check_sort(sort: str | None, order: str | None, sorts: Sequence[str],
               errors: dict[str, str]) -> str | None:
    """Check ``sort`` against ``sorts`` and ``order`` (asc | desc), adding a message per bad
    one to ``errors``; returns the order (None when not given)."""
    if sort not in (None, "") and sort not in sorts:
        errors["sort"] = f"Unknown sort '{str(sort)[:30]}'; use one of {', '.join(sorts)}."
    if order in (None, ""):
        return None
    if order not in ORDERS:
        errors["order"] = f"Unknown order '{str(order)[:30]}'; use asc or desc."
        return None
    return order


def _sparsity_value(d: dict[str, Any]) -> float | None:
    for option in ("k", "target_l0", "l1_alpha", "l0_coef"):
        if d.get(option) is not None:
            return finite(d[option])
    return None


_TABLE_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "id": lambda d: d["id"],
    "name": lambda d: d["name"].casefold(),
    "status": lambda d: TRAINING_STATUSES.index(d["status"])
    if d["status"] in TRAINING_STATUSES else len(TRAINING_STATUSES),
    "encoder_type": lambda d: d["encoder_type"],
    "layer": lambda d: d["layer"],
    "sparsity": _sparsity_value,
    "width": lambda d: d["latent_dim"],
    "steps": lambda d: d["current_step"],
    **{k: (lambda d, k=k: d["final"][k]) for k in ("fvu", "l0", "dead_frac",
                                                   "ce_loss_recovered", "kl_div")},
}


# ---------------------------------------------------------------------------- the comparison
def training_entry(t: Training, name: str) -> dict[str, Any]:
    """One training of the comparison: ``id, name, status, model, dataset, model_id,
    dataset_id, sweep_id, tags, current_step, live``, the config fields (``CONFIG_FIELDS``;
    ``latent_dim`` is the number of latents, the options that do not apply to its encoder type
    are None), ``sparsity`` and ``width`` (labels), ``final`` and ``curves``."""
    cfg = t.config or {}
    latents = d_sae(t)
    entry: dict[str, Any] = {
        "id": t.id, "name": name, "status": t.status, "model": t.model.name,
        "dataset": t.dataset.name, "model_id": t.model_id, "dataset_id": t.dataset_id,
        "sweep_id": t.sweep_id, "tags": list(t.tags or []),
        "current_step": int(t.current_step or 0), "live": t.status not in FINISHED,
    }
    for key in CONFIG_FIELDS:
        entry[key] = cfg.get(key)
    encoder = str(cfg.get("encoder_type") or "topk")
    entry["encoder_type"] = encoder
    entry["hook_point"] = cfg.get("hook_point") or "residual"
    for option in ("k", "target_l0", "l1_alpha", "l0_coef"):
        if not applies(option, encoder):
            entry[option] = None
    entry["latent_dim"] = latents
    entry["sparsity"] = sparsity_label(cfg)
    entry["width"] = width_label(cfg)
    entry["final"] = final_figures(t, latents)
    entry["curves"] = curves(t, latents)
    return json_safe(entry)


def compare_trainings(ids: str | Sequence[str] | None, sort: str | None = None,
                       order: str | None = None) -> dict[str, Any]:
    """``{"trainings": [training_entry ...], "pareto": {"fvu": [ids], "ce_loss_recovered":
    [ids]}}`` for the ids (``parse_ids``), in their given order or sorted by a table column
    (``TABLE_SORTS``; ``order`` asc | desc, default asc, desc for ``DESC_FIRST``). Invalid for
    a bad sort or order."""
    errors: dict[str, str] = {}
    order = check_sort(sort, order, TABLE_SORTS, errors)
    if errors:
        raise Invalid(" ".join(errors.values()), errors)
    id_list = parse_ids(ids)
    rows = {t.id: t for t in with_model_and_dataset().where(Training.id.in_(id_list))}
    trainings = [rows[i] for i in id_list if i in rows]
    names = display_names(trainings)
    entries = [training_entry(t, names[t.id]) for t in trainings]
    if sort:
        desc = order == "desc" if order else sort in DESC_FIRST
        entries = sort_rows(entries, _TABLE_KEYS[sort], desc)
    points = [(e["id"], e["final"]["l0"], e["final"]["fvu"]) for e in entries]
    ce = [(e["id"], e["final"]["l0"], e["final"]["ce_loss_recovered"]) for e in entries]
    return {"trainings": entries,
            "pareto": {"fvu": pareto_front(points),
                       "ce_loss_recovered": pareto_front(ce, higher_is_better=True)}}
