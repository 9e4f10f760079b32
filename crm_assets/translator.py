"""How each dlt resource of the `crm` source appears in Dagster."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import AssetKey, AssetSpec, TableColumn, TableSchema
from dagster_dlt import DagsterDltTranslator
from dagster_dlt.translator import DltResourceTranslatorData

from .constants import ASSET_KEY_PREFIX, GROUP_NAME, OWNERS
from .sources.crm import Endpoint, core_columns

_CORE_COLUMN_DESCRIPTIONS = {
    "name": "Display name",
    "created_by": "Id of the user who created the record",
    "date_created": "Creation time (UTC; the API sends Unix epoch seconds)",
    "date_updated": "Last edit (UTC; the API sends Unix epoch seconds): the incremental cursor",
    "is_active": "False once the record is deleted or archived in the CRM",
}


def core_table_schema(endpoint: Endpoint) -> TableSchema:
    descriptions = {
        endpoint.primary_key: "Primary key; unique within the resource",
        **{field: "UTC time (the API sends Unix epoch seconds)" for field in endpoint.timestamp_fields},
        **_CORE_COLUMN_DESCRIPTIONS,
    }
    return TableSchema(
        columns=[
            TableColumn(name, str(hints["data_type"]), description=descriptions.get(name))
            for name, hints in core_columns(endpoint).items()
        ]
    )


class CrmTranslator(DagsterDltTranslator):
    """Keys `crm/<resource>` in group `crm`, with no phantom upstream `dlt_crm_*` assets."""

    def __init__(self, endpoints: Sequence[Endpoint], dataset: str = "crm") -> None:
        self.endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self.dataset = dataset  # named in the descriptions; `crm_<account>` with accounts

    def get_asset_spec(self, data: DltResourceTranslatorData) -> AssetSpec:
        spec = super().get_asset_spec(data)
        name = data.resource.name
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            description, metadata = spec.description, {}
        else:
            description = (
                (f"{endpoint.description} " if endpoint.description else "")
                + f"Loaded from GET {endpoint.path} and merged on `{endpoint.primary_key}` into "
                f"table `{self.dataset}.{name}`, one row per record (lists in JSON columns)."
            )
            metadata = {"crm/api_path": endpoint.path, "dagster/column_schema": core_table_schema(endpoint)}
        return spec.replace_attributes(
            key=AssetKey([ASSET_KEY_PREFIX, name]),
            deps=[],
            group_name=GROUP_NAME,
            description=description,
            owners=OWNERS,
        ).merge_attributes(metadata=metadata, kinds={"dlt"})
