"""Tests of dcp.patterns pinned by mutation testing (docs/mutation.md): boundaries, messages, defaults.

Matching, overlap and the policy's first-match rule are tested in tests/test_spec.py,
next to the pipeline specs that use them.
"""

from __future__ import annotations

from typing import Any

import pytest

from dcp.errors import ConfigError
from dcp.patterns import Policy, Rule, rules_from_list, validate_pattern, validate_topic


def config_error(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("check", [validate_topic, validate_pattern])
def test_a_topic_of_255_bytes_is_the_longest(check: Any) -> None:
    check("a" * 255)
    check("é" * 127 + "a")  # 255 bytes of UTF-8
    assert config_error(check, "é" * 128) == f"{check.__name__.split('_')[1]} {'é' * 128!r} is 256 bytes; at most 255 allowed"


@pytest.mark.parametrize(
    ("call", "text", "message"),
    [
        (validate_topic, "", "topic must not be empty"),
        (validate_topic, "a..b", "topic 'a..b' has an empty token"),
        (validate_topic, 7, "topic 7 must be a string"),
        (validate_pattern, "", "pattern must not be empty"),
        (validate_pattern, "a..>", "pattern 'a..>' has an empty token"),
        (validate_pattern, 7, "pattern 7 must be a string"),
    ],
)
def test_errors_say_whether_a_topic_or_a_pattern_is_wrong(call: Any, text: object, message: str) -> None:
    assert config_error(call, text) == message


def test_a_rule_keeps_its_patterns_as_tuples() -> None:
    rule = Rule("cam*", "allow", publish=["video.>"], consume=["ctl"])  # type: ignore[arg-type]
    assert rule.publish == ("video.>",) and rule.consume == ("ctl",)
    assert hash(rule) == hash(Rule("cam*", "allow", ("video.>",), ("ctl",)))
    assert rule == Rule("cam*", "allow", ("video.>",), ("ctl",))


@pytest.mark.parametrize("agent", ["", 5, None])
def test_a_rule_needs_a_non_empty_agent_glob(agent: object) -> None:
    assert config_error(Rule, agent, "allow", publish=("a",)) == "rule.agent must be a non-empty name glob"


def test_rules_from_list_raises_config_errors_naming_the_field_by_default() -> None:
    assert config_error(rules_from_list, {"agent": "x"}, "rule") == "rule must be an array of tables"
    assert config_error(rules_from_list, [{"agent": "x", "action": "maybe", "publish": "t"}], "rule") == (
        "rule[0].action must be 'allow' or 'deny', got 'maybe'"
    )


def test_policy_constructor_errors() -> None:
    assert config_error(Policy, [object()]) == "policy rules must be Rule instances"
    assert config_error(Policy, default="maybe") == "policy default must be 'allow' or 'deny', got 'maybe'"


def test_an_extended_policy_keeps_its_default() -> None:
    strict = Policy([Rule("cam", "allow", publish=("video",))], default="deny")
    extended = strict.extended([Rule("mic", "allow", publish=("audio",))])
    assert extended == Policy([*strict.rules, Rule("mic", "allow", publish=("audio",))], default="deny")
    assert extended.allows("mic", "publish", "audio")
    assert not extended.allows("mic", "publish", "video")


def test_policy_from_dict_defaults_and_errors() -> None:
    assert Policy.from_dict({"default": "deny"}) == Policy((), "deny")
    assert Policy.from_dict({}) == Policy()
    assert config_error(Policy.from_dict, ["rule"]) == "policy: must be a table"
    assert config_error(Policy.from_dict, "x", where="ops.toml") == "ops.toml: must be a table"
