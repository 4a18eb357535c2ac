"""The lines every result carries, in the SR, the overlay, the API, the webhook and HL7."""

from typing import Final

NOT_FOR_DIAGNOSIS: Final = "AI result - not for diagnosis"
SYNTHETIC_MODEL: Final = "synthetic demo model - not for clinical use"
# A real (not synthetic) bundle whose model card sets not_for_clinical_use.
NOT_FOR_CLINICAL_USE: Final = "model card: not for clinical use"
