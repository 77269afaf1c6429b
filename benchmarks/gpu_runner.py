"""The section runner of `benchmarks/gpu.py`: caps, a total budget, and results written after every section."""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from gpu_report import format_markdown


class SectionTimeout(Exception):
    """A section ran past its cap (raised by the alarm signal)."""


class Interrupted(BaseException):
    """SIGTERM from outside (a timeout around the whole run): record, save, stop."""


class Runner:
    """Runs sections in order under caps and a total budget; writes the results after every section."""

    def __init__(self, out: Path, budget_s: float, caps: dict[str, float], header: dict) -> None:
        self.out, self.budget_s, self.caps = out, budget_s, caps
        self.start = time.monotonic()
        self.results = {**header, "budget_s": budget_s, "finished": False, "sections": {}}

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, name: str, function: Callable[[float], dict], needs: str | None = None, min_s: float = 5.0):
        """`function(deadline)` returns the section's results; `needs` names a section that must have passed."""
        cap = min(self.caps.get(name, self.budget_s), self.remaining())
        record: dict = {"status": "skipped", "cap_s": round(cap, 1)}
        if needs is not None and self.results["sections"].get(needs, {}).get("status") != "ok":
            record["reason"] = f"section {needs} did not succeed"
        elif self.remaining() < min_s:
            left = max(self.remaining(), 0.0)
            record["reason"] = f"the total budget ({self.budget_s:g} s) leaves {left:.1f} s, under {min_s:g} s"
        else:
            print(f"[gpu.py] {name} (cap {cap:.0f} s) ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, cap)
            try:
                record = {"status": "ok", **function(started + cap), "cap_s": round(cap, 1)}
            except SectionTimeout:
                record = {
                    "status": "timeout",
                    "reason": f"ran past its cap of {round(cap, 1):g} s",
                    "cap_s": round(cap, 1),
                }
            except Interrupted:
                record = {"status": "interrupted", "reason": "SIGTERM", "seconds": time.monotonic() - started}
                self.results["sections"][name] = record
                self.save()
                raise
            except Exception as error:  # recorded; the next section runs
                record = {"status": "error", "reason": f"{type(error).__name__}: {error}"[:2000]}
                record["traceback"] = traceback.format_exc()[-4000:]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            record["seconds"] = round(time.monotonic() - started, 2)
        print(f"[gpu.py] {name}: {record['status']} {record.get('reason', '')}", file=sys.stderr, flush=True)
        self.results["sections"][name] = record
        self.save()
        return record

    def skip(self, name: str, reason: str) -> None:
        print(f"[gpu.py] {name}: skipped {reason}", file=sys.stderr, flush=True)
        self.results["sections"][name] = {"status": "skipped", "reason": reason}
        self.save()

    def save(self, finished: bool = False) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.results["finished"] = finished
        self.out.mkdir(parents=True, exist_ok=True)
        partial = self.out / "results.json.partial"
        partial.write_text(json.dumps(self.results, indent=1, default=str))
        partial.replace(self.out / "results.json")
        (self.out / "results.md").write_text(format_markdown(self.results))


def _raise_timeout(signum, frame) -> None:
    raise SectionTimeout()


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted()
