#!/usr/bin/env python3
"""Make the TLS certificates and SuperNode keys for a Flower deployment (docs/deployment.md).

Writes into ``--out`` (default ``certs/``; keep it out of git, it holds private keys):

- ``ca.crt`` / ``ca.key``: a private certificate authority. ``ca.crt`` goes to every machine
  (SuperLink ``--ssl-ca-certfile``, SuperNode ``--root-certificates``, the workstation's
  ``root-certificates`` in ``~/.flwr/config.toml``). ``ca.key`` stays with whoever runs this.
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1``, ``::1`` and every ``--san`` (the SuperLink's LAN IP / DNS name:
  SuperNodes and ``flwr`` must reach it by one of these names).
- with ``--supernodes N`` (or ``--supernode NAME``, repeatable): ``supernode-<name>`` (private key,
  OpenSSH format, for ``flower-supernode --auth-supernode-private-key``) and
  ``supernode-<name>.pub`` (public key, OpenSSH format, for ``flwr supernode register``). Keys are
  ECDSA on NIST P-384, which is what Flower's SuperNode authentication accepts.

Only the ``cryptography`` package is needed (installed with flwr). Existing files are kept unless
``--force``; re-running with new ``--san`` values needs ``--force`` (the CA is then reissued too).

Examples::

    python scripts/gen_certs.py --out certs --san 192.168.1.10 --san superlink.lan --supernodes 2
    python scripts/gen_certs.py --out /tmp/c --force     # loopback only
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedkn"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san_entry(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    name = _name("fedkn deployment CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san_entry(s) for s in sans]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_keys(out: Path, name: str) -> tuple[Path, Path]:
    """OpenSSH-format ECDSA P-384 key pair: the private key file and its ``.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = out / f"supernode-{name}", out / f"supernode-{name}.pub"
    _write(priv_path, private, private=True)
    _write(pub_path, public + f" fedkn-supernode-{name}\n".encode(), private=False)
    return priv_path, pub_path


def generate(
    out: Path,
    sans: list[str] | tuple[str, ...] = (),
    supernodes: list[str] | tuple[str, ...] = (),
    days: int = 365,
    force: bool = False,
) -> dict[str, Path]:
    """Write the CA, the server certificate and the SuperNode keys; returns name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    all_sans = list(dict.fromkeys([*sans, *DEFAULT_SANS]))
    paths = {n: out / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")}
    if force or not all(p.exists() for p in paths.values()):
        ca_key, ca_cert = make_ca(days)
        key, cert = make_server_cert(ca_key, ca_cert, all_sans, days)
        _write(paths["ca.key"], _pem_key(ca_key), private=True)
        _write(paths["ca.crt"], ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(paths["server.key"], _pem_key(key), private=True)
        _write(paths["server.crt"], cert.public_bytes(serialization.Encoding.PEM), private=False)
    result = dict(paths)
    for name in supernodes:
        priv = out / f"supernode-{name}"
        if force or not priv.exists() or not priv.with_name(priv.name + ".pub").exists():
            make_supernode_keys(out, name)
        result[f"supernode-{name}"] = priv
        result[f"supernode-{name}.pub"] = priv.with_name(priv.name + ".pub")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="certs", help="output directory (default: certs)")
    parser.add_argument(
        "--san", action="append", default=[], metavar="HOST",
        help="extra IP or DNS name of the SuperLink (repeatable); localhost, 127.0.0.1, ::1 are always in",
    )
    parser.add_argument("--supernodes", type=int, default=0, metavar="N", help="make key pairs for SuperNodes 0..N-1")
    parser.add_argument("--supernode", action="append", default=[], metavar="NAME", help="make a key pair named NAME (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days (default: 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.supernodes < 0 or args.days < 1:
        parser.error("--supernodes must be >= 0 and --days >= 1")
    names = [str(i) for i in range(args.supernodes)] + list(args.supernode)
    for name in names:
        if not name or any(c in name for c in "/\\ "):
            parser.error(f"bad SuperNode name {name!r}")
    paths = generate(Path(args.out), args.san, names, args.days, args.force)
    for label, path in paths.items():
        print(f"{label:>22}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
