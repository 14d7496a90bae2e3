"""Who is calling: API keys sent as `Authorization: Bearer <key>`, known to the service only by their sha256.

Keys come from `SDXL_API_KEYS` (a JSON list) and/or `SDXL_API_KEYS_FILE` (the same list in a file); see
`python -m cli.apikeys`. A key's generations belong to `key:<name>`; other keys get 404 for them. With no keys
configured every caller is the same open principal, which `check_open_mode` refuses on a non-loopback host.
"""

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import Problem
from app.settings import Settings

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
BEARER_CHALLENGE = 'Bearer realm="sdxl"'

# auto_error=False: open mode needs no header, and authenticate answers its own problem+json 401s
BEARER = HTTPBearer(
    scheme_name="apiKey",
    description="`Authorization: Bearer <key>` with a key from `python -m cli.apikeys create NAME`. A deployment "
    "with no keys configured (loopback only, or `SDXL_ALLOW_OPEN`) accepts requests without it.",
    auto_error=False,
)


class ConfigError(RuntimeError):
    """A setting that makes the service unsafe or unusable: raised at start, never at request time."""


@dataclass(frozen=True)
class Limits:
    rate_per_minute: int  # token-bucket refill; 0 = no rate limit
    burst: int  # bucket size: requests allowed at once
    max_queued: int  # non-final generations at once
    max_priority: int  # highest `priority` this key may ask for
    daily_image_quota: int = 0  # images admitted per UTC day (common/usage.py); 0 = no quota


DEFAULT_LIMITS = Limits(rate_per_minute=60000, burst=1000, max_queued=10000, max_priority=2)


@dataclass(frozen=True)
class Principal:
    owner: str  # generations belong to this id; other owners get 404
    name: str
    limits: Limits = DEFAULT_LIMITS


OPEN = Principal(owner="open", name="open")


class KeySpec(BaseModel):
    """One entry of SDXL_API_KEYS / SDXL_API_KEYS_FILE. Absent limits take the SDXL_DEFAULT_* settings."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME_PATTERN)
    sha256: str = Field(..., description="hex sha256 of the key (`python -m cli.apikeys hash KEY`)")
    rate_per_minute: int | None = Field(None, ge=0)
    burst: int | None = Field(None, ge=1)
    max_queued: int | None = Field(None, ge=1)
    max_priority: int | None = Field(None, ge=0, le=2)
    daily_image_quota: int | None = Field(None, ge=0, description="images per UTC day; 0 = none")

    @field_validator("sha256")
    @classmethod
    def _hex64(cls, v: str) -> str:
        v = v.strip().lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("must be 64 hex characters (the sha256 of the key, not the key itself)")
        return v


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_for(name: str) -> str:
    return f"key:{name}"


def default_limits(settings: Settings) -> Limits:
    return Limits(
        settings.default_rate_per_minute,
        settings.default_burst,
        settings.default_max_queued,
        settings.default_max_priority,
        settings.default_daily_image_quota,
    )


def parse_specs(text: str, source: str) -> list[KeySpec]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source} is not valid JSON ({exc.msg} at char {exc.pos}); expected a list of "
            '{"name": ..., "sha256": ...} objects'
        ) from exc
    if not isinstance(raw, list):
        raise ConfigError(f"{source} must be a JSON list of key objects, not {type(raw).__name__}")
    specs = []
    for i, item in enumerate(raw):
        try:
            specs.append(KeySpec.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            raise ConfigError(f"{source}[{i}].{where}: {first['msg']}") from exc
    return specs


class KeyRing:
    """The configured keys as (sha256 digest, principal); empty means open mode."""

    def __init__(self, entries: list[tuple[bytes, Principal]], open_principal: Principal) -> None:
        self.entries = entries
        self.open_principal = open_principal

    @property
    def open(self) -> bool:
        return not self.entries

    @classmethod
    def from_settings(cls, settings: Settings) -> "KeyRing":
        specs: list[KeySpec] = []
        if settings.api_keys and settings.api_keys.strip():
            specs += parse_specs(settings.api_keys, "SDXL_API_KEYS")
        if settings.api_keys_file:
            path = Path(settings.api_keys_file)
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(f"SDXL_API_KEYS_FILE={str(path)!r} cannot be read: {exc.strerror}") from exc
            specs += parse_specs(text, f"SDXL_API_KEYS_FILE ({path})")
        base = default_limits(settings)
        names: set[str] = set()
        digests: set[str] = set()
        entries: list[tuple[bytes, Principal]] = []
        for spec in specs:
            if spec.name in names:
                raise ConfigError(f"API key name {spec.name!r} is configured twice")
            if spec.sha256 in digests:
                raise ConfigError(f"API key {spec.name!r} has the same sha256 as another key")
            names.add(spec.name)
            digests.add(spec.sha256)
            limits = Limits(
                rate_per_minute=base.rate_per_minute if spec.rate_per_minute is None else spec.rate_per_minute,
                burst=spec.burst or base.burst,
                max_queued=spec.max_queued or base.max_queued,
                max_priority=base.max_priority if spec.max_priority is None else spec.max_priority,
                daily_image_quota=base.daily_image_quota if spec.daily_image_quota is None
                else spec.daily_image_quota,
            )
            entries.append((bytes.fromhex(spec.sha256), Principal(owner_for(spec.name), spec.name, limits)))
        return cls(entries, Principal(OPEN.owner, OPEN.name, base))

    def lookup(self, presented: str) -> Principal | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for stored, principal in self.entries:  # no early exit: the time spent does not depend on which key
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_open_mode(settings: Settings, keyring: KeyRing) -> None:
    """Refuse to serve anyone-who-can-connect on a reachable address unless the operator says so."""
    if keyring.open and not is_loopback(settings.host) and not settings.allow_open:
        raise ConfigError(
            f"refusing to start: no API keys are configured and SDXL_HOST={settings.host!r} is not a loopback "
            "address, so anyone who can reach it could use the service. Configure SDXL_API_KEYS or "
            "SDXL_API_KEYS_FILE (see `python -m cli.apikeys create NAME`), listen on 127.0.0.1, or set "
            "SDXL_ALLOW_OPEN=true to run open on purpose."
        )


def unauthorized(detail: str, error: str | None = None) -> Problem:
    challenge = BEARER_CHALLENGE + (f', error="{error}"' if error else "")
    return Problem(401, detail, headers={"WWW-Authenticate": challenge})


def bearer_token(header: str | None) -> str:
    if header is None:
        raise unauthorized("this API needs a key: send `Authorization: Bearer <key>`")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("the Authorization header must be `Bearer <key>`", "invalid_request")
    return token


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> Principal:
    """The caller's principal, charged one request against its rate limit (429 when over)."""
    keyring: KeyRing | None = getattr(request.app.state, "keyring", None)
    if keyring is None or keyring.open:
        principal = keyring.open_principal if keyring else OPEN
    else:
        # HTTPBearer gives None for a missing or malformed header; bearer_token says which, as a 401
        token = credentials.credentials if credentials else bearer_token(request.headers.get("authorization"))
        found = keyring.lookup(token)
        if found is None:
            raise unauthorized("the API key is not valid", "invalid_token")
        principal = found
    service: Any = getattr(request.app.state, "service", None)
    limiter = getattr(service, "limiter", None)
    if limiter is not None:
        await limiter.hit(request, principal)
    return principal
