"""Export to (and load from) the SAELens v6 folder layout.

    folder/cfg.json                 architecture, d_in, d_sae, k, metadata (model, hook, ...)
    folder/sae_weights.safetensors  W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec
                                    (+ threshold [d_sae] for jumprelu and batchtopk)
    folder/sparsity.safetensors     sparsity [d_sae] = log10(firing frequency + 1e-10)

The SAE trains on inputs scaled by ``s`` (E||s x|| = sqrt(d_in)). That scale is folded into the
weights so the exported SAE takes raw activations with ``normalize_activations: "none"``:

    W_enc' = s W_enc,  b_dec' = b_dec / s,  W_dec' = W_dec / s,  b_enc' = b_enc.

Then (x - b_dec') W_enc' + b_enc = (s x - b_dec) W_enc + b_enc, and f W_dec' + b_dec' = x_hat / s.
The pre-activations are unchanged by the folding, so a JumpReLU threshold is written as it is.
BatchTopK is written as ``"architecture": "jumprelu"`` with its running threshold filled to
[d_sae] (what it uses at inference); tied weights (standard) are written as two copies.

Transcoders (input x at ``hook_name``, output at ``hook_name_out``, ``d_out``) are written as
SAELens's ``transcoder`` (standard), ``jumprelu_transcoder`` (jumprelu, batchtopk,
matryoshka_batchtopk) or, with a skip connection, ``skip_transcoder`` /
``jumprelu_skip_transcoder``, with ``apply_b_dec_to_input: false``. The input scale s and the
target scale t fold as

    W_enc' = s W_enc,  W_dec' = W_dec / t,  b_dec' = b_dec / t,  W_skip' = (s / t) W_skip^T

(SAELens's W_skip is [d_out, d_in]). SAELens has no TopK transcoder: a topk transcoder is
written in the same layout as ``topk_transcoder`` / ``topk_skip_transcoder`` with a note in the
metadata; ``load_saelens`` reads it, SAELens does not.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import architectures
from .architectures.base import SAE
from .checkpoints import load_checkpoint
from .config import TrainConfig
from .errors import CheckpointError, ConfigError
from .files import replace_folder

SAELENS_VERSION = "6.0.0"  # the layout version we write; the loader needs >= 6.0.0
HOOK_NAMES = {"residual": "blocks.{layer}.hook_resid_post",
              "mlp_out": "blocks.{layer}.hook_mlp_out",
              "attn_out": "blocks.{layer}.hook_attn_out",
              "mlp_in": "blocks.{layer}.ln2.hook_normalized"}
SAELENS_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder",
                       "jumprelu_skip_transcoder")
"""The transcoder architectures SAELens loads (sae_lens.saes.transcoder)."""
TRANSCODER_BASES = {"transcoder": "standard", "skip_transcoder": "standard",
                    "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu",
                    "topk_transcoder": "topk", "topk_skip_transcoder": "topk"}
"""The transcoder architectures ``load_saelens`` reads, and the type each loads as."""


def _hook_name(hook_point: str, layer: Any) -> str:
    return HOOK_NAMES.get(hook_point, hook_point).format(layer=layer) if layer is not None else ""


def transcoder_architecture(sae: SAE) -> str:
    """The architecture a transcoder is exported as: SAELens's where it has one, else ours."""
    arch = sae.transcoder_architecture()
    if arch is not None:
        return arch
    return f"{sae.saelens_architecture}_{'skip_' if sae.W_skip is not None else ''}transcoder"


def saelens_weights(sae: SAE, scale: float = 1.0, target_scale: float | None = None
                    ) -> dict[str, torch.Tensor]:
    """The SAELens tensors (fp32, on the CPU) with the input scale (and a transcoder's target
    scale; None: the input's) folded in."""
    out_scale = scale if target_scale is None else target_scale
    with torch.no_grad():
        weights = {
            "W_enc": (sae.W_enc.float() * scale).cpu().contiguous(),
            "b_enc": sae.b_enc.float().cpu().contiguous(),
            "W_dec": (sae.W_dec.float() / out_scale).cpu().contiguous(),
            "b_dec": (sae.b_dec.float() / out_scale).cpu().contiguous(),
        }
        thresholds = sae.thresholds()
        if thresholds is not None:  # pre-activations are scale-free: no folding
            weights["threshold"] = thresholds.float().cpu().contiguous()
        if sae.W_skip is not None:  # SAELens's W_skip is [d_out, d_in]
            weights["W_skip"] = (sae.W_skip.float() * (scale / out_scale)).T.cpu().contiguous()
    return weights


def export_saelens(
    sae: SAE, folder: Path | str, *, scale: float = 1.0, target_scale: float | None = None,
    meta: dict[str, Any] | None = None, sparsity: torch.Tensor | Path | None = None,
) -> Path:
    """Write the SAELens folder atomically (built beside it, then renamed into place).

    ``target_scale``: a transcoder's target scale (None: ``scale``). ``sparsity``: the
    latents' firing frequencies [d_sae] (written as log10), or an existing
    sparsity.safetensors to copy as it is, or None (no sparsity file)."""
    folder = Path(folder)
    meta = meta or {}
    weights = saelens_weights(sae, scale, target_scale)
    layer, hook_point = meta.get("layer"), meta.get("hook_point", "residual")
    hook_name = meta.get("hook_name") or _hook_name(hook_point, layer)
    top, extra_meta = sae.saelens_cfg()
    if sae.transcoder:
        arch = transcoder_architecture(sae)
        target = meta.get("target_hook_point") or ""
        top = dict(top, d_out=int(sae.W_dec.shape[1]))
        extra_meta = dict(extra_meta, hook_name_out=_hook_name(target, layer) if target else "",
                          hook_layer_out=layer, target_hook_point=target,
                          target_scale_folded=target_scale)
        if arch not in SAELENS_TRANSCODERS:
            extra_meta["note"] = ("SAELens has no TopK transcoder architecture: this folder "
                                  "uses SAELens's layout under sae-studio's own architecture "
                                  "name; load it with sae-studio (worker.engine.export."
                                  "load_saelens), not SAELens.")
    else:
        arch = sae.saelens_architecture
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
            "model_name": meta.get("model_name") or meta.get("model") or "",
            "hook_name": hook_name, "hook_head_index": None,
            "context_size": meta.get("context_size"), "prepend_bos": meta.get("prepend_bos", True),
            "dataset_path": meta.get("dataset_path") or meta.get("dataset") or "",
            "exclude_special_tokens": meta.get("exclude_special", True),
            "trained_with": "sae-studio", "input_scale_folded": scale,
            "trained_architecture": sae.encoder_type, **extra_meta,
        },
        **top,
    }
    with replace_folder(folder) as tmp:
        save_file(weights, str(tmp / "sae_weights.safetensors"))
        if isinstance(sparsity, Path):
            shutil.copyfile(sparsity, tmp / "sparsity.safetensors")
        elif sparsity is not None:
            log_freq = torch.log10(sparsity.float().cpu() + 1e-10).contiguous()
            save_file({"sparsity": log_freq}, str(tmp / "sparsity.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_saelens(folder: Path | str) -> SAE:
    """Load a SAELens folder (ours or SAELens's standard/topk/jumprelu) into our SAE module:
    the registered type whose name is the folder's architecture and which SAELens runs as it.

    A BatchTopK export loads as the jumprelu it was saved as (the same inference)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"'{folder}' is not a SAELens folder (needs cfg.json and "
                              "sae_weights.safetensors).")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture", "standard")
    base = TRANSCODER_BASES.get(arch, arch)
    try:
        cls = architectures.get(base).load()
    except ConfigError:
        cls = None
    if cls is None or cls.saelens_architecture != base:
        raise CheckpointError(f"Architecture '{arch}' in '{folder}' is not supported yet.")
    w = load_file(str(w_path))
    sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), **cls.saelens_options(cfg))
    if arch in TRANSCODER_BASES:
        sae.make_transcoder(skip_connection="skip_" in arch)
        if "W_skip" in w:
            w["W_skip"] = w["W_skip"].T
    missing = [name for name in sae.state_dict() if name not in w]
    if missing:
        raise CheckpointError(f"'{folder}' is a {arch} SAE without a {missing[0]} tensor.")
    sae.load_state_dict({name: w[name].float() for name in sae.state_dict()})
    return sae


def sae_from_checkpoint(checkpoint: Path | str) -> tuple[SAE, dict[str, Any]]:
    """The SAE a training checkpoint holds (on the CPU) and the checkpoint's metadata."""
    c = load_checkpoint(checkpoint)
    m = c.meta
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in m["config"].items() if k in known})
    try:
        cls = architectures.get(cfg.encoder_type).load()
    except ConfigError as exc:
        raise CheckpointError(f"Checkpoint '{checkpoint}': {exc}") from None
    sae = cls.from_config(int(m["d_in"]), int(m["d_sae"]), cfg)
    try:
        sae.load_state_dict(c.prefixed("sae."))
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint '{checkpoint}' has mismatched weights ({exc}).") \
            from None
    return sae, m


def run_sparsity(checkpoint: Path | str, weights: dict[str, torch.Tensor]) -> Path | None:
    """The sparsity.safetensors of the checkpoint's run (``<run>/saelens/``, written at the end
    of training from the held-out vectors' firing frequencies) when that export holds exactly
    these SAELens ``weights``; None otherwise (another checkpoint's export, or none)."""
    run_export = Path(checkpoint).parent.parent / "saelens"
    w_path, s_path = run_export / "sae_weights.safetensors", run_export / "sparsity.safetensors"
    if not (w_path.is_file() and s_path.is_file()):
        return None
    saved = load_file(str(w_path))
    same = saved.keys() == weights.keys() and all(torch.equal(saved[k], w) for k, w in
                                                  weights.items())
    return s_path if same else None


def export_checkpoint(checkpoint: Path | str, folder: Path | str) -> Path:
    """``sae-studio export``: a training checkpoint -> SAELens folder, the same files as the
    run's own export (and the web's) when the checkpoint is the one the run ended with.

    sparsity.safetensors is copied from the run's export when that holds this checkpoint's
    weights (``run_sparsity``); an earlier checkpoint has no measured frequencies, so its
    folder has none."""
    sae, m = sae_from_checkpoint(checkpoint)
    scale = float(m.get("scale", 1.0))
    target_scale = float(m.get("target_scale") or scale)
    sparsity = run_sparsity(checkpoint, saelens_weights(sae, scale, target_scale))
    return export_saelens(sae, folder, scale=scale, target_scale=target_scale,
                          meta=m.get("source_meta") or {}, sparsity=sparsity)
