"""Activation files and live extraction on a real tiny model over the bundled KJV corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.engine.activations import (
    ActivationFile,
    CachedActivations,
    LiveActivations,
    write_activation_file,
)
from worker.engine.config import TrainConfig
from worker.engine.corpora import build_token_store
from worker.engine.errors import DataError
from worker.engine.models import extract_layer, load_model
from worker.engine.trainer import Callbacks, Trainer

from .tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    loaded = load_model(str(make_tiny_model("llama", root / "llama")))
    store = build_token_store("kjv", loaded.tokenizer, root / "tokens", context_size=32,
                              max_tokens=32 * 300)
    return loaded, store


def _live(tiny, **kw):
    loaded, store = tiny
    opts = dict(seed=3, buffer_tokens=2048, holdout_tokens=256, batch_contexts=8)
    opts.update(kw)
    return LiveActivations(loaded.model, store, 1, "residual", **opts)


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_file_round_trip(tmp_path, dtype):
    x = torch.randn(1000, 24)
    n = write_activation_file(x.split(300), tmp_path / "a.safetensors", dtype=dtype,
                              meta={"model": "m", "layer": 3})
    f = ActivationFile(tmp_path / "a.safetensors")
    assert (n, f.n, f.d_in) == (1000, 1000, 24)
    assert f.meta == {"model": "m", "layer": 3}
    torch.testing.assert_close(f.rows(slice(0, 1000)), x.to(dtype).float())
    torch.testing.assert_close(f.rows(np.array([5, 7])), x[[5, 7]].to(dtype).float())
    # The file is a plain safetensors file that safetensors itself reads.
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "a.safetensors"))["activations"].shape == (1000, 24)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_activation_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ActivationFile(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="not a safetensors"):
        ActivationFile(bad)
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="no tensor named 'activations'.*other"):
        ActivationFile(tmp_path / "other.safetensors")
    good = tmp_path / "good.safetensors"
    write_activation_file([torch.randn(100, 8)], good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-64])
    with pytest.raises(DataError, match="truncated"):
        ActivationFile(truncated)


def test_cached_source_epochs_holdout_and_resume(tmp_path):
    x = torch.arange(1200, dtype=torch.float32)[:, None].repeat(1, 4)
    write_activation_file([x], tmp_path / "a.safetensors")
    src = CachedActivations(tmp_path / "a.safetensors", seed=1, holdout=100)
    assert src.n_train == 1100
    held = src.holdout()[:, 0].long().tolist()
    assert held == list(range(1100, 1200))
    epoch = torch.cat([src.next_batch(100) for _ in range(11)])[:, 0].long()
    assert sorted(epoch.tolist()) == list(range(1100))  # every training row once per epoch
    state = src.state_dict()
    after = [src.next_batch(64) for _ in range(3)]
    again = CachedActivations(tmp_path / "a.safetensors", seed=1, holdout=100)
    again.load_state_dict(state)
    for a, b in zip(after, [again.next_batch(64) for _ in range(3)], strict=True):
        assert torch.equal(a, b)
    other_seed = CachedActivations(tmp_path / "a.safetensors", seed=2, holdout=100)
    assert not torch.equal(other_seed.next_batch(100), CachedActivations(
        tmp_path / "a.safetensors", seed=1, holdout=100).next_batch(100))


# ---------------------------------------------------------------------------- live extraction
def test_live_filters_position0_special_tokens_and_outliers(tiny):
    loaded, store = tiny
    src = _live(tiny, max_epochs=1, holdout_tokens=0)
    total = 0
    while True:
        try:
            total += src.next_batch(500).shape[0]
        except StopIteration:
            break
    s = src.stats
    assert s.seen == store.n_contexts * store.context_size
    assert s.position0 == store.n_contexts
    # Separator tokens between verses are special tokens: they were excluded.
    ids = np.asarray(store.contexts)[:, 1:]
    assert s.special == int(np.isin(ids, store.special_ids).sum()) > 0
    assert total == s.kept == s.seen - s.position0 - s.special - s.outliers

    strict = _live(tiny, max_epochs=1, holdout_tokens=0, outlier_factor=1.0)
    kept = strict.next_batch(400)
    assert strict.stats.outliers > 0
    assert kept.norm(dim=1).max() <= strict.median * 1.0 * 1.5


def test_live_batches_mix_many_contexts(tiny):
    loaded, store = tiny
    src = _live(tiny, holdout_tokens=0)
    batch = src.next_batch(64)
    # Identify the context of each served vector by matching it against a direct extraction.
    ids = torch.from_numpy(np.asarray(store.contexts, dtype=np.int64))
    ref = torch.cat([extract_layer(loaded.model, ids[i:i + 50], 1) for i in
                     range(0, len(ids), 50)]).float()
    ctx_of = torch.arange(len(ids))[:, None].expand(-1, ids.shape[1]).reshape(-1)
    flat = ref.reshape(-1, ref.shape[-1])
    nearest = torch.cdist(batch, flat).argmin(dim=1)
    assert torch.allclose(flat[nearest], batch, atol=1e-4)
    assert len(set(ctx_of[nearest].tolist())) >= 30  # 64 vectors from at least 30 contexts


def test_live_stream_resumes_exactly(tiny):
    a = _live(tiny)
    for _ in range(7):  # cross a few buffer rounds
        a.next_batch(300)
    state = a.state_dict()
    expected = [a.next_batch(300) for _ in range(6)]
    b = _live(tiny)
    b.load_state_dict(state)
    for want, got in zip(expected, [b.next_batch(300) for _ in range(6)], strict=True):
        torch.testing.assert_close(got, want)


def _drain(src, n_batches, n=300):
    return [src.next_batch(n) for _ in range(n_batches)]


def test_live_budget_extracts_only_what_the_run_needs(tiny):
    full = _live(tiny, holdout_tokens=0)
    want = torch.cat(_drain(full, 10))  # rounds serving 512, 1,024, 1,024 and 1,024
    budget = _live(tiny, holdout_tokens=0)
    budget.expect(3000)
    got = torch.cat(_drain(budget, 10))
    assert got.shape[0] == 3000
    # Round 2 is the budget's last (952 more after the 512 kept back): it serves all it
    # extracts; rounds 0 and 1 are as without a budget.
    torch.testing.assert_close(got[:1536], want[:1536])
    assert not torch.allclose(got[1536:], want[1536:3000])
    # The last round extracted only what was still needed (whole batches of 8 contexts).
    assert 3000 <= budget.stats.kept < 3000 + 8 * 31
    assert full.stats.kept >= 3000 + 512
    # Asked for more than it expected, the stream goes on with full rounds.
    assert budget.next_batch(300).shape[0] == 300
    assert budget.given == 3300


def test_live_filter_counts_are_the_training_streams(tiny):
    src = _live(tiny)
    src.expect(600)
    _drain(src, 2)
    counts = src.stats.to_dict()
    assert counts["kept"] >= 600
    src.sample(500)
    src.holdout()
    assert src.stats.to_dict() == counts  # initialisation sample and held-out not counted


def test_live_budget_stream_resumes_exactly_inside_the_last_round(tiny):
    a = _live(tiny)
    a.expect(3000)
    _drain(a, 9)  # 2,700: inside the last round (it began at 1,536)
    state = a.state_dict()
    expected = _drain(a, 2)  # the budget's last 300, then 300 beyond it
    b = _live(tiny)
    b.expect(3000)
    b.load_state_dict(state)
    for want, got in zip(expected, _drain(b, 2), strict=True):
        torch.testing.assert_close(got, want)
    assert b.given == a.given == 3300


def test_live_state_from_before_budgets_replays_full_rounds(tiny):
    a = _live(tiny)  # as a run without a budget went (the stream of older checkpoints)
    _drain(a, 8)
    state = a.state_dict()
    del state["given"]
    state["prev_start"] = state["prev_start"][:2]
    expected = _drain(a, 3)
    b = _live(tiny)
    b.expect(3000)
    b.load_state_dict(state)
    assert b.budget is None
    for want, got in zip(expected, _drain(b, 3), strict=True):
        torch.testing.assert_close(got, want)


def test_live_holdout_is_disjoint_from_training(tiny):
    loaded, store = tiny
    src = _live(tiny, holdout_tokens=256)
    assert len(src.holdout_ids) == math.ceil(256 / 31)
    assert src.holdout_ids.min() >= src.n_train_ctx
    assert src.holdout().shape[1] == loaded.info.hidden_size


def test_live_training_resume_matches_uninterrupted(tiny, tmp_path):
    loaded, store = tiny
    cfg = TrainConfig(model="tiny", dataset="kjv", layer=1, k=4, expansion_factor=4,
                      batch_size=128, total_steps=30, log_every=5, auto_save_interval=10,
                      eval_tokens=256, buffer_tokens=2048)

    def run(out, resume=None, control=None):
        rows = []
        src = _live(tiny)
        cb = Callbacks(on_metrics=rows.append, control=control or (lambda s: None))
        return Trainer(cfg, src, out, callbacks=cb).fit(resume=resume), rows

    full, full_rows = run(tmp_path / "full")
    run(tmp_path / "part", control=lambda s: "stop" if s == 20 else None)
    resumed, rows = run(tmp_path / "part",
                        resume=tmp_path / "part" / "checkpoints" / "step_00000020.safetensors")
    assert [r["step"] for r in rows] == [25, 30]
    for a, b in zip(full_rows[-2:], rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4)


def _heard_inside_a_round(answer, from_step=10):
    """A caller that answers ``answer(step)`` the first time it is heard inside a step (a live
    source's round being extracted: a second call at the same step) from ``from_step`` on."""
    calls: dict[int, int] = {}
    state: dict = {"step": None}

    def control(step):
        calls[step] = calls.get(step, 0) + 1
        if state["step"] is None and step >= from_step and calls[step] == 2:
            state["step"] = step
        return answer(step) if state["step"] == step else None

    return control, state


def _live_run(tiny, cfg, out, *, resume=None, control=None, logs=None, src=None):
    rows: list[dict] = []
    src = src or _live(tiny)
    cb = Callbacks(on_metrics=rows.append, on_log=(logs if logs is not None else []).append,
                   control=control or (lambda s: None), pause_poll_s=0.01)
    trainer = Trainer(cfg, src, out, callbacks=cb)
    return trainer, trainer.fit(resume=resume), rows, src


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "saelens" / "sae_weights.safetensors"))


LIVE_CFG = dict(model="tiny", dataset="kjv", layer=1, k=4, expansion_factor=4, batch_size=128,
                total_steps=30, log_every=1, auto_save_interval=0, eval_tokens=256,
                buffer_tokens=2048)


def test_a_stop_heard_inside_a_buffer_round_ends_the_run_and_resumes_exactly(tiny, tmp_path):
    """A round is extracted inside the step that needs it; a stop heard between its batches of
    contexts ends the run there, and the final checkpoint records the data position from
    before that step's batch, so resuming gives the uninterrupted run's weights."""
    cfg = TrainConfig(**LIVE_CFG)
    _, _, full_rows, _ = _live_run(tiny, cfg, tmp_path / "full")
    control, state = _heard_inside_a_round(lambda s: "stop")
    logs: list[str] = []
    _, part, _, src = _live_run(tiny, cfg, tmp_path / "part", control=control, logs=logs)
    stop = state["step"]  # heard a second time in one step: inside its round's extraction
    assert stop is not None and part.stopped and part.steps == stop
    assert any(f"Stop requested at step {stop}" in m for m in logs)
    path = tmp_path / "part" / "checkpoints" / f"step_{stop:08d}.safetensors"
    # The run's filter counts are the checkpoint's: the abandoned round's are not in them.
    from worker.engine.checkpoints import load_checkpoint

    assert part.filtered == load_checkpoint(path).meta["data"]["stats"] == src.stats.to_dict()
    _, resumed, rows, _ = _live_run(tiny, cfg, tmp_path / "part", resume=path)
    assert [r["step"] for r in rows] == list(range(stop + 1, 31))
    for a, b in zip(full_rows[stop:], rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a, b)
    for key, want in _final_weights(tmp_path / "full").items():
        torch.testing.assert_close(_final_weights(tmp_path / "part")[key], want)


def test_a_pause_heard_inside_a_buffer_round_saves_the_step_and_waits(tiny, tmp_path):
    """Paused while a round is extracted: the pause checkpoint is saved at once (as of the
    step's start), the wait is not training time, and the run then goes on unchanged."""
    import time

    cfg = TrainConfig(**LIVE_CFG)
    _, _, full_rows, _ = _live_run(tiny, cfg, tmp_path / "full")
    wait_s = 2.0
    began: list[float] = []

    def answer(step):
        began.append(began[0] if began else time.monotonic())
        return "pause" if time.monotonic() - began[0] < wait_s else None

    control, state = _heard_inside_a_round(answer)
    logs: list[str] = []
    _, paused, rows, _ = _live_run(tiny, cfg, tmp_path / "paused", control=control, logs=logs)
    step = state["step"]
    assert step is not None and not paused.stopped and paused.steps == 30
    assert f"Paused at step {step} (during activation extraction)." in logs
    assert any(m.startswith(f"Checkpoint saved at step {step} (pause") for m in logs)
    # The step that held the pause took well under the wait in training time.
    assert rows[step]["step"] == step + 1 and rows[step]["tokens_per_s"] > 128 / (wait_s / 2)
    for a, b in zip(full_rows, rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a, b)
    # The pause checkpoint replays the step it paused in.
    path = tmp_path / "paused" / "checkpoints" / f"step_{step:08d}.safetensors"
    _, _, again, _ = _live_run(tiny, cfg, tmp_path / "again", resume=path)
    for a, b in zip(full_rows[step:], again, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a, b)


def test_a_save_heard_inside_a_buffer_round_checkpoints_the_step_it_is_in(tiny, tmp_path):
    """"Save now" while a round is extracted: a manual checkpoint at that step at once, which a
    resume replays exactly; the run itself goes on unchanged."""
    cfg = TrainConfig(**LIVE_CFG)
    _, _, full_rows, _ = _live_run(tiny, cfg, tmp_path / "full")
    control, state = _heard_inside_a_round(lambda s: "save")
    logs: list[str] = []
    _, saved, rows, _ = _live_run(tiny, cfg, tmp_path / "saved", control=control, logs=logs)
    step = state["step"]
    assert step is not None and saved.steps == 30
    assert any(m.startswith(f"Checkpoint saved at step {step} (manual") for m in logs)
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
    path = tmp_path / "saved" / "checkpoints" / f"step_{step:08d}.safetensors"
    _, _, again, _ = _live_run(tiny, cfg, tmp_path / "again", resume=path)
    for a, b in zip(full_rows[step:], again, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a, b)
    for key, want in _final_weights(tmp_path / "full").items():
        torch.testing.assert_close(_final_weights(tmp_path / "again")[key], want)


# ---------------------------------------------------------------------------- heard while resuming
@pytest.fixture(scope="module")
def resumable(tiny, tmp_path_factory):
    """The uninterrupted run's metrics rows and folder, and the checkpoint at step 20 of the
    same run stopped there (resuming from it replays two buffer rounds)."""
    root = tmp_path_factory.mktemp("resumable")
    cfg = TrainConfig(**LIVE_CFG)
    _, _, full_rows, _ = _live_run(tiny, cfg, root / "full")
    _live_run(tiny, cfg, root / "part", control=lambda s: "stop" if s == 20 else None)
    return full_rows, root / "full", root / "part" / "checkpoints" / "step_00000020.safetensors"


def _counted(tiny):
    """A live source whose model forwards (one per batch of contexts) are counted."""
    loaded, _ = tiny
    forwards = [0]

    def extract(ids):
        forwards[0] += 1
        return extract_layer(loaded.model, ids, 1, "residual")

    src = _live(tiny, extract=extract)
    forwards[0] = 0  # (the source ran one to learn its width)
    return src, forwards


def test_a_stop_heard_while_a_resume_replays_its_buffer_ends_the_run_at_once(
        tiny, tmp_path, resumable):
    """Resuming a live run re-extracts the two buffer rounds before its checkpoint (minutes on
    a CPU for a real model); a stop heard between their batches of contexts ends the run there:
    nothing learnt, the checkpoint it resumed from stays the final one, unchanged (no half-built
    buffer's data position, no evaluation of it), and a later resume from it is exact."""
    from worker.engine.checkpoints import load_checkpoint

    full_rows, full, path = resumable
    before = path.read_bytes()
    cfg = TrainConfig(**LIVE_CFG)
    src, forwards = _counted(tiny)
    logs: list[str] = []
    _, stopped, rows, _ = _live_run(tiny, cfg, tmp_path / "stopped", resume=path, src=src,
                                    control=lambda s: "stop", logs=logs)
    assert forwards[0] == 1  # heard after the replay's first batch of contexts
    assert stopped.stopped and stopped.steps == 20 and rows == []
    assert "Stop requested at step 20: finalising current weights." in logs
    assert stopped.checkpoint == str(path) and path.read_bytes() == before
    assert not (tmp_path / "stopped" / "checkpoints").exists()
    assert stopped.eval == {} and math.isnan(stopped.fvu)
    assert stopped.filtered == load_checkpoint(path).meta["data"]["stats"]
    assert (tmp_path / "stopped" / "saelens" / "sae_weights.safetensors").is_file()
    _, resumed, rows, _ = _live_run(tiny, cfg, tmp_path / "again", resume=path)
    assert resumed.steps == 30 and [r["step"] for r in rows] == list(range(21, 31))
    _assert_continues_the_full_run(full_rows, full, rows, tmp_path / "again")


def _assert_continues_the_full_run(full_rows, full, rows, out) -> None:
    """A run resumed at step 20 logs the uninterrupted run's losses from there on and (``out``
    given) ends with its final weights."""
    for a, b in zip(full_rows[20:], rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a, b)
    if out is not None:
        for key, want in _final_weights(full).items():
            torch.testing.assert_close(_final_weights(out)[key], want)


def test_a_pause_heard_while_a_resume_replays_its_buffer_waits_there(tiny, tmp_path, resumable):
    """Paused while the resume replays its buffer: the run waits there (no checkpoint: nothing
    is new since the one it resumes), and once resumed it gives the uninterrupted run's
    losses and weights."""
    full_rows, full, path = resumable
    cfg = TrainConfig(**LIVE_CFG)
    src, forwards = _counted(tiny)
    heard: list[int] = []

    def control(step):
        heard.append(forwards[0])
        return "pause" if len(heard) <= 3 else None

    logs: list[str] = []
    _, resumed, rows, _ = _live_run(tiny, cfg, tmp_path / "paused", resume=path, src=src,
                                    control=control, logs=logs)
    assert heard[:3] == [1, 1, 1]  # paused after the replay's first batch of contexts
    assert "Paused at step 20 (while resuming: rebuilding the activation buffer)." in logs
    assert "Resumed at step 20." in logs
    assert not any(m.startswith("Checkpoint saved at step 20") for m in logs)
    assert not resumed.stopped and resumed.steps == 30
    assert [r["step"] for r in rows] == list(range(21, 31))
    _assert_continues_the_full_run(full_rows, full, rows, tmp_path / "paused")


def test_a_save_heard_while_a_resume_replays_its_buffer_has_nothing_to_write(
        tiny, tmp_path, resumable):
    """"Save now" while the resume replays its buffer: the newest checkpoint is the one being
    resumed, so nothing is written; the replay and the run go on unchanged."""
    full_rows, _, path = resumable
    cfg = TrainConfig(**LIVE_CFG)
    src, forwards = _counted(tiny)
    heard: list[int] = []

    def control(step):
        heard.append(forwards[0])
        return "save" if len(heard) == 1 else None

    logs: list[str] = []
    _, resumed, rows, _ = _live_run(tiny, cfg, tmp_path / "saved", resume=path, src=src,
                                    control=control, logs=logs)
    assert heard[0] == 1
    assert ("Save requested at step 20 (while resuming: rebuilding the activation buffer): "
            "nothing new to save, the newest checkpoint is this step's.") in logs
    assert not any(m.startswith("Checkpoint saved at step 20") for m in logs)
    assert resumed.steps == 30
    _assert_continues_the_full_run(full_rows, None, rows, None)
