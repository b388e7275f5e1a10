"""The one evaluation every method is scored with (the metrics: ``metrics``). By job: greedy
decoding (``decoding``), the teacher-forced pass (``scoring``), the figures (``metrics``), what a
trial is scored on (``splits``) and the base model's cached references (``references``); where
statements end and how prompts are tokenized: ``trainables.token_rules``. This face hands on
the names the rest of the project imports. Apart from it: the general evaluation on HumanEval
(``general``), which only ``sweeps/evaluate.py --general-eval`` runs."""
from trainables.evaluation.decoding import generate, merged_copy
from trainables.evaluation.metrics import by_library, evaluate, soft_generalization, token_agreement
from trainables.evaluation.references import base_argmax, base_locality, base_triggers, default_eval_data, references
from trainables.evaluation.scoring import line_logprobs, score_lines
from trainables.evaluation.splits import EvalData, EvalSet
from trainables.token_rules import bracket_depth, encode, line_start_mask, newline_ids, prompt_pieces, statement_end

__all__ = ["EvalData", "EvalSet", "base_argmax", "base_locality", "base_triggers", "bracket_depth", "by_library", "default_eval_data",
           "encode", "evaluate", "generate", "line_logprobs", "line_start_mask", "merged_copy", "newline_ids",
           "prompt_pieces", "references", "score_lines", "soft_generalization", "statement_end", "token_agreement"]
