"""Activation sources for the trainer: a cached activation file, or live extraction from a model.

Both give the trainer the same interface (``ActivationSource``): ``next_batch(n)`` returns the next
``n`` activation vectors of a deterministic, seeded stream; ``state_dict()`` / ``load_state_dict``
capture the stream position exactly, so a resumed run sees the same data in the same order;
``sample(n)`` gives vectors for normalisation and initialisation without consuming the stream;
``holdout()`` gives vectors that are never trained on, for the final evaluation.

Live extraction
---------------
Contexts of a token store are visited in a seeded random order (a new permutation each epoch).
Each forward pass stops right after the chosen layer (``models.extract_layer``). From its output
we drop, by default, position 0 of every context, special tokens, and vectors whose norm is above
``outlier_factor`` x the running median norm (the median of the previous round; the first round
uses its first batch). The numbers excluded are counted in ``FilterStats``.

Shuffle buffer with refill at half: the buffer holds up to ``buffer_tokens`` vectors. Each round
extracts about ``buffer_tokens / 2`` new vectors N_r and shuffles them; one half is served in
this round together with the half kept back from the previous round, in a shuffled order; the
other half is kept for the next round. So every batch mixes the contexts of two rounds, and a
vector waits at most one round. Resuming needs only the previous round's start (cursor,
median and vectors served before it), which is what ``state_dict`` stores: the buffer is rebuilt
by re-extracting two rounds.

The trainer says how many vectors the run will ask for (``expect``: steps x batch). The round
that can serve the rest (what is still needed is at most half a buffer beyond the kept half)
extracts only that, and serves it all with the kept half, keeping nothing back: no forward pass
is spent on vectors the run would never see (a 100-step run of 4,096 on SmolLM2 read ~487,400
tokens for its 409,600 vectors before, ~426,000 now). Asked for more, the stream goes on with
full rounds.

Transcoder pairs
----------------
A transcoder's source (``target_hook_point``) serves rows [x | y]: the input at the hook point
followed by the target at the target hook point of the same token, ``d_in + d_target`` wide, so
shuffling, resuming and files work unchanged; ``d_in`` is the input's width, ``d_target`` the
target's (0 for an SAE's source) and the trainer splits the rows. The outlier filter judges the
norm of the whole row.

Activation files
----------------
A safetensors file with one tensor ``activations`` [N, d_in + d_target] (float32 or bfloat16)
and metadata (model, layer, hook point, target hook point and ``d_target`` for pairs, ...).
``ActivationFile`` memory-maps it, so training reads rows on demand; ``write_activation_file``
writes one atomically from an iterator of chunks.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .files import file_mode, fsync_dir
from .models import extract_layer, extract_layers

ACT_KEY = "activations"
_ST_DTYPES = {"F32": (np.float32, torch.float32, 4), "BF16": (np.int16, torch.bfloat16, 2),
              "F16": (np.float16, torch.float16, 2)}


def _gen(*keys: int) -> torch.Generator:
    g = torch.Generator()
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63)
    g.manual_seed(seed)
    return g


class ActivationSource(Protocol):
    d_in: int
    meta: dict[str, Any]

    def next_batch(self, n: int) -> Tensor: ...
    def expect(self, n: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def sample(self, n: int) -> Tensor: ...
    def holdout(self) -> Tensor: ...


# ---------------------------------------------------------------------------- activation files
class ActivationFile:
    """Memory-mapped reader of an activation safetensors file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"Activation file '{self.path}' does not exist.")
        try:
            with open(self.path, "rb") as fh:
                (hlen,) = struct.unpack("<Q", fh.read(8))
                if hlen > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(fh.read(hlen))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise DataError(
                f"'{self.path}' is not a safetensors activation file ({exc}).") from None
        if ACT_KEY not in header:
            keys = ", ".join(k for k in header if k != "__metadata__") or "none"
            raise DataError(f"'{self.path}' has no tensor named '{ACT_KEY}' (found: {keys}).")
        info = header[ACT_KEY]
        if info["dtype"] not in _ST_DTYPES or len(info["shape"]) != 2:
            raise DataError(f"'{self.path}': '{ACT_KEY}' must be a 2-D float32/bfloat16/float16 "
                            f"tensor (got {info['dtype']} {info['shape']}).")
        np_dtype, self.torch_dtype, size = _ST_DTYPES[info["dtype"]]
        self.n, self.width = (int(v) for v in info["shape"])
        """Rows and their width (d_in + d_target)."""
        start, end = info["data_offsets"]
        if end - start != self.n * self.width * size or 8 + hlen + end > self.path.stat().st_size:
            raise DataError(f"'{self.path}' is truncated or corrupt (sizes do not match).")
        if self.n == 0:
            raise DataError(f"Activation file '{self.path}' holds no vectors.")
        raw_meta = header.get("__metadata__") or {}
        try:
            self.meta: dict[str, Any] = json.loads(raw_meta.get("sae_studio", "{}"))
            self.d_target = int(self.meta.get("d_target") or 0)
        except (ValueError, TypeError) as exc:
            raise DataError(f"'{self.path}' has unreadable metadata ({exc}).") from None
        if not 0 <= self.d_target < self.width:
            raise DataError(f"'{self.path}': its d_target ({self.d_target}) does not fit its "
                            f"rows of {self.width} values.")
        self.d_in = self.width - self.d_target
        """The input's width (a transcoder pair's first part)."""
        self._mm = np.memmap(self.path, dtype=np_dtype, mode="r", offset=8 + hlen + start,
                             shape=(self.n, self.width))

    def rows(self, idx: np.ndarray | slice) -> Tensor:
        arr = np.array(self._mm[idx])  # a writable copy, whatever the index
        t = torch.from_numpy(arr)
        if self.torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.float()


def write_activation_file(
    chunks: Iterable[Tensor], path: Path | str, *, dtype: torch.dtype = torch.float32,
    meta: dict[str, Any] | None = None,
) -> int:
    """Stream chunks [n_i, d_in] into a safetensors file at ``path`` atomically; return N."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st_name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    size = _ST_DTYPES[st_name][2]
    fd, raw = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".raw", dir=path.parent)
    n, d_in = 0, None
    final_tmp = None
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                if chunk.ndim != 2:
                    raise DataError("activation chunks must be 2-D")
                d_in = chunk.shape[1] if d_in is None else d_in
                c = chunk.detach().to("cpu", dtype).contiguous()
                if dtype == torch.bfloat16:
                    c = c.view(torch.int16)
                fh.write(c.numpy().tobytes())
                n += chunk.shape[0]
        if n == 0 or d_in is None:
            raise DataError("No activations were produced: the corpus is too small or every "
                            "token was filtered out.")
        header = {ACT_KEY: {"dtype": st_name, "shape": [n, d_in],
                            "data_offsets": [0, n * d_in * size]},
                  "__metadata__": {"sae_studio": json.dumps(meta or {})}}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)
        fd2, final_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd2, "wb") as out, open(raw, "rb") as src:
            out.write(struct.pack("<Q", len(hbytes)))
            out.write(hbytes)
            while block := src.read(1 << 24):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(final_tmp, file_mode())
        os.replace(final_tmp, path)
        fsync_dir(path.parent)
        final_tmp = None
    finally:
        Path(raw).unlink(missing_ok=True)
        if final_tmp:
            Path(final_tmp).unlink(missing_ok=True)
    return n


class CachedActivations:
    """Batches from an activation file: a seeded permutation per epoch; the last rows held out.

    Sharded (``rank`` of ``world`` training processes, ``distributed``): ``next_batch(n)``
    returns this rank's rows ``rank::world`` of the next ``n x world`` rows the single process
    would read, so ``world`` ranks of ``n`` rows see the same rows per step as one process of
    ``n x world``; the position counts the whole stream (the same on every rank)."""

    def __init__(self, path: Path | str, *, seed: int = 0, holdout: int = 16_384,
                 rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.file = ActivationFile(path)
        self.d_in, self.d_target = self.file.d_in, self.file.d_target
        self.meta = dict(self.file.meta, activations=str(path))
        self.n_holdout = min(holdout, self.file.n // 10)
        self.n_train = self.file.n - self.n_holdout
        self.seed = seed
        self.position = 0
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n_train, generator=_gen(self.seed, epoch)).numpy()
            self._epoch = epoch
        return self._perm

    def next_batch(self, n: int) -> Tensor:
        parts = []
        n *= self.world  # the whole stream's rows of this step; this rank keeps its share
        while n > 0:
            epoch, off = divmod(self.position, self.n_train)
            take = min(n, self.n_train - off)
            idx = self._perm_for(epoch)[off:off + take]
            parts.append(np.sort(idx))  # sorted reads are faster; order inside a batch is moot
            self.position += take
            n -= take
        idx = np.concatenate(parts)
        return self.file.rows(idx if self.world == 1 else idx[self.rank::self.world])

    def expect(self, n: int) -> None:
        """The run's total (``ActivationSource``): a file reads only the rows asked for."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cached", "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def sample(self, n: int) -> Tensor:
        idx = torch.randperm(self.n_train, generator=_gen(self.seed, 7919))[:n].numpy()
        return self.file.rows(np.sort(idx))

    def holdout(self) -> Tensor:
        return self.file.rows(slice(self.n_train, self.file.n))


# ---------------------------------------------------------------------------- live extraction
@dataclass
class FilterStats:
    seen: int = 0
    position0: int = 0
    special: int = 0
    outliers: int = 0
    kept: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LiveActivations:
    """Activations extracted on the fly from a model over a token store (see module docstring).

    Sharded (``rank`` of ``world`` training processes, ``distributed``): each epoch's context
    order is the single process's, and this rank extracts the contexts at positions
    ``i % world == rank`` of it, with its own buffer; ``sample`` stays the unsharded stream's,
    so every rank initialises from the same vectors."""

    def __init__(
        self,
        model: torch.nn.Module,
        store: Any,
        layer: int,
        hook_point: str = "residual",
        *,
        seed: int = 0,
        buffer_tokens: int = 131_072,
        exclude_special: bool = True,
        exclude_pos0: bool = True,
        outlier_factor: float = 10.0,
        holdout_tokens: int = 16_384,
        batch_contexts: int = 16,
        device: str | torch.device = "cpu",
        max_epochs: int | None = None,
        meta: dict[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        extract: Callable[[Tensor], Tensor] | None = None,
        target_hook_point: str | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.model, self.store, self.layer, self.hook_point = model, store, layer, hook_point
        self.rank, self.world = rank, world
        self.target_hook_point = target_hook_point
        """A transcoder's target (rows [x | y], see the module docstring); None for an SAE."""
        hooks = [(layer, hook_point)] + ([(layer, target_hook_point)] if target_hook_point
                                         else [])
        self.extract = extract or (
            (lambda ids: torch.cat(extract_layers(model, ids, hooks), dim=-1))
            if target_hook_point else (lambda ids: extract_layer(model, ids, layer, hook_point)))
        """Token ids [B, T] -> activations [B, T, d] (``SharedExtraction.for_hook`` in a group)."""
        self._sample: Tensor | None = None
        self._holdout: tuple[float | None, Tensor] | None = None
        self.seed, self.device, self.max_epochs = seed, torch.device(device), max_epochs
        self.half = max(1, buffer_tokens // 2)
        self.exclude_special, self.exclude_pos0 = exclude_special, exclude_pos0
        self.outlier_factor = outlier_factor
        self.batch_contexts = batch_contexts
        self.progress = progress
        self.special = torch.tensor(sorted(set(store.special_ids)), dtype=torch.long)
        ctx = store.context_size
        n_ctx = store.n_contexts
        per_ctx = max(1, ctx - 1)
        n_hold = math.ceil(holdout_tokens / per_ctx) if holdout_tokens > 0 else 0
        n_hold = min(n_hold, n_ctx // 10)
        self.n_train_ctx = n_ctx - n_hold
        if self.n_train_ctx < 1:
            raise DataError("The token store has no contexts to train on.")
        self.holdout_ids = np.arange(self.n_train_ctx, n_ctx)
        self.epoch_len = len(range(rank, self.n_train_ctx, world))
        """Contexts this rank extracts per epoch (all the training contexts for one process)."""
        if self.epoch_len < 1:
            raise DataError(f"The token store has {self.n_train_ctx} training contexts, fewer "
                            f"than the {world} training processes.")
        self._whole: tuple[int, np.ndarray] | None = None
        self.stats = FilterStats()
        self.width = int(self._run(np.array([0]), None)[0].shape[1])
        """Values per row: d_in + d_target."""
        self.d_target = self.width // 2 if target_hook_point else 0
        self.d_in = self.width - self.d_target
        self.stats = FilterStats()
        self.meta = dict(meta or {})
        # stream state
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self.round, self.offset = 0, 0
        self.cursor, self.median = 0, None  # where the next round's extraction starts
        self.budget: int | None = None
        """Vectors the run asks for in all (``expect``); None: every round is a full one."""
        self.given = 0  # vectors served so far
        self._prev_start: list | None = None  # round r-1's and r's [cursor, median, given,
        self._this_start: list | None = None  # kept]: where it extracts, vectors served before
        # it and vectors kept back for it
        self._keep: Tensor | None = None  # half of N_r kept back for round r+1
        self._served: Tensor | None = None  # round r's vectors in serving order
        self.exhausted = False
        self.between: Callable[[], None] | None = None
        """Called after each batch of contexts while a round is extracted (a round can take
        many seconds), a resume's replay included: the trainer hears its caller there
        (``trainer.listening``, ``trainer.replaying``); it may raise to abandon the round,
        after which this stream serves no more batches."""

    # -- contexts
    def _order(self, epoch: int, whole: bool) -> np.ndarray:
        """Epoch ``epoch``'s context order: this rank's share, or the ``whole`` stream's."""
        if whole:
            if self._whole is None or self._whole[0] != epoch:
                perm = torch.randperm(self.n_train_ctx, generator=_gen(self.seed, 104729, epoch))
                self._whole = (epoch, perm.numpy())
            return self._whole[1]
        if epoch != self._epoch:
            perm = torch.randperm(self.n_train_ctx, generator=_gen(self.seed, 104729, epoch))
            self._perm = perm.numpy()[self.rank::self.world]
            self._epoch = epoch
        return self._perm

    def _ctx_ids(self, cursor: int, count: int, whole: bool = False) -> np.ndarray:
        """``count`` context ids from position ``cursor`` of this rank's stream (``whole``:
        of the unsharded stream)."""
        out = []
        length = self.n_train_ctx if whole else self.epoch_len
        while count > 0:
            epoch, off = divmod(cursor, length)
            order = self._order(epoch, whole)
            take = min(count, length - off)
            out.append(order[off:off + take])
            cursor += take
            count -= take
        return np.concatenate(out)

    def _run(self, ctx_ids: np.ndarray, median: float | None) -> tuple[Tensor, Tensor]:
        """Forward some contexts; return (kept vectors [m, d] float32, candidate norms)."""
        ids = torch.from_numpy(np.asarray(self.store.contexts[np.sort(ctx_ids)], dtype=np.int64))
        acts = self.extract(ids.to(self.device)).float()
        mask = torch.ones(ids.shape, dtype=torch.bool)
        n_total = mask.numel()
        if self.exclude_pos0:
            mask[:, 0] = False
        n_pos0 = n_total - int(mask.sum())
        if self.exclude_special and len(self.special):
            before = int(mask.sum())
            mask &= ~torch.isin(ids, self.special)
            n_special = before - int(mask.sum())
        else:
            n_special = 0
        cand = acts[mask.to(acts.device)]
        norms = cand.norm(dim=-1)
        n_out = 0
        if self.outlier_factor > 0 and len(norms):
            med = float(norms.median()) if median is None else median
            keep = norms <= self.outlier_factor * med
            n_out = int((~keep).sum())
            cand = cand[keep]
        s = self.stats
        s.seen += n_total
        s.position0 += n_pos0
        s.special += n_special
        s.outliers += n_out
        s.kept += cand.shape[0]
        return cand, norms

    def _build(self, cursor: int, median: float | None, want: int
               ) -> tuple[Tensor, int, float | None]:
        """Extract at least ``want`` new vectors (whole batches of contexts) from ``cursor``."""
        parts, norms_all, got = [], [], 0
        limit = None if self.max_epochs is None else self.max_epochs * self.epoch_len
        while got < want and (limit is None or cursor < limit):
            count = self.batch_contexts if limit is None else min(self.batch_contexts,
                                                                  limit - cursor)
            kept, norms = self._run(self._ctx_ids(cursor, count), median)
            if median is None and len(norms):
                median = float(norms.median())
            cursor += count
            parts.append(kept)
            norms_all.append(norms)
            got += kept.shape[0]
            if self.progress:
                self.progress(kept.shape[0])
            if self.between is not None:
                self.between()
        if not parts:
            return torch.empty(0, self.width, device=self.device), cursor, median
        norms_cat = torch.cat(norms_all)
        next_median = float(norms_cat.median()) if len(norms_cat) else median
        return torch.cat(parts), cursor, next_median

    def _split(self, new: Tensor, r: int) -> tuple[Tensor, Tensor]:
        g = _gen(self.seed, 611953, r)
        perm = torch.randperm(new.shape[0], generator=g).to(new.device)
        h = new.shape[0] // 2
        return new[perm[:h]], new[perm[h:]]

    def expect(self, n: int) -> None:
        """The run will ask for ``n`` vectors in all (steps x batch): the round that can serve
        the rest extracts only what is still needed (module docstring). Call before the first
        batch and before ``load_state_dict``."""
        self.budget = n

    def _start_round(self, kept: int | None = None) -> None:
        """Extract N_r; serve the kept half of N_{r-1} plus half of N_r, shuffled together (the
        last round the budget needs: all of its N_r, no more than needed). ``kept``: the size
        of the kept half when replaying a round without it (``load_state_dict``)."""
        if kept is None:
            kept = 0 if self._keep is None else self._keep.shape[0]
        self._prev_start = self._this_start
        self._this_start = [self.cursor, self.median, self.given, kept]
        # Memory: drop the spent round and each intermediate as soon as it is used, so fewer
        # round-sized copies are alive at once during a refill (values and order unchanged).
        self._served = None  # the spent round
        left = None if self.budget is None else self.budget - self.given - kept
        last = left is not None and left <= self.half and (left > 0 or kept > 0)
        new, self.cursor, self.median = self._build(self.cursor, self.median,
                                                    max(0, left) if last else self.half)
        if last:
            serve_now, keep = new, None
            self.exhausted = left > 0 and not len(new)
        elif len(new):
            serve_now, keep = self._split(new, self.round)
        else:
            serve_now, keep, self.exhausted = new, None, True
        parts = [p for p in (self._keep, serve_now) if p is not None and len(p)]
        served = torch.cat(parts) if parts else new
        del parts, serve_now, new
        self._keep = keep
        g = _gen(self.seed, 15485863, self.round)
        self._served = served[torch.randperm(served.shape[0], generator=g).to(served.device)]

    def next_batch(self, n: int) -> Tensor:
        out, need = [], n
        while need > 0:
            if self._served is None or self.offset >= self._served.shape[0]:
                if self._served is not None:
                    if self.exhausted:
                        break
                    self.round += 1
                    self.offset = 0
                self._start_round()
                if not self._served.shape[0]:
                    break
            take = min(need, self._served.shape[0] - self.offset)
            out.append(self._served[self.offset:self.offset + take])
            self.offset += take
            self.given += take
            need -= take
        if not out:
            raise StopIteration
        return torch.cat(out)

    def buffered(self) -> int:
        """Vectors already extracted and not yet served."""
        left = 0 if self._served is None else self._served.shape[0] - self.offset
        return left + (0 if self._keep is None else self._keep.shape[0])

    def drain(self) -> None:
        """Extract nothing more: the rest of the stream is what the buffer holds (for extract)."""
        if self._served is None:
            return
        rest = torch.cat([self._served[self.offset:]]
                         + ([self._keep] if self._keep is not None else []))
        g = _gen(self.seed, 32452843, self.round)
        self._served = rest[torch.randperm(rest.shape[0], generator=g).to(rest.device)]
        self.offset, self._keep, self.exhausted = 0, None, True

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "live", "round": self.round, "offset": self.offset,
                "prev_start": self._prev_start if self._served is not None else None,
                "given": self.given, "stats": self.stats.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild round r's buffer: re-extract round r-1 (for its kept half), then round r.
        A state saved before budgets (no ``given``) is replayed with full rounds, as it ran.
        The filter counts are the state's, however the replay ends (``between`` may raise to
        abandon it, after which this stream serves no more batches)."""
        r, prev, offset = int(state["round"]), state.get("prev_start"), int(state["offset"])
        if "given" not in state:
            self.budget = None
        self._keep, self._this_start, self.exhausted = None, None, False
        self.cursor, self.median, self.given = 0, None, 0
        try:
            if r > 0 and prev is not None:
                self.cursor, self.median = int(prev[0]), prev[1]
                self.round = r - 1
                if self.budget is None:
                    self._start_round()
                else:  # round r-1 as it ran: its budget decision counted what r-2 kept back
                    self.given = int(prev[2])
                    self._start_round(kept=int(prev[3]))
            self.round = r
            self.given = int(state.get("given", offset)) - offset  # served before round r
            self._start_round()
            self.offset = offset
            self.given += offset
        finally:
            self.stats = FilterStats(**state.get("stats", {}))

    def sample(self, n: int) -> Tensor:
        """The first ``n`` kept vectors of the first epoch's order (not consumed). The largest
        sample taken is kept: SAEs of a group share it."""
        if self._sample is not None and len(self._sample) >= n:
            return self._sample[:n]
        saved, self.stats = self.stats, FilterStats()  # the training stream's counts only
        parts, got, cursor = [], 0, 0
        try:
            while got < n and cursor < self.n_train_ctx:
                kept, _ = self._run(self._ctx_ids(cursor, self.batch_contexts, whole=True),
                                    None)
                parts.append(kept)
                got += kept.shape[0]
                cursor += self.batch_contexts
        finally:
            self.stats = saved
        if not parts:
            raise DataError("The corpus gave no activations to sample.")
        self._sample = torch.cat(parts)[:n]
        return self._sample

    def holdout(self) -> Tensor:
        """The held-out contexts' kept vectors (outliers judged by the current median); kept
        while the median stays, so the SAEs of a group share one extraction."""
        if not len(self.holdout_ids):
            return torch.empty(0, self.width)
        if self._holdout is not None and self._holdout[0] == self.median:
            return self._holdout[1]
        saved, self.stats = self.stats, FilterStats()  # the training stream's counts only
        try:
            parts = [self._run(self.holdout_ids[i:i + self.batch_contexts], self.median)[0]
                     for i in range(0, len(self.holdout_ids), self.batch_contexts)]
        finally:
            self.stats = saved
        self._holdout = (self.median, torch.cat(parts))
        return self._holdout[1]


class SharedExtraction:
    """One forward pass for several hooks of one model (a group's sources).

    The sources of a group visit the same contexts in the same order (one data seed), so the
    first source to ask for a batch of contexts runs the model once, stopping after the deepest
    hook (``models.extract_layers``), and the other sources' activations wait in their queues
    until they ask for the same token ids. A source (a "reader") reads one hook, or two for a
    transcoder's rows [x | y] (``for_source``); two readers may share a hook (an SAE on mlp_in
    beside a transcoder from it), each gets its own copy. A reader that asks for ids not in its
    queue drops what queued before them (batches it skipped) only when the ids are found;
    otherwise the model runs again. At most ``max_pending`` batches wait per reader.
    """

    def __init__(self, model: torch.nn.Module, hooks: list[tuple[int, str]],
                 max_pending: int = 64,
                 readers: list[tuple[tuple[int, str], ...]] | None = None) -> None:
        """``readers``: the hooks of each source, all declared before the first read (so a
        forward queues every other reader's rows); None = one reader per hook."""
        self.model, self.hooks, self.max_pending = model, list(dict.fromkeys(hooks)), max_pending
        declared = readers if readers is not None else [(h,) for h in self.hooks]
        self.pending: dict[tuple[tuple[int, str], ...], dict[bytes, Tensor]] = {
            tuple(r): {} for r in declared}
        """Per reader (its hooks), the batches waiting for it, by token ids."""
        self.forwards = 0
        """Forward passes run (a test and the bench read it)."""

    def for_hook(self, hook: tuple[int, str]) -> Callable[[Tensor], Tensor]:
        """The ``extract`` function of the source reading ``hook``."""
        return self._reader((hook,))

    def for_source(self, layer: int, hook_point: str, target_hook_point: str | None
                   ) -> Callable[[Tensor], Tensor]:
        """The ``extract`` function of a source at ``hook_point`` of block ``layer``; for a
        transcoder's, rows [x | y] with the target at ``target_hook_point`` (one forward)."""
        points = (hook_point,) if target_hook_point is None else (hook_point, target_hook_point)
        return self._reader(tuple((layer, p) for p in points))

    def _reader(self, hooks: tuple[tuple[int, str], ...]) -> Callable[[Tensor], Tensor]:
        if hooks not in self.pending:
            raise ValueError(f"reader {hooks} was not declared ({list(self.pending)})")
        return lambda ids: self.get(hooks, ids)

    def get(self, reader: tuple[tuple[int, str], ...], ids: Tensor) -> Tensor:
        """The activations of ``reader``'s hooks (concatenated) for token ids ``ids``."""
        key = ids.cpu().numpy().tobytes()
        queue = self.pending[reader]
        if key in queue:
            for old in list(queue):
                if old == key:
                    return queue.pop(old)
                del queue[old]  # a batch this reader skipped
        outputs = dict(zip(self.hooks, extract_layers(self.model, ids, self.hooks), strict=True))
        self.forwards += 1

        def rows(hooks: tuple[tuple[int, str], ...]) -> Tensor:
            parts = [outputs[h] for h in hooks]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

        for other, waiting in self.pending.items():
            if other != reader:
                waiting[key] = rows(other)
                while len(waiting) > self.max_pending:
                    del waiting[next(iter(waiting))]
        return rows(reader)
