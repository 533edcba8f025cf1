"""The SAE architectures, registered by name. Torch-free: the web form, the CLI's ``--help`` and
the memory estimate read these facts without loading an implementation.

Each built-in type is one module beside this file (``standard.py``, ``topk.py``,
``batchtopk.py``, ``jumprelu.py``, ``matryoshka.py``) holding a subclass of ``base.SAE``
(encode/decode, loss terms, sparse step, SAELens export mapping, what the trainer asks of it;
the shared kernels are in ``engine/kernels.py``), plus one ``register(Architecture(...))``
entry below naming the facts that must be known without torch: its description, the
TrainConfig options it uses (its constructor's keyword names), its default learning-rate base
and its memory terms. Adding a type is one module and one entry; a test may register a type
of its own (``register(Architecture(..., impl=MyClass))``, tests/engine/test_plugin.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class MemoryTerms:
    """How a type's training step uses memory, for ``engine.memory`` (plain numbers, no torch).

    Counts of tensors alive at the peak of a micro-batch's forward or backward, in units of
    one [micro, d_sae] tensor at the activation dtype ("dense"), one [d_sae, d_in] fp32 matrix
    and one k-per-token selection (values + int64 indices). The defaults describe a dense ReLU
    step (standard)."""

    extra_params_per_latent: int = 0
    """Parameters per latent beyond W_enc, W_dec, b_enc (e.g. JumpReLU's threshold)."""
    step_dense_forward: float = 3
    """Forward: pre, the activation output, the L1 term (standard) or step output (jumprelu)."""
    step_dense_backward: float = 4
    """Backward: the saved output, the two gradients reaching it, the pre-activation gradient
    (jumprelu: + its straight-through window)."""
    step_selections: int = 0
    """k-per-token selections alive in the step (topk 1; batchtopk 2: bags and their copy)."""
    step_mask_bytes: int = 1
    """Bytes per (token, latent) of bool masks in the step."""
    step_weight_backward: int = 1
    """[d_sae, d_in] fp32 buffers in backward (the sparse encoder backward's zeros + gradient:
    2)."""
    init_dense: int = 2
    """Dense [4096, d_sae] fp32 copies in the initialisation encode (CPU)."""
    eval_dense: float = 4.5
    """Dense [chunk, d_sae] copies in the held-out evaluation forward."""
    dense_backward: tuple[float, float] | None = None
    """The backward's [micro, d_sae] tensors where the step is dense because the sparse one is
    not taken there (CUDA: ``kernels.SPARSE_DEVICES``; on the CPU standard and JumpReLU take the
    sparse step at low density, which the counts above describe): (at the activation dtype,
    fp32 whatever the precision: the L1 term's and the straight-through window's arithmetic).
    Fitted to ``bench/memory_trace.py --device cpu`` (the tensors of the run along CUDA's steps)
    at 8x, batch 4,096, bf16 and fp32. None: the counts above hold there too."""


@dataclass(frozen=True)
class Architecture:
    """One SAE type: what the form, the CLI, the config and the memory estimate know of it."""

    name: str
    description: str
    """One sentence for the form's and the CLI's help."""
    impl: str | type
    """The ``nn.Module`` class, or ``"module.path:ClassName"`` imported on first use."""
    options: tuple[str, ...] = ()
    """TrainConfig fields only this type (and others listing them) uses, e.g. ``k``."""
    lr_base: float = 2e-3
    """Default learning rate = lr_base x sqrt(4096 / latents)."""
    init_from_data: bool = True
    """Whether the decoder rows start from data samples by default (``init_from_data`` blank).
    Off for standard: a ReLU SAE started from data fires ~1,800 of 4,608 latents per token and
    its L1 spends the run pulling them down (FVU 0.356 vs 0.241 from random directions at L0 64
    on the bench file, 100 steps)."""
    memory: MemoryTerms = field(default_factory=MemoryTerms)

    def load(self) -> type:
        """The implementation class (imports torch)."""
        if isinstance(self.impl, str):
            module, _, name = self.impl.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.impl


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add (or replace) a type; returns it."""
    _REGISTRY[arch.name] = arch
    return arch


def unregister(name: str) -> None:
    """Remove a type (tests that registered one clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered type names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Architecture:
    """The type, or ConfigError with the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"Unknown encoder type '{name}'; choose one of "
                          f"{', '.join(_REGISTRY)}.") from None


def applies_to(option: str) -> tuple[str, ...] | None:
    """The types that use ``option``, or None when no type claims it (then every type uses it)."""
    users = tuple(a.name for a in _REGISTRY.values() if option in a.options)
    return users or None


def all_options() -> set[str]:
    return {o for a in _REGISTRY.values() for o in a.options}


def build(name: str, d_in: int, d_sae: int, **options: Any) -> Any:
    """An untrained SAE of type ``name`` (imports torch)."""
    return get(name).load()(d_in, d_sae, **options)


# ------------------------------------------------------------------------ the built-in types
_AUXK = ("aux_k", "aux_k_coef", "aux_k_frac")
_TOPK_MEMORY = dict(step_dense_forward=1, step_dense_backward=0, step_weight_backward=2)

register(Architecture(
    "topk", "the k largest latents per token.",
    "worker.engine.architectures.topk:TopKSAE",
    options=("k", *_AUXK), lr_base=6e-3,
    memory=MemoryTerms(**_TOPK_MEMORY, step_selections=1, step_mask_bytes=0, eval_dense=1.25)))
register(Architecture(
    "standard", "ReLU with an L1 penalty.",
    "worker.engine.architectures.standard:StandardSAE",
    options=("l1_alpha", "target_l0", "tie_weights"), lr_base=4e-3, init_from_data=False,
    memory=MemoryTerms(step_dense_backward=2, eval_dense=3, dense_backward=(3, 0.6))))
register(Architecture(
    "jumprelu", "a learned threshold per latent with an L0 penalty.",
    "worker.engine.architectures.jumprelu:JumpReLUSAE",
    options=("l0_coef", "target_l0", "jumprelu_bandwidth", "jumprelu_init_threshold"),
    lr_base=2e-3,
    memory=MemoryTerms(extra_params_per_latent=1, step_dense_forward=2, step_dense_backward=2,
                       init_dense=4, eval_dense=1.5, dense_backward=(1.4, 3.3))))
register(Architecture(
    "batchtopk", "k latents per token on average across the batch, a fixed threshold "
    "afterwards.",
    "worker.engine.architectures.batchtopk:BatchTopKSAE",
    options=("k", *_AUXK, "batchtopk_threshold_momentum"), lr_base=2e-3,
    memory=MemoryTerms(**_TOPK_MEMORY, step_selections=2, init_dense=3, eval_dense=4)))
register(Architecture(
    "matryoshka_batchtopk", "BatchTopK whose nested prefixes of the dictionary (the Matryoshka "
    "widths) each reconstruct the input on their own; the loss sums their errors.",
    "worker.engine.architectures.matryoshka:MatryoshkaBatchTopKSAE",
    options=("k", *_AUXK, "batchtopk_threshold_momentum", "matryoshka_widths"), lr_base=2e-3,
    # + the prefix reconstructions and their errors, [micro, levels, d_in] each (about two
    # dense units in the forward and two in the backward at 8x with four levels)
    memory=MemoryTerms(**dict(_TOPK_MEMORY, step_dense_forward=2, step_dense_backward=2),
                       step_selections=2, init_dense=3, eval_dense=4)))
