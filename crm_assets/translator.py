"""How each dlt resource of the `crm` source appears in Dagster."""

from __future__ import annotations

from dagster import AssetKey, AssetSpec, TableColumn, TableSchema
from dagster_dlt import DagsterDltTranslator
from dagster_dlt.translator import DltResourceTranslatorData

from .constants import ASSET_KEY_PREFIX, GROUP_NAME, OWNERS
from .sources.crm import CORE_COLUMNS, ENDPOINTS_BY_NAME

_CORE_COLUMN_DESCRIPTIONS = {
    "id": "Primary key; unique within the resource",
    "name": "Display name",
    "created_by": "Id of the user who created the record",
    "date_created": "Creation time, Unix epoch seconds",
    "date_updated": "Last edit, Unix epoch seconds (the incremental cursor)",
    "is_active": "False once the record is deleted or archived in the CRM",
}

CORE_TABLE_SCHEMA = TableSchema(
    columns=[
        TableColumn(name, str(hints["data_type"]), description=_CORE_COLUMN_DESCRIPTIONS.get(name))
        for name, hints in CORE_COLUMNS.items()
    ]
)


class CrmTranslator(DagsterDltTranslator):
    """Keys `crm/<resource>` in group `crm`, with no phantom upstream `dlt_crm_*` assets."""

    def get_asset_spec(self, data: DltResourceTranslatorData) -> AssetSpec:
        spec = super().get_asset_spec(data)
        name = data.resource.name
        endpoint = ENDPOINTS_BY_NAME.get(name)
        description = (
            f"{endpoint.description} Loaded from GET {endpoint.path} and merged on `id` into "
            f"table `crm.{name}` (nested lists land in child tables `crm.{name}__*`)."
            if endpoint
            else spec.description
        )
        return spec.replace_attributes(
            key=AssetKey([ASSET_KEY_PREFIX, name]),
            deps=[],
            group_name=GROUP_NAME,
            description=description,
            owners=OWNERS,
        ).merge_attributes(
            metadata={
                "crm/api_path": endpoint.path if endpoint else None,
                "dagster/column_schema": CORE_TABLE_SCHEMA,
            },
            kinds={"dlt"},
        )
