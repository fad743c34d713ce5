"""The chaos checker's reading of worker logs into executions (tests/chaos/executions.py)."""

from tests.chaos.executions import executions

A, B = "7470164f-aed2-4116-8fa9-30693f9cbb0a", "a4327067-9b28-4178-bbc9-80525d5f4c9b"
C = "b44fd9aa-ddf9-4444-88f0-63b3923812a3"


def test_each_kind_of_end_closes_its_execution(tmp_path):
    """The long campaign of 2026-12-07 counted a cancelled job's 'Discarding revoked task' as running until the
    worker died, a 12.1 s overlap that never ran."""
    log = tmp_path / "w2.log"
    log.write_text(
        f"10.0 [x: INFO/MainProcess] Task kiq.generate[{A}] received\n"
        f"10.1 [x: INFO/MainProcess] Discarding revoked task: kiq.generate[{A}]\n"
        f"11.0 [x: INFO/MainProcess] Task kiq.generate[{B}] received\n"
        f"12.5 [x: WARNING/MainProcess] let go of job {B} kept across a reconnect at 12.5: its leases lapsed\n"
        f"13.0 [x: INFO/MainProcess] Task kiq.generate[{C}] received\n"
        f"15.0 [x: INFO/MainProcess] Task kiq.generate[{C}] succeeded in 2.0s: {{}}\n"
    )
    runs = {(r["job"], r["start"], r["end"], r["outcome"]) for r in executions("w2", log)}
    assert runs == {(A, 10.0, 10.1, "discarded"), (B, 11.0, 12.5, "let-go"), (C, 13.0, 15.0, "succeeded")}


def test_a_worker_stopped_by_the_pause_nemesis_runs_nothing_meanwhile():
    """The long campaign of 2026-12-07: w2 was SIGSTOPped holding a job that w1 then ran to the end; w2 stopped as
    stale 1 s after SIGCONT. Counted wall to wall that was a 2.7 s overlap; no step of the two ran together."""
    from tests.chaos.checker import overlap_spans

    w2 = {"worker": "w2", "incarnation": 6, "start": 18.9, "end": 59.1}
    w1 = {"worker": "w1", "incarnation": 1, "start": 50.5, "end": 53.3}
    assert [round(s, 1) for s in overlap_spans([w2, w1])] == [2.8]
    assert overlap_spans([w2, w1], {"w2": [(40.4, 58.1)]}) == []
    assert [round(s, 1) for s in overlap_spans([w2, w1], {"w2": [(40.4, 52.0)]})] == [1.3]  # resumed during w1's run
