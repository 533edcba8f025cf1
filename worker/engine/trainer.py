"""The training loop. Read ``Trainer.fit`` top to bottom.

    trainer = Trainer(cfg, source, out_dir, callbacks=Callbacks(on_metrics=print))
    result = trainer.fit()            # or fit(resume="run/checkpoints/step_00000500.safetensors")

The SAE is the registered type ``cfg.encoder_type`` (``engine.architectures``); the loop asks it
for what differs between types (its sparsity penalty, the constraints around a step, its
initial thresholds). Each step: set the learning rate, hear the caller (pause / stop / save),
fetch ``batch_size`` vectors (hearing the caller again while a live source extracts a buffer
round: ``listening``; a resume's rebuilding of that buffer hears it too: ``replaying``),
forward/backward in micro-batches (halved on CUDA out-of-memory, with the accumulation doubled
so the effective batch is unchanged), clip, step, let the SAE keep its constraints (unit-norm
decoder rows, thresholds), update the dead-latent counters. The
step's statistics stay on the device: every ``log_every`` steps they are read at once, checked
(a non-finite loss stops the run, and is checked again before any checkpoint is written, so a
NaN is never saved) and logged; every ``auto_save_interval`` steps a checkpoint is saved. At the
end: evaluate on held-out vectors, save the final checkpoint and export the SAELens folder.

Under torchrun (``dist``, see ``distributed``) every rank runs this loop on its shard of each
global batch (``batch_size / world_size`` rows); after backward the gradients and the step's
statistics are reduced over the ranks (``_share``), so every rank takes the same step; rank 0
alone reports, writes checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as adam_update
from torch.optim.optimizer import _get_scalar_dtype

from . import architectures
from . import checkpoints as ck
from .activations import ActivationSource
from .config import TrainConfig
from .devices import (
    autocast_dtype,
    halve_on_oom,
    keep_host_memory,
    peak_memory_mb,
    pick_device,
    pick_precision,
    release_host_memory,
)
from .distributed import SINGLE, Dist, device_for, local_batch
from .errors import CheckpointError, ConfigError, TrainingError
from .export import export_saelens
from .l0_control import START_FRAC, L0Controller

STEP_STATS = ("loss", "mse", "aux", "l0", "err", "var", "grad_norm")
"""One row per step in the window, in this order (``err`` and ``var``: the squared error and
the variance about the batch mean, summed over the batch's elements)."""


def _noop(*_: Any) -> None:
    return None


@dataclass
class Callbacks:
    on_metrics: Callable[[dict[str, Any]], None] = _noop
    """Called every log_every steps with a metrics dict (see ``Trainer._metrics``)."""
    on_log: Callable[[str], None] = _noop
    """Human-readable events: started, checkpoint saved, batch reduced after OOM, finished."""
    on_checkpoint: Callable[[dict[str, Any]], None] = _noop
    """After each save: {path, step, loss, size_bytes, is_best, deleted: [paths]}."""
    control: Callable[[int], str | None] = lambda step: None
    """Polled between steps; may return "pause", "stop" or "save"."""
    pause_poll_s: float = 0.5


@dataclass
class TrainResult:
    steps: int
    tokens: int
    tokens_per_s: float
    fvu: float
    l0: float
    dead_frac: float
    out: str
    checkpoint: str
    stopped: bool = False
    eval: dict[str, Any] = field(default_factory=dict)
    filtered: dict[str, int] | None = None
    """Live extraction only: tokens seen and excluded (position 0, special, outliers), kept."""

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), tokens_per_s=round(self.tokens_per_s, 1))


# ---------------------------------------------------------------------------- the optimizer
class Adam:
    """Adam, or AdamW (``decoupled``: weight decay decoupled from the gradient): torch's own
    update (``torch.optim.adam.adam``, the state of ``torch.optim.Adam``), fused (one pass
    per tensor: ~7 ms instead of ~30-70 for the 5.3M parameters of an 8x SAE on 576 inputs on
    one CPU thread) on the CPU and CUDA; without ``torch.optim.Optimizer``, whose methods import
    ``torch._dynamo`` on first use (~2 s of a run's start-up, as long as importing torch;
    nothing here compiles).

    The subset of the Optimizer interface the trainer and ``torch.amp.GradScaler`` use:
    ``param_groups`` (one group), ``state``, ``step``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` in torch's format (checkpoints are interchangeable with torch.optim's).
    """

    def __init__(self, params: Any, *, lr: float, betas: tuple[float, float],
                 weight_decay: float, decoupled: bool, eps: float = 1e-8) -> None:
        params = list(params)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self.param_groups: list[dict[str, Any]] = [{
            "params": params, "lr": lr, "betas": betas, "eps": eps,
            "weight_decay": weight_decay, "amsgrad": False, "maximize": False, "foreach": None,
            "capturable": False, "differentiable": False, "fused": fused or None,
            "decoupled_weight_decay": decoupled}]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = []
            for p in params:
                if p not in self.state:
                    self.state[p] = {
                        "step": self._step_tensor(torch.tensor(0.0), p, group),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                states.append(self.state[p])
            beta1, beta2 = group["betas"]
            adam_update(
                params, [p.grad for p in params], [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states], [], [st["step"] for st in states],
                amsgrad=False, has_complex=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                foreach=group["foreach"], capturable=False, differentiable=False,
                fused=group["fused"],
                grad_scale=None, found_inf=None,
                decoupled_weight_decay=group["decoupled_weight_decay"])

    @staticmethod
    def _step_tensor(step: Tensor, p: Tensor, group: dict[str, Any]) -> Tensor:
        """The step count as torch keeps it: on the CPU, or beside ``p`` when fused."""
        if group["fused"]:
            return step.to(p.device, _get_scalar_dtype(is_fused=True))
        return step.to("cpu", _get_scalar_dtype())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: parameters by their index in the group."""
        params = self.param_groups[0]["params"]
        return {"state": {i: dict(self.state[p]) for i, p in enumerate(params)
                          if p in self.state},
                "param_groups": [dict(g, params=list(range(len(params))))
                                 for g in self.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The hyper-parameters and state of ``state`` (this optimizer's or torch.optim's);
        how the update runs (fused or not) stays this one's."""
        ours = self.param_groups[0]
        params = ours["params"]
        (group,) = state["param_groups"]
        keep = ("params", "foreach", "fused", "capturable", "differentiable")
        ours.update({k: v for k, v in group.items() if k not in keep and k in ours})
        ours["betas"] = tuple(ours["betas"])
        self.state = {}
        for i, st in state["state"].items():
            p = params[int(i)]
            self.state[p] = {k: self._step_tensor(v, p, ours) if k == "step"
                             else v.to(p.device, p.dtype) for k, v in st.items()}


# ---------------------------------------------------------------------------- the trainer
def get_lr(step: int, cfg: TrainConfig, base: float) -> float:
    """Warm-up, then constant (with a final linear decay), linear or cosine decay to zero."""
    warm, total = cfg.warmup_steps(), cfg.total_steps
    if step < warm:
        return base * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        decay = int(cfg.lr_decay_frac * total)
        start = total - decay
        return base if step < start or decay == 0 else base * (total - step) / decay
    frac = (step - warm) / max(1, total - warm)
    if cfg.lr_schedule == "linear":
        return base * (1 - frac)
    return base * 0.5 * (1 + math.cos(math.pi * frac))


def hear(cb: Callbacks, step: int, trainers: list[Trainer], during: str = "") -> bool:
    """Between steps, ask the caller (``cb.control``): "pause" saves every trainer's checkpoint
    and waits until told otherwise, "save" saves them all, "stop" returns True. ``during``: what
    the step is doing when heard inside it (``listening``, ``replaying``), for the log. No
    ``trainers``: nothing to save (a resume rebuilding its buffer, ``replaying``)."""
    cmd = cb.control(step)
    if cmd == "pause":
        for trainer in trainers:
            trainer.save("pause")
        cb.on_log(f"Paused at step {step}{during}.")
        while (cmd := cb.control(step)) == "pause":
            time.sleep(cb.pause_poll_s)
        if cmd != "stop":
            cb.on_log(f"Resumed at step {step}.")
    if cmd == "stop":
        cb.on_log(f"Stop requested at step {step}: finalising current weights.")
        return True
    if cmd == "save":
        for trainer in trainers:
            trainer.save("manual")
        if not trainers:
            cb.on_log(f"Save requested at step {step}{during}: nothing new to save, the "
                      "newest checkpoint is this step's.")
    return False


class Stopped(Exception):
    """A stop heard inside a step, while its batch was being extracted (``listening``), or
    while a resume rebuilt a live source's buffer (``replaying``)."""


@dataclass
class Listening:
    heard_s: float = 0.0
    """Seconds spent hearing the caller inside the step (a pause's wait included): not
    training time."""


@contextmanager
def _between_batches(cb: Callbacks, step: int, trainers: list[Trainer], savers: list[Trainer],
                     during: str) -> Iterator[Listening]:
    """Inside this block each live source of ``trainers`` hears the caller between its batches
    of contexts (``LiveActivations.between``): ``hear`` (a pause or save checkpoints
    ``savers``); a stop raises ``Stopped``. Not under DDP: there the caller is heard on logging
    steps, by every rank at once (``Trainer._shared_callbacks``)."""
    heard = Listening()

    def between() -> None:
        t0 = time.perf_counter()
        try:
            if hear(cb, step, savers, during=during):
                raise Stopped
        finally:
            heard.heard_s += time.perf_counter() - t0

    sources = {id(t.source): t.source for t in trainers}.values()
    live = [src for src in sources if hasattr(src, "between")
            and not any(t.dist.enabled for t in trainers)]
    for src in live:
        src.between = between
    try:
        yield heard
    finally:
        for src in live:
            src.between = None


@contextmanager
def listening(cb: Callbacks, step: int, trainers: list[Trainer]) -> Iterator[Listening]:
    """Fetch a step's batches inside this block. A live source extracts a buffer round inside
    the step that needs it (tens of seconds on a CPU), so the caller is heard between its
    batches of contexts too: a pause or save there checkpoints each trainer as of the step's
    start (its data position from before the batch was asked for; nothing has been learnt
    yet), so resuming replays the step exactly; a stop raises ``Stopped`` and leaves that
    position for the final checkpoint. Not under DDP (``_between_batches``)."""
    for trainer in trainers:
        trainer.data_before_step = trainer.source.state_dict()
    stopped = False
    try:
        with _between_batches(cb, step, trainers, trainers,
                              " (during activation extraction)") as heard:
            yield heard
    except Stopped:
        stopped = True  # the final checkpoint records the step's start; so do the counts
        for trainer in trainers:  # of tokens extracted (the abandoned round's are dropped)
            stats = getattr(trainer.source, "stats", None)
            if stats is not None and "stats" in trainer.data_before_step:
                trainer.source.stats = type(stats)(**trainer.data_before_step["stats"])
        raise
    finally:
        if not stopped:
            for trainer in trainers:
                trainer.data_before_step = None


@contextmanager
def replaying(cb: Callbacks, step: int, trainers: list[Trainer]) -> Iterator[None]:
    """Rebuild the trainers' sources at their checkpoint's data position inside this block (a
    resume: ``load_state_dict`` re-extracts a live source's two rounds, minutes on a CPU),
    hearing the caller between batches of contexts as ``listening`` does. Nothing has been
    learnt since the checkpoint being resumed, so a pause saves nothing and waits (a resume
    from that checkpoint is as exact as before), a save has nothing new to write, and a stop
    raises ``Stopped``: ``finish(stopped=True, resumed=...)`` keeps that checkpoint as the
    final one."""
    with _between_batches(cb, step, trainers, [],
                          " (while resuming: rebuilding the activation buffer)"):
        yield


@dataclass
class _Window:
    """The steps since the last log line; their statistics stay on the device until read."""

    first_step: int
    fired: Tensor
    """Firing count per latent [d_sae]."""
    seconds: float = 0.0
    """Time in the window's steps (s), counted as the run's training time is."""
    tokens: int = 0
    rows: list[Tensor] = field(default_factory=list)
    """Per step, the ``STEP_STATS``."""


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        source: ActivationSource,
        out_dir: Path | str,
        *,
        callbacks: Callbacks | None = None,
        export_meta: dict[str, Any] | None = None,
        dist: Dist = SINGLE,
    ) -> None:
        self.cfg, self.source, self.out_dir = cfg, source, Path(out_dir)
        self.dist = dist
        """This process's place among the training processes (``distributed``); the source
        must be this rank's shard."""
        self.cb = self._shared_callbacks(callbacks or Callbacks())
        self.export_meta = dict(source.meta, **(export_meta or {}))
        self.d_in = source.d_in
        self.d_target = int(getattr(source, "d_target", 0) or 0)
        """A transcoder's target width: rows are [x | y] (``activations``); 0 for an SAE."""
        if bool(self.d_target) != bool(cfg.target_hook_point):
            raise ConfigError(
                f"The training config {'names' if cfg.target_hook_point else 'has no'} target "
                f"hook point, but its activations {'hold' if self.d_target else 'do not hold'} "
                "transcoder pairs (input and target).")
        if self.d_target and self.d_target != self.d_in:
            raise ConfigError(f"A transcoder's input and target must have the same width "
                              f"(got {self.d_in} and {self.d_target}).")
        cfg.validate(d_in=self.d_in)
        self.local_batch = local_batch(cfg.batch_size, dist)
        """Vectors this rank trains on per step (its share of the global ``batch_size``)."""
        source.expect(cfg.total_steps * self.local_batch)  # a live source extracts no more
        self.d_sae = cfg.d_sae(self.d_in)
        self.device = device_for(dist, pick_device(cfg.device))
        self.precision = pick_precision(cfg.precision, self.device)
        if self.device.type == "cpu" and self.precision == "fp16":
            raise ConfigError("fp16 needs a GPU; use fp32 or bf16 on the CPU.")
        if self.device.type == "cpu":
            keep_host_memory()  # reuse the step's large blocks instead of faulting them anew
        self.base_lr = cfg.lr(self.d_sae)
        self.aux_window = min(cfg.dead_window_tokens, 10 * cfg.batch_size)
        self.ckpt_dir = self.out_dir / "checkpoints"
        torch.manual_seed(cfg.seed)
        sae_class = architectures.get(cfg.encoder_type).load()
        self.sae = sae_class.from_config(self.d_in, self.d_sae, cfg).to(self.device)
        self.l0_control = self._l0_controller()
        """Steers the sparsity coefficient toward ``cfg.target_l0``; None = fixed coefficient."""
        self.opt = Adam(self.sae.parameters(), lr=self.base_lr, betas=(cfg.beta1, cfg.beta2),
                        weight_decay=cfg.weight_decay, decoupled=cfg.optimizer == "adamw")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.micro = min(cfg.micro_batch_size or self.local_batch, self.local_batch)
        self.step, self.tokens, self.scale = 0, 0, 1.0
        """Steps and tokens trained; the input scale (E||scale x|| = sqrt(d_in))."""
        self.target_scale = 1.0
        """A transcoder's target scale (E||target_scale y|| = sqrt(d_target)); else = scale."""
        self.best_loss, self.best_step = math.inf, None
        self._window_loss: float | None = None
        self.since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        self.protect: set[int] = set()
        self.win = self._new_window()
        self.train_time, self.start_tokens, self.lr_now = 0.0, 0, self.base_lr
        """Seconds spent in training steps and the tokens trained before them (this attempt)."""
        self.data_before_step: dict[str, Any] | None = None
        """The source's position when the current step began, while the step fetches its batch
        (``listening``): what a checkpoint saved then records."""
        self.coef_now: float | Tensor = 0.0
        """The sparsity coefficient of the last step (a device tensor under target-L0 control)."""

    def _shared_callbacks(self, cb: Callbacks) -> Callbacks:
        """``cb`` for one process. Under DDP rank 0's callbacks (the other ranks' are silent),
        and one answer from the caller for all the ranks: rank 0's ``control``, heard on
        logging steps only (the steps that wait for the device anyway) and broadcast."""
        dist = self.dist
        if not dist.enabled:
            return cb
        own = cb.control

        def control(step: int) -> str | None:
            if step % self.cfg.log_every:
                return None
            return dist.broadcast_object(own(step) if dist.is_main else None)

        return dataclasses.replace(cb if dist.is_main else Callbacks(), control=control)

    def _l0_controller(self) -> L0Controller | None:
        """With ``cfg.target_l0``: a controller starting from the configured coefficient once
        the first 10% of the steps (or the sparsity warm-up, if longer) are done."""
        cfg = self.cfg
        users = architectures.applies_to("target_l0") or ()
        if cfg.target_l0 is None or cfg.encoder_type not in users:  # topk: k is its L0
            return None
        start = math.ceil(max(START_FRAC, cfg.l1_warmup_frac) * cfg.total_steps)
        return L0Controller(cfg.target_l0, self.sae.penalty, start_step=start,
                            device=self.device)

    def _new_window(self) -> _Window:
        return _Window(self.step, torch.zeros(self.d_sae, dtype=torch.long, device=self.device))

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialise(self) -> None:
        """The input scale from a sample of the data, then the SAE's own initialisation on it
        (b_dec, decoder directions, encoder scale, thresholds)."""
        cfg = self.cfg
        sample, target = self.split(self.source.sample(max(8192, min(self.d_sae, 65_536))))
        sample = sample.float()
        if cfg.normalize:
            self.scale = float(math.sqrt(self.d_in) / sample.norm(dim=1).mean().clamp_min(1e-8))
        self.target_scale = self.scale
        if target is not None:
            target = target.float()
            if cfg.normalize:
                self.target_scale = float(math.sqrt(self.d_target)
                                          / target.norm(dim=1).mean().clamp_min(1e-8))
            target = target * self.target_scale
        self.sae.init_from_sample(sample * self.scale, b_dec_init=cfg.b_dec_init,
                                  from_data=cfg.data_init(), seed=cfg.seed, target=target)
        if self.dist.enabled:  # the same rows gave the same SAE; rank 0's makes sure of it
            self.dist.broadcast_module(self.sae)
            scales = self.dist.broadcast(torch.tensor(
                [self.scale, self.target_scale], dtype=torch.float64, device=self.device))
            self.scale, self.target_scale = scales.tolist()

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """A source's rows as (inputs, targets): a transcoder's [x | y], else (rows, None)."""
        if not self.d_target:
            return rows, None
        return rows[:, :self.d_in], rows[:, self.d_in:]

    # ------------------------------------------------------------------ checkpoints
    def _read_window(self) -> list[list[float]]:
        """The window's per-step statistics as numbers (one host sync); TrainingError naming
        the first step whose loss is not finite."""
        rows = torch.stack(self.win.rows).tolist() if self.win.rows else []
        for i, row in enumerate(rows):
            if not math.isfinite(row[0]):
                last = ck.latest_checkpoint(self.ckpt_dir)
                raise TrainingError(
                    f"The loss became {row[0]} at step {self.win.first_step + i}; training "
                    "stopped. " + (f"The last good checkpoint is {last}. " if last else "")
                    + "Lower the learning rate or use fp32.")
        return rows

    def save(self, reason: str = "auto") -> Path:
        self._read_window()  # never save weights a non-finite loss has reached
        data = self.data_before_step if self.data_before_step is not None \
            else self.source.state_dict()
        ranks_data = self.dist.all_gather_object(data) if self.dist.enabled else None
        if not self.dist.is_main:  # rank 0 writes, with every rank's data position
            return ck.checkpoint_path(self.ckpt_dir, self.step)
        loss = self._window_loss if self._window_loss is not None else math.inf
        is_best = loss <= self.best_loss
        if is_best:
            self.best_loss, self.best_step = loss, self.step
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        opt_state = self.opt.state_dict()
        names = [n for n, _ in self.sae.named_parameters()]
        for i, st in opt_state["state"].items():
            for key, val in st.items():
                tensors[f"optim.{names[i]}.{key}"] = torch.as_tensor(val)
        tensors["stats.since_fired"] = self.since_fired
        tensors["rng.torch"] = torch.get_rng_state()
        if self.l0_control is not None:
            tensors.update({f"l0_control.{k}": v for k, v in self.l0_control.state_dict().items()})
        meta = {
            "format": "sae-studio-checkpoint/1", "step": self.step, "tokens": self.tokens,
            "config": self.cfg.to_dict(), "d_in": self.d_in, "d_sae": self.d_sae,
            "scale": self.scale, "target_scale": self.target_scale,
            "loss": loss if math.isfinite(loss) else None,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "best_step": self.best_step, "micro_batch_size": self.micro,
            "param_groups": [{k: v for k, v in pg.items() if k != "params"}
                             for pg in opt_state["param_groups"]],
            "data": data, "source_meta": self.export_meta,
            "reason": reason, "created_at": time.time(), "world_size": self.dist.world_size,
        }
        if ranks_data is not None:
            meta["data_ranks"] = ranks_data
        path = ck.atomic_save(tensors, meta, ck.checkpoint_path(self.ckpt_dir, self.step))
        if reason == "manual":
            self.protect.add(self.step)
        deleted = ck.apply_retention(self.ckpt_dir, self.cfg.keep_every, self.best_step,
                                     self.protect)
        size = path.stat().st_size
        self.cb.on_log(f"Checkpoint saved at step {self.step} ({reason}, "
                       f"{size / 2**20:.1f} MiB).")
        self.cb.on_checkpoint({"path": str(path), "step": self.step, "loss": meta["loss"],
                               "size_bytes": size, "is_best": is_best,
                               "best_step": self.best_step,
                               "deleted": [str(p) for p in deleted]})
        return path

    def load(self, path: Path | str, replay: bool = True) -> dict[str, Any]:
        """Continue from the checkpoint ``path``: the SAE, the optimizer, the counters, and
        (``replay``) the source's position, which rebuilds a live source's buffer (two rounds
        extracted again, hearing the caller: ``replaying``). Returns this rank's data position
        (``replay=False``: the caller replays it, once for the members of a group that share a
        source)."""
        c = ck.load_checkpoint(path)
        m = c.meta
        world = int(m.get("world_size") or 1)
        if world != self.dist.world_size:
            raise CheckpointError(
                f"Checkpoint '{path}' was written by a run on {world} process(es) and holds "
                f"each one's data position; resume it on {world} (torchrun --nproc-per-node "
                f"{world}{'' if world > 1 else ', or without torchrun'}), not "
                f"{self.dist.world_size}.")
        if (m.get("d_in"), m.get("d_sae")) != (self.d_in, self.d_sae):
            raise CheckpointError(
                f"Checkpoint '{path}' is for an SAE of {m.get('d_in')} -> {m.get('d_sae')}, "
                f"but this run has {self.d_in} -> {self.d_sae}.")
        try:
            self.sae.load_state_dict({k: v.to(self.device) for k, v in c.prefixed("sae.").items()})
        except RuntimeError as exc:
            raise CheckpointError(f"Checkpoint '{path}' does not fit this SAE ({exc}).") from None
        names = [n for n, _ in self.sae.named_parameters()]
        state: dict[int, dict[str, Tensor]] = {}
        for i, name in enumerate(names):
            st = c.prefixed(f"optim.{name}.")
            if st:
                state[i] = {k: v.to(self.device) if k != "step" else v for k, v in st.items()}
        groups = [dict(pg, params=list(range(len(names)))) for pg in m["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.since_fired = c.tensors["stats.since_fired"].to(self.device)
        torch.set_rng_state(c.tensors["rng.torch"])
        control = c.prefixed("l0_control.")
        if self.l0_control is not None and control:
            self.l0_control.load_state_dict({k: v.to(self.device) for k, v in control.items()})
        self.step, self.tokens, self.scale = m["step"], m["tokens"], m["scale"]
        self.target_scale = float(m.get("target_scale") or self.scale)
        self.best_loss = m["best_loss"] if m.get("best_loss") is not None else math.inf
        self.best_step = m.get("best_step")
        self.micro = min(self.micro, int(m.get("micro_batch_size") or self.micro))
        data = m["data_ranks"][self.dist.rank] if "data_ranks" in m else m["data"]
        if replay:  # Stopped when a stop is heard meanwhile
            with replaying(self.cb, self.step, [self]):
                self.source.load_state_dict(data)
        return data

    # ------------------------------------------------------------------ one step
    def _dead(self, window: int) -> Tensor:
        """Mask [d_sae] of the latents that have not fired in the last ``window`` tokens (or
        not at all, early in a run)."""
        return self.since_fired >= min(window, max(self.tokens, 1))

    def _autocast(self) -> AbstractContextManager[Any]:
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def _forward_backward(self, batch: Tensor, target: Tensor | None, coef: float, dead: Tensor,
                          micro: int) -> dict[str, Tensor]:
        """Accumulate gradients over micro-batches of ``micro`` vectors; return the summed
        statistics (on the device). ``coef``: the (warmed-up) sparsity penalty coefficient;
        ``target``: a transcoder's targets (None: the inputs)."""
        n = batch.shape[0]
        acc: dict[str, Any] = dict.fromkeys(("loss", "mse", "aux", "l0", "err", "var"), 0.0)
        fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        chunks = batch.split(micro)
        targets = [None] * len(chunks) if target is None else target.split(micro)
        for chunk, y in zip(chunks, targets, strict=True):
            w = chunk.shape[0] / n
            # a transcoder's target; an SAE's call has none (a plug-in type need not know it)
            goal = {} if y is None else {"target": self.sae.loss_target(chunk, y)}
            with self._autocast():
                out = self.sae(chunk, sparsity_coef=coef, dead_mask=dead, **goal)
            self.scaler.scale(out.loss * w).backward()
            with torch.no_grad():
                y = chunk if y is None else y
                for key in ("loss", "mse", "aux", "l0"):
                    acc[key] += getattr(out, key).detach() * w
                acc["err"] += out.mse.detach() * y.numel()
                acc["var"] += (y.float() - y.float().mean(0)).pow(2).sum()
                fired += out.fired
                if out.min_kept is not None:
                    acc["min_kept"] = acc.get("min_kept", 0.0) + out.min_kept * w
        acc["fired"] = fired
        return acc

    def _train_step(self, batch: Tensor, target: Tensor | None, coef: float
                    ) -> dict[str, Tensor]:
        """``_forward_backward`` at the current micro-batch, halved on out-of-memory."""
        dead = self._dead(self.aux_window)

        def halved(micro: int) -> None:
            self.opt.zero_grad(set_to_none=True)
            self.cb.on_log(f"Out of memory at step {self.step}: micro-batch reduced to "
                           f"{micro} ({self.local_batch // micro} accumulation steps, same "
                           "effective batch).")

        def too_small(micro: int) -> TrainingError:
            return TrainingError(
                f"Out of memory even at a micro-batch of {micro} vectors (minimum "
                f"{self.cfg.min_micro_batch}). Reduce the latent dimension or expansion "
                "factor, use bf16, or lower --batch-size.")

        acc, self.micro = halve_on_oom(
            lambda micro: self._forward_backward(batch, target, coef, dead, micro), self.micro,
            minimum=self.cfg.min_micro_batch, on_halve=halved, too_small=too_small)
        return acc

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: Path | str | None = None) -> TrainResult:
        """Train to ``cfg.total_steps`` (continuing from the checkpoint ``resume``), then
        evaluate on held-out vectors, save the final checkpoint and export (``finish``)."""
        try:  # (a resume rebuilds a live source's buffer, hearing the caller: ``replaying``)
            self.begin(resume)
        except Stopped:  # stopped while resuming: nothing learnt, the checkpoint stands
            return self.finish(stopped=True, resumed=resume)
        stopped = False
        while self.step < self.cfg.total_steps:
            if hear(self.cb, self.step, [self]):  # 1. the caller: pause / stop / save
                stopped = True
                break
            t0 = time.perf_counter()
            try:  # (the caller is heard during a live source's extraction too)
                with listening(self.cb, self.step, [self]) as heard:
                    batch = self.source.next_batch(self.local_batch)
            except Stopped:
                stopped = True
                break
            self.learn(batch)  # 2.-5.
            rows = self.read_if_logging()  # 6. (reading the window waits for the device)
            self.end_step(time.perf_counter() - t0 - heard.heard_s, rows)
        return self.finish(stopped)

    def begin(self, resume: Path | str | None = None, replay: bool = True
              ) -> dict[str, Any] | None:
        """Load ``resume`` or initialise from a sample of the data; start the run's clocks.
        Returns the checkpoint's data position (``load``; None for a fresh run)."""
        cfg = self.cfg
        data = None
        if resume:
            data = self.load(resume, replay=replay)
            self.cb.on_log(f"Resumed from {resume} at step {self.step}.")
        else:
            self.initialise()
            self.cb.on_log(f"Started: {cfg.encoder_type} SAE {self.d_in} -> {self.d_sae}, "
                           f"{cfg.total_steps} steps of {cfg.batch_size} tokens on "
                           f"{self.device.type} ({self.precision}).")
        if self.device.type == "cpu":  # the initialisation's blocks, back to the system
            release_host_memory()
        self.win = self._new_window()
        self.train_time, self.start_tokens = 0.0, self.tokens
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return data

    def learn(self, batch: Tensor) -> None:
        """One optimiser step on ``batch`` [batch_size, d_in] (a transcoder's: [batch_size,
        d_in + d_target], ``split``); statistics stay on the device."""
        cfg = self.cfg
        # 2. learning rate and the sparsity penalty's warm-up (L1: standard, L0: jumprelu)
        lr = get_lr(self.step, cfg, self.base_lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        # (under target-L0 control the coefficient is the controller's, a device tensor)
        warm = cfg.l1_warmup_frac * cfg.total_steps
        penalty = self.sae.penalty if self.l0_control is None else self.l0_control.coef
        coef = penalty * min(1.0, (self.step + 1) / warm) if warm else penalty

        # 3. forward/backward (OOM-safe)
        batch, target = self.split(batch.to(self.device, non_blocking=True))
        batch = batch * self.scale if self.scale != 1.0 else batch
        if target is not None and self.target_scale != 1.0:
            target = target * self.target_scale
        acc = self._share(self._train_step(batch, target, coef))

        # 4. clip, step, the type's constraints (unit-norm decoder rows, thresholds)
        self.scaler.unscale_(self.opt)
        self.sae.constrain_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.sae.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sae.after_step(acc.get("min_kept"))
        if self.l0_control is not None:  # the next step's coefficient, from this batch's L0
            self.l0_control.observe(acc["l0"], self.step, lr / self.base_lr)

        # 5. dead-latent counters, window statistics (on the device: no host sync)
        n = batch.shape[0] * self.dist.world_size  # the global batch
        self.since_fired += n
        self.since_fired.masked_fill_(acc["fired"] > 0, 0)
        self.step += 1
        self.tokens += n
        self.win.tokens += n
        self.win.fired += acc["fired"]
        self.win.rows.append(torch.stack(
            [acc[key].float() for key in STEP_STATS[:-1]] + [grad_norm.float()]))
        self.lr_now, self.coef_now = lr, coef

    def _share(self, acc: dict[str, Tensor]) -> dict[str, Tensor]:
        """Under DDP: average the gradients over the ranks and make the step's statistics
        the global batch's, the same on every rank: means of the ranks' means (equal shards:
        loss, L0, BatchTopK's min kept activation), sums of the squared errors, variances and
        firing counts (the dead-latent counters, AuxK masks). As with micro-batches, each
        rank's share is a micro-batch (its variance about its own mean; BatchTopK selects
        within it)."""
        dist = self.dist
        if not dist.enabled:
            return acc
        dist.reduce_grads(self.sae.parameters())
        means = [key for key in ("loss", "mse", "aux", "l0", "min_kept") if key in acc]
        keys = means + ["err", "var"]
        stats = dist.all_reduce_sum(torch.stack([acc[key].float() for key in keys]))
        stats[:len(means)] /= dist.world_size
        shared = dict(zip(keys, stats.unbind(), strict=True))
        shared["fired"] = dist.all_reduce_sum(acc["fired"])
        return shared

    def _logs_now(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.cfg.total_steps

    def read_if_logging(self) -> list[list[float]] | None:
        """The window's statistics when this step logs (one host sync), else None."""
        return self._read_window() if self._logs_now() else None

    def end_step(self, spent: float, rows: list[list[float]] | None) -> None:
        """Count ``spent`` seconds as training time; log the window (``rows`` from
        ``read_if_logging``) and auto-save when due."""
        cfg = self.cfg
        self.train_time += spent
        self.win.seconds += spent
        if rows is not None:
            metrics = self._metrics(rows, self.lr_now)
            self._window_loss = metrics["loss"]
            self.cb.on_metrics(metrics)
            self.win = self._new_window()
        if cfg.auto_save_interval and self.step % cfg.auto_save_interval == 0 \
                and self.step < cfg.total_steps:
            self.save("auto")

    def finish(self, stopped: bool, resumed: Path | str | None = None) -> TrainResult:
        """7. Evaluate on held-out vectors, save the final checkpoint, export for SAELens.
        ``resumed``: the checkpoint of a run stopped while resuming from it (``replaying``):
        nothing has been learnt since, so it stays the final checkpoint, unchanged, and the
        half-rebuilt source is not evaluated."""
        cfg = self.cfg
        self._read_window()
        if self.device.type == "cpu":  # the steps' blocks: the evaluation's are shaped apart
            release_host_memory()
        if resumed is None:
            evaluation = self.evaluate() if self.dist.is_main else {}
            final = self.save("stop" if stopped else "final")
        else:
            evaluation, final = {}, Path(resumed)
        stats = self._filter_stats()
        sparsity = evaluation.pop("_freq", None)
        dead_now = int(self._dead(cfg.dead_window_tokens).sum())
        trained = self.tokens - self.start_tokens
        result = TrainResult(
            steps=self.step, tokens=self.tokens,
            tokens_per_s=trained / self.train_time if self.train_time > 0 else 0.0,
            fvu=evaluation.get("fvu", float("nan")), l0=evaluation.get("l0", float("nan")),
            dead_frac=dead_now / self.d_sae, out=str(self.out_dir), checkpoint=str(final),
            stopped=stopped, eval=evaluation)
        if not self.dist.is_main:  # rank 0 evaluates, exports and reports
            return result
        export_dir = export_saelens(self.sae, self.out_dir / "saelens", scale=self.scale,
                                    target_scale=self.target_scale, meta=self.export_meta,
                                    sparsity=sparsity)
        if stats is not None:
            result.filtered = stats.to_dict()
            self.cb.on_log(f"Activations: {stats.kept:,} kept of {stats.seen:,} tokens; excluded "
                           f"{stats.position0:,} at position 0, {stats.special:,} special, "
                           f"{stats.outliers:,} outliers.")
        if resumed is not None:
            self.cb.on_log(f"Stopped while resuming at step {self.step}: {Path(resumed).name} "
                           f"stays the final checkpoint; SAELens export in {export_dir}.")
        else:
            self.cb.on_log(f"Finished at step {self.step}: held-out FVU {result.fvu:.4f}, "
                           f"L0 {result.l0:.1f}, dead {100 * result.dead_frac:.1f}%; "
                           f"SAELens export in {export_dir}.")
        return result

    def _filter_stats(self) -> Any:
        """A live source's ``FilterStats`` (None for a file), summed over the ranks."""
        stats = getattr(self.source, "stats", None)
        if stats is None or not self.dist.enabled:
            return stats
        counts = stats.to_dict()
        summed = self.dist.all_reduce_sum(torch.tensor(list(counts.values()), device=self.device))
        return type(stats)(**dict(zip(counts, summed.tolist(), strict=True)))

    def _metrics(self, rows: list[list[float]], lr: float) -> dict[str, Any]:
        """The log line of the window, from its statistics ``rows`` (``_read_window``)."""
        win = self.win
        steps = max(1, len(rows))
        loss, mse, aux, l0, err, var, grad = (sum(col) for col in zip(*rows, strict=True))
        fvu = err / var if var > 0 else float("nan")
        freq = win.fired.float() / max(1, win.tokens)
        dead, dense = torch.stack([self._dead(self.cfg.dead_window_tokens).sum(),
                                   (freq > self.cfg.dense_threshold).sum()]).tolist()
        l0 /= steps
        return {
            "step": self.step, "tokens": self.tokens, "loss": loss / steps,
            "mse": mse / steps, "aux_loss": aux / steps,
            "sparsity_loss": aux / steps if self.sae.penalty else 0.0,
            "l0": l0, "l0_frac": l0 / self.d_sae, "fvu": fvu, "explained_variance": 1 - fvu,
            "dead": dead, "dead_frac": dead / self.d_sae, "dense": dense,
            "learning_rate": lr, "sparsity_coef": float(self.coef_now), "grad_norm": grad / steps,
            "tokens_per_s": win.tokens / max(1e-9, win.seconds),
            "peak_memory_mb": peak_memory_mb(self.device), "micro_batch_size": self.micro,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """FVU (about the mean), L0 and dead fraction on held-out vectors (a transcoder's FVU
        is of its targets)."""
        x, y = self.split(self.source.holdout())
        if not len(x):
            return {}
        y_scale = self.scale if y is None else self.target_scale
        mean = ((x if y is None else y).float().mean(0) * y_scale).to(self.device)

        def run(chunk_size: int) -> dict[str, Any]:
            err = var = l0 = 0.0
            counts = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
            chunks = x.split(chunk_size)
            targets = [None] * len(chunks) if y is None else y.split(chunk_size)
            for chunk, yc in zip(chunks, targets, strict=True):
                chunk = chunk.to(self.device).float() * self.scale
                want = chunk if yc is None else yc.to(self.device).float() * y_scale
                goal = None if yc is None else self.sae.loss_target(chunk, want)
                with self._autocast():
                    out = self.sae(chunk) if goal is None else self.sae(chunk, target=goal)
                err += float((out.x_hat.float() - (chunk if goal is None else goal)).pow(2).sum())
                var += float((want - mean).pow(2).sum())
                l0 += float(out.l0) * len(chunk)
                counts += out.fired
            freq = counts.float().cpu() / len(x)
            fvu = err / var if var > 0 else float("nan")
            return {"tokens": len(x), "fvu": fvu, "explained_variance": 1 - fvu,
                    "l0": l0 / len(x), "dead_frac": float((counts == 0).float().mean()),
                    "dense": int((freq > self.cfg.dense_threshold).sum()), "_freq": freq}

        self.sae.eval()  # BatchTopK encodes with its running threshold at inference
        try:
            return halve_on_oom(run, min(self.micro, 4096))[0]
        finally:
            self.sae.train()
