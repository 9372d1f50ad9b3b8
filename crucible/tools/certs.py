"""crucible-certs: a CA and a certificate per host, for mutual TLS.

    crucible-certs DIR --hosts HOST[,HOST...] [--days N]

writes DIR/root.pem and DIR/root-key.pem (the CA; made once, reused when it
is there) and, for each host, DIR/HOST/cert.pem, key.pem and root.pem: the
three files --cert-pem, --key-pem and --root-cert-pem take. Every host's
certificate serves and dials (a downstairs does both: its repair server, and
fetching from another's), and names the host in its subjectAltName (an IP
address or a DNS name; `localhost` also gets 127.0.0.1 and ::1), which is
what a peer that dials it checks. Private keys are written mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crucible.cli_util import fail, positive_int

PROG = "crucible-certs"
Key = ec.EllipticCurvePrivateKey


def _names(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    for h in hosts:
        if "/" in h or h in (".", ".."):
            raise argparse.ArgumentTypeError(f"{h!r} is not a host name or address")
    if not hosts:
        raise argparse.ArgumentTypeError("give at least one host")
    return hosts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Make a CA and certificates for mutual TLS between hosts."
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="where the files go")
    p.add_argument(
        "--hosts",
        type=_names,
        action="extend",
        required=True,
        metavar="HOST[,HOST...]",
        help="hosts to make a certificate for, by the address or name peers dial",
    )
    p.add_argument("--days", type=positive_int, default=365, help="validity (default 365)")
    return p


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _pem_key(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def load_or_make_ca(directory: Path, days: int) -> tuple[x509.Certificate, Key, bool]:
    """The CA in `directory`, or a new one: (certificate, key, made now)."""
    cert_path, key_path = directory / "root.pem", directory / "root-key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key made by {PROG}")
        return cert, key, False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Crucible CA")])
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), secret=True)
    _write(cert_path, _pem(cert))
    return cert, key, True


def subject_names(host: str) -> list[x509.GeneralName]:
    """What a certificate for `host` names: the address or DNS name peers dial."""
    try:
        return [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        pass
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    if host == "localhost":
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    return names


def make_host(directory: Path, host: str, ca: x509.Certificate, ca_key: Key, days: int) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(subject_names(host)), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = directory / host
    _write(out / "key.pem", _pem_key(key), secret=True)
    _write(out / "cert.pem", _pem(cert))
    _write(out / "root.pem", _pem(ca))
    return out


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        ca, ca_key, made = load_or_make_ca(args.dir, args.days)
        print(f"{'made' if made else 'using'} CA {args.dir / 'root.pem'}")
        for host in dict.fromkeys(args.hosts):
            out = make_host(args.dir, host, ca, ca_key, args.days)
            print(
                f"{host}: --cert-pem {out}/cert.pem --key-pem {out}/key.pem "
                f"--root-cert-pem {out}/root.pem"
            )
    except (OSError, ValueError) as e:
        fail(PROG, f"{getattr(e, 'filename', '') or args.dir}: {getattr(e, 'strerror', '') or e}")
    sys.exit(0)
