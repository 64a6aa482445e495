"""Central-registry verdicts (pure): lifecycle status, deprecation dates, version pins."""

from __future__ import annotations

import datetime
from pathlib import Path

import msgspec
import pytest

from sidekey.config import Registry, RegistryEntry, load_config
from sidekey.registry import RegistryVerdict, evaluate

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "seed-configs"
if not SEED.is_dir():  # the quickstart carries identical copies of the seed files
    SEED = REPO / "examples" / "quickstart"
SEED_FILES = ("mcp-server-registry.yaml", "central-registry.yaml",
              "agent-tool-mappings.yaml", "rate-limits.yaml")
DEPRECATION = datetime.date(2026, 6, 1)


@pytest.fixture(scope="module")
def seed_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    main = tmp_path_factory.mktemp("cfg") / "sidekey.yaml"
    main.write_text("include:\n" + "".join(f"  - {SEED / f}\n" for f in SEED_FILES))
    return load_config(main).config.registry


def verdict(entry: RegistryEntry | None, server: str = "s", *, listed: bool = True,
            today: datetime.date = datetime.date(2026, 5, 1), version: str | None = None,
            require: bool = False) -> RegistryVerdict:
    return evaluate(entry, server=server, registry_listed=listed, today=today,
                    server_version=version, require_version=require)


def entry(**kw: object) -> RegistryEntry:
    return msgspec.convert(kw, RegistryEntry)


def test_seed_registry_loads(seed_registry: Registry) -> None:
    assert set(seed_registry.servers) == {"content-api", "analytics-db", "legacy-crm"}
    legacy = seed_registry.servers["legacy-crm"]
    assert legacy.status == "deprecated" and legacy.deprecation_date == DEPRECATION
    assert legacy.replacement == "crm-v2"


def test_active(seed_registry: Registry) -> None:
    v = verdict(seed_registry.servers["content-api"], "content-api")
    assert v == RegistryVerdict(ok=True, rule="registry.active:content-api")


def test_deprecated_before_the_date_warns(seed_registry: Registry) -> None:
    v = verdict(seed_registry.servers["legacy-crm"], "legacy-crm", today=datetime.date(2026, 5, 31))
    assert v.ok and v.rule == "registry.deprecated:legacy-crm" and v.code is None
    (warning,) = v.warnings
    assert "2026-06-01" in warning and '"crm-v2"' in warning and "legacy-crm" in warning


@pytest.mark.parametrize("today", [DEPRECATION, datetime.date(2026, 6, 2), datetime.date(2030, 1, 1)])
def test_deprecated_on_and_after_the_date_denies(seed_registry: Registry, today: datetime.date) -> None:
    v = verdict(seed_registry.servers["legacy-crm"], "legacy-crm", today=today)
    assert not v.ok and v.code == "server_deprecated"
    assert v.message == 'server "legacy-crm" was deprecated on 2026-06-01; use "crm-v2"'
    assert v.rule == "registry.deprecated:legacy-crm"


def test_deprecated_without_replacement_names_the_owner() -> None:
    v = verdict(entry(status="deprecated", deprecation_date="2026-01-01", owner="ops"))
    assert v.code == "server_deprecated" and v.message is not None
    assert "2026-01-01" in v.message and '"ops"' in v.message


def test_retired() -> None:
    v = verdict(entry(status="retired", replacement="crm-v2"), "legacy-crm")
    assert not v.ok and v.code == "server_retired" and v.rule == "registry.retired:legacy-crm"
    assert v.message == 'server "legacy-crm" is retired; use "crm-v2"'
    bare = verdict(entry(status="retired"))
    assert bare.code == "server_retired" and bare.message is not None
    assert "no replacement" in bare.message


def test_unlisted_server() -> None:
    v = verdict(None, "crm-v2", listed=True)
    assert not v.ok and v.code == "server_not_registered" and v.message is not None
    assert '"crm-v2"' in v.message and "registry" in v.message
    # An empty registry checks nothing.
    assert verdict(None, "crm-v2", listed=False) == RegistryVerdict(ok=True, rule="registry.unlisted:crm-v2")


def test_version_pin(seed_registry: Registry) -> None:
    content = seed_registry.servers["content-api"]
    assert verdict(content, "content-api", version="3.1.0").ok
    assert verdict(content, "content-api", version=None).ok  # not required: pin not enforced
    wrong = verdict(content, "content-api", version="3.0.9")
    assert not wrong.ok and wrong.code == "version_mismatch" and wrong.message is not None
    assert "3.0.9" in wrong.message and "3.1.0" in wrong.message
    missing = verdict(content, "content-api", version=None, require=True)
    assert missing.code == "version_mismatch" and missing.message is not None
    assert "send server_version" in missing.message and "3.1.0" in missing.message


def test_version_required_only_where_pinned() -> None:
    assert verdict(entry(status="active"), require=True).ok
    assert verdict(entry(status="active"), version="anything").ok


def test_deprecated_warning_kept_on_version_denial(seed_registry: Registry) -> None:
    v = verdict(seed_registry.servers["legacy-crm"], "legacy-crm", version="0.9")
    assert v.code == "version_mismatch" and len(v.warnings) == 1


def test_status_checked_before_version() -> None:
    v = verdict(entry(status="retired", version="1.0"), version="2.0")
    assert v.code == "server_retired"
