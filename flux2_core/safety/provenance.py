"""C2PA content credentials for generated images (c2pa-python), and the provenance check.

A saved image gets a manifest with one ``c2pa.created`` action whose digital source type is IPTC's
``trainedAlgorithmicMedia`` (made by a trained model), naming the FLUX.2 variant and this pack. It is
signed with the user's certificate chain and private key (PEM files). No timestamp authority is
contacted and nothing is fetched while signing or verifying (no network at run time).

How c2pa-python 0.38 reports a file (checked with a test chain made with ``cryptography``):
``validation_state`` is "Valid" when the signature and the data hash check out but the signer does
not chain to a trust anchor (failure code ``signingCredential.untrusted``), "Trusted" once the
signer's root is given as a trust anchor, and "Invalid" when the file changed after signing
(``assertion.dataHash.mismatch``). A file without a manifest raises ManifestNotFound.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .deps import require
from .watermark import WatermarkReading, read_watermark

logger = logging.getLogger(__name__)

GENERATOR_NAME = "Flux2Local"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# Flux2Config.variant -> the model's published name (what the manifest says made the image).
VARIANT_NAMES = {
    "dev": "FLUX.2 [dev]",
    "klein-4b": "FLUX.2 [klein] 4B",
    "klein-9b": "FLUX.2 [klein] 9B",
    "klein-base-4b": "FLUX.2 [klein] Base 4B",
    "klein-base-9b": "FLUX.2 [klein] Base 9B",
    "klein-9b-kv": "FLUX.2 [klein] 9B KV",
}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
# Offline everywhere: no remote manifests, no OCSP; no thumbnail (the file itself is the picture).
_VERIFY_OFFLINE = {"remote_manifest_fetch": False, "ocsp_fetch": False}
_SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": _VERIFY_OFFLINE}
_CERT_FIX = (
    "give a PEM file holding the signing certificate followed by its intermediate CA certificate(s), "
    "and the matching PEM private key (EC P-256/P-384/P-521, Ed25519 or RSA). C2PA requires an "
    "end-entity certificate (not a CA, not self-signed) with the digitalSignature key usage and an "
    "extended key usage such as emailProtection or documentSigning."
)


def model_display_name(variant: str | None) -> str:
    """The published name of a FLUX.2 variant ("FLUX.2 [klein] 4B"), or "FLUX.2 (<variant>)"."""
    if not variant:
        return "FLUX.2"
    return VARIANT_NAMES.get(variant, f"FLUX.2 ({variant})")


def pack_version() -> str:
    """This pack's version from its pyproject.toml ("unknown" if the file is not there)."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


def mime_of(data: bytes) -> str:
    """MIME type of PNG or JPEG bytes; InputError for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return MIME_TYPES["png"]
    if data[:3] == b"\xff\xd8\xff":
        return MIME_TYPES["jpeg"]
    raise InputError("the file is neither PNG nor JPEG; C2PA manifests are written and read for those two.")


# ------------------------------------------------------------------------------------------ signing
@dataclass(frozen=True)
class SigningCredentials:
    """Where the signer's certificate chain and private key are (PEM files, given by the user).

    Attributes:
        certificate: PEM file with the signing certificate first, then its intermediate CA(s).
        private_key: PEM file with the private key of the signing certificate (unencrypted).
    """

    certificate: str
    private_key: str


def _read_pem(path: str, what: str, input_name: str) -> bytes:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise InputError(f"{input_name}: the {what} file '{path}' does not exist. Fix: {_CERT_FIX}")
    data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise InputError(f"{input_name}: '{path}' is not a PEM file (no '-----BEGIN' line). Fix: {_CERT_FIX}")
    return data


def _signing_algorithm(key_pem: bytes, path: str) -> str:
    """c2pa's algorithm name for a PEM private key (es256, es384, es512, ed25519, ps256)."""
    require("cryptography", "C2PA signing")
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(key_pem, password=None)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"c2pa_private_key: '{path}' is not an unencrypted PEM private key ({e}). Fix: {_CERT_FIX}"
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    elif isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise InputError(
        f"c2pa_private_key: '{path}' holds a {type(key).__name__}, which C2PA cannot sign with. Fix: {_CERT_FIX}"
    )


def manifest_definition(variant: str | None, title: str, mime: str) -> dict:
    """The C2PA manifest of a generated image: one "created" action by a trained model.

    Args:
        variant: the FLUX.2 variant (``Flux2Config.variant``), e.g. "klein-4b".
        title: the file name.
        mime: "image/png" or "image/jpeg".
    """
    version = pack_version()
    model = model_display_name(variant)
    return {
        "claim_generator_info": [{"name": GENERATOR_NAME, "version": version}],
        "title": title,
        "format": mime,
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                            "softwareAgent": {"name": GENERATOR_NAME, "version": version},
                            "description": f"Generated with {model} in ComfyUI ({GENERATOR_NAME}).",
                            "parameters": {"model": model, "model_variant": variant or "unknown"},
                        }
                    ]
                },
            }
        ],
    }


def sign_image(data: bytes, credentials: SigningCredentials, variant: str | None, title: str) -> bytes:
    """Embeds a signed C2PA manifest into PNG or JPEG bytes.

    Args:
        data: the encoded image file.
        credentials: the user's certificate chain and key.
        variant: the FLUX.2 variant that made the image.
        title: the file name written into the manifest.

    Returns:
        The file bytes with the manifest embedded (pixels and other metadata unchanged).

    Raises:
        InputError: missing or unusable certificate or key (the message names the input).
        MissingPackageError: c2pa-python is not installed.
    """
    c2pa = require("c2pa", "signing the C2PA manifest")
    mime = mime_of(data)
    chain = _read_pem(credentials.certificate, "certificate", "c2pa_certificate")
    key = _read_pem(credentials.private_key, "private key", "c2pa_private_key")
    alg = _signing_algorithm(key, credentials.private_key)
    info = c2pa.C2paSignerInfo(alg=alg, sign_cert=chain, private_key=key, ta_url=None)
    out = io.BytesIO()
    try:
        context = c2pa.Context.from_dict(_SIGN_SETTINGS)
        with (
            c2pa.Signer.from_info(info) as signer,
            c2pa.Builder(manifest_definition(variant, title, mime), context=context) as builder,
        ):
            builder.sign(signer, mime, io.BytesIO(data), out)
    except c2pa.C2paError as e:
        raise InputError(
            f"c2pa_certificate / c2pa_private_key: C2PA refused to sign with '{credentials.certificate}' "
            f"and '{credentials.private_key}': {e}. Fix: {_CERT_FIX}"
        ) from None
    return out.getvalue()


# ----------------------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class ManifestCheck:
    """The C2PA manifest of a file, as c2pa's Reader validates it.

    Attributes:
        state: "none" (no manifest), "valid" (intact, signer not trusted), "trusted" (intact and the
            signer chains to a given trust anchor) or "invalid" (changed after signing or bad signature).
        failures: c2pa failure codes, e.g. ``assertion.dataHash.mismatch``.
        generator: the claim generator's name, e.g. "Flux2Local".
        model: the model named by the created action, if any.
        digital_source_type: the created action's source type URL, if any.
        signer: the signing certificate's common name and issuer.
    """

    state: str
    failures: tuple[str, ...] = ()
    generator: str | None = None
    model: str | None = None
    digital_source_type: str | None = None
    signer: str | None = None

    def summary(self) -> str:
        if self.state == "none":
            return "C2PA: no manifest"
        made = f", made with {self.model}" if self.model else ""
        by = f" by {self.generator}" if self.generator else ""
        who = f"; signed by {self.signer}" if self.signer else ""
        if self.state == "trusted":
            return f"C2PA: trusted manifest{by}{made}{who}"
        if self.state == "valid":
            return f"C2PA: valid manifest{by}{made}{who} (signer not trusted: no matching trust anchor given)"
        return f"C2PA: INVALID manifest ({', '.join(self.failures) or 'signature does not verify'}){who}"


def _created_action(manifest: dict) -> dict:
    for assertion in manifest.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            for action in assertion.get("data", {}).get("actions", []):
                if action.get("action") == "c2pa.created":
                    return action
    return {}


def read_manifest(data: bytes, trust_anchors: str | None = None) -> ManifestCheck:
    """Validates the C2PA manifest embedded in PNG or JPEG bytes, offline.

    Args:
        data: the file's bytes.
        trust_anchors: PEM text of the root certificate(s) to trust, or None (then a valid manifest
            reads "valid", never "trusted").
    """
    c2pa = require("c2pa", "checking the C2PA manifest")
    mime = mime_of(data)
    settings: dict = {"verify": _VERIFY_OFFLINE}
    if trust_anchors:
        settings["trust"] = {"trust_anchors": trust_anchors}
    try:
        context = c2pa.Context.from_dict(settings)
        with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
            state = (reader.get_validation_state() or "").lower()
            results = reader.get_validation_results() or {}
            store = json.loads(reader.json())
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "no JUMBF" in str(e):
            return ManifestCheck("none")
        return ManifestCheck("invalid", failures=(f"{type(e).__name__}: {e}",))
    active = store.get("manifests", {}).get(store.get("active_manifest"), {})
    failures = tuple(f.get("code", "?") for f in (results.get("activeManifest") or {}).get("failure", []))
    if state not in ("valid", "trusted"):
        state = "invalid"
    action = _created_action(active)
    params = action.get("parameters") or {}
    generators = active.get("claim_generator_info") or [{}]
    sig = active.get("signature_info") or {}
    signer = ", ".join(x for x in (sig.get("common_name"), sig.get("issuer")) if x) or None
    return ManifestCheck(
        state=state,
        failures=tuple(f for f in failures if state == "invalid" or f != "signingCredential.untrusted"),
        generator=generators[0].get("name"),
        model=params.get("model"),
        digital_source_type=action.get("digitalSourceType"),
        signer=signer,
    )


@dataclass(frozen=True)
class ProvenanceReport:
    """Watermark and C2PA findings for one image file."""

    path: str
    watermark: WatermarkReading
    manifest: ManifestCheck

    def summary(self) -> str:
        return f"{Path(self.path).name}:\n- {self.watermark.summary()}\n- {self.manifest.summary()}"


def check_provenance(
    path: str | os.PathLike, trust_anchors_path: str | os.PathLike | None = None
) -> ProvenanceReport:
    """Reads the invisible watermark and verifies the C2PA manifest of an image file.

    Args:
        path: a PNG or JPEG file.
        trust_anchors_path: optional PEM file of root certificates to trust.

    Raises:
        InputError: the file or the trust-anchor file does not exist, or is not PNG/JPEG.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image '{path}' does not exist.")
    data = p.read_bytes()
    mime_of(data)
    anchors = None
    if trust_anchors_path:
        anchors = _read_pem(os.fspath(trust_anchors_path), "trust anchor", "trust_anchors").decode()
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"))
    return ProvenanceReport(
        path=os.fspath(p), watermark=read_watermark(rgb), manifest=read_manifest(data, anchors)
    )
