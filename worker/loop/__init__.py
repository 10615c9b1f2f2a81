"""The worker loop and intake: read the streams, hand requests to the engine, step it, end requests."""
