"""Memory estimate of a training run: plain arithmetic, no torch (the web app shows it too).

Counts what lives on the training device at the peak of a step:
- the SAE parameters (W_enc, W_dec, biases) in fp32, their gradients and Adam's two moments;
- per micro-batch: the dense pre-activations [micro, d_sae] (fp32 or half under autocast),
  kept for backward, their gradient, and TopK's selection (values + int64 indices, k per token)
  or ReLU's dense output (standard);
- the input batch and its reconstruction;
- for live extraction: the model's weights and the shuffle buffer.
The estimate is meant to be within ~15% of the measured peak; ``sae-studio info`` prints it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    sae_params: int
    optimizer: int
    activations: int
    batch: int
    model: int
    buffer: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, int]:
        return dict(asdict(self), total=self.total)


def estimate_memory(
    d_in: int, d_sae: int, *, encoder_type: str = "topk", k: int = 32, batch_size: int = 4096,
    micro_batch_size: int | None = None, precision: str = "fp32", model_params: int = 0,
    model_dtype: str = "fp32", buffer_tokens: int = 0,
) -> MemoryEstimate:
    micro = micro_batch_size or batch_size
    act_bytes = DTYPE_BYTES.get(precision, 4)
    n_params = 2 * d_in * d_sae + d_sae + d_in
    params = 4 * n_params
    optimizer = 3 * 4 * n_params  # gradients + Adam exp_avg + exp_avg_sq
    dense = micro * d_sae * act_bytes
    if encoder_type == "standard":
        acts = 3 * dense + micro * d_sae * 4  # pre, relu out, grads, fp32 L1 term
    else:
        acts = 2 * dense + micro * k * (4 + 8) * 3  # pre + grad, topk values/indices
    batch = 4 * batch_size * d_in + 4 * micro * d_in * 3
    model = model_params * DTYPE_BYTES.get(model_dtype, 4)
    buffer = 4 * buffer_tokens * d_in
    return MemoryEstimate(params, optimizer, acts, batch, model, buffer)
