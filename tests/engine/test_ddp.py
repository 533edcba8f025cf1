"""One SAE on two processes (torch.distributed, gloo on the CPU) against one process with the
same global batch: the same SAE (FVU, L0, tokens), identical ranks, exact resume; the real
``torchrun -m worker train`` path on an activation file and on live extraction from a tiny
model; the bad combinations as one-line errors.

The two-rank trainings of the engine tests run in one ``torch.multiprocessing`` spawn (the
``two_ranks`` fixture: several jobs in a row, so the processes start once); each rank writes
its results to a JSON file the tests read. Every process uses one thread.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from worker.cli import main
from worker.engine import checkpoints as ck
from worker.engine import distributed
from worker.engine.activations import CachedActivations, LiveActivations
from worker.engine.config import TrainConfig
from worker.engine.corpora import build_token_store
from worker.engine.distributed import Dist
from worker.engine.errors import CheckpointError, ConfigError
from worker.engine.models import load_model
from worker.engine.trainer import Callbacks, Trainer

from .synthetic import train
from .tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TYPES = {
    "topk": {},
    "batchtopk": {},  # running threshold (min kept activation) and AuxK masks reduced
    "jumprelu": {"target_l0": 8.0, "l0_coef": 0.02},  # the L0 controller's L0 reduced
}
EXACT = {"encoder_type": "topk", "aux_k_coef": 0.0}
"""A loss linear in the batch (TopK without AuxK, whose term is normalised per shard as per
micro-batch): two ranks then take one process's steps up to float rounding."""
STEPS, STOP = 60, 30


def _cfg(acts: Path, **kw: Any) -> TrainConfig:
    base = dict(activations=str(acts), k=4, expansion_factor=4, batch_size=256,
                total_steps=STEPS, log_every=10, auto_save_interval=STOP, keep_every=STOP,
                eval_tokens=2000, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(module: torch.nn.Module) -> str:
    """A hash of every parameter's and buffer's bytes (equal only when bit-identical)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rank_main(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out: str) -> None:
    """One rank (``torch.multiprocessing.spawn``): train each job in turn, as torchrun's
    process would, and write [{result, rows, digest}] to ``out.<rank>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = distributed.setup(Dist(rank, world, rank, world), torch.device("cpu"))
    results = []
    try:
        for job in jobs:
            cfg = TrainConfig.from_dict(job["cfg"])
            rows: list[dict[str, Any]] = []
            stop = job.get("stop_at")
            source = CachedActivations(cfg.activations, seed=cfg.seed, holdout=cfg.eval_tokens,
                                       rank=rank, world=world)
            trainer = Trainer(cfg, source, job["out"], dist=dist, callbacks=Callbacks(
                on_metrics=rows.append, control=lambda step, stop=stop: (
                    "stop" if step == stop else None)))
            result = trainer.fit(resume=job.get("resume"))
            results.append({"result": result.to_dict(), "rows": rows,
                            "digest": _digest(trainer.sae)})
    finally:
        distributed.teardown()
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))


def _spawn(jobs: list[dict[str, Any]], out: Path, world: int = 2,
           timeout: float = 240.0) -> list[list[dict[str, Any]]]:
    """Run ``jobs`` on ``world`` spawned ranks; each rank's results (bounded wait)."""
    ctx = mp.spawn(_rank_main, args=(world, _free_port(), jobs, str(out)), nprocs=world,
                   join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {world} ranks did not finish in {timeout} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(acts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two gloo ranks: a full run of each type in ``TYPES``; a topk run stopped at ``STOP``
    and resumed to ``STEPS``. Returns {"root", "jobs": {name: [rank 0's, rank 1's]}}."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [{"name": name, "cfg": _cfg(acts, encoder_type=name, **kw).to_dict(),
             "out": str(root / name)} for name, kw in TYPES.items()]
    jobs.append({"name": "exact", "cfg": _cfg(acts, **EXACT).to_dict(),
                 "out": str(root / "exact")})
    part = root / "part"
    cfg = _cfg(acts, encoder_type="topk").to_dict()
    jobs += [{"name": "part", "cfg": cfg, "out": str(part), "stop_at": STOP},
             {"name": "resumed", "cfg": cfg, "out": str(part),
              "resume": str(ck.checkpoint_path(part / "checkpoints", STOP))}]
    ranks = _spawn(jobs, root / "results")
    return {"root": root, "jobs": {job["name"]: [ranks[0][i], ranks[1][i]]
                                   for i, job in enumerate(jobs)}}


# ---------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("encoder_type", list(TYPES))
def test_two_ranks_train_the_same_sae_as_one_process(acts, tmp_path, two_ranks, encoder_type):
    cfg = _cfg(acts, encoder_type=encoder_type, **TYPES[encoder_type])
    _, one, one_rows = train(cfg, tmp_path)
    two, two_rows = (two_ranks["jobs"][encoder_type][0][k] for k in ("result", "rows"))
    assert two["steps"] == one.steps == STEPS
    assert two["tokens"] == one.tokens == STEPS * 256  # the global batch per step
    assert abs(two["fvu"] - one.fvu) < 0.01, (two["fvu"], one.fvu)
    assert two["l0"] == pytest.approx(one.l0, rel=0.05)
    # rank 0 reports the global batch's figures, at the same steps
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]
    assert [r["tokens"] for r in two_rows] == [r["tokens"] for r in one_rows]
    assert abs(two_rows[-1]["fvu"] - one_rows[-1]["fvu"]) < 0.02
    assert two_rows[-1]["l0"] == pytest.approx(one_rows[-1]["l0"], rel=0.1)
    assert abs(two_rows[-1]["dead"] - one_rows[-1]["dead"]) <= 0.1 * cfg.d_sae(32)
    # rank 0 alone evaluates and exports
    rank1 = two_ranks["jobs"][encoder_type][1]["result"]
    assert rank1["tokens"] == two["tokens"] and math.isnan(rank1["fvu"])
    assert (two_ranks["root"] / encoder_type / "saelens" / "cfg.json").is_file()


def test_without_auxk_two_ranks_take_the_single_process_steps(acts, tmp_path, two_ranks):
    """Float rounding only: the first steps agree to ~1e-8 of the loss; the rounding of
    summing two shards instead of one batch grows to ~2e-4 of it by step 60."""
    _, one, one_rows = train(_cfg(acts, **EXACT), tmp_path)
    two, two_rows = (two_ranks["jobs"]["exact"][0][k] for k in ("result", "rows"))
    assert math.isclose(one_rows[0]["loss"], two_rows[0]["loss"], rel_tol=1e-6)
    for a, b in zip(one_rows, two_rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=5e-4), (a["step"], a["loss"], b["loss"])
    assert abs(two["fvu"] - one.fvu) < 1e-4, (two["fvu"], one.fvu)  # with AuxK: 5e-3


def test_every_rank_holds_the_same_sae_after_every_run(two_ranks):
    for name, (rank0, rank1) in two_ranks["jobs"].items():
        assert rank0["digest"] == rank1["digest"], name


def test_two_rank_resume_equals_the_uninterrupted_run(two_ranks):
    jobs = two_ranks["jobs"]
    full, part, resumed = (jobs[n][0] for n in ("topk", "part", "resumed"))
    assert part["result"]["stopped"] and part["result"]["steps"] == STOP
    assert resumed["result"]["steps"] == STEPS
    assert resumed["result"]["tokens"] == full["result"]["tokens"]
    tail = [r for r in full["rows"] if r["step"] > STOP]
    assert [r["step"] for r in resumed["rows"]] == [r["step"] for r in tail]
    for a, b in zip(tail, resumed["rows"], strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
    assert math.isclose(full["result"]["fvu"], resumed["result"]["fvu"], rel_tol=1e-5)
    assert resumed["digest"] == full["digest"]  # the same weights, bit for bit


def test_checkpoint_records_the_world_and_a_different_one_is_refused(acts, two_ranks, tmp_path):
    ckpt = ck.checkpoint_path(two_ranks["root"] / "part" / "checkpoints", STOP)
    meta = ck.load_checkpoint(ckpt).meta
    assert meta["world_size"] == 2 and len(meta["data_ranks"]) == 2
    assert meta["data"]["position"] == STOP * 256  # the global stream's position
    cfg = _cfg(acts)
    trainer = Trainer(cfg, CachedActivations(acts, holdout=cfg.eval_tokens), tmp_path)
    with pytest.raises(CheckpointError, match="on 2 process.*torchrun --nproc-per-node 2.*not 1"):
        trainer.fit(resume=ckpt)


# ---------------------------------------------------------------------------- sharding
def test_file_shards_are_the_single_process_batch(acts):
    one = CachedActivations(acts, seed=5, holdout=2000)
    shards = [CachedActivations(acts, seed=5, holdout=2000, rank=r, world=2) for r in (0, 1)]
    for _ in range(3):  # across an epoch boundary too: 18,000 rows train, 3 x 8,000 read
        whole = one.next_batch(8000)
        parts = [s.next_batch(4000) for s in shards]
        assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, whole.tolist()))
    assert shards[0].state_dict() == shards[1].state_dict() == one.state_dict()
    assert torch.equal(shards[1].sample(300), one.sample(300))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> tuple[Any, Any]:
    root = tmp_path_factory.mktemp("ddp-tiny")
    loaded = load_model(str(make_tiny_model("llama", root / "llama")))
    store = build_token_store("kjv", loaded.tokenizer, root / "tokens", context_size=32,
                              max_tokens=32 * 200)
    return loaded, store


def test_live_shards_split_each_epoch_and_share_the_sample(tiny_store):
    loaded, store = tiny_store
    opts = dict(seed=3, buffer_tokens=1024, holdout_tokens=256, batch_contexts=8)
    one = LiveActivations(loaded.model, store, 1, "residual", **opts)
    shards = [LiveActivations(loaded.model, store, 1, "residual", rank=r, world=2, **opts)
              for r in (0, 1)]
    order = one._ctx_ids(0, one.n_train_ctx)
    for r, shard in enumerate(shards):
        assert list(shard._ctx_ids(0, shard.epoch_len)) == list(order[r::2])
    assert shards[0].epoch_len + shards[1].epoch_len == one.n_train_ctx
    torch.testing.assert_close(shards[1].sample(200), one.sample(200))
    assert not torch.equal(shards[0].next_batch(64), shards[1].next_batch(64))


# ---------------------------------------------------------------------------- bad input
def test_torchrun_environment_and_device_checks(monkeypatch):
    assert distributed.from_env({}) == Dist()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    dist = distributed.from_env(env)
    assert (dist.rank, dist.world_size, dist.enabled, dist.is_main) == (1, 2, True, False)
    with pytest.raises(ConfigError, match="Inconsistent"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="must divide evenly among the 2"):
        distributed.local_batch(255, dist)
    assert distributed.device_for(dist, torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="not on mps"):
        distributed.device_for(dist, torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes on this machine need as many GPUs.*sees 1"):
        distributed.device_for(dist, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.device_for(dist, torch.device("cuda")) == torch.device("cuda", 1)


def test_cli_refuses_a_bad_combination_in_one_line(acts, tmp_path, monkeypatch, capsys):
    """Checked before the process group starts: no hang waiting for the other rank."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    argv = ["train", "--activations", str(acts), "--out", str(tmp_path / "run")]
    for extra, match in ((["--batch-size", "255", "--device", "cpu"], "must divide evenly"),
                         (["--device", "cuda"], "CUDA"),
                         (["--gpus", "4", "--device", "cpu"], "--gpus 4 does not match the 2")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sae-studio: error: ") and match in err[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- torchrun -m worker
def _torchrun(args: list[str], cwd: Path, timeout: float = 180.0) -> dict[str, Any]:
    """``torchrun --standalone --nproc-per-node 2 -m worker train ARGS``: its last JSON line
    (rank 0's; the only one)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               SAE_STUDIO_DATA=str(cwd / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "worker", "train", *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 prints
    return json.loads(lines[0])


def _one_process(capsys, args: list[str], data: Path) -> dict[str, Any]:
    assert main(["--data-dir", str(data), "train", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_torchrun_cli_on_an_activation_file_matches_one_process(acts, tmp_path, capsys):
    args = ["--activations", str(acts), "--encoder-type", "batchtopk", "--k", "4",
            "--expansion-factor", "4", "--batch-size", "256", "--total-steps", "50",
            "--auto-save-interval", "25", "--eval-tokens", "2000", "--device", "cpu"]
    two = _torchrun(args + ["--out", str(tmp_path / "two"), "--metrics-jsonl",
                            str(tmp_path / "two.jsonl")], tmp_path)
    one = _one_process(capsys, args + ["--out", str(tmp_path / "one")], tmp_path / "data")
    assert two["tokens"] == one["tokens"] == 50 * 256
    assert abs(two["fvu"] - one["fvu"]) < 0.01, (two["fvu"], one["fvu"])
    assert two["l0"] == pytest.approx(one["l0"], rel=0.05)
    rows = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 50 and rows[-1]["tokens"] == 50 * 256  # rank 0's rows only
    final = ck.load_checkpoint(two["checkpoint"]).meta
    assert final["world_size"] == 2 and final["step"] == 50
    # resuming on one process is refused in one line
    assert main(["train", "--resume", str(tmp_path / "two"), "--total-steps", "60"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "torchrun --nproc-per-node 2" in err[-1] and len(err) == 1


def test_gpus_flag_starts_the_processes_itself(acts, tmp_path):
    """``train --gpus 2`` runs itself under torchrun: one JSON line, a two-process run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               SAE_STUDIO_DATA=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "train", "--gpus", "2", "--activations", str(acts),
         "--k", "4", "--expansion-factor", "4", "--batch-size", "256", "--total-steps", "20",
         "--eval-tokens", "1000", "--device", "cpu", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting 2 training processes" in proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["tokens"] == 20 * 256 and ck.load_checkpoint(out["checkpoint"]).meta[
        "world_size"] == 2


def test_torchrun_cli_live_extraction_from_a_tiny_model(tmp_path, capsys):
    """Each rank extracts its shard of the contexts; rank 0 builds the token store first,
    evaluates on held-out text and writes the report."""
    model = make_tiny_model("llama", tmp_path / "llama")
    args = ["--model", str(model), "--dataset", "kjv", "--max-tokens", "12000",
            "--context-size", "32", "--layer", "1", "--encoder-type", "topk", "--k", "4",
            "--expansion-factor", "4", "--batch-size", "256", "--total-steps", "40",
            "--buffer-tokens", "2048", "--eval-tokens", "512", "--device", "cpu"]
    two = _torchrun(args + ["--out", str(tmp_path / "two")], tmp_path)
    one = _one_process(capsys, args + ["--out", str(tmp_path / "one"), "--no-evaluate"],
                       tmp_path / "data")  # its fvu: the held-out vectors', as two's
    assert two["tokens"] == one["tokens"] == 40 * 256
    assert abs(two["fvu"] - one["fvu"]) < 0.05, (two["fvu"], one["fvu"])
    assert (tmp_path / "two" / "eval" / "report.json").is_file()
    assert two["eval"]["measured_on"] == "heldout_text"
    meta = ck.load_checkpoint(two["checkpoint"]).meta
    first, second = meta["data_ranks"]  # each rank's own stream position
    assert first["kind"] == second["kind"] == "live" and first != second
    # the filter counts reported are both ranks' extraction, summed
    assert two["filtered"] == {key: first["stats"][key] + second["stats"][key]
                               for key in first["stats"]}
    assert two["filtered"]["kept"] >= two["tokens"]
