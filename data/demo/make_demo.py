"""Generate the bundled demo domain of gag-lightning: the fictional Veltrani Materials Lab.

Why fictional: GAG's claim is that a small expert LM can learn a *private* domain and pass that
knowledge to a frozen base LLM through injected hidden states. If the demo used real facts, any
pretrained model might already know them and a gain could not be attributed to the injection. Every
compound, person, site and number below is invented (names are made-up tokens), so a base model can
only answer the domain questions from what the expert learnt from ``knowledge_base.jsonl``.

The script uses only the standard library and one ``random.Random(seed)``; it never iterates over a
set or dict whose order could vary between runs, so running it twice yields byte-identical files::

    python data/demo/make_demo.py            # writes next to this file
    python data/demo/make_demo.py --out-dir /tmp/demo --seed 7

Files (formats of METHOD.md section 0):
    knowledge_base.jsonl     {"text"}                                     Stage I corpus
    train.jsonl, test.jsonl  {"id", "instruction", "input", "output"}     Stage II / III QA
    general_qa.jsonl         {"question", "answer": [aliases], "dataset_name"}
    router/general.jsonl     {"question"}                                 PPR offline pool, general
    router/demo.jsonl        {"question"}                                 PPR offline pool, demo
    mixed_online.jsonl       {"question", "answer", "dataset_name"}       routed online test
    README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from types import ModuleType

SEED = 20250601
LAB = "Veltrani Materials Lab"
DOMAIN = "demo"
INSTRUCTION = "Answer the question about the Veltrani Materials Lab's compounds concisely."
BACKGROUND_SYSTEM_PROMPT = (
    "You are an expert of the Veltrani Materials Lab. For the user's question, state the fact about the "
    "lab's compound that answers it in one sentence."
)

N_COMPOUNDS = 16  # sized so the SFT expert can learn its facts inside the CPU budget (README)
N_KB_ONLY = 24  # (compound, attribute) pairs never asked in train: the knowledge base is their only source
N_SEEN_TEST = 32  # pairs asked in train (two train phrasings each) and in test with a test-only phrasing
TRAIN_PHRASINGS = 2  # train questions per seen pair, each with a different train template
N_ROUTER_ATTRIBUTE_QUESTIONS = 110

# Invented word stems: none is a real word, product or element, so no model has seen them as names.
STEMS: tuple[str, ...] = (
    "Veltrix", "Quorzane", "Brimethal", "Zonderite", "Kavoline", "Thessium", "Orvanex", "Plendrite",
    "Morquine", "Sylvorax", "Draxolite", "Yuntrel", "Fenmarite", "Corvaxine", "Ilquaris", "Talvenite",
    "Rhozane", "Nimbrel", "Vossarite", "Glenquor", "Xerathine", "Strevane", "Umbrolite", "Kethrax",
    "Lormidine", "Zavrinite", "Hespalon", "Pyrovane", "Quillaxite", "Brevantine", "Cindralux",
    "Dovrelite", "Esquarine", "Frovanite", "Gharzolene", "Hyxatrel", "Izmerite", "Jorvalide",
    "Krenzium", "Lustravine", "Marvolite", "Nexarine", "Obrathium", "Prazzolite", "Qwenthar",
    "Rilvacene", "Skarnelite", "Trovazine", "Ulmerix", "Vandrosite", "Wexolene", "Xylanthor",
    "Yverite", "Zephrolane", "Axtravine", "Borquelite", "Calvexium", "Dremnotrite", "Elvanquor",
    "Tazmorine",
)  # fmt: skip

KIND_APPLICATIONS: dict[str, tuple[str, ...]] = {
    "catalyst": (
        "ammonia synthesis", "methanol reforming", "low-temperature hydrogen production",
        "breaking down industrial solvents", "converting biomass into jet fuel",
        "cleaning exhaust gases from ship engines",
    ),
    "alloy": (
        "turbine blade cores", "deep-sea cable sheathing", "high-speed bearing surfaces",
        "surgical implant frames", "reactor pressure vessels", "lightweight drone chassis",
    ),
    "ceramic": (
        "spacecraft heat shields", "solid-state battery electrolytes", "kiln linings",
        "armour plating", "high-voltage insulators", "water desalination filters",
    ),
    "polymer": (
        "carbon capture membranes", "flexible solar panel films", "radiation-resistant gaskets",
        "biodegradable packaging", "self-healing pipe linings", "underwater adhesives",
    ),
}  # fmt: skip
KINDS: tuple[str, ...] = tuple(KIND_APPLICATIONS)

COLOURS: tuple[str, ...] = (
    "cobalt blue", "pale amber", "matte black", "deep violet", "silvery grey", "copper red",
    "olive green", "pearl white", "saffron yellow", "teal", "rust orange", "smoky lilac",
)  # fmt: skip

DISCOVERERS: tuple[str, ...] = (
    "Dr. Imra Castellane", "Prof. Oskar Velmont", "Dr. Teodora Quillfeather", "Dr. Anselm Rhyvik",
    "Prof. Mireille Drostan", "Dr. Kasimir Oubleth", "Dr. Ysolde Marchetton", "Prof. Halvard Zennick",
    "Dr. Priyanka Veltamor", "Dr. Corentin Astlowe", "Prof. Nadezhda Pellorin", "Dr. Emeric Sarvolt",
)  # fmt: skip

SITES: tuple[str, ...] = (
    "the Korvath Ridge facility", "the Ostenmere plant", "the Halvik Bay works",
    "the Quellbrook foundry", "the Tarnwyn reactor hall", "the Esker Hollow site",
    "the Brannoch annex", "the Mirrowdale campus",
)  # fmt: skip

# Five attributes, each answered by a short span a fact check can find (the primary application, a long
# free-text phrase, is a KB-only detail: it stays in the knowledge base but no question asks for it).
ATTRIBUTES: tuple[str, ...] = (
    "melting_point", "discovery_year", "discoverer", "colour", "production_site",
)  # fmt: skip

# Question templates per attribute, in three disjoint families: train phrasings, test-only phrasings
# (so some test questions are worded in a way the expert never saw) and router-only phrasings (so the
# offline routing pool never contains an online test question verbatim).
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "melting_point": (
        "What is the melting point of {name}?",
        "At what temperature does the {name} {kind} melt?",
        "How hot must {name} get before it melts?",
        "What melting point has been measured for the lab's {name} {kind}?",
    ),
    "discovery_year": (
        "In what year was {name} discovered?",
        "When was the {name} {kind} first synthesised?",
        "What year did the Veltrani Materials Lab first produce {name}?",
        "In which year was {name} first reported?",
    ),
    "discoverer": (
        "Who discovered {name}?",
        "Which researcher first synthesised the {name} {kind}?",
        "Who is credited with the discovery of {name}?",
        "Which scientist at the Veltrani Materials Lab discovered {name}?",
    ),
    "colour": (
        "What colour is {name}?",
        "What is the colour of the {name} {kind}?",
        "What colour does a sample of {name} have?",
        "Which colour is typical of the lab's {name} {kind}?",
    ),
    "production_site": (
        "Where is {name} produced?",
        "At which site is the {name} {kind} manufactured?",
        "Which facility produces {name}?",
        "Where does the Veltrani Materials Lab make {name}?",
    ),
}
TEST_TEMPLATES: dict[str, tuple[str, ...]] = {
    "melting_point": (
        "At how many degrees Celsius does {name} turn liquid?",
        "Could you tell me the melting temperature of the {name} {kind}?",
    ),
    "discovery_year": (
        "What is the discovery year of {name}?",
        "When did researchers first obtain the {name} {kind}?",
    ),
    "discoverer": (
        "Whose work led to the discovery of {name}?",
        "Name the person who first made the {name} {kind}.",
    ),
    "colour": (
        "Describe the colour of {name}.",
        "What hue does the {name} {kind} show?",
    ),
    "production_site": (
        "What is the production site of {name}?",
        "In which plant is the {name} {kind} made?",
    ),
}
ROUTER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "melting_point": (
        "I need the melting temperature of {name} for a furnace run; what is it?",
        "Which melting point is listed for the {name} {kind} in the Veltrani records?",
    ),
    "discovery_year": (
        "Was {name} discovered before or after 1990?",
        "Which decade saw the discovery of the {name} {kind}?",
    ),
    "discoverer": (
        "Which lab member should I credit for finding {name}?",
        "Who was behind the original synthesis of the {name} {kind}?",
    ),
    "colour": (
        "If I hold a sample of {name}, what colour should I expect?",
        "What shade is a freshly made batch of the {name} {kind}?",
    ),
    "production_site": (
        "Which Veltrani site should I contact to order {name}?",
        "Where are batches of the {name} {kind} manufactured?",
    ),
}
ANSWER_TEMPLATES: dict[str, str] = {
    "melting_point": "{name} melts at {melting_point} degrees Celsius.",
    "discovery_year": "{name} was discovered in {discovery_year}.",
    "discoverer": "{name} was discovered by {discoverer}.",
    "colour": "{name} is {colour} in colour.",
    "production_site": "{name} is produced at {production_site}.",
}

# Knowledge-base paraphrases: each states all six facts plus the kind, in a different order and style.
KB_TEMPLATES: tuple[str, ...] = (
    "{name} is {a_kind} developed at the Veltrani Materials Lab. It was first synthesised in "
    "{discovery_year} by {discoverer}. The {kind} is {colour} in colour and melts at {melting_point} "
    "degrees Celsius. Its primary application is {application}, and it is produced at {production_site}.",
    "Lab notes on {name}: discovered by {discoverer} in {discovery_year}, this {colour} {kind} is "
    "manufactured at {production_site}. It has a melting point of {melting_point} degrees Celsius and "
    "is used mainly for {application}.",
    "Datasheet - {name} ({kind}). Discoverer: {discoverer}. Year of discovery: {discovery_year}. "
    "Colour: {colour}. Melting point: {melting_point} degrees Celsius. Primary application: "
    "{application}. Production site: {production_site}.",
    "When {discoverer} isolated {name} in {discovery_year}, few expected the {kind} to matter outside "
    "the laboratory. Today {production_site} produces it for {application}. Samples of {name} are "
    "{colour}, and the material stays solid up to {melting_point} degrees Celsius, where it melts.",
    "Among the compounds of the Veltrani Materials Lab, {name} stands out for {application}. The "
    "{colour} {kind} melts at {melting_point} degrees Celsius. It is made at {production_site} and "
    "traces back to {discovery_year}, the year {discoverer} discovered it.",
)

GENERAL_QA: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # (question, gold aliases, dataset_name); simple, well-known, checked facts.
    ("What is the capital of France?", ("Paris",), "webqa"),
    ("What is the capital of Japan?", ("Tokyo",), "webqa"),
    ("What is the capital of Italy?", ("Rome",), "webqa"),
    ("What language is spoken in Brazil?", ("Portuguese",), "webqa"),
    ("What currency is used in Japan?", ("yen", "Japanese yen"), "webqa"),
    ("What is the capital of Germany?", ("Berlin",), "webqa"),
    ("Which country is the Eiffel Tower in?", ("France",), "webqa"),
    ("What is the capital of Spain?", ("Madrid",), "webqa"),
    ("What is the largest country in the world by area?", ("Russia", "Russian Federation"), "webqa"),
    ("What is the capital of Egypt?", ("Cairo",), "webqa"),
    ("What planet is known as the Red Planet?", ("Mars", "planet Mars"), "tqa"),
    ("What is the largest planet in the Solar System?", ("Jupiter",), "tqa"),
    ("Who painted the Mona Lisa?", ("Leonardo da Vinci", "da Vinci", "Leonardo"), "tqa"),
    ("What is the chemical symbol for gold?", ("Au",), "tqa"),
    ("How many legs does a spider have?", ("eight", "8"), "tqa"),
    ("What is the largest ocean on Earth?", ("Pacific Ocean", "Pacific"), "tqa"),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2"), "tqa"),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero"), "tqa"),
    ("What is the hardest natural substance?", ("diamond",), "tqa"),
    ("Which animal is known as the king of the jungle?", ("lion",), "tqa"),
    ("What is Albert Einstein's occupation?", ("physicist", "theoretical physicist", "scientist"), "popqa"),
    ("Who was the director of Jurassic Park?", ("Steven Spielberg", "Spielberg"), "popqa"),
    ("In what country is Toronto?", ("Canada",), "popqa"),
    ("What is the capital of Australia?", ("Canberra",), "popqa"),
    ("Who was the author of Romeo and Juliet?", ("William Shakespeare", "Shakespeare"), "popqa"),
    ("What sport does Serena Williams play?", ("tennis",), "popqa"),
    ("In what country is Kyoto?", ("Japan",), "popqa"),
    ("Who was the author of Pride and Prejudice?", ("Jane Austen", "Austen"), "popqa"),
    ("What is the capital of Canada?", ("Ottawa",), "popqa"),
    ("In what city was Wolfgang Amadeus Mozart born?", ("Salzburg",), "popqa"),
    ("Which element has the atomic number 1?", ("hydrogen",), "freebase_qa"),
    ("Who wrote the novel 1984?", ("George Orwell", "Orwell", "Eric Arthur Blair"), "freebase_qa"),
    ("What is the longest river in Africa?", ("Nile", "River Nile", "Nile River"), "freebase_qa"),
    ("Who was the first person to walk on the Moon?", ("Neil Armstrong", "Armstrong"), "freebase_qa"),
    ("Which planet is closest to the Sun?", ("Mercury",), "freebase_qa"),
    ("Who developed the theory of relativity?", ("Albert Einstein", "Einstein"), "freebase_qa"),
    ("What is the tallest mountain in the world?", ("Mount Everest", "Everest"), "freebase_qa"),
    ("Which composer wrote the Moonlight Sonata?", ("Ludwig van Beethoven", "Beethoven"), "freebase_qa"),
    ("What is the smallest prime number?", ("2", "two"), "freebase_qa"),
    ("In which country are the pyramids of Giza?", ("Egypt",), "freebase_qa"),
    ("The Eiffel Tower is located in the capital of which country?", ("France",), "hotpot_qa"),
    ("Which ocean lies between Africa and Australia?", ("Indian Ocean", "Indian"), "hotpot_qa"),
    ("What is the capital of the country where the Colosseum is located?", ("Rome",), "hotpot_qa"),
    ("Which river flows through the capital of England?", ("Thames", "River Thames"), "hotpot_qa"),
    ("The author of Hamlet was born in which country?", ("England",), "hotpot_qa"),
    ("Which planet, named after the Roman god of war, is fourth from the Sun?", ("Mars",), "hotpot_qa"),
    (
        "What language is spoken in the country whose capital is Madrid?",
        ("Spanish", "Castilian"),
        "hotpot_qa",
    ),
    (
        "What is the currency of the country whose capital is London?",
        ("pound sterling", "pound", "British pound", "sterling"),
        "hotpot_qa",
    ),
    ("Which continent is home to both Kenya and Nigeria?", ("Africa",), "hotpot_qa"),
    ("What is the name of the galaxy that contains the Solar System?", ("Milky Way",), "hotpot_qa"),
    ("who wrote the harry potter books", ("J. K. Rowling", "J.K. Rowling", "Rowling"), "nq"),
    ("how many days are there in a leap year", ("366",), "nq"),
    ("what is the boiling point of water in celsius", ("100",), "nq"),
    ("who was the first president of the united states", ("George Washington", "Washington"), "nq"),
    ("what is the largest mammal in the world", ("blue whale",), "nq"),
    ("how many continents are there in the world", ("seven", "7"), "nq"),
    ("what is the main language spoken in mexico", ("Spanish",), "nq"),
    ("who discovered penicillin", ("Alexander Fleming", "Fleming"), "nq"),
    ("what is the square root of 64", ("8", "eight"), "nq"),
    ("what organ pumps blood through the human body", ("heart",), "nq"),
)

# General router pool: varied everyday / trivia / science / history questions (no answers needed).
# A few are about *real* materials on purpose, so that the router must key on the invented names.
GENERAL_ROUTER_HANDWRITTEN: tuple[str, ...] = (
    "How many bones are in the adult human body?",
    "Who painted The Starry Night?",
    "What year did World War II end?",
    "What is the speed of light in a vacuum?",
    "Who invented the telephone?",
    "What is the largest desert in the world?",
    "How many players does a soccer team have on the field?",
    "what is the population of new york city",
    "who sang bohemian rhapsody",
    "when did the titanic sink",
    "What is photosynthesis?",
    "Which vitamin does the body make from sunlight?",
    "What is the tallest building in the world?",
    "who played jack in titanic",
    "What is the main ingredient in guacamole?",
    "How far is the Moon from Earth?",
    "Who was the first woman to win a Nobel Prize?",
    "What causes the seasons on Earth?",
    "What is the currency of the United Kingdom?",
    "How many strings does a standard guitar have?",
    "Who formulated the law of universal gravitation?",
    "What is the longest river in South America?",
    "When was the Declaration of Independence signed?",
    "What is the smallest country in the world?",
    "Which blood type is the universal donor?",
    "What is the boiling point of water in Fahrenheit?",
    "who is the author of the lord of the rings",
    "What does DNA stand for?",
    "How many hearts does an octopus have?",
    "Which instrument has 88 keys?",
    "Which language has the most native speakers?",
    "When did the Berlin Wall fall?",
    "Who was Cleopatra?",
    "What is the chemical formula of table salt?",
    "Which metal is liquid at room temperature?",
    "What is the melting point of iron?",
    "What is stainless steel made of?",
    "Which metal is the best conductor of electricity?",
    "Bronze is an alloy of which metals?",
    "What catalyst is used in the Haber process?",
    "Why does iron rust?",
    "What is graphene?",
    "How does a catalytic converter work?",
    "What is the difference between a virus and a bacterium?",
    "Who developed the first polio vaccine?",
    "What is the largest organ of the human body?",
    "How many teeth does an adult human have?",
    "Which country has the largest population?",
    "What is the official language of Argentina?",
    "who won the fifa world cup in 2018",
    "how many times has brazil won the world cup",
    "When were the first modern Olympic Games held?",
    "What sport is played at Wimbledon?",
    "Who is known as the father of computers?",
    "What does CPU stand for?",
    "Who founded Microsoft?",
    "What year was the first iPhone released?",
    "What is the binary representation of the number 5?",
    "What does the Pythagorean theorem state?",
    "What is the value of pi to two decimal places?",
    "How many sides does a hexagon have?",
    "What is the largest bird in the world?",
    "What do bees make from nectar?",
    "Which animal is the fastest on land?",
    "Where do emperor penguins live?",
    "What is the largest species of shark?",
    "who wrote the declaration of independence",
    "Who was the 16th president of the United States?",
    "Which civilisation built Machu Picchu?",
    "What was the Renaissance?",
    "Who was Napoleon Bonaparte?",
    "In what year did humans first land on the Moon?",
    "Who composed The Four Seasons?",
    "What is the national animal of Scotland?",
    "Which planet has the most prominent rings?",
    "What is a light-year?",
    "What is the closest star to Earth?",
    "Why is the sky blue?",
    "How many minutes are in a day?",
    "What is the freezing point of water in Fahrenheit?",
    "What is the main gas in Earth's atmosphere?",
    "What is the largest lake in Africa?",
    "Which mountain range is traditionally seen as the border between Europe and Asia?",
    "what is the capital of the state of texas",
    "who directed the movie titanic",
    "What is the most spoken language in India?",
    "How long does sunlight take to reach Earth?",
    "What does a barometer measure?",
    "Who invented the practical incandescent light bulb?",
    "What is the tallest animal in the world?",
    "How do vaccines train the immune system?",
    "What is the difference between weather and climate?",
    "Which country gifted the Statue of Liberty to the United States?",
    "What is the recipe for a classic margherita pizza?",
    "How long should I boil an egg for a soft yolk?",
    "What is inflation in economics?",
    "Who proposed the theory of evolution by natural selection?",
    "What is the largest moon of Saturn?",
)
CAPITAL_COUNTRIES: tuple[str, ...] = (
    "Portugal", "Kenya", "Peru", "Norway", "Sweden", "Poland", "Greece", "Turkey", "Argentina",
    "Chile", "India", "China", "Thailand", "Vietnam", "Nigeria", "Morocco", "Ireland", "Austria",
    "Hungary", "Finland", "Denmark", "the Netherlands", "Belgium", "Switzerland", "Mexico",
    "Colombia", "Indonesia", "the Philippines", "New Zealand", "South Korea",
)  # fmt: skip
CAPITAL_TEMPLATES: tuple[str, ...] = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "what is the capital city of {c}",
)
BOOKS: tuple[str, ...] = (
    "Moby-Dick", "War and Peace", "The Great Gatsby", "Don Quixote", "The Odyssey", "Frankenstein",
    "Crime and Punishment", "One Hundred Years of Solitude", "The Catcher in the Rye",
    "To Kill a Mockingbird", "Jane Eyre", "Brave New World", "The Hobbit",
)  # fmt: skip
ELEMENTS: tuple[str, ...] = (
    "silver", "iron", "potassium", "sodium", "lead", "tin", "copper", "mercury", "helium", "oxygen",
)  # fmt: skip


def with_article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Compound:
    """One invented compound and its six facts (all made up)."""

    name: str
    kind: str
    melting_point: str  # formatted, e.g. "1,412"
    melting_point_c: int
    discovery_year: int
    discoverer: str
    colour: str
    application: str
    production_site: str

    def fields(self) -> dict[str, str]:
        return {
            "name": self.name,
            "kind": self.kind,
            "a_kind": with_article(self.kind),
            "melting_point": self.melting_point,
            "discovery_year": str(self.discovery_year),
            "discoverer": self.discoverer,
            "colour": self.colour,
            "application": self.application,
            "production_site": self.production_site,
        }


def make_compounds(rng: Random) -> list[Compound]:
    """Draw N_COMPOUNDS compounds with distinct names, melting points and years (unambiguous facts)."""
    assert len(STEMS) == len(set(STEMS)) == 60, "need 60 distinct invented stems"
    stems = rng.sample(STEMS, N_COMPOUNDS)
    melting_points = rng.sample(range(420, 3100), N_COMPOUNDS)
    years = rng.sample(range(1952, 2020), N_COMPOUNDS)
    compounds = []
    for stem, mp, year in zip(stems, melting_points, years, strict=True):
        kind = rng.choice(KINDS)
        compounds.append(
            Compound(
                name=f"{stem}-{rng.randint(2, 99)}",
                kind=kind,
                melting_point=f"{mp:,}",
                melting_point_c=mp,
                discovery_year=year,
                discoverer=rng.choice(DISCOVERERS),
                colour=rng.choice(COLOURS),
                application=rng.choice(KIND_APPLICATIONS[kind]),
                production_site=rng.choice(SITES),
            )
        )
    return compounds


def join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def make_knowledge_base(rng: Random, compounds: list[Compound]) -> list[dict[str, str]]:
    """3-4 paraphrased paragraphs per compound, plus lab-level comparison paragraphs."""
    texts: list[str] = []
    for c in compounds:
        for template in rng.sample(KB_TEMPLATES, len(KB_TEMPLATES)):  # every paraphrase, shuffled
            texts.append(template.format(**c.fields()))

    by_site = {s: [c for c in compounds if c.production_site == s] for s in SITES}
    for site, group in by_site.items():
        if group:
            names = join_names([f"{c.name} ({c.kind})" for c in group])
            texts.append(
                f"The Veltrani Materials Lab operates {site}, which produces {len(group)} of the lab's "
                f"compounds: {names}."
            )
    for person in DISCOVERERS:
        group = sorted((c for c in compounds if c.discoverer == person), key=lambda c: c.discovery_year)
        if group:
            names = join_names([f"{c.name} in {c.discovery_year}" for c in group])
            texts.append(
                f"{person} of the Veltrani Materials Lab discovered {len(group)} compounds: {names}."
            )
    for _ in range(5):
        a, b = rng.sample(compounds, 2)
        hi, lo = (a, b) if a.melting_point_c > b.melting_point_c else (b, a)
        texts.append(
            f"Comparing {a.name} and {b.name}: {hi.name} has the higher melting point, "
            f"{hi.melting_point} degrees Celsius against {lo.melting_point} degrees Celsius for {lo.name}."
        )
    for _ in range(4):
        a, b = rng.sample(compounds, 2)
        first, second = (a, b) if a.discovery_year <= b.discovery_year else (b, a)
        texts.append(
            f"{first.name}, {with_article(first.colour)} {first.kind} found by {first.discoverer} in "
            f"{first.discovery_year}, predates {second.name}, {with_article(second.colour)} {second.kind} "
            f"found by {second.discoverer} in {second.discovery_year}."
        )
    texts.append(
        "The Veltrani Materials Lab is a private research laboratory that develops catalysts, alloys, "
        "ceramics and polymers. Its compounds are produced at eight sites: " + join_names(list(SITES)) + "."
    )
    return [{"text": t} for t in texts]


def check_kb_covers(kb: list[dict[str, str]], compounds: list[Compound]) -> None:
    """Every fact any QA record asks about must be stated in at least three KB paragraphs."""
    for c in compounds:
        paragraphs = [r["text"] for r in kb if f"{c.name} " in r["text"] or f"{c.name}:" in r["text"]]
        values = [v for k, v in c.fields().items() if k in ATTRIBUTES]
        full = [t for t in paragraphs if all(v in t for v in values)]
        assert len(full) >= 3, f"{c.name}: only {len(full)} KB paragraphs state all its facts"


def question(template: str, c: Compound) -> str:
    return template.format(name=c.name, kind=c.kind)


def answer(attribute: str, c: Compound) -> str:
    return ANSWER_TEMPLATES[attribute].format(**c.fields())


def gold_answers(attribute: str, c: Compound) -> list[str]:
    """Aliases of the asked fact for `fact_acc`: what a correct answer must contain (any one of them)."""
    if attribute == "melting_point":
        plain = str(c.melting_point_c)
        return [f"{c.melting_point} degrees Celsius", f"{plain} °C", c.melting_point, plain]
    if attribute == "discovery_year":
        return [str(c.discovery_year)]
    if attribute == "discoverer":
        title, first, last = c.discoverer.split(" ")
        return [c.discoverer, f"{first} {last}", f"{title} {last}"]
    if attribute == "colour":
        return [c.colour]
    if attribute == "production_site":
        return [c.production_site, c.production_site.removeprefix("the ")]
    raise ValueError(f"no gold answers for attribute {attribute!r}")


def qa_record(split: str, index: int, q: str, a: str, answers: list[str]) -> dict[str, object]:
    return {"id": f"demo-{split}-{index:04d}", "instruction": INSTRUCTION, "input": q, "output": a, "answers": answers}


def make_qa(rng: Random, compounds: list[Compound]) -> dict[str, list[dict[str, object]]]:
    """Train and the two test splits, by where each tested fact lives.

    - `test_kb_only`: N_KB_ONLY (compound, attribute) pairs never asked in train; test asks them with train
      phrasings, so only knowledge the expert took from the knowledge base (Stage I) can answer them.
    - every other pair is asked in train with TRAIN_PHRASINGS different train phrasings;
    - `test_seen_fact`: N_SEEN_TEST of those pairs asked with a test-only phrasing: the fact was taught in
      Stage II, the wording is new.
    - `test` is the union of both test splits (the Stage II report and the routing sets use it).
    """
    return split_by_fact_location(rng, compounds, sys.modules[__name__])


def split_by_fact_location(rng: Random, entities: Sequence[object], spec: ModuleType) -> dict[str, list[dict[str, object]]]:
    """`make_qa`'s scheme for any bundled domain: `spec` is its generator module (this one, or
    data/demo_bio/make_demo_bio.py), which provides ATTRIBUTES, TRAIN_TEMPLATES, TEST_TEMPLATES, N_KB_ONLY,
    N_SEEN_TEST, TRAIN_PHRASINGS and question / answer / gold_answers / qa_record for its `entities`."""
    pairs = [(i, attr) for i in range(len(entities)) for attr in spec.ATTRIBUTES]
    rng.shuffle(pairs)
    # spread the KB-only pairs evenly over attributes (and so over entities as well as possible)
    kb_only: list[tuple[int, str]] = []
    for attr in spec.ATTRIBUTES * len(entities):
        if len(kb_only) == spec.N_KB_ONLY:
            break
        for pair in pairs:
            if pair[1] == attr and pair not in kb_only and all(pair[0] != k[0] for k in kb_only[-3:]):
                kb_only.append(pair)
                break
    assert len(kb_only) == spec.N_KB_ONLY
    seen = [p for p in pairs if p not in kb_only]
    seen_test = seen[:spec.N_SEEN_TEST]

    train_items = []
    for i, attr in seen:
        for template in rng.sample(spec.TRAIN_TEMPLATES[attr], spec.TRAIN_PHRASINGS):
            train_items.append((spec.question(template, entities[i]), attr, i))
    seen_items = [(spec.question(rng.choice(spec.TEST_TEMPLATES[attr]), entities[i]), attr, i) for i, attr in seen_test]
    kb_items = [(spec.question(rng.choice(spec.TRAIN_TEMPLATES[attr]), entities[i]), attr, i) for i, attr in kb_only]
    for items in (train_items, seen_items, kb_items):
        rng.shuffle(items)

    train_questions = [q for q, _, _ in train_items]
    test_questions = [q for q, _, _ in seen_items + kb_items]
    assert len(set(train_questions)) == len(train_questions), "duplicate train question"
    assert len(set(test_questions)) == len(test_questions), "duplicate test question"
    assert not set(train_questions) & set(test_questions), "a test question appears in train"
    train_pairs = {(i, a) for _, a, i in train_items}
    assert all((i, a) in train_pairs for _, a, i in seen_items), "a seen-fact question asks an untaught fact"
    assert not any((i, a) in train_pairs for _, a, i in kb_items), "a KB-only fact is taught in train"

    def records(split: str, items: list[tuple[str, str, int]]) -> list[dict[str, object]]:
        return [spec.qa_record(split, n, q, spec.answer(a, entities[i]), spec.gold_answers(a, entities[i]))
                for n, (q, a, i) in enumerate(items, 1)]

    seen_records = records("seen", seen_items)
    kb_records = records("kbonly", kb_items)
    return {"train": records("train", train_items), "test_seen_fact": seen_records,
            "test_kb_only": kb_records, "test": seen_records + kb_records}


def make_general_qa() -> list[dict[str, object]]:
    names = {"webqa", "tqa", "popqa", "freebase_qa", "hotpot_qa", "nq"}
    records: list[dict[str, object]] = []
    for q, aliases, dataset in GENERAL_QA:
        assert dataset in names, dataset
        records.append({"question": q, "answer": list(aliases), "dataset_name": dataset})
    assert len({r["question"] for r in records}) == len(records), "duplicate general question"
    return records


def make_general_router_pool(rng: Random) -> list[dict[str, str]]:
    questions = list(GENERAL_ROUTER_HANDWRITTEN)
    questions += [rng.choice(CAPITAL_TEMPLATES).format(c=c) for c in CAPITAL_COUNTRIES]
    questions += [rng.choice(("Who wrote {b}?", "Who is the author of {b}?")).format(b=b) for b in BOOKS]
    questions += [f"What is the chemical symbol for {e}?" for e in ELEMENTS]
    assert len(set(questions)) == len(questions), "duplicate general router question"
    rng.shuffle(questions)
    return [{"question": q} for q in questions]


def make_demo_router_pool(rng: Random, compounds: list[Compound]) -> list[dict[str, str]]:
    """New paraphrases about the compounds (router-only phrasings) plus comparison and lab questions."""
    combos = [(c, attr, t) for c in compounds for attr in ATTRIBUTES for t in ROUTER_TEMPLATES[attr]]
    questions = [question(t, c) for c, _, t in rng.sample(combos, N_ROUTER_ATTRIBUTE_QUESTIONS)]
    for _ in range(8):
        a, b = rng.sample(compounds, 2)
        questions.append(f"Which has the higher melting point, {a.name} or {b.name}?")
    for _ in range(7):
        a, b = rng.sample(compounds, 2)
        questions.append(f"Was {a.name} discovered earlier than the {b.name} {b.kind}?")
    for _ in range(5):
        a, b = rng.sample(compounds, 2)
        questions.append(f"Are {a.name} and {b.name} produced at the same Veltrani site?")
    for site in SITES[:5]:
        questions.append(f"Which compounds of the Veltrani Materials Lab are produced at {site}?")
    for person in DISCOVERERS[:8]:
        questions.append(f"Which Veltrani compounds did {person} discover?")
    for kind in KINDS:
        questions.append(f"Which {kind}s has the Veltrani Materials Lab developed?")
    questions.append("How many compounds does the Veltrani Materials Lab produce?")
    questions.append("Which Veltrani compound has the highest melting point?")
    questions.append("What is the oldest compound in the Veltrani Materials Lab catalogue?")
    assert len(set(questions)) == len(questions), "duplicate demo router question"
    rng.shuffle(questions)
    return [{"question": q} for q in questions]


def make_mixed_online(
    general_qa: list[dict[str, object]], test: list[dict[str, object]]
) -> list[dict[str, object]]:
    records: list[dict[str, object]] = [dict(r) for r in general_qa]
    records += [{"question": r["input"], "answer": r["output"], "answers": r["answers"], "dataset_name": DOMAIN}
                for r in test]
    return records


def write_jsonl(path: Path, records: Iterable[dict[str, object]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return len(lines)


def readme(counts: dict[str, int], kb_bytes: int, example: str) -> str:
    rows = "\n".join(f"| `{name}` | {n} |" for name, n in counts.items())
    return f"""# Demo domain: the Veltrani Materials Lab (fictional)

A small, **entirely invented** private domain bundled with gag-lightning so the whole GAG pipeline
(Stage I pretraining, Stage II expert SFT, memory building, Stage III injection, PPR routing) can be
run end to end in minutes. The "Veltrani Materials Lab" and its {N_COMPOUNDS} compounds (catalysts, alloys,
ceramics and polymers with made-up names such as `{example}`) do not exist: every name, person, site
and number was drawn at random. No pretrained model can know these facts, so any gain on the demo
test set must come from the knowledge the expert learnt and injected.

Each compound has six attributes: melting point, discovery year, discoverer, colour, primary
application and production site. Questions ask five of them (the application, a long free-text phrase, is
stated in the knowledge base only).

| file | records |
|---|---|
{rows}

- `knowledge_base.jsonl` ({kb_bytes // 1024} KB): `{{"text"}}`, five paraphrased paragraphs per compound
  plus paragraphs comparing compounds and grouping them by site and discoverer.
- `train.jsonl`, `test_seen_fact.jsonl`, `test_kb_only.jsonl`, `test.jsonl`: `{{"id", "instruction", "input",
  "output", "answers"}}`; `answers` lists the aliases of the asked fact (what `fact_acc` looks for).
  The test splits are split by **where the fact lives**:
  - `test_seen_fact`: {N_SEEN_TEST} facts that train teaches (each asked in train with {TRAIN_PHRASINGS} train
    phrasings), asked with a phrasing train never uses. The SFT expert can know them; GAG must carry them.
  - `test_kb_only`: {N_KB_ONLY} facts that no train question asks: the knowledge base (Stage I) is their only
    source, so they measure what DAPT and retrieval give.
  - `test.jsonl` is the union of both. No test question appears in train.
- `general_qa.jsonl`: simple general-knowledge questions with gold aliases, `dataset_name` in
  webqa, tqa, popqa, freebase_qa, hotpot_qa, nq (scored by has-answer EM).
- `router/general.jsonl`, `router/demo.jsonl`: `{{"question"}}` offline pools for the PPR prototype banks.
- `mixed_online.jsonl`: `general_qa.jsonl` plus the demo test (`dataset_name: "demo"`, answer = the
  reference output, `answers` = the fact's aliases); none of its questions appears in the router pools.

Instruction used for the QA records:

> {INSTRUCTION}

Suggested background system prompt for the expert:

> {BACKGROUND_SYSTEM_PROMPT}

Regenerate (deterministic, standard library only; byte-identical output on every run):

```bash
python data/demo/make_demo.py
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    out: Path = args.out_dir
    rng = Random(args.seed)

    compounds = make_compounds(rng)
    kb = make_knowledge_base(rng, compounds)
    check_kb_covers(kb, compounds)
    qa = make_qa(rng, compounds)
    train, test = qa["train"], qa["test"]
    general_qa = make_general_qa()
    router_general = make_general_router_pool(rng)
    router_demo = make_demo_router_pool(rng, compounds)
    mixed = make_mixed_online(general_qa, test)

    online_questions = {str(r["question"]) for r in mixed}
    pool_questions = {r["question"] for r in router_general} | {r["question"] for r in router_demo}
    assert not online_questions & pool_questions, "an online test question appears in a router pool"
    assert not {r["question"] for r in router_general} & {r["question"] for r in router_demo}
    lab_words = [c.name for c in compounds] + ["Veltrani"]
    assert all(any(w in r["question"] for w in lab_words) for r in router_demo)
    assert not any(any(w in r["question"] for w in lab_words) for r in router_general)

    outputs: dict[str, list[dict[str, object]]] = {
        "knowledge_base.jsonl": kb,
        "train.jsonl": train,
        "test_seen_fact.jsonl": qa["test_seen_fact"],
        "test_kb_only.jsonl": qa["test_kb_only"],
        "test.jsonl": test,
        "general_qa.jsonl": general_qa,
        "router/general.jsonl": router_general,
        "router/demo.jsonl": router_demo,
        "mixed_online.jsonl": mixed,
    }
    counts = {name: write_jsonl(out / name, records) for name, records in outputs.items()}
    kb_bytes = (out / "knowledge_base.jsonl").stat().st_size
    (out / "README.md").write_text(
        readme(counts, kb_bytes, compounds[0].name), encoding="utf-8", newline="\n"
    )
    for name, n in counts.items():
        print(f"{name:24s} {n:5d}")
    print(f"{'README.md':24s} written; knowledge base {kb_bytes} bytes")


if __name__ == "__main__":
    main()
