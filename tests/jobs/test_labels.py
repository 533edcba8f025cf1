"""Trainings' names and tags (``worker.jobs.labels``): default names for lone runs and sweep
members, the user's name, tags, and their bounds."""

from __future__ import annotations

from typing import Any

import pytest

from worker import jobs
from worker.db import Sweep, Training, db

from ..web.conftest import make_dataset, make_model, make_training


@pytest.fixture
def rows(data_dir: Any) -> tuple[Any, Any]:
    return make_model(), make_dataset()


def training(rows: tuple[Any, Any], sweep: Any = None, **config: Any) -> Training:
    t = make_training(*rows, "completed", log=0)
    with db.connection_context():
        t.config = {**t.config, **config}
        t.sweep = sweep
        t.save()
        return Training.get_by_id(t.id)


def names(ts: list[Training]) -> list[str]:
    with db.connection_context():
        return [jobs.default_name(Training.get_by_id(t.id)) for t in ts]


def test_default_name_of_a_lone_training(rows):
    runs = [training(rows),  # layer 3, topk, k 32, 8x, seed 0
            training(rows, encoder_type="standard", l1_alpha=5.0, hook_point="mlp_out"),
            training(rows, encoder_type="jumprelu", l0_coef=0.5, layer=10, seed=3),
            training(rows, encoder_type="batchtopk", k=64, latent_dim=4096),
            training(rows, layer=None, hook_point="attn_out")]
    assert names(runs) == ["L3 topk k=32", "L3 mlpout standard a=5", "L10 jumprelu c=0.5",
                           "L3 batchtopk k=64", "Lmid attnout topk k=32"]
    with db.connection_context():  # lone: no width or seed even when set
        assert jobs.display_name(Training.get_by_id(runs[2].id)) == "L10 jumprelu c=0.5"
    # a target L0 steers the coefficient: the name says the target (not the start value);
    # a type without a sparsity penalty ignores it, and so does its name
    steered = [training(rows, encoder_type="standard", l1_alpha=5.0, target_l0=64),
               training(rows, encoder_type="jumprelu", l0_coef=0.5, target_l0=32.5),
               training(rows, target_l0=64)]
    assert names(steered) == ["L3 standard L0→64", "L3 jumprelu L0→32.5", "L3 topk k=32"]


def test_default_name_of_sweep_members(rows):
    model, dataset = rows
    with db.connection_context():
        seeds = Sweep.create(name="seeds", model=model, dataset=dataset, config={})
        widths = Sweep.create(name="widths", model=model, dataset=dataset, config={})
        ks = Sweep.create(name="ks", model=model, dataset=dataset, config={})
    by_seed = [training(rows, seeds, k=k, seed=s) for k in (16, 32) for s in (0, 1)]
    assert names(by_seed) == ["L3 topk k=16 s0", "L3 topk k=16 s1", "L3 topk k=32 s0",
                              "L3 topk k=32 s1"]
    by_width = [training(rows, widths, expansion_factor=8),
                training(rows, widths, expansion_factor=16),
                training(rows, widths, latent_dim=4096)]
    assert names(by_width) == ["L3 topk k=32 x8", "L3 topk k=32 x16", "L3 topk k=32 d4096"]
    by_k = [training(rows, ks, k=16), training(rows, ks, k=64, learning_rate=1e-3)]
    assert names(by_k) == ["L3 topk k=16 lr=auto", "L3 topk k=64 lr=0.001"]
    with db.connection_context():
        listed = jobs.labels.display_names(Training.select())
    assert [listed[t.id] for t in by_seed + by_width] == names(by_seed + by_width)


def test_rename_and_back_to_default(rows):
    t = training(rows)
    with db.connection_context():
        named = jobs.rename(t.id, "  best   so far ")
        assert named.name == "best so far" and jobs.display_name(named) == "best so far"
        assert jobs.training_as_dict(named)["name"] == "best so far"
        back = jobs.rename(t.id, "   ")
        assert back.name is None and jobs.display_name(back) == "L3 topk k=32"
        assert jobs.rename(t.id, None).name is None
        assert jobs.rename(t.id, "x" * 200).name == "x" * 200
        with pytest.raises(jobs.Invalid) as bad:
            jobs.rename(t.id, "x" * 201)
        assert set(bad.value.errors) == {"name"} and "201 characters" in str(bad.value)
        with pytest.raises(jobs.Invalid):
            jobs.rename(t.id, 7)
        with pytest.raises(jobs.NotFound, match="Training 999 does not exist"):
            jobs.rename(999, "x")


def test_tags(rows):
    t = training(rows)
    with db.connection_context():
        tagged = jobs.set_tags(t.id, " keep, Sweep A ,, keep,KEEP, sweep a ")
        assert tagged.tags == ["keep", "Sweep A"]
        assert jobs.set_tags(t.id, ["b", " a "]).tags == ["b", "a"]
        d = jobs.training_as_dict(Training.get_by_id(t.id))
        assert d["tags"] == ["b", "a"] and d["sweep_id"] is None and d["name"] == "L3 topk k=32"
        assert jobs.all_tags() == ["a", "b"]
        for bad, field_msg in ((["a,b"], "contains a comma"), (["x" * 41], "41 characters"),
                               ([f"t{i}" for i in range(21)], "at most 20"),
                               ([1], "must be text"), ({"a": 1}, "list of text")):
            with pytest.raises(jobs.Invalid) as err:
                jobs.set_tags(t.id, bad)
            assert field_msg in err.value.errors["tags"]
        assert jobs.set_tags(t.id, [f"t{i}" for i in range(20)]).tags[-1] == "t19"
        # both at once: one bad field writes nothing
        with pytest.raises(jobs.Invalid) as err:
            jobs.label(t.id, name="fine", tags=["x" * 50])
        assert set(err.value.errors) == {"tags"}
        row = Training.get_by_id(t.id)
        assert row.name is None and len(row.tags) == 20
        with pytest.raises(jobs.Invalid) as err:
            jobs.label(t.id, name="n" * 300, tags="a,b," + "y" * 41)
        assert set(err.value.errors) == {"name", "tags"}
        assert jobs.set_tags(t.id, "").tags == []
