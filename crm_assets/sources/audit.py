"""The audit: proves each table equals the API, and repairs it where it does not.

A sync reads incrementally (`date_updated >= cursor`), so it never learns of a record hard-deleted
at the source, of an edit that did not move `date_updated`, or of a row removed from the warehouse
by hand. The audit, for each selected resource:

1. lists the API (sources/crm/audit.py: the sync's read of the whole resource, asking only for the
   key and dates where the API honours `fields`) in one dlt extract, whose pages fill a listing
   (key -> `date_updated`) and, where the API ignored `fields`, hold every record whole;
2. compares the table: *missing* (listed, absent or marked deleted), *stale* (`date_updated`
   differs, as epoch seconds; null equals null), *gone* (in the table, unmarked, not listed);
3. guards: more gone rows than `SOURCES__CRM__AUDIT_MAX_GONE_SHARE` of the table's unmarked rows
   stops the audit of that table, which is left unchanged (nothing loaded, nothing marked);
4. repairs: whole records are merged as they were listed (all of them: this also repairs edits
   that did not move `date_updated`); for a key/date listing, the `date_updated` ranges holding
   the missing and stale records are read again in a second extract, keeping only those keys. Then
   dlt normalizes and loads (the same table, hints and steps as a sync, no cursor touched), and the
   gone rows get `_crm_deleted_at` (or are deleted under `SOURCES__CRM__HARD_DELETE`);
5. compares again: the table passes when it equals the listing (a row newer than the listing, an
   edit made during the audit, counts as equal).

Run it under `exclusive_run()` and `sync_tuning()`, like a sync: it writes the warehouse.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from dlt.pipeline.pipeline import Pipeline

from .crm import DELETED_AT_COLUMN, Endpoint, find_crm_error
from .crm.audit import (
    MAX_GONE_SHARE_SETTING,
    AuditSettings,
    Listing,
    audit_source,
    repair_ranges,
)
from .crm.errors import CrmError
from .crm_pipeline import drop_staging
from .destination import run_options
from .readback import refuse_earlier_layout

logger = logging.getLogger("crm_assets.sources.audit")

# keys per UPDATE/DELETE statement, and rows fetched at a time when reading a table
KEY_BATCH = 500
FETCH_ROWS = 10_000


@dataclass
class Comparison:
    """A table against a listing."""

    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    live_rows: int = 0  # rows not marked deleted

    @property
    def differences(self) -> int:
        return len(self.missing) + len(self.stale) + len(self.gone)


@dataclass
class TableAudit:
    """One table's audit, as the check reports it."""

    table: str
    listed: int = 0
    missing: int = 0
    stale: int = 0
    gone: int = 0
    deleted: int = 0  # marked or removed by this audit
    repaired: int = 0  # missing and stale rows that equal the API afterwards
    records_loaded: int = 0
    whole_records: bool = False
    passed: bool = False
    problem: Optional[str] = None
    remaining: Optional[Comparison] = None

    def metadata(self) -> dict[str, Any]:
        left = self.remaining
        return {
            "listed": self.listed,
            "missing": self.missing,
            "stale": self.stale,
            "gone": self.gone,
            "deleted": self.deleted,
            "repaired": self.repaired,
            "records_loaded": self.records_loaded,
            "whole_records": self.whole_records,
            "still_different": left.differences if left is not None else None,
        }


class AuditGuardError(CrmError):
    """More of a table would be marked or removed than one audit may."""


def audit(pipeline: Pipeline, settings: AuditSettings, resources: Sequence[str]) -> dict[str, TableAudit]:
    """Audit and repair the tables of `resources` (see the module docstring). API errors fail every
    table's audit, with the error; nothing is loaded then."""
    endpoints = [e for e in settings.endpoints if e.name in set(resources)]
    results = {e.name: TableAudit(e.name) for e in endpoints}
    if not endpoints:
        return results
    options = run_options(pipeline)
    pipeline.sync_destination()  # the state and schema the sync committed: cursors stay as they are
    if pipeline.has_pending_data:  # left by a run that crashed: its cursor was never committed
        pipeline.abort_packages()
    refuse_earlier_layout(pipeline, endpoints)
    try:
        listing_read = audit_source(settings, endpoints)
        pipeline.extract(listing_read.source, **options)
    except Exception as exc:
        _abort(pipeline)
        _fail_all(results, exc, "listing the API")
        return results
    listings = listing_read.listings
    comparisons = {}
    for endpoint in endpoints:
        listing, result = listings[endpoint.name], results[endpoint.name]
        result.listed = len(_expected(listing, settings))
        result.whole_records = listing.whole_records > 0
        comparison = comparisons[endpoint.name] = compare(pipeline, endpoint, listing, settings)
        result.missing, result.stale, result.gone = (
            len(comparison.missing), len(comparison.stale), len(comparison.gone)
        )
        logger.info(
            "%s: the API lists %d records (%s); the table has %d missing, %d stale, %d gone",
            endpoint.name, result.listed, "whole records" if result.whole_records else "keys and dates",
            result.missing, result.stale, result.gone,
        )
        too_many = _guard(f"{pipeline.dataset_name}.{endpoint.name}", comparison, settings.audit_max_gone_share)
        if too_many:
            result.problem = too_many
            logger.error("%s", too_many)
    guarded = {name for name, result in results.items() if result.problem}
    repairable = [e for e in endpoints if e.name not in guarded]
    # Whole records are merged as listed, unless a table is guarded: its records are in the same
    # package, and nothing may be loaded into it. The others are then read again by range.
    whole = {e.name for e in repairable if listings[e.name].whole_records and not guarded}
    if guarded or not whole:
        _abort(pipeline)
    else:
        for name in whole:
            results[name].records_loaded = listings[name].kept
    by_range = [
        e for e in repairable
        if e.name not in whole and (comparisons[e.name].missing or comparisons[e.name].stale)
    ]
    try:
        if by_range:
            wanted = {e.name: set(comparisons[e.name].missing) | set(comparisons[e.name].stale) for e in by_range}
            ranges = {e.name: repair_ranges(listings[e.name], wanted[e.name], e.page_size) for e in by_range}
            repair = audit_source(settings, by_range, ranges=ranges, wanted=wanted)
            pipeline.extract(repair.source, **options)
            for e in by_range:
                results[e.name].records_loaded = repair.listings[e.name].kept
        if pipeline.has_pending_data:
            pipeline.normalize()
            pipeline.load()
            drop_staging(pipeline)
    except Exception as exc:
        _abort(pipeline)
        _fail_all({e.name: results[e.name] for e in repairable}, exc, "reading and loading the repairs")
        return results
    for endpoint in repairable:
        result, comparison = results[endpoint.name], comparisons[endpoint.name]
        result.deleted = remove_gone(pipeline, endpoint, comparison.gone, settings.hard_delete)
    for endpoint in endpoints:
        result = results[endpoint.name]
        after = result.remaining = compare(pipeline, endpoint, listings[endpoint.name], settings)
        result.repaired = _repaired(comparisons[endpoint.name], after)
        if result.problem is None:
            result.passed = after.differences == 0
            if not result.passed:
                result.problem = (
                    f"{pipeline.dataset_name}.{endpoint.name} still differs from the API after the repair: "
                    f"{len(after.missing)} missing, {len(after.stale)} stale, {len(after.gone)} gone "
                    f"(for example {', '.join((after.missing + after.stale + after.gone)[:5])})"
                )
    return results


def _repaired(before: Comparison, after: Comparison) -> int:
    left = set(after.missing) | set(after.stale)
    return sum(1 for key in before.missing + before.stale if key not in left)


def _abort(pipeline: Pipeline) -> None:
    if pipeline.has_pending_data:
        pipeline.abort_packages()


def _fail_all(results: dict[str, TableAudit], exc: BaseException, step: str) -> None:
    error = find_crm_error(exc)
    message = str(error) if error is not None else f"{type(exc).__name__}: {exc}"
    for result in results.values():
        result.problem = f"The audit failed while {step}; nothing was loaded or marked: {message}"
        result.passed = False


def _guard(table: str, comparison: Comparison, max_share: float) -> Optional[str]:
    gone, rows = len(comparison.gone), comparison.live_rows
    if not gone or gone <= max_share * rows:
        return None
    return (
        f"{table}: {gone} of its {rows} rows ({gone / rows:.1%}) are no longer listed by the API, "
        f"more than the {max_share:.1%} one audit may mark or remove ({MAX_GONE_SHARE_SETTING}="
        f"{max_share:g}). {table} was left unchanged: nothing loaded, marked or removed. A wrong "
        "key or an empty answer from the API looks like this; if the deletions are real, raise "
        f"{MAX_GONE_SHARE_SETTING} for one audit"
    )


def _expected(listing: Listing, settings: AuditSettings) -> dict[str, Optional[int]]:
    """The records the table should hold: every listed one, but those listed as inactive under
    `hard_delete` (a sync deletes them)."""
    if not settings.hard_delete or not listing.inactive:
        return listing.updated
    return {k: v for k, v in listing.updated.items() if k not in listing.inactive}


# -- the warehouse side -----------------------------------------------------------------------


def _columns(pipeline: Pipeline, table: str) -> Optional[set[str]]:
    """The table's columns in the warehouse; None when it does not exist."""
    with pipeline.sql_client() as client:
        rows = client.execute_sql(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            pipeline.dataset_name, table,
        )
    return {str(row[0]) for row in rows or []} or None


def _rows(pipeline: Pipeline, endpoint: Endpoint) -> Iterator[tuple[str, Optional[int], bool]]:
    """(key, date_updated in epoch seconds, marked deleted) of every row of the table."""
    columns = _columns(pipeline, endpoint.name)
    if columns is None:
        return
    with pipeline.sql_client() as client:
        key = client.escape_column_name(endpoint.primary_key)
        marked = (
            f"{client.escape_column_name(DELETED_AT_COLUMN)} IS NOT NULL"
            if DELETED_AT_COLUMN in columns else "1 = 0"
        )
        sql = (
            f"SELECT {key}, CAST(EXTRACT(EPOCH FROM {client.escape_column_name('date_updated')}) AS BIGINT), "
            f"CASE WHEN {marked} THEN 1 ELSE 0 END FROM {client.make_qualified_table_name(endpoint.name)}"
        )
        with client.execute_query(sql) as cursor:
            while True:
                rows = cursor.fetchmany(FETCH_ROWS)
                if not rows:
                    break
                for row_key, updated, is_marked in rows:
                    yield row_key, None if updated is None else int(updated), bool(is_marked)


def compare(pipeline: Pipeline, endpoint: Endpoint, listing: Listing, settings: AuditSettings) -> Comparison:
    """The table against the listing. A row whose `date_updated` is later than the listed one
    (an edit loaded after the listing read the record) equals it."""
    expected = _expected(listing, settings)
    comparison = Comparison()
    present: set[str] = set()
    for key, updated, marked in _rows(pipeline, endpoint):
        if not marked:
            comparison.live_rows += 1
        if key in expected:
            present.add(key)
            listed = expected[key]
            if marked:
                comparison.missing.append(key)
            elif updated != listed and not (updated is not None and listed is not None and updated > listed):
                comparison.stale.append(key)
        elif not marked and key is not None:
            comparison.gone.append(key)
    comparison.missing += [key for key in expected if key not in present]
    return comparison


def remove_gone(pipeline: Pipeline, endpoint: Endpoint, keys: Sequence[str], hard_delete: bool) -> int:
    """Mark the rows of `keys` deleted (`_crm_deleted_at`, now), or delete them under
    `hard_delete`. Returns how many rows changed."""
    if not keys:
        return 0
    if not hard_delete:
        _ensure_deleted_at(pipeline, endpoint.name)
    now = datetime.now(timezone.utc)
    changed = 0
    with pipeline.sql_client() as client:
        table = client.make_qualified_table_name(endpoint.name)
        key = client.escape_column_name(endpoint.primary_key)
        marked = client.escape_column_name(DELETED_AT_COLUMN)
        with client.begin_transaction():
            for batch in _batches(keys, KEY_BATCH):
                places = ", ".join(["%s"] * len(batch))
                if hard_delete:
                    client.execute_sql(f"DELETE FROM {table} WHERE {key} IN ({places})", *batch)
                else:
                    client.execute_sql(
                        f"UPDATE {table} SET {marked} = %s WHERE {key} IN ({places}) AND {marked} IS NULL",
                        now, *batch,
                    )
                changed += len(batch)
    logger.info("%s: %s %d row(s) the API no longer lists", endpoint.name,
                "deleted" if hard_delete else "marked", changed)
    return changed


def _ensure_deleted_at(pipeline: Pipeline, table: str) -> None:
    """A table last loaded before `_crm_deleted_at` existed gets it as dlt would add it: the column
    hint goes into the pipeline's schema, and dlt brings the warehouse to that schema."""
    columns = _columns(pipeline, table) or set()
    if DELETED_AT_COLUMN in columns:
        return
    schema = pipeline.default_schema
    schema.update_table(
        {"name": table, "columns": {DELETED_AT_COLUMN: {"name": DELETED_AT_COLUMN, "data_type": "timestamp", "nullable": True}}}  # type: ignore[typeddict-item]
    )
    pipeline.sync_schema()


def _batches(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
