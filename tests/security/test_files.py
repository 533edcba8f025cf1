"""Local files: a dataset or model path is accepted only under an allowed root (the uploads
folder, the model cache, ``$SAE_STUDIO_ALLOWED_PATHS``), with one answer for every refused path;
bounds on ids, sizes, names and sources; a dataset's token stores go with it; the start-up sweep
of temporary files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from worker import jobs, settings
from worker.jobs.common import OUTSIDE_ROOTS
from worker.tasks import sweep_temporary_files

JSON = {"Accept": "application/json"}


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside every allowed root, with a readable corpus and a model-like folder."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.txt").write_text("the secret text\n\nmore secret text\n")
    (folder / "secret.csv").write_text("password,user\nhunter2,alice\n")
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text("{}")
    return folder


def post_dataset(client: FlaskClient, source: str, **form: str) -> Any:
    return client.post("/datasets", data={"source": source, **form}, headers=JSON)


def test_paths_outside_the_roots_get_one_answer_whether_they_exist_or_not(
        client: FlaskClient, data_dir: Path, outside: Path, enqueued: list[Any]) -> None:
    uploads = settings.uploads_dir()
    uploads.mkdir(parents=True)
    (uploads / "link.txt").symlink_to(outside / "secret.txt")
    climb = "../" * len(uploads.parts) + str(outside / "secret.txt").lstrip("/")
    refused = [str(outside / "secret.txt"), str(outside / "secret.csv"),
               str(outside / "missing.txt"), str(outside / "app.db"), str(outside),
               str(uploads / "link.txt"), str(uploads / ".." / ".." / "secret.txt"),
               f"{uploads}/{climb}", "/etc/passwd", "~/nothing.jsonl"]
    answers = set()
    for source in refused:
        response = post_dataset(client, source)
        assert response.status_code == 422, source
        answers.add(response.get_json()["errors"]["source"])
        assert "secret" not in response.get_data(as_text=True).replace(source, "")
    for source in (str(outside / "model"), str(outside / "nothing"), "../../etc"):
        response = client.post("/models", data={"source": source}, headers=JSON)
        assert response.status_code == 422, source
        answers.add(response.get_json()["errors"]["source"])
    assert answers == {OUTSIDE_ROOTS}
    assert enqueued == []


def test_names_that_are_not_paths_are_never_looked_up_on_disk(
        client: FlaskClient, tmp_path: Path, enqueued: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundled name or Hub id (``org/name``) gets one answer whether or not something of that
    name exists where the server runs (no existence oracle); the worker reads such names in its
    own empty folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "org" / "model" / "config.json").write_text("{}")
    (tmp_path / "org" / "corpus").write_text("secret")
    answers = []
    for source in ("org/model", "org/missing", "org/corpus", "org/nothing"):
        for route in ("/models", "/datasets"):
            response = client.post(route, data={"source": source}, headers=JSON)
            answers.append((response.status_code, response.get_json()["source"]))
    assert {code for code, _ in answers} == {201}
    assert [s for _, s in answers] == [s for s in ("org/model", "org/missing", "org/corpus",
                                                   "org/nothing") for _ in range(2)]
    assert settings.work_dir() == settings.data_dir() / "worker"


def test_an_allowed_root_and_the_uploads_folder_work(
        client: FlaskClient, data_dir: Path, outside: Path, enqueued: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_STUDIO_ALLOWED_PATHS", f"/nonexistent-root:{outside}")
    response = post_dataset(client, str(outside / "secret.txt"))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["source"] == str((outside / "secret.txt").resolve())
    response = client.post("/models", data={"source": str(outside / "model")}, headers=JSON)
    assert response.status_code == 201, response.get_json()
    upload = settings.uploads_dir() / "corpus.jsonl"
    upload.parent.mkdir(parents=True)
    upload.write_text('{"text": "hello"}\n')
    assert post_dataset(client, str(upload)).status_code == 201
    assert post_dataset(client, "kjv").status_code == 201
    assert client.post("/models", data={"source": "minilm-l6"}, headers=JSON).status_code == 201
    assert client.post("/models", data={"source": "org/model"}, headers=JSON).status_code == 201
    assert [name for name, _ in enqueued].count("prepare_dataset") == 3


def test_a_link_swapped_in_after_adding_is_not_read(
        client: FlaskClient, data_dir: Path, outside: Path, enqueued: list[Any],
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A file is checked when it is added; a link put in its place (or in place of a folder
    on its way) inside the allowed folder afterwards is refused by the worker before it reads
    it. A link above the allowed folder (a shared mount reached through one) is fine."""
    from worker.engine.errors import DataError
    from worker.tasks import prepare_dataset, unchanged_path

    real = tmp_path_factory.mktemp("real")
    (real / "sub").mkdir()
    (real / "sub" / "corpus.txt").write_text("In the beginning.\n\nAnd the earth.\n")
    mount = tmp_path_factory.mktemp("mount") / "allowed"
    mount.symlink_to(real)  # the allowed folder, named through a link
    monkeypatch.setenv("SAE_STUDIO_ALLOWED_PATHS", str(mount))
    response = post_dataset(client, str(mount / "sub" / "corpus.txt"))
    assert response.status_code == 201, response.get_json()
    stored = response.get_json()["source"]
    assert stored == str(real / "sub" / "corpus.txt")  # resolved when added
    unchanged_path(stored)
    unchanged_path(str(mount / "sub" / "corpus.txt"))  # as another machine's mount names it
    unchanged_path("kjv")

    (real / "sub" / "corpus.txt").unlink()
    (real / "sub" / "corpus.txt").symlink_to(outside / "secret.txt")
    for source in (stored, str(mount / "sub" / "corpus.txt")):
        with pytest.raises(DataError, match="has been replaced by a link"):
            unchanged_path(source)
    prepare_dataset.call_local(response.get_json()["id"])
    row = jobs.get_dataset(response.get_json()["id"])
    assert row.status == "failed" and "replaced by a link" in row.error
    # the worker's log says it in one line: an explained refusal, not a crash with a traceback
    (record,) = [r for r in caplog.records if "replaced by a link" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert not any("secret" in s for s in row.samples or [])

    (real / "sub" / "corpus.txt").unlink()  # a folder on the way swapped for a link
    (real / "sub").rename(real / "old")
    (real / "sub").symlink_to(outside)
    (outside / "corpus.txt").write_text("the secret text\n")
    with pytest.raises(DataError, match="has been replaced by a link"):
        unchanged_path(stored)


@pytest.mark.parametrize("path", ["/models/{}", "/datasets/{}", "/trainings/{}",
                                  "/trainings/{}/metrics", "/checkpoints/{}/download"])
@pytest.mark.parametrize("row_id", [2**63, 99999999999999999999, int("9" * 400)])
def test_huge_ids_are_not_found(client: FlaskClient, path: str, row_id: int) -> None:
    response = client.get(path.format(row_id), headers=JSON)
    assert response.status_code == 404
    assert "does not exist" in response.get_json()["error"]


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "1e20"), ("max_tokens", "9" * 400), ("context_size", "9" * 400),
    ("context_size", "1e400"), ("name", "n" * 201), ("source", "s" * 1001)])
def test_absurd_dataset_values_are_refused(client: FlaskClient, field: str, value: str,
                                           enqueued: list[Any]) -> None:
    response = client.post("/datasets", data={"source": "kjv", field: value}, headers=JSON)
    assert response.status_code == 422
    assert field in response.get_json()["errors"]
    assert len(response.get_data()) < 2000
    assert enqueued == []


def test_absurd_model_names_and_sources_are_refused(client: FlaskClient,
                                                    enqueued: list[Any]) -> None:
    for form in ({"source": "minilm-l6", "name": "n" * 10**6}, {"source": "s" * 1001}):
        response = client.post("/models", data=form, headers=JSON)
        assert response.status_code == 422
    assert enqueued == []


def test_a_dataset_with_a_300_character_source_is_deleted(client: FlaskClient,
                                                          enqueued: list[Any]) -> None:
    created = post_dataset(client, "x" * 300)
    assert created.status_code == 201
    response = client.delete(f"/datasets/{created.get_json()['id']}", headers=JSON)
    assert response.status_code == 200


def _store(source: str, name: str) -> Path:
    folder = settings.tokens_dir() / name
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"source": source, "n_tokens": 64}))
    (folder / "tokens.bin").write_bytes(b"\0" * 256)
    return folder


def test_deleting_a_dataset_deletes_its_token_stores_once_no_dataset_uses_them(
        data_dir: Path, enqueued: list[Any]) -> None:
    first = jobs.add_dataset("kjv", context_size="64")
    second = jobs.add_dataset("kjv", context_size="128")
    other = jobs.add_dataset("org/corpus")
    kjv_stores = [_store("kjv", "kjv-ctx64-a"), _store("kjv", "kjv-ctx128-b")]
    other_store = _store("org/corpus", "corpus-ctx128-c")
    jobs.delete_dataset(first.id)
    assert all(s.is_dir() for s in kjv_stores)  # the second dataset still uses them
    jobs.delete_dataset(second.id)
    assert not any(s.exists() for s in kjv_stores)
    assert other_store.is_dir()
    jobs.delete_dataset(other.id)
    assert not other_store.exists()


def test_the_start_up_sweep_removes_only_temporary_files(data_dir: Path) -> None:
    run = data_dir / "trainings" / "3" / "checkpoints"
    run.mkdir(parents=True)
    keep = [run / "step-10.safetensors", data_dir / "uploads" / "notes.tmp",
            data_dir / "tokens" / "kjv-ctx64-a" / "meta.json"]
    orphans = [run / ".step-20.safetensors.k3j2.tmp", run / ".acts.safetensors.x1.raw",
               data_dir / "tokens" / ".kjv-ctx64-a.tmp-abc", data_dir / "trainings" / "3"
               / ".saelens.tmp-old-xyz"]
    for path in keep + orphans[:2]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for folder in orphans[2:]:
        (folder / "inner").mkdir(parents=True)
        (folder / "inner" / "part.bin").write_bytes(b"x")
    assert sweep_temporary_files(data_dir) == 4
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in orphans)
