"""The made-up language of the text workload, shared by the data generator and the tokenizer.

Words are random letter strings ranked by frequency; the tokenizer's WordPiece vocabulary
holds the most frequent words whole and random ``##`` pieces for the rest, so frequent words
are one token and rare words split into several, as with a real BERT vocabulary.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np

VOCAB_SIZE = 30_000
SPECIAL = ("[PAD]", "[CLS]", "[UNK]")
PAD_ID, CLS_ID, UNK_ID = 0, 1, 2
LETTERS = "abcdefghijklmnopqrstuvwxyzéèü"
PUNCTUATION = ".,;:!?"
WORDS = 40_000
WHOLE_WORDS = 12_000  # the most frequent words that are one token each


@functools.cache
def words(seed: int = 5) -> tuple[str, ...]:
    """Distinct lowercase words, most frequent first (the generator draws ranks from a Zipf law)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(LETTERS))
    # Mostly plain letters; accented ones are rare, as in English text with loanwords.
    weights = np.r_[np.full(26, 1.0), np.full(len(LETTERS) - 26, 0.05)]
    drawn = rng.choice(letters, size=(2 * WORDS, 11), p=weights / weights.sum())
    lengths = rng.integers(2, 12, size=2 * WORDS)
    seen: dict[str, None] = {}
    for row, n in zip(drawn.tolist(), lengths.tolist(), strict=True):
        seen.setdefault("".join(row[:n]), None)
        if len(seen) == WORDS:
            break
    return tuple(seen)


def strip_accents(text: str) -> str:
    """What BERT's basic tokenizer does to accents: NFD, then drop the combining marks."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


@functools.cache
def wordpiece_vocab(seed: int = 6) -> dict[str, int]:
    """Token -> id: specials, single letters and punctuation, frequent whole words, ``##`` pieces."""
    vocab: dict[str, int] = {}
    plain = LETTERS[:26]
    for token in (
        *SPECIAL,
        *plain,
        *(f"##{c}" for c in plain),
        *PUNCTUATION,
        *(strip_accents(w) for w in words()[:WHOLE_WORDS]),
    ):
        vocab.setdefault(token, len(vocab))
    rng = np.random.default_rng(seed)
    drawn = rng.choice(np.array(list(plain)), size=(2 * VOCAB_SIZE, 4)).tolist()
    lengths = rng.integers(2, 5, size=2 * VOCAB_SIZE).tolist()
    suffix = (rng.random(2 * VOCAB_SIZE) >= 0.3).tolist()
    for row, n, is_suffix in zip(drawn, lengths, suffix, strict=True):
        piece = "".join(row[:n])
        vocab.setdefault(f"##{piece}" if is_suffix else piece, len(vocab))
        if len(vocab) == VOCAB_SIZE:
            break
    return vocab
