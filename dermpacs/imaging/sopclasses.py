"""What dermpacs accepts as a photograph: SOP classes and transfer syntaxes.

The listener builds its presentation contexts from these constants and the decoder refuses
anything outside them, so that what is accepted on the network is exactly what can be read.

Transfer syntaxes are listed compressed first: an SCP accepts the first of its own transfer
syntaxes that the requestor proposed, so a camera that offers its JPEG bytes next to Explicit
VR Little Endian keeps its JPEG bytes (no lossy re-encoding or 10x larger transfers on the way).
"""

from __future__ import annotations

from typing import Final

from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

# --- SOP classes (PS3.4 Annex B.5, Standard SOP Classes) ---------------------------------

VL_PHOTOGRAPHIC_IMAGE: Final = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
"""VL Photographic Image Storage: what clinic cameras and photo apps send (PS3.3 A.33.4)."""

DERMOSCOPIC_PHOTOGRAPHY_IMAGE: Final = UID("1.2.840.10008.5.1.4.1.1.77.1.7")
"""Dermoscopic Photography Image Storage (PS3.3 A.32.11, Supplement 221)."""

SECONDARY_CAPTURE_IMAGE: Final = UID("1.2.840.10008.5.1.4.1.1.7")
"""Secondary Capture Image Storage: scanned or converted photographs (PS3.3 A.8.1)."""

MULTIFRAME_TRUE_COLOR_SC_IMAGE: Final = UID("1.2.840.10008.5.1.4.1.1.7.4")
"""Multi-frame True Color Secondary Capture; accepted with exactly one frame (PS3.3 A.8.5)."""

PHOTO_SOP_CLASSES: Final[tuple[UID, ...]] = (
    VL_PHOTOGRAPHIC_IMAGE,
    DERMOSCOPIC_PHOTOGRAPHY_IMAGE,
    SECONDARY_CAPTURE_IMAGE,
    MULTIFRAME_TRUE_COLOR_SC_IMAGE,
)
"""The storage SOP classes that dermpacs reads as photographs, most common first."""

# --- Transfer syntaxes (PS3.5 Section 10 and Annex A) ------------------------------------

# Every syntax dermpacs could read, in order of preference (compressed first, then native).
# HTJ2K (PS3.5 A.4.11, 2023) stays in the list only where an installed decoder reads it.
_CANDIDATE_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    JPEGBaseline8Bit,  # 1.2.840.10008.1.2.4.50, what nearly every camera writes
    JPEGExtended12Bit,  # 1.2.840.10008.1.2.4.51
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLossless,  # 1.2.840.10008.1.2.4.57
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    JPEG2000,  # 1.2.840.10008.1.2.4.91
    HTJ2KLossless,  # 1.2.840.10008.1.2.4.201
    HTJ2KLosslessRPCL,  # 1.2.840.10008.1.2.4.202
    HTJ2K,  # 1.2.840.10008.1.2.4.203
    RLELossless,  # 1.2.840.10008.1.2.5
    DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
    ExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1
    ImplicitVRLittleEndian,  # 1.2.840.10008.1.2, the default every AE must support
)

HTJ2K_TRANSFER_SYNTAXES: Final[frozenset[UID]] = frozenset(
    {HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}
)

LOSSY_TRANSFER_SYNTAXES: Final[frozenset[UID]] = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}
)
"""Syntaxes whose pixel data may have been compressed lossily (PS3.5 8.2).

JPEG 2000 and HTJ2K (not "Lossless Only") may also carry a reversible codestream; a decoded
photo from them is still reported as possibly lossy, which is the safe side for derived objects
(PS3.3 C.7.6.1.1.5, Lossy Image Compression).
"""


DECODING_PLUGINS: Final[tuple[str, ...]] = ("pylibjpeg", "pyjpegls", "pillow", "pydicom")
"""pydicom decoding plug-ins used for received photographs, in order of preference.

python-gdcm is left out on purpose: on some corrupt JPEG data (found by mutating files)
gdcm 3.2.6 throws a C++ exception that aborts the whole Python process instead of raising,
so one broken photo would kill the worker that reads it, again at every retry.
"""


def decoding_plugins(transfer_syntax_uid: str) -> tuple[str, ...]:
    """The installed plug-ins of :data:`DECODING_PLUGINS` that decode this syntax.

    Parameters
    ----------
    transfer_syntax_uid : str
        A transfer syntax UID.

    Returns
    -------
    tuple[str, ...]
        Plug-in names for pydicom's ``decoding_plugin``, best first; empty for native
        syntaxes (pydicom reads those itself) and for syntaxes nothing here decodes.
    """
    try:
        decoder = get_decoder(UID(transfer_syntax_uid))
    except NotImplementedError:
        return ()
    if decoder.is_native:
        return ()
    available = decoder.available_plugins
    return tuple(name for name in DECODING_PLUGINS if name in available)


def decoder_available(transfer_syntax_uid: str) -> bool:
    """Return whether pixel data in this transfer syntax can be read here.

    Parameters
    ----------
    transfer_syntax_uid : str
        A transfer syntax UID.

    Returns
    -------
    bool
        ``True`` for native syntaxes pydicom reads, and for compressed syntaxes with a
        plug-in of :data:`DECODING_PLUGINS` installed (pylibjpeg and its plug-ins,
        pyjpegls, pillow, or pydicom's own RLE decoder).
    """
    try:
        decoder = get_decoder(UID(transfer_syntax_uid))
    except NotImplementedError:
        return False
    if decoder.is_native:
        return bool(decoder.is_available)
    return bool(decoding_plugins(transfer_syntax_uid))


ACCEPTED_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = tuple(
    uid for uid in _CANDIDATE_TRANSFER_SYNTAXES if decoder_available(uid)
)
"""The transfer syntaxes accepted for photographs, compressed first, native last.

Filtered by the decoders installed in this environment: a syntax without a decoder is never
accepted, so a photo that was admitted can always be read.
"""

COMPRESSED_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = tuple(
    uid for uid in ACCEPTED_TRANSFER_SYNTAXES if uid.is_compressed
)
NATIVE_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = tuple(
    uid for uid in ACCEPTED_TRANSFER_SYNTAXES if not uid.is_compressed
)
"""Syntaxes with native (uncompressed) pixel data; Deflated compresses the whole data set."""

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "COMPRESSED_TRANSFER_SYNTAXES",
    "DERMOSCOPIC_PHOTOGRAPHY_IMAGE",
    "HTJ2K_TRANSFER_SYNTAXES",
    "LOSSY_TRANSFER_SYNTAXES",
    "MULTIFRAME_TRUE_COLOR_SC_IMAGE",
    "NATIVE_TRANSFER_SYNTAXES",
    "PHOTO_SOP_CLASSES",
    "SECONDARY_CAPTURE_IMAGE",
    "VL_PHOTOGRAPHIC_IMAGE",
    "DECODING_PLUGINS",
    "decoder_available",
    "decoding_plugins",
]
