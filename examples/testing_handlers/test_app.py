"""Unit tests of ``app.py``'s handlers, in memory: ``pytest examples/testing_handlers``.

``InMemoryWorker`` runs the app as a worker would (one job per key at a time, in order,
retries, dead letters, parking), without a broker and without sleeping out retry backoffs.
"""

from __future__ import annotations

from rabbitkeys import Context, PayloadError
from rabbitkeys.testing import InMemoryWorker, JobState, run_jobs

from .app import Charge, DeclinedError, app


class FakeBank:
    def __init__(self) -> None:
        self.charged: list[tuple[str, str]] = []
        self.declining: set[str] = set()

    async def charge(self, customer: str, order: str, cents: int) -> str:
        if order in self.declining:
            raise DeclinedError(f"order {order} declined")
        self.charged.append((customer, order))
        return f"receipt {order}"


def worker_with(bank: FakeBank) -> InMemoryWorker:
    # run_hooks=False: the fake bank instead of the startup hook's real client
    return InMemoryWorker(app, context=Context(bank=bank, receipts=[]), run_hooks=False)


async def test_charges_run_in_order_per_customer() -> None:
    bank = FakeBank()
    async with worker_with(bank) as worker:
        for n in range(3):
            for customer in ["customer 1", "customer 2"]:
                await worker.publish(
                    customer, Charge(order=f"{customer}/{n}", cents=100), job_type="charges"
                )
        await worker.join()  # raises JobsFailedError if a job was dead-lettered or parked

    for customer in ["customer 1", "customer 2"]:
        orders = [order for who, order in bank.charged if who == customer]
        assert orders == [f"{customer}/{n}" for n in range(3)]
    assert worker.handled[0].result.startswith("receipt ")


async def test_a_declined_charge_parks_its_customer_until_resumed() -> None:
    bank = FakeBank()
    bank.declining.add("o1")
    async with worker_with(bank) as worker:
        for order in ["o1", "o2"]:
            await worker.publish("customer 7", Charge(order=order, cents=5), job_type="charges")
        await worker.publish("customer 8", Charge(order="o3", cents=5), job_type="charges")
        await worker.join(check=False)  # failures are what this test is about

        (parked,) = worker.parked
        assert parked.key == "customer 7" and isinstance(parked.error, DeclinedError)
        assert parked.attempts == worker.settings.max_retries + 1 == 4  # the defaults
        assert len(parked.backoffs) == 3  # recorded, not slept
        assert [job.state for job in worker.of("customer 7", "charges")] == [
            JobState.PARKED,
            JobState.WAITING,
        ]
        assert bank.charged == [("customer 8", "o3")]  # other customers go on

        bank.declining.clear()  # the operator fixed the card, then: rabbitkeys resume
        await worker.resume("customer 7", job_type="charges")
        await worker.join()

    assert bank.charged[1:] == [("customer 7", "o1"), ("customer 7", "o2")]


async def test_skipping_a_parked_charge_dead_letters_it_and_the_customer_goes_on() -> None:
    bank = FakeBank()
    bank.declining.add("o1")
    async with worker_with(bank) as worker:
        for order in ["o1", "o2"]:
            await worker.publish("customer 7", Charge(order=order, cents=5), job_type="charges")
        await worker.join(check=False)
        await worker.skip("customer 7", job_type="charges")  # rabbitkeys skip
        await worker.join()

    assert [job.payload.order for job in worker.dead_letters] == ["o1"]
    assert bank.charged == [("customer 7", "o2")]


async def test_a_body_that_is_not_a_charge_parks_its_key_at_once() -> None:
    async with worker_with(FakeBank()) as worker:
        job = await worker.publish("customer 7", {"order": "o1"}, job_type="charges")
        await worker.join(check=False)
    # no retry can change a body: parked after one attempt, for an operator to skip
    assert worker.parked == [job] and job.attempts == 1
    assert isinstance(job.error, PayloadError) and "cents: Field required" in str(job.error)


def test_receipts_from_a_plain_test() -> None:
    # run_jobs: no event loop of your own; the startup hook runs (it makes the receipts list)
    worker = run_jobs(app, [("customer 7", Charge(order="o1", cents=5))], job_type="receipts")
    assert worker.context.receipts == [("customer 7", "o1")]
