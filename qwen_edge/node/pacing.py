"""A request's `format` grammar pays for itself: its grammar work may take only its share of the
decode loop's time while other requests generate.

Why: when the model's pick is refused, the grammar checks every token of the vocabulary against
every parse it keeps alive; for a wide schema that took 0.36-0.54 s a token, and since all slots
share one decode step, every other reply slowed with it (53 -> 3.6 tokens/s). Here each step's
grammar time is settled against `grammar_share` of the step's wall time; a request in debt sits
out steps (its row is left out of the batch) until it is within its share again, so the others
keep at least 1 - grammar_share of their speed. One token's grammar work past `grammar_step_ms`
ends the request (the others stalled that long once). Requests without a grammar are not
touched: the scheduler calls this only while one with a grammar holds a slot.
"""

from __future__ import annotations

from typing import Final

from .generation import Generation
from .kvstore import Slot

# Grammar time a request may bank while its grammar costs less than its share (seconds): an
# occasional refused token of an ordinary schema does not make it sit out.
CREDIT: Final = 0.05


class GrammarPacer:
    def __init__(self, share: float, step_max: float) -> None:
        self.share = share  # of the loop's time
        self.step_max = step_max  # seconds of one token's grammar work
        self.graded = 0  # slots whose request has a grammar

    def pace(self, active: list[Slot]) -> list[Slot]:
        """The slots to step: those within their share (a request in debt sits out). If that
        leaves none, all of them: nobody else waits on them, and the debts are forgiven."""
        within = [s for s in active if s.gen is not None and s.gen.grammar_debt <= 0]
        if within:
            return within
        for slot in active:
            assert slot.gen is not None
            slot.gen.grammar_debt = 0.0
        return active

    def settle(self, slots: list[Slot], elapsed: float) -> list[tuple[Slot, str]]:
        """Settle each grammar request's work in a step of `elapsed` seconds against its share
        of it, stepped or not; the slots whose one token's grammar took too long, and why."""
        earned = self.share * elapsed
        over: list[tuple[Slot, str]] = []
        for slot in slots:
            gen = slot.gen
            if gen is None or gen.job.grammar is None:
                continue
            used = self._used(gen)
            gen.grammar_debt = max(gen.grammar_debt + used - earned, -CREDIT)
            if used > self.step_max:
                over.append(
                    (
                        slot,
                        f"format: one token's grammar check took {used * 1000:.0f} ms, more "
                        f"than the {self.step_max * 1000:g} ms allowed "
                        "(limits.grammar_step_ms); use a simpler schema",
                    )
                )
        return over

    @staticmethod
    def _used(gen: Generation) -> float:
        spent = gen.sampler.grammar_seconds
        used, gen.grammar_seen = spent - gen.grammar_seen, spent
        return used
