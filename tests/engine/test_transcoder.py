"""Transcoders and skip transcoders: the MLP's input (``mlp_in``) read at the right module of
every tiny family, paired [x | y] activations from live extraction and files, training of every
encoder type against the target (FVU on the target, checked by hand from the export), exact
resumption, SAELens exports that SAELens loads with the same outputs, groups, and the refusals
of configs that make no sense."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.engine import checkpoints as ck
from worker.engine.activations import ActivationFile, CachedActivations
from worker.engine.config import TrainConfig
from worker.engine.errors import ConfigError
from worker.engine.export import export_checkpoint, load_saelens
from worker.engine.group import train_group
from worker.engine.models import extract_layers, find_blocks, load_model
from worker.engine.pipeline import check_before_loading, extract_to_file, train_and_evaluate
from worker.engine.trainer import Callbacks, Trainer

from .tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
CPU = torch.device("cpu")
ENCODERS = ("topk", "batchtopk", "matryoshka_batchtopk", "standard", "jumprelu")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("gpt2", tmp_path_factory.mktemp("tc") / "gpt2")


@pytest.fixture(scope="module")
def base(gpt2: Path) -> TrainConfig:
    return TrainConfig(model=str(gpt2), dataset="kjv", context_size=32, max_tokens=32 * 400,
                       layer=1, hook_point="mlp_in", target_hook_point="mlp_out", k=4,
                       expansion_factor=4, batch_size=128, total_steps=30, log_every=10,
                       auto_save_interval=10, keep_every=10, eval_tokens=512,
                       buffer_tokens=2048, seed=0)


@pytest.fixture(scope="module")
def pairs(base: TrainConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paired activation file (mlp_in -> mlp_out of layer 1) of 6,000 rows."""
    out = tmp_path_factory.mktemp("pairs") / "pairs.safetensors"
    extract_to_file(base, out, data_dir=tmp_path_factory.mktemp("data"), device=CPU,
                    max_tokens=6000)
    return out


def _file_cfg(pairs: Path, **kw) -> TrainConfig:
    values = dict(activations=str(pairs), hook_point="mlp_in", target_hook_point="mlp_out",
                  k=4, expansion_factor=4, batch_size=256, total_steps=40, log_every=10,
                  auto_save_interval=20, keep_every=20, eval_tokens=1000, seed=0)
    values.update(kw)
    return TrainConfig(**values)


# ---------------------------------------------------------------------------- hook points
@pytest.mark.parametrize("family,norm", [("gpt2", "ln_2"), ("llama", "post_attention_layernorm"),
                                         ("opt", "final_layer_norm"), ("qwen2", None),
                                         ("bert", None)])
def test_mlp_in_is_the_mlps_input_after_its_norm(tiny_dirs, family, norm) -> None:
    """mlp_in equals the output of the norm that feeds the MLP (read by a plain forward hook on
    that norm), and for GPT-2 the MLP applied to it gives mlp_out."""
    loaded = load_model(str(tiny_dirs[family]))
    assert "mlp_in" in loaded.info.hook_points
    model = loaded.model.eval()
    ids = torch.randint(3, 300, (2, 12))
    _, blocks = find_blocks(model)
    block = blocks[1]
    if family == "bert":  # the MLP (intermediate) reads the attention sub-layer's output
        norm_module = block.attention
    elif family == "qwen2":
        norm_module = block.post_attention_layernorm
    else:
        norm_module = getattr(block, norm)
    seen: list[torch.Tensor] = []
    handle = norm_module.register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            mlp_in, mlp_out = extract_layers(model, ids, [(1, "mlp_in"), (1, "mlp_out")])
    finally:
        handle.remove()
    torch.testing.assert_close(mlp_in, seen[0].float().reshape(mlp_in.shape))  # OPT: [B*T, d]
    assert not torch.allclose(mlp_in, mlp_out)
    if family == "gpt2":
        with torch.no_grad():
            torch.testing.assert_close(block.mlp(mlp_in), mlp_out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- configs
def test_configs_that_make_no_sense_are_refused(pairs: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="m", dataset="d", hook_point="mlp_out", target_hook_point="mlp_in")
    assert "must come after the hook point" in cfg.errors()["target_hook_point"]
    assert "must come after" in TrainConfig(
        model="m", dataset="d", hook_point="residual",
        target_hook_point="mlp_out").errors()["target_hook_point"]
    assert "needs a target hook point" in TrainConfig(
        model="m", dataset="d", skip_connection=True).errors()["skip_connection"]
    assert "does not apply to a transcoder" in TrainConfig(
        model="m", dataset="d", encoder_type="standard", tie_weights=True,
        hook_point="mlp_in", target_hook_point="mlp_out").errors()["tie_weights"]
    assert TrainConfig(model="m", dataset="d", hook_point="attn_out",
                       target_hook_point="residual").errors() == {}
    # a pair file trains a transcoder, a single-vector file an SAE, and nothing else
    with pytest.raises(ConfigError, match="--target-hook-point mlp_out"):
        check_before_loading(_file_cfg(pairs, target_hook_point=None,
                                       hook_point="residual"), tmp_path)
    single = tmp_path / "single.safetensors"
    save_file({"activations": torch.randn(100, 32)}, str(single))
    with pytest.raises(ConfigError, match="needs a file extracted with --target-hook-point"):
        check_before_loading(_file_cfg(single), tmp_path)


def test_pair_file_holds_input_then_target(pairs: Path, base: TrainConfig) -> None:
    f = ActivationFile(pairs)
    assert (f.width, f.d_in, f.d_target) == (64, 32, 32)
    assert f.meta["hook_point"] == "mlp_in" and f.meta["target_hook_point"] == "mlp_out"
    rows = f.rows(slice(0, 500))
    x, y = rows[:, :32], rows[:, 32:]
    # GPT-2's MLP maps each input row to its target row
    model = load_model(base.model).model.eval()
    _, blocks = find_blocks(model)
    with torch.no_grad():
        torch.testing.assert_close(blocks[1].mlp(x), y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- training
def _fvu_by_hand(run: Path, pairs: Path, n_holdout: int) -> float:
    """FVU of the exported (scale-folded) transcoder on the file's held-out pairs."""
    sae = load_saelens(run / "saelens").eval()
    rows = ActivationFile(pairs).rows(slice(-n_holdout, None))
    x, y = rows[:, :32], rows[:, 32:]
    with torch.no_grad():
        y_hat = sae.reconstruct(x)
    return float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("encoder_type", ENCODERS)
@pytest.mark.parametrize("skip", [False, True])
def test_every_type_trains_as_a_transcoder_and_its_fvu_is_on_the_target(
        pairs: Path, tmp_path: Path, encoder_type: str, skip: bool) -> None:
    cfg = _file_cfg(pairs, encoder_type=encoder_type, skip_connection=skip, l1_alpha=0.5,
                    l0_coef=0.5, learning_rate=4e-3)
    trainer = Trainer(cfg, CachedActivations(pairs, holdout=1000), tmp_path / "run")
    result = trainer.fit()
    assert trainer.sae.transcoder and (trainer.sae.W_skip is not None) == skip
    assert trainer.target_scale != trainer.scale  # the MLP's output is not its input's size
    assert 0 < result.fvu < 0.9, result.fvu
    n_holdout = trainer.source.n_holdout  # the last min(1000, N / 10) rows
    assert math.isclose(result.fvu, _fvu_by_hand(tmp_path / "run", pairs, n_holdout),
                        rel_tol=1e-4)
    cfg_json = json.loads((tmp_path / "run" / "saelens" / "cfg.json").read_text())
    assert cfg_json["apply_b_dec_to_input"] is False and cfg_json["d_out"] == 32
    assert cfg_json["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert cfg_json["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    expected = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder",
                "batchtopk": "jumprelu_transcoder",
                "matryoshka_batchtopk": "jumprelu_transcoder",
                "topk": "topk_transcoder"}[encoder_type]
    if skip:
        expected = expected.replace("transcoder", "skip_transcoder")
    assert cfg_json["architecture"] == expected
    assert ("note" in cfg_json["metadata"]) == (encoder_type == "topk")


def test_a_skip_transcoder_learns_a_linear_mlp_better_than_without_skip(
        pairs: Path, tmp_path: Path) -> None:
    """The skip term carries what is linear in the MLP: at the same k, the skip transcoder's
    held-out FVU is lower."""
    fvu = {}
    for skip in (False, True):
        cfg = _file_cfg(pairs, k=2, skip_connection=skip, total_steps=60)
        fvu[skip] = Trainer(cfg, CachedActivations(pairs, holdout=1000),
                            tmp_path / str(skip)).fit().fvu
    assert fvu[True] < fvu[False], fvu


def test_resume_is_exact_with_the_target_scale_in_the_checkpoint(pairs: Path,
                                                                  tmp_path: Path) -> None:
    cfg = _file_cfg(pairs, encoder_type="jumprelu", skip_connection=True, l0_coef=0.5)

    def run(out: Path, resume: Path | None = None, stop: int | None = None) -> Trainer:
        cb = Callbacks(control=lambda s: "stop" if s == stop else None)
        t = Trainer(cfg, CachedActivations(pairs, holdout=1000), out, callbacks=cb)
        t.fit(resume=resume)
        return t

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop=20)
    ckpt = ck.checkpoint_path(tmp_path / "part" / "checkpoints", 20)
    meta = ck.load_checkpoint(ckpt).meta
    assert meta["target_scale"] == full.target_scale != meta["scale"]
    resumed = run(tmp_path / "part", resume=ckpt)
    for name, value in full.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    # export from the checkpoint = the run's own export (same folding of both scales)
    final = ck.checkpoint_path(tmp_path / "full" / "checkpoints", 40)
    again = load_file(str(export_checkpoint(final, tmp_path / "again") /
                          "sae_weights.safetensors"))
    own = load_file(str(tmp_path / "full" / "saelens" / "sae_weights.safetensors"))
    assert set(again) == set(own) and "W_skip" in own
    for key in own:
        torch.testing.assert_close(again[key], own[key])


def test_live_transcoder_training_records_its_pairs_in_the_checkpoint(
        base: TrainConfig, tmp_path: Path) -> None:
    """Live extraction of mlp_in -> mlp_out trains; the checkpoint says what it read."""
    cfg = base.replace(total_steps=20, auto_save_interval=0)
    values = train_and_evaluate(cfg, tmp_path / "live", data_dir=tmp_path / "data", device=CPU,
                                evaluate=False)
    assert 0 < values["fvu"] < 1
    ckpt = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "live" / "checkpoints", 20))
    assert ckpt.meta["source_meta"]["target_hook_point"] == "mlp_out"
    assert ckpt.meta["source_meta"]["d_target"] == 32
    assert ckpt.meta["target_scale"] > 0


def test_group_trains_a_transcoder_beside_an_sae_as_each_would_alone(
        base: TrainConfig, tmp_path: Path) -> None:
    runs = [base.replace(total_steps=20, auto_save_interval=0),
            base.replace(total_steps=20, auto_save_interval=0, target_hook_point=None,
                         hook_point="residual")]
    out = train_group(runs, [tmp_path / "tc", tmp_path / "sae"], data_dir=tmp_path / "data",
                      device=CPU, evaluate=False)
    solo = train_and_evaluate(runs[0], tmp_path / "solo", data_dir=tmp_path / "data",
                              device=CPU, evaluate=False)
    a = load_file(str(tmp_path / "tc" / "saelens" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "solo" / "saelens" / "sae_weights.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert out["runs"][0]["fvu"] == solo["fvu"]
    assert json.loads((tmp_path / "sae" / "saelens" / "cfg.json").read_text())[
        "architecture"] == "topk"


# ---------------------------------------------------------------------------- SAELens
@pytest.mark.skipif(not SAELENS_PY.exists() and not os.environ.get("CI"),
                    reason="no .venv-saelens (make saelens-venv creates it; CI always does)")
@pytest.mark.parametrize("encoder_type,skip,arch", [
    ("standard", False, "transcoder"), ("standard", True, "skip_transcoder"),
    ("jumprelu", False, "jumprelu_transcoder"),
    ("batchtopk", True, "jumprelu_skip_transcoder")])
def test_sae_lens_loads_the_transcoder_export_with_the_same_outputs(
        pairs: Path, tmp_path: Path, encoder_type: str, skip: bool, arch: str) -> None:
    cfg = _file_cfg(pairs, encoder_type=encoder_type, skip_connection=skip, l1_alpha=0.5,
                    l0_coef=0.5, total_steps=20)
    trainer = Trainer(cfg, CachedActivations(pairs, holdout=1000), tmp_path / "run")
    trainer.fit()
    x = ActivationFile(pairs).rows(slice(0, 300))[:, :32].contiguous()
    save_file({"x": x}, str(tmp_path / "in.safetensors"))
    proc = subprocess.run(
        [str(SAELENS_PY), str(ROOT / "tests" / "saelens_bridge.py"),
         str(tmp_path / "run" / "saelens"), str(tmp_path / "in.safetensors"),
         str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["architecture"] == arch and info["d_out"] == 32
    out = load_file(str(tmp_path / "out.safetensors"))
    sae = trainer.sae.eval()
    with torch.no_grad():
        f = sae.encode(x * trainer.scale)
        y_hat = sae.reconstruct(x * trainer.scale, f) / trainer.target_scale
    torch.testing.assert_close(out["feature_acts"], f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["x_hat"], y_hat, rtol=1e-4, atol=1e-4)
    # and our own loader reads it back to the same outputs
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(tmp_path / "run" / "saelens").reconstruct(x),
                                   y_hat, rtol=1e-4, atol=1e-4)


def test_an_sae_and_a_transcoder_reading_one_hook_share_each_forward(
        base: TrainConfig, tmp_path: Path) -> None:
    """An SAE on mlp_in and a transcoder mlp_in -> mlp_out in one group: one forward serves
    both (as many as the transcoder's source alone runs), each reads the rows it would read
    alone, and no batch is left waiting."""
    from worker.engine.activations import LiveActivations, SharedExtraction
    from worker.engine.corpora import build_token_store

    loaded = load_model(base.model)
    store = build_token_store("kjv", loaded.tokenizer, tmp_path / "tokens", context_size=32,
                              max_tokens=32 * 300)
    opts = dict(seed=3, buffer_tokens=2048, holdout_tokens=256, batch_contexts=8,
                outlier_factor=0.0)  # the SAE judges outliers by x alone, the pairs by [x | y]
    calls = [0]

    def counted(ids: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return torch.cat(extract_layers(loaded.model, ids, [(1, "mlp_in"), (1, "mlp_out")]),
                         dim=-1)

    alone = LiveActivations(loaded.model, store, 1, "mlp_in", extract=counted,
                            target_hook_point="mlp_out", **opts)
    readers = [((1, "mlp_in"),), ((1, "mlp_in"), (1, "mlp_out"))]
    shared = SharedExtraction(loaded.model, [(1, "mlp_in"), (1, "mlp_out")], readers=readers)
    sae_rows = shared.for_source(1, "mlp_in", None)
    pair_rows = shared.for_source(1, "mlp_in", "mlp_out")
    sae = LiveActivations(loaded.model, store, 1, "mlp_in", extract=sae_rows, **opts)
    pairs = LiveActivations(loaded.model, store, 1, "mlp_in", extract=pair_rows,
                            target_hook_point="mlp_out", **opts)
    assert (pairs.d_in, pairs.d_target, sae.d_in, sae.d_target) == (32, 32, 32, 0)
    for _ in range(10):
        want = alone.next_batch(300)
        got_pairs, got_sae = pairs.next_batch(300), sae.next_batch(300)
        torch.testing.assert_close(got_pairs, want, rtol=0, atol=0)
        torch.testing.assert_close(got_sae, want[:, :32], rtol=0, atol=0)
    assert shared.forwards == calls[0]
    assert all(not queue for queue in shared.pending.values())
    with pytest.raises(ValueError, match="was not declared"):
        shared.for_source(1, "mlp_out", None)
