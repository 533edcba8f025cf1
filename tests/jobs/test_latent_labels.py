"""Users' labels and notes on latents (``worker.jobs.latent_labels``, table ``latent_label``):
they persist, are validated, are deleted when cleared, go with their training, and the latent
table finds them (search by label on a real evaluation of a tiny GPT-2)."""

from __future__ import annotations

from typing import Any

import pytest

from worker import jobs
from worker.db import LatentLabel, db
from worker.jobs import latent_labels, reports

from ..web.conftest import make_dataset, make_model, make_training
from ..web.evals import install_evaluation


@pytest.fixture
def training(data_dir: Any) -> Any:
    return make_training(make_model(), make_dataset(), "completed", log=0, out_dir=data_dir)


def test_labels_persist_and_update(training):
    with db.connection_context():
        assert latent_labels.get_label(training.id, 7) == {
            "training_id": training.id, "latent": 7, "label": None, "notes": None}
        state = latent_labels.set_label(training.id, 7, label="  the   cat ",
                                        notes="Fires on cats.\r\nAlso on kittens.  ")
        assert state == {"training_id": training.id, "latent": 7, "label": "the cat",
                         "notes": "Fires on cats.\nAlso on kittens."}
    with db.connection_context():  # a new connection reads what was written
        assert latent_labels.get_label(training.id, 7)["label"] == "the cat"
        # an argument left out stays; one given replaces
        latent_labels.set_label(training.id, 7, label="Cats")
        assert latent_labels.get_label(training.id, 7)["notes"].startswith("Fires on cats.")
        latent_labels.set_label(training.id, 7, notes="")
        assert latent_labels.get_label(training.id, 7) == {
            "training_id": training.id, "latent": 7, "label": "Cats", "notes": None}
        latent_labels.set_label(training.id, 9, notes="only notes")
        assert latent_labels.labels_of(training.id) == {7: "Cats"}  # notes-only: no label
        assert LatentLabel.select().count() == 2


def test_clearing_both_deletes_the_row(training):
    with db.connection_context():
        latent_labels.set_label(training.id, 3, label="x", notes="y")
        assert LatentLabel.select().count() == 1
        state = latent_labels.set_label(training.id, 3, label="  ", notes=None)
        assert state["label"] is None and state["notes"] is None
        assert LatentLabel.select().count() == 0
        latent_labels.set_label(training.id, 3, label="", notes="")  # nothing to delete
        assert LatentLabel.select().count() == 0


def test_validation_writes_nothing(training):
    with db.connection_context():
        latent_labels.set_label(training.id, 1, label="kept", notes="kept notes")
        with pytest.raises(jobs.Invalid) as bad:
            latent_labels.set_label(training.id, 1, label="x" * 201, notes="n" * 5001)
        assert set(bad.value.errors) == {"label", "notes"}
        assert "201 characters; at most 200" in bad.value.errors["label"]
        assert "5,001 characters; at most 5,000" in bad.value.errors["notes"]
        with pytest.raises(jobs.Invalid, match="must be text"):
            latent_labels.set_label(training.id, 1, label=["a"])
        assert latent_labels.get_label(training.id, 1) == {
            "training_id": training.id, "latent": 1, "label": "kept", "notes": "kept notes"}
        # the bounds themselves are fine
        latent_labels.set_label(training.id, 1, label="y" * 200, notes="n" * 5000)
        with pytest.raises(jobs.NotFound, match="Training 999 does not exist"):
            latent_labels.set_label(999, 1, label="a")


def test_labels_go_with_their_training(training, data_dir):
    other = make_training(make_model(name="m2"), make_dataset(name="d2"), "completed", log=0)
    with db.connection_context():
        latent_labels.set_label(training.id, 1, label="mine")
        latent_labels.set_label(other.id, 1, label="theirs")
        assert latent_labels.labels_of(training.id) == {1: "mine"}
    jobs.delete_training(training.id)
    with db.connection_context():
        assert [r.training_id for r in LatentLabel.select()] == [other.id]


def test_search_labels(training):
    with db.connection_context():
        for n, text in ((4, "Bible names"), (2, "the word GOD"), (30, "names of places"),
                        (8, "")):
            latent_labels.set_label(training.id, n, label=text, notes="x")
        assert latent_labels.search_labels(training.id, "NAMES") == [4, 30]
        assert latent_labels.search_labels(training.id, " of   places ") == [30]
        assert latent_labels.search_labels(training.id, "") == [2, 4, 30]
        assert latent_labels.search_labels(training.id, "cat") == []


def test_latent_table_finds_a_labelled_latent(training, tmp_path):
    """On a real evaluation: a label set on a latent shows in the table and its search."""
    install_evaluation(training, "gpt2")
    with db.connection_context():
        d_sae = reports.require_report(training)["d_sae"]
        latent_labels.set_label(training.id, d_sae - 1, label="Verse numbers")
        latent_labels.set_label(training.id, 5, label="numbers, small")
        page = reports.latents_page(training, by="label", q="NUMBERS", sort="id")
        assert [r["id"] for r in page["rows"]] == [5, d_sae - 1]
        assert [r["label"] for r in page["rows"]] == ["numbers, small", "Verse numbers"]
        assert page["matches"] == 2 and page["total"] == d_sae
        everyone = reports.latents_page(training, sort="id", per_page=10)
        assert everyone["rows"][5]["label"] == "numbers, small"
        assert everyone["rows"][0]["label"] is None
        assert reports.latents_page(training, by="label", q="nothing")["rows"] == []
