"""Politeness toward the API (http.py): the most requests in flight per API key, shared by every
copy of a sync's session, and a 429 that pauses the whole session; the simulator's peak in-flight
counter and 429 storm that show it."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import requests

from crm_assets.sources.crm import CrmConfigurationError, crm, crm_session
from crm_assets.sources.crm.catalog import BUILT_IN
from crm_assets.sources.crm.http import CrmSession
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.destination import run_options

from .conftest import API_KEY, assert_exact

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _at_once(count: int, send) -> list:
    """`send(n)` on `count` threads started together; their results (or errors) in order."""
    results: list = [None] * count
    start = threading.Barrier(count)

    def run(n: int) -> None:
        start.wait()
        try:
            results[n] = send(n)
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results[n] = error

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_a_storm_answers_429_with_retry_after_until_it_ends(start_simulator):
    simulator = start_simulator(retry_after=1)
    # windows of seconds, not tenths: a loaded machine may take that long to send the first request
    simulator.configure(storm_seconds=1.5)
    url = f"{simulator.url}/v1/jobs?size=2"

    stormy = requests.get(url, headers=HEADERS)
    assert stormy.status_code == 429 and stormy.headers["Retry-After"] == "1"
    time.sleep(1.6)
    assert requests.get(url, headers=HEADERS).status_code == 200
    assert simulator.stats()["statuses"]["jobs"] == {"429": 1, "200": 1}


def test_every_copy_of_a_session_shares_the_limit_on_requests_in_flight(start_simulator):
    simulator = start_simulator(latency_ms=60)
    session = CrmSession(max_in_flight=3)
    copies = [copy.deepcopy(session) for _ in range(12)]  # dlt and Dagster copy the session

    results = _at_once(12, lambda n: copies[n].get(f"{simulator.url}/v1/jobs?size=1", headers=HEADERS))

    assert all(isinstance(r, requests.Response) and r.status_code == 200 for r in results), results
    assert simulator.stats()["peak_in_flight"] == 3
    # and another session (another sync, or another key) is not held back by this one's
    assert CrmSession(max_in_flight=1).gate is not session.gate


def test_a_429_pauses_every_request_of_the_session_not_only_its_own(start_simulator):
    """The first request meets the storm and pauses the session for Retry-After (1 s); a request
    sent meanwhile through another copy waits for the pause instead of meeting the storm too."""
    simulator = start_simulator(retry_after=1)
    session = CrmSession()
    other = copy.deepcopy(session)
    simulator.configure(storm_seconds=0.9)  # shorter than Retry-After: the pause outlasts it
    url = f"{simulator.url}/v1/jobs?size=1"

    def send(n: int) -> requests.Response:
        if n == 1:  # once the first request's 429 paused the session (not a fixed sleep: the machine
            # may be loaded; nor the server's count of 429s, which comes before the client has read it)
            deadline = time.monotonic() + 10
            while not session.gate.pauses and time.monotonic() < deadline:
                time.sleep(0.01)
        return (session if n == 0 else other).get(url, headers=HEADERS)

    began = time.monotonic()
    results = _at_once(2, send)

    assert [r.status_code for r in results] == [200, 200]
    assert time.monotonic() - began >= 1.0  # both waited for Retry-After
    assert simulator.stats()["statuses"]["jobs"] == {"429": 1, "200": 2}


def test_429s_do_not_use_up_the_retries_of_other_faults(start_simulator):
    """Four 429s in a row (more than max_retries) are waited out, not failed."""
    simulator = start_simulator(retry_after=0)  # no Retry-After: the session's backoff (0.05 s, doubling)
    simulator.configure(storm_seconds=1.5)  # backoff 0.05, 0.1, 0.2, 0.4, 0.8 s: five 429s at least
    session = CrmSession(backoff_factor=0.05)

    response = session.get(f"{simulator.url}/v1/jobs?size=1", headers=HEADERS)

    assert response.status_code == 200
    assert simulator.stats()["statuses"]["jobs"]["429"] > session.max_retries


def test_a_sync_through_a_429_storm_slows_down_and_stays_within_the_limit(start_simulator, crm_env, warehouse,
                                                                          monkeypatch):
    simulator = start_simulator(latency_ms=5, retry_after=1)
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__MAX_IN_FLIGHT", "3")
    monkeypatch.setenv("SOURCES__CRM__PAGE_SIZES", '{"jobs": 20, "contacts": 20, "tasks": 20}')
    pipeline = crm_pipeline()
    # seconds, so that the sync's first request meets the storm even on a loaded machine
    simulator.configure(storm_seconds=3)
    began = time.monotonic()
    pipeline.run(crm(), **run_options(pipeline))

    assert time.monotonic() - began >= 2.9
    stats = simulator.stats()
    assert sum(s.get("429", 0) for s in stats["statuses"].values()) > 0
    assert stats["peak_in_flight"] <= 3
    assert_exact(warehouse, simulator)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_a_limit_below_one_request_is_refused_naming_the_setting(bad):
    with pytest.raises(CrmConfigurationError, match="SOURCES__CRM__MAX_IN_FLIGHT"):
        crm_session(BUILT_IN, max_in_flight=bad)


def test_the_slices_of_a_sync_are_bounded_and_given_back():
    gate = CrmSession(max_in_flight=3).gate  # 6 slices for the whole sync
    assert gate.claim_slices(4) == 4
    assert gate.claim_slices(4) == 2
    assert gate.claim_slices(4) == 0  # none left: that resource is read sequentially
    gate.release_slices(4)
    assert gate.claim_slices(8) == 4


def test_a_workers_request_gets_the_apis_answer_now_never_one_handed_over_to_dlt(start_simulator):
    """An answer handed over for dlt's next send of a URL is dlt's alone: a sliced read's worker
    asking exactly that URL again (the last slice's second read can) gets the API's answer now.
    It used to take the handed-over one, whose records a join had extended with other slices'."""
    simulator = start_simulator()
    session = CrmSession()
    prepared = session.prepare_request(
        requests.Request("GET", f"{simulator.url}/v1/jobs", params={"size": 5, "from": 0}, headers=HEADERS)
    )
    earlier = session.send_fresh(prepared)
    session.hand_over(prepared.url, earlier)
    simulator.mutate("jobs", insert=3)

    now = session.send_fresh(prepared)

    assert now is not earlier and now.json()["count"] == earlier.json()["count"] + 3
    assert session.send(prepared) is earlier  # dlt's send still gets the one handed over to it
    assert session.send(prepared) is not earlier  # once
