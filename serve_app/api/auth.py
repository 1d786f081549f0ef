"""API keys: `Authorization: Bearer <key>` on every /v1 route.

The service never stores raw keys. The operator configures *hashes*, one entry per key:

    name:sha256:<64 hex digits>

`name` (letters, digits, `_`, `.`, `-`; at most 64 characters; unique) identifies the key in
logs, metrics and rate limits; the raw key itself is never logged nor put into an error.
Entries come from a file (`keys_file`: one entry per line, `#` starts a comment, blank lines
are ignored) and/or an environment variable (`keys_env`: the same entries, separated by
newlines, commas or spaces). `python -m serve_app.api.keys new --name alice` creates a key
and prints its entry.

Why plain SHA-256 and no salt or slow KDF (scrypt, bcrypt, …): those protect *low-entropy
secrets* such as passwords, where an attacker who steals the hashes can try billions of
likely guesses. Keys made by `keys new` hold 256 random bits; recovering one from its SHA-256
means a preimage search over 2**256 candidates, which no amount of hardware makes feasible,
so salting (against precomputed tables) and key stretching (to slow down guessing) add
nothing. What they would add is cost on every request. The `keys hash` command refuses short
keys so that a weak, guessable key does not end up behind a fast hash. Because a check costs
one SHA-256 plus a few comparisons, no cache of verified keys is needed either (a cache would
only pay off for a slow KDF). The `sha256:` prefix versions the format, so a different scheme
can be added later without ambiguity.

Timing: the presented key is hashed, and its digest is compared with *every* stored digest
by `hmac.compare_digest` (fixed-length, constant-time), without stopping at a match. The time
taken therefore depends on the number of configured keys only, not on the presented key nor
on which stored key (if any) it matches.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import OpenAIError

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-emb-"
HASH_SCHEME = "sha256"
ANONYMOUS = "anonymous"  # the key name of every request while auth is disabled
MIN_KEY_LENGTH = 32  # `keys hash` refuses shorter keys (see above: the hash is fast)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_SEPARATORS = re.compile(r"[,\s]+")

# Indirection so that tests can count comparisons; always the constant-time comparison.
_compare_digest = hmac.compare_digest


class AuthConfigError(ValueError):
    """The key configuration is unusable: the service must not start."""


class AuthConfig(BaseModel):
    """`args.auth` of the app. Authentication is on unless `enabled: false` is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True, description="false opens every route to anyone who can reach the service (logged as a WARNING)."
    )
    keys_file: str | None = Field(
        default=None,
        description="Path (on the nodes running the Ingress) of a file of `name:sha256:<hex>` lines.",
    )
    keys_env: str | None = Field(
        default=None,
        description="Name of an environment variable holding `name:sha256:<hex>` entries "
        "(separated by newlines, commas or spaces).",
    )

    @model_validator(mode="after")
    def _has_a_source(self) -> AuthConfig:
        if self.enabled and not (self.keys_file or self.keys_env):
            raise ValueError(
                "auth is enabled but no API keys are configured: set auth.keys_file and/or auth.keys_env "
                "(entries `name:sha256:<hex>`, made by `python -m serve_app.api.keys new --name NAME`), "
                "or disable authentication explicitly with `auth: {enabled: false}`"
            )
        return self


def generate_key() -> str:
    """A fresh API key: the prefix plus 32 random bytes (256 bits), URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(raw_key: str) -> str:
    """The stored form of a key: `sha256:<hex>`."""
    return f"{HASH_SCHEME}:{_digest(raw_key).hex()}"


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _digest(raw_key: str) -> bytes:
    # surrogatepass: any str encodes, so a strange header can't raise here.
    return hashlib.sha256(raw_key.encode("utf-8", "surrogatepass")).digest()


def parse_entries(text: str, source: str) -> list[tuple[str, bytes]]:
    """`(name, digest)` pairs from `name:sha256:<hex>` entries.

    Errors name the source and line, never the offending text: a malformed entry may be a
    raw key pasted by mistake, and error messages end up in logs.
    """
    entries: list[tuple[str, bytes]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0]
        for item in _SEPARATORS.split(line.strip()):
            if not item:
                continue
            where = f"{source}, line {lineno}"
            name, sep, value = item.partition(":")
            if not sep or not valid_name(name):
                hint = " (it looks like a raw API key: store only its hash)" if item.startswith("sk-") else ""
                raise AuthConfigError(
                    f"{where}: malformed entry{hint}; expected `name:sha256:<64 hex digits>` where the name "
                    "has 1-64 letters, digits, '_', '.' or '-'"
                )
            scheme, sep, hexdigest = value.partition(":")
            hexdigest = hexdigest.lower()
            if scheme != HASH_SCHEME or not sep or not _HEX_DIGEST.fullmatch(hexdigest):
                hint = " (it looks like a raw API key: store only its hash)" if value.startswith("sk-") else ""
                raise AuthConfigError(
                    f"{where}: the entry for key '{name}' is not a hash of the form sha256:<64 hex digits>{hint}; "
                    "make one with `python -m serve_app.api.keys hash --name NAME`"
                )
            entries.append((name, bytes.fromhex(hexdigest)))
    return entries


def load_keys(config: AuthConfig, environ: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """Key name → SHA-256 digest, from the configured file and environment variable.

    Raises AuthConfigError for a missing or unreadable file, an unset variable, a malformed
    or duplicated entry, or (with auth enabled) no keys at all.
    """
    environ = os.environ if environ is None else environ
    entries: list[tuple[str, bytes]] = []
    if config.keys_file:
        path = Path(config.keys_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AuthConfigError(
                f"auth.keys_file {str(path)!r} does not exist (on host {socket.gethostname()})"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"auth.keys_file {str(path)!r} cannot be read: {type(exc).__name__}") from None
        entries += parse_entries(text, f"auth.keys_file {str(path)!r}")
    if config.keys_env:
        if config.keys_env not in environ:
            raise AuthConfigError(f"auth.keys_env: the environment variable {config.keys_env} is not set")
        entries += parse_entries(environ[config.keys_env], f"environment variable {config.keys_env}")

    keys: dict[str, bytes] = {}
    for name, digest in entries:
        if name in keys:
            raise AuthConfigError(f"API key name '{name}' is configured more than once")
        if any(_compare_digest(digest, other) for other in keys.values()):
            raise AuthConfigError(f"API key '{name}' has the same hash as another key: each key needs its own")
        keys[name] = digest
    if config.enabled and not keys:
        raise AuthConfigError("auth is enabled but the configured sources hold no API keys")
    return keys


class Authenticator:
    """Checks `Authorization` headers against the configured key hashes.

    Build one per Ingress replica (it reads the keys file once, at startup); `authenticate`
    is cheap (one SHA-256 and one constant-time comparison per configured key).
    """

    def __init__(self, config: AuthConfig, environ: Mapping[str, str] | None = None):
        self.enabled = config.enabled
        if not self.enabled:
            self._keys: tuple[tuple[str, bytes], ...] = ()
            logger.warning(
                "API KEY AUTHENTICATION IS DISABLED (auth.enabled: false): every /v1 route is open to anyone "
                "who can reach this service, and all requests share the rate limits of the key name '%s'.",
                ANONYMOUS,
            )
            return
        self._keys = tuple(load_keys(config, environ).items())
        logger.info("API key authentication enabled with %d keys: %s", len(self._keys), ", ".join(self.names))

    @property
    def names(self) -> list[str]:
        """The names `authenticate` can return."""
        return [name for name, _ in self._keys] if self.enabled else [ANONYMOUS]

    def authenticate(self, header_value: str | None) -> str:
        """The key name for an `Authorization` header value; 401 OpenAIError otherwise."""
        if not self.enabled:
            return ANONYMOUS
        raw_key = _bearer_token(header_value)
        digest = _digest(raw_key)
        found: str | None = None
        for name, stored in self._keys:  # every stored digest, no early exit
            if _compare_digest(digest, stored) and found is None:
                found = name
        if found is None:
            raise _unauthorized(
                "Incorrect API key provided. Check that you are using a key issued for this service."
            )
        return found


def _bearer_token(header_value: str | None) -> str:
    value = (header_value or "").strip()
    if not value:
        raise _unauthorized(
            "You didn't provide an API key. Provide your API key in an Authorization header using Bearer auth "
            "(i.e. Authorization: Bearer YOUR_KEY)."
        )
    scheme, _, credentials = value.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer":
        raise _unauthorized(
            "Malformed Authorization header: expected Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    if not credentials:
        raise _unauthorized(
            "You didn't provide an API key: the Authorization header holds 'Bearer' but no key "
            "(expected Authorization: Bearer YOUR_KEY)."
        )
    if any(ch.isspace() for ch in credentials):
        raise _unauthorized(
            "Malformed Authorization header: an API key contains no spaces (expected Authorization: Bearer YOUR_KEY)."
        )
    return credentials


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
