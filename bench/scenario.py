"""Small pieces the scenarios share beyond bench/harness.py: a results file's opening lines,
the samples of a timeline where something changed, and counting lines in Ray's Serve logs."""

from __future__ import annotations

import glob
import os

from bench import harness


def header(title: str, report: dict, what: str) -> list[str]:
    """A scenario's results file opens with its title, the command, when, on what, and `what`."""
    return [f"# {title}", "", f"`{report['command']}`, {report['generated']}; "
            f"{harness.machine_line(report['machine'])}. {what}", ""]


def changes(samples: list[dict], keys: tuple[str, ...] | None = None) -> list[dict]:
    """The first sample and each one whose state (its `keys`, else all but the time) differs from
    the sample before it."""
    def state(s: dict) -> dict:
        return {k: v for k, v in s.items() if (k in keys if keys else k not in ("t", "t_s"))}

    return [s for i, s in enumerate(samples) if i == 0 or state(s) != state(samples[i - 1])]


def serve_log_lines(temp_dir: str, pattern: str, needle: str) -> int:
    """Lines containing `needle` in the Serve logs named `pattern` of the Ray instance in `temp_dir`."""
    # session_latest links to the session directory: read each file once.
    paths = {os.path.realpath(p) for p in glob.glob(os.path.join(temp_dir, "ray", "session_*", "logs", "serve",
                                                                  pattern))}
    count = 0
    for path in paths:
        with open(path, errors="replace") as f:
            count += sum(needle in line for line in f)
    return count
