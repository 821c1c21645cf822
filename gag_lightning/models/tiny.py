"""Tiny randomly initialised Qwen3 models with an offline-trained tokenizer, for tests and smoke runs.

Tests must exercise the real code paths (chat templates, special tokens, multi-layer hidden states,
generation with several eos ids) without a download, in seconds. The tokenizer is a byte-level BPE
trained on local text and carries a Qwen3-style chat template with the `enable_thinking` switch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from gag_lightning.artifacts import apply_umask

TINY_BUILDER_VERSION = 1

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3-style: the generation prompt gets an empty think block when thinking is disabled, and an
# assistant turn in the history is rendered the same way, so the prompt is a prefix of the full text.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

_BUILTIN_TEXT = (
    "You are a helpful assistant. Please answer the following question based on the knowledge provided.\n"
    "Question: What is the capital of France? The capital of France is Paris.\n"
    "Knowledge: background facts about materials, catalysts, alloys, melting points and discoveries.\n"
    "The quick brown fox jumps over the lazy dog. 0123456789 degrees Celsius, years, names, colours.\n"
)


def _corpus(corpus_files: Sequence[str | os.PathLike]) -> list[str]:
    texts = [_BUILTIN_TEXT]
    for f in corpus_files:
        path = Path(f)
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def build_tokenizer(corpus_files: Sequence[str | os.PathLike] = (), vocab_size: int = 1024,
                    extra_special_tokens: Sequence[str] = ()):
    """Byte-level BPE (every string encodes, nothing is unknown) with Qwen3-style specials.

    ``extra_special_tokens`` adds special tokens no template uses (like SmolLM2's ``<gh_stars>``): a tokenizer
    with a spare special token, for the placeholder tests (prompts.choose_placeholder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(corpus_files), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>", *extra_special_tokens],
    )
    fast.chat_template = QWEN3_STYLE_TEMPLATE
    return fast


def _digest(params: dict, corpus_files: Sequence[str | os.PathLike]) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for text in _corpus(corpus_files):
        h.update(text.encode())
    return h.hexdigest()[:12]


def build_tiny_lm(
    cache_root: str | os.PathLike,
    role: str = "expert",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    corpus_files: Sequence[str | os.PathLike] = (),
    extra_special_tokens: Sequence[str] = (),
) -> Path:
    """Build (once, cached by content hash) a tiny Qwen3 causal LM directory and return its path.

    Its embeddings have exactly one row per token (no spare row, like SmolLM2)."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    params = dict(version=TINY_BUILDER_VERSION, role=role, seed=seed, hidden=hidden_size, layers=num_layers,
                  heads=num_heads, kv=num_kv_heads, inter=intermediate_size, vocab=vocab_size,
                  max_pos=max_position_embeddings)
    if extra_special_tokens:  # only then: the folders of the models without any keep their names
        params["extra_special"] = list(extra_special_tokens)
    corpus_files = [str(f) for f in corpus_files]
    out = Path(cache_root) / f"tiny-{role}-{_digest(params, corpus_files)}"
    if (out / "config.json").is_file():
        return out
    tokenizer = build_tokenizer(corpus_files, vocab_size, list(extra_special_tokens))
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    apply_umask(tmp)  # safetensors writes model.safetensors 0600
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_encoder(
    cache_root: str | os.PathLike,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    vocab_size: int = 1024,
    corpus_files: Sequence[str | os.PathLike] = (),
    **_: object,
) -> Path:
    """A tiny random BERT saved as a sentence-transformers directory (Transformer + mean pooling).

    It has the same layout as the real all-MiniLM-L6-v2 directory, so every consumer (semantic
    target, BERTScore, STS, router) loads tiny and real encoders through one code path.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel, BertTokenizerFast

    params = dict(version=TINY_BUILDER_VERSION, kind="encoder", seed=seed, hidden=hidden_size, layers=num_layers,
                  heads=num_heads, inter=intermediate_size, vocab=vocab_size)
    corpus_files = [str(f) for f in corpus_files]
    out = Path(cache_root) / f"tiny-encoder-{_digest(params, corpus_files)}"
    if (out / "modules.json").is_file():
        return out
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(tok_models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(corpus_files), trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    bert_dir = tmp / "bert"
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=512)
    BertModel(config).save_pretrained(bert_dir)
    fast.save_pretrained(bert_dir)
    transformer = st_models.Transformer(str(bert_dir), max_seq_length=256)
    pooling = st_models.Pooling(hidden_size, pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(tmp / "st"))
    # flatten: the sentence-transformers directory is the encoder directory (like the MiniLM package's)
    shutil.move(str(tmp / "st"), str(out.with_name(out.name + f".st-{os.getpid()}")))
    shutil.rmtree(tmp)
    apply_umask(out.with_name(out.name + f".st-{os.getpid()}"))
    try:
        os.replace(out.with_name(out.name + f".st-{os.getpid()}"), out)
    except OSError:
        shutil.rmtree(out.with_name(out.name + f".st-{os.getpid()}"), ignore_errors=True)
    return out
