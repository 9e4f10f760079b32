"""A code location of one trivial asset, run by benchmarks/accounts.py through the same daemon,
launcher and workers as crm_assets: what Dagster itself costs to materialize an asset there."""

from dagster import Definitions, asset, define_asset_job, in_process_executor


@asset
def trivial() -> int:
    return 1


trivial_job = define_asset_job("trivial_job", selection=[trivial])

# as crm_assets: the run is one process, the Celery worker's (a multiprocess executor cannot fork
# inside Celery's prefork pool)
defs = Definitions(assets=[trivial], jobs=[trivial_job], executor=in_process_executor)
