"""The launchers behind test/train_clip_*.sh: ``python3 -m clip_train.launch PROFILE [flags]``.

PROFILE (full_1p, performance_1p, full_8p, performance_8p, cluster) sets the recipe's defaults; the user's flags
set the rest. Every case, one card included, is the same torchrun command, so 1p, 8p and multi-node runs cannot
drift apart. The run folder per case, the set-aside of finished runs and the log layout are in runfolder.py;
the summary is summary.py's. The flags are options.py's, the command plan.py's, the run run.py's. Run any launcher with --help for the flags.
"""

from __future__ import annotations

import os
import platform
import sys
import time

from clip_train.errors import LaunchError
from clip_train.launch.options import PROFILES, parse, usage
from clip_train.launch.plan import dry_run_text, make_launch_plan
from clip_train.launch.run import execute


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # E2ETrainingTime counts the demo build and the device probe too
    argv = sys.argv[1:] if argv is None else argv
    profile = argv[0] if argv else ""
    if profile not in PROFILES:
        print(
            f"[Error] clip_train.launch is run by test/train_clip_*.sh (got profile '{profile}')",
            file=sys.stderr,
        )
        return 1
    if "-h" in argv[1:] or "--help" in argv[1:]:
        print(usage(profile))
        return 0
    try:
        opts = parse(profile, argv[1:])
        plan = make_launch_plan(opts, dict(os.environ))
        if "dry_run" in opts.switches:
            for note in plan.notes:
                print(note, file=sys.stderr)
            print(dry_run_text(plan))
            return 0
        return execute(plan, started=started, machine=platform.machine())
    except LaunchError as exc:
        print(f"[Error] {exc}", file=sys.stderr)
        if exc.usage:
            print(usage(profile), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
