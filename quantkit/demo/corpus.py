"""A seeded probabilistic grammar of English-like text: stories, facts from a fixed table, arithmetic, counting.

Everything here is our own small grammar; the same seed gives the same text. The text has
learnable structure at several levels (agreement, a consistent fact table, arithmetic that is
always right), so a tiny model trained on it for a minute reaches a loss where quantization
damage is visible.
"""

from __future__ import annotations

import random

NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo", "Maya", "Nils", "Olga", "Pablo"]
ANIMALS = ["cat", "dog", "fox", "bird", "horse", "rabbit", "goat", "owl", "mouse", "bear"]
PEOPLE = ["farmer", "teacher", "baker", "sailor", "doctor", "painter", "child", "king", "queen", "miller"]
THINGS = ["apple", "book", "box", "lamp", "letter", "ball", "boat", "key", "cake", "hat", "stone", "map"]
PLACES = ["garden", "river", "market", "forest", "kitchen", "village", "hill", "school", "harbour", "library"]
ADJECTIVES = ["old", "small", "happy", "quiet", "brave", "red", "green", "tired", "clever", "bright", "heavy", "strange"]
ADVERBS = ["slowly", "quickly", "quietly", "happily", "carefully", "again", "today", "at night"]
# (base, third person singular, past)
VERBS_T = [("see", "sees", "saw"), ("find", "finds", "found"), ("carry", "carries", "carried"), ("like", "likes", "liked"),
           ("give", "gives", "gave"), ("paint", "paints", "painted"), ("open", "opens", "opened"), ("hide", "hides", "hid")]
VERBS_I = [("sleep", "sleeps", "slept"), ("sing", "sings", "sang"), ("run", "runs", "ran"), ("wait", "waits", "waited"),
           ("laugh", "laughs", "laughed"), ("walk", "walks", "walked")]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "su", "del", "mar", "in", "os", "bre", "ta", "nu", "gor", "li", "pa", "zen"]


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def fact_table(n_countries: int = 40, seed: int = 1234) -> list[dict[str, str]]:
    """A fixed generated table of made-up countries with capital, river, language and colour."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_countries:
        country = _word(rng, 2) + rng.choice(["ia", "land", "or", "an"])
        if country in seen:
            continue
        seen.add(country)
        rows.append({
            "country": country,
            "capital": _word(rng, 2),
            "river": "the " + _word(rng, 2),
            "language": _word(rng, 1) + "ish",
            "colour": rng.choice(ADJECTIVES[5:7] + ["blue", "white", "gold", "black"]),
        })
    return rows


def _np(rng: random.Random) -> tuple[str, bool]:
    """A noun phrase and whether it is a proper name (singular either way)."""
    r = rng.random()
    if r < 0.3:
        return rng.choice(NAMES), True
    noun = rng.choice(ANIMALS + PEOPLE)
    adj = rng.choice(ADJECTIVES) + " " if rng.random() < 0.5 else ""
    return f"the {adj}{noun}", False


def _obj(rng: random.Random) -> str:
    adj = rng.choice(ADJECTIVES) + " " if rng.random() < 0.4 else ""
    rest = f"{adj}{rng.choice(THINGS)}"
    det = rng.choice(["the", "a"])
    if det == "a" and rest[0] in "aeiou":
        det = "an"
    return f"{det} {rest}"


def story_sentence(rng: random.Random, tense: str) -> str:
    """One grammatical sentence in the present or past tense."""
    subj, _ = _np(rng)
    idx = 1 if tense == "present" else 2
    r = rng.random()
    if r < 0.45:
        verb = rng.choice(VERBS_T)[idx]
        s = f"{subj} {verb} {_obj(rng)}"
    elif r < 0.7:
        verb = rng.choice(VERBS_I)[idx]
        s = f"{subj} {verb} {rng.choice(ADVERBS)}"
    elif r < 0.85:
        be = "is" if tense == "present" else "was"
        s = f"{subj} {be} in the {rng.choice(PLACES)}"
    else:
        be = "is" if tense == "present" else "was"
        s = f"{subj} {be} {rng.choice(ADJECTIVES)}"
    if rng.random() < 0.2:
        s += f" near the {rng.choice(PLACES)}"
    return s[0].upper() + s[1:] + "."


def fact_sentence(rng: random.Random, table: list[dict[str, str]]) -> str:
    """A true statement or question-answer from the fact table."""
    row = rng.choice(table)
    kind = rng.randrange(5)
    if kind == 0:
        return f"The capital of {row['country']} is {row['capital']}."
    if kind == 1:
        return f"The river of {row['country']} is {row['river']}."
    if kind == 2:
        return f"People in {row['country']} speak {row['language']}."
    if kind == 3:
        return f"Q: What is the capital of {row['country']}? A: {row['capital']}."
    return f"The flag of {row['country']} is {row['colour']}."


def arithmetic_sentence(rng: random.Random) -> str:
    """A correct sum or difference in words, e.g. 'three plus four is seven.'"""
    if rng.random() < 0.6:
        a = rng.randrange(0, 11)
        b = rng.randrange(0, 11)
        return f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    a = rng.randrange(0, 21)
    b = rng.randrange(0, a + 1)
    return f"{NUMBERS[a].capitalize()} minus {NUMBERS[b]} is {NUMBERS[a - b]}."


def counting_sentence(rng: random.Random) -> str:
    """Counting up from a random start, in words."""
    start = rng.randrange(0, 15)
    n = rng.randrange(3, 7)
    seq = NUMBERS[start : min(len(NUMBERS), start + n)]
    return "Counting: " + ", ".join(seq) + "."


def paragraph(rng: random.Random, table: list[dict[str, str]]) -> str:
    """A paragraph of 3-8 sentences, mostly story with facts, sums and counting mixed in."""
    tense = rng.choice(["present", "past"])
    out = []
    for _ in range(rng.randrange(3, 9)):
        r = rng.random()
        if r < 0.55:
            out.append(story_sentence(rng, tense))
        elif r < 0.75:
            out.append(fact_sentence(rng, table))
        elif r < 0.92:
            out.append(arithmetic_sentence(rng))
        else:
            out.append(counting_sentence(rng))
    return " ".join(out)


def generate_corpus(n_chars: int = 400_000, seed: int = 0) -> str:
    """About `n_chars` characters of paragraphs separated by blank lines; same seed, same text."""
    rng = random.Random(seed)
    table = fact_table()
    paras: list[str] = []
    size = 0
    while size < n_chars:
        p = paragraph(rng, table)
        paras.append(p)
        size += len(p) + 2
    return "\n\n".join(paras) + "\n"
