"""Built-in default corpus, generated offline from standard-library docstrings.

Every Python install carries the same documentation text, so the default training job
needs no download. Each *source* is one family of stdlib packages; a further source,
"corrupted", holds clean-looking text whose characters were shuffled or replaced by
seeded noise, so attribution has a known-bad source to find.

Determinism: modules are walked in a fixed listed order, attributes in ``dir()`` order
(sorted), randomness comes only from ``numpy.random.default_rng`` seeded by ``seed`` and a
CRC of the source name (never ``hash()``), and nothing outside the stdlib is imported.
The text itself depends on the Python version (docstrings change between releases).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import zlib
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from rayattr.data.errors import DataError

# Clean sources: name -> stdlib modules whose docstrings make it up. Families are chosen so
# sources differ in vocabulary (a real attribution signal) and each yields several hundred
# samples at the default sizes.
CLEAN_SOURCES: dict[str, tuple[str, ...]] = {
    "concurrency": (
        "threading", "multiprocessing", "multiprocessing.pool", "multiprocessing.managers",
        "multiprocessing.queues", "multiprocessing.synchronize", "multiprocessing.process",
        "multiprocessing.connection", "multiprocessing.shared_memory", "concurrent.futures",
        "asyncio", "queue", "sched", "selectors", "subprocess", "contextvars",
    ),
    "data": (
        "json", "csv", "collections", "collections.abc", "itertools", "functools", "heapq",
        "bisect", "copy", "pickle", "dataclasses", "enum", "array", "struct",
    ),
    "files": (
        "os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "io", "filecmp",
        "zipfile", "tarfile", "stat",
    ),
    "net": (
        "http", "http.client", "http.server", "http.cookies", "http.cookiejar", "urllib.parse",
        "urllib.request", "urllib.error", "email", "email.message", "email.utils",
        "email.parser", "email.header", "email.policy", "socket", "ssl", "smtplib", "ftplib",
        "ipaddress", "mimetypes",
    ),
    "numeric": (
        "math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator",
        "secrets", "colorsys", "datetime", "calendar",
    ),
    "text": (
        "string", "textwrap", "re", "difflib", "shlex", "html", "html.parser", "gettext",
        "locale", "unicodedata", "codecs", "pprint",
    ),
}

CORRUPTED_SOURCE = "corrupted"

# Samples shorter than this carry too little text to be worth a training row.
DEFAULT_MIN_CHARS = 64
# Printable ASCII used as the noise alphabet for corrupted samples.
NOISE_ALPHABET = np.array([chr(c) for c in range(0x20, 0x7F)])


def _import_or_none(name: str):
    """Import a stdlib module, or None where this build lacks it (e.g. ssl without OpenSSL)."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure just means "not on this install"
        return None


def _defined_in(obj: object, module) -> bool:
    """True if obj belongs to module (or its private/implementation submodules).

    Excludes re-exports from elsewhere (e.g. ``typing`` names pulled into a module), so a
    source only contains its own family's text. ``module.__name__`` covers aliases such as
    ``os.path`` -> ``posixpath``.
    """
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    name = module.__name__
    return owner == name or owner.startswith(name + ".") or owner == "_" + name


def _own_docstrings(obj: object) -> Iterator[str]:
    """Docstrings of a class and of its own (not inherited) public members, sorted by name."""
    doc = obj.__doc__
    if isinstance(doc, str):
        yield doc
    for name in sorted(vars(obj)):
        if name.startswith("_"):
            continue
        member = vars(obj)[name]
        # Only code and descriptors: constants would yield their *type's* docstring.
        if inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod)) \
                or inspect.isdatadescriptor(member):
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str):
                yield doc


def module_docstrings(module_names: Iterable[str]) -> list[str]:
    """Raw docstrings of the given modules, their public functions, classes and methods."""
    docs: list[str] = []
    for module_name in module_names:
        module = _import_or_none(module_name)
        if module is None:
            continue
        if isinstance(module.__doc__, str):
            docs.append(module.__doc__)
        for name in dir(module):  # dir() is sorted: no dict-order dependence
            if name.startswith("_"):
                continue
            try:
                obj = getattr(module, name)
            except Exception:  # noqa: BLE001 - lazy attributes may fail; skip them
                continue
            if inspect.isclass(obj) and _defined_in(obj, module):
                docs.extend(_own_docstrings(obj))
            elif inspect.isroutine(obj) and _defined_in(obj, module):
                if isinstance(obj.__doc__, str):
                    docs.append(obj.__doc__)
    return docs


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def size(text: str) -> int:
    """A sample's length as the corpus bounds it: UTF-8 bytes, so a text within max_chars
    is within as many tokens of the byte tokenizer (and of any byte-level BPE)."""
    return len(text.encode("utf-8", "surrogatepass"))


def _hard_cut(word: str, max_chars: int) -> list[str]:
    """A word longer than max_chars (bytes) in pieces that fit, cut between characters."""
    out, current = [], ""
    for ch in word:
        if current and size(current + ch) > max_chars:
            out.append(current)
            current = ""
        current += ch
    return out + ([current] if current else [])


def default_min_chars(max_chars: int) -> int:
    """DEFAULT_MIN_CHARS, or three quarters of a window shorter than it: texts then fill most of
    the window, as the truncated ones used to (with half, the default AdamW job at training seed 2
    diverged in the embedding at step 55; at three quarters it ranks `corrupted` last)."""
    return DEFAULT_MIN_CHARS if max_chars >= DEFAULT_MIN_CHARS else max(1, 3 * max_chars // 4)


def split_text(doc: str, max_chars: int, min_chars: int = DEFAULT_MIN_CHARS) -> list[str]:
    """Split one docstring into whitespace-normalised samples of min_chars..max_chars UTF-8 bytes.

    Paragraphs (blank-line separated) are the natural unit: adjacent short ones are merged
    while they fit, long ones are cut into word windows; a single word longer than
    max_chars is hard-cut. Pieces still shorter than min_chars are dropped.
    """
    paragraphs = [normalize_whitespace(p) for p in inspect.cleandoc(doc).split("\n\n")]
    pieces: list[str] = []
    for paragraph in paragraphs:
        if not paragraph:
            continue
        words: list[str] = []
        for word in paragraph.split(" "):
            words.extend(_hard_cut(word, max_chars))
        current = ""
        for word in words:
            candidate = f"{current} {word}" if current else word
            if size(candidate) <= max_chars:
                current = candidate
            else:
                pieces.append(current)
                current = word
        if current:
            pieces.append(current)
    merged: list[str] = []
    for piece in pieces:
        # Merge a short piece with the previous one when both fit in one window.
        if merged and (size(merged[-1]) < min_chars or size(piece) < min_chars) \
                and size(merged[-1]) + 1 + size(piece) <= max_chars:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return [m for m in merged if size(m) >= min_chars]


@functools.lru_cache(maxsize=8)
def source_pools(max_chars: int, min_chars: int = DEFAULT_MIN_CHARS) -> dict[str, tuple[str, ...]]:
    """All distinct clean samples per source, in deterministic traversal order.

    A text that occurs in several sources (shared boilerplate such as "Return self==value.")
    is kept only in the first source in sorted name order, so no two rows are equal.
    """
    seen: set[str] = set()  # membership only; never iterated, so no hash-order dependence
    pools: dict[str, tuple[str, ...]] = {}
    for source in sorted(CLEAN_SOURCES):
        samples: list[str] = []
        for doc in module_docstrings(CLEAN_SOURCES[source]):
            for sample in split_text(doc, max_chars, min_chars):
                if sample not in seen:
                    seen.add(sample)
                    samples.append(sample)
        pools[source] = tuple(samples)
    return pools


def corrupt_text(text: str, rng: np.random.Generator, mode: str) -> str:
    """Destroy the information in text while keeping its length and look.

    mode "shuffle": permute the characters (keeps unigram statistics, kills bigrams and words);
    mode "noise": replace every character by a uniform random printable ASCII character.
    """
    if mode == "shuffle":
        chars = np.array(list(text))
        out = "".join(chars[rng.permutation(len(chars))])
    elif mode == "noise":
        out = "".join(rng.choice(NOISE_ALPHABET, size=len(text)))
    else:
        raise DataError(f"unknown corruption mode {mode!r}; expected 'shuffle' or 'noise'")
    return normalize_whitespace(out) or "~"


def split_evenly(total: int, names: list[str]) -> dict[str, int]:
    """total items over names as evenly as possible; the first names get the remainder."""
    base, extra = divmod(total, len(names))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(names)}


def source_rng(seed: int, source: str) -> np.random.Generator:
    """RNG for one source, keyed by name (CRC, not hash()) so sources don't perturb each other."""
    return np.random.default_rng([seed, zlib.crc32(source.encode())])


def corpus_table(ids: np.ndarray, sources: list[str], texts: list[str]) -> pa.Table:
    return pa.table({
        "id": pa.array(ids, type=pa.int64()),
        "source": pa.array(sources, type=pa.string()),
        "text": pa.array(texts, type=pa.string()),
    })


def builtin_corpus(
    n_train: int = 1536,
    n_validation: int = 192,
    corrupted_fraction: float = 0.15,
    seed: int = 0,
    max_chars: int = 256,
    min_chars: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """The default corpus as (train, validation) tables with columns id, source, text.

    - train: ``round(corrupted_fraction * n_train)`` rows of source "corrupted", the rest
      split evenly over the clean sources; rows shuffled (seeded); ids 0..n_train-1.
    - validation: n_validation rows from the clean sources only, split evenly, disjoint
      from train and from the text the corrupted rows were made of; ids continue after
      train (n_train..n_train+n_validation-1) so the two splits never share an id.
    - every text is min_chars..max_chars UTF-8 bytes (min_chars: default_min_chars).
    Same arguments -> identical tables (on the same Python version).
    """
    min_chars = default_min_chars(max_chars) if min_chars is None else min_chars
    if n_train < 1 or n_validation < 0:
        raise DataError(f"need n_train >= 1 and n_validation >= 0, got {n_train}, {n_validation}")
    if not 0.0 <= corrupted_fraction < 1.0:
        raise DataError(f"corrupted_fraction must be in [0, 1), got {corrupted_fraction}")
    if not 1 <= min_chars <= max_chars:
        raise DataError(f"need 1 <= min_chars <= max_chars, got {min_chars}, {max_chars}")

    pools = source_pools(max_chars, min_chars)
    clean = [s for s in sorted(pools) if pools[s]]
    n_corrupted = int(round(corrupted_fraction * n_train))
    train_counts = split_evenly(n_train - n_corrupted, clean)
    val_counts = split_evenly(n_validation, clean)
    corrupt_counts = split_evenly(n_corrupted, clean)  # which clean source feeds each

    train_src: list[str] = []
    train_txt: list[str] = []
    val_src: list[str] = []
    val_txt: list[str] = []
    for source in clean:
        pool = pools[source]
        need = val_counts[source] + train_counts[source]
        if need > len(pool):
            raise DataError(
                f"built-in source {source!r} has {len(pool)} samples at max_chars={max_chars}, "
                f"min_chars={min_chars}, but {need} are needed ({train_counts[source]} train + "
                f"{val_counts[source]} validation); lower n_train/n_validation or max_chars")
        rng = source_rng(seed, source)
        order = rng.permutation(len(pool))
        val_idx = order[:val_counts[source]]
        train_idx = order[val_counts[source]:need]
        # Corrupted rows are built from unused text first, then from train text, never from
        # validation text (so "corrupted" cannot carry validation-specific information).
        spare = np.concatenate([order[need:], train_idx])
        if corrupt_counts[source] > len(spare):
            raise DataError(
                f"built-in source {source!r} has too few samples ({len(pool)}) to also feed "
                f"{corrupt_counts[source]} corrupted rows; lower corrupted_fraction or n_train")
        corrupt_idx = spare[:corrupt_counts[source]]
        val_src += [source] * len(val_idx)
        val_txt += [pool[i] for i in val_idx]
        train_src += [source] * len(train_idx)
        train_txt += [pool[i] for i in train_idx]
        for k, i in enumerate(corrupt_idx):
            mode = "shuffle" if k % 2 == 0 else "noise"
            train_src.append(CORRUPTED_SOURCE)
            train_txt.append(corrupt_text(pool[i], rng, mode))

    row_order = np.random.default_rng([seed, zlib.crc32(b"train-rows")]).permutation(n_train)
    train = corpus_table(np.arange(n_train), [train_src[i] for i in row_order],
                   [train_txt[i] for i in row_order])
    validation = corpus_table(np.arange(n_train, n_train + n_validation), val_src, val_txt)
    return train, validation
