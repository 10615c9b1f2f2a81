"""The worker loop: read the streams, hand requests to the engine, step it, publish its outputs."""
