"""`egress-auth run | check | ca | env`: argument parsing and wiring, no logic of its own."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from . import __version__

DEFAULT_CERTS = "./certs"
DEFAULT_DATA = "./data"
DEFAULT_PROXY = "http://127.0.0.1:8080"


def _fail(message: str) -> int:
    print(f"egress-auth: {message}", file=sys.stderr)
    return 1


MAX_WORKERS = 64


def _workers(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}, not {n}")
    return n


def cmd_run(args: argparse.Namespace) -> int:
    from .app import RunSettings, StartupError, listen_of, run
    from .config import ConfigError, default_config_path, load_config
    from .model.config import ConfigFile

    path = default_config_path(args.config)
    try:
        if path is not None:
            loaded = load_config(path)
            config = loaded.config
            for line in loaded.report.lines():
                print(line, file=sys.stderr)
        else:
            config = ConfigFile()
        try:
            listen = listen_of(args.listen or config.proxy.listen)
        except ValueError as e:
            return _fail(f"{'--listen' if args.listen else 'proxy.listen'}: {e}")
        try:
            admin_listen = listen_of(args.admin_listen or config.admin.listen)
        except ValueError as e:
            return _fail(f"{'--admin-listen' if args.admin_listen else 'admin.listen'}: {e}")
        upstream_ca = args.upstream_ca or config.proxy.upstream_ca_file
        settings = RunSettings(
            config=config,
            config_path=path,
            listen=listen,
            admin_listen=admin_listen,
            certs_dir=Path(args.certs_dir),
            data_dir=Path(args.data_dir),
            upstream_ca=Path(upstream_ca) if upstream_ca else None,
            workers=args.workers,
        )
        run(settings)
    except ConfigError as e:
        return _fail(str(e))
    except (StartupError, ValueError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        loaded = load_config(args.config)
    except ConfigError as e:
        for line in e.report.lines(strict=args.strict):
            print(line)
        return 1
    report = loaded.report
    for line in report.lines(strict=args.strict):
        print(line)
    if args.strict and report.warnings:
        return 1
    n_t = len(loaded.config.templates)
    n_s = len(loaded.config.sources)
    print(f"{args.config}: ok ({n_s} sources, {n_t} templates, {len(report.warnings)} warnings)")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    from .app import StartupError, lock_data_dir, open_store
    from .secrets.crypto import KEY_ENV, MasterKeyError, parse_key, write_key_file

    data_dir = Path(args.data_dir)
    try:
        new_text = Path(args.new_key_file).read_text()
    except OSError as e:
        return _fail(f"--new-key-file: cannot read {args.new_key_file}: {e.strerror}")
    try:
        new_key = parse_key(new_text)
    except MasterKeyError:
        return _fail("--new-key-file: must hold the base64 of 32 bytes")
    try:
        lock = lock_data_dir(data_dir)
    except StartupError as e:
        return _fail(f"{e}; stop it before rekeying")
    try:
        store = open_store(data_dir)
        try:
            count = store.rekey(new_key)
        finally:
            store.close()
        # The store now opens only with the new key: put it where the old one came from.
        if os.environ.get(KEY_ENV):
            print(f"rekeyed {count} sources; set {KEY_ENV} to the new key before the next start")
        else:
            write_key_file(data_dir / "master.key", new_key)
            print(f"rekeyed {count} sources; {data_dir / 'master.key'} now holds the new key")
    except StartupError as e:
        return _fail(str(e))
    finally:
        lock.close()
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from .app import ensure_ca

    print(ensure_ca(Path(args.certs_dir)).resolve())
    return 0


def env_lines(ca_path: Path, proxy: str, sandbox: str | None, token: str | None) -> list[str]:
    if sandbox:
        scheme, _, rest = proxy.partition("://")
        rest = rest.rpartition("@")[2]
        proxy = f"{scheme}://{sandbox}:{token}@{rest}"
    ca = str(ca_path)
    # Loopback stays direct: a sandbox's own local services need no credential.
    values = {
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "NO_PROXY": "localhost,127.0.0.1,::1",
        "SSL_CERT_FILE": ca,
        "REQUESTS_CA_BUNDLE": ca,
        "CURL_CA_BUNDLE": ca,
        "NODE_EXTRA_CA_CERTS": ca,
        "GIT_SSL_CAINFO": ca,
        "PIP_CERT": ca,
        "AWS_CA_BUNDLE": ca,
    }
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]


def cmd_env(args: argparse.Namespace) -> int:
    from .app import ensure_ca

    if bool(args.sandbox) != bool(args.token):
        return _fail("--sandbox and --token go together")
    ca = ensure_ca(Path(args.certs_dir)).resolve()
    for line in env_lines(ca, args.proxy, args.sandbox, args.token):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egress-auth", description=__doc__)
    p.add_argument("--version", action="version", version=f"egress-auth {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument(
        "--config",
        help="config file (default: $EGRESS_AUTH_CONFIG or config/egress-auth.yaml when present)",
    )
    run.add_argument("--listen", help="proxy HOST:PORT (default 127.0.0.1:8080)")
    run.add_argument("--admin-listen", help="admin API HOST:PORT (default 127.0.0.1:8081)")
    run.add_argument("--data-dir", default=DEFAULT_DATA)
    run.add_argument("--certs-dir", default=DEFAULT_CERTS)
    run.add_argument("--upstream-ca", help="extra trusted roots for upstream servers (PEM)")
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="proxy processes sharing the listen port (SO_REUSEPORT); default 1",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config file without starting")
    check.add_argument("--config", required=True)
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.set_defaults(func=cmd_check)

    rekey = sub.add_parser("rekey", help="re-encrypt the store under a new master key")
    rekey.add_argument("--new-key-file", required=True, help="file holding base64 of 32 bytes")
    rekey.add_argument("--data-dir", default=DEFAULT_DATA)
    rekey.set_defaults(func=cmd_rekey)

    ca = sub.add_parser("ca", help="print the CA certificate's path (creating it if missing)")
    ca.add_argument("--certs-dir", default=DEFAULT_CERTS)
    ca.set_defaults(func=cmd_ca)

    env = sub.add_parser("env", help="print export lines that point a client at the proxy")
    env.add_argument("--certs-dir", default=DEFAULT_CERTS)
    env.add_argument("--proxy", default=DEFAULT_PROXY)
    env.add_argument("--sandbox")
    env.add_argument("--token")
    env.set_defaults(func=cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
