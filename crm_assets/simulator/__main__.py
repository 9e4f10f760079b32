"""CLI: ``python -m crm_assets.simulator`` / ``crm-simulator``. Serves until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from .data import DEFAULT_COUNTS, KEY_FIELDS, KNOWN_RESOURCES, REAL_FAMILY_PATHS, RESOURCES
from .query import DIRECTIONS, SORT_FIELDS
from .server import ACCOUNT_NAME, FAULT_KINDS, CrmSimulator, SimulatorConfig


def _parse_records(text: str) -> dict[str, int]:
    """``100000`` (every resource) or ``jobs=2500,tasks=12000`` (others keep their defaults)."""
    counts = dict(DEFAULT_COUNTS)
    text = text.strip()
    if text.isdigit():
        return {r: int(text) for r in RESOURCES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in RESOURCES or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"bad --records item {part!r}: expected N or name=N with name in {list(RESOURCES)}")
        counts[name.strip()] = int(value)
    return counts


def _parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"fault kinds must be from {list(FAULT_KINDS)}, got {text!r}")
    return kinds


def _parse_resources(text: str) -> list[str]:
    """``all`` (every served resource) or ``jobs,tasks``."""
    if text.strip() == "all":
        return ["*"]
    names = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in names if r not in KNOWN_RESOURCES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or resource names from {list(KNOWN_RESOURCES)}, got {text!r}")
    return names


def _parse_forbidden(text: str) -> list[str]:
    """``files`` or ``files,tasks`` (a key that may read nothing is a wrong key: --api-key)."""
    names = _parse_resources(text)
    if names == ["*"]:
        raise argparse.ArgumentTypeError("--forbid takes resource names, not 'all'")
    return names


def _parse_failures(text: str) -> dict[str, int]:
    """``files`` (500) or ``files=503,tasks`` (each resource's status, 500 unless given)."""
    failures: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, status = (s.strip() for s in part.partition("="))
        if name not in KNOWN_RESOURCES or (sep and not (status.isdigit() and 400 <= int(status) <= 599)):
            raise argparse.ArgumentTypeError(
                f"bad --fail-resources item {part!r}: expected name or name=STATUS (400..599) "
                f"with name in {list(KNOWN_RESOURCES)}")
        failures[name] = int(status) if sep else 500
    if not failures:
        raise argparse.ArgumentTypeError("--fail-resources needs at least one resource name")
    return failures


def _parse_accounts(text: str) -> list[str]:
    """``20`` (acct01..acct20; three digits from 100 on) or ``north,south``."""
    text = text.strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError("--accounts needs at least one account")
        width = max(2, len(str(n)))
        return [f"acct{i:0{width}d}" for i in range(1, n + 1)]
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if not ACCOUNT_NAME.fullmatch(a)]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected N or distinct names matching {ACCOUNT_NAME.pattern}, comma-separated, got {text!r}")
    return names


def _parse_account_key(text: str) -> tuple[str, str]:
    name, sep, key = text.partition("=")
    if not sep or not name.strip() or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY, got {text!r}")
    return name.strip(), key


def _account_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """--account-key and --revoke as SimulatorConfig.account_overrides; a name that is not an
    account is an error (a typo must not leave an account's key working)."""
    named = [n for n, _ in args.account_key] + [n for text in args.revoke for n in text.split(",") if n]
    unknown = sorted(set(named) - set(args.accounts))
    if unknown:
        raise ValueError(f"--account-key/--revoke name accounts not in --accounts: {unknown}")
    overrides: dict[str, dict] = {}
    for name, key in args.account_key:
        overrides.setdefault(name, {})["api_key"] = key
    for text in args.revoke:
        for name in filter(None, text.split(",")):
            overrides.setdefault(name, {})["revoked"] = True
    return overrides


def _non_negative(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crm-simulator", description="Local CRM API simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--api-key", default="demo-key")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--records", type=_parse_records, default=dict(DEFAULT_COUNTS),
                   help="N for each of the five resources, or jobs=2500,tasks=12000 (invoices: --invoices)")
    real = p.add_argument_group(
        "the real API family's shape",
        "Opt-in; the defaults serve the contract (docs/api-contract.md) as the project's tests expect.")
    real.add_argument("--key-field", choices=KEY_FIELDS, default="id",
                      help="name of each record's own key (default: id); jnid as the real API names it. "
                           "References such as job_id and related[].id keep their names")
    real.add_argument("--invoices", type=_non_negative, default=0, metavar="N",
                      help="serve N invoices at /v1/invoices, records under 'results' "
                           "(default: 0, not served: the path answers 404)")
    real.add_argument("--real-family", type=_non_negative, default=0, metavar="N",
                      help="serve N records each of the real family's other resources at the paths the "
                           "README's 'Connecting to the real API' block configures: "
                           + ", ".join(f"{r} at {p}" for r, p in REAL_FAMILY_PATHS.items())
                           + " (default: 0, none; with it, invoices move from /v1 to /v2)")
    real.add_argument("--default-sort-field", choices=SORT_FIELDS, default="date_created",
                      help="sort field of a request that names none (default: date_created)")
    real.add_argument("--default-sort-direction", choices=DIRECTIONS, default="asc",
                      help="sort direction of a request that names none (default: asc); the real API "
                           "reportedly sorts date_updated desc, so a client should always send both")
    p.add_argument("--page-cap", type=int, default=None, help="silently return at most N records a page")
    p.add_argument("--latency-ms", type=float, default=0)
    p.add_argument("--fault-every", type=int, default=None, help="every N-th data request faults (N >= 2)")
    p.add_argument("--fault-kinds", type=_parse_kinds, default=list(FAULT_KINDS),
                   help=f"comma list cycling through {','.join(FAULT_KINDS)}")
    p.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds sent with 429")
    p.add_argument("--storm-seconds", type=float, default=0,
                   help="a 429 storm: every data request answers 429 (Retry-After) for the first N seconds")
    p.add_argument("--drift-every", type=int, default=None, help="every N-th page (from > 0) drifts by one")
    p.add_argument("--repeat-every", type=int, default=None,
                   help="every N-th page starts with the previous page's last record again")
    p.add_argument("--insert-every", type=int, default=None,
                   help="before every N-th page, a new record at a random position")
    p.add_argument("--delete-every", type=int, default=None,
                   help="before every N-th page, a hard delete (alternately before and after 'from')")
    p.add_argument("--count-capped", action="store_true", help="'count' stops at the result window")
    p.add_argument("--result-window", type=int, default=10_000, metavar="N",
                   help="the most records from + size may reach (10000, as documented); past it: 400")
    p.add_argument("--forbid", type=_parse_forbidden, default=[], metavar="RESOURCES",
                   help="these resources answer 403 to every request, as for a key whose role may not read them")
    p.add_argument("--fail-resources", type=_parse_failures, default={}, metavar="NAME[=STATUS],...",
                   help="these resources answer STATUS (500 unless given) to every request, for the whole run")
    dishonest = p.add_argument_group(
        "an API that does not do what it is asked",
        "RESOURCES: comma-separated names (jobs,tasks), or 'all' for every resource served.")
    dishonest.add_argument("--ignore-sort", type=_parse_resources, default=[], metavar="RESOURCES",
                           help="for these resources, ignore sort_field and sort_direction and serve the "
                                "default sort (--default-sort-field, --default-sort-direction) whatever is asked")
    dishonest.add_argument("--ignore-filter", type=_parse_resources, default=[], metavar="RESOURCES",
                           help="for these resources, ignore the filter: pages and count are of the whole resource")
    dishonest.add_argument("--ignore-from", type=_parse_resources, default=[], metavar="RESOURCES",
                           help="for these resources, ignore 'from': every page starts at the head of the listing")
    dishonest.add_argument("--exclusive-bounds", type=_parse_resources, default=[], metavar="RESOURCES",
                           help="for these resources, read the filter's gte as gt and lte as lt")
    dishonest.add_argument("--page-count", type=_parse_resources, default=[], metavar="RESOURCES",
                           help="for these resources, 'count' is the number of records in the answer "
                                "(0 for size=0), not of those matching")
    dishonest.add_argument("--fields-param", action="store_true",
                           help="honour fields=a,b,c: each record carries only those keys (the real API "
                                "family documents it); without this flag the parameter is ignored")
    p.add_argument("--colliding-fields", type=_parse_resources, default=[], metavar="RESOURCES",
                   help="records of these resources also carry Status, first-name, first_name and custom.Region/"
                        "custom.region: names that normalize to the same column, each with its own value")
    many = p.add_argument_group(
        "many accounts from one process",
        "Each account at http://HOST:PORT/NAME/v1/... and /NAME/_admin/..., with its own key, data "
        "(a seed derived from --seed and the name; ids prefixed NAME-), stats and live config; the "
        "other flags apply to every account.")
    many.add_argument("--accounts", type=_parse_accounts, default=[], metavar="N|NAME,...",
                      help="N accounts acct01..acctNN, or these names; each account's key is key-NAME "
                           "(--api-key is not used)")
    many.add_argument("--account-key", type=_parse_account_key, action="append", default=[],
                      metavar="NAME=KEY", help="this account's key instead of key-NAME (repeatable)")
    many.add_argument("--revoke", action="append", default=[], metavar="NAME[,NAME]",
                      help="these accounts' keys are revoked: every request answers 401, as a wrong key's "
                           "(live: revoked in /NAME/_admin/config)")
    p.add_argument("--verbose", action="store_true", help="log one line per request to stderr")
    p.add_argument("--ready-file", default=None, help="write the URL here once listening")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    counts = dict(args.records, **({"invoices": args.invoices} if args.invoices else {}))
    paths: dict[str, str] = {}
    if args.real_family:
        counts.update({r: args.real_family for r in REAL_FAMILY_PATHS if r not in counts})
        paths = dict(REAL_FAMILY_PATHS)
    config = SimulatorConfig(
        host=args.host, port=args.port, api_key=args.api_key, seed=args.seed, counts=counts,
        key_field=args.key_field, paths=paths, default_sort_field=args.default_sort_field,
        default_sort_direction=args.default_sort_direction,
        page_cap=args.page_cap, latency_ms=args.latency_ms, fault_every=args.fault_every,
        fault_kinds=args.fault_kinds, retry_after=args.retry_after, storm_seconds=args.storm_seconds, drift_every=args.drift_every,
        repeat_every=args.repeat_every, insert_every=args.insert_every, delete_every=args.delete_every,
        count_capped=args.count_capped, result_window=args.result_window, forbidden=args.forbid, fail_resources=args.fail_resources,
        ignore_sort=args.ignore_sort,
        ignore_filter=args.ignore_filter, ignore_from=args.ignore_from, exclusive_bounds=args.exclusive_bounds,
        page_count=args.page_count,
        fields_param=args.fields_param,
        colliding_fields=args.colliding_fields,
        verbose=args.verbose,
    )
    try:
        config.accounts = args.accounts
        config.account_overrides = _account_overrides(args)
        sim = CrmSimulator(config).start()
    except (ValueError, OSError) as exc:
        print(f"crm-simulator: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if sim.accounts:  # the pattern, not a hundred URLs
        names = sim.accounts
        listed = ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]}"
        print(f"CRM simulator listening on {sim.url}/<account> for {len(names)} accounts ({listed}; "
              f"api key: key-<account> unless set)", flush=True)
    else:
        print(f"CRM simulator listening on {sim.url} (api key: {config.api_key})", flush=True)
    if args.ready_file:
        # Write then rename, so a script polling for the file never reads half a URL.
        tmp = f"{args.ready_file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(sim.url + "\n")
        os.replace(tmp, args.ready_file)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
