"""cachegen: everything up to and including the store of lower-layer hidden states."""

from .errors import SerError  # noqa: F401
from .reader import CacheReader, open_cache  # noqa: F401
