"""API keys -> tenants: the gateway's keys file, and the constant-time lookup of a presented key.

The keys file (`LLM_GATEWAY_KEYS_FILE`, docs/openai.md) lists one entry per API key, as a JSON array,
an object `{"keys": [...]}`, or JSON lines (one object a line; blank lines and lines starting with
`#` skipped):

    {"key_sha256": "<64 hex>", "tenant": "alice", "redis_user": "alice", "redis_password": "alice-pw"}
    {"key_sha256": "<64 hex>", "tenant": "bob", "redis_url": "redis://bob:bob-pw@redis:6379/0", "name": "ci"}

- `key_sha256`: the SHA-256 of the key's UTF-8 bytes, in hex; the key itself is never stored;
- `tenant`: the tenant whose namespace `<prefix>:t:{<tenant>}` the key's requests go to (1-64 of
  `A-Za-z0-9_-`);
- the Redis credentials of that tenant's ACL user (`python -m worker.acl producer --tenant ...`):
  `redis_user` and `redis_password` (the gateway's `REDIS_URL` with that user and password), or a
  whole `redis_url`;
- `name` (optional): a label for the key in logs.

Several keys may map to one tenant (key rotation, one key per backend): they must name the same
credentials. A presented key is hashed and compared with every entry's hash in constant time
(`hmac.compare_digest`, no early exit), so the time taken does not depend on which entry matches.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from producer.settings import check_redis_url
from producer.wire.keys import check_tenant

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"key_sha256", "tenant", "redis_user", "redis_password", "redis_url", "name"}
MAX_KEYS_FILE_BYTES = 16 * 1024 * 1024


class KeysFileError(ValueError):
    """The keys file cannot be read, or one of its entries is malformed (the message says which)."""


def hash_key(key: str) -> str:
    """What the keys file stores of a key: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode()).hexdigest()


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` with its user and password replaced (host, port, db and scheme kept)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class TenantCredentials:
    """How the gateway reaches Redis as one tenant: either a user and password (on the gateway's
    REDIS_URL) or a whole URL."""

    tenant: str
    redis_user: str | None = None
    redis_password: str | None = None
    redis_url: str | None = None

    def url(self, base_url: str) -> str:
        """The Redis URL of the tenant's ACL user (`base_url`: the gateway's REDIS_URL)."""
        if self.redis_url is not None:
            return self.redis_url
        assert self.redis_user is not None and self.redis_password is not None
        return with_credentials(base_url, self.redis_user, self.redis_password)


@dataclass(frozen=True)
class ApiKey:
    """One entry of the keys file."""

    sha256: bytes  # the digest, raw
    credentials: TenantCredentials
    name: str | None = None

    @property
    def tenant(self) -> str:
        return self.credentials.tenant


def _entry(raw: Any, where: str) -> ApiKey:
    if not isinstance(raw, dict):
        raise KeysFileError(f"{where}: an entry must be a JSON object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise KeysFileError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_FIELDS))})")
    digest = raw.get("key_sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
        raise KeysFileError(f"{where}: key_sha256 must be the 64 hex digits of the key's SHA-256")
    tenant = raw.get("tenant")
    try:
        tenant = check_tenant(tenant if isinstance(tenant, str) else "")
    except ValueError:
        raise KeysFileError(f"{where}: tenant must be 1-64 characters of A-Za-z0-9_-") from None
    user, password, url = raw.get("redis_user"), raw.get("redis_password"), raw.get("redis_url")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise KeysFileError(f"{where}: name must be a string")
    if url is not None:
        if user is not None or password is not None:
            raise KeysFileError(f"{where}: give either redis_url or redis_user and redis_password, not both")
        try:
            check_redis_url(url if isinstance(url, str) else "")
        except ValueError as exc:
            raise KeysFileError(f"{where}: redis_url must be {exc}") from None
        creds = TenantCredentials(tenant, redis_url=url)
    else:
        if not (isinstance(user, str) and user and isinstance(password, str) and password):
            raise KeysFileError(f"{where}: redis_user and redis_password (strings) or redis_url are required")
        creds = TenantCredentials(tenant, redis_user=user, redis_password=password)
    return ApiKey(bytes.fromhex(digest.lower()), creds, name)


def _raw_entries(text: str) -> list[tuple[Any, str]]:
    """The file's entries with where each is: a JSON array or `{"keys": [...]}`, else JSON lines."""
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, list):
        return [(e, f"entry {i}") for i, e in enumerate(whole)]
    if isinstance(whole, dict) and "keys" in whole:
        keys = whole["keys"]
        if not isinstance(keys, list):
            raise KeysFileError('"keys" must be a list of entries')
        return [(e, f"entry {i}") for i, e in enumerate(keys)]
    out: list[tuple[Any, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append((json.loads(line), f"line {number}"))
        except (ValueError, RecursionError):
            raise KeysFileError(f"line {number}: not a JSON object") from None
    return out


class KeyRing:
    """The keys of a keys file; `lookup` finds the entry of a presented key in constant time."""

    def __init__(self, keys: list[ApiKey]):
        if not keys:
            raise KeysFileError("the keys file lists no key")
        seen: dict[bytes, int] = {}
        tenants: dict[str, TenantCredentials] = {}
        for i, key in enumerate(keys):
            if key.sha256 in seen:
                raise KeysFileError(f"entries {seen[key.sha256]} and {i} have the same key_sha256")
            seen[key.sha256] = i
            known = tenants.setdefault(key.tenant, key.credentials)
            if known != key.credentials:
                raise KeysFileError(f"tenant {key.tenant!r} is given different Redis credentials")
        self.keys = keys
        self.tenants = tenants

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            if path.stat().st_size > MAX_KEYS_FILE_BYTES:
                raise KeysFileError(f"{path} is larger than {MAX_KEYS_FILE_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysFileError(f"cannot read {path}: {exc}") from None
        return cls([_entry(raw, where) for raw, where in _raw_entries(text)])

    def lookup(self, presented: str) -> ApiKey | None:
        """The entry of `presented`, or None; every entry is compared, whichever matches."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found
