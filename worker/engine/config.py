"""Training configuration: one dataclass whose defaults run as they are.

``TrainConfig`` holds every option of a training run, the CLI exposes each as a flag and the web
form as a field. Values are validated once, in ``validate()``, with messages a user can act on.
Fields left as ``None`` are resolved against the model or activation file by ``resolve()``:
the middle layer, 8x the hidden size, and a learning rate scaled to the number of latents.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

EncoderType = Literal["standard", "topk", "jumprelu", "batchtopk"]
ENCODER_TYPES: tuple[str, ...] = ("standard", "topk", "jumprelu", "batchtopk")
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
B_DEC_INITS: tuple[str, ...] = ("geometric_median", "mean", "zeros")


@dataclass
class TrainConfig:
    # --- data: either an activation file, or a model + dataset to extract from
    model: str | None = None
    """Model source: a bundled name (smollm2-135m, minilm-l6), a local folder or a hub id."""
    dataset: str | None = None
    """Corpus source: kjv, a .txt/.jsonl/.csv file, or a token-store folder made earlier."""
    activations: str | None = None
    """An activation cache (safetensors with one tensor `activations` [N, d_in]); no model runs."""
    layer: int | None = None
    """Block index to read; None = the middle layer of the model."""
    hook_point: str = "residual"
    context_size: int = 128
    max_tokens: int | None = None
    """Tokens of the corpus to tokenise (None = all)."""
    text_field: str = "text"

    # --- activation filtering (live extraction)
    exclude_special: bool = True
    exclude_pos0: bool = True
    outlier_factor: float = 10.0
    """Drop activations whose norm exceeds this multiple of the running median; 0 disables."""
    buffer_tokens: int = 131_072
    """Shuffle buffer capacity in activation vectors; refilled when half empty."""

    # --- the SAE
    encoder_type: str = "topk"
    """standard (ReLU + L1), topk (k latents per token), jumprelu (learned per-latent thresholds,
    L0 penalty) or batchtopk (k x batch latents per batch; a running threshold at inference)."""
    latent_dim: int | None = None
    """Number of latents; None = expansion_factor x d_in."""
    expansion_factor: int = 8
    k: int = 32
    """Active latents per token (topk); the mean active latents per token (batchtopk)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None = d_in // 2."""
    aux_k_coef: float = 1 / 32
    aux_k_frac: float = 0.25
    """Fraction of each micro-batch (shuffled rows) the AuxK loss is computed on; 1 = all."""
    l1_alpha: float = 2.0
    """L1 coefficient (standard), on decoder-norm-weighted activations of unit-scaled inputs
    (2 gives an L0 of ~130 of 4,608 latents after 100 steps on SmolLM2-135M layer 15)."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity coefficient (l1_alpha, or l0_coef for jumprelu)
    ramps up linearly from 0."""
    tie_weights: bool = False
    """Standard only: the decoder is the encoder's transpose (one weight matrix). The export
    still writes separate W_enc and W_dec."""
    l0_coef: float = 5.0
    """JumpReLU L0 penalty: loss = mse + l0_coef x L0 / d_in, i.e. per token (squared error +
    l0_coef x active latents) / d_in on unit-scaled inputs (SAELens's l0_coefficient on its
    summed MSE, with E||x|| = sqrt(d_in)). Higher = sparser; 5 gave L0 ~90 (falling) after 400k
    tokens on SmolLM2 layer 15 at 8x."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU straight-through estimator: width of the rectangle kernel around the threshold
    (in unit-scaled pre-activation units)."""
    jumprelu_init_threshold: float | None = None
    """JumpReLU: initial threshold of every latent (unit-scaled pre-activation units); None =
    where k latents per token would fire on a data sample (BatchTopK's threshold)."""
    batchtopk_threshold_momentum: float = 0.1
    """BatchTopK: weight of each step's smallest kept activation in the running inference
    threshold (exponential moving average). 0.1 follows the rising activations of early training
    (held-out L0 32.4 for k = 32 after 100 steps on the bench file; 0.02 lagged at 52.8)."""
    normalize: bool = True
    """Scale inputs so E||x|| = sqrt(d_in); the scale is folded into the weights on export."""
    b_dec_init: str = "geometric_median"
    init_from_data: bool = True
    """Initialise decoder rows from centred data samples instead of random directions."""

    # --- optimisation
    learning_rate: float | None = None
    """None = 2e-3 x sqrt(4096 / latents) for topk, batchtopk and jumprelu; 4e-3 x
    sqrt(4096 / latents) for standard (inputs are normalised)."""
    optimizer: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_warmup_steps: int | None = None
    """None = 5% of total_steps (at most 1000)."""
    lr_decay_frac: float = 0.2
    """Final fraction of steps over which the rate decays linearly to zero (constant schedule)."""
    grad_clip: float = 1.0
    batch_size: int = 4096
    """Activation vectors (tokens) per optimizer step."""
    micro_batch_size: int | None = None
    """Vectors per forward pass; None = batch_size. Halved on CUDA out-of-memory."""
    min_micro_batch: int = 64
    total_steps: int = 1000
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0

    # --- bookkeeping
    log_every: int = 10
    auto_save_interval: int = 500
    """Save a checkpoint every N steps; 0 disables auto-save (the final save still happens)."""
    keep_every: int = 5000
    """Retention: besides first, last and best, keep checkpoints at multiples of this step."""
    dead_window_tokens: int = 1_000_000
    """A latent is dead when it has not fired in this many most recent tokens."""
    dense_threshold: float = 0.1
    eval_tokens: int = 16_384
    """Held-out activation vectors for the final evaluation (never trained on)."""

    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"Unknown configuration option(s): {', '.join(unknown)}.")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    def d_sae(self, d_in: int) -> int:
        return self.latent_dim if self.latent_dim is not None else self.expansion_factor * d_in

    def lr(self, d_sae: int) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.encoder_type in ("topk", "batchtopk", "jumprelu"):
            return 2e-3 * math.sqrt(4096 / d_sae)
        return 4e-3 * math.sqrt(4096 / d_sae)  # standard: measured on the bench file

    def warmup_steps(self) -> int:
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return min(1000, int(0.05 * self.total_steps))

    def k_aux(self, d_in: int, d_sae: int) -> int:
        return min(self.aux_k if self.aux_k is not None else d_in // 2, d_sae)

    # ------------------------------------------------------------------ validation
    def validate(self, d_in: int | None = None, n_layers: int | None = None) -> None:
        """Raise ConfigError with a sentence for the first bad value."""

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if self.activations is None and (self.model is None or self.dataset is None):
            bad("Give either an activation file (--activations) or both --model and --dataset.")
        if self.encoder_type not in ENCODER_TYPES:
            bad(f"Unknown encoder type '{self.encoder_type}'; choose one of "
                f"{', '.join(ENCODER_TYPES)}.")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"Unknown LR schedule '{self.lr_schedule}'; choose one of "
                f"{', '.join(LR_SCHEDULES)}.")
        if self.precision not in PRECISIONS:
            bad(f"Unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}.")
        if self.optimizer not in OPTIMIZERS:
            bad(f"Unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}.")
        if self.b_dec_init not in B_DEC_INITS:
            bad(f"Unknown b_dec init '{self.b_dec_init}'; choose one of "
                f"{', '.join(B_DEC_INITS)}.")
        for name in ("total_steps", "batch_size", "k", "expansion_factor", "log_every",
                     "context_size", "min_micro_batch", "buffer_tokens"):
            if getattr(self, name) < 1:
                bad(f"{name} must be at least 1 (got {getattr(self, name)}).")
        for name in ("auto_save_interval", "keep_every", "eval_tokens", "outlier_factor",
                     "l1_alpha", "weight_decay", "grad_clip", "aux_k_coef", "l0_coef"):
            if getattr(self, name) < 0:
                bad(f"{name} must not be negative (got {getattr(self, name)}).")
        if self.latent_dim is not None and self.latent_dim < 1:
            bad(f"latent_dim must be at least 1 (got {self.latent_dim}).")
        if self.learning_rate is not None and not (0 < self.learning_rate < 1):
            bad(f"learning_rate must be between 0 and 1 (got {self.learning_rate}).")
        if self.micro_batch_size is not None and not (
            1 <= self.micro_batch_size <= self.batch_size
        ):
            bad(f"micro_batch_size must be between 1 and batch_size ({self.batch_size}).")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            bad("batch_size must be a multiple of micro_batch_size.")
        if not 0 <= self.l1_warmup_frac <= 1 or not 0 <= self.lr_decay_frac <= 1:
            bad("l1_warmup_frac and lr_decay_frac must be between 0 and 1.")
        if self.tie_weights and self.encoder_type != "standard":
            bad(f"tie_weights works only with the standard encoder type (got "
                f"'{self.encoder_type}'); turn it off or choose standard.")
        if self.jumprelu_init_threshold is not None and self.jumprelu_init_threshold < 0:
            bad("jumprelu_init_threshold must not be negative (got "
                f"{self.jumprelu_init_threshold}).")
        if not self.jumprelu_bandwidth > 0:
            bad(f"jumprelu_bandwidth must be greater than 0 (got {self.jumprelu_bandwidth}).")
        if not 0 < self.batchtopk_threshold_momentum <= 1:
            bad("batchtopk_threshold_momentum must be in (0, 1] (got "
                f"{self.batchtopk_threshold_momentum}).")
        if not 0 < self.aux_k_frac <= 1:
            bad(f"aux_k_frac must be in (0, 1] (got {self.aux_k_frac}).")
        if self.layer is not None and self.layer < 0:
            bad(f"layer must be 0 or more (got {self.layer}).")
        if n_layers is not None and self.layer is not None and self.layer >= n_layers:
            bad(f"Layer {self.layer} is out of range: the model has {n_layers} layers "
                f"(0-{n_layers - 1}).")
        if d_in is not None:
            d_sae = self.d_sae(d_in)
            if self.encoder_type in ("topk", "batchtopk") and self.k > d_sae:
                bad(f"k ({self.k}) cannot exceed the number of latents ({d_sae}).")
