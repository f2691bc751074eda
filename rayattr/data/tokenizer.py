"""Tokenizers behind one small protocol: a byte-level one and local HuggingFace ones."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from rayattr.data.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
    """What the data and training code needs from a tokenizer.

    encode() adds no special tokens (callers decide about eos); decode() drops them.
    """

    @property
    def vocab_size(self) -> int: ...  # embedding rows the model needs (all ids < vocab_size)

    @property
    def pad_id(self) -> int: ...  # id used for right padding (masked out of the loss)

    @property
    def eos_id(self) -> int | None: ...  # end-of-sequence id, or None if the tokenizer has none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: ids 0..255 are bytes, then pad, bos, eos.

    Needs no files, never meets an unknown character, and round-trips any string.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise DataError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"ids outside the byte vocabulary [0, {self.vocab_size}): {bad[:5]}")
        # Special ids carry no text; invalid UTF-8 (e.g. a truncated character) becomes U+FFFD.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A HuggingFace tokenizer loaded from a local directory, adapted to `Tokenizer`."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer  # heavy import, only when a path is given

        self.path = str(path)
        try:
            self.inner = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the path named
            raise DataError(f"cannot load a HuggingFace tokenizer from {self.path!r}: {err}") from err
        pad = self.inner.pad_token_id
        if pad is None:
            pad = self.inner.eos_token_id  # common for causal LMs (GPT-2 has no pad token)
        if pad is None:
            raise DataError(f"tokenizer at {self.path!r} has neither a pad nor an eos token")
        self._pad_id = int(pad)

    @property
    def vocab_size(self) -> int:
        return len(self.inner)  # includes added tokens, unlike inner.vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int | None:
        return self.inner.eos_token_id

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise DataError(f"HFTokenizer.encode expects str, got {type(text).__name__}")
        return list(self.inner.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """"byte" -> ByteTokenizer; a local HuggingFace tokenizer directory -> HFTokenizer.

    Nothing is downloaded: a hub name such as "gpt2" is rejected with a clear message.
    """
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"tokenizer spec must be 'byte' or a directory path, got {type(spec).__name__}")
    if not Path(spec).is_dir():
        raise DataError(
            f"tokenizer spec {str(spec)!r} is neither 'byte' nor a local directory; "
            "HuggingFace tokenizers must be saved locally (downloads are not used)")
    return HFTokenizer(spec)
