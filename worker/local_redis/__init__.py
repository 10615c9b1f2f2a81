"""Local Redis-compatible servers for runs without REDIS_URL: one node (`server`) or a cluster (`cluster`)."""
