"""The dlt pipeline `crm_warehouse` that lands the `crm` source in the dataset `crm`; with many
accounts (crm/accounts.py), account `<name>`'s own pipeline `crm_warehouse_<name>` lands it in
`crm_<name>`.

Usable without Dagster (`python -m crm_assets.sources`); destination.py says where it loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Optional

import dlt
from dlt.common.pipeline import get_dlt_pipelines_dir
from dlt.common.runtime.collector import LogCollector
from dlt.pipeline.pipeline import Pipeline

from .crm.accounts import Account
from .destination import CrmDestinationError, destination_for, duckdb_path, selected_destination, settled

PIPELINE_NAME = "crm_warehouse"
DATASET_NAME = "crm"

logger = logging.getLogger(__name__)


def _pipelines_dir_for(path: str) -> str:
    """dlt's working folder for the pipeline that writes the DuckDB file `path`: its state and
    cursors belong to that warehouse, not to every sync on the machine."""
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    return os.path.join(get_dlt_pipelines_dir(), "by_warehouse", digest)


def crm_pipeline(
    pipelines_dir: Optional[str] = None,
    *,
    pipeline_name: str = PIPELINE_NAME,
    dataset_name: str = DATASET_NAME,
    connection: Any = None,
    for_run: bool = True,
) -> Pipeline:
    """A fresh handle on the pipeline. The destination's settings resolve here (`for_run`), the rest
    of dlt's configuration (state dir, steps) when it runs.
    An account's pipeline passes its own names (`Account.pipeline_name`, `Account.dataset_name`).

    The destination is the one `CRM_DESTINATION` names at the moment of the call. Dagster also
    calls this when it loads the code location (to build the asset definitions): an unknown
    name must not stop that, so it only logs here and the pipeline has no destination; the run
    then fails in `run_options()` with the message naming the variable and the accepted values.

    `connection`: the DuckDB file, open for a run (`exclusive_run` yields it); the pipeline's steps
    share it rather than each opening the file.

    `for_run`: the destination's settings are resolved now, once for the pipeline's life
    (`settled`); the definitions' pipeline, which never runs, passes False.
    """
    destination: Any
    try:
        name = selected_destination()
    except CrmDestinationError as exc:
        logger.warning("%s", exc)
        destination = None
    else:
        path = duckdb_path() if name == "duckdb" else None
        destination = destination_for(name, path, connection)
        if for_run:
            destination = settled(destination, pipeline_name)
        if pipelines_dir is None and path is not None:
            pipelines_dir = _pipelines_dir_for(path)
    for attempt in (1, 2):
        try:
            return dlt.pipeline(
                pipeline_name=pipeline_name,
                destination=destination,
                dataset_name=dataset_name,
                pipelines_dir=pipelines_dir,
                # dlt's progress log, to a logger Dagster runs show
                progress=LogCollector(
                    log_period=15.0, logger=logging.getLogger("crm_assets.sources.progress"),
                    dump_system_stats=False,
                ),
            )
        except FileExistsError:
            # another process created the pipeline's folder between dlt's check and its mkdir
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def account_pipeline(account: Account, pipelines_dir: Optional[str] = None, connection: Any = None) -> Pipeline:
    """`account`'s own pipeline (`crm_warehouse_<name>`, dataset `crm_<name>`): its state and
    cursors are its own. Hold `exclusive_run(pipeline_name=account.pipeline_name)` around it, and
    pass the connection it yields."""
    return crm_pipeline(
        pipelines_dir, pipeline_name=account.pipeline_name, dataset_name=account.dataset_name,
        connection=connection,
    )


def drop_staging(pipeline: Pipeline) -> None:
    """Drop the merge's staging dataset (`crm_staging`, or an account's `crm_<name>_staging`) once a
    load is in. dlt stages every merged table there and keeps the schema and its tables for good,
    empty at best: a second, useless `crm_staging` beside `crm` in every warehouse browser. The next merge creates it again."""
    with pipeline.sql_client() as client, client.with_staging_dataset():
        if client.has_dataset():
            client.drop_dataset()
