"""The CRM API simulator against the contract (docs/api-contract.md), over real HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from crm_assets.simulator import DEFAULT_COUNTS, KNOWN_RESOURCES, RESOURCES, CrmSimulator, SimulatorConfig
from crm_assets.simulator.process import start_simulator, stop_group

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# tasks stays above the 10,000 result window; the rest small so the file runs in seconds.
COUNTS = {"jobs": 60, "contacts": 40, "tasks": 12_000, "activities": 30, "files": 25}


@pytest.fixture(scope="module")
def sim():
    with CrmSimulator(SimulatorConfig(api_key=KEY, counts=COUNTS)) as s:
        yield s


def _getter(simulator: CrmSimulator, session: requests.Session):
    def get(resource: str, **params):
        return session.get(simulator.url + simulator.resources[resource][0], params=params, timeout=10)

    return get


def _fresh_api(simulator: CrmSimulator):
    """The simulator reset to its seed, and a GET helper on a keep-alive session with the key."""
    simulator.reset()
    with requests.Session() as session:
        session.headers.update(AUTH)
        yield _getter(simulator, session)


@pytest.fixture()
def api(sim):
    yield from _fresh_api(sim)


def rng(field: str, **ops) -> str:
    return json.dumps({"must": [{"range": {field: ops}}]})


def read_all(get, resource: str, size: int = 1000, **params) -> tuple[list[dict], int]:
    """Read a listing the way the contract says: advance by records received. Returns (records, pages)."""
    key = KNOWN_RESOURCES[resource][1]  # invoices too, where a simulator serves them
    out, start, pages = [], 0, 0
    while True:
        r = get(resource, **{"from": start, "size": size, **params})
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        out += body[key]
        start += len(body[key])
        if not body[key] or start >= body["count"]:
            return out, pages


# --------------------------------------------------------------------------- auth & basics
def test_missing_or_wrong_key_is_401_and_never_echoes_the_key(sim, api):
    no_key = requests.get(sim.url + "/v1/jobs", timeout=10)
    wrong = requests.get(sim.url + "/v1/jobs", headers={"Authorization": "Bearer sekrit-wrong"}, timeout=10)
    assert no_key.status_code == wrong.status_code == 401
    assert "error" in no_key.json() and "error" in wrong.json()
    assert "sekrit-wrong" not in wrong.text and KEY not in wrong.text
    assert api("jobs").status_code == 200


def test_forbidden_resource_is_403_others_still_work(sim, api):
    sim.configure(forbidden=["files"])
    r = api("files")
    assert r.status_code == 403 and "error" in r.json()
    assert api("jobs").status_code == 200


def test_every_resource_lists_under_its_key_with_default_size_10(api):
    for resource, (_, key) in RESOURCES.items():
        r = api(resource)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/json"
        body = r.json()
        assert set(body) == {"count", key}
        assert body["count"] == COUNTS[resource]
        assert len(body[key]) == 10
        rec = body[key][0]
        assert {"id", "name", "created_by", "date_created", "date_updated", "is_active"} <= set(rec)
        assert isinstance(rec["date_created"], int) and rec["date_updated"] >= rec["date_created"]


def test_size_zero_returns_only_the_count_and_unknown_params_are_ignored(api):
    body = api("tasks", size=0).json()
    assert body == {"count": 12_000, "results": []}
    filtered = api("tasks", size=0, filter=rng("date_created", lt=1_600_000_007)).json()
    assert filtered == {"count": 3, "results": []}  # three records share each timestamp
    assert len(api("jobs", limit=5).json()["results"]) == 10  # `limit` is not a thing here


@pytest.mark.parametrize("params", [{"from": -1}, {"size": -5}, {"size": "ten"}, {"from": "1.5"},
                                    {"filter": "{not json"}, {"filter": rng("name", gte=1)},
                                    {"filter": rng("date_updated", eq=1)}, {"sort_field": "name"},
                                    {"sort_direction": "up"}])
def test_bad_parameters_are_400_with_an_error(api, params):
    r = api("jobs", **params)
    assert r.status_code == 400
    assert r.json()["error"]


def test_result_window_is_enforced(api):
    assert api("tasks", **{"from": 9000, "size": 1000}).status_code == 200
    r = api("tasks", **{"from": 9001, "size": 1000})
    assert r.status_code == 400
    assert r.json()["error"].startswith(
        "result window is too large, from + size must be less than or equal to: [10000]")


def test_size_above_max_is_clamped(api):
    body = api("tasks", size=5000).json()
    assert len(body["results"]) == 1000 and body["count"] == 12_000


def test_page_cap_returns_fewer_records_silently(sim, api):
    sim.configure(page_cap=7, page_caps={"contacts": 3})
    assert len(api("jobs", size=50).json()["results"]) == 7
    assert len(api("contacts", size=50).json()["results"]) == 3
    assert len(api("jobs", size=5).json()["results"]) == 5
    # Advancing by records received still reads everything, in order, exactly once.
    recs, pages = read_all(api, "jobs", size=50)
    assert [r["id"] for r in recs] == sim.ids("jobs")
    assert pages == -(-60 // 7)


# --------------------------------------------------------------------------- filter & sort
def test_date_created_ranges_and_split_read_of_a_resource_above_the_window(sim, api):
    all_recs = sim.records("tasks")
    lo, hi = all_recs[3000]["date_created"], all_recs[7000]["date_created"]
    cases = {
        json.dumps({"must": [{"range": {"date_created": {"gte": lo}}},
                             {"range": {"date_created": {"lt": hi}}}]}): lambda d: lo <= d < hi,
        rng("date_created", gt=lo, lte=hi): lambda d: lo < d <= hi,
    }
    for flt, pred in cases.items():
        expected = [r["id"] for r in all_recs if pred(r["date_created"])]
        got, _ = read_all(api, "tasks", filter=flt)
        assert [r["id"] for r in got] == expected
        assert api("tasks", size=0, filter=flt).json()["count"] == len(expected)

    # 12,000 records: only readable through date_created ranges of <= 10,000 records each.
    mid = all_recs[6000]["date_created"]
    halves = [rng("date_created", lt=mid), rng("date_created", gte=mid)]
    assert all(api("tasks", size=0, filter=f).json()["count"] <= 10_000 for f in halves)
    ids = [r["id"] for f in halves for r in read_all(api, "tasks", filter=f)[0]]
    assert ids == sim.ids("tasks") and len(set(ids)) == 12_000


def test_date_updated_filter_and_sorts_break_ties_on_id(sim, api):
    # Edited records share one date_updated: a tie the id must break.
    edited = set(sim.mutate("jobs", edit=5)["edited"])
    recs = sim.records("jobs")
    asc = sorted(recs, key=lambda r: (r["date_updated"], r["id"]))

    got, _ = read_all(api, "jobs", size=7, sort_field="date_updated")
    assert [r["id"] for r in got] == [r["id"] for r in asc]
    got, _ = read_all(api, "jobs", size=7, sort_field="date_updated", sort_direction="desc")
    assert [r["id"] for r in got] == [r["id"] for r in reversed(asc)]
    assert {r["id"] for r in got[:5]} == edited and [r["id"] for r in got[:5]] == sorted(edited, reverse=True)

    # date_created desc: ties (3 records a second) also break on id, descending.
    got, _ = read_all(api, "jobs", size=9, sort_direction="desc")
    assert [r["id"] for r in got] == sorted((r["id"] for r in recs), reverse=True)

    cut = asc[20]["date_updated"]
    flt = json.dumps({"must": [{"range": {"date_updated": {"gte": cut}}},
                               {"range": {"date_created": {"lt": recs[50]["date_created"]}}}]})
    expected = [r["id"] for r in recs if r["date_updated"] >= cut and r["date_created"] < recs[50]["date_created"]]
    got, _ = read_all(api, "jobs", size=4, filter=flt)
    assert [r["id"] for r in got] == expected and expected


# --------------------------------------------------------------------------- drift & faults
def test_offset_drift_duplicates_but_never_skips(sim, api):
    sim.configure(drift_every=2)
    recs, pages = read_all(api, "jobs", size=8)
    ids = [r["id"] for r in recs]
    assert set(ids) == set(sim.ids("jobs"))  # nothing skipped
    assert len(ids) > len(set(ids))  # but some records came twice
    assert len(ids) - len(set(ids)) == (pages - 1) // 2  # one duplicate per 2nd page after the first
    assert api("jobs", size=0).json()["count"] > 60  # the listing's count grew with the drift
    # A new listing (from=0) starts without shift.
    assert [r["id"] for r in api("jobs", size=60).json()["results"]] == sim.ids("jobs")


def test_the_adversary_repeats_a_record_at_a_page_head_without_shifting(sim, api):
    sim.configure(repeat_every=2)
    first = api("jobs", size=10).json()["results"]
    second = api("jobs", **{"from": 10, "size": 10}).json()["results"]
    assert second[0] == first[-1]  # the previous page's last record again
    assert [r["id"] for r in second[1:]] == sim.ids("jobs")[10:19]  # nothing moved; one fewer fresh


def test_the_adversary_inserts_anywhere_and_hard_deletes(sim, api):
    before = set(sim.ids("tasks"))
    sim.configure(insert_every=1)
    api("tasks", size=5)
    inserted = set(sim.ids("tasks")) - before
    assert len(inserted) == 1
    record = next(r for r in sim.records("tasks") if r["id"] in inserted)
    dates = sorted(r["date_created"] for r in sim.records("tasks"))
    assert dates[0] <= record["date_created"] < dates[-1]  # not appended: somewhere inside
    ordered = [(r["date_created"], r["id"]) for r in api("tasks", size=1000).json()["results"]]
    assert ordered == sorted(ordered)  # the listing is still sorted with the stranger in it

    sim.configure(insert_every=None, delete_every=1)
    count = api("tasks", size=0).json()["count"]
    api("tasks", **{"from": 20, "size": 5})  # a delete before `from` ...
    api("tasks", **{"from": 20, "size": 5})  # ... then one after it
    assert api("tasks", size=0).json()["count"] == count - 2
    assert len(sim.ids_ever("tasks") - set(sim.ids("tasks"))) == 2


def test_the_adversary_caps_count_at_the_result_window(sim, api):
    sim.configure(count_capped=True, result_window=50)
    body = api("jobs", size=5).json()
    assert body["count"] == 50 < COUNTS["jobs"]


def test_faults_cycle_deterministically_and_a_retry_succeeds(sim, api):
    sim.configure(fault_every=2, fault_kinds=["429", "500", "502", "503", "504", "drop"], retry_after=0)
    seen = []
    for _ in range(6):
        assert api("jobs", size=3).status_code == 200  # request 1, 3, 5, ...: real answers
        try:
            r = api("jobs", size=3)  # request 2, 4, 6, ...: the next fault kind
        except requests.ConnectionError:
            seen.append("drop")
            continue
        seen.append(str(r.status_code))
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "0"
        if r.status_code == 502:
            assert r.headers["Content-Type"] == "text/html" and r.text.startswith("<html>")
        else:
            assert "error" in r.json()
    assert seen == ["429", "500", "502", "503", "504", "drop"]
    assert api("jobs", size=3).status_code == 200  # the retry after a drop works too
    assert api("jobs", size=0).status_code == 200  # count requests are never faulted
    assert sim.stats()["statuses"]["jobs"]["drop"] == 1


def test_fail_resources_always_fail_and_corrupt_bodies(sim, api):
    sim.configure(fail_resources={"tasks": 503},
                  corrupt={"jobs": "html", "contacts": "no_key", "files": "truncated"})
    assert [api("tasks").status_code for _ in range(4)] == [503] * 4
    r = api("jobs")
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/html"
    r = api("contacts")
    assert r.status_code == 200 and "results" not in r.json()
    r = api("files")
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.text)
    assert api("activities").status_code == 200


def test_latency_is_applied(sim, api):
    sim.configure(latency_ms=150)
    t = time.perf_counter()
    assert api("jobs").status_code == 200
    assert time.perf_counter() - t >= 0.15


def test_invalid_config_is_rejected(sim):
    with pytest.raises(ValueError):
        sim.configure(fault_kinds=["418"])
    with pytest.raises(ValueError):
        sim.configure(page_caps={"nope": 3})
    with pytest.raises(ValueError):
        sim.configure(seed=1)  # not live
    assert sim.configure()["fault_every"] is None
    assert sim.configure(forbidden={"tasks"})["forbidden"] == ["tasks"]  # sets are fine too


# --------------------------------------------------------------------------- mutation
def test_mutations_are_visible_through_a_date_updated_filter(sim, api):
    before = sim.records("jobs")
    cursor = max(r["date_updated"] for r in before)
    out = sim.mutate("jobs", edit=4, insert=3, deactivate=2, add_field={"name": "colour", "value": "vert"})
    assert len(out["edited"]) == 4 and len(out["deactivated"]) == 2
    assert out["inserted"] == ["job_00000060", "job_00000061", "job_00000062"]  # numbering continues
    edited_idx = sorted(int(i.split("_")[1]) for i in out["edited"])
    assert edited_idx[-1] - edited_idx[0] > 30  # spread over the dataset, not clustered

    changed, _ = read_all(api, "jobs", filter=rng("date_updated", gt=cursor))
    by_id = {r["id"]: r for r in changed}
    assert set(by_id) == set(out["edited"]) | set(out["inserted"]) | set(out["deactivated"])
    now = by_id[out["inserted"][0]]["date_updated"]
    assert now >= int(time.time()) - 5 and now > cursor
    assert all(by_id[i]["colour"] == "vert" for i in out["edited"] + out["inserted"])
    assert all(by_id[i]["is_active"] is False for i in out["deactivated"])
    assert all(by_id[i]["date_created"] == now for i in out["inserted"])

    # Inserted records come last in date_created order; the total grew.
    body = api("jobs", size=0).json()
    assert body["count"] == 63
    assert [r["id"] for r in api("jobs", **{"from": 60, "size": 10}).json()["results"]] == out["inserted"]

    # A later mutation gets a strictly later clock.
    later = sim.mutate("jobs", edit=1)
    rec = next(r for r in sim.records("jobs") if r["id"] == later["edited"][0])
    assert rec["date_updated"] > now

    sim.reset()
    assert sim.records("jobs") == before


def test_late_records_carry_a_new_field(sim):
    recs = sim.records("contacts")
    late = [r["id"] for r in recs if "priority" in r]
    assert late == [r["id"] for r in recs[36:]]  # index >= 90% of 40
    assert all(isinstance(r["priority"], str) for r in recs[36:])


def test_data_is_deterministic_per_seed_and_varied(sim):
    other = CrmSimulator(SimulatorConfig(counts=COUNTS, api_key=KEY))  # never started: API only
    assert other.records("jobs") == sim.records("jobs")
    assert CrmSimulator(SimulatorConfig(seed=7, counts=COUNTS)).records("jobs") != sim.records("jobs")
    jobs = sim.records("jobs")
    assert {type(j["budget"]) for j in jobs} >= {int, str}  # a field whose type varies
    assert any(j["tags"] == [] for j in jobs) and any(j["tags"] for j in jobs)
    assert any(ord(c) > 127 for j in jobs for c in j["name"])
    assert all(set(j["location"]["geo"]) == {"lat", "lng"} for j in jobs)


def test_million_records_are_lazy_and_the_common_query_is_direct():
    # a million jobs, the resource asked; the others' size changes nothing here (each resource is
    # indexed on its own at start: five millions cost five times the CPU, 17 s, for the same answer)
    big = CrmSimulator(SimulatorConfig(api_key=KEY, counts={"jobs": 1_000_000})).start()
    try:
        tail_start = 1_600_000_000 + (999_000 // 3) * 7
        r = requests.get(big.url + "/v1/jobs", headers=AUTH, timeout=10,
                         params={"size": 1000, "from": 0, "filter": rng("date_created", gte=tail_start)})
        body = r.json()
        assert body["count"] == 1000
        assert [x["id"] for x in body["results"]] == [f"job_{i:08d}" for i in range(999_000, 1_000_000)]
    finally:
        big.stop()


# --------------------------------------------------------------------------- admin & server
def test_admin_endpoints_over_http(sim, api):
    base = sim.url
    assert requests.post(base + "/_admin/config", json={"page_cap": 4}, timeout=10).json()["page_cap"] == 4
    assert len(api("jobs").json()["results"]) == 4
    assert requests.post(base + "/_admin/config", json={"page_cap": "x"}, timeout=10).status_code == 400
    out = requests.post(base + "/_admin/mutate", json={"resource": "files", "insert": 2}, timeout=10).json()
    assert out["inserted"] == ["fil_00000025", "fil_00000026"] and out["edited"] == []
    ids = requests.get(base + "/_admin/ids", params={"resource": "files"}, timeout=10).json()
    assert ids["ids"][-2:] == out["inserted"] and len(ids["active"]) == 27
    recs = requests.get(base + "/_admin/records", params={"resource": "files"}, timeout=10).json()["records"]
    assert recs == sim.records("files")
    stats = requests.get(base + "/_admin/stats", timeout=10).json()
    assert stats["requests"]["jobs"] == 1 and stats["records_served"]["jobs"] == 4
    api("jobs", size=0)
    assert sim.stats()["count_requests"]["jobs"] == 1
    requests.post(base + "/_admin/stats/reset", timeout=10)
    assert sim.stats()["requests"]["jobs"] == 0
    requests.post(base + "/_admin/reset", timeout=10)
    assert len(api("jobs").json()["results"]) == 10 and len(sim.ids("files")) == 25


def test_connections_are_kept_alive():
    with CrmSimulator(SimulatorConfig(api_key=KEY, counts=COUNTS)) as s:
        parts = urlsplit(s.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        sockets = set()
        for start in (0, 10, 20):  # three requests, one socket (http.client reopens if told to close)
            conn.request("GET", f"/v1/jobs?from={start}", headers=AUTH)
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 200 and resp.version == 11
            assert body["results"][0]["id"] == f"job_{start:08d}"
            assert conn.sock is not None  # the server did not ask to close
            sockets.add(id(conn.sock))
        assert len(sockets) == 1
        conn.close()


@contextlib.contextmanager
def _cli_simulator(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m crm_assets.simulator` on a free port with `flags`: (process, its URL)."""
    ready = tmp_path / "ready"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "crm_assets.simulator", "--port", "0", "--ready-file", str(ready),
         "--records", "jobs=5,tasks=20", "--api-key", KEY, *flags],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        for _ in range(100):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        yield proc, ready.read_text().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_starts_writes_ready_file_and_stops_on_sigterm(tmp_path: Path):
    with _cli_simulator(tmp_path) as (proc, url):
        assert requests.get(url + "/v1/jobs", headers=AUTH, timeout=10).json()["count"] == 5
        assert requests.get(url + "/v1/contacts", headers=AUTH, timeout=10).json()["count"] == DEFAULT_COUNTS["contacts"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out.strip() == f"CRM simulator listening on {url} (api key: {KEY})"
        assert KEY not in err  # quiet by default, and never logs the token


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until_stopped(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def test_start_simulator_returns_once_it_serves_and_stop_group_ends_it(tmp_path: Path):
    proc, url = start_simulator(tmp_path / "url", "--records", "jobs=5", api_key=KEY)
    try:
        assert requests.get(url + "/v1/jobs", headers=AUTH, timeout=10).json()["count"] == 5
    finally:
        stop_group(proc)
    assert proc.returncode == 0  # SIGTERM: the simulator shuts down cleanly
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/v1/jobs", headers=AUTH, timeout=5)


def test_start_simulator_fails_fast_when_the_simulator_exits(tmp_path: Path):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"--no-such-option\) exited with code 2") as failed:
        start_simulator(tmp_path / "url", "--no-such-option", api_key=KEY, output=subprocess.DEVNULL)
    assert KEY not in str(failed.value)
    assert time.monotonic() - started < 30


def test_stop_group_stops_what_the_leader_started_and_escalates(tmp_path: Path):
    child = tmp_path / "child.pid"
    # a leader that ignores SIGTERM, like its child (ignored signals survive exec)
    leader = subprocess.Popen(["sh", "-c", f"trap '' TERM; sleep 60 & echo $! > {child}; wait"],
                              start_new_session=True)
    deadline = time.monotonic() + 10
    while not (child.exists() and child.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(child.read_text())

    stop_group(leader, ((signal.SIGTERM, 0.5), (signal.SIGKILL, 5.0)))

    assert leader.returncode == -signal.SIGKILL
    assert _wait_until_stopped(pid)


# --------------------------------------------------------------------------- the real API family's shape
# All opt-in (SimulatorConfig.key_field, counts["invoices"], default_sort_*); the tests above run on
# the defaults and must not see any of it.
SMALL = {"jobs": 60, "contacts": 40, "tasks": 90, "activities": 30, "files": 25}


@pytest.fixture(scope="module")
def invoicing():
    """tasks and invoices both above the 10,000 result window."""
    with CrmSimulator(SimulatorConfig(api_key=KEY, counts={**COUNTS, "invoices": 12_000})) as s:
        yield s


@pytest.fixture()
def inv_api(invoicing):
    yield from _fresh_api(invoicing)


def test_records_can_be_keyed_by_jnid_with_references_unchanged(sim):
    with CrmSimulator(SimulatorConfig(api_key=KEY, counts=SMALL, key_field="jnid")) as jn, \
            requests.Session() as session:
        session.headers.update(AUTH)
        get = _getter(jn, session)
        plain = CrmSimulator(SimulatorConfig(api_key=KEY, counts=SMALL))  # never started: API only
        for resource, (_, key) in RESOURCES.items():
            recs = get(resource, size=1000).json()[key]
            assert recs and all("jnid" in r and "id" not in r for r in recs)
            assert [r["jnid"] for r in recs] == jn.ids(resource) == plain.ids(resource)  # same values
            # Only the key's name differs; everything else, references included, is the same record.
            expected = plain.records(resource)
            assert recs == [{("jnid" if k == "id" else k): v for k, v in r.items()} for r in expected]
            assert list(recs[0])[0] == "jnid"  # where `id` stood
        jobs = jn.records("jobs")
        assert any(r["related"] for r in jobs)
        assert all(set(ref) == {"type", "id"} for r in jobs for ref in r["related"])
        assert all("job_id" in r for r in jn.records("tasks"))
        ids = requests.get(jn.url + "/_admin/ids", params={"resource": "files"}, timeout=10).json()
        assert ids["ids"] == jn.ids("files") and set(ids["active"]) == set(ids["ids"])
        with pytest.raises(ValueError, match="not live-configurable"):
            jn.configure(key_field="id")  # set at start only
    with pytest.raises(ValueError, match="key_field"):
        CrmSimulator(SimulatorConfig(key_field="uuid"))
    assert "id" in sim.records("jobs")[0] and "jnid" not in sim.records("jobs")[0]  # the default


def test_mutations_and_the_adversary_work_with_jnid():
    config = SimulatorConfig(api_key=KEY, counts={**SMALL, "invoices": 50}, key_field="jnid")
    with CrmSimulator(config) as jn, requests.Session() as session:
        session.headers.update(AUTH)
        get = _getter(jn, session)
        cursor = max(r["date_updated"] for r in jn.records("jobs"))
        out = jn.mutate("jobs", edit=3, insert=2, deactivate=2)
        assert out["inserted"] == ["job_00000060", "job_00000061"]
        assert len(out["edited"]) == 3 and len(out["deactivated"]) == 2
        changed, _ = read_all(get, "jobs", filter=rng("date_updated", gt=cursor))
        assert {r["jnid"] for r in changed} == set(out["edited"]) | set(out["inserted"]) | set(out["deactivated"])
        assert all("id" not in r for r in changed)
        assert jn.mutate("invoices", insert=1)["inserted"] == ["inv_00000050"]
        over_http = requests.post(jn.url + "/_admin/mutate", json={"resource": "files", "insert": 1}, timeout=10)
        assert over_http.json()["inserted"] == ["fil_00000025"]

        # repeat: the previous page's last record again at the head, nothing shifted.
        jn.configure(repeat_every=2)
        first = get("contacts", size=10).json()["results"]
        second = get("contacts", **{"from": 10, "size": 10}).json()["results"]
        assert second[0] == first[-1] and "jnid" in second[0]
        assert [r["jnid"] for r in second[1:]] == jn.ids("contacts")[10:19]

        # insert and delete, on every page: a read still lists jnid-keyed records in (date_created, jnid) order.
        jn.configure(repeat_every=None, insert_every=1, delete_every=2)
        before = set(jn.ids("tasks"))
        page = get("tasks", size=1000).json()["results"]
        get("tasks", **{"from": 20, "size": 5})
        assert all("jnid" in r and "id" not in r for r in page)
        assert [(r["date_created"], r["jnid"]) for r in page] == sorted((r["date_created"], r["jnid"]) for r in page)
        now = set(jn.ids("tasks"))
        assert len(now - before) == 2  # one insert before each page
        assert len(jn.ids_ever("tasks") - now) == 1  # one hard delete, before the 2nd page
        assert {r["jnid"] for r in jn.records("tasks")} == now

        # drift duplicates but never skips, whatever the key is called.
        jn.reset()
        jn.configure(drift_every=2)
        recs, _ = read_all(get, "jobs", size=8)
        assert {r["jnid"] for r in recs} == set(jn.ids("jobs")) and len(recs) > len(jn.ids("jobs"))


def test_invoices_are_served_only_when_counts_name_them(sim, api):
    # The default simulator: /v1/invoices is a 404 like any path that does not exist.
    unknown = requests.get(sim.url + "/v1/nope", headers=AUTH, timeout=10)
    r = requests.get(sim.url + "/v1/invoices", headers=AUTH, timeout=10)
    assert r.status_code == unknown.status_code == 404
    assert r.json() == {"error": "no such endpoint: /v1/invoices"}
    assert "invoices" not in sim.resources and list(sim.resources) == list(RESOURCES)
    assert set(sim.stats()["requests"]) == set(RESOURCES)  # stats keep their five keys
    assert "invoices" not in DEFAULT_COUNTS and "invoices" not in sim.config.counts
    for bad in ({"page_caps": {"invoices": 3}}, {"fail_resources": {"invoices": 503}},
                {"corrupt": {"invoices": "html"}}, {"forbidden": ["invoices"]}):
        with pytest.raises(ValueError, match="invoices"):
            sim.configure(**bad)
    with pytest.raises(ValueError):
        sim.mutate("invoices", insert=1)
    with pytest.raises(ValueError):
        sim.records("invoices")

    # Named in counts: served, with stats, config and admin endpoints that know it.
    with CrmSimulator(SimulatorConfig(api_key=KEY, counts={"jobs": 10, "invoices": 0})) as empty:
        body = requests.get(empty.url + "/v1/invoices", headers=AUTH, timeout=10).json()
        assert body == {"count": 0, "results": []}  # served, with no records
        assert list(empty.stats()["requests"]) == [*RESOURCES, "invoices"]
        assert empty.stats()["requests"]["invoices"] == 1
        empty.configure(page_caps={"invoices": 3}, forbidden=["invoices"])
        assert requests.get(empty.url + "/v1/invoices", headers=AUTH, timeout=10).status_code == 403
        assert requests.post(empty.url + "/v1/invoices", headers=AUTH, timeout=10).status_code == 405


def test_invoices_are_paged_filtered_and_counted_like_the_others(invoicing, inv_api):
    body = inv_api("invoices").json()
    assert set(body) == {"count", "results"} and body["count"] == 12_000 and len(body["results"]) == 10
    assert inv_api("invoices", size=0).json() == {"count": 12_000, "results": []}
    first_second = rng("date_created", lt=1_600_000_007)
    assert inv_api("invoices", size=0, filter=first_second).json() == {"count": 3, "results": []}
    assert invoicing.stats()["count_requests"]["invoices"] == 2

    recs = invoicing.records("invoices")
    job_ids = set(invoicing.ids("jobs"))
    for r in recs[:500]:
        assert {"id", "name", "created_by", "date_created", "date_updated", "is_active"} <= set(r)
        assert isinstance(r["number"], str) and isinstance(r["total"], float) and isinstance(r["status"], str)
        assert r["job_id"] in job_ids  # a reference into jobs, like a task's
        assert isinstance(r["date_due"], int) and r["date_due"] > r["date_created"]
        assert (r["date_due"] - r["date_created"]) % 86_400 == 0
    assert len({r["status"] for r in recs}) > 3 and len({r["number"] for r in recs}) == 12_000

    # The 10,000 result window, and a split read by date_created that gets every invoice once.
    assert inv_api("invoices", **{"from": 9000, "size": 1000}).status_code == 200
    assert inv_api("invoices", **{"from": 9001, "size": 1000}).status_code == 400
    mid = recs[6000]["date_created"]
    halves = [rng("date_created", lt=mid), rng("date_created", gte=mid)]
    assert all(inv_api("invoices", size=0, filter=f).json()["count"] <= 10_000 for f in halves)
    ids = [r["id"] for f in halves for r in read_all(inv_api, "invoices", filter=f)[0]]
    assert ids == invoicing.ids("invoices") and len(set(ids)) == 12_000

    # date_updated filter and sort, as for the others.
    cut = sorted(r["date_updated"] for r in recs)[11_950]
    got, _ = read_all(inv_api, "invoices", size=7, filter=rng("date_updated", gte=cut),
                      sort_field="date_updated", sort_direction="desc")
    expected = sorted((r for r in recs if r["date_updated"] >= cut), key=lambda r: (r["date_updated"], r["id"]))
    assert [r["id"] for r in got] == [r["id"] for r in reversed(expected)]

    # page caps, faults and mutations address invoices by name.
    invoicing.configure(page_caps={"invoices": 4})
    assert len(inv_api("invoices", size=50).json()["results"]) == 4
    assert len(inv_api("jobs", size=50).json()["results"]) == 50
    invoicing.configure(fail_resources={"invoices": 503})
    assert inv_api("invoices").status_code == 503
    assert invoicing.stats()["statuses"]["invoices"]["503"] == 1
    assert invoicing.mutate("invoices", insert=1)["inserted"] == ["inv_00012000"]


def test_the_default_sort_applies_only_when_the_request_names_none(sim, api):
    asc = sim.ids("jobs")
    assert [r["id"] for r in api("jobs", size=60).json()["results"]] == asc  # the default: asc
    sim.configure(default_sort_direction="desc")
    assert [r["id"] for r in api("jobs", size=60).json()["results"]] == asc[::-1]
    assert [r["id"] for r in api("jobs", size=60, sort_direction="asc").json()["results"]] == asc
    by_updated = [r["id"] for r in sorted(sim.records("jobs"), key=lambda r: (r["date_updated"], r["id"]))]
    got = api("jobs", size=60, sort_field="date_updated").json()["results"]
    assert [r["id"] for r in got] == by_updated[::-1]  # the default direction on a named field

    # The real API family's reported default: date_updated, descending.
    sim.configure(default_sort_field="date_updated")
    assert [r["id"] for r in api("jobs", size=60).json()["results"]] == by_updated[::-1]
    got = api("jobs", size=60, sort_field="date_created", sort_direction="asc").json()["results"]
    assert [r["id"] for r in got] == asc  # a client that sends both is unaffected
    assert sim.configure()["default_sort_direction"] == "desc"
    for bad in ({"default_sort_direction": "down"}, {"default_sort_field": "name"}):
        with pytest.raises(ValueError):
            sim.configure(**bad)
    sim.reset()  # back to the config given at construction
    assert [r["id"] for r in api("jobs", size=60).json()["results"]] == asc

    # Set at construction too.
    config = SimulatorConfig(api_key=KEY, counts=SMALL, default_sort_direction="desc")
    with CrmSimulator(config) as desc, requests.Session() as session:
        session.headers.update(AUTH)
        got = _getter(desc, session)("files", size=100).json()["files"]
        assert [r["id"] for r in got] == desc.ids("files")[::-1]


def test_cli_flags_for_the_real_api_family(tmp_path: Path):
    from crm_assets.simulator.__main__ import build_parser

    help_text = build_parser().format_help()
    for flag in ("--key-field {id,jnid}", "--invoices N", "--default-sort-direction {asc,desc}",
                 "--default-sort-field {date_created,date_updated}"):
        assert flag in help_text
    for bad in (["--invoices", "-1"], ["--key-field", "uuid"], ["--default-sort-direction", "up"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)

    with _cli_simulator(tmp_path, "--key-field", "jnid", "--invoices", "7",
                        "--default-sort-direction", "desc") as (proc, url):
        body = requests.get(url + "/v1/invoices", headers=AUTH, params={"size": 100}, timeout=10).json()
        assert body["count"] == 7
        assert [r["jnid"] for r in body["results"]] == [f"inv_{i:08d}" for i in range(6, -1, -1)]
        jobs = requests.get(url + "/v1/jobs", headers=AUTH, params={"sort_direction": "asc"}, timeout=10).json()
        assert [r["jnid"] for r in jobs["results"]] == [f"job_{i:08d}" for i in range(5)]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err


# --------------------------------------------------------------------------- an API that does not do what it is asked
# All opt-in (SimulatorConfig.ignore_sort, ignore_filter, ignore_from, exclusive_bounds, page_count, fields_param; mutate's null_cursor,
# missing_cursor, silent_edit, delete, dated_ahead); nothing above sees any of it.
def _by_updated(records: list[dict]) -> list[str]:
    """Ids in (date_updated, id) order, records without a date_updated left out."""
    valued = [r for r in records if r.get("date_updated") is not None]
    return [r["id"] for r in sorted(valued, key=lambda r: (r["date_updated"], r["id"]))]


def test_ignore_sort_serves_the_default_order_for_the_named_resources_only(sim, api):
    asc = sim.ids("jobs")
    by_updated = _by_updated(sim.records("contacts"))
    sim.configure(ignore_sort=["jobs"])
    got = api("jobs", size=60, sort_field="date_updated", sort_direction="desc").json()["results"]
    assert [r["id"] for r in got] == asc  # asked date_updated desc, served date_created asc
    got = api("contacts", size=60, sort_field="date_updated", sort_direction="desc").json()["results"]
    assert [r["id"] for r in got] == by_updated[::-1]  # the others still sort as asked

    # Filters, from/size and count still apply; the sort parameters are not even read.
    cut = sim.records("jobs")[30]["date_created"]
    body = api("jobs", **{"from": 2, "size": 5}, filter=rng("date_created", gte=cut), sort_direction="desc").json()
    assert body["count"] == 30 and [r["id"] for r in body["results"]] == asc[32:37]
    assert api("jobs", sort_direction="up").status_code == 200
    assert api("contacts", sort_direction="up").status_code == 400

    # The default order is the simulator's, whatever it is set to; "*" is every resource.
    sim.configure(ignore_sort=["*"], default_sort_field="date_updated", default_sort_direction="desc")
    got = api("contacts", size=60, sort_field="date_created", sort_direction="asc").json()["results"]
    assert [r["id"] for r in got] == by_updated[::-1]


def test_ignore_filter_serves_and_counts_the_whole_resource(sim, api):
    first_second = rng("date_created", lt=1_600_000_007)
    sim.configure(ignore_filter=["tasks"])
    assert api("tasks", size=0, filter=first_second).json() == {"count": 12_000, "results": []}
    body = api("tasks", **{"from": 100, "size": 5}, filter=first_second, sort_direction="desc").json()
    assert body["count"] == 12_000
    assert [r["id"] for r in body["results"]] == sim.ids("tasks")[::-1][100:105]  # sort and paging apply
    assert api("jobs", size=0, filter=first_second).json()["count"] == 3  # the others filter
    # The parameter is not read at all: a malformed filter is no 400 where it is ignored.
    assert api("tasks", size=0, filter="{not json").json()["count"] == 12_000
    assert api("jobs", filter="{not json").status_code == 400

    sim.configure(ignore_filter=["*"])
    assert api("jobs", size=0, filter=first_second).json()["count"] == 60


def test_records_without_a_cursor_are_ranged_out_and_sorted_last(sim, api):
    reply = requests.post(sim.url + "/_admin/mutate", timeout=10,
                          json={"resource": "jobs", "null_cursor": 3, "missing_cursor": 3}).json()
    assert set(reply) == {"edited", "inserted", "deactivated", "null_cursor", "missing_cursor"}
    null, missing = reply["null_cursor"], reply["missing_cursor"]
    assert len(null) == len(missing) == 3 and not set(null) & set(missing)
    cursorless = sorted(null + missing)
    recs = sim.records("jobs")
    assert [r["id"] for r in recs] == sim.ids("jobs") and len(recs) == 60  # still listed by the admin side
    by_id = {r["id"]: r for r in recs}
    assert all(by_id[i]["date_updated"] is None for i in null)
    assert all("date_updated" not in by_id[i] for i in missing)

    # Unfiltered: every record, as the API serves them (null, or no key at all).
    got, _ = read_all(api, "jobs", size=7)
    assert [r["id"] for r in got] == sim.ids("jobs") and got == recs
    # No range on date_updated matches them, and count agrees.
    valued = [r["id"] for r in recs if r["id"] not in cursorless]
    since = rng("date_updated", gte=0)
    assert api("jobs", size=0, filter=since).json()["count"] == 54
    assert [r["id"] for r in read_all(api, "jobs", size=7, filter=since)[0]] == valued
    got, _ = read_all(api, "jobs", size=7, filter=since, sort_field="date_updated", sort_direction="desc")
    assert [r["id"] for r in got] == _by_updated(recs)[::-1]

    # Sorted on date_updated they come after every record with a value, in both directions.
    got, _ = read_all(api, "jobs", size=7, sort_field="date_updated")
    assert [r["id"] for r in got] == _by_updated(recs) + cursorless
    got, _ = read_all(api, "jobs", size=7, sort_field="date_updated", sort_direction="desc")
    assert [r["id"] for r in got] == _by_updated(recs)[::-1] + cursorless[::-1]

    # date_created treats them as any other record, filtered and sorted.
    lo, hi = by_id[cursorless[0]]["date_created"], by_id[cursorless[-1]]["date_created"]
    between = rng("date_created", gte=lo, lte=hi)
    inside = [r for r in recs if lo <= r["date_created"] <= hi]
    assert api("jobs", size=0, filter=between).json()["count"] == len(inside)
    assert [r["id"] for r in read_all(api, "jobs", size=7, filter=between)[0]] == [r["id"] for r in inside]
    got, _ = read_all(api, "jobs", size=7, filter=between, sort_field="date_updated", sort_direction="desc")
    assert [r["id"] for r in got] == _by_updated(inside)[::-1] + cursorless[::-1]

    # An ordinary edit gives them a value again (edit=60: every job).
    edited = sim.mutate("jobs", edit=60)["edited"]
    assert set(cursorless) <= set(edited)
    assert api("jobs", size=0, filter=since).json()["count"] == 60
    assert all(isinstance(r["date_updated"], int) for r in api("jobs", size=60).json()["results"])


def test_the_adversary_copes_with_records_without_a_cursor(sim, api):
    assert len(sim.mutate("files", null_cursor=25)["null_cursor"]) == 25  # not one file has a cursor
    before = set(sim.ids("files"))
    sim.configure(insert_every=1, delete_every=2)
    page = api("files", size=30, sort_field="date_updated").json()["files"]
    (new,) = set(sim.ids("files")) - before
    # It copies another record's date_updated; that one has none, so it takes its own date_created.
    assert page[0]["id"] == new and page[0]["date_updated"] == page[0]["date_created"]
    assert [r["id"] for r in page[1:]] == sorted(before)  # the rest: no cursor, in id order
    body = api("files", **{"from": 10, "size": 5}, sort_field="date_updated", sort_direction="desc").json()
    assert body["count"] == 26 and len(sim.ids_ever("files")) - len(sim.ids("files")) == 1


def test_silent_edit_changes_a_record_but_not_its_date_updated(sim, api):
    before = {r["id"]: r for r in sim.records("jobs")}
    cursor = max(r["date_updated"] for r in before.values())
    out = sim.mutate("jobs", silent_edit=4)
    assert set(out) == {"edited", "inserted", "deactivated", "silently_edited"} and len(out["silently_edited"]) == 4
    now = {r["id"]: r for r in api("jobs", size=60).json()["results"]}
    for i in out["silently_edited"]:
        assert now[i]["name"] != before[i]["name"] and "(silent edit" in now[i]["name"]
        assert {**now[i], "name": before[i]["name"]} == before[i]  # date_updated included: unchanged
    assert api("jobs", size=0, filter=rng("date_updated", gt=cursor)).json()["count"] == 0  # invisible to a cursor


def test_delete_removes_records_from_every_listing(sim, api):
    out = requests.post(sim.url + "/_admin/mutate", json={"resource": "jobs", "delete": 5, "edit": 2},
                        timeout=10).json()
    deleted = out["deleted"]
    assert len(deleted) == 5 and not set(deleted) & set(out["edited"])
    assert int(max(deleted)[4:]) - int(min(deleted)[4:]) > 30  # spread over the dataset
    live = sim.ids("jobs")
    assert len(live) == 55 and not set(deleted) & set(live) and len(sim.ids_ever("jobs")) == 60
    assert api("jobs", size=0).json()["count"] == 55
    for sort in ("date_created", "date_updated"):
        got, _ = read_all(api, "jobs", size=7, sort_field=sort)
        assert sorted(r["id"] for r in got) == live
    assert requests.get(sim.url + "/_admin/ids", params={"resource": "jobs"}, timeout=10).json()["ids"] == live

    # Never an already-deleted record.
    again = sim.mutate("jobs", delete=40)["deleted"]
    assert again and set(again) <= set(live) and len(set(again)) == len(again)
    assert api("jobs", size=0).json()["count"] == 55 - len(again) == len(sim.ids("jobs"))
    for bad in ({"delete": -1}, {"null_cursor": "3"}, {"silent_edit": True}):
        reply = requests.post(sim.url + "/_admin/mutate", json={"resource": "jobs", **bad}, timeout=10)
        assert reply.status_code == 400 and "error" in reply.json()
    with pytest.raises(ValueError):
        sim.mutate("jobs", missing_cursor=-2)


def test_the_fields_parameter_projects_records_only_when_enabled(sim, api):
    whole = api("jobs", **{"from": 50, "size": 10}).json()["results"]
    assert api("jobs", **{"from": 50, "size": 10}, fields="id,name").json()["results"] == whole  # off: ignored

    sim.configure(fields_param=True)
    wanted = {"id", "name", "date_updated", "priority"}  # priority: only jobs 54.. carry it
    body = api("jobs", **{"from": 50, "size": 10}, fields="id, name,priority,date_updated").json()
    assert body["count"] == 60
    assert body["results"] == [{k: v for k, v in r.items() if k in wanted} for r in whole]
    assert [("priority" in r) for r in body["results"]] == [False] * 4 + [True] * 6
    assert api("jobs", size=0, fields="id").json() == {"count": 60, "results": []}
    assert api("jobs", **{"from": 50, "size": 10}, fields="").json()["results"] == whole  # names nothing

    (gone,) = sim.mutate("jobs", missing_cursor=1)["missing_cursor"]
    got = {r["id"]: r for r in api("jobs", size=60, fields="id,date_updated").json()["results"]}
    assert got[gone] == {"id": gone} and all(set(r) == {"id", "date_updated"} for i, r in got.items() if i != gone)


def test_ignore_from_serves_every_page_from_the_head_for_the_named_resources_only(sim, api):
    sim.configure(ignore_from=["jobs"])
    head = api("jobs", size=5, sort_direction="desc").json()
    assert api("jobs", **{"from": 20, "size": 5}, sort_direction="desc").json() == head  # count as asked
    assert api("jobs", **{"from": "x"}).status_code == 200  # the parameter is not read at all
    assert [r["id"] for r in api("tasks", **{"from": 20, "size": 5}).json()["results"]] == sim.ids("tasks")[20:25]


def test_exclusive_bounds_leave_out_the_seconds_that_gte_and_lte_name(sim, api):
    second = sim.records("jobs")[40]["date_created"]
    exact = rng("date_created", gte=second, lte=second)
    strict = rng("date_created", gt=second - 1, lt=second + 1)
    honest = api("jobs", size=0, filter=exact).json()["count"]
    assert honest >= 1 and api("jobs", size=0, filter=strict).json()["count"] == honest
    sim.configure(exclusive_bounds=["jobs"])
    assert api("jobs", size=0, filter=exact).json()["count"] == 0
    assert api("jobs", size=0, filter=strict).json()["count"] == honest  # gt and lt as asked
    tasks_second = sim.records("tasks")[40]["date_created"]
    assert api("tasks", size=0, filter=rng("date_created", gte=tasks_second, lte=tasks_second)).json()["count"] >= 1


def test_page_count_counts_the_answer_not_the_listing_for_the_named_resources_only(sim, api):
    sim.configure(page_count=["jobs"])
    body = api("jobs", size=7).json()
    assert body["count"] == len(body["results"]) == 7
    assert api("jobs", size=0).json()["count"] == 0
    assert api("tasks", size=0).json()["count"] == len(sim.ids("tasks"))
    sim.configure(page_count=[])


def test_dishonest_config_is_validated(sim):
    sim.reset()  # the config given at construction: all of it off
    config = sim.configure()
    assert (config["ignore_sort"], config["ignore_filter"], config["ignore_from"], config["fields_param"]) == (
        [], [], [], False)
    for bad in ({"ignore_sort": ["nope"]}, {"ignore_filter": ["invoices"]},  # not served here
                {"ignore_sort": "jobs"}, {"ignore_from": "jobs"}, {"exclusive_bounds": ["nope"]}, {"fields_param": "yes"}):
        with pytest.raises(ValueError):
            sim.configure(**bad)
    assert requests.post(sim.url + "/_admin/config", json={"ignore_filter": ["nope"]}, timeout=10).status_code == 400
    assert sim.configure(ignore_sort={"tasks", "jobs"}, ignore_filter=["*"])["ignore_sort"] == ["jobs", "tasks"]
    sim.reset()
    assert sim.configure()["ignore_filter"] == []


def test_cli_flags_for_an_api_that_does_not_do_what_it_is_asked(tmp_path: Path):
    from crm_assets.simulator.__main__ import build_parser

    help_text = build_parser().format_help()
    for flag in ("--ignore-sort RESOURCES", "--ignore-filter RESOURCES", "--ignore-from RESOURCES",
                 "--exclusive-bounds RESOURCES", "--page-count RESOURCES", "--fields-param"):
        assert flag in help_text
    assert build_parser().parse_args(["--ignore-sort", "all", "--ignore-filter", "jobs, tasks"]).ignore_filter == [
        "jobs", "tasks"]
    assert build_parser().parse_args(["--ignore-from", "files"]).ignore_from == ["files"]
    assert build_parser().parse_args(["--page-count", "jobs"]).page_count == ["jobs"]
    for bad in (["--ignore-sort", "nope"], ["--ignore-filter", ","]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)

    with _cli_simulator(tmp_path, "--ignore-sort", "all", "--ignore-filter", "jobs", "--fields-param") as (proc, url):
        def get(resource: str, **params) -> dict:
            return requests.get(url + f"/v1/{resource}", headers=AUTH, params=params, timeout=10).json()

        nothing = rng("date_created", lt=1_500_000_000)
        assert get("jobs", size=0, filter=nothing)["count"] == 5  # filter ignored
        assert get("tasks", size=0, filter=nothing)["count"] == 0
        assert get("tasks", sort_direction="desc", fields="id")["results"] == [
            {"id": f"tsk_{i:08d}"} for i in range(10)]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err


# --------------------------------------------------------------------------- many accounts, one process
PER_ACCOUNT = {"jobs": 30, "contacts": 20, "tasks": 25, "activities": 15, "files": 10}


@pytest.fixture(scope="module")
def accounts_sim():
    config = SimulatorConfig(accounts=["north", "south"], counts=PER_ACCOUNT, page_cap=None)
    with CrmSimulator(config) as s:
        yield s


@pytest.fixture()
def accounts(accounts_sim):
    accounts_sim.reset()
    yield accounts_sim


def _account_get(sim: CrmSimulator, name: str, resource: str, key: str | None = None, **params):
    return requests.get(sim.account_url(name) + f"/v1/{resource}", params=params, timeout=10,
                        headers={"Authorization": f"Bearer {key or 'key-' + name}"})


def test_accounts_serve_their_own_data_under_their_own_prefix_and_key(accounts):
    assert accounts.accounts == ["north", "south"]
    assert accounts.account_url("north") == accounts.url + "/north"
    north = _account_get(accounts, "north", "jobs", size=1000).json()["results"]
    south = _account_get(accounts, "south", "jobs", size=1000).json()["results"]
    assert len(north) == len(south) == PER_ACCOUNT["jobs"]
    # Ids and references stay inside an account, so a record landing in the wrong account shows.
    assert [r["id"] for r in north] == accounts.account("north").ids("jobs") == [
        f"north-job_{i:08d}" for i in range(PER_ACCOUNT["jobs"])]
    tasks = _account_get(accounts, "south", "tasks", size=1000).json()["results"]
    assert tasks and all(t["job_id"].startswith("south-job_") for t in tasks)
    # Its own seed: other names and dates, the same on every start.
    assert [r["name"] for r in north] != [r["name"] for r in south]
    assert north == accounts.account("north").records("jobs")
    again = CrmSimulator(SimulatorConfig(accounts=["south", "north"], counts=PER_ACCOUNT))
    assert again.account("north").records("jobs") == north
    other_seed = CrmSimulator(SimulatorConfig(accounts=["north"], counts=PER_ACCOUNT, seed=7))
    assert other_seed.account("north").records("jobs") != north

    # A's key is a wrong key on B; no key and the root paths of a single account are not served.
    assert _account_get(accounts, "south", "jobs", key="key-north").status_code == 401
    assert requests.get(accounts.account_url("south") + "/v1/jobs", timeout=10).status_code == 401
    assert requests.get(accounts.url + "/v1/jobs", headers={"Authorization": "Bearer key-north"},
                        timeout=10).status_code == 404
    assert requests.get(accounts.url + "/east/v1/jobs", headers={"Authorization": "Bearer key-north"},
                        timeout=10).status_code == 404
    with pytest.raises(ValueError, match="account"):
        accounts.mutate("jobs", edit=1)  # the data is each account's
    with pytest.raises(ValueError, match="east"):
        accounts.account("east")


def test_each_account_has_its_own_admin_mutate_stats_and_live_config(accounts):
    north, south = accounts.account("north"), accounts.account("south")
    out = requests.post(north.url + "/_admin/mutate", json={"resource": "jobs", "insert": 2}, timeout=10).json()
    assert out["inserted"] == ["north-job_00000030", "north-job_00000031"]
    assert north.ids("jobs")[-2:] == out["inserted"] and len(south.ids("jobs")) == PER_ACCOUNT["jobs"]
    assert requests.get(south.url + "/_admin/ids", params={"resource": "jobs"}, timeout=10).json()["ids"] == south.ids("jobs")

    # One account's API fails on every path while the other answers.
    requests.post(south.url + "/_admin/config", json={"fail_resources": {r: 500 for r in PER_ACCOUNT}}, timeout=10)
    assert {_account_get(accounts, "south", r).status_code for r in PER_ACCOUNT} == {500}
    assert {_account_get(accounts, "north", r).status_code for r in PER_ACCOUNT} == {200}
    assert north.configure()["fail_resources"] == {}

    stats = requests.get(accounts.url + "/_admin/stats", timeout=10).json()
    assert stats == accounts.stats() == {"north": north.stats(), "south": south.stats()}
    assert stats["south"]["statuses"]["jobs"] == {"500": 1} and stats["north"]["statuses"]["jobs"] == {"200": 1}
    assert requests.get(north.url + "/_admin/stats", timeout=10).json() == stats["north"]

    # The root's config applies to every account; its reset resets every account.
    assert requests.post(accounts.url + "/_admin/config", json={"page_cap": 3}, timeout=10).json() == {
        "north": north.configure(), "south": south.configure()}
    assert len(_account_get(accounts, "north", "files").json()["files"]) == 3
    assert requests.post(accounts.url + "/_admin/mutate", json={"resource": "jobs"}, timeout=10).status_code == 404
    requests.post(accounts.url + "/_admin/reset", timeout=10)
    assert len(north.ids("jobs")) == PER_ACCOUNT["jobs"] and south.configure()["fail_resources"] == {}
    assert accounts.stats()["north"]["requests"]["jobs"] == 0


def test_a_revoked_key_answers_401_like_a_wrong_key():
    config = SimulatorConfig(accounts=["a", "b", "c"], counts=PER_ACCOUNT,
                             account_overrides={"b": {"revoked": True}, "c": {"api_key": "own-key"}})
    with CrmSimulator(config) as sim:
        revoked = _account_get(sim, "b", "jobs")
        assert revoked.status_code == 401 and revoked.json() == _account_get(sim, "b", "jobs", key="nope").json()
        assert _account_get(sim, "a", "jobs").status_code == 200
        assert _account_get(sim, "c", "jobs", key="own-key").status_code == 200
        assert _account_get(sim, "c", "jobs").status_code == 401  # key-c is not its key
        # Live, over the account's admin endpoint: revoke a, and give b its key back.
        requests.post(sim.account_url("a") + "/_admin/config", json={"revoked": True}, timeout=10)
        sim.account("b").configure(revoked=False)
        assert _account_get(sim, "a", "jobs").status_code == 401
        assert _account_get(sim, "b", "jobs").status_code == 200
    with CrmSimulator(SimulatorConfig(api_key=KEY, counts=PER_ACCOUNT, revoked=True)) as single:  # one account too
        assert requests.get(single.url + "/v1/jobs", headers=AUTH, timeout=10).status_code == 401
        assert single.accounts == [] and single.configure(revoked=False)["revoked"] is False
        assert requests.get(single.url + "/v1/jobs", headers=AUTH, timeout=10).status_code == 200


@pytest.mark.parametrize("config, message", [
    ({"accounts": ["North"]}, "must match"),
    ({"accounts": "north"}, "list of names"),
    ({"accounts": ["a", "a"]}, "repeat"),
    ({"accounts": ["a"], "account_overrides": {"b": {}}}, "not in accounts"),
    ({"accounts": ["a"], "account_overrides": {"a": {"port": 1}}}, "cannot set"),
    ({"accounts": ["a"], "account_overrides": {"a": {"page_cap": 0}}}, "page_cap"),
])
def test_account_config_is_validated(config, message):
    with pytest.raises(ValueError, match=message):
        CrmSimulator(SimulatorConfig(**config))


def test_an_account_can_have_its_own_counts():
    sim = CrmSimulator(SimulatorConfig(accounts=["a", "b"], counts=PER_ACCOUNT, account_overrides={"b": {"counts": {"jobs": 3}}}))
    assert len(sim.account("a").ids("jobs")) == PER_ACCOUNT["jobs"] and len(sim.account("b").ids("jobs")) == 3
    assert len(sim.account("b").ids("tasks")) == PER_ACCOUNT["tasks"]  # the others keep every account's


def test_cli_serves_many_accounts(tmp_path: Path, capsys):
    from crm_assets.simulator.__main__ import build_parser

    assert build_parser().parse_args(["--accounts", "100"]).accounts[::99] == ["acct001", "acct100"]
    assert build_parser().parse_args(["--accounts", "3"]).accounts == ["acct01", "acct02", "acct03"]
    for bad in (["--accounts", "0"], ["--accounts", "a,A"], ["--accounts", "a,a"], ["--account-key", "a"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)

    flags = ("--accounts", "3", "--revoke", "acct02", "--account-key", "acct03=sekrit-3")
    with _cli_simulator(tmp_path, *flags) as (proc, url):
        def status(name: str, key: str) -> int:
            return requests.get(f"{url}/{name}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                                timeout=10).status_code

        assert requests.get(f"{url}/acct01/v1/jobs", headers={"Authorization": "Bearer key-acct01"},
                            timeout=10).json()["count"] == 5  # --records applies to every account
        assert (status("acct01", KEY), status("acct02", "key-acct02"), status("acct03", "sekrit-3")) == (401, 401, 200)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out.strip() == (f"CRM simulator listening on {url}/<account> for 3 accounts "
                               f"(acct01, acct02, acct03; api key: key-<account> unless set)")
        assert "sekrit-3" not in out + err
    from crm_assets.simulator.__main__ import main

    assert main(["--port", "0", "--accounts", "a,b", "--revoke", "c"]) == 2  # fails before it serves
    assert "not in --accounts: ['c']" in capsys.readouterr().err


def test_dated_ahead_dates_an_edit_hours_after_now_and_leaves_the_clock_alone(sim, api):
    from crm_assets.simulator.data import AHEAD_SECONDS

    out = requests.post(sim.url + "/_admin/mutate", json={"resource": "jobs", "dated_ahead": 1}, timeout=10).json()
    (ahead,) = out["dated_ahead"]
    dates = {r["id"]: r["date_updated"] for r in sim.records("jobs")}
    assert dates[ahead] >= time.time() + AHEAD_SECONDS - 60
    edited = sim.mutate("jobs", edit=1)["edited"][0]
    dates = {r["id"]: r["date_updated"] for r in sim.records("jobs")}
    assert dates[edited] < dates[ahead]  # the clock stayed where it was
    newest = api("jobs", size=1, sort_field="date_updated", sort_direction="desc").json()["results"][0]
    assert newest["id"] == ahead  # the listing's end, past every later edit
