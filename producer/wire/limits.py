"""Hard limits of contract v1, enforced before any model work; a worker may configure stricter ones.

They bound what one request can cost a worker (memory, parsing, generation) whatever
its sender does; `docs/protocol.md` states the same numbers.
"""

MAX_BODY_BYTES = 256 * 1024
MAX_MESSAGES = 256
MAX_TOKENS_CAP = 4096
MAX_STOP_SEQUENCES = 8
MAX_METADATA_BYTES = 4096
# Latest absolute deadline accepted (9999-12-31, epoch ms): bounded, so it converts to seconds.
MAX_EPOCH_MS = 253_402_300_799_999
REPLY_TTL_S_DEFAULT = 3600
MAX_KV_BUDGET_TOKENS = 1 << 20
