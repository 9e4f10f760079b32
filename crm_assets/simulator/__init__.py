"""A local, standard-library-only simulator of the CRM API (see docs/api-contract.md).

    with CrmSimulator(SimulatorConfig(counts={"jobs": 100})) as sim:
        requests.get(sim.url + "/v1/jobs", headers={"Authorization": "Bearer demo-key"})

Data is deterministic per seed and generated lazily, so counts up to millions are cheap.  Faults
(rate limits, 5xx, dropped connections, page caps, offset drift, corrupt bodies) are opt-in, and so
is the real API family's shape (records keyed by ``jnid``, an ``invoices`` resource, a descending
default sort, a ``fields`` parameter) and an API that does not do what it is asked (a sort or filter
ignored, records without a ``date_updated``, edits that do not move it, hard deletes).

One process can serve many accounts, each under its own path prefix with its own key and data:

    with CrmSimulator(SimulatorConfig(accounts=["a", "b"])) as sim:
        requests.get(sim.account_url("a") + "/v1/jobs", headers={"Authorization": "Bearer key-a"})
        sim.account("b").mutate("jobs", edit=3)
"""

from .data import DEFAULT_COUNTS, KEY_FIELDS, KNOWN_RESOURCES, OPTIONAL_RESOURCES, RESOURCES
from .server import CrmSimulator, SimulatedAccount, SimulatorConfig

__all__ = ["CrmSimulator", "SimulatedAccount", "SimulatorConfig", "RESOURCES", "OPTIONAL_RESOURCES", "KNOWN_RESOURCES",
           "KEY_FIELDS", "DEFAULT_COUNTS"]
