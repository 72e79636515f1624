#!/usr/bin/env python
"""Write minidiff/data/task_words.json: for each Diff-Plugin task, the words WordNet gives for its concepts.

    python tools/task_words.py                         # fetches Debian's wordnet-base, writes the JSON
    python tools/task_words.py --wordnet /usr/share/wordnet --output /tmp/task_words.json

Why: the small family's CLIP text tower is trained from nothing on the instruction corpus' ~500 training
sentences, so a word none of them uses ("downpour", "pitch-black", "smudged") means nothing to it. The
recipe's words stage (tools/train_small.py) swaps the task words of training sentences for other words of the
same concept, so that the tower learns them. Where they come from: WordNet 3.0 (Princeton; its licence lets
anyone use, copy, modify and distribute it with its notice, kept in the JSON), read from the pinned Debian
package wordnet-base 1:3.0-37, fetched like the photos (tools/small_data.py).

For each task, SEEDS names synsets as lemma.pos.sense (sense numbers in WordNet's index order: rain.n.1 is
"drops of fresh water that fall as precipitation from clouds"). A task's words: the lemmas of its seed
synsets, of their direct hyponyms (types of: "drizzle" of rain) and, for adjectives, of their similar-to
synsets; "_" becomes a space, lower case. Dropped: a word two tasks share, and a word that a training sentence
of the corpus NOT naming the task uses (the corpus says it means something else there: "white" is in rain
sentences, so it is no snow word). The seeds were chosen from the task names and the paper's task
descriptions, not from the corpus' held-out sentences.

Exit codes: 0 written; 2 WordNet cannot be had or read (one line on stderr); 1 the output cannot be written.
"""
import argparse
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

from minidiff.io.files import atomic_write, sha256_file  # noqa: E402
from minidiff.train.instructions import load_corpus  # noqa: E402
from minidiff.train.small_data import UsageError  # noqa: E402

PACKAGE, VERSION = "wordnet-base", "1:3.0-37"
DICT = "usr/share/wordnet"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj"}
OUTPUT = os.path.join(ROOT, "minidiff", "data", "task_words.json")
SEEDS = {
    "derain": ["rain.n.1", "rain.v.1", "raindrop.n.1", "rainy.a.1"],
    "desnow": ["snow.n.1", "snow.n.2", "snowflake.n.1", "snow.v.1", "snowy.a.2"],
    "dehaze": ["haze.n.1", "fog.n.1", "mist.n.1", "smog.n.1", "hazy.a.1", "foggy.a.4"],
    "lowlight": ["dark.a.1", "darkness.n.1", "dim.a.1", "brighten.v.1", "night.n.1"],
    "deblur": ["blur.n.1", "blur.v.2", "blur.v.4", "blurred.a.1", "sharpen.v.4", "focus.n.2"],
    "highlight": ["glare.n.1", "specular.a.1", "glossy.a.2", "shine.v.1", "reflection.n.2"],
    "face": ["face.n.1", "portrait.n.2", "facial.a.1"],
    "demoire": ["moire.n.1", "moire.a.1", "ripple.n.1", "wavy.a.2", "stripe.n.5"],
}
LICENCE = ("WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to use, copy, "
           "modify and distribute this software and database and its documentation for any purpose and "
           "without fee or royalty is hereby granted, provided that you agree to comply with the following "
           "copyright notice and statements, including the disclaimer, and that the same appear on ALL copies "
           "of the software, database and documentation, including modifications that you make for internal "
           "use or for distribution. (Full text: usr/share/doc/wordnet-base/copyright in the package.)")


class WordNet:
    """The parts of WordNet's database files (wndb(5WN)) that the expansion reads: index.<pos> maps a lemma
    to its synset offsets in sense order; data.<pos> holds at each offset a line with the synset's words
    and its pointers (symbol, target offset, target pos)."""

    def __init__(self, folder):
        self.folder = folder
        self.index = {pos: self._read_index(pos) for pos in POS_FILES}

    def _read_index(self, pos):
        out = {}
        with open(os.path.join(self.folder, "index." + POS_FILES[pos]), encoding="latin-1") as f:
            for line in f:
                if line.startswith(" "):  # the licence header
                    continue
                fields = line.split()
                synsets = int(fields[2])
                out[fields[0]] = fields[-synsets:]  # synset offsets, most frequent sense first
        return out

    def synset(self, pos, offset):
        """(words, [(pointer symbol, offset, pos, source word number, target word number)]) of the synset
        at `offset` of data.<pos> (word numbers from 1, 0 for the whole synset; a satellite adjective's pos
        's' read as 'a')."""
        with open(os.path.join(self.folder, "data." + POS_FILES[pos]), "rb") as f:
            f.seek(int(offset))
            fields = f.readline().decode("latin-1").split(" | ")[0].split()
        n_words = int(fields[3], 16)
        words = [fields[4 + 2 * k] for k in range(n_words)]
        k = 4 + 2 * n_words
        pointers = []
        for j in range(int(fields[k])):
            symbol, target, target_pos, st = fields[k + 1 + 4 * j: k + 5 + 4 * j]
            # st: source and target word numbers (2 hex digits each), 0000 for the whole synset
            pointers.append((symbol, target, "a" if target_pos == "s" else target_pos, int(st[:2], 16),
                             int(st[2:], 16)))
        return words, pointers

    def words_of(self, spec):
        """lemma.pos.sense -> the lemmas of that synset, of its direct hyponyms (~) and similar-to synsets
        (&), and the words derivationally related (+) to the seed lemma itself ("rainy" -> "rain"; not to its
        synonyms: "blurred" shares a synset with "foggy", whose relative "fog" is no blur word)."""
        lemma, pos, sense = spec.split(".")
        senses = self.index[pos].get(lemma, [])
        if not 1 <= int(sense) <= len(senses):
            raise UsageError(f"WordNet has no {spec} ({lemma!r} has {len(senses)} {POS_FILES[pos]} senses)")
        words, pointers = self.synset(pos, senses[int(sense) - 1])
        own = [k + 1 for k, w in enumerate(words) if clean(w) == lemma.replace("_", " ")]
        for symbol, target, target_pos, source, word in pointers:
            if symbol in ("~", "&"):
                words = words + self.synset(target_pos, target)[0]
            elif symbol == "+" and source in own and target_pos in POS_FILES:
                words = words + self.synset(target_pos, target)[0][word - 1:word]
        return {clean(w) for w in words}


def clean(word):
    """WordNet's lemma -> plain text: 'pitch_black' -> 'pitch black', adjective markers '(a)' dropped."""
    return re.sub(r"\(\w+\)$", "", word).replace("_", " ").lower()


def used_in(word, text):
    return re.search(r"\b" + re.escape(word) + r"\b", text) is not None


def task_words(wordnet, seeds, corpus):
    """{task: sorted words}: the seeds' words, minus those two tasks share or that the corpus' training
    sentences use for another task (or for no task)."""
    raw = {task: set().union(*(wordnet.words_of(s) for s in specs)) for task, specs in seeds.items()}
    count = {}
    for words in raw.values():
        for w in words:
            count[w] = count.get(w, 0) + 1
    labelled = corpus.part("train").labelled()
    out = {}
    for task, words in raw.items():
        elsewhere = " ".join(text.lower() for text, tasks in labelled if task not in tasks)
        out[task] = sorted(w for w in words if count[w] == 1 and not used_in(w, elsewhere))
    return out


def fetch_wordnet(cache):
    """The pinned wordnet-base's dictionary files under `cache` (fetched once): the folder that holds them."""
    from small_data import fetch_package
    dest = os.path.join(cache, "debian", f"{PACKAGE}_{VERSION.replace(':', '%3a')}")
    names = [f"{kind}.{POS_FILES[pos]}" for pos in POS_FILES for kind in ("index", "data")]
    if not all(os.path.isfile(os.path.join(dest, DICT, n)) for n in names):
        fetch_package("debian", PACKAGE, VERSION, [f"{DICT}/{n}" for n in names], dest, [])
    return os.path.join(dest, DICT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wordnet", help="a folder with WordNet 3.0's index.* and data.* (default: fetch "
                                     f"Debian's {PACKAGE} {VERSION})")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "minidiff", "small-data"))
    p.add_argument("--output", default=OUTPUT)
    args = p.parse_args(argv)
    try:
        folder = args.wordnet or fetch_wordnet(args.cache)
        wordnet = WordNet(folder)
        words = task_words(wordnet, SEEDS, load_corpus())
    except (UsageError, OSError, ValueError, IndexError) as e:
        print(f"error: WordNet: {e}", file=sys.stderr)
        return 2
    files = {f"{DICT}/{kind}.{POS_FILES[pos]}": sha256_file(os.path.join(folder, f"{kind}.{POS_FILES[pos]}"))
             for pos in POS_FILES for kind in ("index", "data")}
    record = {"format": "minidiff-task-words/1",
              "source": {"package": PACKAGE, "version": VERSION, "sha256": files, "licence": LICENCE},
              "made_by": "python tools/task_words.py", "seeds": SEEDS, "words": words}
    text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
    try:
        atomic_write(args.output, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))
    except OSError as e:
        print(f"error: {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: " + ", ".join(f"{t} {len(w)}" for t, w in words.items()) + " words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
