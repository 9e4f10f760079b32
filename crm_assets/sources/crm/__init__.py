"""The `crm` dlt source: the five CRM resources through dlt's REST API source.

No Dagster here: the source runs on its own (`python -m crm_assets.sources`).
Configuration comes from dlt's own providers:

    SOURCES__CRM__BASE_URL   or  [sources.crm] base_url  in .dlt/config.toml
    SOURCES__CRM__API_KEY    or  [sources.crm] api_key   in .dlt/secrets.toml
                             (the seed spec's `API_KEY` / top-level `api_key` work too)

and which resources are read, with which key, from the settings in catalog.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import dlt
from dlt.sources import DltResource
from dlt.sources.rest_api import rest_api_resources

from .arrow_pages import ArrowPages
from .dlt_columns import ROOT_COLUMNS
from .dated_ahead import CapDatesAhead, RestoreDates
from .epoch_dates import EpochDates
from .field_names import FieldNames
from .catalog import BUILT_IN, Endpoint, build_endpoints, configured_endpoints
from .config import check_settings, connection_settings
from .counts import count_every_record, count_records
from .errors import (
    CrmApiBehaviourError,
    CrmApiError,
    CrmConfigurationError,
    CrmError,
    CrmIncompleteReadError,
    find_crm_error,
)
from .http import CrmSession
from .lists_as_json import ListsAsJson
from .paginator import UPDATED_SINCE_PARAM, KeysetPaginator
from .settings import BACKOFF_FACTOR, CURSOR_FIELD, MAX_IN_FLIGHT, MAX_RETRIES, REQUEST_TIMEOUT

__all__ = [
    "crm",
    "crm_resources",
    "crm_session",
    "BUILT_IN",
    "build_endpoints",
    "check_settings",
    "configured_endpoints",
    "connection_settings",
    "core_columns",
    "count_every_record",
    "count_records",
    "CrmApiBehaviourError",
    "CrmApiError",
    "CrmConfigurationError",
    "CrmError",
    "CrmIncompleteReadError",
    "Endpoint",
    "find_crm_error",
    "DELETED_AT_COLUMN",
    "HARD_DELETE_COLUMN",
]

# With `hard_delete=True`, records the API lists as `is_active: false` are removed from the
# tables through dlt's `hard_delete` column hint on this column.
HARD_DELETE_COLUMN = "_crm_deleted"
# Set by the audit (sources/audit.py) on a kept row whose record the API no longer lists at all (a
# hard delete at the source). Declared on every table; a load of the record leaves it NULL again.
DELETED_AT_COLUMN = "_crm_deleted_at"


def core_columns(endpoint: Endpoint) -> dict[str, dict[str, Any]]:
    """Columns every record has (api-contract.md), typed up front so the tables are right from the
    first load whatever the first page happens to contain. Epoch seconds land as UTC timestamps;
    the incremental cursor and the API's filters stay in epoch seconds (they read the records
    before they are typed)."""
    columns: dict[str, dict[str, Any]] = {
        endpoint.primary_key: {"data_type": "text", "nullable": False},
        "name": {"data_type": "text"},
        "created_by": {"data_type": "text"},
    }
    columns.update({field: {"data_type": "timestamp"} for field in endpoint.timestamp_fields})
    # several copies of a record in one load (pages overlap, a record edited mid-read): keep the newest
    columns[CURSOR_FIELD]["dedup_sort"] = "desc"
    columns["is_active"] = {"data_type": "bool"}
    return columns

def _mark_deleted(record: dict[str, Any]) -> dict[str, Any]:
    record[HARD_DELETE_COLUMN] = record.get("is_active") is False
    return record


# `schema_contract="freeze"`: a new column on an existing table fails the run (a new list field
# too: it is a column). New tables (the first load) are still created, and a field whose type
# varies still gets a variant column: the API contract says types vary between records.
FROZEN_SCHEMA_CONTRACT = {"tables": "evolve", "columns": "freeze", "data_type": "evolve"}


def _resource_config(
    endpoint: Endpoint,
    hard_delete: bool,
    schema_contract: Optional[str],
    *,
    incremental: bool = True,
    paginator: Optional[KeysetPaginator] = None,
    params: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """A resource of dlt's rest_api. The audit (audit.py) builds its own with the same hints and
    processing steps, without the incremental cursor, with its own paginator and query parameters."""
    columns = core_columns(endpoint)
    columns[DELETED_AT_COLUMN] = {"data_type": "timestamp", "nullable": True}
    resource: dict[str, Any] = {
        "name": endpoint.name,
        "primary_key": endpoint.primary_key,
        # delete-insert keeps one row per id even when a load holds the same id twice
        # (upsert on DuckDB would keep both)
        "write_disposition": {"disposition": "merge", "strategy": "delete-insert"},
        "endpoint": {
            "path": endpoint.path,
            "data_selector": endpoint.data_selector,
            "paginator": paginator or KeysetPaginator.of(endpoint),
            "params": dict(params or {}),
        },
    }
    if incremental:
        # The cursor is kept in dlt state, committed with the data. The paginator turns it into
        # an inclusive `date_updated >= cursor` filter. `primary_key: []` switches off dlt's
        # boundary de-duplication: a record edited again within the cursor's second must be
        # reloaded, not dropped as already seen.
        resource["endpoint"]["incremental"] = {
            "start_param": UPDATED_SINCE_PARAM,
            "cursor_path": CURSOR_FIELD,
            "initial_value": None,
            "primary_key": [],
            # records without a date_updated (reach.py reads them by date_created) land too
            "on_cursor_value_missing": "include",
        }
    if schema_contract == "freeze":
        resource["schema_contract"] = dict(FROZEN_SCHEMA_CONTRACT)
    if hard_delete:
        columns[HARD_DELETE_COLUMN] = {"data_type": "bool", "hard_delete": True}
        resource["processing_steps"] = [{"map": _mark_deleted}]
    resource["columns"] = columns
    resource[_ENDPOINT] = endpoint  # for crm_resources' own steps; not passed to rest_api
    return resource


# The key of a resource config (`_resource_config`) holding its Endpoint.
_ENDPOINT = "_crm_endpoint"


def crm_session(
    endpoints: Sequence[Endpoint],
    schema_contract: Optional[str] = None,
    max_retries: int = MAX_RETRIES,
    backoff_factor: float = BACKOFF_FACTOR,
    request_timeout: float = REQUEST_TIMEOUT,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> CrmSession:
    """The HTTP session of a source's resources, once the settings are checked."""
    if schema_contract not in (None, "evolve", "freeze"):
        raise CrmConfigurationError(
            f"schema_contract must be 'evolve' or 'freeze', got {schema_contract!r}: "
            "set SOURCES__CRM__SCHEMA_CONTRACT"
        )
    if max_retries < 0 or backoff_factor < 0 or request_timeout <= 0:
        raise CrmConfigurationError("max_retries and backoff_factor must be >= 0 and request_timeout > 0")
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise CrmConfigurationError(
            f"max_in_flight must be a whole number of requests, at least 1, got {max_in_flight!r}: "
            "set SOURCES__CRM__MAX_IN_FLIGHT"
        )
    return CrmSession(
        max_retries=max_retries,
        backoff_factor=backoff_factor,
        request_timeout=request_timeout,
        endpoints=endpoints,
        max_in_flight=max_in_flight,
    )


def crm_resources(
    root: str,
    api_key: Optional[str],
    session: CrmSession,
    resource_configs: list[dict[str, Any]],
    *,
    arrow_pages: bool,
    first_steps: Optional[dict[str, Any]] = None,
) -> list[DltResource]:
    """dlt resources of `resource_configs` (`_resource_config`), read in parallel, with the
    source's processing steps: `first_steps` (resource name -> a step, right after the read),
    lists as JSON columns, integer `date_*` fields as timestamps, then the Arrow pages step when
    `arrow_pages`."""
    endpoints = {c["name"]: c[_ENDPOINT] for c in resource_configs if _ENDPOINT in c}
    incremental = {c["name"] for c in resource_configs if c.get("endpoint", {}).get("incremental")}
    config: dict[str, Any] = {
        "client": {
            "base_url": root,
            "auth": {"type": "bearer", "token": api_key},
            "session": session,
        },
        "resources": [{k: v for k, v in c.items() if k != _ENDPOINT} for c in resource_configs],
    }
    for c in resource_configs:
        paginator = c.get("endpoint", {}).get("paginator")
        if isinstance(paginator, KeysetPaginator):
            # a big resource is read in parallel slices through this session (slices.py)
            paginator.session = session
    resources: list[DltResource] = rest_api_resources(config)  # type: ignore[arg-type]
    for resource in resources:
        # The resources are read at once, each page on dlt's extract thread pool. Set here,
        # not with rest_api's `parallelized: True`: dlt 1.31 loses that flag for resources that
        # depend on no other one, and reads them one after the other (test_sync.py checks this).
        resource.parallelize()
    for resource in resources:
        if first_steps and resource.name in first_steps:
            resource.add_step(first_steps[resource.name], insert_at=1)
        resource.add_step(FieldNames.of(resource))  # no two fields in one column (field_names.py)
        if resource.name in incremental:  # no date after now holds the cursor (dated_ahead.py)
            resource.add_step(CapDatesAhead())
            resource.add_step(RestoreDates())
        lists = ListsAsJson(resource, encode=arrow_pages)  # lists as JSON columns (lists_as_json.py)
        resource.add_step(lists)
        epoch_dates = None
        if resource.name in endpoints:  # integer date_* fields as timestamps (epoch_dates.py)
            epoch_dates = EpochDates(endpoints[resource.name], resource)
            resource.add_step(epoch_dates)
        if arrow_pages:
            resource.apply_hints(columns=ROOT_COLUMNS)
            resource.add_step(ArrowPages(resource, epoch_dates, lists))
    return resources


@dlt.source(name="crm", section="crm")
def crm(
    base_url: Optional[str] = dlt.config.value,
    api_key: Optional[str] = dlt.secrets.value,
    page_sizes: Optional[dict[str, int]] = None,
    primary_key: Optional[str] = None,
    resources: Optional[dict[str, Any]] = None,
    hard_delete: bool = False,
    schema_contract: Optional[str] = None,
    max_retries: int = MAX_RETRIES,
    backoff_factor: float = BACKOFF_FACTOR,
    request_timeout: float = REQUEST_TIMEOUT,
    arrow_pages: bool = True,
    max_in_flight: int = MAX_IN_FLIGHT,
    result_window: Optional[int] = None,
) -> list[DltResource]:
    """The CRM API's resources (five built in, more by configuration), each read completely and
    merged on its primary key.

    Args:
        base_url: API root, e.g. https://api.example.com.
        api_key: Bearer token.
        page_sizes: per-resource page size overrides, e.g. {"tasks": 500} (3..1000).
        primary_key: the key field of every resource ("id"; the real API family uses "jnid").
        resources: per-resource settings that override the built-in ones or add resources,
            e.g. {"invoices": {"path": "/v1/invoices"}} (catalog.py lists the fields).
        hard_delete: delete records whose `is_active` is false instead of keeping them flagged.
        schema_contract: "evolve" (default: new fields become new columns) or "freeze" (a new
            column fails the run, naming the table and column).
        max_retries / backoff_factor / request_timeout: the HTTP retry policy (spec: 3 and 2).
        arrow_pages: build each page's tables with pyarrow (arrow_pages.py); False leaves every
            record to dlt's row-by-row normalizer.
        max_in_flight: the most requests in flight at once across all resources (8; http.py).
        result_window: the API's result window (10,000 as documented), for every resource whose
            own settings name none.
    """
    endpoints = build_endpoints(primary_key, resources, page_sizes, result_window)
    root = check_settings(base_url, api_key)
    session = crm_session(endpoints, schema_contract, max_retries, backoff_factor, request_timeout, max_in_flight)
    configs = [_resource_config(endpoint, hard_delete, schema_contract) for endpoint in endpoints]
    return crm_resources(root, api_key, session, configs, arrow_pages=arrow_pages)
