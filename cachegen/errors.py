"""Errors that users can act on. Only cli.py turns them into one line and exit status 1."""


class SerError(Exception):
    """Base class: the message names the file, row, field or value, and the fix."""


class ManifestError(SerError):
    """The manifest or a labels table is malformed."""


class AudioError(SerError):
    """An audio file cannot be decoded or is unusable."""


class ModelError(SerError):
    """The model cannot be loaded or is not supported."""


class ConfigError(SerError):
    """Command options conflict with each other or with the data."""


class StoreError(SerError):
    """The store cannot be opened or written."""


class StoreMismatch(StoreError):
    """The store was built with another model, layer, dtype or format."""


class StoreCorrupt(StoreError):
    """Stored bytes do not match their checksums, or the index is inconsistent."""


class UnsafeInput(SerError):
    """A store, zip or checkpoint carries something that must not be opened."""


class OutputError(SerError):
    """An output file or folder cannot be written (read-only, not permitted, disk full)."""
