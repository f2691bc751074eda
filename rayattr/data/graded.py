"""The graded built-in corpus: sources whose true value to the validation loss is ordered by
construction, so a per-source attribution can be checked against retraining.

The default corpus's clean sources are near-exchangeable (retraining orders them at pairwise ρ
0.36 across seeds), which no estimator can be judged on. Here the sources differ in kind, not
in topic, from nearly the validation text itself to pure noise:

- ``near_validation``: copies of the validation texts with a tenth of their words swapped for
  other words of the same length (near-duplicates, as deduplication would miss them);
- ``clean``: standard-library docstrings, disjoint from the validation texts;
- ``off_domain``: a generated pseudo-language of consonant-vowel syllables;
- ``noisy_10``, ``noisy_30``, ``noisy_60``: docstrings with that share of their characters
  replaced by uniform printable ASCII;
- ``noise``: every character replaced.

Every source has the same number of rows (n_train split evenly), so a source's value is its
per-sample value times a common count. Texts keep their byte length through every change, so
the sources differ in content, not in how many tokens they train on. Validation: clean
docstrings only, as in the default corpus. Deterministic for the same arguments (on the same
Python version, as the docstrings are).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from rayattr.data.corpus import (
    NOISE_ALPHABET,
    source_rng,
    split_evenly,
    corpus_table,
    default_min_chars,
    size,
    source_pools,
)
from rayattr.data.errors import DataError

# Most to least valuable, as constructed; BENCHMARKS.md "Sources that truly differ" gives the
# order retraining finds.
GRADED_SOURCES: tuple[str, ...] = (
    "near_validation", "clean", "off_domain", "noisy_10", "noisy_30", "noisy_60", "noise",
)
# Share of characters replaced in each noisy source.
NOISE_RATES: dict[str, float] = {"noisy_10": 0.1, "noisy_30": 0.3, "noisy_60": 0.6, "noise": 1.0}
# Share of words swapped in a near-duplicate: small enough that the copy is the same text.
NEAR_DUPLICATE_SWAP = 0.1

_CONSONANTS = np.array(list("bcdfghjklmnprstvwz"))
_VOWELS = np.array(list("aeiou"))


def replace_chars(text: str, rng: np.random.Generator, rate: float) -> str:
    """text with each character replaced, with probability rate, by uniform printable ASCII.
    Length and byte length are kept (the texts are ASCII)."""
    chars = np.array(list(text))
    hit = rng.random(len(chars)) < rate
    chars[hit] = rng.choice(NOISE_ALPHABET, size=int(hit.sum()))
    return "".join(chars)


def swap_words(text: str, rng: np.random.Generator, by_length: dict[int, list[str]], rate: float) -> str:
    """text with each word, with probability rate, replaced by a word of the same length drawn
    from by_length (kept where none has that length): a near-duplicate of the same size."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if rng.random() < rate and by_length.get(len(word)):
            pool = by_length[len(word)]
            words[i] = pool[int(rng.integers(len(pool)))]
    return " ".join(words)


def pseudo_text(rng: np.random.Generator, length: int) -> str:
    """length characters of a made-up language: words of 1-4 consonant-vowel syllables."""
    out: list[str] = []
    total = 0
    while total < length:
        syllables = int(rng.integers(1, 5))
        word = "".join(str(c) + str(v) for c, v in zip(rng.choice(_CONSONANTS, syllables),
                                                         rng.choice(_VOWELS, syllables)))
        out.append(word)
        total += len(word) + 1
    return " ".join(out)[:length].rstrip() or "a"


def _vocabulary(texts: list[str]) -> dict[int, list[str]]:
    """Distinct words of texts by length, in first-seen order (deterministic)."""
    seen: set[str] = set()
    by_length: dict[int, list[str]] = {}
    for text in texts:
        for word in text.split(" "):
            if word and word not in seen:
                seen.add(word)
                by_length.setdefault(len(word), []).append(word)
    return by_length


def graded_corpus(
    n_train: int = 1536,
    n_validation: int = 128,
    seed: int = 0,
    max_chars: int = 256,
    min_chars: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """The graded corpus as (train, validation) tables with columns id, source, text.

    - train: n_train rows split evenly over GRADED_SOURCES, shuffled (seeded); ids 0..n_train-1.
    - validation: n_validation clean docstrings, split evenly over the docstring families,
      disjoint from `clean`; ids n_train..n_train+n_validation-1.
    - every text is ASCII, min_chars..max_chars bytes (`off_domain`'s may end shorter after
      its last whole character is trimmed of a space).
    """
    min_chars = default_min_chars(max_chars) if min_chars is None else min_chars
    if n_train < len(GRADED_SOURCES) or n_validation < 1:
        raise DataError(f"the graded corpus needs n_train >= {len(GRADED_SOURCES)} (one row per source) "
                        f"and n_validation >= 1 (near_validation copies it), got {n_train}, {n_validation}")
    if not 1 <= min_chars <= max_chars:
        raise DataError(f"need 1 <= min_chars <= max_chars, got {min_chars}, {max_chars}")

    pools = source_pools(max_chars, min_chars)
    families = [s for s in sorted(pools) if pools[s]]
    val_counts = split_evenly(n_validation, families)
    validation_texts: list[str] = []
    validation_families: list[str] = []
    rest: list[str] = []
    for family in families:
        # ASCII only, so that replacing characters keeps the byte length.
        pool = [t for t in pools[family] if t.isascii()]
        if val_counts[family] > len(pool):
            raise DataError(f"docstring family {family!r} has {len(pool)} ASCII samples at max_chars="
                            f"{max_chars}, but {val_counts[family]} validation ones are needed")
        order = source_rng(seed, family).permutation(len(pool))
        validation_texts += [pool[i] for i in order[:val_counts[family]]]
        validation_families += [family] * val_counts[family]
        rest += [pool[i] for i in order[val_counts[family]:]]
    rest = [rest[i] for i in np.random.default_rng([seed, zlib.crc32(b"graded-clean")]).permutation(len(rest))]

    counts = split_evenly(n_train, list(GRADED_SOURCES))
    if counts["clean"] > len(rest):
        raise DataError(f"the graded corpus's clean source needs {counts['clean']} docstrings but "
                        f"{len(rest)} are left at max_chars={max_chars} beside the validation set; "
                        f"lower data.builtin.n_train or raise data.seq_len")
    clean = rest[:counts["clean"]]
    # Noisy sources are made from unused docstrings first, then from clean's own texts.
    spare = rest[counts["clean"]:] + clean
    cursor = 0
    texts: dict[str, list[str]] = {"clean": clean}
    for source, rate in NOISE_RATES.items():
        rng = source_rng(seed, source)
        base = [spare[(cursor + k) % len(spare)] for k in range(counts[source])]
        cursor += counts[source]
        texts[source] = [replace_chars(t, rng, rate) for t in base]
    rng = source_rng(seed, "near_validation")
    vocabulary = _vocabulary(rest)
    texts["near_validation"] = [swap_words(validation_texts[k % n_validation], rng, vocabulary, NEAR_DUPLICATE_SWAP)
                                for k in range(counts["near_validation"])]
    rng = source_rng(seed, "off_domain")
    # Lengths follow the clean texts', so no source trains on more tokens per row than another.
    texts["off_domain"] = [pseudo_text(rng, size(clean[k % len(clean)])) for k in range(counts["off_domain"])]

    sources = [s for s in GRADED_SOURCES for _ in texts[s]]
    flat = [t for s in GRADED_SOURCES for t in texts[s]]
    row_order = np.random.default_rng([seed, zlib.crc32(b"train-rows")]).permutation(n_train)
    train = corpus_table(np.arange(n_train), [sources[i] for i in row_order], [flat[i] for i in row_order])
    validation = corpus_table(np.arange(n_train, n_train + n_validation), validation_families, validation_texts)
    return train, validation
