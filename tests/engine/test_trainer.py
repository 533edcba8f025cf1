"""The training loop on real tensors: quality, resume, OOM back-off, NaN, control, retention."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from worker.engine import checkpoints as ck
from worker.engine.activations import CachedActivations
from worker.engine.architectures.topk import TopKSAE
from worker.engine.config import TrainConfig
from worker.engine.errors import CheckpointError, ConfigError, TrainingError
from worker.engine.trainer import Callbacks, Trainer, get_lr

from .synthetic import train


def _cfg(acts: Path, **kw) -> TrainConfig:
    base = dict(activations=str(acts), k=4, expansion_factor=4, batch_size=256, total_steps=60,
                log_every=10, auto_save_interval=20, keep_every=40, eval_tokens=2000)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("encoder_type", ["topk", "standard"])
def test_training_learns_and_reports_metrics(acts, tmp_path, encoder_type):
    cfg = _cfg(acts, encoder_type=encoder_type, total_steps=150, l1_alpha=0.2, learning_rate=4e-3)
    _, result, rows = train(cfg, tmp_path)
    assert [r["step"] for r in rows] == list(range(10, 151, 10))
    keys = {"step", "tokens", "loss", "mse", "aux_loss", "l0", "l0_frac", "fvu",
            "explained_variance", "dead", "dense", "learning_rate", "grad_norm", "tokens_per_s",
            "peak_memory_mb"}
    assert keys <= set(rows[-1])
    assert rows[-1]["tokens"] == 150 * 256
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert result.fvu < 0.5, result
    assert result.eval["tokens"] == 2000
    if encoder_type == "topk":
        assert result.l0 == pytest.approx(4, abs=0.2)
    else:
        assert 0 < result.l0 < 4 * 32
    assert (tmp_path / "saelens" / "cfg.json").is_file()
    assert (tmp_path / "saelens" / "sparsity.safetensors").is_file()


def test_resume_continues_the_same_run(acts, tmp_path):
    cfg = _cfg(acts, total_steps=60, auto_save_interval=20, keep_every=20)
    _, full, full_rows = train(cfg, tmp_path / "full")
    # Interrupt at step 40: stop the second run there through the control callback.
    _, part, _ = train(cfg, tmp_path / "part", control=lambda step: "stop" if step == 40 else None)
    assert part.stopped and part.steps == 40
    ckpt = ck.checkpoint_path(tmp_path / "part" / "checkpoints", 40)
    _, resumed, resumed_rows = train(cfg, tmp_path / "part", resume=ckpt)
    assert resumed.steps == 60
    assert [r["step"] for r in resumed_rows] == [50, 60]
    for a, b in zip(full_rows[-2:], resumed_rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])
    assert math.isclose(full.fvu, resumed.fvu, rel_tol=1e-4)


def test_resume_with_target_l0_is_exact(acts, tmp_path):
    """The L0 controller's state (coefficient, L0 average) is in the checkpoint."""
    cfg = _cfg(acts, encoder_type="jumprelu", target_l0=8.0, l0_coef=0.02, total_steps=40,
               auto_save_interval=20, keep_every=20)
    _, full, full_rows = train(cfg, tmp_path / "full")
    _, part, _ = train(cfg, tmp_path / "part", control=lambda s: "stop" if s == 20 else None)
    assert part.steps == 20
    ckpt = ck.checkpoint_path(tmp_path / "part" / "checkpoints", 20)
    saved = ck.load_checkpoint(ckpt).prefixed("l0_control.")
    assert set(saved) == {"u", "ema", "prev_err", "observed"}
    assert int(saved["observed"]) == 20
    _, resumed, resumed_rows = train(cfg, tmp_path / "part", resume=ckpt)
    assert [r["step"] for r in resumed_rows] == [30, 40]
    for a, b in zip(full_rows[-2:], resumed_rows, strict=True):
        assert a["sparsity_coef"] == b["sparsity_coef"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
    assert math.isclose(full.l0, resumed.l0, rel_tol=1e-5)


def test_oom_halves_micro_batch_and_keeps_effective_batch(acts, tmp_path, monkeypatch):
    # (learning rate pinned: the float differences of summing four micro-batches instead of one
    # batch grow with it, and TopK's default tripled)
    cfg = _cfg(acts, total_steps=20, micro_batch_size=256, min_micro_batch=32,
               learning_rate=2e-3)
    logs: list[str] = []
    trainer_box = {}
    calls = {"n": 0}
    real_forward = TopKSAE.forward

    def flaky_forward(self, x, **kw):
        calls["n"] += 1
        if x.shape[0] > 64:  # behave as if only 64 vectors fit on the device
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, x, **kw)

    monkeypatch.setattr(TopKSAE, "forward", flaky_forward)
    src = CachedActivations(cfg.activations, seed=0, holdout=2000)
    t = Trainer(cfg, src, tmp_path, callbacks=Callbacks(on_log=logs.append))
    trainer_box["t"] = t
    result = t.fit()
    assert result.steps == 20 and result.tokens == 20 * 256
    assert t.micro == 64
    assert sum("micro-batch reduced" in m for m in logs) == 2
    # Same run, same data, same effective batch: the losses match an unconstrained run.
    monkeypatch.setattr(TopKSAE, "forward", real_forward)
    _, ref, _ = train(cfg, tmp_path / "ref")
    assert math.isclose(result.fvu, ref.fvu, rel_tol=1e-3)


def test_oom_below_minimum_fails_with_advice(acts, tmp_path, monkeypatch):
    def always_oom(self, x, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(TopKSAE, "forward", always_oom)
    cfg = _cfg(acts, total_steps=5, min_micro_batch=64)
    src = CachedActivations(cfg.activations, seed=0, holdout=2000)
    with pytest.raises(TrainingError, match="Reduce the latent dimension"):
        Trainer(cfg, src, tmp_path).fit()


@pytest.mark.parametrize(("log_every", "save_every", "nan_at", "stop_at", "last_good"), [
    (10, 20, 30, None, 20),  # found when the window is logged (step 40)
    (50, 5, 32, None, 30),  # found before the save at step 35, which never happens
    (50, 20, 30, 31, 20),  # found before the final save of a stopped run
])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(acts, tmp_path, monkeypatch, log_every,
                                                       save_every, nan_at, stop_at, last_good):
    cfg = _cfg(acts, total_steps=60, auto_save_interval=save_every, log_every=log_every)
    src = CachedActivations(cfg.activations, seed=0, holdout=2000)
    t = Trainer(cfg, src, tmp_path, callbacks=Callbacks(
        control=lambda step: "stop" if step == stop_at else None))
    real_next = src.next_batch

    def poisoned(n):
        batch = real_next(n)
        if t.step == nan_at:
            batch[0, 0] = float("nan")
        return batch

    monkeypatch.setattr(src, "next_batch", poisoned)
    with pytest.raises(TrainingError, match=f"loss became nan at step {nan_at}; .*"
                                            f"step_{last_good:08d}"):
        t.fit()
    saved = [s for s, _ in ck.list_checkpoints(tmp_path / "checkpoints")]
    assert max(saved) == last_good
    assert ck.load_checkpoint(ck.checkpoint_path(tmp_path / "checkpoints", last_good)).step \
        == last_good
    assert not (tmp_path / "saelens").exists()


_HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__",
               "__index__")
STEP_CODE = (str(Path(ck.__file__).with_name("trainer.py")),
             str(Path(ck.__file__).with_name("kernels.py")),
             str(Path(ck.__file__).with_name("l0_control.py")),
             str(Path(ck.__file__).with_name("architectures")))
"""The code of a training step (the data source reads host tensors, which never wait)."""


@pytest.mark.parametrize(("encoder_type", "target_l0"), [
    ("topk", None), ("batchtopk", None), ("standard", None), ("jumprelu", None),
    ("matryoshka_batchtopk", None), ("standard", 8.0), ("jumprelu", 8.0)])
def test_steps_read_tensors_on_the_host_only_when_logging(acts, tmp_path, monkeypatch,
                                                          encoder_type, target_l0):
    """On a GPU each read of a tensor's value waits for the device. The trainer and the SAE
    types read none during a step (statistics stay on the device) except on the steps that
    log; reads are counted where that code calls them (torch's own code is not counted)."""
    reads: dict[int, list[str]] = {}
    at = {"step": -1}  # the step being trained (set when the trainer polls between steps)

    def counting(name: str):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(STEP_CODE):
                where = f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
                reads.setdefault(at["step"], []).append(where)
            return real(self, *args, **kwargs)
        return read

    cfg = _cfg(acts, encoder_type=encoder_type, total_steps=25, log_every=10,
               auto_save_interval=0, l1_alpha=0.2, l0_coef=0.02, target_l0=target_l0)
    src = CachedActivations(cfg.activations, seed=0, holdout=2000)
    t = Trainer(cfg, src, tmp_path, callbacks=Callbacks(control=lambda s: at.update(step=s)))
    t.sae.sparse_max_density = 0.0  # standard, jumprelu: the dense step, as on a GPU
    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    t.fit()
    assert reads.get(-1), "initialisation reads the data sample's scale"
    logging = {9, 19, 24}  # log_every 10 of 25 steps; the last also evaluates and exports
    assert {s: r for s, r in reads.items() if s >= 0 and s not in logging} == {}
    assert all(reads.get(s) for s in logging)


def test_pause_save_and_stop_are_honoured_between_steps(acts, tmp_path):
    seen = []
    script = {5: "save", 8: "pause", 12: "stop"}
    state = {"paused_polls": 0}

    def control(step):
        seen.append(step)
        if step == 8 and state["paused_polls"] < 3:
            state["paused_polls"] += 1
            return "pause"
        return script.get(step) if step != 8 else None

    cfg = _cfg(acts, total_steps=50, auto_save_interval=0)
    logs: list[str] = []
    _, result, _ = train(cfg, tmp_path, control=control, on_log=logs.append, pause_poll_s=0.01)
    assert result.stopped and result.steps == 12
    assert state["paused_polls"] == 3
    steps = [s for s, _ in ck.list_checkpoints(tmp_path / "checkpoints")]
    assert 5 in steps and 12 in steps  # saved on demand (protected), final
    assert any("Checkpoint saved at step 8 (pause" in m for m in logs)
    assert any("Paused at step 8" in m for m in logs)
    assert (tmp_path / "saelens" / "sae_weights.safetensors").is_file()


def test_checkpoint_log_gives_the_file_size_in_mib(acts, tmp_path):
    """The log's size is the file's bytes / 2**20, named MiB (the checkpoint table's unit)."""
    cfg = _cfg(acts, expansion_factor=64, total_steps=20, auto_save_interval=10)
    logs: list[str] = []
    saved: list[dict] = []
    train(cfg, tmp_path, on_log=logs.append, on_checkpoint=saved.append)
    lines = [m for m in logs if m.startswith("Checkpoint saved at step")]
    assert len(lines) == len(saved) >= 2
    for line, info in zip(lines, saved, strict=True):
        assert info["size_bytes"] > 2**20  # large enough for MB and MiB to differ at .1f
        assert line.startswith(f"Checkpoint saved at step {info['step']} (")
        assert line.endswith(f", {info['size_bytes'] / 2**20:.1f} MiB)."), line


def test_retention_keeps_first_last_every_nth_and_best(tmp_path):
    d = tmp_path / "ckpts"
    for step in (10, 20, 30, 40, 50, 60, 70):
        ck.atomic_save({"x": torch.zeros(1)}, {"step": step, "config": {}},
                       ck.checkpoint_path(d, step))
    deleted = ck.apply_retention(d, keep_every=30, best_step=50)
    assert sorted(s for s, _ in ck.list_checkpoints(d)) == [10, 30, 50, 60, 70]
    assert len(deleted) == 2


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    from worker.engine import checkpoints as mod

    target = tmp_path / "step_00000001.safetensors"
    ck.atomic_save({"a": torch.ones(3)}, {"step": 1, "config": {}}, target)
    before = target.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", crash)
    with pytest.raises(OSError):
        ck.atomic_save({"a": torch.zeros(3)}, {"step": 1, "config": {}}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_checkpoint_is_flat_safetensors_with_json_metadata(acts, tmp_path):
    cfg = _cfg(acts, total_steps=20, auto_save_interval=10)
    train(cfg, tmp_path)
    c = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "checkpoints", 20))
    assert {"sae.W_enc", "sae.W_dec", "sae.b_enc", "sae.b_dec", "stats.since_fired",
            "rng.torch"} <= set(c.tensors)
    assert any(k.startswith("optim.W_enc.exp_avg") for k in c.tensors)
    assert c.meta["config"]["k"] == 4 and c.meta["data"]["position"] == 20 * 256
    assert c.meta["scale"] > 0


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(acts, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.load_checkpoint(bad)
    cfg = _cfg(acts, total_steps=10, auto_save_interval=0)
    train(cfg, tmp_path / "a")
    other = _cfg(acts, total_steps=10, expansion_factor=2)
    src = CachedActivations(other.activations, holdout=2000)
    with pytest.raises(CheckpointError, match="32 -> 128"):
        Trainer(other, src, tmp_path / "b").fit(
            resume=ck.latest_checkpoint(tmp_path / "a" / "checkpoints"))


def test_lr_schedules_warm_up_and_decay():
    cfg = TrainConfig(activations="x", total_steps=100, lr_warmup_steps=10, lr_decay_frac=0.2)
    assert get_lr(0, cfg, 1.0) == pytest.approx(0.1)
    assert get_lr(50, cfg, 1.0) == 1.0
    assert get_lr(90, cfg, 1.0) == pytest.approx(0.5)
    lin = cfg.replace(lr_schedule="linear")
    cos = cfg.replace(lr_schedule="cosine")
    assert get_lr(55, lin, 1.0) == pytest.approx(0.5)
    assert get_lr(55, cos, 1.0) == pytest.approx(0.5)
    assert get_lr(99, cos, 1.0) < 0.01


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="either an activation file"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match="k \\(999\\) cannot exceed"):
        TrainConfig(activations="a", k=999, latent_dim=64).validate(d_in=8)
    with pytest.raises(ConfigError, match="Layer 7 is out of range"):
        TrainConfig(model="m", dataset="d", layer=7).validate(n_layers=6)
    with pytest.raises(ConfigError, match="Encoder type 'gated' is not available"):
        TrainConfig(activations="a", encoder_type="gated").validate()
