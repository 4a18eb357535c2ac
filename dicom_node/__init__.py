"""Everything that speaks DICOM on the network. Never imports a model runtime."""
