"""The memory and time estimate of a training the form describes (plain arithmetic, no torch).

The memory budget is the newest worker's device memory, or the reference device's when no
worker reported yet; the time needs a worker's measured speed (``WorkerHeartbeat.gflops``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..db import LanguageModel
from ..engine.memory import estimate_memory
from .configs import lenient_values
from .health import newest_heartbeat

REFERENCE_BUDGET = 6 * 10**9
"""Memory budget without a worker heartbeat (bytes): the reference Jetson Orin Nano (6 GB
usable)."""
MFU = 0.5
"""The fraction of the measured matmul speed a training step reaches (time estimate)."""


def estimate(model: LanguageModel | None, values: Mapping[str, Any]) -> dict[str, Any]:
    """Memory and time estimate for the form's current values.

    Unparseable values fall back to their defaults. Returns::

        {"memory_bytes": int | None, "parts": {sae_params, optimizer, activations, batch,
         model, buffer, runtime, file_pages, allocator} (bytes), "budget_bytes": int,
         "budget_source": "cuda: NVIDIA ..." |
         "no worker seen: 6 GB (Jetson Orin Nano)", "fits": bool, "warning": str | None,
         "time_s": float | None (None until a worker reported its speed), "d_in": int | None,
         "d_sae": int | None, "precision": "fp32" | "bf16" | ..., "device": str | None}

    ``seconds`` is the same as ``time_s``. Without a model every size is None and ``warning``
    says to choose one.
    """
    v = lenient_values(model, values)
    hb = newest_heartbeat()
    device = hb.device if hb is not None else None
    if hb is not None and hb.device_memory:
        budget = int(hb.device_memory)
        source = f"{hb.device}: {hb.device_name or hb.device}"
    else:
        budget, source = REFERENCE_BUDGET, "no worker seen: 6 GB (Jetson Orin Nano)"
    precision = str(v.get("precision") or "auto")
    if precision == "auto":
        precision = "bf16" if (device or "").startswith("cuda") else "fp32"
    out: dict[str, Any] = {"memory_bytes": None, "parts": None, "budget_bytes": budget,
                           "budget_source": source, "fits": True, "warning": None,
                           "time_s": None, "seconds": None, "d_in": None, "d_sae": None,
                           "precision": precision, "device": device}
    if model is None or not model.hidden_dim:
        out["warning"] = "Choose a ready model to see the memory and time estimate."
        return out
    d_in = int(model.hidden_dim)
    latent = v.get("latent_dim")
    d_sae = max(1, int(latent) if latent else int(v.get("expansion_factor") or 8) * d_in)
    batch = max(1, int(v.get("batch_size") or 4096))
    micro = v.get("micro_batch_size") or None
    n_params = int(model.n_params or 0)
    n_layers = max(1, int(model.n_layers or 1))
    layer = v.get("layer")
    layer = n_layers // 2 if layer is None else min(max(0, int(layer)), n_layers - 1)
    est = estimate_memory(d_in, d_sae, encoder_type=str(v.get("encoder_type") or "topk"),
                          k=int(v.get("k") or 32), batch_size=batch,
                          micro_batch_size=int(micro) if micro else None, precision=precision,
                          model_params=n_params, model_dtype=str(model.dtype or "float32"),
                          buffer_tokens=max(0, int(v.get("buffer_tokens") or 0)),
                          # no worker seen: the reference device, a Jetson's GPU
                          device="cpu" if device == "cpu" else "cuda", source="live",
                          layer=layer, n_layers=n_layers, tie_weights=bool(v.get("tie_weights")),
                          eval_tokens=max(0, int(v.get("eval_tokens") or 16_384)),
                          total_steps=max(1, int(v.get("total_steps") or 1000)))
    parts = est.to_dict()
    total = parts.pop("total")
    out.update(memory_bytes=total, parts=parts, d_in=d_in, d_sae=d_sae, fits=total <= budget)
    if total > budget:
        out["warning"] = (f"This run needs about {total / 2**30:.1f} GiB but the budget is "
                          f"{budget / 2**30:.1f} GiB ({source}); lower the batch size, "
                          "micro-batch size or number of latents.")
    if hb is not None and hb.gflops:
        steps = max(0, int(v.get("total_steps") or 0))
        flops_per_token = 6 * d_in * d_sae + 2 * n_params * (layer + 1) / n_layers
        seconds = steps * batch * flops_per_token / (float(hb.gflops) * 1e9 * MFU)
        out["time_s"] = out["seconds"] = round(seconds, 1)
    return out
