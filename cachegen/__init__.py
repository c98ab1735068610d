"""cachegen: everything up to and including the store of lower-layer hidden states."""

from .errors import SerError
from .reader import CacheReader, open_cache

__all__ = ['SerError', 'CacheReader', 'open_cache']
