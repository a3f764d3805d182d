"""Reading a ``java.util.regex.Pattern`` with Java's meaning and writing it in ``re`` syntax
(:class:`JavaPattern`), for :func:`lastlayer.hadoop.java_regex.compile_java`; what Java reports as a
malformed pattern, or what ``re`` cannot express with Java's meaning, raises :class:`JavaRegexError`.
"""

from __future__ import annotations

import re
from typing import NoReturn

INT_MAX = 2**31 - 1
_MAX_CODE_POINT = 0x10FFFF


class JavaRegexError(Exception):
    """A Java regex or replacement that is malformed, or that Python's ``re`` cannot express with
    Java's meaning (the message says which, as Java would)."""


def parse_int(digits: str) -> int | None:
    """ASCII ``digits`` as Java's ``Integer.parseInt`` reads them; ``None`` where it would throw."""
    if not digits or len(digits) > 10 or int(digits) > INT_MAX:
        return None
    return int(digits)


_I, _M, _S, _D = 1, 2, 4, 8  # CASE_INSENSITIVE, MULTILINE, DOTALL, UNIX_LINES
_FLAG_BITS = {"i": _I, "m": _M, "s": _S, "d": _D}
_UNSUPPORTED_FLAGS = {"u": "UNICODE_CASE", "U": "UNICODE_CHARACTER_CLASS", "x": "COMMENTS", "c": "CANON_EQ"}
_TERMINATORS = "\n\r\x85\u2028\u2029"  # Java's line terminators (without UNIX_LINES)

Ranges = list[tuple[int, int]]


def _set(chars: str) -> Ranges:
    return [(ord(c), ord(c)) for c in chars]


_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = _set(" \t\n\x0b\f\r")
_HSPACE: Ranges = [*_set(" \t\xa0\u1680\u180e\u202f\u205f\u3000"), (0x2000, 0x200A)]
_VSPACE: Ranges = _set("\n\x0b\f\r\x85\u2028\u2029")
_PUNCT: Ranges = [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)]
_POSIX: dict[str, Ranges] = {
    "Lower": [(0x61, 0x7A)],
    "Upper": [(0x41, 0x5A)],
    "ASCII": [(0x00, 0x7F)],
    "Alpha": [(0x41, 0x5A), (0x61, 0x7A)],
    "Digit": _DIGIT,
    "Alnum": [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
    "Punct": _PUNCT,
    "Graph": [(0x21, 0x7E)],
    "Print": [(0x20, 0x7E)],
    "Blank": _set(" \t"),
    "Cntrl": [(0x00, 0x1F), (0x7F, 0x7F)],
    "XDigit": [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
    "Space": _SPACE,
}
_CLASS_ESCAPES: dict[str, Ranges] = {"d": _DIGIT, "w": _WORD, "s": _SPACE, "h": _HSPACE, "v": _VSPACE}
_HEX = "0123456789abcdefABCDEF"
_SIMPLE_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "a": 0x07, "e": 0x1B}


def _normalize(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    nxt = 0
    for lo, hi in _normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= _MAX_CODE_POINT:
        out.append((nxt, _MAX_CODE_POINT))
    return out


def _ascii_case_closure(ranges: Ranges) -> Ranges:
    """Java's ASCII-only case-insensitive class: add the other case of every ASCII letter in it."""
    extra: Ranges = []
    for lo, hi in ranges:
        for a, z, shift in ((0x61, 0x7A, -32), (0x41, 0x5A, 32)):
            s, e = max(lo, a), min(hi, z)
            if s <= e:
                extra.append((s + shift, e + shift))
    return _normalize([*ranges, *extra])


def _char(cp: int) -> str:
    c = chr(cp)
    if c.isascii() and c.isalnum():
        return c
    return f"\\x{cp:02x}" if cp <= 0xFF else f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def _class_text(ranges: Ranges, negate: bool = False) -> str:
    body = "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in _normalize(ranges))
    return f"[{'^' if negate else ''}{body}]"


def _remove_qe_quoting(src: str) -> str:
    """Java's first step: ``\\Q...\\E`` becomes its characters, each escaped as a literal."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        if src[i] == "\\" and i + 1 < n and src[i + 1] == "Q":
            i += 2
            end = src.find("\\E", i)
            quoted = src[i:] if end < 0 else src[i:end]
            out.extend(c if c.isascii() and c.isalpha() else f"\\x{{{ord(c):x}}}" for c in quoted)
            i = n if end < 0 else end + 2
        elif src[i] == "\\" and i + 1 < n:
            out.append(src[i : i + 2])
            i += 2
        else:
            out.append(src[i])
            i += 1
    return "".join(out)


class JavaPattern:
    """A recursive-descent reading of a ``java.util.regex.Pattern`` that writes the Python equivalent."""

    def __init__(self, src: str) -> None:
        self.src = _remove_qe_quoting(src)
        self.pos = 0
        self.flags = 0
        self.groups = 0  # capturing groups opened so far (Java numbers backreferences by these)
        self.closed: set[int] = set()

    def fail(self, message: str) -> NoReturn:
        raise JavaRegexError(f"{message} near index {self.pos}")

    def unsupported(self, what: str) -> NoReturn:
        raise JavaRegexError(f"{what} is not supported here")

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.src[i] if i < len(self.src) else ""

    def translate(self) -> str:
        out = self.expr()
        if self.pos < len(self.src):
            self.fail("Unmatched closing ')'")
        return out

    def expr(self) -> str:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return "|".join(branches)

    def sequence(self) -> str:
        parts: list[str] = []
        while self.pos < len(self.src) and self.peek() not in "|)":
            atom = self.atom()
            if atom is None:  # an inline flag group: nothing to repeat
                continue
            quant = self.quantifier()
            parts.append(f"(?:{atom}){quant}" if quant else atom)
        return "".join(parts)

    def quantifier(self) -> str:
        c = self.peek()
        if c in ("?", "*", "+"):
            self.pos += 1
            q = c
        elif c == "{":
            if not self.peek(1).isascii() or not self.peek(1).isdigit():
                self.fail("Illegal repetition")
            self.pos += 1
            lo = self.number()
            hi: int | None = lo
            if self.peek() == ",":
                self.pos += 1
                hi = None if self.peek() == "}" else self.number(optional=True)
            if self.peek() != "}":
                self.fail("Unclosed counted closure")
            self.pos += 1
            if hi is not None and hi < lo:
                self.fail("Illegal repetition range")
            q = f"{{{lo}}}" if hi == lo else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
        else:
            return ""
        if self.peek() in ("?", "+"):
            q += self.peek()
            self.pos += 1
        return q

    def number(self, optional: bool = False) -> int:
        start = self.pos
        while self.peek().isascii() and self.peek().isdigit() and self.peek():
            self.pos += 1
        if start == self.pos:
            if optional:
                return 0
            self.fail("Illegal repetition")
        value = parse_int(self.src[start : self.pos])
        if value is None:
            self.fail("Illegal repetition range")
        return value

    def atom(self) -> str | None:
        c = self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            return _class_text(self.char_class())
        if c in ("*", "+", "?"):
            self.fail(f"Dangling meta character '{c}'")
        if c == "{":
            return ""  # Java: an empty atom, which the counted closure that follows repeats
        self.pos += 1
        if c == ".":
            if self.flags & _S:
                return "(?s:.)"
            return "[^\\n]" if self.flags & _D else _class_text(_set(_TERMINATORS), negate=True)
        if c == "^":
            return self.caret()
        if c == "$":
            return self.dollar(self.flags & _M != 0)
        if c == "\\":
            return self.escape_atom()
        return self.literal(ord(c))

    def literal(self, cp: int) -> str:
        c = chr(cp)
        if self.flags & _I and c.isascii() and c.isalpha():
            return _class_text(_set(c.lower() + c.upper()))
        return re.escape(c)

    def caret(self) -> str:
        if not self.flags & _M:
            return "\\A"
        if self.flags & _D:
            return "(?:\\A|(?<=\\n))(?=[\\s\\S])"
        return f"(?:\\A|(?<={_class_text(_set(_TERMINATORS))}))(?!(?<=\\r)\\n)(?=[\\s\\S])"

    def dollar(self, multiline: bool) -> str:
        if self.flags & _D:
            return "(?=\\n|\\Z)" if multiline else "(?=\\n?\\Z)"
        terms = _class_text(_set(_TERMINATORS))
        if multiline:
            return f"(?:\\Z|(?={terms}))(?!(?<=\\r)\\n)"
        return f"(?=(?:\\r\\n|{terms})?\\Z)(?!(?<=\\r)\\n)"

    def group(self) -> str | None:
        self.pos += 1
        saved = self.flags
        number = 0
        if self.peek() == "?":
            self.pos += 1
            c = self.peek()
            self.pos += 1
            if c in (":", "=", "!", ">"):
                head = "(?" + c
            elif c == "<" and self.peek() in ("=", "!"):
                head = "(?<" + self.peek()
                self.pos += 1
            elif c == "<":
                start = self.pos
                while self.peek().isascii() and self.peek().isalnum():
                    self.pos += 1
                name = self.src[start : self.pos]
                if not name or not name[0].isalpha():
                    self.fail("capturing group name does not start with a Latin letter")
                if self.peek() != ">":
                    self.fail("named capturing group is missing trailing '>'")
                self.pos += 1
                self.groups += 1
                number = self.groups
                head = f"(?P<{name}>"
            else:
                self.pos -= 1
                if not self.inline_flags():
                    return None
                head = "(?:"
        else:
            self.groups += 1
            number = self.groups
            head = "("
        body = self.expr()
        if self.peek() != ")":
            self.fail("Unclosed group")
        self.pos += 1
        self.flags = saved
        if number:
            self.closed.add(number)
        return f"{head}{body})"

    def inline_flags(self) -> bool:
        """``(?idms-idms)`` (returns False: flags only) or ``(?idms-idms:`` (returns True)."""
        add = True
        while True:
            c = self.peek()
            self.pos += 1
            if c == ")":
                return False
            if c == ":":
                return True
            if c == "-" and add:
                add = False
            elif c in _FLAG_BITS:
                self.flags = self.flags | _FLAG_BITS[c] if add else self.flags & ~_FLAG_BITS[c]
            elif c in _UNSUPPORTED_FLAGS:
                if add:
                    self.unsupported(f"the Java regex flag {c} ({_UNSUPPORTED_FLAGS[c]})")
            else:
                self.pos -= 1
                self.fail("Unknown inline modifier")

    # -- escapes --

    def escape_atom(self) -> str:
        """After a backslash outside a class."""
        c = self.peek()
        if not c:
            self.fail("Unexpected internal error")
        if "1" <= c <= "9":
            return self.backreference()
        simple = {"A": "\\A", "z": "\\Z", "b": "\\b", "B": "\\B"}
        if c in simple:
            self.pos += 1
            return simple[c]
        if c == "Z":
            self.pos += 1
            return self.dollar(False)
        if c == "R":
            self.pos += 1
            return "(?>\\r\\n|" + _class_text(_VSPACE) + ")"
        if c == "k":
            self.pos += 1
            if self.peek() != "<":
                self.fail("\\k is not followed by '<' for named capturing group")
            end = self.src.find(">", self.pos)
            if end < 0:
                self.fail("named capturing group is missing trailing '>'")
            name = self.src[self.pos + 1 : end]
            self.pos = end + 1
            return self.case_ref(f"(?P={name})")
        ranges, single = self.class_escape()
        if single is not None:
            return self.literal(single)
        return _class_text(ranges)

    def backreference(self) -> str:
        ref = ord(self.peek()) - 48
        self.pos += 1
        while "0" <= self.peek() <= "9" and self.peek() and ref * 10 + ord(self.peek()) - 48 <= self.groups:
            ref = ref * 10 + ord(self.peek()) - 48
            self.pos += 1
        if ref not in self.closed:
            self.unsupported(f"backreference \\{ref} to a group not yet closed")
        return self.case_ref(f"(?:\\{ref})")

    def case_ref(self, text: str) -> str:
        return f"(?ai:{text})" if self.flags & _I else text

    def class_escape(self) -> tuple[Ranges, int | None]:
        """After a backslash: a set (ranges, None) or one character ([], code point)."""
        c = self.peek()
        if not c:
            self.fail("Unexpected internal error")
        self.pos += 1
        if c in _SIMPLE_ESCAPES:
            return [], _SIMPLE_ESCAPES[c]
        if c.lower() in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[c.lower()]
            return (ranges if c.islower() else _complement(ranges)), None
        if c in ("p", "P"):
            return self.property(negate=c == "P"), None
        if c == "0":
            return [], self.octal()
        if c == "x":
            return [], self.hex_escape()
        if c == "u":
            digits = self.src[self.pos : self.pos + 4]
            if len(digits) != 4 or not all(d in _HEX for d in digits):
                self.fail("Illegal Unicode escape sequence")
            self.pos += 4
            return [], int(digits, 16)
        if c == "c":
            if not self.peek():
                self.fail("Illegal control escape sequence")
            self.pos += 1
            return [], ord(self.src[self.pos - 1]) ^ 64
        if c in "GXN":
            self.unsupported(f"the Java regex escape \\{c}")
        if (c.isascii() and c.isalpha()) or "1" <= c <= "9":  # 1-9 here: inside a class
            self.fail("Illegal/unsupported escape sequence")
        return [], ord(c)

    def octal(self) -> int:
        digits = ""
        while len(digits) < 3 and "0" <= self.peek() <= "7" and self.peek():
            digits += self.peek()
            self.pos += 1
        if not digits:
            self.fail("Illegal octal escape sequence")
        if len(digits) == 3 and digits[0] > "3":
            self.pos -= 1
            digits = digits[:2]
        return int(digits, 8)

    def hex_escape(self) -> int:
        hexdigits = _HEX
        if self.peek() == "{":
            end = self.src.find("}", self.pos)
            digits = self.src[self.pos + 1 : end] if end > 0 else ""
            if not digits or not all(d in hexdigits for d in digits) or int(digits, 16) > _MAX_CODE_POINT:
                self.fail("Illegal hexadecimal escape sequence")
            self.pos = end + 1
            return int(digits, 16)
        digits = self.src[self.pos : self.pos + 2]
        if len(digits) != 2 or not all(d in hexdigits for d in digits):
            self.fail("Illegal hexadecimal escape sequence")
        self.pos += 2
        return int(digits, 16)

    def property(self, negate: bool) -> Ranges:
        if self.peek() == "{":
            end = self.src.find("}", self.pos)
            if end < 0:
                self.fail("Unclosed character family")
            name = self.src[self.pos + 1 : end]
            self.pos = end + 1
        else:
            name = self.peek()
            self.pos += 1
        if name not in _POSIX:
            self.unsupported(f"the character property \\p{{{name}}}")
        return _complement(_POSIX[name]) if negate else _POSIX[name]

    # -- character classes --

    def char_class(self) -> Ranges:
        self.pos += 1
        negate = self.peek() == "^"
        if negate:
            self.pos += 1
        ranges: Ranges = []
        first = True
        while True:
            c = self.peek()
            if not c:
                self.fail("Unclosed character class")
            if c == "]" and not first:
                self.pos += 1
                break
            if c == "[":
                self.unsupported("a character class nested in another")
            if c == "&" and self.peek(1) == "&":
                self.unsupported("a character class intersection (&&)")
            first = False
            items, single = self.class_atom()
            if single is None:
                ranges.extend(items)
                continue
            if self.peek() == "-" and self.peek(1) not in ("]", "["):
                self.pos += 1
                _, end = self.class_atom()
                if end is None or end < single:
                    self.fail("Illegal character range")
                ranges.append((single, end))
            else:
                ranges.append((single, single))
        if self.flags & _I:
            ranges = _ascii_case_closure(ranges)
        return _complement(ranges) if negate else ranges

    def class_atom(self) -> tuple[Ranges, int | None]:
        c = self.peek()
        if not c:
            self.fail("Unclosed character class")
        self.pos += 1
        if c == "\\":
            return self.class_escape()
        return [], ord(c)
