"""The job layer the web app calls: models, datasets, trainings and their controls. No torch.

Every function reads or writes the database (``worker.db``, already bound with ``init_db``) and
enqueues Huey tasks (``worker.tasks``) after its own writes are committed. Problems a user can
fix raise a ``JobError`` whose ``str()`` is a sentence and whose ``status`` is the HTTP status to
answer with: ``NotFound`` (404), ``Conflict`` (409, the action does not fit the job's state) or
``Invalid`` (422, with one message per form field in ``errors``).

Trainings are steered through the database, never by killing a task: ``request(id, "pause")``
sets ``Training.requested`` and the worker picks it up between steps (see ``worker.progress``).

Statuses: models and datasets ``queued, preparing, ready, error``; trainings ``queued,
initializing, training, paused, stopping, completed, stopped, failed, interrupted``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import settings
from .db import (
    FINISHED,
    RETRYABLE,
    RUNNING,
    Checkpoint,
    Dataset,
    LanguageModel,
    LogLine,
    Metric,
    Training,
    WorkerHeartbeat,
    db,
)
from .engine.config import LR_SCHEDULES, PRECISIONS, TrainConfig
from .engine.errors import ConfigError
from .engine.memory import estimate_memory

HOOK_POINTS = ("residual", "mlp_out", "attn_out")
ENCODER_TYPES = ("topk", "standard", "jumprelu", "batchtopk")
DEVICES = ("auto", "cpu", "cuda", "mps")
UPLOAD_SUFFIXES = (".txt", ".jsonl", ".csv")
LATEST_KEYS = ("step", "loss", "mse", "l0", "dead_neurons", "fvu", "learning_rate",
               "tokens_per_s")
"""The API's ``latest`` contract (``training_as_dict``)."""
HEARTBEAT_ALIVE_S = 15.0
REFERENCE_BUDGET = 6 * 10**9
"""Memory budget without a worker heartbeat: the reference Jetson Orin Nano (6 GB usable)."""
_PATHLIKE_SUFFIXES = {".txt", ".text", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet",
                      ".gz", ".md", ".zip", ".bz2", ".xz", ".arrow"}


# ---------------------------------------------------------------------------- errors
class JobError(Exception):
    """A problem the user can act on. ``str(exc)`` is a sentence; ``status`` the HTTP status."""

    status: int = 400

    def __init__(self, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors: dict[str, str] = dict(errors or {})
        """Per form field messages (``Invalid``); the key ``"form"`` holds one for no field."""


class NotFound(JobError):
    status = 404


class Conflict(JobError):
    status = 409


class Invalid(JobError):
    status = 422


# ---------------------------------------------------------------------------- helpers
def _enqueue(task_name: str, *args: Any) -> None:
    """Enqueue ``worker.tasks.<task_name>(*args)`` (imported here: the tasks load torch lazily).

    Tests replace this function to queue nothing and run the task themselves.
    """
    from . import tasks

    getattr(tasks, task_name)(*args)


def _get(model: type, kind: str, row_id: int | str) -> Any:
    try:
        key = int(row_id)
    except (TypeError, ValueError):
        raise NotFound(f"{kind} {row_id} does not exist.") from None
    row = model.get_or_none(model.id == key)
    if row is None:
        raise NotFound(f"{kind} {key} does not exist.")
    return row


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (browsers' JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _row_dict(row: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    return json_safe({name: getattr(row, name) for name in fields})


def _remove_tree(path: str | Path | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def _looks_like_path(source: str) -> bool:
    """Mirrors the engine's rule: what is not path-like is a Hugging Face dataset id."""
    if source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    if "\\" in source or source.count("/") >= 2:
        return True
    return Path(source).suffix.lower() in _PATHLIKE_SUFFIXES


def _parse_int(raw: Any, label: str) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{label} must be a whole number.")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip().replace("_", "").replace(",", "")
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{label} must be a whole number (got '{raw}').") from None
        if not value.is_integer():
            raise ValueError(f"{label} must be a whole number (got '{raw}').") from None
        return int(value)


def _parse_float(raw: Any, label: str) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError(f"{label} must be a number (got '{raw}').") from None
    if not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number (got '{raw}').")
    return value


def _blank(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


# ---------------------------------------------------------------------------- models
MODEL_FIELDS = ("id", "name", "source", "status", "error", "progress", "message", "path",
                "architecture", "model_type", "n_layers", "hidden_dim", "vocab_size", "n_params",
                "dtype", "is_causal", "hook_points", "created_at", "updated_at")


def list_models() -> list[LanguageModel]:
    """All models, newest first."""
    return list(LanguageModel.select().order_by(LanguageModel.id.desc()))


def add_model(source: str, name: str | None = None) -> LanguageModel:
    """Add a model (bundled name, local folder or Hub id) and enqueue its preparation.

    Returns the row (status ``queued``; in immediate mode already ``ready`` or ``error``).
    Raises Invalid({"source": ...}) when source is blank.
    """
    source = (source or "").strip()
    if not source:
        msg = "Give a model: a bundled name (minilm-l6, smollm2-135m), a folder or a Hub id."
        raise Invalid(msg, {"source": msg})
    name = (name or "").strip() or source
    with db.atomic():
        model = LanguageModel.create(name=name, source=source, status="queued",
                                     message="Waiting for the worker.")
    _enqueue("prepare_model", model.id)
    return LanguageModel.get_by_id(model.id)


def get_model(model_id: int | str) -> LanguageModel:
    """The model, or NotFound("Model 7 does not exist.")."""
    return _get(LanguageModel, "Model", model_id)


def _check_no_active_trainings(query: Any, what: str) -> list[Training]:
    trainings = list(query)
    active = [t for t in trainings if t.status == "queued" or t.status in RUNNING]
    if active:
        ids = ", ".join(str(t.id) for t in active)
        raise Conflict(f"{what} is used by training {ids}, which is {active[0].status}; "
                       "stop it first.")
    return trainings


def delete_model(model_id: int | str) -> None:
    """Delete a model and its finished trainings (with their run folders).

    Conflict while one of its trainings is queued or running.
    """
    model = get_model(model_id)
    trainings = _check_no_active_trainings(model.trainings, f"Model {model.id}")
    with db.atomic():
        model.delete_instance(recursive=True)
    for t in trainings:
        _remove_tree(t.out_dir)


def model_as_dict(model: LanguageModel) -> dict[str, Any]:
    """JSON-ready copy of a model row."""
    return _row_dict(model, MODEL_FIELDS)


# ---------------------------------------------------------------------------- datasets
DATASET_FIELDS = ("id", "name", "source", "status", "error", "progress", "message",
                  "context_size", "max_tokens", "text_field", "n_documents", "n_tokens",
                  "samples", "created_at", "updated_at")


def list_datasets() -> list[Dataset]:
    """All datasets, newest first."""
    return list(Dataset.select().order_by(Dataset.id.desc()))


def _safe_filename(filename: str) -> str:
    base = Path(filename.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:80] or "upload"


def add_dataset(
    source: str | None,
    *,
    name: str | None = None,
    context_size: int | str = 128,
    max_tokens: int | str | None = None,
    text_field: str = "text",
    upload: tuple[str, BinaryIO] | None = None,
) -> Dataset:
    """Add a corpus and enqueue its preparation (document count, tokens, samples).

    ``source``: ``kjv``, a local .txt/.jsonl/.csv path (must exist) or a Hugging Face dataset
    id; or ``upload=(filename, file object)`` of a .txt/.jsonl/.csv file, saved to
    ``uploads_dir()/<uuid>-<safe name>``. Values may be form strings. Raises Invalid with
    messages for ``source``, ``upload``, ``context_size`` (2-4096), ``max_tokens`` (blank, or at
    least context_size), ``text_field``; nothing is saved then.
    """
    errors: dict[str, str] = {}
    source = (source or "").strip()
    has_upload = upload is not None and bool(upload[0])

    ctx: int | None = None
    try:
        ctx = 128 if _blank(context_size) else _parse_int(context_size, "Context size")
        if not 2 <= ctx <= 4096:
            errors["context_size"] = f"Context size must be between 2 and 4096 tokens (got {ctx})."
    except ValueError as exc:
        errors["context_size"] = str(exc)
    max_tok: int | None = None
    try:
        max_tok = None if _blank(max_tokens) else _parse_int(max_tokens, "Max tokens")
        if max_tok is not None and ctx is not None and max_tok < ctx:
            errors["max_tokens"] = (f"Max tokens must be at least the context size ({ctx}), or "
                                    "blank for the whole corpus.")
    except ValueError as exc:
        errors["max_tokens"] = str(exc)
    text_field = (text_field or "").strip() or "text"
    if not re.fullmatch(r"[\w .-]{1,100}", text_field):
        errors["text_field"] = "The text field must be a column name (letters, digits, _ . -)."

    if has_upload:
        assert upload is not None
        if Path(upload[0]).suffix.lower() not in UPLOAD_SUFFIXES:
            errors["upload"] = (f"'{upload[0]}' is not a .txt, .jsonl or .csv file; upload plain "
                                "text, JSON lines or CSV.")
    elif not source:
        errors["source"] = ("Give a dataset: kjv, a .txt/.jsonl/.csv path or a Hugging Face "
                            "dataset id, or upload a file.")
    elif source.lower() == "kjv":
        source = "kjv"
    elif _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            errors["source"] = f"The file '{source}' does not exist on the worker's machine."
        elif path.suffix.lower() not in UPLOAD_SUFFIXES:
            errors["source"] = f"'{source}' is not a .txt, .jsonl or .csv file."
        else:
            source = str(path.resolve())
    if errors:
        raise Invalid("Some dataset values need fixing.", errors)

    if has_upload:
        assert upload is not None
        filename, stream = upload
        folder = settings.uploads_dir()
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{uuid.uuid4().hex[:12]}-{_safe_filename(filename)}"
        with open(dest, "wb") as fh:
            shutil.copyfileobj(stream, fh)
        if dest.stat().st_size == 0:
            dest.unlink()
            msg = f"The uploaded file '{filename}' is empty."
            raise Invalid(msg, {"upload": msg})
        source = str(dest)
        name = (name or "").strip() or Path(filename).name
    name = (name or "").strip() or source
    with db.atomic():
        dataset = Dataset.create(name=name, source=source, status="queued", context_size=ctx,
                                 max_tokens=max_tok, text_field=text_field,
                                 message="Waiting for the worker.")
    _enqueue("prepare_dataset", dataset.id)
    return Dataset.get_by_id(dataset.id)


def get_dataset(dataset_id: int | str) -> Dataset:
    """The dataset, or NotFound("Dataset 7 does not exist.")."""
    return _get(Dataset, "Dataset", dataset_id)


def delete_dataset(dataset_id: int | str) -> None:
    """Delete a dataset (its uploaded file too) and its finished trainings.

    Conflict while one of its trainings is queued or running.
    """
    dataset = get_dataset(dataset_id)
    trainings = _check_no_active_trainings(dataset.trainings, f"Dataset {dataset.id}")
    with db.atomic():
        dataset.delete_instance(recursive=True)
    for t in trainings:
        _remove_tree(t.out_dir)
    src = Path(dataset.source)
    if src.is_file() and src.parent == settings.uploads_dir():
        src.unlink(missing_ok=True)


def dataset_as_dict(dataset: Dataset) -> dict[str, Any]:
    """JSON-ready copy of a dataset row."""
    return _row_dict(dataset, DATASET_FIELDS)


# ---------------------------------------------------------------------------- the training form
@dataclass(frozen=True)
class FormField:
    """One field of the new-training form, in display order (``FORM_FIELDS``)."""

    name: str
    label: str
    kind: str
    """``select``, ``int``, ``float`` or ``bool``."""
    help: str
    advanced: bool = False
    """Shown under "Advanced" (collapsed)."""
    choices: tuple[str, ...] = ()
    """Fixed choices of a select; model_id, dataset_id and hook_point: see ``form_choices``."""
    optional: bool = False
    """May be left blank: the help says what blank means (e.g. latent_dim = 8 x hidden)."""
    applies_to: str | None = None
    """The encoder types the field is used by, space-separated (``"topk batchtopk"``); None:
    every type. Rendered as ``data-applies-to``; static/app.js hides the field for others."""

    def applies(self, encoder_type: str) -> bool:
        return self.applies_to is None or encoder_type in self.applies_to.split()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FORM_FIELDS: list[FormField] = [
    FormField("model_id", "Model", "select", "A ready model from the Models page."),
    FormField("dataset_id", "Dataset", "select", "A ready dataset from the Datasets page."),
    FormField("encoder_type", "Encoder type", "select",
              "standard: ReLU with an L1 penalty. topk: the k largest latents per token. "
              "jumprelu: a learned threshold per latent with an L0 penalty. batchtopk: k "
              "latents per token on average across the batch, a fixed threshold afterwards.",
              choices=ENCODER_TYPES),
    FormField("hook_point", "Hook point", "select",
              "Where in the block to read: the residual stream after it, the MLP output or the "
              "attention output."),
    FormField("layer_idx", "Layer", "int", "Block index, 0 to layers - 1 (default: the middle)."),
    FormField("expansion_factor", "Expansion factor", "int",
              "Latents = expansion factor x the model's hidden size (when latent dim is blank)."),
    FormField("latent_dim", "Latent dimension", "int",
              "Number of latents; blank = expansion factor x hidden size.", optional=True),
    FormField("k", "k (active latents)", "int",
              "Latents active per token (TopK); the average per token (BatchTopK).",
              applies_to="topk batchtopk"),
    FormField("l1_alpha", "L1 coefficient", "float",
              "Sparsity penalty of the standard (ReLU) SAE.", applies_to="standard"),
    FormField("l0_coef", "L0 coefficient", "float",
              "Sparsity penalty of the JumpReLU SAE (higher = fewer active latents).",
              applies_to="jumprelu"),
    FormField("tie_weights", "Tie weights", "bool",
              "Decoder = encoder transpose (standard only).", applies_to="standard"),
    FormField("learning_rate", "Learning rate", "float",
              "Blank = automatic (2e-3 x sqrt(4096 / latents) for TopK, BatchTopK and JumpReLU; "
              "4e-3 x sqrt(4096 / latents) for standard).",
              optional=True),
    FormField("batch_size", "Batch size", "int", "Activation vectors (tokens) per step."),
    FormField("total_steps", "Total steps", "int", "Optimizer steps to train for."),
    FormField("auto_save_interval", "Auto-save every", "int",
              "Save a checkpoint every N steps; 0 = only at the end."),
    FormField("seed", "Seed", "int", "Random seed (initialisation and data order).",
              advanced=True),
    FormField("lr_schedule", "LR schedule", "select",
              "Constant (with a final linear decay), linear or cosine decay.",
              advanced=True, choices=LR_SCHEDULES),
    FormField("lr_warmup_steps", "LR warm-up steps", "int",
              "Blank = 5% of total steps (at most 1000).", advanced=True, optional=True),
    FormField("precision", "Precision", "select",
              "auto = bf16 on a GPU that supports it, fp32 on the CPU.", advanced=True,
              choices=PRECISIONS),
    FormField("micro_batch_size", "Micro-batch size", "int",
              "Vectors per forward pass (gradient accumulation); blank = the batch size. "
              "Halved automatically on GPU out-of-memory.", advanced=True, optional=True),
    FormField("log_every", "Log every", "int", "Steps between metrics rows.", advanced=True),
    FormField("keep_every", "Keep every", "int",
              "Retention: besides the first, newest and best, keep checkpoints at multiples of "
              "this step.", advanced=True),
    FormField("dead_window_tokens", "Dead window (tokens)", "int",
              "A latent is dead when it has not fired in this many recent tokens.",
              advanced=True),
    FormField("buffer_tokens", "Shuffle buffer (vectors)", "int",
              "Activation vectors held in the shuffle buffer.", advanced=True),
    FormField("eval_tokens", "Held-out vectors", "int",
              "Activation vectors kept aside for the final evaluation.", advanced=True),
    FormField("jumprelu_bandwidth", "JumpReLU bandwidth", "float",
              "Width of the straight-through estimator's window around each threshold.",
              advanced=True, applies_to="jumprelu"),
    FormField("jumprelu_init_threshold", "JumpReLU initial threshold", "float",
              "Blank = where k latents per token would fire at the start.", advanced=True,
              optional=True, applies_to="jumprelu"),
    FormField("device", "Device", "select", "auto = CUDA, then MPS, then the CPU.",
              advanced=True, choices=DEVICES),
]
FIELDS_BY_NAME = {f.name: f for f in FORM_FIELDS}
_CONFIG_NAME = {"layer_idx": "layer"}
"""Form names that differ from TrainConfig's."""


def form_choices(model: LanguageModel | None = None) -> dict[str, list[tuple[str, str]]]:
    """(value, label) pairs for every select field: ready models and datasets from the database,
    the model's hook points (all three without a model), and the fixed choices."""
    models = LanguageModel.select().where(LanguageModel.status == "ready") \
        .order_by(LanguageModel.id.desc())
    datasets = Dataset.select().where(Dataset.status == "ready").order_by(Dataset.id.desc())
    hooks = list(model.hook_points or HOOK_POINTS) if model is not None else list(HOOK_POINTS)
    out: dict[str, list[tuple[str, str]]] = {
        "model_id": [(str(m.id), f"{m.name} ({m.n_layers} layers, hidden {m.hidden_dim})")
                     for m in models],
        "dataset_id": [(str(d.id), d.name) for d in datasets],
        "hook_point": [(h, h) for h in hooks],
    }
    for f in FORM_FIELDS:
        if f.kind == "select" and f.choices:
            out[f.name] = [(c, c) for c in f.choices]
    return out


def training_defaults(model: LanguageModel | None) -> dict[str, Any]:
    """Default value of every form field (None = blank: resolved automatically)."""
    base = TrainConfig()
    out: dict[str, Any] = {}
    for f in FORM_FIELDS:
        out[f.name] = getattr(base, _CONFIG_NAME.get(f.name, f.name), None)
    out["model_id"] = model.id if model is not None else None
    newest = Dataset.select().where(Dataset.status == "ready").order_by(Dataset.id.desc()).first()
    out["dataset_id"] = newest.id if newest is not None else None
    out["layer_idx"] = (model.n_layers // 2) if model is not None and model.n_layers else None
    out["latent_dim"] = None
    out["learning_rate"] = None
    return out


def _newest_heartbeat() -> WorkerHeartbeat | None:
    return WorkerHeartbeat.select().order_by(WorkerHeartbeat.updated_at.desc()).first()


def _lenient_values(model: LanguageModel | None, values: Mapping[str, Any]) -> dict[str, Any]:
    """Form values parsed where possible; defaults for blank or unparseable ones."""
    out = training_defaults(model)
    for name, raw in values.items():
        f = FIELDS_BY_NAME.get(name)
        if f is None or _blank(raw):
            continue
        try:
            if f.kind == "int":
                out[name] = _parse_int(raw, f.label)
            elif f.kind == "float":
                out[name] = _parse_float(raw, f.label)
            else:
                out[name] = str(raw).strip()
        except ValueError:
            pass
    return out


def estimate(model: LanguageModel | None, values: Mapping[str, str]) -> dict[str, Any]:
    """Memory and time estimate for the form's current values (plain arithmetic).

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
    v = _lenient_values(model, values)
    hb = _newest_heartbeat()
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
    d_sae = int(latent) if latent else int(v.get("expansion_factor") or 8) * d_in
    d_sae = max(1, d_sae)
    batch = max(1, int(v.get("batch_size") or 4096))
    micro = v.get("micro_batch_size") or None
    n_params = int(model.n_params or 0)
    n_layers = int(model.n_layers or 1)
    layer = v.get("layer_idx")
    tie = str(v.get("tie_weights") or "").lower() in ("1", "true", "on", "yes")
    est = estimate_memory(d_in, d_sae, encoder_type=str(v.get("encoder_type") or "topk"),
                          k=int(v.get("k") or 32), batch_size=batch,
                          micro_batch_size=int(micro) if micro else None, precision=precision,
                          model_params=n_params, model_dtype=str(model.dtype or "float32"),
                          buffer_tokens=max(0, int(v.get("buffer_tokens") or 0)),
                          # no worker seen: the reference device, a Jetson's GPU
                          device="cpu" if device == "cpu" else "cuda", source="live",
                          layer=int(layer) if layer not in (None, "") else n_layers // 2,
                          n_layers=n_layers, tie_weights=tie,
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
        n_layers = max(1, int(model.n_layers or 1))
        layer = v.get("layer_idx")
        layer = n_layers // 2 if layer is None else min(max(0, int(layer)), n_layers - 1)
        steps = max(0, int(v.get("total_steps") or 0))
        flops_per_token = 6 * d_in * d_sae + 2 * n_params * (layer + 1) / n_layers
        seconds = steps * batch * flops_per_token / (float(hb.gflops) * 1e9 * 0.5)
        out["time_s"] = out["seconds"] = round(seconds, 1)
    return out


# ---------------------------------------------------------------------------- trainings
TRAINING_FIELDS = ("id", "status", "current_step", "total_steps", "error", "requested",
                   "config", "estimate", "out_dir", "device", "created_at", "updated_at",
                   "started_at", "finished_at", "result")


def _ready_row(model_cls: type, kind: str, raw: Any, errors: dict[str, str], field: str) -> Any:
    if _blank(raw):
        errors[field] = f"Choose a {kind.lower()}."
        return None
    try:
        row = _get(model_cls, kind, raw)
    except NotFound as exc:
        errors[field] = str(exc)
        return None
    if row.status != "ready":
        errors[field] = f"{kind} {row.id} is not ready (status: {row.status})."
        return None
    return row


def _field_of(message: str) -> str:
    """The form field a TrainConfig.validate message is about ("form" when unsure)."""
    if message.startswith("Layer ") or message.startswith("layer "):
        return "layer_idx"
    if message.startswith("batch_size must be a multiple"):
        return "micro_batch_size"
    if message.startswith("k ("):
        return "k"
    first = re.match(r"(\w+)", message)
    if first and first.group(1) in FIELDS_BY_NAME:
        return first.group(1)
    for f in FORM_FIELDS:
        if re.search(rf"\b{f.name}\b", message):
            return f.name
    return "form"


def create_training(form: Mapping[str, str]) -> Training:
    """Validate the form (``FORM_FIELDS`` names, strings) and queue a training.

    Blank values take their defaults (``training_defaults``); ``latent_dim`` wins over
    ``expansion_factor``. Raises Invalid with one message per bad field; nothing is inserted or
    queued then.
    """
    errors: dict[str, str] = {}
    model = _ready_row(LanguageModel, "Model", form.get("model_id"), errors, "model_id")
    dataset = _ready_row(Dataset, "Dataset", form.get("dataset_id"), errors, "dataset_id")
    defaults = training_defaults(model)
    values: dict[str, Any] = {}
    for f in FORM_FIELDS:
        if f.name in ("model_id", "dataset_id"):
            continue
        raw = form.get(f.name)
        if _blank(raw):
            values[f.name] = defaults[f.name]
            continue
        try:
            if f.kind == "int":
                values[f.name] = _parse_int(raw, f.label)
            elif f.kind == "float":
                values[f.name] = _parse_float(raw, f.label)
            elif f.kind == "bool":
                # A checkbox posts "true" beside its hidden "false": any true value wins.
                raws = form.getlist(f.name) if hasattr(form, "getlist") else [raw]
                values[f.name] = any(str(r).strip().lower() in ("1", "true", "on", "yes")
                                     for r in raws)
            else:
                text = str(raw).strip()
                allowed = f.choices
                if f.name == "hook_point":
                    allowed = tuple(model.hook_points or HOOK_POINTS) if model else HOOK_POINTS
                if text not in allowed:
                    what = f" for {model.name}" if f.name == "hook_point" and model else ""
                    raise ValueError(f"{f.label} '{text}' is not available{what}; choose one of "
                                     f"{', '.join(allowed)}.")
                values[f.name] = text
        except ValueError as exc:
            errors[f.name] = str(exc)
            values[f.name] = defaults[f.name]

    n_layers = int(model.n_layers) if model is not None and model.n_layers else None
    d_in = int(model.hidden_dim) if model is not None and model.hidden_dim else None
    if n_layers is not None and "layer_idx" not in errors:
        layer = values["layer_idx"]
        if layer is None:
            values["layer_idx"] = n_layers // 2
        elif not 0 <= layer < n_layers:
            errors["layer_idx"] = (f"Layer {layer} is out of range: the model has {n_layers} "
                                   f"layers (0-{n_layers - 1}).")
            values["layer_idx"] = n_layers // 2

    cfg_values = {_CONFIG_NAME.get(k, k): v for k, v in values.items()}
    cfg_values.update(
        model=model.path if model is not None else "-",
        dataset=dataset.source if dataset is not None else "-",
        context_size=dataset.context_size if dataset is not None else 128,
        max_tokens=dataset.max_tokens if dataset is not None else None,
        text_field=dataset.text_field if dataset is not None else "text",
    )
    # TrainConfig.validate reports the first bad value: reset it and ask again, for all of them.
    cfg = TrainConfig.from_dict(cfg_values)
    for _ in range(len(FORM_FIELDS) + 2):
        try:
            cfg.validate(d_in=d_in, n_layers=n_layers)
            break
        except ConfigError as exc:
            field = _field_of(str(exc))
            errors.setdefault(field, str(exc))
            if field == "form" or field not in defaults:
                break
            key = _CONFIG_NAME.get(field, field)
            default = defaults[field]
            if field == "k":
                default = 1
            if getattr(cfg, key) == default:
                break
            cfg = cfg.replace(**{key: default})
    if errors:
        first = next(iter(errors.values()))
        raise Invalid(f"Some training settings need fixing: {first}", errors)

    assert model is not None and dataset is not None
    est = estimate(model, {k: v for k, v in form.items() if isinstance(k, str)})
    with db.atomic():
        training = Training.create(model=model, dataset=dataset, status="queued",
                                   config=cfg.to_dict(), total_steps=cfg.total_steps,
                                   estimate=est)
        training.out_dir = str(settings.trainings_dir() / str(training.id))
        training.save()
    _enqueue("run_training", training.id, False)
    return Training.get_by_id(training.id)


def list_trainings() -> list[Training]:
    """All trainings, newest first."""
    return list(Training.select(Training, LanguageModel, Dataset)
                .join(LanguageModel, on=(Training.model == LanguageModel.id))
                .switch(Training).join(Dataset, on=(Training.dataset == Dataset.id))
                .order_by(Training.id.desc()))


def get_training(training_id: int | str) -> Training:
    """The training, or NotFound("Training 7 does not exist.")."""
    return _get(Training, "Training", training_id)


def _with_aliases(metrics: dict[str, Any]) -> dict[str, Any]:
    row = dict(metrics)
    if "dead" in row:
        row.setdefault("dead_neurons", row["dead"])
    if "lr" in row:
        row.setdefault("learning_rate", row["lr"])
    return row


def training_as_dict(training: Training) -> dict[str, Any]:
    """The API view: ``id, status, current_step, total_steps, error, latest`` (``{step, loss,
    mse, l0, dead_neurons, fvu, learning_rate, tokens_per_s}`` or None), plus ``model_id,
    dataset_id, requested, config, estimate, created_at, started_at, finished_at, result``,
    and ``metrics``: the newest metrics row in full (or None)."""
    out = _row_dict(training, TRAINING_FIELDS)
    full = _with_aliases(training.latest) if training.latest else None
    out["latest"] = json_safe({k: full.get(k) for k in LATEST_KEYS}) if full else None
    out["metrics"] = json_safe(full)
    out["model_id"] = training.model_id
    out["dataset_id"] = training.dataset_id
    return out


def metrics_rows(training_id: int | str, after_step: int = -1) -> list[dict[str, Any]]:
    """The training's metrics rows (the engine's dict, plus dead_neurons and learning_rate),
    oldest first; only steps after ``after_step`` (for incremental updates)."""
    training = get_training(training_id)
    rows = (Metric.select().where((Metric.training == training.id) & (Metric.step > after_step))
            .order_by(Metric.step))
    return [json_safe(_with_aliases(r.data)) for r in rows]


def log_lines(training_id: int | str, after_id: int = 0) -> list[dict[str, Any]]:
    """Log lines ``{id, created_at, level, message}``, oldest first, with id > ``after_id``."""
    training = get_training(training_id)
    rows = (LogLine.select().where((LogLine.training == training.id) & (LogLine.id > after_id))
            .order_by(LogLine.id))
    return [{"id": r.id, "created_at": r.created_at, "level": r.level, "message": r.message}
            for r in rows]


ACTIONS = ("stop", "pause", "resume", "retry")


def request(training_id: int | str, action: str) -> Training:
    """``stop``, ``pause``, ``resume`` or ``retry`` a training; returns the updated row.

    pause: training/initializing; resume: paused; stop: queued (stopped at once) or
    initializing/training/paused (the worker finalises the current weights: ``stopping`` then
    ``stopped``); retry: stopped/failed/interrupted (queued again; continues from the newest
    checkpoint). Anything else raises Conflict, e.g. "Training 4 is completed; only a paused
    training can be resumed."
    """
    if action not in ACTIONS:
        msg = f"Unknown action '{action}'; use one of {', '.join(ACTIONS)}."
        raise Invalid(msg, {"action": msg})
    enqueue = False
    with db.atomic():
        t = get_training(training_id)
        where = f"Training {t.id} is {t.status}"
        if action == "pause":
            if t.status not in ("training", "initializing"):
                raise Conflict(f"{where}; only a running training can be paused.")
            t.requested = "pause"
        elif action == "resume":
            if t.status != "paused":
                raise Conflict(f"{where}; only a paused training can be resumed.")
            t.requested = "resume"
        elif action == "stop":
            if t.status == "queued":
                t.status, t.requested, t.finished_at = "stopped", None, time.time()
            elif t.status in ("initializing", "training", "paused"):
                t.status, t.requested = "stopping", "stop"
            elif t.status == "stopping":
                raise Conflict(f"{where} already; it finishes after the current step.")
            else:
                raise Conflict(f"{where}; only a queued or running training can be stopped.")
        else:
            if t.status not in RETRYABLE:
                raise Conflict(f"{where}; only a stopped, failed or interrupted training can be "
                               "retried.")
            t.status, t.error, t.requested, t.finished_at = "queued", None, None, None
            enqueue = True
        t.save()
    if enqueue:
        _enqueue("run_training", t.id, True)
    return get_training(t.id)


def delete_training(training_id: int | str) -> None:
    """Delete a finished training, its rows and its run folder.

    Conflict while it is queued or running: stop it first.
    """
    t = get_training(training_id)
    if t.status not in FINISHED:
        raise Conflict(f"Training {t.id} is {t.status}; stop it before deleting it.")
    with db.atomic():
        t.delete_instance(recursive=True)
    _remove_tree(t.out_dir)


def checkpoints(training_id: int | str) -> list[Checkpoint]:
    """The training's checkpoints, newest step first."""
    t = get_training(training_id)
    return list(Checkpoint.select().where(Checkpoint.training == t.id)
                .order_by(Checkpoint.step.desc()))


def checkpoint_as_dict(ckpt: Checkpoint) -> dict[str, Any]:
    """JSON-ready copy of a checkpoint row."""
    out = _row_dict(ckpt, ("id", "step", "path", "loss", "size_bytes", "is_best", "reason",
                           "created_at"))
    out["training_id"] = ckpt.training_id
    return out


def save_checkpoint_now(training_id: int | str) -> Training:
    """Ask the worker for a checkpoint at the current step (kept by retention).

    Conflict unless the training is training or paused (a paused training already saved a
    checkpoint when it paused: nothing to do).
    """
    with db.atomic():
        t = get_training(training_id)
        if t.status not in ("training", "paused"):
            raise Conflict(f"Training {t.id} is {t.status}; checkpoints can be saved only while "
                           "it is training or paused.")
        if t.status == "paused":
            # The engine saved a checkpoint when it paused: nothing newer to save.
            return t
        t.requested = "save"
        t.save()
    return t


def get_checkpoint(checkpoint_id: int | str) -> Checkpoint:
    """The checkpoint, or NotFound."""
    return _get(Checkpoint, "Checkpoint", checkpoint_id)


def delete_checkpoint(checkpoint_id: int | str) -> None:
    """Delete a checkpoint file and its row.

    Conflict for the newest or the best checkpoint of a training that is running.
    """
    ckpt = get_checkpoint(checkpoint_id)
    t = ckpt.training
    if t.status in RUNNING:
        newest = (Checkpoint.select(Checkpoint.id).where(Checkpoint.training == t.id)
                  .order_by(Checkpoint.step.desc()).first())
        if ckpt.is_best or (newest is not None and newest.id == ckpt.id):
            which = "best" if ckpt.is_best else "newest"
            raise Conflict(f"Checkpoint at step {ckpt.step} is the {which} one of running "
                           f"training {t.id}; the worker needs it until the training finishes.")
    Path(ckpt.path).unlink(missing_ok=True)
    with db.atomic():
        ckpt.delete_instance()
        Training.update(updated_at=time.time()).where(Training.id == ckpt.training_id).execute()


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()),
               default=folder.stat().st_mtime)


def export_zip(training_id: int | str) -> Path:
    """A zip of the training's SAELens folder (built once, rebuilt when the folder changes).

    Conflict unless the training is completed or stopped and has an export.
    """
    t = get_training(training_id)
    folder = Path(t.out_dir or "") / "saelens"
    if t.status not in ("completed", "stopped"):
        raise Conflict(f"Training {t.id} is {t.status}; only a completed or stopped training "
                       "can be exported.")
    if not t.out_dir or not folder.is_dir():
        raise Conflict(f"Training {t.id} has no SAELens export folder ({folder}).")
    out = Path(t.out_dir) / "saelens.zip"
    if out.is_file() and out.stat().st_mtime >= _newest_mtime(folder):
        return out
    fd, tmp = tempfile.mkstemp(prefix=".saelens-", suffix=".zip", dir=t.out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    zf.write(p, Path("saelens") / p.relative_to(folder))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def health() -> dict[str, Any]:
    """The newest worker heartbeat: ``{alive, age_s, name, device, device_name,
    device_memory, gflops}`` (alive: seen in the last 15 s; all None but alive=False when no
    worker ever ran)."""
    hb = _newest_heartbeat()
    if hb is None:
        return {"alive": False, "age_s": None, "name": None, "device": None,
                "device_name": None, "device_memory": None, "gflops": None}
    age = max(0.0, time.time() - hb.updated_at)
    return {"alive": age < HEARTBEAT_ALIVE_S, "age_s": round(age, 1), "name": hb.name,
            "device": hb.device, "device_name": hb.device_name,
            "device_memory": hb.device_memory, "gflops": hb.gflops}


def interrupt_running() -> int:
    """Ask every running training to checkpoint and stop as ``interrupted`` (worker shutdown;
    Retry continues it). Returns how many were asked."""
    with db.atomic():
        return Training.update(requested="interrupt").where(Training.status.in_(RUNNING)) \
            .execute()
