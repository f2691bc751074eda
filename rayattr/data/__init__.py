"""rayattr.data: the built-in corpus, tokenizers, dataset files (read whole, or streamed by
scan.py), tokenised tensors, batch plans, and the token shards and data a run keeps (shards.py,
run_data.py)."""

from rayattr.data.batching import BatchPlan, Owners, StepLayout, epoch_order, epoch_permutation
from rayattr.data.corpus import CLEAN_SOURCES, CORRUPTED_SOURCE, builtin_corpus
from rayattr.data.errors import DataError
from rayattr.data.graded import GRADED_SOURCES, graded_corpus
from rayattr.data.files import load_dataset
from rayattr.data.tokenized import IGNORE_INDEX, TokenizedDataset
from rayattr.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BatchPlan", "ByteTokenizer", "CLEAN_SOURCES", "CORRUPTED_SOURCE", "DataError", "GRADED_SOURCES", "HFTokenizer",
    "IGNORE_INDEX", "Owners", "StepLayout", "TokenizedDataset", "Tokenizer", "builtin_corpus",
    "epoch_order", "epoch_permutation", "graded_corpus", "load_dataset", "load_tokenizer",
]
