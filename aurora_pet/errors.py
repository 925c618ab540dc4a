"""Errors raised by aurora-pet; each message names the offending file, key, module or value."""


class AuroraError(Exception):
    """Base class of every aurora-pet error."""


class AuroraConfigError(AuroraError, ValueError):
    """An invalid configuration value or an unknown configuration key."""


class TargetError(AuroraError, ValueError):
    """Target modules that match nothing or cannot be cut into d×d slices."""


class AdapterFileError(AuroraError, ValueError):
    """An adapter file that is missing, corrupted, or made for a different model."""


class MergeError(AuroraError, RuntimeError):
    """Merging when merged, unmerging when not, or unloading what cannot be merged."""
