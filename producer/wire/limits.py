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
MAX_SESSION_CHARS = 128  # `session`, the affinity key (a conversation id)
# Sampling extras (optional request fields; absent from the wire while at their defaults).
MAX_CHOICES = 8  # `n`
MAX_TOP_LOGPROBS = 20
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 300  # entries
MAX_STOP_TOKEN_IDS = 64
MAX_TOKEN_ID = 2**31 - 1
MAX_RESPONSE_SCHEMA_BYTES = 64 * 1024  # `response_format.json_schema.schema`, as compact JSON
MAX_RESPONSE_SCHEMA_DEPTH = 32  # nested objects and arrays
MAX_REGEX_CHARS = 4096  # `response_format.regex`
