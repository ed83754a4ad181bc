"""The HyperVStorage key-value container: one reader, one writer, the replay log (docs/container-format.md)."""

from .defs import KeyType, ObjectType
from .journal import ReplayLogInfo
from .keytree import Key, NumberedKeys
from .reader import FileHeader, HyperVStorage, StorageObject, commit_replay_log
from .writer import HyperVStorageWriter, TypedValue, uint

__all__ = [
    "FileHeader",
    "HyperVStorage",
    "HyperVStorageWriter",
    "Key",
    "KeyType",
    "NumberedKeys",
    "ObjectType",
    "ReplayLogInfo",
    "StorageObject",
    "TypedValue",
    "commit_replay_log",
    "uint",
]
