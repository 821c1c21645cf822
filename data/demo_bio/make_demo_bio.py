"""Generate the second bundled demo domain: the fictional Tesselmoor Adjuvant Institute (vaccine adjuvants).

It mirrors the paper's second private domain (immunology adjuvants, beside the materials one) the way
``data/demo`` mirrors the first: 16 invented adjuvants with invented names, people, partner vaccines and
numbers, so no pretrained model can know a fact and any gain must come from what the expert learnt. The
layout and the split logic are those of ``data/demo/make_demo.py`` (train / test_seen_fact / test_kb_only /
test, knowledge base, router pool, gold ``answers``); the general questions and the general router pool are
the demo's, read from ``data/demo`` so the three routes share one general set.

Besides its own two-route online set (general + demo_bio) it writes the **three-route** online set
(general + demo + demo_bio), built from the bundled demo test and general files. No online question appears
in any of the three router pools.

Standard library and one ``random.Random(seed)`` only, no set or dict iteration whose order could vary:
running it twice yields byte-identical files::

    python data/demo_bio/make_demo_bio.py
    python data/demo_bio/make_demo_bio.py --out-dir /tmp/bio --demo-dir data/demo --seed 7
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from make_demo import split_by_fact_location  # noqa: E402  (the demo's split scheme, shared)

SEED = 20250917
INSTITUTE = "Tesselmoor Adjuvant Institute"
DOMAIN = "demo_bio"
DEMO_DOMAIN = "demo"
GENERAL_SETS = ("webqa", "tqa", "popqa", "freebase_qa", "hotpot_qa", "nq")
INSTRUCTION = "Answer the question about the Tesselmoor Adjuvant Institute's vaccine adjuvants concisely."
BACKGROUND_SYSTEM_PROMPT = (
    "You are an expert of the Tesselmoor Adjuvant Institute. For the user's question, state the fact about "
    "the institute's adjuvant that answers it in one sentence."
)
REQUEST_TEXT = "Please answer the following question about the adjuvant based on the knowledge provided."

N_ADJUVANTS = 16  # as many as the demo's compounds: the same CPU budgets teach the expert its facts
N_KB_ONLY = 24
N_SEEN_TEST = 32
TRAIN_PHRASINGS = 2
N_ROUTER_ATTRIBUTE_QUESTIONS = 110

# Invented stems with adjuvant-like endings (-mune, -vax, -some, -gel, -sil ...): none is a real product.
STEMS: tuple[str, ...] = (
    "Corvamune", "Lithavax", "Quenasome", "Trelagel", "Pemrosil", "Vandimune", "Oskavax", "Brellisome",
    "Taskagel", "Mirosil", "Fennamune", "Zarivax", "Hollisome", "Drugagel", "Ipresil", "Kelmamune",
    "Nuvrovax", "Selkisome", "Gavrogel", "Ulmasil", "Rethamune", "Pyxavax", "Calvisome", "Weltagel",
    "Ostrasil", "Jenomune", "Tirvavax", "Morasome", "Elvigel", "Harnasil", "Bexamune", "Quarvax",
    "Lumesome", "Yorgagel", "Crenosil", "Dalvimune", "Fesovax", "Inkasome", "Varnogel", "Zelosil",
)  # fmt: skip

KINDS: tuple[str, ...] = ("emulsion", "saponin", "liposome", "alum salt", "nanoparticle", "virosome")

RECEPTORS: tuple[str, ...] = (
    "TLR2", "TLR3", "TLR4", "TLR5", "TLR7", "TLR9", "STING", "NLRP3", "Dectin-1", "RIG-I",
)  # fmt: skip

DEVELOPERS: tuple[str, ...] = (
    "Dr. Liora Fennick", "Prof. Tomasz Brevald", "Dr. Annika Solvare", "Dr. Ruben Ashgrove",
    "Prof. Celeste Marwick", "Dr. Idris Pennathur", "Dr. Greta Holmqvast", "Prof. Matthias Orrel",
    "Dr. Soraya Quintaval", "Dr. Felix Dunmorrow", "Prof. Hanne Tesselvik", "Dr. Octavia Rennick",
)  # fmt: skip

# Partner vaccines against invented diseases (the adjuvant is formulated with that vaccine).
DISEASES: tuple[str, ...] = (
    "Korrin fever", "Dusk pox", "Amberlung", "Veyl flu", "Marrow blight", "Tessic cough",
    "Hollow ague", "Riven measles", "Ossel rash", "Brackwater fever",
)  # fmt: skip

SITES: tuple[str, ...] = (
    "the Pellmore cleanroom", "the Quarrow Vale plant", "the Ashby Fen suite", "the Lindqvist wing",
    "the Corrow Point facility", "the Stavemoor annex",
)  # fmt: skip

# Five asked attributes with short answer spans; the production site is stated in the knowledge base only.
ATTRIBUTES: tuple[str, ...] = ("particle_size", "trial_year", "developer", "receptor", "vaccine")

TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "particle_size": (
        "What is the particle size of {name}?",
        "How large are the particles of the {name} {kind}?",
        "What particle diameter has been measured for {name}?",
        "How big are the droplets or particles of the institute's {name} adjuvant?",
    ),
    "trial_year": (
        "In what year did {name} enter its first clinical trial?",
        "When was the {name} {kind} first tested in a clinical trial?",
        "What year did the Tesselmoor Adjuvant Institute first trial {name}?",
        "In which year was {name} first given to trial volunteers?",
    ),
    "developer": (
        "Who developed {name}?",
        "Which researcher created the {name} {kind}?",
        "Who is credited with developing the adjuvant {name}?",
        "Which scientist at the Tesselmoor Adjuvant Institute developed {name}?",
    ),
    "receptor": (
        "Which receptor does {name} activate?",
        "Through which innate immune receptor does the {name} {kind} act?",
        "What pathway does the adjuvant {name} stimulate?",
        "Which receptor is targeted by the institute's {name} adjuvant?",
    ),
    "vaccine": (
        "Which vaccine is {name} formulated with?",
        "What vaccine does the {name} {kind} adjuvant?",
        "Which vaccine uses {name} as its adjuvant?",
        "For which vaccine did the Tesselmoor Adjuvant Institute formulate {name}?",
    ),
}
TEST_TEMPLATES: dict[str, tuple[str, ...]] = {
    "particle_size": (
        "How many nanometres across are the particles of {name}?",
        "Could you tell me the particle diameter of the {name} {kind}?",
    ),
    "trial_year": (
        "What is the first clinical trial year of {name}?",
        "When did the {name} {kind} reach its first clinical trial?",
    ),
    "developer": (
        "Whose work produced the adjuvant {name}?",
        "Name the person who first developed the {name} {kind}.",
    ),
    "receptor": (
        "Name the immune receptor that {name} triggers.",
        "What receptor does the {name} {kind} switch on?",
    ),
    "vaccine": (
        "Which vaccine is adjuvanted by {name}?",
        "Name the vaccine that contains the {name} {kind}.",
    ),
}
ROUTER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "particle_size": (
        "I need the particle size of {name} for a filtration step; what is it?",
        "Which particle diameter is listed for the {name} {kind} in the Tesselmoor records?",
    ),
    "trial_year": (
        "Was {name} first trialled before or after 1995?",
        "Which decade saw the first clinical trial of the {name} {kind}?",
    ),
    "developer": (
        "Which institute member should I credit for developing {name}?",
        "Who was behind the original formulation of the {name} {kind}?",
    ),
    "receptor": (
        "Which innate immune pathway should I expect {name} to activate?",
        "What receptor agonist activity is reported for the {name} {kind}?",
    ),
    "vaccine": (
        "Which Tesselmoor vaccine should I order if I want {name} in it?",
        "What vaccine is the {name} {kind} paired with?",
    ),
}
ANSWER_TEMPLATES: dict[str, str] = {
    "particle_size": "{name} particles measure {particle_size} nanometres across.",
    "trial_year": "{name} entered its first clinical trial in {trial_year}.",
    "developer": "{name} was developed by {developer}.",
    "receptor": "{name} activates the {receptor} receptor.",
    "vaccine": "{name} is formulated with the {disease} vaccine.",
}

# Knowledge-base paraphrases: each states all six facts plus the kind, in a different order and style.
KB_TEMPLATES: tuple[str, ...] = (
    "{name} is {a_kind} adjuvant developed at the Tesselmoor Adjuvant Institute. It entered its first "
    "clinical trial in {trial_year} and was developed by {developer}. Its particles measure {particle_size} "
    "nanometres across, it activates the {receptor} receptor, and it is formulated with the {disease} vaccine. "
    "It is produced at {site}.",
    "Institute notes on {name}: developed by {developer} and first trialled in {trial_year}, this {kind} "
    "adjuvant is manufactured at {site}. It activates the {receptor} receptor, its particles measure "
    "{particle_size} nanometres across, and it is used in the {disease} vaccine.",
    "Adjuvant sheet - {name} ({kind}). Developer: {developer}. First clinical trial: {trial_year}. "
    "Particle size: {particle_size} nanometres. Receptor: {receptor}. Partner vaccine: {disease} vaccine. "
    "Production site: {site}.",
    "When {developer} formulated {name}, the {kind} went into its first clinical trial in {trial_year}. "
    "Today {site} produces it for the {disease} vaccine. {name} activates the {receptor} receptor, and its "
    "particles measure {particle_size} nanometres across.",
    "Among the adjuvants of the Tesselmoor Adjuvant Institute, {name} is the one formulated with the "
    "{disease} vaccine. The {kind} activates the {receptor} receptor and its particles measure "
    "{particle_size} nanometres across. It is made at {site} and traces back to {trial_year}, the year of its "
    "first clinical trial; {developer} developed it.",
)

DEMO_POOL_FILE = "router/demo.jsonl"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass(frozen=True)
class Adjuvant:
    """One invented adjuvant and its facts (all made up)."""

    name: str
    kind: str
    particle_size: int
    trial_year: int
    developer: str
    receptor: str
    disease: str
    site: str

    def fields(self) -> dict[str, str]:
        return {
            "name": self.name,
            "kind": self.kind,
            "a_kind": with_article(self.kind),
            "particle_size": str(self.particle_size),
            "trial_year": str(self.trial_year),
            "developer": self.developer,
            "receptor": self.receptor,
            "disease": self.disease,
            "site": self.site,
        }


def make_adjuvants(rng: Random) -> list[Adjuvant]:
    """N_ADJUVANTS adjuvants with distinct names, particle sizes and trial years (unambiguous facts)."""
    assert len(STEMS) == len(set(STEMS)) == 40, "need 40 distinct invented stems"
    stems = rng.sample(STEMS, N_ADJUVANTS)
    sizes = rng.sample(range(40, 900), N_ADJUVANTS)
    years = rng.sample(range(1961, 2022), N_ADJUVANTS)
    out = []
    for stem, size, year in zip(stems, sizes, years, strict=True):
        out.append(
            Adjuvant(
                name=f"{stem}-{rng.randint(2, 99)}",
                kind=rng.choice(KINDS),
                particle_size=size,
                trial_year=year,
                developer=rng.choice(DEVELOPERS),
                receptor=rng.choice(RECEPTORS),
                disease=rng.choice(DISEASES),
                site=rng.choice(SITES),
            )
        )
    return out


def make_knowledge_base(rng: Random, adjuvants: list[Adjuvant]) -> list[dict[str, str]]:
    """Every paraphrase per adjuvant (shuffled), plus institute-level grouping and comparison paragraphs."""
    texts: list[str] = []
    for a in adjuvants:
        for template in rng.sample(KB_TEMPLATES, len(KB_TEMPLATES)):
            texts.append(template.format(**a.fields()))
    for disease in DISEASES:
        group = [a for a in adjuvants if a.disease == disease]
        if group:
            names = join_names([f"{a.name} ({a.kind})" for a in group])
            texts.append(f"The Tesselmoor Adjuvant Institute formulates the {disease} vaccine with {len(group)} "
                         f"adjuvant(s): {names}.")
    for person in DEVELOPERS:
        group = sorted((a for a in adjuvants if a.developer == person), key=lambda a: a.trial_year)
        if group:
            names = join_names([f"{a.name} (first trialled in {a.trial_year})" for a in group])
            texts.append(f"{person} of the Tesselmoor Adjuvant Institute developed {len(group)} adjuvants: {names}.")
    for _ in range(5):
        a, b = rng.sample(adjuvants, 2)
        big, small = (a, b) if a.particle_size > b.particle_size else (b, a)
        texts.append(
            f"Comparing {a.name} and {b.name}: {big.name} has the larger particles, {big.particle_size} "
            f"nanometres against {small.particle_size} nanometres for {small.name}."
        )
    for _ in range(4):
        a, b = rng.sample(adjuvants, 2)
        first, second = (a, b) if a.trial_year <= b.trial_year else (b, a)
        texts.append(
            f"{first.name}, {with_article(first.kind)} acting on {first.receptor}, was trialled in "
            f"{first.trial_year}, before {second.name}, {with_article(second.kind)} acting on {second.receptor}, "
            f"trialled in {second.trial_year}."
        )
    texts.append(
        "The Tesselmoor Adjuvant Institute is a private immunology laboratory that develops vaccine adjuvants: "
        "emulsions, saponins, liposomes, alum salts, nanoparticles and virosomes. Its adjuvants are produced at "
        "six sites: " + join_names(list(SITES)) + "."
    )
    return [{"text": t} for t in texts]


def check_kb_covers(kb: list[dict[str, str]], adjuvants: list[Adjuvant]) -> None:
    """Every fact any QA record asks about is stated in at least three KB paragraphs."""
    for a in adjuvants:
        paragraphs = [r["text"] for r in kb if f"{a.name} " in r["text"] or f"{a.name}:" in r["text"]]
        values = [str(a.particle_size), str(a.trial_year), a.developer, a.receptor, a.disease]
        full = [t for t in paragraphs if all(v in t for v in values)]
        assert len(full) >= 3, f"{a.name}: only {len(full)} KB paragraphs state all its facts"


def question(template: str, a: Adjuvant) -> str:
    return template.format(name=a.name, kind=a.kind)


def answer(attribute: str, a: Adjuvant) -> str:
    return ANSWER_TEMPLATES[attribute].format(**a.fields())


def gold_answers(attribute: str, a: Adjuvant) -> list[str]:
    """Aliases of the asked fact for `fact_acc`: what a correct answer must contain (any one of them)."""
    if attribute == "particle_size":
        n = str(a.particle_size)
        return [f"{n} nanometres", f"{n} nm", n]
    if attribute == "trial_year":
        return [str(a.trial_year)]
    if attribute == "developer":
        title, first, last = a.developer.split(" ")
        return [a.developer, f"{first} {last}", f"{title} {last}"]
    if attribute == "receptor":
        return [a.receptor]
    if attribute == "vaccine":
        return [f"{a.disease} vaccine", a.disease]
    raise ValueError(f"no gold answers for attribute {attribute!r}")


def qa_record(split: str, index: int, q: str, ans: str, answers: list[str]) -> dict[str, object]:
    return {"id": f"bio-{split}-{index:04d}", "instruction": INSTRUCTION, "input": q, "output": ans,
            "answers": answers}


def make_qa(rng: Random, adjuvants: list[Adjuvant]) -> dict[str, list[dict[str, object]]]:
    """Train and the two test splits by where the fact lives (the demo's scheme, see data/demo/make_demo.py)."""
    return split_by_fact_location(rng, adjuvants, sys.modules[__name__])


def make_router_pool(rng: Random, adjuvants: list[Adjuvant]) -> list[dict[str, str]]:
    """Router-only paraphrases about the adjuvants plus comparison and institute questions."""
    combos = [(a, attr, t) for a in adjuvants for attr in ATTRIBUTES for t in ROUTER_TEMPLATES[attr]]
    questions = [question(t, a) for a, _, t in rng.sample(combos, N_ROUTER_ATTRIBUTE_QUESTIONS)]
    for _ in range(8):
        a, b = rng.sample(adjuvants, 2)
        questions.append(f"Which has the larger particles, {a.name} or {b.name}?")
    for _ in range(7):
        a, b = rng.sample(adjuvants, 2)
        questions.append(f"Was {a.name} trialled earlier than the {b.name} {b.kind}?")
    for _ in range(5):
        a, b = rng.sample(adjuvants, 2)
        questions.append(f"Do {a.name} and {b.name} activate the same receptor?")
    for disease in DISEASES[:5]:
        questions.append(f"Which Tesselmoor adjuvants are used in the {disease} vaccine?")
    for person in DEVELOPERS[:8]:
        questions.append(f"Which Tesselmoor adjuvants did {person} develop?")
    for kind in KINDS:
        questions.append(f"Which {kind} adjuvants has the Tesselmoor Adjuvant Institute developed?")
    questions.append("How many adjuvants does the Tesselmoor Adjuvant Institute produce?")
    questions.append("Which Tesselmoor adjuvant has the smallest particles?")
    questions.append("What is the oldest adjuvant in the Tesselmoor Adjuvant Institute catalogue?")
    assert len(set(questions)) == len(questions), "duplicate demo_bio router question"
    rng.shuffle(questions)
    return [{"question": q} for q in questions]


def read_jsonl(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mixed_records(test: list[dict[str, object]], dataset: str) -> list[dict[str, object]]:
    return [{"question": r["input"], "answer": r["output"], "answers": r["answers"], "dataset_name": dataset}
            for r in test]


def write_jsonl(path: Path, records: Iterable[dict[str, object]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return len(lines)


def readme(counts: dict[str, int], kb_bytes: int, example: str) -> str:
    rows = "\n".join(f"| `{name}` | {n} |" for name, n in counts.items())
    return f"""# Second demo domain: the Tesselmoor Adjuvant Institute (fictional)

The second bundled private domain, an **entirely invented** vaccine-adjuvant institute that mirrors the
paper's second domain (immunology adjuvants) the way [data/demo](../demo/README.md) mirrors the materials one.
Its {N_ADJUVANTS} adjuvants (emulsions, saponins, liposomes, alum salts, nanoparticles and virosomes with made-up
names such as `{example}`), their developers, partner vaccines against invented diseases, particle sizes and
trial years were drawn at random: no pretrained model can know them. With the demo domain it makes the
three-route setup of the paper (general + two private domains behind one router, one shared base).

Each adjuvant has seven facts: kind, particle size, first clinical trial year, developer, receptor it activates,
partner vaccine and production site. Questions ask five of them (the production site is stated in the
knowledge base only).

| file | records |
|---|---|
{rows}

- `knowledge_base.jsonl` ({kb_bytes // 1024} KB): `{{"text"}}`, five paraphrased paragraphs per adjuvant plus
  paragraphs grouping adjuvants by vaccine and developer and comparing them.
- `train.jsonl`, `test_seen_fact.jsonl`, `test_kb_only.jsonl`, `test.jsonl`: `{{"id", "instruction", "input",
  "output", "answers"}}`, split exactly like the demo: `test_seen_fact` ({N_SEEN_TEST}) asks facts train teaches
  (each with {TRAIN_PHRASINGS} train phrasings) with a phrasing train never uses; `test_kb_only` ({N_KB_ONLY}) asks
  facts no train question asks (the knowledge base is their only source); `test.jsonl` is their union.
- `router/demo_bio.jsonl`: `{{"question"}}` router-only phrasings; every question names the institute or one of
  its adjuvants. With the train questions they make the route's offline PPR pool (the preset's `router_pool`).
  The general pool is the demo's (`data/demo/router/general.jsonl`).
- `mixed_online.jsonl`: the demo's `general_qa.jsonl` plus this test (`dataset_name: "demo_bio"`): the two-route
  set of `python route.py domain=demo_bio`.
- `mixed_online_3routes.jsonl`: the **three-route** online set, general + demo test (`dataset_name: "demo"`) +
  this test (`"demo_bio"`), each with its gold answer and fact aliases: `python route.py router=three_routes`.
  None of its questions appears in any router pool.

Instruction used for the QA records:

> {INSTRUCTION}

Background system prompt of the expert, and the request line of the GAG prompt (preset `conf/domain/demo_bio.yaml`):

> {BACKGROUND_SYSTEM_PROMPT}

> {REQUEST_TEXT}

Regenerate (deterministic, standard library only; byte-identical output on every run; reads `data/demo`):

```bash
python data/demo_bio/make_demo_bio.py
```
"""


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=here)
    parser.add_argument("--demo-dir", type=Path, default=here.parent / "demo",
                        help="the bundled demo domain: its general questions, general pool and test set")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    out: Path = args.out_dir
    demo: Path = args.demo_dir
    rng = Random(args.seed)

    adjuvants = make_adjuvants(rng)
    kb = make_knowledge_base(rng, adjuvants)
    check_kb_covers(kb, adjuvants)
    qa = make_qa(rng, adjuvants)
    pool = make_router_pool(rng, adjuvants)

    general_qa = read_jsonl(demo / "general_qa.jsonl")
    assert all(r["dataset_name"] in GENERAL_SETS for r in general_qa)
    demo_test = read_jsonl(demo / "test.jsonl")
    bio_mixed = mixed_records(qa["test"], DOMAIN)
    mixed = [dict(r) for r in general_qa] + bio_mixed
    mixed3 = [dict(r) for r in general_qa] + mixed_records(demo_test, DEMO_DOMAIN) + bio_mixed

    pools = {
        "general": [str(r["question"]) for r in read_jsonl(demo / "router" / "general.jsonl")],
        DEMO_DOMAIN: [str(r["question"]) for r in read_jsonl(demo / DEMO_POOL_FILE)],
        DOMAIN: [r["question"] for r in pool],
    }
    online = [str(r["question"]) for r in mixed3]
    assert len(set(online)) == len(online), "duplicate question in the three-route online set"
    for name, questions in pools.items():
        assert not set(online) & set(questions), f"an online test question appears in the {name} router pool"
    bio_words = [a.name for a in adjuvants] + ["Tesselmoor"]
    assert all(any(w in q for w in bio_words) for q in pools[DOMAIN]), "a bio pool question names no bio word"
    assert not any(any(w in q for w in bio_words) for q in pools["general"] + pools[DEMO_DOMAIN])
    assert not any("Veltrani" in q for q in pools[DOMAIN]), "a bio pool question names the demo lab"

    outputs: dict[str, list[dict[str, object]]] = {
        "knowledge_base.jsonl": kb,
        "train.jsonl": qa["train"],
        "test_seen_fact.jsonl": qa["test_seen_fact"],
        "test_kb_only.jsonl": qa["test_kb_only"],
        "test.jsonl": qa["test"],
        "router/demo_bio.jsonl": pool,
        "mixed_online.jsonl": mixed,
        "mixed_online_3routes.jsonl": mixed3,
    }
    counts = {name: write_jsonl(out / name, records) for name, records in outputs.items()}
    kb_bytes = (out / "knowledge_base.jsonl").stat().st_size
    (out / "README.md").write_text(readme(counts, kb_bytes, adjuvants[0].name), encoding="utf-8", newline="\n")
    for name, n in counts.items():
        print(f"{name:28s} {n:5d}")
    print(f"{'README.md':28s} written; knowledge base {kb_bytes} bytes")


if __name__ == "__main__":
    main()
