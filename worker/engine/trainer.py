"""The training loop. Read ``Trainer.fit`` top to bottom.

    trainer = Trainer(cfg, source, out_dir, callbacks=Callbacks(on_metrics=print))
    result = trainer.fit()            # or fit(resume="run/checkpoints/step_00000500.safetensors")

Each step: set the learning rate, hear the caller (pause / stop / save), fetch ``batch_size``
vectors, forward/backward in micro-batches (halved on CUDA out-of-memory, with the accumulation
doubled so the effective batch is unchanged), check the loss is finite, clip, step, keep decoder
rows at unit norm (topk, batchtopk, jumprelu), move BatchTopK's running threshold, update the
dead-latent counters, log every ``log_every`` steps and
auto-save every ``auto_save_interval`` steps. At the end: evaluate on held-out vectors, save the
final checkpoint and export the SAELens folder.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoints as ck
from .activations import ActivationSource
from .config import TrainConfig
from .errors import CheckpointError, ConfigError, TrainingError
from .sae import SAE

UNIT_DECODER_TYPES = ("topk", "batchtopk", "jumprelu")
"""Encoder types whose decoder rows are kept at unit norm (the L0 / top-k sparsity cannot be
gamed by rescaling, and a unit decoder keeps JumpReLU thresholds in input units)."""


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
        return {"steps": self.steps, "tokens": self.tokens,
                "tokens_per_s": round(self.tokens_per_s, 1), "fvu": self.fvu, "l0": self.l0,
                "dead_frac": self.dead_frac, "out": self.out, "checkpoint": self.checkpoint,
                "stopped": self.stopped, "eval": self.eval, "filtered": self.filtered}


# ---------------------------------------------------------------------------- device helpers
def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise ConfigError(f"Unknown device '{requested}'; use auto, cpu, cuda, cuda:N "
                              "or mps.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("Device 'cuda' was requested but CUDA is not available here.")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("Device 'mps' was requested but MPS is not available here.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


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


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm, started from the mean."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * y.norm().clamp_min(1):
            return y_new
        y = y_new
    return y


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated; CPU: the process's peak RSS — VmHWM where /proc has it (ru_maxrss
    of a process started by fork+exec can carry its parent's peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        source: ActivationSource,
        out_dir: Path | str,
        *,
        callbacks: Callbacks | None = None,
        export_meta: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.source, self.out_dir = cfg, source, Path(out_dir)
        self.cb = callbacks or Callbacks()
        self.export_meta = dict(source.meta, **(export_meta or {}))
        self.d_in = source.d_in
        cfg.validate(d_in=self.d_in)
        self.d_sae = cfg.d_sae(self.d_in)
        self.device = pick_device(cfg.device)
        self.precision = pick_precision(cfg.precision, self.device)
        if self.device.type == "cpu" and self.precision == "fp16":
            raise ConfigError("fp16 needs a GPU; use fp32 or bf16 on the CPU.")
        self.base_lr = cfg.lr(self.d_sae)
        self.k_aux = cfg.k_aux(self.d_in, self.d_sae)
        self.aux_window = min(cfg.dead_window_tokens, 10 * cfg.batch_size)
        self.ckpt_dir = self.out_dir / "checkpoints"
        torch.manual_seed(cfg.seed)
        self.sae = SAE(self.d_in, self.d_sae, cfg.encoder_type, cfg.k,
                       tie_weights=cfg.tie_weights, bandwidth=cfg.jumprelu_bandwidth,
                       init_threshold=cfg.jumprelu_init_threshold or 0.0).to(self.device)
        self.unit_decoder = cfg.encoder_type in UNIT_DECODER_TYPES
        self.opt = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.micro = cfg.micro_batch_size or cfg.batch_size
        self.step = 0
        self.tokens = 0
        self.scale = 1.0
        self.best_loss, self.best_step = math.inf, None
        self.since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        self.protect: set[int] = set()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if self.cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(self.sae.parameters(), lr=self.base_lr, betas=(self.cfg.beta1, self.cfg.beta2),
                   weight_decay=self.cfg.weight_decay)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialise(self) -> None:
        """Input scale, b_dec and decoder directions from a sample of the data."""
        cfg = self.cfg
        sample = self.source.sample(max(8192, min(self.d_sae, 65_536))).float()
        if cfg.normalize:
            self.scale = float(math.sqrt(self.d_in) / sample.norm(dim=1).mean().clamp_min(1e-8))
        sample = sample * self.scale
        if cfg.b_dec_init == "geometric_median":
            b_dec = geometric_median(sample[:8192])
        elif cfg.b_dec_init == "mean":
            b_dec = sample.mean(0)
        else:
            b_dec = torch.zeros(self.d_in)
        self.sae.b_dec.copy_(b_dec.to(self.device))
        g = torch.Generator().manual_seed(cfg.seed)
        directions = torch.randn(self.d_sae, self.d_in, generator=g)
        if cfg.init_from_data:
            n = min(self.d_sae, sample.shape[0])
            pick = torch.randperm(sample.shape[0], generator=g)[:n]
            directions[:n] = sample[pick] - b_dec
        self.sae.set_decoder(directions.to(self.device))
        # Scale the encoder so the first reconstructions have the right size: the least-squares
        # factor between (x_hat - b_dec) and (x - b_dec) on the sample. Without it, k latents
        # aligned with x each fire at ~||x|| and the SAE spends its first steps shrinking them.
        # BatchTopK and JumpReLU are scaled with the BatchTopK selection (k per token on
        # average); BatchTopK's running threshold then starts at the smallest kept activation
        # (pre-activations scale with W_enc: b_enc is 0 here), as do JumpReLU's thresholds
        # unless jumprelu_init_threshold is given.
        x = sample[:4096].to(self.device)
        centred = x - self.sae.b_dec
        batchtopk = cfg.encoder_type in ("batchtopk", "jumprelu")
        f = self.sae.encode_batch_topk(x) if batchtopk else self.sae.encode(x)
        recon = self.sae.decode(f) - self.sae.b_dec
        denom = recon.pow(2).sum()
        if denom > 0:
            factor = ((recon * centred).sum() / denom).clamp(1e-3, 1e3)
            if self.sae.tie_weights:  # scaling W_enc scales the decoder too: recon ~ factor^2
                factor = factor.sqrt()
            self.sae.W_enc.mul_(factor)
            if batchtopk:
                kept = f[f > 0]
                start = float(kept.min() * factor) if kept.numel() else 0.0
                if cfg.encoder_type == "jumprelu" and cfg.jumprelu_init_threshold is not None:
                    start = cfg.jumprelu_init_threshold
                self.sae.threshold.fill_(start)

    # ------------------------------------------------------------------ checkpoints
    def save(self, reason: str = "auto") -> Path:
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
        meta = {
            "format": "sae-studio-checkpoint/1", "step": self.step, "tokens": self.tokens,
            "config": self.cfg.to_dict(), "d_in": self.d_in, "d_sae": self.d_sae,
            "scale": self.scale, "loss": loss if math.isfinite(loss) else None,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "best_step": self.best_step, "micro_batch_size": self.micro,
            "param_groups": [{k: v for k, v in pg.items() if k != "params"}
                             for pg in opt_state["param_groups"]],
            "data": self.source.state_dict(), "source_meta": self.export_meta,
            "reason": reason, "created_at": time.time(),
        }
        path = ck.atomic_save(tensors, meta, ck.checkpoint_path(self.ckpt_dir, self.step))
        if reason == "manual":
            self.protect.add(self.step)
        deleted = ck.apply_retention(self.ckpt_dir, self.cfg.keep_every, self.best_step,
                                     self.protect)
        size = path.stat().st_size
        self.cb.on_log(f"Checkpoint saved at step {self.step} ({reason}, {size / 2**20:.1f} MB).")
        self.cb.on_checkpoint({"path": str(path), "step": self.step, "loss": meta["loss"],
                               "size_bytes": size, "is_best": is_best,
                               "best_step": self.best_step,
                               "deleted": [str(p) for p in deleted]})
        return path

    def load(self, path: Path | str) -> None:
        c = ck.load_checkpoint(path)
        m = c.meta
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
        self.step, self.tokens, self.scale = m["step"], m["tokens"], m["scale"]
        self.best_loss = m["best_loss"] if m.get("best_loss") is not None else math.inf
        self.best_step = m.get("best_step")
        self.micro = min(self.micro, int(m.get("micro_batch_size") or self.micro))
        self.source.load_state_dict(m["data"])

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def _forward_backward(self, batch: Tensor, l1_coef: float, dead: Tensor) -> dict[str, Tensor]:
        """Accumulate gradients over micro-batches; return summed statistics (on device).

        ``l1_coef`` is the (warmed-up) sparsity coefficient: L1 for standard, L0 for jumprelu."""
        n = batch.shape[0]
        acc = {"loss": 0.0, "mse": 0.0, "aux": 0.0, "l0": 0.0, "err": 0.0, "var": 0.0}
        fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        coef = {"l0_coef" if self.cfg.encoder_type == "jumprelu" else "l1_coef": l1_coef}
        for chunk in batch.split(self.micro):
            w = chunk.shape[0] / n
            with self._autocast():
                out = self.sae(chunk, **coef, dead_mask=dead, k_aux=self.k_aux,
                               aux_coef=self.cfg.aux_k_coef, aux_frac=self.cfg.aux_k_frac)
            self.scaler.scale(out.loss * w).backward()
            with torch.no_grad():
                acc["loss"] += out.loss.detach() * w
                acc["mse"] += out.mse.detach() * w
                acc["aux"] += out.aux.detach() * w
                acc["l0"] += out.l0.detach() * w
                acc["err"] += out.mse.detach() * chunk.numel()
                acc["var"] += (chunk.float() - chunk.float().mean(0)).pow(2).sum()
                fired += out.fired
                if out.min_kept is not None:
                    acc["min_kept"] = acc.get("min_kept", 0.0) + out.min_kept * w
        acc["fired"] = fired
        return acc

    def _train_step(self, batch: Tensor, l1_coef: float) -> dict[str, Tensor]:
        dead = self.since_fired >= min(self.aux_window, max(self.tokens, 1))
        while True:
            try:
                return self._forward_backward(batch, l1_coef, dead)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(exc):
                    raise
                self.opt.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro // 2 < self.cfg.min_micro_batch:
                    raise TrainingError(
                        f"Out of memory even at a micro-batch of {self.micro} vectors (minimum "
                        f"{self.cfg.min_micro_batch}). Reduce the latent dimension or "
                        "expansion factor, use bf16, or lower --batch-size.") from None
                self.micro //= 2
                self.cb.on_log(f"Out of memory at step {self.step}: micro-batch reduced to "
                               f"{self.micro} ({self.cfg.batch_size // self.micro} accumulation "
                               "steps, same effective batch).")

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: Path | str | None = None) -> TrainResult:
        cfg = self.cfg
        self._window_loss: float | None = None
        if resume:
            self.load(resume)
            self.cb.on_log(f"Resumed from {resume} at step {self.step}.")
        else:
            self.initialise()
            self.cb.on_log(f"Started: {cfg.encoder_type} SAE {self.d_in} -> {self.d_sae}, "
                           f"{cfg.total_steps} steps of {cfg.batch_size} tokens on "
                           f"{self.device.type} ({self.precision}).")
        win = {"t": time.perf_counter(), "tokens": 0, "loss": 0.0, "mse": 0.0, "aux": 0.0,
               "l0": 0.0, "err": 0.0, "var": 0.0, "steps": 0, "grad": 0.0,
               "fired": torch.zeros(self.d_sae, dtype=torch.long, device=self.device)}
        train_time, stopped, start_tokens = 0.0, False, self.tokens
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        while self.step < cfg.total_steps:
            # 1. hear the caller between steps
            cmd = self.cb.control(self.step)
            if cmd == "pause":
                self.save("pause")
                self.cb.on_log(f"Paused at step {self.step}.")
                while (cmd := self.cb.control(self.step)) == "pause":
                    time.sleep(self.cb.pause_poll_s)
                if cmd != "stop":
                    self.cb.on_log(f"Resumed at step {self.step}.")
                win["t"] = time.perf_counter()
            if cmd == "stop":
                stopped = True
                self.cb.on_log(f"Stop requested at step {self.step}: finalising current weights.")
                break
            if cmd == "save":
                self.save("manual")

            # 2. learning rate and sparsity-coefficient warm-up (L1: standard, L0: jumprelu)
            lr = get_lr(self.step, cfg, self.base_lr)
            for group in self.opt.param_groups:
                group["lr"] = lr
            warm_l1 = cfg.l1_warmup_frac * cfg.total_steps
            alpha = cfg.l0_coef if cfg.encoder_type == "jumprelu" else cfg.l1_alpha
            l1_coef = alpha * min(1.0, (self.step + 1) / warm_l1) if warm_l1 else alpha

            # 3. data, forward/backward (OOM-safe), finiteness check
            t0 = time.perf_counter()
            batch = self.source.next_batch(cfg.batch_size).to(self.device, non_blocking=True)
            batch = batch * self.scale if self.scale != 1.0 else batch
            acc = self._train_step(batch, l1_coef)
            loss_value = float(acc["loss"])
            if not math.isfinite(loss_value):
                last = ck.latest_checkpoint(self.ckpt_dir)
                raise TrainingError(
                    f"The loss became {loss_value} at step {self.step}; training stopped. "
                    + (f"The last good checkpoint is {last}. " if last else "")
                    + "Lower the learning rate or use fp32.")

            # 4. clip, step, keep decoder rows at unit norm (topk, batchtopk, jumprelu)
            self.scaler.unscale_(self.opt)
            if self.unit_decoder:
                self.sae.remove_parallel_grad()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.sae.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            if self.unit_decoder:
                self.sae.normalize_decoder()
            self.sae.clamp_threshold()
            if "min_kept" in acc:  # BatchTopK's running inference threshold
                self.sae.update_threshold(acc["min_kept"], cfg.batchtopk_threshold_momentum)

            # 5. dead-latent counters, window statistics
            n = batch.shape[0]
            self.since_fired += n
            self.since_fired[acc["fired"] > 0] = 0
            self.step += 1
            self.tokens += n
            train_time += time.perf_counter() - t0
            win["tokens"] += n
            win["steps"] += 1
            win["fired"] += acc["fired"]
            win["grad"] += float(grad_norm)
            win["loss"] += loss_value
            for key in ("mse", "aux", "l0", "err", "var"):
                win[key] += float(acc[key])

            # 6. log, auto-save
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                metrics = self._metrics(win, lr)
                self._window_loss = metrics["loss"]
                self.cb.on_metrics(metrics)
                win.update(t=time.perf_counter(), tokens=0, loss=0.0, mse=0.0, aux=0.0, l0=0.0,
                           err=0.0, var=0.0, steps=0, grad=0.0)
                win["fired"].zero_()
            if cfg.auto_save_interval and self.step % cfg.auto_save_interval == 0 \
                    and self.step < cfg.total_steps:
                self.save("auto")

        # 7. evaluate on held-out vectors, final save, export
        evaluation = self.evaluate()
        final = self.save("stop" if stopped else "final")
        from .export import export_saelens  # noqa: PLC0415 - export imports trainer helpers

        export_dir = export_saelens(self.sae, self.out_dir / "saelens", scale=self.scale,
                                    meta=self.export_meta,
                                    sparsity=evaluation.pop("_freq", None))
        dead_now = int((self.since_fired >= min(cfg.dead_window_tokens,
                                                max(self.tokens, 1))).sum())
        result = TrainResult(
            steps=self.step, tokens=self.tokens,
            tokens_per_s=(self.tokens - start_tokens) / train_time if train_time > 0 else 0.0,
            fvu=evaluation.get("fvu", float("nan")), l0=evaluation.get("l0", float("nan")),
            dead_frac=dead_now / self.d_sae, out=str(self.out_dir), checkpoint=str(final),
            stopped=stopped, eval=evaluation)
        stats = getattr(self.source, "stats", None)
        if stats is not None:
            result.filtered = stats.to_dict()
            self.cb.on_log(f"Activations: {stats.kept:,} kept of {stats.seen:,} tokens; excluded "
                           f"{stats.position0:,} at position 0, {stats.special:,} special, "
                           f"{stats.outliers:,} outliers.")
        self.cb.on_log(f"Finished at step {self.step}: held-out FVU {result.fvu:.4f}, "
                       f"L0 {result.l0:.1f}, dead {100 * result.dead_frac:.1f}%; "
                       f"SAELens export in {export_dir}.")
        return result

    def _metrics(self, win: dict[str, Any], lr: float) -> dict[str, Any]:
        steps = max(1, win["steps"])
        elapsed = max(1e-9, time.perf_counter() - win["t"])
        fvu = win["err"] / win["var"] if win["var"] > 0 else float("nan")
        freq = win["fired"].float() / max(1, win["tokens"])
        dead = int((self.since_fired >= min(self.cfg.dead_window_tokens,
                                            max(self.tokens, 1))).sum())
        l0 = win["l0"] / steps
        return {
            "step": self.step, "tokens": self.tokens, "loss": win["loss"] / steps,
            "mse": win["mse"] / steps, "aux_loss": win["aux"] / steps,
            "sparsity_loss": win["aux"] / steps
            if self.cfg.encoder_type in ("standard", "jumprelu") else 0.0,
            "l0": l0, "l0_frac": l0 / self.d_sae, "fvu": fvu, "explained_variance": 1 - fvu,
            "dead": dead, "dead_frac": dead / self.d_sae,
            "dense": int((freq > self.cfg.dense_threshold).sum()),
            "lr": lr, "grad_norm": win["grad"] / steps,
            "tokens_per_s": win["tokens"] / elapsed,
            "peak_memory_mb": peak_memory_mb(self.device), "micro_batch_size": self.micro,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """FVU (about the mean), L0 and dead fraction on held-out vectors."""
        x = self.source.holdout()
        if not len(x):
            return {}
        chunk_size = min(self.micro, 4096)
        self.sae.eval()  # BatchTopK encodes with its running threshold at inference
        try:
            while True:
                try:
                    return self._evaluate(x, chunk_size)
                except Exception as exc:  # noqa: BLE001 - only OOM is handled
                    if not is_oom(exc) or chunk_size <= 1:
                        raise
                    torch.cuda.empty_cache()
                    chunk_size //= 2
        finally:
            self.sae.train()

    def _evaluate(self, x: Tensor, chunk_size: int) -> dict[str, Any]:
        err = var = l0 = 0.0
        counts = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        mean = (x.float().mean(0) * self.scale).to(self.device)
        for chunk in x.split(chunk_size):
            chunk = chunk.to(self.device).float() * self.scale
            with self._autocast():
                out = self.sae(chunk)
            err += float((out.x_hat.float() - chunk).pow(2).sum())
            var += float((chunk - mean).pow(2).sum())
            l0 += float(out.l0) * len(chunk)
            counts += out.fired
        freq = counts.float().cpu() / len(x)
        fvu = err / var if var > 0 else float("nan")
        return {"tokens": len(x), "fvu": fvu, "explained_variance": 1 - fvu,
                "l0": l0 / len(x), "dead_frac": float((counts == 0).float().mean()),
                "dense": int((freq > self.cfg.dense_threshold).sum()), "_freq": freq}
