"""The seed integration spec's `rest_api_source` config, and the least that makes dlt run it.

`SEED_SPEC_CONFIG` is the config of shared/docs/seed-integration-spec.md verbatim, except that
the token is a placeholder filled in by `seed_spec_config()` (the spec reads
`dlt.secrets["api_key"]`, and so does `seed_spec_config()` when no key is passed).

`runnable_seed_config(base_url)` applies the fixes below, each the minimum that gets plain dlt
through the config against an API that follows shared/docs/api-contract.md. Nothing else is
changed: jobs/contacts still send no page-size parameter (dlt's offset paginator then sends
`limit=1000`, which the API ignores, so it answers pages of 10 while the offset jumps by 1000),
offsets still advance by the requested limit, and nothing splits a resource into date windows.
The benchmark shows what that loses.

Fixes (all found by running the config with dlt 1.x against the simulator):

1. `base_url`: `https://api.example.com` -> the simulator's URL. Not a dlt problem; the benchmark
   has to talk to the local API.
2. `size_param: "size"` -> `limit_param: "size"` (tasks, activities, files). dlt does not know
   `size_param` and rejects the whole config (the benchmark records dlt's message; see
   `verbatim_rejection()`). `limit_param` is dlt's name for the same thing.
3. `total_path: "count"` on every paginator. dlt's offset paginator looks for the total under
   `total` by default; the API calls it `count`, so dlt raises
   "Total `items` not found in the response ... Expected a response with a `total` key"
   on the first page of every resource.
4. `maximum_offset: 10000` on every paginator. With fixes 1-3 alone dlt requests
   `from=10000` on every resource that has more than 10,000 records (offset steps of 1000 for
   all but tasks, 100 for tasks), the API answers `400 result window is too large`, and the
   whole run fails. `maximum_offset` makes the paginator stop at the API's result window
   instead -- i.e. it quietly stops reading, which is what a user of the spec would end up with.
   (The alternative, a `response_actions` entry ignoring 400s, ends the listing at the same
   place but would also swallow every other 400.)
"""

from __future__ import annotations

import copy
from typing import Any, Optional

# The API's result window (api-contract.md, hard fact 2).
RESULT_WINDOW = 10_000
API_KEY_PLACEHOLDER = "<dlt.secrets['api_key']>"

# shared/docs/seed-integration-spec.md, "Configuration Example", verbatim but for the token.
SEED_SPEC_CONFIG: dict[str, Any] = {
    "client": {
        "base_url": "https://api.example.com",
        "auth": {
            "type": "bearer",
            "token": API_KEY_PLACEHOLDER,
        },
    },
    "resource_defaults": {
        "primary_key": "id",
        "write_disposition": "merge",
    },
    "resources": [
        {
            "name": "jobs",
            "endpoint": {
                "path": "/v1/jobs",
                "data_selector": "results",
                "paginator": {
                    "type": "offset",
                    "limit": 1000,
                    "offset_param": "from",
                },
            },
        },
        {
            "name": "contacts",
            "endpoint": {
                "path": "/v1/contacts",
                "data_selector": "results",
                "paginator": {
                    "type": "offset",
                    "limit": 1000,
                    "offset_param": "from",
                },
            },
        },
        {
            "name": "tasks",
            "endpoint": {
                "path": "/v1/tasks",
                "data_selector": "results",
                "paginator": {
                    "type": "offset",
                    "limit": 100,
                    "offset_param": "from",
                    "size_param": "size",
                },
            },
        },
        {
            "name": "activities",
            "endpoint": {
                "path": "/v1/activities",
                "data_selector": "activity",
                "paginator": {
                    "type": "offset",
                    "limit": 1000,
                    "offset_param": "from",
                    "size_param": "size",
                },
            },
        },
        {
            "name": "files",
            "endpoint": {
                "path": "/v1/files",
                "data_selector": "files",
                "paginator": {
                    "type": "offset",
                    "limit": 1000,
                    "offset_param": "from",
                    "size_param": "size",
                },
            },
        },
    ],
}

# What runnable_seed_config() changes, for the benchmark's report.
FIXES: list[str] = [
    "client.base_url -> the simulator's URL",
    "paginator size_param: 'size' -> limit_param: 'size' (tasks, activities, files): dlt rejects size_param",
    "paginator total_path: 'count' (all): dlt expects 'total', the API sends 'count'",
    f"paginator maximum_offset: {RESULT_WINDOW} (all): else from={RESULT_WINDOW} gets a 400 and the run fails",
]


def seed_spec_config(base_url: Optional[str] = None, api_key: Optional[str] = None) -> dict[str, Any]:
    """The spec's config, verbatim, with the token (and, if given, the base URL) filled in."""
    config = copy.deepcopy(SEED_SPEC_CONFIG)
    if api_key is None:
        import dlt

        api_key = dlt.secrets["api_key"]  # as the spec does
    config["client"]["auth"]["token"] = api_key
    if base_url is not None:
        config["client"]["base_url"] = base_url
    return config


def runnable_seed_config(base_url: str, api_key: Optional[str] = None) -> dict[str, Any]:
    """The spec's config with the fixes listed in `FIXES` (and this module's docstring)."""
    config = seed_spec_config(base_url, api_key)
    for resource in config["resources"]:
        paginator = resource["endpoint"]["paginator"]
        if "size_param" in paginator:
            paginator["limit_param"] = paginator.pop("size_param")
        paginator["total_path"] = "count"
        paginator["maximum_offset"] = RESULT_WINDOW
    return config


def verbatim_rejection(base_url: str, api_key: Optional[str] = None) -> Optional[str]:
    """dlt's complaint about the verbatim config (only the base URL swapped), or None if accepted."""
    from dlt.sources.rest_api import rest_api_source

    try:
        rest_api_source(seed_spec_config(base_url, api_key))  # type: ignore[arg-type]
    except Exception as exc:  # dlt raises its own config validation errors
        lines = str(exc).splitlines()
        # dlt lists why each config type does not fit; the offset paginator's line is the one
        # that matters ("received unexpected fields {'size_param'}").
        relevant = [line for line in lines if "OffsetPaginatorConfig`:" in line] or lines[:1]
        return f"{type(exc).__name__}: {' '.join(relevant[0].split())[:400]}"
    return None
