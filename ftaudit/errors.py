"""Errors a caller can act on. Each carries a one-line message meant for the user."""

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
"""The command's exit codes (a contract): audited and passed (or warned), audited and failed the policy, could not audit."""


class FtauditError(Exception):
    """Base class: the audit could not be done (exit code 2)."""


class UsageError(FtauditError):
    """Arguments or options that cannot work together."""


class NotFoundError(FtauditError):
    """A repository, revision, folder or file does not exist."""


class AccessError(FtauditError):
    """The repository exists (or may) but the token does not grant access; or a local file cannot be read."""


class BaseResolutionError(FtauditError):
    """The model does not declare a single base model."""


class InvalidWeightsError(FtauditError):
    """A weights file is malformed, truncated or inconsistent."""


class UnsupportedError(FtauditError):
    """The input is valid but of a kind ftaudit does not audit."""


class NetworkError(FtauditError):
    """The server could not be reached or kept failing after retries."""


class PolicyError(FtauditError):
    """The policy file is unreadable or invalid."""
