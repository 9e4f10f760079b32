"""Names shared by the Dagster side of the project."""

GROUP_NAME = "crm"
ASSET_KEY_PREFIX = "crm"
OWNERS = ["team:data-engineering"]
