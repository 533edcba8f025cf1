"""Interactive probes of a trained SAE: its latents on the user's text, and steering with one.

    sae = load_probe_sae(checkpoint)                 # the SAE, its scale, layer and hook point
    probe = Probe(loaded, sae)                       # loaded: models.load_model(...)
    probe.activations("In the beginning", latent=7)  # the issue's JSON (below)
    probe.steer("In the beginning", latent=7, coefficient=40.0, max_new_tokens=32, seed=0)

``activations(text, latent=None)`` tokenises ``text`` as a training context is
(``tokenize_context``: corpora's policy, BOS first when the tokenizer has one, at most the
context size the SAE was trained on), runs the model only as far as the hook point
(``models.run_to``), encodes the activations times ``scale`` (as in training) and answers::

    {"tokens": [{"id", "text", "acts": [[latent, value], ...] | null}, ...],
     "latent": n | null, "latent_acts": [value | null, one per token] | null}

``acts`` holds the token's strongest latents (at most ``TOP_ACTS``, highest first, only those
that fire: value > 0); position 0 and special tokens (``tokenizer.all_special_ids``) get null
there and in ``latent_acts``, as they are not scored in training or evaluation. Token text is
``models.token_text``.

``steer(prompt, latent, coefficient, max_new_tokens, seed)`` (causal LMs only) generates twice
from the same tokenised prompt: once as the model is, once with ``coefficient * W_dec[latent] /
scale`` (the decoder row in raw activation units) added to the hook point's activation at every
position, prompt and generated tokens alike. ``seed=None`` decodes greedily; an integer seed
samples at ``TEMPERATURE`` with a ``torch.Generator`` of that seed, the same for both runs (so
coefficient 0 gives the baseline exactly, and the global RNG a training in another thread uses
is never touched). Generation stops at ``max_new_tokens`` or the end-of-sequence token. Answers
``{"baseline", "steered"}``: the generated continuations only (the prompt not repeated), decoded
without special tokens.

A transcoder (its checkpoint names a ``target_hook_point``: the source metadata's, else the
config's) reads its latents at its input hook point (e.g. ``mlp_in``, the MLP's input) like an
SAE, but its decoder writes where its output goes: steering adds ``coefficient * W_dec[latent] /
target_scale`` (the checkpoint meta's ``target_scale``, the target's training scale) to the
TARGET hook point's activation (e.g. ``mlp_out``). Every hook goes through ``models.add_hook``
(an input hook point is a forward pre-hook).

No database, queue or web code here: ``worker.interactive`` keeps loaded probes warm and
``worker.tasks`` runs them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .export import sae_from_checkpoint
from .models import LoadedModel, add_hook, hook_module, max_positions, run_to, token_text

TOP_ACTS = 10
"""Latents listed per token in ``activations``."""
MAX_NEW_TOKENS = 128
"""The longest continuation ``steer`` generates."""
TEMPERATURE = 0.7
"""Sampling temperature of ``steer`` with a seed."""


@dataclass
class ProbeSAE:
    """A trained SAE as the probes use it: trained on activations times ``scale`` at
    ``hook_point`` of block ``layer``, on contexts of ``context_size`` tokens. A transcoder
    also names the hook point its output predicts (``target_hook_point``, same block) and the
    target's training scale (``target_scale``; None: ``scale``)."""

    sae: nn.Module
    scale: float
    layer: int
    hook_point: str
    context_size: int
    step: int
    target_hook_point: str | None = None
    target_scale: float | None = None

    @property
    def output_hook_point(self) -> str:
        """Where the decoder writes: the target hook point (a transcoder's), else the input's."""
        return self.target_hook_point or self.hook_point

    @property
    def output_scale(self) -> float:
        """The scale the decoder writes on (raw units = decoder / this)."""
        return float(self.scale if self.target_scale is None else self.target_scale)


def load_probe_sae(checkpoint: Path | str, device: torch.device | str = "cpu") -> ProbeSAE:
    """The SAE of a training checkpoint (as ``export.sae_from_checkpoint`` reads it), on
    ``device`` in eval mode, with the scale, layer, hook point and context size it was trained
    with (the activation source's metadata, else the config's); a transcoder's with its target
    hook point and target scale too."""
    sae, meta = sae_from_checkpoint(checkpoint)
    src = meta.get("source_meta") or {}
    cfg = meta.get("config") or {}
    layer = src.get("layer", cfg.get("layer"))
    if layer is None:
        raise ConfigError(f"The checkpoint {Path(checkpoint).name} does not say which layer its "
                          "SAE reads; probe a checkpoint of a training from a model.")
    context = src.get("context_size") or cfg.get("context_size") or 128
    target = None
    if getattr(sae, "transcoder", False):  # built so because the config names its target
        target = src.get("target_hook_point") or cfg.get("target_hook_point")
    scale = float(meta.get("scale", 1.0))
    sae.to(device).eval().requires_grad_(False)
    return ProbeSAE(sae=sae, scale=scale, layer=int(layer),
                    hook_point=str(src.get("hook_point") or cfg.get("hook_point") or "residual"),
                    context_size=int(context), step=int(meta["step"]),
                    target_hook_point=None if target is None else str(target),
                    target_scale=(float(meta.get("target_scale") or scale)
                                  if target is not None else None))


def bos_id(tokenizer: Any) -> int | None:
    """The id a training context starts with (corpora's policy): ``bos_token_id``, else
    ``cls_token_id``, else None."""
    found = getattr(tokenizer, "bos_token_id", None)
    if found is None:
        found = getattr(tokenizer, "cls_token_id", None)
    return None if found is None else int(found)


def tokenize_context(tokenizer: Any, text: str, context_size: int) -> list[int]:
    """``text`` as one training context: tokenised without special tokens, BOS first when the
    tokenizer has one (counted in ``context_size``), cut to ``context_size`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_id(tokenizer)
    if bos is not None:
        return [bos, *ids[:max(0, context_size - 1)]]
    return list(ids[:context_size])


class Probe:
    """A loaded model and one of its SAEs, ready for ``activations`` and ``steer``. Not safe
    for two calls at once (``steer`` hooks the model): callers serialise (worker.interactive)."""

    def __init__(self, loaded: LoadedModel, sae: ProbeSAE) -> None:
        self.loaded, self.psae = loaded, sae
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.d_sae = int(sae.sae.d_sae)
        self.special = {int(i) for i in getattr(self.tokenizer, "all_special_ids", ()) or ()}
        # steering adds to the activation the decoder writes (a transcoder's target)
        self.module = hook_module(self.model, sae.layer, sae.output_hook_point)
        # the KV cache's keyword: ``cache`` in newer transformers, ``past_key_values`` before
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _check_latent(self, latent: int | None) -> None:
        if latent is not None and not 0 <= latent < self.d_sae:
            raise ConfigError(f"Latent {latent} does not exist: this SAE has {self.d_sae:,} "
                              f"latents (0 to {self.d_sae - 1}).",
                              {"latent": f"Enter a latent from 0 to {self.d_sae - 1}."})

    def encode(self, ids: list[int]) -> Tensor:
        """The SAE's latents [T, d_sae] (float32, CPU) for one context of token ids."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            act = run_to(self.model, self.psae.layer, self.psae.hook_point, input_ids=input_ids)
            x = act.reshape(len(ids), -1).float()
            f = self.psae.sae.encode(x * self.psae.scale)
        return f.float().cpu()

    def activations(self, text: str, latent: int | None = None) -> dict[str, Any]:
        """The issue's ``activations`` JSON for ``text`` (module docstring)."""
        self._check_latent(latent)
        ids = tokenize_context(self.tokenizer, text, self.psae.context_size)
        if len(ids) <= (1 if bos_id(self.tokenizer) is not None else 0):
            raise ConfigError("The text has no tokens; type some text.",
                            {"text": "Type some text."})
        f = self.encode(ids)
        k = min(TOP_ACTS, self.d_sae)
        values, latents = f.topk(k, dim=1)
        tokens, latent_acts = [], []
        for pos, tok in enumerate(ids):
            scored = pos > 0 and tok not in self.special
            acts = None
            if scored:
                acts = [[int(n), float(v)] for n, v in zip(latents[pos].tolist(),
                                                           values[pos].tolist(), strict=True)
                        if v > 0]
            tokens.append({"id": int(tok), "text": token_text(self.tokenizer, int(tok)),
                           "acts": acts})
            if latent is not None:
                latent_acts.append(float(f[pos, latent]) if scored else None)
        return {"tokens": tokens, "latent": latent,
                "latent_acts": latent_acts if latent is not None else None}

    # ------------------------------------------------------------------ steering
    @contextmanager
    def _added(self, vector: Tensor | None) -> Iterator[None]:
        """Add ``vector`` [d] to the activation at the decoder's hook point
        (``ProbeSAE.output_hook_point``) at every position (None: no hook)."""
        if vector is None:
            yield
            return

        def add(act: Tensor) -> Tensor:
            return act + vector.to(device=act.device, dtype=act.dtype)

        handle = add_hook(self.module, self.psae.output_hook_point, add)
        try:
            yield
        finally:
            handle.remove()

    def _generate(self, ids: list[int], max_new: int, seed: int | None,
                  vector: Tensor | None) -> list[int]:
        """The continuation's token ids: greedy (seed None) or sampled with its own generator,
        with the KV cache, stopping at end-of-sequence."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        out: list[int] = []
        step_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        past = None
        with torch.no_grad(), self._added(vector):
            for _ in range(max_new):
                res = self.model(input_ids=step_ids, use_cache=True, **{self._cache_kw: past})
                past = _cache_of(res)
                logits = res.logits[0, -1].float()
                if gen is None:
                    nxt = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                out.append(nxt)
                if eos is not None and nxt == eos:
                    break
                step_ids = torch.tensor([[nxt]], dtype=torch.long, device=self.device)
        return out

    def steer(self, prompt: str, latent: int, coefficient: float, max_new_tokens: int = 32,
              seed: int | None = None) -> dict[str, str]:
        """``{"baseline", "steered"}`` continuations of ``prompt`` (module docstring)."""
        if not self.loaded.info.is_causal:
            raise ConfigError(f"{self.loaded.info.name} is not a causal LM: it does not "
                              "generate text, so it cannot be steered.")
        self._check_latent(latent)
        if not math.isfinite(coefficient):
            raise ConfigError("The coefficient must be a finite number.",
                              {"coefficient": "Enter a finite number."})
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be from 1 to {MAX_NEW_TOKENS}.",
                              {"max_new_tokens": f"Enter 1 to {MAX_NEW_TOKENS}."})
        ids = tokenize_context(self.tokenizer, prompt, self.psae.context_size)
        limit = max_positions(getattr(self.model, "config", None))
        if limit is not None:
            ids = ids[:max(1, limit - max_new_tokens)]
        if len(ids) <= (1 if bos_id(self.tokenizer) is not None else 0):
            raise ConfigError("The prompt has no tokens; type a prompt.",
                            {"prompt": "Type a prompt."})
        w_dec = self.psae.sae.W_dec[latent].detach().float() / self.psae.output_scale
        baseline = self._generate(ids, max_new_tokens, seed, None)
        steered = self._generate(ids, max_new_tokens, seed, w_dec * float(coefficient))
        return {"baseline": self._decode(baseline), "steered": self._decode(steered)}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)


def _cache_of(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` in newer transformers, ``past_key_values``
    before)."""
    for name in ("cache", "past_key_values"):
        found = getattr(output, name, None) if name in output.keys() else None
        if found is not None:
            return found
    return None
