"""TrainConfig's options: metadata on every field, parse_value, errors() with every bad field."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from worker.engine import architectures
from worker.engine.architectures import Architecture
from worker.engine.config import ALIASES, INT64_MAX, TrainConfig, option, options, parse_value
from worker.engine.errors import ConfigError

FORM_MAIN = ("encoder_type", "hook_point", "target_hook_point", "skip_connection", "layer",
             "expansion_factor", "latent_dim", "k", "matryoshka_widths", "l1_alpha", "l0_coef",
             "target_l0", "tie_weights", "learning_rate", "batch_size", "total_steps",
             "auto_save_interval")
DATA_SOURCE = ("model", "dataset", "activations", "context_size", "max_tokens", "text_field")


def test_every_field_but_extra_is_an_option_with_label_and_help():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    infos = options()
    assert [i.name for i in infos] == [n for n in fields if n != "extra"]
    for info in infos:
        assert info.label and info.label[0].isupper() or info.label.startswith("k "), info
        assert info.help.rstrip().endswith((".", ")")) and len(info.help.split()) >= 4, info
        assert info.kind in ("int", "float", "bool", "str", "choice"), info
        assert info.default == getattr(TrainConfig(), info.name)
        if info.kind == "choice":
            assert info.default in info.choices or info.default is None and info.optional, info
        if info.kind == "int":  # every int fits in a signed 64-bit integer
            assert info.max is not None and info.max <= INT64_MAX, info
        if info.default is None:
            assert info.optional, info
    assert option("layer_idx").name == "layer" == ALIASES["layer_idx"]


def test_form_visibility_and_advanced():
    infos = {i.name: i for i in options()}
    assert {n for n, i in infos.items() if not i.in_form} == set(DATA_SOURCE)
    main = tuple(n for n, i in infos.items() if i.in_form and not i.advanced)
    assert main == FORM_MAIN
    assert infos["k"].applies_to == ("topk", "batchtopk", "matryoshka_batchtopk")
    assert infos["matryoshka_widths"].applies_to == ("matryoshka_batchtopk",)
    assert infos["tie_weights"].applies_to == ("standard",)
    assert infos["target_l0"].applies_to == ("standard", "jumprelu")
    assert infos["batch_size"].applies_to is None


def test_encoder_type_choices_and_help_follow_the_registry():
    assert option("encoder_type").choices == architectures.names()
    architectures.register(Architecture("tiny-test", "a type only this test knows.",
                                        impl="x:y", options=("l1_alpha",), lr_base=1e-3))
    try:
        info = option("encoder_type")
        assert "tiny-test" in info.choices and "a type only this test knows." in info.help
        assert "tiny-test" in option("l1_alpha").applies_to
        assert "0.001 x sqrt(4096 / latents) for tiny-test" in option("learning_rate").help
        assert TrainConfig(encoder_type="tiny-test").lr(4096) == pytest.approx(1e-3)
        assert parse_value(info, "tiny-test") == "tiny-test"
    finally:
        architectures.unregister("tiny-test")
    assert "tiny-test" not in option("encoder_type").choices


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("batch_size", "4_096", 4096), ("batch_size", "4,096", 4096), ("batch_size", "1e3", 1000),
    ("batch_size", " 512 ", 512), ("batch_size", 256, 256), ("batch_size", 2048.0, 2048),
    ("batch_size", "9" * 30, int("9" * 30)),  # parsed; errors() rejects it (64-bit bound)
    ("latent_dim", "", None), ("latent_dim", None, None), ("learning_rate", " ", None),
    ("learning_rate", "3e-4", 3e-4), ("l1_alpha", 2, 2.0),
    ("tie_weights", "on", True), ("tie_weights", "YES", True), ("tie_weights", "1", True),
    ("tie_weights", "false", False), ("tie_weights", "off", False), ("tie_weights", "0", False),
    ("tie_weights", True, True), ("encoder_type", " jumprelu ", "jumprelu"),
    ("device", "cuda:1", "cuda:1"),
])
def test_parse_value_accepts(name, raw, value):
    assert parse_value(option(name), raw) == value


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("batch_size", "abc", "Batch size must be a whole number (got 'abc')."),
    ("batch_size", "1.5", "Batch size must be a whole number (got '1.5')."),
    ("batch_size", "nan", "Batch size must be a whole number (got 'nan')."),
    ("batch_size", "1e400", "Batch size must be a whole number (got '1e400')."),
    ("batch_size", True, "Batch size must be a number"),
    ("batch_size", "", "Batch size needs a value."),
    ("l1_alpha", "inf", "L1 coefficient must be a finite number (got 'inf')."),
    ("l1_alpha", "NaN", "L1 coefficient must be a finite number"),
    ("l1_alpha", "two", "L1 coefficient must be a number (got 'two')."),
    ("tie_weights", "maybe", "Tie weights must be on or off (got 'maybe')."),
    ("encoder_type", "gated", "Encoder type 'gated' is not available; choose one of topk,"),
    ("hook_point", "bogus", "Hook point 'bogus' is not available"),
])
def test_parse_value_refuses_with_the_label(name, raw, message):
    with pytest.raises(ValueError) as exc:
        parse_value(option(name), raw)
    assert str(exc.value).startswith(message)


def test_errors_reports_every_bad_field_at_once():
    cfg = TrainConfig(activations="a.safetensors", batch_size=0, total_steps=-5, k=0,
                      learning_rate=2.0, lr_schedule="weird", aux_k_frac=0.0,
                      tie_weights=True, device="gpu")
    errors = cfg.errors()
    assert errors == {
        "k": "k (active latents) must be between 1 and 65,536 (got 0).",
        "tie_weights": "Tie weights works only with the standard encoder type (got 'topk'); "
                       "turn it off or choose standard.",
        "learning_rate": "Learning rate must be greater than 0 and less than 1 (got 2).",
        "batch_size": "Batch size must be between 1 and 16,777,216 (got 0).",
        "total_steps": "Total steps must be between 1 and 1,000,000,000 (got -5).",
        "lr_schedule": "LR schedule 'weird' is not available; choose one of constant, linear, "
                       "cosine.",
        "device": "Unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps.",
        "aux_k_frac": "AuxK fraction must be greater than 0 and at most 1 (got 0).",
    }
    with pytest.raises(ConfigError) as exc:
        cfg.validate()
    assert exc.value.errors == errors and str(exc.value) == next(iter(errors.values()))


@pytest.mark.parametrize(("changes", "key", "message"), [
    ({"latent_dim": 10**12}, "latent_dim", "Latent dimension must be between 1 and 33,554,432"),
    ({"batch_size": 10**9}, "batch_size", "Batch size must be between 1 and 16,777,216"),
    ({"total_steps": 10**12}, "total_steps", "Total steps must be between 1 and 1,000,000,000"),
    ({"buffer_tokens": 2**40}, "buffer_tokens", "Shuffle buffer must be between 1 and"),
    ({"eval_tokens": 10**10}, "eval_tokens", "Held-out vectors must be between 0 and"),
    ({"seed": 2**64}, "seed", "Seed must fit in 64 bits (at most 9,223,372,036,854,775,807"),
    ({"dead_window_tokens": 2**63}, "dead_window_tokens", "Dead window must fit in 64 bits"),
    ({"seed": -1}, "seed", "Seed must not be negative (got -1)."),
    ({"l0_coef": -1.0}, "l0_coef", "L0 coefficient must not be negative (got -1)."),
    ({"l1_alpha": float("nan")}, "l1_alpha", "L1 coefficient must be a finite number"),
    ({"batch_size": "4096"}, "batch_size", "Batch size must be a whole number (got '4096')."),
    ({"k": 3.0}, "k", "k (active latents) must be a whole number (got 3.0)."),
    ({"normalize": "yes"}, "normalize", "Normalise inputs must be on or off."),
    ({"total_steps": None}, "total_steps", "Total steps needs a value."),
    ({"micro_batch_size": 8192}, "micro_batch_size",
     "Micro-batch size (8,192) must not exceed the batch size (4,096)."),
    ({"micro_batch_size": 1000}, "micro_batch_size",
     "Micro-batch size (1,000) must divide the batch size (4,096)."),
    ({"expansion_factor": 1024}, "expansion_factor",
     "Expansion factor 1024 gives 67,108,864 latents, more than 33,554,432."),
])
def test_bounds_reject_absurd_values(changes, key, message):
    errors = TrainConfig(activations="a", **changes).errors(d_in=65_536)
    assert list(errors) == [key] and errors[key].startswith(message), errors


def test_cross_field_rules_need_the_model():
    cfg = TrainConfig(model="m", dataset="d", layer=7, k=999, latent_dim=64)
    assert cfg.errors() == {}
    assert cfg.errors(d_in=8, n_layers=6) == {
        "layer": "Layer 7 is out of range: the model has 6 layers (0-5).",
        "k": "k (999) cannot exceed the number of latents (64).",
    }
    # k is a topk/batchtopk option: a standard SAE does not care
    assert cfg.replace(encoder_type="standard").errors(d_in=8, n_layers=8) == {}
    assert TrainConfig().errors() == {
        "activations": "Give either an activation file (--activations) or both --model and "
                       "--dataset."}


def test_from_dict_accepts_old_names_and_refuses_unknown_ones():
    assert TrainConfig.from_dict({"layer_idx": 3}).layer == 3
    with pytest.raises(ConfigError, match="Unknown configuration option"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ConfigError, match="Unknown configuration option 'nope'"):
        option("nope")


def test_readme_option_table_is_current():
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("options_table",
                                                  root / "scripts" / "options_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (root / "README.md").read_text()
    assert script.START in readme and "| `--batch-size` | Batch size | `4096` |" in readme
    assert script.rendered(readme) == readme, "run .venv/bin/python scripts/options_table.py"
