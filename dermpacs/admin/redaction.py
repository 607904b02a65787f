"""The effective configuration as an admin may see it: every secret masked.

A value is a secret when its key names one (password, token, secret, key) or when it is a URL
that carries credentials (``postgresql://user:pass@host/db``, ``redis://:pass@host``): the
credentials are masked and the rest of the URL is kept, since where a service lives is what an
admin needs to see.
"""

from __future__ import annotations

import re
from typing import Any

from dermpacs.config import Settings

MASK = "********"

# Key names whose values are secrets, matched as words of snake_case names.
_SECRET_WORDS = frozenset({"password", "passwd", "token", "secret", "key", "credentials"})
# scheme://userinfo@ : userinfo is everything up to the last "@" before the host part.
_URL_WITH_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")


def is_secret_key(key: str) -> bool:
    """Whether a configuration key names a secret (``password``, ``admin_token``...)."""
    words = re.split(r"[_\-.\s]+", key.lower())
    return any(word in _SECRET_WORDS for word in words)


def mask_url_credentials(text: str) -> str:
    """Mask the credentials of every URL in ``text``; the user name stays when there is a
    password beside it, a lone user part (often a token) is masked whole."""

    def replace(match: re.Match[str]) -> str:
        userinfo = match.group("userinfo")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            return f"{match.group('scheme')}{user}:{MASK}@"
        return f"{match.group('scheme')}{MASK}@"

    return _URL_WITH_USERINFO.sub(replace, text)


def mask_secrets(value: Any, *, key: str = "") -> Any:
    """A copy of a JSON-like tree with secret values replaced by :data:`MASK`.

    Parameters
    ----------
    value
        Mappings, lists and scalars, as ``Settings.model_dump(mode="json")`` gives.
    key
        The key ``value`` was found under (secrets are known by their key).
    """
    if isinstance(value, dict):
        return {k: mask_secrets(v, key=str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(v, key=key) for v in value]
    if key and is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return mask_url_credentials(value)
    return value


def effective_configuration(settings: Settings) -> dict[str, Any]:
    """The settings in force (file, then environment overrides), with secrets masked."""
    return dict(mask_secrets(settings.model_dump(mode="json")))
