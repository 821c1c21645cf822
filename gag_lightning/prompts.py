"""Every prompt this project renders, in one place (METHOD.md sections 2, 3, 4, 5b and 6).

Keeping the texts and the chat-template rendering together means the expert's training prompt,
its background prompt and the base model's injection prompt can be compared side by side, and
a user changing one of them changes it everywhere.

**One prompt builder.** ``build_messages(use, record, settings)`` is the only place a record becomes a
prompt, for every use: ``sft`` (the expert's Stage II turn; also the eval ``expert`` system), ``gag``
(Stage III training, the eval ``gag`` systems and routed answering), ``context`` (the expert_context
baseline and the KL teacher), ``rag`` and ``plain`` (the base alone, the LoRA baseline, the general route).
``encode_prompt`` turns the messages into token ids, and ``render_completion`` (training) computes its
prompt ids with it, so the same record gives the same ids in training and in evaluation. One rule for
each choice, applied everywhere:

* instruction: the record's own ``instruction`` (stripped) when it has a non-empty one, else the
  domain's (``PromptSettings.instruction``) -- ``record_instruction``;
* stripping: the question, the instruction and the knowledge text are stripped of surrounding whitespace.

**Slot placeholders without a new token.** The base stays the published model: no token is added to its
tokenizer and no row to its embeddings (a resize would give a tied output head a new random row). The
rendered text carries ``PLACEHOLDER_TEXT`` (``<GAG>``) where a memory slot goes; ``encode_prompt`` never
lets the tokenizer see it but splits the text there and puts the placeholder id at each slot position
(the tokenizer splits its special tokens the same way, so the ids around the slots are what a registered
``<GAG>`` token gave). The id is ``choose_placeholder``'s: an unused special token the tokenizer already
has, or ``MARK_ID`` (-1, no token at all) when it has none. The injection overwrites those positions and
the embedding lookup never reads them, so either id gives the base exactly the same input; a real token
id is suppressed in decoding, ``MARK_ID`` cannot be generated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gag_lightning.errors import SchemaMismatchError

PLACEHOLDER_TEXT = "<GAG>"
GAG_TOKEN = PLACEHOLDER_TEXT  # the name METHOD.md uses; it is a marker in the text, never a vocabulary entry
MARK_ID = -1  # the placeholder id when the tokenizer has no spare special token: no token, no embedding row
DEFAULT_REQUEST_TEXT = "Please answer the following question based on the knowledge provided."
GENERAL_INSTRUCTION = "You are a helpful assistant."
GENERAL_REQUEST_TEXT = "Please answer the following question."
# reconstruction warm-up (METHOD.md section 5b): the base regenerates the background from the slots alone
RECON_INSTRUCTION = "Repeat the background knowledge."
PROMPT_USES = ("sft", "gag", "context", "rag", "plain")

Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------- placeholder
@dataclass(frozen=True)
class Placeholder:
    """What marks the memory-slot positions in a prompt's token ids.

    ``token`` is an existing special token of the base tokenizer that no prompt or template uses (its id is a
    real vocabulary id, suppressed in decoding), or None: positions are marked with ``MARK_ID``, an id outside
    the vocabulary that the embedding lookup never sees (``stages.gag.injected_embeddings``) and no model can
    generate. Recorded in the adapter config so evaluation and routing use what training used.
    """

    token: str | None
    id: int

    @property
    def suppress_ids(self) -> list[int]:
        """Ids decoding must never produce: the placeholder token's (none for a mark)."""
        return [self.id] if self.token is not None else []

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "id": int(self.id)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Placeholder:
        return cls(token=data.get("token"), id=int(data["id"]))

    def check(self, tokenizer: Any, what: str = "the adapter") -> None:
        """Refuse a placeholder that does not fit ``tokenizer`` (a token it lacks or maps to another id)."""
        if self.token is None:
            if self.id != MARK_ID:
                raise SchemaMismatchError(f"{what} marks slots with id {self.id}; marks use {MARK_ID}")
            return
        have = tokenizer.convert_tokens_to_ids(self.token)
        if have != self.id or self.token not in tokenizer.get_vocab():
            raise SchemaMismatchError(
                f"{what} marks memory slots with the token {self.token!r} (id {self.id}), which this base "
                f"tokenizer maps to {have}: it was trained with another tokenizer; use the base it was trained on"
            )


def choose_placeholder(tokenizer: Any) -> Placeholder:
    """The first (lowest-id) special token of ``tokenizer`` that nothing uses, else a mark.

    Unused means: not bos/eos/pad/unk, not a stop id, and not named in the chat template (role and thinking
    markers are). SmolLM2's code-data tokens (``<repo_name>``, ``<gh_stars>``, ...) and Qwen3's vision
    tokens qualify; the tiny test models have none and get ``MARK_ID``. Deterministic for a given tokenizer.
    """
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    reserved |= set(stop_token_ids(tokenizer))
    template = str(getattr(tokenizer, "chat_template", None) or "")
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id in sorted(added):
        entry = added[token_id]
        content = str(getattr(entry, "content", entry))
        if getattr(entry, "special", False) and token_id not in reserved and content not in template:
            return Placeholder(content, int(token_id))
    return Placeholder(None, MARK_ID)


# ---------------------------------------------------------------------------------------------- records
def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def record_question(record: Any) -> str:
    """The record's question (``question``, else the QA files' ``input``), stripped."""
    question = _field(record, "question")
    if question is None:
        question = _field(record, "input")
    return str(question or "").strip()


def record_instruction(record: Any, default: str = "") -> str:
    """THE instruction rule: the record's own ``instruction`` if it has a non-empty one, else ``default`` (the
    domain's); stripped. Used by every prompt (SFT, Stage III, every eval system, routing, backgrounds)."""
    own = str(_field(record, "instruction") or "").strip()
    return own or str(default or "").strip()


@dataclass(frozen=True)
class PromptSettings:
    """The domain's prompt settings: its default instruction, the GAG/context request line and the request
    line of the prompts without knowledge (base alone, LoRA, general route)."""

    instruction: str = ""
    request_text: str = DEFAULT_REQUEST_TEXT
    base_request_text: str = GENERAL_REQUEST_TEXT

    @classmethod
    def from_domain(cls, domain: Any) -> PromptSettings:
        """From a ``domain`` config node (``instruction``, ``request_text``)."""
        return cls(instruction=str(domain.get("instruction") or ""),
                   request_text=str(domain.get("request_text", DEFAULT_REQUEST_TEXT)))


def build_messages(use: str, record: Any, settings: PromptSettings, *, num_slots: int = 0,
                   knowledge: str | None = None) -> Messages:
    """The chat messages of ``record`` for ``use`` (see the module docstring); ``record`` is a mapping or an
    object with ``question`` (or ``input``) and an optional ``instruction``. ``gag`` needs ``num_slots``;
    ``context`` / ``rag`` need ``knowledge`` (the background text / the joined passages)."""
    if use not in PROMPT_USES:
        raise ValueError(f"unknown prompt use {use!r}; expected one of {PROMPT_USES}")
    question = record_question(record)
    instruction = record_instruction(record, settings.instruction)
    if use == "sft":
        return sft_messages(instruction, question)
    if use == "gag":
        if num_slots < 1:
            raise ValueError(f"a gag prompt needs num_slots >= 1, got {num_slots}")
        text = gag_user_text(instruction, settings.request_text, question, num_slots)
    elif use == "plain":
        text = plain_user_text(instruction, settings.base_request_text, question)
    else:
        if knowledge is None:
            raise ValueError(f"a {use} prompt needs its knowledge text")
        text = context_user_text(instruction, settings.request_text, question, knowledge.strip())
    return [{"role": "user", "content": text}]


def encode_text(tokenizer: Any, text: str, placeholder_id: int | None = None) -> list[int]:
    """Token ids of rendered ``text``; with ``placeholder_id`` each ``PLACEHOLDER_TEXT`` becomes that id
    (the pieces between are tokenised on their own, as around any special token)."""
    if placeholder_id is None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    for i, piece in enumerate(text.split(PLACEHOLDER_TEXT)):
        if i:
            ids.append(int(placeholder_id))
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def encode_prompt(tokenizer: Any, messages: Messages, enable_thinking: bool = False,
                  placeholder_id: int | None = None) -> list[int]:
    """Prompt token ids (chat template with the generation prompt); GAG prompts pass ``placeholder_id``."""
    return encode_text(tokenizer, render_prompt(tokenizer, messages, enable_thinking), placeholder_id)


def decode_prompt(tokenizer: Any, ids: Sequence[int], placeholder_id: int | None = None) -> str:
    """Readable text of prompt ids, each placeholder shown as ``PLACEHOLDER_TEXT`` (for logs and tests)."""
    out, run = [], []
    for t in ids:
        if placeholder_id is not None and int(t) == int(placeholder_id):
            out.append(tokenizer.decode(run))
            out.append(PLACEHOLDER_TEXT)
            run = []
        else:
            run.append(int(t))
    out.append(tokenizer.decode(run))
    return "".join(out)


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
                  gag_token: str = PLACEHOLDER_TEXT) -> str:
    """Stage III user turn: instruction, request, question and S `<GAG>` placeholders, one per line."""
    lines = [instruction, request_text, f"Question: {question}", "Knowledge: " + gag_token * num_slots]
    return "\n".join(lines) + "\n"


def context_user_text(instruction: str, request_text: str, question: str, context: str) -> str:
    """Baseline: the expert's background text placed in the prompt instead of latent slots."""
    lines = [instruction, request_text, f"Question: {question}", f"Knowledge: {context}"]
    return "\n".join(lines) + "\n"


def recon_user_text(num_slots: int, gag_token: str = PLACEHOLDER_TEXT, instruction: str = RECON_INSTRUCTION) -> str:
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
    stop_ids: Sequence[int] | None = None, placeholder_id: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, completion) where completion = the assistant answer through its end-of-turn token.

    The prompt ids are ``encode_prompt``'s (what evaluation feeds the model). The completion is cut right after
    the first stop token that follows the answer, so the loss teaches the model to stop, and template text
    after it (a trailing newline) is not trained.
    """
    prompt_text = render_prompt(tokenizer, messages, enable_thinking)
    prompt_ids = encode_text(tokenizer, prompt_text, placeholder_id)
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
