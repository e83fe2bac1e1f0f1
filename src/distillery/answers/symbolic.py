"""Answer equivalence: numbers exactly, then math with sympy (guarded), then text.

sympy's ``parse_expr`` runs ``eval()`` on the text it builds, and ``simplify`` can run for ever
on large inputs, so nothing reaches it unchecked. In order, :func:`equivalent` gives up (False)
on text that is

1. longer than :data:`MAX_SYMBOLIC_CHARS`, or holds anything but digits, letters, ``+-*/^().``
   and spaces, or a dot that does not start a number (no attribute access);
2. made of names other than single letters (``x``, ``y1``) and a few known functions;
3. too large *before parsing* (:func:`too_large`): an exponent in scientific notation above 300
   (``1e999999999``), a power whose exponent is a number above :data:`MAX_EXPONENT`, or a digit
   string longer than :data:`MAX_DIGITS` — so sympy never builds a billion-digit number;
4. too large *after parsing* (nested powers: ``9^9^9``), checked on the expression tree.

Checks 1-3 run here, on the text alone. Parsing, check 4 and ``simplify`` run in one persistent
worker process (:mod:`distillery.answers.sympy_worker`, started on the first symbolic
comparison and reused): a comparison still running after ``timeout_s`` counts as not equal and
its worker is killed (SIGKILL), so nothing keeps spinning; the next comparison starts a fresh
one. A thread could not be stopped, and one process per comparison would cost ~0.5 s of sympy
import each time. The worker also ends itself (SIGALRM) a little after each deadline, in case
this process was killed first.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from functools import lru_cache
from typing import IO, Any

from distillery.answers.normalize import fold_text, light_normalize, number_values

__all__ = [
    "MAX_ANSWER_CHARS", "MAX_DIGITS", "MAX_EXPONENT", "MAX_SYMBOLIC_CHARS", "SYMBOLIC_TIMEOUT_S",
    "equivalent", "numbers_equal", "parse_symbolic", "sympy_equal", "too_large",
]

MAX_ANSWER_CHARS = 500  # longer answers are compared as text only
MAX_SYMBOLIC_CHARS = 200  # longer answers never reach sympy
SYMBOLIC_TIMEOUT_S = 2.0
_WORKER_START_S = 120.0  # importing sympy in a fresh process; not part of any comparison's time
MAX_EXPONENT = 100
MAX_DIGITS = 300
_MAX_BITS = 4096

_SAFE_CHARS = re.compile(r"[0-9A-Za-z+\-*/^().\s]+")
_NAME = re.compile(r"[A-Za-z]+[0-9]*")
_DOT_NOT_NUMBER = re.compile(r"\.(?!\d)")
_VARIABLE_CALL = re.compile(r"(?<![A-Za-z])([A-Za-z][0-9]*)\s*\(")
_SCI_EXPONENT = re.compile(r"\d\.?\d*\s*[eE]\s*[+-]?\s*(\d+)")
_POWER_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\(?\s*[+-]?\s*(\d+)")
_DIGITS = re.compile(r"\d+")


def too_large(text: str) -> bool:
    """Whether ``text`` names a number too large to hand to sympy, read from the text alone."""
    if any(len(m.group(0)) > MAX_DIGITS for m in _DIGITS.finditer(text)):
        return True
    if any(len(m.group(1)) > 3 or int(m.group(1)) > 300 for m in _SCI_EXPONENT.finditer(text)):
        return True
    return any(len(m.group(1)) > 3 or int(m.group(1)) > MAX_EXPONENT for m in _POWER_EXPONENT.finditer(text))


def numbers_equal(a: str, b: str, *, allow_percent: bool = True, rel_tol: float = 0.0) -> bool | None:
    """Whether two light-normalized answers are equal numbers (exactly, or within ``rel_tol``);
    None when either is not a plain number."""
    va, vb = number_values(a, allow_percent), number_values(b, allow_percent)
    if not (va and vb):
        return None
    if va & vb:
        return True
    return rel_tol > 0 and any(abs(x - y) <= rel_tol * max(abs(x), abs(y)) for x in va for y in vb)


def equivalent(
    a: str | None, b: str | None, *, allow_percent: bool = True, symbolic: bool = True,
    rel_tol: float = 0.0, timeout_s: float = SYMBOLIC_TIMEOUT_S,
) -> bool:
    """Whether two final answers say the same thing.

    In order: normalized text, numeric equality (``3/4`` = ``0.75`` = ``\\frac{3}{4}``,
    ``1,000`` = ``1000.0``, ``50%`` = ``50`` = ``0.5``), then symbolic equality with sympy
    (``x*(x+1)`` = ``x^2 + x``, ``78-73`` = ``5``). Never raises and never evaluates arbitrary
    input (see the module docstring).
    """
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return fold_text(a) == fold_text(b)
    na, nb = light_normalize(a), light_normalize(b)
    if fold_text(na) == fold_text(nb):
        return True
    same = numbers_equal(na, nb, allow_percent=allow_percent, rel_tol=rel_tol)
    if same is not None:
        return same
    return symbolic and _symbolic_equal(na, nb, timeout_s)


_FUNCTIONS = frozenset({"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "abs", "pi"})


def _sympy_names() -> dict[str, Any]:
    import sympy

    functions = {
        "sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
        "log": sympy.log, "ln": sympy.log, "exp": sympy.exp, "abs": sympy.Abs, "pi": sympy.pi,
    }
    core = {n: getattr(sympy, n) for n in ("Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow")}
    return {"__builtins__": {}, **core, **functions}


def _safe_text(text: str) -> str | None:
    """Checks 1-3 of the module docstring on the text alone (no sympy): the text ready for
    ``parse_expr`` (``x(x+1)`` made a product), or None when it may not be parsed."""
    if len(text) > MAX_SYMBOLIC_CHARS or not _SAFE_CHARS.fullmatch(text):
        return None
    if _DOT_NOT_NUMBER.search(text) or too_large(text):
        return None
    text = _VARIABLE_CALL.sub(r"\1*(", text)  # x(x+1) is a product, not a function call
    for name in _NAME.findall(text):
        if len(name.rstrip("0123456789")) > 1 and name not in _FUNCTIONS:
            return None
    return text


@lru_cache(maxsize=4096)
def parse_symbolic(text: str) -> Any:
    """A sympy expression for safe, short math text, or None (bad text, too big, parse error).
    Runs in the worker process (it imports and runs sympy)."""
    safe = _safe_text(text)
    if safe is None:
        return None
    try:
        from sympy.parsing.sympy_parser import (
            auto_number,
            auto_symbol,
            convert_xor,
            implicit_multiplication,
            parse_expr,
        )

        expr = parse_expr(
            safe, local_dict={}, global_dict=_sympy_names(), evaluate=False,
            transformations=(auto_symbol, auto_number, implicit_multiplication, convert_xor),
        )
    except BaseException:  # noqa: BLE001 - any failure to parse means "not math"
        return None
    return expr if _bounded(expr) else None


def _bounded(expr: Any) -> bool:
    """No numeric exponent above 100 and no number above ~2**4096 (so nothing can blow up)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    bits: dict[Any, float] = {}
    for node in sympy.postorder_traversal(expr):
        args = [bits.get(arg, 0.0) for arg in node.args]
        if isinstance(node, sympy.Integer):
            size = float(abs(int(node)).bit_length())
        elif isinstance(node, sympy.Rational):
            size = float(max(abs(node.p).bit_length(), node.q.bit_length()))
        elif isinstance(node, sympy.Float):
            size = float(int(abs(node)).bit_length()) if abs(node) < 1e300 else float("inf")
        elif isinstance(node, sympy.Pow):
            base_bits, exp_bits = args
            if node.exp.is_number:
                if exp_bits > MAX_EXPONENT.bit_length():
                    return False
                size = max(base_bits, 1.0) * 2.0**exp_bits
            else:
                size = base_bits
        elif isinstance(node, sympy.Mul):
            size = sum(args)
        else:
            size = max(args, default=0.0) + 1.0
        if size > _MAX_BITS:
            return False
        bits[node] = size
    return True


def sympy_equal(a: str, b: str) -> bool:
    """Parse both (guarded) and ``simplify(a - b) == 0``; unbounded in time, so it is called only
    inside the worker process, which the caller kills at its timeout."""
    ea, eb = parse_symbolic(a), parse_symbolic(b)
    if ea is None or eb is None:
        return False
    try:
        import sympy

        return bool(sympy.simplify(ea - eb) == 0)
    except BaseException:  # noqa: BLE001 - a comparison sympy cannot make is "not equal"
        return False


class _SympyWorker:
    """The persistent worker process: one comparison at a time (a lock), line-delimited JSON
    over its stdin/stdout, SIGKILLed when an answer does not come before the deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        self._buffer = b""

    @property
    def pid(self) -> int | None:
        """The worker's process id, None while none runs (tests check that a kill took)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def compare(self, a: str, b: str, timeout_s: float) -> bool | None:
        """Whether sympy finds ``a`` = ``b`` within ``timeout_s``; None on a timeout (the worker
        is killed) or a worker that cannot start or died."""
        if os.getpid() != self._owner:  # a forked child must not share its parent's pipes
            self.__init__()  # type: ignore[misc]
        with self._lock:
            proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
            if proc is None:
                return None
            request = {"a": a, "b": b, "alarm_s": int(timeout_s) + 2}
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                proc.stdin.flush()
                line = self._readline(proc, time.monotonic() + timeout_s)
            except OSError:
                line = None
            if line is None:
                self.close(kill=True)
                return None
            return bool(json.loads(line).get("equal"))

    def _start(self) -> subprocess.Popen[bytes] | None:
        # the package's own source root first, so the child imports this same distillery
        src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (src_root, os.environ.get("PYTHONPATH", "")) if p))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "distillery.answers.sympy_worker"], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        except OSError:
            return None
        self._proc, self._buffer = proc, b""
        ready = self._readline(proc, time.monotonic() + _WORKER_START_S)
        if ready is None:
            self.close(kill=True)
            return None
        return proc

    def _readline(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes | None:
        """One reply line, or None at the deadline or when the worker's stdout closes."""
        stdout: IO[bytes] | None = proc.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self, kill: bool = False) -> None:
        """End the worker: SIGKILL at once (a timed-out comparison) or on EOF (at exit)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if not kill:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


_WORKER = _SympyWorker()
atexit.register(_WORKER.close)


@lru_cache(maxsize=4096)
def _symbolic_equal(a: str, b: str, timeout_s: float) -> bool:
    """Text checks here, then sympy in the worker process; cached, so a repeated pair (the same
    reference for many samples) costs no round trip."""
    if _safe_text(a) is None or _safe_text(b) is None:
        return False
    return bool(_WORKER.compare(a, b, timeout_s))
