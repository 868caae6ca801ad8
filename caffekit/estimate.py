"""How long the whole training schedule takes, from the measured rate of its first iterations.

The first WARMUP iterations of a run are not timed: they allocate the buffers, let oneDNN pick its
kernels and fill the page cache with the first LMDB pages, and are slower than the rest. The next
TIMED give the rate. The schedule is this stage's iterations from where the run started, plus those
of a later stage (fine-tuning, when stage 1 runs), at that rate; the test passes, a few percent of
the shipped schedules, are not counted.
"""
from typing import Optional

WARMUP = 5
TIMED = 20


def format_duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``"""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ScheduleEstimate:
    """Fed the clock after every iteration; once, after WARMUP + TIMED of them, gives the estimate line."""

    def __init__(self, stage_iterations: int, later_iterations: int = 0, later_name: str = "the next stage",
                 warmup: int = WARMUP, timed: int = TIMED):
        self.stage_iterations = int(stage_iterations)  # from the start of this run to the stage's max_iter
        self.later_iterations = int(later_iterations)
        self.later_name = later_name
        self.warmup, self.timed = warmup, timed
        self.done = 0
        self.timing_from: Optional[float] = None
        self.seconds_per_iteration: Optional[float] = None

    def iteration_done(self, now: float) -> Optional[str]:
        """``now``: a monotonic clock in seconds. Returns the estimate on the iteration that completes it
        (never, in a run shorter than warmup + timed iterations)."""
        self.done += 1
        if self.done == self.warmup:
            self.timing_from = now
        elif self.done == self.warmup + self.timed and self.timing_from is not None:
            self.seconds_per_iteration = (now - self.timing_from) / self.timed
            return self.message()
        return None

    def total_seconds(self) -> float:
        return (self.stage_iterations + self.later_iterations) * self.seconds_per_iteration

    def remaining_seconds(self) -> float:
        return (self.stage_iterations - self.done + self.later_iterations) * self.seconds_per_iteration

    def message(self) -> str:
        total = self.stage_iterations + self.later_iterations
        parts = f"{self.stage_iterations:,} of this stage + {self.later_iterations:,} of {self.later_name}" \
            if self.later_iterations else "this stage"
        return (f"estimate from {self.timed} timed iterations (after {self.warmup} warm-up): "
                f"{self.seconds_per_iteration:.3g} s/iteration; the whole schedule, {total:,} iterations "
                f"({parts}), takes about {format_duration(self.total_seconds())} "
                f"({format_duration(self.remaining_seconds())} left)")
