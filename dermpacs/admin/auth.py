"""Who may use the admin page: HTTP basic auth for people, bearer tokens for scripts.

Both come from ``[admin]`` in the configuration, each with a role: ``read`` sees every page
and ``/metrics``; ``admin`` may also retry jobs and test destinations. Passwords are best
stored as PBKDF2 hashes made by :func:`hash_password` (``dermpacs admin --hash-password``);
plain text is accepted, and the start-up log says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import urlsplit

from dermpacs.config import AdminSettings

HASH_SCHEME = "pbkdf2_sha256"
HASH_ITERATIONS = 200_000
# Verified basic credentials are remembered this long, so that a page with a few requests
# does not pay for PBKDF2 on each.
_VERIFIED_TTL_SECONDS = 300.0


class Role(IntEnum):
    """What a principal may do; a higher role may do all that a lower one may."""

    READ = 1
    ADMIN = 2

    @classmethod
    def named(cls, name: str) -> Role:
        return {"read": cls.READ, "admin": cls.ADMIN}[name]


@dataclass(frozen=True)
class Principal:
    """Someone who was let in: their configured name, role and how they proved it."""

    name: str
    role: Role
    method: str  # "basic" or "bearer"

    @property
    def actor(self) -> str:
        """How the audit trail names them."""
        return f"admin:{self.name}"


class AuthenticationRequired(Exception):
    """No credentials, or wrong ones (answered with 401)."""


class Forbidden(Exception):
    """Known, but the role does not allow it, or a cross-site request (answered with 403)."""


def hash_password(password: str, *, iterations: int = HASH_ITERATIONS) -> str:
    """A PBKDF2-SHA256 hash for ``[[admin.users]] password``: ``pbkdf2_sha256$N$salt$hash``."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    encode = base64.urlsafe_b64encode
    return f"{HASH_SCHEME}${iterations}${encode(salt).decode()}${encode(digest).decode()}"


def is_hashed(stored: str) -> bool:
    """Whether a configured password is a hash (else it is plain text)."""
    return stored.startswith(HASH_SCHEME + "$")


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the configured one (hash or plain text)."""
    if not is_hashed(stored):
        return hmac.compare_digest(password.encode(), stored.encode())
    try:
        _, iterations, salt, digest = stored.split("$")
        expected = base64.urlsafe_b64decode(digest)
        actual = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.urlsafe_b64decode(salt), int(iterations)
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


class Authenticator:
    """Checks the ``Authorization`` header of a request against ``[admin]``.

    Parameters
    ----------
    settings
        The ``[admin]`` section.
    """

    def __init__(self, settings: AdminSettings) -> None:
        self._users = {u.name: u for u in settings.users}
        self._tokens = list(settings.tokens)
        self._verified: dict[bytes, float] = {}
        self._lock = threading.Lock()
        # Keys the cache of verified credentials; never leaves the process.
        self._cache_key = secrets.token_bytes(32)

    @property
    def configured(self) -> bool:
        """Whether anyone at all may sign in."""
        return bool(self._users or self._tokens)

    def plain_text_users(self) -> list[str]:
        """Users whose password is stored as plain text (worth a warning)."""
        return [name for name, user in self._users.items() if not is_hashed(user.password)]

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal the header proves, or :class:`AuthenticationRequired`."""
        if not authorization:
            raise AuthenticationRequired("sign in")
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "bearer" and credentials:
            for token in self._tokens:
                if hmac.compare_digest(credentials.encode(), token.token.encode()):
                    return Principal(token.name, Role.named(token.role), "bearer")
            raise AuthenticationRequired("unknown token")
        if scheme == "basic" and credentials:
            try:
                decoded = base64.b64decode(credentials, validate=True).decode()
            except (ValueError, binascii.Error) as exc:
                raise AuthenticationRequired("malformed basic credentials") from exc
            name, sep, password = decoded.partition(":")
            user = self._users.get(name)
            if sep and user is not None and self._check(name, password, user.password):
                return Principal(user.name, Role.named(user.role), "basic")
            raise AuthenticationRequired("wrong user name or password")
        raise AuthenticationRequired("unsupported authorization scheme")

    def _check(self, name: str, password: str, stored: str) -> bool:
        fingerprint = hmac.new(
            self._cache_key, f"{name}\0{password}\0{stored}".encode(), hashlib.sha256
        ).digest()
        now = time.monotonic()
        with self._lock:
            expires = self._verified.get(fingerprint)
            if expires is not None and expires > now:
                return True
        if not verify_password(password, stored):
            return False
        with self._lock:
            if len(self._verified) > 1024:
                self._verified = {k: v for k, v in self._verified.items() if v > now}
            self._verified[fingerprint] = now + _VERIFIED_TTL_SECONDS
        return True


def require_role(principal: Principal, role: Role) -> None:
    """Raise :class:`Forbidden` unless ``principal`` has at least ``role``."""
    if principal.role < role:
        raise Forbidden(f"{principal.name} has the {principal.role.name.lower()} role only")


def check_same_origin(method: str, headers: Mapping[str, str]) -> None:
    """Refuse a state-changing request that a browser sent from another site.

    A browser sends stored basic credentials with any form posted to this host, also from a
    foreign page (cross-site request forgery). Browsers mark such requests: ``Sec-Fetch-Site``
    says where it came from and ``Origin`` names the page's origin. Scripts send neither and
    are let through (they hold the credentials themselves).

    Raises
    ------
    Forbidden
        A POST from another site.
    """
    if method.upper() in {"GET", "HEAD", "OPTIONS"}:
        return
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in {"same-origin", "none"}:
        raise Forbidden(f"cross-site request refused (Sec-Fetch-Site: {fetch_site})")
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("x-forwarded-host") or headers.get("host") or ""
        if (
            origin == "null"
            or urlsplit(origin).netloc.lower() != host.split(",")[0].strip().lower()
        ):
            raise Forbidden(f"cross-site request refused (Origin: {origin})")
