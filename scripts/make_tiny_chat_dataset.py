"""Generates data/tiny-chat: a small synthetic chat dataset (CC0-1.0) for end-to-end tests and demos
of SFT -> DPO/ORPO on a tiny model (SmolLM2-135M-Instruct, trained on CPU in minutes).

Splits and layout follow the alignment-handbook datasets:
  train_sft / test_sft     like HuggingFaceH4/ultrachat_200k:
      {"prompt", "prompt_id", "messages"}
  train_prefs / test_prefs like HuggingFaceH4/ultrafeedback_binarized:
      {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected",
       "rejected_kind"}
written as JSON Lines (UTF-8, ensure_ascii=False, one object per line, keys in that order).

Every text comes from the templates and word lists in this file (no third-party text). The tasks
have verifiable answers (arithmetic, capitals, opposites, plurals, letter counts, reversals, unit
conversions, weekdays, yes/no facts, small word problems), answered in one short, polite sentence
in a fixed style. A rejected answer is systematically worse: a wrong value (~50%), an unhelpful
refusal (~25%) or a bad style (rude, ALL CAPS or rambling; ~25%).

Deterministic (stdlib only, one random.Random(seed), no iteration over sets): rerunning with the
same seed rewrites identical files. Every standalone question (each row's prompt, and any fresh
question asked later in a conversation) is used once across all four files, so test prompts never
occur in the training splits. The files are checked after writing (see verify()).

usage: python3 scripts/make_tiny_chat_dataset.py [--out data/tiny-chat] [--seed 20250101]
       python3 scripts/make_tiny_chat_dataset.py --check     (only verify existing files)
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys

DEFAULT_SEED = 20250101
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tiny-chat")
COUNTS = {"train_sft": 450, "test_sft": 50, "train_prefs": 450, "test_prefs": 50}
# Generation order: the test splits draw their prompts first.
ORDER = ["test_sft", "test_prefs", "train_sft", "train_prefs"]

# ----------------------------------------------------------------------------------------------
# Word lists (written for this dataset).

# (country as used in a sentence, capital, local name shown in parentheses or None,
#  a plausible wrong capital or None)
CAPITALS = [
    ("France", "Paris", None, "Lyon"),
    ("Germany", "Berlin", None, "Munich"),
    ("Italy", "Rome", None, "Milan"),
    ("Spain", "Madrid", None, "Barcelona"),
    ("Portugal", "Lisbon", None, "Porto"),
    ("the United Kingdom", "London", None, "Manchester"),
    ("Ireland", "Dublin", None, "Cork"),
    ("the Netherlands", "Amsterdam", None, "Rotterdam"),
    ("Belgium", "Brussels", None, "Antwerp"),
    ("Austria", "Vienna", None, "Salzburg"),
    ("Switzerland", "Bern", None, "Zurich"),
    ("Poland", "Warsaw", None, "Kraków"),
    ("Czechia", "Prague", None, "Brno"),
    ("Hungary", "Budapest", None, None),
    ("Greece", "Athens", "Αθήνα", "Thessaloniki"),
    ("Sweden", "Stockholm", None, "Gothenburg"),
    ("Norway", "Oslo", None, "Bergen"),
    ("Denmark", "Copenhagen", None, None),
    ("Finland", "Helsinki", None, None),
    ("Iceland", "Reykjavík", None, None),
    ("Romania", "Bucharest", None, None),
    ("Bulgaria", "Sofia", None, None),
    ("Croatia", "Zagreb", None, "Split"),
    ("Serbia", "Belgrade", None, None),
    ("Ukraine", "Kyiv", None, None),
    ("Russia", "Moscow", "Москва", "Saint Petersburg"),
    ("Turkey", "Ankara", None, "Istanbul"),
    ("Egypt", "Cairo", None, "Alexandria"),
    ("Morocco", "Rabat", None, "Casablanca"),
    ("Kenya", "Nairobi", None, "Mombasa"),
    ("Nigeria", "Abuja", None, "Lagos"),
    ("Ghana", "Accra", None, None),
    ("Ethiopia", "Addis Ababa", None, None),
    ("Senegal", "Dakar", None, None),
    ("Tunisia", "Tunis", None, None),
    ("Japan", "Tokyo", "東京", "Kyoto"),
    ("China", "Beijing", "北京", "Shanghai"),
    ("South Korea", "Seoul", "서울", "Busan"),
    ("Vietnam", "Hanoi", None, "Ho Chi Minh City"),
    ("Thailand", "Bangkok", None, None),
    ("India", "New Delhi", None, "Mumbai"),
    ("Pakistan", "Islamabad", None, "Karachi"),
    ("Nepal", "Kathmandu", None, None),
    ("Iran", "Tehran", None, None),
    ("Saudi Arabia", "Riyadh", None, "Jeddah"),
    ("Jordan", "Amman", None, None),
    ("the Philippines", "Manila", None, None),
    ("Malaysia", "Kuala Lumpur", None, None),
    ("Mongolia", "Ulaanbaatar", None, None),
    ("Australia", "Canberra", None, "Sydney"),
    ("New Zealand", "Wellington", None, "Auckland"),
    ("Canada", "Ottawa", None, "Toronto"),
    ("the United States", "Washington, D.C.", None, "New York"),
    ("Mexico", "Mexico City", None, None),
    ("Cuba", "Havana", None, None),
    ("Brazil", "Brasília", None, "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", None, None),
    ("Chile", "Santiago", None, None),
    ("Peru", "Lima", None, "Cusco"),
    ("Colombia", "Bogotá", None, "Medellín"),
    ("Ecuador", "Quito", None, "Guayaquil"),
    ("Uruguay", "Montevideo", None, None),
]

# Pairs whose opposite is unambiguous in both directions (no word occurs twice).
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("left", "right"), ("open", "closed"), ("early", "late"), ("rich", "poor"),
    ("strong", "weak"), ("old", "new"), ("true", "false"), ("full", "empty"), ("wet", "dry"),
    ("hard", "soft"), ("clean", "dirty"), ("loud", "quiet"), ("thick", "thin"), ("wide", "narrow"),
    ("deep", "shallow"), ("high", "low"), ("inside", "outside"), ("above", "below"),
    ("before", "after"), ("day", "night"), ("black", "white"), ("win", "lose"), ("push", "pull"),
    ("buy", "sell"), ("give", "take"), ("begin", "end"), ("friend", "enemy"), ("love", "hate"),
    ("alive", "dead"), ("always", "never"), ("north", "south"), ("east", "west"),
    ("first", "last"), ("top", "bottom"), ("on", "off"), ("cheap", "expensive"),
    ("polite", "rude"), ("asleep", "awake"), ("increase", "decrease"), ("maximum", "minimum"),
    ("possible", "impossible"), ("correct", "incorrect"), ("summer", "winter"),
    ("sunrise", "sunset"), ("positive", "negative"), ("near", "far"), ("smooth", "rough"),
    ("entrance", "exit"), ("ancient", "modern"), ("safe", "dangerous"),
]

PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("tree", "trees"), ("apple", "apples"),
    ("house", "houses"), ("chair", "chairs"), ("bird", "birds"), ("star", "stars"),
    ("box", "boxes"), ("fox", "foxes"), ("bus", "buses"), ("glass", "glasses"),
    ("class", "classes"), ("kiss", "kisses"), ("church", "churches"), ("bench", "benches"),
    ("watch", "watches"), ("dish", "dishes"), ("brush", "brushes"), ("baby", "babies"),
    ("city", "cities"), ("story", "stories"), ("party", "parties"), ("lady", "ladies"),
    ("berry", "berries"), ("puppy", "puppies"), ("day", "days"), ("key", "keys"), ("toy", "toys"),
    ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("wife", "wives"),
    ("life", "lives"), ("half", "halves"), ("shelf", "shelves"), ("tomato", "tomatoes"),
    ("potato", "potatoes"), ("hero", "heroes"), ("photo", "photos"), ("piano", "pianos"),
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"), ("person", "people"),
    ("ox", "oxen"), ("sheep", "sheep"), ("deer", "deer"),
]

# Short words for counting and reversing (no palindromes).
WORDS = [
    "cat", "dog", "sun", "cup", "map", "apple", "banana", "garden", "pencil", "window", "rabbit",
    "orange", "planet", "river", "candle", "guitar", "bottle", "yellow", "purple", "school",
    "summer", "winter", "rocket", "tiger", "zebra", "lemon", "cherry", "butter", "coffee",
    "silver", "forest", "island", "mirror", "ocean", "paper", "pizza", "robot", "sugar", "tomato",
    "violin", "wizard", "kitten", "button", "puzzle", "castle", "dragon", "cookie", "monkey",
    "bridge", "spoon", "cloud", "happy", "letter", "balloon", "mountain", "bicycle", "teacher",
    "jacket", "pepper", "cotton", "hammer", "rainbow", "blanket", "kitchen", "morning",
]

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

MAMMALS = ["whale", "dolphin", "bat", "dog", "horse", "cow", "elephant", "mouse", "lion", "rabbit"]
NOT_MAMMALS = ["shark", "frog", "snake", "eagle", "penguin", "crocodile", "salmon", "turtle",
               "spider", "octopus"]

# (name, subject pronoun)
PEOPLE = [
    ("José", "he"), ("Zoë", "she"), ("François", "he"), ("Søren", "he"), ("Chloé", "she"),
    ("Inés", "she"), ("Björn", "he"), ("Renée", "she"), ("Łukasz", "he"), ("Ayşe", "she"),
    ("Siobhán", "she"), ("Jürgen", "he"), ("Amélie", "she"), ("Zoltán", "he"), ("Noémie", "she"),
    ("Mateo", "he"), ("Yuki", "she"), ("Raphaël", "he"),
]
ITEMS_EUR = ["book", "pen", "sandwich", "coffee", "ticket", "notebook", "scarf", "umbrella",
             "lamp", "cake"]
# (plural noun, emoji)
COUNTABLES = [("apples", "🍎"), ("cookies", "🍪"), ("stickers", "⭐"), ("flowers", "🌸"),
              ("balloons", "🎈"), ("books", "📚")]
# (journey with CJK city names, for hours -> minutes word problems)
TRIPS = [
    "A train from Tokyo (東京) to Osaka (大阪)", "A bus from Beijing (北京) to Tianjin (天津)",
    "A flight from Seoul (서울) to Busan (부산)", "A ferry from Hong Kong (香港) to Macau (澳門)",
    "A train from Kyoto (京都) to Nagoya (名古屋)", "A drive from Shanghai (上海) to Hangzhou (杭州)",
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer briefly and politely.",
    "You are a concise tutor. Reply in one short sentence.",
    "Answer the user's questions with short, correct sentences.",
    "You are a polite assistant who gives exact answers.",
]

THANKS = [("Thank you!", "You're welcome! 😊"), ("Thanks a lot!", "You're welcome! Happy to help."),
          ("Great, thanks! 🙏", "You're welcome! 😊"), ("Perfect, thank you.", "You're welcome!")]

UNHELPFUL = [
    "I don't know.", "Sorry, I can't help with that.", "I'm not sure. Maybe ask someone else.",
    "That's not something I can answer.", "I don't know, sorry.", "Hmm, I have no idea.",
    "I'd rather not answer that.",
]
RUDE_PREFIX = ["Ugh, obviously.", "Seriously? That's easy.", "What a silly question.",
               "Pay attention, it's simple."]
RUDE_SUFFIX = ["Don't ask me again.", "Figure it out yourself next time.", "Was that so hard?",
               "Everyone knows that."]
RAMBLE_PREFIX = [
    "Well, that is a really interesting question, and people think about things like this in "
    "many different ways, so let me see.",
    "Hmm, okay, so, before I answer, let me think about it for a moment, because there is a lot "
    "to say about this kind of thing.",
    "Oh, this reminds me of many things, but let me try to stay on topic here.",
]
RAMBLE_SUFFIX = ["Anyway, I hope that helps, or maybe it doesn't, who knows.",
                 "But there is so much more to say, and I could go on and on.",
                 "Or at least I think so, more or less, probably."]

# ----------------------------------------------------------------------------------------------
# Tasks. A task instance yields Turns; a follow-up continues from the last turn's state.


class Turn:
    """One user question and its answers: `answer` is correct, `wrong` has a wrong value."""

    def __init__(self, user, answer, wrong, state):
        assert wrong != answer, (user, answer)
        self.user, self.answer, self.wrong, self.state = user, answer, wrong, state


def fmt(x):
    """2.0 -> '2', 2.5 -> '2.5'."""
    return f"{x:g}"


def plural_s(n, one, many):
    return one if n == 1 else many


def off_by(rng, n, lo=0):
    """n +- 1 (or 2), never n, never below lo."""
    choices = [d for d in (-2, -1, 1, 1, 2) if n + d >= lo and d != 0]
    return n + rng.choice(choices)


def arith_answer(a, op, b):
    return {"+": a + b, "-": a - b, "×": a * b}[op]


def t_arith(rng, op=None):
    op = op or rng.choice(["+", "-", "×"])
    if op == "+":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        q = rng.choice([f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.",
                        f"What is the sum of {a} and {b}?", f"Compute {a} + {b}.", f"Calculate {a} + {b}."])
    elif op == "-":
        a = rng.randint(5, 99)
        b = rng.randint(1, a)
        q = rng.choice([f"What is {a} - {b}?", f"What is {a} minus {b}?", f"Subtract {b} from {a}.",
                        f"Compute {a} - {b}.", f"Calculate {a} - {b}."])
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = rng.choice([f"What is {a} × {b}?", f"What is {a} times {b}?", f"Multiply {a} by {b}.",
                        f"What is the product of {a} and {b}?", f"Compute {a} × {b}."])
    r = arith_answer(a, op, b)
    return Turn(q, f"{a} {op} {b} = {r}.", f"{a} {op} {b} = {off_by(rng, r, lo=-99)}.", ("num", r))


def f_arith(rng, state):
    r = state[1]
    kind = rng.choice(["×", "+", "-"])
    if kind == "×":
        k = rng.randint(2, 5)
        q = rng.choice([f"And times {k}?", f"Now multiply that by {k}.", f"And if you multiply it by {k}?"])
        if k == 2:
            q = rng.choice([q, "And times 2?", "Now double it."])
    elif kind == "+":
        k = rng.randint(1, 20)
        q = rng.choice([f"And plus {k}?", f"Now add {k} to that.", f"And if you add {k}?"])
    else:
        k = rng.randint(1, 20)
        q = rng.choice([f"And minus {k}?", f"Now subtract {k} from that.", f"And if you take away {k}?"])
    n = arith_answer(r, kind, k)
    return Turn(q, f"{r} {kind} {k} = {n}.", f"{r} {kind} {k} = {off_by(rng, n, lo=-99)}.", ("num", n))


def capital_name(i):
    _, cap, local, _ = CAPITALS[i]
    return f"{cap} ({local})" if local else cap


def capital_wrong(rng, i):
    plausible = CAPITALS[i][3]
    if plausible and rng.random() < 0.6:
        return plausible
    return capital_name(rng.choice([j for j in range(len(CAPITALS)) if j != i]))


def capital_turn(rng, i, q):
    country = CAPITALS[i][0]
    return Turn(q, f"The capital of {country} is {capital_name(i)}.",
                f"The capital of {country} is {capital_wrong(rng, i)}.", ("capital", i))


def t_capital(rng):
    i = rng.randrange(len(CAPITALS))
    c = CAPITALS[i][0]
    q = rng.choice([f"What is the capital of {c}?", f"What's the capital city of {c}?",
                    f"Which city is the capital of {c}?", f"Name the capital of {c}.",
                    f"Tell me the capital of {c}.", f"Do you know the capital of {c}?"])
    return capital_turn(rng, i, q)


def f_capital(rng, state):
    i = rng.choice([j for j in range(len(CAPITALS)) if j != state[1]])
    c = CAPITALS[i][0]
    q = rng.choice([f"And what about {c}?", f"And {c}?", f"What about {c}?"])
    return capital_turn(rng, i, q)


OPP = [(a, b) for a, b in OPPOSITES] + [(b, a) for a, b in OPPOSITES]
OPP_WORDS = [w for w, _ in OPP]


def opposite_turn(rng, i, q):
    w, o = OPP[i]
    wrong = w if rng.random() < 0.25 else rng.choice([x for x in OPP_WORDS if x not in (w, o)])
    return Turn(q, f'The opposite of "{w}" is "{o}".', f'The opposite of "{w}" is "{wrong}".', ("opp", i))


def t_opposite(rng):
    i = rng.randrange(len(OPP))
    w = OPP[i][0]
    q = rng.choice([f'What is the opposite of "{w}"?', f"What is the opposite of {w}?",
                    f'What is the antonym of "{w}"?', f'Give me the opposite of the word "{w}".',
                    f'What word means the opposite of "{w}"?'])
    return opposite_turn(rng, i, q)


def f_opposite(rng, state):
    i = rng.choice([j for j in range(len(OPP)) if OPP[j][0] not in OPP[state[1]]])
    w = OPP[i][0]
    return opposite_turn(rng, i, rng.choice([f'And the opposite of "{w}"?', f'And "{w}"?', f'What about "{w}"?']))


def wrong_plural(word, correct):
    """A regular plural is wrongly left singular; any other gets the naive "+s" ("mouses", "babys")."""
    return word if correct == word + "s" else word + "s"


def plural_turn(i, q):
    w, p = PLURALS[i]
    return Turn(q, f'The plural of "{w}" is "{p}".', f'The plural of "{w}" is "{wrong_plural(w, p)}".', ("plural", i))


def t_plural(rng):
    i = rng.randrange(len(PLURALS))
    w = PLURALS[i][0]
    q = rng.choice([f'What is the plural of "{w}"?', f"What is the plural of {w}?",
                    f'What is the plural form of the word "{w}"?', f'How do you say "{w}" in the plural?',
                    f'Give me the plural of "{w}".'])
    return plural_turn(i, q)


def f_plural(rng, state):
    i = rng.choice([j for j in range(len(PLURALS)) if j != state[1]])
    w = PLURALS[i][0]
    return plural_turn(i, rng.choice([f'And "{w}"?', f'And the plural of "{w}"?', f'What about "{w}"?']))


def vowels(w):
    return sum(c in "aeiou" for c in w)


def letters_turn(rng, w, q):
    n = len(w)
    return Turn(q, f'The word "{w}" has {n} letters.', f'The word "{w}" has {off_by(rng, n, 1)} letters.',
                ("word", w, "letters"))


def t_count(rng):
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        q = rng.choice([f'How many letters are in the word "{w}"?', f'How many letters does "{w}" have?',
                        f'Count the letters in "{w}".', f'How long is the word "{w}" in letters?'])
        return letters_turn(rng, w, q)
    letter = rng.choice(sorted({c for c in w}))
    n = w.count(letter)
    q = rng.choice([f'How many times does the letter "{letter}" appear in "{w}"?',
                    f'Count the letter "{letter}" in the word "{w}".',
                    f'How many "{letter}" letters are in "{w}"?'])

    def says(k):
        return f'The letter "{letter}" appears {"once" if k == 1 else f"{k} times"} in "{w}".'

    return Turn(q, says(n), says(off_by(rng, n, 1)), ("word", w, "letter"))


def vowels_turn(rng, w, q):
    n, m = vowels(w), off_by(rng, vowels(w), 1)
    return Turn(q, f'The word "{w}" has {n} {plural_s(n, "vowel", "vowels")}.',
                f'The word "{w}" has {m} {plural_s(m, "vowel", "vowels")}.', ("word", w, "vowels"))


def scramble_wrong(rng, w, correct):
    if rng.random() < 0.3 and w != correct:
        return w
    s = list(correct)
    for _ in range(20):
        i = rng.randrange(len(s) - 1)
        t = s[:]
        t[i], t[i + 1] = t[i + 1], t[i]
        if "".join(t) != correct:
            return "".join(t)
    return correct[1:] + correct[0]


def reverse_turn(rng, w, q):
    r = w[::-1]
    return Turn(q, f'The word "{w}" reversed is "{r}".', f'The word "{w}" reversed is "{scramble_wrong(rng, w, r)}".',
                ("word", w, "reverse"))


def t_reverse(rng):
    w = rng.choice(WORDS)
    q = rng.choice([f'Reverse the word "{w}".', f'What is "{w}" spelled backwards?',
                    f'Write the word "{w}" backwards.', f'Can you reverse "{w}"?'])
    return reverse_turn(rng, w, q)


def f_word(rng, state):
    """Follow-up on a word question: the same word asked another way, or a new word."""
    _, w, mode = state
    w2 = rng.choice([x for x in WORDS if x != w])
    options = [lambda: reverse_turn(rng, w2, f'Now reverse "{w2}".')]
    if mode == "reverse":
        options += [lambda: reverse_turn(rng, w2, f'And "{w2}"?'),
                    lambda: letters_turn(rng, w, "And how many letters does it have?")]
    else:
        again = rng.choice(["Now write it backwards.", "Can you spell it backwards?"])
        options += [lambda: reverse_turn(rng, w, again)]
    if mode != "vowels" and vowels(w) > 0:
        options.append(lambda: vowels_turn(rng, w, rng.choice(["And how many vowels does it have?",
                                                                "How many vowels are in it?"])))
    if mode == "letters":
        options.append(lambda: letters_turn(rng, w2, f'And "{w2}"?'))
    return rng.choice(options)()


KM_VALUES = [0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 42, 50]
HOUR_VALUES = [0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9, 10, 12, 24]


def hours_word(h):
    return f"{fmt(h)} {'hour' if h == 1 else 'hours'}"


def units_turn(rng, kind, x, q):
    if kind == "km2m":
        a, w = f"{fmt(x)} km = {fmt(x * 1000)} m.", f"{fmt(x)} km = {fmt(x * rng.choice([100, 10]))} m."
    elif kind == "m2km":
        a, w = f"{fmt(x * 1000)} m = {fmt(x)} km.", f"{fmt(x * 1000)} m = {fmt(x * rng.choice([10, 100]))} km."
    elif kind == "h2min":
        a = f"{hours_word(x)} = {fmt(x * 60)} minutes."
        w = f"{hours_word(x)} = {rng.choice([fmt(x * 100), fmt(x * 60 + rng.choice([-10, 10]))])} minutes."
    else:  # min2h
        a = f"{fmt(x * 60)} minutes = {hours_word(x)}."
        w = f"{fmt(x * 60)} minutes = {hours_word(x + rng.choice([0.5, 1]))}."
    return Turn(q, a, w, ("units", kind, x))


def t_units(rng):
    kind = rng.choice(["km2m", "m2km", "h2min", "min2h", "trip"])
    if kind in ("km2m", "m2km"):
        x = rng.choice(KM_VALUES)
        if kind == "km2m":
            q = rng.choice([f"How many meters are in {fmt(x)} km?", f"Convert {fmt(x)} km to meters.",
                            f"What is {fmt(x)} kilometers in meters?"])
        else:
            q = rng.choice([f"How many kilometers is {fmt(x * 1000)} m?", f"Convert {fmt(x * 1000)} meters to km.",
                            f"What is {fmt(x * 1000)} m in kilometers?"])
        return units_turn(rng, kind, x, q)
    x = rng.choice(HOUR_VALUES)
    if kind == "h2min":
        q = rng.choice([f"How many minutes are in {hours_word(x)}?", f"Convert {hours_word(x)} to minutes.",
                        f"What is {hours_word(x)} in minutes?"])
    elif kind == "min2h":
        q = rng.choice([f"How many hours is {fmt(x * 60)} minutes?", f"Convert {fmt(x * 60)} minutes to hours.",
                        f"What is {fmt(x * 60)} minutes in hours?"])
    else:
        x = rng.choice([h for h in HOUR_VALUES if 1 <= h <= 6])
        q = f"{rng.choice(TRIPS)} takes {hours_word(x)}. How many minutes is that?"
        kind = "h2min"
    return units_turn(rng, kind, x, q)


def f_units(rng, state):
    _, kind, prev = state
    if kind in ("km2m", "m2km"):
        x = rng.choice([v for v in KM_VALUES if v != prev])
        q = f"And {fmt(x)} km?" if kind == "km2m" else f"And {fmt(x * 1000)} m?"
    else:
        x = rng.choice([v for v in HOUR_VALUES if v != prev])
        q = f"And {hours_word(x)}?" if kind == "h2min" else f"And {fmt(x * 60)} minutes?"
    return units_turn(rng, kind, x, q)


def day_turn(rng, d, n, q):
    e = (d + n) % 7
    wrong = (e + rng.choice([-1, 1])) % 7
    if n == 1:
        a, w = f"The day after {WEEKDAYS[d]} is {WEEKDAYS[e]}.", f"The day after {WEEKDAYS[d]} is {WEEKDAYS[wrong]}."
    else:
        a = f"{n} days after {WEEKDAYS[d]} it will be {WEEKDAYS[e]}."
        w = f"{n} days after {WEEKDAYS[d]} it will be {WEEKDAYS[wrong]}."
    return Turn(q, a, w, ("day", e))


def t_days(rng):
    d = rng.randrange(7)
    if rng.random() < 0.2:
        return day_turn(rng, d, 1, rng.choice([f"What day comes after {WEEKDAYS[d]}?",
                                               f"Which day of the week follows {WEEKDAYS[d]}?"]))
    n = rng.randint(2, 20)
    q = rng.choice([f"If today is {WEEKDAYS[d]}, what day will it be in {n} days?",
                    f"Today is {WEEKDAYS[d]}. What day is it {n} days from now?",
                    f"What day of the week is {n} days after {WEEKDAYS[d]}?"])
    return day_turn(rng, d, n, q)


def f_days(rng, state):
    n = rng.randint(2, 10)
    return day_turn(rng, state[1], n, rng.choice([f"And {n} days after that?", f"And {n} days later?"]))


def is_prime(n):
    return n >= 2 and all(n % k for k in range(2, int(n ** 0.5) + 1))


def yn_turn(q, truth, yes, no, state):
    return Turn(q, yes if truth else no, no if truth else yes, state)


def t_yesno(rng):
    kind = rng.choice(["prime", "prime", "even", "odd", "greater", "mammal"])
    if kind == "prime":
        n = rng.randint(2, 100)
        q = rng.choice([f"Is {n} a prime number?", f"Is {n} prime?"])
        return yn_turn(q, is_prime(n), f"Yes, {n} is a prime number.", f"No, {n} is not a prime number.", ("prime", n))
    if kind in ("even", "odd"):
        n = rng.randint(1, 200)
        truth = (n % 2 == 0) == (kind == "even")
        q = rng.choice([f"Is {n} an {kind} number?", f"Is {n} {kind}?"])
        return yn_turn(q, truth, f"Yes, {n} is an {kind} number.", f"No, {n} is not an {kind} number.", (kind, n))
    if kind == "greater":
        a, b = rng.randint(1, 100), rng.randint(1, 100)
        while a == b:
            b = rng.randint(1, 100)
        q = rng.choice([f"Is {a} greater than {b}?", f"Is {a} bigger than {b}?"])
        return yn_turn(q, a > b, f"Yes, {a} is greater than {b}.", f"No, {a} is not greater than {b}.",
                       ("greater", a))
    animal = rng.choice(MAMMALS + NOT_MAMMALS)
    art = "an" if animal[0] in "aeiou" else "a"
    q = rng.choice([f"Is {art} {animal} a mammal?", f"Is it true that {art} {animal} is a mammal?"])
    return yn_turn(q, animal in MAMMALS, f"Yes, {art} {animal} is a mammal.", f"No, {art} {animal} is not a mammal.",
                   ("mammal", animal))


def f_yesno(rng, state):
    kind = state[0]
    if kind == "prime":
        n = rng.randint(2, 100)
        return yn_turn(rng.choice([f"What about {n}?", f"And {n}?"]), is_prime(n), f"Yes, {n} is a prime number.",
                       f"No, {n} is not a prime number.", ("prime", n))
    if kind in ("even", "odd"):
        n = rng.randint(1, 200)
        truth = (n % 2 == 0) == (kind == "even")
        return yn_turn(rng.choice([f"What about {n}?", f"And {n}?"]), truth, f"Yes, {n} is an {kind} number.",
                       f"No, {n} is not an {kind} number.", (kind, n))
    if kind == "mammal":
        animal = rng.choice([a for a in MAMMALS + NOT_MAMMALS if a != state[1]])
        art = "an" if animal[0] in "aeiou" else "a"
        return yn_turn(rng.choice([f"What about {art} {animal}?", f"And {art} {animal}?"]), animal in MAMMALS,
                       f"Yes, {art} {animal} is a mammal.", f"No, {art} {animal} is not a mammal.",
                       ("mammal", animal))
    return None


def t_story(rng):
    name, he = rng.choice(PEOPLE)
    kind = rng.choice(["total", "change", "more", "share"])
    if kind == "total":
        i1, i2 = rng.sample(ITEMS_EUR, 2)
        a, b = rng.randint(2, 30), rng.randint(1, 20)
        q = f"{name} buys a {i1} for €{a} and a {i2} for €{b}. How much does {he} spend in total?"
        n, say = a + b, lambda k: f"{name} spends €{k} in total."
    elif kind == "change":
        item = rng.choice(ITEMS_EUR)
        paid = rng.choice([10, 20, 50])
        cost = rng.randint(1, paid - 1)
        q = f"{name} pays with a €{paid} note for a {item} that costs €{cost}. How much change does {he} get?"
        n, say = paid - cost, lambda k: f"{name} gets €{k} in change."
    elif kind == "more":
        noun, emoji = rng.choice(COUNTABLES)
        a, b = rng.randint(2, 20), rng.randint(1, 15)
        q = f"{name} has {a} {noun} {emoji} and gets {b} more. How many {noun} does {he} have now?"
        n, say = a + b, lambda k: f"{name} has {k} {noun} now."
    else:
        noun, emoji = rng.choice(COUNTABLES)
        k = rng.randint(2, 6)
        each = rng.randint(2, 8)
        q = f"{name} shares {k * each} {noun} {emoji} equally among {k} friends. How many {noun} does each friend get?"
        n, say = each, lambda x: f"Each friend gets {x} {noun}."
    return Turn(q, say(n), say(off_by(rng, n, 1)), ("num", n))


# task -> (weight, question maker)
TASKS = {
    "arith": (22, t_arith), "capital": (14, t_capital), "opposite": (11, t_opposite), "plural": (9, t_plural),
    "count": (8, t_count), "reverse": (6, t_reverse), "units": (10, t_units), "days": (7, t_days),
    "yesno": (8, t_yesno), "story": (5, t_story),
}
# state kind of the last turn -> follow-up maker (None: ask a fresh question instead)
FOLLOW = {"num": f_arith, "capital": f_capital, "opp": f_opposite, "plural": f_plural, "word": f_word,
          "units": f_units, "day": f_days, "prime": f_yesno, "even": f_yesno, "odd": f_yesno, "mammal": f_yesno,
          "greater": lambda rng, s: None}


class Generator:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.used = {}  # standalone question -> split (dict: insertion-ordered, never iterated for output)

    def fresh(self, split, exclude_task=None):
        """A standalone question not used anywhere yet."""
        names = [n for n in TASKS if n != exclude_task]
        weights = [TASKS[n][0] for n in names]
        for _ in range(1000):
            name = self.rng.choices(names, weights)[0]
            turn = TASKS[name][1](self.rng)
            if turn.user not in self.used:
                self.used[turn.user] = split
                return name, turn
        raise RuntimeError("ran out of fresh questions")

    def follow(self, split, name, last):
        """The next turn: a follow-up on `last` (60%) or a fresh question of another task."""
        if self.rng.random() < 0.6:
            t = FOLLOW[last.state[0]](self.rng, last.state)
            if t is not None:
                return name, t
        return self.fresh(split, exclude_task=name)

    def conversation(self, split, n_turns):
        name, first = self.fresh(split)
        turns = [first]
        while len(turns) < n_turns:
            name, t = self.follow(split, name, turns[-1])
            turns.append(t)
        return turns

    def short(self, make):
        """make() until every conversation of the row fits the length budget (with some margin);
        the prompts of discarded rows stay used, so train/test stay disjoint."""
        for _ in range(100):
            row = make()
            if all(approx_tokens(row[k]) <= MAX_TOKENS - 10 for k in ("messages", "rejected") if k in row):
                return row
        raise RuntimeError("could not make a short enough row")

    def sft_row(self, split):
        return self.short(lambda: self._sft_row(split))

    def prefs_row(self, split, kind):
        return self.short(lambda: self._prefs_row(split, kind))

    def _sft_row(self, split):
        r = self.rng.random()
        n_turns = 1 if r < 0.55 else (2 if r < 0.85 else 3)
        thanks = n_turns > 1 and self.rng.random() < 0.15  # the last exchange is a closing "thanks"
        turns = self.conversation(split, n_turns - thanks)
        messages = []
        if self.rng.random() < 0.2:
            messages.append({"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)})
        for t in turns:
            messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.answer}]
        if thanks:
            user, answer = self.rng.choice(THANKS)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        prompt = turns[0].user
        return {"prompt": prompt, "prompt_id": sha(prompt), "messages": messages}

    def rejected_text(self, kind, turn):
        rng = self.rng
        if kind == "wrong_value":
            return turn.wrong
        if kind == "unhelpful":
            return rng.choice(UNHELPFUL)
        style = rng.choice(["caps", "rude", "ramble"])
        if style == "caps":
            return turn.answer.upper().rstrip(".") + rng.choice(["!!!", "!!", "!!! OBVIOUSLY."])
        if style == "rude":
            return f"{rng.choice(RUDE_PREFIX)} {turn.answer} {rng.choice(RUDE_SUFFIX)}"
        return f"{rng.choice(RAMBLE_PREFIX)} {turn.answer} {rng.choice(RAMBLE_SUFFIX)}"

    def _prefs_row(self, split, kind):
        rng = self.rng
        n_turns = 1 if rng.random() < 0.75 else 2
        turns = self.conversation(split, n_turns)
        shared = []
        for t in turns[:-1]:
            shared += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.answer}]
        shared.append({"role": "user", "content": turns[-1].user})
        chosen = shared + [{"role": "assistant", "content": turns[-1].answer}]
        rejected = [dict(m) for m in shared] + [{"role": "assistant", "content": self.rejected_text(kind, turns[-1])}]
        score_chosen = rng.choice([8.0, 8.5, 9.0, 9.5, 10.0])
        score_rejected = rng.choice({"wrong_value": [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0],
                                     "unhelpful": [1.0, 1.5, 2.0, 2.5, 3.0],
                                     "style": [4.0, 4.5, 5.0, 5.5, 6.0, 6.5]}[kind])
        prompt = turns[0].user
        return {"prompt": prompt, "prompt_id": sha(prompt), "chosen": chosen, "rejected": rejected,
                "messages": [dict(m) for m in chosen], "score_chosen": score_chosen,
                "score_rejected": score_rejected, "rejected_kind": kind}

    def split(self, split, n):
        if split.endswith("_sft"):
            return [self.sft_row(split) for _ in range(n)]
        kinds = ["wrong_value"] * (n // 2) + ["unhelpful"] * (n // 4)
        kinds += ["style"] * (n - len(kinds))
        self.rng.shuffle(kinds)
        return [self.prefs_row(split, k) for k in kinds]


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, "rb") as f:
        return [json.loads(line.decode("utf-8")) for line in f.read().split(b"\n") if line]


# ----------------------------------------------------------------------------------------------
# Verification.

SFT_KEYS = ["prompt", "prompt_id", "messages"]
PREFS_KEYS = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected",
              "rejected_kind"]
MAX_TOKENS = 120


def approx_tokens(messages):
    """A deliberately high estimate of SmolLM2 chat-template tokens: each ASCII word, digit and
    punctuation mark counts 1 (a word over 7 letters counts 2), each non-ASCII character 2, each
    message 5 for its template markers, plus 20 for the default system prompt that SmolLM2's
    template inserts when there is none."""
    n = 0 if messages[0]["role"] == "system" else 20
    for m in messages:
        n += 5
        for tok in re.findall(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]", m["content"]):
            if tok.isascii():
                n += 2 if len(tok) > 7 else 1
            else:
                n += 2
    return n


def check_conversation(msgs, where, allow_system):
    assert isinstance(msgs, list) and msgs, where
    i = 0
    if msgs[0]["role"] == "system":
        assert allow_system, f"{where}: unexpected system message"
        i = 1
    body = msgs[i:]
    assert body and len(body) % 2 == 0, f"{where}: must be user/assistant pairs"
    for j, m in enumerate(body):
        assert list(m) == ["role", "content"], f"{where}: message keys {list(m)}"
        assert m["role"] == ("user" if j % 2 == 0 else "assistant"), f"{where}: roles do not alternate"
        assert isinstance(m["content"], str) and m["content"].strip() == m["content"] and m["content"], where
    assert all(m["role"] != "system" for m in body), f"{where}: system message after the start"
    assert approx_tokens(msgs) <= MAX_TOKENS, f"{where}: too long ({approx_tokens(msgs)} tokens, estimated)"


def verify(out):
    data = {}
    for split in COUNTS:
        path = os.path.join(out, f"{split}.jsonl")
        with open(path, "rb") as f:
            raw = f.read()
        raw.decode("utf-8")  # valid UTF-8
        assert raw.endswith(b"\n") and b"\r" not in raw, path
        rows = read_jsonl(path)
        assert len(rows) == len(raw.split(b"\n")) - 1, f"{path}: one object per line"
        data[split] = rows
    stats = {}
    for split, rows in data.items():
        sft = split.endswith("_sft")
        ids = [r["prompt_id"] for r in rows]
        assert len(set(ids)) == len(ids), f"{split}: duplicate prompts"
        for k, r in enumerate(rows):
            where = f"{split}[{k}]"
            assert list(r) == (SFT_KEYS if sft else PREFS_KEYS), f"{where}: keys {list(r)}"
            assert r["prompt_id"] == sha(r["prompt"]), where
            if sft:
                check_conversation(r["messages"], where, allow_system=True)
                first_user = next(m for m in r["messages"] if m["role"] == "user")
                assert first_user["content"] == r["prompt"], where
            else:
                check_conversation(r["chosen"], where + ".chosen", allow_system=False)
                check_conversation(r["rejected"], where + ".rejected", allow_system=False)
                assert r["messages"] == r["chosen"], where
                assert r["chosen"][:-1] == r["rejected"][:-1], f"{where}: chosen/rejected prompt turns differ"
                assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"], where
                assert r["chosen"][0]["content"] == r["prompt"], where
                assert isinstance(r["score_chosen"], float) and isinstance(r["score_rejected"], float), where
                assert r["score_chosen"] > r["score_rejected"], where
                assert r["rejected_kind"] in ("wrong_value", "unhelpful", "style"), where
        msgs = [r["messages"] for r in rows]
        stats[split] = {
            "rows": len(rows),
            "turns": {t: sum(1 for m in msgs if sum(x["role"] == "user" for x in m) == t) for t in (1, 2, 3)},
            "with_system": sum(m[0]["role"] == "system" for m in msgs),
            "max_tokens_est": max(approx_tokens(r.get("rejected", r["messages"])) for r in rows),
            "max_tokens_est_chosen": max(approx_tokens(m) for m in msgs),
            "non_ascii_rows": sum(not json.dumps(r, ensure_ascii=False).isascii() for r in rows),
        }
        if not sft:
            stats[split]["rejected_kind"] = {k: sum(r["rejected_kind"] == k for r in rows)
                                             for k in ("wrong_value", "unhelpful", "style")}
    # Test prompts never occur in training: neither as a prompt nor as any user turn.
    train_users = {m["content"] for s in ("train_sft", "train_prefs") for r in data[s]
                   for m in r.get("rejected", []) + r["messages"] if m["role"] == "user"}
    train_prompts = {r["prompt"] for s in ("train_sft", "train_prefs") for r in data[s]}
    for s in ("test_sft", "test_prefs"):
        for r in data[s]:
            assert r["prompt"] not in train_prompts, f"{s}: prompt also in train: {r['prompt']!r}"
            assert r["prompt"] not in train_users, f"{s}: prompt is a user turn in train: {r['prompt']!r}"
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--check", action="store_true", help="only verify the files in --out")
    args = ap.parse_args()
    out = os.path.normpath(args.out)
    if not args.check:
        os.makedirs(out, exist_ok=True)
        gen = Generator(args.seed)
        rows = {split: gen.split(split, COUNTS[split]) for split in ORDER}
        for split in COUNTS:
            write_jsonl(os.path.join(out, f"{split}.jsonl"), rows[split])
    stats = verify(out)
    for split, s in stats.items():
        path = os.path.join(out, f"{split}.jsonl")
        print(f"{path}: {os.path.getsize(path)} bytes, {json.dumps(s, ensure_ascii=False)}")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
