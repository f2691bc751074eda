"""The data stage (rayattr/data/stage.py on Ray Data, shards.py, run_data.py): token shards in
batch-plan order against the whole-table reader, unused rows costing nothing, pre-tokenised
input, and training files left in the store (recorded, checked, never copied). Every test here
runs the stage's Ray Data pipeline on a local Ray (the slow tier). Runs are costly (a Ray Data
pipeline each, a job more): tests that need a run of the same kind share one (corpus_run,
pretokenized_job, which remakes the session's finished_run from tokens)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
import torch

from rayattr.config import Config, ConfigError
from rayattr.data import BatchPlan, ByteTokenizer, DataError, TokenizedDataset, builtin_corpus, load_tokenizer
from rayattr.data import run_data
from rayattr.pipeline.stages import complete_run, create_run, prepare_data, write_data
from rayattr.store import Run, StoreOptions

pytestmark = pytest.mark.usefixtures("local_ray")


def make_run(cfg: Config):
    run = create_run(cfg)
    write_data(cfg, run, prepare_data(cfg, StoreOptions(storage_options=cfg.store.storage_options)))
    return run


def config(tmp_path, **over) -> Config:
    return Config().with_overrides(**{"store.uri": str(tmp_path / "store"), "run_id": "r", **over}).validate()


def assert_same_as_whole_table(run, table: pa.Table, cfg: Config) -> None:
    """Every rank's micro-batches and rank 0's global batches from the shards equal what the old
    path (whole table tokenised in each rank, rows picked by the batch plan) gives."""
    old = TokenizedDataset(table, load_tokenizer(cfg.data.tokenizer), cfg.data.seq_len)
    t = cfg.train
    plan = BatchPlan(len(old), t.micro_batch, t.ranks, t.grad_accum, t.epochs, t.seed)
    steps = min(plan.num_steps, t.steps or plan.num_steps)
    assert run.manifest["n_train"] == len(old)
    for rank in range(t.ranks):
        shards = run_data.rank_tokens(run, rank)
        assert shards.lay.num_steps == steps
        for step in range(steps):
            ids, sources = shards.share(step)
            want = plan.rank_indices(step, rank)
            assert ids.tolist() == old.ids[want].tolist()
            assert sources.tolist() == [old.sources[i] for i in want]
            for micro in range(t.grad_accum):
                a, b = old.batch(plan.rank_slice(step, rank, micro)), shards.micro_batch(step, micro)
                for key in ("input_ids", "attention_mask", "labels", "ids"):
                    assert b[key].dtype == a[key].dtype and torch.equal(a[key], b[key]), (rank, step, micro, key)
            if rank == 0:
                ids, sources = shards.step_ids(step)
                assert ids.tolist() == old.ids[plan.global_batch(step)].tolist()
                assert sources.tolist() == [old.sources[i] for i in plan.global_batch(step)]
        with pytest.raises(DataError, match="outside the .* steps"):
            shards.micro_batch(steps, 0)


@pytest.mark.parametrize("over", [{}, {"train.ranks": 1}, {"train.grad_accum": 2, "train.steps": 50,
                                                           "store.steps_per_shard": 3}])
def test_shards_equal_the_whole_table_reader(tmp_path, over):
    cfg = config(tmp_path, **over)
    run = make_run(cfg)
    assert run.manifest["data"]["train"] == "copied"  # the built-in corpus is generated, so copied
    assert_same_as_whole_table(run, run.read_table("data/train.parquet"), cfg)


def test_a_data_stage_cut_short_is_redone_the_same(tmp_path):
    """A driver that died before the token meta was written leaves the data incomplete; the
    resume writes it again, file for file the same."""
    cfg = config(tmp_path, **{"train.steps": 10, "store.steps_per_shard": 4})
    run = make_run(cfg)
    files = sorted(p for p in run.list("data/tokens") if p.endswith(".parquet"))
    assert files == ["00000000.parquet", "00000004.parquet", "00000008.parquet"]
    before = {f: run.read_bytes(f"data/tokens/{f}") for f in files}
    os.remove(os.path.join(run.uri.removeprefix("file://"), run_data.TOKENS_META))
    os.remove(os.path.join(run.uri.removeprefix("file://"), "data/tokens", files[1]))
    assert not run_data.complete(run)
    with pytest.raises(DataError, match="its data stage did not finish"):
        run_data.rank_tokens(run, 0)
    write_data(cfg, run)  # what complete_run does for such a run
    assert run_data.complete(run)
    assert {f: run.read_bytes(f"data/tokens/{f}") for f in files} == before


def token_files(run) -> dict[str, bytes]:
    return {f: run.read_bytes(f"data/tokens/{f}") for f in sorted(run.list("data/tokens")) if f.endswith(".parquet")}


# The base of the block, unused-rows and in-store tests below: the built-in corpus doubled (ids
# 0..3071) in five 700-row files, 30 of its 384 steps, 8 steps per token file.
CORPUS_RUN = {"train.steps": 30, "store.steps_per_shard": 8, "train.epochs": 2}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """One referenced run made by the stage on Ray Data with its default blocks, shared by the
    tests that need such a run (one Ray Data pipeline instead of one each). Returns (config,
    run, data files, data folder); the in-store test edits the files and puts them back."""
    tmp = tmp_path_factory.mktemp("corpus-run")
    data = tmp / "corpus"
    files = write_corpus(data, 2, rows_per_file=700)
    cfg = config(tmp, **CORPUS_RUN, **{"data.train": str(data), "data.validation": write_validation(tmp)})
    return cfg, make_run(cfg), files, data


def test_token_files_are_the_same_whatever_the_blocks_and_the_run(corpus_run, tmp_path, monkeypatch):
    """For a fixed seed and file listing, the stage writes the same bytes in another run with
    other Ray Data blocks (smaller read batches, fewer rows per read task, a tiny target block
    size): two runs of the stage agree byte for byte, whatever their blocks."""
    import ray.data

    from rayattr.data import stage

    cfg, first, _, data = corpus_run
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(stage, "BATCH_ROWS", 100)
    monkeypatch.setattr(stage, "TASK_ROWS", 300)
    monkeypatch.setattr(ctx, "target_max_block_size", 64 << 10)
    small = make_run(cfg.with_overrides(**{"store.uri": str(tmp_path / "c")}).validate())
    files = token_files(first)
    assert len(files) == 4 and token_files(small) == files
    # the same block functions in this process, without Ray Data (rayattr.new_run without Ray)
    local_cfg = cfg.with_overrides(**{"store.uri": str(tmp_path / "d")}).validate()
    local = create_run(local_cfg)
    write_data(local_cfg, local, run_data.prepare(local_cfg, on_ray=False))
    assert token_files(local) == files
    meta = run_data.token_meta(small)
    assert meta["rows_scanned"] == 3072 and meta["rows_encoded"] <= 30 * 16
    assert sum(meta["source_rows"].values()) == meta["rows_encoded"]
    assert_same_as_whole_table(small, pa.concat_tables([pq.read_table(f) for f in sorted(data.iterdir())]), cfg)


def test_duplicated_ids_across_files_are_named(tmp_path):
    data = tmp_path / "corpus"
    files = write_corpus(data, 1, rows_per_file=500)
    table = pq.read_table(files[3]).to_pylist()
    table[5]["id"] = 42  # also in part-000
    pq.write_table(pa.Table.from_pylist(table), files[3])
    cfg = config(tmp_path, **{"data.train": str(data), "data.validation": write_validation(tmp_path)})
    with pytest.raises(DataError, match=r"duplicated sample id\(s\), e.g. \[42\]"):
        prepare_data(cfg, StoreOptions())
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------ unused data costs nothing

def write_corpus(path, factor: int, with_id: bool = True, rows_per_file: int | None = None) -> list[str]:
    """The built-in training corpus repeated `factor` times (each copy's texts made distinct),
    as Parquet file(s) under `path`."""
    train, _ = builtin_corpus()
    parts = []
    for k in range(factor):
        texts = train["text"].to_pylist() if k == 0 else [f"{t} #{k}" for t in train["text"].to_pylist()]
        parts.append(pa.table({"id": pa.array(np.arange(train.num_rows) + k * train.num_rows), "source": train["source"],
                               "text": texts}))
    table = pa.concat_tables(parts)
    if not with_id:
        table = table.drop_columns(["id"])
    os.makedirs(path, exist_ok=True)
    step = rows_per_file or table.num_rows
    files = []
    for i, a in enumerate(range(0, table.num_rows, step)):
        files.append(str(path / f"part-{i:03d}.parquet"))
        pq.write_table(table.slice(a, step), files[-1], row_group_size=2048)
    return files


def write_validation(path) -> str:
    _, val = builtin_corpus()
    pq.write_table(val, path / "validation.parquet")
    return str(path / "validation.parquet")


def test_unused_rows_are_neither_tokenised_nor_read_by_ranks(corpus_run, tmp_path):
    """With steps capped, a corpus 10x larger tokenises the same rows, and each rank reads the
    same rows and bytes: what a process holds and reads follows the trained steps, not the corpus."""
    cfg, base, _, _ = corpus_run  # 3072 rows
    write_corpus(tmp_path / "x10", 20)  # 30720 rows, one file
    big = make_run(cfg.with_overrides(**{"data.train": str(tmp_path / "x10"), "store.uri": str(tmp_path / "store")}).validate())
    steps = cfg.train.steps
    seen = {}
    for factor, run in ((1, base), (10, big)):
        reads = []
        for rank in range(cfg.train.ranks):
            shards = run_data.rank_tokens(run, rank)
            for step in range(steps):
                shards.micro_batch(step, 0)
            reads.append((shards.rows_read, shards.bytes_read))
        seen[factor] = run_data.token_meta(run), reads, run.manifest["n_train"]
    (s1, r1, n1), (s10, r10, n10) = seen[1], seen[10]
    assert n10 == 10 * n1 and s10["rows_scanned"] == 10 * s1["rows_scanned"]
    g = 16  # default micro_batch 8 x 2 ranks
    assert s1["rows_encoded"] <= steps * g and s10["rows_encoded"] <= steps * g  # only the trained steps' rows
    for (rows1, bytes1), (rows10, bytes10) in zip(r1, r10):
        assert rows1 == rows10 == steps * 8  # each rank: its own 8 rows of each step, nothing else
        assert bytes10 <= 1.2 * bytes1, (bytes1, bytes10)


# ------------------------------------------------------------------ training files left in the store

def test_in_store_data_is_recorded_not_copied_and_a_change_is_refused(corpus_run):
    cfg, run, files, _ = corpus_run
    m = run.manifest["data"]
    assert m["train"] == "referenced" and m["files"] == len(files) == 5
    assert not run.exists("data/train.parquet") and run.list("data/train") == []
    listing = run.read_json(run_data.TRAIN_LISTING)
    assert [f["url"] for f in listing["files"]] == files
    assert [f["size"] for f in listing["files"]] == [os.path.getsize(f) for f in files]
    # each file's id range (from its Parquet statistics) tells a lookup which files to open
    assert [(f["id_min"], f["id_max"]) for f in listing["files"]] == [
        (0, 699), (700, 1399), (1400, 2099), (2100, 2799), (2800, 3071)]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert_same_as_whole_table(run, table, cfg)
    # texts come from the recorded files, by id
    ids = [0, 777, 3071]
    assert run_data.texts_by_id(run, ids) == {i: table["text"][i].as_py() for i in ids}
    run_data.check_data(run)  # unchanged: passes

    # the run is shared (corpus_run): its files are put back whatever happens here
    saved = {f: open(f, "rb").read() for f in files[2:4]}
    try:
        rows = pq.read_table(files[2]).to_pylist()
        rows[0]["text"] = "edited"
        pq.write_table(pa.Table.from_pylist(rows), files[2])
        # a local file's version is its modification time
        with pytest.raises(DataError, match=r"changed since the run recorded it: .*part-002.parquet: size .*, version"):
            run_data.check_data(run)
        with pytest.raises(DataError, match="changed since the run recorded it"):
            complete_run(cfg, run, progress=False)  # a resume refuses before training
        with pytest.raises(DataError, match="changed since the run recorded it: .*part-002"):
            run_data.texts_by_id(run, [1500])  # a lookup checks the files it opens...
        assert run_data.texts_by_id(run, [1]) == {1: table["text"][1].as_py()}  # ...and only those
        os.remove(files[3])
        with pytest.raises(DataError, match="part-003.parquet is gone"):
            run_data.check_data(run)
    finally:
        for f, content in saved.items():
            with open(f, "wb") as out:
                out.write(content)


def test_copy_and_ids_by_row_order(tmp_path):
    """data.copy copies in parts (ids included); files without ids number rows in order, and a
    referenced run finds texts by that order. On the local backend (the S3 one is below)."""
    data = tmp_path / "corpus"
    files = write_corpus(data, 1, with_id=False, rows_per_file=600)
    val = write_validation(tmp_path)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    whole = table.append_column("id", pa.array(np.arange(table.num_rows)))  # ids are row numbers
    ids = [0, 599, 600, 1535]
    for copy in (True, False):
        cfg = config(tmp_path, **{"data.train": str(data), "data.validation": val, "data.copy": copy,
                                  "train.steps": 2, "store.uri": str(tmp_path / f"store-{copy}")})
        run = make_run(cfg)
        assert run.manifest["data"]["train"] == ("copied" if copy else "referenced")
        assert (run.list("data/train") != []) == copy
        assert_same_as_whole_table(run, whole, cfg)
        assert run_data.texts_by_id(run, ids) == {i: table["text"][i].as_py() for i in ids}
    assert run_data.in_store(["s3://b/x/a.parquet"], "s3://b/runs")
    assert not run_data.in_store(["s3://other/a.parquet"], "s3://b/runs")
    assert not run_data.in_store(["/data/a.parquet"], "s3://b/runs")
    assert not run_data.in_store(["s3://b/a.parquet"], "/tmp/store")


# ------------------------------------------------------------------ pre-tokenised input

def pretokenized(table: pa.Table, seq_len: int) -> pa.Table:
    """The byte tokenizer's ids of each text plus eos, cut to seq_len: what the text path trains on."""
    tok = ByteTokenizer()
    rows = [(tok.encode(t) + [tok.eos_id])[:seq_len] for t in table["text"].to_pylist()]
    return pa.table({"id": table["id"], "input_ids": pa.array(rows, pa.list_(pa.int32())), "source": table["source"]})


@pytest.fixture(scope="module")
def pretokenized_job(finished_run, tmp_path_factory):
    """The session's finished run (conftest.finished_run: the quick job on the built-in corpus)
    made again, in this process, from pre-tokenised files of the same texts: the token rows the
    text path trains on (the byte tokenizer's ids plus eos, cut to data.seq_len), training and
    validation alike. Its recorded config otherwise, and the data stage in this process (the
    same block functions as on Ray Data, whose start-up would be most of the stage here; the
    engines agree: test_token_files_are_the_same_whatever_the_blocks_and_the_run). Returns
    (text run, token run, texts config, training texts)."""
    from rayattr.pipeline.stages import run_pipeline

    text_run = Run.open_uri(finished_run[1])
    text_cfg = Config.from_dict(text_run.manifest["config"])
    d = text_cfg.data
    train, val = builtin_corpus(n_train=d.builtin.n_train, n_validation=d.builtin.n_validation,
                                corrupted_fraction=d.builtin.corrupted_fraction, seed=text_cfg.train.seed,
                                max_chars=d.builtin_max_chars)
    tmp = tmp_path_factory.mktemp("pretokenized")
    for name, table in (("train", train), ("val", val)):
        pq.write_table(pretokenized(table, seq_len=d.seq_len), tmp / f"{name}.parquet")
    cfg = text_cfg.with_overrides(**{
        "run_id": "tokens", "store.uri": str(tmp / "store"), "data.train": str(tmp / "train.parquet"),
        "data.validation": str(tmp / "val.parquet"), "data.pretokenized": True, "data.stage": "driver"}).validate()
    return text_run, Run.open_uri(run_pipeline(cfg, progress=False).uri), text_cfg, train


def test_pretokenized_shards_equal_the_text_path(pretokenized_job):
    text_run, run, text_cfg, train = pretokenized_job
    assert run.manifest["data"]["train"] == "referenced"
    assert text_run.manifest["n_truncated"] > 0  # the text path cuts texts: the token rows are cut alike
    assert_same_as_whole_table(run, train, text_cfg)  # the same texts through the tokenizer
    # texts come back as far as their tokens go (every text here is cut; the eos is dropped in
    # test_pretokenized_files_without_source)
    tok, position = ByteTokenizer(), {i: k for k, i in enumerate(train["id"].to_pylist())}
    shown = [4, 9, 150]
    got = run_data.texts_by_id(run, shown)
    for i in shown:
        whole = train["text"][position[i]].as_py()
        assert got[i] == tok.decode(tok.encode(whole)[:text_cfg.data.seq_len]), i
    assert run.read_table("data/validation.parquet").column_names == ["id", "source", "input_ids"]


@pytest.mark.parametrize("column,problem", [
    (pa.array([[1.0, 2.0]] * 40, pa.list_(pa.float32())), r"must hold lists of integer token ids, found type list<\w+: float>"),
    # row checks cover the rows the trained steps use (the others are never read): here all rows
    (pa.array([[5] * 70] * 40, pa.list_(pa.int64())), r"row\(s\) .* are longer than data.seq_len = 64 \(lengths \[70[,\]].*sample id\(s\)"
     r".*row\(s\)"),
    (pa.array([[]] * 40, pa.list_(pa.int64())), r"row\(s\) .* are empty"),
    (pa.array([[1, 300]] * 40, pa.list_(pa.int64())), r"outside the tokenizer's vocabulary \[0, 259\), e.g. \[300[,\]]"),
    (pa.array([None] + [[1, 2]] * 39, pa.list_(pa.int64())), r"column 'input_ids' .* has 1 null value"),
    (pa.array(["a"] * 40), "must hold lists of integer token ids"),
])
def test_bad_pretokenized_input_fails_before_the_run_exists(tmp_path, column, problem):
    pq.write_table(pa.table({"id": np.arange(40), "input_ids": column}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"id": [100], "input_ids": pa.array([[1]], pa.list_(pa.int64()))}), tmp_path / "val.parquet")
    cfg = config(tmp_path, **{"data.train": str(tmp_path / "train.parquet"), "data.validation": str(tmp_path / "val.parquet"),
                              "data.pretokenized": True, "train.steps": 1})
    with pytest.raises(DataError, match=problem):
        prepare_data(cfg, StoreOptions())
    assert not (tmp_path / "store").exists()


def test_pretokenized_files_without_source_and_config_checks(tmp_path):
    eos = ByteTokenizer().eos_id  # ends the web rows: a text shown from tokens leaves it out
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 3, eos]] * 20, pa.list_(pa.int16()))}), tmp_path / "web.parquet")
    pq.write_table(pa.table({"input_ids": pa.array([[4, 5]] * 20, pa.list_(pa.int16()))}), tmp_path / "code.parquet")
    pq.write_table(pa.table({"input_ids": pa.array([[1]], pa.list_(pa.int64()))}), tmp_path / "val.pq")
    cfg = config(tmp_path, **{"data.train": [str(tmp_path / "web.parquet"), str(tmp_path / "code.parquet")],
                              "data.validation": str(tmp_path / "val.pq"), "data.pretokenized": True})
    run = make_run(cfg)
    assert run_data.token_meta(run)["sources"] == ["code", "web"]  # each file is its own source
    shards = run_data.rank_tokens(run, 0)
    ids, sources = shards.share(0)
    assert all(s == ("web" if i < 20 else "code") for i, s in zip(ids, sources))
    assert run_data.texts_by_id(run, [0, 25]) == {0: "\x01\x02\x03", 25: "\x04\x05"}
    with pytest.raises(ConfigError, match="data.pretokenized needs data.train"):
        config(tmp_path, **{"data.pretokenized": True})


# The local backend's cases (referenced and copied, a change refused) are the tests above.
@pytest.mark.parametrize("store_root", ["s3"], indirect=True)
def test_data_in_and_outside_the_store_on_s3(store_root, tmp_path):
    """Files in the store's bucket are recorded and read where they are; files from elsewhere
    are copied in parts; ranks range-read their row groups from either."""
    import fsspec

    so = store_root.options.storage_options
    train, val = builtin_corpus()
    data = f"{store_root.uri}-data/corpus"  # beside the runs' root, in the same bucket
    fs, root = fsspec.core.url_to_fs(data, **so)
    fs.makedirs(root, exist_ok=True)
    for i, a in enumerate(range(0, train.num_rows, 512)):
        with fs.open(f"{root}/part-{i}.parquet", "wb") as f:
            pq.write_table(train.slice(a, 512), f)
    pq.write_table(train, tmp_path / "elsewhere.parquet")
    pq.write_table(val, tmp_path / "val.parquet")
    base = {"store.uri": store_root.uri, "store.storage_options": so, "data.validation": str(tmp_path / "val.parquet"),
            "train.steps": 6}
    ids = [2, 700, 1500]
    # a local file is not in the bucket: copied without being asked
    for run_id, train_uri, copy in (("in", data, False), ("out", str(tmp_path / "elsewhere.parquet"), True)):
        cfg = Config().with_overrides(**base, **{"run_id": run_id, "data.train": train_uri}).validate()
        run = make_run(cfg)
        assert run.manifest["data"]["train"] == ("copied" if copy else "referenced")
        assert (run.list("data/train") != []) == copy
        assert_same_as_whole_table(run, train, cfg)
        assert run_data.texts_by_id(run, ids) == {i: train["text"][i].as_py() for i in ids}
    with fs.open(f"{root}/part-1.parquet", "wb") as f:  # the data changes under the "in" run
        pq.write_table(train.slice(0, 512), f)
    with pytest.raises(DataError, match="part-1.parquet: .*version"):
        run_data.check_data(Run.open(store_root.uri, "in", options=store_root.options))


def test_pretokenized_job_gives_the_values_of_the_same_texts(pretokenized_job):
    """End to end: a job on pre-tokenised files (the byte tokenizer's ids plus eos, cut to
    seq_len) trains on the same tokens as the job on the texts, so every value is bit-equal."""
    text_run, run, text_cfg, _ = pretokenized_job
    text, tok = (r.read_table("values/samples.parquet") for r in (text_run, run))
    t = text_cfg.train
    assert text.num_rows == text_run.manifest["num_steps"] * t.micro_batch * t.ranks * t.grad_accum > 0
    assert text.equals(tok)
