"""Compatibility path (issue contract): `engram_local.hashing.NgramHashLayout` and
`engram_local.hashing.hash_ids`. The code lives in engram_local.native.hashing; nothing inside the
package imports this module (tests/test_layers.py)."""

from engram_local.native.hashing import NgramHashLayout, hash_ids  # noqa: F401

__all__ = ["NgramHashLayout", "hash_ids"]
