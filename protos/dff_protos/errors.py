"""Domain errors shared by every package. No grpc here: the transport maps them (see status.py)."""

from __future__ import annotations


class DFFError(Exception):
    """Base class of the errors the library raises on purpose."""


class InvalidInput(DFFError, ValueError):
    """The caller's input is wrong: an undecodable image, an unknown layer, a bad option."""


class ImageTooLarge(InvalidInput):
    """An image whose pixel count is above the configured limit."""


class NotFound(DFFError, LookupError):
    """A model, concept set or file that does not exist."""


class NotReady(DFFError, RuntimeError):
    """A resource that exists but cannot serve yet (e.g. models not built)."""


class ResourceExhausted(DFFError, RuntimeError):
    """A configured limit was reached (concurrent streams, memory)."""


class TooFewImages(DFFError, RuntimeError):
    """Discovery cannot go on: not enough usable images (the message says how many and why)."""


class DataLoss(DFFError, RuntimeError):
    """Stored data is unreadable or corrupt (the message names the file)."""


class DeadlineExceeded(DFFError, TimeoutError):
    """A deadline passed: an idle stream, or a replica that stopped answering."""


class Unavailable(NotReady):
    """A backend cannot be reached (the message names the addresses and what was tried)."""


class Unauthenticated(DFFError, PermissionError):
    """No valid credentials (token or client certificate)."""


class PermissionDenied(DFFError, PermissionError):
    """Valid credentials without the role the call needs."""


class Unimplemented(DFFError, NotImplementedError):
    """The server does not have this method (e.g. an engine address that is a feature
    server)."""


class QueryOfDeath(DFFError, RuntimeError):
    """An item was in flight on two replicas that both failed; it is not sent to a third."""


class Cancelled(DFFError, RuntimeError):
    """The call was cancelled."""


class Internal(DFFError, RuntimeError):
    """A server-side bug (details are in that server's log)."""
