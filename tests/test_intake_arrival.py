"""The listener's own encoders: equal byte for byte to what pydicom and pynetdicom write."""

from __future__ import annotations

import pytest
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dermpacs.intake.arrival import c_store_response_command, file_header

VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
EVEN_UID = "1.2.826.0.1.3680043.8.498.12"
ODD_UID = "1.2.826.0.1.3680043.8.498.123"


@pytest.mark.parametrize(
    ("instance", "syntax", "sender", "receiver"),
    [
        (EVEN_UID, "1.2.840.10008.1.2.4.50", "CAM1", "DERMPACS"),
        (ODD_UID, "1.2.840.10008.1.2.1", "CAMERA-3", "DERMPACS1"),
        (ODD_UID, "1.2.840.10008.1.2", "", "D"),
    ],
)
def test_the_file_header_is_what_pydicom_writes(instance, syntax, sender, receiver):
    meta = create_file_meta(
        sop_class_uid=UID(VL_PHOTO), sop_instance_uid=UID(instance), transfer_syntax=UID(syntax)
    )
    meta.SendingApplicationEntityTitle = sender
    meta.ReceivingApplicationEntityTitle = receiver
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert file_header(VL_PHOTO, instance, syntax, sender, receiver) == expected


def _pynetdicom_encoding(response: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    (p_data,) = list(message.encode_msg(1, 0))
    ((context_id, pdv),) = p_data.presentation_data_value_list
    assert context_id == 1 and pdv[0] == 0x03  # command, last fragment
    return pdv[1:]


def _response(status: int, comment: str | None = None, instance: str = ODD_UID) -> C_STORE:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.AffectedSOPClassUID = VL_PHOTO
    response.AffectedSOPInstanceUID = instance
    response.Status = status
    if comment is not None:
        response.ErrorComment = comment
    return response


@pytest.mark.parametrize(
    ("status", "comment", "instance"),
    [
        (0x0000, None, ODD_UID),
        (0x0000, None, EVEN_UID),
        (0xC000, "Pixel Data declares 100 bytes, 60 received", ODD_UID),
        (0xA700, "free space below storage.min_free_mb", EVEN_UID),
    ],
)
def test_the_c_store_response_is_what_pynetdicom_writes(status, comment, instance):
    response = _response(status, comment, instance)
    assert c_store_response_command(response) == _pynetdicom_encoding(response)


def test_a_response_with_an_offending_element_is_left_to_pynetdicom():
    response = _response(0xA900)
    response.OffendingElement = [0x00080018]
    assert c_store_response_command(response) is None
