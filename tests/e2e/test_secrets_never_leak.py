"""The secrets' bytes appear nowhere the proxy writes: stdout, stderr, error bodies, logs."""

from __future__ import annotations

import base64

import pytest

from .conftest import BASIC_PASS, BASIC_USER, SECRETS, Env

pytestmark = pytest.mark.e2e


def test_no_secret_in_output_or_error_bodies(env: Env) -> None:
    bodies: list[bytes] = []
    with env.client() as c:
        for url in [
            "https://api.example.test/v1/x",
            "https://basic.example.test/",
            "https://a.wild.example.test/",
            "https://closed.example.test/",
            "https://expired.example.test/",
            "https://wrongcert13.example.test/",
            "https://nocert12.example.test/",
            "https://mtlsclosed13.example.test/",
            "https://mtls13.example.test/",
        ]:
            r = c.get(url)
            if r.status_code >= 400:
                bodies.append(r.content + str(r.headers).encode())
    r = env.curl("-i", "https://blocked.example.test/")
    bodies.append(r.stdout.encode() + r.stderr.encode())
    assert len(bodies) >= 6
    basic = base64.b64encode(f"{BASIC_USER}:{BASIC_PASS}".encode())
    needles = [s.encode() for s in SECRETS] + [basic]
    needles += [pem.split("\n")[1].encode() for pem in env.key_pems]  # a line of each key
    output = env.proxy.stdout_path.read_bytes() + env.proxy.stderr_path.read_bytes()
    assert b'"decision": "injected"' in output  # the log is there, and it is clean:
    for needle in needles:
        assert needle not in output
        for body in bodies:
            assert needle not in body
    # Nothing secret was written under the data dir either (only the public trust bundle).
    for f in env.proxy.data_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert all(n not in data for n in needles), f
