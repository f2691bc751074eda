"""Object names inside a run directory (the single place that knows the layout).

<root>/<run_id>/
    run.json                                   manifest
    steps/00000000-00000063.e00000001.parquet  step records chunk of the records' writer epoch 1
    commits/steps/00000000-00000063.e00000001.json its commit entry
    grads/<kind>/r0003/00000016-00000031.e00000002.arrow  gradient shard (Arrow IPC file) of
                                               the rank's writer epoch 2
    commits/<kind>/r0003/00000016-00000031.e00000002.json its commit entry
    writers/<kind>/r0003.e00000002.json        registration (open / closed) of writer epoch 2 of rank 3
    epochs/<kind>/r0003/e00000002              the claim of writer epoch 2 of rank 3 (store/epochs.py)
    epochs/steps/r0000/e00000001               the claim of the step records' writer epoch 1
    data/, weights/, states/, train/, embed/, values/, embeddings/, exact/, validation/
                                               later stages' objects: each has its name below,
                                               grouped by the stage that writes it

Directory names never repeat a data column in Hive style (`rank=3/`), so pyarrow.dataset can
read grads/<kind>/ directly.
"""

from __future__ import annotations

import re

RUN_JSON = "run.json"
STEP_DIGITS = 8
SHARD_SUFFIX = ".arrow"
RECORDS_KIND = "steps"
RECORDS_RANK = -1  # the rank a step records' commit entry names
# The records' one writer is rank 0's Recorder: it claims its epochs as rank 0's of kind "steps"
RECORDS_WRITER_RANK = 0
UPDATE_KIND = "update"  # AdamW update rows u = P g, beside the "train" rows (docs/method.md §7)
CURVATURE_KIND = "curvature"  # sampled-label pseudo-gradient rows ĝ (capture.curvature "sampled")
# AdamW with sampled-label curvature: their update rows P ĝ, beside them in the same order
CURVATURE_UPDATE_KIND = "curvature_update"
# AdamW's second-moment response rows y = D_t ⊙ ḡ_t ⊙ g (docs/method.md §7, "v's response"),
# beside the update rows when the run records them (manifest "v_response")
V_RESPONSE_KIND = "v_response"

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    from .errors import StoreError
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise StoreError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' or '-' "
                         "(max 128, not starting with '.')")
    return run_id


def check_kind(kind: str) -> str:
    from .errors import StoreError
    if not isinstance(kind, str) or not _KIND_RE.match(kind) or kind == RECORDS_KIND:
        raise StoreError(f"invalid gradient kind {kind!r}: expected a lowercase name such as "
                         f"'train' or 'curvature' (not '{RECORDS_KIND}')")
    return kind


def step_range(first: int, last: int) -> str:
    return f"{first:0{STEP_DIGITS}d}-{last:0{STEP_DIGITS}d}"


def rank_dir(rank: int) -> str:
    return f"r{rank:04d}"


def _epoch_suffix(epoch: int) -> str:
    if epoch < 1:  # store/epochs.claim hands out 1, 2, ...
        raise ValueError(f"writer epochs start at 1, got {epoch}")
    return f".e{epoch:0{STEP_DIGITS}d}"


def shard_path(kind: str, rank: int, first: int, last: int, epoch: int) -> str:
    """A shard's object name: its writer's epoch is part of it, so a zombie writer (a restarted
    rank's predecessor) never overwrites its successor's objects."""
    return f"grads/{kind}/{rank_dir(rank)}/{step_range(first, last)}{_epoch_suffix(epoch)}{SHARD_SUFFIX}"


def shard_dir(kind: str, rank: int) -> str:
    return f"grads/{kind}/{rank_dir(rank)}"


def commit_dir(kind: str, rank: int | None = None) -> str:
    """commits/<kind> (the step records' kind "steps" included), or one rank's folder in it."""
    return f"commits/{kind}" if rank is None else f"commits/{kind}/{rank_dir(rank)}"


def commit_path(kind: str, rank: int, first: int, last: int, epoch: int) -> str:
    return f"{commit_dir(kind, rank)}/{step_range(first, last)}{_epoch_suffix(epoch)}.json"


def writer_dir(kind: str) -> str:
    return f"writers/{kind}"


def writer_path(kind: str, rank: int, epoch: int) -> str:
    """A writer's registration: one per writer epoch, so a zombie writer's late registration
    lands on its own key and never overwrites its successor's (store/registrations.py)."""
    return f"{writer_dir(kind)}/{rank_dir(rank)}{_epoch_suffix(epoch)}.json"


def epoch_dir(kind: str, rank: int | None = None) -> str:
    base = f"epochs/{kind}"
    return base if rank is None else f"{base}/{rank_dir(rank)}"


def epoch_path(kind: str, rank: int, epoch: int) -> str:
    """The claim of one writer epoch."""
    return f"{epoch_dir(kind, rank)}/e{epoch:0{STEP_DIGITS}d}"


def records_path(first: int, last: int, epoch: int) -> str:
    return f"steps/{step_range(first, last)}{_epoch_suffix(epoch)}.parquet"


def records_commit_path(first: int, last: int, epoch: int) -> str:
    return f"commits/{RECORDS_KIND}/{step_range(first, last)}{_epoch_suffix(epoch)}.json"


# The recording's own folders: only the store's writers touch them (Run refuses writes there)
MANAGED_DIRS = ("grads/", "commits/", "writers/", "steps/")

# ---------------------------------------------------------------- data stage (data/run_data.py)
VALIDATION_DATA = "data/validation.parquet"  # the validation texts, in row groups of VALIDATION_ROWS
TRAIN_DATA = "data/train.parquet"  # a copy of a small training set (id, source, text)
TRAIN_PARTS = "data/train"  # a large training set's copy, in parquet parts
TRAIN_LISTING = "data/train.files.json"  # the training files referenced in place, instead of a copy
TOKENS_DIR = "data/tokens"  # token shards, one file per steps_per_file steps
TOKENS_META = f"{TOKENS_DIR}/meta.json"  # the token shards' layout; present once the data stage finished


def tokens_path(first_step: int) -> str:
    """The token shard that starts at `first_step`."""
    return f"{TOKENS_DIR}/{first_step:08d}.parquet"


# ---------------------------------------------------------------- train stage
INITIAL_WEIGHTS = "weights/initial.safetensors"  # the model before step 0 (retrains start here)
FINAL_WEIGHTS = "weights/final.safetensors"  # the model after the last step (attribution's v)
TRAIN_PROGRESS = "train/progress.json"  # {"attempt", "start", "step", "loss", "seconds"}

# ---------------------------------------------------------------- embed stage (embed/segment.py)
LOCAL_KIND = "local"  # gradient kind of the local embeddings DVEmb^(t→t_ℓ), one writer "rank" per segment
FINAL_KIND = "embeddings"  # gradient kind of the final embeddings, one writer "rank" per segment
# under embed.momentum_curvature, each occurrence's second local row D^loc u, which R at its
# segment's end acts on (dvemb.SegmentRecursion.carried), written beside its local embedding
CARRIED_KIND = "local_carried"
# what a new cut of the segments throws away (embed/cut.py)
EMBED_PREFIXES = ("embed", f"writers/{LOCAL_KIND}", f"commits/{LOCAL_KIND}",
                  f"writers/{CARRIED_KIND}", f"commits/{CARRIED_KIND}")


def segment_k_path(index: int) -> str:
    """The segment matrix K per layer of segment `index`."""
    return f"embed/K/seg{index:04d}.safetensors"


def segment_r_path(index: int) -> str:
    """The momentum matrix R beside K (AdamW with momentum)."""
    return f"embed/R/seg{index:04d}.safetensors"


def segment_cd_path(index: int, block: str) -> str:
    """The lower row C or D (`block`) of a segment's link under embed.momentum_curvature."""
    if block not in ("C", "D"):
        raise ValueError(f"a segment link's lower row is C or D, not {block!r}")
    return f"embed/{block}/seg{index:04d}.safetensors"


def segment_cut_path(index: int) -> str:
    """Where a segment's sweep stopped at an unstable step (embed.unstable "cut"), written before K."""
    return f"embed/cut/seg{index:04d}.json"


def segment_carry_path(index: int) -> str:
    """Per-(source, phase) Σ β₁^(b−t) u of a segment (AdamW with momentum)."""
    return f"embed/carry/seg{index:04d}.parquet"


def segment_q_path(index: int) -> str:
    """The second-moment response's matrix Q beside K (AdamW with v's response)."""
    return f"embed/Q/seg{index:04d}.safetensors"


def segment_v_carry_path(index: int) -> str:
    """Per-(source, phase) Σ β₂^(b−t) y of a segment (AdamW with v's response)."""
    return f"embed/v_carry/seg{index:04d}.parquet"


def segment_sums_path(index: int, final: bool = False) -> str:
    """Per-(source, phase) sums of a segment's local (or, `final`, final) embeddings."""
    return f"embed/{'final_sums' if final else 'sums'}/seg{index:04d}.parquet"


ALL_SUMS = "embed/final_sums/all.parquet"  # the whole run's final sums, from the forward scan


def segment_values_path(index: int) -> str:
    """A segment's value per occurrence."""
    return f"embed/values/seg{index:04d}.parquet"


def segment_scores_path(index: int) -> str:
    """Per-(source, phase, layer) value sums of a segment (the vector chain's, float64)."""
    return f"embed/scores/seg{index:04d}.parquet"


# ---------------------------------------------------------------- reduce stage (reduce/aggregate.py)
SAMPLE_VALUES = "values/samples.parquet"  # sample_id, source, step, epoch, value per occurrence
SOURCE_VALUES = "values/sources.parquet"  # source, n_samples, n_occurrences, value (low, high, se), value_per_sample
PHASE_VALUES = "values/phases.parquet"  # source, phase, step_start, step_end, n_occurrences, value
LAYER_VALUES = "values/layers.parquet"  # source, layer, value
SOURCE_EMBEDDINGS = "embeddings/sources.parquet"  # each source's summed final embedding

# ---------------------------------------------------------------- training states (train/states.py)
STATES_DIR = "states"


def state_path(step: int) -> str:
    """The training state before step `step` (after step − 1): weights, and Adam's m and v."""
    return f"{STATES_DIR}/{step:0{STEP_DIGITS}d}.safetensors"


def state_step(name: str) -> int | None:
    """The step of a states/ object's name; None for any other name."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.partition(".")
    return int(stem) if dot and ext == "safetensors" and stem.isdigit() and len(stem) == STEP_DIGITS else None


# ---------------------------------------------------------------- exact stage (exact/metagradient.py)
EXACT_SAMPLES = "exact/samples.parquet"  # sample_id, source, step, epoch, value: the exact first-order response
EXACT_SOURCES = "exact/sources.parquet"  # the same per source, as values/sources.parquet
EXACT_SUMMARY = "exact/summary.json"  # how the replay went and how the values agree with it, by phase of training

# ---------------------------------------------------------------- validate stage (validate/validation.py)
VALIDATION_RETRAINS = "validation/retrains"  # one JSON per finished retrain, named by Removal.key
VALIDATION_SUBSETS = "validation/subsets.parquet"  # predicted and actual change per removed subset
VALIDATION_SOURCES = "validation/sources.parquet"  # ... per removed source
VALIDATION_OCCURRENCES = "validation/occurrences.parquet"  # ... per perturbed occurrence
VALIDATION_SUMMARY = "validation/summary.json"  # the headline figures and verdict
VALIDATION_SMOOTHNESS = "validation/smoothness.json"  # the last attributability check, kept across validations


def retrain_path(key: str) -> str:
    """One finished retrain's record."""
    return f"{VALIDATION_RETRAINS}/{key}.json"


def gang_dir(index: int) -> str:
    """Ray Train's storage of retrain gang `index`."""
    return f"validation/gang-{index}"
