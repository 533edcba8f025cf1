"""Tests for worker.engine.evaluate on tiny real models (tests/engine/tiny_models.py), no mocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.engine.tiny_models import (
    CAUSAL_FAMILIES,
    TINY_HIDDEN,
    TINY_VOCAB_SIZE,
    kjv_lines,
)
from worker.engine.architectures import build
from worker.engine.architectures.base import SAE
from worker.engine.errors import ConfigError, DataError
from worker.engine.evaluate import (
    EvalOptions,
    Evaluation,
    evaluate_sae,
    load_evaluation,
    save_evaluation,
)
from worker.engine.evaluator import sample_keys
from worker.engine.models import LoadedModel, extract_layer, hook_module, load_model, token_text

D = TINY_HIDDEN
# the keys and tensors of docs/eval-format.md, in order
REPORT_KEYS = [
    "format", "created_at", "step", "d_in", "d_sae", "encoder_type", "model", "layer",
    "hook_point", "is_causal", "contexts", "context_size", "tokens", "scored_tokens", "fvu",
    "explained_variance", "l0", "mse", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero",
    "ce_loss_recovered", "kl_div", "downstream_note", "dead", "dense", "alive", "dense_threshold",
    "histogram", "top_n", "window_before", "window_after",
    "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias", "cossim", "l1",
    "kl_div_with_ablation", "kl_div_score", "freq_over_1_percent", "freq_over_10_percent",
    "normalized_freq_over_1_percent", "normalized_freq_over_10_percent", "frac_alive",
    "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim", "max_decoder_cosine",
    "near_duplicate_share", "has_logits", "latent_details", "sample_n", "hist_bins",
    "neighbours_n", "logits_n", "promoters_n", "matryoshka_fvu",
    "target_hook_point", "skip_connection",
]
CE_KEYS = ["ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered", "kl_div",
           "kl_div_with_ablation", "kl_div_score"]
V1_TENSORS = {"frequency", "max_act", "mean_act", "top_acts", "top_context", "top_position",
              "top_tokens", "top_window_acts"}
PASS_TENSORS = {"hist_max", "hist_counts", "contexts_fired", "sample_acts", "sample_context",
                "sample_position", "sample_tokens", "sample_window_acts"}
WEIGHT_TENSORS = {"neighbour_ids", "neighbour_cosines", "max_decoder_cosine_per_latent",
                  "max_encoder_cosine_per_latent", "encoder_decoder_cosine", "encoder_norm",
                  "encoder_bias"}
LOGIT_TENSORS = {"logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values",
                 "token_promoter_ids", "token_promoter_values"}


# ---------------------------------------------------------------------------- fixtures, helpers
def _contexts(loaded: LoadedModel, n: int, t: int) -> np.ndarray:
    """Packed KJV verses, each starting with the BOS token (a special id), as int32 [n, t]."""
    tok = loaded.tokenizer
    start = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids: list[int] = []
    for line in kjv_lines(400):
        ids += start + tok(line)["input_ids"]
        if len(ids) >= n * t:
            break
    return np.array(ids[: n * t], dtype=np.int32).reshape(n, t)


@pytest.fixture(scope="module")
def trained_llama(tiny_dirs: dict[str, Path]) -> LoadedModel:
    """The tiny llama fitted for a few steps to the test contexts, so that ablations matter."""
    loaded = load_model(str(tiny_dirs["llama"]))
    model = loaded.model
    data = torch.from_numpy(_contexts(loaded, 10, 24).astype(np.int64))
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(12):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return loaded


def _special(loaded: LoadedModel) -> list[int]:
    return list(loaded.tokenizer.all_special_ids)


def _identity_sae(d: int = D) -> SAE:
    """Standard SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    sae = build("standard", d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero_sae(d: int = D) -> SAE:
    sae = _identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def _topk_sae(d: int = D, d_sae: int = 8 * D, k: int = 8) -> SAE:
    torch.manual_seed(1)
    sae = build("topk", d, d_sae, k=k)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def _scale(loaded: LoadedModel, ctx: np.ndarray, layer: int, hook: str) -> float:
    x = extract_layer(loaded.model, torch.from_numpy(ctx.astype(np.int64)), layer, hook)
    return float(math.sqrt(x.shape[-1]) / x.norm(dim=-1).mean())


# ---------------------------------------------------------------------------- splicing
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_exact_and_zero_reconstruction_splice(tiny: dict[str, LoadedModel], family: str) -> None:
    """Exact SAE: spliced == clean; zero SAE: spliced == zero ablation; every hook point."""
    loaded = tiny[family]
    ctx = _contexts(loaded, 6, 16)
    opts = EvalOptions(batch_contexts=4, top_n=3, window_before=2, window_after=1)
    for hook in loaded.info.hook_points:
        kw = {"special_ids": _special(loaded), "options": opts}
        exact = evaluate_sae(_identity_sae(), 2.0, loaded, ctx, 1, hook, **kw).report
        assert exact["fvu"] == pytest.approx(0.0, abs=1e-10), hook
        assert exact["mse"] == pytest.approx(0.0, abs=1e-12)
        assert exact["ce_loss_spliced"] == pytest.approx(exact["ce_loss_clean"], abs=1e-6)
        assert abs(exact["kl_div"]) < 1e-7
        # the zero ablation must change the logits, or the splice test would prove nothing
        assert exact["ce_loss_zero"] != pytest.approx(exact["ce_loss_clean"], abs=1e-6), hook
        assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
        assert exact["kl_div_with_ablation"] > 0
        assert exact["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
        assert exact["cossim"] == pytest.approx(1.0, abs=1e-5)
        assert exact["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert exact["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-5)

        zero = evaluate_sae(_zero_sae(), 2.0, loaded, ctx, 1, hook, **kw).report
        assert zero["ce_loss_clean"] == exact["ce_loss_clean"]
        assert zero["ce_loss_zero"] == exact["ce_loss_zero"]
        assert zero["ce_loss_spliced"] == pytest.approx(zero["ce_loss_zero"], abs=1e-6)
        assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-3)
        assert zero["kl_div"] > 0
        assert zero["kl_div_with_ablation"] == exact["kl_div_with_ablation"]
        assert zero["kl_div"] == pytest.approx(zero["kl_div_with_ablation"], rel=1e-5)
        assert zero["kl_div_score"] == pytest.approx(0.0, abs=1e-4)
        assert zero["l2_norm_out"] == zero["l2_ratio"] == zero["cossim"] == 0.0
        assert zero["relative_reconstruction_bias"] is None  # x . x_hat sums to 0
        assert zero["fvu"] >= 1.0 - 1e-6  # predicting 0 is no better than predicting the mean
        assert zero["l0"] == exact["l0"] == pytest.approx(D, abs=1)  # relu(x), relu(-x): ~d on


def test_trained_model_ce(trained_llama: LoadedModel) -> None:
    """ce_loss_clean equals HF's own loss (labels=); the ablations order as expected."""
    loaded = trained_llama
    ctx = _contexts(loaded, 10, 24)
    ids = torch.from_numpy(ctx.astype(np.int64))
    with torch.no_grad():
        hf_loss = float(loaded.model(input_ids=ids, labels=ids).loss)
    assert hf_loss < math.log(loaded.info.vocab_size) - 1  # it did learn something
    opts = EvalOptions(batch_contexts=3)
    zero = evaluate_sae(_zero_sae(), 1.0, loaded, ctx, 1, "residual",
                        special_ids=_special(loaded), options=opts).report
    assert zero["ce_loss_clean"] == pytest.approx(hf_loss, abs=1e-5)
    assert zero["ce_loss_zero"] > zero["ce_loss_clean"] + 0.1
    assert zero["ce_loss_spliced"] == pytest.approx(zero["ce_loss_zero"], abs=1e-6)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    # the zero ablation redone here with a hook of our own: same CE and KL(clean || zero)
    special = torch.tensor(_special(loaded))
    scored = ~torch.isin(ids, special)
    scored[:, 0] = False

    def zero_hook(_m: torch.nn.Module, _i: object, out: object) -> object:
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden * ~scored.unsqueeze(-1)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = hook_module(loaded.model, 1, "residual").register_forward_hook(zero_hook)
    try:
        with torch.no_grad():
            ablated = loaded.model(input_ids=ids, labels=ids)
    finally:
        handle.remove()
    with torch.no_grad():
        clean_logits = loaded.model(input_ids=ids).logits
    assert zero["ce_loss_zero"] == pytest.approx(float(ablated.loss), abs=1e-5)
    kl = torch.nn.functional.kl_div(
        ablated.logits[:, :-1].log_softmax(-1).reshape(-1, TINY_VOCAB_SIZE),
        clean_logits[:, :-1].log_softmax(-1).reshape(-1, TINY_VOCAB_SIZE),
        log_target=True, reduction="batchmean")
    assert zero["kl_div"] == pytest.approx(float(kl), rel=1e-4)
    assert zero["kl_div_with_ablation"] == pytest.approx(float(kl), rel=1e-4)

    exact = evaluate_sae(_identity_sae(), 0.5, loaded, ctx, 1, "residual",
                         special_ids=_special(loaded), options=opts).report
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert exact["kl_div_with_ablation"] == pytest.approx(float(kl), rel=1e-4)
    assert abs(exact["kl_div"]) < 1e-7
    # a random SAE is somewhere in between, with a positive KL
    rand = evaluate_sae(_topk_sae(), _scale(loaded, ctx, 1, "residual"), loaded, ctx, 1,
                        "residual", special_ids=_special(loaded), options=opts).report
    assert rand["kl_div"] > 0
    assert rand["ce_loss_spliced"] > rand["ce_loss_clean"]
    assert rand["ce_loss_recovered"] == pytest.approx(
        (rand["ce_loss_zero"] - rand["ce_loss_spliced"])
        / (rand["ce_loss_zero"] - rand["ce_loss_clean"]))
    assert rand["kl_div_with_ablation"] == pytest.approx(float(kl), rel=1e-4)
    assert rand["kl_div_score"] == pytest.approx(
        (rand["kl_div_with_ablation"] - rand["kl_div"]) / rand["kl_div_with_ablation"])
    assert 0 < rand["kl_div_score"] < 1


# ---------------------------------------------------------------------------- latent statistics
def _brute_force(loaded: LoadedModel, sae: SAE, scale: float, ctx: np.ndarray, layer: int,
                 hook: str, opts: EvalOptions) -> dict[str, torch.Tensor]:
    """All activations of all contexts in one tensor: latents, scored mask, reconstructions."""
    ids = torch.from_numpy(ctx.astype(np.int64))
    x = extract_layer(loaded.model, ids, layer, hook)  # [n, T, d]
    mask = torch.ones(ids.shape, dtype=torch.bool)
    if opts.exclude_pos0:
        mask[:, 0] = False
    if opts.exclude_special:
        mask &= ~torch.isin(ids, torch.tensor(_special(loaded)))
    with torch.no_grad():
        f = sae.encode(x.reshape(-1, x.shape[-1]) * scale).reshape(*ids.shape, -1)
        f[~mask] = 0
        x_hat = sae.decode(f[mask]) / scale
    return {"ids": ids, "x": x, "mask": mask, "f": f, "x_hat": x_hat}


def test_top_contexts_match_brute_force(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["llama"]
    ctx = _contexts(loaded, 12, 24)
    layer, hook = 1, "residual"
    scale = _scale(loaded, ctx, layer, hook)
    sae = _topk_sae()
    opts = EvalOptions(top_n=10, window_before=6, window_after=3, batch_contexts=5)
    ev = evaluate_sae(sae, scale, loaded, ctx, layer, hook, special_ids=_special(loaded),
                      options=opts, meta={"step": 7, "model": "tiny-llama"})
    bf = _brute_force(loaded, sae, scale, ctx, layer, hook, opts)
    f, mask, ids = bf["f"], bf["mask"], bf["ids"]
    n, t, d_sae = f.shape
    r, lat = ev.report, ev.latents
    assert (r["step"], r["model"], r["layer"], r["hook_point"]) == (7, "tiny-llama", 1, hook)
    assert r["scored_tokens"] == int(mask.sum()) < n * t - n  # BOS tokens were excluded too
    assert (r["contexts"], r["context_size"], r["tokens"]) == (n, t, n * t)

    # statistics over the scored tokens
    f_s = f[mask]
    x_s = bf["x"][mask]
    fired = (f_s > 0).sum(0)
    torch.testing.assert_close(lat["frequency"], fired.float() / len(f_s))
    torch.testing.assert_close(lat["max_act"], f_s.max(0).values)
    mean_act = torch.where(fired > 0, f_s.sum(0) / fired.clamp_min(1), 0.0)
    torch.testing.assert_close(lat["mean_act"], mean_act)
    assert r["l0"] == pytest.approx(float((f_s > 0).sum(1).float().mean()))
    fvu = float((x_s - bf["x_hat"]).pow(2).sum() / (x_s - x_s.mean(0)).pow(2).sum())
    assert r["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert r["explained_variance"] == pytest.approx(1 - fvu, rel=1e-4)
    assert r["mse"] == pytest.approx(float((x_s - bf["x_hat"]).pow(2).mean()), rel=1e-4)
    dead = int((fired == 0).sum())
    assert (r["dead"], r["alive"]) == (dead, d_sae - dead)
    assert r["dense"] == int((fired.float() / len(f_s) > opts.dense_threshold).sum())
    hist = r["histogram"]
    assert sum(hist["counts"]) == r["alive"] and hist["dead"] == dead
    assert len(hist["edges"]) == len(hist["counts"]) + 1 == 29
    assert hist["edges"][0] == -7.0 and hist["edges"][-1] == 0.0

    # top contexts: sorted over every scored activation at once
    flat = f.reshape(n * t, d_sae)
    w = opts.window_before + 1 + opts.window_after
    assert lat["top_tokens"].shape == (d_sae, opts.top_n, w)
    counts = (flat > 0).sum(0)
    assert (counts < opts.top_n).any() and (counts >= opts.top_n).any()  # both cases covered
    top_vals = flat.topk(opts.top_n, dim=0).values.T  # [d_sae, N]
    torch.testing.assert_close(lat["top_acts"], top_vals)  # the N largest, descending; 0 = none
    entry = top_vals > 0
    assert torch.equal(entry.sum(1), counts.clamp(max=opts.top_n))
    c, p = lat["top_context"].long(), lat["top_position"].long()
    assert ((c >= 0) == entry).all() and ((p >= 0) == entry).all()
    assert (lat["top_tokens"][~entry] == -1).all() and (lat["top_window_acts"][~entry] == 0).all()
    # equal activations (the same prefix in two contexts) may come in either order: check that
    # each entry is a distinct scored token whose activation is the one reported
    latent = torch.arange(d_sae).unsqueeze(1).expand_as(c)
    at = f[c.clamp(min=0), p.clamp(min=0), latent]
    torch.testing.assert_close(at[entry], lat["top_acts"][entry])
    assert mask[c[entry], p[entry]].all()
    keys = torch.where(entry, c * t + p, -1 - torch.arange(opts.top_n)).sort(1).values
    assert (keys[:, 1:] != keys[:, :-1]).all()
    for j in [int(counts.argmax()), int(counts.argmin()), 0, 5, 77]:
        for i in range(min(opts.top_n, int(counts[j]))):
            c, p = int(lat["top_context"][j, i]), int(lat["top_position"][j, i])
            assert p > 0 and mask[c, p]
            for k, q in enumerate(range(p - opts.window_before, p + opts.window_after + 1)):
                if 0 <= q < t:
                    assert lat["top_tokens"][j, i, k] == ids[c, q]
                    assert float(lat["top_window_acts"][j, i, k]) == pytest.approx(
                        float(f[c, q, j]), abs=1e-6)
                else:
                    assert lat["top_tokens"][j, i, k] == -1
                    assert lat["top_window_acts"][j, i, k] == 0
            assert lat["top_window_acts"][j, i, opts.window_before] == lat["top_acts"][j, i]
    assert (lat["top_tokens"] == -1).any()  # some windows were clipped

    # vocab: the whole vocabulary, each id decoded on its own (as models.token_text does)
    assert set(ev.vocab) == {str(i) for i in range(TINY_VOCAB_SIZE)}
    used = set(lat["top_tokens"][lat["top_tokens"] >= 0].tolist())
    for i in list(used)[:20]:
        assert ev.vocab[str(i)] == loaded.tokenizer.decode([i]) == token_text(loaded.tokenizer, i)
    assert all(ev.vocab[str(i)] == token_text(loaded.tokenizer, i)
               for i in range(TINY_VOCAB_SIZE))
    assert any(v.startswith(" ") for v in ev.vocab.values())  # leading spaces kept


def test_batching_does_not_change_results(tiny: dict[str, LoadedModel]) -> None:
    """batch_contexts 1, 3 and 8: the same tensors (ids, counts, sample exactly)."""
    loaded = tiny["gpt2"]
    ctx = _contexts(loaded, 9, 20)
    sae = _topk_sae(k=4)
    runs = [evaluate_sae(sae, 1.3, loaded, ctx, 0, "mlp_out", special_ids=_special(loaded),
                         options=EvalOptions(batch_contexts=b, top_n=4, window_before=3,
                                             window_after=2, sample_n=6, hist_bins=16))
            for b in (1, 3, 8)]
    assert set(runs[0].latents) == V1_TENSORS | PASS_TENSORS | WEIGHT_TENSORS | LOGIT_TENSORS
    counts = (runs[0].latents["frequency"] * runs[0].report["scored_tokens"]).round()
    assert (counts > 6).any()  # some samples chose among more firings than they keep
    for other in runs[1:]:
        for key, value in runs[0].latents.items():
            if value.dtype == torch.int32:  # ids, positions, tokens, counts
                assert torch.equal(value, other.latents[key]), key
            else:
                torch.testing.assert_close(value, other.latents[key], msg=key)
        for key in ("fvu", "l0", "mse", *CE_KEYS, "l2_norm_in", "l2_norm_out", "l2_ratio",
                    "relative_reconstruction_bias", "cossim", "l1"):
            assert other.report[key] == pytest.approx(runs[0].report[key], rel=1e-5), key
        assert {k: v for k, v in other.report.items() if isinstance(v, (int, str, list))} == {
            k: v for k, v in runs[0].report.items() if isinstance(v, (int, str, list))}


def test_matryoshka_fvu_per_prefix_matches_brute_force(tiny: dict[str, LoadedModel]) -> None:
    """A Matryoshka SAE's report has each prefix's FVU (its first ``width`` latents alone),
    equal to a direct computation and the same at any batching; other types have null."""
    loaded = tiny["gpt2"]
    ctx = _contexts(loaded, 7, 20)
    widths = (16, 48, 96, 8 * D)
    torch.manual_seed(2)
    sae = build("matryoshka_batchtopk", D, 8 * D, k=6, matryoshka_widths=widths)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.threshold.fill_(0.2)
    opts = EvalOptions(latent_details=False, top_n=2)
    scale = _scale(loaded, ctx, 1, "residual")
    runs = [evaluate_sae(sae, scale, loaded, ctx, 1, "residual", special_ids=_special(loaded),
                         options=EvalOptions(latent_details=False, top_n=2, batch_contexts=b))
            for b in (2, 8)]
    b = _brute_force(loaded, sae, scale, ctx, 1, "residual", opts)
    x, f = b["x"][b["mask"]], b["f"][b["mask"]]
    var = float((x - x.mean(0)).pow(2).sum())
    want = [float(((f[:, :w] @ sae.W_dec[:w] + sae.b_dec) / scale - x).detach().pow(2).sum())
            / var for w in widths]
    assert len({round(w, 3) for w in want}) == len(widths)  # the prefixes differ
    for ev in runs:
        got = ev.report["matryoshka_fvu"]
        assert [e["width"] for e in got] == list(widths)
        assert [e["fvu"] for e in got] == pytest.approx(want, rel=1e-4)
        assert got[-1]["fvu"] == pytest.approx(ev.report["fvu"], rel=1e-5)
    plain = evaluate_sae(_topk_sae(k=4), 1.0, loaded, ctx, 1, "residual", options=opts)
    assert plain.report["matryoshka_fvu"] is None


class _MemoryLimited(nn.Module):
    """A real SAE that fails as CUDA does when asked to encode more than ``max_rows`` tokens."""

    def __init__(self, sae: SAE, max_rows: int) -> None:
        super().__init__()
        self.inner, self.max_rows = sae, max_rows
        self.d_in, self.d_sae, self.encoder_type = sae.d_in, sae.d_sae, sae.encoder_type
        self.rows: list[int] = []  # rows of every encode call

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        if x.shape[0] > self.max_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.encode(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(f)

    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802 (the SAELens name)
        return self.inner.W_enc

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802
        return self.inner.W_dec

    @property
    def b_enc(self) -> torch.Tensor:
        return self.inner.b_enc


def test_out_of_memory_halves_the_batch_for_good(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["gpt2"]
    ctx = _contexts(loaded, 7, 20)
    opts = {"top_n": 4, "window_before": 3, "window_after": 2}
    ref = evaluate_sae(_topk_sae(k=4), 1.3, loaded, ctx, 0, "mlp_out",
                       special_ids=_special(loaded), options=EvalOptions(batch_contexts=2, **opts))
    sae = _MemoryLimited(_topk_sae(k=4), max_rows=2 * 20)
    fractions: list[float] = []
    ev = evaluate_sae(sae, 1.3, loaded, ctx, 0, "mlp_out", special_ids=_special(loaded),
                      options=EvalOptions(batch_contexts=4, **opts),
                      progress=lambda f, _msg: fractions.append(f))
    assert sae.rows == [80, 40, 40, 40, 20]  # 4 contexts fail once, then 2 at a time
    assert fractions == pytest.approx([2 / 7, 4 / 7, 6 / 7, 1.0, 1.0])  # + weight stats
    for key, value in ref.latents.items():
        assert torch.equal(ev.latents[key], value), key
    assert {k: v for k, v in ev.report.items() if k != "created_at"} == {
        k: v for k, v in ref.report.items() if k != "created_at"}

    too_big = _MemoryLimited(_topk_sae(k=4), max_rows=10)  # not even one context fits
    with pytest.raises(torch.cuda.OutOfMemoryError):
        evaluate_sae(too_big, 1.3, loaded, ctx, 0, "mlp_out",
                     options=EvalOptions(batch_contexts=4, **opts))
    assert too_big.rows == [80, 40, 20]


def test_exclusion_options(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["qwen2"]
    ctx = _contexts(loaded, 4, 16)
    special = _special(loaded)
    n_special = int(np.isin(ctx[:, 1:], special).sum())
    assert n_special > 0
    sae = _topk_sae()

    def scored(**kw: bool) -> dict:
        return evaluate_sae(sae, 1.0, loaded, ctx, 2, "residual", special_ids=special,
                            options=EvalOptions(**kw)).report

    assert scored()["scored_tokens"] == 4 * 15 - n_special
    assert scored(exclude_special=False)["scored_tokens"] == 4 * 15
    assert scored(exclude_special=False, exclude_pos0=False)["scored_tokens"] == 4 * 16
    ev = evaluate_sae(sae, 1.0, loaded, ctx, 2, "residual", special_ids=special)
    centre = ev.latents["top_tokens"][:, :, ev.report["window_before"]]
    assert not np.isin(centre.numpy(), special).any()
    assert (ev.latents["top_position"] != 0).all()


def test_non_causal_model(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["bert"]
    tok = loaded.tokenizer
    rows = [tok(line, padding="max_length", max_length=16, truncation=True)["input_ids"]
            for line in kjv_lines(6)]
    ctx = np.array(rows, dtype=np.int32)
    ev = evaluate_sae(_topk_sae(), 1.0, loaded, ctx, 2, "mlp_out", special_ids=_special(loaded))
    r = ev.report
    assert r["is_causal"] is False
    assert all(r[k] is None for k in CE_KEYS)
    assert "not a causal LM" in r["downstream_note"]
    assert r["fvu"] is not None and r["scored_tokens"] > 0
    assert (ev.latents["top_context"][:, 0] >= 0).sum() == r["alive"]
    assert set(ev.latents["top_context"].unique().tolist()) <= {-1, *range(len(rows))}
    assert ev.vocab


def test_autocast_and_progress(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["gpt_neox"]
    ctx = _contexts(loaded, 5, 12)
    calls: list[tuple[float, str]] = []
    ev = evaluate_sae(_identity_sae(), 2.0, loaded, ctx, 1, "attn_out",
                      special_ids=_special(loaded), autocast_dtype=torch.bfloat16,
                      options=EvalOptions(batch_contexts=2),
                      progress=lambda frac, msg: calls.append((frac, msg)))
    assert [c[0] for c in calls] == pytest.approx([0.4, 0.8, 1.0, 1.0])
    assert "weight statistics" in calls[-1][1]
    assert all(isinstance(c[1], str) and c[1] for c in calls)
    assert ev.report["fvu"] < 1e-3  # bf16 rounding only
    assert ev.latents["top_acts"].dtype == torch.float32


# ---------------------------------------------------------------------------- format, files
def test_format_and_round_trip(tiny: dict[str, LoadedModel], tmp_path: Path) -> None:
    loaded = tiny["mistral"]
    ctx = _contexts(loaded, 4, 16)
    opts = EvalOptions(top_n=3, window_before=4, window_after=2)
    ev = evaluate_sae(_topk_sae(), 1.0, loaded, ctx, 1, "residual",
                      special_ids=_special(loaded), options=opts, meta={"step": 12})
    assert list(ev.report) == REPORT_KEYS
    r = ev.report
    assert r["format"] == "sae-studio-eval/2" and r["encoder_type"] == "topk"
    assert (r["latent_details"], r["has_logits"]) == (True, True)
    assert (r["sample_n"], r["hist_bins"], r["neighbours_n"], r["logits_n"],
            r["promoters_n"]) == (25, 64, 10, 10, 5)
    assert (r["d_in"], r["d_sae"], r["model"], r["is_causal"]) == (D, 8 * D, loaded.info.name,
                                                                   True)
    assert (r["top_n"], r["window_before"], r["window_after"]) == (3, 4, 2)
    d_sae, w = 8 * D, 7
    expected = {
        "frequency": (torch.float32, (d_sae,)), "max_act": (torch.float32, (d_sae,)),
        "mean_act": (torch.float32, (d_sae,)), "top_acts": (torch.float32, (d_sae, 3)),
        "top_context": (torch.int32, (d_sae, 3)), "top_position": (torch.int32, (d_sae, 3)),
        "top_tokens": (torch.int32, (d_sae, 3, w)),
        "top_window_acts": (torch.float32, (d_sae, 3, w)),
        "hist_max": (torch.float32, (d_sae,)), "hist_counts": (torch.int32, (d_sae, 64)),
        "contexts_fired": (torch.int32, (d_sae,)),
        "sample_acts": (torch.float32, (d_sae, 25)),
        "sample_context": (torch.int32, (d_sae, 25)),
        "sample_position": (torch.int32, (d_sae, 25)),
        "sample_tokens": (torch.int32, (d_sae, 25, w)),
        "sample_window_acts": (torch.float32, (d_sae, 25, w)),
        "neighbour_ids": (torch.int32, (d_sae, 10)),
        "neighbour_cosines": (torch.float32, (d_sae, 10)),
        "max_decoder_cosine_per_latent": (torch.float32, (d_sae,)),
        "max_encoder_cosine_per_latent": (torch.float32, (d_sae,)),
        "encoder_decoder_cosine": (torch.float32, (d_sae,)),
        "encoder_norm": (torch.float32, (d_sae,)), "encoder_bias": (torch.float32, (d_sae,)),
        "logit_top_ids": (torch.int32, (d_sae, 10)),
        "logit_top_values": (torch.float32, (d_sae, 10)),
        "logit_bottom_ids": (torch.int32, (d_sae, 10)),
        "logit_bottom_values": (torch.float32, (d_sae, 10)),
        "token_promoter_ids": (torch.int32, (TINY_VOCAB_SIZE, 5)),
        "token_promoter_values": (torch.float32, (TINY_VOCAB_SIZE, 5)),
    }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in ev.latents.items()} == expected

    folder = tmp_path / "run" / "eval"
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("old")  # an existing folder is replaced as a whole
    assert save_evaluation(ev, folder) == folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "latents.safetensors", "report.json", "vocab.json"]
    assert [p.name for p in folder.parent.iterdir()] == ["eval"]  # no temporary folders left
    back = load_evaluation(folder)
    assert back.report == json.loads(json.dumps(ev.report))
    assert back.vocab == ev.vocab
    assert set(back.latents) == set(ev.latents)
    for k, v in ev.latents.items():
        assert back.latents[k].dtype == v.dtype and torch.equal(back.latents[k], v), k
    from safetensors import safe_open

    with safe_open(str(folder / "latents.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "sae-studio-latents/2"}

    # NaN / inf never reach the JSON: they become null
    bad = Evaluation(dict(ev.report, fvu=float("nan"), kl_div=float("inf")), ev.latents,
                     ev.vocab)
    save_evaluation(bad, folder)
    text = (folder / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    again = load_evaluation(folder).report
    assert again["fvu"] is None and again["kl_div"] is None
    assert [p.name for p in folder.parent.iterdir()] == ["eval"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="incomplete"):
        load_evaluation(tmp_path)
    for name in ("report.json", "vocab.json", "latents.safetensors"):
        (tmp_path / name).write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_evaluation(tmp_path)


def test_input_errors(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["phi"]
    ctx = _contexts(loaded, 2, 8)
    sae = _topk_sae()
    with pytest.raises(DataError, match="no held-out contexts"):
        evaluate_sae(sae, 1.0, loaded, ctx[:0], 1, "residual")
    with pytest.raises(DataError, match="2-D"):
        evaluate_sae(sae, 1.0, loaded, ctx[0], 1, "residual")
    bad = ctx.copy()
    bad[1, 3] = loaded.info.vocab_size + 5
    with pytest.raises(DataError, match="vocabulary"):
        evaluate_sae(sae, 1.0, loaded, bad, 1, "residual")
    with pytest.raises(DataError, match="vocabulary"):
        evaluate_sae(sae, 1.0, loaded, torch.from_numpy(ctx) - 100, 1, "residual")
    with pytest.raises(ConfigError, match="hook point"):
        evaluate_sae(sae, 1.0, loaded, ctx, 1, "nowhere")
    with pytest.raises(ConfigError, match="out of range"):
        evaluate_sae(sae, 1.0, loaded, ctx, 9, "residual")
    with pytest.raises(ConfigError, match="16-dimensional"):
        evaluate_sae(build("topk", 16, 64, k=4), 1.0, loaded, ctx, 1, "residual")
    with pytest.raises(DataError, match="No held-out token was scored"):
        evaluate_sae(sae, 1.0, loaded, ctx[:, :1], 1, "residual")
    with pytest.raises(ConfigError, match="top_n"):
        evaluate_sae(sae, 1.0, loaded, ctx, 1, "residual", options=EvalOptions(top_n=0))


# ---------------------------------------------------------------------------- format 2 details
def _splitmix(x: int) -> int:
    """splitmix64's finaliser on Python ints (the reference for evaluator.sample_keys)."""
    m = (1 << 64) - 1
    x &= m
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _key(c: int, p: int, j: int) -> int:
    h = _splitmix(_splitmix(_splitmix(c ^ 0x9E3779B97F4A7C15) ^ p) ^ j)
    return min(h & ((1 << 63) - 1), (1 << 63) - 2)


def test_sample_keys_are_a_uniform_hash() -> None:
    c, p, j = (torch.randint(0, 1 << 20, (200,), generator=torch.Generator().manual_seed(i))
               for i in range(3))
    keys = sample_keys(c, p, j)
    assert keys.tolist() == [_key(*v) for v in zip(c.tolist(), p.tolist(), j.tolist(),
                                                    strict=True)]
    # 400 latents firing on all 50 x 40 (context, position) pairs: the 25 smallest keys of each
    # pick every context and position about equally often (chi-square, 49 and 39 degrees)
    cc, pp = torch.meshgrid(torch.arange(50), torch.arange(40), indexing="ij")
    cc, pp = cc.reshape(-1), pp.reshape(-1)
    picked_c, picked_p = [], []
    for latent in range(400):
        sel = sample_keys(cc, pp, torch.full_like(cc, latent)).topk(25, largest=False).indices
        assert len(set(sel.tolist())) == 25
        picked_c.append(cc[sel])
        picked_p.append(pp[sel])
    for picked, buckets in ((torch.cat(picked_c), 50), (torch.cat(picked_p), 40)):
        counts = torch.bincount(picked, minlength=buckets).double()
        expected = len(picked) / buckets
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 2 * buckets, chi2


def test_histogram_merges_exactly() -> None:
    """Chunks in any order and split give the counts of one pass with the final range."""
    from worker.engine.evaluator import Histogram

    g = torch.Generator().manual_seed(3)
    d_sae, bins = 6, 16
    lat = torch.randint(0, d_sae - 1, (4000,), generator=g)  # the last latent never fires
    vals = torch.rand(4000, generator=g) * torch.tensor([1e-3, 0.5, 1.0, 7.0, 300.0, 1.0])[lat]
    vals[:40] = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5, 3.0, 4.0, 8.0] * 5)  # edges, powers
    vals[:40] = vals[:40].clamp(max=float(vals.max()))
    runs = []
    for seed in range(3):
        order = torch.randperm(4000, generator=torch.Generator().manual_seed(seed))
        parts = [Histogram.empty(d_sae, bins, torch.device("cpu")) for _ in range(3)]
        for k, chunk in enumerate(order.chunk(7)):
            parts[k % 3].add(lat[chunk], vals[chunk])
        parts[2].merge(parts[0])
        parts[1].merge(parts[2])
        runs.append(parts[1])
    for h in runs[1:]:
        assert torch.equal(h.counts, runs[0].counts) and torch.equal(h.exp, runs[0].exp)
    h = runs[0]
    upper = h.upper()
    assert upper[-1] == 0 and (h.counts[-1] == 0).all()
    for j in range(d_sae - 1):
        v = vals[lat == j].double()
        top = float(upper[j])
        assert top > v.max() >= top / 2 and math.frexp(top)[0] == 0.5  # a power of two above
        direct = torch.bincount((v * bins / top).floor().long(), minlength=bins)
        assert torch.equal(h.counts[j], direct), j
        assert int(h.counts[j].sum()) == len(v)


def test_latent_details_match_brute_force(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["llama"]
    ctx = _contexts(loaded, 12, 24)
    layer, hook = 1, "residual"
    scale = _scale(loaded, ctx, layer, hook)
    sae = _topk_sae()
    opts = EvalOptions(top_n=5, window_before=4, window_after=2, batch_contexts=5, sample_n=7,
                       hist_bins=16)
    ev = evaluate_sae(sae, scale, loaded, ctx, layer, hook, special_ids=_special(loaded),
                      options=opts)
    bf = _brute_force(loaded, sae, scale, ctx, layer, hook, opts)
    f, mask, ids = bf["f"], bf["mask"], bf["ids"]
    n, t, d_sae = f.shape
    r, lat = ev.report, ev.latents
    f_s, x, x_hat = f[mask], bf["x"][mask], bf["x_hat"]
    fired = (f_s > 0).sum(0)

    # histogram: the non-zero activations in 16 bins from 0 to a power of two above the max
    assert torch.equal(lat["hist_counts"].sum(1), fired.int())
    for j in range(d_sae):
        v = f_s[:, j][f_s[:, j] > 0].double()
        top = float(lat["hist_max"][j])
        if not len(v):
            assert top == 0 and (lat["hist_counts"][j] == 0).all()
            continue
        assert top > v.max() >= top / 2 and math.frexp(top)[0] == 0.5
        direct = torch.bincount((v * 16 / top).floor().long(), minlength=16)
        assert torch.equal(lat["hist_counts"][j], direct.int()), j
    assert (fired == 0).any() and (fired > 7).any()  # dead latents and fuller samples covered

    # contexts fired
    assert torch.equal(lat["contexts_fired"], (f > 0).any(1).sum(0).int())

    # the sample: the 7 firings of smallest key, sorted by activation
    for j in range(d_sae):
        cs, ps = (f[:, :, j] > 0).nonzero(as_tuple=True)
        keys = [_key(c, p, j) for c, p in zip(cs.tolist(), ps.tolist(), strict=True)]
        chosen = sorted(zip(keys, cs.tolist(), ps.tolist(), strict=True))[:7]
        k = len(chosen)
        got_c, got_p = lat["sample_context"][j].tolist(), lat["sample_position"][j].tolist()
        assert {(c, p) for _, c, p in chosen} == set(zip(got_c[:k], got_p[:k], strict=True))
        assert got_c[k:] == got_p[k:] == [-1] * (7 - k)
        acts = lat["sample_acts"][j]
        assert (acts[k:] == 0).all() and (acts[:k] > 0).all()
        assert (acts[:-1] >= acts[1:]).all()  # descending
        for i in range(k):
            c, p = got_c[i], got_p[i]
            assert float(acts[i]) == pytest.approx(float(f[c, p, j]), abs=1e-6)
            for w_i, q in enumerate(range(p - 4, p + 3)):
                if 0 <= q < t:
                    assert lat["sample_tokens"][j, i, w_i] == ids[c, q]
                    assert float(lat["sample_window_acts"][j, i, w_i]) == pytest.approx(
                        float(f[c, q, j]), abs=1e-6)
                else:
                    assert lat["sample_tokens"][j, i, w_i] == -1
                    assert lat["sample_window_acts"][j, i, w_i] == 0
        assert (lat["sample_tokens"][j, k:] == -1).all()

    # SAEBench's core figures over the scored tokens
    n_in, n_out = x.norm(dim=1), x_hat.norm(dim=1)
    assert r["l2_norm_in"] == pytest.approx(float(n_in.mean()), rel=1e-4)
    assert r["l2_norm_out"] == pytest.approx(float(n_out.mean()), rel=1e-4)
    assert r["l2_ratio"] == pytest.approx(float((n_out / n_in).mean()), rel=1e-4)
    assert r["cossim"] == pytest.approx(float(((x * x_hat).sum(1) / (n_in * n_out)).mean()),
                                        rel=1e-4)
    assert r["relative_reconstruction_bias"] == pytest.approx(
        float(n_out.pow(2).mean() / (x * x_hat).sum(1).mean()), rel=1e-4)
    assert r["l1"] == pytest.approx(float(f_s.sum(1).mean()), rel=1e-4)
    freq = fired.double() / len(f_s)
    assert r["freq_over_1_percent"] == pytest.approx(float((freq > 0.01).double().mean()))
    assert r["freq_over_10_percent"] == pytest.approx(float((freq > 0.1).double().mean()))
    assert 0 < r["freq_over_10_percent"] < r["freq_over_1_percent"] < 1
    assert r["normalized_freq_over_1_percent"] == pytest.approx(
        float(freq[freq > 0.01].sum() / freq.sum()))
    assert r["normalized_freq_over_10_percent"] == pytest.approx(
        float(freq[freq > 0.1].sum() / freq.sum()))
    assert r["frac_alive"] == pytest.approx(r["alive"] / d_sae)
    # the weight statistics are latent_stats' (tests/engine/test_latent_stats.py)
    assert r["max_decoder_cosine"] == pytest.approx(float(lat["neighbour_cosines"][:, 0].max()))
    assert r["has_logits"] is True


def test_latent_details_off_and_non_causal(tiny: dict[str, LoadedModel], tmp_path: Path
                                           ) -> None:
    loaded = tiny["qwen2"]
    ctx = _contexts(loaded, 5, 16)
    kw = {"special_ids": _special(loaded)}
    full = evaluate_sae(_topk_sae(), 1.0, loaded, ctx, 1, "residual", **kw)
    off = evaluate_sae(_topk_sae(), 1.0, loaded, ctx, 1, "residual", **kw,
                       options=EvalOptions(latent_details=False))
    assert set(off.latents) == V1_TENSORS
    for key in V1_TENSORS:
        assert torch.equal(off.latents[key], full.latents[key]), key
    r = off.report
    assert list(r) == REPORT_KEYS and r["latent_details"] is False and r["has_logits"] is False
    for key in ("average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                "max_decoder_cosine", "near_duplicate_share"):
        assert r[key] is None and full.report[key] is not None, key
    for key in ("l2_ratio", "cossim", "l1", "kl_div_with_ablation", "kl_div_score",
                "freq_over_1_percent", "frac_alive"):  # cheap: computed either way
        assert r[key] == full.report[key], key
    save_evaluation(off, tmp_path / "eval")
    assert set(load_evaluation(tmp_path / "eval").latents) == V1_TENSORS

    bert = tiny["bert"]
    rows = [bert.tokenizer(line, padding="max_length", max_length=16,
                           truncation=True)["input_ids"] for line in kjv_lines(6)]
    ev = evaluate_sae(_topk_sae(), 1.0, bert, np.array(rows), 2, "mlp_out",
                      special_ids=_special(bert))
    assert ev.report["has_logits"] is False  # an encoder: no output embedding
    assert ev.report["kl_div_with_ablation"] is None and ev.report["kl_div_score"] is None
    assert set(ev.latents) == V1_TENSORS | PASS_TENSORS | WEIGHT_TENSORS
    assert len(ev.vocab) == bert.tokenizer.vocab_size


def test_load_reads_format_1(tiny: dict[str, LoadedModel], tmp_path: Path) -> None:
    """A /1 folder (old trainings on users' disks) still loads; another format does not."""
    loaded = tiny["gpt2"]
    ev = evaluate_sae(_topk_sae(), 1.0, loaded, _contexts(loaded, 3, 12), 0, "residual",
                      options=EvalOptions(latent_details=False))
    old = {k: v for k, v in ev.report.items() if k in REPORT_KEYS[:32]}
    save_evaluation(Evaluation(dict(old, format="sae-studio-eval/1"), ev.latents, ev.vocab),
                    tmp_path / "old")
    assert load_evaluation(tmp_path / "old").report["format"] == "sae-studio-eval/1"
    save_evaluation(Evaluation(dict(old, format="sae-studio-eval/9"), ev.latents, ev.vocab),
                    tmp_path / "new")
    with pytest.raises(DataError, match="not a sae-studio-eval/2 report"):
        load_evaluation(tmp_path / "new")
