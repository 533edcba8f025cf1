"""Templates and presets in the job layer (``worker.jobs.templates``): parsing and checking the
fields, saving from a training, the presets (the Jetson one sized by the real memory estimate),
and the TOML file read back by tomllib and by the CLI's own loaders."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from worker import cli, jobs
from worker.db import Dataset, LanguageModel, Template, Training, WorkerHeartbeat, db
from worker.engine.memory import estimate_memory
from worker.jobs import templates as T

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def rows(**model_kw: Any) -> tuple[LanguageModel, Dataset]:
    values = dict(name="minilm-l6", source="minilm-l6", status="ready", n_layers=6,
                  hidden_dim=384, n_params=22_700_000, dtype="float32", path="/tmp/m",
                  hook_points=["residual", "mlp_out", "attn_out"])
    values.update(model_kw)
    with db.atomic():
        model = LanguageModel.create(**values)
        dataset = Dataset.create(name="kjv", source="kjv", status="ready", context_size=64,
                                 max_tokens=16384, text_field='te"xt')
    return model, dataset


def training(model: Any, dataset: Any, **config: Any) -> Training:
    cfg = {"encoder_type": "standard", "layer": 2, "hook_point": "mlp_out", "l1_alpha": 3.0,
           "expansion_factor": 2, "batch_size": 256, "total_steps": 30, "seed": 3,
           "learning_rate": None, "tie_weights": True, "model": "/tmp/m", "dataset": "kjv",
           "context_size": 64}
    cfg.update(config)
    return Training.create(model=model, dataset=dataset, config=cfg, total_steps=30,
                           status="completed")


# ---------------------------------------------------------------------------- presets
def test_list_fields_are_the_sweeps():
    from worker.engine.sweep import SWEEP_FIELDS

    assert T.LIST_FIELDS == SWEEP_FIELDS


def test_presets_are_valid_read_only_and_first(data_dir):
    ids = [p.id for p in T.PRESETS]
    assert ids == ["preset:cpu-quick-look", "preset:jetson-orin-nano-6gb",
                   "preset:l0-sweep-20-200"]
    for p in T.PRESETS:
        fields, errors = T.parse_fields(p.fields, p.kind)
        assert errors == {}, p.id
        assert fields == p.fields
        assert "model_id" not in p.fields and "dataset_id" not in p.fields
        d = jobs.template_as_dict(p)
        assert d["builtin"] is True and d["created_at"] is None and d["description"]
        with pytest.raises(jobs.Conflict, match="read-only"):
            jobs.delete_template(p.id)
    sweep = jobs.get_template("preset:l0-sweep-20-200")
    assert sweep.kind == "sweep" and sweep.fields["k"] == [20, 40, 80, 120, 200]
    assert sweep.fields["seed"] == [0]
    quick = jobs.get_template("preset:cpu-quick-look")
    assert quick.fields["batch_size"] * quick.fields["total_steps"] == 153_600
    assert "measured" in quick.description
    saved = jobs.create_template({"name": "mine", "k": "8"})
    listed = jobs.list_templates()
    assert [t.id for t in listed] == ids + [saved.id]


def test_jetson_preset_fits_6_gb_by_the_real_estimate(data_dir):
    """The estimate the form shows for the preset on a SmolLM2-135M-shaped model, on a worker
    with a 6 GB CUDA device, is the one the preset states, and is under half of 6 GB."""
    preset = jobs.get_template("preset:jetson-orin-nano-6gb")
    assert preset.fields["precision"] == "bf16" and preset.fields["device"] == "cuda"
    budget = 6 * 10**9
    total = T.jetson_estimate()
    assert 0 < total <= T.JETSON_SHARE * budget
    assert f"{total / 2**30:.2f} GiB" in preset.description
    # the same figure from the engine's function called here with the preset's sizes
    m = T.REFERENCE_MODEL
    direct = estimate_memory(576, 32 * 576, encoder_type="topk", k=64, batch_size=4096,
                             precision="bf16", model_params=m["n_params"],
                             model_dtype="bfloat16", buffer_tokens=131_072, device="cuda",
                             source="live", layer=15, n_layers=30, eval_tokens=16_384,
                             total_steps=5000).total
    assert direct == total
    # and through the web form's estimate (jobs.estimate) with the preset's values
    model, _ = rows(name="smollm2-135m", source="smollm2-135m", n_layers=30, hidden_dim=576,
                    n_params=m["n_params"], dtype="bfloat16", hook_points=["residual"])
    WorkerHeartbeat.create(name="w", pid=1, device="cuda", device_name="Orin",
                           device_memory=budget, gflops=100.0)
    est = jobs.estimate(model, dict(jobs.form_strings(preset.fields), layer="15"))
    assert est["invalid"] == {} and est["fits"] is True
    assert est["memory_bytes"] <= T.JETSON_SHARE * budget
    assert abs(est["memory_bytes"] - total) <= 0.02 * total


# ---------------------------------------------------------------------------- fields
def test_training_fields_are_parsed_by_the_forms_parsers(data_dir):
    fields, errors = T.parse_fields({"k": "64", "encoder_type": "standard", "tie_weights": "on",
                                     "batch_size": "4,096", "learning_rate": "", "model_id": "7",
                                     "unknown": "x"}, "training")
    assert errors == {}
    assert fields == {"k": 64, "encoder_type": "standard", "tie_weights": True,
                      "batch_size": 4096, "model_id": 7}
    _, errors = T.parse_fields({"k": "many", "encoder_type": "nope", "model_id": "x1",
                                "dataset_id": "2.5"}, "training")
    assert set(errors) == {"k", "encoder_type", "model_id", "dataset_id"}
    _, errors = T.parse_fields({"k": "0"}, "training")  # out of bounds: the form's check
    assert "k" in errors
    _, errors = T.parse_fields({"tie_weights": "on", "encoder_type": "topk"}, "training")
    assert "standard" in errors["tie_weights"]  # across fields, as the form checks
    _, errors = T.parse_fields({"k": [8, 16]}, "training")
    assert "kind=sweep" in errors["k"]


def test_sweep_fields_take_lists(data_dir):
    fields, errors = T.parse_fields({"k": "20, 40,80", "seed": [0, 1], "layer": "3",
                                     "batch_size": "1024"}, "sweep")
    assert errors == {}
    assert fields == {"k": [20, 40, 80], "seed": [0, 1], "layer": 3, "batch_size": 1024}
    _, errors = T.parse_fields({"k": "20,x"}, "sweep")
    assert "k" in errors
    _, errors = T.parse_fields({"k": "8,0"}, "sweep")  # each value checked like one training
    assert "k" in errors
    _, errors = T.parse_fields({"batch_size": "1024,2048"}, "sweep")
    assert "cannot take several values" in errors["batch_size"]
    _, errors = T.parse_fields({"batch_size": [1024, 2048]}, "sweep")
    assert "batch_size" in errors


def test_create_checks_name_and_kind(data_dir):
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_template({"k": "8"})
    assert set(exc.value.errors) == {"name"}
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_template({"name": "x" * 201})
    assert "at most 200" in exc.value.errors["name"]
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_template({"name": "t", "kind": "grid"})
    assert set(exc.value.errors) == {"kind"}
    jobs.create_template({"name": "Small", "k": "8"})
    for taken in ("small", " SMALL ", "CPU quick look"):
        with pytest.raises(jobs.Invalid) as exc:
            jobs.create_template({"name": taken})
        assert "already exists" in exc.value.errors["name"]
    with pytest.raises(jobs.Invalid) as exc:  # every bad field at once
        jobs.create_template({"name": "", "k": "x", "model_id": "-3"})
    assert set(exc.value.errors) == {"name", "k", "model_id"}
    assert Template.select().count() == 1


def test_from_training_copies_its_config(data_dir):
    model, dataset = rows()
    t = training(model, dataset)
    tpl = jobs.create_template({"from_training": str(t.id)})
    assert tpl.kind == "training"
    assert tpl.fields == {"model_id": model.id, "dataset_id": dataset.id,
                          "encoder_type": "standard", "layer": 2, "hook_point": "mlp_out",
                          "l1_alpha": 3.0, "expansion_factor": 2, "batch_size": 256,
                          "total_steps": 30, "seed": 3, "tie_weights": True}
    assert tpl.name  # the training's name
    again = jobs.create_template({"from_training": t.id})
    assert again.name == f"{tpl.name} (2)"  # a defaulted name is made unique
    named = jobs.create_template({"from_training": t.id, "name": "kept"})
    assert named.name == "kept"
    assert jobs.form_strings(tpl.fields)["tie_weights"] == "true"
    for bad in ("999", "abc", str(2**63)):
        with pytest.raises(jobs.NotFound):
            jobs.create_template({"from_training": bad, "name": "n"})


def test_get_and_delete(data_dir):
    tpl = jobs.create_template({"name": "a", "k": "8"})
    assert jobs.get_template(str(tpl.id)).name == "a"
    for bad in ("0", "abc", "-1", str(2**63), "1.5", "preset:nope", ""):
        with pytest.raises(jobs.NotFound):
            jobs.get_template(bad)
    jobs.delete_template(tpl.id)
    with pytest.raises(jobs.NotFound):
        jobs.delete_template(tpl.id)


# ---------------------------------------------------------------------------- TOML
def write(tmp_path: Path, text: str, name: str = "t.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_training_toml_is_what_the_cli_builds(data_dir, tmp_path):
    model, dataset = rows()
    tpl = jobs.create_template({"from_training": training(model, dataset).id})
    text = jobs.template_toml(tpl)
    data = tomllib.loads(text)
    assert data["model"] == "minilm-l6" and data["dataset"] == "kjv"
    assert data["context_size"] == 64 and data["max_tokens"] == 16384
    assert data["text_field"] == 'te"xt' and data["tie_weights"] is True
    # what `sae-studio train --config FILE` builds from it
    args = cli.build_parser().parse_args(["train", "--config", write(tmp_path, text)])
    cfg = cli._build_config(args)
    assert (cfg.model, cfg.dataset, cfg.encoder_type, cfg.layer, cfg.hook_point, cfg.l1_alpha,
            cfg.expansion_factor, cfg.batch_size, cfg.total_steps, cfg.seed, cfg.tie_weights,
            cfg.context_size, cfg.max_tokens) == (
        "minilm-l6", "kjv", "standard", 2, "mlp_out", 3.0, 2, 256, 30, 3, True, 64, 16384)


def test_toml_without_ready_rows_comments_them_out(data_dir, tmp_path):
    model, dataset = rows(status="failed")
    tpl = jobs.create_template({"name": "x", "model_id": str(model.id), "dataset_id": "999",
                                "k": "16", "learning_rate": "0.0004", "l1_alpha": "1e-05"})
    text = jobs.template_toml(tpl)
    data = tomllib.loads(text)
    assert "model" not in data and "dataset" not in data
    assert '# model = "' in text and '# dataset = "' in text
    assert data["learning_rate"] == 0.0004 and data["l1_alpha"] == 1e-05
    args = cli.build_parser().parse_args(["train", "--config", write(tmp_path, text),
                                          "--model", "minilm-l6", "--dataset", "kjv"])
    cfg = cli._build_config(args)
    assert cfg.k == 16 and cfg.learning_rate == 0.0004 and cfg.model == "minilm-l6"


def test_every_preset_toml_reads_in_the_cli(data_dir, tmp_path):
    from worker.sweep_cli import sweep_runs

    flags = ["--model", "minilm-l6", "--dataset", "kjv"]
    for preset in jobs.PRESETS:
        path = write(tmp_path, jobs.template_toml(preset), preset.id.split(":")[1] + ".toml")
        command = "sweep" if preset.kind == "sweep" else "train"
        args = cli.build_parser().parse_args([command, "--config", path, *flags])
        if command == "train":
            cfg = cli._build_config(args)
            for name, value in preset.fields.items():
                assert getattr(cfg, name) == value, (preset.id, name)
        else:
            runs = sweep_runs(args)
            assert [r.k for r in runs] == [20, 40, 80, 120, 200]
            assert {(r.batch_size, r.total_steps, r.seed, r.encoder_type) for r in runs} == {
                (1024, 150, 0, "topk")}


def test_sweep_toml_lists_are_arrays(data_dir, tmp_path):
    from worker.sweep_cli import sweep_runs

    model, dataset = rows()
    tpl = jobs.create_template({"name": "grid", "kind": "sweep", "model_id": model.id,
                                "dataset_id": dataset.id, "k": "8,16", "seed": "0,1",
                                "hook_point": "residual,mlp_out", "total_steps": "20"})
    data = tomllib.loads(jobs.template_toml(tpl))
    assert data["k"] == [8, 16] and data["seed"] == [0, 1]
    assert data["hook_point"] == ["residual", "mlp_out"] and data["total_steps"] == 20
    args = cli.build_parser().parse_args(["sweep", "--config",
                                          write(tmp_path, jobs.template_toml(tpl))])
    runs = sweep_runs(args)
    assert len(runs) == 8 and {r.model for r in runs} == {"minilm-l6"}
    assert {(r.k, r.seed, r.hook_point) for r in runs} == {
        (k, s, h) for k in (8, 16) for s in (0, 1) for h in ("residual", "mlp_out")}


def test_names_with_quotes_and_newlines_stay_valid_toml(data_dir):
    tpl = jobs.create_template({"name": 'a "quoted"\nname \\ ü', "k": "8"})
    assert tomllib.loads(jobs.template_toml(tpl))["k"] == 8
