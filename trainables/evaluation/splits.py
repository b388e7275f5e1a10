"""What a trial is scored on: one split of the evaluation data with the base model's
references for it (:class:`EvalSet`), and the validation split the search reads beside the test
split it never reads (:class:`EvalData`). ``references.default_eval_data`` builds them from data/."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from trainables.evaluation.metrics import TEST_KEYS, Prediction, evaluate


@dataclass(frozen=True)
class EvalSet:
    """One split of the evaluation data and the base model's completions of its snippets.

    ``migrations`` hold the split's held-out contexts as ``probe_contexts`` (the validation
    split: the probe contexts; the test split: data/test_contexts.jsonl), so that
    ``generalization`` means the same on both; ``specificity`` holds the over-application
    lookalikes."""

    migrations: tuple
    locality: tuple
    base_locality: tuple | None
    specificity: tuple = ()
    base_specificity: tuple | None = None
    # the base model's argmax along its completions (base_argmax): what locality compares with
    base_locality_argmax: tuple | None = None
    base_specificity_argmax: tuple | None = None
    # rewrites the final statements before they are judged (metrics.evaluate's ``repair``)
    repair: Callable | None = None
    # (migration id, probe context index) where the base model writes the deprecated API
    # (references.base_triggers): the subset ``deprecated_use_rate`` and ``replacement_hit_rate`` read
    triggered: frozenset | None = None

    def evaluate(self, model, tokenizer, quick: bool = False, start_states=None, train: bool = True,
                 batch_size: int = 96) -> tuple[dict, list[Prediction]]:
        return evaluate(model, tokenizer, self.migrations, self.locality, self.base_locality, batch_size,
                        quick=quick, start_states=start_states, specificity=self.specificity,
                        base_specificity=self.base_specificity, train=train,
                        base_locality_argmax=self.base_locality_argmax,
                        base_specificity_argmax=self.base_specificity_argmax, repair=self.repair,
                        triggered=self.triggered)

    def with_prompts(self, prompt_for) -> "EvalSet":
        """The same split with every prompt rewritten (the prompt baseline's headers):
        ``prompt_for(prompt, migration_id)``, the id of the migration a context belongs to or a
        lookalike resembles, None for a locality snippet."""

        def ctxs(cs, mid):
            return tuple(replace(c, prompt=prompt_for(c.prompt, mid)) for c in cs)

        return replace(self, migrations=tuple(
            replace(m, train_contexts=ctxs(m.train_contexts, m.id), probe_contexts=ctxs(m.probe_contexts, m.id))
            for m in self.migrations),
            locality=tuple(replace(s, prompt=prompt_for(s.prompt, None)) for s in self.locality),
            specificity=tuple(replace(s, prompt=prompt_for(s.prompt, s.migration)) for s in self.specificity))


@dataclass(frozen=True)
class EvalData:
    """What every trial is scored on: the search reads ``validation`` only (Optuna, ASHA, the
    stall rule and the best-trial choice); ``test`` is scored once, at a trial's final report,
    and reported beside it as ``test_*`` (``None`` when the data dir has no test split)."""

    validation: EvalSet
    test: EvalSet | None

    def test_metrics(self, model, tokenizer, start_states=None, batch_size: int = 96) -> dict:
        """``test_<key>`` for the :data:`TEST_KEYS` (empty without a test split)."""
        if self.test is None:
            return {}
        m, _ = self.test.evaluate(model, tokenizer, start_states=start_states, train=False, batch_size=batch_size)
        return {f"test_{k}": m[k] for k in TEST_KEYS if k in m}

    def with_prompts(self, prompt_for) -> "EvalData":
        return EvalData(self.validation.with_prompts(prompt_for),
                        self.test.with_prompts(prompt_for) if self.test else None)

    def with_repair(self, repair) -> "EvalData":
        """Both splits with their statements rewritten by ``repair`` before they are judged
        (the prompt baseline's ReplaceAPI; see ``metrics.evaluate``)."""
        return EvalData(replace(self.validation, repair=repair),
                        replace(self.test, repair=repair) if self.test else None)
