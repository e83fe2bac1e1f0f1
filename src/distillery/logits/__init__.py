"""Offline teacher logits: a compact top-k codec, shard files and a resumable cache directory."""

from distillery.logits.cache import (
    CacheError,
    CacheMismatchError,
    CacheWriter,
    LogitCache,
    Manifest,
    tokenizer_hash,
)
from distillery.logits.format import (
    FORMAT_VERSION,
    ShardError,
    ShardReader,
    TopKExample,
    decode_positions,
    encode_positions,
    write_shard,
)

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheMismatchError",
    "CacheWriter",
    "LogitCache",
    "Manifest",
    "ShardError",
    "ShardReader",
    "TopKExample",
    "decode_positions",
    "encode_positions",
    "tokenizer_hash",
    "write_shard",
]
