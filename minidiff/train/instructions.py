"""The instruction corpus for training and evaluating the Plugin-Selector, its train/test split, and the
sentence combinations of the paper's multi-task and "Single + Non" settings.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024),
sec. 4 ("we employ GPT to generate text prompts for each task ... augment text diversity by randomly
combining text inputs from various tasks") and Table 5. The official repository (yuhaoliu7456/Diff-Plugin
@ 79e12bb) released neither the prompts nor the selector training; the corpus in data/instructions.json
was written for minidiff, by hand:

    {"tasks":      {"derain": ["remove the rain", "it's pouring, fix it", ...], "desnow": [...], ...},
     "multi":      [{"text": "remove the rain and the haze", "tasks": ["derain", "dehaze"]}, ...],
     "irrelevant": ["make it look like a Van Gogh painting", "add a cat", ...]}

Adding a task = adding a key under "tasks" with its sentences (80 or more, phrased as users write:
imperatives, questions, descriptions of the problem, typos, any case); multi-task sentences may then name it.
A corpus of your own in this format is read with load_corpus(path) (tools: --instructions).

The split: a sentence is held out for testing when the first 8 bytes of SHA-256 of its normalised text
(lower case, whitespace collapsed), read as a big-endian integer, are below TEST_PERCENT % of 2^64 (for
exactness: `int % 100 < TEST_PERCENT`). It depends on the sentence alone, not on its list, its position or
the Python version (Python's hash() is salted per process), so adding sentences never moves another one,
and spellings that differ only in case or spacing (the same tokens: CLIP's tokenizer lowercases) fall on
the same side. The held-out part never trains: combinations are drawn within one part.

    corpus = load_corpus()                          # the packaged corpus
    train, test = corpus.part("train"), corpus.part("test")
    sets = evaluation_sets(test, seed=0)            # {"single-task": [(text, tasks)], "multi-task": ..., ...}
"""
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).parents[1] / "data" / "instructions.json"
TEST_PERCENT = 20  # share of sentences held out for testing (by hash, see split_of)
# How two sentences are joined into one request ("remove the rain" + "brighten it"): the connectors that
# start with "." make two sentences, the others one (the first loses its end punctuation; see join).
CONNECTORS = (" and ", ", and ", ", then ", ". Also, ", " and also ", "; ", " & ", ". ")


def normalise(text):
    """The text the split hashes: lower case, runs of whitespace -> one space, no outer spaces."""
    return " ".join(text.lower().split())


def split_of(text):
    """'test' or 'train' for a sentence, from SHA-256 of its normalised text (stable everywhere)."""
    digest = hashlib.sha256(normalise(text).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


@dataclass(frozen=True)
class Corpus:
    """single: {task: (sentences)}; multi: ((text, (tasks)), ...); irrelevant: (sentences)."""
    single: dict
    multi: tuple
    irrelevant: tuple

    @property
    def tasks(self):
        return tuple(self.single)

    def part(self, name):
        """The sentences of one side of the split ('train' or 'test')."""
        if name not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', not {name!r}")
        return Corpus({t: tuple(s for s in v if split_of(s) == name) for t, v in self.single.items()},
                      tuple(m for m in self.multi if split_of(m[0]) == name),
                      tuple(s for s in self.irrelevant if split_of(s) == name))

    def restrict(self, tasks):
        """Only `tasks` (in that order): multi-task sentences that name another task are dropped."""
        keep = set(tasks)
        return Corpus({t: self.single[t] for t in tasks},
                      tuple(m for m in self.multi if set(m[1]) <= keep), self.irrelevant)

    def labelled(self):
        """Every sentence with its task tuple: singles, multi-task ones, irrelevant ones (no task)."""
        out = [(s, (t,)) for t, v in self.single.items() for s in v]
        return out + list(self.multi) + [(s, ()) for s in self.irrelevant]


def load_corpus(path=CORPUS):
    """Read an instruction corpus (default: the packaged one). ValueError naming the first problem."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    single = raw.get("tasks")
    if not isinstance(single, dict) or not single:
        raise ValueError(f"{path}: no 'tasks' object ({{task: [sentences]}})")
    for task, sentences in single.items():
        if not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
            raise ValueError(f"{path}: task {task!r} needs a non-empty list of non-blank sentences")
    multi = []
    for m in raw.get("multi", []):
        unknown = [t for t in m["tasks"] if t not in single]
        if unknown or len(set(m["tasks"])) < 2:
            raise ValueError(f"{path}: multi-task sentence {m['text']!r} must name 2+ tasks of 'tasks' "
                             f"(unknown: {unknown})")
        multi.append((m["text"], tuple(t for t in single if t in m["tasks"])))  # tasks in corpus order
    seen = {}
    for text, _ in Corpus(single, tuple(multi), tuple(raw.get("irrelevant", []))).labelled():
        if normalise(text) in seen:
            raise ValueError(f"{path}: {text!r} appears twice (same as {seen[normalise(text)]!r})")
        seen[normalise(text)] = text
    return Corpus({t: tuple(v) for t, v in single.items()}, tuple(multi), tuple(raw.get("irrelevant", [])))


def join(texts, rng):
    """One request from several sentences, with connectors drawn from `rng` (a random.Random)."""
    out = texts[0].strip()
    for text in texts[1:]:
        sep = rng.choice(CONNECTORS)
        if sep.startswith("."):  # a new sentence: after "?" or "!" no full stop is added
            out = out.rstrip(".") + (sep[1:] if out.endswith(("?", "!")) else sep)
        else:  # the same sentence goes on: its end punctuation goes
            out = out.rstrip(".!?,;") + sep
        out += text.strip()
    return out


def combine(corpus, count, seed, sizes=(2, 3)):
    """`count` random multi-task requests: 2 or 3 (`sizes`) distinct tasks, one sentence of each, joined
    (the paper's "randomly combining text inputs from various tasks"). [(text, tasks in corpus order)].
    random.Random(seed): its choice/sample draws are the same on every Python 3 version."""
    rng, tasks, out = random.Random(seed), corpus.tasks, []
    if len(tasks) < 2:
        return out
    for _ in range(count):
        picked = rng.sample(tasks, min(rng.choice(sizes), len(tasks)))
        texts = [rng.choice(corpus.single[t]) for t in picked]
        out.append((join(texts, rng), tuple(t for t in tasks if t in picked)))
    return out


def with_irrelevant(corpus, seed):
    """Each single-task sentence joined with a random irrelevant one, in random order (Table 5 "Single +
    Non"): the request is positive for its task alone. [(text, (task,))]."""
    rng, out = random.Random(seed), []
    if not corpus.irrelevant:
        raise ValueError("the corpus has no irrelevant sentences (needed for the Single + Non setting)")
    for task, sentences in corpus.single.items():
        for s in sentences:
            other = rng.choice(corpus.irrelevant)
            out.append((join([s, other] if rng.random() < 0.5 else [other, s], rng), (task,)))
    return out


def evaluation_sets(corpus, seed=0, combinations=200):
    """Table 5's three settings on (the test part of) a corpus: {"single-task": every single-task sentence,
    "multi-task": the written multi-task sentences + `combinations` random combinations of single-task
    ones, "single+non": every single-task sentence joined with an irrelevant one} -> {name: [(text, tasks)]}.
    """
    single = [(s, (t,)) for t, v in corpus.single.items() for s in v]
    return {"single-task": single,
            "multi-task": list(corpus.multi) + combine(corpus, combinations, seed),
            "single+non": with_irrelevant(corpus, seed)}
