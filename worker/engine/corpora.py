"""Packed token stores: a corpus tokenised once into fixed-length contexts on disk.

The documents come from ``documents.read_source`` (bundled corpus, local file or Hugging Face
dataset; see ``worker/engine/documents.py``, whose public names this module re-exports).

Token store policy (also written to ``meta["policy"]``):

* ``bos_id`` is ``tokenizer.bos_token_id``, else ``tokenizer.cls_token_id``, else none;
  ``sep_id`` is ``tokenizer.eos_token_id``, else ``tokenizer.sep_token_id``, else none.
* Documents are tokenised without special tokens (``add_special_tokens=False``) and concatenated
  into one stream with ``sep_id`` between consecutive documents (not before the first one).
* The stream is cut into contexts of ``context_size`` tokens. When there is a ``bos_id`` every
  context is ``[bos_id] + the next context_size - 1 stream tokens`` (BOS counts towards
  ``context_size``); otherwise a context is ``context_size`` stream tokens. Documents run on across
  context boundaries, so a context may start mid-document or with the separator.
* The final partial context is dropped. With ``max_tokens`` at most
  ``max_tokens // context_size`` contexts are stored and reading stops once they are full.
* ``n_documents`` in the meta counts documents with at least one token in the stored contexts;
  ``n_documents_read`` counts all documents read from the source.

On disk a store is a folder with ``tokens.bin`` (int32 token ids, C order,
``[n_contexts, context_size]``) and ``meta.json``. It is built in a hidden temporary folder next to
``out_dir`` and swapped into place at the end (``files.replace_folder``), so ``out_dir`` is either
absent, the previous store, or the complete new store.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .documents import (
    BUNDLED_CORPORA,
    TXT_MODES,
    count_documents,
    detect_txt_mode,
    iter_documents,
    read_source,
)
from .errors import ConfigError, DataError
from .files import replace_folder

__all__ = [
    "BUNDLED_CORPORA",
    "TXT_MODES",
    "TokenStore",
    "build_token_store",
    "count_documents",
    "detect_txt_mode",
    "iter_documents",
]

_META_FILE = "meta.json"
_TOKENS_FILE = "tokens.bin"
_FORMAT_VERSION = 1

POLICY = (
    "Each context starts with bos_id (tokenizer.bos_token_id, else cls_token_id, else no BOS) "
    "and BOS counts towards context_size. Documents are tokenised with add_special_tokens=False "
    "and concatenated with sep_id (eos_token_id, else sep_token_id, else no separator) between "
    "consecutive documents; the stream is cut into windows of context_size minus one "
    "(or context_size without BOS) tokens, documents run on across windows, and the final "
    "partial window is dropped."
)

ProgressFn = Callable[[float, str], None]


def _meta_int(meta: dict, key: str, where: Path, *, minimum: int = 0,
              optional: bool = False) -> int | None:
    value = meta.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"The token store {where} is corrupt: meta.json field {key!r} is "
                        f"{value!r}; rebuild the token store.")
    return value


@dataclass
class TokenStore:
    """A packed token store on disk: ``contexts`` is a read-only int32 memmap
    ``[n_contexts, context_size]`` and ``meta`` the content of ``meta.json``."""

    path: Path
    contexts: np.ndarray = field(repr=False)
    meta: dict = field(repr=False)

    @classmethod
    def open(cls, path: Path | str) -> TokenStore:
        path = Path(path)
        meta_path = path / _META_FILE
        tokens_path = path / _TOKENS_FILE
        if not meta_path.is_file():
            raise DataError(f"There is no token store at {path} ({_META_FILE} is missing); "
                            "build one first.")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"The token store {path} is corrupt: {_META_FILE} cannot be read "
                            f"({exc}); rebuild the token store.") from None
        if not isinstance(meta, dict):
            raise DataError(f"The token store {path} is corrupt: {_META_FILE} is not a JSON "
                            "object; rebuild the token store.")
        n_contexts = _meta_int(meta, "n_contexts", path, minimum=1)
        context_size = _meta_int(meta, "context_size", path, minimum=1)
        n_tokens = _meta_int(meta, "n_tokens", path, minimum=1)
        _meta_int(meta, "n_documents", path)
        _meta_int(meta, "bos_id", path, optional=True)
        if n_tokens != n_contexts * context_size:
            raise DataError(f"The token store {path} is corrupt: n_tokens ({n_tokens}) is not "
                            f"n_contexts x context_size ({n_contexts} x {context_size}); "
                            "rebuild the token store.")
        specials = meta.get("special_ids", [])
        if not isinstance(specials, list) or not all(isinstance(i, int) for i in specials):
            raise DataError(f"The token store {path} is corrupt: special_ids is {specials!r}; "
                            "rebuild the token store.")
        if meta.get("dtype", "int32") != "int32":
            raise DataError(f"The token store {path} has dtype {meta.get('dtype')!r}, but only "
                            "int32 is supported; rebuild the token store.")
        if not tokens_path.is_file():
            raise DataError(f"The token store {path} is corrupt: {_TOKENS_FILE} is missing; "
                            "rebuild the token store.")
        expected = n_tokens * 4
        actual = tokens_path.stat().st_size
        if actual != expected:
            raise DataError(f"The token store {path} is corrupt: {_TOKENS_FILE} has {actual:,} "
                            f"bytes but meta.json says {n_contexts:,} x {context_size} int32 "
                            f"tokens ({expected:,} bytes); rebuild the token store.")
        contexts = np.memmap(tokens_path, dtype=np.int32, mode="r",
                             shape=(n_contexts, context_size))
        return cls(path=path, contexts=contexts, meta=meta)

    @property
    def n_contexts(self) -> int:
        return int(self.contexts.shape[0])

    @property
    def context_size(self) -> int:
        return int(self.contexts.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.contexts.shape[0] * self.contexts.shape[1])

    @property
    def n_documents(self) -> int:
        return int(self.meta.get("n_documents", 0))

    @property
    def bos_id(self) -> int | None:
        return self.meta.get("bos_id")

    @property
    def sep_id(self) -> int | None:
        return self.meta.get("sep_id")

    @property
    def special_ids(self) -> list[int]:
        return list(self.meta.get("special_ids", []))

    def decode_samples(self, tokenizer, n: int = 3) -> list[str]:
        """Decode ``n`` contexts spread evenly over the store (first and last included), with
        special tokens kept so the BOS / separator policy is visible."""
        if n <= 0:
            return []
        n = min(n, self.n_contexts)
        idx = sorted({round(i) for i in np.linspace(0, self.n_contexts - 1, n)})
        return [tokenizer.decode(self.contexts[i].tolist(), skip_special_tokens=False)
                for i in idx]


def _tokenize(tokenizer, docs: list[str]) -> list[list[int]]:
    out = tokenizer(docs, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    return out["input_ids"]


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"The token store path {out_dir} is a file; choose a folder path.")
    if out_dir.is_dir():
        entries = {p.name for p in out_dir.iterdir()}
        if entries and _META_FILE not in entries:
            raise ConfigError(f"The folder {out_dir} exists and is not a token store; choose "
                              "a new or empty folder so nothing is overwritten.")


@dataclass
class _Packed:
    """What ``_pack`` wrote: counts for ``meta.json``."""

    n_contexts: int = 0
    n_read: int = 0  # documents read from the source
    n_docs: int = 0  # documents with at least one token in a stored context
    n_stream: int = 0  # body tokens produced (documents + separators)
    reached_max: bool = False  # stopped at max_contexts


def _pack(docs: Iterator[tuple[str, float | None]], tokenizer, fh: BinaryIO, *,
          context_size: int, bos_id: int | None, sep_id: int | None, max_contexts: int | None,
          batch_docs: int, progress: ProgressFn | None) -> _Packed:
    """Tokenise ``docs`` ``batch_docs`` at a time and write their full contexts to ``fh`` as
    int32 rows of ``context_size`` tokens, following the policy of the module docstring."""
    out = _Packed()
    body = context_size - (1 if bos_id is not None else 0)
    pending: np.ndarray = np.zeros(0, dtype=np.int64)  # starts of docs not yet stored
    carry = np.zeros(0, dtype=np.int32)
    src_frac = 0.0
    bos_col = (np.full((1, 1), bos_id, dtype=np.int32) if bos_id is not None else None)
    if progress is not None:
        progress(0.0, "Tokenising...")
    while not out.reached_max:
        batch: list[str] = []
        for text, frac in itertools.islice(docs, batch_docs):
            batch.append(text)
            if frac is not None:
                src_frac = frac
        if not batch:
            break
        out.n_read += len(batch)
        ids = [x for x in _tokenize(tokenizer, batch) if x]
        if ids:
            lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            if sep_id is not None:
                # a separator precedes every document except the very first one
                first = out.n_stream == 0
                lens_sep = lens + 1
                if first:
                    lens_sep[0] -= 1
                starts = out.n_stream + np.concatenate(([0], np.cumsum(lens_sep)[:-1]))
                starts = starts + (lens_sep - lens)  # first token after the separator
                sep = [sep_id]
                flat = itertools.chain.from_iterable(
                    x if (first and i == 0) else itertools.chain(sep, x)
                    for i, x in enumerate(ids))
                total = int(lens_sep.sum())
            else:
                starts = out.n_stream + np.concatenate(([0], np.cumsum(lens)[:-1]))
                flat = itertools.chain.from_iterable(ids)
                total = int(lens.sum())
            new = np.fromiter(flat, dtype=np.int32, count=total)
            out.n_stream += total
            pending = np.concatenate((pending, starts))
            carry = np.concatenate((carry, new)) if carry.size else new
            n_full = carry.size // body
            if max_contexts is not None and n_full >= max_contexts - out.n_contexts:
                n_full = max_contexts - out.n_contexts
                out.reached_max = True
            if n_full:
                block = carry[: n_full * body].reshape(n_full, body)
                if bos_col is not None:
                    block = np.concatenate(
                        (np.broadcast_to(bos_col, (n_full, 1)), block), axis=1)
                fh.write(np.ascontiguousarray(block, dtype=np.int32).tobytes())
                out.n_contexts += n_full
                carry = carry[n_full * body:].copy()
                stored_end = out.n_stream - carry.size
                k = int(np.searchsorted(pending, stored_end, side="left"))
                out.n_docs += k
                pending = pending[k:]
        if progress is not None:
            frac = src_frac
            if max_contexts:
                frac = max(frac, out.n_contexts / max_contexts)
            progress(min(frac, 1.0) if not out.reached_max else 1.0,
                     f"{out.n_read:,} documents read, {out.n_contexts * context_size:,} "
                     "tokens stored")
    return out


def build_token_store(
    source: str,
    tokenizer,
    out_dir: Path | str,
    *,
    context_size: int = 128,
    max_tokens: int | None = None,
    text_field: str = "text",
    txt_mode: str = "auto",
    column: str | None = None,
    batch_docs: int = 1000,
    progress: ProgressFn | None = None,
) -> TokenStore:
    """Tokenise ``source`` with ``tokenizer`` and pack it into a token store at ``out_dir``
    following the policy in the module docstring. Returns the opened store.

    An existing token store (or empty folder) at ``out_dir`` is replaced only once the new one
    is complete; any other existing folder is refused with ``ConfigError``.
    """
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 2:
        raise ConfigError(f"context_size must be an integer of at least 2, not {context_size!r}.")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < context_size):
        raise ConfigError(f"max_tokens must be at least context_size ({context_size}) or None, "
                          f"not {max_tokens!r}.")
    if isinstance(batch_docs, bool) or not isinstance(batch_docs, int) or batch_docs < 1:
        raise ConfigError(f"batch_docs must be a positive integer, not {batch_docs!r}.")
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir)

    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        bos_id = getattr(tokenizer, "cls_token_id", None)
    sep_id = tokenizer.eos_token_id
    if sep_id is None:
        sep_id = getattr(tokenizer, "sep_token_id", None)
    max_contexts = None if max_tokens is None else max_tokens // context_size

    docs = read_source(source, text_field=text_field, txt_mode=txt_mode, column=column,
                       split="train")
    t0 = time.monotonic()
    try:
        with replace_folder(out_dir) as tmp:
            with open(tmp / _TOKENS_FILE, "wb") as fh:
                packed = _pack(docs, tokenizer, fh, context_size=context_size, bos_id=bos_id,
                               sep_id=sep_id, max_contexts=max_contexts, batch_docs=batch_docs,
                               progress=progress)
                fh.flush()
                os.fsync(fh.fileno())
            if packed.n_read == 0:
                raise DataError(f"The corpus {source!r} contains no documents (no non-empty "
                                "text); check the file, text_field / column and txt_mode.")
            if packed.n_contexts == 0:
                raise DataError(
                    f"The corpus {source!r} has only {packed.n_stream:,} tokens, fewer than one "
                    f"context of {context_size}; use a smaller context_size or a larger corpus."
                )
            meta = {
                "format_version": _FORMAT_VERSION,
                "dtype": "int32",
                "n_contexts": packed.n_contexts,
                "context_size": context_size,
                "n_tokens": packed.n_contexts * context_size,
                "n_documents": packed.n_docs,
                "n_documents_read": packed.n_read,
                "reached_max_tokens": packed.reached_max,
                "max_tokens": max_tokens,
                "bos_id": None if bos_id is None else int(bos_id),
                "sep_id": None if sep_id is None else int(sep_id),
                "special_ids": [int(i) for i in getattr(tokenizer, "all_special_ids", [])],
                "vocab_size": len(tokenizer),
                "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
                "source": os.fspath(source) if isinstance(source, os.PathLike) else source,
                "text_field": column if column is not None else text_field,
                "txt_mode": txt_mode,
                "policy": POLICY,
                "build_seconds": round(time.monotonic() - t0, 3),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            with open(tmp / _META_FILE, "w", encoding="utf-8") as mf:
                json.dump(meta, mf, indent=2)
                mf.flush()
                os.fsync(mf.fileno())
            _check_out_dir(out_dir)  # it may have changed while the store was built
    finally:
        close = getattr(docs, "close", None)
        if close is not None:
            close()
    if progress is not None:
        progress(1.0, f"Done: {packed.n_contexts:,} contexts of {context_size} tokens from "
                      f"{packed.n_docs:,} documents.")
    return TokenStore.open(out_dir)
