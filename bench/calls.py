#!/usr/bin/env python3
"""callsim --json summary -> the row-6 result JSON (stdout).

Usage: calls.py CALLSIM_JSON CALLS
"""

import json
import sys


def main():
    path, want = sys.argv[1], int(sys.argv[2])
    try:
        s = json.load(open(path))
    except (OSError, ValueError) as e:
        print(json.dumps({"note": f"callsim gave no JSON summary ({e})"}))
        return
    reps = s.get("reports", [])
    errs = [e for r in reps for e in (r.get("errors") or []) + (r.get("violations") or [])]
    note = ""
    if s.get("first_reply_p50_ms") is not None:
        note += f"; first reply p50 {s['first_reply_p50_ms']:.0f} ms, p99 {s.get('first_reply_p99_ms') or 0:.0f} ms"
    if errs:
        note += f"; first error: {errs[0][:120]}"
    print(json.dumps({
        "tool": "callsim",
        "calls": s.get("calls", want),
        "completed": s.get("ok", 0),
        "failed": s.get("calls", want) - s.get("ok", 0),
        "frames_in": s.get("frames_in"),
        "p50_ms": s.get("jitter_p50_ms"),
        "p99_ms": s.get("jitter_p99_ms"),
        "max_ms": s.get("jitter_max_ms"),
        "note": note,
    }))


if __name__ == "__main__":
    main()
