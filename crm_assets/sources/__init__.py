"""dlt sources and pipelines. Nothing in this package imports Dagster."""
