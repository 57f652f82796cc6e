"""Where the users' memories live: a directory (the default) or a PostgreSQL database shared by
many `serve` nodes, behind one interface (`MemoryStore`), plus a node-side cache (`CachedStore`).

    store = open_store("memories/")                           # DIR/<user>.eov
    store = open_store("postgresql://engram@db:5432/engram")  # pip install 'engram-local[postgres]'
    node = CachedStore(store, max_bytes=256 << 20)
    m = node.get("alice")                   # Memory(version, data=.eov bytes, ...) or None
    with node.edit("alice", "remember") as ed:
        ...                                 # rewrite ed.path (facade.remember); stored on exit

docs/capacity.md sizes a deployment.
"""

from __future__ import annotations

import os

from engram_local.store.base import (ABSENT, ACTIONS, Edit, LogEntry, Memory, MemoryStore, StoreError,
                                     VersionConflict, check_user, memory_meta)
from engram_local.store.cache import CachedStore
from engram_local.store.directory import DirectoryStore

__all__ = ["open_store", "MemoryStore", "DirectoryStore", "PostgresStore", "CachedStore", "Memory",
           "LogEntry", "Edit", "StoreError", "VersionConflict", "ABSENT", "ACTIONS", "check_user",
           "memory_meta"]

POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(spec: str | os.PathLike, **options) -> MemoryStore:
    """The store a `--memory-store` value names: postgresql://... (or postgres://) a database,
    file://PATH or a plain path a directory (created if missing). `options` go to the backend's
    constructor. Anything else is a StoreError line."""
    spec = os.fspath(spec)
    scheme = spec.partition("://")[0].lower() if "://" in spec else ""
    if scheme in POSTGRES_SCHEMES:
        from engram_local.store.postgres import PostgresStore

        return PostgresStore(spec, **options)
    if scheme == "file":
        return DirectoryStore(spec[len("file://"):], **options)
    if scheme:
        raise StoreError(f"unsupported memory store {scheme}://...: give a directory or a "
                         f"postgresql://user@host:port/db URL")
    if not spec:
        raise StoreError("empty memory store: give a directory or a postgresql:// URL")
    return DirectoryStore(spec, **options)


def __getattr__(name):
    # PostgresStore without importing psycopg for users of the directory store
    if name == "PostgresStore":
        from engram_local.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(name)
