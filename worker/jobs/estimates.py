"""The memory and time estimate of a training the form describes (plain arithmetic, no torch),
and the measurements the time estimate is calibrated from.

The memory budget is the newest worker's device memory, or the reference device's when no
worker reported yet. The time comes from what the worker measured: when a training of this
model completed on this device, its phases (``db.Calibration``: setup, the training loop,
the held-out evaluation, finishing; written by ``record_calibration``) scaled to the form's
steps, sizes and evaluation tokens give one figure. Before that, a range labelled as a guess:
from the FLOP rate another model's training reached on the device, else from the worker's
matmul speed (``WorkerHeartbeat.gflops``) with a wide band of the fraction of it a training
reaches. A form with a bad field gets neither figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..db import Calibration, LanguageModel, Training, db
from ..engine.memory import MemoryEstimate, estimate_memory, placed_memory, split_group
from .configs import check_form
from .health import newest_heartbeat

if TYPE_CHECKING:
    from ..engine.config import TrainConfig
    from ..progress import AttemptTimings

REFERENCE_BUDGET = 6 * 10**9
"""Memory budget without a worker heartbeat (bytes): the reference Jetson Orin Nano (6 GB
usable)."""
MFU_BAND = (0.03, 1.5)
"""The fraction of the measured matmul speed an uncalibrated run's FLOPs are assumed to reach,
lowest and highest: the range's high and low end. Above 1: the worker's small fp32 matmul
(``tasks.measure_device``) runs below the speed of a training's larger ones (measured on this
2-core CPU: MiniLM at 0.05-1.5 times it)."""
HALF_SPEEDUP = 4.0
"""bf16 / fp16 runs: how much faster than the measured fp32 matmul they may get (tensor cores);
the band's highest fraction is multiplied by it."""
SETUP_BAND_S = (5.0, 60.0)
"""An uncalibrated run's setup and finishing (model load, buffer fill, saves), seconds."""
OTHER_MODEL_BAND = 2.5
"""Before this model's calibration, with another model's on the device: the range is its FLOP
rate and set-up and finishing seconds divided and multiplied by this."""
EVAL_PASSES = 3
"""Whole-model forward passes per held-out token in the text evaluation (clean, with the SAE
spliced in, with the layer zeroed)."""
FIX_FIELDS = "Fix the highlighted fields to see an estimate."


def device_key(device: str) -> str:
    """A device as the calibration is keyed: ``cuda:0`` is ``cuda`` (what ``auto`` picks)."""
    return device.removesuffix(":0")


def model_flops_per_token(model: LanguageModel, layers: int) -> float:
    """Forward FLOPs per token of the model's first ``layers`` layers: 2 per weight, the
    embedding table (a lookup, no FLOPs) left out, the rest shared equally by the layers."""
    n_layers = max(1, int(model.n_layers or 1))
    embedding = int(model.vocab_size or 0) * int(model.hidden_dim or 0)
    weights = max(0, int(model.n_params or 0) - embedding)
    return 2.0 * weights * min(layers, n_layers) / n_layers


def sae_flops_per_token(d_in: int, d_sae: int) -> float:
    """An SAE training step's FLOPs per token, as its time grows: both matrices, forward (2
    FLOPs per weight) and backward (4). TopK's sparse decoder and encoder backward do fewer
    FLOPs, but on the CPU its step time still grows with the latents like this (measured:
    choosing the top k among every pre-activation, AuxK over the dead latents and Adam over all
    weights cost in proportion), so one formula serves every type."""
    return 12.0 * d_in * d_sae


def flops_per_token(model: LanguageModel, cfg: TrainConfig, d_in: int, d_sae: int) -> float:
    """FLOPs per trained token of ``cfg``: the model's forward up to its layer (live
    activations) plus the SAE's step."""
    return (model_flops_per_token(model, int(cfg.layer or 0) + 1)
            + sae_flops_per_token(d_in, d_sae))


# ---------------------------------------------------------------------------- the worker's side
def record_calibration(training_id: int, cfg: TrainConfig, timings: AttemptTimings,
                       values: Mapping[str, Any], eval_ended: float) -> Calibration | None:
    """Store how long a completed fresh attempt's phases took (one row per model and device,
    replaced), from the row's ``attempt_started_at`` and ``finished_at``, the reporter's
    ``timings``, the run's result ``values`` (its ``tokens``; its ``eval["report"]`` when the
    held-out evaluation wrote one) and when that evaluation ended (``eval_ended``, epoch
    seconds). Returns None when the attempt never stepped."""
    t = Training.get_by_id(training_id)
    model = t.model
    if timings.first_step is None or timings.last_metrics is None or not model.hidden_dim \
            or t.attempt_started_at is None or t.finished_at is None or not t.device:
        return None
    d_in = int(model.hidden_dim)
    build = timings.build_s()
    total = t.finished_at - t.attempt_started_at - timings.paused_s - build
    setup = max(0.0, timings.first_step - t.attempt_started_at - build)
    train = max(1e-3, timings.last_metrics - timings.first_step - timings.paused_s)
    began = timings.eval_started
    eval_s = max(0.0, eval_ended - began) if began and values["eval"].get("report") else 0.0
    row = dict(training_id=training_id, setup_s=setup, token_build_s=build, train_s=train,
               train_tokens=max(1, int(values["tokens"])),
               flops_per_token=flops_per_token(model, cfg, d_in, cfg.d_sae(d_in)),
               eval_s=eval_s, eval_tokens=cfg.eval_tokens if eval_s else 0,
               finish_s=max(0.0, total - setup - train - eval_s), total_s=total)
    key = device_key(t.device)
    with db.atomic():
        Calibration.delete().where((Calibration.model == model.id)
                                   & (Calibration.device == key)).execute()
        return Calibration.create(model=model.id, device=key, **row)


def calibration(model_id: int, device: str | None) -> Calibration | None:
    """The measurements of ``model_id``'s newest clean training on ``device`` (or None)."""
    if device is None:
        return None
    return Calibration.get_or_none((Calibration.model == model_id)
                                   & (Calibration.device == device_key(device)))


def eval_seconds(cal: Calibration, eval_tokens: int) -> float:
    """The held-out evaluation of ``eval_tokens`` at the calibration's rate (0 when off); at
    its training FLOP rate when it measured no evaluation."""
    if eval_tokens <= 0:
        return 0.0
    if cal.eval_tokens:
        return cal.eval_s * eval_tokens / cal.eval_tokens
    flop_rate = cal.flops_per_token * cal.train_tokens / cal.train_s
    return eval_tokens * EVAL_PASSES * model_flops_per_token(cal.model, 10**9) / flop_rate


def after_training_s(model_id: int, device: str | None, eval_tokens: int) -> float | None:
    """Seconds from the last training step to ``completed`` (evaluation and finishing) at the
    calibration of ``model_id`` on ``device``; None without one (the card's ETA)."""
    cal = calibration(model_id, device)
    if cal is None:
        return None
    return eval_seconds(cal, eval_tokens) + cal.finish_s


# ---------------------------------------------------------------------------- the form's side
def group_flops_per_token(model: LanguageModel, cfgs: list[TrainConfig], d_in: int) -> float:
    """FLOPs per trained token of SAEs trained together: one forward up to the deepest layer,
    every SAE's step."""
    deepest = max(int(c.layer or 0) for c in cfgs)
    return (model_flops_per_token(model, deepest + 1)
            + sum(sae_flops_per_token(d_in, c.d_sae(d_in)) for c in cfgs))


def _time(model: LanguageModel, cfg: TrainConfig, d_in: int, d_sae: int, device: str | None,
          precision: str, gflops: float | None, group: list[TrainConfig] | None = None
          ) -> dict[str, Any]:
    """The time keys of the estimate: calibrated (a point figure), a guessed range, or none.
    With ``group`` (a sweep's sub-group, ``cfg`` its first): the time of training them together
    (one forward for all), evaluating them in one pass and saving each."""
    tokens = cfg.total_steps * cfg.batch_size
    fpt = flops_per_token(model, cfg, d_in, d_sae)
    eval_scale = finish_scale = 1.0
    if group:
        fpt = group_flops_per_token(model, group, d_in)
        hooks = len({(c.layer, c.hook_point, c.target_hook_point) for c in group})
        eval_scale = (1 + hooks + len(group)) / EVAL_PASSES  # clean, zeroed per hook, spliced
        finish_scale = float(len(group))
    cal = calibration(model.id, device)
    if cal is not None:
        train = tokens * cal.train_s / cal.train_tokens * fpt / cal.flops_per_token
        seconds = round(cal.setup_s + train + eval_scale * eval_seconds(cal, cfg.eval_tokens)
                        + finish_scale * cal.finish_s, 1)
        return {"time_s": seconds, "seconds": seconds, "time_range_s": None, "calibrated": True,
                "time_basis": f"Measured on {cal.device} from training #{cal.training_id}, "
                              "scaled to these steps, sizes and evaluation tokens (a dataset's "
                              "first tokenisation adds to it)."}
    flops = tokens * fpt + (eval_scale * cfg.eval_tokens * EVAL_PASSES
                            * model_flops_per_token(model, 10**9))
    until = f"until a training of {model.name} completes there."
    other = None if device is None else Calibration.select() \
        .where(Calibration.device == device_key(device)) \
        .order_by(Calibration.updated_at.desc()).first()
    if other is not None:  # another model's training on this device: its FLOP rate and set-up
        rate = other.flops_per_token * other.train_tokens / other.train_s
        fixed = other.setup_s + other.finish_s
        low = fixed / OTHER_MODEL_BAND + flops / (rate * OTHER_MODEL_BAND)
        high = fixed * OTHER_MODEL_BAND + flops * OTHER_MODEL_BAND / rate
        basis = (f"A guess from the speed training #{other.training_id} of another model "
                 f"reached on {other.device} ({rate / 1e9:,.0f} GFLOP/s) {until}")
    elif gflops:
        speed = float(gflops) * 1e9
        fastest = MFU_BAND[1] * (HALF_SPEEDUP if precision in ("bf16", "fp16") else 1.0)
        low = SETUP_BAND_S[0] + flops / (speed * fastest)
        high = SETUP_BAND_S[1] + flops / (speed * MFU_BAND[0])
        basis = f"A guess from {device}'s matmul speed ({float(gflops):,.0f} GFLOP/s) {until}"
    else:
        return {"time_basis": "No worker has reported its speed yet."}
    return {"time_range_s": [round(low, 1), round(high, 1)], "time_basis": basis}


def memory_of(model: LanguageModel, cfg: TrainConfig, device: str | None, precision: str
              ) -> MemoryEstimate:
    """The engine's memory estimate of ``cfg`` on ``model`` (live extraction) on ``device``
    (None: no worker seen, so the reference device, a Jetson's GPU). With ``gpus`` > 1: one
    process's, which trains on batch size / gpus vectors per step."""
    return estimate_memory(int(model.hidden_dim), cfg.d_sae(int(model.hidden_dim)),
                           encoder_type=cfg.encoder_type, k=cfg.k,
                           batch_size=max(1, cfg.batch_size // cfg.gpus),
                           micro_batch_size=cfg.micro_batch_size, precision=precision,
                           model_params=int(model.n_params or 0),
                           model_dtype=str(model.dtype or "float32"),
                           buffer_tokens=cfg.buffer_tokens,
                           device="cpu" if device == "cpu" else "cuda", source="live",
                           layer=int(cfg.layer or 0), n_layers=max(1, int(model.n_layers or 1)),
                           tie_weights=cfg.tie_weights, eval_tokens=cfg.eval_tokens,
                           total_steps=cfg.total_steps,
                           transcoder=cfg.target_hook_point is not None,
                           skip_connection=cfg.skip_connection)


def _budget() -> tuple[Any, int, str]:
    """The newest worker heartbeat, the memory budget (bytes) and where it comes from."""
    hb = newest_heartbeat()
    if hb is not None and hb.device_memory:
        return hb, int(hb.device_memory), f"{hb.device}: {hb.device_name or hb.device}"
    return hb, REFERENCE_BUDGET, "no worker seen: 6 GB (Jetson Orin Nano)"


def _precision(cfg: TrainConfig, device: str | None) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if (device or "").startswith("cuda") else "fp32"


GROUP_ESTIMATE_KEYS = ("runs", "groups", "group_memory_bytes", "memory_bytes", "budget_bytes",
                       "budget_source", "fits", "split", "warning", "device", "precision",
                       "time_s", "seconds", "time_range_s", "calibrated", "time_basis")
"""``group_estimate``'s keys: a sweep form's estimate has every one (null when a bad field
leaves no figure)."""


def group_estimate(model: LanguageModel, cfgs: list[TrainConfig]) -> dict[str, Any]:
    """Memory and time of a sweep's SAEs (valid configs of ``model``, live extraction): split
    into sub-groups that each fit the budget (``memory.split_group``), each trained by one task,
    one after another. Returns::

        {"runs": int, "groups": [[run index, ...], ...], "group_memory_bytes": [bytes per
         sub-group], "memory_bytes": the largest, "budget_bytes", "budget_source", "fits",
         "split": bool, "warning", "device", "precision", "time_s", "seconds",
         "time_range_s", "calibrated", "time_basis"}

    Times are the sub-groups' summed (start of the first to ``completed`` of the last)."""
    hb, budget, source = _budget()
    device = cfgs[0].device if cfgs[0].device != "auto" else (hb.device if hb else None)
    precision = _precision(cfgs[0], device)
    gpus = cfgs[0].gpus  # > 1: each sub-group's SAEs spread over that many GPUs, each whole
    ests = [memory_of(model, cfg.replace(gpus=1), device, precision) for cfg in cfgs]
    hooks = [(cfg.layer, cfg.hook_point, cfg.target_hook_point) for cfg in cfgs]
    groups = split_group(ests, hooks, budget, gpus)
    sizes = [placed_memory([ests[i] for i in g], [hooks[i] for i in g], gpus) for g in groups]
    out: dict[str, Any] = {
        "runs": len(cfgs), "groups": groups, "group_memory_bytes": sizes,
        "memory_bytes": max(sizes), "budget_bytes": budget, "budget_source": source,
        "fits": max(sizes) <= budget, "split": len(groups) > 1, "warning": None,
        "device": device, "precision": precision, "time_s": None, "seconds": None,
        "time_range_s": None, "calibrated": False, "time_basis": None}
    if not out["fits"]:
        out["warning"] = (f"One SAE alone needs about {max(sizes) / 2**30:.1f} GiB but the "
                          f"budget is {budget / 2**30:.1f} GiB ({source}); lower the batch "
                          "size, micro-batch size or number of latents.")
    elif out["split"]:
        out["warning"] = (f"The {len(cfgs)} SAEs need more than the {budget / 2**30:.1f} GiB "
                          f"budget ({source}) together: they train as {len(groups)} groups, "
                          "one after another, each with its own forward pass.")
    d_in = int(model.hidden_dim)
    times = [_time(model, cfgs[g[0]], d_in, cfgs[g[0]].d_sae(d_in), device, precision,
                   hb.gflops if hb is not None else None, group=[cfgs[i] for i in g])
             for g in groups]
    out["time_basis"] = times[0].get("time_basis")
    if all(t.get("time_s") is not None for t in times):
        total = round(sum(t["time_s"] for t in times), 1)
        out.update(time_s=total, seconds=total, calibrated=True)
    elif all(t.get("time_range_s") for t in times):
        out["time_range_s"] = [round(sum(t["time_range_s"][i] for t in times), 1)
                               for i in (0, 1)]
    return out


def estimate(model: LanguageModel | None, values: Mapping[str, Any]) -> dict[str, Any]:
    """Memory and time estimate for the form's current values. Returns::

        {"memory_bytes": int | None, "parts": {sae_params, optimizer, activations, batch,
         model, buffer, runtime, file_pages, allocator} (bytes) | None, "budget_bytes": int,
         "budget_source": "cuda: NVIDIA ..." | "no worker seen: 6 GB (Jetson Orin Nano)",
         "fits": bool, "warning": str | None, "d_in": int | None, "d_sae": int | None,
         "precision": "fp32" | "bf16" | ..., "device": str | None,
         "time_s": float | None, "seconds": float | None, "time_range_s": [low, high] | None,
         "calibrated": bool, "time_basis": str | None, "invalid": {field: sentence},
         "processes": int (only with gpus > 1: memory_bytes is then per GPU on CUDA, all the
         processes' on the CPU; the time is one process's work on one device)}

    ``time_s`` (and its older name ``seconds``): start to ``completed`` in seconds, measured
    (``calibrated``) or None; ``time_range_s``: the guessed range before a calibration;
    ``time_basis`` says which. A bad field (``invalid``, the form's own checks) leaves every
    size and time None; without a model too, and ``warning`` says what to do.
    """
    hb, budget, source = _budget()
    out: dict[str, Any] = {"memory_bytes": None, "parts": None, "budget_bytes": budget,
                           "budget_source": source, "fits": True, "warning": None,
                           "time_s": None, "seconds": None, "time_range_s": None,
                           "calibrated": False, "time_basis": None, "invalid": {},
                           "d_in": None, "d_sae": None, "precision": None,
                           "device": hb.device if hb is not None else None}
    if model is None or not model.hidden_dim:
        out["warning"] = "Choose a ready model to see the memory and time estimate."
        return out
    cfg, invalid = check_form(values, model)
    if invalid:
        out.update(invalid=invalid, warning=FIX_FIELDS)
        return out
    device = cfg.device if cfg.device != "auto" else out["device"]
    precision = _precision(cfg, device)
    d_in = int(model.hidden_dim)
    d_sae = cfg.d_sae(d_in)
    est = memory_of(model, cfg, device, precision)
    parts = est.to_dict()
    total = parts.pop("total")
    if cfg.gpus > 1:  # per GPU on CUDA; on the CPU the processes share the machine's memory
        out["processes"] = cfg.gpus
        if device == "cpu":
            total *= cfg.gpus
            parts = {k: v * cfg.gpus for k, v in parts.items()}
    out.update(memory_bytes=total, parts=parts, d_in=d_in, d_sae=d_sae, fits=total <= budget,
               precision=precision, device=device)
    if total > budget:
        out["warning"] = (f"This run needs about {total / 2**30:.1f} GiB but the budget is "
                          f"{budget / 2**30:.1f} GiB ({source}); lower the batch size, "
                          "micro-batch size or number of latents.")
    out.update(_time(model, cfg, d_in, d_sae, device, precision,
                     hb.gflops if hb is not None else None))
    if cfg.gpus > 1 and out["time_basis"]:
        out["time_basis"] += (f" This is one process's time for the whole batch; {cfg.gpus} "
                              "processes split each step's batch (on GPUs, sooner).")
    return out
