"""Jobs over the `crm` group."""

from dagster import AssetSelection, define_asset_job

from .constants import GROUP_NAME

crm_sync = define_asset_job(
    name="crm_sync",
    selection=AssetSelection.groups(GROUP_NAME),
    description="Load every CRM resource into the warehouse (merge on id).",
)
