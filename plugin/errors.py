"""The core's exception hierarchy; each boundary maps these once (DICOM status, exit code)."""


class PacsclipError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(PacsclipError):
    """Settings, a config file or a rules file is wrong; the message says what to fix."""


class InvalidTransition(PacsclipError):
    """A study was asked to move to a state its current state cannot reach."""


class OutOfResources(PacsclipError):
    """The node cannot store more data right now (disk below the configured threshold)."""
