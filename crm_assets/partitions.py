"""One partition per CRM account (sources/crm/accounts.py; docs/accounts.md).

The accounts are read when the code location loads, like the resources (assets.CRM_ENDPOINTS):
adding or removing one is a configuration change plus a code-location reload (dlt reads its
providers once per process, so a running code server would not see a new secrets.toml entry
anyway). Without accounts there are no partitions: the single-account path, exactly as before.
"""

from collections.abc import Sequence
from typing import Any, Optional

from dagster import DagsterRun, StaticPartitionsDefinition

from .sources.crm.accounts import Account, account_api_key, configured_accounts
from .sources.crm.errors import CrmConfigurationError

__all__ = [
    "ACCOUNTS",
    "ACCOUNT_PARTITIONS",
    "PARTITION_TAG",
    "Account",
    "account_api_key",
    "account_partitions",
    "account_named",
    "account_of",
    "account_of_run",
]

# Dagster's own tag on a partitioned run, set by schedules, sensors, backfills and the UI alike.
PARTITION_TAG = "dagster/partition"



def account_partitions(accounts: Sequence[Account]) -> Optional[StaticPartitionsDefinition]:
    """One partition per account, keyed by its name; None without accounts (no partitions)."""
    return StaticPartitionsDefinition([account.name for account in accounts]) if accounts else None


ACCOUNTS: tuple[Account, ...] = configured_accounts()
ACCOUNT_PARTITIONS: Optional[StaticPartitionsDefinition] = account_partitions(ACCOUNTS)
_BY_NAME = {account.name: account for account in ACCOUNTS}


def account_named(name: str) -> Account:
    """The configured account `name`; CrmConfigurationError when there is none of that name (an
    account removed from the configuration while a run for it was queued)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CrmConfigurationError(
            f"No account {name!r} is configured ([sources.crm.accounts.{name}]); configured: "
            f"{', '.join(_BY_NAME) or 'none'}. Reload the code location after changing the accounts."
        ) from None


def account_of(context: Any) -> Optional[Account]:
    """The account a step runs for, from its partition key (any Dagster execution context: an
    asset's, an op's, a check's); None on the single-account path."""
    if ACCOUNT_PARTITIONS is None:
        return None
    if not context.has_partition_key:
        raise CrmConfigurationError(
            "Accounts are configured, so every run of the crm assets is for one account: pick a "
            f"partition (one of {', '.join(_BY_NAME)}), e.g. --partition {next(iter(_BY_NAME))}"
        )
    return account_named(context.partition_key)


def account_of_run(run: DagsterRun) -> Optional[Account]:
    """The account of a run (its `dagster/partition` tag), for sensors; None on the single-account
    path or for a run without a partition."""
    if ACCOUNT_PARTITIONS is None:
        return None
    name = run.tags.get(PARTITION_TAG)
    return account_named(name) if name else None
