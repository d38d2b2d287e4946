"""The project's exception hierarchy: shallow, and each class mapped to one CLI exit code.

Third-party errors are translated where they enter (``raise TemporaryError(...) from e``) so that
callers only ever catch these classes. Only :class:`TemporaryError` is worth retrying.
"""

from __future__ import annotations


class CryptoMLError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code = 1


class ConfigError(CryptoMLError):
    """params.yaml or a command-line option is wrong (unknown key, invalid value)."""

    exit_code = 2


class DataValidationError(CryptoMLError):
    """A dataset broke an expectation (validation gate, empty input, missing columns)."""

    exit_code = 3


class ModelContractError(CryptoMLError):
    """A model bundle is corrupt, mismatched with the feature code, or fails its parity check."""

    exit_code = 4


class TemporaryError(CryptoMLError):
    """A transient failure (network, rate limit, exchange down) that may succeed when retried."""

    exit_code = 5


class SourceError(CryptoMLError):
    """A permanent failure of a data source (bad symbol, rejected request, retries exhausted)."""

    exit_code = 6
