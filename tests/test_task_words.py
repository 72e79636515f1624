"""tools/task_words.py (WordNet's words for each task, the small family's words stage) and the swap that the
words stage applies to training sentences (minidiff.train.small.swap_task_words).

The WordNet reader is tested on a tiny database written here in WordNet's own file format (wndb(5WN):
byte offsets, hex word counts, pointers with source/target word numbers), so nothing is downloaded.
"""
import importlib.util
import json
import random
from pathlib import Path

import pytest

from minidiff.train import instructions, small

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("task_words_tool", ROOT / "tools" / "task_words.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def write_wordnet(folder, synsets, senses):
    """synsets {key: (pos, [words], [(symbol, target key, source word no, target word no)])}, senses
    {pos: {lemma: [key, ...]}} -> index.<pos> / data.<pos> files with real byte offsets."""
    names = {"n": "noun", "v": "verb", "a": "adj"}
    offsets, lines = {}, {p: [] for p in names}
    for pass_ in range(2):  # offsets are fixed-width (8 digits): the second pass fills them in
        size = {p: len("  1 licence header line\n") for p in names}
        for key, (pos, words, pointers) in synsets.items():
            offsets[key] = size[pos]
            ptrs = " ".join(f"{sym} {offsets.get(t, 0):08d} {synsets[t][0]} {s:02x}{w:02x}"
                            for sym, t, s, w in pointers)
            word_part = " ".join(f"{w} 0" for w in words)
            line = f"{offsets[key]:08d} 03 {pos} {len(words):02x} {word_part} {len(pointers):03d} {ptrs} | gloss\n"
            if pass_:
                lines[pos].append(line)
            size[pos] += len(line.encode("latin-1"))
    for pos, name in names.items():
        (folder / f"data.{name}").write_text("  1 licence header line\n" + "".join(lines[pos]), encoding="latin-1")
        index = ["  1 licence header line\n"]
        for lemma, keys in sorted(senses.get(pos, {}).items()):
            synsets_of = " ".join(f"{offsets[k]:08d}" for k in keys)
            index.append(f"{lemma} {pos} {len(keys)} 0 {len(keys)} 0 {synsets_of}  \n")
        (folder / f"index.{name}").write_text("".join(index), encoding="latin-1")


class Labelled:
    def __init__(self, rows):
        self.rows = rows

    def part(self, name):
        return self

    def labelled(self):
        return self.rows


def tiny_wordnet(tmp_path):
    synsets = {
        "rain": ("n", ["rain", "rainfall"], [("~", "drizzle", 0, 0), ("~", "pour", 0, 0)]),
        "drizzle": ("n", ["drizzle", "mizzle"], []),
        "pour": ("n", ["pour"], []),
        "rainy": ("a", ["rainy", "showery"], [("+", "rain", 1, 1), ("+", "snow", 2, 1)]),
        "snow": ("n", ["snow", "white_stuff"], [("~", "flurry", 0, 0), ("~", "pour", 0, 0)]),
        "flurry": ("n", ["flurry"], []),
        "cocaine": ("n", ["snow", "coke"], []),
    }
    senses = {"n": {"rain": ["rain"], "snow": ["snow", "cocaine"], "drizzle": ["drizzle"]},
              "a": {"rainy": ["rainy"]}}
    write_wordnet(tmp_path, synsets, senses)
    return load_tool().WordNet(str(tmp_path))


def test_wordnet_reader_follows_hyponyms_and_the_seed_lemmas_own_derivations(tmp_path):
    wn = tiny_wordnet(tmp_path)
    assert wn.words_of("rain.n.1") == {"rain", "rainfall", "drizzle", "mizzle", "pour"}
    assert wn.words_of("snow.n.1") == {"snow", "white stuff", "flurry", "pour"}  # "_" -> " "
    assert wn.words_of("snow.n.2") == {"snow", "coke"}  # sense numbers in index order
    # rainy's derivation pointer from word 1 (rainy) is followed; the one from word 2 (showery) is not
    assert wn.words_of("rainy.a.1") == {"rainy", "showery", "rain"}
    with pytest.raises(Exception, match="snow.n.3"):
        wn.words_of("snow.n.3")


def test_task_words_drop_shared_words_and_words_the_corpus_gives_another_task(tmp_path):
    wn = tiny_wordnet(tmp_path)
    corpus = Labelled([("remove the rain", ("derain",)), ("a flurry of edits, add a cat", ()),
                       ("remove the snow", ("desnow",))])
    words = load_tool().task_words(wn, {"derain": ["rain.n.1"], "desnow": ["snow.n.1"]}, corpus)
    # "pour" is in both tasks' lists: dropped from both; "flurry" is used by a sentence naming no task
    assert words == {"derain": ["drizzle", "mizzle", "rain", "rainfall"], "desnow": ["snow", "white stuff"]}


def test_the_committed_task_words_follow_the_rules():
    record = json.loads((ROOT / "minidiff" / "data" / "task_words.json").read_text())
    assert record["source"]["package"] == "wordnet-base" and len(record["source"]["sha256"]) == 6
    words = record["words"]
    corpus = instructions.load_corpus()
    assert set(words) == set(corpus.tasks) and all(len(w) >= 10 for w in words.values())
    every = [w for ws in words.values() for w in ws]
    assert len(every) == len(set(every))  # no word in two tasks
    tool = load_tool()
    for task, ws in words.items():
        elsewhere = " ".join(s.lower() for s, ts in corpus.part("train").labelled() if task not in ts)
        assert not [w for w in ws if tool.used_in(w, elsewhere)], task
    assert small.load_task_words() == words


def test_swap_task_words():
    words = {"derain": ["rain", "downpour", "drizzle"], "desnow": ["snow", "flurry"]}
    rng = random.Random(0)
    assert small.swap_task_words("Remove the RAIN and the snow", ("derain",), words, rng, share=0.0) == \
        "Remove the RAIN and the snow"
    for _ in range(20):
        out = small.swap_task_words("Remove the RAIN and the snow", ("derain",), words, rng, share=1.0)
        head, tail = out.split(" and ")
        assert head.split()[-1] in words["derain"] and tail == "the snow"  # only the sentence's own tasks
    # whole words only: "rainbow" and "snowman" stay
    assert small.swap_task_words("a rainbow and a snowman", ("derain", "desnow"), words, rng, 1.0) == \
        "a rainbow and a snowman"
    # the same rng state gives the same sentence (the stage's batches are functions of the step)
    a = small.swap_task_words("rain, rain, snow", ("derain", "desnow"), words, random.Random(5))
    assert a == small.swap_task_words("rain, rain, snow", ("derain", "desnow"), words, random.Random(5))
