"""Java regular expressions (``java.util.regex``) read with Java's meaning, run by the ``regex`` module.

:func:`compile_java` translates a pattern: ``.``, ``^`` and ``$`` honour Java's line terminators,
``\\d``, ``\\w``, ``\\s`` and ``(?i)`` are ASCII. :class:`Replacement` is a ``Matcher.replaceFirst`` /
``replaceAll`` replacement string (``$n``, ``${name}``, ``\\x``) applied as Java steps. Constructs ``re``
cannot express (nested or intersected classes, Unicode properties, ``\\G``, flags ``x``, ``u``, ``U``,
``c``, ...) raise :class:`JavaRegexError` rather than get another meaning. Used by
:mod:`lastlayer.hadoop.auth_to_local`, whose rules hold Java regexes.

The translation is in ``re`` syntax and compiled by ``regex`` (its ``re``-compatible V0 mode) because
``regex`` bounds a match in time (``timeout=``): a rule such as ``(a+)+b`` backtracks for ever in
Java and in ``re`` alike, and nothing can interrupt ``re`` once it runs.
"""

from __future__ import annotations

import re
import time

import regex

from lastlayer.hadoop.java_pattern import JavaPattern, JavaRegexError

#: What Java's ``String.trim()`` strips: every character <= U+0020.
JAVA_TRIM = "".join(chr(c) for c in range(0x21))


def compile_java(pattern: str) -> regex.Pattern[str]:
    """The compiled pattern with Java's meaning of ``pattern``.

    Raises:
        JavaRegexError: malformed, or not expressible in ``re`` syntax (the message says why).
    """
    try:
        return regex.compile(JavaPattern(pattern).translate(), flags=regex.V0)
    except (re.error, regex.error, OverflowError, RecursionError) as exc:
        raise JavaRegexError(str(exc)) from exc


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (``time.monotonic()``), at least a millisecond."""
    return max(deadline - time.monotonic(), 0.001)


class Replacement:
    """A Java ``Matcher.replaceFirst``/``replaceAll`` replacement string, parsed as Java does.

    Java reports a bad replacement only when the pattern matches; so does :meth:`substitute`.
    """

    def __init__(self, text: str, pattern: regex.Pattern[str]) -> None:
        self.parts: list[str | int] = []
        self.error: str | None = None
        try:
            self._parse(text, pattern)
        except JavaRegexError as exc:
            self.error = f"replacement {text!r}: {exc}"

    def _parse(self, text: str, pattern: regex.Pattern[str]) -> None:
        i, n = 0, len(text)
        literal: list[str] = []
        while i < n:
            c = text[i]
            if c == "\\":
                if i + 1 == n:
                    raise JavaRegexError("character to be escaped is missing")
                literal.append(text[i + 1])
                i += 2
            elif c == "$":
                i += 1
                if i == n:
                    raise JavaRegexError("Illegal group reference: group index is missing")
                if text[i] == "{":
                    i += 1
                    start = i
                    while i < n and text[i].isascii() and text[i].isalnum():
                        i += 1
                    name = text[start:i]
                    if not name:
                        raise JavaRegexError("named capturing group has 0 length name")
                    if i == n or text[i] != "}":
                        raise JavaRegexError("named capturing group is missing trailing '}'")
                    if name[0].isdigit():
                        raise JavaRegexError(f"capturing group name {{{name}}} starts with digit character")
                    if name not in pattern.groupindex:
                        raise JavaRegexError(f"No group with name {{{name}}}")
                    ref = pattern.groupindex[name]
                    i += 1
                else:
                    if not "0" <= text[i] <= "9":
                        raise JavaRegexError("Illegal group reference")
                    ref = ord(text[i]) - 48
                    i += 1
                    while i < n and "0" <= text[i] <= "9" and ref * 10 + ord(text[i]) - 48 <= pattern.groups:
                        ref = ref * 10 + ord(text[i]) - 48
                        i += 1
                    if ref > pattern.groups:
                        raise JavaRegexError(f"No group {ref}")
                if literal:
                    self.parts.append("".join(literal))
                    literal = []
                self.parts.append(ref)
            else:
                literal.append(c)
                i += 1
        if literal:
            self.parts.append("".join(literal))

    def _expand(self, m: regex.Match[str]) -> str:
        return "".join(p if isinstance(p, str) else (m.group(p) or "") for p in self.parts)

    def substitute(self, base: str, pattern: regex.Pattern[str], repeat: bool, deadline: float) -> str:
        """``replaceFirst`` (``replaceAll`` when ``repeat``) of ``pattern`` in ``base``, as Java steps.

        Raises:
            JavaRegexError: the replacement is bad and ``pattern`` matches (Java reports it only then).
            TimeoutError: the search runs past ``deadline`` (``time.monotonic()``).
        """
        m = pattern.search(base, timeout=remaining(deadline))
        if m is None:
            return base
        if self.error is not None:
            raise JavaRegexError(self.error)
        out: list[str] = []
        last = 0
        while m is not None:
            out.append(base[last : m.start()])
            out.append(self._expand(m))
            last = m.end()
            if not repeat:
                break
            nxt = m.end() + (1 if m.end() == m.start() else 0)  # Java steps past an empty match
            m = pattern.search(base, nxt, timeout=remaining(deadline)) if nxt <= len(base) else None
        out.append(base[last:])
        return "".join(out)
