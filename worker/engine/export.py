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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoints import load_checkpoint
from .errors import CheckpointError
from .sae import SAE

SAELENS_VERSION = "6.0.0"  # the layout version we write; the loader needs >= 6.0.0
HOOK_NAMES = {"residual": "blocks.{layer}.hook_resid_post",
              "mlp_out": "blocks.{layer}.hook_mlp_out",
              "attn_out": "blocks.{layer}.hook_attn_out"}


def export_saelens(
    sae: SAE, folder: Path | str, *, scale: float = 1.0, meta: dict[str, Any] | None = None,
    sparsity: torch.Tensor | None = None,
) -> Path:
    """Write the SAELens folder atomically (built beside it, then renamed into place)."""
    folder = Path(folder)
    meta = meta or {}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        weights = {
            "W_enc": (sae.W_enc.float() * scale).cpu().contiguous(),
            "b_enc": sae.b_enc.float().cpu().contiguous(),
            "W_dec": (sae.W_dec.float() / scale).cpu().contiguous(),
            "b_dec": (sae.b_dec.float() / scale).cpu().contiguous(),
        }
        thresholds = sae.thresholds()
        if thresholds is not None:  # pre-activations are scale-free: no folding
            weights["threshold"] = thresholds.float().cpu().contiguous()
    layer, hook_point = meta.get("layer"), meta.get("hook_point", "residual")
    hook_name = meta.get("hook_name") or (
        HOOK_NAMES.get(hook_point, hook_point).format(layer=layer) if layer is not None else "")
    cfg: dict[str, Any] = {
        "architecture": "jumprelu" if sae.encoder_type == "batchtopk" else sae.encoder_type,
        "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
            "model_name": meta.get("model_name") or meta.get("model") or "",
            "hook_name": hook_name, "hook_head_index": None,
            "context_size": meta.get("context_size"), "prepend_bos": meta.get("prepend_bos", True),
            "dataset_path": meta.get("dataset_path") or meta.get("dataset") or "",
            "exclude_special_tokens": meta.get("exclude_special", True),
            "trained_with": "sae-studio", "input_scale_folded": scale,
            "trained_architecture": sae.encoder_type,
        },
    }
    if sae.encoder_type == "topk":
        cfg["k"] = sae.k
    if sae.encoder_type == "batchtopk":
        cfg["metadata"]["k"] = sae.k  # the training k; SAELens runs it as jumprelu
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(weights, str(tmp / "sae_weights.safetensors"))
        if sparsity is not None:
            log_freq = torch.log10(sparsity.float().cpu() + 1e-10).contiguous()
            save_file({"sparsity": log_freq}, str(tmp / "sparsity.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_saelens(folder: Path | str) -> SAE:
    """Load a SAELens folder (ours or SAELens's standard/topk/jumprelu) into our SAE module.

    A BatchTopK export loads as the jumprelu it was saved as (the same inference)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"'{folder}' is not a SAELens folder (needs cfg.json and "
                              "sae_weights.safetensors).")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise CheckpointError(f"Architecture '{arch}' in '{folder}' is not supported yet.")
    w = load_file(str(w_path))
    sae = SAE(int(cfg["d_in"]), int(cfg["d_sae"]), arch, int(cfg.get("k") or 0))
    state = {k: w[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "jumprelu":
        if "threshold" not in w:
            raise CheckpointError(f"'{folder}' is a jumprelu SAE without a threshold tensor.")
        state["threshold"] = w["threshold"].float()
    sae.load_state_dict(state)
    return sae


def sae_from_checkpoint(checkpoint: Path | str) -> tuple[SAE, dict[str, Any]]:
    """The SAE a training checkpoint holds (on the CPU) and the checkpoint's metadata."""
    c = load_checkpoint(checkpoint)
    cfg, m = c.meta["config"], c.meta
    sae = SAE(int(m["d_in"]), int(m["d_sae"]), cfg["encoder_type"], int(cfg["k"]),
              tie_weights=bool(cfg.get("tie_weights", False)))
    try:
        sae.load_state_dict(c.prefixed("sae."))
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint '{checkpoint}' has mismatched weights ({exc}).") \
            from None
    return sae, m


def export_checkpoint(checkpoint: Path | str, folder: Path | str) -> Path:
    """``sae-studio export``: a training checkpoint -> SAELens folder."""
    sae, m = sae_from_checkpoint(checkpoint)
    return export_saelens(sae, folder, scale=float(m.get("scale", 1.0)),
                          meta=m.get("source_meta") or {})
