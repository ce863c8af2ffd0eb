"""Every benchmark in turn, on the local stack (started if it is not running):

    .venv/bin/python -m bench            # the full figures of the README's Performance section
    .venv/bin/python -m bench --quick    # small sizes, to check that everything runs
"""

from __future__ import annotations

import subprocess
import sys

FULL = [
    ["bench.eventstore", "--seconds", "20"],
    ["bench.rebuild", "--citizens", "100000"],
    ["bench.journeys", "--citizens", "2000", "--seconds", "60", "--rate", "1000", "250"],
    ["bench.observability"],
]
QUICK = [
    ["bench.eventstore", "--seconds", "3"],
    ["bench.rebuild", "--citizens", "2000"],
    ["bench.journeys", "--citizens", "100", "--seconds", "10", "--rate", "100", "50",
     "--concurrency", "20"],
    ["bench.observability", "--commands", "2000"],
]


def main() -> int:
    runs = QUICK if "--quick" in sys.argv[1:] else FULL
    subprocess.run([sys.executable, "-m", "cardctl.main", "stack", "up", "--no-services"],
                   check=True)
    for module, *args in runs:
        print(f"\n=== {module} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, "-m", module, *args]).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
