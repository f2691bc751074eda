"""Query texts: reading them from files and checking them against the model's context."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rayattr.query.errors import QueryError

if TYPE_CHECKING:  # the data package needs torch; reading query files must not
    from rayattr.data.tokenizer import Tokenizer


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
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as err:
        raise QueryError(f"query file {str(p)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None
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
            check_encodable(text, f"{p}:{no}")
            texts.append(text)
        else:
            texts.append(line)
    if not texts:
        raise QueryError(f"query file {str(p)!r} holds no query texts")
    return texts


def check_encodable(text: str, what: str) -> None:
    """QueryError naming `what` if `text` cannot be UTF-8 encoded (a lone surrogate, e.g. from
    a JSON escape like "\\ud800" or from undecodable bytes on the command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        shown = text[max(0, err.start - 20):err.start + 20].encode("utf-8", "backslashreplace").decode()
        raise QueryError(f"{what} is not valid Unicode: a lone surrogate {text[err.start]!a} at "
                         f"character {err.start} (near: {shown}); fix the text's encoding") from None


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
        check_encodable(text, f"query {i}")
        n = len(tokenizer.encode(text)) + extra
        if n > seq_len:
            notices.append(Notice(i, f"query {i} has {n} tokens, more than the model's context of "
                                     f"{seq_len}: only its first {seq_len} tokens are attributed"))
    return notices
