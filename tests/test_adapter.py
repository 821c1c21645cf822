"""The injection adapter against METHOD.md section 4, with formulas re-derived by hand in plain torch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gag_lightning.errors import GAGError, MissingArtifactError
from gag_lightning.models.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    GAG_TOKEN,
    AdapterConfig,
    GAGAdapter,
    InjectionError,
    LayerMixer,
    Projector,
    SemanticHead,
    inject,
)
from gag_lightning.models.adapter_io import adapter_placeholder, load_adapter, save_adapter
from gag_lightning.models.losses import (
    answer_nll,
    diversity_loss,
    gag_loss,
    masked_mean,
    semantic_loss,
)


# ---------------------------------------------------------------- hand-written reference ops (no nn calls)
def ln_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def linear_ref(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.detach().T + layer.bias.detach()


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def sigmoid_ref(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """LayerNorms start at weight 1 / bias 0; randomise everything so the formulas test the affine params."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---------------------------------------------------------------- LayerMixer
def test_mixer_is_per_slot_softmax_over_layers_hand_example() -> None:
    mixer = LayerMixer(num_slots=2, num_layers=2)
    with torch.no_grad():
        mixer.logits.copy_(torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]]))
    # memory[b, k, s, :]
    memory = torch.tensor(
        [
            [
                [[1.0, 0.0], [2.0, 2.0]],  # layer 0: slot 0, slot 1
                [[0.0, 1.0], [0.0, 4.0]],  # layer 1: slot 0, slot 1
            ]
        ]
    )
    # slot 0: softmax([0, ln 3]) = [1/4, 3/4] -> 0.25*[1,0] + 0.75*[0,1]
    # slot 1: softmax([2, 0]) = [e^2, 1]/(e^2+1) -> w0*[2,2] + w1*[0,4]
    w0 = math.exp(2) / (math.exp(2) + 1)
    w1 = 1 / (math.exp(2) + 1)
    expected = torch.tensor([[[0.25, 0.75], [2 * w0, 2 * w0 + 4 * w1]]])
    torch.testing.assert_close(mixer(memory), expected)
    torch.testing.assert_close(mixer.weights(), torch.tensor([[0.25, 0.75], [w0, w1]]))


def test_mixer_zero_init_is_uniform_mean() -> None:
    mixer = LayerMixer(num_slots=3, num_layers=4)
    assert torch.equal(mixer.logits.detach(), torch.zeros(3, 4))
    memory = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(mixer(memory), memory.mean(dim=1))
    torch.testing.assert_close(mixer.weights(), torch.full((3, 4), 0.25))


def test_mixer_clamp() -> None:
    mixer = LayerMixer(num_slots=1, num_layers=2)
    with torch.no_grad():
        mixer.logits.copy_(torch.tensor([[50.0, -50.0]]))
    # the forward pass already uses clamp(A, -10, 10): softmax([10, -10])
    e = math.exp(20.0)
    torch.testing.assert_close(mixer.weights(), torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    memory = torch.randn(1, 2, 1, 3)
    before = mixer(memory)
    mixer.clamp_()
    assert torch.equal(mixer.logits.detach(), torch.tensor([[10.0, -10.0]]))
    torch.testing.assert_close(mixer(memory), before)


def test_mixer_uniform_and_single_modes() -> None:
    memory = torch.randn(2, 3, 4, 5)
    uniform = LayerMixer(4, 3, mode="uniform")
    assert list(uniform.parameters()) == []
    torch.testing.assert_close(uniform(memory), memory.mean(dim=1))
    torch.testing.assert_close(uniform.weights(), torch.full((4, 3), 1 / 3))
    uniform.clamp_()  # a no-op, must not fail

    single = LayerMixer(4, 3, mode="single", layer_index=1)
    assert list(single.parameters()) == []
    assert torch.equal(single(memory), memory[:, 1])
    assert torch.equal(single.weights()[:, 1], torch.ones(4))
    assert torch.equal(LayerMixer(4, 3, mode="single", layer_index=-1)(memory), memory[:, 2])

    with pytest.raises(ValueError, match="fusion mode"):
        LayerMixer(4, 3, mode="attention")
    with pytest.raises(ValueError, match="layers"):
        LayerMixer(4, 3)(torch.randn(1, 2, 4, 5))


# ---------------------------------------------------------------- Projector / SemanticHead
def test_gated_residual_matches_formula() -> None:
    proj = Projector(6, 8, kind="gated_residual", hidden_dim=10)
    randomise_(proj)
    m = torch.randn(3, 4, 6)
    x = ln_ref(m, proj.ln_in.weight.detach(), proj.ln_in.bias.detach(), proj.ln_in.eps)
    base = linear_ref(x, proj.w_in)
    n = ln_ref(base, proj.ln.weight.detach(), proj.ln.bias.detach(), proj.ln.eps)
    update = linear_ref(gelu_ref(linear_ref(n, proj.w1)), proj.w2)
    gate = sigmoid_ref(linear_ref(n, proj.w_gate))
    expected = base + gate * update
    torch.testing.assert_close(proj(m), expected, rtol=1e-5, atol=1e-5)
    assert proj.w1.weight.shape == (10, 8) and proj.w2.weight.shape == (8, 10)
    assert proj.w_gate.weight.shape == (8, 8) and proj.w_in.weight.shape == (8, 6)
    # hidden defaults to H_b
    assert Projector(6, 8).w1.weight.shape == (8, 8)


def test_mlp2x_gelu_matches_formula() -> None:
    proj = Projector(6, 8, kind="mlp2x_gelu")
    randomise_(proj, seed=1)
    m = torch.randn(2, 4, 6)
    x = ln_ref(m, proj.ln_in.weight.detach(), proj.ln_in.bias.detach(), proj.ln_in.eps)
    expected = linear_ref(gelu_ref(linear_ref(x, proj.w1)), proj.w2)
    torch.testing.assert_close(proj(m), expected, rtol=1e-5, atol=1e-5)
    assert proj.w1.weight.shape == (8, 6) and proj.w2.weight.shape == (8, 8)
    assert not hasattr(proj, "w_gate")


def test_semantic_head_matches_formula() -> None:
    head = SemanticHead(8, 5)
    randomise_(head, seed=2)
    x = torch.randn(3, 8)
    expected = linear_ref(gelu_ref(linear_ref(x, head.w1)), head.w2)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    assert head.w1.weight.shape == (8, 8) and head.w2.weight.shape == (5, 8)


# ---------------------------------------------------------------- GAGAdapter
def make_config(**kw: object) -> AdapterConfig:
    base = dict(expert_hidden=12, base_hidden=32, slots=4, layers=2, layer_keys=["last", "minus2"])
    base.update(kw)
    return AdapterConfig(**base)  # type: ignore[arg-type]


def test_adapter_project_is_mixer_then_projector_in_fp32() -> None:
    adapter = GAGAdapter(make_config(semantic_dim=6))
    randomise_(adapter)
    memory = torch.randn(3, 2, 4, 12, dtype=torch.bfloat16)
    out = adapter.project(memory)
    assert out.shape == (3, 4, 32) and out.dtype == torch.float32
    expected = adapter.projector(adapter.mixer(memory.float()))
    torch.testing.assert_close(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adapter.project(memory).dtype == torch.float32
        assert adapter.semantic(torch.randn(3, 32)).dtype == torch.float32
    assert GAGAdapter(make_config()).semantic_head is None
    with pytest.raises(GAGError, match="semantic head"):
        GAGAdapter(make_config()).semantic(torch.randn(1, 32))


def test_slot_dropout_only_in_training_and_drops_whole_slots() -> None:
    torch.manual_seed(0)
    adapter = GAGAdapter(make_config(slot_dropout=0.5))
    memory = torch.randn(16, 2, 4, 12)
    adapter.eval()
    clean = adapter.project(memory)
    empty = adapter.projector(torch.zeros(12))  # a dropped slot = projection of a zero vector
    adapter.train()
    noisy = adapter.project(memory)
    dropped = torch.isclose(noisy, empty.expand_as(noisy), atol=1e-6).all(-1)
    kept = torch.isclose(noisy, clean, atol=1e-6).all(-1)
    assert bool((dropped | kept).all())
    assert 0 < int(dropped.sum()) < dropped.numel()


def test_config_is_json_serialisable_and_validates() -> None:
    cfg = make_config(semantic_dim=7, memory_schema={"pooling": "segment_softmax", "S": 4})
    again = AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="layer_keys"):
        make_config(layer_keys=["last"])
    with pytest.raises(ValueError, match="projector"):
        make_config(projector="linear")
    with pytest.raises(ValueError, match="slot_dropout"):
        make_config(slot_dropout=1.0)


# ---------------------------------------------------------------- inject
GAG_ID = 63


def test_inject_places_vectors_in_order_and_leaves_rest() -> None:
    ids = torch.tensor(
        [
            [1, 2, GAG_ID, GAG_ID, 5, GAG_ID, 7, 8],
            [GAG_ID, 3, 4, 5, 6, 7, GAG_ID, GAG_ID],
        ]
    )
    embeds = torch.randn(2, 8, 16)
    original = embeds.clone()
    slots = torch.randn(2, 3, 16)
    out = inject(embeds, ids, GAG_ID, slots)
    assert torch.equal(embeds, original), "inject must be out of place"
    for row, positions in enumerate([[2, 3, 5], [0, 6, 7]]):
        for slot, pos in enumerate(positions):
            assert torch.equal(out[row, pos], slots[row, slot])
        others = [t for t in range(8) if t not in positions]
        assert torch.equal(out[row, others], embeds[row, others])


def test_inject_casts_to_embedding_dtype() -> None:
    ids = torch.tensor([[GAG_ID, 1, GAG_ID]])
    embeds = torch.randn(1, 3, 4, dtype=torch.bfloat16)
    slots = torch.randn(1, 2, 4)
    out = inject(embeds, ids, GAG_ID, slots)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0, 2], slots[0, 1].to(torch.bfloat16))


def test_inject_count_mismatch_raises_with_counts() -> None:
    ids = torch.tensor([[GAG_ID, GAG_ID, 1], [GAG_ID, GAG_ID, GAG_ID]])
    with pytest.raises(InjectionError, match=r"row 1: found 3 <GAG> tokens .* but 2 memory vectors"):
        inject(torch.randn(2, 3, 4), ids, GAG_ID, torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match=r"row 0: found 0 <GAG>"):
        inject(torch.randn(1, 3, 4), torch.tensor([[1, 2, 3]]), GAG_ID, torch.randn(1, 2, 4))


def test_inject_gradients_flow_to_slot_vectors() -> None:
    ids = torch.tensor([[1, GAG_ID, GAG_ID, 2]])
    embeds = torch.randn(1, 4, 3, requires_grad=True)
    slots = torch.randn(1, 2, 3, requires_grad=True)
    weights = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    (inject(embeds, ids, GAG_ID, slots) * weights).sum().backward()
    assert torch.equal(slots.grad, weights[:, 1:3])
    assert torch.equal(embeds.grad[0, 1:3], torch.zeros(2, 3))
    assert torch.equal(embeds.grad[0, [0, 3]], weights[0, [0, 3]])


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize(
    "kw",
    [
        dict(semantic_dim=6),
        dict(projector="mlp2x_gelu", fusion="uniform"),
        dict(fusion="single", layer_index=1, projector_hidden=20),
    ],
)
def test_save_load_round_trip(tmp_path, kw: dict) -> None:
    adapter = GAGAdapter(make_config(base_model="tiny-llama", memory_schema={"S": 4}, **kw))
    randomise_(adapter, seed=3)  # includes a non-zero learned layer mix when fusion == "learned"
    adapter.eval()
    folder = save_adapter(adapter, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    loaded = load_adapter(folder)
    assert loaded.config == adapter.config
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if adapter.mixer.logits is not None:
        assert bool((loaded.mixer.logits != 0).any())
        assert torch.equal(loaded.layer_weights(), adapter.layer_weights())
    memory = torch.randn(2, 2, 4, 12)
    loaded.eval()
    assert torch.equal(loaded.project(memory), adapter.project(memory))
    if adapter.semantic_head is not None:
        x = torch.randn(2, 32)
        assert torch.equal(loaded.semantic(x), adapter.semantic(x))


def test_load_missing_adapter_names_stage(tmp_path) -> None:
    with pytest.raises(MissingArtifactError, match="gag"):
        load_adapter(tmp_path / "nothing")


# ---------------------------------------------------------------- tokenizer helpers
def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz :<>GAKQ\n")
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<eos>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def tiny_llama(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def tiny_qwen3(vocab: int = 64):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(cfg)


def test_placeholder_is_a_spare_special_token_or_a_mark_and_never_changes_the_tokenizer() -> None:
    from gag_lightning.errors import SchemaMismatchError
    from gag_lightning.models.tiny import build_tokenizer
    from gag_lightning.prompts import MARK_ID, Placeholder, choose_placeholder, decode_prompt, encode_text

    plain = build_tokenizer()  # every special token is eos / pad or named by the chat template
    size = len(plain)
    assert choose_placeholder(plain) == Placeholder(None, MARK_ID) and len(plain) == size
    spare = build_tokenizer(extra_special_tokens=["<spare_a>", "<spare_b>"])
    chosen = choose_placeholder(spare)
    assert chosen.token == "<spare_a>" and chosen.id == spare.convert_tokens_to_ids("<spare_a>")
    assert chosen.suppress_ids == [chosen.id] and Placeholder(None, MARK_ID).suppress_ids == []

    # splicing: the text around each placeholder is tokenised as around a special token; nothing is added
    text = f"<|im_start|>user\nKnowledge: {GAG_TOKEN * 3}\n<|im_end|>\n"
    for tok, ph in ((plain, MARK_ID), (spare, chosen.id)):
        ids = encode_text(tok, text, ph)
        assert ids.count(ph) == 3
        head = tok("<|im_start|>user\nKnowledge: ", add_special_tokens=False)["input_ids"]
        tail = tok("\n<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert ids == head + [ph] * 3 + tail
        assert decode_prompt(tok, ids, ph) == text
    native = spare(text.replace(GAG_TOKEN, "<spare_a>"), add_special_tokens=False)["input_ids"]
    assert encode_text(spare, text, chosen.id) == native  # = registering the spare token as <GAG> would give
    assert len(plain) == size and GAG_TOKEN not in plain.get_vocab()

    # the adapter records its placeholder; evaluation reuses it, or refuses a tokenizer that maps it elsewhere
    cfg = make_config()
    cfg.placeholder = chosen.to_dict()
    assert adapter_placeholder(cfg, spare) == chosen
    with pytest.raises(SchemaMismatchError, match="<spare_a>"):
        adapter_placeholder(cfg, plain)
    cfg.placeholder = None  # an adapter saved before placeholders were recorded: this tokenizer's choice
    assert adapter_placeholder(cfg, spare) == chosen and adapter_placeholder(cfg, plain).id == MARK_ID


# ---------------------------------------------------------------- end to end with a frozen tiny base
@pytest.mark.parametrize("make_base", [tiny_llama, tiny_qwen3])
def test_frozen_base_only_adapter_trains(make_base) -> None:
    base = make_base()
    base.requires_grad_(False)
    base.eval()
    snapshot = {k: v.detach().clone() for k, v in base.state_dict().items()}

    adapter = GAGAdapter(make_config(semantic_dim=6))
    adapter.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.0)
    before = {k: v.detach().clone() for k, v in adapter.state_dict().items()}

    ids = torch.tensor(
        [
            [1, 2, GAG_ID, GAG_ID, GAG_ID, GAG_ID, 3, 10, 11, 12],
            [4, GAG_ID, GAG_ID, GAG_ID, GAG_ID, 5, 6, 20, 21, 0],
        ]
    )
    attention = torch.tensor([[1] * 10, [1] * 9 + [0]])
    labels = torch.full_like(ids, -100)
    labels[0, 7:] = ids[0, 7:]
    labels[1, 7:9] = ids[1, 7:9]
    memory = torch.randn(2, 2, 4, 12)

    slots = adapter.project(memory)
    embeds = inject(base.get_input_embeddings()(ids), ids, GAG_ID, slots)
    out = base(inputs_embeds=embeds, attention_mask=attention, output_hidden_states=True)
    nll = answer_nll(out.logits, labels)
    pooled = masked_mean(out.hidden_states[-1], labels != -100)
    sem = semantic_loss(adapter.semantic(pooled), torch.randn(2, 6))
    div = diversity_loss(slots)
    total, parts = gag_loss(nll, sem, div)
    assert set(parts) == {"nll", "sem", "div", "total"}
    total.backward()

    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    for name, p in adapter.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert adapter.mixer.logits.grad.abs().sum() > 0

    opt.step()
    adapter.clamp_()
    for k, v in base.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, before[k])]
    assert "mixer.logits" in changed and "projector.w_in.weight" in changed
