"""Deterministic, lazily generated CRM records.

Record ``i`` of a resource is a pure function of ``(seed, resource, i)``: nothing is stored for
records that were never mutated, so a resource can hold a million records at no memory cost.
Mutated and inserted records live in a per-resource ``overlay`` dict keyed by index.

Ordering invariant the fast query path relies on: while ``ordered`` holds, index order ==
(date_created, id) order.  Generated records have ``date_created = BASE + (i // 3) * 7``
(non-decreasing, with ties) and zero-padded ids (so id order == index order; the same holds when the
key field is named ``jnid``, since only its name changes); inserted records get
indices after all generated ones and a ``date_created`` from a strictly increasing "now" clock that
lies above every generated date; edits never change ``date_created``.  The adversary's changes
(``insert_anywhere``, ``delete``) end that invariant for the dataset, and queries then sort.

``date_updated`` may be null or absent on a mutated record (``Store.mutate``'s ``null_cursor`` and
``missing_cursor``); ``date_created`` never is.
"""

from __future__ import annotations

import copy
import hashlib
import time
import zlib
from array import array
from typing import Any, Sequence

# name -> (path, key under which the records are listed)
RESOURCES: dict[str, tuple[str, str]] = {
    "jobs": ("/v1/jobs", "results"),
    "contacts": ("/v1/contacts", "results"),
    "tasks": ("/v1/tasks", "results"),
    "activities": ("/v1/activities", "activity"),
    "files": ("/v1/files", "files"),
}
# Served only when the config's counts name them (the real API family has more resources than the
# five the project syncs; a client that never asks for them must see exactly the five).
OPTIONAL_RESOURCES: dict[str, tuple[str, str]] = {
    "invoices": ("/v1/invoices", "results"),
    "estimates": ("/v2/estimates", "results"),
    "payments": ("/v1/payments", "results"),
    "workorders": ("/v1/workorders", "results"),
    "products": ("/v1/products", "results"),
}
# The real family's extra resources at the paths the README's "Connecting to the real API" block
# configures (invoices under /v2 there): served all at once with `--real-family N`.
REAL_FAMILY_PATHS: dict[str, str] = {
    "invoices": "/v2/invoices",
    "estimates": "/v2/estimates",
    "payments": "/v1/payments",
    "workorders": "/v1/workorders",
    "products": "/v1/products",
}
KNOWN_RESOURCES: dict[str, tuple[str, str]] = {**RESOURCES, **OPTIONAL_RESOURCES}
# The name of a record's own key: "id" (the contract) or "jnid" (the real API family). References
# between records (job_id, related[].id) keep their names either way.
KEY_FIELDS = ("id", "jnid")
# tasks is above the 10,000 result window on purpose: reading it needs filter ranges.
DEFAULT_COUNTS: dict[str, int] = {
    "jobs": 2500,
    "contacts": 3000,
    "tasks": 12000,
    "activities": 4000,
    "files": 1500,
}
PREFIXES = {"jobs": "job", "contacts": "con", "tasks": "tsk", "activities": "act", "files": "fil",
            "invoices": "inv", "estimates": "est", "payments": "pay", "workorders": "wko", "products": "prd"}

BASE = 1_600_000_000
DAY = 86_400
MAX_UPDATE_OFFSET = 90 * DAY  # generated date_updated lies within 90 days after date_created
AHEAD_SECONDS = 7 * 3600  # how far after now mutate's dated_ahead dates its edits (a clock on another zone)
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def account_seed(seed: int, name: str) -> int:
    """The seed of account `name` of a simulator seeded `seed`: its own data, the same every run."""
    return _mix((seed & _M64) ^ int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big"))


def generated_date_created(i: int) -> int:
    # Three records share each timestamp, so (date_created) alone has ties and id must break them.
    return BASE + (i // 3) * 7


# --- value pools (deliberately full of non-ASCII text, quotes and emoji) -------------------------
NAMES = [
    "Zoë Ørsted", "北京项目", "Café ☕", "عميل", "Šárka Dvořák", "José Müller", "Łukasz Żółć",
    "Ana-María Núñez", "Προμηθέας", "Иван Петров", "東京オフィス", "🚀 Launch", "O'Brien & Sons",
    "Plain Name", "Straße 5", "नमस्ते", "Björk 🎵", 'The "Quoted" Co', "back\\slash Ltd", "Ñandú 🦤",
]
NOUNS = ["Renovation", "Roof", "Kitchen", "Survey", "Audit", "Install", "Repair", "Fit-out", "Extension"]
JOB_STATUSES = ["open", "quoted", "in_progress", "on_hold", "completed", "cancelled"]
CITIES = [("Zürich", "CH"), ("København", "DK"), ("São Paulo", "BR"), ("Kraków", "PL"), ("北京", "CN"),
          ("Montréal", "CA"), ("القاهرة", "EG"), ("London", "GB"), ("Reykjavík", "IS"), ("Austin", "US")]
STREETS = ["Hauptstraße", "Rue de l'Église", "Main St", "Calle Mayor", "Ulica Długa", "Baker Street"]
TAGS = ["vip", "urgent", "résumé", "北", "🔥", "follow-up", "b2b", "archived?", "tag with space"]
COMPANIES = ["Acme GmbH", "Ørsted A/S", "株式会社テスト", "Café Society", "Smith & Sons", "Élan S.A."]
ACTIVITY_TYPES = ["note", "call", "email", "meeting"]
BODIES = [
    "Called the customer — they'd like a quote by Friday.",
    "Kunde möchte einen Rückruf 📞",
    "已发送报价单。",
    "Réunion reportée à lundi.\nNotes: bring samples.",
    "تم الاتصال بالعميل",
    "Left voicemail 🙃 \"call back later\"",
]
FILES = [("plan", "pdf", "application/pdf"), ("photo_été", "jpg", "image/jpeg"),
         ("угода", "docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
         ("報告", "xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
         ("notes", "txt", "text/plain"), ("sketch 🖊", "png", "image/png")]
PRIORITIES = ["low", "normal", "high", "urgent"]
INVOICE_STATUSES = ["draft", "sent", "partially_paid", "paid", "overdue", "void"]
DUE_DAYS = [7, 10, 14, 30, 45, 60]  # payment terms: date_due is always after date_created
ESTIMATE_STATUSES = ["draft", "sent", "accepted", "declined", "expired"]
PAYMENT_METHODS = ["card", "check", "cash", "ach", "financing"]
WORKORDER_STATUSES = ["scheduled", "in_progress", "done", "cancelled"]
PRODUCT_UNITS = ["each", "sq", "ft", "hour", "box"]


class Dataset:
    """One resource: generated records ``0..count-1`` plus an overlay of mutated/inserted ones."""

    def __init__(self, resource: str, count: int, seed: int, counts: dict[str, int], key_field: str = "id",
                 id_prefix: str = ""):
        self.resource = resource
        self.key_field = key_field  # the name of the record's own key: "id" or "jnid"
        self.count = count  # generated records
        self.total = count  # generated + inserted
        # id_prefix: prepended to every id and reference (one account's ids never equal another's)
        self.id_prefix = id_prefix
        self.prefix = id_prefix + PREFIXES[resource]
        self.salt = _mix((seed & _M64) ^ (zlib.crc32(resource.encode()) << 20))
        self.late_from = (count * 9) // 10  # records from here on carry the "late" field
        self.counts = counts  # referenced ids (job_id, contact_id) point into the other datasets
        self.overlay: dict[int, dict[str, Any]] = {}
        self.version = 0  # bumped on every mutation; part of the query cache key
        self.query_cache: dict[Any, list[int]] = {}
        self.deleted: set[int] = set()  # hard-deleted indices: gone from every listing
        self.ordered = True  # index order == (date_created, id) order, deleted records aside
        self.cursorless = False  # some record has had its date_updated nulled or removed
        self._orders: dict[str, tuple[int, array, array]] = {}  # field -> (version, keys, indices)
        self._extra = getattr(self, "_fields_" + resource)

    # -- ids ---------------------------------------------------------------------------------------
    def record_id(self, i: int) -> str:
        return f"{self.prefix}_{i:08d}"

    def ref(self, resource: str, h: int) -> str:
        n = max(1, self.counts.get(resource, 1))
        return f"{self.id_prefix}{PREFIXES[resource]}_{h % n:08d}"

    # -- generation --------------------------------------------------------------------------------
    def generate(self, i: int) -> dict[str, Any]:
        """The pristine record ``i`` (ignores the overlay). A fresh dict on every call."""
        h = _mix(self.salt + i)
        dc = generated_date_created(i)
        rec: dict[str, Any] = {
            self.key_field: self.record_id(i),
            "name": f"{NAMES[h % len(NAMES)]} {NOUNS[(h >> 5) % 9]} {i}",
            "created_by": f"usr_{(h >> 9) % 200:04d}",
            "date_created": dc,
            "date_updated": dc + (h >> 24) % MAX_UPDATE_OFFSET,
            "is_active": (h >> 17) % 100 >= 3,  # ~3% archived
        }
        self._extra(rec, i, _mix(h))
        if i >= self.late_from:
            rec["priority"] = PRIORITIES[(h >> 60) % 4]
        return rec

    def get(self, i: int) -> dict[str, Any]:
        """Current record ``i``. Overlay records are shared: never mutate the result in place."""
        rec = self.overlay.get(i)
        return rec if rec is not None else self.generate(i)

    def date_created(self, i: int) -> int:
        if i < self.count:
            return generated_date_created(i)
        return self.overlay[i]["date_created"]

    def date_updated(self, i: int) -> int | None:
        """None for a record whose date_updated is null or absent."""
        rec = self.overlay.get(i)
        if rec is not None:
            return rec.get("date_updated")
        # Same formula as generate(), without building the record (used by full scans).
        return generated_date_created(i) + (_mix(self.salt + i) >> 24) % MAX_UPDATE_OFFSET

    def live(self) -> list[int]:
        """Indices of the records that exist, in index order."""
        return [i for i in range(self.total) if i not in self.deleted]

    def order_by(self, field: str) -> tuple[Sequence[int], Sequence[int]]:
        """(values, indices) of the live records sorted on (field, id), built once per version.

        Records without a value (date_updated null or absent) have none in ``values``: they are
        ``indices[len(values):]``, in id order, after every record with one."""
        cached = self._orders.get(field)
        if cached is None or cached[0] != self.version:
            if field == "date_created" and self.ordered:  # index order already
                indices = self.live()
                cached = (self.version, [self.date_created(i) for i in indices], indices)
            elif field == "date_updated" and self.cursorless:
                pairs = [(self.date_updated(i), i) for i in self.live()]
                missing = [i for v, i in pairs if v is None]  # index order == id order
                pairs = sorted(p for p in pairs if p[0] is not None)
                cached = (self.version, [v for v, _ in pairs], [i for _, i in pairs] + missing)
            else:
                value = self.date_updated if field == "date_updated" else self.date_created
                pairs = sorted((value(i), i) for i in self.live())
                cached = (self.version, [v for v, _ in pairs], [i for _, i in pairs])
            # Arrays of machine integers: a quarter of a list of int objects' memory, which counts
            # when a hundred accounts (or a million records) keep their orders.
            cached = (cached[0], array("q", cached[1]), array("q", cached[2]))
            self._orders[field] = cached
        return cached[1], cached[2]

    def changed(self) -> None:
        self.version += 1
        self.query_cache.clear()

    def delete(self, i: int) -> None:
        """Hard delete: the record disappears from every listing."""
        self.deleted.add(i)
        self.changed()

    def insert_anywhere(self, date_created: int, date_updated: int) -> dict[str, Any]:
        """A new record at any position of both orders (an import with its own dates)."""
        idx = self.total
        rec = self.generate(idx)
        rec["date_created"], rec["date_updated"], rec["is_active"] = date_created, date_updated, True
        self.overlay[idx] = rec
        self.total += 1
        self.ordered = False
        self.changed()
        return rec

    def max_generated_date_updated(self) -> int:
        return generated_date_created(max(self.count - 1, 0)) + MAX_UPDATE_OFFSET

    # -- resource-specific fields (g: a second 64-bit hash; peeled off in mixed radix) -----------
    def _tags(self, g: int) -> list[str]:
        n = g % 4  # 0..3 tags, so some lists are empty
        return [TAGS[(g >> (4 + 4 * k)) % len(TAGS)] for k in range(n)]

    def _fields_jobs(self, rec: dict, i: int, g: int) -> None:
        k = _mix(g)
        kind = g % 10
        # budget's type varies between records: int mostly, a string like "12k" or null sometimes.
        budget: Any = (g >> 8) % 500_000 if kind >= 2 else (f"{(g >> 8) % 90 + 10}k" if kind == 1 else None)
        city, country = CITIES[(g >> 28) % len(CITIES)]
        rec.update({
            "status": JOB_STATUSES[(g >> 4) % 6],
            "number": 10_000 + i,
            "budget": budget,
            "location": {
                "street": f"{(g >> 32) % 200 + 1} {STREETS[(g >> 40) % len(STREETS)]}",
                "city": city,
                "country": country,
                "geo": {"lat": round((k % 180_000_000) / 1e6 - 90, 6),
                        "lng": round(((k >> 28) % 360_000_000) / 1e6 - 180, 6)},
            },
            "related": [{"type": "contact", "id": self.ref("contacts", k >> (8 * j))}
                        for j in range((k >> 60) % 3)],
            "tags": self._tags(g >> 44),
        })

    def _fields_contacts(self, rec: dict, i: int, g: int) -> None:
        email = f"contact.{i}@example.com"
        phone = None if g % 7 == 0 else f"+1-555-{(g >> 8) % 10_000:04d}"
        rec.update({
            "email": email,
            "phone": phone,
            "primary": {"email": email, "phone": phone},
            "company": COMPANIES[(g >> 24) % len(COMPANIES)],
            "tags": self._tags(g >> 32),
        })

    def _fields_tasks(self, rec: dict, i: int, g: int) -> None:
        rec.update({
            "job_id": self.ref("jobs", g >> 8),
            "due_date": None if g % 5 == 0 else rec["date_created"] + ((g >> 4) % 60) * DAY,
            "completed": bool((g >> 3) & 1),
            "assignees": [f"usr_{(g >> (20 + 8 * j)) % 200:04d}" for j in range((g >> 56) % 4)],
        })

    def _fields_activities(self, rec: dict, i: int, g: int) -> None:
        rec.update({
            "type": ACTIVITY_TYPES[g % 4],
            "body": BODIES[(g >> 2) % len(BODIES)],
            "contact_id": self.ref("contacts", g >> 8),
            "job_id": None if (g >> 5) % 4 == 0 else self.ref("jobs", g >> 30),
        })

    def _fields_files(self, rec: dict, i: int, g: int) -> None:
        stem, ext, mime = FILES[g % len(FILES)]
        rec.update({
            "filename": f"{stem}_{i}.{ext}",
            "size_bytes": (g >> 8) % 50_000_000 + 1,
            "mime_type": mime,
            "related": [{"type": "job", "id": self.ref("jobs", g >> 16)}]
            + ([{"type": "contact", "id": self.ref("contacts", g >> 40)}] if (g >> 4) & 1 else []),
        })

    def _fields_invoices(self, rec: dict, i: int, g: int) -> None:
        rec.update({
            "number": f"INV-{100_000 + i}",  # a string here, unlike a job's integer number
            "total": round(((g >> 8) % 5_000_000 + 100) / 100, 2),  # 1.00 .. 50,000.99, in cents
            "status": INVOICE_STATUSES[g % len(INVOICE_STATUSES)],
            "job_id": self.ref("jobs", g >> 32),
            "date_due": rec["date_created"] + DUE_DAYS[(g >> 4) % len(DUE_DAYS)] * DAY,
        })

    # The real family's other resources (--real-family): each has integer `date_*` fields, as the
    # real API's documentation shows, and references into the five.
    def _fields_estimates(self, rec: dict, i: int, g: int) -> None:
        rec.update({
            "number": f"EST-{200_000 + i}",
            "total": round(((g >> 8) % 5_000_000 + 100) / 100, 2),
            "status": ESTIMATE_STATUSES[g % len(ESTIMATE_STATUSES)],
            "job_id": self.ref("jobs", g >> 32),
            "date_expires": rec["date_created"] + DUE_DAYS[(g >> 4) % len(DUE_DAYS)] * DAY,
        })

    def _fields_payments(self, rec: dict, i: int, g: int) -> None:
        rec.update({
            "amount": round(((g >> 8) % 2_000_000 + 100) / 100, 2),
            "method": PAYMENT_METHODS[g % len(PAYMENT_METHODS)],
            "invoice_id": None if g % 9 == 0 else f"{self.id_prefix}inv_{(g >> 24) % max(1, self.counts.get('invoices', 1)):08d}",
            "date_paid": rec["date_created"] + ((g >> 4) % 30) * DAY,
        })

    def _fields_workorders(self, rec: dict, i: int, g: int) -> None:
        start = rec["date_created"] + ((g >> 4) % 20) * DAY
        rec.update({
            "status": WORKORDER_STATUSES[g % len(WORKORDER_STATUSES)],
            "job_id": self.ref("jobs", g >> 32),
            "date_start": start,
            "date_end": None if g % 4 == 0 else start + ((g >> 12) % 5 + 1) * DAY,
            "crew": [f"usr_{(g >> (20 + 8 * j)) % 200:04d}" for j in range((g >> 56) % 3)],
        })

    def _fields_products(self, rec: dict, i: int, g: int) -> None:
        rec.update({
            "sku": f"SKU-{i:06d}",
            "price": round(((g >> 8) % 100_000 + 1) / 100, 2),
            "uom": PRODUCT_UNITS[g % len(PRODUCT_UNITS)],
            "taxable": bool((g >> 3) & 1),
        })


class Store:
    """All datasets plus the mutation logic and the shared "now" clock."""

    def __init__(self, seed: int, counts: dict[str, int], key_field: str = "id", id_prefix: str = ""):
        if key_field not in KEY_FIELDS:
            raise ValueError(f"key_field must be one of {list(KEY_FIELDS)}, got {key_field!r}")
        self.seed = seed
        self.key_field = key_field
        self.id_prefix = id_prefix
        # The five always; an optional resource only when counts names it.
        self.counts = {r: int(counts.get(r, DEFAULT_COUNTS[r])) for r in RESOURCES}
        self.counts.update({r: int(counts[r]) for r in OPTIONAL_RESOURCES if r in counts})
        self._last_now = 0  # survives reset(): dates must never repeat one served earlier
        self._mutations = 0
        self.reset()

    def reset(self) -> None:
        self.datasets = {r: Dataset(r, self.counts[r], self.seed, self.counts, self.key_field, self.id_prefix)
                         for r in self.counts}
        self._mutations = 0

    def now(self) -> int:
        """Strictly increasing; >= wall clock and above every generated date."""
        floor = max(ds.max_generated_date_updated() for ds in self.datasets.values()) + 1
        self._last_now = max(int(time.time()), self._last_now + 1, floor)
        return self._last_now

    def _pick(self, ds: Dataset, n: int, salt: int, want_active: bool = False,
              exclude: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """n distinct indices spread over the dataset: one per equal-width bucket (fewer when a
        bucket holds nothing to pick). Never a deleted index nor one in ``exclude``."""
        total, n = ds.total, min(n, ds.total)
        picked = []
        for k in range(max(n, 0)):
            start, stop = k * total // n, (k + 1) * total // n
            width = stop - start
            off = _mix(salt + k) % width
            for j in range(width):  # walk the bucket (wrapping) for an active record if asked
                idx = start + (off + j) % width
                if idx in ds.deleted or idx in exclude:
                    continue
                if not want_active or ds.get(idx)["is_active"]:
                    picked.append(idx)
                    break
        return picked

    def mutate(self, resource: str, edit: int = 0, insert: int = 0, deactivate: int = 0,
               add_field: dict | None = None, null_cursor: int | None = None,
               missing_cursor: int | None = None, silent_edit: int | None = None,
               delete: int | None = None, dated_ahead: int | None = None) -> dict[str, list[str]]:
        """Change n records of each kind; the reply lists their ids under "edited", "inserted", ...

        edit, insert and deactivate move date_updated to "now" (one tick per call). The other kinds
        play an API that breaks its own promises; each one's reply key appears only when it is given
        (so the replies existing callers read stay as they were): null_cursor ("null_cursor":
        date_updated becomes null), missing_cursor ("missing_cursor": the key goes), silent_edit
        ("silently_edited": the name changes, date_updated does not), delete ("deleted": hard
        deletes) and dated_ahead ("dated_ahead": an edit dated AHEAD_SECONDS after now, as a device
        with a wrong clock makes; the clock itself stays). A later edit gives a record without a
        cursor a value again.
        """
        if resource not in self.datasets:
            raise ValueError(f"unknown resource {resource!r}")
        if min(edit, insert, deactivate) < 0:
            raise ValueError("edit, insert and deactivate must be >= 0")
        dishonest = {k: v for k, v in (("null_cursor", null_cursor), ("missing_cursor", missing_cursor),
                                       ("silent_edit", silent_edit), ("delete", delete),
                                       ("dated_ahead", dated_ahead)) if v is not None}
        for k, v in dishonest.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{k} must be an integer >= 0, got {v!r}")
        if add_field is not None and (not isinstance(add_field, dict) or not isinstance(add_field.get("name"), str)):
            raise ValueError('add_field must be {"name": <str>, "value": <any>}')
        ds = self.datasets[resource]
        key = ds.key_field
        self._mutations += 1
        seq = self._mutations
        now = self.now()  # one tick per mutation call; ties between its records break on id
        salt = _mix(self.seed ^ (seq << 32) ^ zlib.crc32(resource.encode()))

        def extra(rec: dict) -> None:
            if add_field is not None:
                rec[add_field["name"]] = copy.deepcopy(add_field.get("value"))

        touched: set[int] = set()  # indices this call changed
        edited = []
        for idx in self._pick(ds, edit, salt):
            rec = copy.deepcopy(ds.get(idx))  # copy: a served overlay dict is never changed in place
            rec["name"] = f"{NAMES[(salt + idx) % len(NAMES)]} (edit {seq})"
            rec["date_updated"] = now
            extra(rec)
            ds.overlay[idx] = rec
            touched.add(idx)
            edited.append(rec[key])

        inserted = []
        for _ in range(insert):
            idx = ds.total
            rec = ds.generate(idx)
            rec["date_created"] = rec["date_updated"] = now
            rec["is_active"] = True
            extra(rec)
            ds.overlay[idx] = rec
            ds.total += 1
            touched.add(idx)
            inserted.append(rec[key])

        deactivated = []
        for idx in self._pick(ds, deactivate, salt ^ 0x5EED, want_active=True):
            rec = copy.deepcopy(ds.get(idx))
            rec["is_active"] = False
            rec["date_updated"] = now
            ds.overlay[idx] = rec
            touched.add(idx)
            deactivated.append(rec[key])

        reply = {"edited": edited, "inserted": inserted, "deactivated": deactivated}

        # Each kind below picks records no earlier kind of this call touched, so every id is in one
        # list only and a test can tell what happened to it.
        def change(n: int, bit: int, how) -> list[str]:
            ids = []
            for idx in self._pick(ds, n, salt ^ bit, exclude=touched):
                rec = copy.deepcopy(ds.get(idx))
                how(rec, idx)
                ds.overlay[idx] = rec
                touched.add(idx)
                ids.append(rec[key])
            return ids

        def null(rec: dict, idx: int) -> None:
            rec["date_updated"] = None
            ds.cursorless = True  # order_by now looks for records without a value

        def missing(rec: dict, idx: int) -> None:
            rec.pop("date_updated", None)
            ds.cursorless = True

        def silent(rec: dict, idx: int) -> None:
            # Some CRMs change a record (or what hangs off it) without moving date_updated.
            rec["name"] = f"{NAMES[(salt + idx) % len(NAMES)]} (silent edit {seq})"

        def ahead(rec: dict, idx: int) -> None:
            rec["name"] = f"{NAMES[(salt + idx) % len(NAMES)]} (edit {seq}, dated ahead)"
            rec["date_updated"] = now + AHEAD_SECONDS

        for name, reply_key, bit, how in (("null_cursor", "null_cursor", 0x0001, null),
                                          ("missing_cursor", "missing_cursor", 0x0002, missing),
                                          ("silent_edit", "silently_edited", 0x0003, silent),
                                          ("dated_ahead", "dated_ahead", 0x0005, ahead)):
            if name in dishonest:
                reply[reply_key] = change(dishonest[name], bit, how)
        if "delete" in dishonest:
            victims = self._pick(ds, dishonest["delete"], salt ^ 0x0004, exclude=touched)
            for idx in victims:
                ds.delete(idx)
            reply["deleted"] = [ds.record_id(i) for i in victims]
        ds.changed()
        return reply
