"""An OpenAI-compatible HTTP gateway: one more producer on the request streams (docs/openai.md).

    python -m producer.gateway --host 0.0.0.0 --port 8000      # or: llm-gateway

`create_app(settings)` (app.py) builds the FastAPI app; `__main__.py` runs it on uvicorn.

Log events (JSON lines on stdout, `producer/logs.py`): `gateway_started`, `gateway_open_namespace`
(no keys file), `gateway_request_done` (one per HTTP request: request_id, tenant, method, path,
status, ms, and for completions model, stream, finish_reason, tokens, cancelled), `gateway_draining`
(SIGTERM), `gateway_stopped`, and warnings of Redis trouble (`gateway_stats_unreadable`,
`gateway_reply_read_retry`, `gateway_cancel_failed`).
"""
