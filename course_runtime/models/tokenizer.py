"""A character-level tokenizer and the corpus it was built from.

One token per character keeps the vocabulary tiny (80 symbols for the shipped corpus), so the
embedding table and output layer cost almost nothing and every parameter of the tiny GPT goes
into its layers. It also makes speculative decoding easy to follow: a draft token is a letter.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CORPUS_PATH = ASSETS / "corpus" / "moby_dick.txt.gz"
TOKENIZER_PATH = ASSETS / "weights" / "tokenizer.json"


def load_corpus(path: Path = CORPUS_PATH) -> str:
    """The shipped corpus (Moby-Dick, public domain) as one string."""
    with gzip.open(path, "rt", encoding="ascii") as f:
        return f.read()


def split_corpus(text: str, val_fraction: float = 0.05) -> tuple[str, str]:
    """Train on the first 95 % of the book, validate on its last 5 % (held-out chapters)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


class CharTokenizer:
    """Maps each character of a fixed alphabet to an integer id and back."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("the tokenizer's alphabet has repeated characters")
        self.alphabet = alphabet
        self._ids = {ch: i for i, ch in enumerate(alphabet)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The alphabet of ``text``, sorted by code point (deterministic)."""
        return cls("".join(sorted(set(text))))

    @classmethod
    def load(cls, path: Path = TOKENIZER_PATH) -> CharTokenizer:
        return cls(json.loads(path.read_text())["alphabet"])

    def save(self, path: Path = TOKENIZER_PATH) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "char", "alphabet": self.alphabet}, indent=1) + "\n")

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a character outside the alphabet is an error, never dropped."""
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as err:
            ch = err.args[0]
            where = text.index(ch)
            raise ValueError(f"unknown character {ch!r} at index {where} of the text: the "
                             f"tokenizer knows only the {self.vocab_size} characters of its "
                             f"corpus (ASCII letters, digits, punctuation, space, newline)"
                             ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids; an id outside the vocabulary is an error."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"unknown token id {i}: the vocabulary has ids "
                                 f"0..{self.vocab_size - 1}")
            out.append(self.alphabet[i])
        return "".join(out)
