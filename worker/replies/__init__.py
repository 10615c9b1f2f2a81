"""Replies and refusals: engine outputs into reply events, the one writer of reply streams, finals and acks."""
