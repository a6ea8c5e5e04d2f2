"""Message serializers: msgpack (default), JSON, or any class named by dotted path.

A serializer turns a message dict into bytes and back. With ``symmetric_encryption_keys`` the
bytes are Fernet-encrypted with the first key and decrypted with any of them (key rotation).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Protocol, runtime_checkable

import msgpack
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

__all__ = [
    "JSONSerializer",
    "MsgPackSerializer",
    "Serializer",
    "SerializerError",
    "make_serializer",
]


class SerializerError(ValueError):
    """Bytes that are not a message this layer wrote (corrupt, foreign, or encrypted with another key)."""


@runtime_checkable
class Serializer(Protocol):
    """Turns message dicts into bytes and back."""

    def dumps(self, message: dict[str, Any]) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, Any]: ...


class MsgPackSerializer:
    """Compact binary encoding; bytes values survive the round trip."""

    def dumps(self, message: dict[str, Any]) -> bytes:
        try:
            return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"message cannot be serialized with msgpack: {exc}") from exc

    def loads(self, data: bytes) -> dict[str, Any]:
        try:
            message = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise SerializerError(f"not a msgpack message: {exc}") from exc
        if not isinstance(message, dict):
            raise SerializerError("payload is not a message dict")
        return message


class JSONSerializer:
    """Readable encoding for debugging and for non-Python peers; bytes values are not supported."""

    def dumps(self, message: dict[str, Any]) -> bytes:
        try:
            return json.dumps(message, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"message cannot be serialized as JSON: {exc}") from exc

    def loads(self, data: bytes) -> dict[str, Any]:
        try:
            message = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SerializerError(f"not a JSON message: {exc}") from exc
        if not isinstance(message, dict):
            raise SerializerError("payload is not a message dict")
        return message


class EncryptedSerializer:
    """Wraps another serializer with Fernet; encrypts with the first key, decrypts with any."""

    def __init__(self, inner: Serializer, keys: tuple[str, ...]) -> None:
        try:
            from cryptography.fernet import Fernet, InvalidToken, MultiFernet
        except ImportError as exc:
            raise ImproperlyConfigured(
                "channels_distrib: symmetric_encryption_keys needs the cryptography package: "
                "pip install 'channels-distrib[cryptography]'"
            ) from exc
        self._inner = inner
        self._invalid = InvalidToken
        self._fernet = MultiFernet([Fernet(self._derive(key)) for key in keys])

    @staticmethod
    def _derive(key: str) -> bytes:
        # Any string is accepted as a key: a SHA-256 of it gives Fernet's 32 bytes.
        return base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest())

    def dumps(self, message: dict[str, Any]) -> bytes:
        return self._fernet.encrypt(self._inner.dumps(message))

    def loads(self, data: bytes) -> dict[str, Any]:
        try:
            plain = self._fernet.decrypt(data)
        except (self._invalid, TypeError, ValueError) as exc:
            raise SerializerError("payload could not be decrypted with any configured key") from exc
        return self._inner.loads(plain)


BUILTIN: dict[str, type[MsgPackSerializer] | type[JSONSerializer]] = {
    "msgpack": MsgPackSerializer,
    "json": JSONSerializer,
}


def make_serializer(name: str, encryption_keys: tuple[str, ...] = ()) -> Serializer:
    """Build the serializer named by ``serializer``: 'msgpack', 'json' or a dotted class path."""
    serializer: Serializer
    if name in BUILTIN:
        serializer = BUILTIN[name]()
    else:
        if "." not in name:
            raise ImproperlyConfigured(
                f"channels_distrib: unknown serializer {name!r}; write 'msgpack', 'json' "
                "or the dotted path of a class with dumps()/loads()"
            )
        try:
            factory = import_string(name)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"channels_distrib: serializer {name!r} cannot be imported: {exc}"
            ) from exc
        serializer = factory()
        if not isinstance(serializer, Serializer):
            raise ImproperlyConfigured(
                f"channels_distrib: serializer {name!r} must define dumps(message) -> bytes "
                "and loads(bytes) -> message"
            )
    if encryption_keys:
        return EncryptedSerializer(serializer, encryption_keys)
    return serializer
