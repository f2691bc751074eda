"""The graded built-in corpus (rayattr/data/graded.py): its construction, sizes, bounds and errors.
Whether retraining orders its sources stably is measured in bench/graded_sources.py."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from rayattr.config import Config, ConfigError
from rayattr.data import GRADED_SOURCES, DataError, graded_corpus
from rayattr.data.corpus import NOISE_ALPHABET, default_min_chars
from rayattr.data.graded import pseudo_text, replace_chars, swap_words
from test_data import _bigrams, _cosine

MAX_CHARS = 63


@pytest.fixture(scope="module")
def corpus():
    return graded_corpus(n_train=703, n_validation=32, seed=0, max_chars=MAX_CHARS)


def _by_source(train):
    out = collections.defaultdict(list)
    for source, text in zip(train["source"].to_pylist(), train["text"].to_pylist()):
        out[source].append(text)
    return out


def test_every_source_has_an_equal_share_and_ids_follow_the_default_corpus(corpus):
    train, validation = corpus
    counts = collections.Counter(train["source"].to_pylist())
    assert set(counts) == set(GRADED_SOURCES)
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 703
    assert train["id"].to_pylist() == list(range(703))
    assert validation["id"].to_pylist() == list(range(703, 735))
    # rows are shuffled, not grouped by source
    assert len(set(train["source"].to_pylist()[:20])) > 3


def test_texts_are_ascii_within_the_byte_bounds(corpus):
    train, validation = corpus
    low = default_min_chars(MAX_CHARS)
    for source, texts in _by_source(train).items():
        assert all(t.isascii() and len(t) <= MAX_CHARS for t in texts), source
        # off_domain may lose a trailing space; the others keep their docstring's length
        floor = low - 1 if source == "off_domain" else low
        assert min(map(len, texts)) >= floor, source
    assert all(t.isascii() and low <= len(t) <= MAX_CHARS for t in validation["text"].to_pylist())


def test_deterministic_and_seeded(corpus):
    again = graded_corpus(n_train=703, n_validation=32, seed=0, max_chars=MAX_CHARS)
    assert again[0].equals(corpus[0]) and again[1].equals(corpus[1])
    other, _ = graded_corpus(n_train=703, n_validation=32, seed=1, max_chars=MAX_CHARS)
    assert other["text"].to_pylist() != corpus[0]["text"].to_pylist()


def test_clean_is_disjoint_from_validation_and_near_duplicates_are_close(corpus):
    train, validation = corpus
    texts = _by_source(train)
    val = validation["text"].to_pylist()
    assert not set(texts["clean"]) & set(val)
    for k, near in enumerate(sorted(texts["near_validation"])):
        # each copy has the length and word count of a validation text, and most of its words
        twins = [v for v in val if len(v) == len(near) and len(v.split(" ")) == len(near.split(" "))]
        same = max(np.mean([a == b for a, b in zip(v.split(" "), near.split(" "))]) for v in twins)
        assert same >= 0.5, near
    swapped = np.mean([near not in val for near in texts["near_validation"]])
    assert swapped > 0.5  # most copies differ from their original


def test_sources_are_graded_in_their_bigram_likeness_to_validation(corpus):
    """The noisier a source, the further its character bigrams from the validation texts'."""
    train, validation = corpus
    texts = _by_source(train)
    val = _bigrams(validation["text"].to_pylist())
    sim = {s: _cosine(_bigrams(texts[s]), val) for s in GRADED_SOURCES}
    graded = ["near_validation", "clean", "noisy_10", "noisy_30", "noisy_60", "noise"]
    assert [sim[s] for s in graded] == sorted((sim[s] for s in graded), reverse=True), sim
    assert sim["near_validation"] > sim["clean"] + 0.01 and sim["noise"] < 0.2, sim
    assert sim["noise"] < sim["off_domain"] < sim["noisy_30"], sim  # letters, but no English bigrams


def test_replace_chars_at_its_rate():
    rng = np.random.default_rng(0)
    text = "a" * 20_000
    assert replace_chars(text, rng, 0.0) == text
    for rate in (0.1, 0.3, 0.6):
        out = replace_chars(text, rng, rate)
        assert len(out) == len(text)
        changed = np.mean([c != "a" for c in out])
        # a replacement may draw 'a' itself: one in len(NOISE_ALPHABET)
        assert changed == pytest.approx(rate * (1 - 1 / len(NOISE_ALPHABET)), abs=0.015)
    assert set(replace_chars(text, rng, 1.0)) <= set(NOISE_ALPHABET)


def test_swap_words_keeps_length_and_pseudo_text_its_alphabet():
    rng = np.random.default_rng(0)
    by_length = {3: ["xyz"], 5: ["qqqqq"]}
    text = "the cat sat on every mat " * 40
    out = swap_words(text, rng, by_length, 0.5)
    assert len(out) == len(text) and out != text
    assert set(out.split(" ")) <= set(text.split(" ")) | {"xyz", "qqqqq"}
    made = pseudo_text(rng, 500)
    assert len(made) <= 500 and len(made) >= 490
    assert set(made) <= set("bcdfghjklmnprstvwzaeiou ")


def test_bad_requests_are_named_errors():
    with pytest.raises(DataError, match="n_train >= 7"):
        graded_corpus(n_train=3)
    with pytest.raises(DataError, match="n_validation >= 1"):
        graded_corpus(n_validation=0)
    with pytest.raises(DataError, match="clean source needs"):
        graded_corpus(n_train=700_000, max_chars=MAX_CHARS)
    with pytest.raises(ConfigError, match="data.builtin.kind"):
        Config().with_overrides(**{"data.builtin.kind": "graduated"}).validate()


def test_large_enough_for_a_batch_256_run_of_200_steps():
    """12 800 rows: 200 steps of 256 in four epochs, at the default seq_len."""
    train, _ = graded_corpus(n_train=12_800, n_validation=128, seed=0, max_chars=MAX_CHARS)
    assert train.num_rows == 12_800
    assert len(set(train["text"].to_pylist())) > 0.9 * 12_800


def test_the_run_data_stage_uses_it_and_the_plan_counts_its_sources(tmp_path):
    from rayattr.data import run_data
    from rayattr.plan.estimate import builtin_sources

    cfg = Config().with_overrides(**{"store.uri": str(tmp_path), "run_id": "r", "data.builtin.kind": "graded",
                                     "data.builtin.n_train": 70, "data.builtin.n_validation": 8}).validate()
    prepared = run_data.prepare(cfg, on_ray=False)
    assert set(prepared.train_copy["source"].to_pylist()) == set(GRADED_SOURCES)
    assert prepared.n_train == 70 and prepared.validation.num_rows == 8
    assert builtin_sources("graded")[0] == len(GRADED_SOURCES)
