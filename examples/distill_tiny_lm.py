"""Distil a tiny causal LM from two others with FusedLinearGroupKDLoss (no downloads).

The three models are randomly initialised Hugging Face `transformers` models sharing a
vocabulary: the student a 2-layer Llama (hidden 32), the teachers a wider Llama (hidden
48) and a GPT-2 (hidden 40), so the teachers' head widths differ from the student's.
Sequences are a prompt followed by a completion, right-padded to one length; only
completion tokens are learned from: padding and prompt positions get target -100
(ignore_index) and count for nothing in the mean. The loss is computed from the final
hidden states and the LM heads, chunk by chunk, never materialising [tokens, V] logits
(docs/design.md §4).

    python examples/distill_tiny_lm.py --steps 20
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from orc_fast import FusedLinearGroupKDLoss

VOCAB = 1000
PAD = 0
IGNORE = -100


def tiny_llama(hidden: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def tiny_gpt2(hidden: int) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=128, pad_token_id=PAD,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)  # the defaults lie outside this vocabulary
    return GPT2LMHeadModel(config)


def backbone_and_head(model):
    """The model without its LM head, and the head's weight [V, H] (and bias or None)."""
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer, model.lm_head
    return model.model, model.lm_head


def make_batch(generator, batch: int, length: int):
    """Token ids [B, T], attention mask [B, T] and next-token targets [B, T - 1].

    Each row: a prompt of 2-6 tokens, a completion, then padding. Targets are -100 on the
    prompt (not learned) and on padding.
    """
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    targets = ids[:, 1:].clone()
    for row in range(batch):
        used = int(torch.randint(length // 2, length + 1, (1,), generator=generator))
        prompt = int(torch.randint(2, 7, (1,), generator=generator))
        ids[row, used:] = PAD
        mask[row, used:] = 0
        targets[row, used - 1:] = IGNORE  # predicting padding
        targets[row, :prompt - 1] = IGNORE  # predicting prompt tokens
    return ids, mask, targets


def final_hidden(model, ids, mask) -> torch.Tensor:
    backbone, _ = backbone_and_head(model)
    return backbone(input_ids=ids, attention_mask=mask).last_hidden_state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    student = tiny_llama(32)
    teachers = [tiny_llama(48).eval(), tiny_gpt2(40).eval()]
    criterion = FusedLinearGroupKDLoss(temperature=2.0, alpha=0.9, ignore_index=IGNORE, chunk_size=args.chunk_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    _, student_head = backbone_and_head(student)

    for step in range(args.steps):
        ids, mask, targets = make_batch(generator, args.batch, args.length)
        # position t predicts token t + 1: drop the last position, flatten to [tokens, H]
        hidden = final_hidden(student, ids, mask)[:, :-1].reshape(-1, student.config.hidden_size)
        with torch.no_grad():
            teacher_hidden = [final_hidden(t, ids, mask)[:, :-1].reshape(targets.numel(), -1) for t in teachers]
        teacher_heads = [backbone_and_head(t)[1] for t in teachers]
        loss = criterion(
            hidden, student_head.weight, targets.reshape(-1),
            teacher_hidden=teacher_hidden,
            teacher_head_weights=[head.weight.detach() for head in teacher_heads],
            student_head_bias=student_head.bias,
            teacher_head_biases=[None if head.bias is None else head.bias.detach() for head in teacher_heads],
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counted = int((targets != IGNORE).sum())
        print(f"step {step + 1}: loss {loss.item():.4f} over {counted} of {targets.numel()} tokens", flush=True)


if __name__ == "__main__":
    main()
