"""A small private CA for vmferry's mutual-TLS listeners.

``vmferry pki init DIR`` creates one CA and, signed by it, a server and a
client certificate.  Every host of a migration cluster uses the same
directory (copy it): the daemon presents ``server.pem`` and accepts only
clients presenting a certificate of the CA; clients (the CLI, and a source
daemon talking to the destination daemon in peer-to-peer migration)
present ``client.pem`` and check the daemon against ``ca.pem``.

Files in ``DIR`` (mode 0700):

    ca.pem, ca-key.pem          the CA
    server.pem, server-key.pem  the daemon's certificate (serverAuth)
    client.pem, client-key.pem  the clients' certificate (clientAuth)
    crl.pem                     revoked certificates (``vmferry pki revoke``)

``vmferry pki client DIR OUT NAME [--read-only]`` issues another client
certificate into a directory of its own (``ca.pem``, ``client.pem``,
``client-key.pem``: usable as ``--pki-dir``, without the CA key); with
``--read-only`` its subject carries ``OU=read-only``, which the daemon's
default ``[access] tls_readonly`` maps to the read-only role.

Keys are EC P-256, written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry.errors import ErrorCode, VmferryError

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client-key.pem"
CRL = "crl.pem"
READ_ONLY_UNIT = "read-only"

# Always in the server certificate, so local clients can connect by any loopback name.
_DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def _name(common_name: str, unit: str = "") -> x509.Name:
    unit_attr = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)] if unit else []
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmferry"),
            *unit_attr,
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses become IP SANs, everything else DNS SANs; duplicates dropped."""
    entries: list[x509.GeneralName] = []
    for raw in names:
        name = raw.strip().strip("[]")
        if not name:
            continue
        entry: x509.GeneralName
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name.lower())
        if entry not in entries:
            entries.append(entry)
    return entries


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    # Backdate a little: a peer whose clock runs slightly behind must still accept us.
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = _name(f"vmferry CA ({socket.gethostname()})")
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
    days: int,
    unit: str = "",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    not_before, not_after = _validity(days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, unit))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # keyEncipherment too: QEMU's TLS (migration, NBD) refuses leaves without it
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with the final mode, so a key is never readable by others, not even briefly.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def server_names_default() -> list[str]:
    """The names every server certificate carries: loopback and this machine's hostname."""
    return [*_DEFAULT_SERVER_NAMES, socket.gethostname()]


def init_pki(
    dir: Path,
    *,
    server_names: Sequence[str] = (),
    days: int = 3650,
    force: bool = False,
) -> None:
    """
    Create a CA, a server and a client certificate in *dir*.

    The server certificate's subject alternative names are ``localhost``,
    ``127.0.0.1``, ``::1``, this machine's hostname and *server_names*
    (IP addresses as IP SANs, the rest as DNS names).  For a cluster, list
    every host's name here and copy *dir* to every host.

    :param dir: The directory; created with mode 0700 if missing.
    :param server_names: Extra names the daemons are reached by.
    :param days: Validity of all three certificates.
    :param force: Replace an existing CA (invalidates every certificate it signed).
    :raise VmferryError: ``INVALID_ARG`` if a CA exists and *force* is false.
    """
    if days < 1:
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"certificate validity must be >= 1 day, not {days}"
        )
    dir = Path(dir)
    if not force and ((dir / CA_CERT).exists() or (dir / CA_KEY).exists()):
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"{dir} already holds a CA; replacing it invalidates every certificate it signed: "
            "use --force to replace it anyway",
        )
    try:
        dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(dir, 0o700)
    except OSError as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot create {dir}: {exc.strerror}") from exc

    ca_key, ca_cert = _make_ca(days)
    sans = _san_entries([*server_names_default(), *server_names])
    server_key, server_cert = _make_leaf(
        ca_key, ca_cert, socket.gethostname(), ExtendedKeyUsageOID.SERVER_AUTH, sans, days
    )
    client_key, client_cert = _make_leaf(
        ca_key, ca_cert, "vmferry client", ExtendedKeyUsageOID.CLIENT_AUTH, [], days
    )
    # The CA last: an interrupted run leaves no CA, so the next run does not need --force.
    files = [
        (SERVER_KEY, _key_pem(server_key), 0o600),
        (SERVER_CERT, _cert_pem(server_cert), 0o644),
        (CLIENT_KEY, _key_pem(client_key), 0o600),
        (CLIENT_CERT, _cert_pem(client_cert), 0o644),
        (CA_KEY, _key_pem(ca_key), 0o600),
        (CA_CERT, _cert_pem(ca_cert), 0o644),
    ]
    try:
        for name, data, mode in files:
            _write(dir / name, data, mode)
    except OSError as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot write to {dir}: {exc.strerror}") from exc


def _require(dir: Path, *names: str) -> list[str]:
    paths = [Path(dir) / name for name in names]
    for path in paths:
        if not path.is_file():
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"TLS file {path} is missing: run `vmferry pki init {dir}` "
                "(or copy the directory from the host that created the CA)",
            )
    return [str(path) for path in paths]


def _load(dir: Path, ctx: ssl.SSLContext, cert: str, key: str) -> ssl.SSLContext:
    ca_path, cert_path, key_path = _require(dir, CA_CERT, cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=ca_path)
        ctx.load_cert_chain(certfile=cert_path, keyfile=key_path)
    except (ssl.SSLError, OSError) as exc:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"cannot load the TLS files of {dir} ({exc}): run `vmferry pki init --force {dir}`",
        ) from exc
    return ctx


def server_ssl_context(dir: Path, crl: Path | None = None) -> ssl.SSLContext:
    """
    The daemon's TLS context: presents ``server.pem`` and requires a client
    certificate signed by the CA (mutual TLS, TLS >= 1.2) and not revoked.

    :param crl: A revocation list (PEM) checked at every handshake; by
        default ``DIR/crl.pem`` if it exists.  Read once: restart the daemon
        after revoking.
    """
    ctx = _load(dir, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), SERVER_CERT, SERVER_KEY)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if crl is None and (Path(dir) / CRL).is_file():
        crl = Path(dir) / CRL
    if crl is not None:
        try:
            ctx.load_verify_locations(cafile=str(crl))
        except (ssl.SSLError, OSError) as exc:
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"cannot load the revocation list {crl}: {exc}"
            ) from exc
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_ssl_context(dir: Path) -> ssl.SSLContext:
    """
    A client's TLS context: checks the daemon's certificate (CA and host
    name) and presents ``client.pem``.
    """
    ctx = _load(dir, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), CLIENT_CERT, CLIENT_KEY)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load_ca(dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_path, key_path = _require(dir, CA_CERT, CA_KEY)
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot load the CA of {dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise VmferryError(ErrorCode.INVALID_ARG, f"{key_path} is not an EC key")
    return key, cert


def issue_client(
    dir: Path, out: Path, name: str, *, read_only: bool = False, days: int = 365
) -> Path:
    """
    Issue a client certificate signed by the CA in *dir* into *out*.

    *out* gets ``ca.pem``, ``client.pem`` and ``client-key.pem`` (mode 0700),
    so it can be handed to the user as their ``--pki-dir``.  The subject is
    ``CN=NAME,O=vmferry``, with ``OU=read-only`` if *read_only*.

    :return: The path of the new certificate.
    :raise VmferryError: ``INVALID_ARG`` without a CA, for an empty *name*,
        or if *out* already holds a client certificate.
    """
    if not name.strip():
        raise VmferryError(ErrorCode.INVALID_ARG, "a client certificate needs a name (its CN)")
    if days < 1:
        raise VmferryError(ErrorCode.INVALID_ARG, f"validity must be >= 1 day, not {days}")
    ca_key, ca_cert = _load_ca(dir)
    out = Path(out)
    if (out / CLIENT_CERT).exists() or (out / CLIENT_KEY).exists():
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"{out} already holds a client certificate: choose another"
        )
    key, cert = _make_leaf(
        ca_key,
        ca_cert,
        name,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        [],
        days,
        unit=READ_ONLY_UNIT if read_only else "",
    )
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(out / CLIENT_KEY, _key_pem(key), 0o600)
        _write(out / CLIENT_CERT, _cert_pem(cert), 0o644)
        _write(out / CA_CERT, _cert_pem(ca_cert), 0o644)
    except OSError as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot write to {out}: {exc.strerror}") from exc
    return out / CLIENT_CERT


def revoke(dir: Path, cert_file: Path, *, days: int = 3650) -> int:
    """
    Add the certificate in *cert_file* to ``DIR/crl.pem`` (made if missing)
    and sign the list again; daemons read it when they start.

    :param days: Until when the list is valid: an expired list makes every
        TLS handshake fail.
    :return: The revoked certificate's serial number.
    :raise VmferryError: ``INVALID_ARG`` if the certificate is unreadable or
        not issued by this CA.
    """
    ca_key, ca_cert = _load_ca(dir)
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot read {cert_file}: {exc}") from exc
    try:
        cert.verify_directly_issued_by(ca_cert)  # names alone: every host's CA is "vmferry CA"
    except (ValueError, TypeError, InvalidSignature):
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"{cert_file} was not issued by the CA of {dir}"
        ) from None
    now = datetime.datetime.now(datetime.UTC)
    revoked: list[x509.RevokedCertificate] = []
    crl_path = Path(dir) / CRL
    if crl_path.exists():
        try:
            revoked = list(x509.load_pem_x509_crl(crl_path.read_bytes()))
        except ValueError as exc:
            raise VmferryError(ErrorCode.INVALID_ARG, f"cannot read {crl_path}: {exc}") from exc
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=days))
    )
    for entry in revoked:
        if entry.serial_number != cert.serial_number:
            builder = builder.add_revoked_certificate(entry)
    builder = builder.add_revoked_certificate(
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(now)
        .build()
    )
    crl = builder.sign(ca_key, hashes.SHA256())
    try:
        _write(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"cannot write {crl_path}: {exc.strerror}"
        ) from exc
    return cert.serial_number
