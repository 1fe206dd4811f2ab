"""Tests of dcp.patterns (topic patterns, policy) and dcp.spec (pipeline specs)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies as st

from tests.purity import copy_with_import, loaded
from dcp.errors import ConfigError
from dcp.patterns import (
    Policy,
    Rule,
    rules_from_list,
    topic_matches,
    validate_pattern,
    validate_topic,
)
from dcp.spec import ElementSpec, PipelineSpec, SpecError, check_spec, load_spec, parse_spec


EXAMPLE_TOML = """
name = "faces"

[[source]]
name = "camera"
capability = "camera"
emits = "video"
params = { fps = 10 }

[[stage]]
name = "faces"
capability = "detect_faces"
consumes = ["video"]
emits = "faces"
replicas = 1
agent = "detector-1"

[[sink]]
name = "out"
capability = "print"
consumes = ["faces", "dogs.>"]

[[policy]]
agent = "spy*"
action = "deny"
consume = ["video"]
"""

EXAMPLE = {
    "name": "faces",
    "source": [{"name": "camera", "capability": "camera", "emits": "video", "params": {"fps": 10}}],
    "stage": [
        {"name": "faces", "capability": "detect_faces", "consumes": ["video"], "emits": "faces", "replicas": 1, "agent": "detector-1"}
    ],
    "sink": [{"name": "out", "capability": "print", "consumes": ["faces", "dogs.>"]}],
    "policy": [{"agent": "spy*", "action": "deny", "consume": ["video"]}],
}

CAPS = {"camera", "detect_faces", "detect_ages", "print"}


def doc(**changes: Any) -> dict[str, Any]:
    """A copy of EXAMPLE with top-level keys replaced (None deletes)."""
    data = copy.deepcopy(EXAMPLE)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def with_element(kind: str, index: int, **changes: Any) -> dict[str, Any]:
    """A copy of EXAMPLE with keys of one element replaced (None deletes)."""
    data = copy.deepcopy(EXAMPLE)
    item = data[kind][index]
    for key, value in changes.items():
        if value is None:
            item.pop(key, None)
        else:
            item[key] = value
    return data


def spec_error(data: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value) == f"{info.value.field}: {info.value.why}"
    assert info.value.code == "invalid_spec"
    return info.value


# --------------------------------------------------------------------------- topics and patterns

@pytest.mark.parametrize("topic", ["a", "sensors.cam1.video", "a-b_c.D9", "é.ü"])
def test_valid_topics(topic: str) -> None:
    validate_topic(topic)
    validate_pattern(topic)


@pytest.mark.parametrize(
    ("topic", "phrase"),
    [
        ("", "empty"),
        ("a..b", "empty token"),
        (".a", "empty token"),
        ("a.", "empty token"),
        ("a.*", "wildcard"),
        ("a.>", "wildcard"),
        ("a*", "wildcard"),
        ("x" * 256, "256 bytes"),
        ("é" * 128, "256 bytes"),
        (5, "must be a string"),
        ("\ud800", "UTF-8"),
    ],
)
def test_invalid_topics(topic: Any, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase) as info:
        validate_topic(topic)
    if isinstance(topic, str) and topic:
        assert repr(topic)[:20] in str(info.value)


@pytest.mark.parametrize("pattern", ["*", ">", "a.*", "a.>", "*.b.>", "*.*", "a.*.c"])
def test_valid_patterns(pattern: str) -> None:
    validate_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "phrase"),
    [("a.>.b", "last token"), (">.a", "last token"), ("a*", "whole tokens"), ("a.b>", "whole tokens"), ("a.**", "whole tokens"), ("a..*", "empty token"), ("", "empty")],
)
def test_invalid_patterns(pattern: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        validate_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("sensors.*.temp", "sensors.a.temp", True),
        ("sensors.*.temp", "sensors.a.b.temp", False),
        ("sensors.*.temp", "sensors.temp", False),
        ("sensors.>", "sensors.a", True),
        ("sensors.>", "sensors.a.b", True),
        ("sensors.>", "sensors", False),
        ("sensors.>", "other.a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("video", "video", True),
        ("video", "video.hd", False),
        ("video", "vide", False),
        ("a.b", "a.c", False),
    ],
)
def test_topic_matches_table(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


TOKENS = st.sampled_from(["a", "b", "c"])
TOKEN_LISTS = st.lists(TOKENS, min_size=1, max_size=4)


@given(st.lists(TOKENS, max_size=3), TOKEN_LISTS)
def test_rest_matches_one_or_more_tokens_after_the_prefix(prefix: list[str], topic: list[str]) -> None:
    pattern = ".".join([*prefix, ">"])
    expected = len(topic) > len(prefix) and topic[: len(prefix)] == prefix
    assert topic_matches(pattern, ".".join(topic)) is expected


@given(st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=4), TOKEN_LISTS)
def test_star_matches_exactly_one_token(pattern: list[str], topic: list[str]) -> None:
    expected = len(pattern) == len(topic) and all(p in ("*", t) for p, t in zip(pattern, topic))
    assert topic_matches(".".join(pattern), ".".join(topic)) is expected


@given(TOKEN_LISTS, TOKEN_LISTS)
def test_exact_topic_matches_only_itself(a: list[str], b: list[str]) -> None:
    assert topic_matches(".".join(a), ".".join(b)) is (a == b)


# --------------------------------------------------------------------------- policy

POLICY = Policy(
    [
        Rule("camera-*", "allow", publish=("video.>",)),
        Rule("*", "deny", publish=("video.>",)),
        Rule("spy*", "deny", consume=("video", "faces.*")),
    ],
    default="allow",
)


def test_policy_first_match_wins_else_default() -> None:
    assert POLICY.allows("camera-1", "publish", "video.hd")
    assert not POLICY.allows("other", "publish", "video.hd")
    assert POLICY.allows("other", "publish", "audio")
    assert not POLICY.allows("spyglass", "consume", "faces.x")
    assert POLICY.allows("spyglass", "publish", "faces.x")  # the rule covers consume only
    assert POLICY.allows("camera-1", "consume", "video")
    assert not Policy(default="deny").allows("anyone", "consume", "t")
    shadowed = Policy([Rule("*", "allow", consume=(">",)), Rule("spy", "deny", consume=("video",))], "deny")
    assert shadowed.allows("spy", "consume", "video")


def test_policy_why() -> None:
    assert POLICY.why("spyglass", "consume", "video") == "rule 2 (deny consume 'video' for 'spy*')"
    assert POLICY.why("other", "publish", "video.a") == "rule 1 (deny publish 'video.>' for '*')"
    assert POLICY.why("other", "publish", "audio") == "default allow"
    assert Policy(default="deny").why("x", "consume", "t") == "default deny"


def test_policy_rejects_unknown_access() -> None:
    with pytest.raises(ConfigError, match="'publish' or 'consume'"):
        POLICY.allows("a", "subscribe", "t")


def test_policy_extended_appends_after_existing_rules() -> None:
    extra = Rule("*", "deny", publish=("audio",))
    policy = POLICY.extended([extra, Rule("camera-*", "deny", publish=("video.>",))])
    assert policy.default == POLICY.default
    assert policy.rules[:3] == POLICY.rules and policy.rules[3] == extra
    assert not policy.allows("x", "publish", "audio")
    assert policy.allows("camera-1", "publish", "video.a")  # the earlier allow still wins
    assert POLICY.allows("x", "publish", "audio")  # the original is unchanged


def test_rules_dict_round_trip() -> None:
    rules = [rule.to_dict() for rule in POLICY.rules]
    assert Policy.from_dict({"default": POLICY.default, "rule": rules}) == POLICY
    assert json.loads(json.dumps(rules)) == rules


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"default": "maybe"}, "policy: default must be 'allow' or 'deny'"),
        ({"rules": []}, "policy: rules is not a policy key (default, rule) (did you mean 'rule'?)"),
        ({"policy": []}, "policy: policy is not a policy key (default, rule) (did you mean 'rule'? a policy file's rules are [[rule]] tables)"),
        ({"rule": [{"agent": "a", "action": "deny", "consumes": ["x"]}]},
         "policy: rule[0].consumes is not a rule key (agent, action, publish, consume) (did you mean 'consume'?)"),
        ({"rule": {"agent": "a"}}, "policy: rule must be an array of tables"),
        ({"rule": ["x"]}, "policy: rule[0] must be a table"),
        ({"rule": [{"agent": "a", "action": "allow", "consume": ["x"]}, {"agent": "a", "action": "maybe", "consume": ["x"]}]},
         "policy: rule[1].action must be 'allow' or 'deny'"),
        ({"rule": [{"action": "allow", "consume": ["x"]}]}, "policy: rule[0].agent must be a non-empty name glob"),
        ({"rule": [{"agent": "a", "action": "deny"}]}, "policy: rule[0].publish or consume must list at least one topic pattern"),
        ({"rule": [{"agent": "a", "action": "deny", "consume": ["a*"]}]}, "policy: rule[0].consume[0] pattern 'a*'"),
        ({"rule": [{"agent": "a", "action": "deny", "publish": [1]}]}, "policy: rule[0].publish must be a list of topic patterns"),
        ({"rule": [{"agent": "a", "action": "deny", "consume": ["x"], "topic": "y"}]}, "policy: rule[0].topic is not a rule key"),
    ],
)
def test_policy_from_dict_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_dict(data)
    assert str(info.value).startswith(message)


def test_rule_checks_itself() -> None:
    with pytest.raises(ConfigError, match="rule.action"):
        Rule("a", "permit", consume=("x",))
    with pytest.raises(ConfigError, match="rule.publish"):
        Rule("a", "allow")
    assert Rule("a", "allow", consume=["x"]).consume == ("x",)  # type: ignore[arg-type]
    assert rules_from_list([{"agent": "a", "action": "deny", "consume": "x"}], "rule") == (Rule("a", "deny", consume=("x",)),)


def test_policy_load_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "policy.toml"
    toml.write_text('default = "deny"\n[[rule]]\nagent = "camera-*"\naction = "allow"\npublish = ["video.>"]\n')
    loaded = Policy.load(toml)
    assert loaded == Policy([Rule("camera-*", "allow", publish=("video.>",))], "deny")
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps({"default": "deny", "rule": [{"agent": "camera-*", "action": "allow", "publish": ["video.>"]}]}))
    assert Policy.load(as_json) == loaded


def test_policy_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"cannot read {missing}"):
        Policy.load(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("default = \n")
    with pytest.raises(ConfigError, match=f"{bad} is not valid TOML"):
        Policy.load(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"{bad_json}: must hold a table"):
        Policy.load(bad_json)
    bad_json.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Policy.load(bad_json)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('default = "nope"\n')
    with pytest.raises(ConfigError, match=f"{wrong}: default must be"):
        Policy.load(wrong)


# --------------------------------------------------------------------------- parse_spec

def test_example_spec_parses(tmp_path: Path) -> None:
    path = tmp_path / "faces.toml"
    path.write_text(EXAMPLE_TOML)
    spec = load_spec(path)
    assert spec.name == "faces"
    camera, faces, out = spec.elements
    assert camera == ElementSpec("source", "camera", "camera", (), "video", {"fps": 10}, field_name="source[0]")
    assert faces == ElementSpec("stage", "faces", "detect_faces", ("video",), "faces", agent="detector-1", field_name="stage[0]")
    assert out == ElementSpec("sink", "out", "print", ("faces", "dogs.>"), None, field_name="sink[0]")
    assert spec.access_rules == (Rule("spy*", "deny", consume=("video",)),)
    assert not camera.external
    assert spec.element("faces") is faces
    with pytest.raises(KeyError):
        spec.element("nope")
    assert spec.emitted() == {"video": camera, "faces": faces}
    assert spec.consumers_of("video") == [faces]
    assert spec.consumers_of("dogs.big") == [out]
    assert spec.consumers_of("dogs") == []
    as_json = tmp_path / "faces.json"
    as_json.write_text(json.dumps(EXAMPLE))
    assert load_spec(as_json) == spec == parse_spec(EXAMPLE)


def test_round_trip_through_json() -> None:
    data = with_element("source", 0, params={"fps": 10, "size": [640, 480], "opts": {"hd": True, "gain": 0.5, "tag": None}})
    data["source"].append({"name": "ext", "topic": "radar"})
    data["stage"][0]["replicas"] = 3
    data["stage"][0]["consumes"] = "video"
    spec = parse_spec(data)
    stored = json.loads(json.dumps(spec.to_dict()))
    assert parse_spec(stored) == spec
    assert parse_spec(spec.to_dict()) == spec
    minimal = parse_spec({"name": "n", "sink": [{"name": "s", "capability": "print", "consumes": ">"}]})
    assert parse_spec(minimal.to_dict()) == minimal


def test_spec_does_not_alias_its_input() -> None:
    data = copy.deepcopy(EXAMPLE)
    spec = parse_spec(data)
    data["source"][0]["params"]["fps"] = 99
    spec.to_dict()["source"][0]["params"]["fps"] = 98
    assert spec.element("camera").params == {"fps": 10}


def test_external_source() -> None:
    spec = parse_spec(doc(source=[{"name": "cam", "topic": "video"}]))
    cam = spec.element("cam")
    assert cam.external and cam.capability is None and cam.emits == "video" and cam.consumes == ()
    assert spec.emitted()["video"] is cam


def test_single_string_consumes_and_defaults() -> None:
    spec = parse_spec(with_element("sink", 0, consumes="faces"))
    assert spec.element("out").consumes == ("faces",)
    assert spec.element("out").replicas == 1 and spec.element("out").agent is None


@pytest.mark.parametrize(
    ("data", "field", "phrase"),
    [
        ([1], "spec", "must be a table"),
        (doc(colour="red"), "colour", "unknown key"),
        (doc(name=None), "name", "is required"),
        (doc(name="a b"), "name", "letters, digits"),
        (doc(name=7), "name", "letters, digits"),
        ({"name": "empty"}, "spec", "no elements"),
        (doc(stage={"name": "x"}), "stage", "array of tables"),
        (doc(sink=["x"]), "sink[0]", "must be a table"),
        (with_element("stage", 0, colour="red"), "stage[0].colour", "unknown key"),
        (with_element("sink", 0, emits="x"), "sink[0].emits", "a sink emits nothing"),
        (with_element("source", 0, consumes=["x"]), "source[0].consumes", "a source consumes nothing"),
        (with_element("stage", 0, name="camera"), "stage[0].name", "duplicate element name 'camera' (also source[0])"),
        (with_element("stage", 0, name=None), "stage[0].name", "is required"),
        (with_element("stage", 0, name="fa ces"), "stage[0].name", "letters, digits"),
        (with_element("source", 0, emits="video.*"), "source[0].emits", "wildcard"),
        (with_element("source", 0, emits="a..b"), "source[0].emits", "empty token"),
        (with_element("source", 0, emits=None), "source[0].emits", "is required"),
        (with_element("stage", 0, consumes=["video", "v*"]), "stage[0].consumes[1]", "whole tokens"),
        (with_element("stage", 0, consumes=[]), "stage[0].consumes", "non-empty list"),
        (with_element("stage", 0, consumes=None), "stage[0].consumes", "is required"),
        (with_element("stage", 0, consumes=[3]), "stage[0].consumes[0]", "must be a string"),
        (with_element("stage", 0, emits=None), "stage[0].emits", "is required"),
        (with_element("stage", 0, capability=None), "stage[0].capability", "is required"),
        (with_element("stage", 0, capability=""), "stage[0].capability", "non-empty string"),
        (with_element("stage", 0, agent=5), "stage[0].agent", "non-empty string"),
        (with_element("source", 0, topic="video"), "source[0]", "both capability and topic"),
        (with_element("source", 0, capability=None), "source[0]", "needs a capability"),
        (doc(source=[{"name": "c", "topic": "video", "emits": "video"}]), "source[0].emits", "external source"),
        (doc(source=[{"name": "c", "topic": "video", "params": {}}]), "source[0].params", "external source"),
        (doc(source=[{"name": "c", "topic": "video.*"}]), "source[0].topic", "wildcard"),
        (with_element("stage", 0, replicas=0), "stage[0].replicas", ">= 1"),
        (with_element("stage", 0, replicas=True), "stage[0].replicas", ">= 1"),
        (with_element("stage", 0, replicas="2"), "stage[0].replicas", ">= 1"),
        (with_element("stage", 0, replicas=2, share="random"), "stage[0].share", "round_robin, key, all"),
        (with_element("source", 0, share="key"), "source[0].share", "unknown key"),
        (with_element("stage", 0, emits="video"), "stage[0].emits", "already emitted by source[0] (camera)"),
        (doc(source=[{"name": "c", "capability": "camera", "emits": "v"}, {"name": "d", "topic": "v"}]), "source[1].topic", "already emitted"),
        (with_element("source", 0, params=[1]), "source[0].params", "must be a table"),
        (with_element("stage", 0, params={"slow_consumer": "never"}), "stage[0].params.slow_consumer", "drop-newest, drop-oldest"),
        (with_element("source", 0, params={"when": object()}), "source[0].params.when", "cannot be stored as JSON"),
        (with_element("source", 0, params={"a": {1: 2}}), "source[0].params.a", "not a string"),
        (doc(policy=[{"agent": "x", "action": "maybe", "consume": ["v"]}]), "policy[0].action", "'allow' or 'deny'"),
        (doc(policy={"agent": "x"}), "policy", "array of tables"),
    ],
)
def test_parse_spec_errors(data: Any, field: str, phrase: str) -> None:
    error = spec_error(data)
    assert error.field == field
    assert phrase in error.why


def test_toml_datetime_params_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(EXAMPLE_TOML.replace("params = { fps = 10 }", "params = { since = 2024-01-01T00:00:00Z }"))
    with pytest.raises(SpecError, match="cannot be stored as JSON") as info:
        load_spec(path)
    assert info.value.field == "source[0].params.since"


def test_load_spec_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"cannot read {missing}"):
        load_spec(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [\n")
    with pytest.raises(ConfigError, match=f"{bad} is not valid TOML"):
        load_spec(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text('name = "x"\n')
    with pytest.raises(SpecError, match=f"{empty}: has no elements"):
        load_spec(empty)


# --------------------------------------------------------------------------- check_spec

def check(spec: PipelineSpec, **overrides: Any) -> None:
    kwargs: dict[str, Any] = {"capabilities": CAPS, "external_topics": {"dogs.big"}, "agents": {"detector-1"}}
    kwargs.update(overrides)
    check_spec(spec, **kwargs)


def check_error(spec: PipelineSpec, **overrides: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        check(spec, **overrides)
    return info.value


def test_example_spec_checks() -> None:
    check(parse_spec(EXAMPLE))


def test_unknown_capability() -> None:
    data = doc(stage=[EXAMPLE["stage"][0], {"name": "dogs", "capability": "detect_dogs", "consumes": "video", "emits": "dogs.all"}])
    error = check_error(parse_spec(data))
    assert error.field == "stage[1].capability"
    assert str(error) == "stage[1].capability: no registered data agent offers 'detect_dogs'"


def test_unknown_pinned_agent() -> None:
    error = check_error(parse_spec(with_element("stage", 0, agent="detector-9")))
    assert error.field == "stage[0].agent" and "'detector-9'" in error.why


def test_external_topic_without_producer() -> None:
    spec = parse_spec(doc(source=[{"name": "cam", "topic": "video"}]))
    error = check_error(spec)
    assert error.field == "source[0].topic" and "no registered data agent produces 'video'" in error.why
    check(spec, external_topics={"video", "dogs.big"})


def test_topic_without_producer() -> None:
    error = check_error(parse_spec(EXAMPLE), external_topics=())
    assert str(error) == "sink[0].consumes: no producer for 'dogs.>'"
    error = check_error(parse_spec(with_element("stage", 0, consumes=["video", "audio"])))
    assert str(error) == "stage[0].consumes: no producer for 'audio'"


def test_cycle() -> None:
    data = doc(
        stage=[
            {"name": "faces", "capability": "detect_faces", "consumes": ["video", "ages"], "emits": "faces"},
            {"name": "ages", "capability": "detect_ages", "consumes": "faces", "emits": "ages"},
        ]
    )
    error = check_error(parse_spec(data))
    assert str(error) == "pipeline: cycle faces -> ages -> faces"
    self_loop = doc(
        stage=[{"name": "echo", "capability": "detect_faces", "consumes": ["video", "echo.>"], "emits": "echo.x"}],
        sink=[{"name": "out", "capability": "print", "consumes": "echo.>"}],
    )
    assert str(check_error(parse_spec(self_loop))) == "pipeline: cycle echo -> echo"


def test_diamond_is_not_a_cycle() -> None:
    data = doc(
        stage=[
            {"name": "faces", "capability": "detect_faces", "consumes": "video", "emits": "faces"},
            {"name": "ages", "capability": "detect_ages", "consumes": "video", "emits": "ages"},
        ],
        sink=[{"name": "out", "capability": "print", "consumes": ["faces", "ages"]}],
    )
    check(parse_spec(data))


OFFERING = {"camera": ["camera-1"], "detect_faces": ["detector-1", "spy-faces"], "print": ["printer", "spy-print"]}


def test_policy_refuses_every_agent() -> None:
    spec = parse_spec(doc(policy=None, stage=[{"name": "faces", "capability": "detect_faces", "consumes": ["video"], "emits": "faces"}]))
    policy = Policy([Rule("spy*", "deny", consume=("video",)), Rule("detector-*", "deny", publish=("faces",))])
    error = check_error(spec, access_policy=policy, agents_with=OFFERING.__getitem__)
    assert error.field == "stage[0]"
    assert error.why.startswith("policy refuses every agent offering 'detect_faces': ")
    assert "'detector-1' may not publish 'faces' (rule 1 (deny publish 'faces' for 'detector-*'))" in error.why
    assert "'spy-faces' may not consume 'video' (rule 0 (deny consume 'video' for 'spy*'))" in error.why
    # One allowed agent is enough; without agents_with the policy is not checked.
    check(spec, access_policy=Policy([Rule("spy*", "deny", consume=("video",))]), agents_with=OFFERING.__getitem__)
    check(spec, access_policy=policy)


def test_policy_checks_topics_matched_by_wildcards() -> None:
    policy = Policy([Rule("printer", "allow", consume=("faces",)), Rule("*", "deny", consume=("dogs.>",))])
    error = check_error(parse_spec(doc(policy=None)), access_policy=policy, agents_with=OFFERING.__getitem__)
    assert error.field == "sink[0]" and "'spy-print' may not consume 'dogs.big'" in error.why
    # Only topics actually provided count: nothing produces dogs.small.
    narrow = Policy([Rule("printer", "allow", consume=("faces",)), Rule("*", "deny", consume=("dogs.small",))])
    check(parse_spec(doc(policy=None)), access_policy=narrow, agents_with=OFFERING.__getitem__)


def test_policy_refuses_pinned_agent_and_applies_spec_rules() -> None:
    spec = parse_spec(doc(policy=[{"agent": "detector-*", "action": "deny", "consume": ["video"]}]))
    error = check_error(spec, agents_with=OFFERING.__getitem__)
    assert str(error) == (
        "stage[0]: policy refuses pinned agent 'detector-1': "
        "'detector-1' may not consume 'video' (rule 0 of pipeline 'faces' (deny consume 'video' for 'detector-*'))"
    )
    # The DO's rules come first: an allow there overrides the spec's deny.
    check(spec, access_policy=Policy([Rule("detector-1", "allow", consume=(">",))]), agents_with=OFFERING.__getitem__)


def test_policy_with_no_agent_for_a_capability() -> None:
    error = check_error(parse_spec(EXAMPLE), access_policy=Policy(), agents_with=lambda capability: [])
    assert error.field == "source[0]" and "none is registered" in error.why


# --------------------------------------------------------------------------- purity

def test_patterns_and_spec_import_no_io_modules(tmp_path: Path) -> None:
    watched = ["asyncio", "socket", "sqlite3"]
    assert loaded(["patterns", "spec"], watched) == "[]"
    fake = copy_with_import(tmp_path, ["errors.py", "wire.py", "routing.py", "control.py", "patterns.py"], "spec.py", "import sqlite3\n")
    assert loaded(["patterns", "spec"], watched, fake) == "['sqlite3']"


# --------------------------------------------------------------------------- pinned by mutation testing (docs/mutation.md)

@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1], "spec: must be a table"),
        (doc(colour="red"), "colour: unknown key; a pipeline spec takes name, source, stage, sink, policy, max_latency_ms"),
        (doc(stages=[]), "stages: unknown key (did you mean 'stage'?); a pipeline spec takes name, source, stage, sink, policy, max_latency_ms"),
        (
            doc(rule=[]),
            "rule: unknown key (did you mean 'policy'? a spec's access rules are [[policy]] tables); "
            "a pipeline spec takes name, source, stage, sink, policy, max_latency_ms",
        ),
        (
            with_element("source", 0, capabilty="camera"),
            "source[0].capabilty: unknown key (did you mean 'capability'?); a source takes name, capability, topic, emits, params, "
            "replicas, agent",
        ),
        (doc(name=None), "name: is required"),
        (doc(sink=["x"]), "sink[0]: must be a table"),
        (with_element("sink", 0, emits="x"), "sink[0].emits: a sink emits nothing; make it a [[stage]]"),
        (with_element("source", 0, consumes=["x"]), "source[0].consumes: a source consumes nothing; make it a [[stage]]"),
        (
            with_element("stage", 0, colour="red"),
            "stage[0].colour: unknown key; a stage takes name, capability, consumes, emits, params, replicas, share, agent, max_latency_ms",
        ),
        (with_element("source", 0, emits=None), "source[0].emits: is required"),
        (with_element("stage", 0, consumes=None), "stage[0].consumes: is required: list the topic patterns this element reads"),
        (with_element("stage", 0, capability=None), "stage[0].capability: is required"),
        (
            with_element("source", 0, topic="video"),
            "source[0]: has both capability and topic; give a capability to run, or the topic of an external source",
        ),
        (with_element("source", 0, capability=None), "source[0]: needs a capability to run, or the topic of an external source"),
        (doc(source=[{"name": "c", "topic": "video", "emits": "video"}]), "source[0].emits: an external source (topic) takes only name and topic"),
        (with_element("source", 0, params={"a": [1, {2, 3}]}), "source[0].params.a[1]: a value of type set cannot be stored as JSON"),
        (
            doc(sink=[{"name": "out", "capability": "print", "consumes": "faces"}] * 2),
            "sink[1].name: duplicate element name 'out' (also sink[0])",
        ),
    ],
)
def test_parse_spec_error_messages_in_full(data: Any, message: str) -> None:
    assert str(spec_error(data)) == message


def test_params_are_copied_deeply_in_and_out() -> None:
    spec = parse_spec(with_element("source", 0, params={"size": {"w": 64}, "tags": ["a", ["b"]]}))
    camera = spec.element("camera")
    assert camera.params == {"size": {"w": 64}, "tags": ["a", ["b"]]}
    written = camera.to_dict()
    written["params"]["size"]["w"] = 1
    written["params"]["tags"][1].append("c")
    assert camera.params == {"size": {"w": 64}, "tags": ["a", ["b"]]}


def test_replicas_are_kept_and_written_only_when_not_one() -> None:
    spec = parse_spec(with_element("stage", 0, replicas=3))
    assert spec.element("faces").replicas == 3
    assert spec.element("faces").to_dict()["replicas"] == 3
    assert parse_spec(spec.to_dict()) == spec
    assert "replicas" not in parse_spec(EXAMPLE).element("faces").to_dict()


def test_share_is_kept_written_only_when_not_round_robin_and_shares_only_with_replicas() -> None:
    spec = parse_spec(with_element("stage", 0, replicas=3, share="key"))
    faces = spec.element("faces")
    assert (faces.share, faces.shared, faces.to_dict()["share"]) == ("key", True, "key")
    assert parse_spec(spec.to_dict()) == spec
    assert not parse_spec(with_element("stage", 0, replicas=3, share="all")).element("faces").shared
    assert not parse_spec(with_element("stage", 0, replicas=1)).element("faces").shared
    assert "share" not in parse_spec(with_element("stage", 0, replicas=3)).element("faces").to_dict()


def test_element_lookup_names_the_missing_element() -> None:
    with pytest.raises(KeyError) as info:
        parse_spec(EXAMPLE).element("nobody")
    assert info.value.args == ("nobody",)


EXTERNAL_FIRST = doc(
    policy=None,
    source=[{"name": "cam", "topic": "video"}],
    stage=[{"name": "faces", "capability": "detect_faces", "consumes": "video", "emits": "faces"}],
    sink=[{"name": "out", "capability": "print", "consumes": "faces"}],
)


def test_elements_after_an_external_source_are_checked() -> None:
    spec = parse_spec(EXTERNAL_FIRST)
    check(spec, external_topics={"video"})
    error = check_error(spec, external_topics={"video"}, capabilities={"print"})
    assert str(error) == "stage[0].capability: no registered data agent offers 'detect_faces'"
    policy = Policy([Rule("spy*", "deny", consume=("video",))])
    error = check_error(spec, external_topics={"video"}, access_policy=policy, agents_with=lambda capability: ["spy-1"])
    assert str(error) == (
        "stage[0]: policy refuses every agent offering 'detect_faces': "
        "'spy-1' may not consume 'video' (rule 0 (deny consume 'video' for 'spy*'))"
    )


def test_policy_refusals_are_listed_in_full() -> None:
    spec = parse_spec(doc(policy=None))
    policy = Policy([Rule("spy*", "deny", consume=("video",)), Rule("detector-*", "deny", publish=("faces",))])
    error = check_error(spec, access_policy=policy, agents_with=OFFERING.__getitem__, agents={"detector-1"})
    assert str(error) == (
        "stage[0]: policy refuses pinned agent 'detector-1': "
        "'detector-1' may not publish 'faces' (rule 1 (deny publish 'faces' for 'detector-*'))"
    )
    unpinned = parse_spec(with_element("stage", 0, agent=None, replicas=None))
    error = check_error(unpinned, access_policy=policy, agents_with=OFFERING.__getitem__)
    assert str(error) == (
        "stage[0]: policy refuses every agent offering 'detect_faces': "
        "'detector-1' may not publish 'faces' (rule 1 (deny publish 'faces' for 'detector-*')); "
        "'spy-faces' may not consume 'video' (rule 0 (deny consume 'video' for 'spy*'))"
    )
    error = check_error(spec, access_policy=Policy(), agents_with=lambda capability: [])
    assert str(error) == "source[0]: policy refuses every agent offering 'camera': none is registered"


def test_cycle_search_is_linear_in_a_dag_of_many_paths() -> None:
    """24 layers of two stages, each consuming both topics of the layer before: 2**24 paths
    through 48 stages, which a search that forgets the elements it has finished walks one by one."""
    stages = [
        {"name": f"s{layer}{side}", "capability": "detect_faces", "consumes": f"l{layer - 1}.*" if layer else "video", "emits": f"l{layer}.{side}"}
        for layer in range(24)
        for side in "ab"
    ]
    spec = parse_spec(doc(policy=None, stage=stages, sink=[{"name": "out", "capability": "print", "consumes": "l23.*"}]))
    start = time.perf_counter()
    check(spec)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("policy", ["drop-newest", "drop-oldest", "pause", "drop"])
def test_an_element_may_set_any_slow_consumer_policy_in_its_params(policy: str) -> None:
    """Pinned by the second mutation run: the policy named in the params is the one checked."""
    data = with_element("stage", 0, params={"slow_consumer": policy})
    spec = parse_spec(data)
    [stage] = [e for e in spec.elements if e.name == data["stage"][0]["name"]]
    assert stage.params == {"slow_consumer": policy}


def test_latency_budgets_per_pipeline_and_per_edge_are_checked_and_kept() -> None:
    doc = {
        "name": "p", "max_latency_ms": 40,
        "source": [{"name": "s", "capability": "c", "emits": "t"}],
        "sink": [{"name": "k", "capability": "c", "consumes": ["t"], "max_latency_ms": 2.5}],
    }
    spec = parse_spec(doc)
    assert (spec.max_latency_ms, spec.element("k").max_latency_ms, spec.element("s").max_latency_ms) == (40.0, 2.5, None)
    assert parse_spec(spec.to_dict()) == spec
    for bad in (0, -1, True, "5", float("nan"), float("inf"), 3_600_001):
        with pytest.raises(SpecError, match=r"^sink\[0\]\.max_latency_ms"):
            parse_spec({**doc, "sink": [{**doc["sink"][0], "max_latency_ms": bad}]})
        with pytest.raises(SpecError, match=r"^max_latency_ms"):
            parse_spec({**doc, "max_latency_ms": bad})
    with pytest.raises(SpecError, match=r"^source\[0\]\.max_latency_ms"):  # a source has no edge into it
        parse_spec({**doc, "source": [{**doc["source"][0], "max_latency_ms": 5}]})
