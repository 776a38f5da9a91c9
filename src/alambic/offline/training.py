"""``alambic distill --teacher-logits DIR``: the triple loss with the teacher read from a cache, not run.

The batches are the cached examples, planned as a live run plans them (shuffled packed blocks for decoder text,
length-grouped chunks for encoders and conversations, reproducible from the seed and the index, so resume stays
exact; stored masks or assistant targets collated as stored), each carrying
its tokens' stored teacher rows (``teacher_topk_ids``, ``teacher_topk_log_probs``, ``teacher_rest_log_prob`` and,
when cached, ``teacher_hidden``), aligned with the batch's non-pad tokens. The recipe is DistilBERT's objective with
the soft-target term computed against the stored top-k (:func:`alambic.losses.divergences.topk_divergence`, any
divergence).
"""

from __future__ import annotations

import functools

from alambic.data.batching import length_grouped_batches, sequential_batches
from alambic.data.collate import CausalLMCollator, StoredMaskCollator
from alambic.data.pipeline import IndexedBatches
from alambic.offline.store import TeacherOutputs
from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTObjective, distilbert_row_counts


class _CachedCollator:
    def __init__(self, outputs: TeacherOutputs, tokenizer):
        self.outputs = outputs
        # encoders' static masks and conversations' assistant targets are stored with the ids
        masked = outputs.manifest["kind"] == "masked" or outputs.manifest.get("chat", False)
        self.collate = StoredMaskCollator(tokenizer) if masked else CausalLMCollator(tokenizer)
        self.masked = masked

    def __call__(self, examples, seed: int) -> dict:
        batch = self.collate([(e.input_ids, e.mlm_targets) if self.masked else e.input_ids for e in examples],
                             seed=seed)
        batch.update({f"teacher_{name}": rows for name, rows in self.outputs.rows(examples).items()})
        return batch


def cached_batches(outputs: TeacherOutputs, tokenizer, batch_size: int, seed: int) -> IndexedBatches:
    n = len(outputs)
    if outputs.manifest["kind"] == "causal" and not outputs.manifest.get("chat", False):
        plan = functools.partial(sequential_batches, n, batch_size, seed=seed)
    else:
        plan = functools.partial(length_grouped_batches, outputs.lengths, batch_size, seed=seed)
    return IndexedBatches(outputs, _CachedCollator(outputs, tokenizer), lambda epoch: plan(epoch=epoch), seed)


class OfflineDistilBERTRecipe:
    """DistilBERT's triple loss with the teacher's outputs read from the batch (see the module doc)."""

    masks_inputs = False  # the cache's masks are in the batch already
    teacher = None

    def __init__(self, student, loss: DistilBERTLossConfig):
        self.student, self.cfg = student, loss
        self.objective = DistilBERTObjective(student, loss)

    def row_counts(self, batch: dict) -> dict[str, int]:
        return distilbert_row_counts(batch, self.cfg)

    def teacher_targets(self, batch: dict) -> dict:
        targets = {"topk": (batch["teacher_topk_ids"], batch["teacher_topk_log_probs"],
                            batch["teacher_rest_log_prob"])}
        if "teacher_hidden" in batch:
            targets["hidden"] = batch["teacher_hidden"].float()
        return targets
