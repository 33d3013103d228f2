"""Word-level vocabulary built from training captions and saved as `vocab.json` beside the weights."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3, fixed so that configs can name them


class WordTokenizer:
    def __init__(self, words: Sequence[str]) -> None:
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {list(SPECIALS)}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(SPECIALS))

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 1) -> "WordTokenizer":
        counts = Counter(word for caption in captions for word in caption)
        # most frequent first, ties alphabetical: the same captions always give the same ids
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: Sequence[str], max_len: int | None = None) -> list[int]:
        """BOS + ids + EOS, cut to max_len (the EOS is kept)."""
        ids = [self.bos_id, *(self.index.get(w, self.unk_id) for w in words), self.eos_id]
        if max_len is not None and len(ids) > max_len:
            ids = ids[: max_len - 1] + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first EOS, without special tokens."""
        return [word for word in self.words_until_eos(ids) if word not in SPECIALS]

    def words_until_eos(self, ids: Iterable[int]) -> list[str]:
        """Every generated token before the first EOS, special tokens shown as themselves (e.g. "<unk>")."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            out.append(self.words[i])
        return out

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"words": self.words}, indent=0) + "\n")

    @classmethod
    def load(cls, path: Path) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError('expected an object with a "words" list')
        return cls([str(w) for w in data["words"]])
