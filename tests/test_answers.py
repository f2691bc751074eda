"""Answers a person can act on (issue 29): rankings with their noise, the job's summary, `show`'s
optimizer, schedule and validation lines, the report's computed captions and the stability
bound of the run's optimizer, built-in texts that fit seq_len, warnings shown once."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pyarrow as pa
import pytest

from rayattr.report.standing import noise_sentence, split_by_noise, stand_apart, standing_sentence

SOURCES = [  # value_low/high bound the total; n_samples scales them to value per sample
    {"source": "net", "n_samples": 10, "value": 3.0, "value_low": 1.0, "value_high": 5.0, "value_per_sample": 0.3},
    {"source": "text", "n_samples": 10, "value": 2.0, "value_low": -0.5, "value_high": 4.0,
     "value_per_sample": 0.2},
    {"source": "corrupted", "n_samples": 20, "value": -9.0, "value_low": -12.0, "value_high": -7.0,
     "value_per_sample": -0.45},
]


def test_a_source_stands_apart_only_clear_of_the_others_and_of_zero():
    assert stand_apart(SOURCES) == ["corrupted"]  # net overlaps text; text spans zero
    line = standing_sentence(SOURCES)
    assert line.startswith("corrupted (hurt) stands apart") and "the other 2 sources' intervals overlap" in line
    assert "no source stands apart" in standing_sentence(SOURCES[:2])


def test_noise_sentences_say_how_many_are_clear_and_when_none_is():
    rows = [{"id": 1, "within_noise": False}, {"id": 2, "within_noise": True}, {"id": 3, "within_noise": False}]
    clear, within = split_by_noise(rows)
    assert [r["id"] for r in clear] == [1, 3] and [r["id"] for r in within] == [2]
    assert noise_sentence(2, 1, "most helpful", hidden=True) == (
        "2 of the 3 most helpful are clear of noise (|score| >= 2 SE); 1 is within noise (left out; --all lists them)")
    assert noise_sentence(0, 5, "most harmful").startswith("none of the 5 most harmful is clear of noise")
    assert noise_sentence(4, 0, "most helpful") == "all 4 most helpful are clear of noise (|score| >= 2 SE)"


def test_query_table_lists_the_clear_rows_and_all_of_them_with_all():
    from rayattr.cli import _query_table

    row = dict(source="net", step=3, se=0.1, text="a text")
    res = SimpleNamespace(helpful=[{**row, "sample_id": 7, "score": 0.5, "within_noise": False},
                                   {**row, "sample_id": 8, "score": 0.1, "within_noise": True}],
                          harmful=[{**row, "sample_id": 9, "score": -0.1, "within_noise": True}], sources=None)
    text = _query_table(res)
    assert "most helpful (2): 1 of the 2 samples is clear of noise" in text
    assert "most harmful (1): the one sample is not clear of noise (left out; --all lists them)" in text
    body = [ln.split()[0] for ln in text.splitlines() if ln[:1].isdigit()]
    assert body == ["7"]  # the rows within noise are left out
    full = _query_table(res, show_all=True)
    assert [ln.split()[0] for ln in full.splitlines() if ln[:1].isdigit()] == ["7", "8", "9"]
    assert "within_noise" in full and "listed after the clear ones" in full


def test_job_summary_prints_intervals_and_which_sources_stand_apart():
    from rayattr.pipeline.job import job_summary

    result = SimpleNamespace(uri="/s/run-1", num_steps=192, segments=2, timings={"train": 50.0}, sources=SOURCES)
    text = job_summary(result, "run-1")
    rows = {ln.split()[0]: ln for ln in text.splitlines() if "[" in ln}
    assert "[1.00e-01, 5.00e-01]" in rows["net"] and "[-6.00e-01, -3.50e-01]" in rows["corrupted"]
    assert "corrupted (hurt) stands apart" in text and "top source" not in text
    assert text.rstrip().splitlines()[-1].startswith("next: rayattr values run-1 | rayattr query run-1")


def test_show_says_optimizer_schedule_and_validation():
    from rayattr.report.summary import format_optimizer, format_schedule, format_validation

    assert format_optimizer({"type": "adamw", "lr": 0.002, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                             "weight_decay": 0.1}) == \
        "AdamW, peak lr 0.002, betas (0.9, 0.95), eps 1e-08, weight decay 0.1"
    assert format_optimizer({"type": "sgd", "lr": 0.3}) == "SGD (no momentum), lr 0.3"
    sch = format_schedule({"type": "WarmupCosineLR", "params": {}, "lr_first": 0.0, "lr_peak": 0.002,
                           "lr_peak_step": 19, "lr_last": 0.0002})
    assert sch == "WarmupCosineLR: lr 0 at the first recorded step, peak 0.002 at step 19, 0.0002 at the last"
    assert format_schedule({"type": None}) == "no scheduler (constant learning rate)"
    assert "not validated: rayattr validate r --subsets 16 --sources" in format_validation(None, "r")[0][1]
    lines = dict(format_validation({"n_subsets": 8, "lds": 0.48, "lds_ci": [-0.31, 0.85], "n_sources": 7,
                                    "source_spearman": 0.5, "verdict": "No evidence yet."}, "r"))
    assert lines["validation"] == ("LDS 0.48 over 8 subsets (95% CI [-0.31, 0.85], spans zero); "
                                   "sources Spearman 0.50 over 7")
    assert lines["verdict"] == "No evidence yet."


def test_show_reads_the_optimizer_the_run_trained_with(tmp_path):
    from rayattr.config import Config
    from rayattr.store import Run, StepRecord
    from rayattr.report.summary import format_summary, run_summary

    run = Run.create(str(tmp_path), "r", {"config": Config().to_dict(), "status": "done"})
    run.write_step_records([StepRecord(s, 0, lr, 0.01, [s], ["a"], [0]) for s, lr in enumerate([0.0, 0.002, 0.001])])
    s = run_summary(run)
    assert s["optimizer"]["type"] == "adamw" and s["schedule"]["lr_peak_step"] == 1
    text = format_summary(s)
    assert "optimizer   AdamW" in text and "WarmupCosineLR: lr 0 at the first" in text
    assert "validation  not validated" in text


def fake_run(optimizer: str, max_eta_lambda: float | None = 0.5, preconditioned: bool = True):
    cfg = {"train": {"optimizer": {"type": optimizer}, "lr": 0.1}}
    return SimpleNamespace(manifest={"config": cfg, "max_eta_lambda": max_eta_lambda, "max_eta_lambda_step": 3,
                                     "eta_lambda_preconditioned": preconditioned and optimizer == "adamw"})


def test_the_stability_statement_is_the_bound_of_the_runs_optimizer():
    from rayattr.report.trust import stability_sentence

    adamw = stability_sentence(fake_run("adamw", 5.3))
    assert "η·λ_max(P·H) of any step was 5.3" in adamw and "amplify" in adamw and "below its stability edge 38" in adamw
    assert "not the loss's Hessian" in adamw  # whose H it is: a reader takes H for the Hessian
    assert "stability edge" in stability_sentence(fake_run("adamw", 40.0))  # past Adam's own edge at β₁ 0.9
    assert "Below 2 throughout" in stability_sentence(fake_run("adamw", 0.5))
    older = stability_sentence(fake_run("adamw", 0.014, preconditioned=False))  # embedded before P·H was measured
    assert "says nothing" in older and "reliable" not in older
    assert "η·λ_max(H) of any step was 0.5" in stability_sentence(fake_run("sgd"))
    assert "less reliably" in stability_sentence(fake_run("sgd", 3.0))
    assert stability_sentence(fake_run("sgd", None)) is None


def test_phase_caption_is_computed_from_the_figures_grid():
    from rayattr.report.html import phase_caption

    phases = pa.table({"source": ["a", "a", "b", "b"], "phase": [0, 1, 0, 1], "step_start": [0, 5, 0, 5],
                       "step_end": [5, 10, 5, 10], "n_occurrences": [2, 2, 2, 2], "value": [4.0, 0.2, -6.0, 0.2]})
    text = phase_caption(phases)
    # the first phase is the loud one here: a caption written for typical runs would say the last
    assert "The largest cell in size is -3 (b, steps 0–5)" in text and "largest on average in the first phase" in text
    assert "In the last phase b has the opposite sign" in text


@pytest.mark.parametrize("seq_len", [64, 32])
def test_builtin_texts_fit_seq_len_by_default(seq_len):
    from rayattr.config import Config
    from rayattr.data import TokenizedDataset, builtin_corpus, load_tokenizer

    cfg = Config.from_dict({"data": {"seq_len": seq_len, "builtin": {"n_train": 256, "n_validation": 32}}})
    assert cfg.data.builtin.max_chars is None and cfg.data.builtin_max_chars == seq_len - 1
    train, val = builtin_corpus(n_train=256, n_validation=32, max_chars=cfg.data.builtin_max_chars)
    tok = load_tokenizer("byte")
    assert TokenizedDataset(train, tok, seq_len).num_truncated == 0
    assert TokenizedDataset(val, tok, seq_len).num_truncated == 0
    lengths = [len(t.encode()) for t in train["text"].to_pylist()]
    assert max(lengths) <= seq_len - 1 and sum(lengths) / len(lengths) > 0.7 * (seq_len - 1)  # not cut to scraps
    # an explicit max_chars is kept (user settings, and truncation reported as before)
    assert Config.from_dict({"data": {"builtin": {"max_chars": 192}}}).data.builtin_max_chars == 192


def test_split_text_bounds_are_utf8_bytes():
    from rayattr.data.corpus import split_text

    pieces = split_text("é" * 50 + " " + "ab " * 40, max_chars=31, min_chars=10)
    assert pieces and all(10 <= len(p.encode()) <= 31 for p in pieces)


def test_library_warnings_are_shown_once_by_the_entry_point():
    from rayattr.runtime.logs import show_warnings

    stream = io.StringIO()
    logger = logging.getLogger("rayattr")
    before = list(logger.handlers)
    logger.handlers[:] = []
    try:
        handler = show_warnings(stream)
        assert show_warnings() is handler  # idempotent: one handler, one line per warning
        logging.getLogger("rayattr.pipeline.stages").warning("η·λ_max(H) = %.3g at step %d", 2.5, 7)
        logging.getLogger("rayattr.pipeline.stages").info("not shown")
        assert stream.getvalue() == "warning: η·λ_max(H) = 2.5 at step 7\n"
    finally:
        logger.handlers[:] = before


def test_warnings_of_a_command_print_once_on_stderr():
    import subprocess
    import sys

    code = ("import logging; from rayattr.runtime.logs import show_warnings; show_warnings(); show_warnings(); "
            "logging.getLogger('rayattr.train.trainer').warning('training rank failed; restarting')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stderr == "warning: training rank failed; restarting\n" and out.stdout == ""
