"""The worker process of :func:`distillery.answers.symbolic.equivalent`: ``python -m
distillery.answers.sympy_worker`` reads one JSON request a line on stdin (``{"a", "b",
"alarm_s"}``) and writes ``{"equal": bool}`` a line on stdout.

Its parent SIGKILLs it when a reply is late. The worker caps itself as well, in case the parent
died first (then nobody would kill it): an address-space limit (a huge expression fails with
MemoryError, which counts as "not equal", instead of filling the machine) and a SIGALRM
``alarm_s`` seconds after each request, whose default action ends the process.
"""

from __future__ import annotations

import json
import signal
import sys

from distillery.answers.symbolic import sympy_equal

_ADDRESS_SPACE = 4 << 30  # bytes; sympy itself needs a few hundred MB


def main() -> None:
    """Serve requests until stdin closes."""
    import sympy  # noqa: F401 - imported before "ready", so no comparison pays for it

    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))
    except (ImportError, ValueError, OSError):  # not POSIX, or a lower hard limit already
        pass
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        signal.alarm(max(1, int(request["alarm_s"])))
        equal = sympy_equal(str(request["a"]), str(request["b"]))
        signal.alarm(0)
        out.write(json.dumps({"equal": equal}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
