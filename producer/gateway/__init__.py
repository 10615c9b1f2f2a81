"""An OpenAI-compatible HTTP gateway: one more producer on the request streams (docs/openai.md).

    python -m producer.gateway --host 0.0.0.0 --port 8000      # or: llm-gateway

`create_app(settings)` (app.py) builds the FastAPI app; `__main__.py` runs it on uvicorn.
"""
