"""A code location of trivial assets, run by benchmarks/accounts.py through the same daemon,
launcher and workers as crm_assets: what Dagster itself costs to materialize an asset there, and
the same asset in crm_assets' pool `crm_warehouse` (a step in a pool claims a slot from the
instance's database before it starts)."""

from dagster import Definitions, asset, define_asset_job, in_process_executor


@asset
def trivial() -> int:
    return 1


@asset(pool="crm_warehouse")
def trivial_in_pool() -> int:
    return 1


trivial_job = define_asset_job("trivial_job", selection=[trivial])
trivial_in_pool_job = define_asset_job("trivial_in_pool_job", selection=[trivial_in_pool])

# as crm_assets: the run is one process, the Celery worker's (a multiprocess executor cannot fork
# inside Celery's prefork pool)
defs = Definitions(assets=[trivial, trivial_in_pool], jobs=[trivial_job, trivial_in_pool_job],
                   executor=in_process_executor)
