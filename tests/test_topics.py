"""Topics as values (qwen_edge/topics.py): MQTT's syntax and matching rules, and the project's tree
built, parsed and matched in one place."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_edge.topics import (
    Address,
    FleetTopics,
    InboundTopic,
    Leaf,
    Topic,
    TopicKind,
    Topics,
    TopicTree,
    WatchedTopic,
    WatchKind,
    Wildcard,
)

TREE = TopicTree("site/llm")


@pytest.mark.parametrize(
    ("wildcard", "topic", "match"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c", True),
        ("+/+", "a/", True),  # an empty level is a level
        ("#", "$SYS/x", False),  # $ topics are not matched by a leading wildcard
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$share/g/a/+", "a/b", True),  # a shared subscription matches like its filter
        ("$share/g/a/+", "$share/g/a/b", False),
    ],
)
def test_wildcard_matching_follows_mqtt(wildcard: str, topic: str, match: bool) -> None:
    assert Wildcard(wildcard).matches(topic) is match
    assert Topic(topic).matches(wildcard) is match


@pytest.mark.parametrize("bad", ["a/b+", "a/#/b", "a#", "", "a\0b", "$share/g", "$share//a"])
def test_a_malformed_filter_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        w = Wildcard(bad)
        _ = w.filter, w.share_group


@pytest.mark.parametrize("bad", ["a/+", "a/#", "", "x" * 70_000])
def test_a_topic_to_publish_on_has_no_wildcards_and_fits(bad: str) -> None:
    with pytest.raises(ValueError):
        Topic(bad)


def test_the_share_group_and_filter_of_a_shared_subscription() -> None:
    shared = TREE.shared("pool", TREE.filter("pool", Leaf.REQUEST, "+"))
    assert shared.value == "$share/pool/site/llm/pool/request/+"
    assert (shared.share_group, shared.filter) == ("pool", "site/llm/pool/request/+")
    assert Wildcard("a/b").share_group is None


_level = st.text(st.characters(blacklist_characters="/+#\0$"), min_size=1, max_size=8)


@given(target=_level, client=_level, conversation=_level)
def test_every_topic_built_parses_back_and_matches_its_filter(
    target: str, client: str, conversation: str
) -> None:
    for leaf in Leaf:
        args = {0: (), 1: (client,), 2: (client, conversation)}[
            {Leaf.REPLY: 2, Leaf.STATUS: 0, Leaf.STATS: 0}.get(leaf, 1)
        ]
        topic = TREE.topic(target, leaf, *args)
        assert TREE.parse(topic) == Address(target, leaf, args)
        assert TREE.filter("+", leaf, *("+" for _ in args)).matches(topic)
        assert TREE.filter(target, leaf, "#").matches(topic)
        assert not TREE.filter(target + "x", leaf, "#").matches(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "site/llm",
        "site/llm/pi",
        "site/llm/pi/request",  # no client level
        "site/llm/pi/request/a/b",  # one level too many
        "site/llm/pi/unknown/a",
        "site/llm//request/a",  # empty target
        "site/llm/pi/reply/a/",  # empty conversation
        "other/pi/request/a",
    ],
)
def test_what_is_not_a_topic_of_the_tree_parses_to_none(topic: str) -> None:
    assert TREE.parse(topic) is None


def test_a_reply_topic_may_go_deeper_inside_the_clients_namespace() -> None:
    # An MQTT 5 response topic is any topic under .../reply/{client_id}/ (the client's inbox).
    address = TREE.parse("site/llm/pi/reply/dev/in/box")
    assert address == Address("pi", Leaf.REPLY, ("dev", "in/box"))


def test_building_with_the_wrong_number_of_levels_is_an_error() -> None:
    with pytest.raises(ValueError):
        TREE.topic("pi", Leaf.REPLY, "only-client")
    with pytest.raises(ValueError):
        TREE.filter("pi", Leaf.STATUS, "x")


def test_a_node_and_a_pool_are_the_same_shape_with_a_different_target() -> None:
    node, pool = Topics("site/llm", "pi"), Topics("site/llm", "pool")
    assert node.request("dev") == "site/llm/pi/request/dev"
    assert pool.request("dev") == "site/llm/pool/request/dev"
    assert node.reply("dev", "c") == TREE.topic("pi", Leaf.REPLY, "dev", "c")
    assert node.parse("site/llm/pi/cancel/dev") == InboundTopic(TopicKind.CANCEL, "dev")
    assert node.parse("site/llm/pool/cancel/dev") is None
    assert node.subscriptions == ("site/llm/pi/request/+", "site/llm/pi/cancel/+")


def test_a_fleet_member_tells_pooled_requests_claims_and_statuses_apart() -> None:
    fleet = FleetTopics.of("site/llm", "pi", "pool")
    assert fleet.parse("site/llm/pool/request/dev") == InboundTopic(
        TopicKind.REQUEST, "dev", pooled=True
    )
    assert fleet.parse("site/llm/pool/claims/n2") == WatchedTopic(WatchKind.CLAIMS, "n2")
    assert fleet.parse("site/llm/pool/reply/$probe/pi") == WatchedTopic(WatchKind.REPLY, "$probe")
    assert fleet.parse("site/llm/n2/status") == WatchedTopic(WatchKind.STATUS, "n2")
    assert fleet.parse("site/llm/n2/request/dev") is None
    for topic in (fleet.probe_request, fleet.claims("n2"), "site/llm/n2/status"):
        assert any(Wildcard(w).matches(topic) for w in fleet.subscriptions)
    with pytest.raises(ValueError):
        FleetTopics.of("site/llm", "pool", "pool")


# -- the broker's ACL is generated from the same tree ----------------------------------------------


def _allowed(acls: list[tuple[str, str]], kind: str, topic: str) -> bool:
    return any(k == kind and Wildcard(pattern).matches(topic) for k, pattern in acls)


def test_a_devices_role_covers_exactly_its_own_topics_on_every_node_and_the_pool() -> None:
    from qwen_edge.tools.brokeradmin import Names, device_role, role_acls

    roles = role_acls(Names(prefix="site/llm", group="pool"), ["dev1"])
    mine = roles[device_role("dev1")] + roles["qwen-edge-device"]
    for target in ("n1", "pool"):
        topics = Topics("site/llm", target)
        assert _allowed(mine, "publishClientSend", topics.request("dev1"))
        assert _allowed(mine, "publishClientSend", topics.cancel("dev1"))
        assert _allowed(mine, "publishClientReceive", topics.reply("dev1", "c1"))
        assert _allowed(mine, "publishClientReceive", topics.reply_namespace("dev1") + "in/box")
        assert _allowed(mine, "publishClientReceive", topics.error("dev1"))
        assert not _allowed(mine, "publishClientSend", topics.request("dev2"))
        assert not _allowed(mine, "publishClientReceive", topics.reply("dev2", "c1"))
        assert not _allowed(mine, "publishClientSend", topics.reply("dev1", "c1"))
        assert not _allowed(mine, "publishClientSend", topics.status)
    assert _allowed(mine, "publishClientReceive", Topics("site/llm", "n1").status)


def test_the_daemons_role_covers_every_subscription_and_publication_of_a_node() -> None:
    from qwen_edge.tools.brokeradmin import Names, role_acls

    daemon = role_acls(Names(prefix="site/llm", group="pool"))["qwen-edge-daemon"]
    fleet = FleetTopics.of("site/llm", "n1", "pool")
    subscribed = {pattern for kind, pattern in daemon if kind == "subscribePattern"}
    # dynsec checks a SUBSCRIBE against the filter as sent, $share head included.
    assert fleet.shared_requests in subscribed
    for wildcard in (*fleet.own.subscriptions, *fleet.subscriptions[1:]):
        assert any(Wildcard(p).matches(wildcard.replace("+", "x")) for p in subscribed), wildcard
    for topic in (
        fleet.own.reply("dev1", "c"),
        fleet.own.error("dev1"),
        fleet.own.status,
        fleet.own.stats,
        fleet.pool.reply("dev1", "c"),
        fleet.claims("n1"),
        fleet.probe_request,
    ):
        assert _allowed(daemon, "publishClientSend", topic), topic
    assert not _allowed(daemon, "publishClientSend", fleet.own.request("dev1"))
