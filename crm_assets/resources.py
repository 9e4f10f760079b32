"""Dagster resources. The dlt resource runs the pipeline; its configuration comes from dlt."""

from dagster_dlt import DagsterDltResource

RESOURCES = {"dlt": DagsterDltResource()}
