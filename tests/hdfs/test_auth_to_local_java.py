"""lastlayer's auth_to_local evaluator against Hadoop's own answer (the harness's JVM, the same rules)."""

from __future__ import annotations

import pytest

from lastlayer.hadoop.auth_to_local import AuthToLocalError, rules_from_core_site, short_name

PRINCIPALS = [
    # the walkthrough's principals
    "hdfs/localhost@LOCAL",
    "HTTP/localhost@LOCAL",
    "tensorflow@LOCAL",
    "alice@LOCAL",
    "bob@LOCAL",
    # the YARN daemons of the harness
    "rm/localhost@LOCAL",
    "nm/localhost@LOCAL",
    # tricky ones
    "hdfs@LOCAL",
    "hdfs/name-0-node.hdfs.autoip.dcos.thisdcos.directory@LOCAL",
    "carol@LOCAL",
    "tensorflow@OTHER",
    "TENSORFLOW@LOCAL",
    "tensorflow/admin@LOCAL",
    "hdfs/localhost@OTHER",
    "bob",
    "hdfs/localhost",
    "tensorflow@local",
    "alice@LOCAL.COM",
    "bobby@LOCAL",
    "xbob@LOCAL",
    "a/b/c@LOCAL",
    "hdfs@LOCAL@LOCAL",
]


@pytest.fixture(scope="module")
def rules(secure_hdfs) -> str:
    return rules_from_core_site((secure_hdfs.conf_dir / "core-site.xml").read_bytes())


@pytest.mark.parametrize("principal", PRINCIPALS)
def test_same_answer_as_hadoop(secure_hdfs, securehdfs, rules, principal):
    try:
        hadoop: str | None = secure_hdfs.map_principal(principal)
    except securehdfs.MappingError:
        hadoop = None
    try:
        ours: str | None = short_name(principal, rules, "LOCAL")
    except AuthToLocalError:
        ours = None
    assert ours == hadoop, f"{principal}: lastlayer {ours!r}, Hadoop {hadoop!r}"


def test_the_rules_are_the_walkthrough_s_and_two_for_yarn(rules):
    assert short_name("bob@LOCAL", rules, "LOCAL") == "bob"
    assert short_name("rm/localhost@LOCAL", rules, "LOCAL") == "yarn"
    assert rules.count("RULE:") == 7
