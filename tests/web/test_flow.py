"""End to end through the HTTP API with Huey in immediate mode: the tasks run the real engine
inline on the bundled minilm-l6 and kjv (small settings)."""

from __future__ import annotations

import io
import zipfile

from ..html import ids
from .conftest import JSON
from .test_trainings import FAST


def test_add_model_dataset_train_export(client):
    m = client.post("/models", data={"source": "minilm-l6"}, headers=JSON)
    assert m.status_code == 201 and m.get_json()["status"] == "ready", m.get_json()
    model = m.get_json()
    assert model["n_layers"] == 6 and model["hidden_dim"] == 384 and model["hook_points"]
    d = client.post("/datasets", data={"source": "kjv", "context_size": "64",
                                       "max_tokens": "16384"}, headers=JSON)
    assert d.status_code == 201 and d.get_json()["status"] == "ready", d.get_json()
    r = client.post("/trainings", data={"model_id": str(model["id"]),
                                        "dataset_id": str(d.get_json()["id"]), **FAST},
                    headers=JSON)
    assert r.status_code == 201, r.get_json()
    tid = r.get_json()["id"]
    t = client.get(f"/trainings/{tid}", headers=JSON).get_json()
    assert t["status"] == "completed", t["error"]
    assert t["current_step"] == 20 and t["latest"]["loss"] is not None
    rows = client.get(f"/trainings/{tid}/metrics", headers=JSON).get_json()["rows"]
    assert [r["step"] for r in rows][-1] == 20
    ckpts = client.get(f"/trainings/{tid}/checkpoints", headers=JSON).get_json()["items"]
    assert ckpts and client.get(ckpts[0]["download_url"]).status_code == 200
    z = client.get(f"/trainings/{tid}/export")
    assert z.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(z.data)).namelist()
    assert any(n.endswith("cfg.json") for n in names), names
    page = client.get("/").data.decode()
    assert f"training-{tid}-charts" in ids(page) and "badge-completed" in page
    assert "Download SAELens export" in page
