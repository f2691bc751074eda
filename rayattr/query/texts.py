"""Query texts: reading them from files and checking them against the model's context."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rayattr.data.tokenizer import Tokenizer
from rayattr.query.errors import QueryError


@dataclass(frozen=True)
class Notice:
    """Something the user should know about a query (e.g. it was truncated)."""

    query: int
    """Index of the query text it concerns."""
    message: str


def read_query_file(path: str | Path) -> list[str]:
    """Texts from a .jsonl file (one object with a "text" field, or a JSON string, per line)
    or from any other file (one text per non-blank line)."""
    p = Path(path)
    if not p.is_file():
        raise QueryError(f"query file {str(p)!r} does not exist")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    texts: list[str] = []
    for no, line in enumerate(lines, 1):
        if p.suffix in (".jsonl", ".json", ".ndjson"):
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise QueryError(f"{p}:{no}: not valid JSON ({err})") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise QueryError(f"{p}:{no}: expected a JSON string or an object with a string "
                                 f"'text' field, got {line[:60]!r}")
            texts.append(text)
        else:
            texts.append(line)
    if not texts:
        raise QueryError(f"query file {str(p)!r} holds no query texts")
    return texts


def check_texts(texts: list[str], tokenizer: Tokenizer, seq_len: int) -> list[Notice]:
    """Refuse empty queries; say which ones are longer than the model's context.

    Counting is the same as the training data's (tokens plus eos); longer texts are
    truncated to `seq_len` tokens by the tokenizer, exactly as training samples were.
    """
    if isinstance(texts, str):
        raise QueryError("texts must be a list of strings, not one string")
    if not texts:
        raise QueryError("no query texts given")
    notices = []
    extra = 0 if tokenizer.eos_id is None else 1
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"query {i} is empty: give some text to attribute")
        n = len(tokenizer.encode(text)) + extra
        if n > seq_len:
            notices.append(Notice(i, f"query {i} has {n} tokens, more than the model's context of "
                                     f"{seq_len}: only its first {seq_len} tokens are attributed"))
    return notices
