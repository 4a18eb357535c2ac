"""Helpers that drive real DICOM peers (DCMTK, Orthanc) from integration tests."""
