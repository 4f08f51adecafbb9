"""Byte-level BPE tokenizer (a thin wrapper over Hugging Face ``tokenizers``).

Byte-level BPE maps every UTF-8 byte to a base symbol before merging, so any
text round-trips exactly and every token stands for a whole number of bytes;
that is what makes bits-per-byte comparable across vocabularies
(:meth:`BPETokenizer.token_byte_lengths`).

Special ids are fixed by the order of ``SPECIAL_TOKENS``: UNK=0, PAD=1, EOS=2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config import ConfigError

SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[EOS]"]
UNK_ID, PAD_ID, EOS_ID = 0, 1, 2


def _batched(texts: Iterable[str], size: int = 1000) -> Iterable[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class BPETokenizer:
    """A trained byte-level BPE; build it with :meth:`train` or :meth:`load`."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        # a story that happens to contain the text "[EOS]" must be encoded as text, not as the
        # special id (keeps encoding lossless); the flag is not serialized, so set it on every wrap
        # (tokenizers < 0.15 lacks it: there such text would map to the special ids)
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        for name, expected in zip(SPECIAL_TOKENS, (UNK_ID, PAD_ID, EOS_ID)):
            if tokenizer.token_to_id(name) != expected:
                raise ConfigError(f"tokenizer maps {name} to id {tokenizer.token_to_id(name)}, expected "
                                  f"{expected}; use a tokenizer.json trained by somoe (delete it to retrain)")
        self._byte_lengths: np.ndarray | None = None
        self._fingerprint: str | None = None

    # --- construction -------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts``; ``vocab_size`` counts the 256 byte symbols and the 3 specials.

        A small corpus may stop short of ``vocab_size`` (no pair left to merge):
        :attr:`vocab_size` reports the real size.
        """
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ConfigError(f"vocab_size={vocab_size} is below the {256 + len(SPECIAL_TOKENS)} byte and "
                              f"special symbols of a byte-level BPE; raise model.vocab_size")
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        # batches of strings cross the Python/Rust boundary far faster than single strings
        tok.train_from_iterator(_batched(texts), trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Load a ``tokenizer.json`` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} not found; fix data.tokenizer_path or leave it empty to "
                              f"train one")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ConfigError(f"cannot read tokenizer {path} ({str(e).splitlines()[0] if str(e) else e!r}); "
                              f"delete it to retrain") from e

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a folder); returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust backend (no offsets computed)."""
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets we never use
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (EOS, PAD, UNK) are dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    # --- properties -----------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the model's embedding rows must be at least this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Short sha256 of the serialized tokenizer; identifies it in cache keys and metadata."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (int64, length ``vocab_size``).

        Byte-level tokens are strings over a 256-symbol alphabet, one symbol
        per byte, so a token's byte count is its length in symbols. EOS counts
        one byte (it stands for the story break, like a newline would); PAD and
        UNK count none, so summing over predicted targets gives the bytes for
        bits per byte.
        """
        if self._byte_lengths is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            for token, idx in self._tok.get_vocab(with_added_tokens=True).items():
                lengths[idx] = len(token)
            lengths[[UNK_ID, PAD_ID]] = 0
            lengths[EOS_ID] = 1
            self._byte_lengths = lengths
        return self._byte_lengths.copy()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"
