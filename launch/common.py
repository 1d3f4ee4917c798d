"""Shared by the entry scripts: argv cleaning and clear errors for bad input."""

from __future__ import annotations

import os
import sys


def hydra_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides, without the `--local_rank` argument the deepspeed launcher appends."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


def run_cli(main) -> None:
    """Run `main()`; bad input exits with status 2 and one line naming the problem, not a traceback."""
    from vgen.config import ConfigError
    from vgen.data.shards import DataError
    from vgen.parallel.planner import MemoryBudgetError

    try:
        main()
    except (ConfigError, DataError, FileNotFoundError, MemoryBudgetError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
