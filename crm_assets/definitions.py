"""The code location: composition only."""

from dagster import Definitions

from .assets import crm_sync_assets
from .jobs import crm_sync
from .resources import RESOURCES

defs = Definitions(
    assets=[crm_sync_assets],
    jobs=[crm_sync],
    resources=RESOURCES,
)
