"""Every prompt this project renders, in one place (METHOD.md sections 2, 3, 4, 5b and 6).

Keeping the texts and the chat-template rendering together means the expert's training prompt,
its background prompt and the base model's injection prompt can be compared side by side, and
a user changing one of them changes it everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GAG_TOKEN = "<GAG>"
DEFAULT_REQUEST_TEXT = "Please answer the following question based on the knowledge provided."
GENERAL_INSTRUCTION = "You are a helpful assistant."
GENERAL_REQUEST_TEXT = "Please answer the following question."
# reconstruction warm-up (METHOD.md section 5b): the base regenerates the background from the slots alone
RECON_INSTRUCTION = "Repeat the background knowledge."

Messages = list[dict[str, str]]


def sft_user_text(instruction: str, question: str) -> str:
    """Stage II user turn: `instruction.strip() + "\\nQuestion: " + input.strip()`."""
    return f"{instruction.strip()}\nQuestion: {question.strip()}"


def sft_messages(instruction: str, question: str) -> Messages:
    return [{"role": "user", "content": sft_user_text(instruction, question)}]


def background_messages(
    question: str, system_prompt: str, instruction: str = "", style: str = "reference"
) -> Messages:
    """Expert prompt for background generation.

    `reference` is the reference release's prompt (system prompt + bare question), kept as the
    default for parity; `sft` reuses the Stage II prompt the expert was fine-tuned on (METHOD.md
    section 8 notes the mismatch).
    """
    if style == "reference":
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    if style == "sft":
        return sft_messages(instruction, question)
    raise ValueError(f"unknown background prompt style '{style}' (reference, sft)")


def gag_user_text(instruction: str, request_text: str, question: str, num_slots: int,
                  gag_token: str = GAG_TOKEN) -> str:
    """Stage III user turn: instruction, request, question and S `<GAG>` placeholders, one per line."""
    lines = [instruction, request_text, f"Question: {question}", "Knowledge: " + gag_token * num_slots]
    return "\n".join(lines) + "\n"


def context_user_text(instruction: str, request_text: str, question: str, context: str) -> str:
    """Baseline: the expert's background text placed in the prompt instead of latent slots."""
    lines = [instruction, request_text, f"Question: {question}", f"Knowledge: {context}"]
    return "\n".join(lines) + "\n"


def recon_user_text(num_slots: int, gag_token: str = GAG_TOKEN, instruction: str = RECON_INSTRUCTION) -> str:
    """Reconstruction warm-up user turn: the fixed instruction and the S placeholders, nothing else, so the
    only source of the background the base is asked to repeat is the injected memory."""
    return "\n".join([instruction, "Knowledge: " + gag_token * num_slots]) + "\n"


def plain_user_text(instruction: str, request_text: str, question: str) -> str:
    """Base-only and general-route prompt (METHOD.md section 6)."""
    return "\n".join([instruction, request_text, f"Question: {question}"]) + "\n"


def render_prompt(tokenizer: Any, messages: Messages, enable_thinking: bool = False) -> str:
    """Chat-template text with the generation prompt; templates without the thinking switch ignore it."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
    # A tokenizer without a template (a plain base LM): a minimal, explicit format.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def stop_token_ids(tokenizer: Any, generation_config: Any | None = None) -> list[int]:
    """All ids that end a turn: the generation config's eos list, the tokenizer's eos, known end-of-turn tokens."""
    ids: list[int] = []
    if generation_config is not None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if tok in vocab:
            ids.append(vocab[tok])
    return sorted(set(int(i) for i in ids))


def render_completion(
    tokenizer: Any, messages: Messages, answer: str, enable_thinking: bool = False,
    stop_ids: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, completion) where completion = the assistant answer through its end-of-turn token.

    The completion is cut right after the first stop token that follows the answer, so the loss
    teaches the model to stop, and template text after it (a trailing newline) is not trained.
    """
    prompt_text = render_prompt(tokenizer, messages, enable_thinking)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer = answer.strip()
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    tail_ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False, enable_thinking=enable_thinking
        )
        if full_text.startswith(prompt_text):
            suffix = full_text[len(prompt_text):]
            pos = suffix.find(answer)
            if pos >= 0:
                answer = suffix[: pos + len(answer)]
                tail_ids = tokenizer(suffix[pos + len(answer):], add_special_tokens=False)["input_ids"]
    completion = tokenizer(answer, add_special_tokens=False)["input_ids"]
    stop_at = next((i for i, t in enumerate(tail_ids) if t in stop_ids), None)
    if stop_at is not None:
        completion += tail_ids[: stop_at + 1]
    elif tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    return prompt_ids, completion
