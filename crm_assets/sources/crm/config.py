"""Resolving and checking the source's connection settings, through dlt's config providers."""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

import dlt
from dlt.common.configuration.inject import with_config

from .errors import CrmConfigurationError

_BASE_URL_HELP = "set SOURCES__CRM__BASE_URL (or base_url under [sources.crm] in .dlt/config.toml)"
_API_KEY_HELP = "set SOURCES__CRM__API_KEY (or API_KEY, or api_key in .dlt/secrets.toml)"


def check_settings(base_url: Optional[str], api_key: Optional[str]) -> str:
    """Fail before any request, saying what to set. Returns the normalised base URL."""
    if not base_url:
        raise CrmConfigurationError(f"No CRM API base URL is configured: {_BASE_URL_HELP}")
    url = str(base_url).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CrmConfigurationError(
            f"The CRM API base URL must be an http(s) URL like https://api.example.com, "
            f"got {url!r}: {_BASE_URL_HELP}"
        )
    try:
        parts.port  # noqa: B018 - raises on a port outside 0-65535 or not a number
    except ValueError:
        raise CrmConfigurationError(
            f"The CRM API base URL {url!r} has an invalid port: {_BASE_URL_HELP}"
        ) from None
    if any(character.isspace() for character in url) or parts.query or parts.fragment:
        raise CrmConfigurationError(
            f"The CRM API base URL {url!r} must have no spaces, query or fragment: {_BASE_URL_HELP}"
        )
    if not api_key:
        raise CrmConfigurationError(f"No CRM API key is configured: {_API_KEY_HELP}")
    return str(base_url).strip().rstrip("/")


@with_config(sections=("sources", "crm"))
def connection_settings(
    base_url: Optional[str] = dlt.config.value, api_key: Optional[str] = dlt.secrets.value
) -> tuple[str, str]:
    """(base URL, API key) from the same places the `crm` source reads them, checked."""
    root = check_settings(base_url, api_key)
    return root, str(api_key)
