"""A throwaway C2PA certificate chain (root CA -> intermediate CA -> signing certificate), for tests
and demos of the C2PA signing: never use it to sign anything real.

C2PA refuses a self-signed or CA signing certificate; the signing certificate here is an end-entity
certificate with the digitalSignature key usage and the emailProtection extended key usage, valid
for 30 days from now.
"""

from __future__ import annotations

import datetime
from pathlib import Path


def _name(common_name: str):
    from cryptography.x509 import Name, NameAttribute
    from cryptography.x509.oid import NameOID

    return Name(
        [
            NameAttribute(NameOID.COMMON_NAME, common_name),
            NameAttribute(NameOID.ORGANIZATION_NAME, "Flux2Local tests"),
        ]
    )


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=1 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    # Ed25519 signs without a separate hash.
    return builder.sign(
        issuer_key, None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    )


def write_test_certificate_chain(folder: str | Path, algorithm: str = "ec") -> dict[str, Path]:
    """Root CA -> intermediate CA -> signing certificate, written as PEM files in ``folder``.

    Args:
        folder: where to write chain.pem, key.pem and root.pem (created).
        algorithm: "ec" (P-256, signs as ES256) or "ed25519".

    Returns:
        {"chain": signing cert + intermediate, "key": signing key, "root": root certificate}.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    def new_key():
        return (
            ec.generate_private_key(ec.SECP256R1())
            if algorithm == "ec"
            else ed25519.Ed25519PrivateKey.generate()
        )

    root_key, inter_key, leaf_key = new_key(), new_key(), new_key()
    root = _certificate("Test Root CA", root_key, "Test Root CA", root_key, ca=True)
    inter = _certificate("Test Intermediate CA", inter_key, "Test Root CA", root_key, ca=True)
    leaf = _certificate("Flux2Local test signer", leaf_key, "Test Intermediate CA", inter_key, ca=False)

    def pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"chain": folder / "chain.pem", "key": folder / "key.pem", "root": folder / "root.pem"}
    paths["chain"].write_bytes(pem(leaf) + pem(inter))
    paths["key"].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths["root"].write_bytes(pem(root))
    return paths
