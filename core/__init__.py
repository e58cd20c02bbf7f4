"""core: the ground floor every package stands on (no project imports): error types, atomic file writes and
hashes, device and precision choice, scoped torch threads, package versions for provenance records."""
from .errors import ConfigError, InputError, MedDDPMError
from .fsutil import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file

__all__ = ["ConfigError", "InputError", "MedDDPMError", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "sha256_file"]
