"""An encoder type defined and registered by this test module alone: it is a CLI choice, a form
option, trains with the real Trainer and exports to (and loads back from) a SAELens folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from worker.cli import build_parser
from worker.db import LanguageModel, db
from worker.engine import architectures, kernels
from worker.engine.architectures import Architecture
from worker.engine.architectures.base import SAE, ForwardOutput
from worker.engine.architectures.standard import StandardSAE
from worker.engine.config import TrainConfig
from worker.engine.export import export_checkpoint, load_saelens

from ..html import element_by_id, find_all
from .synthetic import sparse_activations, train

NAME = "tiny-relu"


class TinyReLUSAE(SAE):
    """ReLU with a plain (unweighted) L1 penalty: about the least a type has to write."""

    encoder_type = NAME
    saelens_architecture = "standard"  # SAELens runs it as its ReLU SAE

    def __init__(self, d_in: int, d_sae: int, *, l1_alpha: float = 0.0) -> None:
        super().__init__(d_in, d_sae)
        self.penalty = l1_alpha

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def forward(self, x: Tensor, *, sparsity_coef: float = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        f = self.encode(x)
        x_hat = self.decode(f)
        mse = self.mse(x, x_hat)
        aux = sparsity_coef * f.sum(-1).mean() / self.d_in
        l0, fired = kernels.active_stats(f.detach() > 0)
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)


@pytest.fixture
def tiny_relu() -> Iterator[str]:
    architectures.register(Architecture(NAME, "ReLU with a plain L1 penalty (a test's type).",
                                        impl=TinyReLUSAE, options=("l1_alpha",)))
    yield NAME
    architectures.unregister(NAME)


def _train_args(encoder_type: str) -> list[str]:
    return ["train", "--activations", "acts.safetensors", "--encoder-type", encoder_type]


def test_cli_offers_the_registered_type(tiny_relu, capsys):
    args = build_parser().parse_args([*_train_args(tiny_relu), "--l1-alpha", "0.5"])
    assert (args.encoder_type, args.l1_alpha) == (tiny_relu, 0.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "a test's type" in capsys.readouterr().out
    architectures.unregister(NAME)
    with pytest.raises(SystemExit):  # gone from the choices once unregistered
        build_parser().parse_args(_train_args(tiny_relu))


def test_form_offers_the_registered_type(tiny_relu, client):
    with db.connection_context():
        LanguageModel.create(name="minilm-l6", source="minilm-l6", status="ready", n_layers=6,
                             hidden_dim=384, path="/nowhere", progress=1.0,
                             hook_points=["residual"])
    page = client.get("/").data.decode()
    select = element_by_id(page, "input-encoder_type")
    assert tiny_relu in [o.get("value") for o in find_all(select, "option")]


def test_registered_type_trains_exports_and_loads(tiny_relu, acts, tmp_path):
    cfg = TrainConfig(activations=str(acts), encoder_type=tiny_relu, expansion_factor=4,
                      batch_size=256, total_steps=40, log_every=10, auto_save_interval=0,
                      eval_tokens=1000, learning_rate=4e-3, l1_alpha=0.2)
    trainer, result, rows = train(cfg, tmp_path / "run")
    assert isinstance(trainer.sae, TinyReLUSAE) and trainer.sae.penalty == 0.2
    assert rows[-1]["fvu"] < rows[0]["fvu"] and rows[-1]["sparsity_loss"] > 0
    assert 0 < result.l0 < trainer.d_sae
    folder = tmp_path / "run" / "saelens"
    saved = json.loads((folder / "cfg.json").read_text())
    assert saved["architecture"] == "standard"
    assert saved["metadata"]["trained_architecture"] == tiny_relu
    # Loaded back (as SAELens's standard type), it reconstructs raw inputs as the trainer's SAE.
    loaded = load_saelens(folder)
    assert isinstance(loaded, StandardSAE)
    x = sparse_activations(200, seed=5)
    with torch.no_grad():
        want = trainer.sae.decode(trainer.sae.encode(x * trainer.scale)) / trainer.scale
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), want, rtol=1e-4, atol=1e-4)
    # A checkpoint of the type exports through the registry too.
    again = export_checkpoint(Path(result.checkpoint), tmp_path / "again")
    assert json.loads((again / "cfg.json").read_text()) == saved
