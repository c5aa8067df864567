"""Secret wrapping and TLS client certificate material."""

from __future__ import annotations

import copy
import datetime
import logging
import pickle
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from egress_auth.model.sources import CredentialSource
from egress_auth.secrets.material import (
    MASK,
    Material,
    MaterialError,
    Secret,
    load_tls_material,
    material_of,
)
from tests.support.pki import Issued, TestPKI

VALUE = "s3cr3t-VALUE-42"


# --- Secret ------------------------------------------------------------------------------------


def test_secret_masks_every_printing_path(caplog: pytest.LogCaptureFixture) -> None:
    s = Secret(VALUE)
    shown = [
        repr(s),
        str(s),
        f"{s}",
        f"{s!r}",
        f"{s:>40}",
        format(s, ""),
        "%s %r" % (s, s),  # noqa: UP031 - old-style formatting is a printing path too
        repr([s]),
        repr({"k": s}),
        repr((s,)),
    ]
    for text in shown:
        assert VALUE not in text
        assert MASK in text
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("value %s", s)
    assert VALUE not in caplog.text
    assert s.reveal() == VALUE


def test_secret_equality_and_hash() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"  # never equal to the bare string
    assert len({Secret("a"), Secret("a")}) == 1


def test_secret_refuses_pickling() -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(Secret(VALUE), protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps(Material(values={"k": Secret(VALUE)}))


def test_secret_has_no_dict() -> None:
    s = Secret(VALUE)
    with pytest.raises(AttributeError):
        s.__dict__  # noqa: B018 - slots only: no stray attribute can hold a copy
    with pytest.raises(TypeError):
        copy.copy(s)


# --- load_tls_material -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client(pki: TestPKI) -> Issued:
    return pki.client("material-client")


def key_rows(key_pem: bytes | str) -> list[str]:
    text = key_pem.decode() if isinstance(key_pem, bytes) else key_pem
    return [row for row in text.splitlines() if row and not row.startswith("-----")]


def assert_clean(err: MaterialError, key_pem: bytes | str) -> None:
    for text in (str(err), err.reason, repr(err)):
        for row in key_rows(key_pem):
            assert row not in text


def test_leaf_and_intermediate(pki: TestPKI, client: Issued) -> None:
    tls = load_tls_material(client.chain_pem.decode(), client.key_pem.decode(), None)
    certs = x509.load_pem_x509_certificates(tls.chain_pem)
    assert len(certs) == 2
    assert certs[0].public_bytes(serialization.Encoding.PEM) == client.cert_pem
    assert "CN=material-client" in tls.facts.subject
    assert "CN=egress-auth test intermediate" in tls.facts.issuer
    assert tls.facts.not_after > datetime.datetime.now(datetime.UTC)
    fingerprint = certs[0].fingerprint(hashes.SHA256()).hex(":")
    assert tls.facts.sha256_fingerprint == fingerprint
    assert tls.ca_pem is None
    assert isinstance(tls.key_pem, Secret)
    assert "PRIVATE KEY" in tls.key_pem.reveal()
    assert client.key_pem.decode() not in repr(tls)


def test_leaf_only_and_ca(pki: TestPKI) -> None:
    leaf = pki.client("root-issued", issuer="root")
    ca = (pki.root_pem + pki.other_root_pem).decode()
    tls = load_tls_material(leaf.chain_pem.decode(), leaf.key_pem.decode(), ca)
    assert len(x509.load_pem_x509_certificates(tls.chain_pem)) == 1
    assert tls.ca_pem is not None
    assert len(x509.load_pem_x509_certificates(tls.ca_pem)) == 2


def test_traditional_ec_key_is_accepted_and_normalised(client: Issued) -> None:
    key = serialization.load_pem_private_key(client.key_pem, None)
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    tls = load_tls_material(client.chain_pem.decode(), sec1.decode(), None)
    assert tls.key_pem.reveal().startswith("-----BEGIN PRIVATE KEY-----")


def _same_name_impostor(issuer_pem: bytes, leaf_pem: bytes) -> bytes:
    """A CA certificate with the intermediate's name but a different key."""
    real = x509.load_pem_x509_certificate(issuer_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return leaf_pem + cert.public_bytes(serialization.Encoding.PEM)


def _x25519_key() -> str:
    return (
        x25519.X25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def _encrypted(key_pem: bytes) -> str:
    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ).decode()


FAKE_KEY = "-----BEGIN PRIVATE KEY-----\nS0VZQllURVNTRUNSRVQ=\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("case", "field", "reason"),
    [
        ("cert-not-pem", "certificatePem", "not a PEM certificate"),
        ("cert-empty", "certificatePem", "not a PEM certificate"),
        ("cert-bad-der", "certificatePem", "not a PEM certificate"),
        ("chain-reversed", "certificatePem", "leaf first"),
        ("chain-wrong-intermediate", "certificatePem", "not issued by"),
        ("chain-bad-signature", "certificatePem", "not signed by"),
        ("key-garbage", "privateKeyPem", "not an unencrypted PEM private key"),
        ("key-encrypted", "privateKeyPem", "not an unencrypted PEM private key"),
        ("key-mismatch", "privateKeyPem", "does not match"),
        ("key-x25519", "privateKeyPem", "not supported"),
        ("ca-not-pem", "caPem", "not a PEM certificate"),
    ],
)
def test_failures_name_the_field_never_the_key(
    pki: TestPKI, client: Issued, case: str, field: str, reason: str
) -> None:
    chain = client.chain_pem.decode()
    key = client.key_pem.decode()
    ca: str | None = None
    leaf = client.cert_pem
    intermediate = client.chain_pem[len(leaf) :]
    other = pki.client("other-client", issuer="other")
    if case == "cert-not-pem":
        chain = "hello"
    elif case == "cert-empty":
        chain = ""
    elif case == "cert-bad-der":
        chain = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    elif case == "chain-reversed":
        chain = (intermediate + leaf).decode()
    elif case == "chain-wrong-intermediate":
        chain = (leaf + other.chain_pem[len(other.cert_pem) :]).decode()
    elif case == "chain-bad-signature":
        chain = _same_name_impostor(intermediate, leaf).decode()
    elif case == "key-garbage":
        key = FAKE_KEY
    elif case == "key-encrypted":
        key = _encrypted(client.key_pem)
    elif case == "key-mismatch":
        key = other.key_pem.decode()
    elif case == "key-x25519":
        key = _x25519_key()
    elif case == "ca-not-pem":
        ca = "nope"
    with pytest.raises(MaterialError) as info:
        load_tls_material(chain, key, ca)
    err = info.value
    assert err.field == field
    assert reason in err.reason
    assert str(err) == f"{field}: {err.reason}"
    assert_clean(err, key)
    assert_clean(err, client.key_pem)
    assert isinstance(err, ValueError)


# --- material_of -------------------------------------------------------------------------------


def source(kind: str, spec: dict[str, Any]) -> CredentialSource:
    return CredentialSource.model_validate({"name": "s", "resolverKind": kind, "spec": spec})


def test_material_of_static_headers() -> None:
    m = material_of(
        source("static_headers", {"staticHeaders": {"values": {"token": VALUE, "b": "2"}}})
    )
    assert {k: v.reveal() for k, v in m.values.items()} == {"token": VALUE, "b": "2"}
    assert all(isinstance(v, Secret) for v in m.values.values())
    assert m.tls is None
    assert VALUE not in repr(m)


def test_material_of_username_password() -> None:
    m = material_of(
        source(
            "static_username_password",
            {"staticUsernamePassword": {"username": "alice", "password": VALUE}},
        )
    )
    assert {k: v.reveal() for k, v in m.values.items()} == {"username": "alice", "password": VALUE}
    assert m.tls is None


def test_material_of_tls(client: Issued, pki: TestPKI) -> None:
    spec = {
        "staticTLSClientCertificate": {
            "certificatePem": client.chain_pem.decode(),
            "privateKeyPem": client.key_pem.decode(),
            "caPem": pki.root_pem.decode(),
        }
    }
    m = material_of(source("static_tls_client_certificate", spec))
    assert m.values == {}
    assert m.tls is not None
    assert m.tls.ca_pem == pki.root_pem
    assert "material-client" in m.tls.facts.subject


def test_material_of_bad_tls(client: Issued) -> None:
    spec = {
        "staticTLSClientCertificate": {
            "certificatePem": client.chain_pem.decode(),
            "privateKeyPem": FAKE_KEY,
        }
    }
    with pytest.raises(MaterialError) as info:
        material_of(source("static_tls_client_certificate", spec))
    assert info.value.field == "privateKeyPem"
    assert_clean(info.value, FAKE_KEY)
