"""WebSocket close codes under daphne: let a consumer close with 1008, 1009 or 1013, and make
autobahn close with a code where it would drop the connection."""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["allow_server_close_codes"]

logger = logging.getLogger(__name__)

# Codes a server may close with (RFC 6455 section 7.4.1) that autobahn's public sendClose
# refuses: it allows only 1000 and 3000-4999 (django/daphne#374, autobahn-python#1642).
_SERVER_CLOSE_CODES = frozenset({1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def allow_server_close_codes() -> None:
    """Let daphne close WebSockets with codes such as 1008, 1009 and 1013.

    Daphne passes ``websocket.close`` codes to autobahn's ``sendClose``, which raises for
    anything but 1000 and 3000-4999, so the consumer crashes and the client sees 1011.
    This wraps daphne's ``serverClose`` to send those codes with autobahn's
    ``sendCloseFrame`` (what daphne itself uses for 1011). It does nothing when daphne is
    not imported (under uvicorn, hypercorn or the test communicator, which accept any
    code) and is idempotent. The mixin calls it on every connect. It also makes autobahn
    close with a code instead of dropping TCP (:func:`_close_instead_of_drop`).
    """
    module = sys.modules.get("daphne.ws_protocol")
    protocol = getattr(module, "WebSocketProtocol", None)
    if protocol is None or getattr(protocol.serverClose, "_distrib_close_codes", False):
        return
    _close_instead_of_drop(protocol)
    original = protocol.serverClose

    def serverClose(self: Any, code: int | None = None) -> None:
        if code in _SERVER_CLOSE_CODES:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            original(self, code)

    serverClose._distrib_close_codes = True  # type: ignore[attr-defined]
    protocol.serverClose = serverClose
    logger.debug("daphne allowed to send close codes %s", sorted(_SERVER_CLOSE_CODES))


def _close_instead_of_drop(protocol: Any) -> None:
    """Make autobahn fail a connection with a close frame, not by dropping TCP.

    autobahn's ``failByDrop`` (on by default) drops the connection without a close frame
    when a client breaks a rule daphne enforces itself, e.g. a frame over daphne's own
    1 MiB ``--websocket_max_message_size``: the client sees 1006, where uvicorn and
    hypercorn send 1009. With it off, autobahn sends the code (1009, 1002, 1007...) and
    drops the connection only if the client does not answer within its close timeout.
    """
    original = getattr(protocol, "_fail_connection", None)
    if original is None:  # an autobahn without it: leave its behaviour alone
        return

    def _fail_connection(self: Any, *args: Any, **kwargs: Any) -> None:
        self.failByDrop = False
        original(self, *args, **kwargs)

    protocol._fail_connection = _fail_connection
