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


# Each benchmark's bound (seconds): one that overruns is stopped and counted as failed.
FULL_TIMEOUT_S = 45 * 60
QUICK_TIMEOUT_S = 10 * 60


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    runs, timeout_s = (QUICK, QUICK_TIMEOUT_S) if quick else (FULL, FULL_TIMEOUT_S)
    subprocess.run([sys.executable, "-m", "cardctl.main", "stack", "up", "--no-services"],
                   check=True, timeout=15 * 60)
    failed: list[str] = []
    for module, *args in runs:
        print(f"\n=== {module} {' '.join(args)}", flush=True)
        try:
            code = subprocess.run([sys.executable, "-m", module, *args],
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            failed.append(f"{module}: stopped after {timeout_s} s")
            continue
        if code != 0:
            failed.append(f"{module}: exit status {code}")
    print("\n=== " + ("failed: " + "; ".join(failed) if failed else "every benchmark ran"),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
