"""Podman version parsing/comparison, the Quadlet key table, and the unit
file reader/writer (quoting, escaping, parse errors)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.launch.podman_versions import (
    CONTAINER_KEYS,
    PodmanVersion,
    container_key_supported,
    unsupported_keys,
)
from nodeagent.launch.units import (
    UnitFile,
    UnitParseError,
    escape_value,
    parse_unit,
    quote_words,
    split_words,
    unescape_value,
)


@pytest.mark.parametrize("text, expected", [
    ("4.3.1", (4, 3, 1)), ("v5.0", (5, 0, 0)), ("5.0.0-rc2", (5, 0, 0)), ("podman version 4.9.3", (4, 9, 3)),
    (" 5.5.2 ", (5, 5, 2)), ("4.3.1+ds1", (4, 3, 1)),
])
def test_parse(text, expected):
    assert PodmanVersion.parse(text).as_tuple() == expected


@pytest.mark.parametrize("text", ["", "five", "5", "5.x", "4.3.1.2.3 extra"])
def test_parse_rejects_with_the_text(text):
    with pytest.raises(ValueError, match="not a Podman version"):
        PodmanVersion.parse(text)


def test_ordering():
    assert PodmanVersion.parse("4.10") > PodmanVersion.parse("4.9.3")  # numeric, not lexical
    assert PodmanVersion.parse("5.0.0-rc1") == PodmanVersion.parse("5.0")
    assert sorted(map(PodmanVersion.parse, ["5.5", "4.4", "5.0", "4.6"])) == list(
        map(PodmanVersion.parse, ["4.4", "4.6", "5.0", "5.5"]))
    assert PodmanVersion.parse("4.7").at_least(4, 7) and not PodmanVersion.parse("4.6.9").at_least(4, 7)


def test_key_gates():
    v44, v46, v50, v51 = (PodmanVersion.parse(v) for v in ("4.4", "4.6", "5.0", "5.1"))
    assert container_key_supported("AddDevice", v44)
    assert not container_key_supported("HealthCmd", v44) and container_key_supported("HealthCmd", v46)
    assert container_key_supported("Notify", v46, "true") and not container_key_supported("Notify", v46, "healthy")
    assert container_key_supported("Notify", v50, "healthy")
    assert not container_key_supported("GroupAdd", v50) and container_key_supported("GroupAdd", v51)
    assert not container_key_supported("Gpus", v51)  # no such key: GPUs go through AddDevice/PodmanArgs
    assert "Ipc" not in CONTAINER_KEYS


def test_unsupported_keys_lists_every_problem():
    sections = [
        ("Container", [("Image", "x"), ("HealthCmd", "true"), ("Notify", "healthy"), ("Gpus", "all")]),
        ("Service", [("User", "nobody"), ("Type", "simple")]),
        ("Install", [("WantedBy", "default.target"), ("Also", "x.service")]),
        ("Pod", [("PodName", "p")]),
    ]
    problems = unsupported_keys(sections, PodmanVersion.parse("4.4"))
    assert problems == [
        "[Container] HealthCmd= needs Podman >= 4.5, target is 4.4",
        "[Container] Notify=healthy needs Podman >= 5.0, target is 4.4",
        "[Container] Gpus= is not a Quadlet key known to this table",
        "[Service] User= is refused by Quadlet",
        "[Service] Type=simple: Quadlet allows only notify or oneshot",
        "[Install] Also= is ignored by Quadlet",
        "[Pod] is not a section of a .container unit",
    ]
    assert unsupported_keys([], PodmanVersion.parse("4.3.1")) == ["Podman 4.3.1 has no Quadlet (it starts at 4.4)"]


# ------------------------------------------------------------------ unit files
def test_render_and_parse_keep_order_and_repeats():
    unit = UnitFile(header=["made by a test"])
    c = unit.section("Container")
    c.add("Volume", "/a:/a:ro")
    c.add("Volume", "/b:/b")
    unit.section("Service").add("Restart", "always")
    text = unit.render()
    assert text.startswith("# made by a test\n\n[Container]\nVolume=/a:/a:ro\nVolume=/b:/b\n")
    parsed = parse_unit(text)
    assert parsed.as_pairs() == unit.as_pairs() and parsed.header == ["made by a test"]
    assert parsed.get("Service", "Restart") == "always" and parsed.get("Unit", "Description") is None


def test_parse_continuations_and_comments():
    unit = parse_unit("[Container]\n; comment\nExec=--a 1 \\\n  --b 2\n\n# c\nImage = x\n")
    assert unit.get("Container", "Exec") == "--a 1 --b 2"
    assert unit.get("Container", "Image") == "x"


@pytest.mark.parametrize("text, words", [
    ("Image=x\n", "u.container:1: 'Image' appears before any [Section]"),
    ("[Container]\nnot a pair\n", "u.container:2: expected KEY=VALUE"),
    ("[Container\n", "u.container:1: bad section header"),
    ("[Container]\nExec=a \\\n", "ends inside a continued line"),
])
def test_parse_errors_name_the_line(text, words):
    with pytest.raises(UnitParseError) as caught:
        parse_unit(text, source="u.container")
    assert words in str(caught.value)


def test_values_cannot_span_lines():
    with pytest.raises(ValueError, match="cannot span lines"):
        UnitFile().section("Container").add("Exec", "a\nb")


def test_split_words_handles_quotes_and_escapes():
    assert split_words('a "b c" \'d e\' f\\ g "h\\"i"') == ["a", "b c", "d e", "f g", 'h"i']
    with pytest.raises(UnitParseError, match="unterminated"):
        split_words('a "b')


safe_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@given(st.lists(safe_text, max_size=8))
def test_quote_then_split_is_identity(words):
    assert split_words(quote_words(words)) == words


@given(safe_text)
def test_escape_then_unescape_is_identity(value):
    assert unescape_value(escape_value(value)) == value
    escaped = escape_value(value)
    # no lone % or $ is left for systemd to expand
    assert escaped.replace("%%", "").count("%") == 0 and escaped.replace("$$", "").count("$") == 0


def test_version_from_a_probed_profile():
    from types import SimpleNamespace

    from nodeagent.contracts.machine import PodmanInfo, RuntimeInfo
    from nodeagent.launch.podman_versions import version_from_profile

    def profile(version):
        return SimpleNamespace(runtime=RuntimeInfo(podman=PodmanInfo(version=version)))

    assert version_from_profile(profile("4.3.1")) == PodmanVersion(4, 3, 1)
    assert version_from_profile(profile(None)) is None
    assert version_from_profile(profile("unknown")) is None
    assert version_from_profile(SimpleNamespace()) is None
