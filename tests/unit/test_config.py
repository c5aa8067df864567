"""Config file loading: references, validation, and every problem reported at its place.

Each negative case edits a known-good file (`FULL`, shaped like SPEC section 5) by plain text
replacement, then checks the reported `file:LINE:COL`, the field path and the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from egress_auth.config import ConfigError, ConfigReport, LoadedConfig, load_config
from egress_auth.config import load_config_text as _load_config_text
from tests.support.pki import Issued, TestPKI

GITHUB_TOKEN = "ghp_unit-test-token-0123456789"
CI_TOKEN = "ci-runner-proxy-token-xyz"
REGISTRY_PASSWORD = "hunter2-registry"
ENV = {"EA_TEST_GITHUB_TOKEN": GITHUB_TOKEN, "EA_TEST_CI_TOKEN": CI_TOKEN}

RULES = "templates[0].spec.network.egress.credentialRules"
BINDINGS = "templates[0].spec.network.credentialBindings"

FULL = """\
proxy:
  listen: 127.0.0.1:8080
  sandboxAuth: optional
  defaultTemplate: default
  intercept: matching
  upstreamCaFile: /etc/ssl/internal-ca.pem
  connectTo:
    "api.internal.test:443": "127.0.0.1:9443"
admin:
  listen: 127.0.0.1:8081
sources:
  - name: github-source
    resolverKind: static_headers
    spec:
      staticHeaders:
        values:
          token: ${env:EA_TEST_GITHUB_TOKEN}
  - name: registry-login
    resolverKind: static_username_password
    spec:
      staticUsernamePassword:
        username: ci
        password: ${file:secrets/registry-password}
  - name: mtls-cert
    resolverKind: static_tls_client_certificate
    spec:
      staticTLSClientCertificate:
        certificatePem: ${file:client.chain.pem}
        privateKeyPem: ${file:client.key}
templates:
  - name: default
    description: the policy every client gets
    spec:
      network:
        mode: allow-all
        egress:
          trafficRules:
            - name: no-metadata
              action: deny
              cidrs: [169.254.169.254/32]
            - name: internal-ports
              action: allow
              domains: ["*.internal.test"]
              ports: [{port: 8000, endPort: 8100}]
          credentialRules:
            - name: github-api
              credentialRef: github-auth
              domains: [api.github.com]
            - name: registry
              credentialRef: registry-auth
              domains: ["*.registry.example.com"]
              failurePolicy: fail-open
              httpMatch:
                methods: [GET, HEAD]
                pathPrefixes: [/v2/]
            - name: internal-mtls
              credentialRef: mtls
              domains: [api.internal.test]
        credentialBindings:
          - ref: github-auth
            sourceRef: github-source
            projection:
              type: http_headers
              httpHeaders:
                headers:
                  - name: Authorization
                    valueTemplate: "Bearer {{ .token }}"
          - ref: registry-auth
            sourceRef: registry-login
            projection:
              type: username_password
          - ref: mtls
            sourceRef: mtls-cert
            projection:
              type: tls_client_certificate
            cachePolicy:
              ttl: 30s
"""

SANDBOXES = """\
sandboxes:
  - id: ci-runner
    template: default
    token: ${env:EA_TEST_CI_TOKEN}
"""


@dataclass
class Workspace:
    """A config folder holding the files that FULL refers to."""

    dir: Path
    pki: TestPKI
    client: Issued
    other: Issued

    @property
    def path(self) -> Path:
        return self.dir / "egress-auth.yaml"

    def load(self, text: str) -> LoadedConfig:
        self.path.write_text(text)
        return load_config(self.path)

    def errors(self, text: str) -> list[str]:
        """The report lines of a file that must not load."""
        with pytest.raises(ConfigError) as info:
            self.load(text)
        return info.value.report.lines()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ws(tmp_path: Path, pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    client = pki.client("unit-client")
    client.write(tmp_path, "client")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "registry-password").write_text(REGISTRY_PASSWORD + "\n")
    yield Workspace(tmp_path, pki, client, pki.client("unit-other"))


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based number of the line holding the nth occurrence of `needle`."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(f"{needle!r} is not in the text {nth} times")


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def one_line(lines: list[str], where: str) -> str:
    """The single report line whose field path is `where`."""
    found = [ln for ln in lines if f": {where}: " in ln]
    assert len(found) == 1, (where, lines)
    return found[0]


def assert_at(line: str, path: Path | str, lineno: int, severity: str = "error") -> None:
    prefix, _, rest = line.partition(f": {severity}: ")
    assert rest, line
    file, line_text, col = prefix.rsplit(":", 2)
    assert file == str(path)
    assert int(line_text) == lineno, line
    assert int(col) >= 1


# --- loading a good file ---------------------------------------------------------------------


def test_full_config_loads(ws: Workspace) -> None:
    loaded = ws.load(FULL + SANDBOXES)
    cfg = loaded.config
    assert loaded.path == ws.path
    assert loaded.report.errors == []
    assert [s.name for s in cfg.sources] == ["github-source", "registry-login", "mtls-cert"]
    headers = cfg.sources[0].spec.static_headers
    assert headers is not None
    assert headers.values["token"].get_secret_value() == GITHUB_TOKEN
    up = cfg.sources[1].spec.static_username_password
    assert up is not None
    # ${file:} is relative to the config's folder and drops one trailing newline.
    assert up.password.get_secret_value() == REGISTRY_PASSWORD
    tls = cfg.sources[2].spec.static_tls_client_certificate
    assert tls is not None
    assert tls.certificate_pem == ws.client.chain_pem.decode().removesuffix("\n")
    assert cfg.sandboxes[0].token.get_secret_value() == CI_TOKEN
    net = cfg.templates[0].spec.network
    assert [r.name for r in net.egress.credential_rules] == [
        "github-api",
        "registry",
        "internal-mtls",
    ]
    assert net.egress.credential_rules[1].failure_policy == "fail-open"
    assert net.egress.traffic_rules[1].ports[0].end_port == 8100
    assert cfg.proxy.connect_to == {"api.internal.test:443": "127.0.0.1:9443"}
    # Secrets never show in a printed model.
    assert GITHUB_TOKEN not in repr(cfg)
    assert REGISTRY_PASSWORD not in repr(cfg)


def test_load_config_text_uses_base_for_files(ws: Workspace) -> None:
    loaded = _load_config_text(FULL, "inline.yaml", ws.dir)
    assert loaded.report.errors == []
    assert loaded.path is None


def test_file_reference_drops_exactly_one_newline(ws: Workspace) -> None:
    (ws.dir / "secrets" / "registry-password").write_text("pw\n\n")
    lines = ws.errors(FULL)
    # "pw\n" is left, and a password may not hold LF: one newline only is dropped.
    line = one_line(lines, "sources[1].spec.staticUsernamePassword.password")
    assert "CR, LF or NUL" in line
    (ws.dir / "secrets" / "registry-password").write_text("no-newline")
    up = ws.load(FULL).config.sources[1].spec.static_username_password
    assert up is not None
    assert up.password.get_secret_value() == "no-newline"


def test_absolute_file_reference(ws: Workspace, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "pw"
    elsewhere.write_text("abs-pw\n")
    text = edit(FULL, "${file:secrets/registry-password}", f"${{file:{elsewhere}}}")
    up = ws.load(text).config.sources[1].spec.static_username_password
    assert up is not None
    assert up.password.get_secret_value() == "abs-pw"


def test_relative_upstream_ca_file_is_relative_to_the_config(ws: Workspace) -> None:
    text = edit(FULL, "upstreamCaFile: /etc/ssl/internal-ca.pem", "upstreamCaFile: ca/roots.pem")
    assert ws.load(text).config.proxy.upstream_ca_file == str(ws.dir.resolve() / "ca/roots.pem")


def test_empty_file_is_the_default_config(ws: Workspace) -> None:
    loaded = ws.load("")
    assert loaded.config.templates == []
    assert loaded.report.problems == []


# --- references --------------------------------------------------------------------------------


def test_missing_env_var(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EA_TEST_GITHUB_TOKEN")
    lines = ws.errors(FULL)
    line = one_line(lines, "sources[0].spec.staticHeaders.values.token")
    assert_at(line, ws.path, line_of(FULL, "${env:EA_TEST_GITHUB_TOKEN}"))
    assert "EA_TEST_GITHUB_TOKEN" in line
    assert "not set" in line


def test_missing_file(ws: Workspace) -> None:
    (ws.dir / "client.key").unlink()
    lines = ws.errors(FULL)
    line = one_line(lines, "sources[2].spec.staticTLSClientCertificate.privateKeyPem")
    assert_at(line, ws.path, line_of(FULL, "${file:client.key}"))
    assert "cannot read file" in line
    assert str(ws.dir / "client.key") in line


@pytest.mark.parametrize(
    "value",
    ["Bearer ${env:EA_TEST_GITHUB_TOKEN}", "${env:EA_TEST_GITHUB_TOKEN}x", "${file:a}${file:b}"],
)
def test_reference_inside_a_longer_string(ws: Workspace, value: str) -> None:
    text = edit(FULL, "token: ${env:EA_TEST_GITHUB_TOKEN}", f'token: "{value}"')
    lines = ws.errors(text)
    line = one_line(lines, "sources[0].spec.staticHeaders.values.token")
    assert_at(line, ws.path, line_of(text, "token: "))
    assert "must be the whole value" in line
    assert GITHUB_TOKEN not in "\n".join(lines)


def test_reference_without_a_name(ws: Workspace) -> None:
    text = edit(FULL, "${env:EA_TEST_GITHUB_TOKEN}", "${env:}")
    line = one_line(ws.errors(text), "sources[0].spec.staticHeaders.values.token")
    assert "needs a name" in line


# --- shape errors (pydantic) -------------------------------------------------------------------


def test_unknown_field(ws: Workspace) -> None:
    text = edit(
        FULL,
        "              domains: [api.github.com]\n",
        "              domains: [api.github.com]\n              bogus: 1\n",
    )
    line = one_line(ws.errors(text), f"{RULES}[0].bogus")
    assert_at(line, ws.path, line_of(text, "bogus: 1"))
    assert line.endswith("unknown field")


def test_missing_field_points_at_its_object(ws: Workspace) -> None:
    text = edit(FULL, "              credentialRef: github-auth\n", "")
    line = one_line(ws.errors(text), f"{RULES}[0].credentialRef")
    assert_at(line, ws.path, line_of(text, "- name: github-api"))
    assert "required" in line.lower()


@pytest.mark.parametrize("bad", ["*foo.example.com", "a.*.com", "*", "foo.*"])
def test_bad_wildcard(ws: Workspace, bad: str) -> None:
    text = edit(FULL, "domains: [api.github.com]", f'domains: [api.github.com, "{bad}"]')
    lines = ws.errors(text)
    assert len(lines) == 1
    line = one_line(lines, f"{RULES}[0].domains[1]")
    assert_at(line, ws.path, line_of(text, f'"{bad}"'))
    # The column is that of the list item itself, not of the `domains` key.
    col = int(line.split(":")[2])
    assert col == text.splitlines()[line_of(text, f'"{bad}"') - 1].index(f'"{bad}"') + 1
    assert "wildcard" in line


@pytest.mark.parametrize("name", ["Host", "host", "Proxy-Authorization", "X-Forwarded-For"])
def test_forbidden_header_name(ws: Workspace, name: str) -> None:
    text = edit(FULL, "- name: Authorization", f"- name: {name}")
    line = one_line(ws.errors(text), f"{BINDINGS}[0].projection.httpHeaders.headers[0].name")
    assert_at(line, ws.path, line_of(text, f"- name: {name}"))
    assert "controlled by the proxy" in line


def test_placeholder_substitution_is_not_supported_yet(ws: Workspace) -> None:
    text = edit(
        FULL,
        "              type: username_password\n",
        "              type: placeholder_substitution\n"
        "              placeholderSubstitution:\n"
        "                replacements:\n"
        "                  - placeholder: PLACEHOLDER\n"
        "                    valueTemplate: '{{ .password }}'\n"
        "                    locations: [header]\n",
    )
    line = one_line(ws.errors(text), f"{BINDINGS}[1].projection")
    # The place is the projection object the refusal is about.
    assert_at(line, ws.path, line_of(text, "projection:", nth=2))
    assert "not supported yet" in line


def test_duplicate_yaml_keys(ws: Workspace) -> None:
    text = edit(
        FULL,
        "              domains: [api.github.com]\n",
        "              domains: [api.github.com]\n              domains: [evil.example]\n",
    )
    line = one_line(ws.errors(text), f"{RULES}[0].domains")
    assert_at(line, ws.path, line_of(text, "domains: [evil.example]"))
    assert "appears twice" in line
    assert "#" not in line.partition(": error: ")[2]  # no internal markers in the field path


def test_invalid_yaml_has_a_place(ws: Workspace) -> None:
    text = FULL + "  - [unclosed\n"
    lines = ws.errors(text)
    assert len(lines) == 1
    assert lines[0].startswith(f"{ws.path}:")
    assert "not valid YAML" in lines[0]


def test_top_level_must_be_a_mapping(ws: Workspace) -> None:
    lines = ws.errors("- just\n- a list\n")
    assert "mapping at the top level" in lines[0]


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "cannot read the config file" in str(info.value)


# --- cross-object checks (policy.validate) -----------------------------------------------------


def test_undeclared_source_is_a_warning(ws: Workspace) -> None:
    text = edit(FULL, "sourceRef: github-source", "sourceRef: made-by-api")
    loaded = ws.load(text)  # still loads
    assert loaded.report.errors == []
    lines = loaded.report.lines()
    line = one_line(lines, f"{BINDINGS}[0].sourceRef")
    assert_at(line, ws.path, line_of(text, "sourceRef: made-by-api"), severity="warning")
    assert "'made-by-api' is not declared" in line
    strict = one_line(loaded.report.lines(strict=True), f"{BINDINGS}[0].sourceRef")
    assert ": error: " in strict


def test_value_template_key_the_source_lacks(ws: Workspace) -> None:
    text = edit(FULL, "{{ .token }}", "{{ .token }} {{ .nokey }}")
    line = one_line(
        ws.errors(text), f"{BINDINGS}[0].projection.httpHeaders.headers[0].valueTemplate"
    )
    assert_at(line, ws.path, line_of(text, "valueTemplate:"))
    assert "'nokey'" in line
    assert "it has: token" in line
    assert GITHUB_TOKEN not in line


def test_http_match_on_a_tls_rule(ws: Workspace) -> None:
    text = edit(
        FULL,
        "              domains: [api.internal.test]\n",
        "              domains: [api.internal.test]\n"
        "              httpMatch:\n"
        "                methods: [GET]\n",
    )
    line = one_line(ws.errors(text), f"{RULES}[2].httpMatch")
    assert_at(line, ws.path, line_of(text, "httpMatch:", nth=2))
    assert "tls_client_certificate" in line


def test_tls_rule_needs_https(ws: Workspace) -> None:
    text = edit(
        FULL,
        "              domains: [api.internal.test]\n",
        "              domains: [api.internal.test]\n              protocol: http\n",
    )
    line = one_line(ws.errors(text), f"{RULES}[2].protocol")
    assert_at(line, ws.path, line_of(text, "protocol: http"))


@pytest.mark.parametrize(
    ("old", "new", "binding"),
    [
        ("sourceRef: registry-login", "sourceRef: github-source", 1),  # basic <- headers
        ("sourceRef: mtls-cert", "sourceRef: registry-login", 2),  # tls <- username/password
        ("sourceRef: github-source", "sourceRef: mtls-cert", 0),  # headers <- tls
    ],
)
def test_projection_that_does_not_fit_the_source(
    ws: Workspace, old: str, new: str, binding: int
) -> None:
    text = edit(FULL, old, new)
    line = one_line(ws.errors(text), f"{BINDINGS}[{binding}].projection.type")
    assert_at(line, ws.path, line_of(text, "type:", nth=binding + 1))
    assert "cannot use source" in line


def test_http_headers_projection_can_use_username_password(ws: Workspace) -> None:
    text = edit(FULL, "sourceRef: github-source", "sourceRef: registry-login")
    text = edit(text, "{{ .token }}", "{{ .username }}:{{ .password }}")
    assert ws.load(text).report.errors == []


def test_credential_ref_naming_no_binding(ws: Workspace) -> None:
    text = edit(FULL, "credentialRef: github-auth", "credentialRef: nobody")
    line = one_line(ws.errors(text), f"{RULES}[0].credentialRef")
    assert_at(line, ws.path, line_of(text, "credentialRef: nobody"))
    assert "'nobody'" in line


def test_duplicate_rule_names(ws: Workspace) -> None:
    text = edit(FULL, "- name: registry\n", "- name: github-api\n")
    line = one_line(ws.errors(text), f"{RULES}[1].name")
    assert_at(line, ws.path, line_of(text, "- name: github-api", nth=2))
    assert "duplicate credential rule name" in line


def test_default_template_must_exist(ws: Workspace) -> None:
    text = edit(FULL, "defaultTemplate: default", "defaultTemplate: nope")
    line = one_line(ws.errors(text), "proxy.defaultTemplate")
    assert_at(line, ws.path, line_of(text, "defaultTemplate: nope"))


# --- TLS material ------------------------------------------------------------------------------

TLS = "sources[2].spec.staticTLSClientCertificate"


def test_certificate_not_pem(ws: Workspace) -> None:
    text = edit(FULL, "certificatePem: ${file:client.chain.pem}", "certificatePem: hello")
    line = one_line(ws.errors(text), f"{TLS}.certificatePem")
    assert_at(line, ws.path, line_of(text, "certificatePem: hello"))
    assert "not a PEM certificate" in line


def test_key_not_matching_the_leaf(ws: Workspace) -> None:
    (ws.dir / "client.key").write_bytes(ws.other.key_pem)
    lines = ws.errors(FULL)
    line = one_line(lines, f"{TLS}.privateKeyPem")
    assert_at(line, ws.path, line_of(FULL, "privateKeyPem:"))
    assert "does not match" in line
    assert_no_key_text(lines, ws.other.key_pem)


def test_chain_out_of_order(ws: Workspace) -> None:
    leaf = ws.client.cert_pem
    intermediate = ws.client.chain_pem[len(leaf) :]
    (ws.dir / "client.chain.pem").write_bytes(intermediate + leaf)
    line = one_line(ws.errors(FULL), f"{TLS}.certificatePem")
    assert_at(line, ws.path, line_of(FULL, "certificatePem:"))
    assert "leaf first" in line


def test_bad_private_key_is_never_quoted(ws: Workspace) -> None:
    secret_body = "U1VQRVJTRUNSRVRLRVlCWVRFUw"
    (ws.dir / "client.key").write_text(
        f"-----BEGIN PRIVATE KEY-----\n{secret_body}\n-----END PRIVATE KEY-----\n"
    )
    lines = ws.errors(FULL)
    line = one_line(lines, f"{TLS}.privateKeyPem")
    assert "not an unencrypted PEM private key" in line
    assert secret_body not in "\n".join(lines)


def test_bad_ca_pem(ws: Workspace) -> None:
    text = edit(
        FULL,
        "        privateKeyPem: ${file:client.key}\n",
        "        privateKeyPem: ${file:client.key}\n        caPem: not-a-cert\n",
    )
    line = one_line(ws.errors(text), f"{TLS}.caPem")
    assert_at(line, ws.path, line_of(text, "caPem: not-a-cert"))


def assert_no_key_text(lines: list[str], key_pem: bytes) -> None:
    out = "\n".join(lines)
    for row in key_pem.decode().splitlines():
        if not row.startswith("-----"):
            assert row not in out


# --- many problems at once; secrets never in output ---------------------------------------------


def test_all_shape_errors_are_reported(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EA_TEST_CI_TOKEN")
    text = edit(FULL, "domains: [api.github.com]", 'domains: ["*foo.example.com", "a.*.com"]')
    text = edit(text, "- name: Authorization", "- name: Proxy-Authorization")
    text = edit(text, "        mode: allow-all\n", "        mode: allow-all\n        color: red\n")
    text = edit(text, "type: username_password", "type: placeholder_substitution")
    text += SANDBOXES
    lines = ws.errors(text)
    expect = {
        f"{RULES}[0].domains[0]": line_of(text, "*foo.example.com"),
        f"{RULES}[0].domains[1]": line_of(text, "a.*.com"),
        f"{BINDINGS}[0].projection.httpHeaders.headers[0].name": line_of(
            text, "Proxy-Authorization"
        ),
        "templates[0].spec.network.color": line_of(text, "color: red"),
        f"{BINDINGS}[1].projection": line_of(text, "projection:", nth=2),
        "sandboxes[0].token": line_of(text, "${env:EA_TEST_CI_TOKEN}"),
    }
    for where, lineno in expect.items():
        assert_at(one_line(lines, where), ws.path, lineno)
    assert len(lines) == len(expect)


def test_all_cross_object_errors_are_reported(ws: Workspace) -> None:
    text = edit(FULL, "credentialRef: github-auth", "credentialRef: nobody")
    text = edit(text, "- name: registry\n", "- name: github-api\n")
    text = edit(text, "sourceRef: registry-login", "sourceRef: github-source")
    text = edit(text, "sourceRef: mtls-cert", "sourceRef: not-here")
    lines = ws.errors(text)
    expect = {
        f"{RULES}[0].credentialRef": ("error", line_of(text, "credentialRef: nobody")),
        f"{RULES}[1].name": ("error", line_of(text, "- name: github-api", nth=2)),
        f"{BINDINGS}[1].projection.type": ("error", line_of(text, "type: username_password")),
        f"{BINDINGS}[2].sourceRef": ("warning", line_of(text, "sourceRef: not-here")),
    }
    for where, (severity, lineno) in expect.items():
        assert_at(one_line(lines, where), ws.path, lineno, severity)
    assert len(lines) == len(expect)


def test_error_str_is_the_first_error(ws: Workspace) -> None:
    text = edit(FULL, "credentialRef: github-auth", "credentialRef: nobody")
    with pytest.raises(ConfigError) as info:
        ws.load(text)
    assert str(info.value) == info.value.report.lines()[0]
    assert isinstance(info.value.report, ConfigReport)


@pytest.mark.parametrize(
    ("old", "new", "secret"),
    [
        # A header value with a CR in it, typed in the file.
        ("token: ${env:EA_TEST_GITHUB_TOKEN}", 'token: "ghp_LEAKME\\r\\nX-Evil: 1"', "ghp_LEAKME"),
        # A NUL in a password.
        ("username: ci", 'username: ci\n        password: "pw\\0SECRETPW"', "SECRETPW"),
        # A username with ':' (cannot be sent in basic auth) is still secret material.
        ("username: ci", 'username: "USERSECRET:x"', "USERSECRET"),
        # A private key typed inline that is not a key.
        (
            "privateKeyPem: ${file:client.key}",
            'privateKeyPem: "-----BEGIN PRIVATE KEY-----\\nKEYSECRETBYTES\\n'
            '-----END PRIVATE KEY-----\\n"',
            "KEYSECRETBYTES",
        ),
    ],
)
def test_secrets_never_in_errors(ws: Workspace, old: str, new: str, secret: str) -> None:
    text = edit(FULL, old, new)
    with pytest.raises(ConfigError) as info:
        ws.load(text)
    out = "\n".join([*info.value.report.lines(), str(info.value)])
    assert secret not in out
    assert out  # there is an error to read


def test_secret_from_env_with_a_newline_is_not_shown(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EA_TEST_GITHUB_TOKEN", "ghp_FROMENV\nX-Injected: 1")
    lines = ws.errors(FULL)
    line = one_line(lines, "sources[0].spec.staticHeaders.values")
    assert "value of key 'token'" in line
    assert "ghp_FROMENV" not in "\n".join(lines)


def test_rendered_header_value_with_cr_is_refused_at_load(ws: Workspace) -> None:
    text = edit(FULL, '"Bearer {{ .token }}"', '"Bearer\\r\\n{{ .token }}"')
    line = one_line(
        ws.errors(text), f"{BINDINGS}[0].projection.httpHeaders.headers[0].valueTemplate"
    )
    assert "CR, LF or NUL" in line


# --- the `check` command -----------------------------------------------------------------------


def run_check(ws: Workspace, text: str, *flags: str) -> subprocess.CompletedProcess[str]:
    ws.path.write_text(text)
    env = {**os.environ, **ENV}
    return subprocess.run(
        [sys.executable, "-m", "egress_auth.cli", "check", "--config", str(ws.path), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli_check_broken_file(ws: Workspace) -> None:
    text = edit(FULL, "domains: [api.github.com]", 'domains: ["*foo.example.com", "a.*.com"]')
    text = edit(text, "token: ${env:EA_TEST_GITHUB_TOKEN}", 'token: "ghp_LEAKME\\r\\n"')
    proc = run_check(ws, text)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 3, out
    for line in out:
        assert line.startswith(f"{ws.path}:")
        assert ": error: " in line
    assert_at(one_line(out, f"{RULES}[0].domains[0]"), ws.path, line_of(text, "*foo"))
    assert_at(one_line(out, f"{RULES}[0].domains[1]"), ws.path, line_of(text, "a.*.com"))
    assert "ghp_LEAKME" not in proc.stdout + proc.stderr


def test_cli_check_warnings_and_strict(ws: Workspace) -> None:
    text = textwrap.dedent(
        """\
        templates:
          - name: default
            spec:
              network:
                egress:
                  credentialRules:
                    - name: gh
                      credentialRef: gh
                      domains: [api.github.com]
                credentialBindings:
                  - ref: gh
                    sourceRef: made-by-api
                    projection:
                      type: username_password
        """
    )
    proc = run_check(ws, text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warning = one_line(proc.stdout.splitlines(), f"{BINDINGS}[0].sourceRef")
    assert_at(warning, ws.path, line_of(text, "sourceRef: made-by-api"), severity="warning")

    strict = run_check(ws, text, "--strict")
    assert strict.returncode == 1
    line = one_line(strict.stdout.splitlines(), f"{BINDINGS}[0].sourceRef")
    assert_at(line, ws.path, line_of(text, "sourceRef: made-by-api"), severity="error")


def test_cli_check_good_file(ws: Workspace) -> None:
    proc = run_check(ws, FULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("warnings)")
    assert GITHUB_TOKEN not in proc.stdout + proc.stderr


def test_shape_and_cross_object_errors_are_reported_in_one_run() -> None:
    """A file with an unknown field still gets the cross-object checks of its sound parts."""
    path = Path(__file__).parent / "data" / "broken-mixed.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    lines = exc.value.report.lines()
    expected = [
        (":3:3: error: proxy.bogusField", "unknown field"),
        (
            ":18:25: error: templates[0].spec.network.egress.credentialRules[0].domains[0]",
            "wildcard",
        ),
        (
            ":26:71: error: templates[0].spec.network.credentialBindings[0].projection.httpHeaders"
            ".headers[0].name",
            "'Host'",
        ),
        (
            ":32:72: error: templates[1].spec.network.egress.credentialRules[0].httpMatch",
            "tls_client_certificate",
        ),
        (
            ":35:25: warning: templates[1].spec.network.credentialBindings[0].sourceRef",
            "'somecert' is not declared",
        ),
        (
            ":36:111: error: templates[1].spec.network.credentialBindings[1].projection.httpHeaders"
            ".headers[0].valueTemplate",
            "'missing'",
        ),
    ]
    assert len(lines) == len(expected), lines
    for line, (place, reason) in zip(lines, expected, strict=True):
        assert place in line and reason in line, line
