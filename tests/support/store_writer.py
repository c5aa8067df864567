"""Durability helper: replace one source in a loop, printing each acknowledged version.

Run as `python store_writer.py DATA_DIR` with EGRESS_AUTH_MASTER_KEY set; the test SIGKILLs it.
A version is printed only after replace_source has returned, i.e. after the commit.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from egress_auth.secrets.crypto import KEY_ENV, parse_key
from egress_auth.secrets.store import Store


def main() -> None:
    store = Store.open(Path(sys.argv[1]), parse_key(os.environ[KEY_ENV]))
    while True:
        row = store.replace_source(
            "durable",
            "static_headers",
            b'{"staticHeaders": {"values": {"token": "durable-secret"}}}',
            expires_at=None,
            certificate=None,
            now=datetime.now(UTC),
        )
        sys.stdout.write(f"{row.version}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
