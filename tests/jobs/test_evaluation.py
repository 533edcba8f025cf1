"""After a training, the worker evaluates the SAE on held-out contexts and stores the report:
CE losses for a causal LM (a tiny Llama saved with ``save_pretrained``), latent statistics and
top contexts for any model (the bundled BERT-style ``minilm-l6``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from tests.engine.tiny_models import make_tiny_model
from worker import jobs
from worker.db import LanguageModel
from worker.jobs import reports

from .conftest import FAST


def _train(model: Any, dataset: Any, **overrides: str) -> Any:
    t = jobs.create_training({"model_id": str(model.id), "dataset_id": str(dataset.id),
                              **FAST, **overrides})  # immediate mode: runs inline
    assert t.status == "completed", t.error
    return t


def test_causal_lm_training_has_ce_report(data_dir: Path) -> None:
    folder = make_tiny_model("llama", data_dir / "models" / "tiny-llama")  # an allowed root
    m = jobs.add_model(str(folder))
    assert m.status == "ready", m.error
    d = jobs.add_dataset("kjv", context_size="32", max_tokens="16384")
    assert d.status == "ready", d.error
    t = _train(m, d, layer="1", eval_tokens="1024")

    summary = t.result["eval"]
    assert summary["report"] is True
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered",
                "kl_div"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["ce_loss_zero"] != summary["ce_loss_clean"]
    assert summary["kl_div"] >= 0
    recovered = (summary["ce_loss_zero"] - summary["ce_loss_spliced"]) / (
        summary["ce_loss_zero"] - summary["ce_loss_clean"])
    assert math.isclose(summary["ce_loss_recovered"], recovered, rel_tol=1e-6)

    ev = Path(t.out_dir) / "eval"
    report = json.loads((ev / "report.json").read_text())
    assert report["format"] == reports.FORMAT and report["step"] == 20
    assert report["d_sae"] == 2 * 32 and report["layer"] == 1 and report["is_causal"]
    assert report["model"] == m.source
    # held-out: the last contexts of the token store, ceil(1024 / 31) of them
    assert report["contexts"] == 34 and report["tokens"] == 34 * 32
    assert sum(report["histogram"]["counts"]) == report["alive"] == 64 - report["dead"]
    lat = load_file(str(ev / "latents.safetensors"))
    assert lat["top_tokens"].shape == (64, report["top_n"], 17)
    vocab = json.loads((ev / "vocab.json").read_text())
    ids = {int(i) for i in lat["top_tokens"].ravel() if i >= 0}
    assert ids and ids <= {int(k) for k in vocab}
    log = " ".join(line["message"] for line in jobs.log_lines(t.id))
    assert "Evaluating on held-out contexts" in log and "Report ready" in log
    assert "CE loss recovered" in log

    # the web's reader on the real files: the per-latent details of format 2
    n = int(np.argmax(lat["frequency"]))
    data = reports.latent(t, n)
    firings = round(float(lat["frequency"][n]) * report["scored_tokens"])
    assert data["firings"] == firings == sum(data["histogram"]["counts"]) > 0
    assert sum(g["count"] for g in data["quantiles"]) == min(report["sample_n"], firings)
    assert len(data["top_logits"]) == len(data["bottom_logits"]) == report["logits_n"]
    assert len(data["neighbours"]) == min(report["neighbours_n"], 63)
    assert data["auto_label"] and " → " in data["auto_label"]
    sb = reports.saebench(t)
    assert sb["eval_result_metrics"]["model_behavior_preservation"]["kl_div_score"] == \
        report["kl_div_score"] is not None
    assert len(sb["eval_result_details"]) == 64


def test_encoder_model_report_has_no_ce(model: LanguageModel, dataset: Any) -> None:
    t = _train(model, dataset)
    summary = t.result["eval"]
    assert summary["report"] is True
    assert summary["ce_loss_recovered"] is None and summary["kl_div"] is None
    # named as the user added it (not the cached folder's name)
    assert summary["downstream_note"].startswith("minilm-l6 is not a causal LM")
    report = json.loads((Path(t.out_dir) / "eval" / "report.json").read_text())
    assert report["model"] == "minilm-l6"
    assert (Path(t.out_dir) / "eval" / "latents.safetensors").is_file()
    page = reports.latents_page(t, sort="frequency")
    data = reports.latent(t, page["rows"][0]["id"])  # the most frequent latent
    assert data["top_logits"] is None and data["bottom_logits"] is None  # no output embedding
    assert data["histogram"] is not None and data["neighbours"]
    assert reports.report(t)["has_logits"] is False


def test_eval_tokens_zero_skips_the_report(model: LanguageModel, dataset: Any) -> None:
    t = _train(model, dataset, eval_tokens="0")
    assert t.result["eval"] == {"report": False}
    assert not (Path(t.out_dir) / "eval").exists()
    assert any("No report: eval_tokens is 0" in line["message"]
               for line in jobs.log_lines(t.id))
