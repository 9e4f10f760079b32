"""The errors this source raises on purpose, each saying what went wrong and where."""

from __future__ import annotations

from typing import Optional


class CrmError(Exception):
    """Base class of the errors this source raises on purpose."""


class CrmConfigurationError(CrmError):
    """The source is not configured well enough to make a single request."""


class CrmApiError(CrmError):
    """The API answered something the source cannot use."""

    def __init__(
        self, message: str, *, resource: str, path: str, status: Optional[int] = None,
        unresolvable: bool = False,
    ):
        super().__init__(message)
        self.resource = resource
        self.path = path
        self.status = status
        self.unresolvable = unresolvable  # the base URL's host name does not resolve


class CrmIncompleteReadError(CrmError):
    """The API's answers do not show that every record of a resource was read."""


def find_crm_error(exc: BaseException) -> Optional[CrmError]:
    """The `CrmError` behind an exception that dlt (or Dagster) has wrapped, if there is one."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CrmError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
