"""Safety and provenance for FLUX.2 outputs, as BFL's reference ships them (all opt-in).

- ``content_filter``: stops a run when a prompt or image is flagged, by the NSFW image classifier
  (``nsfw``, a Hugging Face image-classification folder) or by the VLM integrity check
  (``integrity``: copyrighted characters, trademarks, public figures) asked of the text encoder's
  own language model through the small ``chat.ChatModel`` interface.
- ``watermark``: the invisible 48-bit FLUX.2 pixel watermark (invisible-watermark, ``dwtDct``).
- ``provenance``: signed C2PA manifests (c2pa-python) and the check that reads both back.
- ``output``: writes an output file with metadata, watermark and manifest in the right order.

The optional packages (invisible-watermark, c2pa-python) are imported only when used
(``deps.require``), with an error naming the package and the pip command when missing.
"""

from .chat import ChatModel, EncoderChat
from .content_filter import NSFW_CHECK, VLM_CHECK, ContentFilter, ContentFlagged, Finding
from .deps import MissingPackageError
from .integrity import DEFAULT_VLM_THRESHOLD, IntegrityJudge
from .nsfw import DEFAULT_NSFW_THRESHOLD, NsfwClassifier, is_classifier_folder, load_nsfw_classifier
from .output import FORMATS, OutputOptions, encode_output, tensor_to_rgb
from .provenance import (
    ManifestCheck,
    ProvenanceReport,
    SigningCredentials,
    check_provenance,
    manifest_definition,
    model_display_name,
    read_manifest,
    sign_image,
)
from .watermark import (
    BFL_REFERENCE_BITS,
    WATERMARK_BITS,
    WatermarkReading,
    can_carry_watermark,
    embed_watermark,
    read_watermark,
)

__all__ = [
    "BFL_REFERENCE_BITS",
    "ChatModel",
    "ContentFilter",
    "ContentFlagged",
    "DEFAULT_NSFW_THRESHOLD",
    "DEFAULT_VLM_THRESHOLD",
    "EncoderChat",
    "FORMATS",
    "Finding",
    "IntegrityJudge",
    "ManifestCheck",
    "MissingPackageError",
    "NSFW_CHECK",
    "NsfwClassifier",
    "OutputOptions",
    "ProvenanceReport",
    "SigningCredentials",
    "VLM_CHECK",
    "WATERMARK_BITS",
    "WatermarkReading",
    "can_carry_watermark",
    "check_provenance",
    "embed_watermark",
    "encode_output",
    "is_classifier_folder",
    "load_nsfw_classifier",
    "manifest_definition",
    "model_display_name",
    "read_manifest",
    "read_watermark",
    "sign_image",
    "tensor_to_rgb",
]
