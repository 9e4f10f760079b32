"""Data checks on every `crm/*` table, run after each load and on their own (job `crm_checks`).

Three checks per table, built from the configured endpoints so a new resource gets them too:

* `id_is_unique`          blocking, ERROR: the merge on the primary key (`id`, or the configured
                          one such as `jnid`) must leave one row per key.
* `id_is_not_null`        blocking, ERROR: every row has its primary key.
* `row_count_matches_api` WARN: rows in the table (but those the audit marked deleted) vs the
                          API's own `count` (one `size=0` request). Only a warning: records can be
                          created between the load and the check, and deactivated records are
                          removed when `hard_delete` is on. A failure makes crm_audit_sensor
                          request an audit (audit.py) of that table.

They are check specs of the sync's own step (assets.py, `crm_sync_assets`), evaluated right after
the load: a resource that fails (its API answers 403, say) must not keep the checks of the others
from running, and Dagster runs no later step of a run whose load step failed. With only the
checks selected (job `crm_checks`), that step loads nothing and runs them alone. The warehouse
admits one user at a time (DuckDB: a single writer), so they read the tables one after another.

With many accounts (docs/accounts.md) the checks are partitioned like the assets, one status per
account: account A's failed check stays failed after account B's passes (an unpartitioned check
keeps only its latest result). Each reads its account's dataset and asks its account's API.

Freshness is not a check here but Dagster's own `FreshnessPolicy` on the assets
(`CRM_FRESHNESS_POLICY`, attached in definitions.py), evaluated continuously by the daemon.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation at runtime.

import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Optional, Union

from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetSpec,
    DagsterLogManager,
    FreshnessPolicy,
    MetadataValue,
    PartitionsDefinition,
    PreviewWarning,
    apply_freshness_policy,
)

from .constants import ASSET_KEY_PREFIX, FRESHNESS_FAIL_AFTER_MINUTES, FRESHNESS_WARN_AFTER_MINUTES
from .sources.crm import DELETED_AT_COLUMN, CrmError, Endpoint, count_every_record
from .sources.crm.accounts import Account, account_api_key
from .sources.crm_pipeline import DATASET_NAME, PIPELINE_NAME
from .warehouse import DatabaseUndefinedRelation, Query, reader

ID_IS_UNIQUE = "id_is_unique"
ID_IS_NOT_NULL = "id_is_not_null"
ROW_COUNT_MATCHES_API = "row_count_matches_api"
DUPLICATE_SAMPLE_SIZE = 10

CRM_FRESHNESS_POLICY = FreshnessPolicy.time_window(
    fail_window=timedelta(minutes=FRESHNESS_FAIL_AFTER_MINUTES),
    warn_window=timedelta(minutes=FRESHNESS_WARN_AFTER_MINUTES),
)


def with_crm_freshness_policy(spec: AssetSpec) -> AssetSpec:
    return apply_freshness_policy(spec, CRM_FRESHNESS_POLICY)


def table_check_specs(
    endpoints: Sequence[Endpoint], partitions_def: Optional[PartitionsDefinition] = None
) -> list[AssetCheckSpec]:
    """The three checks of each table; partitioned by account with `partitions_def`."""
    specs = []
    for endpoint in endpoints:
        asset = AssetKey([ASSET_KEY_PREFIX, endpoint.name])
        dataset = "crm" if partitions_def is None else "the account's crm_<account>"
        table = f"{dataset}.{endpoint.name}"
        key = endpoint.primary_key
        with warnings.catch_warnings():
            # A partitioned AssetCheckSpec is a preview feature of Dagster 1.13 (pyproject.toml pins
            # the release range), and warns each time one is built, so in every run's and every
            # CLI's output. It is the one way to keep a status per account, used on purpose.
            warnings.simplefilter("ignore", PreviewWarning)
            specs += _specs(asset, table, key, endpoint, partitions_def)
    return specs


def _specs(
    asset: AssetKey, table: str, key: str, endpoint: Endpoint, partitions_def: Optional[PartitionsDefinition]
) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(
            ID_IS_UNIQUE,
            asset=asset,
            blocking=True,
            description=(
                f"Every `{key}` appears once in {table}: the merge must absorb the "
                "duplicates that overlapping pages and records edited mid-read produce. Fails the run."
            ),
            partitions_def=partitions_def,
        ),
        AssetCheckSpec(
            ID_IS_NOT_NULL,
            asset=asset,
            blocking=True,
            description=f"No row of {table} lacks its primary key `{key}`. Fails the run.",
            partitions_def=partitions_def,
        ),
        AssetCheckSpec(
            ROW_COUNT_MATCHES_API,
            asset=asset,
            description=(
                f"Rows in {table} equal the count GET {endpoint.path} reports right now "
                "(warning only: the API can grow between the load and the check)."
            ),
            partitions_def=partitions_def,
        ),
    ]


# {table} and {key} are names from the checked configuration (catalog.py), never user input
_SQL_DUPLICATES = (
    "SELECT COUNT(*), COALESCE(SUM(n - 1), 0) FROM "
    "(SELECT {key}, COUNT(*) AS n FROM {table} WHERE {key} IS NOT NULL "
    "GROUP BY {key} HAVING COUNT(*) > 1) AS duplicated"
)
_SQL_DUPLICATE_SAMPLE = (
    "SELECT {key} FROM {table} WHERE {key} IS NOT NULL GROUP BY {key} HAVING COUNT(*) > 1 ORDER BY {key}"
)
_SQL_NULL_IDS = "SELECT COUNT(*) FROM {table} WHERE {key} IS NULL"
_SQL_ROWS = "SELECT COUNT(*) FROM {table}"
# rows the audit marked deleted (`_crm_deleted_at`: records the API no longer lists) are not counted
_SQL_LIVE_ROWS = f"SELECT COUNT(*) FROM {{table}} WHERE {DELETED_AT_COLUMN} IS NULL"
_SQL_HAS_DELETED_AT = (
    "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = '{dataset}' "
    f"AND table_name = '{{name}}' AND column_name = '{DELETED_AT_COLUMN}'"
)


def _id_is_unique(query: Query, key: AssetCheckKey, endpoint: Endpoint, dataset: str) -> AssetCheckResult:
    table, column = endpoint.name, endpoint.primary_key
    ((duplicate_ids, extra_rows),) = query(_SQL_DUPLICATES, table, key=column)
    sample = (
        [row[0] for row in query(_SQL_DUPLICATE_SAMPLE, table, key=column, max_rows=DUPLICATE_SAMPLE_SIZE)]
        if duplicate_ids
        else []
    )
    return AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=duplicate_ids == 0,
        severity=AssetCheckSeverity.ERROR,
        description=(
            None if not duplicate_ids else f"{duplicate_ids} {column}s appear more than once in {dataset}.{table}"
        ),
        metadata={
            "duplicate_ids": int(duplicate_ids),
            "extra_rows": int(extra_rows),
            "duplicate_id_sample": MetadataValue.json(sample),
        },
    )


def _id_is_not_null(query: Query, key: AssetCheckKey, endpoint: Endpoint, dataset: str) -> AssetCheckResult:
    table, column = endpoint.name, endpoint.primary_key
    ((null_ids,),) = query(_SQL_NULL_IDS, table, key=column)
    return AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=null_ids == 0,
        severity=AssetCheckSeverity.ERROR,
        description=None if not null_ids else f"{null_ids} rows of {dataset}.{table} have no {column}",
        metadata={"null_id_rows": int(null_ids)},
    )


def _api_count(endpoint: Endpoint, account: Optional[Account]) -> Union[int, CrmError]:
    try:
        if account is None:
            return count_every_record(endpoint)
        return count_every_record(endpoint, base_url=account.base_url, api_key=account_api_key(account))
    except CrmError as exc:  # its message names the resource and path, never the key
        return exc


def _row_count_matches_api(
    query: Query, key: AssetCheckKey, endpoint: Endpoint, dataset: str, api_count: Union[int, CrmError]
) -> AssetCheckResult:
    table = endpoint.name
    ((marks,),) = query(_SQL_HAS_DELETED_AT.replace("{name}", table).replace("{dataset}", dataset), table)
    ((rows,),) = query(_SQL_LIVE_ROWS if marks else _SQL_ROWS, table)
    if isinstance(api_count, CrmError):
        return AssetCheckResult(
            asset_key=key.asset_key,
            check_name=key.name,
            passed=False,
            severity=AssetCheckSeverity.WARN,
            description=f"Could not ask the API for its count: {api_count}",
            metadata={"table_rows": int(rows)},
        )
    difference = int(rows) - api_count
    return AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=difference == 0,
        severity=AssetCheckSeverity.WARN,
        description=(
            None
            if difference == 0
            else f"{dataset}.{table} has {rows} rows, the API counts {api_count} ({difference:+d})"
        ),
        metadata={"table_rows": int(rows), "api_count": api_count, "difference": difference},
    )


_SQL_EVALUATORS = {
    ID_IS_UNIQUE: _id_is_unique,
    ID_IS_NOT_NULL: _id_is_not_null,
}


def _table_missing(key: AssetCheckKey, table: str, dataset: str) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=False,
        severity=AssetCheckSeverity.WARN if key.name == ROW_COUNT_MATCHES_API else AssetCheckSeverity.ERROR,
        description=f"Table {dataset}.{table} does not exist in the warehouse: load it first.",
    )


def table_checks(
    log: DagsterLogManager,
    check_keys: Iterable[AssetCheckKey],
    endpoints: Sequence[Endpoint],
    account: Optional[Account] = None,
) -> Iterator[AssetCheckResult]:
    """The results of the checks `check_keys`, read from the warehouse (and the API's counts):
    the `crm` dataset, or `account`'s own dataset and API."""
    dataset = DATASET_NAME if account is None else account.dataset_name
    pipeline_name = PIPELINE_NAME if account is None else account.pipeline_name
    by_name = {endpoint.name: endpoint for endpoint in endpoints}
    keys = sorted(check_keys, key=lambda k: k.to_user_string())
    # The API's counts first, all at once: its retries can take seconds, and the warehouse
    # (locked against loads while the checks read it) need not wait for them.
    counted = [key.asset_key.path[-1] for key in keys if key.name == ROW_COUNT_MATCHES_API]
    with ThreadPoolExecutor(max_workers=max(1, len(counted))) as pool:
        counts = pool.map(_api_count, [by_name[name] for name in counted], [account] * len(counted))
        api_counts = dict(zip(counted, counts))
    with reader(pipeline_name, dataset) as query:  # one connection for all of them
        for key in keys:
            table = key.asset_key.path[-1]
            endpoint = by_name[table]
            try:
                if key.name == ROW_COUNT_MATCHES_API:
                    result = _row_count_matches_api(query, key, endpoint, dataset, api_counts[table])
                else:
                    result = _SQL_EVALUATORS[key.name](query, key, endpoint, dataset)
            except DatabaseUndefinedRelation:
                result = _table_missing(key, table, dataset)
            if not result.passed:
                log.warning(f"{key.to_user_string()}: {result.description}")
            yield result
