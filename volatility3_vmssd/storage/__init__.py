"""The HyperVStorage key-value container: one reader and one writer (spec §1)."""

from .defs import KeyType, ObjectType
from .reader import FileHeader, HyperVStorage, Key, ReplayLogInfo, StorageObject, is_hyperv_storage
from .writer import (
    HyperVStorageWriter,
    TypedValue,
    add_journal_entries,
    commit_replay_log,
    uint,
    write_storage,
)

__all__ = [
    "FileHeader",
    "HyperVStorage",
    "HyperVStorageWriter",
    "Key",
    "KeyType",
    "ObjectType",
    "ReplayLogInfo",
    "StorageObject",
    "TypedValue",
    "add_journal_entries",
    "commit_replay_log",
    "is_hyperv_storage",
    "uint",
    "write_storage",
]
