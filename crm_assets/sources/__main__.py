"""The sync without Dagster: `python -m crm_assets.sources`.

    SOURCES__CRM__BASE_URL=http://127.0.0.1:8765 SOURCES__CRM__API_KEY=demo-key \\
        python -m crm_assets.sources
"""

from __future__ import annotations

import sys
from typing import Optional

from .crm import configured_endpoints, crm, find_crm_error
from .crm_pipeline import DATASET_NAME, crm_pipeline, drop_staging
from .destination import run_options
from .readback import database_location, refuse_earlier_layout, table_row_counts
from .run_lock import exclusive_run
from .tuning import sync_tuning


def main(argv: Optional[list[str]] = None) -> int:
    with exclusive_run() as connection, sync_tuning():
        pipeline = crm_pipeline(connection=connection)
        try:
            refuse_earlier_layout(pipeline, configured_endpoints())
            load_info = pipeline.run(crm(), **run_options(pipeline))
            drop_staging(pipeline)
        except Exception as exc:  # dlt wraps our errors: show ours, plainly
            print(f"crm sync failed: {find_crm_error(exc) or exc}", file=sys.stderr)
            return 1
        print(load_info)
        tables = [endpoint.name for endpoint in configured_endpoints()]
        for table, rows in table_row_counts(pipeline, tables).items():
            print(f"{DATASET_NAME}.{table}: {rows} rows")
        print(f"database: {database_location(pipeline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
