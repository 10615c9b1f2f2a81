"""Command-line tools around the worker: ACL lines (`acl`), the local demo (`demo`), the settings doc."""
