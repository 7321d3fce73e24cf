"""tuneplan: the headless planning core (this package) and its front ends (advisor.cli, advisor.tui).

What may import what (tests/test_layering.py checks it on the source):

- foundations (problems, units, safefile, policy, spec, job, software): only each other;
- the core (model, catalog, memory, activations, inference, breakdown, allocator, gpu_memory, lifecycle,
  limits, throughput, serving, simulate, stack, gpus, families, recommend, guide, planfile): the
  foundations and each other; never a front end, the runner or textual;
- the service (service): the one API on top of the core; forms and present shape its results for the
  screens;
- front ends (cli, tui): the above and runner.api, never each other; launcher composes them.
"""

import logging as _logging

# bitsandbytes' CPU backend warns on import that it cannot fetch an optional kernel from the hub
# (offline by design; the fallback it uses is the one tuneplan measures). Set before anything
# (peft, transformers, the runner, simulate) imports bitsandbytes.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
