"""The job layer's errors: problems a user can act on.

``str(exc)`` is a sentence; ``status`` is the HTTP status the web answers with: ``NotFound``
(404), ``Conflict`` (409, the action does not fit the job's state) or ``Invalid`` (422, with one
message per form field in ``errors``).
"""

from __future__ import annotations


class JobError(Exception):
    """A problem the user can act on. ``str(exc)`` is a sentence; ``status`` the HTTP status."""

    status: int = 400

    def __init__(self, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors: dict[str, str] = dict(errors or {})
        """Per form field messages (``Invalid``); the key ``"form"`` holds one for no field."""


class NotFound(JobError):
    status = 404


class Conflict(JobError):
    status = 409


class Invalid(JobError):
    status = 422
