"""Tests for worker.engine.probe on tiny real models: the activations equal the SAE applied to the
model's own hooked activation (captured here by a forward hook over the whole model, not by the
probe's ``run_to``), tokenisation as a training context, steering; a transcoder's latents read at
its input (the MLP's, a pre-hook) and its steering added at its target (the MLP's output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.tiny_models import TINY_HIDDEN, kjv_lines
from worker.engine.architectures import build
from worker.engine.checkpoints import atomic_save, checkpoint_path
from worker.engine.config import TrainConfig
from worker.engine.errors import ConfigError
from worker.engine.models import LoadedModel, hook_module
from worker.engine.probe import (
    MAX_NEW_TOKENS,
    TOP_ACTS,
    Probe,
    ProbeSAE,
    load_probe_sae,
    tokenize_context,
)

D = TINY_HIDDEN
TEXT = " ".join(kjv_lines(3))


def save_sae_checkpoint(folder: Path, sae: torch.nn.Module, *, scale: float, layer: int,
                        hook_point: str, context_size: int, encoder_type: str = "topk",
                        step: int = 10, target_hook_point: str | None = None,
                        target_scale: float | None = None) -> Path:
    """A checkpoint as the trainer writes one (weights under ``sae.``, the metadata the probe
    reads), for ``sae`` (a transcoder with ``target_hook_point``: its skip connection as
    ``sae`` has one, ``target_scale`` in the meta as the trainer writes it)."""
    skip = getattr(sae, "W_skip", None) is not None
    cfg = TrainConfig(encoder_type=encoder_type, layer=layer, hook_point=hook_point,
                      context_size=context_size, k=4, target_hook_point=target_hook_point,
                      skip_connection=skip)
    meta = {"format": "sae-studio-checkpoint/1", "step": step, "tokens": 0,
            "config": cfg.to_dict(), "d_in": int(sae.d_in), "d_sae": int(sae.d_sae),
            "scale": scale, "target_scale": scale if target_scale is None else target_scale,
            "source_meta": {"layer": layer, "hook_point": hook_point,
                            "target_hook_point": target_hook_point,
                            "context_size": context_size}}
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    return atomic_save(tensors, meta, checkpoint_path(folder / "checkpoints", step))


def make_probe(loaded: LoadedModel, tmp_path: Path, *, layer: int = 1,
               hook_point: str = "residual", scale: float = 0.37, context_size: int = 24,
               seed: int = 0) -> Probe:
    torch.manual_seed(seed)
    sae = build("topk", D, 4 * D, k=4)
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # fire on most tokens
    path = save_sae_checkpoint(tmp_path, sae, scale=scale, layer=layer, hook_point=hook_point,
                               context_size=context_size)
    return Probe(loaded, load_probe_sae(path))


def hooked_activation(loaded: LoadedModel, ids: list[int], layer: int, hook_point: str
                      ) -> torch.Tensor:
    """The module's output during a whole forward of the model: the reference, [T, d]."""
    seen: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, _i: object, out: object) -> None:
        t = out[0] if isinstance(out, (tuple, list)) else out
        seen.append(t.detach().clone())

    handle = hook_module(loaded.model, layer, hook_point).register_forward_hook(hook)
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0].reshape(len(ids), -1).float()


def hooked_input(loaded: LoadedModel, ids: list[int], layer: int, hook_point: str
                 ) -> torch.Tensor:
    """The module's first input during a whole forward (an input hook point such as mlp_in,
    read by a plain forward pre-hook), [T, d]."""
    seen: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach().clone())

    handle = hook_module(loaded.model, layer, hook_point).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0].reshape(len(ids), -1).float()


TC_SCALE, TC_TARGET_SCALE = 0.37, 1.9


def make_transcoder_probe(loaded: LoadedModel, tmp_path: Path, *, skip: bool = True,
                          layer: int = 1) -> Probe:
    """A probe of a random topk (skip) transcoder of the MLP of block ``layer`` (mlp_in ->
    mlp_out), trained on inputs times TC_SCALE and targets times TC_TARGET_SCALE."""
    torch.manual_seed(5)
    sae = build("topk", D, 4 * D, k=4).make_transcoder(skip)
    with torch.no_grad():
        sae.b_enc.add_(0.5)
        sae.b_dec.normal_(0, 0.1)
        if skip:
            sae.W_skip.normal_(0, 0.1)
    path = save_sae_checkpoint(tmp_path, sae, scale=TC_SCALE, layer=layer, hook_point="mlp_in",
                               context_size=24, target_hook_point="mlp_out",
                               target_scale=TC_TARGET_SCALE)
    return Probe(loaded, load_probe_sae(path))


@pytest.fixture(scope="module")
def llama(tiny: dict[str, LoadedModel]) -> LoadedModel:
    return tiny["llama"]


# ---------------------------------------------------------------------------- checkpoint
def test_load_probe_sae_reads_the_checkpoint(llama: LoadedModel, tmp_path: Path) -> None:
    sae = build("topk", D, 2 * D, k=4)
    path = save_sae_checkpoint(tmp_path, sae, scale=2.5, layer=2, hook_point="mlp_out",
                               context_size=40, step=77)
    p = load_probe_sae(path)
    assert isinstance(p, ProbeSAE)
    assert (p.scale, p.layer, p.hook_point, p.context_size, p.step) == (2.5, 2, "mlp_out", 40, 77)
    assert torch.equal(p.sae.W_dec, sae.W_dec)
    assert not p.sae.training


# ---------------------------------------------------------------------------- activations
@pytest.mark.parametrize("family,hook_point", [("llama", "residual"), ("gpt2", "mlp_out"),
                                               ("opt", "mlp_out"), ("bert", "attn_out")])
def test_activations_equal_the_sae_on_the_hooked_activation(
        tiny: dict[str, LoadedModel], tmp_path: Path, family: str, hook_point: str) -> None:
    loaded = tiny[family]
    probe = make_probe(loaded, tmp_path, hook_point=hook_point)
    out = probe.activations(TEXT, latent=5)
    ids = [t["id"] for t in out["tokens"]]
    assert ids == tokenize_context(loaded.tokenizer, TEXT, 24)

    x = hooked_activation(loaded, ids, 1, hook_point)
    with torch.no_grad():
        f = probe.psae.sae.encode(x * 0.37)
    special = set(loaded.tokenizer.all_special_ids)
    assert out["latent"] == 5
    assert len(out["latent_acts"]) == len(ids)
    fired = 0
    for pos, (tok, la) in enumerate(zip(out["tokens"], out["latent_acts"], strict=True)):
        if pos == 0 or tok["id"] in special:
            assert tok["acts"] is None and la is None
            continue
        assert la == pytest.approx(float(f[pos, 5]), rel=1e-5, abs=1e-6)
        want = [(n, float(f[pos, n])) for n in torch.argsort(f[pos], descending=True).tolist()
                if f[pos, n] > 0][:TOP_ACTS]
        got = tok["acts"]
        assert [n for n, _ in got] == [n for n, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)
        assert [v for _, v in got] == sorted((v for _, v in got), reverse=True)
        fired += bool(got)
    assert fired > 0  # the reference is not all zeros


def test_bos_first_and_context_cap(llama: LoadedModel, tmp_path: Path) -> None:
    tok = llama.tokenizer
    probe = make_probe(llama, tmp_path, context_size=16)
    long_text = " ".join(kjv_lines(20))
    out = probe.activations(long_text)
    ids = [t["id"] for t in out["tokens"]]
    assert len(ids) == 16
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == tok(long_text, add_special_tokens=False)["input_ids"][:15]
    assert out["latent"] is None and out["latent_acts"] is None
    assert out["tokens"][0]["acts"] is None  # position 0
    assert all(t["acts"] is not None for t in out["tokens"][1:])
    assert all(isinstance(t["text"], str) for t in out["tokens"])


def test_without_bos_a_context_is_the_text(tiny: dict[str, LoadedModel]) -> None:
    class NoBos:
        bos_token_id = None
        cls_token_id = None

        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            assert add_special_tokens is False
            return {"input_ids": [ord(c) for c in text]}

    assert tokenize_context(NoBos(), "abcdef", 4) == [97, 98, 99, 100]
    bert = tiny["bert"].tokenizer  # no BOS: the CLS token starts a context (corpora's policy)
    assert tokenize_context(bert, "In the beginning", 8)[0] == bert.cls_token_id


def test_special_tokens_are_null(llama: LoadedModel, tmp_path: Path) -> None:
    tok = llama.tokenizer
    probe = make_probe(llama, tmp_path)
    text = f"In the beginning{tok.eos_token} God created"
    out = probe.activations(text, latent=3)
    eos = [i for i, t in enumerate(out["tokens"]) if t["id"] == tok.eos_token_id]
    assert eos and eos[0] > 0
    for i in eos:
        assert out["tokens"][i]["acts"] is None and out["latent_acts"][i] is None
    others = [i for i in range(1, len(out["tokens"])) if i not in eos]
    assert all(out["latent_acts"][i] is not None for i in others)


def test_activation_errors(llama: LoadedModel, tmp_path: Path) -> None:
    probe = make_probe(llama, tmp_path)
    with pytest.raises(ConfigError, match="Latent 128 does not exist") as exc:
        probe.activations("In the beginning", latent=4 * D)
    assert "latent" in exc.value.errors
    with pytest.raises(ConfigError, match="no tokens"):
        probe.activations("")


# ---------------------------------------------------------------------------- steering
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_steering_changes_the_output_and_zero_does_not(tiny: dict[str, LoadedModel],
                                                       tmp_path: Path, family: str) -> None:
    loaded = tiny[family]
    probe = make_probe(loaded, tmp_path)
    prompt = "In the beginning God"
    for seed in (None, 3):
        zero = probe.steer(prompt, 7, 0.0, max_new_tokens=12, seed=seed)
        assert zero["baseline"] == zero["steered"]
        assert zero["baseline"]  # something was generated
        strong = probe.steer(prompt, 7, 200.0, max_new_tokens=12, seed=seed)
        assert strong["baseline"] == zero["baseline"]  # deterministic for a seed / greedy
        if seed is None:  # (a random tiny model's next-token distribution is nearly flat, so
            # sampling from the same random stream often picks the same tokens either way)
            assert strong["steered"] != strong["baseline"]


def test_steering_adds_the_decoder_row_in_raw_units(llama: LoadedModel, tmp_path: Path) -> None:
    """With the hook on, the hooked module's output is the clean one plus c * W_dec / scale."""
    probe = make_probe(llama, tmp_path, scale=0.37)
    ids = tokenize_context(llama.tokenizer, "In the beginning", 24)
    clean = hooked_activation(llama, ids, 1, "residual")
    vector = probe.psae.sae.W_dec[9].detach() / 0.37 * 3.0
    with probe._added(vector):
        steered = hooked_activation(llama, ids, 1, "residual")
    assert torch.allclose(steered - clean, vector.expand_as(clean), atol=1e-5)


def test_seeded_sampling_leaves_the_global_rng_alone(llama: LoadedModel,
                                                     tmp_path: Path) -> None:
    probe = make_probe(llama, tmp_path)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = probe.steer("In the beginning", 1, 5.0, max_new_tokens=8, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert probe.steer("In the beginning", 1, 5.0, max_new_tokens=8, seed=11) == a


def test_steer_errors(tiny: dict[str, LoadedModel], tmp_path: Path) -> None:
    probe = make_probe(tiny["llama"], tmp_path)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        probe.steer("In", 0, 1.0, max_new_tokens=MAX_NEW_TOKENS + 1)
    with pytest.raises(ConfigError, match="finite"):
        probe.steer("In", 0, float("nan"))
    with pytest.raises(ConfigError, match="does not exist"):
        probe.steer("In", -1, 1.0)
    bert = make_probe(tiny["bert"], tmp_path / "bert")
    with pytest.raises(ConfigError, match="not a causal LM"):
        bert.steer("In the beginning", 0, 1.0)


def test_cached_generation_equals_recomputing_the_whole_sequence(llama: LoadedModel,
                                                                 tmp_path: Path) -> None:
    """Greedy decoding with the KV cache gives what a full forward per step gives."""
    probe = make_probe(llama, tmp_path)
    ids = tokenize_context(llama.tokenizer, "In the beginning God created", 24)
    got = probe._generate(ids, 10, None, None)
    seq, want = list(ids), []
    with torch.no_grad():
        for _ in range(10):
            nxt = int(llama.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
            if nxt == llama.tokenizer.eos_token_id:
                break
    assert got == want


# ---------------------------------------------------------------------------- transcoders
def test_load_probe_sae_reads_a_transcoder(llama: LoadedModel, tmp_path: Path) -> None:
    probe = make_transcoder_probe(llama, tmp_path)
    p = probe.psae
    assert (p.hook_point, p.target_hook_point, p.output_hook_point) == ("mlp_in", "mlp_out",
                                                                        "mlp_out")
    assert (p.scale, p.target_scale, p.output_scale) == (TC_SCALE, TC_TARGET_SCALE,
                                                         TC_TARGET_SCALE)
    assert p.sae.transcoder and p.sae.W_skip is not None
    assert float(p.sae.W_skip.abs().sum()) > 0  # the skip weights were loaded, not zeros
    # an SAE's probe has no target: its decoder writes where it reads
    sae = make_probe(llama, tmp_path / "sae").psae
    assert (sae.target_hook_point, sae.target_scale) == (None, None)
    assert (sae.output_hook_point, sae.output_scale) == ("residual", 0.37)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_transcoder_latents_read_the_mlp_input(tiny: dict[str, LoadedModel], tmp_path: Path,
                                               family: str) -> None:
    """The latents are encode(mlp input * scale), the input read by a plain pre-hook on the
    MLP (OPT: fc1, flattened tokens); not the MLP's output."""
    loaded = tiny[family]
    probe = make_transcoder_probe(loaded, tmp_path)
    out = probe.activations(TEXT, latent=2)
    ids = [t["id"] for t in out["tokens"]]
    x_in = hooked_input(loaded, ids, 1, "mlp_in")
    x_out = hooked_activation(loaded, ids, 1, "mlp_out")
    with torch.no_grad():
        f = probe.psae.sae.encode(x_in * TC_SCALE)
        f_wrong = probe.psae.sae.encode(x_out * TC_SCALE)
    scored = [pos for pos in range(1, len(ids))
              if ids[pos] not in set(loaded.tokenizer.all_special_ids)]
    got = torch.tensor([out["latent_acts"][pos] for pos in scored])
    torch.testing.assert_close(got, f[scored, 2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(f[scored], f_wrong[scored], atol=1e-3)  # the test can tell
    for pos in scored:
        want = [n for n in torch.argsort(f[pos], descending=True).tolist() if f[pos, n] > 0]
        assert [n for n, _ in out["tokens"][pos]["acts"]] == want[:TOP_ACTS]


def test_transcoder_steering_adds_at_the_target_in_target_units(llama: LoadedModel,
                                                                tmp_path: Path) -> None:
    """Steering a transcoder latent adds c * W_dec / target_scale to the MLP's output; the
    MLP's input (the transcoder's own input hook point) of that block is unchanged."""
    probe = make_transcoder_probe(llama, tmp_path)
    ids = tokenize_context(llama.tokenizer, "In the beginning", 24)
    clean_out = hooked_activation(llama, ids, 1, "mlp_out")
    clean_in = hooked_input(llama, ids, 1, "mlp_in")
    vector = probe.psae.sae.W_dec[9].detach() / TC_TARGET_SCALE * 3.0
    with probe._added(vector):
        steered_out = hooked_activation(llama, ids, 1, "mlp_out")
        steered_in = hooked_input(llama, ids, 1, "mlp_in")
    torch.testing.assert_close(steered_out - clean_out, vector.expand_as(clean_out),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(steered_in, clean_in, rtol=0, atol=0)
    # steer() builds that vector from the target scale: its greedy continuation is the one
    # generated with this hook, and differs from one built with the input's scale
    # (a coefficient small enough that the two scales give different continuations)
    prompt = "In the beginning God"
    got = probe.steer(prompt, 9, 3.0, max_new_tokens=10)
    ids = tokenize_context(llama.tokenizer, prompt, 24)
    w = probe.psae.sae.W_dec[9].detach().float()
    want = probe._decode(probe._generate(ids, 10, None, w / TC_TARGET_SCALE * 3.0))
    wrong = probe._decode(probe._generate(ids, 10, None, w / TC_SCALE * 3.0))
    assert got["steered"] == want != wrong
    assert got["steered"] != got["baseline"]
    zero = probe.steer(prompt, 9, 0.0, max_new_tokens=10)
    assert zero["steered"] == zero["baseline"] == got["baseline"]
