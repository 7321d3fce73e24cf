"""tuneplan: the headless planning core (this package) and its front ends (advisor.cli, advisor.tui)."""

import logging as _logging

# bitsandbytes' CPU backend warns on import that it cannot fetch an optional kernel from the hub
# (offline by design; the fallback it uses is the one tuneplan measures). Set before anything
# (peft, transformers, the runner, simulate) imports bitsandbytes.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
