"""halodiff's exception types. All derive from standard ones so `except ValueError` keeps working."""
from __future__ import annotations


class HalodiffError(RuntimeError):
    """Base class for halodiff runtime errors that are not plain argument errors."""


class BackendUnavailableError(ValueError):
    """A forced backend (HALODIFF_BACKEND / use_backend) cannot run the given inputs."""


class CommTimeoutError(HalodiffError, TimeoutError):
    """A peer rank did not answer within the configured timeout (it may have died)."""


class PatchError(HalodiffError, ValueError):
    """patch()/unpatch() misuse: double patch, unpatch of an unpatched model, unsupported model."""


class MissingDependencyError(HalodiffError, ImportError):
    """A feature needs an optional package (diffusers, pillow, ...) that is not installed; the message names the
    pip command."""
