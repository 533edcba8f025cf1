"""Target-L0 control: steer a sparsity coefficient (standard's L1, JumpReLU's L0 coefficient)
so that the SAE ends its training at a chosen L0 (``TrainConfig.target_l0``).

The controller works in log space, on the error e = log(L0 / target), where L0 is an
exponential moving average of the training batches' L0 (mean active latents per token). After
a warm-up (the first ``START_FRAC`` of the steps, or the sparsity warm-up if longer: early L0
says little about the end) each step moves u = log(coefficient) by a proportional-integral step
in velocity form,

    du = (KI * e + KP * (e - e_previous)) * lr / base_lr,   clamped to +-MAX_DU,

so u itself is the integral (no separate integrator to wind up) and u stays within
``SPAN`` (x or / 1000) of the starting coefficient. Why these choices:

* Log space: L0 responds to the coefficient roughly as a power law, so equal ratios of error
  call for equal ratios of change, at any scale of the coefficient.
* The proportional term on the change of e damps the loop: while L0 is already moving toward
  the target the coefficient stops pushing. The L0 lags the coefficient by the optimizer's
  response time; a pure integrator overshoots.
* The clamp per step bounds what one noisy batch can do, and bounds windup when the
  coefficient saturates: under Adam the update of a JumpReLU threshold has a size set by the
  learning rate, not by the gradient, so beyond some coefficient more penalty changes nothing
  (SAELens #494, #382, #719); an unclamped integral would then run away and take as long to
  come back.
* The clamp limits windup but cannot make a saturated coefficient act: for JumpReLU under a
  target the penalty's straight-through gradient also reaches the pre-activations
  (``JumpReLUSAE.penalty_to_pre``), so the coefficient moves the encoder, not only the
  thresholds. Without that, on a SmolLM2 layer-15 file L0 rose from 96 to 204 while the
  controller took the coefficient from 5 to 3,100.
* The step is scaled by the learning rate's fraction of its base: the weights (hence L0) move
  in proportion to it, so as the schedule decays to zero the controller slows with them instead
  of winding up against a frozen SAE.

All state lives in tensors on the training device and is updated with tensor operations only,
so the step reads nothing back to the host (the trainer reads the coefficient on logging
steps). ``state_dict`` / ``load_state_dict`` carry it through checkpoints for exact resume.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

START_FRAC = 0.1
"""Control starts after this fraction of the steps (or the sparsity warm-up, if longer)."""
KI = 0.15
"""Integral gain: du per step per unit of log error."""
KP = 1.0
"""Proportional gain on the change of the log error between steps."""
MAX_DU = 0.25
"""Largest change of log(coefficient) in one step (x or / 1.28)."""
SPAN = math.log(1000.0)
"""log(coefficient) stays within this of its start."""
EMA = 0.3
"""Weight of each batch's L0 in the moving average the controller sees."""


class L0Controller:
    """The sparsity coefficient of a run with a target L0; see the module docstring."""

    def __init__(self, target: float, start_coef: float, *, start_step: int,
                 device: torch.device | str = "cpu") -> None:
        if target <= 0:
            raise ValueError("The target L0 must be positive.")
        self.target = float(target)
        self.start_step = int(start_step)
        """The first step whose L0 moves the coefficient."""
        base = start_coef if start_coef > 0 else 1.0
        self.u0 = math.log(base)
        """log of the starting coefficient (the configured one; 1 when that is 0)."""
        f64 = dict(dtype=torch.float64, device=device)
        self.u = torch.tensor(self.u0, **f64)
        """log(coefficient), on the device."""
        self.ema = torch.zeros((), **f64)
        """Moving average of the training batches' L0 (0 before the first step)."""
        self.prev_err = torch.zeros((), **f64)
        """The previous step's log error (0 before control starts)."""
        self.coef = self.u.exp().float()
        """The coefficient as a float32 0-d tensor, passed to the SAE's forward."""
        self.observed = 0
        """Steps observed (host-side count: the first sets the average outright)."""

    def observe(self, l0: Tensor, step: int, lr_frac: float = 1.0) -> None:
        """Take step ``step``'s batch L0 (a 0-d tensor on the device; ``step`` counts from 0)
        and, once control has started, move the coefficient. ``lr_frac``: the learning rate
        over its base (0-1)."""
        l0 = l0.detach().to(self.ema.dtype)
        if self.observed == 0:
            self.ema.copy_(l0)
        else:
            self.ema.mul_(1 - EMA).add_(l0, alpha=EMA)
        self.observed += 1
        err = torch.log(self.ema.clamp_min(1e-3) / self.target)
        if step >= self.start_step:
            du = (KI * err + KP * (err - self.prev_err)) * max(0.0, min(1.0, lr_frac))
            self.u.add_(du.clamp(-MAX_DU, MAX_DU)).clamp_(self.u0 - SPAN, self.u0 + SPAN)
            self.coef = self.u.exp().float()
        self.prev_err.copy_(err)

    def state_dict(self) -> dict[str, Tensor]:
        """The state as tensors (for the checkpoint's tensor file)."""
        return {"u": self.u.clone(), "ema": self.ema.clone(), "prev_err": self.prev_err.clone(),
                "observed": torch.tensor(self.observed, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.u.copy_(state["u"])
        self.ema.copy_(state["ema"])
        self.prev_err.copy_(state["prev_err"])
        self.observed = int(state["observed"])
        self.coef = self.u.exp().float()
