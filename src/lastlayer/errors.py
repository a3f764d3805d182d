"""The error hierarchy. Every message says what went wrong and what to do next.

The CLI prints a :class:`LastlayerError` as one line and exits with its ``exit_code``; anything
else is a bug and keeps its traceback.
"""


class LastlayerError(Exception):
    """Base class of every error the user can act on."""

    exit_code = 1


class UsageError(LastlayerError):
    """A flag, option or option-file value is wrong."""

    exit_code = 2


class DataError(LastlayerError):
    """The image folder or an input file cannot be used as it is."""


class ModelError(LastlayerError):
    """A network cannot be loaded, built or run."""


class StorageError(LastlayerError):
    """Reading or writing a URL failed (missing path, permission, unreachable service)."""


class KerberosError(LastlayerError):
    """Logging in failed: no KDC, a wrong principal or keytab, missing Kerberos tools."""


class EngineError(LastlayerError):
    """A compute engine could not start or finish (e.g. Spark: no Java, a failed stage)."""
