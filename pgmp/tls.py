"""TLS settings made into ssl.SSLContext objects: one for pgmp's clients, one for its servers.

The worker builds both at start and again on reload (``for_clients`` and
``for_servers``); a connection keeps the context it started with, so new
certificates apply to new connections. The IO side of TLS (the SSLObject
between a socket and its plaintext) is pgmp.loop's Endpoint; the decisions
(when to start TLS, what a failure means) are the client's and the server's.
"""
from __future__ import annotations

import hashlib
import re
import ssl

ALPN = "postgresql"            # PostgreSQL 17's ALPN protocol name, required for direct TLS

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(Exception):
    """A TLS setting names a file that cannot be used; the message names the setting and the file."""


class ClientContext(ssl.SSLContext):
    """The context towards clients, with the channel binding data of the certificate it presents.

    ``server_end_point`` is RFC 5929's tls-server-end-point (a hash of pgmp's
    certificate) for SCRAM-SHA-256-PLUS, or None when the certificate's
    signature algorithm leaves it undefined (then PLUS is not offered).
    """
    server_end_point: bytes | None = None


def for_clients(config) -> ssl.SSLContext | None:
    """The context pgmp accepts client TLS with; None when client_tls_mode is disable.

    With client_tls_ca_file, a client certificate is asked for and, when sent,
    must verify against it (a client without one still gets through the
    handshake, so that the refusal is an ErrorResponse it can read).
    """
    if config.client_tls_mode == "disable":
        return None
    ctx = ClientContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, config.client_tls_min_version)
    _load_chain(ctx, "client_tls", config.client_tls_cert_file, config.client_tls_key_file)
    ctx.server_end_point = _end_point(config.client_tls_cert_file)
    if config.client_tls_ciphers:
        try:
            ctx.set_ciphers(config.client_tls_ciphers)
        except ssl.SSLError:
            raise TlsConfigError(f"client_tls_ciphers: no usable cipher in {config.client_tls_ciphers!r}") from None
    if config.client_tls_ca_file:
        _load_ca(ctx, "client_tls_ca_file", config.client_tls_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    # Like PostgreSQL: no session tickets or cache, a pooler's clients reconnect to any worker.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def for_servers(config) -> ssl.SSLContext | None:
    """The context pgmp connects to servers with; None when server_tls_mode is disable.

    prefer and require check nothing; verify-ca checks the chain against
    server_tls_ca_file (or the system's CAs); verify-full also the host name.
    """
    mode = config.server_tls_mode
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(ctx, "TLSv1.2")
    if mode in ("verify-ca", "verify-full"):
        ctx.check_hostname = mode == "verify-full"
        if config.server_tls_ca_file:
            _load_ca(ctx, "server_tls_ca_file", config.server_tls_ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.server_tls_cert_file:
        _load_chain(ctx, "server_tls", config.server_tls_cert_file, config.server_tls_key_file)
    return ctx


def _common(ctx: ssl.SSLContext, min_version: str) -> None:
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_alpn_protocols([ALPN])
    # No renegotiation: a TLS 1.2 peer could otherwise make a read want a write.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION


def _readable(setting: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsConfigError(f"{setting}: {path}: {(exc.strerror or str(exc)).lower()}") from None


def _load_chain(ctx: ssl.SSLContext, prefix: str, cert_file: str, key_file: str) -> None:
    _readable(f"{prefix}_cert_file", cert_file)
    if key_file:
        _readable(f"{prefix}_key_file", key_file)
    try:
        ctx.load_cert_chain(cert_file, key_file or None)
    except ssl.SSLError as exc:
        which = f"{cert_file} with key {key_file}" if key_file else cert_file
        raise TlsConfigError(f"{prefix}_cert_file: cannot load certificate and key from {which}: "
                             f"{describe(exc)} (a PEM certificate and its matching private key are needed)"
                             ) from None


def _load_ca(ctx: ssl.SSLContext, setting: str, path: str) -> None:
    _readable(setting, path)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{setting}: {path}: no PEM CA certificate in it ({describe(exc)})") from None


# ---- channel binding (tls-server-end-point) -------------------------------------------------

# signatureAlgorithm OIDs (DER content bytes) -> the hash of tls-server-end-point; RFC 5929 4.1:
# MD5 and SHA-1 signatures use SHA-256. Others (RSASSA-PSS, EdDSA) get no channel binding.
_SIGNATURE_HASHES = {
    bytes.fromhex("2a864886f70d010104"): "sha256",      # md5WithRSAEncryption
    bytes.fromhex("2a864886f70d010105"): "sha256",      # sha1WithRSAEncryption
    bytes.fromhex("2a864886f70d01010b"): "sha256",      # sha256WithRSAEncryption
    bytes.fromhex("2a864886f70d01010c"): "sha384",
    bytes.fromhex("2a864886f70d01010d"): "sha512",
    bytes.fromhex("2a864886f70d01010e"): "sha224",
    bytes.fromhex("2a8648ce3d0401"): "sha256",          # ecdsa-with-SHA1
    bytes.fromhex("2a8648ce3d040301"): "sha224",        # ecdsa-with-SHA224
    bytes.fromhex("2a8648ce3d040302"): "sha256",
    bytes.fromhex("2a8648ce3d040303"): "sha384",
    bytes.fromhex("2a8648ce3d040304"): "sha512",
}
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def channel_binding(layer) -> bytes | None:
    """tls-server-end-point data of a client connection's TLS layer, None without TLS or without it."""
    if layer is None:
        return None
    return getattr(layer.obj.context, "server_end_point", None)


def _end_point(cert_file: str) -> bytes | None:
    """The tls-server-end-point hash of the first certificate in ``cert_file`` (the one the handshake sends)."""
    with open(cert_file) as f:
        pem = _PEM_CERT.search(f.read())
    if pem is None:
        return None
    der = ssl.PEM_cert_to_DER_cert(pem.group(0))
    try:
        algorithm = _signature_algorithm(der)
    except (IndexError, ValueError):
        return None
    name = _SIGNATURE_HASHES.get(algorithm)
    return hashlib.new(name, der).digest() if name else None


def _signature_algorithm(der: bytes) -> bytes:
    """The OID of Certificate.signatureAlgorithm: SEQUENCE { tbsCertificate, signatureAlgorithm, ... }."""
    _, body, _ = _tlv(der, 0)
    _, _, tbs_end = _tlv(der, body)
    tag, alg_body, _ = _tlv(der, tbs_end)
    tag, oid_start, oid_end = _tlv(der, alg_body)
    if tag != 0x06:
        raise ValueError("no OID in signatureAlgorithm")
    return der[oid_start:oid_end]


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[pos:pos + size], "big")
        pos += size
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


# ---- inspecting a finished handshake ------------------------------------------------------

def peer_common_name(obj: ssl.SSLObject) -> str | None:
    """The CN of the peer's verified certificate, or None when it sent none (or none was checked)."""
    cert = obj.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


def is_name_mismatch(exc: Exception) -> bool:
    """The peer's certificate is valid, but not for the host name (or IP address) pgmp connected to."""
    return isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in _NAME_MISMATCH


def is_unverified(exc: Exception) -> bool:
    """The peer's certificate failed verification (chain, dates, name)."""
    return isinstance(exc, ssl.SSLCertVerificationError)


def describe(exc: Exception) -> str:
    """A TLS failure in a few words, for logs and error messages."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or exc.reason or str(exc)
    reason = getattr(exc, "reason", None)
    if reason:
        return reason.replace("_", " ").lower()
    text = str(exc.args[-1]) if exc.args else str(exc)
    return re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", text)
