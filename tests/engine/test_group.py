"""Sweeps: several SAEs trained together from one forward pass on a real tiny model over the
bundled KJV corpus; each is the same SAE a training alone would give."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.engine.config import TrainConfig
from worker.engine.errors import CheckpointError, ConfigError
from worker.engine.group import resume_points, train_group
from worker.engine.pipeline import train_and_evaluate
from worker.engine.sweep import expand, run_name, unique_names
from worker.engine.trainer import Callbacks

from .tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    model = make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return TrainConfig(model=str(model), dataset="kjv", context_size=32, max_tokens=32 * 300,
                       k=4, expansion_factor=4, batch_size=128, total_steps=30, log_every=5,
                       auto_save_interval=10, eval_tokens=256, buffer_tokens=2048, seed=0,
                       layer=1)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "saelens" / "sae_weights.safetensors"))


def test_expand_is_the_product_without_duplicates_or_foreign_options(base: TrainConfig) -> None:
    runs = expand(base, {"encoder_type": ["topk", "standard"], "k": [8, 16],
                         "l1_alpha": [1.0, 2.0], "seed": [0, 1]})
    # topk ignores l1_alpha, standard ignores k: 2 k x 2 seeds + 2 alphas x 2 seeds
    assert len(runs) == 8
    names = unique_names(runs)
    assert len(set(names)) == 8
    assert "L1-topk-k8-x4-s0" in names and "L1-standard-a2-x4-s1" in names
    assert run_name(base.replace(layer=15, k=32, expansion_factor=8)) == "L15-topk-k32-x8-s0"
    with pytest.raises(ConfigError, match="batch_size cannot take several values"):
        expand(base, {"batch_size": [1, 2]})


def test_two_layer_sweep_matches_solo_runs_and_exports_name_their_layer(
        base: TrainConfig, tmp_path: Path) -> None:
    runs = expand(base, {"layer": [0, 1], "k": [4, 8]})
    names = unique_names(runs)
    logs: list[str] = []
    out = train_group(runs, [tmp_path / n for n in names], data_dir=tmp_path / "data",
                      device=CPU, log=logs.append)
    assert [Path(r["out"]).name for r in out["runs"]] == names
    assert out["tokens"] == 30 * 128 and out["tokens_per_s"] > 0
    solo = train_and_evaluate(runs[1], tmp_path / "solo", data_dir=tmp_path / "data",
                              device=CPU)
    group_w, solo_w = _weights(tmp_path / names[1]), _weights(tmp_path / "solo")
    for key in solo_w:
        torch.testing.assert_close(group_w[key], solo_w[key], rtol=0, atol=0)
    assert out["runs"][1]["fvu"] == solo["fvu"]
    # One evaluation pass for the group (a shared clean forward) reports what one SAE's does
    group_report = json.loads((tmp_path / names[1] / "eval" / "report.json").read_text())
    solo_report = json.loads((tmp_path / "solo" / "eval" / "report.json").read_text())
    for key in ("fvu", "l0", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "kl_div",
                "dead", "dense", "scored_tokens"):
        assert group_report[key] == pytest.approx(solo_report[key], rel=1e-6), key
    assert group_report["histogram"] == solo_report["histogram"]
    assert any("Report ready (L1-topk-k8-x4-s0)" in line for line in logs)
    for name, cfg, values in zip(names, runs, out["runs"], strict=True):
        folder = tmp_path / name
        meta = json.loads((folder / "saelens" / "cfg.json").read_text())
        assert meta["metadata"]["hook_name"] == f"blocks.{cfg.layer}.hook_resid_post"
        assert (folder / "eval" / "report.json").is_file()
        assert values["eval"]["measured_on"] == "heldout_text"
        assert sorted(p.name for p in (folder / "checkpoints").iterdir())[-1] == \
            "step_00000030.safetensors"


@pytest.mark.skipif(not SAELENS_PY.exists(), reason="make saelens-venv builds SAELens's venv")
def test_sweep_exports_load_in_saelens(base: TrainConfig, tmp_path: Path) -> None:
    runs = expand(base.replace(total_steps=10), {"layer": [0, 1]})
    names = unique_names(runs)
    train_group(runs, [tmp_path / n for n in names], data_dir=tmp_path / "data", device=CPU,
                evaluate=False)
    save_file({"x": torch.randn(20, 32)}, str(tmp_path / "in.safetensors"))
    for name in names:
        proc = subprocess.run(
            [str(SAELENS_PY), str(ROOT / "tests" / "saelens_bridge.py"),
             str(tmp_path / name / "saelens"), str(tmp_path / "in.safetensors"),
             str(tmp_path / "out.safetensors")],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info["architecture"] == "topk"


def test_hooks_share_one_forward_pass(base: TrainConfig, tmp_path: Path) -> None:
    """Two hooks of one model read the same stream as a source alone, for as many forward
    passes as that source alone runs."""
    from worker.engine.activations import LiveActivations, SharedExtraction
    from worker.engine.corpora import build_token_store
    from worker.engine.models import extract_layer, load_model

    loaded = load_model(base.model)
    store = build_token_store("kjv", loaded.tokenizer, tmp_path / "tokens", context_size=32,
                              max_tokens=32 * 300)
    opts = dict(seed=3, buffer_tokens=2048, holdout_tokens=256, batch_contexts=8)
    calls = [0]

    def counted(ids: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return extract_layer(loaded.model, ids, 1, "residual")

    alone = LiveActivations(loaded.model, store, 1, "residual", extract=counted, **opts)
    shared = SharedExtraction(loaded.model, [(0, "residual"), (1, "residual")])
    pair = [LiveActivations(loaded.model, store, layer, "residual",
                            extract=shared.for_hook((layer, "residual")), **opts)
            for layer in (0, 1)]
    for _ in range(12):
        want = alone.next_batch(300)
        got = [src.next_batch(300) for src in pair]
        torch.testing.assert_close(got[1], want, rtol=0, atol=0)
        assert not torch.equal(got[0], got[1])
    torch.testing.assert_close(pair[1].holdout(), alone.holdout(), rtol=0, atol=0)
    pair[0].holdout()
    assert shared.forwards == calls[0]
    assert all(not queue for queue in shared.pending.values())


def _stop_inside_a_round() -> tuple[Callable[[int], str | None], list[int]]:
    """Stop the first time the group is heard twice in one step from step 10 on: inside the
    step, while a buffer round is extracted (``trainer.listening``)."""
    calls: dict[int, int] = {}
    at: list[int] = []

    def control(step: int) -> str | None:
        calls[step] = calls.get(step, 0) + 1
        if not at and step >= 10 and calls[step] == 2:
            at.append(step)
        return "stop" if at == [step] else None

    return control, at


@pytest.mark.parametrize("where", ["between steps", "inside a round"])
def test_a_stopped_group_resumes_exactly(base: TrainConfig, tmp_path: Path, where: str) -> None:
    runs = expand(base, {"layer": [0, 1], "seed": [0, 1]})
    names = unique_names(runs)
    data = tmp_path / "data"
    full = train_group(runs, [tmp_path / "full" / n for n in names], data_dir=data, device=CPU,
                       evaluate=False)
    part_dirs = [tmp_path / "part" / n for n in names]
    control, at = _stop_inside_a_round()
    if where == "between steps":
        control, at = (lambda s: "stop" if s == 20 else None), [20]
    stopped = train_group(runs, part_dirs, data_dir=data, device=CPU, evaluate=False,
                          callbacks=Callbacks(control=control))
    assert at and {r["steps"] for r in stopped["runs"]} == {at[0]}
    points = resume_points(part_dirs)
    assert points is not None and all(p.name == f"step_{at[0]:08d}.safetensors"
                                      for p in points)
    resumed = train_group(runs, part_dirs, data_dir=data, device=CPU, evaluate=False,
                          resume=points)
    for a, b, name in zip(full["runs"], resumed["runs"], names, strict=True):
        assert a["steps"] == b["steps"] == 30
        assert abs(a["fvu"] - b["fvu"]) < 1e-5, name
        wa = _weights(tmp_path / "full" / name)
        wb = _weights(tmp_path / "part" / name)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_a_group_stopped_while_it_replays_its_buffers_keeps_its_checkpoints(
        base: TrainConfig, tmp_path: Path) -> None:
    """A resumed group rebuilds each hook's buffer before its first step (``GroupTrainer.replay``);
    a stop heard between the batches of contexts of that replay ends the group at once: every
    member stops at the step it resumed, its checkpoint unchanged and still the newest (a later
    resume from it is exact: ``test_a_stopped_group_resumes_exactly``), nothing evaluated."""
    runs = expand(base, {"layer": [0, 1]})  # two hooks, one shared forward pass
    dirs = [tmp_path / n for n in unique_names(runs)]
    data = tmp_path / "data"
    train_group(runs, dirs, data_dir=data, device=CPU, evaluate=False,
                callbacks=Callbacks(control=lambda s: "stop" if s == 20 else None))
    points = resume_points(dirs)
    assert points is not None
    before = [p.read_bytes() for p in points]
    logs: list[str] = []
    out = train_group(runs, dirs, data_dir=data, device=CPU, evaluate=False, resume=points,
                      callbacks=Callbacks(control=lambda s: "stop", on_log=logs.append))
    # heard after the replay's first batch of contexts (the other forward: the sources' width)
    assert out["forwards"] == 2
    assert "Stop requested at step 20: finalising current weights." in logs
    for r, p in zip(out["runs"], points, strict=True):
        assert r["stopped"] and r["steps"] == 20 and r["checkpoint"] == str(p) and not r["eval"]
    assert [p.read_bytes() for p in points] == before and resume_points(dirs) == points


def test_a_resumed_group_rebuilds_each_buffer_once(base: TrainConfig, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming replays a live source's last two rounds (its buffer is not in the checkpoint).
    Every member of a group restored its shared source in turn: N SAEs on a hook, N replays
    (minutes each for a real model on a CPU). Now once per hook; the members' positions are
    checked to agree, and the run resumes exactly (``test_a_stopped_group_resumes_exactly``)."""
    from worker.engine.activations import LiveActivations

    runs = expand(base, {"layer": [0, 1], "k": [2, 4, 8]})  # three SAEs on each of two hooks
    dirs = [tmp_path / n for n in unique_names(runs)]
    data = tmp_path / "data"
    train_group(runs, dirs, data_dir=data, device=CPU, evaluate=False,
                callbacks=Callbacks(control=lambda s: "stop" if s == 20 else None))
    restored: list[tuple[int, int]] = []
    load = LiveActivations.load_state_dict

    def counted(self: LiveActivations, state: dict) -> None:
        restored.append((self.layer, int(state["round"])))
        load(self, state)

    monkeypatch.setattr(LiveActivations, "load_state_dict", counted)
    out = train_group(runs, dirs, data_dir=data, device=CPU, evaluate=False,
                      resume=resume_points(dirs))
    assert {r["steps"] for r in out["runs"]} == {30}
    assert sorted(layer for layer, _ in restored) == [0, 1]
    # Positions that disagree are refused with a sentence.
    from worker.engine.checkpoints import atomic_save, load_checkpoint

    points = resume_points(dirs)
    assert points is not None
    moved = tmp_path / "moved.safetensors"
    c = load_checkpoint(points[1])
    meta = dict(c.meta, data={**c.meta["data"], "offset": c.meta["data"]["offset"] + 1})
    atomic_save(dict(c.tensors), meta, moved)
    with pytest.raises(CheckpointError, match="hold different data positions for the SAEs "
                                              f"on layer {runs[1].layer} residual"):
        train_group(runs, dirs, data_dir=data, device=CPU, evaluate=False,
                    resume=[points[0], moved, *points[2:]])


def test_resume_points_fall_back_past_a_truncated_checkpoint(base: TrainConfig,
                                                             tmp_path: Path) -> None:
    runs = expand(base.replace(total_steps=20), {"k": [4, 8]})
    dirs = [tmp_path / n for n in unique_names(runs)]
    train_group(runs, dirs, data_dir=tmp_path / "data", device=CPU, evaluate=False)
    newest = dirs[1] / "checkpoints" / "step_00000020.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    skipped: list[Path] = []
    points = resume_points(dirs, on_skip=lambda path, exc: skipped.append(path))
    assert skipped == [newest]
    assert points is not None and [p.name for p in points] == ["step_00000010.safetensors"] * 2


def test_each_run_logs_only_its_own_report(base: TrainConfig, tmp_path: Path) -> None:
    """A group's result lines go to each member's own log (its ``on_log``), one each with its
    own figures; the group's log keeps the lines about the whole group."""
    runs = expand(base.replace(total_steps=10), {"k": [2, 4, 8]})
    dirs = [tmp_path / n for n in unique_names(runs)]
    group_log: list[str] = []
    member_logs: list[list[str]] = [[] for _ in runs]
    out = train_group(runs, dirs, data_dir=tmp_path / "data", device=CPU,
                      member_callbacks=[Callbacks(on_log=lines.append) for lines in member_logs],
                      log=group_log.append)
    assert any(m.startswith("Evaluating on held-out contexts") for m in group_log)
    assert not any("Report ready" in m for m in group_log), group_log
    results = set()
    for lines, values, folder in zip(member_logs, out["runs"], dirs, strict=True):
        report = json.loads((folder / "eval" / "report.json").read_text())
        mine = [m for m in lines if m.startswith("Report ready")]
        assert len(mine) == 1 and mine[0].startswith(
            f"Report ready: held-out FVU {report['fvu']:.4f}, L0 {report['l0']:.1f}, "
            f"{report['dead']} dead, {report['dense']} dense"), lines
        assert values["eval"]["fvu"] == report["fvu"]
        results.add(mine[0])
    assert len(results) == 3  # three SAEs, three results


def test_a_group_must_share_its_source_and_steps(base: TrainConfig, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="share total_steps"):
        train_group([base, base.replace(total_steps=5)], [tmp_path / "a", tmp_path / "b"],
                    data_dir=tmp_path, device=CPU)
    with pytest.raises(ConfigError, match="share context_size"):
        train_group([base, base.replace(context_size=64)], [tmp_path / "a", tmp_path / "b"],
                    data_dir=tmp_path, device=CPU)


def test_place_spreads_a_group_over_gpus(base: TrainConfig, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``gpus`` N in a group: SAE i on cuda:(i mod N), checked before any GPU is touched. (The
    training itself on several GPUs needs a machine with them: not run here.)"""
    from worker.engine.group import place
    from worker.engine.sweep import check_group, check_shared

    cfgs = [base.replace(k=k, gpus=2, device="auto") for k in (2, 4, 8)]
    assert place([base, base], CPU) == [base, base]  # gpus 1: as they are
    with pytest.raises(ConfigError, match="this group runs on cpu"):
        place(cfgs, CPU)
    with pytest.raises(ConfigError, match=r"GPUs \(2\) in a sweep .* not cpu"):
        check_group([c.replace(device="cpu") for c in cfgs])
    with pytest.raises(ConfigError, match="GPUs"):  # the worker's own check, on this CPU
        train_group([c.replace(device="cpu") for c in cfgs], [tmp_path / str(i) for i in
                                                              range(3)],
                    data_dir=tmp_path, device=CPU)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="CUDA sees 1"):
        place(cfgs, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    placed = place(cfgs, torch.device("cuda"))
    assert [c.device for c in placed] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [c.gpus for c in placed] == [1, 1, 1] and [c.k for c in placed] == [2, 4, 8]
    assert all(not c.errors() for c in placed)
    check_shared(placed)  # one kind of device: a group may span GPUs
    with pytest.raises(ConfigError, match="share device"):
        check_shared([placed[0], placed[1].replace(device="cpu")])


def test_memory_of_a_group_spread_over_gpus() -> None:
    from worker.engine.memory import estimate_memory, group_memory, placed_memory, split_group

    ests = [estimate_memory(576, 4608, device="cuda", model_params=135_000_000,
                            buffer_tokens=65_536) for _ in range(4)]
    hooks = [(15, "residual", None)] * 4
    whole = group_memory(ests, hooks)
    halves = placed_memory(ests, hooks, 2)
    assert placed_memory(ests, hooks, 1) == whole
    assert halves == group_memory(ests[:2], hooks[:2]) < whole
    budget = halves  # two SAEs per device fit, three do not
    assert split_group(ests, hooks, budget) == [[0, 1], [2, 3]]
    assert split_group(ests, hooks, budget, gpus=2) == [[0, 1, 2, 3]]
