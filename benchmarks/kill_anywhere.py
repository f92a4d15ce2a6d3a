"""The whole nightly killed anywhere, at more points than the e2e test's ten: the harness of
tests/support/killer.py with `--points` SIGKILLs from `--seed`, against an uninterrupted night run
at the same time (the reference).

    python -m benchmarks.kill_anywhere [--points 40] [--seed 1] [--dry-run]
        [--out benchmarks/results/kill_anywhere.md]

Prints the schedule and each kill (attempt, process, the stage it landed in), then whether the
killed night's store equals the reference's (artifacts, every seed once, nothing left behind) and
its wall time as a ratio of the reference night's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from tests.support import killer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kill_anywhere.md"))
    parser.add_argument("--dry-run", action="store_true", help="print the schedule only")
    args = parser.parse_args()

    points = killer.schedule(args.seed, args.points)
    lines = [f"# kill_anywhere: {args.points} points, seed {args.seed}", "", "```"]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say("schedule:")
    for p in points:
        say(f"  {p.describe()}")
    if args.dry_run:
        return
    root = Path(tempfile.mkdtemp(prefix="dpk-", dir="/tmp"))  # short: Ray's socket paths
    try:
        nights = {}
        walls = {}

        def run(name: str, todo: list[killer.Point], out: killer.Say) -> None:
            (root / name).mkdir()
            (root / name / "t").mkdir()
            nights[name] = killer.Night(root / name, root / name / "t", say=out)
            started = time.perf_counter()
            nights[name].run(todo, deadline_s=3600)
            walls[name] = time.perf_counter() - started

        thread = threading.Thread(target=run, args=("straight", [], lambda _: None))
        thread.start()
        run("killed", points, say)
        thread.join()
        killed, straight = nights["killed"], nights["straight"]
        diffs = list(killer.differences(killed.store, straight.store))
        seeds = [s for shard in killer.seeds_sampled(killed.store) for s in shard]
        left = [pid for a in killed.attempts for pid in killed.left_running(a)]
        say("```")
        lines.append("")
        say("| | |")
        say("|---|---|")
        say(f"| points hit / missed | {len(killed.hits)} / {len(killed.missed)} |")
        say(
            f"| driver kills, attempts | {sum(h.point.target == 'driver' for h in killed.hits)}, "
            f"{len(killed.attempts)} |"
        )
        say(f"| artifacts that differ from the reference night | {len(diffs)} |")
        say(f"| every seed sampled once | {seeds == list(range(killer.SEED_COUNT))} |")
        say(f"| processes / temp folders left | {len(left)} / {len(killed.left_folders())} |")
        say(
            f"| wall time, killed / uninterrupted night (reference) | "
            f"{walls['killed']:.0f} s / {walls['straight']:.0f} s = "
            f"{walls['killed'] / walls['straight']:.2f} |"
        )
        for d in diffs:
            say(f"- {d}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
