"""What client and server agree on, in one place: record and metric names, config keys that are
not RunConfig fields, and error codes. No Flower import: both apps and the results layer read it.

Flower's own codes (``flwr.common.constant.ErrorCode``; not re-exported by Flower's public API in
1.41, so their values are restated here and ``tests/test_protocol.py`` fails loudly if Flower
renumbers them) say how a message failed; fedkn adds one code of its own for a client whose local
training diverged, so the server can tell that apart from any other failure without parsing text.
"""

from __future__ import annotations

# -- records of a message's RecordDict (Flower's FedAvg defaults for arrays and config) -------------
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"

# -- metrics a client reports -------------------------------------------------------------------------
#: Examples a reply stands for: FedAvg weighs arrays and metrics by it.
WEIGHT_KEY = "num-examples"
#: Metric every client reports as 1 under client-level DP, so that FedAvg averages the arrays uniformly.
UNIFORM_WEIGHT_KEY = "dp-weight"
TRAIN_LOSS, TRAIN_ACCURACY = "train-loss", "train-accuracy"
EVAL_LOSS, EVAL_ACCURACY = "eval-loss", "eval-accuracy"
#: DP-SGD: this round's epsilon and the client's cumulative one.
DP_EPSILON_ROUND, DP_EPSILON = "dp-epsilon-round", "dp-epsilon"
#: Client metrics aggregated as the maximum over clients: the privacy each client spent (DP-SGD).
MAX_METRICS: tuple[str, ...] = (DP_EPSILON_ROUND, DP_EPSILON)
#: A node's answer to the server's query: which partition it holds, of how many.
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
#: The server's own evaluation of the global model (what Flower's evaluate_fn returns).
TEST_LOSS, TEST_ACCURACY = "test-loss", "test-accuracy"

# -- config keys that are not RunConfig fields ----------------------------------------------------------
SERVER_ROUND = "server-round"  # Flower's FedAvg adds it to every message
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx adds it
CLIENT_STATE_DIR = "client-state-dir"  # where clients mirror the state that stays local, for resume
CLIPPING_NORM = "clipping_norm"  # Flower's client-side DP wrappers add it
EXTRA_KEYS: tuple[str, ...] = (SERVER_ROUND, PROXIMAL_MU, CLIENT_STATE_DIR, CLIPPING_NORM)

# -- a client's Flower Context state --------------------------------------------------------------------
LOCAL_STATE = "local-state"  # the arrays that stay on this client (FedBN's BatchNorm state)
LOCAL_ROUND = "local-round"  # the round they are from

# -- error codes --------------------------------------------------------------------------------------
#: Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the ClientApp raised; the reason says why.
ERROR_CODE_CLIENT = 2
#: Flower's ErrorCode MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE and NODE_UNAVAILABLE: the
#: SuperLink answers with these for a SuperNode that is gone (no heartbeat for 2 x 30 s).
LOST_NODE_CODES: frozenset[int] = frozenset({3, 4, 5})
#: fedkn's own code, outside Flower's range: the client's local training diverged (DivergedError).
ERROR_CODE_DIVERGED = 1001
