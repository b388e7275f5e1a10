"""The teacher-forced pass: every (prompt, line) scored in one batched forward, its
log-probability and the proof that greedy decoding writes exactly that line
(:func:`score_lines`)."""
from __future__ import annotations

from trainables.evaluation.decoding import MAX_NEW_TOKENS
from trainables.token_rules import bracket_depth, clean_stop_ids, encode, fit_to_vocab, line_start_mask, prompt_pieces


def _plain(model):
    """The ``PreTrainedModel`` whose forward ``model``'s is: itself, or the base model of a PEFT
    LoRA model (LoRA's layers sit inside it, so its forward is the adapted one); None for
    anything else (a sampler's argmax is not greedy decoding)."""
    from transformers import PreTrainedModel

    peft = getattr(model, "peft_config", None)
    if peft is not None and hasattr(model, "get_base_model") and all(c.peft_type == "LORA" for c in peft.values()):
        model = model.get_base_model()
    return model if isinstance(model, PreTrainedModel) else None


def _trunk(plain):
    """(decoder, head) when the logits of ``plain`` (:func:`_plain`) are
    ``head(decoder(...).last_hidden_state)`` (``models.head_only``): only the scored positions go
    through the head. None otherwise: every position does.

    Without it every position goes through the head: on SmolLM2 (49,152 x 576) that is more
    than the 30 layers cost, on Gemma 3 270M (262,144 x 640) several times more, and a LoRA model
    too large for ``merged_copy`` took minutes."""
    from trainables.models import head_only

    if plain is None or not head_only(plain.config):
        return None
    return plain.get_decoder(), plain.get_output_embeddings()


def score_lines(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 96,
                max_new_tokens: int = MAX_NEW_TOKENS, start_states=None,
                heads: list[str] | None = None, argmax: bool = False, groups: list[int] | None = None) -> list[tuple]:
    """For each (prompt, line), teacher forced in one batched pass: the summed log-probability
    of the line's tokens after the prompt (prompt and line tokenized apart, as in pretraining
    and generation), and whether :func:`decoding.generate` provably completes the prompt with
    exactly this line. ``heads``: as in :func:`decoding.generate` (the line is then what follows
    the head).

    The proof: greedy decoding emits the line's tokens iff each is the argmax after the ones
    before it, and then stops with nothing more on the line iff the next argmax is a stop token
    that starts with a newline (or EOS), unless the line already fills ``max_new_tokens``.
    Lines that do not survive a decode/encode round trip, or are longer than that, are never
    verified. Only plain models (:func:`_plain`) are verified (a sampler's argmax is not greedy
    decoding); the verdict agrees with decoding up to float
    rounding between a full pass and incremental KV-cached steps (a near-tie can fall either
    way in both).

    ``argmax``: also return, per pair, the model's argmax at each position read (before each
    line token, then after the line; the first one restricted as decoding restricts it) and
    whether each is the line's token (the last: a stop token), as a third and fourth element.

    ``groups``: a label per pair; pairs are batched only with pairs of their own label, in the
    order a call with that group alone would batch them. A pair's figures then do not depend on
    what else was scored beside it: in bf16 / fp16 another batch's padding width changes the
    rounding, and the base model's references (scored alone) would disagree with an unchanged
    model at near-ties.

    ``start_states``: for a model whose layers below some k are the base model's (hierarchical
    LoRA, merged), a function from the token sequences (prompt + line) to (k, the base model's
    input to layer k for each; ``FrozenStates.sequence_states``) or None: the pass then starts
    at layer k."""
    import torch

    from trainables.tensors import pad_states, stack

    device = next(model.parameters()).device
    plain = _plain(model)
    trunk = _trunk(plain)
    stops = torch.tensor(sorted(clean_stop_ids(tokenizer)), dtype=torch.long, device=device)
    heads = heads or [""] * len(pairs)
    enc, checkable, at_start = [], [], []
    for (prompt, line), head in zip(pairs, heads):
        ids, lead, start = prompt_pieces(tokenizer, prompt, head)
        c = encode(tokenizer, lead + line)
        enc.append((ids, c))
        at_start.append(start)
        # decoding stops after the line only where its brackets close (statement_end); a blank
        # line after a line break is not where decoding stops (it waits for the statement)
        checkable.append(plain is not None and "\n" not in line and len(c) <= max_new_tokens
                         and (bracket_depth(line, bracket_depth(head)) <= 0 or len(c) == max_new_tokens)
                         and not (start and not line.strip())
                         and tokenizer.decode(c, skip_special_tokens=True) == lead + line)
    not_line_start = ~line_start_mask(tokenizer).to(device) if any(at_start) else None
    start = start_states([p + c for p, c in enc]) if trunk is not None and start_states is not None else None
    groups = groups or [0] * len(enc)
    batches = []
    for g in dict.fromkeys(groups):
        order = sorted((i for i in range(len(enc)) if groups[i] == g), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
        batches += [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    out: list[tuple] = [(0.0, False)] * len(enc)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in batches:
            width = max(len(enc[i][0]) + len(enc[i][1]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            # the positions whose next-token distribution is read: the one before each line
            # token, and the one after the line (does it stop there?)
            rows, cols, targets, firsts = [], [], [], []
            for row, i in enumerate(idx):
                p, c = enc[i]
                ids[row, : len(p) + len(c)] = torch.tensor(p + c)
                mask[row, : len(p) + len(c)] = 1
                rows += [row] * (len(c) + 1)
                cols += range(len(p) - 1, len(p) + len(c))
                targets += c + [-1]
                firsts += [at_start[i]] + [False] * len(c)
            ids, mask = ids.to(device), mask.to(device)
            rows_t = torch.tensor(rows, device=device)
            cols_t = torch.tensor(cols, device=device)
            if trunk is not None:
                decoder, head = trunk
                if start is not None:
                    k, states = start
                    hk = pad_states([states[i] for i in idx], width)
                    with stack(decoder, list(decoder.layers)[k:]):
                        hidden = decoder(inputs_embeds=hk, attention_mask=mask).last_hidden_state
                else:
                    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = head(hidden[rows_t, cols_t]).float()
            else:
                logits = _read_logits(model, ids, mask, rows_t, cols_t)
            if not_line_start is not None:  # decoding's first step there picks a line break only
                first = torch.tensor(firsts, device=device)
                logits = logits.masked_fill(first[:, None] & fit_to_vocab(not_line_start, logits.shape[-1])[None],
                                            float("-inf"))
            targets_t = torch.tensor(targets, device=device)
            is_line = targets_t >= 0
            logp = torch.log_softmax(logits, -1).gather(-1, targets_t.clamp(min=0)[:, None])[:, 0] * is_line
            best = logits.argmax(-1)
            hit = torch.where(is_line, best == targets_t, torch.isin(best, stops))
            k = 0
            logp, hit, best = logp.tolist(), hit.tolist(), best.tolist()
            for row, i in enumerate(idx):
                n = len(enc[i][1])
                line_hits = hit[k : k + n]
                stop_ok = hit[k + n] or n == max_new_tokens
                out[i] = (sum(logp[k : k + n]), checkable[i] and all(line_hits) and stop_ok)
                if argmax:
                    out[i] += (best[k : k + n + 1], hit[k : k + n + 1])
                k += n + 1
    if was_training:
        model.train()
    return out


# Logit elements one forward may produce where every position goes through the head (a
# sampler, a head that is not the decoder's last step): a 96-row batch of 150-token prompts
# under Gemma 3's 262k-token vocabulary is 15 GB in fp32, and the sampler adds as much noise.
LOGIT_BUDGET = 2**27


def _read_logits(model, ids, mask, rows_t, cols_t):
    """``model``'s logits at (rows, cols), its forward run on as many rows at a time as
    :data:`LOGIT_BUDGET` allows."""
    import torch

    vocab = model.config.vocab_size
    per = max(1, LOGIT_BUDGET // max(1, ids.shape[1] * vocab))
    if per >= ids.shape[0]:
        return model(input_ids=ids, attention_mask=mask).logits[rows_t, cols_t].float()
    parts = []
    for s in range(0, ids.shape[0], per):
        pick = (rows_t >= s) & (rows_t < s + per)
        logits = model(input_ids=ids[s : s + per], attention_mask=mask[s : s + per]).logits
        parts.append(logits[rows_t[pick] - s, cols_t[pick]].float())
    return torch.cat(parts)


def line_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 96) -> list[float]:
    """Sum of the token log-probabilities of each ``line`` after its ``prompt`` (teacher
    forced; prompt and line tokenized apart, as in pretraining and generation)."""
    return [lp for lp, _ in score_lines(model, tokenizer, pairs, batch_size)]
