"""The PNGs behind `response_format=url` answers, kept in memory for 60 minutes.

Each image gets an unguessable token (the URL is the capability, as OpenAI's signed URLs are,
so an <img> tag can show it without the API key). Expired images are dropped; when the store
passes `max_bytes` the oldest go first.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time

URL_TTL_S = 60 * 60


class ImageStore:
    def __init__(self, *, ttl_s: float = URL_TTL_S, max_bytes: int = 512 * 2**20):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._items: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        """Keep `png`; returns its token."""
        token = secrets.token_urlsafe(18)
        with self._lock:
            self._items[token] = (time.monotonic() + self.ttl_s, png)
            self._bytes += len(png)
            self._drop(time.monotonic())
        return token

    def get(self, token: str) -> tuple[bytes, float] | None:
        """(the PNG, seconds it has left), or None when unknown or expired."""
        with self._lock:
            now = time.monotonic()
            self._drop(now)
            item = self._items.get(token)
            return None if item is None else (item[1], item[0] - now)

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, now: float) -> None:
        """Items are in insertion order, so expiry order too: drop from the front."""
        while self._items:
            token, (expires, png) = next(iter(self._items.items()))
            if expires > now and self._bytes <= self.max_bytes:
                break
            del self._items[token]
            self._bytes -= len(png)
