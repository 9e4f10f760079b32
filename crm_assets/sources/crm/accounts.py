"""Many CRM accounts in one deployment: each a name, a base URL and an API key, read through
dlt's providers (no Dagster here).

    .dlt/secrets.toml (or .dlt/config.toml for everything but the key):

        [sources.crm.accounts.acme]
        base_url = "https://api.example.com"
        api_key = "..."
        # optional, the settings [sources.crm] takes for the single account:
        # primary_key = "jnid"
        # page_sizes = {tasks = 500}
        # result_window = 5000
        # [sources.crm.accounts.acme.resources.invoices]
        # path = "/v1/invoices"

    or the environment: SOURCES__CRM__ACCOUNTS='{"acme": {"base_url": "...", "api_key": "..."}}'
    (one setting of a configured account: SOURCES__CRM__ACCOUNTS__ACME__API_KEY).

An account's table may be split between the files (base_url in config.toml, api_key in
secrets.toml); for each setting the first provider that has it wins, in dlt's order (environment,
secrets.toml, config.toml). An account without `primary_key`, `resources`, `page_sizes` or
`result_window` takes the ones under [sources.crm].

No accounts configured: the single-account path ([sources.crm] base_url/api_key), unchanged.

The API key is not kept in `Account`: `account_api_key()` reads it when a run needs it, so it
never travels with the account into a partition key, a tag, a log line or metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import dlt
from dlt.common.configuration.inject import with_config

from .catalog import Endpoint, build_endpoints
from .config import check_settings
from .errors import CrmConfigurationError

ACCOUNTS_SECTION = ("sources", "crm", "accounts")
ACCOUNTS_ENV = "SOURCES__CRM__ACCOUNTS"
# what an account may set for itself, or takes from [sources.crm]
ACCOUNT_OPTIONS = ("primary_key", "resources", "page_sizes", "result_window")
ACCOUNT_SETTINGS = ("base_url", "api_key") + ACCOUNT_OPTIONS
# The partition key and part of the dataset name (`crm_<name>`): a PostgreSQL identifier with
# room for dlt's suffixes.
_ACCOUNT_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")
# Names whose dataset would be another one's: `crm_all` holds the union views (docs/accounts.md),
# `crm_staging` is the single account's staging dataset, and `crm_<x>_staging` account x's.
_RESERVED = ("all", "staging")


@dataclass(frozen=True)
class Account:
    """One CRM account: where its API is and which resources it has. No API key in here."""

    name: str
    base_url: str
    primary_key: Optional[str] = None
    # per-account overrides of the settings under [sources.crm]; plain mappings, not hashed
    resources: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    page_sizes: Optional[Mapping[str, int]] = field(default=None, hash=False)
    result_window: Optional[int] = None

    @property
    def dataset_name(self) -> str:
        """Its dataset: a schema of that name on PostgreSQL, in the same DuckDB file on DuckDB."""
        return f"crm_{self.name}"

    @property
    def pipeline_name(self) -> str:
        """Its own dlt pipeline: its state and cursors are its own (a shared pipeline name would
        carry one account's cursor into the other's reads)."""
        return f"crm_warehouse_{self.name}"

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Its resources, checked (the built-in five with its overrides)."""
        return build_endpoints(self.primary_key, self.resources, self.page_sizes, self.result_window)

    def __repr__(self) -> str:  # the dataclass's would print every mapping; the name says enough
        return f"Account({self.name!r}, {self.base_url!r})"


def _where(name: str, setting: Optional[str] = None) -> str:
    table = f"[sources.crm.accounts.{name}]"
    if setting is None:
        return f"account {name!r} ({table} in .dlt/secrets.toml or {ACCOUNTS_ENV})"
    return (
        f"account {name!r}: setting {setting!r} ({setting} under {table} in .dlt/secrets.toml, "
        f"or SOURCES__CRM__ACCOUNTS__{name.upper()}__{setting.upper()})"
    )


def _tables() -> list[tuple[Any, dict[str, Any]]]:
    """Each provider with its accounts table ({} without one), in dlt's order of precedence
    (environment first)."""
    tables: list[tuple[Any, dict[str, Any]]] = []
    for provider in dlt.config.config_providers:
        value, _ = provider.get_value("accounts", Any, None, *ACCOUNTS_SECTION[:-1])
        if value is None:
            value = {}
        if isinstance(value, str):  # the environment holds JSON
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise CrmConfigurationError(
                    f"{ACCOUNTS_ENV} must be a JSON object of accounts, e.g. "
                    f'{{"acme": {{"base_url": "https://api.example.com", "api_key": "..."}}}}: {exc}'
                ) from None
        if not isinstance(value, Mapping):
            raise CrmConfigurationError(
                f"sources.crm.accounts in {provider.name} must be a table of accounts "
                f"([sources.crm.accounts.<name>]), got {type(value).__name__}"
            )
        tables.append((provider, dict(value)))
    return tables


def _setting(tables: list[tuple[Any, dict[str, Any]]], name: str, setting: str) -> Any:
    """One setting of account `name`: from the first provider that has it, either as its own key
    (SOURCES__CRM__ACCOUNTS__ACME__API_KEY, or the TOML table) or in that provider's accounts table
    (the environment's JSON)."""
    for provider, table in tables:
        value, _ = provider.get_value(setting, Any, None, *ACCOUNTS_SECTION, name)
        if value is None:
            own = table.get(name)
            value = own.get(setting) if isinstance(own, Mapping) else None
        if value is not None:
            return value
    return None


def _raw_settings() -> dict[str, dict[str, Any]]:
    """Every configured account's settings, checked for their names and keys."""
    tables = _tables()
    names: list[str] = []
    for _, table in tables:
        for name, settings in table.items():
            if not isinstance(name, str) or not _ACCOUNT_NAME.fullmatch(name) or name in _RESERVED \
                    or "__" in name or name.endswith("_staging"):
                raise CrmConfigurationError(
                    f"account {name!r} under [sources.crm.accounts]: an account name is its partition "
                    "key and part of its dataset name (crm_<name>): lower-case letters, digits and "
                    "single underscores, starting with a letter, at most 31 characters, not 'all', "
                    "'staging' or ending in '_staging'"
                )
            if not isinstance(settings, Mapping):
                raise CrmConfigurationError(
                    f"{_where(name)}: expected a table of settings, got {type(settings).__name__}"
                )
            unknown = sorted(set(settings) - set(ACCOUNT_SETTINGS))
            if unknown:
                raise CrmConfigurationError(
                    f"{_where(name)}: unknown setting(s) {', '.join(map(repr, unknown))}; known: "
                    f"{', '.join(ACCOUNT_SETTINGS)}"
                )
            if name not in names:
                names.append(name)
    accounts: dict[str, dict[str, Any]] = {}
    for name in names:
        values = {setting: _setting(tables, name, setting) for setting in ACCOUNT_SETTINGS}
        accounts[name] = {setting: value for setting, value in values.items() if value is not None}
    return accounts


@with_config(sections=("sources", "crm"))
def _shared(
    primary_key: Optional[str] = dlt.config.value,
    resources: Optional[dict[str, Any]] = dlt.config.value,
    page_sizes: Optional[dict[str, Any]] = dlt.config.value,
    result_window: Optional[int] = dlt.config.value,
) -> dict[str, Any]:
    """The [sources.crm] settings an account without its own takes."""
    return {"primary_key": primary_key, "resources": resources, "page_sizes": page_sizes,
            "result_window": result_window}


def _parsed(name: str, setting: str, value: Any) -> Any:
    """A mapping setting given as JSON text (an environment variable) as a mapping."""
    if setting in ("resources", "page_sizes") and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if setting == "result_window" and isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # an environment variable's text
    if setting in ("resources", "page_sizes") and not isinstance(value, Mapping):
        raise CrmConfigurationError(f"{_where(name, setting)} must be a table, got {value!r}")
    return value


def _account(name: str, settings: dict[str, Any], shared: dict[str, Any]) -> Account:
    for setting in ("base_url", "api_key"):
        if not settings.get(setting):
            raise CrmConfigurationError(f"{_where(name, setting)} is missing: every account needs one")
    try:
        root = check_settings(settings["base_url"], settings["api_key"])
    except CrmConfigurationError as exc:
        # the shared message ends naming the single account's setting; this one names the account's
        problem = str(exc).split(": set SOURCES__CRM__")[0]
        raise CrmConfigurationError(f"{_where(name, 'base_url')}: {problem}") from None
    options = {
        setting: _parsed(name, setting, settings[setting]) if setting in settings else shared[setting]
        for setting in ACCOUNT_OPTIONS
    }
    account = Account(name=name, base_url=root, **options)
    try:
        account.endpoints  # noqa: B018 - checks its resources, primary key and page sizes now
    except CrmConfigurationError as exc:
        raise CrmConfigurationError(f"{_where(name)}: {exc}") from None
    return account


def configured_accounts() -> tuple[Account, ...]:
    """The configured accounts, checked, sorted by name; empty without any (the single-account
    path). A bad entry raises CrmConfigurationError naming the account and the setting."""
    raw = _raw_settings()
    if not raw:
        return ()
    shared = _shared()
    return tuple(_account(name, raw[name], shared) for name in sorted(raw))


def in_account_words(account: Account, message: str) -> str:
    """A message of the single-account source told of `account`: the setting it names to check
    (`check SOURCES__CRM__BASE_URL`) becomes the account's own."""
    for setting in ("api_key", "base_url"):
        message = message.replace(
            f"check SOURCES__CRM__{setting.upper()}", f"check {setting} under [sources.crm.accounts.{account.name}]"
        )
    return message


def account_api_key(account: Account) -> str:
    """The account's API key, read from dlt's providers now (never kept with the account)."""
    key = _setting(_tables(), account.name, "api_key")
    if not key:
        raise CrmConfigurationError(f"{_where(account.name, 'api_key')} is missing: every account needs one")
    return str(key)


def source_arguments(account: Account) -> dict[str, Any]:
    """The keyword arguments that make the `crm` source (or `audit_settings`) read `account`: its
    URL, its key (read now) and its resources. The settings not named here come from [sources.crm]."""
    return dict(
        base_url=account.base_url,
        api_key=account_api_key(account),
        primary_key=account.primary_key,
        resources=account.resources,
        page_sizes=account.page_sizes,
        result_window=account.result_window,
    )
