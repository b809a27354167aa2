"""A LoRA-aware load generator for any OpenAI-style server (HTTP only, nothing of ours imported).

Arrivals, workload and adapter mix in, per-request records out; statistics, reports and plots are
computed from the records afterwards. `loraplex loadtest` is the command; `run_load` the library entry.
"""

from loadtest.runner import LoadResult, LoadSettings, run_load

__all__ = ["LoadResult", "LoadSettings", "run_load"]
