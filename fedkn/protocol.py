"""The error codes that client and server agree on, in one place.

Flower's own codes (``flwr.common.constant.ErrorCode``; not re-exported by Flower's public API in
1.41, so their values are restated here and ``tests/test_protocol.py`` fails loudly if Flower
renumbers them) say how a message failed; fedkn adds one code of its own for a client whose local
training diverged, so the server can tell that apart from any other failure without parsing text.
"""

from __future__ import annotations

#: Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the ClientApp raised; the reason says why.
ERROR_CODE_CLIENT = 2
#: Flower's ErrorCode MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE and NODE_UNAVAILABLE: the
#: SuperLink answers with these for a SuperNode that is gone (no heartbeat for 2 x 30 s).
LOST_NODE_CODES: frozenset[int] = frozenset({3, 4, 5})
#: fedkn's own code, outside Flower's range: the client's local training diverged (DivergedError).
ERROR_CODE_DIVERGED = 1001
