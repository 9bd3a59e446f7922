"""The model channel rules (neuro_dask/scheduler/versions.py): first version current, later ones candidates,
adoption only when served (and only by vote where votes decide), leases hold a retiring version
until its requests end, retired versions refused with the version to load instead."""

from __future__ import annotations

import pytest

from neuro_dask.scheduler.versions import ModelChannels, RetiredVersionError, VersionError


def channels(**kw) -> ModelChannels:
    return ModelChannels(**{"drain_seconds": 10.0, "lease_seconds": 60.0, **kw})


def test_first_version_is_current_later_ones_are_candidates():
    c = channels()
    assert c.publish("adder", "v1", 0) == ("current", [])
    assert c.publish("adder", "v1", 1) == ("current", [])  # publishing again changes nothing
    assert c.publish("adder", "v2", 2) == ("candidate", [])
    assert c.publish("adder", "v3", 3) == ("candidate", ["v2"])  # an unadopted candidate is replaced ...
    assert "v2" in c.retiring  # ... and retires
    assert c.channels["adder"].as_dict() == {
        "name": "adder",
        "current": "v1",
        "candidate": "v3",
        "approved": None,
        "history": ["v1"],
    }


def test_adoption_needs_the_served_candidate():
    c = channels()
    c.publish("adder", "v1", 0)
    c.publish("adder", "v2", 0)
    with pytest.raises(VersionError, match="not served yet"):
        c.adopt("adder", "v2", ready=False, now=1)
    with pytest.raises(VersionError, match="not the candidate"):
        c.adopt("adder", "v9", ready=True, now=1)
    with pytest.raises(VersionError, match="no channel 'other'"):
        c.adopt("other", "v2", ready=True, now=1)
    assert c.adopt("adder", "v2", ready=True, now=5) == ["v1"]
    assert c.channels["adder"].current == "v2" and c.channels["adder"].history == ["v1", "v2"]
    assert c.retiring == {"v1": 5}
    assert c.adopt("adder", "v2", ready=True, now=6) == []  # adopting the current version again: nothing


def test_a_version_belongs_to_one_channel_and_a_replaced_one_never_returns():
    c = channels()
    c.publish("a", "v1", 0)
    with pytest.raises(VersionError, match="already on channel 'a'"):
        c.publish("b", "v1", 0)
    c.publish("a", "v2", 0)
    c.adopt("a", "v2", True, 0)
    with pytest.raises(VersionError, match="replaced"):
        c.publish("a", "v1", 1)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "é", None, "a/b"])
def test_bad_channel_names_are_refused(name):
    with pytest.raises(VersionError, match="channel name"):
        channels().publish(name, "v1", 0)


def test_a_retiring_version_drains_its_leases_before_it_retires():
    c = channels()
    c.publish("adder", "v1", 0)
    assert c.begin("v1", "r1", 0) == {"channel": "adder", "current": "v1"}
    c.publish("adder", "v2", 0)
    c.adopt("adder", "v2", True, 1)
    # A request may still begin on the retiring version; it is told the current one.
    assert c.begin("v1", "r2", 2) == {"channel": "adder", "current": "v2"}
    assert c.retirable(20) == []  # two live leases
    c.end("r1")
    assert c.retirable(20) == []
    c.end("r2")
    assert c.retirable(5) == []  # drain time not yet over (since 1, 10 s)
    assert c.retirable(11) == ["v1"]
    with pytest.raises(RetiredVersionError, match="current version is v2") as info:
        c.begin("v1", "r3", 12)
    assert info.value.current == "v2"
    assert c.status(12)["retired"] == {"v1": "adder"}


def test_a_dead_clients_lease_expires():
    c = channels(lease_seconds=30)
    c.publish("adder", "v1", 0)
    c.begin("v1", "r-dead", 0)
    c.publish("adder", "v2", 0)
    c.adopt("adder", "v2", True, 0)
    assert c.retirable(29) == []
    assert c.retirable(31) == ["v1"]
    assert c.leases == {}


def test_with_votes_only_an_approved_candidate_is_adopted():
    c = channels(adoption="vote")
    c.publish("adder", "v1", 0)
    c.publish("adder", "v2", 0)
    with pytest.raises(VersionError, match="governance vote"):
        c.adopt("adder", "v2", True, 1)
    assert c.due_adoptions() == []
    c.approve("adder", "v2")
    assert c.due_adoptions() == [("adder", "v2")]
    assert c.adopt("adder", "v2", True, 2, by_vote=True) == ["v1"]
    assert c.due_adoptions() == []
    with pytest.raises(VersionError, match="neither candidate nor current"):
        c.approve("adder", "v7")


def test_a_new_candidate_cancels_an_approval_for_the_old_one():
    c = channels(adoption="vote")
    c.publish("adder", "v1", 0)
    c.publish("adder", "v2", 0)
    c.approve("adder", "v2")
    c.publish("adder", "v3", 1)
    assert c.due_adoptions() == []


def test_models_on_no_channel_take_no_lease_and_never_retire():
    c = channels()
    assert c.begin("loose", "r", 0) == {}
    assert c.leases == {}  # nothing to end: a client without a ledger makes no second round trip
    assert c.retirable(1_000) == []


@pytest.mark.parametrize("kw", [{"adoption": "anyone"}, {"lease_seconds": 0}, {"drain_seconds": -1}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(VersionError):
        channels(**kw)


def test_channels_survive_a_round_trip_through_the_state_file_format():
    import json

    c = channels(drain_seconds=10)
    for model in ("v1", "v2", "v3"):
        c.publish("adder", model, 0)  # v2 is replaced as candidate by v3: retiring
    c.adopt("adder", "v3", True, 1)  # v1 retiring too
    c.publish("other", "w1", 2)
    c.begin("v1", "r", 2)
    data = json.loads(json.dumps(c.to_dict()))
    restored = channels(drain_seconds=10)
    restored.restore(data, now=100)
    assert restored.channels["adder"].as_dict() == c.channels["adder"].as_dict()
    assert restored.retiring == {"v1": 100, "v2": 100} and restored.leases == {}
    assert restored.channel_of["w1"] == "other"
    assert restored.retirable(105) == [] and restored.retirable(111) == ["v1", "v2"]
    with pytest.raises(RetiredVersionError):
        restored.begin("v1", "r2", 112)
