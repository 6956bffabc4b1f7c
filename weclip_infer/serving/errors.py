"""The one client-error type of the serving layer, independent of any server engine."""
from __future__ import annotations

__all__ = ["RequestError"]


class RequestError(ValueError):
    """A request the server must refuse: answered with HTTP ``status`` and ``{"error": message}``.

    Engine adapters (TorchServe, Ray Serve) translate it into their own error responses.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = int(status)
