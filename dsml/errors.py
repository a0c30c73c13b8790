"""Typed errors of the format library. The proxy maps each to an HTTP status in one place."""


class DsmlError(ValueError):
    """Base of every error this library raises on bad input."""

    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code}, param={self.param!r}, message={self.message!r})"


class RenderError(DsmlError):
    """The request cannot be rendered into a prompt (unknown role, bad arguments, bad tool name...)."""

    code = "invalid_request"


class UnsupportedError(DsmlError):
    """The request asks for something this dialect or engine cannot do (e.g. image parts)."""

    code = "unsupported"
