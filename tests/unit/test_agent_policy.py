"""Network policy in the agent's pure state: hand-made messages, a fake clock, no kernel.

The promises checked here are about order: a workload's rules are handed to the kernel
writer before its route (and the route is guarded by them), a DEL takes the route away
before the rules, nothing is applied from half a view of etcd, and failures and drift
lead to a whole-table replacement."""

from __future__ import annotations

from concurrent.futures import Future

from fabric.agent import messages as m
from fabric.model.nodes import Workload
from fabric.policy.compiler import PolicyReport
from fabric.store import keys
from tests.unit.test_agent_state import Fabric as RoutesFabric


class Fabric(RoutesFabric):
    """Also a fake nftables: each ApplyPolicy is applied and reported in job order,
    unless `hold` keeps the reports back (an apply still in flight)."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[m.ApplyPolicy] = []
        self.table = None
        super().__init__()

    def _run(self, jobs):
        jobs = super()._run(jobs)
        for job in jobs:
            if isinstance(job, m.ApplyPolicy):
                if job.reply is not None:
                    job.reply.set_result(PolicyReport(True))
                if job.rules is not None:
                    self.held.append(job)
        if not self.hold:
            self.release()
        return jobs

    def release(self) -> None:
        while self.held:
            job = self.held.pop(0)
            self.table = job.rules
            self.jobs += self.state.handle(m.PolicyDone(PolicyReport(
                True, full=True, changes=1, digest=job.rules.digest())))
            self._run([])

DENY_X = {"manifest": {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": "deny", "namespace": "x"},
                       "spec": {"podSelector": {}}}}


def ready(fab: Fabric, policies: dict | None = None) -> None:
    fab.snapshot("namespaces", {})
    fab.snapshot("policies", policies if policies is not None else
                 {keys.policy("x", "deny"): DENY_X})


def policy_jobs(jobs):
    return [j for j in jobs if isinstance(j, m.ApplyPolicy | m.CheckPolicy)]


def attach(fab: Fabric, handle="c1.eth0", ip="10.244.0.5", namespace="x",
           labels=(("pod", "a"),)) -> tuple[list[m.Job], Future, Future]:
    reply: Future = Future()
    policy: Future = Future()
    jobs = fab.send(m.Attach(handle, (ip,), "l3f000000000001", 7, reply, namespace, labels,
                             "a", policy))
    return jobs, reply, policy


def isolated(rules) -> frozenset[str]:
    return next(s.elements for s in rules.sets if s.name == "iso_ingress_4")


def test_nothing_is_applied_before_the_view_of_etcd_is_complete():
    fab = Fabric()  # every mirror but policies and namespaces has reported
    assert not fab.state.ready
    jobs, _, policy = attach(fab)
    first = jobs[0]
    assert isinstance(first, m.ApplyPolicy) and first.rules is None  # reply in order only
    assert first.reply is policy
    assert policy_jobs(fab.jobs) == [first]
    ready(fab)
    applied = [j for j in fab.jobs if isinstance(j, m.ApplyPolicy) and j.rules is not None]
    assert len(applied) == 1 and isolated(applied[0].rules) == {"10.244.0.5"}


def test_an_add_gets_its_rules_before_its_route_and_the_route_is_guarded():
    fab = Fabric()
    ready(fab)
    fab.jobs.clear()
    jobs, reply, policy = attach(fab)
    kinds = [type(j).__name__ for j in jobs]
    assert kinds.index("ApplyPolicy") < kinds.index("ApplyRoutes")
    rules_job = next(j for j in jobs if isinstance(j, m.ApplyPolicy))
    routes_job = next(j for j in jobs if isinstance(j, m.ApplyRoutes))
    assert isolated(rules_job.rules) == {"10.244.0.5"}
    assert rules_job.reply is policy and routes_job.guard is policy
    assert routes_job.reply is reply


def test_an_add_that_changes_no_rule_still_replies_in_order():
    fab = Fabric()
    ready(fab, policies={})
    jobs, _, policy = attach(fab, namespace="y")
    first = jobs[0]
    assert isinstance(first, m.ApplyPolicy) and first.reply is policy
    assert isolated(fab.state.policy.sent) == frozenset()


def test_a_del_takes_the_route_away_before_the_rules():
    fab = Fabric()
    ready(fab)
    attach(fab)
    fab.jobs.clear()
    jobs = fab.send(m.Detach("c1.eth0", ("10.244.0.5",), "l3f000000000001", Future()))
    kinds = [type(j).__name__ for j in jobs]
    assert kinds == ["ApplyRoutes", "ApplyPolicy"]
    assert isolated(jobs[1].rules) == frozenset()


def test_labels_from_etcd_win_and_change_set_elements_only():
    fab = Fabric()
    ready(fab, policies={keys.policy("x", "deny"): {"manifest": {
        **DENY_X["manifest"], "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}}}})
    attach(fab)
    before = fab.state.policy.sent
    assert isolated(before) == {"10.244.0.5"}
    record = Workload("c1.eth0", "a", "c1", "eth0", "/n", ("10.244.0.5",), "a",
                      "l3f000000000001", network="lab", namespace="x", labels={"pod": "b"})
    fab.jobs.clear()
    fab.snapshot("workloads", {keys.workload("a", "c1.eth0"): record.to_record()})
    after = fab.state.policy.sent
    assert isolated(after) == frozenset()
    assert after.structure() == before.structure()
    assert len(policy_jobs(fab.jobs)) == 1


def test_a_record_that_does_not_parse_is_reported_and_the_rest_enforced():
    fab = Fabric()
    ready(fab, policies={keys.policy("x", "deny"): DENY_X,
                         keys.policy("x", "bad"): {"manifest": {"kind": "Nope"}}})
    attach(fab)
    status = fab.state.status()["policy"]
    assert status["policies"] == 2  # x/deny, and x/bad enforced fail-closed: deny-all in x
    assert list(status["refused"]) == [keys.policy("x", "bad")]
    assert isolated(fab.state.policy.sent) == {"10.244.0.5"}
    egress = next(s for s in fab.state.policy.sent.sets if s.name == "iso_egress_4")
    assert egress.elements == {"10.244.0.5"}  # x/deny was ingress only: this is x/bad
    assert any(keys.policy("x", "bad") in line and "deny-all" in line
               for line in fab.state.degraded())


def test_changes_from_etcd_coalesce_while_an_apply_is_in_flight_but_an_add_never_waits():
    fab = Fabric()
    ready(fab)
    fab.hold = True
    attach(fab, "c1.eth0", "10.244.0.5")
    fab.jobs.clear()
    base = dict(DENY_X["manifest"])
    for index in range(5):  # a burst of policy changes while the first apply is held
        fab.snapshot("policies", {keys.policy("x", f"p{i}"): {"manifest": {
            **base, "metadata": {"name": f"p{i}", "namespace": "x"}}}
            for i in range(index + 1)})
    assert [j for j in fab.jobs if isinstance(j, m.ApplyPolicy)] == []
    assert fab.state.status()["policy"]["in_sync"] is False
    jobs, _, policy = attach(fab, "c2.eth0", "10.244.0.6")  # an ADD goes at once
    first = next(j for j in jobs if isinstance(j, m.ApplyPolicy))
    assert first.reply is policy and "10.244.0.6" in isolated(first.rules)
    assert fab.state.policy.policies[-1].name == "p4"
    fab.jobs.clear()
    fab.hold = False
    fab.release()  # both applies report; nothing is left to do
    assert [j for j in fab.jobs if isinstance(j, m.ApplyPolicy)] == []
    assert fab.state.status()["policy"]["in_sync"]
    assert len(fab.state.policy.sent.rules) == 0 and fab.table is fab.state.policy.sent


def test_resync_checks_the_table_and_a_failure_replaces_it_whole():
    fab = Fabric()
    ready(fab)
    attach(fab)
    fab.jobs.clear()
    fab.clock.advance(11)
    checks = [j for j in fab.tick() if isinstance(j, m.CheckPolicy)]
    assert checks and checks[0].rules is fab.state.policy.sent
    replaced = fab.state.status()["policy"]["full_replacements"]
    fab.send(m.PolicyDone(PolicyReport(False, error="ENOMEM")))
    assert fab.state.status()["policy"]["in_sync"] is False
    fab.clock.advance(11)
    retried = [j for j in fab.tick() if isinstance(j, m.ApplyPolicy)]
    assert len(retried) == 1 and retried[0].full  # the fake applies and reports it
    status = fab.state.status()["policy"]
    assert status["in_sync"] and status["failures"] == 1
    assert status["full_replacements"] == replaced + 1
    fab.send(m.PolicyDone(PolicyReport(True, full=True, drift=("set x missing",),
                                       digest=fab.state.policy.sent_digest), check=True))
    assert fab.state.status()["policy"]["repaired"] == 1
