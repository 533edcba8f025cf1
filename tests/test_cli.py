"""The sae-studio command line: real runs on real tensors, and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker.cli import main
from worker.engine.activations import ActivationFile
from worker.engine.files import file_mode, folder_lock

from .engine.synthetic import write_sparse_file
from .engine.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    return write_sparse_file(tmp_path_factory.mktemp("cli") / "acts.safetensors", n=12_000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("cli-model") / "llama")


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def _last_json(out: str) -> dict:
    """The last stdout line, parsed strictly: NaN or Infinity fails."""
    return json.loads(out.strip().splitlines()[-1], parse_constant=_no_constant)


def _fails_cleanly(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sae-studio: error: ") and match in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_train_on_activation_file(acts, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--activations", str(acts), "--encoder-type", "topk", "--k", "4",
               "--expansion-factor", "4", "--batch-size", "512", "--total-steps", "40",
               "--auto-save-interval", "20", "--seed", "1", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    result = _last_json(capsys.readouterr().out)
    for key in ("steps", "tokens", "tokens_per_s", "fvu", "l0", "dead_frac", "out"):
        assert key in result
    assert result["steps"] == 40 and result["tokens"] == 40 * 512
    assert result["out"] == str(out) and 0 < result["fvu"] < 1
    # each figure says what it is measured on; held out: a tenth of the file
    assert result["heldout_vectors"] == result["eval"]["tokens"] == 12_000 // 10
    assert result["dead_window_tokens"] == 1_000_000
    assert result["eval"]["measured_on"] == "heldout_vectors"
    assert result["eval"]["fvu"] == result["fvu"]
    assert set(result["definitions"]) == {"tokens_per_s", "fvu", "l0", "dead_frac", "eval"}
    assert "1,200 held-out activation vectors" in result["definitions"]["fvu"]
    assert "last 1,000,000 training tokens" in result["definitions"]["dead_frac"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000020.safetensors", "step_00000040.safetensors"]
    assert (out / "saelens" / "cfg.json").is_file()


def test_train_jumprelu_and_tie_weights_flag(acts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--activations", str(acts), "--encoder-type", "jumprelu",
                 "--l0-coef", "0.02", "--jumprelu-bandwidth", "0.05", "--expansion-factor", "4",
                 "--batch-size", "256", "--total-steps", "30", "--auto-save-interval", "0",
                 "--learning-rate", "4e-3", "--device", "cpu", "--out", str(out)]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["steps"] == 30 and 0 < result["fvu"] < 1 and result["l0"] > 0
    saved = json.loads((out / "saelens" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu"
    _fails_cleanly(capsys, ["train", "--activations", str(acts), "--tie-weights",
                            "--encoder-type", "topk"], "Tie weights works only with the standard")


def test_train_with_target_l0(acts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--activations", str(acts), "--encoder-type", "standard",
                 "--target-l0", "10", "--l1-alpha", "0.2", "--expansion-factor", "4",
                 "--batch-size", "256", "--total-steps", "60", "--auto-save-interval", "0",
                 "--log-every", "5", "--device", "cpu", "--out", str(out),
                 "--metrics-jsonl", str(tmp_path / "m.jsonl")]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["steps"] == 60 and abs(result["l0"] / 10 - 1) < 0.25, result["l0"]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    # steered after the first 10% of the steps (step 6)
    assert rows[0]["sparsity_coef"] == pytest.approx(0.2) != rows[-1]["sparsity_coef"]
    base = ["train", "--activations", str(acts), "--encoder-type", "jumprelu",
            "--expansion-factor", "4", "--device", "cpu", "--out", str(tmp_path / "bad")]
    _fails_cleanly(capsys, base + ["--target-l0", "0"], "Target L0")
    _fails_cleanly(capsys, base + ["--target-l0", "500"],
                   "Target L0 (500) must be below the number of latents (128).")
    assert not (tmp_path / "bad").exists()


def test_options_the_encoder_type_does_not_use_get_a_note(acts, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("l1_alpha = 3\n")
    assert main(["train", "--activations", str(acts), "--config", str(cfg), "--encoder-type",
                 "topk", "--target-l0", "40", "--k", "4", "--expansion-factor", "2",
                 "--batch-size", "256", "--total-steps", "2", "--auto-save-interval", "0",
                 "--no-evaluate", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --l1-alpha is not used by the topk encoder type (only by standard); this "
        "training ignores it.",
        "note: --target-l0 is not used by the topk encoder type (only by standard, jumprelu); "
        "this training ignores it."]
    assert _last_json(captured.out)["l0"] == pytest.approx(4, abs=0.1)
    # options the type uses, and defaults never named, get none
    assert main(["train", "--activations", str(acts), "--encoder-type", "standard",
                 "--target-l0", "10", "--expansion-factor", "2", "--batch-size", "256",
                 "--total-steps", "2", "--auto-save-interval", "0", "--no-evaluate",
                 "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_train_matryoshka_and_bad_widths(acts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--activations", str(acts), "--encoder-type", "matryoshka_batchtopk",
                 "--k", "4", "--matryoshka-widths", "16,64,128", "--expansion-factor", "4",
                 "--batch-size", "256", "--total-steps", "30", "--auto-save-interval", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["steps"] == 30 and 0 < result["fvu"] < 1 and 0 < result["l0"] < 12
    saved = json.loads((out / "saelens" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu"
    assert saved["metadata"]["trained_architecture"] == "matryoshka_batchtopk"
    assert saved["metadata"]["matryoshka_widths"] == [16, 64, 128]
    base = ["train", "--activations", str(acts), "--encoder-type", "matryoshka_batchtopk",
            "--expansion-factor", "4", "--device", "cpu", "--out", str(tmp_path / "bad")]
    _fails_cleanly(capsys, base + ["--matryoshka-widths", "64,16,128"],
                   "Matryoshka widths must increase from one to the next (got 64 then 16).")
    # the last width is checked against the latents once the file gives the hidden size
    _fails_cleanly(capsys, base + ["--matryoshka-widths", "16,64"],
                   "The last of the Matryoshka widths (64) must equal the number of latents "
                   "(128).")
    assert not (tmp_path / "bad").exists()


def test_config_file_and_flag_override(acts, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'activations = "{acts}"\nk = 3\nexpansion-factor = 2\nbatch_size = 256\n'
                   "total_steps = 7\nauto_save_interval = 0\n")
    assert main(["train", "--config", str(cfg), "--total-steps", "5", "--out",
                 str(tmp_path / "r")]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["steps"] == 5 and result["l0"] == pytest.approx(3, abs=0.1)
    saved = json.loads((tmp_path / "r" / "saelens" / "cfg.json").read_text())
    assert saved["k"] == 3 and saved["d_sae"] == 64


def test_resume_from_run_folder(acts, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--activations", str(acts), "--k", "4", "--expansion-factor", "2",
            "--batch-size", "256", "--auto-save-interval", "10", "--out", str(out)]
    assert main(["train", *base, "--total-steps", "20"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--total-steps", "30"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["steps"] == 30 and result["tokens"] == 30 * 256


def test_train_refuses_a_run_folder_in_use(acts, tmp_path, capsys):
    """Another trainer (the web's worker, an earlier CLI run) holds the folder: one line, exit
    2, nothing written there."""
    out = tmp_path / "run"
    with folder_lock(out):
        assert main(["train", "--activations", str(acts), "--k", "4", "--batch-size", "256",
                     "--total-steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sae-studio: error: ") and f"pid {os.getpid()}" in err[-1]
    assert not (out / "checkpoints").exists()


def test_final_json_is_strict_with_null_for_nan(acts, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = tmp_path / "m.jsonl"
    assert main(["train", "--activations", str(acts), "--k", "4", "--batch-size", "256",
                 "--total-steps", "4", "--log-every", "2", "--eval-tokens", "0",
                 "--metrics-jsonl", str(metrics), "--out", str(out)]) == 0
    result = _last_json(capsys.readouterr().out)  # the FVU of no held-out vector is NaN
    assert result["fvu"] is None and result["l0"] is None and result["heldout_vectors"] == 0
    assert result["eval"] == {"report": False} and "eval" not in result["definitions"]
    rows = [json.loads(line, parse_constant=_no_constant)
            for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["tokens_per_s"] > 0 for r in rows)


def _train_run(acts: Path, out: Path, capsys, steps: int = 20) -> None:
    assert main(["train", "--activations", str(acts), "--k", "4", "--expansion-factor", "2",
                 "--batch-size", "256", "--total-steps", str(steps), "--auto-save-interval",
                 "10", "--out", str(out)]) == 0
    capsys.readouterr()


def test_export_a_run_folder_like_the_web_export(acts, tmp_path, capsys):
    run = tmp_path / "run"
    _train_run(acts, run, capsys)
    sae = tmp_path / "sae"
    assert main(["export", str(run), "--out", str(sae)]) == 0
    done = _last_json(capsys.readouterr().out)
    assert done == {"out": str(sae), "checkpoint": str(run / "checkpoints" /
                                                       "step_00000020.safetensors"),
                    "sparsity": True}
    # the run's own export (what the web zips): the same three files, byte for byte
    names = sorted(p.name for p in sae.iterdir())
    assert names == sorted(p.name for p in (run / "saelens").iterdir()) == [
        "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    for name in names:
        assert (sae / name).read_bytes() == (run / "saelens" / name).read_bytes(), name
        assert (sae / name).stat().st_mode & 0o777 == file_mode()
    assert sae.stat().st_mode & 0o777 == file_mode() | ((file_mode() & 0o444) >> 2)

    # an existing folder is replaced only with --force
    _fails_cleanly(capsys, ["export", str(run), "--out", str(sae)],
                   f"'{sae}' already exists; pass --force to replace it.")
    early = run / "checkpoints" / "step_00000010.safetensors"
    assert main(["export", str(early), "--out", str(sae), "--force"]) == 0
    captured = capsys.readouterr()
    assert _last_json(captured.out)["sparsity"] is False
    assert "No sparsity.safetensors" in captured.err and "step_00000010" in captured.err
    assert sorted(p.name for p in sae.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert (sae / "sae_weights.safetensors").read_bytes() != \
        (run / "saelens" / "sae_weights.safetensors").read_bytes()


def test_resume_skips_a_truncated_newest_checkpoint(acts, tmp_path, capsys):
    run = tmp_path / "run"
    _train_run(acts, run, capsys)
    newest = run / "checkpoints" / "step_00000020.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # cut short, as an interrupted copy leaves it
    assert main(["train", "--resume", str(run), "--total-steps", "30"]) == 0
    captured = capsys.readouterr()
    assert f"Skipping {newest}:" in captured.err and "Using an older checkpoint" in captured.err
    assert "Resumed from" in captured.err and "step_00000010" in captured.err
    result = _last_json(captured.out)
    assert result["steps"] == 30 and result["tokens"] == 30 * 256
    assert result["checkpoint"] == str(run / "checkpoints" / "step_00000030.safetensors")


def test_options_are_checked_before_the_model_loads(tiny, tmp_path, capsys):
    # A folder with the model's config.json and no weights: loading it would fail, so these
    # errors prove the check came first (and no corpus was tokenised).
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    data = ["--data-dir", str(tmp_path / "data")]
    _fails_cleanly(capsys, [*data, "train", "--model", str(folder), "--dataset", "kjv",
                            "--k", "5000"],
                   "k (5000) cannot exceed the number of latents (256).")
    _fails_cleanly(capsys, [*data, "train", "--model", str(folder), "--dataset", "kjv",
                            "--layer", "3"],
                   "Layer 3 is out of range: the model has 3 layers (0-2).")
    _fails_cleanly(capsys, [*data, "extract", "--model", str(folder), "--dataset", "kjv",
                            "--layer", "5", "--max-tokens", "10", "--out", "x"],
                   "Layer 5 is out of range")
    _fails_cleanly(capsys, [*data, "info", str(folder), "--k", "300"],
                   "k (300) cannot exceed the number of latents (256).")
    _fails_cleanly(capsys, [*data, "train", "--model", str(folder), "--dataset", "kjv",
                            "--context-size", "200"],
                   f"Context size (200 tokens) is longer than {folder} reads (128 positions); "
                   "choose at most 128.")
    assert not (tmp_path / "data" / "tokens").exists()
    _fails_cleanly(capsys, [*data, "train", "--model", str(folder), "--dataset", "kjv"],
                   "Could not load the model")  # the valid options pass on to the load


def test_extract_then_train_and_info(tiny, tmp_path, capsys):
    out = tmp_path / "acts.safetensors"
    assert main(["--data-dir", str(tmp_path / "data"), "extract", "--model", str(tiny),
                 "--dataset", "kjv", "--layer", "1", "--max-tokens", "3000", "--context-size",
                 "32", "--out", str(out)]) == 0
    meta = _last_json(capsys.readouterr().out)
    f = ActivationFile(out)
    assert f.n == meta["n"] == 3000 and f.d_in == 32
    assert f.meta["layer"] == 1 and f.meta["filtered"]["position0"] > 0
    assert main(["train", "--activations", str(out), "--k", "4", "--batch-size", "256",
                 "--total-steps", "5", "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "saelens" / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert saved["metadata"]["context_size"] == 32
    capsys.readouterr()
    assert main(["info", str(tiny), "--json", "--expansion-factor", "4"]) == 0
    info = _last_json(capsys.readouterr().out)
    assert info["n_layers"] == 3 and info["hidden_size"] == 32
    assert info["sae"]["d_sae"] == 128 and info["memory"]["total"] > 0


def test_info_gives_memory_in_mib(tiny, capsys):
    """The text summary divides by 2**20 and says so: MiB, as the JSON's bytes over 2**20."""
    assert main(["info", str(tiny), "--expansion-factor", "4", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert main(["info", str(tiny), "--json", "--expansion-factor", "4", "--device", "cpu"]) == 0
    memory = _last_json(capsys.readouterr().out)["memory"]
    assert f"~{memory['total'] / 2**20:,.0f} MiB (SAE+optimizer" in text, text
    assert f"of {memory['device_bytes'] / 2**20:,.0f} MiB available" in text, text
    assert " MB" not in text


def test_train_from_model_and_dataset_defaults_to_middle_layer(tiny, tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "data"), "train", "--model", str(tiny),
                 "--dataset", "kjv", "--max-tokens", "6000", "--context-size", "32",
                 "--k", "4", "--batch-size", "128", "--total-steps", "6",
                 "--buffer-tokens", "1024", "--eval-tokens", "256",
                 "--out", str(tmp_path / "run")]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["steps"] == 6
    f = result["filtered"]
    assert f["position0"] > 0 and f["special"] > 0
    assert f["kept"] == f["seen"] - f["position0"] - f["special"] - f["outliers"]
    # The training stream's counts: 6 steps of 128, extracted no further than the run needs
    # (whole batches of 16 contexts of 31 kept tokens at most), sample and held-out apart.
    assert 6 * 128 <= f["kept"] < 6 * 128 + 16 * 31
    assert "not the initialisation sample" in result["definitions"]["filtered"]
    saved = json.loads((tmp_path / "run" / "saelens" / "cfg.json").read_text())
    assert saved["d_sae"] == 8 * 32  # default expansion factor 8
    assert saved["metadata"]["hook_name"] == "blocks.1.hook_resid_post"  # middle of 3 layers
    # evaluated on held-out text by default: CE losses of a causal LM, the report folder
    ev = result["eval"]
    assert ev["report"] == str(tmp_path / "run" / "eval")
    assert ev["ce_loss_zero"] > ev["ce_loss_clean"] > 0 and ev["kl_div"] >= 0
    assert json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["step"] == 6


def test_evaluate_a_run_trained_from_an_activation_file(tiny, tmp_path, capsys):
    data = ["--data-dir", str(tmp_path / "data")]
    acts = tmp_path / "acts.safetensors"
    assert main([*data, "extract", "--model", str(tiny), "--dataset", "kjv", "--layer", "2",
                 "--max-tokens", "3000", "--context-size", "32", "--out", str(acts)]) == 0
    run = tmp_path / "run"
    assert main([*data, "train", "--activations", str(acts), "--k", "4", "--batch-size", "256",
                 "--total-steps", "5", "--out", str(run)]) == 0
    captured = capsys.readouterr()
    assert "No report: the run trains from an activation file alone" in captured.err
    assert "eval" not in os.listdir(run)
    # The file records its model, corpus and layer: evaluate uses them.
    assert main([*data, "evaluate", str(run), "--eval-tokens", "300"]) == 0
    out = _last_json(capsys.readouterr().out)
    assert out["checkpoint"].endswith("step_00000005.safetensors")
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["layer"] == 2 and report["step"] == 5 and report["d_sae"] == 8 * 32
    assert report["contexts"] == 10 and out["ce_loss_recovered"] == report["ce_loss_recovered"]
    _fails_cleanly(capsys, ["evaluate", str(tmp_path / "nowhere")], "No checkpoint found")


def test_bad_input_is_one_line_and_exit_2(acts, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails_cleanly(capsys, ["train", "--activations", str(tmp_path / "nope.safetensors")],
                   "does not exist")
    _fails_cleanly(capsys, ["train", "--activations", str(acts), "--k", "999",
                            "--latent-dim", "64"], "cannot exceed")
    _fails_cleanly(capsys, ["--data-dir", str(tmp_path), "train", "--model", str(tiny),
                            "--dataset", "kjv", "--layer", "9"], "out of range")
    _fails_cleanly(capsys, ["--data-dir", str(tmp_path), "train", "--model",
                            "no-such-org/no-such-model-xyz", "--dataset", "kjv"],
                   "no-such-org/no-such-model-xyz")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    _fails_cleanly(capsys, ["export", str(bad), "--out", str(tmp_path / "x")], "corrupt")
    _fails_cleanly(capsys, ["train", "--resume", str(bad)], "corrupt")
    _fails_cleanly(capsys, ["train", "--activations", str(acts), "--config",
                            str(tmp_path / "missing.toml")], "does not exist")
    assert main.__module__ == "worker.cli"


def test_console_entry_points(acts, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "worker", "train", "--help"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0
    for flag in ("--model", "--dataset", "--layer", "--hook-point", "--activations",
                 "--encoder-type", "--k", "--l1-alpha", "--latent-dim", "--expansion-factor",
                 "--learning-rate", "--batch-size", "--total-steps", "--auto-save-interval",
                 "--seed", "--device", "--resume", "--out"):
        assert flag in proc.stdout, flag
    proc = subprocess.run([sys.executable, "-m", "worker", "train", "--activations",
                           str(tmp_path / "missing")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert torch.__version__  # the suite runs on the pinned CPU torch


def test_train_help_has_a_sentence_and_the_choices_of_every_flag():
    from worker.cli import build_parser
    from worker.engine import architectures
    from worker.engine.config import options

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    flags = {a.option_strings[0]: a for a in train._actions if a.option_strings[0] != "-h"}
    for info in options():
        action = flags[info.flag]
        assert action.help.startswith(info.help.replace("%", "%%")), info.name
        if info.kind == "choice":
            assert tuple(action.choices) == info.choices
    for flag, action in flags.items():
        assert action.help and "." in action.help, flag
    assert tuple(flags["--encoder-type"].choices) == architectures.names()
    text = train.format_help()
    assert "{topk,standard,jumprelu,batchtopk,matryoshka_batchtopk}" in text
    assert "[unit: vectors;" in text
    assert "Activation vectors (tokens) per optimizer step." in text
    args = parser.parse_args(["train", "--device", "cuda:1", "--batch-size", "8_192",
                              "--no-tie-weights", "--layer", "3"])
    assert (args.device, args.batch_size, args.tie_weights, args.layer) == ("cuda:1", 8192,
                                                                            False, 3)
    assert not hasattr(args, "k")  # unset flags leave the config (or the resumed one) alone


@pytest.mark.parametrize(("argv", "match"), [
    (["train", "--batch-size", "abc"],
     "argument --batch-size: Batch size must be a whole number (got 'abc')."),
    (["train", "--encoder-type", "gated"], "Encoder type 'gated' is not available"),
    (["train", "--activations", "a", "--latent-dim", "1e30"],
     "Latent dimension must be between 1 and 33,554,432"),
    (["train", "--activations", "a", "--seed", str(2**64)], "Seed must fit in 64 bits"),
    (["train", "--activations", "a", "--device", "gpu"], "Unknown device 'gpu'"),
    (["info", "x", "--k", "0"], "k (active latents) must be between 1 and 65,536 (got 0)."),
    (["extract", "--model", "m", "--dataset", "d", "--out", "o"],
     "the following arguments are required: --max-tokens"),
])
def test_bad_values_are_one_line_and_exit_2(capsys, argv, match):
    _fails_cleanly(capsys, argv, match)


def test_config_file_values_parse_like_flags(acts, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[train]\nactivations = "{acts}"\nlayer_idx = 1\nbatch-size = "4_096x"\n')
    _fails_cleanly(capsys, ["train", "--config", str(cfg)],
                   "Batch size must be a whole number (got '4_096x').")


def test_a_failed_train_leaves_no_empty_run_folder(tmp_path, capsys):
    """The run folder's lock is taken before the model loads; a run that fails before its first
    save removes the folder it created."""
    out = tmp_path / "runs" / "a"
    acts = tmp_path / "acts.safetensors"
    write_sparse_file(acts, n=2048)
    # fails when the trainer is built (fp16 on the CPU): after the lock made the folder
    assert main(["train", "--activations", str(acts), "--k", "4", "--precision", "fp16",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_transcoder_extract_train_and_refusals(tiny, tmp_path, capsys):
    """Pairs (mlp_in -> mlp_out) extracted to a file train a skip transcoder; the options that
    make no sense are one-line errors with exit status 2."""
    data = ["--data-dir", str(tmp_path / "data")]
    pairs = tmp_path / "pairs.safetensors"
    assert main([*data, "extract", "--model", str(tiny), "--dataset", "kjv", "--layer", "1",
                 "--hook-point", "mlp_in", "--target-hook-point", "mlp_out",
                 "--max-tokens", "3000", "--context-size", "32", "--out", str(pairs)]) == 0
    capsys.readouterr()
    f = ActivationFile(pairs)
    assert (f.n, f.width, f.d_in, f.d_target) == (3000, 64, 32, 32)
    assert main(["train", "--activations", str(pairs), "--hook-point", "mlp_in",
                 "--target-hook-point", "mlp_out", "--skip-connection", "--encoder-type",
                 "jumprelu", "--batch-size", "256", "--total-steps", "5",
                 "--out", str(tmp_path / "run")]) == 0
    result = _last_json(capsys.readouterr().out)
    assert 0 < result["fvu"] < 1.5
    saved = json.loads((tmp_path / "run" / "saelens" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu_skip_transcoder"
    assert saved["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    # the pair file names its model, corpus and hook points: evaluate splices at mlp_out
    assert main([*data, "evaluate", str(tmp_path / "run"), "--eval-tokens", "300"]) == 0
    out = _last_json(capsys.readouterr().out)
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["hook_point"] == "mlp_in" and report["target_hook_point"] == "mlp_out"
    assert report["skip_connection"] is True and out["fvu"] == report["fvu"] > 0
    assert report["ce_loss_zero"] != report["ce_loss_clean"]
    _fails_cleanly(capsys, ["train", "--activations", str(pairs), "--total-steps", "5"],
                   "holds transcoder pairs (mlp_in -> mlp_out)")
    _fails_cleanly(capsys, ["train", "--activations", str(pairs), "--skip-connection"],
                   "Skip connection needs a target hook point")
    _fails_cleanly(capsys, ["train", "--activations", str(pairs), "--hook-point", "mlp_out",
                            "--target-hook-point", "mlp_in"], "must come after the hook point")
