"""Tests for rayattr.data: built-in corpus, tokenizers, dataset files, tokenised tensors, batch plans."""

from __future__ import annotations

import collections
import json
import socket
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayattr.data import (
    CLEAN_SOURCES, CORRUPTED_SOURCE, IGNORE_INDEX, BatchPlan, ByteTokenizer, DataError,
    HFTokenizer, TokenizedDataset, Tokenizer, builtin_corpus, epoch_order, load_dataset,
    load_tokenizer,
)
from rayattr.data.corpus import source_pools, split_text


# ----------------------------------------------------------------------------- corpus

@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus()


def _bigrams(texts):
    counts = collections.Counter()
    for text in texts:
        counts.update(text[i:i + 2] for i in range(len(text) - 1))
    return counts


def _cosine(a, b):
    keys = sorted(set(a) | set(b))
    x = np.array([a[k] for k in keys], dtype=np.float64)
    y = np.array([b[k] for k in keys], dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_corpus_is_deterministic_even_when_regenerated(corpus):
    train, validation = corpus
    source_pools.cache_clear()  # rebuild from the docstrings, not from the cache
    train2, validation2 = builtin_corpus()
    assert train.equals(train2) and validation.equals(validation2)
    other, _ = builtin_corpus(seed=1)
    assert not train.equals(other)


def test_corpus_schema_sizes_and_unique_ids(corpus):
    train, validation = corpus
    expected = pa.schema([("id", pa.int64()), ("source", pa.string()), ("text", pa.string())])
    assert train.schema.equals(expected) and validation.schema.equals(expected)
    assert 1000 <= train.num_rows <= 2000 and 100 <= validation.num_rows <= 200
    ids = np.concatenate([train["id"].to_numpy(), validation["id"].to_numpy()])
    assert len(np.unique(ids)) == len(ids)
    for text in train["text"].to_pylist() + validation["text"].to_pylist():
        assert 0 < len(text) <= 256
        assert text == " ".join(text.split())  # whitespace-normalised


def test_corpus_sources_present_and_balanced(corpus):
    train, validation = corpus
    counts = collections.Counter(train["source"].to_pylist())
    assert set(counts) == set(CLEAN_SOURCES) | {CORRUPTED_SOURCE}
    assert counts[CORRUPTED_SOURCE] == round(0.15 * train.num_rows)
    clean = [counts[s] for s in CLEAN_SOURCES]
    assert max(clean) - min(clean) <= 1
    val_counts = collections.Counter(validation["source"].to_pylist())
    assert set(val_counts) == set(CLEAN_SOURCES)  # validation is clean only
    assert max(val_counts.values()) - min(val_counts.values()) <= 1


def test_no_train_validation_overlap(corpus):
    train, validation = corpus
    train_texts = train["text"].to_pylist()
    val_texts = validation["text"].to_pylist()
    assert len(set(train_texts)) == len(train_texts)
    assert not set(train_texts) & set(val_texts)
    # Corrupted rows are never made from validation text: a character shuffle keeps the
    # multiset of non-space characters, so compare those signatures.
    sig = lambda t: "".join(sorted(t.replace(" ", "")))  # noqa: E731
    val_sigs = {sig(t) for t in val_texts}
    corrupted = [t for t, s in zip(train_texts, train["source"].to_pylist()) if s == CORRUPTED_SOURCE]
    assert not {sig(t) for t in corrupted} & val_sigs


def test_corrupted_source_differs_in_bigram_statistics(corpus):
    train, validation = corpus
    val = _bigrams(validation["text"].to_pylist())
    texts, sources = train["text"].to_pylist(), train["source"].to_pylist()
    sim = {s: _cosine(_bigrams([t for t, q in zip(texts, sources) if q == s]), val)
           for s in set(sources)}
    clean = [sim[s] for s in CLEAN_SOURCES]
    assert min(clean) > 0.9, sim
    assert sim[CORRUPTED_SOURCE] < min(clean) - 0.15, sim


def test_split_text_bounds_and_merging():
    doc = "Short one.\n\n  Another  short one.\n\n" + "word " * 100 + "\n\nTiny.\n\n" + "x" * 300
    pieces = split_text(doc, max_chars=64, min_chars=20)
    assert all(20 <= len(p) <= 64 for p in pieces)
    # Short paragraphs are merged with a neighbour while the result fits.
    assert pieces[0] == "Short one. Another short one."
    assert sum(p.endswith("word Tiny.") for p in pieces) == 1
    assert split_text("Tiny.", max_chars=64, min_chars=20) == []  # too short alone: dropped
    assert sum(p.count("word") for p in pieces) == 100
    assert "".join(p for p in pieces if set(p) == {"x"}) == "x" * 300  # hard-cut long word


def test_corpus_rejects_impossible_requests():
    with pytest.raises(DataError, match="built-in source .* samples"):
        builtin_corpus(n_train=100_000)
    with pytest.raises(DataError, match="corrupted_fraction"):
        builtin_corpus(corrupted_fraction=1.5)


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 🙂 tab\tnewline\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials dropped
    assert tok.vocab_size == 259 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert isinstance(tok, Tokenizer)
    with pytest.raises(DataError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_load_tokenizer_byte_and_bad_specs(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(DataError, match="neither 'byte' nor a local directory"):
        load_tokenizer("gpt2")
    with pytest.raises(DataError, match="cannot load a HuggingFace tokenizer"):
        load_tokenizer(tmp_path)  # a directory without tokenizer files


def test_load_local_huggingface_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, "hello": 3, "world": 4, "data": 5}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", eos_token="[EOS]",
                            unk_token="[UNK]").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (6, 0, 1)
    assert tok.encode("hello world data") == [3, 4, 5]
    assert tok.decode([3, 4, 5, 1]) == "hello world data"


# ----------------------------------------------------------------------------- dataset files

ROWS = [{"source": "a", "text": "alpha one"}, {"source": "b", "text": "beta two"},
        {"source": "a", "text": "alpha three"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_parquet_with_ids(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": pa.array([10, 20, 30], pa.int32()),
                             "source": ["a", "b", "a"], "text": ["x", "y", "z"],
                             "extra": [1, 2, 3]}), path)
    table = load_dataset(str(path))
    assert table.column_names == ["id", "source", "text"]
    assert table["id"].type == pa.int64() and table["id"].to_pylist() == [10, 20, 30]
    assert table["text"].to_pylist() == ["x", "y", "z"]


def test_load_jsonl_generates_row_order_ids(tmp_path):
    table = load_dataset(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert table["id"].to_pylist() == [0, 1, 2]
    assert table["source"].to_pylist() == ["a", "b", "a"]
    assert table["text"].to_pylist() == [r["text"] for r in ROWS]


def test_load_directory_and_list_in_sorted_order(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _write_jsonl(data / "b.jsonl", ROWS[1:])
    pq.write_table(pa.table({"source": ["a"], "text": ["first"]}), data / "a.parquet")
    _write_jsonl(data / "sub" / "c.jsonl", [{"source": "c", "text": "nested"}])
    _write_jsonl(data / "empty.jsonl", [])  # an empty shard adds nothing
    (data / "notes.txt").write_text("ignored: not a data file")
    table = load_dataset(str(data))
    assert table["text"].to_pylist() == ["first", "beta two", "alpha three", "nested"]
    assert table["id"].to_pylist() == [0, 1, 2, 3]
    both = load_dataset([str(data / "sub" / "c.jsonl"), str(data / "a.parquet")])
    assert both["text"].to_pylist() == ["nested", "first"]


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing.parquet"))
    bad = _write_jsonl(tmp_path / "nosource.jsonl", [{"text": "t", "label": 1}])
    with pytest.raises(DataError, match=r"nosource\.jsonl.*\['source'\].*columns \['text', 'label'\]"):
        load_dataset(str(bad))
    nums = _write_jsonl(tmp_path / "nums.jsonl", [{"text": 5, "source": "a"}])
    with pytest.raises(DataError, match="'text' in dataset file .*nums.jsonl.* must hold strings"):
        load_dataset(str(nums))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"source": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="is empty"):
        load_dataset(str(empty))
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": [7, 8, 7, 9, 9], "source": ["a"] * 5, "text": list("vwxyz")}), dup)
    with pytest.raises(DataError, match=r"2 duplicated sample id\(s\), e.g. \[7, 9\]"):
        load_dataset(str(dup))
    (tmp_path / "d.csv").write_text("source,text\na,x\n")
    with pytest.raises(DataError, match="unsupported ending"):
        load_dataset(str(tmp_path / "d.csv"))
    (tmp_path / "nodata").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        load_dataset(str(tmp_path / "nodata"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(pa.table({"id": [1], "source": ["a"], "text": ["x"]}), mixed / "a.parquet")
    _write_jsonl(mixed / "b.jsonl", ROWS)
    with pytest.raises(DataError, match="'id' is in some files but missing from"):
        load_dataset(str(mixed))
    with pytest.raises(DataError, match="empty list"):
        load_dataset([])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A real S3 endpoint: a SeaweedFS server on 127.0.0.1 with its own data dir."""
    names = ["master", "volume", "filer", "s3"]
    ports = {n: (_free_port(), _free_port()) for n in names}
    args = [f"-{n}.port={http}" for n, (http, _) in ports.items()]
    args += [f"-{n}.port.grpc={grpc}" for n, (_, grpc) in ports.items()]
    proc = subprocess.Popen(
        ["weed", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", "-volume.max=4",
         "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
         "-s3.port.iceberg=0", "-s3.port.lance=0",  # off: their fixed default ports may clash
         f"-dir={tmp_path_factory.mktemp('weed')}", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{ports['s3'][0]}"
    try:
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_load_dataset_from_s3(s3_endpoint, tmp_path):
    import s3fs

    options = {"key": "any", "secret": "any", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    deadline = time.monotonic() + 60
    while True:  # the server takes a few seconds to come up
        try:
            fs.mkdir("rayattr-data")
            break
        except Exception:  # noqa: BLE001 - not ready yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    local = tmp_path / "part.parquet"
    pq.write_table(pa.table({"source": ["a", "b"], "text": ["one", "two"]}), local)
    fs.put(str(local), "rayattr-data/ds/part-0.parquet")
    fs.pipe("rayattr-data/ds/part-1.jsonl", b'{"source": "c", "text": "three"}\n')
    table = load_dataset("s3://rayattr-data/ds", storage_options=options)
    assert table["text"].to_pylist() == ["one", "two", "three"]
    assert table["id"].to_pylist() == [0, 1, 2]
    with pytest.raises(DataError, match="not found: 's3://rayattr-data/nope.jsonl'"):
        load_dataset("s3://rayattr-data/nope.jsonl", storage_options=options)


# ----------------------------------------------------------------------------- tokenised tensors

def test_tokenized_dataset_padding_truncation_labels():
    texts = ["", "abc", "ünï", "x" * 20]
    table = pa.table({"id": pa.array([5, 6, 7, 8], pa.int64()), "source": ["a", "b", "a", "c"],
                      "text": texts})
    tok = ByteTokenizer()
    ds = TokenizedDataset(table, tok, seq_len=8)
    assert ds.input_ids.shape == (4, 8) and ds.input_ids.dtype == torch.long
    # Brute-force reference: bytes + eos, cut to 8, padded with pad_id.
    truncated = 0
    for row, text in enumerate(texts):
        tokens = list(text.encode()) + [tok.eos_id]
        truncated += len(tokens) > 8
        tokens = tokens[:8]
        expect = tokens + [tok.pad_id] * (8 - len(tokens))
        assert ds.input_ids[row].tolist() == expect
        assert ds.attention_mask[row].tolist() == [1] * len(tokens) + [0] * (8 - len(tokens))
        assert ds.labels[row].tolist() == tokens + [IGNORE_INDEX] * (8 - len(tokens))
        assert int(ds.lengths[row]) == len(tokens)
    assert ds.num_truncated == truncated == 1
    assert ds.ids.tolist() == [5, 6, 7, 8] and ds.sources == ["a", "b", "a", "c"]
    assert ds.source_names == ["a", "b", "c"] and ds.source_index.tolist() == [0, 1, 0, 2]
    batch = ds.batch(np.array([3, 1]))
    assert batch["ids"].tolist() == [8, 6]
    assert torch.equal(batch["input_ids"], ds.input_ids[[3, 1]])
    assert tok.decode(ds[2]["input_ids"].tolist()) == "ünï"
    with pytest.raises(DataError, match="batch indices"):
        ds.batch([4])


def test_tokenized_dataset_rejects_bad_tables():
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="missing \\['id'\\]"):
        TokenizedDataset(pa.table({"source": ["a"], "text": ["x"]}), tok, 4)
    with pytest.raises(DataError, match="duplicated sample id"):
        TokenizedDataset(pa.table({"id": [1, 1], "source": ["a", "a"], "text": ["x", "y"]}), tok, 4)
    with pytest.raises(DataError, match="encodes to no tokens"):
        TokenizedDataset(pa.table({"id": [1], "source": ["a"], "text": [""]}), tok, 4, add_eos=False)


def test_tokenized_builtin_corpus_round_trips(corpus):
    train, _ = corpus
    ds = TokenizedDataset(train, ByteTokenizer(), seq_len=512)
    assert ds.num_truncated == 0  # 256 chars of at most 2-byte UTF-8 + eos fit
    tok = ByteTokenizer()
    for row in range(0, len(ds), 97):
        assert tok.decode(ds.input_ids[row].tolist()) == train["text"][row].as_py()


# ----------------------------------------------------------------------------- batch plans

PLAN_CASES = [(103, 2, 3, 2, 3, 0), (64, 4, 2, 1, 2, 5), (10, 1, 1, 1, 1, 1)]


@pytest.mark.parametrize("n,mb,ws,ga,epochs,seed", PLAN_CASES)
def test_each_epoch_covers_every_sample_once(n, mb, ws, ga, epochs, seed):
    plan = BatchPlan(n, mb, ws, ga, epochs, seed)
    g = mb * ws * ga
    assert plan.global_batch_size == g and plan.num_steps == (n // g) * epochs
    assert plan.dropped_per_epoch == n % g
    orders = epoch_order(n, epochs, seed)
    for epoch in range(epochs):
        assert sorted(orders[epoch].tolist()) == list(range(n))
        steps = [s for s in range(plan.num_steps) if plan.epoch_of(s) == epoch]
        assert len(steps) == n // g
        seen = np.concatenate([plan.global_batch(s) for s in steps])
        assert len(set(seen.tolist())) == len(seen) == n - n % g
        assert np.array_equal(seen, orders[epoch][:len(seen)])  # dropped = the epoch's tail
    if epochs > 1:
        assert not np.array_equal(orders[0], orders[1])


@pytest.mark.parametrize("n,mb,ws,ga,epochs,seed", PLAN_CASES)
def test_rank_slices_reassemble_the_global_batch(n, mb, ws, ga, epochs, seed):
    plan = BatchPlan(n, mb, ws, ga, epochs, seed)
    for step in range(plan.num_steps):
        gb = plan.global_batch(step)
        parts = [plan.rank_slice(step, r, m) for r in range(ws) for m in range(ga)]
        assert all(len(p) == mb for p in parts)
        assert np.array_equal(np.concatenate(parts), gb)  # (rank, micro_step) order
        ranks, positions = plan.owner(step)
        layout = plan.layout(step)
        for p in range(len(gb)):
            assert plan.rank_indices(step, ranks[p])[positions[p]] == gb[p]
            assert plan.rank_slice(step, layout.ranks[p], layout.micro_steps[p])[layout.offsets[p]] == gb[p]
        assert layout.epoch == plan.epoch_of(step)
        ids = np.arange(n) * 10 + 3
        assert np.array_equal(layout.sample_ids(ids), ids[gb])


def test_batch_plan_deterministic_across_instances():
    a = BatchPlan(500, 4, 4, 2, 3, seed=7)
    b = BatchPlan(500, 4, 4, 2, 3, seed=7)
    c = BatchPlan(500, 4, 4, 2, 3, seed=8)
    assert all(np.array_equal(a.global_batch(s), b.global_batch(s)) for s in range(a.num_steps))
    assert not all(np.array_equal(a.global_batch(s), c.global_batch(s)) for s in range(a.num_steps))
    a.global_batch(0)[:] = -1  # returned arrays are copies: the shared order is untouched
    assert np.array_equal(a.global_batch(0), b.global_batch(0))


def test_batch_plan_errors():
    with pytest.raises(DataError, match="cannot fill one global batch of 16"):
        BatchPlan(10, 2, 4, 2)
    with pytest.raises(DataError, match="micro_batch must be >= 1"):
        BatchPlan(10, 0)
    plan = BatchPlan(20, 2, 2, 1)
    with pytest.raises(DataError, match="step 5 is outside"):
        plan.global_batch(5)
    with pytest.raises(DataError, match="rank 2 is outside"):
        plan.rank_slice(0, 2, 0)
    with pytest.raises(DataError, match="micro_step 1 is outside"):
        plan.rank_slice(0, 0, 1)
