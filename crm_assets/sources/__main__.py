"""The sync without Dagster: `python -m crm_assets.sources`. A resource that fails on its own (a 403,
an API that did not do as asked) is left out and the others load, as in the Dagster step; the
command then exits 1 naming it.

    SOURCES__CRM__BASE_URL=http://127.0.0.1:8765 SOURCES__CRM__API_KEY=demo-key \\
        python -m crm_assets.sources
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from dlt.extract import DltSource

from .crm import CrmError, configured_endpoints, crm, find_crm_error
from .crm_pipeline import DATASET_NAME, crm_pipeline, drop_staging
from .destination import run_options
from .isolation import load_leaving_out_failures
from .readback import database_location, refuse_earlier_layout, table_row_counts
from .run_lock import exclusive_run
from .tuning import sync_tuning


def main(argv: Optional[list[str]] = None) -> int:
    with exclusive_run() as connection, sync_tuning():
        pipeline = crm_pipeline(connection=connection)
        first_source: Optional[DltSource] = None

        def attempt(resources: list[str]) -> Any:
            nonlocal first_source
            # a fresh source after a failed attempt: no step of the read keeps what it saw
            source = (first_source or crm()).with_resources(*resources)
            first_source = None
            return pipeline.run(source, **run_options(pipeline))

        def left_out(resource: str, error: CrmError, remaining: list[str]) -> None:
            print(f"{resource} failed and is left out of this run: {error}", file=sys.stderr)
            if remaining:
                print(f"loading the others without it: {', '.join(remaining)}", file=sys.stderr)

        try:
            endpoints = configured_endpoints()  # a bad setting fails here, naming it, before any request
            names = [endpoint.name for endpoint in endpoints]
            first_source = crm()
            refuse_earlier_layout(pipeline, endpoints)
            load_info, failed = load_leaving_out_failures(names, attempt, left_out)
            if load_info is not None:
                drop_staging(pipeline)
        except Exception as exc:  # dlt wraps our errors: show ours, plainly
            print(f"crm sync failed: {find_crm_error(exc) or exc}", file=sys.stderr)
            return 1
        loaded = [name for name in names if name not in failed]
        if load_info is not None:
            print(load_info)
            for table, rows in table_row_counts(pipeline, loaded).items():
                print(f"{DATASET_NAME}.{table}: {rows} rows")
        print(f"database: {database_location(pipeline)}")
        if failed:
            reasons = "; ".join(str(error) for error in failed.values())
            others = f". Loaded the others ({', '.join(loaded)}); once that is fixed, run again" if loaded else ""
            print(f"crm sync failed: {reasons}{others}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
