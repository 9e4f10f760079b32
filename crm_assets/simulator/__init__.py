"""A local, standard-library-only simulator of the CRM API (see docs/api-contract.md).

    with CrmSimulator(SimulatorConfig(counts={"jobs": 100})) as sim:
        requests.get(sim.url + "/v1/jobs", headers={"Authorization": "Bearer demo-key"})

Data is deterministic per seed and generated lazily, so counts up to millions are cheap.  Faults
(rate limits, 5xx, dropped connections, page caps, offset drift, corrupt bodies) are opt-in.
"""

from .data import DEFAULT_COUNTS, RESOURCES
from .server import CrmSimulator, SimulatorConfig

__all__ = ["CrmSimulator", "SimulatorConfig", "RESOURCES", "DEFAULT_COUNTS"]
