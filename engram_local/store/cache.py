"""CachedStore: a node's bounded LRU cache (by bytes) of whole memory versions, over any store.

A request gets one `Memory` (one version's bytes, immutable), so it never runs on a mix of two
versions, whatever is written meanwhile. How the cache learns of new versions:

  notify   (a store that can push: PostgreSQL LISTEN/NOTIFY) a cached entry is served without
           asking the database until a notification for that user drops it. While the listener
           is down (reconnecting) the cache is emptied and bypassed, so nothing stale is served.
  version  (any store) each get asks the store for the current version (one indexed lookup, or
           one stat) and serves the cached bytes when they match.

A fetch that a notification overtook (it may have read the version before the one notified) is
returned to its caller, a whole version, but not cached. Users without a memory are cached too
(most requests of an organisation's users may have none), at ENTRY_OVERHEAD bytes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Iterator, Sequence

from engram_local.store.base import ABSENT, Memory, MemoryStore, StoreError, Version, check_user

# What an entry costs beyond its bytes (the Memory object, the dict slot, the key), counted so a
# cache of many absent users stays bounded too.
ENTRY_OVERHEAD = 256


class CachedStore(MemoryStore):
    def __init__(self, store: MemoryStore, max_bytes: int = 256 << 20, mode: str = "auto"):
        if mode not in ("auto", "notify", "version"):
            raise StoreError(f"cache mode {mode!r}: auto, notify or version")
        self.store, self.url, self.max_bytes = store, store.url, int(max_bytes)
        self._entries: OrderedDict[str, Memory | None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # user -> [fetches in flight, a notification came for the user meanwhile]
        self._inflight: dict[str, list] = {}
        self.hits = self.misses = self.evictions = 0
        self._watch = store.watch(self._on_change) if mode != "version" else None
        if mode == "notify" and self._watch is None:
            raise StoreError(f"{type(store).__name__} cannot notify; use mode='version'")
        self.mode = "notify" if self._watch is not None else "version"

    # ------------------------------------------------------------------ cache bookkeeping

    @staticmethod
    def _cost(m: Memory | None) -> int:
        return ENTRY_OVERHEAD + (len(m.data) if m is not None else 0)

    def _drop(self, user: str) -> None:
        if user in self._entries:
            self._bytes -= self._cost(self._entries.pop(user))

    def _insert(self, user: str, m: Memory | None) -> None:
        self._drop(user)
        cost = self._cost(m)
        if cost > self.max_bytes:
            return
        self._entries[user] = m
        self._bytes += cost
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= self._cost(old)
            self.evictions += 1

    def _on_change(self, user: str | None, version: Version) -> None:
        with self._lock:
            if user is None:                  # notifications may have been missed
                self._entries.clear()
                self._bytes = 0
                for rec in self._inflight.values():
                    rec[1] = True
                return
            cached = self._entries.get(user, False)
            if cached is not False and (cached.version if cached is not None else ABSENT) != version:
                self._drop(user)
            if user in self._inflight:
                self._inflight[user][1] = True

    def clear(self) -> None:
        self._on_change(None, ABSENT)

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            total = self.hits + self.misses
            return {"mode": self.mode, "hits": self.hits, "misses": self.misses,
                    "hit_rate": self.hits / total if total else 0.0, "evictions": self.evictions,
                    "entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes}

    # ------------------------------------------------------------------ reads

    def get(self, user: str) -> Memory | None:
        check_user(user)
        listening = self._watch is not None and self._watch.listening
        current = self.store.version(user) if self.mode == "version" else None
        with self._lock:
            cached = self._entries.get(user, False)
            if cached is not False and (
                    listening or (current is not None
                                  and (cached.version if cached is not None else ABSENT) == current)):
                self._entries.move_to_end(user)
                self.hits += 1
                return cached
            self.misses += 1
            rec = self._inflight.setdefault(user, [0, False])
            rec[0] += 1
        m = None
        try:
            m = self.store.get(user)
            return m
        finally:
            with self._lock:
                rec[0] -= 1
                overtaken = rec[1]
                if rec[0] == 0:
                    del self._inflight[user]
                if not overtaken and (self.mode == "version" or listening):
                    self._insert(user, m)

    def version(self, user: str) -> Version:
        return self.store.version(user)

    def log(self, user: str):
        return self.store.log(user)

    def users(self) -> Iterator[str]:
        return self.store.users()

    # ------------------------------------------------------------------ writes (through to the store)

    def lock(self, user: str):
        return self.store.lock(user)

    def _forget(self, user: str) -> None:
        # our own write: drop the entry now rather than wait for the notification
        with self._lock:
            self._drop(user)

    def put(self, user: str, data: bytes, *, action: str = "write", fact_ids: Sequence[str] = (),
            expect_version: Version | None = None, node: str | None = None) -> Memory:
        try:
            return self.store.put(user, data, action=action, fact_ids=fact_ids,
                                  expect_version=expect_version, node=node)
        finally:
            self._forget(user)

    def delete(self, user: str, *, node: str | None = None) -> bool:
        try:
            return self.store.delete(user, node=node)
        finally:
            self._forget(user)

    @contextlib.contextmanager
    def edit(self, user: str, action: str = "remember", node: str | None = None):
        # read the version to rewrite from the store itself, under the lock, never from the cache
        try:
            with self.store.edit(user, action, node) as ed:
                yield ed
        finally:
            self._forget(user)

    def watch(self, callback):
        return self.store.watch(callback)

    def close(self) -> None:
        self.store.close()
