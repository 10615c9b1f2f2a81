"""Where the engine runs: inline in the loop, or in a process of its own driven over a pipe."""
