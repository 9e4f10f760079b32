"""The docs match the code: what the README and docs/ name exists, and the settings they give are
read. Fast: nothing is run but the simulator's --help."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crm_assets.sources.crm import build_endpoints, crm
from crm_assets.sources.crm.accounts import ACCOUNT_SETTINGS
from crm_assets.sources.crm.audit import audit_settings
from crm_assets.sources.crm.catalog import RESOURCE_FIELDS

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
TESTS = REPO / "crm_assets_tests"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_the_readme_is_at_most_250_lines():
    assert len(_text(REPO / "README.md").splitlines()) <= 250


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_a_doc_links_or_names_exists(doc: Path):
    text = _text(doc)
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    named = re.findall(r"`((?:crm_assets|crm_assets_tests|docs|scripts|benchmarks|deploy|\.dlt|\.ci)/[\w./-]*)`", text)
    missing = []
    for target in links:
        if target.startswith(("http://", "https://")):
            continue
        if not (doc.parent / target).exists() and not (REPO / target).exists():
            missing.append(target)
    missing += [path for path in named if not (REPO / path).exists() and not _user_file(path)]
    assert not missing, missing


def _user_file(path: str) -> bool:
    """A file the docs tell users to create, which git ignores (`.dlt/secrets.toml`)."""
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_test_the_docs_cite_exists(doc: Path):
    text = _text(doc)
    for module, name in re.findall(r"`(test_\w+\.py)(?:::(\w+))?", text):
        path = TESTS / module
        assert path.exists(), module
        if name:
            assert re.search(rf"def {name}", _text(path)), f"{module}::{name}"


def test_every_make_target_the_readme_gives_exists():
    makefile = _text(REPO / "Makefile")
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    for target in re.findall(r"^make ([\w-]+)", _text(REPO / "README.md"), flags=re.M):
        assert target in targets, target


def test_every_source_setting_the_docs_name_is_read():
    """`SOURCES__CRM__X` is dlt's name for the `crm` source's argument `x` (or the audit's, which
    reads the same section), or the accounts (`SOURCES__CRM__ACCOUNTS`, and one setting of one
    account: `SOURCES__CRM__ACCOUNTS__<NAME>__<SETTING>`, accounts.py)."""
    arguments = set(inspect.signature(crm).parameters) | set(inspect.signature(audit_settings).parameters)
    arguments.add("accounts")
    named = set()
    for doc in DOCS:
        for name in re.findall(r"SOURCES__CRM__([A-Z_]+[A-Z])", _text(doc)):
            account_setting = re.fullmatch(r"ACCOUNTS__[A-Z0-9_]+?__([A-Z_]+)", name)
            if account_setting:
                assert account_setting[1].lower() in ACCOUNT_SETTINGS, name
                continue
            named.add(name.lower())
    assert named and named <= arguments, sorted(named - arguments)


def test_every_resource_field_the_readme_lists_is_a_setting():
    table_row = next(line for line in _text(REPO / "README.md").splitlines() if "SOURCES__CRM__RESOURCES" in line)
    listed = {field for field in re.findall(r"`(\w+)`", table_row) if field.islower()}
    assert set(RESOURCE_FIELDS) <= listed


def test_every_simulator_flag_the_docs_give_exists():
    flags = set()
    for doc in DOCS:
        flags |= set(re.findall(r"(?<![\w-])(--(?:page-cap|latency-ms|fault-every|fault-kinds|retry-after|repeat-every|"
                                r"insert-every|delete-every|count-capped|key-field|invoices|default-sort-field|"
                                r"default-sort-direction|port|records|seed)\b)", _text(doc)))
    helped = subprocess.run([sys.executable, "-m", "crm_assets.simulator", "--help"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert flags and not [flag for flag in flags if flag not in helped]


def test_the_resource_settings_the_readme_shows_are_accepted():
    examples = re.findall(r"SOURCES__CRM__RESOURCES='(.*?)'", _text(REPO / "README.md"), flags=re.S)
    assert len(examples) >= 2
    for example in examples:
        names = [endpoint.name for endpoint in build_endpoints("jnid", json.loads(example))]
        assert set(json.loads(example)) <= set(names)
