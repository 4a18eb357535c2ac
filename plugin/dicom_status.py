"""Named C-STORE status codes (PS3.4 Annex B, Table B.2-1; PS3.7 Annex C).

The DICOM node answers with them; delivery reads them in the answers of destinations.
Codes in 0xC000-0xCFFF are "Error: Cannot understand"; the low byte tells the
operator which check failed, and ErrorComment carries the detail.
"""

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
MISSING_UID = 0xC001
INVALID_UID = 0xC002
INSTANCE_UID_MISMATCH = 0xC003
