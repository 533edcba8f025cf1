"""The held-out evaluation of transcoders (worker.engine.evaluate / evaluator) on tiny real
models, checked against computations done here by hand: the input read at the MLP's input by a
plain forward pre-hook, the target at its output by a forward hook, the spliced and zero-ablated
forwards redone with hooks of our own.

The strongest check uses GPT-2 with its MLP made affine (the activation swapped for the
identity), so that a transcoder can reproduce the MLP exactly: the latents of a ReLU pair
``relu(x) - relu(-x)`` carry x linearly, the decoder and the skip connection share the affine
map. Its splice must then leave the model unchanged (CE loss recovered 1, KL 0), and the same
transcoder without its skip term must not."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.engine.tiny_models import TINY_HIDDEN, kjv_lines
from worker.engine.architectures import build
from worker.engine.architectures.base import SAE
from worker.engine.config import TrainConfig
from worker.engine.errors import ConfigError
from worker.engine.evaluate import (
    EvalOptions,
    Evaluation,
    GroupSAE,
    evaluate_sae,
    evaluate_saes,
    load_evaluation,
)
from worker.engine.models import LoadedModel, hook_module, load_model
from worker.engine.pipeline import train_and_evaluate

D = TINY_HIDDEN
LAYER = 1
SCALE, TARGET_SCALE = 0.7, 1.9  # input and target training scales (different on purpose)
OPTS = EvalOptions(batch_contexts=3, top_n=4, window_before=2, window_after=1, sample_n=5,
                   hist_bins=8, neighbours_n=3, logits_n=3, promoters_n=2)
CE_KEYS = ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered", "kl_div",
           "kl_div_with_ablation", "kl_div_score")


# ---------------------------------------------------------------------------- helpers
def _contexts(loaded: LoadedModel, n: int, t: int) -> np.ndarray:
    """Packed KJV verses, each starting with the BOS (or CLS) token, as int64 [n, t]."""
    tok = loaded.tokenizer
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    ids: list[int] = []
    for line in kjv_lines(400):
        ids += [first, *tok(line, add_special_tokens=False)["input_ids"]]
        if len(ids) >= n * t:
            break
    return np.array(ids[: n * t], dtype=np.int64).reshape(n, t)


def _special(loaded: LoadedModel) -> list[int]:
    return list(loaded.tokenizer.all_special_ids)


def _scored(loaded: LoadedModel, ids: Tensor) -> Tensor:
    mask = ~torch.isin(ids, torch.tensor(_special(loaded)))
    mask[:, 0] = False
    return mask


def _mlp_pair(loaded: LoadedModel, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The MLP's input (a plain pre-hook on the module of mlp_in) and output (a plain forward
    hook on the module of mlp_out) of block LAYER in one whole forward, each [n, T, d]."""
    seen: dict[str, Tensor] = {}

    def pre(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.setdefault("x", args[0].detach().clone())

    def post(_m: nn.Module, _i: object, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        seen.setdefault("y", t.detach().clone())

    handles = [hook_module(loaded.model, LAYER, "mlp_in").register_forward_pre_hook(pre),
               hook_module(loaded.model, LAYER, "mlp_out").register_forward_hook(post)]
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    n, t = ids.shape
    return seen["x"].reshape(n, t, -1).float(), seen["y"].reshape(n, t, -1).float()


def _by_hand(sae: SAE, x: Tensor, y: Tensor, mask: Tensor) -> dict[str, Tensor | float]:
    """Latents, outputs and FVU / L0 / MSE of a transcoder at the scored positions, with
    every operation written out (not ``reconstruct``)."""
    with torch.no_grad():
        x_s, y_s = x[mask], y[mask]
        f = sae.encode(x_s * SCALE).float()
        out = f @ sae.W_dec + sae.b_dec
        if sae.W_skip is not None:
            out = out + (x_s * SCALE) @ sae.W_skip
        y_hat = out / TARGET_SCALE
    err = float((y_s - y_hat).double().pow(2).sum())
    var = float((y_s.double() - y_s.double().mean(0)).pow(2).sum())
    return {"f": f, "y_hat": y_hat, "fvu": err / var, "l0": float((f > 0).sum(1).float().mean()),
            "mse": err / y_s.numel(), "var": var}


def _ce_with(loaded: LoadedModel, ids: Tensor, replace: Tensor | None
             ) -> tuple[float, Tensor]:
    """Mean next-token CE and the logits of a forward with the MLP's output of block LAYER
    replaced at the scored positions by ``replace`` [n_scored, d] (None: unchanged)."""
    mask = _scored(loaded, ids)

    def hook(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
        new = out.reshape(*mask.shape, -1).clone()  # OPT's fc2 runs on flattened tokens
        new[mask] = replace.to(new.dtype)
        return new.reshape(out.shape)

    handle = (hook_module(loaded.model, LAYER, "mlp_out").register_forward_hook(hook)
              if replace is not None else None)
    try:
        with torch.no_grad():
            res = loaded.model(input_ids=ids, labels=ids)
    finally:
        if handle is not None:
            handle.remove()
    return float(res.loss), res.logits


def _kl(clean: Tensor, other: Tensor) -> float:
    """Mean over predicted positions of KL(clean || other)."""
    v = clean.shape[-1]
    return float(F.kl_div(other[:, :-1].log_softmax(-1).reshape(-1, v),
                          clean[:, :-1].log_softmax(-1).reshape(-1, v), log_target=True,
                          reduction="batchmean"))


def _random_transcoder(encoder_type: str, skip: bool, seed: int, **options: object) -> SAE:
    torch.manual_seed(seed)
    sae = build(encoder_type, D, 4 * D, **options).make_transcoder(skip)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.1)
        if skip:
            sae.W_skip.normal_(0, 0.15)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.3)
    return sae.eval()


def _without_time(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "created_at"}


def _same(a: Evaluation, b: Evaluation) -> None:
    assert _without_time(a.report) == _without_time(b.report)
    assert set(a.latents) == set(b.latents)
    for key, value in a.latents.items():
        assert torch.equal(b.latents[key], value), key


@pytest.fixture(scope="module")
def llama(tiny_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_dirs["llama"]))


@pytest.fixture(scope="module")
def affine_gpt2(tiny_dirs: dict[str, Path]) -> tuple[LoadedModel, Tensor, Tensor]:
    """The tiny GPT-2 with block LAYER's MLP made affine (its activation the identity), and
    that map: mlp_out = mlp_in @ A + c."""
    loaded = load_model(str(tiny_dirs["gpt2"]))
    mlp = loaded.model.transformer.h[LAYER].mlp
    mlp.act = nn.Identity()
    with torch.no_grad():
        a = mlp.c_fc.weight @ mlp.c_proj.weight  # Conv1D: y = x @ weight + bias
        c = mlp.c_fc.bias @ mlp.c_proj.weight + mlp.c_proj.bias
    return loaded, a, c


def _affine_transcoder(a: Tensor, c: Tensor, *, skip_share: float) -> SAE:
    """A standard transcoder (latents relu(x), relu(-x) of the scaled input) whose output is
    exactly mlp_in @ a + c on the raw scales; ``skip_share`` of the linear part goes through
    the skip connection (0: none, and no skip connection)."""
    sae = build("standard", D, 2 * D).make_transcoder(skip_share > 0)
    eye = torch.eye(D)
    linear = a * TARGET_SCALE / SCALE  # the map on the training scales
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.b_enc.zero_()
        decoded = linear * (1 - skip_share)
        sae.W_dec.copy_(torch.cat([decoded, -decoded], 0))
        sae.b_dec.copy_(c * TARGET_SCALE)
        if sae.W_skip is not None:
            sae.W_skip.copy_(linear * skip_share)
    return sae.eval()


# ---------------------------------------------------------------------------- exactness
def test_affine_mlp_is_what_the_fixture_says(affine_gpt2) -> None:
    loaded, a, c = affine_gpt2
    ids = torch.from_numpy(_contexts(loaded, 2, 12))
    x, y = _mlp_pair(loaded, ids)
    torch.testing.assert_close(y, x @ a + c, rtol=1e-4, atol=1e-5)
    assert float((y - x).norm()) > 0.1 * float(y.norm())  # the MLP is not the identity


@pytest.mark.parametrize("skip_share", [0.0, 0.5])
def test_exact_transcoder_recovers_everything(affine_gpt2, skip_share: float) -> None:
    """A transcoder that computes the (affine) MLP exactly: FVU 0, the splice changes nothing
    (CE spliced = clean, KL 0, CE loss recovered 1); its zero ablation is the MLP's output
    zeroed at the scored positions (checked by a hook of our own)."""
    loaded, a, c = affine_gpt2
    ctx = _contexts(loaded, 5, 16)
    ids = torch.from_numpy(ctx)
    sae = _affine_transcoder(a, c, skip_share=skip_share)
    r = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", special_ids=_special(loaded),
                     options=OPTS, target_hook_point="mlp_out",
                     target_scale=TARGET_SCALE).report
    assert (r["hook_point"], r["target_hook_point"]) == ("mlp_in", "mlp_out")
    assert r["skip_connection"] is (skip_share > 0)
    assert r["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert r["cossim"] == pytest.approx(1.0, abs=1e-5)
    assert r["ce_loss_spliced"] == pytest.approx(r["ce_loss_clean"], abs=1e-5)
    assert abs(r["kl_div"]) < 1e-6
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert r["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    # the zero ablation zeroes the MLP's output (not its input) at the scored positions
    mask = _scored(loaded, ids)
    clean_ce, clean_logits = _ce_with(loaded, ids, None)
    zero_ce, zero_logits = _ce_with(loaded, ids, torch.zeros(int(mask.sum()), D))
    assert r["ce_loss_clean"] == pytest.approx(clean_ce, abs=1e-5)
    assert r["ce_loss_zero"] == pytest.approx(zero_ce, abs=1e-5)
    assert r["ce_loss_zero"] > r["ce_loss_clean"] + 1e-3  # the ablation matters
    assert r["kl_div_with_ablation"] == pytest.approx(_kl(clean_logits, zero_logits), rel=1e-4)
    # L0: the ReLU pair fires once per non-zero input coordinate
    x, _ = _mlp_pair(loaded, ids)
    assert r["l0"] == pytest.approx(float((x[mask] != 0).sum(1).float().mean()), abs=1e-6)


def test_without_its_skip_term_the_exact_transcoder_is_not(affine_gpt2) -> None:
    """The same weights with the skip connection's half dropped: what an evaluator that
    forgot the skip term (or compared with the input) would report as exact is far off."""
    loaded, a, c = affine_gpt2
    ctx = _contexts(loaded, 5, 16)
    sae = _affine_transcoder(a, c, skip_share=0.5)
    with torch.no_grad():
        sae.W_skip.zero_()
    r = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", special_ids=_special(loaded),
                     options=OPTS, target_hook_point="mlp_out",
                     target_scale=TARGET_SCALE).report
    assert r["fvu"] > 0.05
    assert r["kl_div"] > 1e-4
    assert r["ce_loss_recovered"] != pytest.approx(1.0, abs=1e-3)
    # and given the input's scale as the target's, the exact transcoder is off too
    exact = _affine_transcoder(a, c, skip_share=0.5)
    wrong = evaluate_sae(exact, SCALE, loaded, ctx, LAYER, "mlp_in",
                         special_ids=_special(loaded), options=OPTS,
                         target_hook_point="mlp_out").report
    assert wrong["fvu"] > 0.05


# ---------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("encoder_type,skip,options", [
    ("topk", False, {"k": 6}), ("jumprelu", True, {})])
def test_transcoder_figures_match_brute_force(llama: LoadedModel, encoder_type: str,
                                              skip: bool, options: dict) -> None:
    """FVU, L0, MSE, shrinkage sums, firing, CE losses and KL of a random transcoder on the
    tiny llama (a gated MLP) equal the same figures computed here from the MLP's input and
    output and a forward with the MLP's output replaced by hand."""
    loaded = llama
    ctx = _contexts(loaded, 7, 16)
    ids = torch.from_numpy(ctx)
    sae = _random_transcoder(encoder_type, skip, seed=3, **options)
    ev = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", special_ids=_special(loaded),
                      options=OPTS, target_hook_point="mlp_out", target_scale=TARGET_SCALE)
    r = ev.report
    mask = _scored(loaded, ids)
    x, y = _mlp_pair(loaded, ids)
    bf = _by_hand(sae, x, y, mask)
    assert r["scored_tokens"] == int(mask.sum())
    assert (r["target_hook_point"], r["skip_connection"]) == ("mlp_out", skip)
    assert 0.05 < r["fvu"] and r["fvu"] == pytest.approx(bf["fvu"], rel=1e-4)
    assert r["explained_variance"] == pytest.approx(1 - bf["fvu"], rel=1e-4, abs=1e-6)
    assert r["mse"] == pytest.approx(bf["mse"], rel=1e-4)
    assert 0 < r["l0"] == pytest.approx(bf["l0"], rel=1e-6)
    y_s, y_hat, f = y[mask], bf["y_hat"], bf["f"]
    assert r["l2_norm_in"] == pytest.approx(float(y_s.norm(dim=1).mean()), rel=1e-5)
    assert r["l2_norm_out"] == pytest.approx(float(y_hat.norm(dim=1).mean()), rel=1e-5)
    assert r["cossim"] == pytest.approx(
        float(F.cosine_similarity(y_s, y_hat, dim=1).mean()), rel=1e-4)
    torch.testing.assert_close(ev.latents["frequency"], (f > 0).float().mean(0))
    torch.testing.assert_close(ev.latents["max_act"], f.max(0).values, rtol=1e-5, atol=1e-6)
    # the splice: the MLP's output replaced by the transcoder's at the scored positions
    clean_ce, clean_logits = _ce_with(loaded, ids, None)
    spliced_ce, spliced_logits = _ce_with(loaded, ids, y_hat)
    zero_ce, _ = _ce_with(loaded, ids, torch.zeros_like(y_hat))
    assert r["ce_loss_clean"] == pytest.approx(clean_ce, abs=1e-5)
    assert r["ce_loss_spliced"] == pytest.approx(spliced_ce, abs=1e-5)
    assert r["ce_loss_zero"] == pytest.approx(zero_ce, abs=1e-5)
    assert r["ce_loss_spliced"] != pytest.approx(r["ce_loss_clean"], abs=1e-4)
    assert r["ce_loss_recovered"] == pytest.approx(
        (zero_ce - spliced_ce) / (zero_ce - clean_ce), rel=1e-3)
    assert r["kl_div"] == pytest.approx(_kl(clean_logits, spliced_logits), rel=1e-4)


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "phi"])
def test_transcoder_fvu_and_splice_in_other_families(tiny: dict[str, LoadedModel],
                                                     family: str) -> None:
    """OPT (fc1's input and fc2's output on flattened tokens), GPT-NeoX and Phi (attention and
    MLP in parallel): FVU and the spliced CE loss as computed by hand."""
    loaded = tiny[family]
    ctx = _contexts(loaded, 4, 12)
    ids = torch.from_numpy(ctx)
    sae = _random_transcoder("topk", True, seed=6, k=6)
    r = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", special_ids=_special(loaded),
                     options=OPTS, target_hook_point="mlp_out",
                     target_scale=TARGET_SCALE).report
    mask = _scored(loaded, ids)
    x, y = _mlp_pair(loaded, ids)
    bf = _by_hand(sae, x, y, mask)
    assert r["fvu"] == pytest.approx(bf["fvu"], rel=1e-4)
    assert r["l0"] == pytest.approx(bf["l0"], rel=1e-6)
    spliced_ce, _ = _ce_with(loaded, ids, bf["y_hat"])
    assert r["ce_loss_spliced"] == pytest.approx(spliced_ce, abs=1e-5)
    assert r["ce_loss_spliced"] != pytest.approx(r["ce_loss_clean"], abs=1e-4)


def test_matryoshka_skip_transcoder_prefix_fvu(llama: LoadedModel) -> None:
    """Each prefix's output is its decoded latents plus the whole skip term, against the
    target; the last prefix's FVU is the transcoder's."""
    loaded = llama
    ctx = _contexts(loaded, 6, 16)
    ids = torch.from_numpy(ctx)
    widths = (16, 48, 4 * D)
    sae = _random_transcoder("matryoshka_batchtopk", True, seed=4, k=8,
                             matryoshka_widths=list(widths))
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    r = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", special_ids=_special(loaded),
                     options=OPTS, target_hook_point="mlp_out",
                     target_scale=TARGET_SCALE).report
    mask = _scored(loaded, ids)
    x, y = _mlp_pair(loaded, ids)
    bf = _by_hand(sae, x, y, mask)
    x_s, y_s, f = x[mask], y[mask], bf["f"]
    want, no_skip = [], []
    with torch.no_grad():
        skip_term = (x_s * SCALE) @ sae.W_skip
        for w in widths:
            decoded = f[:, :w] @ sae.W_dec[:w] + sae.b_dec
            for out, into in ((decoded + skip_term, want), (decoded, no_skip)):
                err = float((y_s - out / TARGET_SCALE).double().pow(2).sum())
                into.append(err / bf["var"])
    got = [g["fvu"] for g in r["matryoshka_fvu"]]
    assert [g["width"] for g in r["matryoshka_fvu"]] == list(widths)
    assert got == pytest.approx(want, rel=1e-4)
    assert got[-1] == pytest.approx(r["fvu"], rel=1e-6)
    # the prefixes differ, and so does leaving the skip term out: the test can tell
    assert abs(want[0] - want[-1]) > 0.01 * want[-1]
    assert got[0] != pytest.approx(no_skip[0], rel=1e-2)


# ---------------------------------------------------------------------------- groups, models
def test_group_with_saes_and_a_transcoder_gives_what_each_gives_alone(
        tiny: dict[str, LoadedModel]) -> None:
    """An SAE at the MLP's output (the transcoder's target: the same zero ablation), an SAE
    at the MLP's input and a skip transcoder between them, in one pass: each result is the
    one it gets alone (reports and every tensor identical)."""
    loaded = tiny["gpt2"]
    ctx = _contexts(loaded, 7, 16)
    special = _special(loaded)
    torch.manual_seed(7)
    sae_out = build("topk", D, 3 * D, k=5).eval()
    sae_in = build("standard", D, 2 * D).eval()
    tc = _random_transcoder("topk", True, seed=8, k=6)
    groups = [GroupSAE(sae_out, 1.3, LAYER, "mlp_out", {}),
              GroupSAE(tc, SCALE, LAYER, "mlp_in", {}, target_hook_point="mlp_out",
                       target_scale=TARGET_SCALE),
              GroupSAE(sae_in, 0.9, LAYER, "mlp_in", {})]
    together = evaluate_saes(groups, loaded, ctx, special_ids=special, options=OPTS)
    for g, member in zip(groups, together, strict=True):
        alone = evaluate_saes([g], loaded, ctx, special_ids=special, options=OPTS)[0]
        _same(alone, member)
    sae_r, tc_r, in_r = (e.report for e in together)
    assert (sae_r["target_hook_point"], sae_r["skip_connection"]) == (None, False)
    assert (tc_r["target_hook_point"], tc_r["skip_connection"]) == ("mlp_out", True)
    assert tc_r["ce_loss_zero"] == sae_r["ce_loss_zero"]
    assert tc_r["l2_norm_in"] == pytest.approx(sae_r["l2_norm_in"], rel=1e-6)  # both: ||y||


def test_bert_transcoder_has_fvu_and_l0_but_no_ce(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["bert"]
    ctx = _contexts(loaded, 5, 16)
    ids = torch.from_numpy(ctx)
    sae = _random_transcoder("topk", True, seed=9, k=6)
    r = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", special_ids=_special(loaded),
                     options=OPTS, target_hook_point="mlp_out",
                     target_scale=TARGET_SCALE).report
    assert all(r[k] is None for k in CE_KEYS)
    assert "not a causal LM" in r["downstream_note"]
    # mlp_in: the input of BERT's intermediate; mlp_out: output.dense (before the residual)
    seen: dict[str, Tensor] = {}
    block = loaded.model.encoder.layer[LAYER]
    h1 = block.intermediate.register_forward_pre_hook(
        lambda _m, args: seen.setdefault("x", args[0].detach().clone()))
    h2 = block.output.dense.register_forward_hook(
        lambda _m, _i, out: seen.setdefault("y", out.detach().clone()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids)
    finally:
        h1.remove()
        h2.remove()
    bf = _by_hand(sae, seen["x"], seen["y"], _scored(loaded, ids))
    assert r["fvu"] == pytest.approx(bf["fvu"], rel=1e-4)
    assert r["l0"] == pytest.approx(bf["l0"], rel=1e-6) and r["l0"] > 0


def test_a_transcoder_needs_its_target_and_an_sae_has_none(tiny: dict[str, LoadedModel]
                                                           ) -> None:
    loaded = tiny["gpt2"]
    ctx = _contexts(loaded, 2, 8)
    tc = _random_transcoder("topk", False, seed=1, k=4)
    with pytest.raises(ConfigError, match="is a transcoder"):
        evaluate_sae(tc, SCALE, loaded, ctx, LAYER, "mlp_in", options=OPTS)
    with pytest.raises(ConfigError, match="not a transcoder"):
        evaluate_sae(build("topk", D, 2 * D, k=4), SCALE, loaded, ctx, LAYER, "mlp_in",
                     options=OPTS, target_hook_point="mlp_out")


# ---------------------------------------------------------------------------- the pipeline
def test_train_and_evaluate_writes_a_transcoder_report(tiny_dirs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """A 20-step mlp_in -> mlp_out skip transcoder trained from the tiny GPT-2 and the KJV:
    its report names the target, its FVU is finite and is the target's (the trainer's target
    scale reached the evaluation: the held-out vectors' FVU and the text's agree)."""
    cfg = TrainConfig(model=str(tiny_dirs["gpt2"]), dataset="kjv", context_size=32,
                      max_tokens=32 * 300, layer=LAYER, hook_point="mlp_in",
                      target_hook_point="mlp_out", skip_connection=True, k=4,
                      expansion_factor=4, batch_size=128, total_steps=20, log_every=10,
                      auto_save_interval=0, eval_tokens=512, buffer_tokens=2048, seed=0)
    values = train_and_evaluate(cfg, tmp_path / "run", data_dir=tmp_path / "data",
                                device=torch.device("cpu"))
    report = load_evaluation(tmp_path / "run" / "eval").report
    assert (report["hook_point"], report["target_hook_point"]) == ("mlp_in", "mlp_out")
    assert report["skip_connection"] is True and report["encoder_type"] == "topk"
    assert math.isfinite(report["fvu"]) and 0 < report["fvu"] < 1
    assert values["eval"]["measured_on"] == "heldout_text"
    assert values["eval"]["fvu"] == report["fvu"]
    # the trainer's held-out vectors are these contexts' scored tokens: the same FVU (on the
    # target, with the trainer's target scale; measured 0.0846881 both)
    assert report["fvu"] == pytest.approx(values["fvu"], rel=1e-3)
    assert report["ce_loss_recovered"] is not None


def test_autocast_transcoder_is_close_to_float32(tiny: dict[str, LoadedModel]) -> None:
    """bf16 autocast (the SAE only) runs the skip term too, and lands near the float32
    figures."""
    loaded = tiny["gpt2"]
    ctx = _contexts(loaded, 4, 12)
    sae = _random_transcoder("topk", True, seed=2, k=6)
    kw = {"special_ids": _special(loaded), "options": OPTS, "target_hook_point": "mlp_out",
          "target_scale": TARGET_SCALE}
    full = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", **kw).report
    half = evaluate_sae(sae, SCALE, loaded, ctx, LAYER, "mlp_in", autocast_dtype=torch.bfloat16,
                        **kw).report
    assert half["fvu"] == pytest.approx(full["fvu"], rel=0.05)
    assert half["ce_loss_spliced"] == pytest.approx(full["ce_loss_spliced"], rel=0.05)
