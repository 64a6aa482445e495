"""Config loading: the seed policy files load unchanged; errors name file and path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sidekey.config import load_config
from sidekey.protocol import ConfigError

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-configs"


@pytest.fixture
def qs(tmp_path: Path) -> Path:
    for f in QUICKSTART.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_quickstart_policy_files_are_the_seed_files_unchanged() -> None:
    if not SEED.is_dir():
        if os.environ.get("CI"):  # CI runs with ../shared beside the checkout
            pytest.fail("shared/seed-configs not beside the checkout (CI is set: not skipping)")
        pytest.skip("shared/seed-configs not beside the checkout")
    for f in SEED.glob("*.yaml"):
        assert (QUICKSTART / f.name).read_bytes() == f.read_bytes(), f.name


def test_quickstart_loads(qs: Path) -> None:
    loaded = load_config(qs / "sidekey.yaml")
    cfg = loaded.config
    assert set(cfg.servers) == {"content-api", "analytics-db"}
    assert cfg.registry.servers["legacy-crm"].replacement == "crm-v2"
    assert cfg.limits.per_tool["delete_record"].requires_human_approval
    assert cfg.agents["sales-assistant"].denied_servers == ["content-api"]
    assert loaded.socket_path == qs / "run" / "sidekey.sock"
    assert len(loaded.files) == 5


def _load_error(qs: Path) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(qs / "sidekey.yaml")
    return str(ei.value)


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        ("rate-limits.yaml", "requests_per_minute: 2\n", 'requests_per_minute: "two"\n',
         'rate-limits.yaml: $.limits.per_tool.delete_record.requests_per_minute: expected int, got "two"'),
        ("central-registry.yaml", 'status: "deprecated"', 'status: "sunset"',
         "central-registry.yaml: $.registry.servers.legacy-crm.status: Invalid enum value 'sunset'"),
        ("agent-tool-mappings.yaml", 'denied_servers:\n      - "legacy-crm"', "denied_servers: legacy-crm",
         "agent-tool-mappings.yaml: $.agents.content-writer.denied_servers: expected array"),
        ("mcp-server-registry.yaml", "tool_scopes:", "tool_scope:",
         "mcp-server-registry.yaml: $.servers.content-api.tool_scope: unknown key"),
        ("sidekey.yaml", 'mode: "0660"', 'mode: "0999"',
         "sidekey.yaml: $.listen.mode: expected str matching regex"),
    ],
)
def test_broken_files_name_file_and_path(qs: Path, file: str, old: str, new: str, expected: str) -> None:
    text = (qs / file).read_text()
    assert old in text
    (qs / file).write_text(text.replace(old, new, 1))
    assert expected in _load_error(qs)


def test_invalid_yaml_names_line(qs: Path) -> None:
    (qs / "rate-limits.yaml").write_text("limits:\n  per_user: [\n")
    assert "rate-limits.yaml: line" in _load_error(qs)


def test_missing_include(qs: Path) -> None:
    (qs / "rate-limits.yaml").unlink()
    assert "rate-limits.yaml: cannot read" in _load_error(qs)


def test_duplicate_section_across_files(qs: Path) -> None:
    with (qs / "rate-limits.yaml").open("a") as f:
        f.write("agents: {}\n")
    assert "rate-limits.yaml: $.agents: already defined in agent-tool-mappings.yaml" in _load_error(qs)


def test_cross_references(qs: Path) -> None:
    text = (qs / "sidekey.yaml").read_text()
    (qs / "sidekey.yaml").write_text(text.replace("{backend: local, name: content-api/read-key}",
                                                  "{backend: vault, name: x}"))
    assert '$.secrets.content-api.list_articles.CONTENT_API_KEY.backend: no backend named "vault"' in _load_error(qs)
    (qs / "sidekey.yaml").write_text(text.replace("  analytics-db:\n    - uid: self", "  nosuch:\n    - uid: self"))
    assert "$.peers.nosuch: server is not declared" in _load_error(qs)


def test_seed_references_to_undeclared_servers_are_warnings(qs: Path) -> None:
    warnings = load_config(qs / "sidekey.yaml").warnings
    assert any('$.agents.sales-assistant.allowed_servers.0.server: server "crm-v2"' in w for w in warnings)
    assert any("$.registry.servers.legacy-crm.replacement" in w and "crm-v2" in w for w in warnings)
    assert any("$.limits.per_tool.delete_record: no server declares this tool" in w for w in warnings)


def test_policy_cross_references_are_errors(qs: Path) -> None:
    agents = (qs / "agent-tool-mappings.yaml").read_text()
    (qs / "agent-tool-mappings.yaml").write_text(agents.replace('tools: ["query_metrics"]',
                                                                'tools: ["drop_tables"]', 1))
    assert ('agent-tool-mappings.yaml: $.agents.content-writer.allowed_servers.1.tools: '
            'tool "drop_tables" is not declared by server "analytics-db"') in _load_error(qs)
    (qs / "agent-tool-mappings.yaml").write_text(agents)
    servers = (qs / "mcp-server-registry.yaml").read_text()
    (qs / "mcp-server-registry.yaml").write_text(servers.replace('required: ["content:publish"]',
                                                                 'required: ["content:admin"]'))
    assert ('mcp-server-registry.yaml: $.servers.content-api.tool_scopes.publish_article.required: '
            'scope "content:admin" is not in $.servers.content-api.oauth2.scopes') in _load_error(qs)
    (qs / "mcp-server-registry.yaml").write_text(servers)
    registry = (qs / "central-registry.yaml").read_text()
    (qs / "central-registry.yaml").write_text(registry.replace('      deprecation_date: "2026-06-01"\n', ""))
    assert "$.registry.servers.legacy-crm.deprecation_date: a deprecated server needs" in _load_error(qs)
    (qs / "central-registry.yaml").write_text(registry)
    main = (qs / "sidekey.yaml").read_text()
    (qs / "sidekey.yaml").write_text(main.replace(
        "    jwks_file: keys/demo-issuer-jwks.json",
        "    jwks_file: keys/demo-issuer-jwks.json\n    jwks_uri: https://idp.example/jwks"))
    assert "$.oauth2_issuers.https://auth.example.com: set exactly one of jwks_uri or jwks_file" in _load_error(qs)
