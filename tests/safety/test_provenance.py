"""C2PA manifests signed with a test chain made here: valid, trusted, tampered, unsigned; the check."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from flux2_core.errors import InputError
from flux2_core.safety import (
    OutputOptions,
    SigningCredentials,
    check_provenance,
    encode_output,
    read_manifest,
)
from flux2_core.safety.provenance import TRAINED_ALGORITHMIC_MEDIA


def _creds(chain) -> SigningCredentials:
    return SigningCredentials(str(chain["chain"]), str(chain["key"]))


def _reader_state(data: bytes, anchors: str | None = None) -> str:
    """c2pa's own Reader on the bytes, with no settings of ours but the anchors and offline switches."""
    import c2pa

    settings = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if anchors:
        settings["trust"] = {"trust_anchors": anchors}
    with c2pa.Reader("image/png", io.BytesIO(data), context=c2pa.Context.from_dict(settings)) as reader:
        return reader.get_validation_state()


@pytest.fixture(scope="module")
def signed_png(picture, chain) -> tuple[bytes, bytes]:
    rgb = picture(320, 384, 0)
    text = {"prompt": json.dumps({"1": {"class_type": "X"}}), "workflow": json.dumps({"nodes": []})}
    plain = encode_output(rgb, OutputOptions(format="png", text=text), "a.png")
    signed = encode_output(
        rgb, OutputOptions(format="png", text=text, credentials=_creds(chain), variant="klein-4b"), "a.png"
    )
    return plain, signed


def test_signed_png_verifies_with_c2pa_reader(signed_png, chain):
    plain, signed = signed_png
    assert _reader_state(signed) == "Valid"  # intact; the test root is not trusted by default
    assert _reader_state(signed, chain["root"].read_text()) == "Trusted"
    check = read_manifest(signed)
    assert check.state == "valid" and check.failures == ()
    trusted = read_manifest(signed, chain["root"].read_text())
    assert trusted.state == "trusted"
    assert trusted.generator == "Flux2Local"
    assert trusted.model == "FLUX.2 [klein] 4B"
    assert trusted.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert "Flux2Local test signer" in trusted.signer
    assert "trusted manifest by Flux2Local, made with FLUX.2 [klein] 4B" in trusted.summary()


def test_signing_keeps_pixels_and_png_metadata(signed_png):
    plain, signed = signed_png
    with Image.open(io.BytesIO(plain)) as a, Image.open(io.BytesIO(signed)) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert b.info["prompt"] == a.info["prompt"] and b.info["workflow"] == a.info["workflow"]
    assert len(signed) > len(plain)


def test_manifest_names_the_created_action(signed_png):
    import c2pa

    with c2pa.Reader("image/png", io.BytesIO(signed_png[1])) as reader:
        store = json.loads(reader.json())
    manifest = store["manifests"][store["active_manifest"]]
    actions = [
        a
        for x in manifest["assertions"]
        if x["label"].startswith("c2pa.actions")
        for a in x["data"]["actions"]
    ]
    created = [a for a in actions if a["action"] == "c2pa.created"]
    assert len(created) == 1
    assert created[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert created[0]["softwareAgent"]["name"] == "Flux2Local"
    assert created[0]["parameters"]["model_variant"] == "klein-4b"
    assert manifest["claim_generator_info"][0]["name"] == "Flux2Local"


def test_tampered_file_fails(signed_png, chain):
    signed = bytearray(signed_png[1])
    at = signed.find(b"IDAT") + 40  # a byte of the compressed pixels
    signed[at] ^= 0x01
    assert _reader_state(bytes(signed), chain["root"].read_text()) == "Invalid"
    check = read_manifest(bytes(signed), chain["root"].read_text())
    assert check.state == "invalid" and "assertion.dataHash.mismatch" in check.failures
    assert "INVALID" in check.summary()


def test_other_root_does_not_make_it_trusted(signed_png, make_chain):
    other = make_chain("ec")["root"].read_text()
    assert read_manifest(signed_png[1], other).state == "valid"


def test_unsigned_file_has_no_manifest(signed_png):
    check = read_manifest(signed_png[0])
    assert check.state == "none" and check.summary() == "C2PA: no manifest"


def test_jpeg_with_watermark_and_manifest_then_check(tmp_path, picture, make_chain):
    chain = make_chain("ed25519")  # a second algorithm: Ed25519
    rgb = picture(512, 512, 1)
    options = OutputOptions(format="jpeg", watermark=True, credentials=_creds(chain), variant="dev")
    path = tmp_path / "out.jpg"
    path.write_bytes(encode_output(rgb, options, "out.jpg"))
    report = check_provenance(path, chain["root"])
    assert report.watermark.found and report.watermark.matching_bits == 48
    assert report.manifest.state == "trusted" and report.manifest.model == "FLUX.2 [dev]"
    text = report.summary()
    assert "out.jpg" in text and "watermark found" in text and "trusted manifest" in text
    # unmarked, unsigned
    bare = tmp_path / "bare.png"
    bare.write_bytes(encode_output(rgb, OutputOptions(), "bare.png"))
    report = check_provenance(bare)
    assert not report.watermark.found and report.manifest.state == "none"


def test_credential_errors_name_the_input(tmp_path, picture, chain):
    rgb = picture(64, 64, 0)
    missing = SigningCredentials(str(tmp_path / "nope.pem"), str(chain["key"]))
    with pytest.raises(InputError, match=r"c2pa_certificate.*nope\.pem.*does not exist"):
        encode_output(rgb, OutputOptions(credentials=missing), "x.png")
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("hello")
    with pytest.raises(InputError, match=r"c2pa_private_key.*not a PEM"):
        encode_output(
            rgb, OutputOptions(credentials=SigningCredentials(str(chain["chain"]), str(not_pem))), "x"
        )
    # a key that does not belong to the certificate: c2pa refuses, the message says what to give
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(InputError, match=r"C2PA refused to sign.*Fix: give a PEM file"):
        encode_output(
            rgb, OutputOptions(credentials=SigningCredentials(str(chain["chain"]), str(wrong))), "x"
        )


def test_check_refuses_missing_and_non_image_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_provenance(tmp_path / "nothing.png")
    txt = tmp_path / "a.png"
    txt.write_bytes(b"not an image")
    with pytest.raises(InputError, match="neither PNG nor JPEG"):
        check_provenance(txt)
