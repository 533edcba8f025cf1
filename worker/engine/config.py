"""Training configuration: one dataclass whose defaults run as they are, and the one source of
truth about every option.

Each ``TrainConfig`` field is declared with ``opt(default, label=..., help=...)``: its label,
help sentence, unit, choices, bounds, whether it is advanced and whether the web form shows it.
``options()`` turns those declarations into ``OptionInfo`` records, from which the CLI flags and
their ``--help``, the web form, the JSON API's validation and the README's option table are all
generated. ``parse_value`` turns a string from a form, a flag or JSON into the typed value;
``TrainConfig.errors()`` reports every bad field at once. Fields left as ``None`` are resolved
against the model or activation file when training starts: the middle layer, 8x the hidden
size, a learning rate scaled to the number of latents. Torch-free.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from . import architectures
from .errors import ConfigError
from .option_types import INT64_MAX, OptionInfo, check_value, opt, parse_value, range_text

__all__ = ["ALIASES", "BLOCK_ORDER", "B_DEC_INITS", "DEVICES", "HOOK_POINTS", "INT64_MAX",
           "LR_SCHEDULES", "MAX_LATENTS", "MAX_STEPS", "MAX_VECTORS", "OPTIMIZERS", "PRECISIONS",
           "OptionInfo", "TrainConfig", "check_value", "matryoshka_widths", "option", "options",
           "parse_value", "range_text"]

HOOK_POINTS: tuple[str, ...] = ("residual", "mlp_out", "attn_out", "mlp_in")
BLOCK_ORDER: tuple[str, ...] = ("attn_out", "mlp_in", "mlp_out", "residual")
"""The hook points in the order a block computes them (a transcoder's target comes later)."""
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
B_DEC_INITS: tuple[str, ...] = ("geometric_median", "mean", "zeros")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
"""Common devices; ``cuda:N`` is valid too."""

MAX_LATENTS = 2**25
"""33.5M latents: W_enc and W_dec alone would exceed any machine's memory at any useful d_in."""
MAX_VECTORS = 2**24
"""16.8M activation vectors in one batch or held-out set."""
MAX_STEPS = 10**9

ALIASES = {"layer_idx": "layer"}
"""Old option names still accepted on input (form, JSON, TOML)."""
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _encoder_help() -> str:
    types = " ".join(f"{a.name}: {a.description}" for a in map(architectures.get,
                                                                architectures.names()))
    return f"The SAE architecture. {types}"


def _lr_help() -> str:
    by_base: dict[float, list[str]] = {}
    for name in architectures.names():
        by_base.setdefault(architectures.get(name).lr_base, []).append(name)
    parts = "; ".join(f"{base:g} x sqrt(4096 / latents) for {', '.join(names)}"
                      for base, names in by_base.items())
    return f"Adam's step size. Blank = automatic: {parts} (inputs are normalised)."


def _init_help() -> str:
    on = [n for n in architectures.names() if architectures.get(n).init_from_data]
    off = [n for n in architectures.names() if not architectures.get(n).init_from_data]
    return ("Initialise the decoder rows from centred data samples instead of random "
            f"directions. Blank = the type's default: on for {', '.join(on)}"
            + (f"; off for {', '.join(off)}." if off else "."))


DATA, SAE, OPTIM, RUN = "Data", "SAE", "Optimisation", "Checkpoints and evaluation"


@dataclass
class TrainConfig:
    # --- data: the web form takes these from the chosen model and dataset rows
    model: str | None = opt(
        None, label="Model", group=DATA, in_form=False, advanced=False,
        help="The language model to read activations from: a bundled name (smollm2-135m, "
             "minilm-l6), a local folder with config.json, or a Hugging Face Hub id. Blank "
             "when training from an activation file alone.")
    dataset: str | None = opt(
        None, label="Dataset", group=DATA, in_form=False, advanced=False,
        help="The corpus: kjv, a .txt, .jsonl or .csv file, a Hub dataset name, or a "
             "token-store folder made earlier. Needed with a model.")
    activations: str | None = opt(
        None, label="Activation file", group=DATA, in_form=False, advanced=False,
        help="An activation cache written by `sae-studio extract` (safetensors, one tensor "
             "`activations` [N, d_in]); no model runs. Blank = extract from the model and "
             "dataset while training.")
    context_size: int = opt(
        128, label="Context size", unit="tokens", group=DATA, in_form=False, min=2,
        max=2**17, help="Tokens per context when the corpus is tokenised.")
    max_tokens: int | None = opt(
        None, label="Corpus tokens", unit="tokens", group=DATA, in_form=False, min=1,
        help="Tokens of the corpus to tokenise. Blank = all of it.")
    text_field: str = opt(
        "text", label="Text field", group=DATA, in_form=False,
        help="The field holding the text in .jsonl and .csv corpora.")

    # --- the main fields of the form, in its order
    encoder_type: str = opt(
        "topk", label="Encoder type", group=SAE, advanced=False, kind="choice",
        choices=architectures.names, help=_encoder_help)
    hook_point: str = opt(
        "residual", label="Hook point", group=DATA, advanced=False, choices=HOOK_POINTS,
        help="Where in the block to read: the residual stream after it (residual), the MLP "
             "output (mlp_out), the attention output (attn_out) or the MLP's input after its "
             "norm (mlp_in).")
    target_hook_point: str | None = opt(
        None, label="Target hook point", group=DATA, advanced=False, choices=HOOK_POINTS,
        help="Train a transcoder: read the input at the hook point and predict the activation "
             "at this later hook point of the same layer (mlp_in -> mlp_out stands in for the "
             "MLP). The held-out FVU is on the target, and the evaluation splices the output in "
             "place of the target. Blank = an SAE (reconstruct the input).")
    skip_connection: bool = opt(
        False, label="Skip connection", group=SAE, advanced=False,
        help="A transcoder's output adds a learned linear map of its input (a skip "
             "transcoder); needs a target hook point.")
    layer: int | None = opt(
        None, label="Layer", group=DATA, advanced=False, min=0, max=4095,
        help="Block index to read, 0 to layers - 1. Blank = the middle layer of the model.")
    expansion_factor: int = opt(
        8, label="Expansion factor", unit="x hidden size", group=SAE, advanced=False, min=1,
        max=1024, help="Latents = expansion factor x the model's hidden size (used when the "
                       "latent dimension is blank).")
    latent_dim: int | None = opt(
        None, label="Latent dimension", unit="latents", group=SAE, advanced=False, min=1,
        max=MAX_LATENTS, help="Number of latents. Blank = expansion factor x hidden size.")
    k: int = opt(
        32, label="k (active latents)", unit="latents", group=SAE, advanced=False, min=1,
        max=2**16, help="Latents active per token (topk); the mean number of active latents "
                        "per token across the batch (batchtopk, matryoshka_batchtopk).")
    matryoshka_widths: str | None = opt(
        None, label="Matryoshka widths", unit="latents", group=SAE, advanced=False,
        kind="str", help="Nested prefixes of the dictionary, increasing, separated by commas or "
        "spaces, the last equal to the number of latents (e.g. 1024,2048,4608): the loss sums "
        "the reconstruction MSE of each prefix's latents alone. Blank = latents / 8, / 4, / 2 "
        "and all of them.")
    l1_alpha: float = opt(
        2.0, label="L1 coefficient", group=SAE, advanced=False, min=0,
        help="Sparsity penalty of the standard (ReLU) SAE, on decoder-norm-weighted "
             "activations of unit-scaled inputs; higher = fewer active latents (2 gives an L0 "
             "of ~130 of 4,608 latents after 100 steps on SmolLM2-135M layer 15).")
    l0_coef: float = opt(
        5.0, label="L0 coefficient", group=SAE, advanced=False, min=0,
        help="Sparsity penalty of the JumpReLU SAE: loss = MSE + L0 coefficient x L0 / d_in "
             "on unit-scaled inputs (SAELens's l0_coefficient on its summed MSE). Higher = "
             "fewer active latents; 5 gave an L0 of ~90 after 400k tokens on SmolLM2 layer 15 "
             "at 8x.")
    target_l0: float | None = opt(
        None, label="Target L0", unit="latents", group=SAE, advanced=False, min=0,
        min_exclusive=True, max=MAX_LATENTS,
        help="Active latents per token to aim for (standard, jumprelu): after the first 10% "
             "of the steps the sparsity coefficient (L1 or L0 coefficient, which then only "
             "sets its start) is steered in log space from the training batches' L0 so that "
             "the held-out L0 at the end lands near this. Blank = a fixed coefficient.")
    tie_weights: bool = opt(
        False, label="Tie weights", group=SAE, advanced=False,
        help="The decoder is the encoder's transpose (one weight matrix). The export still "
             "writes separate W_enc and W_dec.")
    learning_rate: float | None = opt(
        None, label="Learning rate", group=OPTIM, advanced=False, min=0, max=1,
        min_exclusive=True, max_exclusive=True, help=_lr_help)
    batch_size: int = opt(
        4096, label="Batch size", unit="vectors", group=OPTIM, advanced=False, min=1,
        max=MAX_VECTORS, help="Activation vectors (tokens) per optimizer step.")
    total_steps: int = opt(
        1000, label="Total steps", unit="steps", group=OPTIM, advanced=False, min=1,
        max=MAX_STEPS, help="Optimizer steps to train for.")
    auto_save_interval: int = opt(
        500, label="Auto-save every", unit="steps", group=RUN, advanced=False, min=0,
        max=MAX_STEPS, help="Save a checkpoint every N steps; 0 = only at the end (the final "
                            "save always happens).")

    # --- advanced: today's advanced fields of the form, then the rest
    seed: int = opt(
        0, label="Seed", group=OPTIM, min=0,
        help="Random seed of the initialisation and the data order.")
    lr_schedule: str = opt(
        "constant", label="LR schedule", group=OPTIM, choices=LR_SCHEDULES,
        help="How the learning rate changes after the warm-up: constant (with a final linear "
             "decay, see LR decay fraction), linear or cosine decay to zero.")
    lr_warmup_steps: int | None = opt(
        None, label="LR warm-up steps", unit="steps", group=OPTIM, min=0, max=MAX_STEPS,
        help="Steps over which the learning rate ramps up from 0. Blank = 5% of the total "
             "steps (at most 1000).")
    precision: str = opt(
        "auto", label="Precision", group=OPTIM, choices=PRECISIONS,
        help="Arithmetic of the forward pass: auto = bf16 on a GPU that supports it (else "
             "fp16), fp32 on the CPU.")
    micro_batch_size: int | None = opt(
        None, label="Micro-batch size", unit="vectors", group=OPTIM, min=1, max=MAX_VECTORS,
        help="Vectors per forward pass (gradient accumulation); must divide the batch size. "
             "Blank = the batch size. Halved automatically on GPU out-of-memory.")
    log_every: int = opt(
        10, label="Log every", unit="steps", group=RUN, min=1, max=MAX_STEPS,
        help="Steps between metrics rows.")
    keep_every: int = opt(
        5000, label="Keep every", unit="steps", group=RUN, min=0, max=MAX_STEPS,
        help="Checkpoint retention: besides the first, newest and best, keep the checkpoints "
             "at multiples of this step (0 = none).")
    dead_window_tokens: int = opt(
        1_000_000, label="Dead window", unit="tokens", group=RUN, min=1,
        help="A latent is dead when it has not fired in this many most recent tokens.")
    buffer_tokens: int = opt(
        131_072, label="Shuffle buffer", unit="vectors", group=DATA, min=1, max=2**27,
        help="Activation vectors held in the shuffle buffer while extracting; refilled when "
             "half empty.")
    eval_tokens: int = opt(
        16_384, label="Held-out vectors", unit="vectors", group=RUN, min=0, max=MAX_VECTORS,
        help="Activation vectors kept aside for the final evaluation, never trained on; with a "
             "model and dataset, also the held-out text of the report. 0 = no evaluation.")
    jumprelu_bandwidth: float = opt(
        0.05, label="JumpReLU bandwidth", group=SAE, min=0, min_exclusive=True,
        help="Width of the straight-through estimator's rectangle window around each "
             "threshold, in unit-scaled pre-activation units.")
    jumprelu_init_threshold: float | None = opt(
        None, label="JumpReLU initial threshold", group=SAE, min=0,
        help="Initial threshold of every latent, in unit-scaled pre-activation units. Blank = "
             "where k latents per token would fire on a data sample.")
    device: str = opt(
        "auto", label="Device", group=OPTIM, kind="str", choices=DEVICES,
        help="Where to train: auto = CUDA, then MPS, then the CPU; or cpu, cuda, cuda:N, mps.")
    gpus: int = opt(
        1, label="GPUs", unit="processes", group=OPTIM, min=1, max=64,
        help="Processes that train this one SAE together (DDP): one per GPU with device cuda "
             "or auto (only a worker with that many GPUs takes the training), gloo processes "
             "with device cpu. Each trains on batch size / GPUs vectors per step; gradients "
             "are averaged. The command line starts them through torchrun. In a sweep: its "
             "SAEs spread over this many GPUs of one worker (SAE i on GPU i mod GPUs), one "
             "process, one forward.")
    aux_k: int | None = opt(
        None, label="AuxK latents", unit="latents", group=SAE, min=0, max=MAX_LATENTS,
        help="Dead latents the AuxK loss uses to reconstruct the residual. Blank = half the "
             "hidden size; 0 turns AuxK off.")
    aux_k_coef: float = opt(
        1 / 32, label="AuxK coefficient", group=SAE, min=0,
        help="Weight of the AuxK loss (dead latents reconstructing the residual); 0 turns it "
             "off.")
    aux_k_frac: float = opt(
        0.25, label="AuxK fraction", group=SAE, min=0, max=1, min_exclusive=True,
        help="Fraction of each micro-batch (shuffled rows) the AuxK loss is computed on; "
             "1 = all.")
    batchtopk_threshold_momentum: float = opt(
        0.1, label="BatchTopK threshold momentum", group=SAE, min=0, max=1, min_exclusive=True,
        help="Weight of each step's smallest kept activation in the running inference "
             "threshold (an exponential moving average). 0.1 follows the rising activations of "
             "early training (held-out L0 32.4 for k = 32 after 100 steps on the bench file; "
             "0.02 lagged at 52.8).")
    l1_warmup_frac: float = opt(
        0.05, label="Sparsity warm-up", unit="of the steps", group=SAE, min=0, max=1,
        help="Fraction of the steps over which the sparsity coefficient (L1 coefficient, or "
             "L0 coefficient for jumprelu) ramps up linearly from 0.")
    normalize: bool = opt(
        True, label="Normalise inputs", group=SAE,
        help="Scale inputs so that E||x|| = sqrt(d_in); the scale is folded into the weights "
             "on export.")
    b_dec_init: str = opt(
        "geometric_median", label="Decoder bias init", group=SAE, choices=B_DEC_INITS,
        help="Initial decoder bias: the geometric median of a data sample, its mean, or "
             "zeros.")
    init_from_data: bool | None = opt(
        None, label="Initialise from data", group=SAE, help=_init_help)
    optimizer: str = opt(
        "adam", label="Optimizer", group=OPTIM, choices=OPTIMIZERS,
        help="adam, or adamw (weight decay decoupled from the gradient).")
    beta1: float = opt(
        0.9, label="Adam beta1", group=OPTIM, min=0, max=1, max_exclusive=True,
        help="Decay of Adam's running mean of the gradient.")
    beta2: float = opt(
        0.999, label="Adam beta2", group=OPTIM, min=0, max=1, max_exclusive=True,
        help="Decay of Adam's running mean of the squared gradient.")
    weight_decay: float = opt(
        0.0, label="Weight decay", group=OPTIM, min=0,
        help="Weight decay of the optimizer; 0 turns it off.")
    lr_decay_frac: float = opt(
        0.2, label="LR decay fraction", unit="of the steps", group=OPTIM, min=0, max=1,
        help="Final fraction of the steps over which the learning rate decays linearly to "
             "zero (constant schedule).")
    grad_clip: float = opt(
        1.0, label="Gradient clip", group=OPTIM, min=0,
        help="Largest gradient norm; larger gradients are scaled down to it. 0 turns clipping "
             "off.")
    min_micro_batch: int = opt(
        64, label="Smallest micro-batch", unit="vectors", group=OPTIM, min=1, max=MAX_VECTORS,
        help="Out-of-memory halving of the micro-batch stops here: below it the training "
             "fails with a message.")
    exclude_special: bool = opt(
        True, label="Skip special tokens", group=DATA,
        help="Leave out the activations at special tokens (BOS, EOS, padding).")
    exclude_pos0: bool = opt(
        True, label="Skip position 0", group=DATA,
        help="Leave out the activations at the first position of each context (an attention "
             "sink with outsized norms).")
    outlier_factor: float = opt(
        10.0, label="Outlier factor", group=DATA, min=0,
        help="Drop activations whose norm exceeds this multiple of the running median; 0 "
             "turns the filter off.")
    dense_threshold: float = opt(
        0.1, label="Dense threshold", unit="firing fraction", group=RUN, min=0, max=1,
        help="The evaluation counts a latent as dense when it fires on more than this "
             "fraction of the held-out tokens.")

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored with the run (not an option)."""

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from typed values; old names (``ALIASES``) are accepted."""
        values = {ALIASES.get(k, k): v for k, v in values.items()}
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
        """The learning rate: the set one, or the type's lr_base x sqrt(4096 / latents)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return architectures.get(self.encoder_type).lr_base * math.sqrt(4096 / d_sae)

    def data_init(self) -> bool:
        """Whether the decoder starts from data samples: the set value, or the type's default
        (``Architecture.init_from_data``)."""
        if self.init_from_data is not None:
            return self.init_from_data
        return architectures.get(self.encoder_type).init_from_data

    def warmup_steps(self) -> int:
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return min(1000, int(0.05 * self.total_steps))

    def k_aux(self, d_in: int, d_sae: int) -> int:
        return min(self.aux_k if self.aux_k is not None else d_in // 2, d_sae)

    def prefix_widths(self, d_sae: int) -> tuple[int, ...]:
        """The Matryoshka prefixes for ``d_sae`` latents (``matryoshka_widths``, or the default
        d_sae / 8, / 4, / 2, d_sae); ConfigError when they are not valid for ``d_sae``."""
        return matryoshka_widths(self.matryoshka_widths, d_sae)

    # ------------------------------------------------------------------ validation
    def errors(self, d_in: int | None = None, n_layers: int | None = None) -> dict[str, str]:
        """Every bad value at once: ``{field name: sentence naming the field's label}``.

        ``d_in`` (the hidden size) and ``n_layers`` enable the checks that need the model. The
        key ``"activations"`` holds the rule "an activation file, or a model and a dataset".
        """
        out: dict[str, str] = {}
        if self.activations is None and (self.model is None or self.dataset is None):
            out["activations"] = ("Give either an activation file (--activations) or both "
                                  "--model and --dataset.")
        infos = {info.name: info for info in options()}
        for info in infos.values():
            message = check_value(info, getattr(self, info.name))
            if message:
                out[info.name] = message
        if "device" not in out and not _DEVICE.match(self.device):
            out["device"] = f"Unknown device '{self.device}'; use auto, cpu, cuda, cuda:N or mps."

        def ok(*names: str) -> bool:
            return not any(n in out for n in names)

        if self.gpus > 1 and ok("gpus", "device"):
            if self.device.startswith("cuda:") or self.device == "mps":
                out["gpus"] = (f"GPUs ({self.gpus}) needs device cuda, auto or cpu: each "
                               f"process takes the GPU of its rank, so not {self.device}.")
            elif ok("batch_size") and self.batch_size % self.gpus:
                out["gpus"] = (f"The batch size ({self.batch_size:,}) must divide evenly among "
                               f"the {self.gpus} processes (GPUs).")
        if ok("micro_batch_size", "batch_size") and self.micro_batch_size is not None:
            if self.micro_batch_size > self.batch_size:
                out["micro_batch_size"] = (f"Micro-batch size ({self.micro_batch_size:,}) must "
                                           f"not exceed the batch size ({self.batch_size:,}).")
            elif self.batch_size % self.micro_batch_size:
                out["micro_batch_size"] = (f"Micro-batch size ({self.micro_batch_size:,}) must "
                                           f"divide the batch size ({self.batch_size:,}).")
        if ok("encoder_type"):
            for info in infos.values():  # a switch set for a type that does not use it
                value = getattr(self, info.name)
                if (info.kind == "bool" and value and info.applies_to
                        and self.encoder_type not in info.applies_to and ok(info.name)):
                    out[info.name] = (f"{info.label} works only with the "
                                      f"{' or '.join(info.applies_to)} encoder type (got "
                                      f"'{self.encoder_type}'); turn it off or choose "
                                      f"{' or '.join(info.applies_to)}.")
        if n_layers is not None and self.layer is not None and ok("layer") \
                and self.layer >= n_layers:
            out["layer"] = (f"Layer {self.layer} is out of range: the model has {n_layers} "
                            f"layers (0-{n_layers - 1}).")
        if d_in is not None and ok("latent_dim", "expansion_factor"):
            d_sae = self.d_sae(d_in)
            if d_sae > MAX_LATENTS:
                out["expansion_factor"] = (f"Expansion factor {self.expansion_factor} gives "
                                           f"{d_sae:,} latents, more than {MAX_LATENTS:,}.")
            elif ok("k", "encoder_type") and self.k > d_sae \
                    and self.encoder_type in (infos["k"].applies_to or ()):
                out["k"] = f"k ({self.k}) cannot exceed the number of latents ({d_sae})."
        if (self.target_l0 is not None and d_in is not None
                and ok("target_l0", "encoder_type", "latent_dim", "expansion_factor")
                and self.encoder_type in (infos["target_l0"].applies_to or ())
                and self.target_l0 >= self.d_sae(d_in)):
            out["target_l0"] = (f"Target L0 ({self.target_l0:g}) must be below the number of "
                                f"latents ({self.d_sae(d_in):,}).")
        if self.target_hook_point is not None and ok("target_hook_point", "hook_point"):
            order = {h: i for i, h in enumerate(BLOCK_ORDER)}
            if order[self.target_hook_point] <= order[self.hook_point]:
                out["target_hook_point"] = (
                    f"The target hook point ({self.target_hook_point}) must come after the hook "
                    f"point ({self.hook_point}) in the block, whose order is "
                    f"{', '.join(BLOCK_ORDER)}: e.g. --hook-point mlp_in --target-hook-point "
                    "mlp_out.")
            elif self.tie_weights and ok("tie_weights"):
                out["tie_weights"] = ("Tie weights does not apply to a transcoder (its decoder "
                                      "writes the target, not the input); turn it off.")
        if self.skip_connection and self.target_hook_point is None and ok("skip_connection"):
            out["skip_connection"] = ("Skip connection needs a target hook point (a transcoder, "
                                      "e.g. --hook-point mlp_in --target-hook-point mlp_out).")
        widths_used = self.encoder_type in (infos["matryoshka_widths"].applies_to or ())
        if widths_used and ok("matryoshka_widths", "encoder_type"):
            d_sae = self.d_sae(d_in) if d_in is not None and ok("latent_dim",
                                                                "expansion_factor") else None
            try:
                matryoshka_widths(self.matryoshka_widths, d_sae)
            except ConfigError as exc:
                out["matryoshka_widths"] = str(exc)
        return out

    def validate(self, d_in: int | None = None, n_layers: int | None = None) -> None:
        """Raise ConfigError (first message; all of them in ``.errors``) when a value is bad."""
        errors = self.errors(d_in=d_in, n_layers=n_layers)
        if errors:
            raise ConfigError(next(iter(errors.values())), errors=errors)


def matryoshka_widths(text: str | None, d_sae: int | None) -> tuple[int, ...]:
    """The Matryoshka prefix widths written in ``text`` ("1024,2048,4608", spaces or brackets
    allowed), checked: whole, positive, increasing and (when ``d_sae`` is known) ending at
    ``d_sae``. Blank: d_sae / 8, / 4, / 2 and d_sae (the positive, distinct ones); () when
    ``d_sae`` is unknown. ConfigError with a sentence naming the option otherwise."""
    label = "Matryoshka widths"
    if text is None or not str(text).strip(" []"):
        if d_sae is None:
            return ()
        return tuple(sorted({w for w in (d_sae // 8, d_sae // 4, d_sae // 2, d_sae) if w > 0}))
    parts = [p for p in re.split(r"[\s,]+", str(text).strip(" []")) if p]
    widths = []
    for part in parts:
        try:
            widths.append(int(part.replace("_", "")))
        except ValueError:
            raise ConfigError(f"{label} must be whole numbers separated by commas, e.g. "
                              f"1024,2048,4608 (got '{text}').") from None
    if any(w <= 0 for w in widths):
        raise ConfigError(f"{label} must be positive (got '{text}').")
    for a, b in zip(widths, widths[1:], strict=False):
        if b <= a:
            raise ConfigError(f"{label} must increase from one to the next (got {a} then {b}).")
    if d_sae is not None and widths[-1] != d_sae:
        raise ConfigError(f"The last of the {label} ({widths[-1]:,}) must equal the number of "
                          f"latents ({d_sae:,}).")
    return tuple(widths)


@functools.lru_cache(maxsize=1)
def _declared() -> tuple[tuple[dataclasses.Field, Any], ...]:
    hints = typing.get_type_hints(TrainConfig)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(TrainConfig)
                 if "option" in f.metadata)


def options() -> list[OptionInfo]:
    """Every option, in declaration order (the form's order). Read at call time: the encoder
    types, their help and the options they use come from the registry as it is now."""
    out = []
    for f, hint in _declared():
        m = f.metadata["option"]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        choices = m["choices"]() if callable(m["choices"]) else m["choices"]
        kind = m["kind"] or {int: "int", float: "float", bool: "bool"}.get(
            base, "choice" if choices else "str")
        out.append(OptionInfo(
            name=f.name, label=m["label"], help=m["help"]() if callable(m["help"]) else m["help"],
            kind=kind, default=f.default, unit=m["unit"], choices=tuple(choices),
            min=m["min"], max=m["max"] if m["max"] is not None or kind != "int" else INT64_MAX,
            optional=type(None) in typing.get_args(hint), advanced=m["advanced"],
            in_form=m["in_form"], applies_to=architectures.applies_to(f.name),
            group=m["group"], min_exclusive=m["min_exclusive"],
            max_exclusive=m["max_exclusive"]))
    return out


def option(name: str) -> OptionInfo:
    """The option called ``name`` (or an old name in ``ALIASES``); ConfigError when unknown."""
    name = ALIASES.get(name, name)
    for info in options():
        if info.name == name:
            return info
    raise ConfigError(f"Unknown configuration option '{name}'.")


