"""Which resources are synced, and how: the five built in, changed and extended by configuration.

    SOURCES__CRM__PRIMARY_KEY   or  [sources.crm] primary_key            the key field of every
                                                                         resource (default `id`)
    SOURCES__CRM__RESOURCES     or  [sources.crm.resources.<name>]       per resource: path,
                                                                         data_selector, primary_key,
                                                                         page_size, epoch_fields,
                                                                         not_epoch_fields,
                                                                         result_window, description
    SOURCES__CRM__RESULT_WINDOW or  [sources.crm] result_window          the API's result window
                                                                         (default 10,000), for every
                                                                         resource that sets none

A configured resource overrides a built-in one field by field, or adds one. `build_endpoints()`
checks everything and says which setting is wrong; the source and the Dagster definitions both
read the same settings through dlt's providers (`configured_endpoints()`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional

import dlt
from dlt.common.configuration.exceptions import ConfigValueCannotBeCoercedException
from dlt.common.configuration.inject import with_config

from .errors import CrmConfigurationError
from .keyset import MIN_PAGE_SIZE
from .settings import MAX_PAGE_SIZE, RESULT_WINDOW

DEFAULT_PRIMARY_KEY = "id"
DEFAULT_PAGE_SIZE = MAX_PAGE_SIZE
# Every record has these two, in Unix epoch seconds (docs/api-contract.md); they land as timestamps.
EPOCH_FIELDS = ("date_created", "date_updated")
# A field named so whose values are integers is epoch seconds too (the real API family has many:
# date_start, date_end, date_due, ...): it lands as a timestamp, whenever it first appears
# (epoch_dates.py), unless the resource lists it in `not_epoch_fields`.
EPOCH_PREFIX = "date_"


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    data_selector: str = "results"
    primary_key: str = DEFAULT_PRIMARY_KEY
    # The API's documented maximum. An account whose cap is lower still reads completely: the
    # read never trusts a page's length.
    page_size: int = DEFAULT_PAGE_SIZE
    # fields besides EPOCH_FIELDS that hold Unix epoch seconds and land as UTC timestamps
    epoch_fields: tuple[str, ...] = ()
    description: str = ""
    # integer `date_*` fields (or epoch_fields of a built-in resource) that stay integers
    not_epoch_fields: tuple[str, ...] = ()
    # The most records an offset reaches (`from + size`), and where `count` stops being exact:
    # the contract's 10,000, unless the API's search index is set otherwise.
    result_window: int = RESULT_WINDOW

    @property
    def read_size(self) -> int:
        """The page size asked for: `page_size`, within the result window."""
        return min(self.page_size, self.result_window)

    @property
    def timestamp_fields(self) -> tuple[str, ...]:
        """The fields declared as epoch seconds: typed as timestamps from the first load."""
        return EPOCH_FIELDS + tuple(
            f for f in self.epoch_fields if f not in EPOCH_FIELDS and f not in self.not_epoch_fields
        )

    def is_epoch_field(self, name: str) -> bool:
        """A top-level field whose integer values land as UTC timestamps: a declared one, or one
        named `date_*` that the resource does not list in `not_epoch_fields`."""
        return name in self.timestamp_fields or (
            name.startswith(EPOCH_PREFIX) and "__" not in name and name not in self.not_epoch_fields
        )


BUILT_IN: tuple[Endpoint, ...] = (
    Endpoint("jobs", "/v1/jobs", description="Jobs (projects) with their location, budget and related records."),
    Endpoint("contacts", "/v1/contacts", description="Contacts: people and companies, with their primary email/phone."),
    Endpoint("tasks", "/v1/tasks", epoch_fields=("due_date",),
             description="Tasks attached to jobs, with due dates, assignees and completion."),
    Endpoint("activities", "/v1/activities", "activity", description="Activity feed entries (notes, calls, emails) on jobs and contacts."),
    Endpoint("files", "/v1/files", "files", description="File metadata (name, size, type) attached to jobs and contacts."),
)

RESOURCES_SETTING = "SOURCES__CRM__RESOURCES (or [sources.crm.resources.<name>] in .dlt/config.toml)"
PRIMARY_KEY_SETTING = "SOURCES__CRM__PRIMARY_KEY (or primary_key under [sources.crm])"
RESULT_WINDOW_SETTING = "SOURCES__CRM__RESULT_WINDOW (or result_window under [sources.crm])"
_SETTINGS = {"resources": RESOURCES_SETTING, "primary_key": PRIMARY_KEY_SETTING, "result_window": RESULT_WINDOW_SETTING}
RESOURCE_FIELDS = ("path", "data_selector", "primary_key", "page_size", "epoch_fields", "not_epoch_fields",
                   "result_window", "description")

# Table names as dlt keeps them unchanged (snake_case), short enough for PostgreSQL's 63-character
# identifiers with what dlt appends to them.
_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
# Field names that are their own column names under dlt's snake_case naming, so a key or an epoch
# field names the same thing in a record, a column hint and the checks' SQL.
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def build_endpoints(
    primary_key: Optional[str] = DEFAULT_PRIMARY_KEY,
    resources: Optional[Mapping[str, Any]] = None,
    page_sizes: Optional[Mapping[str, Any]] = None,
    result_window: Optional[int] = None,
) -> tuple[Endpoint, ...]:
    """The built-in endpoints with `primary_key`, the `resources` settings, the `page_sizes`
    shorthand ({"tasks": 100}) and the `result_window` of every resource that sets none applied,
    checked."""
    key = DEFAULT_PRIMARY_KEY if primary_key is None else primary_key
    if not isinstance(key, str) or not _FIELD_NAME.fullmatch(key):
        raise CrmConfigurationError(
            f"primary_key must be a field name such as 'id' or 'jnid', got {key!r}: set {PRIMARY_KEY_SETTING}"
        )
    if resources is None:
        resources = {}
    if not isinstance(resources, Mapping):
        raise CrmConfigurationError(
            'resources must map resource names to settings, e.g. {"invoices": {"path": "/v1/invoices"}}, '
            f"got {type(resources).__name__}: set {RESOURCES_SETTING}"
        )
    window = RESULT_WINDOW if result_window is None else result_window
    _check_window(RESULT_WINDOW_SETTING, window)
    endpoints = {endpoint.name: replace(endpoint, primary_key=key, result_window=window) for endpoint in BUILT_IN}
    for name, fields in resources.items():
        endpoints[name] = _configured(name, fields, endpoints.get(name), key, window)
    for name, size in (page_sizes or {}).items():
        if name not in endpoints:
            raise CrmConfigurationError(
                f"SOURCES__CRM__PAGE_SIZES names an unknown resource {name!r}; known: {', '.join(endpoints)}"
            )
        endpoints[name] = replace(endpoints[name], page_size=size)
        _check(f"SOURCES__CRM__PAGE_SIZES[{name!r}]", endpoints[name])
    by_path: dict[str, str] = {}
    for endpoint in endpoints.values():
        other = by_path.setdefault(endpoint.path.rstrip("/"), endpoint.name)
        if other != endpoint.name:  # the session tells resources apart by their path
            raise CrmConfigurationError(
                f"resources {other!r} and {endpoint.name!r} have the same path {endpoint.path!r}: "
                f"set {RESOURCES_SETTING}"
            )
    return tuple(endpoints.values())


def _configured(name: Any, fields: Any, built_in: Optional[Endpoint], primary_key: str, window: int) -> Endpoint:
    where = f"resource {name!r} in {RESOURCES_SETTING}"
    if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name) or "__" in name:
        raise CrmConfigurationError(
            f"{where}: a resource name must be a table name: lower-case letters, digits and single "
            "underscores, starting with a letter, at most 40 characters"
        )
    if not isinstance(fields, Mapping):
        raise CrmConfigurationError(f"{where}: expected a table of settings, got {fields!r}")
    unknown = sorted(set(fields) - set(RESOURCE_FIELDS))
    if unknown:
        raise CrmConfigurationError(
            f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(RESOURCE_FIELDS)}"
        )
    if built_in is None and "path" not in fields:
        raise CrmConfigurationError(f"{where}: a new resource needs a path, e.g. \"/v1/{name}\"")
    endpoint = built_in or Endpoint(name, "", primary_key=primary_key, result_window=window)
    changes = dict(fields)
    for setting in ("epoch_fields", "not_epoch_fields"):
        if setting in changes:
            changes[setting] = _field_names(where, setting, changes[setting])
    both = set(changes.get("epoch_fields", ())) & set(changes.get("not_epoch_fields", ()))
    kept = set(changes.get("not_epoch_fields", ())) & set(EPOCH_FIELDS)
    if both or kept:
        raise CrmConfigurationError(
            f"{where}: not_epoch_fields holds {', '.join(map(repr, sorted(both | kept)))}, which "
            + ("epoch_fields also holds" if both else "every record has as epoch seconds (the cursor)")
        )
    endpoint = replace(endpoint, **changes)
    _check(where, endpoint)
    return endpoint


def _field_names(where: str, setting: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise CrmConfigurationError(f"{where}: {setting} must be a list of field names, got {value!r}")
    for field in value:
        if not isinstance(field, str) or not _FIELD_NAME.fullmatch(field):
            raise CrmConfigurationError(f"{where}: {setting} holds {field!r}, which is not a field name")
    return tuple(value)


def _check(where: str, endpoint: Endpoint) -> None:
    path = endpoint.path
    if not isinstance(path, str) or not path.startswith("/") or any(c.isspace() or c in "?#{}" for c in path):
        raise CrmConfigurationError(
            f"{where}: path must be the endpoint's URL path such as \"/v1/invoices\", got {path!r}"
        )
    for setting in ("data_selector", "primary_key", "description"):
        value = getattr(endpoint, setting)
        if not isinstance(value, str) or (setting != "description" and not value):
            raise CrmConfigurationError(f"{where}: {setting} must be a non-empty string, got {value!r}")
    if not _FIELD_NAME.fullmatch(endpoint.primary_key):
        raise CrmConfigurationError(f"{where}: primary_key {endpoint.primary_key!r} is not a field name")
    size = endpoint.page_size
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_PAGE_SIZE <= size <= MAX_PAGE_SIZE:
        raise CrmConfigurationError(
            f"{where}: page_size must be a whole number from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, got {size!r}"
        )
    _check_window(f"{where}: result_window", endpoint.result_window)


def _check_window(where: str, window: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < MIN_PAGE_SIZE:
        raise CrmConfigurationError(
            f"{where} must be the API's result window, a whole number of records of at least "
            f"{MIN_PAGE_SIZE} (10000 as documented), got {window!r}"
        )


@with_config(sections=("sources", "crm"))
def _resolved(
    primary_key: Optional[str] = dlt.config.value,
    resources: Optional[dict[str, Any]] = dlt.config.value,
    page_sizes: Optional[dict[str, Any]] = dlt.config.value,
    result_window: Optional[int] = dlt.config.value,
) -> tuple[Endpoint, ...]:
    return build_endpoints(primary_key, resources, page_sizes, result_window)


def configured_endpoints() -> tuple[Endpoint, ...]:
    """The endpoints as configured through dlt's providers (env, .dlt/config.toml), checked."""
    try:
        return _resolved()
    except ConfigValueCannotBeCoercedException as exc:
        raise CrmConfigurationError(
            f"The {exc.field_name} setting is not valid ({exc.hint.__name__ if isinstance(exc.hint, type) else exc.hint} "
            f"expected; JSON in an environment variable): set "
            f"{_SETTINGS.get(exc.field_name, 'SOURCES__CRM__' + str(exc.field_name).upper())}"
        ) from None
