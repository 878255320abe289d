"""Fixtures for the safety tests: natural-looking test pictures, a C2PA test certificate chain made
with ``cryptography``, tiny NSFW classifier folders and tiny yes/no Mistral judges (all built once)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from threads; on the shared 2-core box they only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth structure at several scales plus fine grain, like a rendered image."""
    rng = np.random.default_rng(seed)
    out = np.full((height, width, 3), 128.0)
    for step, amp in ((64, 80.0), (16, 40.0), (4, 20.0), (1, 6.0)):
        small = rng.normal(size=(max(1, height // step), max(1, width // step), 3))
        grey = Image.fromarray((small * 40 + 128).clip(0, 255).astype(np.uint8))
        up = np.asarray(grey.resize((width, height), Image.BICUBIC), dtype=np.float64)
        out += (up - 128) / 40 * amp
    return out.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def picture():
    """picture(height, width, seed=0) -> (H, W, 3) uint8 RGB test picture."""
    return _picture


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


def write_chain(folder: Path, algorithm: str = "ec") -> dict[str, Path]:
    """Root CA -> intermediate CA -> signing certificate, written as PEM files in ``folder``.

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


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> dict[str, Path]:
    """An EC P-256 test chain (PEM files: chain, key, root)."""
    return write_chain(tmp_path_factory.mktemp("c2pa-chain"))


@pytest.fixture(scope="session")
def make_chain(tmp_path_factory):
    """make_chain(algorithm="ec" | "ed25519") -> a fresh chain's PEM paths."""
    return lambda algorithm="ec": write_chain(tmp_path_factory.mktemp(f"chain-{algorithm}"), algorithm)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """classifier_dir(verdict) -> tiny ViT classifier folder ("nsfw", "normal" or None = random head)."""
    from flux2_core.tiny.safety import write_tiny_nsfw_classifier

    root = tmp_path_factory.mktemp("classifiers")
    made: dict = {}

    def make(verdict: str | None) -> Path:
        if verdict not in made:
            made[verdict] = write_tiny_nsfw_classifier(root / str(verdict), verdict=verdict, seed=3)
        return made[verdict]

    return make


@pytest.fixture(scope="session")
def judge_encoder(tmp_path_factory):
    """judge_encoder(answer) -> float32 Flux2TextEncoder of a tiny Mistral answering "yes" or "no"."""
    from flux2_core.text_encoders import load_text_encoder
    from flux2_core.tiny.safety import write_tiny_integrity_judge

    root = tmp_path_factory.mktemp("judges")
    loaded: dict = {}

    def make(answer: str):
        if answer not in loaded:
            te = write_tiny_integrity_judge(root / answer, answer=answer)
            loaded[answer] = load_text_encoder(te, dtype=torch.float32, cache=None)
        return loaded[answer]

    return make
