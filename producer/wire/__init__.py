"""The wire contract: what the chat clients and the workers both depend on.

Everything a client and a worker must agree on byte for byte lives here, and nowhere
else: change a module of this package and both sides change together. Backends in other
languages implement the same contract from `docs/protocol.md`.

- `keys.py`: the name of every Redis key (request stream, reply streams, guards, ...).
- `limits.py`: hard limits of a request (body size, messages, tokens, metadata, deadline).
- `models.py`: request and reply bodies (pydantic models) and the stable error codes.
- `codec.py`: stream-entry envelopes, msgpack/JSON bodies, bounded decoding (`ProtocolError`).
- `final_guard.py`: the guard-and-append scripts that keep one final reply per request, last.
- `signing.py`: the HMAC-SHA256 `sig` of reply events (`LLM_REPLY_SIGNING_KEY`).
- `request_digest.py`: the digest of a request entry (`rd` of reply events, the id's claim).
- `backlog.py`: the backlog rule (lag + pending), in the producer's admit script and the worker's measurement.
- `redis_types.py`: typed views of redis-py's stream replies.
- `backoff.py`: reconnect delays and the errors worth retrying.
"""
