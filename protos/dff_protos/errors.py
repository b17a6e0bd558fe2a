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
