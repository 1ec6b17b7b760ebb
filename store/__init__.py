"""Persistence: the :class:`~store.base.Store` interface and its backends.

``open_store(url)`` picks the backend from ``EXECUTOR_STORE_URL``:
``sqlite:///absolute/path.db`` (or ``sqlite:///relative/path.db``) for the
embedded SQLite default, ``mongodb://`` or ``mongodb+srv://`` for MongoDB.
"""

from __future__ import annotations

from store.base import DuplicateError, Store, StoreError

__all__ = ["DuplicateError", "Store", "StoreError", "open_store"]


def open_store(url: str) -> Store:
    """Return an unopened store for ``url``; raise ``ValueError`` for an unknown scheme."""
    if url.startswith("sqlite:///"):
        from store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from store.mongo import MongoStore

        return MongoStore(url)
    raise ValueError(f"Unsupported EXECUTOR_STORE_URL {url!r}: use sqlite:///PATH or mongodb://HOST/DB")
