"""Hadoop's ``hadoop.security.auth_to_local``: Kerberos principal -> short (local) user name.

Evaluates the rule language exactly as Hadoop's ``KerberosName`` (hadoop-auth) and
``HadoopKerberosName`` do:

* A principal is ``primary[/instance][@REALM]``; a name with a third component, an empty part or a
  stray ``/``/``@`` is malformed when it has an ``@``. A name without ``@`` that is not of that form,
  and any name with neither instance nor realm, is already short and is returned unchanged.
* Rules are ``DEFAULT`` or ``RULE:[n:fmt](regex)s/from/to/g`` (the regex, the substitution and ``g``
  optional), each optionally followed by ``/L`` (lower-case the result), separated by whitespace (or
  nothing). The first rule that applies gives the answer.
* ``DEFAULT`` applies, whatever the number of components, when the realm is the default realm, and
  gives the first component. ``RULE:[n:...]`` applies to principals of exactly ``n`` components: ``fmt``
  is expanded (``$0`` the realm, ``$1``/``$2`` the components), the regex must match the whole of it,
  and ``s/from/to/`` is Java's ``replaceFirst`` (``replaceAll`` with ``g``).
* Mechanism ``hadoop`` (the default): a result containing ``/`` or ``@`` is an error, and so is a
  principal no rule applies to. Mechanism ``mit``: any result is allowed, and a principal no rule
  applies to is returned as it is.

The regexes are Java's (``java.util.regex``), translated to Python's ``re`` with Java's meaning by
:mod:`lastlayer.hadoop.java_regex`, which refuses what ``re`` cannot express rather than give it
another meaning; ``core-site.xml`` is read by :mod:`lastlayer.hadoop.conf_xml`.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import regex

from lastlayer.errors import DataError, UsageError
from lastlayer.hadoop import conf_xml
from lastlayer.hadoop.java_pattern import JavaRegexError, parse_int
from lastlayer.hadoop.java_regex import JAVA_TRIM, Replacement, compile_java, remaining

MECHANISM_HADOOP = "hadoop"
MECHANISM_MIT = "mit"
AUTH_TO_LOCAL_KEY = "hadoop.security.auth_to_local"
#: Longest time the rules may take to map one principal (Hadoop itself has no bound).
EVAL_TIMEOUT_S = 2.0

# --- the rule language (KerberosName's nameParser and ruleParser) ---------------------------------

_JAVA_WS = "[ \\t\\n\\x0b\\f\\r]"  # Java's \s
_NAME_RE = re.compile(r"([^/@]+)(/([^/@]+))?(@([^/@]+))?", re.DOTALL)
_RULE_RE = re.compile(
    _JAVA_WS + r"*((DEFAULT)|(RULE:\[([0-9]*):([^\]]*)\](\(([^)]*)\))?(s/([^/]*)/([^/]*)/(g)?)?))/?(L)?",
    re.DOTALL,
)


class AuthToLocalError(UsageError):
    """An auth_to_local rule, principal or mechanism cannot be used, or no rule applies."""


@dataclass(frozen=True)
class Rule:
    """One parsed rule: ``DEFAULT`` (``is_default``) or ``RULE:[components:fmt](match)s/from/to/g/L``.

    ``match``, ``from_pattern`` and ``to_pattern`` are Java regex / replacement text; ``None`` when
    absent. Constructing a rule compiles them; a bad one raises :class:`AuthToLocalError`.
    """

    is_default: bool = False
    components: int = 0
    fmt: str = ""
    match: str | None = None
    from_pattern: str | None = None
    to_pattern: str | None = None
    repeat: bool = False
    lower: bool = False
    _match_re: regex.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _from_re: regex.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _to: Replacement | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.is_default:
            return
        if (self.from_pattern is None) != (self.to_pattern is None):
            raise AuthToLocalError(f"Invalid rule: {self}: from_pattern and to_pattern go together")
        set_ = object.__setattr__
        if self.match is not None:
            set_(self, "_match_re", _compile_java(self.match, self, "regex"))
        if self.from_pattern is not None and self.to_pattern is not None:
            from_re = _compile_java(self.from_pattern, self, "substitution pattern")
            set_(self, "_from_re", from_re)
            set_(self, "_to", Replacement(self.to_pattern, from_re))

    def __str__(self) -> str:
        """The rule as Hadoop prints it (``KerberosName.Rule.toString``)."""
        if self.is_default:
            return "DEFAULT"
        text = f"RULE:[{self.components}:{self.fmt}]"
        if self.match is not None:
            text += f"({self.match})"
        if self.from_pattern is not None:
            text += f"s/{self.from_pattern}/{self.to_pattern}/" + ("g" if self.repeat else "")
        if self.lower:
            text += "/L"
        return text

    def apply(
        self,
        realm: str | None,
        components: Sequence[str],
        default_realm: str,
        mechanism: str = MECHANISM_HADOOP,
        deadline: float | None = None,
    ) -> str | None:
        """The short name this rule gives a principal, or ``None`` when the rule does not apply.

        ``components`` are the principal's one or two components, ``realm`` its realm (``None`` when
        it has none: ``$0`` is then ``null``, as Java's string concatenation writes it).

        Raises:
            AuthToLocalError: the rule fails, or its regexes run past ``deadline``
                (``time.monotonic()``; default :data:`EVAL_TIMEOUT_S` from now).
        """
        if deadline is None:
            deadline = time.monotonic() + EVAL_TIMEOUT_S
        try:
            return self._apply(realm, components, default_realm, mechanism, deadline)
        except TimeoutError:
            raise AuthToLocalError(
                f"auth_to_local rule {self} took too long: its regex backtracks without end on this "
                "principal (nested repeats such as (a+)+); simplify the rule"
            ) from None

    def _apply(
        self,
        realm: str | None,
        components: Sequence[str],
        default_realm: str,
        mechanism: str,
        deadline: float,
    ) -> str | None:
        result: str | None = None
        if self.is_default:
            if realm is not None and realm == default_realm:
                result = components[0]
        elif len(components) == self.components:
            base = _expand_format(self.fmt, ["null" if realm is None else realm, *components])
            if self._match_re is None or self._match_re.fullmatch(base, timeout=remaining(deadline)):
                if self._from_re is None or self._to is None:
                    result = base
                else:
                    try:
                        result = self._to.substitute(base, self._from_re, self.repeat, deadline)
                    except JavaRegexError as exc:
                        raise AuthToLocalError(f"Invalid rule: {self}: {exc}") from exc
        if result is not None and ("/" in result or "@" in result) and mechanism.lower() == MECHANISM_HADOOP:
            raise AuthToLocalError(
                f"Non-simple name {result} after auth_to_local rule {self}: a short name may contain "
                "neither '/' nor '@' under the hadoop mechanism; fix the rule (or use mechanism mit)"
            )
        if result is not None and self.lower:
            result = result.lower()
        return result


DEFAULT_RULE = Rule(is_default=True)


def parse_rules(text: str) -> list[Rule]:
    """Parse ``hadoop.security.auth_to_local`` text (rules separated by whitespace or newlines).

    Raises:
        AuthToLocalError: naming the first rule that cannot be parsed or whose regex is bad.
    """
    rules: list[Rule] = []
    remaining = text.strip(JAVA_TRIM)
    while remaining:
        m = _RULE_RE.match(remaining)
        if m is None:
            after = f" (after {rules[-1]})" if rules else ""
            raise AuthToLocalError(
                f"Invalid rule: {_first_line(remaining)}{after}: each rule is DEFAULT or "
                "RULE:[n:fmt](regex)s/from/to/g, each part after ] optional, /L optional at the end"
            )
        rule_text = m.group(0).strip(JAVA_TRIM)
        if m.group(2) is not None:
            rules.append(DEFAULT_RULE)
        else:
            count = parse_int(m.group(4))
            if count is None:
                raise AuthToLocalError(
                    f"Invalid rule: {rule_text}: the number of components {m.group(4)!r} is not a number"
                )
            rules.append(
                Rule(
                    components=count,
                    fmt=m.group(5),
                    match=m.group(7),
                    from_pattern=m.group(9),
                    to_pattern=m.group(10),
                    repeat=m.group(11) == "g",
                    lower=m.group(12) == "L",
                )
            )
        remaining = remaining[m.end() :]
    return rules


def short_name(
    principal: str,
    rules: str | Sequence[Rule],
    default_realm: str,
    mechanism: str = MECHANISM_HADOOP,
    timeout: float = EVAL_TIMEOUT_S,
) -> str:
    """The local user name Hadoop gives ``principal`` under ``rules`` (text or parsed), found within
    ``timeout`` seconds.

    Raises:
        AuthToLocalError: malformed principal or rules, an unknown mechanism, a rule error, a rule
            whose regex runs past ``timeout`` (named), or (under the ``hadoop`` mechanism) no rule
            applies or the result is not a simple name.
    """
    deadline = time.monotonic() + timeout
    mech = mechanism.lower()
    if mech not in (MECHANISM_HADOOP, MECHANISM_MIT):
        raise AuthToLocalError(f"Invalid rule mechanism: {mechanism}: use hadoop or mit")
    parsed = parse_rules(rules) if isinstance(rules, str) else list(rules)
    m = _NAME_RE.fullmatch(principal)
    if m is None:
        if "@" in principal:
            raise AuthToLocalError(
                f"Malformed Kerberos name: {principal}: expected primary[/instance][@REALM]"
            )
        return principal  # Hadoop keeps such a name whole, as an already short one
    service, host, realm = m.group(1), m.group(3), m.group(5)
    if host is None and realm is None:
        return service
    components = [service] if host is None else [service, host]
    for rule in parsed:
        result = rule.apply(realm, components, default_realm, mech, deadline)
        if result is not None:
            return result
    if mech == MECHANISM_HADOOP:
        raise AuthToLocalError(
            f"No rules applied to {principal}: add a RULE for it to {AUTH_TO_LOCAL_KEY} (DEFAULT covers "
            f"only the default realm, here {default_realm or '(none)'})"
        )
    return principal


def rules_from_base64(text: str) -> str:
    """Decode base64-encoded rules (the walkthrough's ``hdfs.security_auth_to_local`` option)."""
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthToLocalError(f"the auth_to_local rules are not valid base64: {exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthToLocalError(f"the base64-decoded auth_to_local rules are not UTF-8 text: {exc}") from exc


def rules_from_core_site(xml_bytes: bytes) -> str:
    """The value of ``hadoop.security.auth_to_local`` in a ``core-site.xml``; ``"DEFAULT"`` when absent.

    Read as Hadoop's ``Configuration`` reads a resource: ``<property>`` with ``<name>`` (trimmed),
    ``<value>`` (as written; an empty one sets nothing) and ``<final>``, or the same as attributes; a
    later definition wins unless an earlier one was final. ``${...}`` variables are not expanded.
    """
    try:
        props = conf_xml.read(xml_bytes, "core-site.xml").props
    except DataError as exc:
        raise AuthToLocalError(str(exc)) from exc
    return props.get(AUTH_TO_LOCAL_KEY, "DEFAULT")


# --- helpers -----------------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    """The first line of ``text`` that is not blank (the start of a bad rule, for messages)."""
    return next((line for line in text.splitlines() if line.strip()), text)


def _expand_format(fmt: str, params: Sequence[str]) -> str:
    """``KerberosName.Rule.replaceParameters``: ``$n`` -> ``params[n]``, other text as it is."""
    out: list[str] = []
    i = 0
    while i < len(fmt):
        j = fmt.find("$", i)
        if j < 0:
            out.append(fmt[i:])
            break
        out.append(fmt[i:j])
        k = j + 1
        while k < len(fmt) and "0" <= fmt[k] <= "9":
            k += 1
        digits = fmt[j + 1 : k]
        num = parse_int(digits)
        if num is None:
            raise AuthToLocalError(
                f"bad format in username mapping in {digits}: in {fmt!r} every '$' must be followed by "
                "a component number ($0 realm, $1, $2)"
            )
        if num >= len(params):
            raise AuthToLocalError(
                f"index {num} from {fmt} is outside of the valid range 0 to {len(params) - 1}: "
                "fix the rule's format"
            )
        out.append(params[num])
        i = k
    return "".join(out)


def _compile_java(pattern: str, rule: Rule, what: str) -> regex.Pattern[str]:
    try:
        return compile_java(pattern)
    except JavaRegexError as exc:
        raise AuthToLocalError(f"Invalid rule: {rule}: its {what} {pattern!r}: {exc}") from exc
