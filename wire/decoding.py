"""Decoding what arrives from outside: every failure is a coded ``bad_request``.

msgspec reports a bad payload as ``ValidationError``/``DecodeError``, but not
every bad payload: bytes that are not UTF-8 inside a JSON string surface as
``UnicodeDecodeError`` and arrays nested too deep as ``RecursionError`` (past about 1,000 levels on
Python 3.11, about 10,000 on 3.12 and 3.13, whose C code has a recursion limit of its own; nesting
below that in a field we do not know is skipped, as every unknown field is).
An input boundary that only catches msgspec's two errors lets those escape and
end whatever task was reading. Every decoder of untrusted bytes goes through
:func:`decode_untrusted`, so there is one place that knows this.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import msgspec

from wire.errors import ErrorCode, LamaError

T = TypeVar("T", covariant=True)


class _Decoder(Protocol[T]):
    def decode(self, buf: Any, /) -> T: ...


def decode_untrusted(decoder: _Decoder[T], data: bytes | bytearray | memoryview) -> T:
    """``decoder.decode(data)``, with every failure raised as a ``bad_request`` :class:`LamaError`."""
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise LamaError.from_validation(exc) from None
    except UnicodeDecodeError as exc:
        raise LamaError(ErrorCode.BAD_REQUEST, f"payload is not valid UTF-8 (byte {exc.start}: {exc.reason})",
                        offset=exc.start) from None
    except RecursionError:
        raise LamaError(ErrorCode.BAD_REQUEST, "payload is nested too deeply") from None
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        # Anything else msgspec or a Struct's __post_init__ may raise on odd input.
        raise LamaError(ErrorCode.BAD_REQUEST, f"undecodable payload: {type(exc).__name__}: {exc}") from None
