"""On-policy and mixed distillation (GKD, Agarwal et al. 2024): some batches' answers are the student's own samples.

With probability ``lmbda`` a micro-batch keeps only its prompts, and the current student answers them (eval mode, no
gradient through sampling, a KV cache). The batch then goes through the same collator, so the teacher scores every
sampled token and the divergence covers exactly those tokens (no cross-entropy towards the student's own
samples): the student is trained where it actually goes at
inference time, which removes the train / inference mismatch of learning only from fixed answers.

Whether a batch is on-policy, and the sampling generator, are functions of ``(seed, batch index)``: a resumed run
draws the same coins and the same samples from the same weights, so no sampler state needs saving for an exact
resume, and under DDP each process samples its own prompts with its own (index-derived) stream.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from alambic.data.chat import ChatExample


class OnPolicyBatches:
    """Wraps an indexed chat batch source (:class:`alambic.data.pipeline.IndexedBatches` of chat examples)."""

    def __init__(self, source, student: torch.nn.Module, options, *, eos_token_ids, pad_token_id: int,
                 max_length: int, seed: int):
        self.source, self.student, self.options = source, student, options
        self.eos_token_ids, self.pad_token_id = eos_token_ids, pad_token_id
        self.max_length, self.seed = max_length, seed
        self.per_epoch = source.per_epoch
        self.generation_seconds = 0.0
        """Time spent sampling so far (the engine logs its share of the step)."""

    def on_policy(self, index: int) -> bool:
        return bool(np.random.default_rng([self.seed, index, 0]).random() < self.options.lmbda)

    def __call__(self, index: int) -> dict:
        if not self.on_policy(index):
            return self.source(index)
        from alambic.sampling import sample

        examples = self.source.examples_at(index)
        prompts = [e.ids[:e.prompt_length].tolist() for e in examples]
        room = self.max_length - min(len(p) for p in prompts)  # longer prompts' answers are cut to max_length
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, index, 1]).integers(2**62)))
        start = time.perf_counter()
        answers = sample(self.student, prompts, max_new_tokens=max(1, min(self.options.max_new_tokens, room)),
                         temperature=self.options.temperature, top_p=self.options.top_p,
                         eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id, generator=generator)
        self.generation_seconds += time.perf_counter() - start
        sampled = []
        for prompt, answer in zip(prompts, answers):
            ids = np.asarray(prompt + list(answer), dtype=np.int64)[:self.max_length]
            assistant = np.arange(len(ids)) >= len(prompt)
            sampled.append(ChatExample(ids, assistant, len(prompt)))
        batch = self.source.collator(sampled, seed=self.source.batch_seed(index))
        batch["sampled"] = torch.ones((), dtype=torch.bool)  # no hard targets: the divergence alone trains here
        return batch
