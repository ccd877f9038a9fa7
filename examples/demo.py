"""The MaxPool stall, solved through the symmetry: ``make demo`` (``python -m examples.demo``).

Trains the question's network (``Linear(2 → 2)`` then max, Adam lr 0.02, 1000
full-batch steps on ``y = max(x + 2y, 3x + y)``) from 200 random inits, with
plain Adam and with Adam wrapped in :func:`quotient_opt.revive_dead_units`,
and prints the success rates side by side. A quick version of
``python -m benchmarks.maxpool``, whose functions it reuses.
"""

from __future__ import annotations

import argparse

from benchmarks import maxpool


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args(argv)
    task = list(maxpool.TASKS)[0]
    results = maxpool.run(
        seeds=args.seeds,
        steps=args.steps,
        tasks=[task],
        only=["adam", "adam + revive + polish"],
    )
    print(
        f"The MaxPool stall: {args.seeds} random inits, {args.steps} full-batch Adam steps "
        f"(lr {maxpool.LEARNING_RATE}); success = final MSE < {maxpool.THRESHOLD:g}"
    )
    print(maxpool.table(results))
    per = results[task]
    plain = 1 - per["adam"]["success_rate"]
    revived = 1 - per["adam + revive + polish"]["success_rate"]
    print(f"stalled or unfinished: plain Adam {100 * plain:.1f}%, "
          f"Adam + qo.revive_dead_units(polish_every={maxpool.POLISH_EVERY}) {100 * revived:.1f}%")


if __name__ == "__main__":
    main()
