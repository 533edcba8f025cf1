"""Memory estimate of a training run: plain arithmetic, no torch (the web app shows it too).

What is estimated is what ``bench/memory_check.py`` measures: on the CPU the process's peak
resident set (ru_maxrss / VmHWM), on CUDA ``torch.cuda.max_memory_allocated`` — over the whole
run (initialisation, steps, evaluation, final checkpoint and export). It is the sum of

- ``runtime``: the process before any tensor of the run exists. CPU: a *measured constant*
  (Python, torch, numpy, safetensors and the engine imported, OpenMP/BLAS thread pools and
  buffers, shared-library pages; see ``RUNTIME_BYTES``), plus transformers for live extraction.
  CUDA: 0 (the CUDA context is not in max_memory_allocated);
- ``model``: the weights of the model, for live extraction (n_params x dtype bytes; on the CPU
  only the memory-mapped pages of the blocks up to the layer read, when ``layer`` is given);
- ``sae_params``: W_enc, W_dec (absent when tied), b_enc, b_dec (and JumpReLU's threshold
  [d_sae]) in fp32;
- ``optimizer``: Adam's exp_avg and exp_avg_sq (2 x params), kept for the whole run, plus the
  gradients (1 x params, alive from backward until ``zero_grad``) — or, when the final checkpoint
  is the peak, safetensors' in-memory copy of the params and moments it writes;
- ``batch``: the input batch (read from the file or the buffer, then scaled: two copies);
- ``activations``: the transient working set of the phase that peaks, the largest of
  * a step's forward/backward on ``micro`` vectors: the dense pre-activations [micro, d_sae]
    (fp32, or 2 bytes under bf16/fp16 autocast), and per encoder type what lives with them
    (the ``MemoryTerms`` of its registry entry in ``engine.architectures``. Standard: ReLU
    output, the L1 term and their gradients; jumprelu: the same plus the threshold's
    straight-through masks; topk: values + int64 indices, k per token, and the sparse
    backward's two [d_sae, d_in] buffers; batchtopk: a bool mask and k x micro selected
    entries), plus Adam's per-parameter temporaries. On CUDA standard and JumpReLU always take
    the dense step (the CPU takes the sparse one at low density): its backward holds more,
    partly in fp32 whatever the precision (``MemoryTerms.dense_backward``);
  * initialisation: the sample of max(8192, min(d_sae, 65,536)) vectors, random decoder
    directions [d_sae, d_in] and the dense encode of 4,096 vectors (fp32, no autocast);
  * evaluation: the held-out vectors and a dense forward per chunk of min(micro, 4096);
  * live extraction: the model's forward on ``batch_contexts`` x ``context_size`` tokens;
- ``buffer``: live extraction's shuffle buffer: ``buffer_tokens`` x d_in fp32 at its refill peak
  (on the training device);
- ``file_pages``: CPU only, an activation file is memory-mapped: the pages it reads count in RSS
  (they are page cache, which the kernel can reclaim). Random rows fault in 64 KB windows, so a
  few steps already make most of the file resident; pass ``file_bytes``.

The estimate is meant to be within 15% of the measured peak (checked by bench/memory_check.py and
tests/engine/test_memory.py); ``sae-studio info`` and the web form show it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import architectures
from .architectures import MemoryTerms

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
MB = 2**20

RUNTIME_BYTES = {"cpu": 320 * MB, "cuda": 0}
"""Measured process baseline on the CPU (bench/memory_check.py, 2-core x86-64 Linux, torch 2.13
CPU build, Python 3.11): 146 MB anonymous memory once torch, numpy, safetensors and the engine
are imported, ~98 MB of shared-library pages once training ops have run, and ~75 MB that the
first ops add (OpenMP thread pool, BLAS/oneDNN buffers) — measured on a 576 -> 576 SAE with
glibc's mmap threshold pinned so that no freed memory is kept. Not a per-config term."""
RUNTIME_LIVE_BYTES = {"cpu": 170 * MB, "cuda": 0}
"""Extra CPU baseline with live extraction, measured likewise: transformers and the tokenizer
imported and a model loaded (156 MB anonymous, ~12 MB more library pages)."""
GLIBC_MMAP_MAX = 32 * MB
"""glibc's largest dynamic mmap threshold: freed blocks up to this size stay in the heap."""
FAULT_WINDOW = 64 * 1024
"""Bytes mapped per page fault in a memory-mapped file whose pages are cached (fault-around)."""
HOST_HEAP_BLOCK_MAX = 1 << 30
"""Blocks up to this size come from glibc's heap (and are reused) once ``keep_host_memory`` ran."""
HOST_TRIM_THRESHOLD = (1 << 31) - 1
"""Free memory at the heap's top kept rather than returned (mallopt takes a C int)."""
HOST_ALLOCATOR_TUNABLES = (f"glibc.malloc.mmap_threshold={HOST_HEAP_BLOCK_MAX}:"
                           f"glibc.malloc.trim_threshold={HOST_TRIM_THRESHOLD}:"
                           "glibc.malloc.arena_max=1")
"""``GLIBC_TUNABLES`` for a process whose threads train (the worker): what ``keep_host_memory``
asks at run time, plus one arena, so that a task thread's large blocks come from the main
heap too (a thread's own arena maps every block over 64 MB afresh, whatever the threshold)."""
INIT_SAMPLE_MAX = 65_536
INIT_ENCODE_ROWS = 4096
EVAL_CHUNK_MAX = 4096


@dataclass
class MemoryEstimate:
    sae_params: int
    optimizer: int
    activations: int
    batch: int
    model: int
    buffer: int
    runtime: int = 0
    file_pages: int = 0
    allocator: int = 0
    peak_phase: str = "step"
    by_phase: dict[str, int] = field(default_factory=dict, compare=False)
    """Each phase's SAE-side bytes (optimizer + activations + batch + buffer): the largest is
    ``peak_phase``'s. Not part of ``total`` (shown by bench/memory_check.py)."""

    @property
    def total(self) -> int:
        return sum(v for v in asdict(self).values() if isinstance(v, int))

    def to_dict(self) -> dict[str, int]:
        """Byte counts (they sum to ``total``); ``peak_phase`` is left out (not a size)."""
        d = {k: v for k, v in asdict(self).items() if isinstance(v, int)}
        return dict(d, total=self.total)


def _phase_step(d_in: int, d_sae: int, terms: MemoryTerms, k: int, micro: int, act: int,
                n_params: int, dense_step: bool = False) -> int:
    """Transient bytes of one micro-batch forward/backward and the optimizer step (no grads).
    ``dense_step``: the device takes the dense standard/JumpReLU step (CUDA), whose backward
    holds ``terms.dense_backward``."""
    dense = micro * d_sae * act
    w = 4 * d_in * d_sae  # one [d_sae, d_in] fp32 matrix
    rows = 4 * micro * d_in  # one [micro, d_in] fp32 tensor
    autocast = (d_in * d_sae + micro * d_in) * act if act < 4 else 0  # cached half casts
    sel = terms.step_selections * micro * k * (act + 8)  # values + int64 indices
    masks = terms.step_mask_bytes * micro * d_sae
    fwd = terms.step_dense_forward * dense + sel + masks + 3 * rows + autocast
    backward = terms.step_dense_backward * dense
    if dense_step and terms.dense_backward is not None:
        at_act, in_fp32 = terms.dense_backward
        backward = at_act * dense + in_fp32 * micro * d_sae * 4
    bwd = backward + sel + masks + rows + terms.step_weight_backward * w
    opt = 2 * w  # Adam's sqrt / division temporaries, remove_parallel_grad's product
    grads = 4 * n_params
    return int(max(fwd, bwd + grads, opt + grads))


def estimate_memory(
    d_in: int, d_sae: int, *, encoder_type: str = "topk", k: int = 32, batch_size: int = 4096,
    micro_batch_size: int | None = None, precision: str = "fp32", model_params: int = 0,
    model_dtype: str = "fp32", buffer_tokens: int = 0, device: str = "cpu",
    source: str | None = None, file_bytes: int = 0, file_dtype: str = "fp32",
    total_steps: int | None = None, eval_tokens: int = 16_384, tie_weights: bool = False,
    context_size: int = 128, batch_contexts: int = 16, layer: int | None = None,
    n_layers: int | None = None, transcoder: bool = False, skip_connection: bool = False,
) -> MemoryEstimate:
    """Peak memory of a training run in bytes, by term (see the module docstring).

    ``device``: "cpu" (peak RSS) or "cuda"/"cuda:N"/"mps" (device memory, no runtime baseline).
    ``source``: "file" (an activation file of ``file_bytes`` bytes of data) or "live" (a model of
    ``model_params`` parameters with a shuffle buffer of ``buffer_tokens`` vectors); None means
    "live" when ``model_params`` is given, else "file". ``total_steps`` (None = a long run) sets
    how much of the file a run reads. ``layer`` / ``n_layers``: on the CPU, a model loaded
    from safetensors in its stored dtype is memory-mapped and only the weights the forward reads
    (blocks up to ``layer``) become resident: model bytes x (layer + 1) / n_layers.
    ``transcoder``: rows hold input and target (twice the data: batch, buffer, sample, held-out
    vectors, file rows); ``skip_connection`` adds its [d_in, d_in] matrix to the parameters.
    """
    dev = "cpu" if str(device).split(":")[0] == "cpu" else "cuda"
    src = source or ("live" if model_params else "file")
    micro = max(1, min(micro_batch_size or batch_size, batch_size))
    act = DTYPE_BYTES.get(precision, 4)
    arch = architectures.get(encoder_type)
    terms = arch.memory
    tied = tie_weights and "tie_weights" in arch.options
    n_params = d_in * d_sae * (1 if tied else 2) + d_sae + d_in
    n_params += terms.extra_params_per_latent * d_sae
    if transcoder and skip_connection:
        n_params += d_in * d_in
    params = 4 * n_params
    moments = 8 * n_params
    w = 4 * d_in * d_sae
    row = 4 * d_in * (2 if transcoder else 1)  # a data row (a transcoder's: input + target)

    # --- each phase's SAE-side total (params, what else lives then, its transients)
    batch = 2 * batch_size * row  # the batch as read, then scaled
    grads = 4 * n_params
    step = _phase_step(d_in, d_sae, terms, k, micro, act, n_params,
                       dense_step=dev == "cuda")
    n_sample = max(8192, min(d_sae, INIT_SAMPLE_MAX))
    init = 2 * n_sample * row + w + terms.init_dense * INIT_ENCODE_ROWS * d_sae * 4
    if dev == "cuda":
        # The sample stays on the host; on the device: the decoder directions and the dense
        # encode of 4,096 rows (fp32, no autocast) — the matmul output, the biased
        # pre-activations and the scattered latents are alive together (fitted to H200
        # max_memory_allocated of TopK 4x/8x/16x: 139/272/548 MB).
        init = w + 3 * INIT_ENCODE_ROWS * d_sae * 4 + 2 * INIT_ENCODE_ROWS * row
    chunk = min(micro, EVAL_CHUNK_MAX)
    evaluation = int(2 * eval_tokens * row + terms.eval_dense * chunk * d_sae * act
                     + 2 * chunk * row)
    save = params + moments  # safetensors serialises params + moments into one bytes copy
    # Live extraction's shuffle buffer (on the training device): between refills it holds 0.75
    # x buffer_tokens vectors (a served round + the kept half); a refill peaks at 1.25 x (the
    # kept half, the new round and its shuffled copy), next to the model's forward on
    # batch_contexts x context_size tokens (a few [tokens, ~4 x d_in] fp32 tensors).
    steady = int(0.75 * buffer_tokens * row) if src == "live" else 0
    refill = 0
    if src == "live":
        extract = 12 * batch_contexts * context_size * d_in * 4
        refill = max(int(1.25 * buffer_tokens * row), steady + extract) - steady
    # (optimizer, activations, batch, buffer) per phase; params are always there
    phases = {
        "step": (moments + grads, step - grads, batch, steady),
        "init": (0, init, 0, 0),  # no Adam moments yet, the buffer is still empty
        "eval": (moments, evaluation, 0, steady),
        "save": (moments + save, 0, 0, steady),
        "refill": (moments, 0, batch // 2, steady + refill),
    }
    peak_phase = max(phases, key=lambda p: sum(phases[p]))
    optimizer, activations, batch_term, buffer = phases[peak_phase]

    model = model_params * DTYPE_BYTES.get(model_dtype, 4) if src == "live" else 0
    if dev == "cpu" and layer is not None and n_layers:
        model = int(model * min(1.0, (layer + 1) / n_layers))

    runtime = RUNTIME_BYTES[dev] + (RUNTIME_LIVE_BYTES[dev] if src == "live" else 0)
    allocator = 0
    if dev == "cpu":
        # Initialisation frees its sample, decoder directions and decoded copies first; glibc
        # keeps blocks below its (dynamic, <= 32 MB) mmap threshold in the heap, so they stay
        # resident for the rest of the run (later blocks reuse the heap only partly).
        def small(b: int) -> int:
            return b if b <= GLIBC_MMAP_MAX else 0

        allocator = (2 * small(n_sample * row) + small(w)
                     + 2 * small(INIT_ENCODE_ROWS * row))
        if peak_phase == "init":
            allocator = 0
    file_pages = 0
    if dev == "cpu" and src == "file" and file_bytes > 0:
        file_pages = _resident_file_bytes(file_bytes, row // 4 * DTYPE_BYTES.get(file_dtype, 4),
                                          batch_size, total_steps, n_sample, eval_tokens)
    return MemoryEstimate(params, optimizer, max(0, activations), batch_term, model, buffer,
                          runtime, file_pages, allocator, peak_phase,
                          {p: sum(v) for p, v in phases.items()})


def _resident_file_bytes(file_bytes: int, row_bytes: int, batch_size: int,
                         total_steps: int | None, n_sample: int, eval_tokens: int) -> int:
    """Expected resident bytes of a memory-mapped activation file after a run.

    The holdout (the last min(eval_tokens, N / 10) rows) is read whole. Training reads
    total_steps x batch_size distinct random rows (an epoch is a permutation), initialisation an
    independent random sample; a fault maps a whole ``FAULT_WINDOW`` of cached pages, so a window
    is resident when any of the rows it overlaps was read."""
    n = max(1, file_bytes // max(1, row_bytes))
    n_hold = min(eval_tokens, n // 10)
    n_train = max(1, n - n_hold)
    reads = n_train if total_steps is None else min(n_train, total_steps * batch_size)
    untouched_row = (1 - reads / n_train) * (1 - min(n_sample, n_train) / n_train)
    rows_per_window = FAULT_WINDOW / row_bytes + 1
    touched = 1 - untouched_row ** rows_per_window
    return int(min(file_bytes, n_train * row_bytes * touched + n_hold * row_bytes))


def group_memory(estimates: list[MemoryEstimate], hooks: list[object]) -> int:
    """Peak bytes of SAEs trained together in one process (a sweep's sub-group), from each
    one's estimate alone (``estimates[i]`` for the SAE reading hook ``hooks[i]``).

    What every SAE keeps for the whole run adds up: its parameters and Adam's moments (the
    ``optimizer`` term of its peak phase). What the group holds once counts once: the runtime
    and the model's weights (the deepest hook's share). Each hook has its own shuffle buffer and
    batch: the largest of its SAEs' terms, summed over hooks. The members step one after
    another, so the transient working set (``activations``, ``allocator``, ``file_pages``) is
    the largest one's. An upper bound where the SAEs' peak phases differ."""
    if not estimates:
        return 0
    per_hook: dict[object, int] = {}
    for est, hook in zip(estimates, hooks, strict=True):
        per_hook[hook] = max(per_hook.get(hook, 0), est.buffer + est.batch)
    return (max(e.runtime for e in estimates) + max(e.model for e in estimates)
            + sum(per_hook.values())
            + sum(e.sae_params + e.optimizer for e in estimates)
            + max(e.activations + e.allocator for e in estimates)
            + max(e.file_pages for e in estimates))


def placed_memory(estimates: list[MemoryEstimate], hooks: list[object], gpus: int = 1) -> int:
    """Peak bytes on the fullest GPU of a sub-group spread over ``gpus`` GPUs (SAE i on GPU
    i mod gpus, ``engine.group.place``): the largest GPU's ``group_memory``. The model and the
    buffers live on the first GPU only; they are counted on each (an upper bound)."""
    if gpus <= 1:
        return group_memory(estimates, hooks)
    return max(group_memory(estimates[g::gpus], hooks[g::gpus])
               for g in range(min(gpus, len(estimates))))


def split_group(estimates: list[MemoryEstimate], hooks: list[object], budget: int,
                gpus: int = 1) -> list[list[int]]:
    """Indices of the SAEs in sub-groups that each fit ``budget`` bytes (per GPU when spread
    over ``gpus``: ``placed_memory``), filled in order, SAEs of one hook kept together where
    they fit. An SAE too large on its own gets a sub-group of its own (its estimate warns)."""
    order = sorted(range(len(estimates)), key=lambda i: hooks.index(hooks[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            trial = groups[-1] + [i]
            if placed_memory([estimates[j] for j in trial], [hooks[j] for j in trial],
                             gpus) <= budget:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups
