"""Users' labels and notes on the latents of a training's SAE (table ``latent_label``).

One row per (training, latent), written by the latent page's editor (``PUT`` / ``POST
/trainings/<id>/latents/<n>/label``) and read by the latent page, the latent table's label
column and its search by label:

- ``get_label(training_id, latent)``: ``{"training_id", "latent", "label", "notes"}`` (label and
  notes None when the latent has none);
- ``set_label(training_id, latent, label=..., notes=...)``: validated (label at most
  ``LABEL_MAX`` characters on one line, notes at most ``NOTES_MAX``); an argument left out stays
  as it is; blank label and notes together delete the row;
- ``labels_of(training_id)``: ``{latent: label}`` of every labelled latent;
- ``search_labels(training_id, text)``: latents whose label contains ``text`` (case-insensitive,
  whitespace collapsed), ascending.

The latent id's range is the caller's check (``reports.require_latent``): this module knows no
evaluation files.
"""

from __future__ import annotations

from typing import Any

from ..db import LatentLabel, Training, db
from . import common
from .errors import Invalid

LABEL_MAX = 200
"""Characters of a label at most."""
NOTES_MAX = 5_000
"""Characters of notes at most."""

_UNSET: Any = object()


def _state(training_id: int, latent: int, row: LatentLabel | None) -> dict[str, Any]:
    return {"training_id": training_id, "latent": latent,
            "label": (row.label or None) if row else None,
            "notes": (row.notes or None) if row else None}


def _row(training_id: int, latent: int) -> LatentLabel | None:
    return LatentLabel.get_or_none((LatentLabel.training == training_id)
                                   & (LatentLabel.latent == latent))


def get_label(training_id: int | str, latent: int) -> dict[str, Any]:
    """The latent's label state: ``{"training_id", "latent", "label", "notes"}``."""
    t = common.get_row(Training, "Training", training_id)
    return _state(t.id, int(latent), _row(t.id, int(latent)))


def clean_label(raw: Any) -> tuple[str, str | None]:
    """(the label to store, "" for none; an error sentence or None). Whitespace collapsed: a
    label is one line."""
    if raw is None:
        return "", None
    if not isinstance(raw, str):
        return "", "The label must be text."
    text = " ".join(raw.split())
    if len(text) > LABEL_MAX:
        return "", (f"The label has {len(text):,} characters; at most {LABEL_MAX:,} are "
                    "allowed.")
    return text, None


def clean_notes(raw: Any) -> tuple[str, str | None]:
    """(the notes to store, "" for none; an error sentence or None). Lines kept, ends trimmed,
    Windows line ends made plain."""
    if raw is None:
        return "", None
    if not isinstance(raw, str):
        return "", "The notes must be text."
    text = raw.replace("\r\n", "\n").replace("\r", "\n").strip()
    if len(text) > NOTES_MAX:
        return "", (f"The notes have {len(text):,} characters; at most {NOTES_MAX:,} are "
                    "allowed.")
    return text, None


def set_label(training_id: int | str, latent: int, *, label: Any = _UNSET,
              notes: Any = _UNSET) -> dict[str, Any]:
    """Set a latent's label and/or notes (an argument left out stays as it is; None or blank
    clears it). Both blank: the row is deleted. Invalid with ``{"label", "notes"}`` messages
    (nothing written then); NotFound for an unknown training. Returns ``get_label``'s dict."""
    errors: dict[str, str] = {}
    new_label = new_notes = ""
    if label is not _UNSET:
        new_label, err = clean_label(label)
        if err:
            errors["label"] = err
    if notes is not _UNSET:
        new_notes, err = clean_notes(notes)
        if err:
            errors["notes"] = err
    latent = int(latent)
    with db.atomic():
        t = common.get_row(Training, "Training", training_id)
        if errors:
            raise Invalid(" ".join(errors.values()), errors)
        row = _row(t.id, latent)
        final_label = new_label if label is not _UNSET else (row.label if row else "")
        final_notes = new_notes if notes is not _UNSET else (row.notes if row else "")
        if not final_label and not final_notes:
            if row is not None:
                row.delete_instance()
            return _state(t.id, latent, None)
        if row is None:
            row = LatentLabel.create(training=t.id, latent=latent, label=final_label,
                                     notes=final_notes)
        else:
            row.label, row.notes = final_label, final_notes
            row.save()
    return _state(t.id, latent, row)


def labels_of(training_id: int | str) -> dict[int, str]:
    """``{latent: label}`` of the training's labelled latents (notes-only rows left out)."""
    query = (LatentLabel.select(LatentLabel.latent, LatentLabel.label)
             .where((LatentLabel.training == int(training_id)) & (LatentLabel.label != ""))
             .order_by(LatentLabel.latent))
    return {row.latent: row.label for row in query}


def search_labels(training_id: int | str, text: Any) -> list[int]:
    """Latents whose label contains ``text`` (case-insensitive, whitespace collapsed; blank
    text: every labelled latent), ascending ids."""
    needle = " ".join(str(text or "").split()).casefold()
    return [n for n, lab in labels_of(training_id).items() if needle in lab.casefold()]
