"""``rabbitkeys chaos --cluster``: the outage of a cluster node while keyed traffic flows.

Pure tests of the outage figures and of the judge's rule for copies across a node kill, then
one small run per key queue type on the session's three-node cluster: nothing lost or
reordered, every copy explained; quorum keys of the killed node flow while it is down,
classic ones wait for its return.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rabbitkeys import Settings
from rabbitkeys._errors import RabbitkeysError
from rabbitkeys.cli import EXIT_USAGE, main
from rabbitkeys.tools.chaos import ChaosReport, _judge, _node_outage, _Timeline, run_chaos
from rabbitkeys.tools.node_outage import group_figures, resumed_after, spread, worst_wait
from rabbitkeys.tools.rabbit_cluster import RabbitCluster

from ..conftest import ClusterUnderTest
from ..support import make_settings

NODE_A, NODE_B = "rk1-x@localhost", "rk2-x@localhost"


def record(key: str, seq: int, started: float, redelivered: bool = False) -> dict[str, Any]:
    return {"key": key, "publisher": "p", "seq": seq, "started": started, "pid": 7,
            "finished": started + 0.1, "redelivered": redelivered, "body": str(seq)}  # fmt: skip


def test_worst_wait_counts_waits_that_begin_during_the_outage() -> None:
    # down at 10, back at 20: handled at 9, 11, 12 then only at 25 (waited from 12 to 25)
    assert worst_wait([9, 11, 12, 25, 26], 10, 20) == 13
    # flowing every second through the outage
    assert worst_wait([9, *range(10, 22)], 10, 20) == 1
    # nothing after the kill: the key's traffic had ended
    assert worst_wait([5, 9], 10, 20) is None
    # a wait that began after the return is not the outage's
    assert worst_wait([19, 30], 10, 20) == 11
    assert worst_wait([21, 30], 10, 20) == 11  # from the kill to the first handling


def test_group_figures_and_resumption() -> None:
    by_key = {"a": [record("a", 1, 9), record("a", 2, 24)], "b": [record("b", 1, 15)]}
    figures = group_figures(by_key, ["a", "b"], 10, 20)
    assert (figures.keys, figures.handled, figures.worst_gap) == (2, 1, 14)
    assert resumed_after(by_key, ["a", "b"], 20) == 4  # b had nothing after the return
    assert resumed_after(by_key, ["b"], 20) is None
    assert spread({"q1": NODE_A, "q2": NODE_A}, [NODE_A, NODE_B]) == {NODE_A: 2, NODE_B: 0}


def outage_timeline(sent: int = 4, **marks: float) -> _Timeline:
    return _Timeline(
        sent=sent,
        names=["a", "b"],
        marks=dict(marks),
        killed_node=NODE_A,
        key_nodes={"a": NODE_A, "b": NODE_B},
        cluster_nodes=[NODE_A, NODE_B],
        queue_type="classic",
    )


def test_a_classic_key_waiting_for_its_node_is_reported_as_not_flowing() -> None:
    records = [record("a", 1, 9), record("a", 2, 24), record("b", 1, 9), record("b", 2, 11)]
    timeline = outage_timeline(node_kill=10, node_back=20)
    report = _judge(ChaosReport(), records, timeline)
    outage = _node_outage(report, records, timeline)
    assert outage is not None
    assert outage.outage == 10
    assert outage.queues_per_node == {NODE_A: 1, NODE_B: 1}
    assert (outage.killed_node_keys.handled, outage.killed_node_keys.worst_gap) == (0, 14)
    assert (outage.other_keys.handled, outage.other_keys.worst_gap) == (1, 1)
    assert outage.resumed_after_return == 4
    assert not outage.flowed_during_outage
    assert "flowed during the outage: no" in "\n".join(outage.format())


def test_a_key_handled_throughout_the_outage_flowed() -> None:
    records = [record("a", n, 9 + n) for n in range(1, 14)] + [record("b", 1, 9)]
    timeline = outage_timeline(node_kill=10, node_back=20)
    outage = _node_outage(_judge(ChaosReport(), records, timeline), records, timeline)
    assert outage is not None and outage.flowed_during_outage
    assert outage.killed_node_keys.worst_gap == 1


def test_no_outage_figures_without_a_node_kill() -> None:
    timeline = outage_timeline(node_kill=10)  # the run failed before the node was back
    assert _node_outage(ChaosReport(), [], timeline) is None


def test_a_copy_across_the_node_kill_is_explained_and_one_before_it_is_not() -> None:
    # a resend after a lost connection: not a redelivery, yet explained by the kill
    records = [record("a", 1, 9), record("a", 1, 12), record("a", 2, 13)]
    report = _judge(ChaosReport(), records, outage_timeline(2, node_kill=10, node_back=20))
    assert (report.duplicates, report.unexplained_duplicates) == (1, 0) and report.ok
    records = [record("a", 1, 5), record("a", 1, 6), record("a", 2, 7)]
    report = _judge(ChaosReport(), records, outage_timeline(2, node_kill=10, node_back=20))
    assert report.unexplained_duplicates == 1 and not report.ok


async def test_a_broker_restart_in_a_cluster_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RabbitkeysError, match="broker-restart"):
        await run_chaos(Settings(), broker_restart=True, rabbit=RabbitCluster(tmp_path))


def test_the_cli_refuses_broker_restart_with_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--cluster", "--broker-restart"]) == EXIT_USAGE
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_node_kill_loses_and_reorders_nothing(
    cluster: ClusterUnderTest, queue_type: str
) -> None:
    # The killed node may hold the registry's classic queue: publishers must wait for the
    # registry as long as a user's would (ensure_timeout's default, not the tests' 10 s).
    settings = make_settings(
        "amqp://guest:guest@localhost/", "t-chaos", queue_type=queue_type, ensure_timeout=30.0
    )
    # 6 keys x 30: publishing lasts ~34 s, as the outage (~15 s) and as long again need
    report = await run_chaos(
        settings, keys=6, messages=30, workers=2, rabbit=cluster.cluster, node_down=3.0
    )
    print(report.format())
    assert report.sent == 180
    assert report.lost == 0
    assert report.order_violations == 0
    assert report.unexplained_duplicates == 0
    assert report.overlaps == 0
    assert report.ok
    outage = report.node_outage
    assert outage is not None
    assert sum(outage.queues_per_node.values()) == 6
    assert outage.killed_node_keys.keys >= 2  # the busiest of 3 nodes holds 2 of 6 or more
    if queue_type == "quorum":
        # replicated: a new leader on a live node, and the keys go on while the node is
        # down. Not every key at once: a worker connected to the killed node holds its keys
        # until it has reconnected and the registry moved them (5.5 s seen, in a vhost
        # without the event exchange), and one run saw one key wait 60 s (not understood
        # yet: the closing note of issue 16); so, at least a message per key of the node
        killed = outage.killed_node_keys
        assert killed.worst_gap is not None
        assert killed.handled >= killed.keys
    else:
        # one node holds each classic queue: its keys wait for it, the others go on
        assert not outage.flowed_during_outage
        assert outage.resumed_after_return is not None
    # the run deleted its vhost: nothing of it is left on the cluster
    vhosts = {v["name"] for v in cluster.cluster.api("vhosts?columns=name")}
    assert not any(name.startswith("t-chaos-chaos-") for name in vhosts)
