"""Replies and refusals: the one writer of reply streams (finals, acks, dead letters), and refusals."""
