"""Sweeps through the job layer and the real worker task: every SAE a training row, trained in
sub-groups that fit the memory budget, steered as a whole, resumed exactly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from worker import jobs, tasks
from worker.db import Training, WorkerHeartbeat, db
from worker.engine.checkpoints import list_checkpoints
from worker.engine.config import TrainConfig
from worker.engine.sweep import run_name

from ..processes import wait_for
from .conftest import form


def _run_groups(enqueued: list) -> None:
    """Run the queued ``run_group`` tasks as a worker would (in order)."""
    queued = [args for name, args in enqueued if name == "run_group"]
    enqueued.clear()
    for (ids,) in queued:
        tasks.run_group.call_local(ids)


def test_a_sweep_trains_its_runs_together_and_reports_each(model: Any, dataset: Any,
                                                           enqueued: list) -> None:
    sweep = jobs.create_sweep(form(model, dataset, k="4, 8", layer="1,2"))
    info = jobs.sweep_as_dict(sweep)
    assert info["status"] == "queued" and len(info["trainings"]) == 4
    assert info["groups"] == [info["trainings"]]  # small enough for one forward pass
    assert enqueued == [("run_group", (info["trainings"],))]
    assert info["config"]["lists"] == {"layer": [1, 2], "k": [4, 8]}
    assert info["estimate"]["runs"] == 4 and info["estimate"]["split"] is False
    rows = jobs.sweep_trainings(sweep)
    assert [(r.config["layer"], r.config["k"]) for r in rows] == [(1, 4), (1, 8), (2, 4),
                                                                   (2, 8)]
    assert len({r.task_group for r in rows}) == 1

    _run_groups(enqueued)
    info = jobs.sweep_as_dict(jobs.get_sweep(sweep.id))
    assert info["status"] == "completed", [r.error for r in jobs.sweep_trainings(sweep)]
    for t in jobs.sweep_trainings(sweep):
        assert t.current_step == 20 and t.result["eval"]["measured_on"] == "heldout_text"
        assert 0 < t.result["eval"]["fvu"] < 1.5 and t.result["eval"]["report"] is True
        assert (Path(t.out_dir) / "saelens" / "cfg.json").is_file()
        assert jobs.metrics_rows(t.id)[-1]["step"] == 20
        logs = [line["message"] for line in jobs.log_lines(t.id)]
        assert any("4 SAEs trained together" in m for m in logs), logs
        assert any(m.startswith("Report ready") for m in logs)
    layers = {t.id: t.result["eval"] for t in jobs.sweep_trainings(sweep)}
    assert len({round(e["fvu"], 6) for e in layers.values()}) == 4  # four different SAEs


def test_each_run_of_a_group_logs_only_its_own_result(model: Any, dataset: Any,
                                                      enqueued: list) -> None:
    """The held-out result line ("Report ready: held-out FVU ...") of a group trained in one
    task is written to its own run's log only; the group's lines go to every run."""
    sweep = jobs.create_sweep(form(model, dataset, k="4,8,16", total_steps="10"))
    assert len(jobs.sweep_as_dict(sweep)["groups"]) == 1
    _run_groups(enqueued)
    lines = {}
    for t in jobs.sweep_trainings(sweep):
        assert t.status == "completed", t.error
        logs = [line["message"] for line in jobs.log_lines(t.id)]
        assert any("3 SAEs trained together" in m for m in logs), logs
        mine = [m for m in logs if m.startswith("Report ready")]
        ev = t.result["eval"]
        assert len(mine) == 1 and mine[0].startswith(
            f"Report ready: held-out FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}, "
            f"{ev['dead']} dead, {ev['dense']} dense"), logs
        lines[t.id] = mine[0]
    assert len(set(lines.values())) == 3


def test_bad_list_values_name_their_field_and_nothing_is_queued(model: Any, dataset: Any,
                                                               enqueued: list) -> None:
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_sweep(form(model, dataset, k="8,0,x"))
    assert set(exc.value.errors) == {"k"} and "'0'" in exc.value.errors["k"]
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_sweep(form(model, dataset, layer="1,9"))
    assert "layer" in exc.value.errors
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_sweep(form(model, dataset, seed=",".join(map(str, range(70)))))
    assert "at most 64" in exc.value.errors["form"]
    with pytest.raises(jobs.Invalid) as exc:  # not a list field
        jobs.create_sweep(form(model, dataset, batch_size="128,256"))
    assert "batch_size" in exc.value.errors
    with pytest.raises(jobs.Invalid) as exc:  # a single training: "8,16" is not 816
        jobs.create_training(form(model, dataset, k="8,16"))
    assert "a sweep trains several" in exc.value.errors["k"]
    # JSON lists are the same as comma strings; foreign options are ignored, not duplicated
    a = jobs.create_sweep(dict(form(model, dataset), encoder_type=["topk", "standard"],
                               k=[4, 8], l1_alpha=[1.0]))
    assert [(t.config["encoder_type"], t.config["k"]) for t in jobs.sweep_trainings(a)] == [
        ("topk", 4), ("topk", 8), ("standard", 32)]
    assert all(name == "run_group" for name, _ in enqueued)
    assert Training.select().count() == 3
    # a text option keeps its commas: Matryoshka widths are one value, shared by the runs
    b = jobs.create_sweep(dict(form(model, dataset), encoder_type="matryoshka_batchtopk",
                               k="4,8", matryoshka_widths="16,32,64", latent_dim="64"))
    assert [(t.config["k"], t.config["matryoshka_widths"]) for t in jobs.sweep_trainings(b)] \
        == [(4, "16,32,64"), (8, "16,32,64")]


def test_a_small_memory_budget_splits_the_sweep(model: Any, dataset: Any,
                                                enqueued: list) -> None:
    values = form(model, dataset, k="4,8,16", layer="1,2", expansion_factor="4")
    whole = jobs.sweep_estimate(values)
    assert whole["runs"] == 6 and not whole["split"]
    # a worker whose device holds some of these SAEs at a time, not all six
    one = jobs.estimate(model, form(model, dataset, k="16", layer="2",
                                    expansion_factor="4"))["memory_bytes"]
    assert one < whole["memory_bytes"]
    two = (one + whole["memory_bytes"]) // 2
    with db.atomic():
        WorkerHeartbeat.create(name="small:1", pid=1, device="cpu", device_memory=two,
                               updated_at=time.time())
    est = jobs.sweep_estimate(values)
    assert est["split"] and est["fits"] and len(est["groups"]) > 1
    assert all(size <= two for size in est["group_memory_bytes"])
    assert "groups, one after another" in est["warning"]

    sweep = jobs.create_sweep(values)
    info = jobs.sweep_as_dict(sweep)
    assert len(info["groups"]) == len(est["groups"]) > 1
    assert [args[0] for _, args in enqueued] == info["groups"]
    for ids in info["groups"]:  # one task (and one slot) per sub-group
        assert len({jobs.get_training(i).task_group for i in ids}) == 1
    _run_groups(enqueued)
    assert jobs.sweep_as_dict(jobs.get_sweep(sweep.id))["status"] == "completed"


def _weights(t: Training) -> dict[str, Any]:
    return load_file(str(Path(t.out_dir) / "saelens" / "sae_weights.safetensors"))


def test_a_paused_and_interrupted_sweep_resumes_exactly(model: Any, dataset: Any,
                                                        enqueued: list) -> None:
    settings = dict(k="4,8", total_steps="60", auto_save_interval="0", log_every="2",
                    eval_tokens="0")
    straight = jobs.create_sweep(form(model, dataset, **settings))
    _run_groups(enqueued)
    assert jobs.sweep_as_dict(jobs.get_sweep(straight.id))["status"] == "completed"

    sweep = jobs.create_sweep(form(model, dataset, **settings))
    ids = jobs.sweep_as_dict(sweep)["trainings"]
    enqueued.clear()
    import threading

    thread = threading.Thread(target=tasks.run_group.call_local, args=(ids,), daemon=True)
    thread.start()
    wait_for(lambda: jobs.get_training(ids[0]).status == "training", what="training")
    jobs.request(ids[1], "pause")  # one member's request is its group's
    wait_for(lambda: all(jobs.get_training(i).status == "paused" for i in ids), what="paused")
    assert jobs.sweep_as_dict(jobs.get_sweep(sweep.id))["status"] == "paused"
    with pytest.raises(jobs.Conflict, match="none of its trainings is a paused one"):
        jobs.request_sweep(straight.id, "resume")
    steps = {jobs.get_training(i).current_step for i in ids}
    assert len(steps) == 1 and 0 < steps.pop() < 60
    jobs.request_sweep(sweep.id, "resume")
    wait_for(lambda: all(jobs.get_training(i).status == "training" for i in ids),
             what="resumed")
    assert jobs.interrupt_running() == 2  # the worker shuts down mid-run
    thread.join(60)
    assert {jobs.get_training(i).status for i in ids} == {"interrupted"}
    assert jobs.sweep_as_dict(jobs.get_sweep(sweep.id))["status"] == "interrupted"
    saved = [dict(list_checkpoints(Path(jobs.get_training(i).out_dir) / "checkpoints"))
             for i in ids]
    assert set(saved[0]) == set(saved[1]) and max(saved[0]) < 60

    jobs.request_sweep(sweep.id, "retry")
    assert enqueued == [("run_group", (ids,))]
    _run_groups(enqueued)
    done = jobs.sweep_trainings(jobs.get_sweep(sweep.id))
    assert [t.status for t in done] == ["completed", "completed"]
    for a, b in zip(jobs.sweep_trainings(straight), done, strict=True):
        wa, wb = _weights(a), _weights(b)
        for name in wa:
            assert (wa[name] == wb[name]).all(), name


def test_sweep_controls_and_delete(model: Any, dataset: Any, enqueued: list) -> None:
    sweep = jobs.create_sweep(form(model, dataset, seed="0,1"))
    with pytest.raises(jobs.Conflict, match="stop it before deleting"):
        jobs.delete_sweep(sweep.id)
    with pytest.raises(jobs.Conflict, match="queued; none of its trainings is a running"):
        jobs.request_sweep(sweep.id, "pause")
    with pytest.raises(jobs.Invalid):
        jobs.request_sweep(sweep.id, "explode")
    stopped = jobs.sweep_as_dict(jobs.request_sweep(sweep.id, "stop"))
    assert stopped["status"] == "stopped" and stopped["counts"] == {"stopped": 2}
    enqueued.clear()
    jobs.request(stopped["trainings"][0], "retry")  # a member's retry queues its sub-group
    assert enqueued == [("run_group", (stopped["trainings"],))]
    jobs.request_sweep(sweep.id, "stop")
    folders = [Path(t.out_dir) for t in jobs.sweep_trainings(sweep)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    jobs.delete_sweep(sweep.id)
    assert Training.select().count() == 0 and not any(f.exists() for f in folders)
    for bad in (sweep.id, 2**63, "x"):
        with pytest.raises(jobs.NotFound):
            jobs.get_sweep(bad)


def test_a_sweep_lists_target_l0_values(model: Any, dataset: Any, enqueued: list) -> None:
    """--target-l0 sweeps like the coefficients it steers; types without it ignore it."""
    sweep = jobs.create_sweep(form(model, dataset, encoder_type="standard,jumprelu,topk",
                                   target_l0="16, 48"))
    info = jobs.sweep_as_dict(sweep)
    assert info["config"]["lists"]["target_l0"] == [16.0, 48.0]
    configs = [t.config for t in jobs.sweep_trainings(sweep)]
    assert [(c["encoder_type"], c["target_l0"]) for c in configs] == [
        ("standard", 16.0), ("standard", 48.0), ("jumprelu", 16.0), ("jumprelu", 48.0),
        ("topk", None)]
    names = [run_name(TrainConfig.from_dict(c)) for c in configs]
    assert "-l0t16-" in names[0] and "-l0t48-" in names[3] and "l0t" not in names[4]
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_sweep(form(model, dataset, encoder_type="standard", target_l0="16,-3"))
    assert set(exc.value.errors) == {"target_l0"} and "'-3'" in exc.value.errors["target_l0"]
