"""pacsclip: the clinical core shared by the DICOM node and the workers."""

__version__ = "0.1.0"
