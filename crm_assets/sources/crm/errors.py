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
        unresolvable: bool = False, unreachable: bool = False,
    ):
        super().__init__(message)
        self.resource = resource
        self.path = path
        self.status = status
        self.unresolvable = unresolvable  # the base URL's host name does not resolve
        # refused or unresolvable before the API answered anything: a wrong URL or an API that is
        # not running, which no retry mends
        self.unreachable = unreachable


class CrmIncompleteReadError(CrmError):
    """The API's answers do not show that every record of a resource was read."""


class CrmApiBehaviourError(CrmError):
    """The API did not do what a request asked (its order, its filter, the type of a field), so its
    answers cannot show that a read is complete. Says what the API did, on which request."""

    def __init__(self, resource: str, behaviour: str, page: str, example: str) -> None:
        self.resource, self.behaviour, self.page, self.example = resource, behaviour, page, example
        self.path: Optional[str] = None
        super().__init__(self._message())

    def at(self, path: str) -> "CrmApiBehaviourError":
        """The same error, naming the URL path of the request that showed it."""
        self.path = path
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        request = f"GET {self.path} ({self.page})" if self.path else f"the request for {self.page}"
        return (
            f"{self.resource}: the API {self.behaviour}: {request} returned {self.example}. "
            "The read relies on this to show that it missed nothing, so nothing was loaded from it"
        )


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
