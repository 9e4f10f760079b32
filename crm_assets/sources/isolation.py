"""One resource's own failure leaves it out of a sync: the others load without it.

Shared by the Dagster step (assets.py) and the sync without Dagster (`python -m crm_assets.sources`).
dlt stops the whole extract at one resource's error and loads nothing of it, so the sync is run
again without that resource, from the same cursors, until the rest load or an error that concerns
every resource comes up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, TypeVar

from dlt.extract.exceptions import ResourceExtractionError

from .crm import CrmApiBehaviourError, CrmApiError, CrmError, CrmIncompleteReadError, find_crm_error

T = TypeVar("T")


def isolatable(exc: BaseException) -> Optional[tuple[str, CrmError]]:
    """The resource a failed run failed on and why, when that failure is the resource's own and the
    others can be loaded without it: an HTTP error of its path other than 401 (403 on a resource the
    key may not read, a 500 or timeout that outlasted the retries), or an API that did not do what
    its requests asked. None for what concerns every resource: a wrong key (401), a base URL that
    does not resolve or answer, the configuration, the warehouse."""
    error = find_crm_error(exc)
    if isinstance(error, CrmApiError):
        if error.status == 401 or error.unresolvable or error.unreachable:
            return None
        return error.resource, error
    if isinstance(error, CrmApiBehaviourError):
        return error.resource, error
    if isinstance(error, CrmIncompleteReadError):
        # its message names the resource; dlt's extraction error carries the name itself
        current: Optional[BaseException] = exc
        while current is not None:
            if isinstance(current, ResourceExtractionError):
                return current.pipe_name, error
            current = current.__cause__ or current.__context__
    return None


def load_leaving_out_failures(
    names: Sequence[str],
    load: Callable[[list[str]], T],
    left_out: Callable[[str, CrmError, list[str]], None],
) -> tuple[Optional[T], dict[str, CrmError]]:
    """`load(resources)` for `names`, then again without each resource that failed on its own
    (`isolatable`), telling `left_out(resource, error, the rest)`. Returns what the last `load`
    returned (None when every resource failed) and the errors by resource; any other error is raised."""
    failed: dict[str, CrmError] = {}
    remaining = list(names)
    while remaining:
        try:
            return load(list(remaining)), failed
        except Exception as exc:
            isolated = isolatable(exc)
            if isolated is None or isolated[0] not in remaining:
                raise
            resource, error = isolated
            failed[resource] = error
            remaining.remove(resource)
            left_out(resource, error, remaining)
    return None, failed
