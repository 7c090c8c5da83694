"""Hypothesis profiles of the fuzz tests (``make fuzz``).

``fuzz``: many examples per reader, no deadline (``CM3DMM_FUZZ_EXAMPLES``, default 4000) — the
bounded run of ``make fuzz``. ``quick``: 50 examples, the default when this folder is run
without ``--hypothesis-profile``.
"""

import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
             HealthCheck.large_base_example]

settings.register_profile("fuzz", max_examples=int(os.environ.get("CM3DMM_FUZZ_EXAMPLES", "4000")),
                          deadline=None, suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("quick", max_examples=50, deadline=None, suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))
