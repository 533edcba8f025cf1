"""``sae-studio sweep``: lists of values become runs trained together on a real tiny model; the
folders, sweep.json and the final JSON line; one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.cli import main

from .engine.tiny_models import make_tiny_model
from .test_cli import _fails_cleanly, _last_json


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("sweep-model") / "llama")


def _common(tiny: Path, data: Path) -> list[str]:
    return ["--data-dir", str(data), "sweep", "--model", str(tiny), "--dataset", "kjv",
            "--context-size", "32", "--max-tokens", "9600", "--expansion-factor", "4",
            "--batch-size", "128", "--total-steps", "10", "--eval-tokens", "256",
            "--buffer-tokens", "2048", "--device", "cpu"]


def test_a_two_layer_sweep_writes_a_train_folder_per_run(tiny: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    rc = main(_common(tiny, tmp_path / "data") + [
        "--layer", "0,1", "--encoder-type", "topk,standard", "--k", "4,8", "--l1-alpha", "2",
        "--out", str(out), "--metrics-jsonl", str(tmp_path / "m.jsonl")])
    assert rc == 0
    result = _last_json(capsys.readouterr().out)
    names = [r["name"] for r in result["runs"]]
    assert names == ["L0-topk-k4-x4-s0", "L0-topk-k8-x4-s0", "L0-standard-a2-x4-s0",
                     "L1-topk-k4-x4-s0", "L1-topk-k8-x4-s0", "L1-standard-a2-x4-s0"]
    assert set(result) == {"runs", "tokens", "tokens_per_s", "wall_s"}
    assert result["tokens"] == 10 * 128 and result["tokens_per_s"] > 0
    for run in result["runs"]:
        folder = out / run["name"]
        assert Path(run["out"]) == folder
        assert {p.name for p in folder.iterdir()} >= {"checkpoints", "saelens", "eval"}
        assert run["fvu"] is not None and run["ce_loss_recovered"] is not None
        assert run["latent_dim"] == 128 and run["learning_rate"] > 0
        if run["encoder_type"] == "standard":
            assert run["k"] is None and run["l1_alpha"] == 2.0
        else:
            assert run["l1_alpha"] is None and run["k"] in (4, 8)
        assert run["l0_coef"] is None
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in saved["runs"]] == names
    assert saved["result"] == result
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {row["run"] for row in rows} == set(names)


def test_runs_from_a_toml_file_and_resume(tiny: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text('layer = 1\nseed = [0, 1]\n\n[[runs]]\nk = 4\n\n[[runs]]\nk = 8\n'
                      'expansion-factor = 2\n')
    out = tmp_path / "sweep"
    argv = _common(tiny, tmp_path / "data") + ["--config", str(config), "--out", str(out),
                                               "--no-evaluate"]
    argv.remove("--expansion-factor")
    argv.remove("4")
    assert main(argv) == 0
    result = _last_json(capsys.readouterr().out)
    assert [r["name"] for r in result["runs"]] == [
        "L1-topk-k4-x8-s0", "L1-topk-k4-x8-s1", "L1-topk-k8-x2-s0", "L1-topk-k8-x2-s1"]
    assert all(r["measured_on"] == "heldout_vectors" for r in result["runs"])
    _fails_cleanly(capsys, argv, "already holds checkpoints")
    assert main([*argv, "--resume"]) == 0
    again = _last_json(capsys.readouterr().out)
    assert [r["fvu"] for r in again["runs"]] == [r["fvu"] for r in result["runs"]]


@pytest.mark.parametrize(("extra", "match"), [
    (["--batch-size", "64,128"], "batch_size cannot take several values in a sweep"),
    (["--k", "4,x"], "argument --k"),
    (["--layer", "0,9"], "Layer"),
    (["--config", "/nonexistent.toml"], "does not exist"),
])
def test_bad_sweeps_fail_in_one_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     extra: list[str], match: str) -> None:
    _fails_cleanly(capsys, _common(tiny, tmp_path / "data") + extra
                   + ["--out", str(tmp_path / "o")], match)
    assert not (tmp_path / "o").exists()


def test_a_small_memory_budget_trains_the_sweep_in_groups(tiny: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Four SAEs that do not fit the budget together train as groups, one after another, each
    exactly as it would alone in the sweep; sweep.json names the groups."""
    import torch

    from worker.engine.config import TrainConfig
    from worker.engine.pipeline import check_before_loading
    from worker.sweep_cli import memory_groups

    data = tmp_path / "data"
    cfgs = [TrainConfig(model=str(tiny), dataset="kjv", layer=1, k=k, expansion_factor=4,
                        batch_size=128, total_steps=10, buffer_tokens=2048, eval_tokens=256,
                        context_size=32, max_tokens=9600, device="cpu")
            for k in (2, 4, 8, 16)]  # as _common's flags give them
    cpu = torch.device("cpu")
    d_in, n_layers = check_before_loading(cfgs[0], data)
    _, (whole,) = memory_groups(cfgs, d_in, n_layers, data, cpu, 2**40)
    _, (one,) = memory_groups(cfgs[:1], d_in, n_layers, data, cpu, 2**40)
    assert one < whole
    budget = (one + whole) / 2 / 2**30
    out = tmp_path / "sweep"
    rc = main(_common(tiny, data) + ["--layer", "1", "--k", "2,4,8,16", "--out", str(out),
                                     "--memory-budget", f"{budget:.9f}", "--no-evaluate"])
    assert rc == 0
    captured = capsys.readouterr()
    result = _last_json(captured.out)
    saved = json.loads((out / "sweep.json").read_text())
    assert 1 < len(saved["groups"]) < 4 and "groups, one after another" in captured.err
    assert sorted(n for g in saved["groups"] for n in g) == sorted(r["name"]
                                                                 for r in result["runs"])
    assert all(r["fvu"] is not None for r in result["runs"])
    assert set(result) == {"runs", "tokens", "tokens_per_s", "wall_s"}
