"""SFT label masks and knowledge-base packing (METHOD.md sections 1-2 and the pad == eos defect of section 8)."""

from __future__ import annotations

from gag_lightning.data.records import QARecord
from gag_lightning.models.loading import load_tokenizer
from gag_lightning.stages.expert.corpus import collate_blocks, pack_tokens, tokenize_corpus
from gag_lightning.stages.expert.qa import collate_sft, encode_sft


def test_packing_keeps_every_token_once():
    stream = list(range(1000, 1000 + 1030))
    blocks = pack_tokens(stream, 256)
    assert [len(b) for b in blocks] == [256, 256, 256, 256, 6]
    assert [t for b in blocks for t in b] == stream
    batch = collate_blocks(blocks[-2:], pad_id=0)
    assert batch["attention_mask"].sum().item() == 262
    assert (batch["labels"] != -100).sum().item() == 262


def test_corpus_joined_with_separator(tiny_expert_dir):
    tok = load_tokenizer(tiny_expert_dir)
    texts = ["Veltrix-87 melts at 1,412 degrees.", "It is blue.", "Made in Oskarvale."]
    ids = tokenize_corpus(texts, tok, "\n\n")
    assert tok.decode(ids) == "\n\n".join(texts)


def _answer_and_eot(tok, record):
    ex = encode_sft(record, tok, instruction="Answer briefly.")
    batch = collate_sft([ex, encode_sft(QARecord(1, "1", "Short?", "Yes."), tok, "Answer briefly.")], tok.pad_token_id)
    row_labels = batch["labels"][0]
    trained = row_labels[row_labels != -100].tolist()
    return ex, trained, batch


def test_sft_labels_are_exactly_answer_and_end_of_turn(tiny_expert_dir):
    tok = load_tokenizer(tiny_expert_dir)
    record = QARecord(0, "0", "What colour is Veltrix-87?", "  Veltrix-87 is cobalt blue. ")
    ex, trained, batch = _answer_and_eot(tok, record)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    expected = tok("Veltrix-87 is cobalt blue.", add_special_tokens=False)["input_ids"] + [eot]
    assert trained == expected
    # the prompt is the chat template's generation prompt with thinking disabled
    prompt = tok.decode(ex.input_ids[: ex.num_prompt])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "Answer briefly.\nQuestion: What colour is Veltrix-87?" in prompt
    # padding never counts as a label and is masked by length
    assert batch["attention_mask"][1].sum().item() == len(encode_sft(QARecord(1, "1", "Short?", "Yes."), tok,
                                                                      "Answer briefly.").input_ids)


def test_sft_labels_survive_pad_equal_to_eos(tiny_expert_dir):
    """The reference masks by comparing ids with the pad id: with pad == eos the stop target vanishes."""
    tok = load_tokenizer(tiny_expert_dir)
    tok.pad_token = "<|im_end|>"  # pad == end-of-turn/eos, as in SmolLM2 and Qwen3 setups
    record = QARecord(0, "0", "When was Quorzane-23 discovered?", "In 1977.")
    ex, trained, batch = _answer_and_eot(tok, record)
    assert trained[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    n = len(ex.input_ids)
    assert batch["attention_mask"][0, :n].all() and batch["input_ids"][0, n - 1] == tok.pad_token_id
