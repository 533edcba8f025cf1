"""Per-latent statistics of an SAE's weights alone (no activations): the evaluation's
weight-only part (docs/eval-format.md, format 2).

    stats = latent_stats(sae, scale, model, options)   # LatentStats(tensors, report)

- ``sae_weights``: the one accessor of an SAE's encoder ``W_enc`` [d_in, d_sae], decoder
  ``W_dec`` [d_sae, d_in] and encoder bias ``b_enc`` [d_sae] (every registry type keeps these
  names, ``architectures.base.SAE``; None for a module without them);
- decoder neighbours: each latent's ``neighbours_n`` nearest other latents by cosine of their
  decoder rows (descending), hence the decoder's maximum pairwise cosine and the share of
  latents with a near-duplicate (nearest cosine above ``NEAR_DUPLICATE``);
- SAEBench's per-feature encoder statistics (``get_featurewise_weight_based_metrics`` of its
  core eval): the max cosine of each encoder column to any other, the cosine between a latent's
  encoder column and decoder row, the encoder column's norm, the encoder bias; and the averages
  of the max encoder / decoder cosines;
- logit lens (models with an output embedding whose width is the SAE's ``d_in``): each latent's
  decoder row on the raw activation scale (``W_dec[i] / scale``: the SAE was trained on
  activations times ``scale``; the evaluation passes a transcoder's ``target_scale``, the scale
  its decoder writes on) times the unembedding ``W_U`` [vocab, d_in], no final norm; its
  ``logits_n`` highest and lowest tokens, and per token id the ``promoters_n`` latents whose
  value for it is highest.

Every product is chunked (``CHUNK_ELEMENTS`` values at a time), so d_sae 16k x vocab 49k needs
a few hundred MB at most. Computed in float32 on the device the weights are on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_ELEMENTS = 1 << 24  # values of one [chunk, d_sae] or [chunk, vocab] product (64 MiB)
NEAR_DUPLICATE = 0.9  # nearest decoder cosine above which a latent has a near-duplicate


@dataclass
class SAEWeights:
    """An SAE's weights in the SAELens layout, float32 (``b_enc`` zeros where the type has
    none)."""

    W_enc: Tensor  # [d_in, d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_enc: Tensor  # [d_sae]


@dataclass
class LatentStats:
    tensors: dict[str, Tensor]  # latents.safetensors tensors, on the CPU
    report: dict[str, Any]  # report.json keys (see ``REPORT_KEYS``)


REPORT_KEYS = ("average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
               "max_decoder_cosine", "near_duplicate_share", "has_logits")


def sae_weights(sae: nn.Module) -> SAEWeights | None:
    """``sae``'s W_enc, W_dec, b_enc, detached, in float32 (the tensors themselves when they
    are float32 already), or None when it has no W_enc / W_dec of matching shapes."""
    w_enc, w_dec = getattr(sae, "W_enc", None), getattr(sae, "W_dec", None)
    if not isinstance(w_enc, Tensor) or not isinstance(w_dec, Tensor):
        return None
    if w_enc.dim() != 2 or w_dec.dim() != 2 or w_enc.shape != w_dec.T.shape:
        return None
    b_enc = getattr(sae, "b_enc", None)
    if not isinstance(b_enc, Tensor) or b_enc.shape != (w_enc.shape[1],):
        b_enc = torch.zeros(w_enc.shape[1], device=w_enc.device)
    return SAEWeights(w_enc.detach().float(), w_dec.detach().float(), b_enc.detach().float())


def unembedding(model: nn.Module | None, d_in: int) -> Tensor | None:
    """The model's output embedding ``W_U`` [vocab, d_in] (``get_output_embeddings``), or None
    when it has none or its width is not ``d_in``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != d_in:
        return None
    return weight.detach()


def _rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, width))


def nearest(directions: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """For each row of ``directions`` [m, d], the ``n`` other rows of highest cosine similarity,
    descending: (ids int64 [m, n], cosines float32 [m, n]); -1 / 0 pad when m - 1 < n. A zero
    row has cosine 0 with every row."""
    m = directions.shape[0]
    unit = F.normalize(directions.float(), dim=1)
    k = min(n, m - 1)
    ids = torch.full((m, n), -1, dtype=torch.long, device=unit.device)
    cos = torch.zeros(m, n, device=unit.device)
    if k <= 0:
        return ids, cos
    per = _rows_per_chunk(m)
    for a in range(0, m, per):
        sims = unit[a:a + per] @ unit.T  # [c, m]
        rows = torch.arange(sims.shape[0], device=unit.device)
        sims[rows, rows + a] = float("-inf")  # not itself
        vals, idx = sims.topk(k, dim=1)
        ids[a:a + per, :k], cos[a:a + per, :k] = idx, vals
    return ids, cos


def logit_lens(directions: Tensor, w_u: Tensor, n: int, promoters: int
               ) -> dict[str, Tensor]:
    """``directions`` [d_sae, d] @ ``w_u`` [vocab, d]^T, chunked over latents: each latent's
    ``n`` highest tokens (descending) and ``n`` lowest (ascending), and each token's
    ``promoters`` latents of highest value (descending). Ids int64 (-1 pads), values float32."""
    d_sae, vocab = directions.shape[0], w_u.shape[0]
    dev = directions.device
    k, kp = min(n, vocab), min(promoters, d_sae)
    out = {
        "logit_top_ids": torch.full((d_sae, n), -1, dtype=torch.long, device=dev),
        "logit_top_values": torch.zeros(d_sae, n, device=dev),
        "logit_bottom_ids": torch.full((d_sae, n), -1, dtype=torch.long, device=dev),
        "logit_bottom_values": torch.zeros(d_sae, n, device=dev),
    }
    prom_vals = torch.full((kp, vocab), float("-inf"), device=dev)
    prom_ids = torch.full((kp, vocab), -1, dtype=torch.long, device=dev)
    w = w_u.to(device=dev, dtype=torch.float32)
    per = _rows_per_chunk(vocab)
    for a in range(0, d_sae, per):
        logits = directions[a:a + per].float() @ w.T  # [c, vocab]
        vals, idx = logits.topk(k, dim=1)
        out["logit_top_ids"][a:a + per, :k], out["logit_top_values"][a:a + per, :k] = idx, vals
        vals, idx = logits.topk(k, dim=1, largest=False)
        out["logit_bottom_ids"][a:a + per, :k] = idx
        out["logit_bottom_values"][a:a + per, :k] = vals
        if kp:
            cv, ci = logits.topk(min(kp, logits.shape[0]), dim=0)  # [<=kp, vocab]
            both_v = torch.cat([prom_vals, cv])
            both_i = torch.cat([prom_ids, ci + a])
            prom_vals, sel = both_v.topk(kp, dim=0)
            prom_ids = both_i.gather(0, sel)
    ids = torch.full((vocab, promoters), -1, dtype=torch.long, device=dev)
    vals = torch.zeros(vocab, promoters, device=dev)
    ids[:, :kp], vals[:, :kp] = prom_ids.T, prom_vals.T
    out["token_promoter_ids"], out["token_promoter_values"] = ids, vals
    return out


def latent_stats(sae: nn.Module, scale: float, model: nn.Module | None, *, neighbours_n: int = 10,
                 logits_n: int = 10, promoters_n: int = 5) -> LatentStats | None:
    """Every weight-only statistic of ``sae`` (trained on activations times ``scale``) for the
    evaluation files; ``model`` gives the unembedding (None: no logit lens). None when the
    module has no SAE weights (``sae_weights``)."""
    weights = sae_weights(sae)
    if weights is None:
        return None
    with torch.no_grad():
        dec_ids, dec_cos = nearest(weights.W_dec, neighbours_n)
        _, enc_cos = nearest(weights.W_enc.T, 1)
        d_sae = weights.W_dec.shape[0]
        has_others = d_sae > 1
        max_dec = dec_cos[:, 0]
        max_enc = enc_cos[:, 0]
        tensors = {
            "neighbour_ids": dec_ids,
            "neighbour_cosines": dec_cos,
            "max_decoder_cosine_per_latent": max_dec.clone(),
            "max_encoder_cosine_per_latent": max_enc,
            "encoder_decoder_cosine": F.cosine_similarity(weights.W_enc.T, weights.W_dec, dim=1),
            "encoder_norm": weights.W_enc.norm(dim=0),
            "encoder_bias": weights.b_enc.clone(),
        }
        w_u = unembedding(model, weights.W_dec.shape[1])
        if w_u is not None:
            tensors.update(logit_lens(weights.W_dec / float(scale), w_u, logits_n, promoters_n))
    report = {
        "average_max_encoder_cosine_sim": float(max_enc.mean()) if has_others else None,
        "average_max_decoder_cosine_sim": float(max_dec.mean()) if has_others else None,
        "max_decoder_cosine": float(max_dec.max()) if has_others else None,
        "near_duplicate_share": (float((max_dec > NEAR_DUPLICATE).float().mean())
                                 if has_others else None),
        "has_logits": w_u is not None,
    }
    assert tuple(report) == REPORT_KEYS
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        out[key] = (value.to(torch.int32) if key.endswith("_ids") else value.float()).contiguous()
    return LatentStats(out, report)
