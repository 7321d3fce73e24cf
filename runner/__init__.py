"""Execution engine: turns a Plan into a real training run."""

import logging

# bitsandbytes' CPU backend warns on import that it cannot fetch an optional kernel from the hub
# (offline here by design); the fallback it uses is the one tuneplan measures.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
