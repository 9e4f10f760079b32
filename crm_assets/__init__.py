"""crm_assets: a warehouse copy of a project-management/CRM API, as Dagster assets over dlt."""
