"""Trainings' names and tags: a default name that says what a run is (and, in a sweep, what
differs from its siblings), the user's name when one is set, and free-form tags.

``default_name`` of a lone training is its layer, hook point (unless the residual stream),
encoder type and sparsity option: ``"L15 topk k=32"``, ``"L3 mlpout standard a=5"``,
``"L6 jumprelu c=0.5"``. A sweep member adds the width (``x8`` / ``d4096``), the learning rate
(``lr=0.001``) and the seed (``s1``) when its sweep's trainings differ in them. ``display_name``
is the user's name, else the default. ``label`` sets a name and tags together (every bad field
at once, nothing written then); a blank name goes back to the default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..db import LanguageModel, Training, db
from ..engine import architectures
from . import common
from .errors import Invalid

NAME_MAX = 200
"""Characters of a name at most."""
TAGS_MAX = 20
"""Tags per training at most."""
TAG_MAX = 40
"""Characters of a tag at most."""

_UNSET: Any = object()


def _num(value: Any) -> str:
    try:
        return f"{float(value):g}".replace("+", "")
    except (TypeError, ValueError):
        return str(value)


def applies(option: str, encoder_type: str) -> bool:
    users = architectures.applies_to(option)
    return users is None or encoder_type in users


def sparsity_label(cfg: Mapping[str, Any]) -> str:
    """The encoder type's sparsity option: ``k=32`` (topk, batchtopk), ``a=5`` (standard's
    L1 coefficient), ``c=0.5`` (jumprelu's L0 coefficient), ``L0→64`` (a target L0, which
    steers the coefficient: then the coefficient, only its start, is left out); "" for a type
    with none."""
    encoder = str(cfg.get("encoder_type") or "topk")
    parts = []
    if applies("k", encoder) and cfg.get("k") is not None:
        parts.append(f"k={cfg['k']}")
    if applies("target_l0", encoder) and cfg.get("target_l0") is not None:
        parts.append(f"L0→{_num(cfg['target_l0'])}")
        return " ".join(parts)
    if applies("l1_alpha", encoder) and cfg.get("l1_alpha") is not None:
        parts.append(f"a={_num(cfg['l1_alpha'])}")
    if applies("l0_coef", encoder) and cfg.get("l0_coef") is not None:
        parts.append(f"c={_num(cfg['l0_coef'])}")
    return " ".join(parts)


def width_label(cfg: Mapping[str, Any]) -> str:
    """``d4096`` (the latent dimension) or ``x8`` (the expansion factor)."""
    if cfg.get("latent_dim"):
        return f"d{cfg['latent_dim']}"
    return f"x{cfg.get('expansion_factor') or 8}"


def _short(cfg: Mapping[str, Any]) -> list[str]:
    layer = cfg.get("layer")
    parts = [f"L{layer}" if layer is not None else
             ("Lfile" if cfg.get("activations") else "Lmid")]
    hook = cfg.get("hook_point") or "residual"
    target = cfg.get("target_hook_point")
    if target:  # a transcoder: "L15 mlpin→mlpout skip topk k=32"
        parts.append(f"{str(hook).replace('_', '')}→{str(target).replace('_', '')}")
        if cfg.get("skip_connection"):
            parts.append("skip")
    elif hook != "residual":
        parts.append(str(hook).replace("_", ""))
    parts.append(str(cfg.get("encoder_type") or "topk"))
    sparsity = sparsity_label(cfg)
    if sparsity:
        parts.append(sparsity)
    return parts


def name_from_config(cfg: Mapping[str, Any],
                     siblings: Sequence[Mapping[str, Any]] = ()) -> str:
    """The default name of a run with config ``cfg`` among ``siblings`` (its sweep's configs,
    itself included; empty for a lone training): the short form, plus the width, learning
    rate and seed where the siblings differ in them."""
    parts = _short(cfg)
    if len(siblings) > 1:
        if len({width_label(c) for c in siblings}) > 1:
            parts.append(width_label(cfg))
        if len({repr(c.get("learning_rate")) for c in siblings}) > 1:
            lr = cfg.get("learning_rate")
            parts.append(f"lr={_num(lr)}" if lr is not None else "lr=auto")
        if len({repr(c.get("seed", 0)) for c in siblings}) > 1:
            parts.append(f"s{cfg.get('seed', 0)}")
    return " ".join(parts)


def sibling_configs(sweep_id: int | None) -> list[dict[str, Any]]:
    """The configs of a sweep's trainings (empty for None)."""
    if sweep_id is None:
        return []
    return [row.config or {} for row in
            Training.select(Training.config).where(Training.sweep == sweep_id)
            .order_by(Training.id)]


def default_name(training: Training,
                 siblings: Sequence[Mapping[str, Any]] | None = None) -> str:
    """What the run is: ``"L15 topk k=32"``; a sweep member also names what differs among its
    sweep's trainings (``"L15 topk k=32 s1"``). ``siblings`` (the sweep's configs) saves the
    query when the caller has them."""
    if siblings is None:
        siblings = sibling_configs(training.sweep_id)
    return name_from_config(training.config or {}, siblings)


def display_name(training: Training,
                 siblings: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The user's name, else ``default_name``."""
    return training.name or default_name(training, siblings)


def display_names(trainings: Iterable[Training]) -> dict[int, str]:
    """``display_name`` of many trainings (id -> name), one query per sweep among them."""
    rows = list(trainings)
    sweeps: dict[int, list[dict[str, Any]]] = {}
    out = {}
    for t in rows:
        if t.name:
            out[t.id] = t.name
            continue
        if t.sweep_id is not None and t.sweep_id not in sweeps:
            sweeps[t.sweep_id] = sibling_configs(t.sweep_id)
        out[t.id] = name_from_config(t.config or {}, sweeps.get(t.sweep_id, []))
    return out


# ---------------------------------------------------------------------------- validation
def clean_name(name: Any) -> tuple[str | None, str | None]:
    """(the name to store or None for the default, an error sentence or None)."""
    if name is None:
        return None, None
    if not isinstance(name, str):
        return None, "The name must be text."
    name = " ".join(name.split())
    if len(name) > NAME_MAX:
        return None, f"The name has {len(name)} characters; at most {NAME_MAX} are allowed."
    return name or None, None


def clean_tags(tags: Any) -> tuple[list[str], str | None]:
    """(the tags to store, an error sentence or None). ``tags`` is a list of strings or one
    comma-separated string; each is trimmed (inner whitespace collapsed), blanks dropped,
    duplicates (ignoring case) dropped, the first spelling kept."""
    if tags is None:
        return [], None
    if isinstance(tags, str):
        items: list[Any] = tags.split(",")
    elif isinstance(tags, list | tuple):
        items = list(tags)
    else:
        return [], "Tags must be a list of text or one comma-separated string."
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            return [], "Each tag must be text."
        tag = " ".join(item.split())
        if not tag:
            continue
        if "," in tag:
            return [], f"Tag '{tag[:TAG_MAX]}' contains a comma; commas separate tags."
        if len(tag) > TAG_MAX:
            return [], (f"Tag '{tag[:TAG_MAX]}…' has {len(tag)} characters; at most {TAG_MAX} "
                        "are allowed.")
        if tag.casefold() not in seen:
            seen.add(tag.casefold())
            out.append(tag)
    if len(out) > TAGS_MAX:
        return [], f"{len(out)} tags given; at most {TAGS_MAX} are allowed."
    return out, None


def label(training_id: int | str, *, name: Any = _UNSET, tags: Any = _UNSET) -> Training:
    """Set a training's name and/or tags (an argument left out stays as it is). A blank or None
    name goes back to the default name. Invalid with ``{"name", "tags"}`` messages for bad
    values (nothing is written then); NotFound for an unknown training."""
    errors: dict[str, str] = {}
    new_name = new_tags = None
    if name is not _UNSET:
        new_name, err = clean_name(name)
        if err:
            errors["name"] = err
    if tags is not _UNSET:
        new_tags, err = clean_tags(tags)
        if err:
            errors["tags"] = err
    with db.atomic():
        t = common.get_row(Training, "Training", training_id)
        if errors:
            raise Invalid(" ".join(errors.values()), errors)
        if name is not _UNSET:
            t.name = new_name
        if tags is not _UNSET:
            t.tags = new_tags
        t.save()
    return common.get_row(Training, "Training", t.id)


def rename(training_id: int | str, name: Any) -> Training:
    """Name a training (blank: back to its default name)."""
    return label(training_id, name=name)


def set_tags(training_id: int | str, tags: Any) -> Training:
    """Replace a training's tags (a list, or one comma-separated string)."""
    return label(training_id, tags=tags)


def all_tags() -> list[str]:
    """Every tag in use, sorted (ignoring case)."""
    tags: dict[str, str] = {}
    for row in Training.select(Training.tags):
        for tag in row.tags or []:
            tags.setdefault(str(tag).casefold(), str(tag))
    return sorted(tags.values(), key=str.casefold)


def filter_choices() -> dict[str, list[Any]]:
    """What the jobs list's filters offer: ``model`` [(id, name)] and ``tag`` [tags] of the
    trainings there are, ``encoder_type`` [every registered type]."""
    models = (LanguageModel.select(LanguageModel.id, LanguageModel.name)
              .join(Training, on=(Training.model == LanguageModel.id)).distinct()
              .order_by(LanguageModel.name, LanguageModel.id))
    return {"model": [(m.id, m.name) for m in models], "tag": all_tags(),
            "encoder_type": list(architectures.names())}
