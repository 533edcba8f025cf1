"""Models and datasets: add, prepare (inline), validate, delete."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from worker import jobs
from worker.db import SCHEMA_VERSION, Dataset, LanguageModel, db, init_db


def test_web_imports_no_torch() -> None:
    code = (
        "import sys, tempfile, os\n"
        "os.environ['SAE_STUDIO_DATA'] = tempfile.mkdtemp()\n"
        "import worker.jobs as jobs, worker.tasks, worker.progress, worker.settings\n"
        "from worker.db import init_db\n"
        "from worker import settings\n"
        "init_db(settings.app_db_path())\n"
        "jobs.estimate(None, {}); jobs.health(); jobs.training_defaults(None)\n"
        "jobs.form_options(); jobs.interrupt_running(); jobs.list_trainings()\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr


def test_add_model_ready(model: LanguageModel) -> None:
    m = jobs.get_model(model.id)
    assert (m.status, m.n_layers, m.hidden_dim) == ("ready", 6, 384)
    assert m.name == "minilm-l6" and m.source == "minilm-l6"
    assert m.architecture and m.model_type == "bert" and m.is_causal is False
    assert m.vocab_size > 1000 and m.n_params > 1_000_000 and m.dtype == "float32"
    assert "residual" in m.hook_points and Path(m.path).is_dir()
    assert m.max_positions == 512  # MiniLM's max_position_embeddings
    d = jobs.model_as_dict(m)
    assert d["hidden_dim"] == 384 and d["progress"] == 1.0 and d["max_positions"] == 512
    assert [x.id for x in jobs.list_models()] == [m.id]


def test_add_model_errors(data_dir: Path) -> None:
    m = jobs.add_model("no-such-org/no-such-model-xyz", name="Nope")
    assert m.status == "failed" and m.name == "Nope"
    assert m.error and m.error.endswith(".") and "no-such-model-xyz" in m.error
    with pytest.raises(jobs.Invalid) as exc:
        jobs.add_model("  ")
    assert exc.value.status == 422 and "source" in exc.value.errors
    with pytest.raises(jobs.NotFound, match="Model 999 does not exist."):
        jobs.get_model(999)
    with pytest.raises(jobs.NotFound):
        jobs.get_model("abc")
    jobs.delete_model(m.id)
    assert LanguageModel.select().count() == 0


def test_dataset_kjv_without_model(data_dir: Path) -> None:
    d = jobs.add_dataset("KJV", context_size="64", max_tokens="4096")
    assert d.status == "ready", d.error
    assert d.source == "kjv" and d.n_documents == 31102 and d.n_tokens is None
    assert d.message == "tokenised when a training starts" and len(d.samples) == 3


def test_dataset_kjv_tokenised(dataset: Dataset, data_dir: Path) -> None:
    assert dataset.n_tokens == 16384 and len(dataset.samples) == 3
    assert dataset.context_size == 64 and dataset.max_tokens == 16384
    assert any((data_dir / "tokens").iterdir())  # where a training finds it


def test_dataset_upload_txt(data_dir: Path) -> None:
    text = "\n".join(f"Line number {i} of a small uploaded corpus." for i in range(50))
    d = jobs.add_dataset(None, upload=("my corpus.txt", io.BytesIO(text.encode())))
    assert d.status == "ready", d.error
    assert d.name == "my corpus.txt" and d.n_documents == 50
    path = Path(d.source)
    assert path.parent == data_dir / "uploads" and path.name.endswith("-my_corpus.txt")
    jobs.delete_dataset(d.id)
    assert not path.exists() and Dataset.select().count() == 0


def test_dataset_validation(data_dir: Path) -> None:
    cases = [
        (dict(source=None), "source"),
        (dict(source="kjv", context_size="abc"), "context_size"),
        (dict(source="kjv", context_size="1"), "context_size"),
        (dict(source="kjv", context_size="200000"), "context_size"),
        (dict(source="kjv", context_size="128", max_tokens="100"), "max_tokens"),
        (dict(source="./missing/corpus.txt"), "source"),
        (dict(source=None, upload=("notes.pdf", io.BytesIO(b"x"))), "upload"),
        (dict(source=None, upload=("empty.txt", io.BytesIO(b""))), "upload"),
    ]
    for kwargs, field in cases:
        source = kwargs.pop("source")
        with pytest.raises(jobs.Invalid) as exc:
            jobs.add_dataset(source, **kwargs)
        assert field in exc.value.errors, (kwargs, exc.value.errors)
        assert exc.value.errors[field].endswith(".")
    assert Dataset.select().count() == 0
    assert not any((data_dir / "uploads").glob("*")) if (data_dir / "uploads").exists() else True


def test_dataset_fields_are_named_and_bounded_as_their_options(enqueued: list) -> None:
    """The add form's labels and help come from the options registry, and the errors name the
    fields the same way, with the same bounds: one source for both."""
    from worker.engine.config import option

    fields = jobs.datasets.form_fields()
    ctx, corpus = option("context_size"), option("max_tokens")
    assert fields["context_size"] == {
        "label": "Context size",
        "help": f"Tokens per context when the corpus is tokenised. Between {ctx.min:,} and "
                f"{ctx.max:,} tokens."}
    assert fields["max_tokens"]["label"] == corpus.label == "Corpus tokens"
    assert fields["max_tokens"]["help"].endswith("At least the context size.")
    cases = {("1", None): ("context_size", f"between {ctx.min:,} and {ctx.max:,}"),
             (str(ctx.max + 1), None): ("context_size", f"between {ctx.min:,} and {ctx.max:,}"),
             ("128", "abc"): ("max_tokens", "must be a whole number (got 'abc')"),
             ("128", "100"): ("max_tokens", "at least the context size (128; got 100)")}
    for (context_size, max_tokens), (field, words) in cases.items():
        with pytest.raises(jobs.Invalid) as exc:
            jobs.add_dataset("kjv", context_size=context_size, max_tokens=max_tokens)
        message = exc.value.errors[field]
        assert message.startswith(fields[field]["label"] + " ") and words in message, message
    # what the help promises is accepted: the option's largest context, the smallest corpus
    d = jobs.add_dataset("kjv", context_size=str(ctx.max), max_tokens=str(ctx.max))
    assert (d.context_size, d.max_tokens) == (ctx.max, ctx.max)
    assert enqueued == [("prepare_dataset", (d.id,))]


def test_dataset_counts_the_corpus_and_the_tokenised_documents(dataset: Dataset,
                                                               data_dir: Path) -> None:
    """max_tokens stops the token store early: the row keeps the corpus's document count and
    says how many documents the store holds (its meta.json's n_documents)."""
    import json

    metas = [json.loads(m.read_text()) for m in (data_dir / "tokens").glob("*/meta.json")]
    assert len(metas) == 1 and metas[0]["reached_max_tokens"] is True
    d = jobs.get_dataset(dataset.id)
    assert d.n_documents == 31102  # the whole corpus
    assert 0 < d.n_documents_tokenised == metas[0]["n_documents"] < 1000
    assert d.n_tokens == metas[0]["n_tokens"] == 16384
    data = jobs.dataset_as_dict(d)
    assert (data["n_documents"], data["n_documents_tokenised"]) == (31102, d.n_documents_tokenised)
    model = jobs.list_models()[0]  # the store names the folder its tokenizer came from: the model's
    assert data["tokenised_with"] == [{"model_id": model.id, "model": "minilm-l6",
                                       "n_tokens": 16384,
                                       "n_documents": d.n_documents_tokenised}]
    jobs.delete_model(jobs.list_models()[0].id)  # no ready model: counted, not tokenised
    untokenised = jobs.add_dataset("kjv", context_size="32", max_tokens="4096")
    assert untokenised.status == "ready", untokenised.error
    assert (untokenised.n_documents, untokenised.n_documents_tokenised) == (31102, None)


def test_hub_dataset_fails_offline(data_dir: Path) -> None:
    d = jobs.add_dataset("no-such-user/no-such-dataset-xyz")
    assert d.status == "failed" and d.error
    with pytest.raises(jobs.NotFound, match="Dataset 999 does not exist."):
        jobs.get_dataset(999)


def test_schema_v2_renames_error_to_failed(data_dir: Path) -> None:
    """Databases from before schema 2 kept failed models and datasets as ``error``."""
    with db.connection_context():
        m = LanguageModel.create(name="old", source="old", status="error", error="Gone.")
        d = Dataset.create(name="old", source="old", status="error", error="Gone.")
        ok = LanguageModel.create(name="fine", source="fine", status="ready")
        db.execute_sql("PRAGMA user_version = 1")
    init_db(data_dir / "app.db")
    assert [jobs.get_model(m.id).status, jobs.get_dataset(d.id).status] == ["failed", "failed"]
    assert jobs.get_model(ok.id).status == "ready" and jobs.get_model(m.id).error == "Gone."
    with db.connection_context():
        assert db.execute_sql("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 13


def test_schema_v8_adds_mlp_in_where_the_model_has_an_mlp(data_dir: Path) -> None:
    """Models registered before the mlp_in hook point (transcoders' input) gain it next to
    mlp_out; a model without an MLP output, or one that lists it already, is left alone."""
    with db.connection_context():
        old = LanguageModel.create(name="old", source="old", status="ready",
                                   hook_points=["residual", "mlp_out", "attn_out"])
        no_mlp = LanguageModel.create(name="x", source="x", status="ready",
                                      hook_points=["residual", "attn_out"])
        new = LanguageModel.create(name="new", source="new", status="ready",
                                   hook_points=["residual", "mlp_in", "mlp_out"])
        db.execute_sql("PRAGMA user_version = 7")
    init_db(data_dir / "app.db")
    assert jobs.get_model(old.id).hook_points == ["residual", "mlp_out", "attn_out", "mlp_in"]
    assert jobs.get_model(no_mlp.id).hook_points == ["residual", "attn_out"]
    assert jobs.get_model(new.id).hook_points == ["residual", "mlp_in", "mlp_out"]


def test_schema_v10_adds_the_preparing_worker(data_dir: Path) -> None:
    """Databases from before schema 10 have no ``worker`` on models and datasets: it is added
    (empty), the rows keep their values."""
    with db.connection_context():
        m = LanguageModel.create(name="m", source="m", status="preparing", progress=0.3)
        d = Dataset.create(name="d", source="d", status="ready")
        for table in ("language_model", "dataset"):
            db.execute_sql(f"ALTER TABLE {table} DROP COLUMN worker")
        db.execute_sql("PRAGMA user_version = 9")
    init_db(data_dir / "app.db")
    with db.connection_context():
        for table in ("language_model", "dataset"):
            assert "worker" in {c.name for c in db.get_columns(table)}
    m, d = jobs.get_model(m.id), jobs.get_dataset(d.id)
    assert (m.status, m.progress, m.worker) == ("preparing", 0.3, None)
    assert (d.status, d.worker) == ("ready", None)


def test_schemas_11_and_12_add_the_document_and_position_counts(data_dir: Path) -> None:
    """A database from schema 10 has neither ``n_documents_tokenised`` on datasets (11) nor
    ``max_positions`` on models (12): both are added, null (the pages show the corpus's count
    alone; the context is checked when the training loads the model), the rows keep their
    values."""
    with db.connection_context():
        d = Dataset.create(name="d", source="kjv", status="ready", n_documents=31102,
                           n_tokens=200_000)
        m = LanguageModel.create(name="m", source="minilm-l6", status="ready", n_layers=6)
        db.execute_sql("ALTER TABLE dataset DROP COLUMN n_documents_tokenised")
        db.execute_sql("ALTER TABLE language_model DROP COLUMN max_positions")
        db.execute_sql("PRAGMA user_version = 10")
    init_db(data_dir / "app.db")
    with db.connection_context():
        assert "n_documents_tokenised" in {c.name for c in db.get_columns("dataset")}
        assert "max_positions" in {c.name for c in db.get_columns("language_model")}
        assert db.execute_sql("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    d, m = jobs.get_dataset(d.id), jobs.get_model(m.id)
    assert (d.n_documents, d.n_documents_tokenised, d.n_tokens) == (31102, None, 200_000)
    assert (m.n_layers, m.max_positions) == (6, None)


def test_same_source_added_twice_is_named_apart(enqueued: list) -> None:
    """Two rows of the same corpus (or model) are told apart by their names."""
    names = [jobs.add_dataset("kjv", context_size=64).name for _ in range(3)]
    assert names == ["kjv", "kjv (2)", "kjv (3)"]
    assert jobs.add_dataset("kjv", name="bible").name == "bible"
    assert [jobs.add_model("minilm-l6").name for _ in range(2)] == ["minilm-l6", "minilm-l6 (2)"]
