"""The cost of the field names step (crm_assets/sources/crm/field_names.py) on its own: CPU time per
record over the simulator's records, in pages of 1,000, as a sync feeds it, without and with
colliding fields (`SimulatorConfig.colliding_fields`). No network, no dlt pipeline.

    python benchmarks/field_names.py                 # 100,000 records of each of the five resources
    python benchmarks/field_names.py --records 20000 --repeat 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from dlt.common.normalizers.naming.snake_case import NamingConvention

from crm_assets.simulator.data import DEFAULT_COUNTS, Dataset
from crm_assets.simulator.server import with_colliding_fields
from crm_assets.sources.crm.field_names import FieldNames

PAGE = 1000


def pages(resource: str, records: int, colliding: bool) -> list[list[dict]]:
    dataset = Dataset(resource, records, seed=42, counts=dict(DEFAULT_COUNTS))
    rows = [dataset.generate(i) for i in range(records)]
    if colliding:
        rows = [with_colliding_fields(row) for row in rows]
    return [rows[i:i + PAGE] for i in range(0, records, PAGE)]


def seconds(resource: str, data: list[list[dict]]) -> float:
    step = FieldNames(resource, ("id", "name", "created_by", "date_created", "date_updated", "is_active"),
                      naming=NamingConvention())
    start = time.process_time()
    for page in data:
        step(page)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="records per resource")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is shown")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the step's warnings, once per resource and run
    print(f"| resource | records | µs per record, no collision | µs per record, colliding fields |")
    print("|---|---:|---:|---:|")
    for resource in ("jobs", "contacts", "tasks", "activities", "files"):
        figures = []
        for colliding in (False, True):
            runs = []
            for _ in range(args.repeat):
                data = pages(resource, args.records, colliding)  # fresh dicts: the step renames in place
                runs.append(seconds(resource, data))
            figures.append(statistics.median(runs) / args.records * 1e6)
        print(f"| {resource} | {args.records:,} | {figures[0]:.2f} | {figures[1]:.2f} |")


if __name__ == "__main__":
    main()
