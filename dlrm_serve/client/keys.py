"""TorchServe's tokens: where the client finds them and when they expire.

TorchServe (0.11.1 and later) writes ``key_file.json`` into its start folder::

    {"management": {"key": ..., "expiration time": "2024-...Z"},
     "inference":  {"key": ..., "expiration time": ...},
     "API":        {"key": ...}}

The inference and management keys expire (``token_expiration_min``, 60 by
default); the API key does not, and ``GET {management}/token?type=...`` with
it issues a new key.  TorchServe 0.12.0 answers that call with an empty body
and writes the new key only to ``key_file.json``, so a client can renew its
keys only when it can read that file.

Where keys come from (first found wins, per key):

1. keys passed in code (``Keys(inference=..., ...)``);
2. ``DLRM_SERVE_INFERENCE_KEY``, ``DLRM_SERVE_MANAGEMENT_KEY``,
   ``DLRM_SERVE_API_KEY``;
3. the key file: the path passed in, else ``DLRM_SERVE_KEY_FILE``, else
   ``./key_file.json`` when it exists.

No key at all means the server runs without token authorization
(``disable_token_authorization=true``); requests then carry no token.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from dlrm_serve.errors import AuthError, UsageError

__all__ = ["KINDS", "ENV_KEYS", "ENV_KEY_FILE", "RENEW_FRACTION", "Token", "Keys", "parse_expiration", "read_key_file", "TokenRenewal", "key_in_answer"]

KINDS = ("inference", "management", "api")
ENV_KEYS = {
    "inference": "DLRM_SERVE_INFERENCE_KEY",
    "management": "DLRM_SERVE_MANAGEMENT_KEY",
    "api": "DLRM_SERVE_API_KEY",
}
ENV_KEY_FILE = "DLRM_SERVE_KEY_FILE"
_FILE_SECTIONS = {"inference": "inference", "management": "management", "api": "API"}


_READ_TRIES = 6  # a half-written key file is read again, for up to ~0.3 s

# Renew a key when a tenth of its lifetime is left (or the client's margin, if shorter).
RENEW_FRACTION = 0.1


@dataclass(frozen=True)
class Token:
    key: str
    expires: datetime | None = None  # None: does not expire, or not known
    # Seconds it had left when first seen: its lifetime, or less if it was
    # read late (then the margin is smaller, never larger, than a tenth of it).
    life_s: float | None = None

    def expiring(self, now: datetime, margin_s: float) -> bool:
        return self.expires is not None and (self.expires - now).total_seconds() <= margin_s

    def margin(self, max_margin_s: float) -> float:
        """How long before expiry to renew: ``max_margin_s`` or a tenth of the lifetime, the shorter."""
        if self.life_s is None:
            return max_margin_s
        return min(max_margin_s, RENEW_FRACTION * self.life_s)


def _seen(tok: Token, now: datetime | None = None) -> Token:
    """``tok`` with its lifetime as seen now."""
    if tok.expires is None or tok.life_s is not None:
        return tok
    now = now or datetime.now(timezone.utc)
    return Token(tok.key, tok.expires, max(0.0, (tok.expires - now).total_seconds()))


def parse_expiration(text: str | None) -> datetime | None:
    """TorchServe's ``expiration time`` (a Java ``Instant``, e.g. ``2024-11-29T10:14:03.123456789Z``)."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        return None  # an unknown format: rely on the server's refusal instead
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def read_key_file(path: str | os.PathLike) -> dict[str, Token]:
    """The tokens in a ``key_file.json``, keyed by kind (``inference``, ``management``, ``api``)."""
    for attempt in range(_READ_TRIES):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            break
        except OSError as e:
            raise AuthError(f"cannot read the key file {str(path)!r}: {e.strerror or e}") from None
        except ValueError:
            # TorchServe rewrites the file in place when it issues a key: read again.
            if attempt == _READ_TRIES - 1:
                raise AuthError(f"the key file {str(path)!r} is not JSON (is TorchServe still writing it?)") from None
            time.sleep(0.02 * (attempt + 1))
    if not isinstance(data, dict):
        raise AuthError(f"the key file {str(path)!r} is not a JSON object")
    out = {}
    for kind, section in _FILE_SECTIONS.items():
        entry = data.get(section)
        if isinstance(entry, dict) and isinstance(entry.get("key"), str) and entry["key"]:
            out[kind] = Token(entry["key"], parse_expiration(entry.get("expiration time")))
    return out


class Keys:
    """The tokens of one server, thread-safe; renewable from the key file.

    ``version`` grows whenever a key changes, so a caller can tell whether
    somebody else already renewed the key it was refused with.
    """

    def __init__(
        self,
        inference: str | None = None,
        management: str | None = None,
        api: str | None = None,
        *,
        key_file: str | os.PathLike | None = None,
    ):
        self._lock = threading.Lock()
        self._fixed = {k: Token(v) for k, v in (("inference", inference), ("management", management), ("api", api)) if v}
        self.key_file = Path(key_file) if key_file is not None else None
        self._from_file: dict[str, Token] = {}
        self.version = 0
        if self.key_file is not None:
            self._from_file = {k: _seen(t) for k, t in read_key_file(self.key_file).items()}

    @classmethod
    def discover(
        cls,
        key_file: str | os.PathLike | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> "Keys":
        """Keys from the environment and the key file (see the module doc for the order)."""
        env = os.environ if env is None else env
        values = {kind: env.get(var) or None for kind, var in ENV_KEYS.items()}
        path = key_file if key_file is not None else env.get(ENV_KEY_FILE) or None
        if path is None:
            default = Path(cwd or ".") / "key_file.json"
            path = default if default.is_file() else None
        elif not Path(path).is_file():
            raise AuthError(
                f"the key file {str(path)!r} does not exist; TorchServe writes key_file.json "
                "into the folder it was started from (and deletes it when it stops)"
            )
        return cls(**values, key_file=path)

    def token(self, kind: str) -> Token | None:
        if kind not in KINDS:
            raise UsageError(f"key kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            return self._fixed.get(kind) or self._from_file.get(kind)

    def get(self, kind: str) -> str | None:
        tok = self.token(kind)
        return tok.key if tok is not None else None

    @property
    def empty(self) -> bool:
        with self._lock:
            return not self._fixed and not self._from_file

    def expiring(self, kind: str, margin_s: float, now: datetime | None = None) -> bool:
        """Whether the key expires within ``margin_s`` seconds (False when not known)."""
        tok = self.token(kind)
        now = now or datetime.now(timezone.utc)
        return tok is not None and tok.expiring(now, margin_s)

    def due(self, kind: str, max_margin_s: float, now: datetime | None = None) -> bool:
        """Whether the key should be renewed now: it expires within its margin (:meth:`Token.margin`)."""
        tok = self.token(kind)
        if tok is None:
            return False
        now = now or datetime.now(timezone.utc)
        return tok.expiring(now, tok.margin(max_margin_s))

    def set(self, kind: str, key: str, expires: datetime | None = None) -> None:
        """Use ``key`` for ``kind`` from now on (e.g. a key the token API returned)."""
        with self._lock:
            self._fixed[kind] = _seen(Token(key, expires))
            self.version += 1

    def reload(self) -> bool:
        """Read the key file again, after the server refused a key; True when a key changed.

        A key from code or the environment that differs from the file's gives
        way to the file's: the file is what the server wrote last.
        """
        if self.key_file is None or not self.key_file.is_file():
            return False
        fresh = read_key_file(self.key_file)
        with self._lock:
            before = {k: self._fixed.get(k) or self._from_file.get(k) for k in KINDS}
            # A key already known keeps the lifetime measured when first seen.
            fresh = {
                k: old if (old := self._from_file.get(k)) is not None and (old.key, old.expires) == (t.key, t.expires) else _seen(t)
                for k, t in fresh.items()
            }
            self._from_file = fresh
            for kind, tok in fresh.items():
                fixed = self._fixed.get(kind)
                if fixed is not None and fixed.key != tok.key:
                    del self._fixed[kind]
            after = {k: self._fixed.get(k) or self._from_file.get(k) for k in KINDS}
            changed = after != before
            if changed:
                self.version += 1
            return changed

    def __repr__(self) -> str:  # never print the keys themselves
        kinds = [k for k in KINDS if self.token(k) is not None]
        return f"Keys({', '.join(kinds) or 'none'}, key_file={str(self.key_file) if self.key_file else None})"


def key_in_answer(answer: dict | None, kind: str) -> str | None:
    """A key in the token API's answer, should a TorchServe version send one."""
    if not isinstance(answer, dict):
        return None
    for section in (kind, kind.capitalize(), "API" if kind == "api" else None):
        entry = answer.get(section) if section else None
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            return entry["key"]
    key = answer.get("key")
    return key if isinstance(key, str) and key else None


class TokenRenewal:
    """Renewing a client's keys: before they expire, and once when the server
    refuses one.  Mixed into :class:`~dlrm_serve.client.Client`, which provides
    ``keys``, ``token_url``, ``token_margin_s``, ``_fetch_token``, ``_token_lock``
    and ``_count``.
    """

    def _renew(self, kind: str, refusal: AuthError | None = None) -> None:
        """Get a new ``kind`` key from the token API and take it up."""
        api = self.keys.get("api")
        why = f"{refusal.message}; " if refusal is not None else ""
        if api is None or self.token_url is None:
            missing = "the API key" if api is None else "the REST management URL (token_url)"
            raise AuthError(
                f"{why}the {kind} key was refused or has expired, and it cannot be renewed without {missing}; "
                "give the client the server's key_file.json (key_file= or DLRM_SERVE_KEY_FILE)",
                status=refusal.status if refusal is not None else None,
            )
        answer = self._fetch_token(self.token_url, api, kind)
        self._count("token_renewals")
        key = key_in_answer(answer, kind)
        if key is not None:
            self.keys.set(kind, key)
            return
        if not self.keys.reload():
            raise AuthError(
                f"{why}the server issued a new {kind} key but did not send it: TorchServe writes it only "
                "to key_file.json in its start folder; give the client that file (key_file= or "
                "DLRM_SERVE_KEY_FILE) to renew keys"
            )

    def _key(self, kind: str) -> str | None:
        """The ``kind`` key, renewed first when it expires within the margin."""
        if self.keys.due(kind, self.token_margin_s):
            version = self.keys.version
            with self._token_lock:
                # Another thread may have renewed it while this one waited.
                if self.keys.version == version and self.keys.due(kind, self.token_margin_s):
                    if not self.keys.reload() or self.keys.due(kind, self.token_margin_s):
                        self._renew(kind)
        return self.keys.get(kind)

    def _recover(self, kind: str, refused: str | None, version: int, refusal: AuthError) -> None:
        """After ``refused`` was rejected: take up a newer key, or renew it."""
        with self._token_lock:
            if self.keys.version != version and self.keys.get(kind) != refused:
                return  # renewed by another thread meanwhile
            if self.keys.reload() and self.keys.get(kind) != refused:
                return  # somebody renewed it on the server; the key file has it
            self._renew(kind, refusal)
