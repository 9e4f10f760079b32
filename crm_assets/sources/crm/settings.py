"""The contract's fixed numbers (docs/api-contract.md). Which resources are read, and how, is
in catalog.py."""

from __future__ import annotations

# The incremental cursor and the order every listing is read in (keyset.py): every edit moves
# `date_updated` forward, so an edit moves a record ahead of the read, never behind it.
CURSOR_FIELD = "date_updated"
# The order records without a cursor value are read in (reach.py); every record has it.
CREATED_FIELD = "date_created"

# The API's hard limits (api-contract.md).
RESULT_WINDOW = 10_000
MAX_PAGE_SIZE = 1000

# Retry policy from the integration spec: at most 3 retries, backoff factor 2, honouring
# Retry-After; everything else in 4xx fails at once.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRIES = 3
BACKOFF_FACTOR = 2.0
MAX_RETRY_DELAY = 60.0
REQUEST_TIMEOUT = 60.0

# Politeness (http.py): the most requests in flight per API key across every resource of a sync
# (SOURCES__CRM__MAX_IN_FLIGHT), and how long one request waits on 429s (Retry-After) before it
# fails: a 429 asks for patience, so its retries do not count towards MAX_RETRIES.
MAX_IN_FLIGHT = 8
RATE_LIMIT_PATIENCE = 300.0
