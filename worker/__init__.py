"""GPU/CPU worker: consumes the request stream, runs the engine, writes replies."""
